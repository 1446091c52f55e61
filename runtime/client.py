"""The client side of the ZeroMQ runtime: open a session on the workers, send model inputs,
collect model outputs.

>>> from splitc.runtime.client import connect
>>> with connect("OUT") as session:                      # doctest: +SKIP
...     (y,) = session.infer(x)                          # one local worker per device
>>> session = connect("OUT", {"dev0": "tcp://10.0.0.2:5555",
...                           "dev1": "tcp://10.0.0.3:5555"})  # doctest: +SKIP

The client holds one DEALER socket per worker. It sends each model input only to the devices
whose pieces read it and receives model outputs from the devices that produce them;
intermediate tensors go from worker to worker (see :mod:`splitc.runtime.worker`).

Faults. Every wait has a deadline, and every request carries its deadline to the workers. A
worker whose connection drops — killed, frozen or unplugged: libzmq heartbeats notice within
``wire.HEARTBEAT_IVL_MS + wire.HEARTBEAT_TIMEOUT_MS`` — or whose local process exits is marked
down: every request in flight fails at once with :class:`WorkerLost` naming the device and
its endpoint, and new requests fail fast while it is down. The client keeps pinging it; when
it answers again (restarted by hand or by ``splitc serve --restart``) and holds the same
compile, the session is set up afresh on every worker and requests succeed again. With
``retries`` a failed request is sent again once the session is back. A worker that says it
no longer holds this session (another setup replaced it) is set up again at once, and the
client says so (a warning, and :attr:`Session.events`); its requests in flight fail with
:class:`SessionReplaced`, which retries cure. At most ``wire.MAX_INFLIGHT`` requests are in
flight per session (the depth a worker's memory bound is computed for).

Failover. A folder compiled with ``--spares`` holds fallback plans (:mod:`.fallback`): one
for every set of up to K devices being lost, over the others. With them, a loss no longer
fails the requests in flight: they are held (with their inputs) while the device is down.
Once every device of the plan in use that is down has been down for ``failover_after``
seconds, and there is a fallback plan for exactly the devices that are down, the client
switches: it opens a new session on that plan's devices (the setup's digest names the plan;
workers serve every plan in their folder) and sends the held requests again; it says so (a
warning on stderr, and :attr:`Session.events`). A device that answers pings again brings
the plan for fewer losses back at once (the main plan when none is down), the requests in
flight sent again under it. Answers of an older session are ignored, so no request mixes
plans. A loss no fallback covers (more devices than the spares) fails requests as without
fallbacks. A device that does not answer when the session opens is treated the same way:
after ``failover_after`` the session opens on the fallback plan without it. Like every
recovery here, a switch happens while the client waits for something (an answer, a setup):
an idle session switches with its next request.

Sessions: the session id is a 128-bit secret. Without keys it is what tells a worker a
message comes from this client or its peers, so no worker reply to anyone else carries it.

Security: with a key folder (``keys``), every connection is CurveZMQ-encrypted and the workers
admit only known keys (:mod:`splitc.runtime.security`); off loopback that is required unless
``insecure``.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import fallback, guard, security, wire
from .errors import BadInput, RuntimeFailure
from .plan import Plan, PlanError
from .trace import Timeline

log = logging.getLogger("splitc.client")
#: Default seconds to wait for one request's outputs.
REQUEST_TIMEOUT = 60.0
#: Default seconds for workers to start (local ones) and answer the setup.
START_TIMEOUT = 60.0


class RemoteError(RuntimeFailure):
    """A worker reported an error (a piece that raised, a message it refused)."""


class WorkerLost(RuntimeFailure):
    """A worker went away: its process exited or its connection dropped."""


class RequestTimeout(RuntimeFailure):
    """No answer within the deadline."""


class AuthFailure(RuntimeFailure):
    """A worker refused this client's CURVE handshake (wrong, missing or unexpected keys)."""


class SessionReplaced(RuntimeFailure):
    """A worker no longer holds this client's session (another setup replaced it, or it
    restarted): the client sets the session up again."""


#: Faults a retry can cure (a worker that comes back; a request that was too slow; a session
#: set up again).
RETRYABLE = (WorkerLost, RequestTimeout, SessionReplaced)
#: While a worker is down the client pings it this often (seconds).
PING_EVERY = 0.25
#: A setup (after a worker came back) not answered this fast is sent again (seconds).
RESETUP_EVERY = 5.0
#: Default seconds a device of the plan in use stays down before the client switches to the
#: fallback plan for the devices that are down (when the compile made one): longer than a
#: worker under ``--restart`` takes to come back (about 1 s for ResNet-18 on loopback,
#: benchmarks/faults.py), so a restart does not cost two switches.
FAILOVER_AFTER = 5.0
_MONITOR = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_SUCCEEDED)


@dataclass
class _Pending:
    rid: int
    started: float
    deadline: float
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    error: RuntimeFailure | None = None
    finished: float | None = None
    #: the model inputs (kept to send the request again under another plan)
    inputs: tuple[np.ndarray, ...] = ()
    #: the plan it was sent under, None while it waits to be sent (held through a failover)
    plan: Plan | None = None
    #: the output tensors it waits for, in the model's order (of the plan it was sent under)
    want: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.plan is not None and len(self.outputs) == len(self.want)


class Session:
    """An open session on the workers of one plan. Use :func:`connect` to make one."""

    def __init__(self, plan: Plan, endpoints: dict[str, str], *,
                 timeout: float = REQUEST_TIMEOUT, local: _LocalWorkers | None = None,
                 keys: str | Path | None = None, insecure: bool = False, retries: int = 0,
                 fallbacks: Sequence[fallback.Fallback] = (),
                 failover_after: float = FAILOVER_AFTER):
        #: the main plan (what the session opens with) and its digest, the compile's identity
        self.main = plan
        self.main_digest = plan.digest()
        #: the fallback plans, by the set of devices each is for losing (empty: no failover)
        self.fallbacks = {frozenset(f.lost): f for f in fallbacks}
        self.failover_after = failover_after
        self.endpoints = dict(endpoints)
        self.timeout = timeout
        self.retries = retries
        self.id = secrets.token_hex(16)  # the session's secret (module docstring)
        self._local = local
        self._closed = False
        self.curve = security.Curve(keys, security.CLIENT) if keys else None
        for dev, endpoint in self.endpoints.items():
            try:
                security.parse_endpoint(endpoint)
            except security.KeyProblem:
                raise PlanError(f"the endpoint for {dev}, {endpoint!r}, is not one splitc takes:"
                                " write tcp://HOST:PORT (not ZeroMQ's tcp://SOURCE;DESTINATION "
                                "form)") from None
        security.require(list(self.endpoints.values()), self.curve, insecure, "connect to")
        self._ctx = zmq.Context()
        self._socks: dict[str, zmq.Socket] = {}
        self._monitors: dict[zmq.Socket, str] = {}
        self._poller = zmq.Poller()
        self._pending: dict[int, _Pending] = {}
        self._next_rid = 0
        #: devices that are down now, with the error their requests failed with
        self._down: dict[str, RuntimeFailure] = {}
        self._stale = False          # a worker was lost: set the session up again when back
        self._opening = True
        self._setup_sent = self._pinged = self._ticked = 0.0
        self._down_since: dict[str, float] = {}
        self._shook: set[str] = set()  # devices whose connection finished its handshake
        self._ready: set[str] = set()
        self._replies: dict[str, dict] = {}
        #: (monotonic time, device or "*", what): losses, returns, sessions set up again
        self.events: list[tuple[float, str, str]] = []
        #: requests sent again after a retryable failure
        self.retried = 0
        #: tensor name -> how many times the client received it (model outputs only, if the
        #: workers keep to the plan)
        self.received: Counter = Counter()
        #: seconds per request of the last :meth:`infer_many`
        self.latencies: list[float] = []
        #: for :meth:`timeline`: each finished request's (sent, done) and each output's
        #: arrival, on this process's monotonic clock (the most recent TRACE_KEPT)
        self.history: OrderedDict[int, tuple[float, float | None]] = OrderedDict()
        self.arrivals: OrderedDict[tuple[int, str], float] = OrderedDict()
        self.bytes_sent = self.bytes_received = 0
        self._switched = False  # a plan switch waits for its setup to be answered
        self._use(plan)
        # local workers are stopped even if the session is never closed
        self._stop_local = weakref.finalize(self, local.stop) if local else lambda: None
        for dev, endpoint in self.endpoints.items():
            sock = wire.tune(self._ctx.socket(zmq.DEALER))
            # read everything the workers send: a full queue would stop libzmq reading the
            # connection, heartbeats included, and a live worker would look dead
            sock.setsockopt(zmq.RCVHWM, 0)
            # nothing is queued for a connection that is not up: after a reconnection the
            # first message a worker reads is a ping, not a backlog (its byte account lets a
            # connection that has not shown who it is hold little)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            mon = sock.get_monitor_socket(_MONITOR)
            self._socks[dev] = sock
            self._monitors[mon] = dev
            try:
                if self.curve is not None:
                    self.curve.dial(sock, dev)
                sock.connect(endpoint)
            except (zmq.ZMQError, security.KeyProblem) as e:
                if isinstance(e, security.KeyProblem):
                    self.close()
                    raise
                self.close()
                raise PlanError(f"the endpoint for {dev}, {endpoint!r}, is not one ZeroMQ can "
                                f"connect to ({e}); write tcp://HOST:PORT") from None
            self._poller.register(sock, zmq.POLLIN)
            self._poller.register(mon, zmq.POLLIN)
        self._dev_of = {s: d for d, s in self._socks.items()}

    def _use(self, plan: Plan, lost: frozenset[str] = frozenset()) -> None:
        """Route requests by ``plan`` from now on: the main plan, or the fallback plan for
        losing ``lost``."""
        #: the plan in use, and the devices it is for losing (none: the main plan)
        self.plan, self.lost = plan, lost
        self.digest = plan.digest()
        #: the devices with pieces in the plan in use (the ones set up for the session)
        self.active = [d.name for d in plan.devices if plan.pieces_on(d.name)
                       and d.name in self.endpoints]
        # routing: which devices read each tensor the client sends (model inputs and the
        # slices cut from them), which device sends each output
        self._input_devices = {
            t: sorted({p.device for p in plan.pieces if t in p.inputs})
            for t in plan.client_tensors}
        producer = {t: p.device for p in plan.pieces for t in p.outputs}
        self._outputs = [e.tensor for e in plan.outputs]
        self._output_device = {t: producer[t] for t in self._outputs if t in producer}
        self._specs, self._headers = dict(plan.tensors), wire.Headers()
        self._input_specs = [(e, tuple(plan.tensors[e.tensor].shape),
                              np.dtype(plan.tensors[e.tensor].dtype)) for e in plan.inputs]
        self._inputs_of: dict[str, list[str]] = {}  # device -> model input tensors it reads
        for tensor, devices in self._input_devices.items():
            for dev in devices:
                self._inputs_of.setdefault(dev, []).append(tensor)

    @property
    def serving(self) -> str:
        """Which plan the session runs: ``"main"``, or ``"without dev1"`` (a fallback)."""
        return "main" if not self.lost else "without " + ", ".join(self._ordered(self.lost))

    # -- opening ---------------------------------------------------------------------------
    def _open(self, start_timeout: float) -> None:
        """Ping every worker, then set the session up on all of them — or, when some have
        not answered within ``failover_after`` seconds and there is a fallback plan for
        losing them, on the devices of that plan (the others are pinged on, and the main
        plan runs once they answer)."""
        started = time.monotonic()
        deadline = started + start_timeout

        def missing() -> frozenset[str]:
            return frozenset(d for d in self._socks if d not in self._replies)

        def answered() -> bool:
            return not missing() or (missing() in self.fallbacks and time.monotonic()
                                     >= started + self.failover_after)

        self._ping_missing()  # (again every PING_EVERY until they answer, in _poll)
        self._wait(answered, deadline,
                   lambda: "no answer to ping from " + self._missing(self._replies), strict=True)
        for dev in self._socks:
            problem = self._check_pong(dev, self._replies[dev]) if dev in self._replies else ""
            if problem:
                raise PlanError(problem)
        for lost, fb in list(self.fallbacks.items()):
            digest = fb.plan.digest()
            lacking = [d for d in fb.active if d in self._replies
                       and digest not in self._replies[d].get("plans", ())]
            if lacking:  # (a folder copied without its fallbacks, or an older worker)
                text = (f"no failover when {fb.name} is lost: {', '.join(lacking)} "
                        f"{'does' if len(lacking) == 1 else 'do'} not hold that fallback plan "
                        f"(copy OUT/{lacking[0]} from the same compile again)")
                log.warning("splitc client: %s", text)
                self.events.append((time.monotonic(), "*", text))
                del self.fallbacks[lost]
        absent = missing()
        if absent:
            if absent not in self.fallbacks:  # (its fallback was dropped just now)
                raise RequestTimeout("no answer to ping from " + self._missing(self._replies))
            for dev in self._ordered(absent):
                self._down[dev] = WorkerLost(
                    f"worker {dev} at {self.endpoints[dev]} is gone: no answer to ping when "
                    "the session opened", device=dev, endpoint=self.endpoints[dev])
                self._down_since[dev] = started
                self.events.append((started, dev, "no answer to ping when the session opened"))
            self._use(self.fallbacks[absent].plan, absent)
            text = (f"{', '.join(self._ordered(absent))} did not answer within "
                    f"{self.failover_after:.3g} s: opening on {self._plan_words()} "
                    f"({', '.join(self.active)} serve)")
            log.warning("splitc client: %s", text)
            self.events.append((time.monotonic(), "*", text))
        for dev in self.active:
            self._send_setup(self._socks[dev], max(1.0, deadline - time.monotonic()))
        self._wait(lambda: all(d in self._ready for d in self.active), deadline,
                   lambda: "no answer to setup from " + self._missing(self._ready), strict=True)
        self._opening = False
        if absent:
            self.events.append((time.monotonic(), "*", f"serving {self._plan_words()}"))

    def _check_pong(self, dev: str, pong: dict) -> str:
        """What is wrong with the worker that answered for ``dev`` ("" if nothing): another
        device behind the endpoint, or another compile (plan, library or weights)."""
        if pong.get("device") != dev:
            return (f"the endpoint given for {dev}, {self.endpoints[dev]}, is served by device "
                    f"{pong.get('device')!r}: check --endpoints")
        if pong.get("digest") != self.main_digest:
            d = self.main.device(dev)
            differ = [f"{what} {str(got)[:12]}… (this plan's: {want[:12]}…)"
                      for what, got, want in (("library", pong.get("lib_sha256"), d.lib_sha256),
                                              ("weights", pong.get("weights_sha256"),
                                               d.weights_sha256)) if got != want]
            return (f"device {dev} at {self.endpoints[dev]} holds another compile (plan "
                    f"{pong.get('digest')}, this client's is {self.main_digest})"
                    + (": its " + ", ".join(differ) if differ else "")
                    + f". Copy OUT/{d.dir} from the same compile to it")
        return ""

    @property
    def ready(self) -> bool:
        """Every worker of the plan in use is up and set up for this session."""
        return (not self._stale and not self._closed and not self._down_active()
                and all(d in self._ready for d in self.active))

    def _down_active(self) -> list[str]:
        """The devices of the plan in use that are down."""
        return [d for d in self.active if d in self._down]

    def _failing(self) -> bool:
        """A device of the plan in use is down and no fallback plan takes over: requests fail
        (as they do without fallbacks) instead of waiting for a switch."""
        return bool(self._down_active()) and frozenset(self._down) not in self.fallbacks

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every worker is up and set up again (after a fault); raise the loss if
        that does not happen within ``timeout`` seconds (default: the request timeout)."""
        self._check_open()
        timeout = self.timeout if timeout is None else timeout
        try:
            self._wait(lambda: self.ready, time.monotonic() + timeout,
                       lambda: f"the workers were not ready within {timeout:.3g} s")
        except RequestTimeout:
            if self._down_active():
                dev = self._down_active()[0]
                err = self._down[dev]
                raise type(err)(f"{err} (not back within {timeout:.3g} s)", device=dev,
                                endpoint=self.endpoints[dev]) from None
            raise

    def _missing(self, have) -> str:
        return ", ".join(f"{d} at {self.endpoints[d]}" for d in self.active if d not in have)

    # -- requests --------------------------------------------------------------------------
    def infer(self, *inputs: np.ndarray, timeout: float | None = None,
              retries: int | None = None) -> list[np.ndarray]:
        """Run the plan on the model inputs (in the model's order); returns its outputs.

        ``retries`` (default: the session's): how many times a request that failed because
        a worker was lost or too slow is sent again, each time once the session is back."""
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return self.result(self.submit(*inputs, timeout=timeout))
            except RETRYABLE:
                if attempt == retries:
                    raise
            self.retried += 1
            self.wait_ready(timeout)
        raise AssertionError("unreachable")

    def infer_many(self, batches: Iterable[Sequence[np.ndarray]], inflight: int = 4, *,
                   timeout: float | None = None,
                   retries: int | None = None) -> list[list[np.ndarray]]:
        """Run many requests with up to ``inflight`` in flight at once (a pipeline keeps every
        device busy); returns the outputs in the order of ``batches``. Per-request latencies
        are left in :attr:`latencies`. ``retries``: as for :meth:`infer`, per request."""
        if not 1 <= inflight <= wire.MAX_INFLIGHT:
            raise BadInput(f"inflight must be 1 to {wire.MAX_INFLIGHT}, not {inflight}")
        retries = self.retries if retries is None else retries
        todo = iter(enumerate(batches))
        results: dict[int, list[np.ndarray]] = {}
        latency: dict[int, float] = {}
        running: dict[int, int] = {}  # rid -> index
        inputs: dict[int, Sequence[np.ndarray]] = {}  # index -> its batch, while running
        attempts: Counter = Counter()
        exhausted = False
        try:
            while running or not exhausted:
                while not exhausted and len(running) < inflight:
                    item = next(todo, None)
                    if item is None:
                        exhausted = True
                        break
                    index, batch = item
                    inputs[index] = batch
                    running[self.submit(*batch, timeout=timeout)] = index
                if not running:
                    break
                self._wait(lambda: any(self._done(r) for r in running), None, None)
                for rid in [r for r in running if self._done(r)]:
                    p = self._pending[rid]
                    index = running.pop(rid)
                    try:
                        results[index] = self.result(rid)
                    except RETRYABLE:
                        if attempts[index] >= retries:
                            raise
                        attempts[index] += 1
                        self.retried += 1
                        self.wait_ready(timeout)
                        running[self.submit(*inputs[index], timeout=timeout)] = index
                        continue
                    latency[index] = p.finished - p.started
                    del inputs[index]
        except BaseException:
            for rid in running:
                self._abandon(rid)
            raise
        self.latencies = [latency[i] for i in range(len(results))]
        return [results[i] for i in range(len(results))]

    def submit(self, *inputs: np.ndarray, timeout: float | None = None) -> int:
        """Send one request's inputs; returns its id (collect it with :meth:`result`).

        Raises the loss at once while a worker is down; waits (up to ``timeout``) while the
        session is being set up again after a worker came back. With fallback plans, while
        the devices that are down have one (or are being set up again) the request is held
        instead, and sent as soon as a plan runs again (the deadline still counts)."""
        self._check_open()
        timeout = self.timeout if timeout is None else timeout
        if self._down:
            self._poll(0)  # (news of a return may be waiting)
        if self._failing():
            dev = self._down_active()[0]
            err = self._down[dev]
            down_for = time.monotonic() - self._down_since[dev]
            raise type(err)(f"{err} (down for {down_for:.2f} s; reconnecting)", device=dev,
                            endpoint=self.endpoints[dev])
        if not self.ready and not self.fallbacks:
            self.wait_ready(timeout)
        if len(self._pending) >= wire.MAX_INFLIGHT:
            raise BadInput(f"{len(self._pending)} requests are in flight already, the most a "
                           f"session keeps (wire.MAX_INFLIGHT): collect some with result() "
                           "first")
        if len(inputs) != len(self.plan.inputs):
            raise PlanError(f"the model takes {len(self.plan.inputs)} inputs, got "
                            f"{len(inputs)}")
        checked = []
        for (endpoint, shape, dtype), x in zip(self._input_specs, inputs, strict=True):
            x = np.asarray(x)
            if x.shape != shape or x.dtype != dtype:
                raise PlanError(f"input {endpoint.name!r} must be {dtype}{list(shape)}"
                                f", got {x.dtype}{list(x.shape)}")
            checked.append(x)
        rid = self._next_rid
        self._next_rid += 1
        now = time.monotonic()
        p = self._pending[rid] = _Pending(rid, now, now + timeout, inputs=tuple(checked))
        if not self.ready:
            return rid  # held: sent once the session (on whichever plan) is set up
        err = self._send_request(p)
        if err is not None:
            if self._held_through_loss():
                return rid  # (sent again once the session is set up again)
            self._abandon(rid)
            raise err
        return rid

    def _held_through_loss(self) -> bool:
        """A device of the plan in use was lost and a plan will run again (the device's
        return or a fallback's): requests wait for it instead of failing."""
        return bool(self.fallbacks) and self._stale and not self._failing()

    def _send_request(self, p: _Pending, look: bool = True) -> RuntimeFailure | None:
        """Send request ``p``'s inputs under the plan in use (again, after a switch); None,
        or the error when a device cannot take them (its connection just dropped, or a full
        queue: ``p`` is then held). ``look``: when a send fails, handle what the sockets say
        first (not from inside the loop)."""
        plan = self.plan
        arrays = plan.cut({e.tensor: x for (e, _, _), x in zip(self._input_specs, p.inputs,
                                                                 strict=True)})
        p.plan, p.want, p.outputs = plan, list(self._outputs), {}
        for dev, names in self._inputs_of.items():
            try:
                head = self._head(wire.TENSORS, rid=p.rid, deadline=round(p.deadline, 4))
                self.bytes_sent += wire.send(self._socks[dev], head,
                                             [arrays[n] for n in names], names,
                                             flags=zmq.NOBLOCK)
            except zmq.Again:
                self._hold(p)
                if look:
                    self._poll(0)  # (news of a loss may be waiting)
                if dev not in self._down and dev not in self._shook:
                    self._lose(dev, "its connection dropped")  # (nothing queues for it)
                err = self._down.get(dev)
                if err is not None:
                    return type(err)(f"request {p.rid}: {err}", device=dev,
                                     endpoint=self.endpoints[dev], rid=p.rid)
                return RequestTimeout(f"cannot send request {p.rid} to {dev} at "
                                      f"{self.endpoints[dev]}: its queue is full",
                                      device=dev, endpoint=self.endpoints[dev], rid=p.rid)
        # outputs that are model inputs too come back without a trip
        for t in p.want:
            if t in arrays:
                p.outputs[t] = arrays[t]
        if p.complete:
            p.finished = time.monotonic()
        return None

    def _hold(self, p: _Pending) -> None:
        """Keep request ``p`` to send again once a plan runs (its answers so far let go)."""
        p.plan, p.want, p.outputs, p.finished = None, [], {}, None

    def _flush(self) -> None:
        """The session is set up: send the requests held meanwhile, oldest first."""
        for p in list(self._pending.values()):
            if p.plan is None and p.error is None and time.monotonic() <= p.deadline:
                err = self._send_request(p, look=False)
                if err is not None and self._held_through_loss():
                    return  # (a device was lost again: the rest wait for the next setup)
                if err is not None:
                    p.error = err

    def result(self, rid: int) -> list[np.ndarray]:
        """Wait for request ``rid``; returns its outputs in the model's order."""
        p = self._pending.get(rid)
        if p is None:
            raise BadInput(f"no request {rid} in flight")
        try:
            self._wait(lambda: self._done(rid), None, None)
        except BaseException:
            self._abandon(rid)
            raise
        del self._pending[rid]
        _keep(self.history, rid, (p.started, p.finished))
        if p.error is not None:
            self._drop(rid)
            raise p.error
        return [p.outputs[t] for t in p.want]

    def _done(self, rid: int) -> bool:
        p = self._pending[rid]
        if p.error is None and not p.complete and time.monotonic() > p.deadline:
            if p.plan is None:
                down = [d for d in self._socks if d in self._down]
                why = (f"held while {', '.join(f'{d} at {self.endpoints[d]}' for d in down)} "
                       f"{'was' if len(down) == 1 else 'were'} down" if down else
                       "held while the session was being set up")
                dev = down[0] if down else ""
                p.error = RequestTimeout(
                    f"request {rid}: no answer in {p.deadline - p.started:.3g} s; {why}",
                    device=dev, endpoint=self.endpoints.get(dev, ""), rid=rid)
                return True
            waiting = [t for t in p.want if t not in p.outputs]
            devs = sorted({self._output_device.get(t, "?") for t in waiting})
            p.error = RequestTimeout(
                f"request {rid}: no answer in {p.deadline - p.started:.3g} s; still waiting for "
                f"{', '.join(waiting)} from "
                f"{', '.join(f'{d} at {self.endpoints.get(d)}' for d in devs)}",
                device=devs[0], endpoint=self.endpoints.get(devs[0], ""), rid=rid)
        return p.error is not None or p.complete

    def _abandon(self, rid: int) -> None:
        if self._pending.pop(rid, None) is not None:
            self._drop(rid)

    def _drop(self, rid: int) -> None:
        """Tell every worker to forget request ``rid`` (also while recovering: a worker that
        still holds the old session frees its inputs; one that is down gets nothing)."""
        if self._closed:
            return
        for dev in self.active:
            try:
                wire.send(self._socks[dev], self._head(wire.DROP, rid=rid), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    # -- counters --------------------------------------------------------------------------
    def worker_stats(self, timeout: float = 10.0) -> dict[str, dict]:
        """Every worker's counters: tensors and bytes received per source and sent per
        destination (``"client"`` or a device), pieces run, errors."""
        self._check_open()
        self._replies.clear()
        for dev in self.active:
            try:
                wire.send(self._socks[dev], self._head(wire.STATS), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # (not connected: reported as no answer)
        self._wait(lambda: all(d in self._replies for d in self.active),
                   time.monotonic() + timeout,
                   lambda: "no answer to stats from " + self._missing(self._replies),
                   strict=True)
        return {d: self._replies[d] for d in self.active}

    def timeline(self, timeout: float = 10.0) -> Timeline:
        """What happened in this session's recent requests, as every worker logged it and the
        client saw it, on one clock (each worker's offset estimated from the round trip of
        asking it): pieces, messages, waits (:mod:`splitc.runtime.trace`)."""
        events, offsets, uncertainty = {}, {}, {}
        for dev in self.active:
            events[dev], start = [], 0
            while True:
                page = self._ask(dev, {"events_from": start}, timeout)["events"]
                events[dev] += page["events"]
                start = page["from"] + len(page["events"])
                if not page["events"] or start >= page["total"]:
                    break
            # its clock against ours: the quickest of a few empty exchanges (NTP's way)
            samples = []
            for _ in range(CLOCK_SAMPLES):
                t0 = time.monotonic()
                clock = self._ask(dev, {"events_from": start}, timeout)["events"]["clock"]
                t1 = time.monotonic()
                samples.append((t1 - t0, clock - (t0 + t1) / 2))
            rtt, offsets[dev] = min(samples)
            uncertainty[dev] = rtt / 2
        tl = build_timeline(events, offsets, self.history, self.arrivals)
        tl.meta["clock_uncertainty_s"] = uncertainty
        return tl

    def _ask(self, dev: str, fields: dict, timeout: float) -> dict:
        """One stats exchange with ``dev`` (``fields`` added to the question)."""
        self._check_open()
        self._replies.pop(dev, None)
        wire.send(self._socks[dev], self._head(wire.STATS, **fields), flags=zmq.NOBLOCK)
        self._wait(lambda: dev in self._replies, time.monotonic() + timeout,
                   lambda: f"no answer to stats from {dev}", strict=True)
        return self._replies.pop(dev)

    def transfer_bytes(self) -> int:
        """Bytes the workers sent each other so far (measured, not from the plan)."""
        return sum(v["bytes"] for s in self.worker_stats().values()
                   for dst, v in s["sent"].items() if dst != wire.CLIENT)

    # -- the loop --------------------------------------------------------------------------
    def _wait(self, ready, deadline: float | None, what, *, strict: bool = False) -> None:
        """Handle incoming messages until ``ready()``; past ``deadline`` raise a timeout
        (``what()`` says what was missing). ``strict``: a worker that is down raises its
        loss (requests fail one by one instead)."""
        while True:
            if strict and self._down_active():
                raise self._down[self._down_active()[0]]
            if ready():
                return
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise RequestTimeout(what())
            self._poll(100 if deadline is None else max(0, min(100, (deadline - now) * 1e3)))

    def _poll(self, wait_ms: float) -> None:
        """One round: housekeeping (local processes, pings to workers that are down, a setup
        not answered), then the messages and socket events that arrive within ``wait_ms``."""
        now = time.monotonic()
        if now - self._ticked > 0.05:
            self._ticked = now
            self._check_local()
            if (self._down or self._opening) and now - self._pinged > PING_EVERY:
                self._ping_missing()
            if self.fallbacks and not self._opening and self._steer(now):
                pass  # (switched plans: the setup is on its way)
            elif not self._down_active() and (self._stale or (
                    not self._opening and not all(d in self._ready for d in self.active)
                    and now - self._setup_sent > RESETUP_EVERY)):
                self._resetup()
        for sock, _ in self._poller.poll(wait_ms):
            if sock in self._monitors:
                self._on_monitor(sock)
            else:
                self._on_message(self._dev_of[sock], sock)

    def _ping_missing(self) -> None:
        """Ping the workers that are down (or, while opening, have not answered yet)."""
        self._pinged = time.monotonic()
        for dev in (self._down if not self._opening else
                    [d for d in self._socks if d not in self._replies]):
            try:
                wire.send(self._socks[dev], wire.header(wire.PING, src=wire.CLIENT),
                          flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # (not connected yet)

    def _send_setup(self, sock: zmq.Socket, timeout: float, previous: str = "") -> None:
        try:
            wire.send(sock, self._head(wire.SETUP, peers=self.endpoints, timeout=timeout,
                                       clock=round(time.monotonic(), 6),
                                       request_timeout=self.timeout, previous=previous),
                      flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # (not connected: the setup is sent again, or times out naming the device)

    def _resetup(self) -> None:
        """Every worker of the plan in use is up: open a new session on all of them (the old
        one's requests have failed, or are held to be sent again; their late tensors are
        refused as another session's). The setup names the old session, so a worker that
        still holds it knows the setup is this client's."""
        previous, self.id = self.id, secrets.token_hex(16)
        self._stale = False
        self._ready.clear()
        self._setup_sent = time.monotonic()
        for dev in self.active:
            self._send_setup(self._socks[dev], RESETUP_EVERY, previous)

    def _steer(self, now: float) -> bool:
        """Switch plans when the devices that are down call for another one: to the fallback
        plan for them once every device of the plan in use that is down has been down for
        ``failover_after`` seconds, and at once to the plan for fewer losses (the main plan
        when none is down) when a device comes back. True if it switched."""
        down = frozenset(self._down)
        if down == self.lost:
            return False
        if down and down not in self.fallbacks:
            return False  # (no plan for this loss: requests fail as without fallbacks)
        lost_now = self._down_active()
        if lost_now and any(now - self._down_since[d] < self.failover_after for d in lost_now):
            return False  # (a restart may bring it back: wait)
        self._switch(down, now)
        return True

    def _switch(self, down: frozenset[str], now: float) -> None:
        """Run the plan for losing ``down`` (the main plan when empty) from now on: set it up
        on its devices, and send the requests in flight again once they answer."""
        before, before_lost = self._plan_words(), self.lost
        fb = self.fallbacks.get(down)
        self._use(fb.plan if fb else self.main, down)
        if down - before_lost:
            since = max(self._down_since[d] for d in down - before_lost)
            text = (f"failover: {', '.join(self._ordered(down - before_lost))} down for "
                    f"{now - since:.2f} s (over {self.failover_after:.3g} s); switching from "
                    f"{before} to {self._plan_words()} ({', '.join(self.active)} serve)")
        else:
            text = (f"{', '.join(self._ordered(before_lost - down))} back: switching from "
                    f"{before} to {self._plan_words()}")
        log.warning("splitc client: %s", text)
        self.events.append((now, "*", text))
        held = 0
        for p in self._pending.values():
            if p.error is None and not p.complete:
                held += 1
                self._hold(p)
        if held:
            self.events.append((now, "*", f"{held} request(s) to send again"))
        self._switched = True
        self._resetup()

    def _plan_words(self) -> str:
        return "the main plan" if not self.lost else f"the fallback plan {self.serving}"

    def _ordered(self, devices) -> list[str]:
        """``devices`` in the main plan's order."""
        return [d.name for d in self.main.devices if d.name in devices]

    def _on_message(self, dev: str, sock: zmq.Socket) -> None:
        while sock.getsockopt(zmq.EVENTS) & wire.POLLIN:
            try:
                msg = wire.recv(sock, specs=self._specs, flags=zmq.NOBLOCK,
                                headers=self._headers)
            except zmq.Again:
                return
            except wire.WireError as e:
                if e.head.get("session", self.id) == self.id:  # (not an older session's)
                    self._fail_request(e.rid, RemoteError(
                        f"bad message from {dev} at {self.endpoints[dev]}: {e}", device=dev,
                        endpoint=self.endpoints[dev], rid=e.rid))
                continue
            kind = msg.kind
            if kind == wire.PONG:
                self._replies[dev] = msg.head
                if dev in self._down:
                    self._back(dev, msg.head)
            elif kind == wire.READY and msg.head.get("session") == self.id:
                self._ready.add(dev)
                if not self._opening and self.ready:
                    self.events.append((time.monotonic(), "*", "session set up again"))
                    if self._switched:
                        self._switched = False
                        self.events.append((time.monotonic(), "*",
                                            f"serving {self._plan_words()}"))
                    self._flush()
            elif kind == wire.STATS:
                self._replies[dev] = msg.head["counters"] if "counters" in msg.head else \
                    {"events": msg.head["events"]}
            elif kind == wire.ERROR and msg.head.get("code") in ("replaced", "session") \
                    and msg.head.get("session") == self.id:
                self._replaced(dev, msg.head.get("message", ""))
            elif kind == wire.ERROR:
                where = msg.head.get("device") or dev
                piece = msg.head.get("piece") or ""
                rid = msg.head.get("rid")
                text = (f"{where}" + (f" running {piece}" if piece else "")
                        + (f" (request {rid})" if rid is not None else "")
                        + f": {msg.head.get('message', '')}")
                err = RemoteError(text, device=where, endpoint=self.endpoints.get(where, ""),
                                  piece=piece, rid=rid)
                if rid is None:  # about the session itself (setup refused, peer unreachable)
                    if msg.head.get("session") not in ("", self.id):
                        continue  # an older session's
                    if self._opening:
                        raise err
                    # while recovering: try again once the device answers pings
                    self._lose(dev, f"setting the session up again failed: "
                               f"{msg.head.get('message', '')}")
                    continue
                if msg.head.get("session") == self.id:  # (not about an older session's)
                    self._fail_request(rid, err)  # ignored for a request already abandoned
            elif kind == wire.TENSORS:
                self._on_tensors(dev, msg)

    def _on_tensors(self, dev: str, msg: wire.Message) -> None:
        p = self._pending.get(msg.rid)
        if p is not None and (p.plan is None or msg.head.get("session") != self.id):
            p = None  # held to be sent again, or an answer of an older session (plan)
        for name, a in zip(msg.names, msg.arrays, strict=True):
            self.received[name] += 1
            self.bytes_received += a.nbytes
            if p is None:
                continue  # an abandoned request
            if self._output_device.get(name) != dev:
                p.error = p.error or RemoteError(
                    f"{dev} sent {name!r} to the client, which is not a model output it makes",
                    device=dev, endpoint=self.endpoints[dev], rid=msg.rid)
            p.outputs[name] = a
            _keep(self.arrivals, (msg.rid, name), time.monotonic())
        if p is not None and p.complete:
            p.finished = time.monotonic()

    def _fail_request(self, rid, err: RuntimeFailure) -> bool:
        p = self._pending.get(rid) if rid is not None else None
        if p is None:
            return False
        p.error = p.error or err
        return True

    def _on_monitor(self, mon: zmq.Socket) -> None:
        dev = self._monitors[mon]
        while True:
            try:
                event = recv_monitor_message(mon, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._shook.add(dev)
            elif kind == zmq.EVENT_DISCONNECTED and self.curve is not None \
                    and dev not in self._shook:
                # a CURVE server that cannot decrypt our hello just closes the connection
                self._lose(dev, f"it closed the connection during the CurveZMQ handshake: "
                           f"the public key this client holds for {dev} is not the one it "
                           "serves with (keys from another `splitc keys` run?)", AuthFailure)
            elif kind == zmq.EVENT_DISCONNECTED and self._opening and dev not in self._shook:
                self._lose(dev, "it closed the connection during the handshake: it probably "
                           "requires CurveZMQ keys (started with --keys); give this client "
                           "--keys KEYDIR/client", AuthFailure)
            elif kind == zmq.EVENT_DISCONNECTED:
                self._shook.discard(dev)
                self._lose(dev, "its connection dropped")
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._lose(dev, "it refused this client's key (CurveZMQ authentication "
                           "failed): give --keys the client folder written by the same "
                           "`splitc keys` run as the worker's", AuthFailure)
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                self._lose(dev, "the security handshake failed: one side uses CurveZMQ keys "
                           "and the other does not (give both --keys, or neither)",
                           AuthFailure)

    def _check_local(self) -> None:
        if self._local is None:
            return
        for dev, proc in self._local.procs.items():
            code = proc.poll()
            if code is not None and dev not in self._down:
                self._lose(dev, f"its process exited with status {code}"
                           + self._local.tail(dev))

    def _lose(self, dev: str, why: str, kind: type[RuntimeFailure] = WorkerLost) -> None:
        """Mark ``dev`` down: fail every request in flight (naming it) and set the session up
        again once it answers pings."""
        if self._closed or (dev in self._down and (kind is WorkerLost
                                                   or isinstance(self._down[dev], kind))):
            return
        if self._local is not None and dev in self._local.procs:
            code = self._local.procs[dev].poll()
            if code is not None and "process exited" not in why:
                why += f" (its process exited with status {code}){self._local.tail(dev)}"
        where = f"worker {dev} at {self.endpoints[dev]}"
        text = f"{where} is gone: {why}" if kind is WorkerLost else f"{where}: {why}"
        now = time.monotonic()
        self._down[dev] = kind(text, device=dev, endpoint=self.endpoints[dev])
        self._down_since.setdefault(dev, now)
        self.events.append((now, dev, why))
        if dev not in self.active:
            return  # (the plan in use runs without it)
        self._stale = True
        self._ready.clear()
        if self.fallbacks and not self._failing():
            # a plan runs again (the device back, or the fallback for the devices down):
            # the requests in flight wait for it and are sent again then
            if not self.lost and frozenset(self._down) in self.fallbacks:
                log.warning("splitc client: %s; switching to the plan without %s if it is not "
                            "back within %.3g s", text, ", ".join(sorted(self._down)),
                            self.failover_after)
            for p in self._pending.values():
                if p.error is None and not p.complete:
                    self._hold(p)
            return
        for p in self._pending.values():
            if p.error is None and not p.complete:
                p.error = kind(f"request {p.rid}: {text}", device=dev,
                               endpoint=self.endpoints[dev], rid=p.rid)

    def _replaced(self, dev: str, why: str) -> None:
        """``dev`` no longer holds this session: fail the requests in flight (retryable) and
        set the session up again on every worker, saying so (events, and a warning)."""
        if self._closed or self._stale or dev not in self.active:
            return
        where = f"worker {dev} at {self.endpoints[dev]}"
        text = f"{where} no longer holds this session ({why}): setting it up again"
        log.warning("splitc client: %s", text)
        self.events.append((time.monotonic(), dev, f"session replaced: {why}"))
        self._stale = True
        self._ready.clear()
        for p in self._pending.values():
            if p.error is None and not p.complete:
                if self.fallbacks:
                    self._hold(p)  # (sent again once it is set up again)
                else:
                    p.error = SessionReplaced(f"request {p.rid}: {text}", device=dev,
                                              endpoint=self.endpoints[dev], rid=p.rid)

    def _back(self, dev: str, pong: dict) -> None:
        """A device that was down answered a ping."""
        problem = self._check_pong(dev, pong)
        if problem:  # came back as something else: stays down, saying why
            self._down[dev] = WorkerLost(f"worker {dev} came back, but {problem}",
                                         device=dev, endpoint=self.endpoints[dev])
            return
        del self._down[dev]
        since = self._down_since.pop(dev)
        self.events.append((time.monotonic(), dev,
                            f"back after {time.monotonic() - since:.2f} s"))

    # -- helpers ---------------------------------------------------------------------------
    def _head(self, kind: str, **fields) -> dict:
        return wire.header(kind, src=wire.CLIENT, session=self.id, digest=self.digest,
                           **fields)

    def _check_open(self) -> None:
        if self._closed:
            raise BadInput("the session is closed")

    def close(self) -> None:
        """Close the sockets and stop the local workers this session started."""
        if self._closed:
            return
        self._closed = True
        for sock in self._socks.values():
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            sock.close(linger=0)
        for mon in self._monitors:
            mon.close(linger=0)
        self._ctx.term()
        self._stop_local()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _LocalWorkers:
    """One ``python -m splitc.runtime.worker`` process per device, on 127.0.0.1, each with
    ``TVM_NUM_THREADS`` = cores / devices unless the environment sets it."""

    def __init__(self, out_dir: Path, plan: Plan, devices: list[str],
                 keys: str | Path | None = None):
        self.tmp = Path(tempfile.mkdtemp(prefix="splitc-workers-"))
        self.procs: dict[str, subprocess.Popen] = {}
        env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
        # the workers share this machine: split its cores between them (TVM's thread pool
        # would otherwise start one spinning thread per core in every worker)
        env.setdefault("TVM_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(devices))))
        # they end with this process (a client killed before it could stop them left them
        # serving for ever): from the main thread only, as the kernel's signal comes when
        # the starting *thread* ends; libc is loaded here (available()), so that the forked
        # child only makes the call before exec
        orphan = (functools.partial(guard.die_with_parent, signal.SIGTERM)
                  if threading.current_thread() is threading.main_thread()
                  and guard.available() else None)
        for dev in devices:
            folder = out_dir / plan.device(dev).dir
            with open(self.tmp / f"{dev}.log", "wb") as logf:
                self.procs[dev] = subprocess.Popen(
                    [sys.executable, "-m", "splitc.runtime.worker", str(folder),
                     "--bind", "tcp://127.0.0.1:*", "--announce", str(self.tmp / f"{dev}.ep"),
                     *(["--keys", str(keys)] if keys else [])],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                    preexec_fn=orphan)

    def endpoints(self, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        found: dict[str, str] = {}
        while len(found) < len(self.procs):
            for dev, proc in self.procs.items():
                if dev in found:
                    continue
                path = self.tmp / f"{dev}.ep"
                if path.exists():
                    found[dev] = path.read_text().strip()
                elif proc.poll() is not None:
                    raise WorkerLost(f"worker {dev} exited with status {proc.returncode} while "
                                     f"starting{self.tail(dev)}", device=dev)
            if len(found) < len(self.procs):
                if time.monotonic() > deadline:
                    late = [d for d in self.procs if d not in found]
                    raise RequestTimeout(f"worker(s) {', '.join(late)} did not start within "
                                         f"{timeout:.3g} s{self.tail(late[0])}", device=late[0])
                time.sleep(0.02)
        return found

    def tail(self, dev: str, lines: int = 15) -> str:
        try:
            text = (self.tmp / f"{dev}.log").read_text(errors="replace").strip()
        except OSError:
            return ""
        return ("; its output ends:\n" + "\n".join(text.splitlines()[-lines:])) if text else ""

    def stop(self, timeout: float = 5.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def connect(plan_or_out_dir: Plan | str | Path, endpoints: dict[str, str] | None = None, *,
            timeout: float = REQUEST_TIMEOUT, start_timeout: float = START_TIMEOUT,
            keys: str | Path | None = None, insecure: bool = False,
            retries: int = 0, failover_after: float = FAILOVER_AFTER) -> Session:
    """Open a session on the workers of a compiled plan.

    Parameters
    ----------
    plan_or_out_dir : Plan, or path
        The plan, or the folder ``splitc compile`` wrote (or its ``plan.json``).
    endpoints : dict, optional
        ``{device: "tcp://host:port"}`` of running workers (``splitc serve``), for every device
        that has pieces; workers connect to each other at these addresses too. Without it,
        one local worker process per device is started on 127.0.0.1 (needs the folder) and
        stopped by :meth:`Session.close`.
    timeout : float
        Seconds to wait for a request's outputs.
    start_timeout : float
        Seconds for the workers to start (local ones), answer a ping and set up the session.
    keys : path, optional
        A key folder from ``splitc keys`` holding ``client.key_secret`` and the devices'
        public keys: every connection is CurveZMQ-encrypted and authenticated. Required
        for endpoints off loopback unless ``insecure``. Local workers get the same folder
        (the one ``splitc keys`` wrote holds every device's secret key).
    insecure : bool
        Allow endpoints off loopback without keys (tensors cross the network in the clear).
    retries : int
        Default for :meth:`Session.infer`: how often a request failed by a lost worker or a
        timeout is sent again once the session is back.
    failover_after : float
        With fallback plans in the folder (``splitc compile --spares``): seconds a device of
        the plan in use stays down before every surviving worker is switched to the fallback
        plan for the devices that are down (requests in flight meanwhile are held and sent
        again); the main plan runs again as soon as they are back. Without fallbacks the
        session behaves as it always did: requests fail while a device is down.
    """
    if isinstance(plan_or_out_dir, Plan):
        plan, out_dir = plan_or_out_dir, None
    else:
        path = Path(plan_or_out_dir)
        plan = Plan.load(path)
        out_dir = path if path.is_dir() else path.parent
    active = [d.name for d in plan.devices if plan.pieces_on(d.name)]
    if retries < 0:
        raise BadInput("retries must be 0 or more")
    if not failover_after > 0:
        raise BadInput(f"failover_after must be more than 0 seconds, not {failover_after}")
    fallbacks = fallback.load(out_dir, plan) if out_dir is not None else []
    if keys is not None:
        security.Curve(keys, security.CLIENT)  # a bad folder is reported before anything starts
    local = None
    if endpoints is None:
        if out_dir is None:
            raise PlanError("give the workers' endpoints, or the output folder to start local "
                            "workers from")
        local = _LocalWorkers(out_dir, plan, active, keys)
        try:
            endpoints = local.endpoints(start_timeout)
        except BaseException:
            local.stop()
            raise
    else:
        unknown = sorted(set(endpoints) - {d.name for d in plan.devices})
        if unknown:
            raise PlanError(f"endpoints name devices the plan does not have: "
                            f"{', '.join(unknown)} (devices: "
                            f"{', '.join(d.name for d in plan.devices)})")
        missing = [d for d in active if d not in endpoints]
        if missing:
            raise PlanError(f"no endpoint for {', '.join(missing)} (give every device with "
                            f"pieces: {', '.join(active)})")
        endpoints = {d: endpoints[d] for d in active}
    try:
        session = Session(plan, endpoints, timeout=timeout, local=local, keys=keys,
                          insecure=insecure, retries=retries, fallbacks=fallbacks,
                          failover_after=failover_after)
    except BaseException:
        if local is not None:
            local.stop()
        raise
    try:
        session._open(start_timeout)
    except BaseException:
        session.close()
        raise
    return session


#: Requests and outputs :class:`Session` remembers for its timeline, and the exchanges it
#: times to set each worker's clock against its own.
TRACE_KEPT, CLOCK_SAMPLES = 100_000, 7


def _keep(store: OrderedDict, key, value) -> None:
    store[key] = value
    while len(store) > TRACE_KEPT:
        store.popitem(last=False)


def build_timeline(events: dict[str, list], offsets: dict[str, float],
                   history: dict[int, tuple[float, float | None]],
                   arrivals: dict[tuple[int, str], float]) -> Timeline:
    """The timeline of the requests in ``history`` from the workers' event logs (worker clock
    minus its offset is the client's clock), seconds from the first request's start."""
    rids = set(history)
    if not rids:
        return Timeline()
    base = min(history[r][0] for r in rids)
    tl = Timeline()
    received: dict[tuple, tuple[float, int]] = {}
    sends = []
    for dev, log_ in events.items():
        off = offsets[dev]
        computes = []
        for kind, rid, what, t0, t1, nbytes in log_:
            if rid not in rids:
                continue
            t0, t1 = t0 - off - base, t1 - off - base
            if kind == "c":
                computes.append((t0, t1, what, rid))
                tl.span(dev, "compute", what, t0, t1, rid)
            elif kind == "r":
                src, names = what.split("|", 1)
                received[(rid, src, dev, names)] = (t0, nbytes)
            elif kind == "s":
                dst, names = what.split("|", 1)
                sends.append((rid, dev, dst, names, t0, nbytes))
        computes.sort()
        for (_, end, _, _), (start, _, piece, rid) in zip(computes, computes[1:], strict=False):
            if start - end > 1e-6:
                tl.span(dev, "wait", f"waiting for the inputs of {piece}", end, start, rid)
    for rid, src, dst, names, t0, nbytes in sends:
        if dst == wire.CLIENT:
            end = max((arrivals.get((rid, n), t0 + base) for n in names.split(",")),
                      default=t0 + base) - base
        else:
            end = received.get((rid, src, dst, names), (None,))[0]
            if end is None:
                continue  # (its arrival fell out of the receiver's log)
        tl.message(names.replace(",", ", "), src, dst, t0, end, nbytes, rid)
    for (rid, src, dst, names), (t, nbytes) in received.items():
        if src == wire.CLIENT:
            start = history[rid][0] - base
            tl.message(names.replace(",", ", "), wire.CLIENT, dst, start, t, nbytes, rid)
    for rid in sorted(rids):
        started, finished = history[rid]
        if finished is not None:
            tl.span(wire.CLIENT, "requests", f"request {rid}", started - base, finished - base,
                    rid)
    return tl
