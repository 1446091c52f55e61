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
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.utils import z85

from .plan import PlanError

#: The key name of the client (devices use their plan names).
CLIENT = "client"
PUBLIC, SECRET = ".key", ".key_secret"


class KeyProblem(PlanError):
    """Keys that are missing or unreadable, or an unencrypted address off loopback."""


def generate(keydir: str | Path, names: list[str], *, force: bool = False) -> dict[str, Path]:
    """Write a key pair for each of ``names`` and one folder per name holding its own secret
    key and every public key; returns ``{name: its folder}``."""
    keydir = Path(keydir)
    existing = [n for n in names if (keydir / f"{n}{SECRET}").exists()]
    if existing and not force:
        raise KeyProblem(f"{keydir} already holds keys for {', '.join(existing)}: "
                         "keep them (boards have copies) or pass --force to replace them")
    keydir.mkdir(parents=True, exist_ok=True)
    for n in names:
        zmq.auth.create_certificates(str(keydir), n)
    folders = {}
    for n in names:
        folder = folders[n] = keydir / n
        folder.mkdir(exist_ok=True)
        for old in folder.glob(f"*{PUBLIC}*"):
            old.unlink()
        (folder / f"{n}{SECRET}").write_bytes((keydir / f"{n}{SECRET}").read_bytes())
        (folder / f"{n}{SECRET}").chmod(0o600)
        for m in names:
            (folder / f"{m}{PUBLIC}").write_bytes((keydir / f"{m}{PUBLIC}").read_bytes())
    for n in names:
        (keydir / f"{n}{SECRET}").chmod(0o600)
    return folders


def is_loopback(endpoint: str) -> bool:
    """Whether a ZeroMQ endpoint stays on this machine (loopback TCP, ipc, inproc)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = urlsplit(f"//{rest}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or an interface (tcp://eth0:5555, tcp://*:5555)


def require(endpoints: list[str], curve: Curve | None, insecure: bool, what: str) -> None:
    """Refuse to ``what`` (bind, connect) in the clear off loopback unless ``insecure``."""
    if curve is not None or insecure:
        return
    # (a malformed endpoint is left to ZeroMQ's own error)
    outside = [e for e in endpoints if "://" in e and not is_loopback(e)]
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
