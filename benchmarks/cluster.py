"""Emulated-cluster benchmark: N boards on this machine's two cores, side by side in one run.

For one model and N devices it measures ONNX Runtime on one device, splitc on one device, the
channel, pipeline, spatial and hybrid splits and ``--strategy auto``, each with one worker per
device, and prints per row: latency (median of ``--requests`` sequential requests), throughput
(N in flight), bytes between devices per inference, the largest weights a device holds, the
cost model's prediction and its error, the busiest device's time in its pieces and in
handling its messages, the rest of the latency (waiting for tensors and the network), the
runtime's own CPU time per inference, and the ideal (one device's compute / N + the bytes
that must cross / bandwidth); then, per row, the busiest device's pieces and message
handling each against the cost model's (which term is wrong). The cost model is given this
machine's profile (its tile term fitted on N-way tiles) and the runtime's cost per message,
per byte and per piece run measured on the model, each scaled by F; ``--trace DIR`` writes
every row's measured and predicted timelines.

**Devices: time dilation** (DieCast, NSDI 2008). A device of slowdown F runs each piece once
and releases the piece's outputs, and starts its next piece, only when F x the piece's CPU time
has passed since it started. That CPU time is the piece's own, alone: each emulated device
starts while the others wait and times each of its pieces on its own thread
(``time.thread_time``, warm, the least of five runs taken in rounds over its pieces, and
lowered by any served run that took less), as a board's core would run it with its
caches to itself; pieces that later run beside other devices on these two cores take longer
(shared caches), and each row prints by how much, but a board would not. N devices then need
about N/F cores, so at F=10 (a Raspberry Pi 4 core is 1/10 to 1/14 of these) eight devices
share two cores and stay honest while the machine is not saturated. The run checks that: a
piece whose real run took longer than F x its CPU time alone was starved (it waited for a core)
and made late; the table prints the late share per row, and a row with more than 5 % of its
dilated time late is marked VOID. The runtime's own work is dilated too where it runs on the
serving thread (receiving, converting and queueing tensors, sending: F x its CPU time, waited
out at the end of each turn of the worker's loop, message by message, as a board's thread
spends it before it takes the next one; that CPU time scaled, as the pieces' is by their
calibration, to what it would take alone, by the ratio of the device's pieces' CPU alone to
beside the other devices); ZeroMQ's I/O threads and the worker's memory guard (a helper
process woken by every message it takes in) are not: each row prints their
CPU time per inference and the most leaving it so flatters the latency ((F-1) x the busiest
device's).
``--emulation repeat`` is the method dilation replaced, kept as its cross-check (each device
pinned to its own core runs every piece F times; possible only with N <= cores): ``--validate``
runs every row both ways.

**Links**: with ``--netns`` (root) each worker runs in its own network namespace behind a veth
pair on a bridge, each veth (and the client's side) shaped with ``tc tbf`` to ``--bandwidth``
(this kernel has no netem). ``--delay D`` adds D one way, in user space: every message a worker
sends is held D after it is sent (a delay line in the worker's send path, flushed by its loop
and during dilated pieces), and the client waits D before sending a request. The header's link
table checks it: ping-pong of 4 B and 600 kB messages against size / rate + D + the runtime's
cost of a message. Without ``--netns`` the workers talk over loopback.

    sudo .venv/bin/python benchmarks/cluster.py --model resnet50 -n 8 --netns --slowdown 10 \\
        --delay 0.5ms
    sudo .venv/bin/python benchmarks/cluster.py --model resnet50 -n 2 --netns --slowdown 10 \\
        --delay 0.5ms --validate
    .venv/bin/python benchmarks/cluster.py --model resnet18 --tiny -n 4 --slowdown 10  # quick
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before TVM starts its thread pool

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from common import cpu_name, interleaved, keep_cores_awake, ort_runner, save_figure  # noqa: E402

from splitc import frontend, targets  # noqa: E402
from splitc.driver import compile_model, measure_runtime_cost  # noqa: E402
from splitc.passes.analysis import profile as profile_bindings  # noqa: E402
from splitc.planning import profiler  # noqa: E402
from splitc.planning.cluster import Cluster, ClusterDevice, Link, parse_rate, parse_time  # noqa: E402
from splitc.planning.cost import DeviceSpeed, estimate  # noqa: E402
from splitc.runtime import guard, wire  # noqa: E402
from splitc.runtime.client import connect  # noqa: E402
from splitc.runtime.plan import Plan  # noqa: E402
from splitc.runtime.trace import Timeline  # noqa: E402

#: tbf's bucket: what a link passes at once above its rate. 16 kB keeps messages near the line
#: rate (1 Gbit/s, 14 kB to 602 kB: 0.2 to 0.4 ms slower than size / rate, measured); the
#: 256 kB bucket used before passed a 300 kB message in 0.75 ms, 3x faster than 1 Gbit/s.
BURST = "16kb"
#: The links' MTU. tbf hands every packet over on a timer, and the veth and bridge path runs in
#: the sending core's softirq: at 1500 bytes a 157 kB message cost its sender 1.7 ms of CPU
#: (all of its time on the wire), stolen from the emulated device's compute, where a real NIC
#: moves packets by DMA. Jumbo frames (9000, which 1 Gbit/s switches carry) cut that to 0.3 ms
#: (measured with an idle-priority spinner on the sender's core).
MTU = 9000
#: Where a saved report's earlier runs begin (the same configuration, older code).
EARLIER = "# earlier runs of the same configuration (older code or emulation):"
NETNS_PREFIX = "splitcb"  # + the lab number: runs with different --lab can share a machine
SUBNET = "10.231"  # .(7 + lab).host


def sh(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed: {done.stderr.strip()}")


class Namespaces:
    """N test hosts: namespaces on a bridge, each link shaped with tbf. Removed on close."""

    def __init__(self, n: int, rate_bytes: float, lab: int = 0, mtu: int = MTU):
        self.tag = f"{NETNS_PREFIX}{lab or ''}"
        self.subnet = f"{SUBNET}.{7 + lab}"
        self.n, self.names = n, [f"{self.tag}n{i}" for i in range(n)]
        rate = f"{int(rate_bytes * 8)}bit"
        self.cleanup()
        try:
            self._build(rate, mtu)
        except SystemExit:
            self.cleanup()
            raise

    def _build(self, rate: str, mtu: int) -> None:
        sh("ip", "link", "add", f"{self.tag}br", "type", "bridge")
        sh("ip", "addr", "add", f"{self.subnet}.254/24", "dev", f"{self.tag}br")
        sh("ip", "link", "set", f"{self.tag}br", "up")
        # the client sends from this namespace through the bridge: its link is shaped too
        # (else it would feed N device links at once, N times the rate)
        sh("tc", "qdisc", "add", "dev", f"{self.tag}br", "root", "handle", "1:", "tbf", "rate",
           rate, "burst", BURST, "latency", "50ms")
        for i, ns in enumerate(self.names):
            outer, inner = f"{self.tag}o{i}", f"{self.tag}i{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", inner, "netns", ns)
            sh("ip", "link", "set", outer, "master", f"{self.tag}br")
            sh("ip", "link", "set", outer, "mtu", str(mtu), "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", inner, "mtu", str(mtu))
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.subnet}.{i + 1}/24",
               "dev", inner)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            for dev, prefix in ((outer, ()), (inner, ("ip", "netns", "exec", ns))):
                sh(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf",
                   "rate", rate, "burst", BURST, "latency", "50ms")
        sh("ip", "link", "set", f"{self.tag}br", "mtu", str(mtu))  # the client's side (ports first)

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i]]

    def cleanup(self) -> None:
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{self.tag}br"], capture_output=True)




def sh_quiet(*cmd: str) -> None:
    subprocess.run(cmd, capture_output=True)


#: How the emulation waits out a link delay or a dilation, in every process it runs (workers,
#: the echo, the client): asleep until ``HOLD_SPIN`` before the moment, then spinning. A
#: sleep alone woke 70-100 us late on a Zen 3 VM, once per hop at each end: a 4-byte round
#: trip with the 0.5 ms delay measured 38 % over size / rate + delay + the messages' cost.
HOLD_SPIN = 1.5e-4


def hold_until(t: float, spin: float = HOLD_SPIN) -> None:
    left = t - time.perf_counter()
    if left > spin:
        time.sleep(left - spin)
    while time.perf_counter() < t:
        pass


#: ``hold_until`` for the processes the emulation starts (they import only the runtime)
HOLD = f"import time\nHOLD_SPIN = {HOLD_SPIN}\n" + inspect.getsource(hold_until)

#: The emulated board: a worker whose pieces are time-dilated (or, ``repeat``, run F times)
#: and whose sends are held ``DELAY`` (the link's one-way delay), through the worker's
#: emulation hooks (``Worker.poll_ms`` / ``Worker.each_turn``); nothing else changes.
#: What holding the sends costs the serving thread itself (the loop's turns that only a held
#: send's timer woke, and the sleeps before them) is the emulation's, not the board's (its
#: kernel holds a delayed link's packets): it is counted apart and not dilated. The sends
#: are the board's wherever they run, in the loop or while a piece's dilation waits.
EMULATED_WORKER = HOLD + r'''
import collections, resource, sys, threading, time
import numpy
import zmq
from splitc.runtime import wire, worker
from splitc.runtime.artifact import DeviceArtifact

mode, F, DELAY = sys.argv.pop(1), float(sys.argv.pop(1)), float(sys.argv.pop(1))
EMU = {"pieces": 0, "piece_cpu_s": 0.0, "calibrated_s": 0.0, "dilated_s": 0.0, "late": 0,
       "late_s": 0.0, "delayed": 0, "runtime_cpu_s": 0.0, "repeats_cpu_s": 0.0,
       "delay_cpu_s": 0.0, "sends_in_waits_cpu_s": 0.0, "hold_cpu_s": 0.0,
       "runtime_alone_s": 0.0}
CALIBRATED = {}  # piece -> its thread CPU time run alone (warm), measured before serving
CALIBRATION_ROUNDS = 5
OUTBOX = collections.deque()  # (due, worker, arguments of Worker._send_outputs)
send_outputs = worker.Worker._send_outputs
# the serving thread's loop: a poll armed by a held send's timer, and the turn it woke
TIMER = {"thread": None, "armed": False, "turn": None, "sends": 0.0}
WAITING = [False]  # in a dilation's wait (no loop turn is running)


def flush():
    now = time.perf_counter()
    while OUTBOX and OUTBOX[0][0] <= now:
        _, w, args = OUTBOX.popleft()
        c = time.thread_time()
        send_outputs(w, *args)
        spent = time.thread_time() - c
        if WAITING[0]:
            EMU["sends_in_waits_cpu_s"] += spent
        elif TIMER["turn"] is not None:
            TIMER["sends"] += spent


def wait_until(t, spin=HOLD_SPIN):  # sleeping, but sending what falls due meanwhile
    WAITING[0] = True
    try:
        while True:
            flush()
            now = time.perf_counter()
            if now >= t:
                return
            c = time.thread_time()  # (the spin's CPU is the emulation's, not the board's)
            if OUTBOX and OUTBOX[0][0] < t:
                hold_until(OUTBOX[0][0])
            else:
                hold_until(t, spin)
            EMU["hold_cpu_s"] += time.thread_time() - c
    finally:
        WAITING[0] = False


poll = zmq.Poller.poll


def end_timer_turn(now):
    """A turn that only a held send's timer woke ends: its CPU but the sends is the delay's."""
    if TIMER["turn"] is not None:
        EMU["delay_cpu_s"] += now - TIMER["turn"] - TIMER["sends"]
        TIMER["turn"] = None


def timed_poll(self, timeout=None):
    """The serving loop's poll, telling the turns a held send's timer woke (no message came)
    from the rest; other threads' polls (the guard's) pass through."""
    if threading.get_ident() != TIMER["thread"]:
        return poll(self, timeout)
    c = time.thread_time()
    end_timer_turn(c)
    armed, TIMER["armed"] = TIMER["armed"], False
    events = poll(self, timeout)
    if armed and not events:
        now = time.thread_time()
        EMU["delay_cpu_s"] += now - c
        TIMER["turn"], TIMER["sends"] = now, 0.0
    return events


run = DeviceArtifact.run


def aligned_zeros(shape, dtype):
    out = wire.aligned_empty(tuple(shape), dtype)
    out[...] = 0
    return out


def calibrate(self):
    """Time each piece alone (this worker starts while the others wait): what this core takes
    for it with its caches to itself, as a board's core would have them. Its inputs lie in
    aligned buffers, as the worker's receive buffers do (a numpy array of 256 kB or more
    starts 16 bytes into its own mapping under the worker's malloc settings: TVM copied it
    into a fresh tensor on every call, and the page faults made ResNet-50's 8-way tiles
    time 20-40 % slower than the worker runs them). The least of CALIBRATION_ROUNDS runs,
    taken in rounds over all the pieces: a slow spell of this machine (the middle of three
    runs back to back, kept before, put whole devices 30-70 % over their own alone-time in
    another row of the same plan) must last the whole calibration to bias it."""
    warm_up(self)
    inputs = {piece.name: [aligned_zeros(self.plan.tensors[t].shape,
                                         self.plan.tensors[t].dtype) for t in piece.inputs]
              for piece in self.pieces}
    for _ in range(CALIBRATION_ROUNDS):
        for piece in self.pieces:
            c0 = time.thread_time()
            run(self.artifact, piece, inputs[piece.name])
            took = time.thread_time() - c0
            CALIBRATED[piece.name] = min(CALIBRATED.get(piece.name, took), took)


MARK = {"cpu": None, "delay": 0.0, "waits": 0.0, "owed": 0.0}
# MARK: this thread's CPU clock (and the delay's, and the waits' sends) when the runtime's
# work was last dilated; owed: dilation a late wake-up overshot (negative) or left over


def settle():
    """Dilate the serving thread's work since the last mark (messages taken in, converted,
    queued; sends that went out during waits), F x its CPU time as it would take alone, here:
    where a board's thread spends it, message by message, before it takes the next one
    (waited out only before the next piece, the dilation of every message that piece waited
    for fell after its last input, serialized behind the wait where a board overlaps it with
    waiting)."""
    now = time.thread_time()
    if MARK["cpu"] is None:
        MARK.update(cpu=now, delay=EMU["delay_cpu_s"], waits=EMU["sends_in_waits_cpu_s"])
        return
    end_timer_turn(now)
    handled = (now - MARK["cpu"] - (EMU["delay_cpu_s"] - MARK["delay"])
               + EMU["sends_in_waits_cpu_s"] - MARK["waits"])
    EMU["runtime_cpu_s"] += handled
    # as it would run alone: by the slowdown this device's own pieces show beside the other
    # devices (their CPU time / theirs calibrated alone), which the pieces' dilation leaves
    # out by calibrating them and the runtime's cannot (1.13-1.59 at N=8 and 16, and the
    # runtime measured 1.3-1.4x its price there)
    alone = handled * (EMU["calibrated_s"] / EMU["piece_cpu_s"] if EMU["piece_cpu_s"] else 1.0)
    EMU["runtime_alone_s"] += alone
    MARK["waits"] = EMU["sends_in_waits_cpu_s"]  # the sends in this wait count next time
    owed = MARK["owed"] + F * alone - handled
    if owed > 0:  # slept without the final spin (one per message would take the cores);
        w0 = time.perf_counter()  # a late wake-up is owed back by the next message
        wait_until(w0 + owed, spin=0.0)
        owed -= time.perf_counter() - w0
    MARK.update(cpu=time.thread_time(), delay=EMU["delay_cpu_s"], owed=max(owed, -1e-3))


def dilated(self, piece, inputs):
    settle()  # the handling before it (the message that made it ready)
    w0, c0 = time.perf_counter(), time.thread_time()
    out = run(self, piece, inputs)
    cpu = time.thread_time() - c0
    name = piece if isinstance(piece, str) else piece.name
    # alone, a piece takes at most the least it ever took: a run beside the other devices
    # under its calibration says the calibration was disturbed
    alone = CALIBRATED[name] = min(CALIBRATED.get(name, cpu), cpu)
    EMU["calibrated_s"] += alone
    due = w0 + F * alone
    late = time.perf_counter() - due
    if late > 0:  # the piece waited for a core: the emulated board was slower than F
        EMU["late"] += 1
        EMU["late_s"] += late
    wait_until(due)
    EMU["pieces"] += 1
    EMU["piece_cpu_s"] += cpu
    EMU["dilated_s"] += time.perf_counter() - w0
    MARK.update(cpu=time.thread_time(), delay=EMU["delay_cpu_s"])
    return out


def each_turn(self):
    if DELAY > 0:
        flush()
    if mode == "dilated":
        settle()


def repeated(self, piece, inputs):  # the method dilation replaced (a core per device)
    w0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(round(F) - 1):
        run(self, piece, inputs)
    out = run(self, piece, inputs)
    cpu = time.thread_time() - c0
    EMU["pieces"] += 1
    EMU["piece_cpu_s"] += cpu / round(F)
    EMU["repeats_cpu_s"] += cpu - cpu / round(F)  # (not the runtime's: the F-1 extra runs)
    EMU["dilated_s"] += time.perf_counter() - w0
    return out


def delayed(self, *args):
    OUTBOX.append((time.perf_counter() + DELAY, self, args))
    EMU["delayed"] += 1
    return True


def poll_ms(self):
    """The loop's wait: until the next held send falls due. ZeroMQ's poll counts whole
    milliseconds, so the last fraction of one is slept (a poll of 0 ms there spun the loop
    some 130 times per held send, and that CPU was dilated as message handling: 4x the
    runtime's measured cost per message); a message arriving meanwhile waits for it, under
    a millisecond."""
    if not OUTBOX:
        return 100
    TIMER["thread"], TIMER["armed"] = threading.get_ident(), True
    left = OUTBOX[0][0] - time.perf_counter()
    if left >= 1e-3:
        return min(100, int(left * 1e3))
    if left > 0:
        c = time.thread_time()
        hold_until(OUTBOX[0][0])
        if TIMER["turn"] is None:  # (in a timer's turn, the turn counts it)
            EMU["delay_cpu_s"] += time.thread_time() - c
    return 0


stats = worker.Worker.stats


def with_emulation(self):
    out = stats(self)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["emulation"] = {**EMU, "process_cpu_s": usage.ru_utime + usage.ru_stime,
                        "calibrated": dict(CALIBRATED)}
    return out


warm_up = worker.Worker.warm_up
DeviceArtifact.run = dilated if mode == "dilated" else repeated
if mode == "dilated":
    worker.Worker.warm_up = calibrate
worker.Worker.stats = with_emulation
worker.Worker.each_turn = each_turn
if DELAY > 0:
    worker.Worker._send_outputs = delayed
    worker.Worker.poll_ms = poll_ms
    zmq.Poller.poll = timed_poll
sys.exit(worker.main(sys.argv[1:]))
'''

ECHO = HOLD + r"""
import sys, time, numpy, zmq
from splitc.runtime import wire
delay = float(sys.argv[2])
ack = numpy.zeros(1, dtype="float32")
ctx = zmq.Context()
sock = ctx.socket(zmq.ROUTER)
sock.bind(sys.argv[1])
while True:
    msg = wire.recv(sock, route=True)
    hold_until(time.perf_counter() + delay)  # the echo's link delay, as a worker's
    wire.send(sock, wire.header(wire.TENSORS, src="echo", rid=msg.rid), [ack], ["ack"],
              route=msg.route)
"""


def ping_pong(prefix: list[str], cases, rounds: int = 40) -> list[float]:
    """Median round trip of each case (endpoint, size, delay): a message of that size through
    the runtime's wire format, from the client (here) to an echo in the first namespace
    answering with 4 bytes, both sides holding their sends ``delay`` as the emulated devices
    do (one echo per endpoint). The cases take turns round by round, so that each sees the
    machine as the others do (measured one after another, the 4-byte round trip with and
    without the delay came from different moments of a noisy VM: the table's 4-byte row
    read +13 to +28 % in three runs of one evening)."""
    import zmq

    delays = {endpoint: delay for endpoint, _, delay in cases}
    servers = [subprocess.Popen([*prefix, sys.executable, "-c", ECHO, endpoint, str(delay)])
               for endpoint, delay in delays.items()]
    ctx = zmq.Context()
    try:
        socks = {}
        for endpoint in delays:
            sock = socks[endpoint] = wire.tune(ctx.socket(zmq.DEALER))
            sock.connect(endpoint)
            sock.setsockopt(zmq.RCVTIMEO, 10_000)
        payloads = [np.zeros(max(1, size // 4), dtype="float32") for _, size, _ in cases]
        times: list[list[float]] = [[] for _ in cases]
        for _ in range(rounds + 1):  # (the first warms up the connections)
            for (endpoint, _, delay), x, got in zip(cases, payloads, times, strict=True):
                t = time.perf_counter()
                hold_until(t + delay)
                wire.send(socks[endpoint], wire.header(wire.TENSORS, src="client", rid=0),
                          [x], ["x"])
                wire.recv(socks[endpoint])
                got.append(time.perf_counter() - t)
                t = time.perf_counter() + 1e-3  # a fresh tbf bucket, spun not slept
                while time.perf_counter() < t:
                    pass
        return [statistics.median(got[1:]) for got in times]
    finally:
        for server in servers:
            server.kill()
        ctx.destroy(linger=0)


def link_table(nets, rate: float, delay: float) -> tuple[Link, list[str]]:
    """The emulated link as the cost model is told it, and the table that checks it: the
    bandwidth fitted over message sizes, the cost of a message from a 4-byte round trip
    without the delay; then 4 B and 600 kB round trips with the delay against size / rate
    + delay each way + that cost (all measured turn about)."""
    host = nets.address(0) if nets else "127.0.0.1"
    prefix = nets.prefix(0) if nets else []
    sizes = (4, 131_072, 262_144, 524_288, 1_048_576)
    checked = (4, 600_000) if delay else ()
    got = ping_pong(prefix, [(f"tcp://{host}:5590", size, 0.0) for size in sizes]
                    + [(f"tcp://{host}:5591", size, delay) for size in checked])
    plain = got[:len(sizes)]
    slope = np.polyfit(np.array(sizes, float), np.array(plain), 1)[0]
    measured_rate = 1 / slope if nets else 2e9
    per_message = plain[0] / 2
    lines = [f"# link: {measured_rate * 8 / 1e6:,.0f} Mbit/s measured with the runtime's "
             f"messages (tbf {rate * 8 / 1e6:,.0f} Mbit/s), {per_message * 1e6:.0f} us per "
             "message (half a 4-byte round trip), + the delay"]
    for size, t in zip(checked, got[len(sizes):], strict=True):
        want = size / measured_rate + 4 / measured_rate + 2 * delay + 2 * per_message
        lines.append(f"#   ping-pong {size:>7,} B: {t * 1e3:7.3f} ms measured, "
                     f"{want * 1e3:7.3f} ms = size / rate + 2 x {delay * 1e3:g} ms + 2 "
                     f"messages' cost ({(t - want) / want * 100:+.1f} %)")
    return Link(measured_rate, per_message + delay), lines


def slowed(table: dict, k: float) -> dict:
    """A profile table for a device k times slower at everything a piece does."""
    return {**table, "flops_per_second": table["flops_per_second"] / k,
            **{key: table[key] * k for key in ("seconds_per_weight_byte", "seconds_per_byte",
                                               "call_overhead", "tile_seconds_per_flop",
                                               "channel_seconds_per_byte",
                                               "seconds_per_message",
                                               "runtime_seconds_per_byte",
                                               "runtime_seconds_per_piece")},
            **{key: [r * k for r in table.get(key, ())] for key in ("tile_rates",
                                                                     "channel_rates")},
            "slowdown": k}


class Workers:
    """One emulated board per device of a plan, started from its folders."""

    def __init__(self, out: Path, plan: Plan, nets, port0: int, mode: str, factors,
                 delay: float, cores: list[int] | None):
        self.procs, self.endpoints, self.devices = [], {}, []
        for i, dev in enumerate(plan.devices):
            if not plan.pieces_on(dev.name):
                continue
            host = nets.address(i) if nets else "127.0.0.1"
            endpoint = f"tcp://{host}:{port0 + i}"
            pin = ["taskset", "-c", str(cores[i % len(cores)])] if cores else []
            announce = out / f".{dev.name}.ready"
            announce.unlink(missing_ok=True)
            cmd = [*(nets.prefix(i) if nets else []), *pin, "env", "TVM_NUM_THREADS=1",
                   "TVM_USE_RUNTIME_LIB=1", sys.executable, "-c", EMULATED_WORKER, mode,
                   str(factors[i]), str(delay), str(out / dev.dir), "--bind", endpoint,
                   "--insecure", "--announce", str(announce)]
            # (a killed run leaves none behind; libc loaded here, before the fork)
            proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, preexec_fn=functools.partial(
                guard.die_with_parent, signal.SIGTERM) if guard.available() else None)
            self.procs.append(proc)
            self.endpoints[dev.name] = endpoint
            self.devices.append(dev.name)
            # one at a time: each calibrates its pieces alone before the next starts
            deadline = time.monotonic() + 600
            while not announce.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    sys.exit(f"the emulated {dev.name} did not start (status {proc.poll()})")
                time.sleep(0.05)

    def guard_cpu(self) -> dict[str, float]:
        """Each device's memory guard's CPU seconds so far: the worker's helper process
        (:mod:`splitc.runtime.guard`), woken by every message the worker takes in; a board
        runs it too, and it is not dilated."""
        return {dev: children_cpu(p.pid) for dev, p in zip(self.devices, self.procs,
                                                            strict=True)}

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def used(times) -> float:
    """A process's CPU seconds from its ``cpu_times()``."""
    return times.user + times.system


def children_cpu(pid: int) -> float:
    """The CPU seconds so far of a process's children (a worker's: its memory guard)."""
    try:
        return sum(used(child.cpu_times()) for child in psutil.Process(pid).children())
    except psutil.Error:  # (gone: its exit is reported by the session)
        return 0.0


def cpu_split(procs, guards: float, since: dict | None = None) -> dict:
    """Who used the machine's CPU: the emulated devices' processes, their memory guards' helper
    processes, this process (the client),
    the kernel's interrupt handling (the links' packets, shaped and bridged), the time the
    hypervisor gave this VM's cores to others (steal) and everything else; as the CPU seconds
    so far, or with ``since`` (an earlier call's), as each one's percent of all cores over the
    time between (the kernel counts in ticks of 10 ms: a row's five requests span 1-3 s).
    ``guards``: the guards' CPU seconds so far (:meth:`Workers.guard_cpu`, summed)."""
    devices = 0.0
    for p in procs:
        try:
            devices += used(psutil.Process(p.pid).cpu_times())
        except psutil.Error:  # (gone: its exit is reported by the session)
            pass
    machine = psutil.cpu_times()
    now = {"wall": time.perf_counter(), "devices": devices,
           "guards": guards,
           "client": used(psutil.Process().cpu_times()),
           "interrupts": machine.irq + machine.softirq,
           "steal": getattr(machine, "steal", 0.0),
           "all": sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
           - getattr(machine, "guest", 0.0) - getattr(machine, "guest_nice", 0.0)}
    if since is None:
        return now
    cores = psutil.cpu_count() * (now["wall"] - since["wall"]) / 100
    share = {k: (now[k] - since[k]) / cores
             for k in ("devices", "guards", "client", "interrupts", "steal", "all")}
    share["other"] = max(0.0, share.pop("all") - share["devices"] - share["guards"]
                         - share["client"] - share["interrupts"] - share["steal"])
    return share


def measure(out: Path, x, reference, nets, port0: int, repeats: int, inflight: int,
            mode: str, factors, delay: float, cores, trace: Path | None = None) -> dict:
    """One row: latency and throughput of the plan in ``out`` on emulated boards, with what
    the workers report (dilated busy time, the runtime's CPU, late pieces)."""
    plan = Plan.load(out)
    workers = Workers(out, plan, nets, port0, mode, factors, delay, cores)
    try:
        with connect(out, workers.endpoints, start_timeout=300, timeout=900,
                     insecure=True) as session:
            y = session.infer(*x)  # warm up, and check the answer
            err = max(float(np.abs(a - b).max() / (np.abs(b).max() or 1))
                      for a, b in zip(y, reference, strict=True))
            before = session.worker_stats()
            psutil.cpu_percent()
            guards0 = workers.guard_cpu()
            cpu0 = cpu_split(workers.procs, sum(guards0.values()))
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                hold_until(t + delay)  # the client's link delay
                session.infer(*x)
                times.append(time.perf_counter() - t)
            load = psutil.cpu_percent()
            guards1 = workers.guard_cpu()
            split = cpu_split(workers.procs, sum(guards1.values()), since=cpu0)
            guards = {d: (t - guards0[d]) / repeats for d, t in guards1.items()}
            after = session.worker_stats()
            if trace is not None:  # the measured timeline of the last requests
                session.timeline().write(trace, f"{out.name}, measured")
            t = time.perf_counter()
            n = max(repeats, 2 * inflight)
            list(session.infer_many([x] * n, inflight=inflight))
            throughput = n / (time.perf_counter() - t)
    finally:
        workers.close()

    def per_request(dev, key):
        return (after[dev]["emulation"][key] - before[dev]["emulation"][key]) / repeats

    # busy: a device's dilated time in its pieces and in handling messages between them (F x
    # the serving thread's CPU there), as the cost model's busy time counts both
    pieces = {d: per_request(d, "dilated_s") for d in after}
    handling = {d: factors[plan.device(d).index] * per_request(d, "runtime_alone_s")
                for d in after}  # (0 under ``repeat``: its runtime runs at this core's speed)
    busy = {d: pieces[d] + handling[d] for d in after}
    calibrated = sum(per_request(d, "calibrated_s") for d in after)
    shared = sum(per_request(d, "piece_cpu_s") for d in after) / max(calibrated, 1e-12)
    piece_cpu = {d: per_request(d, "piece_cpu_s") for d in after}
    # the runtime's CPU the dilation did not stretch: ZeroMQ's I/O threads, the serving
    # thread's work after a request's last piece, and the memory guard's helper process
    delay_cpu = {d: per_request(d, "delay_cpu_s") for d in after}  # the emulation's own,
    hold_cpu = {d: per_request(d, "hold_cpu_s") for d in after}  # and the dilations' spins
    runtime_cpu = {d: per_request(d, "process_cpu_s") - piece_cpu[d]
                   - per_request(d, "runtime_cpu_s") - per_request(d, "repeats_cpu_s")
                   - delay_cpu[d] - hold_cpu[d] + guards.get(d, 0.0) for d in after}
    late = sum(per_request(d, "late_s") for d in after)
    weights = max(sum(p.weight_bytes for p in plan.pieces_on(d.name)) for d in plan.devices)
    return {"latency": statistics.median(times), "throughput": throughput, "rel_err": err,
            "bytes": plan.transfer_bytes, "weights": weights, "busy": max(busy.values()),
            "busy_by_device": busy, "pieces_by_device": pieces,
            "handling_by_device": handling, "runtime_cpu": max(runtime_cpu.values()),
            "delay_cpu_by_device": delay_cpu, "hold_cpu_by_device": hold_cpu,
            "guard_cpu_by_device": guards,
            # what the dilation stretched: F x each piece's CPU time alone
            "alone_by_device": {d: factors[plan.device(d).index] * per_request(d, "calibrated_s")
                                for d in after},
            # and per piece (what the cost model is given to price the rest alone)
            "alone_by_piece": {name: factors[plan.device(d).index] * seconds for d in after
                               for name, seconds in after[d]["emulation"]["calibrated"].items()},
            "late_share": late / max(sum(busy.values()), 1e-9), "load": load,
            "load_split": split,
            # (two rows of one plan: auto's choice is often another row's plan, byte for byte)
            "plan_digest": hashlib.sha256((out / "plan.json").read_bytes()).hexdigest()[:16],
            "cpu_vs_alone": shared if mode == "dilated" else None, "plan": plan}


#: The rows: (key for --configs, label, strategy, devices: None for all N)
CONFIGS = [("one", "splitc, 1 device", "pipeline", 1), ("channel", "channel", "channel", None),
           ("pipeline", "pipeline", "pipeline", None), ("spatial", "spatial", "spatial", None),
           ("hybrid", "hybrid", "hybrid", None), ("auto", "auto", "auto", None)]


def parse_factors(text: str, n: int) -> list[float]:
    try:
        factors = [float(f) for f in text.split(",")]
    except ValueError:
        factors = []
    if len(factors) == 1:
        factors *= n
    if len(factors) != n or min(factors) < 1:
        sys.exit(f"--slowdown takes one factor >= 1, or {n} of them (one per device), "
                 f"not {text!r}")
    return factors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--tiny", action="store_true", help="the zoo model's tiny variant")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("-n", "--devices", type=int, default=2)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--bandwidth", default="1Gbit")
    ap.add_argument("--delay", default="0ms", help="one-way link delay, e.g. 0.5ms (user space)")
    ap.add_argument("--netns", action="store_true", help="shape links in namespaces (root)")
    ap.add_argument("--lab", type=int, default=0, help="namespace set number (0-9)")
    ap.add_argument("--slowdown", default="10",
                    help="devices compute F times as slowly as this machine (time-dilated); "
                         "F1,F2,... one per device")
    ap.add_argument("--emulation", choices=("dilated", "repeat"), default="dilated")
    ap.add_argument("--validate", action="store_true",
                    help="also run every row with --emulation repeat and compare (N <= cores)")
    ap.add_argument("--configs", default=",".join(c[0] for c in CONFIGS),
                    help="which rows, run in this order: " + ",".join(c[0] for c in CONFIGS))
    ap.add_argument("--out", type=Path, default=None, help="keep artifacts here")
    ap.add_argument("--save", type=Path, default=None,
                    help="write the report, JSON and plots here (benchmarks/results)")
    ap.add_argument("--trace", type=Path, default=None,
                    help="write each row's measured and predicted timelines (Chrome trace "
                         "format) into this folder")
    args = ap.parse_args()

    n = args.devices
    factors = parse_factors(args.slowdown, n)
    configs = [c.strip() for c in args.configs.split(",")]
    unknown = sorted(set(configs) - {c[0] for c in CONFIGS})
    if unknown or len(set(configs)) < len(configs):
        sys.exit(f"--configs takes each of {','.join(c[0] for c in CONFIGS)} at most once, "
                 f"not {args.configs!r}")
    awake = keep_cores_awake()  # (profiles, ONNX Runtime and every row alike)
    shapes = {"input": (1, 3, args.image_size, args.image_size)} if args.image_size else None
    work = args.out or Path(tempfile.mkdtemp(prefix="splitc-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    model = frontend.load(args.model, shapes, tiny=args.tiny)
    x = model.random_inputs()
    reference = model.reference(x)
    delay = parse_time(args.delay)
    rate = parse_rate(args.bandwidth)
    cores = sorted(os.sched_getaffinity(0))
    cpu = cpu_name()
    label = f"{args.model}{' (tiny)' if args.tiny else ''} {list(x[0].shape)}"
    out_lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        out_lines.append(line)

    # the tile term fitted on tiles of this N (a thin tile runs further below the rates)
    table = profiler.measure(args.model, "host", tiny=args.tiny, input_shapes=shapes, number=2,
                             tile_ways=n)
    # what a message costs the serving thread, on this model's messages
    table.update(measure_runtime_cost("host", model=args.model, tiny=args.tiny,
                                      input_shapes=shapes))
    tables = [slowed(table, f) for f in factors]
    speeds = [DeviceSpeed.from_profile(t, f"profile x {f:g}") for t, f in zip(tables, factors,
                                                                            strict=True)]
    profiles = [profiler.save(t, work / "profiles" / f"dev{i}.json")
                for i, t in enumerate(tables)]
    os.environ["SPLITC_CACHE"] = str(work / "cache")
    run_ort = ort_runner(model, x)
    ort = interleaved({"ort": run_ort}, 5)["ort"] * factors[0]
    costs = profile_bindings(model.mod)
    one_device = (sum(r.flops for r in costs) / speeds[0].flops_per_second
                  + sum(r.weight_bytes for r in costs) * speeds[0].seconds_per_weight_byte)

    say(f"# emulated cluster: {label}, {n} devices, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"CPU {cpu} (LLVM cpu {targets.host_cpu()}), {len(cores)} cores")
    say(f"# devices: {'time-dilated' if args.emulation == 'dilated' else 'repeated pieces'}, "
        f"slowdown {', '.join(f'{f:g}' for f in factors)}: each piece runs once and its "
        f"outputs leave when F x its thread CPU time has passed; {awake}"
        if args.emulation == "dilated" else f"# {awake}")
    say(f"# splitc on this core: {table['flops_per_second'] / 1e9:.2f} GFLOP/s (profiled), "
        f"the runtime {table['seconds_per_message'] * 1e6:.0f} us of CPU per message + "
        f"{table['runtime_seconds_per_byte'] * 1e12:.0f} ps per byte + "
        f"{table['runtime_seconds_per_piece'] * 1e6:.0f} us per piece run (measured); the cost "
        "model is given each device's profile scaled by its F")
    with ExitStack() as stack:
        nets = None
        if args.netns:
            nets = Namespaces(n, rate, args.lab)
            stack.callback(nets.cleanup)
            say(f"# links: namespaces on a bridge, each veth and the client's side shaped with "
                f"tc tbf to {args.bandwidth} (burst {BURST}, MTU {MTU}); one-way delay "
                f"{delay * 1e3:g} ms added in user space (each sender holds its messages)")
        else:
            say(f"# links: loopback, unshaped; one-way delay {delay * 1e3:g} ms in user space")
        link, lines = link_table(nets, rate, delay)
        for line in lines:
            say(line)
        bandwidth = link.bytes_per_second
        cluster = Cluster(tuple(ClusterDevice(f"dev{i}", "host", 2**34, profile=str(profiles[i]))
                                for i in range(n)), link)
        t0 = time.perf_counter()
        from splitc.planning.search import search

        result = search(model.mod, cluster, speeds, source=label)
        say(f"# auto's search: {time.perf_counter() - t0:.1f} s over {len(result.candidates)} "
            f"candidates; chose {result.best.label}")
        rows = [{"config": f"ONNX Runtime, 1 device (x {factors[0]:g})", "latency": ort,
                 "throughput": 1 / ort, "bytes": 0, "predicted": None}]
        by_key = {c[0]: c for c in CONFIGS}
        wanted = [by_key[c] for c in configs]  # (in the order given: rows run one by one)
        modes = [args.emulation] + (["repeat"] if args.validate else [])
        for i, (_, name, strategy, devices) in enumerate(wanted):
            devices = devices or n
            out = work / f"{strategy}-{devices}"
            sub = Cluster(cluster.devices[:devices], link)
            compile_model(args.model, out, strategy=strategy, cluster=sub, tiny=args.tiny,
                          input_shapes=shapes)
            for mode in modes:
                pin = cores if mode == "repeat" else None
                stem = args.trace / f"{strategy}-{devices}-{mode}" if args.trace else None
                if stem is not None:
                    args.trace.mkdir(parents=True, exist_ok=True)
                r = measure(out, x, reference, nets, 5600 + 20 * i + 10 * (mode != modes[0]),
                            args.requests, devices, mode, factors, delay, pin,
                            stem.with_suffix(".measured.json") if stem else None)
                plan = r.pop("plan")
                timeline = Timeline() if stem else None
                on = Cluster(sub.devices[:len(plan.devices)], link)
                pred = estimate(plan, on, speeds[:len(plan.devices)], timeline=timeline)
                # the same with each piece at F x its CPU time alone, as the dilation ran it:
                # what is left of the error is the messages' and the waits'
                alone = r.pop("alone_by_piece")
                given = estimate(plan, on, speeds[:len(plan.devices)], piece_seconds=alone) \
                    if mode == "dilated" else None
                # the same without the runtime's cost: its pieces alone
                quiet = estimate(plan, on, [dataclasses.replace(
                    s, seconds_per_message=0.0, runtime_seconds_per_byte=0.0,
                    runtime_seconds_per_piece=0.0)
                    for s in speeds[:len(plan.devices)]])
                if timeline is not None:
                    timeline.write(stem.with_suffix(".predicted.json"), f"{out.name}, predicted")
                rows.append({"config": f"{name} ({plan.strategy}, {len(plan.devices)} dev)"
                                       + ("" if mode == args.emulation else ", repeat"),
                             "mode": mode, **r, "predicted": pred.latency,
                             "predicted_given_pieces": given and given.latency,
                             "predicted_busy": pred.device_busy,
                             "predicted_weights": pred.device_weights,
                             "predicted_pieces": quiet.device_busy})
    report(rows, say, n, factors, one_device, sum(t.nbytes for t in x)
           + sum(t.nbytes for t in reference), bandwidth, args.validate)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        stem = (f"cluster-{args.model}{'-tiny' if args.tiny else ''}-"
                f"{x[0].shape[-1]}-n{n}-F{factors[0]:g}-{targets.host_cpu()}")
        report_file = args.save / f"{stem}.txt"
        text = "\n".join(out_lines) + "\n"
        if report_file.exists():  # every table kept: the earlier ones below, as comments
            earlier = [line if line.startswith("#") else f"# {line}"
                       for line in report_file.read_text().splitlines()
                       if not line.startswith(EARLIER)]
            text += f"\n{EARLIER}\n" + "\n".join(earlier) + "\n"
        report_file.write_text(text)
        (args.save / f"{stem}.json").write_text(json.dumps(rows, indent=1, default=str))
        plot(rows, args.save / stem, label, n, one_device)
        print(f"# wrote {args.save / stem}.txt, .json, .png, .svg")
    return 0




def report(rows, say, n, factors, one_device, must_cross, bandwidth, validate) -> None:
    single = next((r["latency"] for r in rows if r["config"].startswith("splitc, 1 device")
                   and r.get("mode", "") != "repeat"), None)  # (None: --configs without one)
    ideal = one_device / sum(factors[0] / f for f in factors) + must_cross / bandwidth
    say(f"{'config':<44} {'latency ms':>10} {'req/s':>6} {'speedup':>7} {'bytes/inf':>12} "
        f"{'weights MB':>10} {'predicted':>9} {'err':>5} {'busy ms':>8} {'wait ms':>8} "
        f"{'rt cpu ms':>9} {'late':>5} {'load':>5}")
    errors = []
    for r in rows:
        pred = r["predicted"]
        err = "" if pred is None else f"{(pred - r['latency']) / r['latency'] * 100:+.0f}%"
        if pred is not None and r.get("mode") != "repeat":
            errors.append(abs(pred - r["latency"]) / r["latency"])
        busy = r.get("busy")
        void = r.get("late_share", 0) > 0.05

        def num(value, fmt, measured=busy is not None):
            return format(value, fmt) if measured else ""

        say(f"{r['config']:<44} {r['latency'] * 1e3:>10.1f} {r['throughput']:>6.2f} "
            f"{'' if single is None else format(single / r['latency'], '6.2f') + 'x':>7} "
            f"{r['bytes']:>12,} "
            f"{r.get('weights', 0) / 1e6:>10.1f} "
            f"{'' if pred is None else format(pred * 1e3, '.1f'):>9} {err:>5} "
            f"{num((busy or 0) * 1e3, '.1f'):>8} "
            f"{num((r['latency'] - (busy or 0)) * 1e3, '.1f'):>8} "
            f"{num(r.get('runtime_cpu', 0) * 1e3, '.1f'):>9} "
            f"{num(r.get('late_share', 0) * 100, '.0f') + ('%' if busy else ''):>5} "
            f"{num(r.get('load', 0), '.0f') + ('%' if busy else ''):>5}"
            + ("  VOID (starved)" if void else ""))
    say("(busy: the busiest device's dilated time in its pieces and its message handling "
        "between them per request; wait: the rest "
        "of the latency; rt cpu: the busiest device's runtime CPU per request that was not "
        "dilated (ZeroMQ's I/O threads and the memory guard's helper process; the serving "
        "thread's message handling is dilated): leaving it so flatters a row by at most "
        "(F-1) x it; late: share of dilated time pieces ran late for want of a core; load: "
        "the machine's CPU use)")
    flat = max((r["runtime_cpu"] for r in rows if "runtime_cpu" in r), default=0.0)
    say(f"undilated runtime CPU flatters a row by at most {(factors[0] - 1) * flat * 1e3:.1f} ms")
    # what one device takes to read all the weights: a split's busiest device reads more than
    # 1/N of them where its pieces each read a whole layer's (a spatial split's tiles)
    whole = next((sum(r["predicted_weights"].values()) for r in rows
                  if r["config"].startswith("splitc, 1 device") and r.get("predicted_weights")),
                 None)
    for r in rows:
        if "busy_by_device" in r and r.get("mode") != "repeat":
            ratios = [r["busy_by_device"][d] / r["predicted_busy"][d]
                      for d in r["busy_by_device"] if r["predicted_busy"].get(d)]
            if ratios:
                d = max(r["busy_by_device"], key=r["busy_by_device"].get)
                pieces, predicted = r["pieces_by_device"][d], r["predicted_pieces"][d]
                alone = r["alone_by_device"][d]
                say(f"busy vs the isolated profile, {r['config']}: "
                    f"{min(ratios):.2f}-{max(ratios):.2f} (measured / predicted per device); "
                    f"busiest ({d}): pieces {pieces * 1e3:.1f} vs {predicted * 1e3:.1f} ms "
                    f"predicted (F x their CPU time alone: {alone * 1e3:.1f}; reading weights "
                    f"{r['predicted_weights'].get(d, 0.0) * 1e3:.1f} ms of the prediction"
                    + (f", one device all of them in {whole * 1e3:.1f}" if whole else "")
                    + "), "
                    f"message handling {r['handling_by_device'][d] * 1e3:.1f} vs "
                    f"{(r['predicted_busy'][d] - predicted) * 1e3:.1f} ms; "
                    f"pieces' CPU beside the other devices / alone: {r['cpu_vs_alone']:.2f}"
                    + (f"; holding its sends (the delay's loop turns, not dilated) "
                       f"{r['delay_cpu_by_device'][d] * 1e3:.2f} ms of CPU"
                       if r["delay_cpu_by_device"].get(d) else "")
                    + (f"; spinning out its dilations' last {HOLD_SPIN * 1e6:.0f} us (not "
                       f"dilated) {r['hold_cpu_by_device'][d] * 1e3:.2f} ms of CPU"
                       if r["hold_cpu_by_device"].get(d) else "")
                    + (f"; its memory guard (not dilated) "
                       f"{r['guard_cpu_by_device'][d] * 1e3:.2f} ms of CPU"
                       if r.get("guard_cpu_by_device", {}).get(d) else ""))
    split = [r for r in rows if r.get("load_split")]
    if split:
        say("who used the CPU during the timed requests, in % of all cores (devices: the "
            "emulated boards' processes; guards: their memory guards' helper processes; "
            "client: this benchmark's; interrupts: the kernel's, "
            "for the links' packets; steal: the hypervisor's, given to other machines; other: "
            "the rest of this machine):")
    for r in split:
        say(f"  {r['config']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["load_split"].items()))
    if validate:
        by = {}
        for r in rows:
            by.setdefault(r["config"].removesuffix(", repeat"), {})[r.get("mode")] = r
        for name, pair in by.items():
            if len(pair) == 2:
                a, b = pair["dilated"]["latency"], pair["repeat"]["latency"]
                say(f"dilated vs repeat, {name}: {a * 1e3:.1f} vs {b * 1e3:.1f} ms "
                    f"({(a - b) / b * 100:+.1f} %)")
    say(f"ideal on {n} devices: {ideal * 1e3:.1f} ms"
        + ("" if single is None else f" ({single / ideal:.2f}x)")
        + f"; goal for auto: >= {0.8 * n:.1f}x over one device")
    auto_verdict(rows, say)
    if errors:
        say(f"cost model mean abs error: {np.mean(errors) * 100:.1f} % over {len(errors)} rows "
            "(goal <= 15 %)")
    given = [(r["config"], r["predicted_given_pieces"], r["latency"]) for r in rows
             if r.get("predicted_given_pieces")]
    if given:
        say("cost model given each piece at F x its CPU time alone (the profile's prices "
            "replaced by the dilation's; the rest of the error is the messages' and the "
            "waits'): " + ", ".join(f"{c} {g * 1e3:.1f} ms ({(g - m) / m * 100:+.0f} %)"
                                    for c, g, m in given)
            + f"; mean abs error {np.mean([abs(g - m) / m for _, g, m in given]) * 100:.1f} %")


def auto_verdict(rows, say) -> None:
    """``auto`` against the other splitc rows of the run: the goal is the fastest of them or
    within 5 % of it. Where ``auto`` chose another row's plan (the same ``plan.json``), the
    two rows measured one plan twice, and their gap is this run's row-to-row spread."""
    measured = [r for r in rows if r.get("plan_digest") and r.get("mode") != "repeat"]
    auto = next((r for r in measured if r["config"].startswith("auto ")), None)
    others = [r for r in measured if r is not auto]
    if auto is None or not others:
        return
    best = min(others, key=lambda r: r["latency"])
    same = [r for r in others if r["plan_digest"] == auto["plan_digest"]]
    gap = (auto["latency"] - best["latency"]) / best["latency"]
    met = gap <= 0.05 or best in same
    say(f"auto vs the fastest other row ({best['config']}, {best['latency'] * 1e3:.1f} ms): "
        f"{auto['latency'] * 1e3:.1f} ms ({gap * 100:+.1f} %)"
        + "".join(f"; auto's plan is {r['config']}'s (the same plan.json), measured there "
                  f"{r['latency'] * 1e3:.1f} ms: one plan's two rows "
                  f"{abs(auto['latency'] - r['latency']) / r['latency'] * 100:.1f} % apart "
                  f"(this run's row-to-row spread)" for r in same)
        + f"; goal (the fastest row's plan, or within 5 % of it): {'met' if met else 'NOT met'}")


def plot(rows, stem: Path, label: str, n: int, one_device: float) -> None:
    """Measured and predicted latency per row, with the goal and the ideal (PNG and SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.get("mode") != "repeat"]
    names = [r["config"] for r in shown]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(shown) + 1.5))
    pos = np.arange(len(shown))
    ax.barh(pos - 0.2, [r["latency"] * 1e3 for r in shown], 0.4, label="measured")
    ax.barh(pos + 0.2, [(r["predicted"] or 0) * 1e3 for r in shown], 0.4, label="predicted")
    single = next((r["latency"] for r in shown
                   if r["config"].startswith("splitc, 1 device")), None)
    if single is not None:
        ax.axvline(single / (0.8 * n) * 1e3, color="green", linestyle="--",
                   label=f"goal: 0.8 x {n} over one device")
    ax.set_yticks(pos, names)
    ax.invert_yaxis()
    ax.set_xlabel("latency per request (ms)")
    ax.set_title(f"{label} on {n} emulated devices")
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, stem)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
