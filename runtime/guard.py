"""A worker's memory, bounded whatever its peers send: the byte account of every connection.

Board-side code: imports the standard library and pyzmq only.

Why ZeroMQ's own limits are not enough
--------------------------------------
libzmq (4.3) hands a multipart message to the application only once its last frame has
arrived; until then it keeps every frame in the connection's pipe, where the application
cannot see it (reading frame by frame with ``RCVMORE`` does not help: the first frame is not
readable either). ``ZMQ_MAXMSGSIZE`` limits one frame and ``ZMQ_RCVHWM`` counts only complete
messages, so a peer that sends frames flagged MORE and never a last one grows the worker
without limit, and every complete message a connection may queue (64) can be as large as
the frame limit. Empty frames cost libzmq 64 bytes of memory for 2 bytes on the wire.

What bounds it
--------------
The kernel knows, per TCP connection, how many bytes libzmq has read from it
(``tcpi_bytes_received`` of ``TCP_INFO`` less what still waits in the socket, ``FIONREAD``),
and ZeroMQ tells the worker which connection each message it reads came from
(``ZMQ_SRCFD``), so the worker knows how many bytes of frames it has taken from each
connection (:func:`wire_cost` of every frame). The difference is what libzmq holds for that
connection: frames of messages not yet read, the unfinished one included, plus the
connection's handshake and heartbeats, which are allowed for (HANDSHAKE_ALLOWANCE, and
CONTROL_RATE bytes a second up to a cap). A thread (:class:`Guard`) compares it every
TICK_S with what that peer may hold (its *budget*, from the plan, see
:func:`splitc.runtime.worker.budgets`) and closes a connection over budget: ``shutdown(2)``
on libzmq's own socket, so libzmq reads the end of the stream, closes the connection and
frees the unfinished message. Budgets are per role — the session's client, each device of
the plan, and "anonymous" for a connection that has not yet shown who it is (with keys, the
ZAP user id of its key; without keys, the connection that set the session up, or one that
showed the session id) — and a role's connections share its budget.

Two backstops: at most ``max_connections`` connections (the oldest anonymous one is closed
to make room, else the newest), and when the process's RSS passes ``rss_limit`` (for
instance many small frames, whose memory is a multiple of their bytes on the wire) every
anonymous connection holding data is closed. After closing, freed memory is handed back
to the system (``malloc_trim``).

Limits: this needs Linux (``TCP_INFO``'s byte counters, Linux 4.1+) and TCP; elsewhere
:func:`available` is false and the worker says so and runs without the account. The thread
sees a connection at most TICK_S late, so a peer can overshoot its budget by what the link
carries in that time (10 ms: 1.25 MB at 1 Gbit/s).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("splitc.worker")

#: How often the guard looks at every connection (seconds).
TICK_S = 0.01
#: Bytes a connection may have sent beyond its frames: ZMTP greeting, handshake and its
#: metadata (a CurveZMQ handshake is about 600 bytes).
HANDSHAKE_ALLOWANCE = 4096
#: Heartbeat bytes a connection may send per second (a ZMTP PING every 0.4 s from the peer:
#: 9 bytes, 44 with CurveZMQ, so 22 or 110 B/s; the worker's own socket sends no PINGs),
#: allowed up to CONTROL_CAP (a role) or CONTROL_CAP_ANONYMOUS: that much a connection may
#: keep beyond its budget after a long life, and a long-lived connection whose heartbeats
#: pass the cap (about 20 h with keys, 4 days without) is closed once; its peer reconnects.
CONTROL_RATE = 256
CONTROL_CAP = 8 << 20
CONTROL_CAP_ANONYMOUS = 64 << 10
#: ZMTP frame overhead: flags and a 1-byte size up to 255 bytes, an 8-byte size above; a
#: CurveZMQ MESSAGE command adds its name, nonce, MAC and flags (33 bytes) to every frame.
CURVE_OVERHEAD = 33
#: TCP state "established" in ``tcp_info.tcpi_state``.
_ESTABLISHED = 1
_FIONREAD = 0x541B
_TCP_INFO_LEN = 232
_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in struct tcp_info
_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED


def wire_cost(size: int, curve: bool) -> int:
    """Bytes a frame of ``size`` bytes takes on the wire (ZMTP 3, NULL or CURVE)."""
    body = size + CURVE_OVERHEAD if curve else size
    return body + (2 if body <= 255 else 9)


class _Libc:
    """getsockopt, ioctl and malloc_trim on raw file descriptors (libzmq's own sockets: a
    Python socket object would close them when collected)."""

    def __init__(self):
        self.lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self.buf = ctypes.create_string_buffer(_TCP_INFO_LEN)
        self.len = ctypes.c_uint32()
        self.inq = ctypes.c_int()
        self.trim = getattr(self.lib, "malloc_trim", None)

    def tcp_info(self, fd: int) -> bytes | None:
        self.len.value = _TCP_INFO_LEN
        if self.lib.getsockopt(fd, socket.IPPROTO_TCP, socket.TCP_INFO, self.buf,
                               ctypes.byref(self.len)) != 0:
            return None
        return self.buf.raw[:self.len.value]

    def read_bytes(self, fd: int) -> int | None:
        """Bytes libzmq has read from connection ``fd`` (None: not an open TCP socket)."""
        info = self.tcp_info(fd)
        if info is None or len(info) < _BYTES_RECEIVED + 8:
            return None
        received = struct.unpack_from("Q", info, _BYTES_RECEIVED)[0]
        if self.lib.ioctl(fd, _FIONREAD, ctypes.byref(self.inq)) != 0:
            return None
        return received - self.inq.value

    def established(self, fd: int) -> bool:
        info = self.tcp_info(fd)
        return info is not None and info[0] == _ESTABLISHED


_LIBC: _Libc | None = None


def available() -> bool:
    """Whether this platform gives what the byte account needs (Linux TCP_INFO counters)."""
    global _LIBC
    if not sys.platform.startswith("linux"):
        return False
    if _LIBC is None:
        try:
            _LIBC = _Libc()
        except OSError:
            return False
    return True


def established(fd: int | None) -> bool:
    """Whether ``fd`` is an established TCP connection (True where that cannot be told: a
    transport without a descriptor, or a platform without TCP_INFO). A connection whose peer
    has closed its end (CLOSE_WAIT) is not."""
    if fd is None or not available():
        return True
    return _LIBC.established(fd)


def trim_memory() -> None:
    """Hand memory freed inside the process back to the system (glibc's ``malloc_trim``)."""
    if available() and _LIBC.trim is not None:
        _LIBC.trim(0)


def limit_mmap_threshold(nbytes: int = 256 << 10) -> None:
    """Serve allocations of ``nbytes`` and more with their own mappings, returned to the system
    when freed (glibc otherwise raises this threshold after the first large free, and keeps
    freed frames in its heap)."""
    if available():
        mallopt = getattr(_LIBC.lib, "mallopt", None)
        if mallopt is not None:
            mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


def rss() -> int:
    """This process's resident set size, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def raise_open_files() -> int:
    """Raise this process's open-file limit to its hard limit; returns the limit now."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class LogLimit:
    """At most ``rate`` log lines a second (in bursts of up to ``burst``): a flood of hostile
    messages must not become a flood of log lines. Lines over the limit are counted, and the
    count goes out with the next line that passes. One per thread."""

    def __init__(self, logger: logging.Logger, rate: float = 20.0, burst: int = 50):
        self.logger, self.rate, self.burst = logger, rate, burst
        self.tokens, self.at, self.dropped = float(burst), time.monotonic(), 0

    def __call__(self, level: int, msg: str, *args, exc_info: bool = False) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            self.dropped += 1
            return
        self.tokens -= 1
        if self.dropped:
            msg = f"({self.dropped} lines not logged) {msg}"
            self.dropped = 0
        self.logger.log(level, msg, *args, exc_info=exc_info)


@dataclass
class _Conn:
    fd: int
    peer: tuple | None
    opened: float
    role: str | None = None
    credited: int = 0
    unread: int = 0   # bytes libzmq read from it that the worker has not taken (last tick)
    held: int = 0     # unread, less the handshake and heartbeat allowance
    closing: bool = False


@dataclass
class Counters:
    """What the guard did: connections closed over budget, at the cap, and on the RSS limit."""

    over_budget: int = 0
    over_cap: int = 0
    over_rss: int = 0
    peak_held: int = 0
    last: list[str] = field(default_factory=list)  # the latest reasons, newest last


class Guard:
    """The byte account of every connection of a worker's ROUTER socket (module docstring).

    Parameters
    ----------
    router : zmq.Socket
        The worker's ROUTER socket, before it binds.
    budgets : dict
        Role (``"client"`` or a device name) -> bytes its connections may hold together.
    anonymous : int
        Bytes one connection that has not shown its role may hold.
    curve : bool
        Connections are CurveZMQ-encrypted (frames cost 33 bytes more on the wire).
    max_connections : int
        Connections kept open at most.
    max_anonymous : int
        Anonymous connections kept open at most.
    """

    def __init__(self, router: zmq.Socket, budgets: dict[str, int], anonymous: int, *,
                 curve: bool, max_connections: int, max_anonymous: int):
        self.budgets, self.anonymous, self.curve = dict(budgets), anonymous, curve
        self.max_connections, self.max_anonymous = max_connections, max_anonymous
        self.rss_limit: int | None = None
        self.counters = Counters()
        self._conns: dict[int, _Conn] = {}
        self._credits: deque = deque()  # (fd, bytes, role) from the serving thread
        self._trim = False
        self._stop = threading.Event()
        self._mon = router.get_monitor_socket(_EVENTS)
        self._router = router
        self._thread = threading.Thread(target=self._run, name="splitc-guard", daemon=True)
        self._log = LogLimit(log)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close the monitor (before the context is destroyed)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self._router.disable_monitor()
        except zmq.ZMQError:
            pass
        self._mon.close(linger=0)

    # -- called by the serving thread -------------------------------------------------------
    def account(self, fd: int | None, sizes: list[int], role: str | None) -> None:
        """The serving thread read frames of ``sizes`` bytes from connection ``fd``, whose
        sender is ``role`` (None: not known)."""
        if fd is not None:
            self._credits.append((fd, sum(wire_cost(n, self.curve) for n in sizes), role))

    def unread(self) -> dict[str, int]:
        """Bytes read from the connections and not yet taken by the worker, per role
        ("anonymous" for connections not yet known), as of the last tick: handshakes and
        heartbeats included, so a few hundred bytes per connection when nothing is held."""
        out: dict[str, int] = {}
        for c in list(self._conns.values()):
            out[c.role or "anonymous"] = out.get(c.role or "anonymous", 0) + c.unread
        return out

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        ticks = 0
        while not self._stop.is_set():
            try:
                if self._mon.poll(TICK_S * 1e3):
                    self._events()
                ticks += 1
                self._check(time.monotonic(), rss_due=ticks % 5 == 0)
            except zmq.ZMQError:
                if self._stop.is_set() or self._mon.closed:
                    return
                raise
            except Exception:  # the guard must not die quietly: say so and keep going
                log.exception("memory guard: unexpected error")
                self._stop.wait(TICK_S)

    def _events(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._mon, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            fd = event["value"]
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._accepted(fd)
            elif self._conns.pop(fd, None) is not None:  # disconnected or closed
                self._trim = True

    def _accepted(self, fd: int) -> None:
        c = self._conns[fd] = _Conn(fd, _peer(fd), time.monotonic())
        open_ = [x for x in self._conns.values() if not x.closing]
        anonymous = sorted((x for x in open_ if x.role is None), key=lambda x: x.opened)
        if len(open_) > self.max_connections:
            self.counters.over_cap += 1
            self._close(anonymous[0] if anonymous else c,
                        f"more than {self.max_connections} connections")
        elif len(anonymous) > self.max_anonymous:
            self.counters.over_cap += 1
            self._close(anonymous[0], f"more than {self.max_anonymous} connections that have "
                                      "not shown who they are")

    def _check(self, now: float, rss_due: bool) -> None:
        readings = {fd: _LIBC.read_bytes(fd) for fd in list(self._conns)}
        while self._credits:  # (after reading the kernel: never credit bytes not yet read)
            fd, credit, role = self._credits.popleft()
            c = self._conns.get(fd)
            if c is None:  # its connection's event is not read yet (it was sent before the
                self._events()  # message was read), or the connection is gone
                c = self._conns.get(fd)
                if c is None:
                    continue
            c.credited += credit
            if role is not None:
                c.role = role
        by_role: dict[str, list[_Conn]] = {}
        for fd, got in readings.items():
            c = self._conns.get(fd)
            if c is None or c.closing or got is None:
                continue
            cap = CONTROL_CAP if c.role else CONTROL_CAP_ANONYMOUS
            allowance = HANDSHAKE_ALLOWANCE + min(cap, int((now - c.opened) * CONTROL_RATE))
            c.unread = got - c.credited
            c.held = max(0, c.unread - allowance)
            if c.role is None:
                if c.held > self.anonymous:
                    self._over(c, self.anonymous, "a connection that has not shown who it is")
            else:
                by_role.setdefault(c.role, []).append(c)
        total = 0
        for role, conns in by_role.items():
            held = sum(c.held for c in conns)
            total += held
            budget = self.budgets.get(role, 0)
            if held > budget:
                self._over(max(conns, key=lambda c: c.held), budget, role)
        self.counters.peak_held = max(self.counters.peak_held, total)
        if rss_due and self.rss_limit is not None:
            self._check_rss()
        if self._trim:
            self._trim = False
            trim_memory()

    def _check_rss(self) -> None:
        if rss() <= self.rss_limit:
            return
        trim_memory()
        if rss() <= self.rss_limit:
            return
        holding = sorted((c for c in self._conns.values() if c.role is None and c.held > 0
                          and not c.closing), key=lambda c: -c.held)
        for c in holding:
            self.counters.over_rss += 1
            self._close(c, f"the worker is above its memory limit ({rss() >> 20} MiB > "
                           f"{self.rss_limit >> 20} MiB) and this anonymous connection holds "
                           f"{c.held} bytes")

    def _over(self, c: _Conn, budget: int, who: str) -> None:
        self.counters.over_budget += 1
        self._close(c, f"it holds {c.held} bytes unread, over the {budget} bytes {who} may "
                       "hold (an unfinished message, or more queued than the plan needs)")

    def _close(self, c: _Conn, why: str) -> None:
        c.closing = True
        peer = f"{c.peer[0]}:{c.peer[1]}" if c.peer else "?"
        text = f"closed the connection from {peer} ({c.role or 'anonymous'}): {why}"
        self._log(logging.WARNING, "memory guard: %s", text)
        self.counters.last = [*self.counters.last[-9:], text]
        try:
            dup = socket.socket(fileno=os.dup(c.fd))  # (never close libzmq's own descriptor)
        except OSError:
            return
        try:
            if c.peer is None or _peer_of(dup) == c.peer:
                dup.shutdown(socket.SHUT_RDWR)
            else:  # the descriptor was closed and reused since: forget the old connection
                self._conns.pop(c.fd, None)
        except OSError:
            pass
        finally:
            dup.close()
        self._trim = True


def _peer_of(sock: socket.socket) -> tuple | None:
    try:
        return tuple(sock.getpeername())
    except OSError:
        return None


def _peer(fd: int) -> tuple | None:
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        return _peer_of(dup)
    finally:
        dup.close()
