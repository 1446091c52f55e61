"""Emulated-cluster benchmark: N single-core devices, side by side in one run.

For one model and N devices it measures, in this order and on the same cores:

* ONNX Runtime on one core (the single-board tool a user already has);
* splitc on one device (default schedules, one worker);
* the plain channel-parallel split (all-gather after every layer), the best pipeline split,
  the spatial split, and ``--strategy auto``, each with one worker per device;
* ``auto`` again with the workers' pieces at normal scheduling priority instead of idle
  (``--compute-priority``: what letting tensors leave at once is worth);

and prints per row the measured latency (median of ``--requests`` sequential requests), the
throughput with N requests in flight, bytes between devices per inference, the speedup over
one device, the cost model's prediction and its error, and the ideal
(one device's compute, FLOPs and every weight read once, divided by N, plus the bytes that
must cross / bandwidth).

Devices are worker processes pinned to their own core (``taskset``) with one TVM thread;
where there are more cores than devices, the client (and ONNX Runtime) get a core of their
own. Links: with ``--netns`` (root), each worker runs in its own network namespace behind a
veth pair on a bridge, each veth shaped with ``tc tbf`` to ``--bandwidth``, and the client's
side of the bridge too (as a board's or a laptop's one Ethernet port would be). ``--delay D``
adds ``tc netem`` delay D/2 on both ends of every veth, so a message between two devices takes
D longer (one between the client and a device, D/2); kernels without netem (this VM's) refuse
it. The cost model is given the links as measured before the rows (:func:`measure_link`):
the bandwidth and the time per message of runtime messages through them (plus D), as a user
would write measured figures into a cluster file. The links carry jumbo frames (:data:`MTU`).
Without ``--netns`` the workers talk over loopback, unshaped, and the cost model is given
loopback figures. The header says which.

``--slowdown F`` (a whole number) makes the devices, and ONNX Runtime's row, compute F times
as long: boards slower than this machine meet the same links with a compute-to-network ratio
F times higher (a Raspberry Pi 4 core peaks at 12 GFLOP/s, about 1/14 of this one). Each
worker runs every piece F times (the runtime, its network I/O and the links keep their
speed), ONNX Runtime runs F times per request, and the profile's piece terms are scaled by F.
(A CFS quota on the workers' threads, used before, ran a thread 1 ms in every 10: every wait
for a tensor could cost a period, and one device ran 1.5x slower than the profile said.)
``--slowdown 1,2`` gives each device its own factor, a heterogeneous cluster: the cost model
is given each device's scaled table as that device's ``profile`` (as a cluster file would name
it), the one-device rows run on the first device at its factor, and the ideal divides one
device's compute by the devices' summed speed.

    sudo .venv/bin/python benchmarks/cluster.py --model resnet50 -n 2 --netns
    sudo .venv/bin/python benchmarks/cluster.py --model resnet50 -n 2 --netns --slowdown 10
    sudo .venv/bin/python benchmarks/cluster.py --model resnet50 -n 2 --netns --slowdown 1,2
    sudo .venv/bin/python benchmarks/cluster.py --model resnet50 -n 8 --netns --delay 0.5ms
    .venv/bin/python benchmarks/cluster.py --model resnet18 --tiny -n 2      # quick look
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before TVM starts its thread pool

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from common import interleaved, ort_latency, ort_runner  # noqa: E402

from splitc import frontend  # noqa: E402
from splitc.driver import compile_model  # noqa: E402
from splitc.passes.analysis import profile as profile_bindings  # noqa: E402
from splitc.planning.cluster import Cluster, ClusterDevice, Link, parse_rate, parse_time  # noqa: E402
from splitc.planning.cost import DeviceSpeed, estimate  # noqa: E402
from splitc.runtime.client import connect  # noqa: E402
from splitc.runtime.plan import Plan  # noqa: E402

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
NETNS_PREFIX = "splitcb"  # + the lab number: runs with different --lab can share a machine
SUBNET = "10.231"  # .(7 + lab).host


def sh(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed: {done.stderr.strip()}")


class Namespaces:
    """N test hosts: namespaces on a bridge, each link shaped with tbf. Removed on close."""

    def __init__(self, n: int, rate_bytes: float, delay: float = 0.0, lab: int = 0,
                 mtu: int = MTU):
        self.tag = f"{NETNS_PREFIX}{lab or ''}"
        self.subnet = f"{SUBNET}.{7 + lab}"
        self.n, self.names = n, [f"{self.tag}n{i}" for i in range(n)]
        rate = f"{int(rate_bytes * 8)}bit"
        self.cleanup()
        try:
            self._build(rate, delay, mtu)
        except SystemExit:
            self.cleanup()
            raise

    def _build(self, rate: str, delay: float, mtu: int) -> None:
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
                if delay:  # half on each end: device to device crosses two veths
                    sh(*prefix, "tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle",
                       "10:", "netem", "delay", f"{delay / 2 * 1e6:.0f}us", "limit", "100000")
        sh("ip", "link", "set", f"{self.tag}br", "mtu", str(mtu))  # the client's side (ports first)

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i]]

    def cleanup(self) -> None:
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{self.tag}br"], capture_output=True)


ECHO = r"""
import sys, numpy, zmq
from splitc.runtime import wire
ack = numpy.zeros(1, dtype="float32")
ctx = zmq.Context()
sock = ctx.socket(zmq.ROUTER)
sock.bind(sys.argv[1])
while True:
    msg = wire.recv(sock, route=True)
    wire.send(sock, wire.header(wire.TENSORS, src="echo", rid=msg.rid), [ack], ["ack"],
              route=msg.route)
"""


def measure_link(nets: Namespaces, port: int,
                 sizes=(4, 65_536, 131_072, 262_144, 524_288, 1_048_576),
                 rounds: int = 25) -> tuple[float, float]:
    """(bytes per second, seconds per message) of the emulated link: what the cost model
    should be told about these links (tbf passes slightly less than its rate and every
    message costs the stack and the runtime some time). Each is the median time of sending a
    tensor of each size through the runtime's wire format, from the client to a process in
    the first namespace, answered with a 4-byte one: the bandwidth from the slope over the
    sizes, the cost of a message half the round trip of a 4-byte one (the fit's intercept
    swung between 0 and 550 us from run to run)."""
    import zmq

    from splitc.runtime import wire

    endpoint = f"tcp://{nets.address(0)}:{port}"
    server = subprocess.Popen([*nets.prefix(0), sys.executable, "-c", ECHO, endpoint])
    ctx = zmq.Context()
    try:
        sock = wire.tune(ctx.socket(zmq.DEALER))
        sock.connect(endpoint)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        medians = []
        for size in sizes:
            x, times = np.zeros(size // 4, dtype="float32"), []
            for _ in range(rounds + 1):  # (the first warms up the connection)
                t = time.perf_counter()
                wire.send(sock, wire.header(wire.TENSORS, src="client", rid=0), [x], ["x"])
                wire.recv(sock)
                times.append(time.perf_counter() - t)
                # a fresh bucket each round, as between a plan's messages; spun, not slept:
                # a core that sleeps takes this VM ~0.2 ms to wake, which devices busy with
                # a request do not pay (with 5 ms sleeps the fit said 550 us per message
                # where back to back 4-byte round trips take 120 us)
                t = time.perf_counter() + 1e-3
                while time.perf_counter() < t:
                    pass
            medians.append(statistics.median(times[1:]))
        slope, _ = np.polyfit(np.array(sizes, dtype=float), np.array(medians), 1)
        return 1.0 / slope, medians[0] / 2
    finally:
        server.kill()
        ctx.destroy(linger=0)


def slowed(table: dict, k: float) -> dict:
    """A profile table for a device that runs every piece k times (k times slower at
    everything a piece does)."""
    return {**table, "flops_per_second": table["flops_per_second"] / k,
            **{key: table[key] * k for key in ("seconds_per_weight_byte", "seconds_per_byte",
                                               "call_overhead", "tile_seconds_per_flop")},
            "slowdown": k}


#: A worker whose pieces each run ``F`` times (``--slowdown F``): the board it emulates computes
#: F times slower; the runtime and the network keep their speed.
SLOW_WORKER = r"""
import sys
from splitc.runtime import worker
from splitc.runtime.artifact import DeviceArtifact
times = int(sys.argv.pop(1))
run = DeviceArtifact.run
def slow(self, piece, inputs):
    for _ in range(times - 1):
        run(self, piece, inputs)
    return run(self, piece, inputs)
DeviceArtifact.run = slow
sys.exit(worker.main(sys.argv[1:]))
"""


class Workers:
    """One worker per device, pinned to its own core, started from the plan's folders."""

    def __init__(self, out: Path, plan: Plan, nets: Namespaces | None, port0: int,
                 cores: list[int], keys: Path | None, priority: str = "idle",
                 slowdown: list[int] | None = None):
        self.procs, self.endpoints = [], {}
        for i, dev in enumerate(plan.devices):
            if not plan.pieces_on(dev.name):
                continue
            host = nets.address(i) if nets else "127.0.0.1"
            endpoint = f"tcp://{host}:{port0 + i}"
            core = cores[i % len(cores)]
            times = slowdown[i] if slowdown else 1
            cmd = [*(nets.prefix(i) if nets else []), "taskset", "-c", str(core), "env",
                   "TVM_NUM_THREADS=1", sys.executable,
                   *(["-c", SLOW_WORKER, str(times)] if times > 1 else
                     ["-m", "splitc.runtime.worker"]),
                   str(out / dev.dir), "--bind", endpoint, "--compute-priority", priority,
                   *(["--keys", str(keys / dev.name)] if keys else ["--insecure"])]
            self.procs.append(subprocess.Popen(cmd, stderr=subprocess.PIPE))
            self.endpoints[dev.name] = endpoint

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def measure(out: Path, x, reference, nets, port0, repeats, inflight, cores,
            keys: Path | None, priority: str = "idle", slowdown: list[int] | None = None
            ) -> dict:
    plan = Plan.load(out)
    workers = Workers(out, plan, nets, port0, cores, keys, priority, slowdown)
    try:
        with connect(out, workers.endpoints, start_timeout=120, timeout=600,
                     keys=keys / "client" if keys else None, insecure=True) as session:
            y = session.infer(*x)  # warm up, and check the answer
            err = max(float(np.abs(a - b).max() / (np.abs(b).max() or 1))
                      for a, b in zip(y, reference, strict=True))
            before = session.worker_stats()
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                session.infer(*x)
                times.append(time.perf_counter() - t)
            after = session.worker_stats()
            # the busiest device's time in its pieces per request (the rest of the latency
            # is waiting: for tensors, the network and the runtime)
            busy = max((after[d]["compute_s"] - before[d]["compute_s"]) / repeats
                       for d in after)
            t = time.perf_counter()
            n = max(repeats, 2 * inflight)
            list(session.infer_many([x] * n, inflight=inflight))
            throughput = n / (time.perf_counter() - t)
    finally:
        workers.close()
    return {"latency": statistics.median(times), "throughput": throughput, "rel_err": err,
            "bytes": plan.transfer_bytes, "busy": busy, "plan": plan}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--tiny", action="store_true", help="the zoo model's tiny variant")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("-n", "--devices", type=int, default=2)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--bandwidth", default="1Gbit")
    ap.add_argument("--netns", action="store_true", help="shape links in namespaces (root)")
    ap.add_argument("--lab", type=int, default=0,
                    help="namespace set number, so two runs can share a machine (0-9)")
    ap.add_argument("--delay", default="0ms",
                    help="added delay between two devices, e.g. 0.5ms (--netns, needs netem)")
    ap.add_argument("--curve", action="store_true",
                    help="encrypt every link with CurveZMQ (default: plaintext, --insecure)")
    ap.add_argument("--out", type=Path, default=None, help="keep artifacts and results here")
    ap.add_argument("--slowdown", default="1",
                    help="devices (and ONNX Runtime) compute F times as long, as boards "
                         "slower than this machine would (each piece runs F times); F1,F2,.. "
                         "one factor per device (ONNX Runtime takes the first)")
    args = ap.parse_args()

    n = args.devices
    shapes = None
    if args.image_size:
        shapes = {"input": (1, 3, args.image_size, args.image_size)}
    label = args.model + (" (tiny)" if args.tiny else "")
    work = args.out or Path(tempfile.mkdtemp(prefix="splitc-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    model = frontend.load(args.model, shapes, tiny=args.tiny)
    x = model.random_inputs()
    reference = model.reference(x)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < n:
        print(f"# warning: {n} devices on {len(cores)} cores: devices share cores")
    os.sched_setaffinity(0, {cores[0]})  # ONNX Runtime, the profile and the client: one core
    worker_cores = cores[1:n + 1] if len(cores) > n else cores
    delay = parse_time(args.delay)
    if delay and not args.netns:
        sys.exit("--delay needs --netns")

    from splitc.planning import profiler

    table = profiler.measure(args.model, "host", tiny=args.tiny, input_shapes=shapes, number=2)
    ort = ort_latency(model, x, args.requests)
    try:
        ks = [int(f) for f in args.slowdown.split(",")]
    except ValueError:
        ks = []
    if len(ks) == 1:
        ks *= n
    if len(ks) != n or min(ks) < 1:
        sys.exit(f"--slowdown takes one whole number >= 1, or {n} of them (one per device), "
                 f"not {args.slowdown!r}")
    k = ks[0]
    if k > 1:  # everything the (first) device computes takes k times longer
        run = ort_runner(model, x)
        ort = interleaved({"ort": lambda: [run() for _ in range(k)]}, 5)["ort"]
    tables = [slowed(table, f) if f > 1 else table for f in ks]
    speeds = [DeviceSpeed.from_profile(t, "profile (1 core)") for t in tables]
    speed = speeds[0]
    # the search reads the same tables (all their terms) from a cache of this run's own, or,
    # devices of different speeds, from the profile each device names
    os.environ["SPLITC_CACHE"] = str(work / "cache")
    profiler.save(tables[0])
    profiles = [None] * n
    if len(set(ks)) > 1:
        profiles = [profiler.save(t, work / "profiles" / f"dev{i}.json")
                    for i, t in enumerate(tables)]
    bandwidth = parse_rate(args.bandwidth) if args.netns else 2e9
    hop = 1e-4  # seconds per message; the runtime's per-hop goal, checked by hop_overhead.py
    costs = profile_bindings(model.mod)
    # one device's compute: the whole model's FLOPs and every weight read once
    one_device = (sum(r.flops for r in costs) / speed.flops_per_second
                  + sum(r.weight_bytes for r in costs) * speed.seconds_per_weight_byte)

    weights = table["seconds_per_weight_byte"]
    print(f"# cluster benchmark: {label}, input {list(x[0].shape)}, {n} devices x 1 core "
          f"(taskset, TVM_NUM_THREADS=1), splitc {table['flops_per_second'] / 1e9:.2f} "
          f"GFLOP/s per core" + (f" and weights at {1 / weights / 1e9:.1f} GB/s" if weights
                                 else "") + " (profiled)")
    if args.netns:
        print(f"# links: namespaces on a bridge, each veth and the client's side shaped with "
              f"tc tbf to {args.bandwidth} (burst {BURST}, MTU {MTU})"
              + (f", netem delay {delay / 2 * 1e3:g} ms per veth ({delay * 1e3:g} ms device to "
                 f"device)" if delay else ", no added delay"))
    else:
        print("# links: loopback (unshaped); cost model: 2 GB/s, 100 us/hop")
    print(f"# cores: client and ONNX Runtime on {cores[0]}, devices on {worker_cores}")
    if len(set(ks)) > 1:
        print(f"# devices compute {', '.join(f'dev{i} {f}x' for i, f in enumerate(ks))} as "
              f"long as this core (each piece runs that many times; ONNX Runtime {k} times "
              "per request); the cost model is given each device's profile scaled so")
    elif k > 1:
        print(f"# devices and ONNX Runtime compute {k} times as long (each piece, and ONNX "
              f"Runtime, runs {k} times per request; the runtime and the links keep their "
              f"speed), and the profile's piece terms are scaled by {k}")
    rows = []
    rows.append({"config": "ONNX Runtime, 1 core", "latency": ort, "throughput": 1 / ort,
                 "bytes": 0, "rel_err": 0.0, "predicted": None})
    keys = None
    if args.curve:
        from splitc.runtime import security

        keys = work / "keys"
        security.generate(keys, [f"dev{i}" for i in range(n)] + ["client"], force=True)
        print("# every link encrypted and authenticated with CurveZMQ")
    with ExitStack() as stack:
        nets, link = None, Link(bandwidth, hop)
        if args.netns:
            nets = Namespaces(n, bandwidth, delay, args.lab)
            stack.callback(nets.cleanup)
            rate, per_message = measure_link(nets, 5590)
            link = Link(rate, per_message + delay)
            print(f"# link measured with the runtime's messages: {rate * 8 / 1e6:,.0f} Mbit/s "
                  f"and {per_message * 1e6:.0f} us per message (tbf set to {args.bandwidth}); "
                  "the cost model is given these")
        cluster = Cluster(tuple(ClusterDevice(f"dev{i}", "host", 2**34,
                                              profile=profiles[i] and str(profiles[i]))
                                for i in range(n)), link)
        # the last row runs auto's folder again with the workers' pieces at normal priority:
        # what the runtime's idle-priority compute (tensors leave at once) is worth
        configs = [("splitc, 1 device", "pipeline", 1, "idle"),
                   ("channel-parallel", "channel", n, "idle"),
                   ("pipeline", "pipeline", n, "idle"), ("spatial", "spatial", n, "idle"),
                   ("auto", "auto", n, "idle"), ("auto, normal priority", "auto", n, "normal")]
        for i, (name, strategy, devices, priority) in enumerate(configs):
            out = work / f"{strategy}-{devices}"
            sub = Cluster(cluster.devices[:devices], link)
            if priority == "idle":  # (the normal-priority row reuses auto's folder)
                compile_model(args.model, out, strategy=strategy, cluster=sub, tiny=args.tiny,
                              input_shapes=shapes)
            r = measure(out, x, reference, nets, 5600 + 10 * i, args.requests, devices,
                        worker_cores, keys, priority, ks)
            plan = r.pop("plan")
            pred = estimate(plan, Cluster(sub.devices[:len(plan.devices)], link),
                            speeds[:len(plan.devices)])
            rows.append({"config": f"{name} ({plan.strategy}, {len(plan.devices)} dev)", **r,
                         "predicted": pred.latency,
                         "predicted_busy": max(pred.device_busy.values())})
    single = rows[1]["latency"]
    must_cross = sum(t.nbytes for t in x) + sum(r.nbytes for r in reference)
    # one device's compute (the first's) over the devices' summed speed
    ideal = one_device / sum(ks[0] / f for f in ks) + must_cross / bandwidth
    print(f"{'config':<40} {'latency ms':>10} {'req/s':>7} {'speedup':>7} {'bytes/inf':>12} "
          f"{'predicted':>9} {'pred err':>8} {'rel err':>8} {'busy ms':>8} {'pred busy':>9}")
    errors = []
    for r in rows:
        pred = r["predicted"]
        perr = "" if pred is None else f"{(pred - r['latency']) / r['latency'] * 100:+.0f}%"
        if pred is not None:
            errors.append(abs(pred - r["latency"]) / r["latency"])
        busy = f"{r['busy'] * 1e3:.1f}" if "busy" in r else ""
        pbusy = f"{r['predicted_busy'] * 1e3:.1f}" if pred is not None else ""
        print(f"{r['config']:<40} {r['latency'] * 1e3:>10.1f} {r['throughput']:>7.2f} "
              f"{single / r['latency']:>6.2f}x {r['bytes']:>12,} "
              f"{'' if pred is None else f'{pred * 1e3:.1f}':>9} {perr:>8} "
              f"{r['rel_err']:>8.1e} {busy:>8} {pbusy:>9}")
    print("(busy: the busiest device's time inside its pieces per request, measured by the "
          "workers; the rest of the latency is waiting for tensors)")
    print(f"ideal on {n} devices: {ideal * 1e3:.1f} ms ({single / ideal:.2f}x); goal for auto: "
          f">= {0.8 * n:.1f}x over one device")
    print(f"cost model mean abs error: {np.mean(errors) * 100:.1f}% over {len(errors)} rows "
          "(goal <= 15%)")
    (work / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    write_svg(rows, work / "results.svg", label, n)
    print(f"# results: {work / 'results.json'}, plot: {work / 'results.svg'}")
    return 0


def write_svg(rows, path: Path, label: str, n: int) -> None:
    """A horizontal bar chart of measured (and predicted) latency per configuration."""
    top = max(max(r["latency"], r["predicted"] or 0) for r in rows)
    bars = []
    for i, r in enumerate(rows):
        y = 40 + i * 34
        w = 500 * r["latency"] / top
        bars.append(f'<text x="10" y="{y + 15}" font-size="12">{r["config"]}</text>'
                    f'<rect x="290" y="{y}" width="{w:.1f}" height="14" fill="#3367d6"/>'
                    f'<text x="{295 + w:.1f}" y="{y + 12}" font-size="11">'
                    f'{r["latency"] * 1e3:.1f} ms</text>')
        if r["predicted"]:
            pw = 500 * r["predicted"] / top
            bars.append(f'<rect x="290" y="{y + 16}" width="{pw:.1f}" height="6" '
                        'fill="#f4b400"/>')
    height = 60 + len(rows) * 34
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="900" height="{height}" '
        f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>'
        f'<text x="10" y="22" font-size="14" font-weight="bold">{label}: latency on {n} '
        f'single-core devices (blue measured, yellow predicted)</text>{"".join(bars)}</svg>')


if __name__ == "__main__":
    sys.exit(main())
