"""Hostile-peer benchmark (issue 27): a worker's RSS before, during and after each flood, against
the bound it states (its RSS after warm-up + what the plan lets its peers make it hold + a
fixed margin; ``stats`` reports it).

Two workers of a two-device pipeline (``python -m splitc.runtime.worker``, default options:
pieces at idle priority, the byte account in its helper process), a client session on them,
and the floods, each against dev0 (the first stage) from this process over loopback:

* unfinished message: raw ZMTP 3.0 over a TCP socket (greeting, NULL handshake, READY as a
  DEALER), then 1 MB frames flagged MORE and never a last one, up to 1 GB, five times;
* 40 x 64: 40 DEALER connections queueing 64 messages of 1 MB each (they reconnect when reset
  and send what is left), for three seconds;
* empty frames: raw ZMTP, 64 MB of empty frames flagged MORE (libzmq keeps 64 bytes of
  memory for each 2 bytes on the wire);
* 3,000 connections: raw TCP connections opened and held.

Printed per flood: RSS before, peak (sampled every 2 ms) and after (one second later), the
bound, the connections the account reset, and whether a real request afterwards still gets
the exact answer. ``--cores 1`` pins the workers to one core (the attacker to another), where a
flood read at normal priority competes hardest with the idle-priority serving thread.

    .venv/bin/python benchmarks/hostile.py [--model resnet18] [--cores 1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import zmq
from common import cpu_name

from splitc import frontend
from splitc.driver import compile_model
from splitc.runtime import wire
from splitc.runtime.client import connect
from splitc.runtime.plan import Plan

FRAME = 1_000_000


class Board:
    def __init__(self, folder: Path, tmp: Path, cpus: set[int] | None):
        self.announce = tmp / f"{folder.name}.ep"
        self.announce.unlink(missing_ok=True)  # (from an earlier run with --out)
        self.log = open(tmp / f"{folder.name}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "splitc.runtime.worker", str(folder), "--bind",
             "tcp://127.0.0.1:*", "--announce", str(self.announce)],
            env={**os.environ, "TVM_USE_RUNTIME_LIB": "1", "TVM_NUM_THREADS": "1"},
            stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        deadline = time.monotonic() + 120
        while not self.announce.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {folder.name} did not start")
            time.sleep(0.05)
        self.endpoint = self.announce.read_text().strip()
        host, port = self.endpoint[len("tcp://"):].rsplit(":", 1)
        self.host, self.port = host, int(port)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Sampler:
    def __init__(self, pid: int):
        self.proc, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()

    def __enter__(self):
        def run():
            while not self.stop.is_set():
                self.peak = max(self.peak, self.proc.memory_info().rss)
                time.sleep(0.002)

        self.thread = threading.Thread(target=run)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def raw_peer(host: str, port: int) -> socket.socket:
    """ZMTP 3.0 over TCP: greeting, NULL handshake, READY as a DEALER."""
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0")
              + b"\0" * 32)
    got = b""
    while len(got) < 64 + 2:
        got += s.recv(4096)
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    s.sendall(bytes([0x04, len(ready)]) + ready)
    return s


def unfinished(b: Board) -> str:
    cut = []
    frame = bytes([0x03]) + struct.pack(">Q", FRAME) + b"\xab" * FRAME
    for _ in range(5):
        s, n = raw_peer(b.host, b.port), 0
        try:
            for n in range(1000):  # noqa: B007
                s.sendall(frame)
        except OSError:
            pass
        s.close()
        cut.append(n)
    return f"reset after {min(cut)}-{max(cut)} MB of 1,000"


def forty_by_64(b: Board) -> str:
    ctx, keep = zmq.Context(), []
    junk = np.full(FRAME, 7, np.uint8)
    head = json.dumps(wire.header(wire.TENSORS, src="dev1", session="x" * 32, rid=1, tensors=[
        {"name": "x", "dtype": "uint8", "shape": [FRAME]}])).encode()
    for _ in range(40):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(b.endpoint)
        for _ in range(64):
            s.send(head, zmq.SNDMORE)
            s.send(junk, copy=False)
        keep.append(s)
    time.sleep(3)
    ctx.destroy(linger=0)
    return "2.56 GB offered over 3 s"


def empty_frames(b: Board) -> str:
    s = raw_peer(b.host, b.port)
    chunk = b"\x01\x00" * (1 << 20)  # a million empty frames flagged MORE: 2 MB
    sent = 0
    try:
        for _ in range(32):
            s.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    s.close()
    return f"reset after {sent >> 20} MB of 64 ({sent // 2:,} frames)"


def connections(b: Board) -> str:
    held = []
    try:
        for _ in range(3000):
            held.append(socket.create_connection((b.host, b.port), timeout=5))
    except OSError as e:
        note = f"opened {len(held)} ({e})"
    else:
        note = "opened 3,000"
    time.sleep(1)
    kept = sum(1 for c in psutil.Process(b.proc.pid).net_connections("tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == b.port)
    for s in held:
        s.close()
    return f"{note}; the worker kept {kept}"


FLOODS = [("unfinished message (raw ZMTP, 1 MB frames, MORE)", unfinished),
          ("40 connections x 64 messages of 1 MB", forty_by_64),
          ("empty frames (raw ZMTP, MORE)", empty_frames),
          ("3,000 connections (raw TCP)", connections)]


def mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--cores", type=int, default=0,
                    help="pin the workers to this many cores (0: no pinning)")
    ap.add_argument("--out", type=Path, default=None, help="keep the artifacts here")
    args = ap.parse_args()

    work = args.out or Path(tempfile.mkdtemp(prefix="splitc-hostile-"))
    out = work / "out"
    if not (out / "plan.json").exists():
        compile_model(args.model, out, ["host", "host"], "pipeline", tiny=True)
    plan = Plan.load(out)
    model = frontend.load(args.model, tiny=True)
    x = model.random_inputs(seed=0)
    cpus = set(range(args.cores)) if args.cores else None
    if cpus:
        others = set(range(os.cpu_count() or 1)) - cpus
        if others:
            os.sched_setaffinity(0, others)
    boards = {d.name: Board(out / d.dir, work, cpus) for d in plan.devices}
    cpu = cpu_name()
    try:
        with connect(plan, {d: b.endpoint for d, b in boards.items()}, timeout=30) as session:
            want = session.infer(*x)
            mem = session.worker_stats()["dev0"]["memory"]
            print(f"# hostile-peer benchmark: {args.model} (tiny), pipeline over 2 workers on "
                  f"loopback, floods against dev0; {cpu}, {os.cpu_count()} cores"
                  + (f", workers pinned to {args.cores}" if cpus else ""))
            print(f"# dev0: pieces at idle priority, byte account in its {mem['guard']}; bound "
                  f"{mib(mem['bound'])} MiB = {mib(mem['baseline'])} MiB after warm-up + "
                  f"{mib(mem['bound'] - mem['baseline'] - (64 << 20))} MiB peers may make it "
                  "hold + 64 MiB margin")
            print()
            print("| flood | RSS before (MiB) | peak during | after 1 s | bound | peak/bound | "
                  "connections reset | exact answer after | what happened |")
            print("|---|---|---|---|---|---|---|---|---|")
            board = boards["dev0"]
            for name, flood in FLOODS:
                before = psutil.Process(board.proc.pid).memory_info().rss
                closed = session.worker_stats()["dev0"]["memory"]["closed"]
                with Sampler(board.proc.pid) as rss:
                    note = flood(board)
                    time.sleep(1)
                after = psutil.Process(board.proc.pid).memory_info().rss
                now = session.worker_stats()["dev0"]["memory"]
                reset = sum(now["closed"].values()) - sum(closed.values())
                y = session.infer(*x)
                exact = all(np.array_equal(a, b) for a, b in zip(y, want, strict=True))
                print(f"| {name} | {mib(before)} | {mib(rss.peak)} | {mib(after)} | "
                      f"{mib(mem['bound'])} | {rss.peak / mem['bound']:.2f} | {reset} | "
                      f"{'yes' if exact else 'NO'} | {note} |")
    finally:
        for b in boards.values():
            b.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
