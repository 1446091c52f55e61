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


def check_against_plan(doc: dict, plan) -> None:
    """Every piece a compute span on its device, every transfer a flow from its sender to its
    receiver, pieces starting after their inputs arrived, nothing running backwards."""
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
        assert f["ts"] >= s["ts"]
        for tensor in s["name"].split(", "):
            moved[(tensor, names[s["pid"]], names[f["pid"]])] = f["ts"]
    for t in plan.transfers:
        assert (t.tensor, t.src, t.dst) in moved
    for p in plan.pieces:
        for t in p.inputs:
            arrived = [ts for (name, _, dst), ts in moved.items() if name == t and dst == p.device]
            assert all(compute[p.name]["ts"] >= ts - 1e-3 for ts in arrived)


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
