"""CurveZMQ on the runtime's sockets: every byte encrypted, and only known keys let in.

Board-side code: imports pyzmq only.

Keys
----
``splitc keys KEYDIR --plan OUT`` writes one key pair per device and one for the client, in
pyzmq's certificate format (``NAME.key`` holds the public key, ``NAME.key_secret`` both)::

    KEYDIR/dev0/   dev0.key_secret  + every NAME.key     -> copy to the board of dev0
    KEYDIR/client/ client.key_secret + every NAME.key    -> where the client runs

A party given a key folder (``--keys``) uses its own secret key from there, and

* as a worker, encrypts its ROUTER socket as a CURVE server and admits, through a ZAP handler
  (ZeroMQ's authentication protocol), only connections whose public key is one of the folder's
  ``*.key`` files — the client and the other devices. A stranger's handshake fails before a
  single message reaches the worker;
* as a client (or a worker sending to a peer), connects as a CURVE client, checking that the
  server holds the secret key matching the public key of the device it meant to reach.

Default: encryption is required off loopback. Binding or connecting to any address other than
127.0.0.0/8, ::1, localhost, ipc:// or inproc:// without keys is refused unless the user says
``--insecure``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from .plan import PlanError

#: The key name of the client (devices use their plan names).
CLIENT = "client"
PUBLIC, SECRET = ".key", ".key_secret"


class KeyProblem(PlanError):
    """Keys that are missing or unreadable, an unencrypted address off loopback, or an
    endpoint of a form splitc does not take."""


def generate(keydir: str | Path, names: list[str], *, force: bool = False) -> dict[str, Path]:
    """Write a key pair for each of ``names`` and one folder per name holding its own secret
    key and every public key; returns ``{name: its folder}``. Secret key files are created
    with mode 0600 (never readable by others, not even for a moment), public ones 0644."""
    keydir = Path(keydir)
    existing = [n for n in names if (keydir / f"{n}{SECRET}").exists()]
    if existing and not force:
        raise KeyProblem(f"{keydir} already holds keys for {', '.join(existing)}: "
                         "keep them (boards have copies) or pass --force to replace them")
    keydir.mkdir(parents=True, exist_ok=True)
    pairs = {n: zmq.curve_keypair() for n in names}
    for n, (public, secret) in pairs.items():
        _write(keydir / f"{n}{PUBLIC}", _certificate(public), 0o644)
        _write(keydir / f"{n}{SECRET}", _certificate(public, secret), 0o600)
    folders = {}
    for n in names:
        folder = folders[n] = keydir / n
        folder.mkdir(exist_ok=True)
        for old in folder.glob(f"*{PUBLIC}*"):
            old.unlink()
        _write(folder / f"{n}{SECRET}", _certificate(*pairs[n]), 0o600)
        for m, (public, _) in pairs.items():
            _write(folder / f"{m}{PUBLIC}", _certificate(public), 0o644)
    return folders


def _certificate(public: bytes, secret: bytes | None = None) -> bytes:
    """A key file in pyzmq's certificate format (``zmq.auth.load_certificate`` reads it)."""
    kind = "Secret" if secret else "Public"
    lines = [f"#   ZeroMQ CURVE {kind} Certificate (splitc keys)", "", "metadata", "curve",
             f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return ("\n".join(lines) + "\n").encode()


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` anew, created with ``mode`` (a file there is replaced, not reused: an
    old file's looser mode must not carry over)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


#: The endpoints splitc takes: tcp://HOST:PORT — HOST an IPv4 address, [an IPv6 address], a
#: host or interface name, or * (bind only); PORT a number, or * (bind only) — ipc://PATH and
#: inproc://NAME. Nothing else: in particular not ZeroMQ's tcp://SOURCE;DESTINATION form,
#: whose source part would pass for the address.
_TCP = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*-]+):(\*|[0-9]{1,5})")


def parse_endpoint(endpoint: str) -> tuple[str, str]:
    """(scheme, host) of a ZeroMQ endpoint splitc takes (``_TCP``, ipc:// or inproc://); the
    host of ipc and inproc is "". Raises :class:`KeyProblem` naming the endpoint otherwise."""
    if not isinstance(endpoint, str):
        raise KeyProblem(f"endpoint {endpoint!r} is not a string")
    scheme, sep, rest = endpoint.partition("://")
    if sep and scheme in ("ipc", "inproc") and rest and ";" not in rest:
        return scheme, ""
    m = _TCP.fullmatch(endpoint)
    if m is None or (m[2] != "*" and not 0 <= int(m[2]) <= 65535):
        raise KeyProblem(f"endpoint {endpoint!r} is not one splitc takes: write tcp://HOST:PORT "
                         "(an address or name, and a port), ipc://PATH or inproc://NAME")
    return "tcp", m[1][1:-1] if m[1].startswith("[") else m[1]


def is_loopback(endpoint: str) -> bool:
    """Whether a ZeroMQ endpoint stays on this machine (loopback TCP, ipc, inproc). An endpoint
    of another form (:func:`parse_endpoint`) is not."""
    try:
        scheme, host = parse_endpoint(endpoint)
    except KeyProblem:
        return False
    if scheme in ("ipc", "inproc") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or an interface (tcp://eth0:5555, tcp://*:5555)


def require(endpoints: list[str], curve: Curve | None, insecure: bool, what: str) -> None:
    """Refuse an endpoint of a form splitc does not take, and refuse to ``what`` (bind,
    connect) in the clear off loopback unless ``insecure``."""
    for e in endpoints:
        parse_endpoint(e)
    if curve is not None or insecure:
        return
    outside = [e for e in endpoints if not is_loopback(e)]
    if outside:
        raise KeyProblem(
            f"refusing to {what} {', '.join(outside)} unencrypted: off loopback splitc "
            "encrypts by default. Give a key folder (--keys DIR; make one with `splitc keys "
            "DIR --plan OUT`), or --insecure to send tensors in the clear")


class Curve:
    """One party's view of a key folder: its own key pair, and the public keys it trusts.

    Parameters
    ----------
    folder : path
        A folder holding ``NAME.key_secret`` and the ``*.key`` public keys.
    name : str
        This party: a device name, or ``"client"``.
    """

    def __init__(self, folder: str | Path, name: str):
        self.folder, self.name = Path(folder), name
        secret = self.folder / f"{name}{SECRET}"
        if not self.folder.is_dir():
            raise KeyProblem(f"key folder {self.folder} does not exist (make one with "
                             "`splitc keys`)")
        if not secret.exists():
            raise KeyProblem(f"{self.folder} has no secret key for {name} ({secret.name}); "
                             f"copy the folder `splitc keys` made for {name}")
        self.public, self.secret = self._load(secret)
        if self.secret is None:
            raise KeyProblem(f"{secret} holds no secret key")
        self.trusted = {p.name[:-len(PUBLIC)]: self._load(p)[0]
                        for p in sorted(self.folder.glob(f"*{PUBLIC}"))}
        self._auth = None

    @staticmethod
    def _load(path: Path) -> tuple[bytes, bytes | None]:
        try:
            return zmq.auth.load_certificate(str(path))
        except (OSError, ValueError) as e:
            raise KeyProblem(f"cannot read key {path}: {e}") from None

    def key_of(self, name: str) -> bytes:
        key = self.trusted.get(name)
        if key is None:
            raise KeyProblem(f"{self.folder} has no public key for {name} ({name}{PUBLIC}); "
                             "copy it from the folder `splitc keys` wrote")
        return key

    def serve(self, ctx: zmq.Context, sock: zmq.Socket) -> None:
        """Make ``sock`` (before it binds) a CURVE server that admits only trusted keys."""
        if self._auth is None:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(ctx)
            # the user id of a connection (ZMQ's "User-Id" on each message) is the name its
            # key is registered under: the worker knows who is speaking, whatever ``src`` says
            names = {key: name for name, key in self.trusted.items()}
            self._auth.curve_user_id = lambda key: names.get(z85.encode(key), "")
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(self.folder))
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def dial(self, sock: zmq.Socket, peer: str) -> None:
        """Make ``sock`` (before it connects) a CURVE client of device ``peer``."""
        sock.curve_serverkey = self.key_of(peer)
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
