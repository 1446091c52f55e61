"""Fault benchmark: what the runtime does when a worker is killed, frozen, unplugged or
restarted in the middle of a stream of requests.

Two workers (``splitc serve --restart``, so a dead one comes back by itself), one client sending
requests with ``inflight`` in flight. For each fault kind, a fresh session streams requests for
a few seconds; the fault hits worker dev1 one second in and, where it has an end (a frozen
process thawed, a link plugged back in), ends ``--outage`` seconds later. Printed per fault:

* detect: seconds from the fault to the client marking dev1 down (goal <= 2 s);
* answered / failed with an error / lost requests (goal: 0 lost; every answer is checked
  against the unsplit model), and requests refused at once while dev1 was down;
* recover: seconds from the fault's end (the thaw, the link back up; for kill and restart the
  moment the client saw dev1 down) to the first answer to a request sent after it — for kill
  and restart that includes the supervisor starting a new worker;
* the same stream again with ``retries=2``: failed requests are sent again once dev1 is back.

Then the row "device lost for good" (``--rows lost`` runs it alone): three workers and a
pipeline compiled with ``--spares 1`` (a fallback plan for losing any one device). Two
seconds into a stream, dev1 and its supervisor are killed for good; the client switches the
survivors to the plan without dev1 after ``--failover-after`` seconds and sends the requests
in flight again. A few seconds later dev1 is started again and the client switches back.
Printed: the time from the kill to the first answer on the survivors (time to resume),
answered / failed / lost / wrong requests (goal: 0 failed, 0 lost, 0 wrong), the median
latency on three devices before, on the two survivors after, and on three again after the
switch back, the time from dev1's restart to the main plan running again, and what the
fallbacks cost at compile time (seconds, bytes on disk).

As root the workers run in network namespaces behind tbf-shaped veths with CurveZMQ on every
link, and the link fault is ``ip link set down`` (this kernel has no netem for ``loss 100%``;
a downed link drops every packet the same way). Without root: loopback, no link fault.

    sudo .venv/bin/python benchmarks/faults.py            # all four faults, then lost for good
    .venv/bin/python benchmarks/faults.py                 # loopback: kill, stop, restart, lost
    .venv/bin/python benchmarks/faults.py --rows lost     # only the device lost for good
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import psutil
from cluster import NETNS_PREFIX, Namespaces

from splitc import frontend
from splitc.driver import compile_model
from splitc.runtime import fallback, security
from splitc.runtime.client import RuntimeFailure, WorkerLost, connect
from splitc.runtime.plan import Plan

FAULTS = ["kill -9", "SIGSTOP", "link down", "restart"]


class Board:
    """``python -m splitc.runtime.worker FOLDER --restart`` (in a namespace when given)."""

    def __init__(self, folder: Path, endpoint: str, prefix: list[str], extra: list[str]):
        self.endpoint = endpoint
        self.proc = subprocess.Popen(
            [*prefix, "env", "TVM_USE_RUNTIME_LIB=1", "TVM_NUM_THREADS=1", sys.executable,
             "-m", "splitc.runtime.worker", str(folder), "--bind", endpoint, "--restart",
             *extra], stderr=subprocess.DEVNULL)

    def destroy(self) -> None:
        """Gone for good: the supervisor and the worker under it, killed at once."""
        procs = [psutil.Process(self.proc.pid)]
        procs += procs[0].children(recursive=True)
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()

    def worker(self) -> psutil.Process:
        """The serving process (the supervisor's child)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                cmd = p.cmdline()
                if "splitc.runtime.worker" in cmd and "--restart" not in cmd:
                    return p
            time.sleep(0.05)
        raise RuntimeError("no worker process under the supervisor")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def stream(session, x, want, fault, inject, heal, seconds: float, inflight: int,
           retries: int) -> dict:
    """Send requests for ``seconds``; ``inject()`` one second in, ``heal()`` (if any)
    ``fault['heal_at']`` seconds later, on timers (the client may be waiting meanwhile).
    Returns counts and times."""
    start = time.monotonic()
    at: dict[str, float] = {}

    def run(what, action):
        at[what] = time.monotonic()
        action()

    timers = [threading.Timer(1.0, run, ("injected", inject))]
    if heal:
        timers.append(threading.Timer(1.0 + fault["heal_at"], run, ("healed", heal)))
    for t in timers:
        t.start()
    pending: deque = deque()  # (rid, attempt, sent)
    answered = failed = refused = wrong = requests = 0
    first_answer_after = None
    errors: dict[str, int] = {}
    while True:
        now = time.monotonic()
        sending = now < start + seconds
        while sending and len(pending) < inflight:
            try:
                pending.append((session.submit(*x), 0, time.monotonic()))
                requests += 1
            except WorkerLost:
                refused += 1
                try:
                    session.wait_ready(0.05)
                except RuntimeFailure:
                    pass
                break
        if not pending:
            if sending:
                continue
            break
        rid, attempt, sent = pending.popleft()
        try:
            y = session.result(rid)
        except RuntimeFailure as first:
            err = first
            if attempt < retries:
                try:
                    session.wait_ready(20)
                    pending.appendleft((session.submit(*x), attempt + 1, time.monotonic()))
                    continue
                except RuntimeFailure as again:
                    err = again
            failed += 1
            errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
            continue
        ok = all(np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
                 for a, b in zip(y, want, strict=True))
        answered += ok
        wrong += not ok
        # recovered: the first answer to a request sent after the fault ended (the thaw, the
        # link back up) and after the client saw dev1 down
        seen = [t for t, dev, _ in session.events if dev == "dev1"]
        end = max(at.get("healed" if heal else "injected", np.inf), seen[0] if seen else np.inf)
        if first_answer_after is None and sent > end:
            first_answer_after = time.monotonic() - end
    for t in timers:
        t.join()
    injected = at["injected"]
    lost_events = [t for t, dev, _ in session.events if dev == "dev1" and t >= injected]
    return {"detect": (lost_events[0] - injected) if lost_events else None,
            "answered": answered, "wrong": wrong, "failed": failed, "refused": refused,
            "lost": requests - answered - wrong - failed - len(pending),
            "errors": errors, "recover": first_answer_after}


def lost_for_good(args, work: Path, root: bool) -> None:
    """The row "device lost for good" (module docstring)."""
    out = work / "out3"
    model = frontend.load(args.model, tiny=True)
    compile_model(args.model, out, ["host"] * 3, "pipeline", tiny=True, spares=1)
    index = fallback.read_index(out)
    plan = Plan.load(out)
    x = model.random_inputs(seed=0)
    want = model.reference(x)
    keys = work / "keys3"
    security.generate(keys, [*(d.name for d in plan.devices), "client"], force=True)
    nets = Namespaces(3, 125e6, lab=1) if root else None
    where = ("3 namespaces, 1 Gbit/s tbf links, CurveZMQ on" if nets else
             "loopback, CurveZMQ on")
    boards: dict[str, Board] = {}

    def start(i: int, dev: str) -> Board:
        host = nets.address(i) if nets else "127.0.0.1"
        return Board(out / dev, f"tcp://{host}:{5710 + i}", nets.prefix(i) if nets else [],
                     ["--keys", str(keys / dev)])

    try:
        for i, d in enumerate(plan.devices):
            boards[d.name] = start(i, d.name)
        endpoints = {d: b.endpoint for d, b in boards.items()}
        with connect(out, endpoints, timeout=30, start_timeout=60, keys=keys / "client",
                     failover_after=args.failover_after) as session:
            session.infer(*x)
            marks: dict[str, float] = {}
            done: list[tuple[float, float, bool]] = []  # (sent, answered, right)
            failed = sent = 0
            pending: deque = deque()
            start_t = time.monotonic()

            def event(text: str, after: float) -> float | None:
                return next((t for t, _, what in session.events
                             if what.startswith(text) and t >= after), None)

            while True:
                now = time.monotonic()
                if "killed" not in marks and now > start_t + 2.0:
                    boards["dev1"].destroy()
                    marks["killed"] = time.monotonic()
                if "killed" in marks and "fallback" not in marks:
                    t = event("serving the fallback plan", marks["killed"])
                    if t is not None:
                        marks["fallback"] = t
                if "fallback" in marks and "restarted" not in marks \
                        and now > marks["fallback"] + args.seconds:
                    boards["dev1"] = start(1, "dev1")
                    marks["restarted"] = time.monotonic()
                if "restarted" in marks and "main" not in marks:
                    t = event("serving the main plan", marks["restarted"])
                    if t is not None:
                        marks["main"] = t
                if "main" in marks and now > marks["main"] + args.seconds:
                    break
                assert now < start_t + 120, session.events
                while len(pending) < args.inflight:
                    pending.append((session.submit(*x), time.monotonic()))
                    sent += 1
                rid, t0 = pending.popleft()
                try:
                    y = session.result(rid)
                except RuntimeFailure:
                    failed += 1
                    continue
                right = all(np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
                            for a, b in zip(y, want, strict=True))
                done.append((t0, time.monotonic(), right))
            for rid, _ in pending:
                try:
                    session.result(rid)
                    done.append((0.0, 0.0, True))
                except RuntimeFailure:
                    failed += 1
            events = list(session.events)
    finally:
        for b in boards.values():
            b.stop()
        if nets is not None:
            nets.cleanup()

    def p50(lo: float, hi: float) -> float:
        return float(np.median([(b - a) * 1e3 for a, b, _ in done if lo <= a and b <= hi]))

    kill, fb, back, main_t = (marks["killed"], marks["fallback"], marks["restarted"],
                              marks["main"])
    lost_seen = next(t for t, dev, _ in events if dev == "dev1" and t >= kill)
    resumed = min(b for a, b, _ in done if b >= fb) - kill
    answered = sum(r for _, _, r in done)
    wrong = len(done) - answered
    seconds, size = index["compile_seconds"], index["bytes"]
    print(f"# device lost for good: {args.model} (tiny), pipeline over 3 workers ({where}), "
          f"compiled with --spares 1, {args.inflight} requests in flight, --failover-after "
          f"{args.failover_after:g} s; dev1 killed for good 2 s in, started again "
          f"{args.seconds:g} s after the switch")
    print()
    print("| fault | detect (s) | time to resume (s) | answered | failed with error | lost | "
          "wrong | p50 before, 3 devices (ms) | p50 after, 2 survivors (ms) | back: switch "
          "(s) | p50 after return (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| device lost for good | {lost_seen - kill:.2f} | {resumed:.2f} | {answered} | "
          f"{failed} | {sent - len(done) - failed} | {wrong} | {p50(start_t, kill):.2f} | "
          f"{p50(fb, back):.2f} | {main_t - back:.2f} | {p50(main_t, float('inf')):.2f} |")
    print()
    print(f"time to resume = kill -> first answer on the survivors: the grace period "
          f"({args.failover_after:g} s) + {resumed - args.failover_after:.2f} s (detection, "
          "setting the survivors up, the held requests sent again); back: switch = dev1 "
          "started again -> the main plan running (its start and warm-up included)")
    print(f"what the fallbacks cost: {len(index['plans'])} plans (one per lost device), "
          f"+{seconds['fallbacks']:.1f} s to compile (main plan {seconds['main']:.1f} s), "
          f"+{size['fallbacks'] / 2**20:.1f} MiB on disk (main plan "
          f"{size['main'] / 2**20:.1f} MiB); {index['builds']['reused']} of "
          f"{index['builds']['devices']} fallback devices reused a build")
    for t, dev, what in events:
        if dev == "*" and ("failover" in what or "back:" in what or what.startswith("serving")):
            print(f"  event at +{t - kill:.2f} s from the kill: {what}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--seconds", type=float, default=7.0, help="stream length per fault")
    ap.add_argument("--outage", type=float, default=3.0,
                    help="seconds a frozen worker or a downed link stays so")
    ap.add_argument("--inflight", type=int, default=2)
    ap.add_argument("--failover-after", type=float, default=2.0,
                    help="lost for good: the client's grace period before it switches")
    ap.add_argument("--rows", choices=("all", "faults", "lost"), default="all")
    ap.add_argument("--out", type=Path, default=None, help="keep the artifacts here")
    args = ap.parse_args()

    root = os.geteuid() == 0
    work = args.out or Path(tempfile.mkdtemp(prefix="splitc-faults-"))
    if args.rows in ("all", "faults"):
        faults(args, work, root)
    if args.rows in ("all", "lost"):
        if args.rows == "all":
            print()
        lost_for_good(args, work, root)
    return 0


def faults(args, work: Path, root: bool) -> None:
    """The table of the four faults (module docstring)."""
    out = work / "out"
    model = frontend.load(args.model, tiny=True)
    compile_model(args.model, out, ["host", "host"], "pipeline", tiny=True)
    plan = Plan.load(out)
    x = model.random_inputs(seed=0)
    want = model.reference(x)
    keys = work / "keys"
    security.generate(keys, ["dev0", "dev1", "client"], force=True)

    nets = Namespaces(2, 125e6) if root else None  # 1 Gbit/s links
    boards = {}
    try:
        for i, dev in enumerate(plan.devices):
            host = nets.address(i) if nets else "127.0.0.1"
            boards[dev.name] = Board(out / dev.dir, f"tcp://{host}:{5700 + i}",
                                     nets.prefix(i) if nets else [],
                                     ["--keys", str(keys / dev.name)])
        endpoints = {d: b.endpoint for d, b in boards.items()}
        where = ("2 namespaces, 1 Gbit/s tbf links, CurveZMQ on" if nets else
                 "loopback, CurveZMQ on")
        print(f"# fault benchmark: {args.model} (tiny), pipeline over 2 workers ({where}), "
              f"{args.inflight} requests in flight, {args.seconds:g} s per stream, fault at "
              f"1 s, outage {args.outage:g} s")

        def link(up: bool):
            inner = f"{NETNS_PREFIX}i1"  # dev1's end of its veth
            subprocess.run([*nets.prefix(1), "ip", "link", "set", inner,
                            "up" if up else "down"], check=True)

        state = {}

        def stop_worker():
            state["p"] = boards["dev1"].worker()
            state["p"].send_signal(signal.SIGSTOP)

        faults = {
            "kill -9": (lambda: boards["dev1"].worker().send_signal(signal.SIGKILL), None),
            "SIGSTOP": (stop_worker, lambda: state["p"].send_signal(signal.SIGCONT)),
            "link down": (lambda: link(False), lambda: link(True)),
            "restart": (lambda: boards["dev1"].worker().send_signal(signal.SIGTERM), None),
        }
        rows = []
        for name in FAULTS:
            if name == "link down" and nets is None:
                continue
            inject, heal = faults[name]
            for retries in (0, 2):
                with connect(out, endpoints, timeout=10, start_timeout=60,
                             keys=keys / "client") as session:
                    session.infer(*x)
                    r = stream(session, x, want, {"heal_at": args.outage}, inject, heal,
                               args.seconds, args.inflight, retries)
                    session.wait_ready(30)
                    r["after"] = bool(np.allclose(session.infer(*x)[0], want[0], rtol=1e-4,
                                                  atol=1e-5 * np.abs(want[0]).max()))
                rows.append((name, retries, r))
                time.sleep(0.5)

        def f(v):
            return "-" if v is None else f"{v:.2f}"

        print()
        print("| fault | retries | detect (s) | answered | failed with error | lost | wrong | "
              "refused while down | recover (s) | good answer after |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, retries, r in rows:
            errs = ", ".join(f"{k} {v}" for k, v in r["errors"].items())
            print(f"| {name} | {retries} | {f(r['detect'])} | {r['answered']} | {r['failed']}"
                  f"{f' ({errs})' if errs else ''} | {r['lost']} | {r['wrong']} | "
                  f"{r['refused']} | "
                  f"{f(r['recover'])} | {'yes' if r['after'] else 'NO'} |")
        print()
        print("lost = requests sent - answered - wrong - failed with an error: the stream "
              "waits for every request's outcome, bounded by its 10 s deadline.")
        worst = max((r["detect"] or 0) for _, _, r in rows)
        print(f"worst detection {worst:.2f} s (goal 2 s): "
              f"{'met' if worst <= 2.0 else 'MISSED'}")
    finally:
        for b in boards.values():
            b.stop()
        if nets is not None:
            nets.cleanup()


if __name__ == "__main__":
    sys.exit(main())
