"""Large tensors through a shaped link: the splitc wire vs raw pyzmq vs a plain TCP socket,
as a fraction of the link rate.

Needs root. Builds two network namespaces joined by one veth pair (10.214.X.1/30 and
10.214.X.2/30, X from the process id), shapes *both* ends with
``tc qdisc add dev eth0 root tbf rate RATE burst 32kbit latency 50ms`` (netem is not
available in this kernel: no delay or loss is added), runs a receiver in one namespace and a
sender in the other, and deletes everything afterwards.

Per tensor size, the sender sends one warm-up message, then ``--reps`` messages back to back
and waits for the receiver's per-message acknowledgement of the last one; goodput = tensor
bytes / elapsed time. The splitc row sends a ``tensors`` message (JSON header + raw frame,
``copy=False``), received with ``wire.recv`` into a pooled buffer with every header check, as
a worker receives a transfer. The raw pyzmq row sends the bare array (``copy=False``) and
receives a zero-copy frame. The TCP row is ``socket.sendall`` / ``recv_into``.

Usage::

    sudo .venv/bin/python benchmarks/link_throughput.py [--rate 100mbit] [--sizes 4,16,64]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import zmq

from splitc.runtime import wire

MIB = 1 << 20
PORT = 5600
MODES = {"splitc": "splitc wire (header + frame)", "raw": "raw pyzmq (one frame)",
         "tcp": "plain TCP socket"}


class _Spec:
    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype


def receiver(mode: str, host: str, size: int) -> None:
    """Receive messages of ``size`` bytes and acknowledge each; serve until killed."""
    n = size // 4
    if mode == "tcp":
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, PORT))
        srv.listen(1)
        print("ready", flush=True)
        conn, _ = srv.accept()
        buf = bytearray(size)
        view = memoryview(buf)
        while True:
            got = 0
            while got < size:
                k = conn.recv_into(view[got:], size - got)
                if not k:
                    return
                got += k
            conn.sendall(b"k")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(f"tcp://{host}:{PORT}")
    print("ready", flush=True)
    spec = {"t": _Spec((n,), "float32")}
    pool = wire.BufferPool()
    while True:
        if mode == "raw":
            route, _frame = sock.recv_multipart(copy=False)
        else:
            msg = wire.recv(sock, route=True, specs=spec, alloc=pool.take)
            route = msg.route
            pool.give(msg.arrays[0])
        sock.send_multipart([route, b"k"])


def sender(mode: str, host: str, size: int, reps: int) -> dict:
    x = np.random.default_rng(0).standard_normal(size // 4).astype("float32")
    if mode == "tcp":
        conn = socket.create_connection((host, PORT), timeout=120)
        data = memoryview(x).cast("B")

        def one() -> None:
            conn.sendall(data)

        def ack() -> None:
            assert conn.recv(1) == b"k"
    else:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVTIMEO, 600_000)
        sock.connect(f"tcp://{host}:{PORT}")
        head = wire.header(wire.TENSORS, src="dev0", rid=0)

        def one() -> None:
            if mode == "raw":
                sock.send(x, copy=False)
            else:
                wire.send(sock, head, [x], ["t"])

        def ack() -> None:
            assert sock.recv() == b"k"
    one()
    ack()  # warm-up: connection up, buffers allocated
    t0 = time.perf_counter()
    for _ in range(reps):
        one()
    for _ in range(reps):
        ack()
    elapsed = time.perf_counter() - t0
    return {"mode": mode, "size": size, "reps": reps, "seconds": elapsed,
            "bits_per_second": reps * size * 8 / elapsed}


def sh(*args: str, ns: str | None = None, check: bool = True) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode:
        raise SystemExit(f"{' '.join(cmd)}: {r.stderr.strip()}")


def parse_rate(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for u, f in units.items():
        if rate.lower().endswith(u):
            return float(rate[: -len(u)]) * f
    raise SystemExit(f"--rate {rate!r}: use e.g. 100mbit or 1gbit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="100mbit", help="tbf rate on each end (100mbit)")
    parser.add_argument("--sizes", default="4,16,64", help="tensor sizes in MiB (4,16,64)")
    parser.add_argument("--reps", type=int, default=2, help="messages per size (2)")
    parser.add_argument("--modes", default="splitc,raw,tcp")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--send", help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        receiver(args.serve, args.host, args.size)
        return
    if args.send:
        print(json.dumps(sender(args.send, args.host, args.size, args.reps)))
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root (it creates network namespaces)")
    rate = parse_rate(args.rate)
    tag = os.getpid() % 10000
    subnet = f"10.214.{os.getpid() % 250}"
    a, b = f"sclt{tag}a", f"sclt{tag}b"
    shape = f"tbf rate {args.rate} burst 32kbit latency 50ms"
    print(f"# link: veth pair between network namespaces {a} ({subnet}.1) and {b} "
          f"({subnet}.2), MTU 1500, both ends shaped with `tc qdisc add dev eth0 root "
          f"{shape}`; no delay or loss (netem is not available in this kernel)")
    print("# TCP over Ethernet MTU 1500 carries at most 1448 payload bytes per 1514-byte "
          "frame: 95.6% of the link rate is the ceiling")
    print(f"# python {sys.version.split()[0]}, pyzmq {zmq.__version__}, libzmq "
          f"{zmq.zmq_version()}; {args.reps} messages per size after one warm-up")
    made = []
    try:
        for ns in (a, b):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("ip", "link", "add", f"sclt{tag}x", "type", "veth", "peer", "name", f"sclt{tag}y")
        for name, ns, addr in ((f"sclt{tag}x", a, f"{subnet}.1"), (f"sclt{tag}y", b,
                                                                    f"{subnet}.2")):
            sh("ip", "link", "set", name, "netns", ns)
            sh("ip", "link", "set", name, "name", "eth0", ns=ns)
            sh("ip", "addr", "add", f"{addr}/30", "dev", "eth0", ns=ns)
            sh("ip", "link", "set", "eth0", "up", ns=ns)
            sh("tc", "qdisc", "add", "dev", "eth0", "root", *shape.split(), ns=ns)
        rows = []
        for size_mib in (int(s) for s in args.sizes.split(",")):
            size = size_mib * MIB
            for mode in args.modes.split(","):
                rows.append(run_pair(a, b, f"{subnet}.2", mode, size, args.reps))
                r = rows[-1]
                print(f"{size_mib:4d} MiB  {MODES[mode]:30s} {r['bits_per_second'] / 1e6:8.1f} "
                      f"Mbit/s  {r['bits_per_second'] / rate * 100:5.1f}% of {args.rate}",
                      flush=True)
        print(json.dumps({"rate_bits": rate, "rows": rows}))
    finally:
        for ns in made:
            sh("ip", "netns", "del", ns, check=False)


def run_pair(a: str, b: str, host: str, mode: str, size: int, reps: int) -> dict:
    me = [sys.executable, os.path.abspath(__file__)]
    recv = subprocess.Popen(["ip", "netns", "exec", b, *me, "--serve", mode, "--host", host,
                             "--size", str(size)], stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout.readline().strip() == "ready"
        out = subprocess.run(["ip", "netns", "exec", a, *me, "--send", mode, "--host", host,
                              "--size", str(size), "--reps", str(reps)],
                             capture_output=True, text=True, timeout=900)
        if out.returncode:
            raise SystemExit(out.stderr)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        recv.kill()
        recv.wait()


if __name__ == "__main__":
    main()
