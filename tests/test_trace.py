"""Timelines in Chrome's Trace Event format: the cost model's predicted one (`splitc plan
--trace`) holds every piece and every transfer of the plan, in an order that can happen."""

import json
import subprocess
import sys

import pytest

from splitc import frontend
from splitc.planning.cluster import Cluster, ClusterDevice, Link
from splitc.planning.cost import device_speed
from splitc.planning.search import predicted_timeline, search


def check_against_plan(doc: dict, plan, slack_us: float = 1e-3) -> None:
    """Every piece a compute span on its device, every transfer a flow from its sender to its
    receiver, pieces starting after their inputs arrived, nothing running backwards (within
    ``slack_us``: how well the devices' clocks are known)."""
    events = doc["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events
             if e["ph"] == "M" and e["name"] == "process_name"}
    spans = [e for e in events if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    compute = {e["name"]: e for e in spans if e["cat"] == "compute"}
    assert set(compute) == {p.name for p in plan.pieces}
    for p in plan.pieces:
        assert names[compute[p.name]["pid"]] == p.device
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    assert set(starts) == set(ends)
    moved = {}
    for i, s in starts.items():
        f = ends[i]
        assert f["ts"] >= s["ts"] - slack_us, (s["name"], names[s["pid"]], names[f["pid"]])
        for tensor in s["name"].split(", "):
            moved[(tensor, names[s["pid"]], names[f["pid"]])] = f["ts"]
    for t in plan.transfers:
        assert (t.tensor, t.src, t.dst) in moved
    for p in plan.pieces:
        for t in p.inputs:
            arrived = [ts for (name, _, dst), ts in moved.items() if name == t and dst == p.device]
            assert all(compute[p.name]["ts"] >= ts - slack_us for ts in arrived), (
                p.name, t, compute[p.name]["ts"], arrived)


@pytest.fixture(scope="module")
def cluster():
    return Cluster(tuple(ClusterDevice(f"pi{i}", "host", 2**30, 0.2) for i in range(3)),
                   Link(1e9, 1e-4))


def test_the_predicted_timeline_holds_the_plan(cluster):
    mod = frontend.load("resnet18", tiny=True).mod
    speeds = [device_speed(d) for d in cluster.devices]
    result = search(mod, cluster, speeds)
    for c in sorted(result.candidates, key=lambda c: -len(c.plan.transfers))[:3]:
        doc = predicted_timeline(c, cluster, speeds).chrome(c.label)
        check_against_plan(json.loads(json.dumps(doc)), c.plan)


def test_splitc_plan_writes_it(cluster, tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text('[[devices]]\nname = "pi"\ntarget = "host"\ncount = 3\ngflops = 0.2\n'
                    '[network]\nbandwidth = "8Gbit"\nlatency = "0.1ms"\n')
    done = subprocess.run([sys.executable, "-m", "splitc.cli", "plan", "resnet18", "--tiny",
                           "--cluster", path, "--trace", tmp_path / "predicted.json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    doc = json.loads((tmp_path / "predicted.json").read_text())
    assert doc["otherData"]["title"].startswith("predicted: ")
    tracks = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert "client" in tracks and tracks & {"pi0", "pi1", "pi2"}


def test_splitc_run_writes_the_measured_timeline(tmp_path):
    """`splitc run --trace`: every piece and every transfer of every request, from the
    workers' logs on the client's clock."""

    def splitc(*args):
        done = subprocess.run([sys.executable, "-m", "splitc.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done

    out = tmp_path / "out"
    splitc("compile", "resnet18", "--tiny", "-o", out, "--devices", "host,host,host",
           "--strategy", "spatial")
    splitc("run", out, "--requests", "3", "--inflight", "2", "--trace", tmp_path / "run.json")
    doc = json.loads((tmp_path / "run.json").read_text())
    from splitc.runtime.plan import Plan

    plan = Plan.load(out)
    requests = {e["args"]["request"] for e in doc["traceEvents"] if e.get("cat") == "compute"}
    assert len(requests) == 3
    for rid in requests:  # each request's events alone, as one request of the plan
        ids = {i for i, e in enumerate(doc["traceEvents"]) if e["ph"] == "s"}
        keep = []
        for e in doc["traceEvents"]:
            if e["ph"] == "M" or e.get("args", {}).get("request") == rid:
                keep.append(e)
        flows = [e for e in doc["traceEvents"] if e["ph"] in ("s", "f")]
        sent = {(e["ts"], e["pid"]) for e in keep if e.get("cat") == "send"}
        own = {e["id"] for e in flows if e["ph"] == "s" and (e["ts"], e["pid"]) in sent}
        keep += [e for e in flows if e["id"] in own]
        assert ids  # (flows exist at all)
        # (each device's clock is known to half the quickest round trip to it)
        slack = 2e6 * max(doc["otherData"]["clock_uncertainty_s"].values())
        check_against_plan({"traceEvents": keep}, plan, slack)
    # the same compiled plan as the cost model sees it, to lay beside the measured one
    splitc("inspect", out, "--trace", tmp_path / "predicted.json")
    predicted = json.loads((tmp_path / "predicted.json").read_text())
    assert predicted["otherData"]["title"].startswith("predicted: spatial split")
    check_against_plan(predicted, plan)
