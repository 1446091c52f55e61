"""A device lost for good: fallback plans over the survivors (``compile --spares``), the
client switching every worker to the plan for the devices that are down and back when they
return, no request lost or answered wrongly; what the compile writes and refuses."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

from splitc.driver import check_request, compile_imported
from splitc.errors import SplitcError
from splitc.planning.cluster import Cluster
from splitc.planning.cost import DeviceSpeed, device_memory
from splitc.planning.fallback import plan_fallbacks
from splitc.runtime import fallback, worker
from splitc.runtime.client import WorkerLost, connect
from splitc.runtime.plan import Plan, sha256_file

from .runtime_fixtures import HOST, random_inputs, two_in_two_out
from .test_faults import Board

pytestmark = pytest.mark.alone  # grace periods and heartbeats are timed: run one at a time

#: seconds a device stays down before the switch, in these tests
FAILOVER_S = 1.5


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """A three-device pipeline with a fallback plan for losing any one device."""
    path = tmp_path_factory.mktemp("fallback") / "pipeline3"
    compile_imported(two_in_two_out(), path, ["host"] * 3, "pipeline",
                     source={"model": "two_in_two_out"}, spares=1)
    return path


@pytest.fixture(scope="module")
def original():
    """The unsplit model, compiled once: inputs -> outputs."""
    vm = relax.VirtualMachine(tvm.compile(two_in_two_out(), HOST), tvm.cpu())

    def run(*inputs):
        y = vm["main"](*[tvm.runtime.tensor(x) for x in inputs])
        return [y[i].numpy() for i in range(len(y))]

    return run


def exact(got, want) -> bool:
    """Within float rounding of the original (what `run --check` accepts)."""
    return all(g.shape == w.shape and float(np.abs(g - w).max()) <= 1e-4 * float(np.abs(w).max())
               for g, w in zip(got, want, strict=True))


@pytest.fixture
def boards(out, tmp_path):
    started: list[Board] = []

    def start(device: str, *args: str, **kw) -> Board:
        board = Board(out / device, tmp_path, *args, env={"TVM_NUM_THREADS": "1"}, **kw)
        started.append(board)
        return board

    yield start
    for b in started:
        b.stop()


def event_time(session, text: str, after: float) -> float | None:
    return next((t for t, _, what in session.events if text in what and t >= after), None)


def test_a_device_lost_for_good_the_survivors_take_over_and_it_switches_back(
        out, boards, original, caplog):
    plan = Plan.load(out)
    b = {d.name: boards(d.name) for d in plan.devices}
    inputs = [random_inputs(plan, seed) for seed in range(20)]
    want = [original(*x) for x in inputs]
    caplog.set_level(logging.WARNING, logger="splitc.client")
    with connect(out, {d: w.endpoint for d, w in b.items()}, timeout=30,
                 failover_after=FAILOVER_S) as session:
        assert session.serving == "main" and session.active == ["dev0", "dev1", "dev2"]
        answers: dict[int, list] = {}
        pending: deque = deque()  # (rid, request index)
        killed_at, in_flight_at_kill = None, 0
        sent = 0
        while sent < 200 or pending:
            while sent < 200 and len(pending) < 4:
                pending.append((session.submit(*inputs[sent % 20]), sent))
                sent += 1
                if sent == 100 and killed_at is None:
                    os.killpg(b["dev1"].proc.pid, signal.SIGSTOP)  # (so they stay in flight)
                    while len(pending) < 4:
                        pending.append((session.submit(*inputs[sent % 20]), sent))
                        sent += 1
                    in_flight_at_kill = len(pending)
                    b["dev1"].kill()
                    killed_at = time.monotonic()
            rid, index = pending.popleft()
            answers[index] = session.result(rid)  # every one answered: none raises
        assert sorted(answers) == list(range(200))
        wrong = [i for i, y in answers.items() if not exact(y, want[i % 20])]
        assert not wrong, f"requests answered wrongly: {wrong}"
        assert in_flight_at_kill == 4
        # the switch: within failover_after + 1 s of the kill, said in the events and on stderr
        switched = event_time(session, "serving the fallback plan without dev1", killed_at)
        assert switched is not None, session.events
        assert switched - killed_at <= FAILOVER_S + 1.0, switched - killed_at
        assert switched - killed_at >= FAILOVER_S  # (not before the grace period)
        assert session.serving == "without dev1" and session.active == ["dev0", "dev2"]
        assert any("failover: dev1 down for" in r.getMessage() for r in caplog.records)
        stats = session.worker_stats()
        assert set(stats) == {"dev0", "dev2"} and all(s["pieces_run"] for s in stats.values())
        # dev1 comes back (restarted on its endpoint): the main plan runs again
        b["dev1"] = boards("dev1", bind=b["dev1"].endpoint)
        back, i = time.monotonic(), 0
        while event_time(session, "serving the main plan", back) is None:  # (while in use)
            assert time.monotonic() < back + 30, session.events
            assert exact(session.infer(*inputs[i % 20]), want[i % 20])
            i += 1
        assert any("dev1 back: switching from the fallback plan without dev1 to the main "
                   "plan" in r.getMessage() for r in caplog.records)
        ys = session.infer_many(inputs, inflight=4)
        assert all(exact(y, w) for y, w in zip(ys, want, strict=True))
        assert session.worker_stats()["dev1"]["pieces_run"] >= 20  # dev1 computes again


def test_a_restart_within_the_grace_period_does_not_switch(out, boards, original):
    plan = Plan.load(out)
    b = {d.name: boards(d.name, "--restart") for d in plan.devices}
    x = random_inputs(plan, 7)
    want = original(*x)
    with connect(out, {d: w.endpoint for d, w in b.items()}, timeout=30,
                 failover_after=20.0) as session:
        assert exact(session.infer(*x), want)
        pid = worker_pid(b["dev2"])
        os.kill(pid, signal.SIGSTOP)  # (so that they are still in flight when it dies)
        rids = [session.submit(*x) for _ in range(4)]
        os.kill(pid, signal.SIGKILL)  # the supervisor restarts it
        t0 = time.monotonic()
        assert all(exact(session.result(r), want) for r in rids)  # held, then sent again
        assert time.monotonic() - t0 < 20.0
        assert session.serving == "main"
        assert not any("failover" in what for _, _, what in session.events), session.events
        assert [what for _, d, what in session.events if d == "dev2"][0] == \
            "its connection dropped"


def worker_pid(board: Board) -> int:
    import psutil

    for proc in psutil.Process(board.proc.pid).children():
        cmd = proc.cmdline()
        if "splitc.runtime.worker" in cmd and "--restart" not in cmd:
            return proc.pid
    raise AssertionError("no serving process")


def test_two_devices_down_with_one_spare_fail_as_without_fallbacks(out, boards, original):
    plan = Plan.load(out)
    b = {d.name: boards(d.name) for d in plan.devices}
    x = random_inputs(plan, 3)
    with connect(out, {d: w.endpoint for d, w in b.items()}, timeout=30,
                 failover_after=0.5) as session:
        b["dev2"].kill()
        assert exact(session.infer(*x), original(*x))  # (held until the survivors take over)
        assert session.serving == "without dev2"
        b["dev0"].kill()  # no plan for losing two: requests fail, naming the device
        with pytest.raises(WorkerLost, match="worker dev0 at .* is gone"):
            for _ in range(50):
                session.infer(*x)
                time.sleep(0.05)


# -- the compile -----------------------------------------------------------------------------
def test_the_folder_holds_every_plan_each_file_once_and_says_what_they_cost(out):
    main = Plan.load(out)
    index = json.loads((out / fallback.INDEX).read_text())
    assert index["format"] == fallback.FORMAT and index["spares"] == 1
    assert index["main"] == main.digest()
    assert [(p["name"], p["devices"]) for p in index["plans"]] == [
        ("dev0", ["dev1", "dev2"]), ("dev1", ["dev0", "dev2"]), ("dev2", ["dev0", "dev1"])]
    assert index["compile_seconds"]["fallbacks"] > 0 and index["bytes"]["fallbacks"] > 0
    plans = fallback.load(out, main)
    assert [f.lost for f in plans] == [("dev0",), ("dev1",), ("dev2",)]
    for f in plans:
        for d in f.plan.devices:
            folder = out / d.dir
            # a board's folder holds each plan it is in, with files its hashes name
            assert Plan.load(folder / fallback.FOLDER / f.name / "plan.json") == f.plan
            assert sha256_file(folder / d.lib) == d.lib_sha256
            assert sha256_file(folder / d.weights) == d.weights_sha256
    for d in main.devices:
        assert sorted(fallback.device_plans(out / d.dir)) == [
            f.name for f in plans if d.name in f.active]

    def files(dev: str) -> dict[str, tuple[str, str]]:
        """``dev``'s (library, weights) in each fallback plan it takes part in."""
        return {f.name: next((x.lib, x.weights) for x in f.plan.devices if x.name == dev)
                for f in plans if dev in f.active}

    # dev0 leads both two-device pipelines with the main plan's first stage: no new file
    assert set(files("dev0").values()) == {("lib.so", "weights.npz")}
    # dev2 runs the second stage of both: one library and one weights file, stored once
    (lib, weights), = set(files("dev2").values())
    assert sorted(p.name for p in (out / "dev2").iterdir() if p.is_file()) == sorted(
        ["lib.so", "weights.npz", "plan.json", lib, weights])
    assert index["builds"]["reused"] >= 3  # (6 fallback devices, 2 distinct stages + dev1's)


def test_a_worker_serves_every_plan_in_its_folder_and_bounds_memory_for_all(out):
    main = Plan.load(out)
    w = worker.Worker(out / "dev0", "tcp://127.0.0.1:*")
    try:
        plans = [s.plan for s in w.served.values()]
        assert len(plans) == 3 and plans[0] == main  # main, without dev1, without dev2
        for p in plans:  # each role gets the most any plan lets it hold
            alone = worker.budgets(p, "dev0", curve=False)
            assert all(w.budget.roles[r] >= n for r, n in alone.roles.items())
            assert w.budget.held >= alone.held
    finally:
        w.close()


def test_a_single_plan_folder_has_no_fallbacks(tmp_path):
    out = tmp_path / "plain"
    compile_imported(two_in_two_out(), out, ["host"] * 2, "pipeline",
                     source={"model": "two_in_two_out"})
    assert not (out / fallback.INDEX).exists()
    assert fallback.load(out, Plan.load(out)) == []
    assert fallback.device_plans(out / "dev0") == {}


def test_a_loss_whose_plan_breaks_a_memory_cap_is_named(tmp_path):
    mod = two_in_two_out()
    plain = compile_imported(mod, tmp_path / "plain", ["host"] * 3, "pipeline",
                             source={"model": "m"})
    cap = max(device_memory(plain).values())  # the main plan fits exactly; two devices do not
    cluster = Cluster.from_dict({"devices": [{"name": "pi", "target": "host", "count": 3,
                                              "memory": cap}]})
    with pytest.raises(SplitcError, match=r"--spares 1: the cluster cannot survive .*losing "
                                          r"pi\d \(2 device\(s\) left\): the pipeline plan over "
                                          r"pi\d, pi\d exceeds memory: pi\d needs .* KiB, over "
                                          r"its .* KiB cap by"):
        compile_imported(mod, tmp_path / "capped", [], "pipeline", source={"model": "m"},
                         spares=1, cluster=cluster)
    assert not (tmp_path / "capped").exists()  # (refused before anything was built)


def test_auto_plans_each_loss_with_the_search_over_the_survivors():
    mod = two_in_two_out()
    cluster = Cluster.uniform(["host"] * 3)
    speeds = [DeviceSpeed(f, 1e-4, "stated") for f in (40e9, 10e9, 10e9)]
    found = plan_fallbacks(mod, cluster, [0, 1, 2], "auto", 2, speeds=speeds)
    assert [f.name for f in found] == ["dev0", "dev1", "dev2", "dev0+dev1", "dev0+dev2",
                                       "dev1+dev2"]
    for f in found:
        assert f.label.startswith("auto chose ")
        assert set(f.extracted.names) <= {"dev0", "dev1", "dev2"} - set(f.lost)


@pytest.mark.parametrize(("devices", "strategy", "spares", "words"), [
    (3, "pipeline", 3, "at most 2 can be lost"),
    (3, "branch", 1, "the branch strategy is approximate"),
    (2, "pipeline", -1, "give 0"),
])
def test_spares_that_cannot_be_given_are_refused_before_any_work(devices, strategy, spares,
                                                                  words):
    with pytest.raises(SplitcError, match=words):
        check_request(Cluster.uniform(["host"] * devices), strategy, spares)


def test_splitc_run_opens_on_the_survivors_when_a_board_is_dead_from_the_start(
        out, boards, original, tmp_path):
    plan = Plan.load(out)
    b = {d.name: boards(d.name) for d in plan.devices}
    b["dev1"].kill()  # (before the run: its board never answers)
    x = random_inputs(plan, 5)
    np.savez(tmp_path / "x.npz", **{e.name: a for e, a in zip(plan.inputs, x, strict=True)})
    endpoints = ",".join(f"{d}={w.endpoint}" for d, w in b.items())
    r = subprocess.run([sys.executable, "-m", "splitc.cli", "run", str(out), "--endpoints",
                        endpoints, "--input", str(tmp_path / "x.npz"), "--requests", "20",
                        "--output", str(tmp_path / "y.npy"), "--failover-after", "1",
                        "--timeout", "30"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dev1 did not answer within 1 s: opening on the fallback plan without dev1 " \
           "(dev0, dev2 serve)" in r.stderr
    assert "ran 2 pieces on 2 devices on dev0=" in r.stdout
    assert "(the fallback plan without dev1)" in r.stdout and "20 requests" in r.stdout
    assert exact([np.load(tmp_path / "y.npy")], original(*x)[:1])
    bad = subprocess.run([sys.executable, "-m", "splitc.cli", "run", str(out),
                          "--failover-after", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr


def test_the_cli_default_grace_period_is_the_clients():
    import inspect

    from splitc import cli_runtime
    from splitc.runtime.client import FAILOVER_AFTER

    assert inspect.signature(cli_runtime.run).parameters["failover_after"].default == \
        FAILOVER_AFTER
