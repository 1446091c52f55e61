"""A worker's memory, bounded whatever its peers send: the byte account of every connection.

Board-side code: imports the standard library (and pyzmq in the worker's process only).

Why ZeroMQ's own limits are not enough
--------------------------------------
libzmq (4.3) hands a multipart message to the application only once its last frame has
arrived; until then it keeps every frame in the connection's pipe, where the application
cannot see it (reading frame by frame with ``RCVMORE`` does not help: the first frame is not
readable either). ``ZMQ_MAXMSGSIZE`` limits one frame and ``ZMQ_RCVHWM`` counts only complete
messages, so a peer that sends frames flagged MORE and never a last one grows the worker
without limit, and every connection may queue 64 complete messages as large as the frame
limit. Empty frames cost libzmq 64 bytes of memory for 2 bytes on the wire.

What bounds it
--------------
The kernel knows, per TCP connection, how many bytes libzmq has read from it
(``tcpi_bytes_received`` of ``TCP_INFO`` less what still waits in the socket, ``FIONREAD``),
and ZeroMQ tells the worker which connection each message it reads came from
(``ZMQ_SRCFD``), so the worker knows how many bytes of frames it has taken from each
connection (:func:`wire_cost` of every frame). The difference is what libzmq holds for that
connection: frames of messages not yet read, the unfinished one included, plus the
connection's handshake and heartbeats, which are allowed for (HANDSHAKE_ALLOWANCE, and
CONTROL_RATE bytes a second up to a cap). The :class:`Account` compares it every TICK_S with
what that peer may hold (its *budget*, from the plan: see
:func:`splitc.runtime.worker.budgets`) and resets a connection over budget: ``connect(2)``
to AF_UNSPEC on a duplicate of libzmq's socket, which sends the peer a reset and discards
what the kernel holds; libzmq's next read fails, and it closes the connection and frees the
unfinished message. (``shutdown(2)`` is not enough: a peer that keeps sending keeps libzmq
reading.) Budgets are per role — the session's client, each device of the plan, and
"anonymous" for a connection that has not yet shown who it is (with keys, the ZAP user id of
its key; without keys, the connection that set the session up, or one that showed the
session id) — and a role's connections share its budget. Connections are keyed by their
socket's inode (a descriptor number is reused; an inode is not, while the socket lives).

Two backstops: at most ``max_connections`` connections (the oldest anonymous one is reset to
make room, else the newest), and when the worker's RSS passes ``rss_limit`` (many small
frames, say, whose memory is a multiple of their bytes on the wire) every anonymous
connection holding data is reset. Freed memory is then handed back (``malloc_trim``).

Where it runs
-------------
In a helper process of its own (:class:`Watch`, ``python -m splitc.runtime.guard``), which
finds the worker's connections in ``/proc/PID/fd`` (listed only when the kernel's counts
say one may have come: :class:`Accepts`), takes duplicates of them with ``pidfd_getfd(2)``
(Linux 5.6; the worker allows it with ``PR_SET_PTRACER`` where Yama asks) and reads the
worker's credits from a pipe at each look. A thread in the worker would need the
interpreter lock, which the serving thread holds while it waits for the CPU when it runs at
idle priority (the default, ``--compute-priority``): under a flood, the libzmq thread that
reads the flood at normal priority keeps it waiting, and a thread's account with it. The
serving thread must run all the same: a reset connection's complete messages are freed only
when it next touches its socket. So above the RSS limit, while the serving thread runs at
idle priority, the helper moves libzmq's I/O threads to idle priority too, until RELIEF_S
after the pressure ends (going back needs CAP_SYS_NICE; without it they stay there until the
worker restarts, and it says so). Measured on the 40 x 64 flood of issue 27 (two cores): a
thread's account peaked at 340 MiB against a 159 MiB bound (900 MiB on one core), the helper
at 130 MiB on either. Not enough where other busy processes share the cores: with two
CPU-bound processes beside the flood, an idle-priority serving thread passed the bound in 3
of 9 runs (160-214 MiB against 158), a normal-priority one in none of 9 (``--compute-priority
normal``, which the worker's help advises for a shared board). Where the helper cannot
work (no pidfd_getfd, a ptrace policy that forbids it), the account runs as a thread
(:class:`Thread`, connections from the socket monitor) and the worker runs its pieces at
normal priority, saying so.

Limits: Linux and TCP only (``TCP_INFO``'s byte counters, Linux 4.1+); elsewhere
:func:`available` is false and the worker says it runs without the account. The account sees
a connection at most TICK_S (a new one at most SCAN_S) late, so a peer can overshoot its
budget by what the link carries in that time (1.25 MB per 10 ms at 1 Gbit/s).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import json
import logging
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

log = logging.getLogger("splitc.worker")

#: How often the account looks at every connection (seconds): TICK_S while no connection
#: holds more than its handshake and heartbeats (or only known peers, within half their
#: budget: :meth:`Account.busy`), TICK_BUSY_S while one does; the helper looks for new
#: connections every SCAN_S.
TICK_S, TICK_BUSY_S, SCAN_S = 0.01, 0.002, 0.01
#: The helper's status line to the worker (:class:`StatusLines`): at once when it resets a
#: connection (the counters and reasons change), for the gauges alone (bytes unread, the peak
#: held: they move with the messages) at most every REPORT_S. Each line wakes the worker's
#: serving thread to read it; sent on every change, one followed every fourth message the
#: worker took in (ResNet-18's 4-way split: 7,957 lines for 300 requests, 56 now).
REPORT_S = 0.25
#: Seconds below the RSS limit before libzmq's I/O threads go back to normal priority.
RELIEF_S = 10.0
#: Bytes a connection may have sent beyond its frames: ZMTP greeting, handshake and its
#: metadata (a CurveZMQ handshake is about 600 bytes).
HANDSHAKE_ALLOWANCE = 4096
#: Heartbeat bytes a connection may send per second (a ZMTP PING every 0.4 s from the peer:
#: 9 bytes, 44 with CurveZMQ, so 22 or 110 B/s; the worker's own socket sends no PINGs),
#: allowed up to CONTROL_CAP (a role) or CONTROL_CAP_ANONYMOUS: that much a connection may
#: keep beyond its budget after a long life, and a long-lived connection whose heartbeats
#: pass the cap (about 20 h with keys, 4 days without) is reset once; its peer reconnects.
CONTROL_RATE = 256
CONTROL_CAP = 8 << 20
CONTROL_CAP_ANONYMOUS = 64 << 10
#: ZMTP frame overhead: flags and a 1-byte size up to 255 bytes, an 8-byte size above; a
#: CurveZMQ MESSAGE command adds its name, nonce, MAC and flags (33 bytes) to every frame.
CURVE_OVERHEAD = 33
#: A credit on the pipe from the worker to the helper: socket inode, bytes, role index. The
#: helper reads them at its looks (every TICK_S at most), so the pipe is made CREDIT_PIPE bytes
#: (58,000 credits; Linux's default of 64 KiB holds 3,600): a worker that cannot write one
#: drops it, and the connection looks fuller than it is until the next look.
CREDIT = struct.Struct("=QQH")
CREDIT_PIPE = 1 << 20
_ESTABLISHED, _LISTEN = 1, 10  # tcp_info.tcpi_state
_UNACKED = 24  # offset of tcpi_unacked (u32): a listening socket's accept queue
_FIONREAD = 0x541B
_TCP_INFO_LEN = 232
_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in struct tcp_info
_PIDFD_GETFD = 438     # the syscall's number, the same on every architecture
_PR_SET_PTRACER, _PR_SET_PDEATHSIG = 0x59616D61, 1


def wire_cost(size: int, curve: bool) -> int:
    """Bytes a frame of ``size`` bytes takes on the wire (ZMTP 3, NULL or CURVE)."""
    body = size + CURVE_OVERHEAD if curve else size
    return body + (2 if body <= 255 else 9)


class _Libc:
    """getsockopt, ioctl, connect and friends on raw file descriptors (libzmq's own sockets:
    a Python socket object would close them when collected)."""

    def __init__(self):
        self.lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self.lib.syscall.restype = ctypes.c_long
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
        """Bytes read from TCP connection ``fd`` (None: not an open TCP socket)."""
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

    def reset(self, fd: int) -> bool:
        """Reset TCP connection ``fd``: connect(2) to AF_UNSPEC (tcp_disconnect)."""
        unspec = ctypes.create_string_buffer(16)  # a sockaddr whose family is 0
        return self.lib.connect(fd, unspec, len(unspec)) == 0

    def getfd(self, pidfd: int, fd: int) -> int:
        """A duplicate of another process's descriptor ``fd`` (pidfd_getfd), or -errno."""
        got = self.lib.syscall(_PIDFD_GETFD, pidfd, fd, 0)
        return got if got >= 0 else -ctypes.get_errno()


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


def die_with_parent(signum: int) -> None:
    """Linux: have the kernel send this process ``signum`` when the thread that started it
    ends (inherited across exec; elsewhere nothing)."""
    if available():
        _LIBC.lib.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)


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


def rss(pid: int | str = "self") -> int:
    """A process's resident set size, in bytes (0 where /proc is missing)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return _resident(f.read())
    except OSError:
        return 0


def _resident(statm: bytes) -> int:
    """The resident bytes /proc/PID/statm says (0 if it says nothing readable)."""
    try:
        return int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, IndexError):
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


class Log(logging.Handler):
    """Log lines go to stderr from a thread of their own, through a queue of QUEUE lines: a
    process never waits for its log (a stalled reader of stderr — a service manager that
    hangs, a pipe nobody reads — would otherwise stop a worker serving, and stop its memory
    account). When the queue is full, lines are dropped and counted (``dropped``)."""

    QUEUE = 1000

    def __init__(self):
        super().__init__()
        self.lines: queue.Queue = queue.Queue(self.QUEUE)
        self.dropped = 0
        self.out = logging.StreamHandler(sys.stderr)
        self.out.setFormatter(logging.Formatter("%(asctime)s splitc-worker %(message)s"))
        self.thread = threading.Thread(target=self._write, name="splitc-log", daemon=True)
        self.thread.start()

    @classmethod
    def install(cls) -> Log | None:
        """Log through a new one, unless the process already set its logging up."""
        root = logging.getLogger()
        if root.handlers:
            return None
        handler = cls()
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
        return handler

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.msg, record.args = record.getMessage(), None  # (format here, not there)
            if record.exc_info:
                record.exc_text = self.out.formatter.formatException(record.exc_info)
                record.exc_info = None
            self.lines.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _write(self) -> None:
        while (record := self.lines.get()) is not None:
            self.out.handle(record)

    def close(self, wait: float = 2.0) -> None:
        """Write what is queued (for at most ``wait`` seconds: stderr may be stalled)."""
        logging.getLogger().removeHandler(self)
        try:
            self.lines.put(None, timeout=wait)
        except queue.Full:
            return
        self.thread.join(wait)
        super().close()


# -- the account ---------------------------------------------------------------------------
@dataclass
class Config:
    """What the account is given: budgets per role (bytes), the budget of one anonymous
    connection, frames' framing (CURVE or not), the connection caps, the RSS limit."""

    roles: dict[str, int]
    anonymous: int
    curve: bool
    max_connections: int
    max_anonymous: int
    rss_limit: int | None = None

    @property
    def names(self) -> list[str]:
        """Role names by index (index 0: not known) as credits carry them."""
        return ["", *sorted(self.roles)]


@dataclass
class _Conn:
    key: int            # the socket's inode
    peer: str
    opened: float
    role: str | None = None
    credited: int = 0
    unread: int = 0     # bytes read from it that the worker has not taken (last look)
    held: int = 0       # unread, less the handshake and heartbeat allowance
    closing: bool = False


@dataclass
class Status:
    """What the account did and sees: connections reset over budget, at the caps and on the
    RSS limit; the peak bytes held by roles; unread bytes per role now; the last reasons."""

    over_budget: int = 0
    over_cap: int = 0
    over_rss: int = 0
    peak_held: int = 0
    unread: dict[str, int] = field(default_factory=dict)
    last: list[str] = field(default_factory=list)
    where: str = ""

    def events(self) -> tuple:
        """What changes only when the account acts (the rest, ``peak_held`` and ``unread``,
        are gauges that move with every message)."""
        return self.over_budget, self.over_cap, self.over_rss, tuple(self.last), self.where


class Account:
    """The byte account of a worker's connections (module docstring). Its driver tells it of
    connections opened and closed, of the bytes the kernel says libzmq read from each, and of
    the worker's credits; it answers with the connections to reset, and why."""

    def __init__(self, config: Config):
        self.config = config
        self.conns: dict[int, _Conn] = {}
        self.status = Status()
        self._log = LogLimit(log)
        self._opened = False

    def opened(self, key: int, peer: str, now: float) -> None:
        """A new connection: held to the caps at the next :meth:`check`, after the credits
        read with it have told who the connections already open are."""
        self.conns[key] = _Conn(key, peer, now)
        self._opened = True

    def _crowded(self) -> list[tuple[_Conn, str]]:
        """The connections to reset to keep within the caps: past ``max_connections``, the
        oldest that have not shown who they are (else the newest); past ``max_anonymous``,
        the oldest of those. Judged after the credits (a connection counted before its
        peer's credits were read looked anonymous: the client's, the oldest, was reset when
        strangers crowded in before the helper's look)."""
        cfg, out = self.config, []
        if not self._opened:  # (only a new connection can pass a cap)
            return out
        self._opened = False
        open_ = sorted((c for c in self.conns.values() if not c.closing), key=lambda c: c.opened)
        anonymous = [c for c in open_ if c.role is None]
        for _ in range(len(open_) - cfg.max_connections):
            c = anonymous.pop(0) if anonymous else open_[-1]
            open_.remove(c)
            out.append((c, f"more than {cfg.max_connections} connections"))
        for c in anonymous[:max(0, len(anonymous) - cfg.max_anonymous)]:
            out.append((c, f"more than {cfg.max_anonymous} connections that have not shown "
                           "who they are"))
        self.status.over_cap += len(out)
        return out

    def closed(self, key: int) -> None:
        self.conns.pop(key, None)

    def credit(self, key: int, nbytes: int, role: str | None) -> None:
        c = self.conns.get(key)
        if c is not None:
            c.credited += nbytes
            if role:
                c.role = role

    def check(self, readings: dict[int, int | None], now: float, rss_now: int = 0
              ) -> list[tuple[_Conn, str]]:
        """``readings``: bytes libzmq has read, per connection (read before the credits were
        taken, so no credit is for bytes not yet counted). Returns what to reset: first the
        connections past the caps, then those over budget."""
        cfg, out = self.config, self._crowded()
        going = {c.key for c, _ in out}
        by_role: dict[str, list[_Conn]] = {}
        for key, got in readings.items():
            c = self.conns.get(key)
            if c is None or c.closing or got is None or key in going:
                continue
            cap = CONTROL_CAP if c.role else CONTROL_CAP_ANONYMOUS
            allowance = HANDSHAKE_ALLOWANCE + min(cap, int((now - c.opened) * CONTROL_RATE))
            c.unread = got - c.credited
            c.held = max(0, c.unread - allowance)
            if c.role is None:
                if c.held > cfg.anonymous:
                    out.append(self._over(c, cfg.anonymous,
                                          "a connection that has not shown who it is"))
            else:
                by_role.setdefault(c.role, []).append(c)
        total = 0
        for role, conns in by_role.items():
            held = sum(c.held for c in conns)
            total += held
            budget = cfg.roles.get(role, 0)
            if held > budget:
                out.append(self._over(max(conns, key=lambda c: c.held), budget, role))
        self.status.peak_held = max(self.status.peak_held, total)
        if cfg.rss_limit is not None and rss_now > cfg.rss_limit:
            going = {c.key for c, _ in out}
            for c in sorted((c for c in self.conns.values() if c.role is None and c.held > 0
                             and not c.closing and c.key not in going),
                            key=lambda c: -c.held):
                self.status.over_rss += 1
                out.append((c, f"the worker is above its memory limit ({rss_now >> 20} MiB > "
                               f"{cfg.rss_limit >> 20} MiB) and this anonymous connection "
                               f"holds {c.held} bytes"))
        return out

    def _over(self, c: _Conn, budget: int, who: str) -> tuple[_Conn, str]:
        self.status.over_budget += 1
        return c, (f"it holds {c.held} bytes unread, over the {budget} bytes {who} may hold "
                   "(an unfinished message, or more queued than the plan needs)")

    def busy(self) -> bool:
        """Whether to look again in TICK_BUSY_S rather than TICK_S: a connection not yet
        known (or being reset) holds bytes, or a role holds over half its budget. A role's
        bytes within that are its messages waiting while the worker computes (on a
        time-dilated device, or a board, the next halo rows arrive while a piece runs):
        looked at every 2 ms through every piece, the helpers took 10-14 ms of CPU per
        request on each of ResNet-50's eight devices, 16 % of two cores."""
        held: dict[str, int] = {}
        for c in self.conns.values():
            if c.held > 0:
                if c.role is None or c.closing:
                    return True
                held[c.role] = held.get(c.role, 0) + c.held
        return any(2 * n > self.config.roles.get(role, 0) for role, n in held.items())

    def closing(self, c: _Conn, why: str) -> None:
        c.closing = True
        text = f"reset the connection from {c.peer} ({c.role or 'anonymous'}): {why}"
        self._log(logging.WARNING, "memory guard: %s", text)
        self.status.last = [*self.status.last[-9:], text]

    def snapshot(self) -> dict:
        unread: dict[str, int] = {}
        for c in list(self.conns.values()):
            unread[c.role or "anonymous"] = unread.get(c.role or "anonymous", 0) + c.unread
        self.status.unread = unread
        return asdict(self.status)


def _policy(tid: int) -> int | None:
    try:
        return os.sched_getscheduler(tid)
    except OSError:
        return None


def _set_io_policy(pid: int, policy: int, tids: list[int] | None = None) -> list[int]:
    """Set the scheduling policy of libzmq's I/O threads in process ``pid`` (threads named
    ZMQbg/IO/N, or ``tids``); the threads set (none if one failed)."""
    done = []
    try:
        for tid in tids if tids is not None else map(int, os.listdir(f"/proc/{pid}/task")):
            if tids is None:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    if not f.read().startswith("ZMQbg/IO"):
                        continue
            os.sched_setscheduler(tid, policy, os.sched_param(0))
            done.append(tid)
    except OSError:
        return []
    return done


def _reset(fd: int) -> None:
    """Reset the TCP connection ``fd`` (a duplicate the caller owns)."""
    if not _LIBC.reset(fd):
        try:
            sock = socket.socket(fileno=os.dup(fd))
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        except OSError:
            pass


def _names(fd: int) -> tuple[str | None, int] | None:
    """(peer, local port) of TCP socket ``fd``; the peer is None for a socket not connected
    (a listening one). None: not a TCP socket."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET,
                                                                  socket.AF_INET6):
            return None
        local = sock.getsockname()[1]
        try:
            host, port = sock.getpeername()[:2]
        except OSError:
            return None, local
        return f"{host}:{port}", local
    except OSError:
        return None
    finally:
        sock.close()


# -- the helper process ----------------------------------------------------------------------
class Accepts:
    """Whether the worker may have taken a connection since the helper last listed its
    descriptors, told without listing them (a readlink each: ~100 us a look, 3.8 % of a core
    for an idle worker's helper at a look every SCAN_S, 16 % of two cores for eight).

    Two counts tell it: the connections the kernel has set up in the worker's network
    namespace (``PassiveOpens`` of /proc/PID/net/snmp, counted when the handshake ends,
    before libzmq accepts the connection) and those waiting in the accept queue of the
    worker's listening socket (``tcpi_unacked`` of a listening socket). When the first has
    moved, or the queue holds one, the next HOT_TURNS looks (and those for HOT_S) list the
    descriptors: a connection leaves the queue only when libzmq accepts it, so the look after
    the last one that saw it queued finds it taken. The count is the namespace's: another
    process's connections make the helper look for nothing, never miss one. Where either
    count cannot be read (no /proc/PID/net/snmp, the listening socket not found yet), every
    look lists."""

    HOT_TURNS, HOT_S = 3, 0.1

    def __init__(self, pid: int):
        try:
            self.snmp: int | None = os.open(f"/proc/{pid}/net/snmp", os.O_RDONLY)
        except OSError:
            self.snmp = None
        self.listeners: dict[int, int] = {}  # inode -> our duplicate of a listening socket
        self.opens: int | None = None
        self.hot, self.hot_until = self.HOT_TURNS, 0.0

    def quiet(self, now: float) -> bool:
        """True if no connection can have come since the last look that listed; call it
        before listing (a connection taken after this call is counted by the next)."""
        opens, queued = self._opens(), self._queued()
        if opens is None or queued is None or opens != self.opens or queued:
            self.opens = opens
            self.hot, self.hot_until = self.HOT_TURNS, now + self.HOT_S
            return False
        if self.hot > 0 or now < self.hot_until:
            self.hot -= 1
            return False
        return True

    def _opens(self) -> int | None:
        if self.snmp is None:
            return None
        try:
            head, values = [line.split() for line in os.pread(self.snmp, 1 << 14, 0).split(b"\n")
                            if line.startswith(b"Tcp:")][:2]
            return int(values[head.index(b"PassiveOpens")])
        except (OSError, ValueError, IndexError):
            return None

    def _queued(self) -> int | None:
        if not self.listeners:
            return None
        queued = 0
        for fd in self.listeners.values():
            info = _LIBC.tcp_info(fd)
            if info is None or len(info) < _UNACKED + 4:
                return None
            queued += struct.unpack_from("I", info, _UNACKED)[0]
        return queued

    def close(self, inode: int) -> None:
        fd = self.listeners.pop(inode, None)
        if fd is not None:
            os.close(fd)


class Watch:
    """The account in a process of its own, watching worker ``pid``'s connections on ``port``
    (module docstring): credits come on ``credits`` (a pipe), and status lines ("trim" when
    the worker should hand freed memory back, else a JSON :class:`Status`) go to ``report``."""

    def __init__(self, pid: int, port: int, config: Config, credits: int, report: int):
        self.pid, self.port, self.account = pid, port, Account(config)
        self.credits, self.report = credits, report
        os.set_blocking(credits, False)
        self.pidfd = os.pidfd_open(pid)
        self.names = config.names
        self.dups: dict[int, int] = {}       # inode -> our duplicate
        self.seen: dict[str, int] = {}       # the worker's descriptor -> its socket's inode
        self.kept: dict[str, str] = {}       # /proc link of each descriptor taken -> its target
        self.accepts = Accepts(pid)
        try:
            self.statm: int | None = os.open(f"/proc/{pid}/statm", os.O_RDONLY)
        except OSError:
            self.statm = None
        self.buffer = b""
        self.early: dict[int, list] = {}     # credits for connections not yet adopted
        self.relieved: list[int] = []
        self.pressed, self.stuck = 0.0, False
        self.scanned = 0.0
        self.rss_now, self.rss_at = 0, -1.0  # the worker's RSS when last read
        self.lines = StatusLines(self.account, report)
        self.account.status.where = "helper process"

    def probe(self) -> str:
        """"" if this process may take the worker's descriptors, else why not."""
        why = "the worker has no descriptor to try"
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            got = _LIBC.getfd(self.pidfd, int(name))
            if got >= 0:
                os.close(got)
                return ""
            why = f"pidfd_getfd: {os.strerror(-got)}"
        return why

    def run(self) -> None:
        busy = False
        while True:
            # (credits wait in the pipe for the next look: waking on each cost a turn per
            # message the worker took in. The look reads them after the kernel's counts, so
            # every credit for bytes counted is in; the pipe holds CREDIT_PIPE of them.)
            time.sleep(TICK_BUSY_S if busy else TICK_S)
            now = time.monotonic()
            if now - self.scanned >= SCAN_S:
                self.scanned = now
                if not (self.accepts.quiet(now) and self._kept()) and not self._scan(now):
                    return  # the worker is gone
            readings = {k: _LIBC.read_bytes(fd) for k, fd in self.dups.items()}
            if not self._read_credits():
                return  # the worker closed the pipe
            if now - self.rss_at >= TICK_BUSY_S:  # (not on every credit)
                self.rss_now, self.rss_at = self._rss(), now
            rss_now = self.rss_now
            for c, why in self.account.check(readings, now, rss_now):
                self._reset(c, why)
            self._relieve(rss_now, now)
            busy = self.account.busy()
            self.lines.send(now)

    def _relieve(self, rss_now: int, now: float) -> None:
        """Above the RSS limit while the worker's serving thread runs at idle priority, move
        libzmq's I/O threads to idle priority too, back after RELIEF_S below it. A reset
        connection's queued messages are freed only when the serving thread next touches its
        socket, and a flood read at normal priority can keep an idle-priority thread off the
        CPU for as long as it lasts (measured: 340 MiB over a 159 MiB bound on two cores,
        900 MiB on one, without this). Going back needs CAP_SYS_NICE; without it they stay
        at idle priority until the worker restarts (it says so)."""
        limit = self.account.config.rss_limit
        if limit is None:
            return
        if rss_now > limit:
            self.pressed = now
            if not self.relieved and _policy(self.pid) == getattr(os, "SCHED_IDLE", -1):
                self.relieved = _set_io_policy(self.pid, os.SCHED_IDLE)
                if self.relieved:
                    log.warning("memory guard: above the memory limit with the serving thread "
                                "at idle priority: libzmq's I/O threads %s now run at idle "
                                "priority too", ", ".join(map(str, self.relieved)))
        elif self.relieved and now - self.pressed > RELIEF_S:
            if _set_io_policy(self.pid, os.SCHED_OTHER, self.relieved):
                log.warning("memory guard: libzmq's I/O threads are back at normal priority")
                self.relieved = []
            elif not self.stuck:
                self.stuck = True
                log.warning("memory guard: libzmq's I/O threads stay at idle priority until "
                            "the worker restarts (raising a priority needs CAP_SYS_NICE)")

    def _rss(self) -> int:
        try:
            return _resident(os.pread(self.statm, 256, 0)) if self.statm is not None \
                else rss(self.pid)
        except OSError:
            return 0

    def _kept(self) -> bool:
        """Whether every socket the helper took is still the worker's descriptor it was (a
        closed one is let go, and its number may hold a new connection: :meth:`_scan`)."""
        for link, target in self.kept.items():
            try:
                if os.readlink(link) != target:
                    return False
            except OSError:
                return False
        return True

    def _scan(self, now: float) -> bool:
        """Look for the worker's new connections, and let go of those it closed."""
        try:
            entries = os.listdir(f"/proc/{self.pid}/fd")
        except OSError:
            return False
        seen = {}
        for name in entries:
            try:
                link = os.readlink(f"/proc/{self.pid}/fd/{name}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inode = seen[name] = int(link[8:-1])
                if self.seen.get(name) != inode:  # (a descriptor not yet looked at)
                    self._adopt(int(name), inode, now)
        self.seen = seen
        for inode in [i for i, v in self.early.items() if now - v[-1][2] > 10]:
            del self.early[inode]
        live = set(seen.values())
        for inode in set(self.dups) - live:  # closed by the worker: let the socket go
            os.close(self.dups.pop(inode))
            self.account.closed(inode)
            self._trim()
        for inode in set(self.accepts.listeners) - live:
            self.accepts.close(inode)
        self.kept = {f"/proc/{self.pid}/fd/{name}": f"socket:[{inode}]"
                     for name, inode in seen.items()
                     if inode in self.dups or inode in self.accepts.listeners}
        return True

    def _adopt(self, fd: int, inode: int, now: float) -> None:
        """Take connection ``fd`` of the worker into the account if it is one of its ROUTER's
        (a TCP connection to ``port``)."""
        if inode in self.dups or inode in self.accepts.listeners:
            return
        dup = _LIBC.getfd(self.pidfd, fd)
        if dup < 0:
            return
        names = _names(dup)
        # (the inode: not a number the worker reused meanwhile)
        if names is None or names[1] != self.port or os.fstat(dup).st_ino != inode:
            os.close(dup)
            return
        peer = names[0]
        if peer is None:
            info = _LIBC.tcp_info(dup)
            if info is not None and info[0] == _LISTEN:
                self.accepts.listeners[inode] = dup  # (its accept queue: Accepts)
            else:
                os.close(dup)
            return
        self.dups[inode] = dup
        self.account.opened(inode, peer, now)
        for nbytes, name, at in self.early.pop(inode, ()):
            if now - at < 10:
                self.account.credit(inode, nbytes, name)

    def _read_credits(self) -> bool:
        try:
            data = os.read(self.credits, CREDIT_PIPE)
        except BlockingIOError:
            return True
        if not data:
            return False
        data = self.buffer + data
        end = len(data) - len(data) % CREDIT.size
        now, scanned = time.monotonic(), False
        for inode, nbytes, role in CREDIT.iter_unpack(data[:end]):
            name = self.names[role] if role < len(self.names) else None
            if inode not in self.account.conns and not scanned:
                scanned = self._scan(now)  # (a connection newer than the last look)
            if inode in self.account.conns:
                self.account.credit(inode, nbytes, name)
            elif len(self.early) < 4096:  # (not adopted yet: credited when it is)
                self.early.setdefault(inode, []).append((nbytes, name, now))
        self.buffer = data[end:]
        return True

    def _reset(self, c: _Conn, why: str) -> None:
        self.account.closing(c, why)
        fd = self.dups.get(c.key)
        if fd is not None:
            _reset(fd)
        self._trim()

    def _trim(self) -> None:
        _write(self.report, b"trim\n")


def _write(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)
    except BlockingIOError:
        pass  # (the worker reads them when it can; a lost status line is replaced)
    except BrokenPipeError:
        pass  # (the worker is gone: the next look finds its credit pipe closed, and ends)


class StatusLines:
    """The helper's status lines to the worker (JSON :class:`Status`, one a line on ``fd``):
    at once when the account acted, else while only its gauges moved, every
    :data:`REPORT_S`."""

    def __init__(self, account: Account, fd: int):
        self.account, self.fd = account, fd
        self.sent: tuple = ((), -REPORT_S)  # (the account's events, when) at the last line
        self.line = ""

    def send(self, now: float) -> None:
        events = self.account.status.events()
        sent, at = self.sent
        if events == sent and now - at < REPORT_S:
            return
        line = json.dumps(self.account.snapshot(), separators=(",", ":"))
        self.sent = (events, now)
        if line != self.line:
            self.line = line
            _write(self.fd, line.encode() + b"\n")


def main() -> int:
    """``python -m splitc.runtime.guard PID PORT CONFIG``: the helper process (:class:`Watch`);
    credits on stdin, status on stdout. Says "ready" or "unavailable: why" first."""
    pid, port, config = int(sys.argv[1]), int(sys.argv[2]), Config(**json.loads(sys.argv[3]))
    if not available():
        print("unavailable: no TCP_INFO", flush=True)
        return 1
    die_with_parent(signal.SIGKILL)  # (when the worker dies)
    if os.read(sys.stdin.fileno(), 1) != b"\n":  # the worker's go: it allowed us to look
        return 1
    try:
        watch = Watch(pid, port, config, sys.stdin.fileno(), sys.stdout.fileno())
        why = watch.probe()
    except OSError as e:
        why = str(e)
    if why:
        print(f"unavailable: {why}", flush=True)
        return 1
    os.write(sys.stdout.fileno(), b"ready\n")
    os.set_blocking(sys.stdout.fileno(), False)
    Log.install()
    try:
        watch.run()
    except KeyboardInterrupt:
        pass
    return 0


# -- the worker's side -------------------------------------------------------------------------
class Guard:
    """The worker's handle on its account: :meth:`account` each message read, ``fileno`` to
    poll for the helper's reports and :meth:`on_report` when readable (or none, in a thread),
    :meth:`status` for ``stats``, :meth:`stop`. Use :func:`start`."""

    where = ""

    def account(self, fd: int | None, sizes: list[int], role: str | None) -> None:
        raise NotImplementedError

    def status(self) -> dict:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    fileno: int | None = None

    def on_report(self) -> None:
        pass


def _inode(fd: int | None) -> int | None:
    if fd is None:
        return None
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None


class Helper(Guard):
    """The account in its helper process (:class:`Watch`)."""

    where = "helper process"

    def __init__(self, proc: subprocess.Popen, config: Config):
        self.proc, self.config = proc, config
        self.index = {name: i for i, name in enumerate(config.names)}
        self.fileno = proc.stdout.fileno()
        os.set_blocking(proc.stdin.fileno(), False)
        os.set_blocking(self.fileno, False)
        self._status: dict = {"where": self.where}
        self._partial = b""
        self.dropped = 0

    def account(self, fd: int | None, sizes: list[int], role: str | None) -> None:
        inode = _inode(fd)
        if inode is None:
            return
        credit = CREDIT.pack(inode, sum(wire_cost(n, self.config.curve) for n in sizes),
                             self.index.get(role or "", 0))
        try:
            os.write(self.proc.stdin.fileno(), credit)
        except BlockingIOError:
            self.dropped += 1  # (the helper is behind: the connection looks fuller, not less)
        except OSError:
            pass

    def on_report(self) -> None:
        try:
            data = os.read(self.fileno, 1 << 16)
        except BlockingIOError:
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        trim = False
        for line in lines:
            if line == b"trim":
                trim = True
            elif line.startswith(b"{"):
                self._status = json.loads(line)
        if trim:
            trim_memory()

    def status(self) -> dict:
        return {**self._status, "credits_dropped": self.dropped}

    def stop(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Thread(Guard):
    """The account as a thread of the worker (where no helper process can be had): new
    connections from the ROUTER's socket monitor, resets through the worker's own
    descriptors."""

    where = "thread"

    def __init__(self, router, config: Config):
        import zmq

        self._zmq, self.account_ = zmq, Account(config)
        self.account_.status.where = self.where
        self.config = config
        self._credits: deque = deque()  # (inode, bytes, role) from the serving thread
        self._fds: dict[int, int] = {}  # inode -> the worker's descriptor
        self._stop = threading.Event()
        self._router = router
        self._mon = router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
                                              | zmq.EVENT_CLOSED)
        self._thread = threading.Thread(target=self._run, name="splitc-guard", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def account(self, fd: int | None, sizes: list[int], role: str | None) -> None:
        inode = _inode(fd)
        if inode is not None:
            self._credits.append(
                (inode, sum(wire_cost(n, self.config.curve) for n in sizes), role))

    def status(self) -> dict:
        return self.account_.snapshot()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self._router.disable_monitor()
        except self._zmq.ZMQError:
            pass
        self._mon.close(linger=0)

    def _run(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        zmq, busy = self._zmq, False
        while not self._stop.is_set():
            try:
                if self._mon.poll((TICK_BUSY_S if busy else TICK_S) * 1e3):
                    self._events(recv_monitor_message)
                now = time.monotonic()
                readings = {k: _LIBC.read_bytes(fd) for k, fd in self._fds.items()}
                while self._credits:
                    inode, nbytes, role = self._credits.popleft()
                    if inode not in self.account_.conns:  # (its event may be unread yet)
                        self._events(recv_monitor_message)
                    self.account_.credit(inode, nbytes, role)
                for c, why in self.account_.check(readings, now, rss()):
                    self._reset(c, why)
                busy = self.account_.busy()
            except zmq.ZMQError:
                if self._stop.is_set() or self._mon.closed:
                    return
                raise
            except Exception:  # the guard must not die quietly: say so and keep going
                log.exception("memory guard: unexpected error")
                self._stop.wait(TICK_S)

    def _events(self, recv_monitor_message) -> None:
        zmq = self._zmq
        while True:
            try:
                event = recv_monitor_message(self._mon, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            fd = event["value"]
            if event["event"] == zmq.EVENT_ACCEPTED:
                inode, names = _inode(fd), _names(fd)
                if inode is None:
                    continue
                self._fds[inode] = fd
                self.account_.opened(inode, (names and names[0]) or "?", time.monotonic())
            else:  # disconnected or closed
                for inode, known in list(self._fds.items()):
                    if known == fd:
                        del self._fds[inode]
                        self.account_.closed(inode)
                trim_memory()

    def _reset(self, c: _Conn, why: str) -> None:
        self.account_.closing(c, why)
        fd = self._fds.get(c.key)
        if fd is None:
            return
        try:
            dup = os.dup(fd)  # (never reset a descriptor reused since: check its inode)
        except OSError:
            return
        try:
            if os.fstat(dup).st_ino == c.key:
                _reset(dup)
        finally:
            os.close(dup)
        trim_memory()


def start(router, port: int, config: Config) -> Guard | None:
    """The account for a worker's ROUTER socket (bound to ``port``): in a helper process where
    it can run, else in a thread (see the module docstring; ``SPLITC_GUARD=thread`` asks for
    the thread); None where there is no TCP_INFO."""
    if not available():
        return None
    why = ("SPLITC_GUARD=thread" if os.environ.get("SPLITC_GUARD") == "thread"
           else _helper(port, config))
    if isinstance(why, Helper):
        return why
    log.warning("memory guard: no helper process (%s): the account runs as a thread", why)
    thread = Thread(router, config)
    thread.start()
    return thread


def _helper(port: int, config: Config) -> Helper | str:
    """The helper process started and ready, or why not."""
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitc.runtime.guard", str(os.getpid()), str(port),
             json.dumps(asdict(config))], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            close_fds=True)
    except OSError as e:
        return str(e)
    _LIBC.lib.prctl(_PR_SET_PTRACER, proc.pid, 0, 0, 0)  # (where Yama asks for it)
    try:
        fcntl.fcntl(proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, CREDIT_PIPE)
    except OSError as e:  # (over /proc/sys/fs/pipe-max-size, or the user's pipe pages)
        log.info("memory guard: the credit pipe stays at its default size: %s", e)
    try:
        proc.stdin.write(b"\n")  # (go: it may look at this process now)
        proc.stdin.flush()
    except OSError as e:
        proc.kill()
        proc.wait()
        return str(e)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    first = proc.stdout.readline().decode().strip() if ready else "no answer"
    if first == "ready":
        return Helper(proc, config)
    proc.kill()
    proc.wait()
    return first.removeprefix("unavailable: ")


if __name__ == "__main__":
    sys.exit(main())
