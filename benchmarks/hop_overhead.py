"""Per-hop overhead of the splitc wire on loopback, side by side with raw pyzmq.

Three ways to move a small tensor one hop and back, client and server in separate processes
on 127.0.0.1 (the server pinned nowhere; run on an idle machine):

* raw pyzmq: DEALER -> ROUTER echo of the tensor bytes as one frame (``send``/``recv``).
* splitc wire: the same bytes as a splitc ``tensors`` message (JSON header + frame), the
  echo server receiving with ``wire.recv`` (header checks, ``recv_into`` a pooled buffer)
  and answering with ``wire.send``, as a worker does.
* splitc worker: a real ``splitc.runtime.worker`` running a one-piece plan (``relu`` of the
  tensor) through ``Session.infer``: client -> worker -> client is two hops; the piece's own
  run time (from the worker's counters) is subtracted.

Per hop = round trip / 2. Usage::

    .venv/bin/python benchmarks/hop_overhead.py [--size 1024] [--iters 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from splitc.runtime import wire

ROOT = Path(__file__).resolve().parents[1]


def echo_server(mode: str, nbytes: int) -> None:
    """Serve echoes until killed; print the endpoint first."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(f"tcp://127.0.0.1:{port}", flush=True)
    spec = {"t": _Spec((nbytes // 4,), "float32")}
    pool = wire.BufferPool()
    while True:
        if mode == "raw":
            route, frame = sock.recv_multipart(copy=False)
            sock.send_multipart([route, frame], copy=False)
        else:
            msg = wire.recv(sock, route=True, specs=spec, alloc=pool.take)
            wire.send(sock, wire.header(wire.TENSORS, src="echo", rid=msg.rid), msg.arrays,
                      msg.names, route=msg.route)
            for a in msg.arrays:  # small: sent by copy, so the buffer is free again
                pool.give(a)


class _Spec:
    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype


class Echo:
    """A client of one echo server process (raw or wire); ``trip()`` is one round trip."""

    def __init__(self, mode: str, nbytes: int):
        self.mode = mode
        self.server = subprocess.Popen([sys.executable, __file__, "--serve", mode, "--size",
                                        str(nbytes)], stdout=subprocess.PIPE, text=True)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.connect(self.server.stdout.readline().strip())
        self.x = np.random.default_rng(0).standard_normal(nbytes // 4).astype("float32")
        self.spec = {"t": _Spec(self.x.shape, "float32")}
        self.out = np.empty_like(self.x)
        self.rid = 0

    def trip(self) -> None:
        if self.mode == "raw":
            self.sock.send(self.x, copy=False)
            self.sock.recv_into(self.out)
        else:
            self.rid += 1
            wire.send(self.sock, wire.header(wire.TENSORS, src="client", rid=self.rid),
                      [self.x], ["t"])
            wire.recv(self.sock, specs=self.spec, alloc=lambda s, d: self.out)

    def close(self) -> None:
        assert np.array_equal(self.out, self.x)
        self.ctx.destroy(linger=0)
        self.server.kill()
        self.server.wait()


class WorkerTrip:
    """``Session.infer`` through a real worker running a one-piece plan (relu)."""

    def __init__(self, nbytes: int, tmp: str):
        from tvm import relax

        from splitc.runtime.client import connect
        from tests.runtime_fixtures import write_out

        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((1, nbytes // 4), "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                y = bb.emit_output(relax.op.nn.relu(x), name_hint="y")
            bb.emit_func_output(y)
        write_out(Path(tmp) / "out", "pipeline", 1, mod=bb.get())
        self.x = np.random.default_rng(0).standard_normal((1, nbytes // 4)).astype("float32")
        self.session = connect(Path(tmp) / "out")
        self.before = self.session.worker_stats()["dev0"]

    def trip(self) -> None:
        self.session.infer(self.x)

    def piece_seconds(self) -> float:
        after = self.session.worker_stats()["dev0"]
        return (after["compute_s"] - self.before["compute_s"]) / (
            after["pieces_run"] - self.before["pieces_run"])

    def close(self) -> None:
        self.session.close()


def measure(paths: dict, iters: int, block: int = 250) -> dict[str, list[float]]:
    """Round-trip times per path, measured in interleaved blocks so that whatever else the
    machine is doing weighs on every path alike; a first block of each warms up."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for path in paths.values():
        for _ in range(block):
            path.trip()
    if "worker" in paths:
        paths["worker"].before = paths["worker"].session.worker_stats()["dev0"]
    for _ in range(max(1, iters // block)):
        for name, path in paths.items():
            for _ in range(block):
                t0 = time.perf_counter()
                path.trip()
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="tensor bytes (default 1024)")
    parser.add_argument("--iters", type=int, default=5000)
    parser.add_argument("--serve", choices=["raw", "wire"], help=argparse.SUPPRESS)
    parser.add_argument("--no-worker", action="store_true", help="skip the worker row")
    args = parser.parse_args()
    if args.serve:
        echo_server(args.serve, args.size)
        return
    print(f"# per-hop overhead on loopback (127.0.0.1), {args.size} B float32 tensor, "
          f"{args.iters} round trips each (interleaved blocks of 250), per hop = round "
          "trip / 2")
    print(f"# python {sys.version.split()[0]}, pyzmq {zmq.__version__}, libzmq "
          f"{zmq.zmq_version()}, {os.cpu_count()} CPUs")
    paths: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            paths["raw"] = Echo("raw", args.size)
            paths["wire"] = Echo("wire", args.size)
            if not args.no_worker:
                sys.path.insert(0, str(ROOT))
                try:
                    paths["worker"] = WorkerTrip(args.size, tmp)
                except ImportError as e:  # the compiler builds the one-piece plan
                    print(f"# (splitc worker row skipped: {e})")
            times = measure(paths, args.iters)
            piece = paths["worker"].piece_seconds() if "worker" in paths else 0.0
        finally:
            for path in paths.values():
                path.close()
    rows = {name: (np.array(t) - (piece if name == "worker" else 0.0)) / 2
            for name, t in times.items()}
    names = {"raw": "raw pyzmq echo", "wire": "splitc wire echo",
             "worker": "splitc worker (piece time removed)"}
    base = np.median(rows["raw"])
    print(f"{'path':38s} {'p50 µs/hop':>11s} {'p90':>8s} {'p99':>8s} {'vs raw':>7s}")
    for mode, t in rows.items():
        p50, p90, p99 = np.percentile(t, [50, 90, 99]) * 1e6
        print(f"{names[mode]:38s} {p50:11.1f} {p90:8.1f} {p99:8.1f} "
              f"{np.median(t) / base:6.2f}x")
    if "worker" in rows:
        print(f"# relu piece itself (worker counters): {piece * 1e6:.1f} µs per run, "
              "subtracted")
    over = (np.median(rows["wire"]) - base) * 1e6
    print(json.dumps({"raw_us": base * 1e6, "wire_us": float(np.median(rows["wire"])) * 1e6,
                      "wire_extra_us": over,
                      "worker_us": float(np.median(rows["worker"])) * 1e6
                      if "worker" in rows else None, "goal_us": 100}))


if __name__ == "__main__":
    main()
