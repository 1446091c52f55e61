"""``splitc serve``: one board's worker. Runs its device's pieces as their inputs arrive and
sends each output straight to the devices that consume it (model outputs to the client).

Board-side code: imports numpy, pyzmq and the TVM runtime only (run it with
``TVM_USE_RUNTIME_LIB=1`` so ``import tvm`` loads no compiler). Start it with
``python -m splitc.runtime.worker OUT/dev0 --bind tcp://0.0.0.0:5555`` or ``splitc serve``.

Protocol (message layout in :mod:`splitc.runtime.wire`):

1. The worker binds one ROUTER socket. Anyone may ``ping`` it (answered with ``pong``, which
   never carries the session id).
2. A client opens a session with ``setup``: the plan digest (refused with an ``error`` naming
   this device when it is none of this worker's plans: the main plan, or a fallback plan its
   folder holds, see :mod:`splitc.runtime.fallback`; the digest chooses which plan the
   session runs, and the pong lists them all) and the endpoint of every peer. The
   worker connects a DEALER to each device it sends to, pings it with the session id until it
   answers that it holds the same session, and answers ``ready`` (an ``error`` naming the
   peer if that does not happen within the timeout). Who may speak (:meth:`Worker._sender`):
   with keys, the name of the sender's key (ZAP user id), so only the client's key may set up
   or drop a session or ask for stats, and a device's key may send only the tensors the plan
   routes from that device to this one; without keys (loopback only) the connection that set
   the session up is the client, and the session id is the secret that makes a peer: a setup
   from elsewhere is refused while that client's connection is up unless it names the
   session it replaces. A client whose session is replaced hears so (``error``, code
   ``replaced``) and sets it up again.
3. Per request id, ``tensors`` messages arrive: model inputs from the client, transfers from
   peers. Whenever all inputs of one of its pieces are present for a request, the worker runs
   it and sends each output to the devices the plan names (one message per destination), and
   model outputs to the client. Several requests may be in flight; state is kept per id and
   freed when the device's last piece for it has run, on ``drop``, or at its deadline.
4. Anything wrong — a malformed message, an unknown tensor, a piece that raises — is answered
   with an ``error`` (naming device, piece and request) and the worker keeps serving. Memory
   is bounded whatever peers send (:mod:`splitc.runtime.guard`): each connection's bytes read
   by libzmq and not yet taken by the worker are held to what the plan lets its sender hold
   (:func:`budgets`); a connection over budget is closed, as are connections beyond
   ``max_connections`` and, above the RSS limit, connections not yet known that hold data.
   After a warm-up run of every piece, the bound is the RSS then plus that budget plus
   MEMORY_MARGIN (``stats`` reports it). At most MAX_PENDING requests are held.
5. A request whose deadline has passed is forgotten instead of computed, and so are the
   requests of a session whose client's connection is gone: a worker thawed after a freeze
   does not work through a backlog nobody waits for. The deadline is the client's, on its
   clock; the worker converts it with the clock the setup carried.
6. With a key folder (``--keys``, see :mod:`splitc.runtime.security`) every connection is
   CurveZMQ-encrypted and only trusted keys get in; off loopback that is the default.
7. SIGTERM or SIGINT: the worker closes its sockets and exits with status 0. With
   ``--restart`` a supervisor process restarts the worker whenever it dies, on the same
   endpoint; clients reconnect by themselves.
8. Pieces run at idle scheduling priority (``--compute-priority``, Linux's ``SCHED_IDLE``),
   so ZeroMQ's I/O thread preempts them the moment it has tensors to move. At normal
   priority an output sent just before the next piece starts waits for the scheduler's time
   slice on that core: 2 to 4.5 ms per transfer measured in ResNet-50's spatial split on two
   single-core devices, about one in ten of its halo exchanges (benchmarks/cluster.py).
   A board that also runs other busy processes wants ``normal``: at idle, they come first.
"""

from __future__ import annotations

import argparse
import hmac
import itertools
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import zmq

from . import fallback, guard, security, wire
from .artifact import DeviceArtifact
from .errors import BadInput

log = logging.getLogger("splitc.worker")

#: ``--compute-priority``: ``idle`` lets the I/O thread preempt a running piece (point 8 above).
COMPUTE_PRIORITIES = ("idle", "normal")

#: Events kept for ``splitc run --trace`` (the most recent), and the bytes of them a stats
#: reply carries (its header stays well under wire.MAX_HEADER).
EVENTS_KEPT, EVENTS_PAGE_BYTES = 50_000, 40_000
#: At most this many requests with partial inputs held at once (twice the client's depth:
#: requests it gave up on stay until their drop or deadline).
MAX_PENDING = 2 * wire.MAX_INFLIGHT
#: How many dropped request ids are remembered (late tensors for them are ignored).
DROPPED_MEMORY = 4096
#: Messages queued per incoming connection before ZeroMQ stops reading from it.
RCVHWM = 64
#: Messages queued per outgoing connection (to the client, a peer, or a stranger who does not
#: read its answers) before sending fails.
SNDHWM = 4 * wire.MAX_INFLIGHT
#: Default frame limit: twice the largest tensor the device receives, at least this. Frames
#: up to the limit are read and, if wrong, answered with an error; larger ones close the
#: connection unread.
MIN_MESSAGE_LIMIT = 1 << 20
#: Connections a worker keeps open at most, and of those, connections that have not shown
#: who they are (the oldest is closed to make room).
MAX_CONNECTIONS = 64
MAX_ANONYMOUS = 16
#: A connection whose ZMTP handshake takes longer than this is closed (ms).
HANDSHAKE_MS = 5000
#: Bytes allowed per message for its header and framing, and per role for pings, drops,
#: stats and setups, in the byte account (:func:`budgets`).
HEADER_ALLOWANCE = 4096
CONTROL_ALLOWANCE = 256 << 10
#: The memory bound is the RSS after warm-up, plus what peers may make the worker hold
#: (:func:`budgets`), plus this (the interpreter's own growth, a guard tick's overshoot).
MEMORY_MARGIN = 64 << 20
#: A peer not yet set up for the session is pinged again this often during a setup (s);
#: expired requests are looked for this often (s).
SETUP_PING_S = 0.05
SWEEP_S = 0.1
#: Whether the client's connection is still there is asked of the kernel before a message's
#: pieces run, unless it was there this recently (s): a frozen worker that thaws asks at
#: once; a busy one asks 20 times a second, not once a message (a system call, ~10 us).
CLIENT_CHECK_S = 0.05


class _Recent:
    """A set that remembers only its ``size`` most recent members."""

    def __init__(self, size: int):
        self._order: deque = deque()
        self._set: set = set()
        self.size = size

    def add(self, x) -> None:
        if x not in self._set:
            self._set.add(x)
            self._order.append(x)
            if len(self._order) > self.size:
                self._set.discard(self._order.popleft())

    def __contains__(self, x) -> bool:
        return x in self._set


@dataclass
class _Request:
    expires: float                    # this worker's monotonic clock: give up after it
    deadline: float | None            # the client's clock, as received: forwarded to peers
    have: dict[str, np.ndarray] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    received: list[np.ndarray] = field(default_factory=list)  # pool buffers to give back


@dataclass
class _Session:
    id: str
    client: bytes                     # the routing id of the client's connection
    peers: dict[str, zmq.Socket]
    endpoints: dict[str, str]
    waiting: set[str]                 # peers not yet confirmed set up for this session
    deadline: float | None            # None once ready (or failed)
    client_fd: int | None = None      # the client's connection (ZMQ_SRCFD)
    offset: float | None = None       # this worker's clock minus the client's (at setup)
    request_timeout: float = wire.DEFAULT_DEADLINE_S
    pinged: dict[str, float] = field(default_factory=dict)
    requests: dict[int, _Request] = field(default_factory=dict)
    dropped: _Recent = field(default_factory=lambda: _Recent(DROPPED_MEMORY))
    #: (piece, destination) -> the header of the tensors message it sends there
    heads: dict[tuple[str, str], wire.TensorsHead] = field(default_factory=dict)
    client_seen: float = float("-inf")  # when its connection was last found established


@dataclass
class _Served:
    """One plan this worker can serve — the main plan, or a fallback plan its folder holds
    (:mod:`splitc.runtime.fallback`) — with its pieces loaded, and what this device receives
    and sends under it."""

    name: str                         # "" for the main plan, else the fallback's name
    artifact: DeviceArtifact
    digest: str
    pieces: list                      # this device's, in run order
    expect: dict[str, set[str]]       # tensor -> who sends it here
    routes: dict[str, list[str]]      # tensor -> where it goes
    specs: dict                       # tensor -> its spec, for what arrives
    consumers: dict[str, list[int]] = field(default_factory=dict)  # tensor -> pieces taking it
    unfed: tuple[int, ...] = ()       # pieces taking no tensor (run with a request's first)

    def __post_init__(self):
        for i, p in enumerate(self.pieces):
            for t in p.inputs:
                self.consumers.setdefault(t, []).append(i)
        self.unfed = tuple(i for i, p in enumerate(self.pieces) if not p.inputs)

    @property
    def plan(self):
        return self.artifact.plan

    @classmethod
    def load(cls, name: str, folder: str | Path, plan_file: Path | None,
             fpga_mode: str) -> _Served:
        artifact = DeviceArtifact(folder, fpga_mode=fpga_mode, plan_file=plan_file)
        plan, device = artifact.plan, artifact.device.name
        expect, routes = routing(plan, device)
        return cls(name, artifact, plan.digest(), plan.pieces_on(device), expect, routes,
                   {n: plan.tensors[n] for n in expect})


class Worker:
    """One device's pieces behind a ROUTER socket.

    Parameters
    ----------
    folder : path
        ``OUT/<device>``: the device's library, weights and plan.json.
    bind : str
        ZeroMQ endpoint to bind; a ``*`` port picks a free one (see ``endpoint``).
    keys : path, optional
        Key folder for CurveZMQ (``splitc keys``); required off loopback unless ``insecure``.
    max_message_bytes : int, optional
        Frames larger than this close the sender's connection unread. Default: twice the
        largest tensor this device receives, at least MIN_MESSAGE_LIMIT.
    compute_priority : "idle" or "normal"
        The scheduling priority :meth:`serve` runs the pieces at (module docstring, point 8).
    max_connections : int, optional
        Connections kept open at most (module docstring, point 4); default MAX_CONNECTIONS,
        more for a plan of many devices.
    """

    def __init__(self, folder: str | Path, bind: str = "tcp://127.0.0.1:5555", *,
                 keys: str | Path | None = None, insecure: bool = False,
                 max_message_bytes: int | None = None, fpga_mode: str = "emulation",
                 compute_priority: str = "idle", max_connections: int | None = None):
        if compute_priority not in COMPUTE_PRIORITIES:
            raise BadInput(f"compute priority {compute_priority!r}: "
                           f"{' or '.join(COMPUTE_PRIORITIES)}")
        self.compute_priority = compute_priority
        main = _Served.load("", folder, None, fpga_mode)
        self.device = main.artifact.device.name
        #: every plan this worker can serve, by digest: the main plan first, then the
        #: fallback plans its folder holds (:mod:`splitc.runtime.fallback`)
        self.served = {main.digest: main}
        for name, path in fallback.device_plans(folder).items():
            served = _Served.load(name, folder, path, fpga_mode)
            self.served.setdefault(served.digest, served)
        self.main = main
        self._use(main)
        #: what happened, for ``splitc run --trace``: (kind, rid, what, t0, t1, bytes) with
        #: kind c (a piece ran), r (a message arrived; what = "src|tensors"), s (a message
        #: left; what = "dst|tensors"), times on this worker's monotonic clock; the last
        #: EVENTS_KEPT are kept, numbered from events_base
        self.events: deque = deque(maxlen=EVENTS_KEPT)
        self.events_base = 0
        #: recv / sent: per peer [tensors, bytes, messages]; loop_cpu_s: the serving thread's
        #: CPU time handling what the loop woke up for, pieces included (piece_cpu_s); the
        #: stats' thread_cpu_s adds the polls between turns (waking up for a message costs
        #: the thread too): less the pieces, that is what the runtime itself costs (`splitc
        #: profile` fits its cost per message and per byte from it); message_cpu_s: the part
        #: of it spent taking messages in and sending them (the rest goes with the pieces:
        #: finding what a message made ready, routing and keeping the outputs)
        self.counters = {"recv": defaultdict(lambda: [0, 0, 0]),
                         "sent": defaultdict(lambda: [0, 0, 0]),
                         "pieces_run": 0, "requests_done": 0, "errors": 0, "expired": 0,
                         "orphaned": 0, "refused": 0, "compute_s": 0.0, "piece_cpu_s": 0.0,
                         "loop_cpu_s": 0.0, "message_cpu_s": 0.0}
        self._turn_cpu: float | None = None  # the thread's CPU clock when this turn began
        self.curve = security.Curve(keys, self.device) if keys else None
        self.insecure = insecure
        security.require([bind], self.curve, insecure, f"bind {self.device} to")
        self.max_message_bytes = max_message_bytes or max(
            [MIN_MESSAGE_LIMIT, *(2 * t.nbytes for sv in self.served.values()
                                  for t in sv.specs.values())])
        if max_connections is None:  # every device may connect, and a few strangers
            max_connections = max(MAX_CONNECTIONS, len(self.plan.devices) + MAX_ANONYMOUS + 2)
        if max_connections < 2:
            raise BadInput(f"max connections {max_connections}: at least 2 (the client and "
                           "a peer)")
        self.budget = budgets([sv.plan for sv in self.served.values()], self.device,
                              curve=self.curve is not None, max_connections=max_connections)
        self.memory = {"baseline": 0, "bound": 0, "rss_limit": 0}
        self.ctx = zmq.Context()
        self.router = wire.tune(self.ctx.socket(zmq.ROUTER))
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        self.router.setsockopt(zmq.RCVHWM, RCVHWM)
        self.router.setsockopt(zmq.SNDHWM, SNDHWM)
        self.router.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        # no PINGs from here: a peer's own PINGs (with their TTL) keep its connection checked,
        # and every heartbeat byte a peer sends counts against its byte account
        self.router.setsockopt(zmq.HEARTBEAT_IVL, 0)
        self.guard: guard.Guard | None = None  # started by warm_up()
        self.max_connections = max_connections
        try:
            if self.curve is not None:
                self.curve.serve(self.ctx, self.router)
            self.router.bind(bind)
        except zmq.ZMQError as e:
            self.close()
            raise OSError(f"{self.device}: cannot bind {bind}: {e}") from None
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.session: _Session | None = None
        self.stopping = threading.Event()
        self._swept = 0.0
        self._log = guard.LogLimit(log)  # (every message a peer sends can log a line)

    def _use(self, served: _Served) -> None:
        """Serve ``served``'s plan from now on (a setup named it by its digest). The receive
        buffers kept for the previous plan's tensors, and the headers read, are let go."""
        if getattr(self, "current", None) is not served:
            self.pool, self.headers = wire.BufferPool(), wire.Headers()
        self.current = served
        self.artifact, self.plan, self.digest = served.artifact, served.plan, served.digest
        self.pieces, self.expect, self.routes, self.specs = (served.pieces, served.expect,
                                                             served.routes, served.specs)
        self.consumers, self.unfed = served.consumers, served.unfed

    # -- memory ----------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Run every piece of every plan once on zeros (so the runtime's buffers exist before
        the first request), then fix the memory bound: the RSS now plus what the plans let
        peers make this worker hold (:func:`budgets`) plus MEMORY_MARGIN; the guard starts."""
        for served in self.served.values():
            for piece in served.pieces:
                inputs = [np.zeros(served.plan.tensors[t].shape, served.plan.tensors[t].dtype)
                          for t in piece.inputs]
                try:
                    served.artifact.run(piece, inputs)
                except Exception as e:  # reported again on every request that runs it
                    log.warning("%s: piece %s%s fails on zeros: %s: %s", self.device,
                                piece.name, f" (fallback {served.name})" if served.name else "",
                                type(e).__name__, e)
        guard.trim_memory()
        base = guard.rss()
        self.memory = {"baseline": base, "bound": base + self.budget.held + MEMORY_MARGIN,
                       "rss_limit": base + self.budget.held + MEMORY_MARGIN // 2}
        port = self.endpoint.rpartition(":")[2]
        if self.endpoint.startswith("tcp://") and port.isdigit():
            self.guard = guard.start(self.router, int(port), guard.Config(
                self.budget.roles, self.budget.anonymous, self.curve is not None,
                self.max_connections, self.budget.max_anonymous, self.memory["rss_limit"]))
        if self.guard is None:
            log.warning("%s: no byte account of connections here (it needs TCP and Linux's "
                        "TCP_INFO): a peer can grow this worker", self.device)
        elif isinstance(self.guard, guard.Thread) and self.compute_priority == "idle":
            # a serving thread at idle priority would hold the account's thread up
            self.compute_priority = "normal"
            log.warning("%s: pieces run at normal priority (the memory guard runs in this "
                        "process, and at idle priority a busy CPU would hold it up)",
                        self.device)

    # -- the loop --------------------------------------------------------------------------
    def serve(self) -> None:
        """Serve until :meth:`stop` (or a signal handler calling it)."""
        if not self.memory["bound"]:
            self.warm_up()
        if self.compute_priority == "idle":
            idle_priority()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        reports = self.guard.fileno if self.guard is not None else None
        if reports is not None:
            poller.register(reports, zmq.POLLIN)
        registered: set[zmq.Socket] = set()
        session = None
        try:
            while not self.stopping.is_set():
                if self.session is not session:  # a setup replaced the peers
                    session = self.session
                    peers = set(session.peers.values()) if session else set()
                    for s in registered - peers:
                        poller.unregister(s)
                    for s in peers - registered:
                        poller.register(s, zmq.POLLIN)
                    registered = peers
                events = dict(poller.poll(self.poll_ms()))
                self._turn_cpu = time.thread_time()
                if self.router in events:
                    self._drain_router()
                if reports in events:
                    self.guard.on_report()
                for s in registered & events.keys():
                    if not s.closed:  # (a setup just now may have replaced the peers)
                        self._on_peer_reply(s)
                if self.session is not None and self.session.deadline is not None:
                    self._check_setup()
                self._sweep()
                self.each_turn()
                self.counters["loop_cpu_s"] += time.thread_time() - self._turn_cpu
                self._turn_cpu = None
        finally:
            self.close()

    def stop(self) -> None:
        self.stopping.set()

    # -- emulation hooks: benchmarks/cluster.py emulates a board's link delay by holding its
    # sends and flushing them from the loop; on a board these do nothing
    def poll_ms(self) -> int:
        """How long the loop waits for a message before its next turn (milliseconds)."""
        return 100

    def each_turn(self) -> None:
        """Called once per turn of the loop."""

    def close(self) -> None:
        if self.guard is not None and not self.ctx.closed:
            self.guard.stop()
            self.guard = None
        if self.curve is not None:
            self.curve.stop()
        if not self.ctx.closed:
            self.ctx.destroy(linger=0)

    def _drain_router(self, limit: int = 256) -> None:
        for _ in range(limit):
            if not self.router.getsockopt(zmq.EVENTS) & wire.POLLIN:
                return  # (cheaper than waiting for zmq.Again)
            c0 = time.thread_time()
            try:
                msg = wire.recv(self.router, route=True, keys=self.curve is not None,
                                specs=self.specs, alloc=self.pool.take, flags=zmq.NOBLOCK,
                                headers=self.headers)
            except zmq.Again:
                return
            except wire.WireError as e:
                sender = self._sender(e.head, e.route, e.origin)
                self._fail(f"bad message: {e}", rid=e.rid, route=e.route,
                           to_client=self._ours(e.head, e.rid))
                self._account(e.origin, sender)
                continue
            except Exception:  # a check the wire missed: drop the message, keep serving
                self._log(logging.ERROR, "%s: unreadable message dropped", self.device,
                          exc_info=True)
                while self.router.getsockopt(zmq.RCVMORE):
                    self.router.recv(copy=False)
                continue
            sender = self._sender(msg.head, msg.route, msg.origin)
            # its bytes are read: the guard hears so before the work it asks for (credited
            # after a piece ran, a client's connection held all its requests in flight
            # against a stranger's budget while the first one ran, and was reset)
            self._account(msg.origin, sender)
            self.counters["message_cpu_s"] += time.thread_time() - c0
            try:
                self._handle(msg, sender)
            except Refused as e:
                self.counters["refused"] += 1
                self._fail(f"refused {msg.kind} from {msg.src or '?'}: {e}", rid=e.rid,
                           route=msg.route, to_client=False, code=e.code, echo=msg.head)
            except wire.WireError as e:
                self._fail(f"refused {msg.kind} from {msg.src or '?'}: {e}", rid=e.rid,
                           route=msg.route, to_client=self._ours(msg.head, e.rid))
            except Exception as e:  # never let one message end the worker
                self._log(logging.ERROR, "%s: handling %s failed", self.device, msg.kind,
                          exc_info=True)
                self._fail(f"{type(e).__name__}: {e}", rid=msg.rid, route=msg.route,
                           to_client=self._ours(msg.head, msg.rid))

    def _account(self, origin: wire.Origin, sender: str | None, read: bool = True) -> None:
        """Tell the guard the bytes of a message taken from its connection (``read``), or
        only who the connection belongs to."""
        if self.guard is not None:
            self.guard.account(origin.fd, origin.sizes if read else [], sender)

    def _ours(self, head: dict, rid) -> bool:
        """Whether a refused message belongs to a request of the current session (so its
        client must hear of it: that request cannot finish)."""
        return (rid is not None and self.session is not None
                and _same(head.get("session"), self.session.id))

    # -- who is speaking -------------------------------------------------------------------
    def _sender(self, head: dict, route: bytes | None, origin: wire.Origin) -> str | None:
        """Who sent a message, as far as this worker can tell; None for a stranger.

        With keys: the name the sender's key is registered under (ZAP's user id), whatever
        the message says. Without keys: "client" for the connection that set the session up;
        a device of the plan for a message that carries the session id and names it as
        ``src`` (only the client and the workers it set up know the id)."""
        if self.curve is not None:
            return origin.user
        s = self.session
        if s is None:
            return None
        if route is not None and route == s.client:
            return wire.CLIENT
        src = head.get("src")
        if (_same(head.get("session"), s.id) and isinstance(src, str)
                and src in self.devices and src != self.device):
            return src
        return None

    @property
    def devices(self) -> set[str]:
        return {d.name for d in self.plan.devices}

    # -- messages --------------------------------------------------------------------------
    def _handle(self, msg: wire.Message, sender: str | None) -> None:
        kind = msg.kind
        if kind == wire.PING:
            s = self.session
            member = {}
            if msg.head.get("session"):  # a peer's ping during its setup: do we share it?
                member = {"member": bool(s and _same(msg.head["session"], s.id)
                                         and sender == msg.src)}
            main = self.main
            self._send(msg.route, wire.header(
                wire.PONG, src=self.device, digest=main.digest, device=self.device,
                pid=os.getpid(), pieces=[p.name for p in main.pieces],
                lib_sha256=main.artifact.device.lib_sha256,
                weights_sha256=main.artifact.device.weights_sha256,
                plans=list(self.served), **member))
        elif kind == wire.SETUP:
            self._setup(msg, sender)
        elif kind == wire.STATS:
            if sender != wire.CLIENT:
                raise Refused("only the session's client may ask for stats", "refused")
            if "events_from" in msg.head:  # a page of the event log (`splitc run --trace`)
                self._send(msg.route, self._head(wire.STATS,
                                                 events=self.event_page(msg.head["events_from"])))
            else:
                self._send(msg.route, self._head(wire.STATS, counters=self.stats()))
        elif kind in (wire.TENSORS, wire.DROP):
            s = self.session
            if s is None or not _same(msg.head.get("session"), s.id):
                raise Refused(f"{kind} for a session {self.device} does not hold (set up "
                              "again)", "session", msg.rid)
            if msg.head.get("digest") != self.digest:
                raise wire.WireError(f"plan digest {msg.head.get('digest')!r} differs from "
                                     f"{self.device}'s {self.digest}", msg.head)
            if kind == wire.DROP:
                if sender != wire.CLIENT:
                    raise Refused("only the session's client may drop a request", "refused")
                self._forget(msg.rid)
            else:
                self._tensors(msg, sender)
        else:
            raise wire.WireError(f"{self.device} does not take {kind} messages", msg.head)

    def _setup(self, msg: wire.Message, sender: str | None) -> None:
        head = msg.head
        served = self.served.get(head.get("digest"))
        if served is None:
            fallbacks = len(self.served) - 1
            self._send(msg.route, wire.header(
                wire.ERROR, src=self.device, digest=self.main.digest,
                session=head.get("session", ""), rid=None, device=self.device, piece="",
                code="", message=f"device {self.device} holds another plan (digest "
                f"{self.main.digest}" + (f" and {fallbacks} fallback plan(s)" if fallbacks
                                         else "")
                + f", the client's is {head.get('digest')}): copy "
                f"OUT/{self.main.artifact.device.dir} from the same compile"))
            return
        s = self.session
        if self.curve is not None:
            if sender != wire.CLIENT:
                raise Refused(f"only the client's key may set a session up (this key is "
                              f"{sender or 'unknown'}'s)", "refused")
        elif not (s is None or msg.route == s.client or not guard.established(s.client_fd)
                  or _same(head.get("previous"), s.id)):
            raise Refused(f"{self.device} serves the session of a client that is still "
                          "connected; a setup must come from it or name its session",
                          "refused")
        sid = head.get("session")
        if not isinstance(sid, str) or not 16 <= len(sid) <= 128:
            raise wire.WireError("setup needs a session id of 16 to 128 characters", head)
        peers = head.get("peers")
        if not isinstance(peers, dict) or not all(isinstance(v, str) for v in peers.values()):
            raise wire.WireError("setup needs peers: {device: endpoint}", head)
        needed = sorted({d for dsts in served.routes.values() for d in dsts
                         if d != wire.CLIENT})
        missing = [d for d in needed if d not in peers]
        if missing:
            raise wire.WireError(f"setup gives no endpoint for {', '.join(missing)}, which "
                                 f"{self.device} sends to", head)
        sockets = {}
        for d in needed:
            sock = sockets[d] = wire.tune(self.ctx.socket(zmq.DEALER))
            # (what is sent while the peer is down waits, up to SNDHWM messages: its loss is
            # the client's to tell, naming it)
            sock.setsockopt(zmq.SNDHWM, SNDHWM)
            try:
                security.require([peers[d]], self.curve, self.insecure,
                                 f"send from {self.device} to {d} at")
                if self.curve is not None:
                    self.curve.dial(sock, d)
                sock.connect(peers[d])
            except (zmq.ZMQError, security.KeyProblem) as e:
                for made in sockets.values():
                    made.close(linger=0)
                raise wire.WireError(f"{self.device} cannot connect to {d} at {peers[d]!r}: "
                                     f"{e}", head) from None
        if s is not None and s.client != msg.route:
            # the client that held it hears so, and sets it up again if it still wants it
            self._send(s.client, wire.header(
                wire.ERROR, src=self.device, digest=self.digest, session=s.id, rid=None,
                device=self.device, piece="", code="replaced",
                message=f"{self.device}: another setup replaced this session"))
        self._end_session()
        if served is not self.current:
            log.info("%s: serving %s", self.device, f"the fallback plan for losing {served.name}"
                     if served.name else "the main plan")
        self._use(served)
        now = time.monotonic()
        clock = head.get("clock")
        self.session = _Session(
            sid, msg.route, sockets, {d: peers[d] for d in needed}, set(needed),
            now + float(head.get("timeout", 10.0)), client_fd=msg.origin.fd,
            offset=None if clock is None else now - clock,
            request_timeout=float(head.get("request_timeout") or wire.DEFAULT_DEADLINE_S))
        log.info("%s: session from the client, peers %s", self.device,
                 self.session.endpoints)
        # its connection is the client's from now on: the guard hears so before the client
        # hears ready (after it, a client sending several requests at once could find its
        # connection still held to a stranger's budget, and reset)
        self._account(msg.origin, wire.CLIENT, read=False)
        self._check_setup()

    def _on_peer_reply(self, sock: zmq.Socket) -> None:
        s = self.session
        while True:
            try:
                msg = wire.recv(sock, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except wire.WireError as e:
                self._log(logging.WARNING, "%s: bad reply from a peer: %s", self.device, e)
                continue
            peer = next((d for d, p in s.peers.items() if p is sock), "?")
            if msg.kind == wire.PONG:
                problem = ""
                if msg.head.get("device") != peer:
                    problem = f"is served by device {msg.head.get('device')!r}"
                elif self.digest not in msg.head.get("plans", [msg.head.get("digest")]):
                    problem = (f"holds another plan (digest {msg.head.get('digest')}, "
                               f"{self.device} serves {self.digest})")
                if problem and s.deadline is not None:
                    s.deadline = None  # the session stays unusable: no ready
                    self._fail(f"{self.device}'s peer {peer} at {s.endpoints.get(peer)} "
                               f"{problem}", to_client=True)
                if msg.head.get("member"):
                    s.waiting.discard(peer)
                else:  # not set up for this session yet: ask again shortly
                    s.pinged.pop(peer, None)
            else:
                self._log(logging.WARNING, "%s: %s from peer %s: %s", self.device, msg.kind,
                          peer, msg.head.get("message", ""))

    def _check_setup(self) -> None:
        s = self.session
        if s is None or s.deadline is None:
            return
        now = time.monotonic()
        for peer in s.waiting:
            # a peer learns who is speaking from the session id in this ping (without keys),
            # and answers "member" once its own setup has arrived
            if now - s.pinged.get(peer, -1.0) > SETUP_PING_S:
                try:
                    wire.send(s.peers[peer], wire.header(wire.PING, src=self.device,
                                                         session=s.id), flags=zmq.NOBLOCK)
                    s.pinged[peer] = now
                except zmq.ZMQError:
                    pass  # (not connected yet)
        if not s.waiting:
            s.deadline = None
            self._send(s.client, self._head(wire.READY, device=self.device))
        elif now > s.deadline:
            s.deadline = None
            unreachable = ", ".join(f"{d} at {s.endpoints[d]}" for d in sorted(s.waiting))
            self._fail(f"{self.device} cannot reach {unreachable}: no answer to ping",
                       to_client=True)

    def _end_session(self) -> None:
        if self.session is not None:
            for sock in self.session.peers.values():
                sock.close(linger=0)
            for req in self.session.requests.values():
                self._recycle(req)
            self.session = None

    # -- requests --------------------------------------------------------------------------
    def _tensors(self, msg: wire.Message, sender: str | None) -> None:
        s, rid, src = self.session, msg.rid, msg.src
        names = msg.names  # (a list built from the header at each call)
        if sender is None:
            raise Refused("tensors from the client come only over the connection that set "
                          "the session up", "refused", rid)
        if self.curve is not None and src != sender:
            raise Refused(f"the message says it is from {src!r}, its key is {sender}'s",
                          "refused", rid)
        for name in names:
            if sender not in self.expect[name]:
                raise Refused(f"{self.device} takes {name!r} from "
                              f"{' or '.join(sorted(self.expect[name]))}, not {sender!r}",
                              "refused", rid)
        counter = self.counters["recv"][src]
        counter[0] += len(msg.arrays)
        counter[1] += msg.nbytes
        counter[2] += 1
        now = time.monotonic()
        self._event("r", rid, (src, names), now, now, msg.nbytes)
        if rid in s.dropped:
            for a in msg.arrays:
                self.pool.give(a)
            return
        req = s.requests.get(rid)
        if req is None:
            if len(s.requests) >= MAX_PENDING:
                self._sweep(force=True)
            if len(s.requests) >= MAX_PENDING:
                raise wire.WireError(f"{self.device} holds {MAX_PENDING} unfinished requests "
                                     "already", msg.head)
            req = s.requests[rid] = _Request(*self._deadline(msg.head.get("deadline")))
        for name, a in zip(names, msg.arrays, strict=True):
            if name in req.have:
                raise wire.WireError(f"request {rid}: {name!r} arrived twice", msg.head)
            req.have[name] = a
            req.received.append(a)
        self._run_ready(rid, req, names)

    def _deadline(self, deadline) -> tuple[float, float | None]:
        """(when this worker gives up on a request, the deadline to forward) for a request
        whose first message said ``deadline`` (the client's clock). Never later than the
        client's request timeout from now: a sender cannot pin a request here."""
        s, now = self.session, time.monotonic()
        latest = now + s.request_timeout
        if deadline is None or s.offset is None:
            return latest, deadline
        return min(latest, deadline + s.offset), deadline

    def _sweep(self, force: bool = False) -> None:
        """Forget requests whose deadline has passed (every SWEEP_S)."""
        now = time.monotonic()
        if self.session is None or (not force and now - self._swept < SWEEP_S):
            return
        self._swept = now
        for rid, req in list(self.session.requests.items()):
            if now > req.expires:
                self.counters["expired"] += 1
                self._forget(rid)

    def _run_ready(self, rid: int, req: _Request, arrived: list[str]) -> None:
        """Run, in the plan's order, every piece that the tensors ``arrived`` (and what those
        pieces make) leave with all its inputs. Only the pieces taking a tensor just come are
        looked at: a message costs the pieces it feeds, not all of the device's."""
        consumers, pieces = self.consumers, self.pieces
        todo = {i for t in arrived for i in consumers.get(t, ())}.union(self.unfed)
        checked = False
        while todo:
            i = min(todo)
            todo.discard(i)
            piece = pieces[i]
            if piece.name in req.done or not all(t in req.have for t in piece.inputs):
                continue
            if time.monotonic() > req.expires:
                self.counters["expired"] += 1  # the client gave up on it already
                self._forget(rid)
                return
            if not checked:  # (once per message, not per piece: it is a system call)
                checked, s = True, self.session
                now = time.monotonic()
                if now - s.client_seen > CLIENT_CHECK_S:
                    if not guard.established(s.client_fd):
                        # the client's connection is gone (a frozen worker thawed: the client
                        # failed these requests long ago): nobody will take the answers
                        self._orphan()
                        return
                    s.client_seen = now
            t0, m0, c0 = time.perf_counter(), time.monotonic(), time.thread_time()
            try:
                outs = self.artifact.run(piece, [req.have[t] for t in piece.inputs])
            except Exception as e:
                self._fail(f"{type(e).__name__}: {e}".strip(), rid=rid, piece=piece.name)
                self._forget(rid)
                return
            self.counters["compute_s"] += time.perf_counter() - t0
            self.counters["piece_cpu_s"] += time.thread_time() - c0
            self._event("c", rid, piece.name, m0, time.monotonic(), 0)
            self.counters["pieces_run"] += 1
            req.done.add(piece.name)
            req.have.update(zip(piece.outputs, outs, strict=True))
            if not self._send_outputs(rid, piece.name, piece.outputs, outs, req.deadline):
                self._forget(rid)
                return
            todo.update(j for t in piece.outputs for j in consumers.get(t, ()))
        if len(req.done) == len(self.pieces):
            self.counters["requests_done"] += 1
            self.session.requests.pop(rid, None)
            self._recycle(req)

    def _orphan(self) -> None:
        s = self.session
        n = len(s.requests)
        log.warning("%s: the client's connection is gone: %d unfinished request(s) dropped",
                    self.device, n)
        self.counters["orphaned"] += n
        for rid in list(s.requests):
            self._forget(rid)

    def _send_outputs(self, rid: int, piece: str, names, arrays,
                      deadline: float | None) -> bool:
        c0 = time.thread_time()
        try:
            return self._send_each(rid, piece, names, arrays, deadline)
        finally:
            self.counters["message_cpu_s"] += time.thread_time() - c0

    def _send_each(self, rid: int, piece: str, names, arrays, deadline: float | None) -> bool:
        by_dst: dict[str, list[tuple[str, np.ndarray]]] = defaultdict(list)
        for name, a in zip(names, arrays, strict=True):
            for dst in self.routes.get(name, ()):
                by_dst[dst].append((name, a))
        s = self.session
        for dst, items in by_dst.items():
            names_, arrays_ = [n for n, _ in items], [a for _, a in items]
            head = s.heads.get((piece, dst))
            if head is None:  # (the same tensors, every request of the session)
                head = s.heads[piece, dst] = wire.TensorsHead(self._head(wire.TENSORS),
                                                              arrays_, names_)
            sent = time.monotonic()  # (before: the I/O thread may deliver it at once)
            try:
                if dst == wire.CLIENT:
                    n = wire.send(self.router, head.raw(rid), arrays_, route=s.client,
                                  flags=zmq.NOBLOCK)
                else:
                    n = wire.send(s.peers[dst], head.raw(rid, deadline), arrays_,
                                  flags=zmq.NOBLOCK)
            except zmq.ZMQError as e:
                where = "the client" if dst == wire.CLIENT else \
                    f"{dst} at {s.endpoints[dst]}"
                self._fail(f"cannot send {', '.join(names_)} to {where}: {e}", rid=rid,
                           piece=piece)
                return False
            counter = self.counters["sent"][dst]
            counter[0] += len(items)
            counter[1] += n
            counter[2] += 1
            self._event("s", rid, (dst, names_), sent, sent, n)
        return True

    def _forget(self, rid: int) -> None:
        s = self.session
        s.dropped.add(rid)
        req = s.requests.pop(rid, None)
        if req is not None:
            self._recycle(req)

    def _recycle(self, req: _Request) -> None:
        for a in req.received:
            self.pool.give(a)
        req.received.clear()

    # -- replies ---------------------------------------------------------------------------
    def _head(self, kind: str, **fields) -> dict:
        """A header to the session's client or its peers (it carries the session id)."""
        return wire.header(kind, src=self.device, digest=self.digest,
                           session=self.session.id if self.session else "", **fields)

    def _send(self, route: bytes | None, head: dict) -> None:
        if route is None:
            self._log(logging.WARNING, "%s: nobody to send %s to: %s", self.device,
                      head["kind"], head.get("message", ""))
            return
        try:
            wire.send(self.router, head, route=route, flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self._log(logging.WARNING, "%s: could not send %s: %s", self.device, head["kind"],
                      e)

    def _fail(self, message: str, *, rid: int | None = None, piece: str = "",
              route: bytes | None = None, to_client: bool | None = None, code: str = "",
              echo: dict | None = None) -> None:
        """Report an error to ``route`` (who sent the offending message) and, for errors that
        concern a request or the session (``to_client``, by default when there is a ``rid``
        or a ``piece``), to the session's client. Only the client's copy carries the session
        id; the sender's carries the session id its message named (``echo``), if any."""
        self.counters["errors"] += 1
        where = f" running {piece}" if piece else ""
        req = f" (request {rid})" if rid is not None else ""
        self._log(logging.WARNING, "%s%s%s: %s", self.device, where, req, message)
        fields = dict(rid=rid, device=self.device, piece=piece, message=message, code=code)
        if to_client is None:
            to_client = bool(piece) or rid is not None
        s = self.session
        client = s.client if s is not None else None
        if route is not None and route != client:
            named = (echo or {}).get("session")
            self._send(route, wire.header(wire.ERROR, src=self.device, digest=self.digest,
                                          session=named if isinstance(named, str) else "",
                                          **fields))
        if client is not None and (to_client or route == client):
            self._send(client, self._head(wire.ERROR, **fields))

    def _event(self, kind: str, rid, what, t0: float, t1: float, nbytes: int) -> None:
        """Log one event as it is: a piece's name, or (peer, tensor names) for a message,
        made into text only when a page is asked for (three events a piece, most never
        read)."""
        if len(self.events) == self.events.maxlen:
            self.events_base += 1
        self.events.append((kind, rid, what, t0, t1, nbytes))

    @staticmethod
    def _event_text(event: tuple) -> tuple:
        kind, rid, what, t0, t1, nbytes = event
        if not isinstance(what, str):
            what = f"{what[0]}|{','.join(what[1])}"
        if len(what) > 2000:  # (a message of very many tensors: named in part)
            what = what[:2000] + "..."
        return kind, rid, what, round(t0, 6), round(t1, 6), nbytes

    def event_page(self, start) -> dict:
        """Events numbered ``start`` on, as many as fit in EVENTS_PAGE_BYTES of the reply's
        header (which must stay under the wire's limit), with this worker's clock now."""
        start = max(int(start) if isinstance(start, int) else 0, self.events_base)
        page, size = [], 0
        for e in itertools.islice(self.events, start - self.events_base, None):
            e = self._event_text(e)
            size += len(e[2]) + 64
            if page and size > EVENTS_PAGE_BYTES:
                break
            page.append(e)
        return {"from": start, "events": page, "total": self.events_base + len(self.events),
                "clock": time.monotonic()}

    def stats(self) -> dict:
        c = self.counters
        g = self.guard.status() if self.guard is not None else {}
        memory = {**self.memory, "rss": guard.rss(), "guard": g.get("where", ""),
                  "unread": g.get("unread", {}), "peak_held": g.get("peak_held", 0),
                  "closed": {k: g.get(k, 0) for k in ("over_budget", "over_cap", "over_rss")},
                  "last": g.get("last", []), "credits_dropped": g.get("credits_dropped", 0),
                  "budgets": {**self.budget.roles, "anonymous": self.budget.anonymous}}
        return {"device": self.device,
                "recv": {k: {"tensors": v[0], "bytes": v[1], "messages": v[2]}
                         for k, v in c["recv"].items()},
                "sent": {k: {"tensors": v[0], "bytes": v[1], "messages": v[2]}
                         for k, v in c["sent"].items()},
                "pieces_run": c["pieces_run"], "requests_done": c["requests_done"],
                "errors": c["errors"], "expired": c["expired"], "orphaned": c["orphaned"],
                "refused": c["refused"], "compute_s": c["compute_s"],
                # (asked mid-turn, as stats are, with the turn so far: one turn may run
                # many requests that arrive back to back)
                "piece_cpu_s": c["piece_cpu_s"], "message_cpu_s": c["message_cpu_s"],
                "loop_cpu_s": c["loop_cpu_s"] + (
                    0.0 if self._turn_cpu is None else time.thread_time() - self._turn_cpu),
                "thread_cpu_s": time.thread_time(),  # (stats run on the serving thread)
                "pending": len(self.session.requests) if self.session else 0,
                "memory": memory}


class Refused(Exception):
    """A message its sender may not send (module docstring, point 2). ``code`` goes into the
    error reply (see :mod:`splitc.runtime.wire`)."""

    def __init__(self, message: str, code: str, rid: int | None = None):
        super().__init__(message)
        self.code, self.rid = code, rid


def _same(a, b) -> bool:
    """Two session ids are equal (in constant time: an id is a secret)."""
    return isinstance(a, str) and isinstance(b, str) and hmac.compare_digest(a.encode(),
                                                                             b.encode())


@dataclass(frozen=True)
class Budget:
    """What the plan lets this worker's peers make it hold (:func:`budgets`)."""

    roles: dict[str, int]      # bytes unread per role: "client" and each device
    anonymous: int             # bytes unread per connection not yet known
    max_anonymous: int
    held: int                  # the whole: inbound, partial requests, pool, outbound


def budgets(plans, device: str, *, curve: bool, max_connections: int = 64) -> Budget:
    """The memory this worker's peers can make it hold, from the plan (or the plans: the
    main plan and the fallback plans a worker serves, one at a time).

    Per request the client sends this device one message (the model inputs its pieces
    read) and each device one message per piece of its that sends here; with at most
    ``wire.MAX_INFLIGHT`` requests in flight a role may have that many requests' messages
    unread, plus CONTROL_ALLOWANCE for pings, drops, stats and setups. A connection not yet
    known may hold one message of any sender plus two headers. Partial requests: at most
    MAX_PENDING requests' inputs; the buffer pool: BufferPool.depth arrays per tensor
    received; outbound: SNDHWM messages per destination. With keys a key holder sending
    tiny frames can make each byte of its budget cost up to 3 bytes of memory (counted);
    without keys the session's members (who know its secret) are trusted with theirs.
    Over several plans each role gets its largest budget in any of them, and partial
    requests, the pool and the outbound queues count for the plan that needs most (a setup
    for another plan ends the session, its requests, its pool and its peers' queues)."""
    plans = [plans] if not isinstance(plans, list | tuple) else list(plans)
    roles: dict[str, int] = {}
    anonymous = received = outbound = 0
    max_anonymous = min(MAX_ANONYMOUS, max_connections)
    for plan in plans:
        one = _plan_budget(plan, device, max_anonymous)
        for who, n in one.roles.items():
            roles[who] = max(roles.get(who, 0), n)
        anonymous = max(anonymous, one.anonymous)
        received, outbound = max(received, one.received), max(outbound, one.outbound)
    amplification = 3 if curve else 1
    held = (amplification * sum(roles.values()) + max_anonymous * anonymous
            + (MAX_PENDING + wire.BufferPool().depth) * received + outbound)
    return Budget(roles, anonymous, max_anonymous, held)


@dataclass(frozen=True)
class _PlanBudget:
    roles: dict[str, int]
    anonymous: int
    received: int                     # bytes of one request's inputs here
    outbound: int                     # bytes the outgoing queues may hold


def _plan_budget(plan, device: str, max_anonymous: int) -> _PlanBudget:
    """One plan's part of :func:`budgets`."""
    expect, routes = routing(plan, device)
    per_request: dict[str, int] = defaultdict(int)
    for tensor, srcs in expect.items():
        for src in srcs:
            per_request[src] += plan.tensors[tensor].nbytes
    messages = {wire.CLIENT: 1}
    for d in plan.devices:
        messages[d.name] = max(1, sum(1 for p in plan.pieces_on(d.name)
                                      if any(device == tr.dst and tr.tensor in p.outputs
                                             for tr in plan.transfers)))
    roles = {who: wire.MAX_INFLIGHT * (per_request.get(who, 0) + n * HEADER_ALLOWANCE)
             + CONTROL_ALLOWANCE for who, n in messages.items()}
    largest = max([0, *per_request.values()])
    anonymous = 2 * wire.MAX_HEADER + largest + guard.HANDSHAKE_ALLOWANCE
    received = sum(plan.tensors[t].nbytes for t in expect)
    out_message: dict[str, int] = defaultdict(int)
    for p in plan.pieces_on(device):
        to: dict[str, int] = defaultdict(int)
        for t in p.outputs:
            for dst in routes.get(t, ()):
                to[dst] += plan.tensors[t].nbytes
        for dst, n in to.items():
            out_message[dst] = max(out_message[dst], n)
    outbound = sum(SNDHWM * (n + HEADER_ALLOWANCE) for n in out_message.values()) \
        + max_anonymous * SNDHWM * 1024  # pongs and errors to strangers who do not read
    return _PlanBudget(roles, anonymous, received, outbound)


def routing(plan, device: str) -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """For one device: which tensors it receives and from whom (``"client"`` or a device),
    and where each tensor it produces goes (devices, and ``"client"`` for model outputs)."""
    mine = plan.pieces_on(device)
    produced = {t for p in mine for t in p.outputs}
    consumed = {t for p in mine for t in p.inputs}
    model_inputs = set(plan.client_tensors)
    expect: dict[str, set[str]] = defaultdict(set)
    for t in consumed & model_inputs:
        expect[t].add(wire.CLIENT)
    routes: dict[str, list[str]] = defaultdict(list)
    for tr in plan.transfers:
        if tr.dst == device and tr.tensor in consumed:
            expect[tr.tensor].add(tr.src)
        if tr.src == device and tr.tensor in produced and tr.dst not in routes[tr.tensor]:
            routes[tr.tensor].append(tr.dst)
    for e in plan.outputs:
        if e.tensor in produced and wire.CLIENT not in routes[e.tensor]:
            routes[e.tensor].append(wire.CLIENT)
    return dict(expect), dict(routes)


@dataclass(frozen=True)
class WorkerOptions:
    """Everything a worker is started with: one value for ``python -m splitc.runtime.worker``,
    ``splitc serve`` and the ``--restart`` supervisor's child (argv is derived from the fields,
    so the three cannot drift apart). Each field's ``help`` is its command-line help."""

    folder: str = field(metadata={"help": "OUT/<device> written by `splitc compile`"})
    bind: str = field(default="tcp://127.0.0.1:5555", metadata={
        "help": "ZeroMQ endpoint to listen on (tcp://0.0.0.0:5555 for all interfaces; port * "
                "picks a free one)"})
    announce: str | None = field(default=None, metadata={
        "help": "write the bound endpoint to this file"})
    keys: str | None = field(default=None, metadata={
        "help": "key folder from `splitc keys` (CurveZMQ); required off loopback unless "
                "--insecure"})
    insecure: bool = field(default=False, metadata={
        "help": "allow serving off loopback without encryption"})
    max_message_bytes: int | None = field(default=None, metadata={
        "help": "close connections that send larger frames (default: twice the largest tensor "
                "this device receives, at least 1 MiB); the worker's memory bound does not "
                "rely on it (see --max-connections and the per-connection byte account)"})
    max_connections: int | None = field(default=None, metadata={
        "help": "connections held at once (default: 64, or every device and a few strangers "
                "for bigger plans)"})
    restart: bool = field(default=False, metadata={
        "help": "restart the worker on the same endpoint whenever it dies"})
    fpga: str = field(default="emulation", metadata={
        "help": "an FPGA device's pieces: the bit-accurate C simulation (emulation, default) "
                "or the PYNQ overlay on the board (board)", "choices": ("emulation", "board")})
    compute_priority: str = field(default="idle", metadata={
        "help": "run pieces at idle priority (default), so tensors leave the moment they are "
                "sent; normal where other busy processes share the board",
        "choices": COMPUTE_PRIORITIES})
    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog="python -m splitc.runtime.worker",
                                         description="Serve one device folder of a splitc plan.")
        for f in fields(cls):
            kwargs = {"help": f.metadata["help"]}
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            if f.name == "folder":
                parser.add_argument("folder", **kwargs)
            elif f.type == "bool":
                parser.add_argument(_flag(f.name), action="store_true", **kwargs)
            else:
                parser.add_argument(_flag(f.name), default=f.default,
                                    type=int if "int" in f.type else str, **kwargs)
        return parser

    @classmethod
    def parse(cls, argv: list[str] | None = None) -> WorkerOptions:
        return cls(**vars(cls.parser().parse_args(argv)))

    def argv(self) -> list[str]:
        """The command line that gives these options back (:meth:`parse` of it)."""
        out = [str(self.folder)]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "folder" or value is None or value is False:
                continue
            out += [_flag(f.name)] if value is True else [_flag(f.name), str(value)]
        return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def run(options: WorkerOptions) -> int:
    """Serve as ``options`` say (under the supervisor with ``restart``); the exit status: 0
    after SIGTERM or SIGINT, 2 when the worker cannot start (bad folder, plan, keys,
    endpoint), 1 when it stops on an error it did not expect.
    Logs to stderr, never waiting for it (:class:`guard.Log`): where it listens, each
    session, and every error it reports."""
    # A board has no torch; where one is installed, tvm_ffi imports it eagerly (seconds and
    # hundreds of MB per worker) though the runtime never uses it. (Unless something in this
    # process already imported it: then it stays.)
    sys.modules.setdefault("torch", None)
    logs = guard.Log.install()
    log.setLevel(logging.INFO)
    try:
        if options.restart:
            child = replace(options, restart=False, announce=None)
            return supervise(child, options.bind, options.announce)
        try:
            serve(options.folder, options.bind, announce=options.announce, keys=options.keys,
                  insecure=options.insecure, max_message_bytes=options.max_message_bytes,
                  fpga_mode=options.fpga, compute_priority=options.compute_priority,
                  max_connections=options.max_connections)
        except (OSError, BadInput) as e:  # PlanError and KeyProblem are BadInputs
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    finally:
        if logs is not None:
            logs.close()


def serve(device_folder: str | Path, bind: str = "tcp://127.0.0.1:5555", *,
          announce: str | Path | None = None, keys: str | Path | None = None,
          insecure: bool = False, max_message_bytes: int | None = None,
          fpga_mode: str = "emulation", compute_priority: str = "idle",
          max_connections: int | None = None) -> None:
    """Load ``device_folder`` and serve it on ``bind`` until SIGTERM or SIGINT.

    ``announce``: a file to write the bound endpoint to once listening (for a ``*`` port),
    after the warm-up (:meth:`Worker.warm_up`). ``keys``, ``insecure``,
    ``max_message_bytes``, ``compute_priority``, ``max_connections``: see :class:`Worker`.
    The process's open-file limit is raised to its hard limit first.
    """
    files = guard.raise_open_files()
    guard.limit_mmap_threshold()
    worker = Worker(device_folder, bind, keys=keys, insecure=insecure,
                    max_message_bytes=max_message_bytes, fpga_mode=fpga_mode,
                    compute_priority=compute_priority, max_connections=max_connections)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: worker.stop())
    try:
        worker.warm_up()
        fallbacks = [sv.name for sv in worker.served.values() if sv.name]
        log.info("%s: %d pieces%s, listening on %s (plan %s, %s, frames up to %d bytes, at "
                 "most %d connections of %d open files; memory bound %d MiB: %d MiB loaded + %d "
                 "MiB peers may make it hold + %d MiB margin)", worker.device,
                 len(worker.pieces), f" and the fallback plans for losing {', '.join(fallbacks)}"
                 if fallbacks else "", worker.endpoint, worker.digest,
                 "CURVE-encrypted" if worker.curve else "unencrypted",
                 worker.max_message_bytes, worker.max_connections, files,
                 worker.memory["bound"] >> 20, worker.memory["baseline"] >> 20,
                 worker.budget.held >> 20, MEMORY_MARGIN >> 20)
        if announce is not None:
            _announce(announce, worker.endpoint)
        worker.serve()
    finally:
        worker.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("%s: stopped", worker.device)


def idle_priority() -> None:
    """Run the calling thread, and the threads it starts from now on (TVM's pool), at
    ``SCHED_IDLE``; ZeroMQ's I/O threads, started with the context, keep normal priority and
    so preempt it. Where the platform has no such policy nothing changes."""
    if not hasattr(os, "SCHED_IDLE"):
        return
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
    except OSError as e:
        log.warning("cannot lower the compute priority: %s", e)


def _announce(path: str | Path, endpoint: str) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(endpoint + "\n")
    tmp.replace(path)


#: A worker that ran at least this long before dying is restarted at once; one that dies
#: sooner waits RESTART_BACKOFF, doubling up to RESTART_BACKOFF_MAX (a crash loop).
STABLE_S, RESTART_BACKOFF, RESTART_BACKOFF_MAX = 10.0, 0.25, 5.0
#: A worker that dies this many times in a row before it is ready to serve (a library that
#: crashes on load, say) is not started again: a restart cannot fix it.
UNSTARTED_LIMIT = 3


def supervise(options: WorkerOptions, bind: str, announce: str | Path | None = None) -> int:
    """``--restart``: run the worker (``python -m splitc.runtime.worker`` with ``options``) as
    a child and start it again, on the same endpoint, whenever it dies — killed, crashed or out of
    memory. It gives up on what a restart cannot fix: a worker that exits with status 2 (bad
    folder, plan, keys, endpoint; the supervisor exits 2 too), or one that dies
    UNSTARTED_LIMIT times in a row before it is ready to serve (status 1). SIGTERM or SIGINT
    stop the child and the supervisor (status 0)."""
    stopping = threading.Event()
    child: list[subprocess.Popen] = []

    def stop(*_):
        stopping.set()
        if child and child[0].poll() is None:
            child[0].send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    endpoint, restarts, backoff, unstarted = bind, 0, RESTART_BACKOFF, 0
    with tempfile.TemporaryDirectory(prefix="splitc-supervise-") as tmp:
        child_announce = Path(tmp) / "endpoint"
        while not stopping.is_set():
            child_announce.unlink(missing_ok=True)
            started = time.monotonic()
            child[:] = [subprocess.Popen(
                [sys.executable, "-m", "splitc.runtime.worker",
                 *replace(options, bind=endpoint, announce=str(child_announce)).argv()])]
            announced = False
            while child[0].poll() is None:
                if not announced and child_announce.exists():
                    announced = True
                    endpoint = child_announce.read_text().strip()  # a * port, now fixed
                    if announce is not None:
                        _announce(announce, endpoint)
                time.sleep(0.05)
            code = child[0].returncode
            if stopping.is_set():
                break
            if code == 2:
                log.error("worker exited with status 2 (bad input: folder, plan, keys or "
                          "endpoint): a restart cannot fix that, not restarting")
                return 2
            unstarted = 0 if announced else unstarted + 1
            if unstarted >= UNSTARTED_LIMIT:
                log.error("worker died %d times in a row before it was ready to serve (last "
                          "status %s): not restarting", unstarted, code)
                return 1
            lived = time.monotonic() - started
            backoff = RESTART_BACKOFF if lived >= STABLE_S else min(backoff * 2,
                                                                     RESTART_BACKOFF_MAX)
            restarts += 1
            log.warning("worker (pid %d) exited with status %s after %.1f s; restarting on "
                        "%s in %.2f s (restart %d)", child[0].pid, code, lived, endpoint,
                        backoff, restarts)
            stopping.wait(backoff)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(WorkerOptions.parse(argv))


if __name__ == "__main__":
    sys.exit(main())
