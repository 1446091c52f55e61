"""The runtime across hosts: every worker in its own network namespace behind a shaped link.

The test builds its own little network (needs root; skipped otherwise)::

    root ns (client) ── veth ──┐
    ns d0 (worker dev0) ─ veth ─┤ bridge br0 in ns "sw" (a switch)
    ns d1 (worker dev1) ─ veth ─┤
    ns d2 (worker dev2) ─ veth ─┘

Addresses are 10.213.X.0/24 (X from the process id), only on interfaces this test creates.
Every link is shaped in both directions with ``tc qdisc ... tbf rate 100mbit burst 32kbit
latency 50ms`` (``netem`` is not available in this kernel, so there is no added delay or
loss; a dropped link is made with ``ip link set ... down``). The client runs here, in the root
namespace; workers reach each other through the switch. Everything is deleted afterwards.

Off loopback the runtime encrypts by default: the lab makes CurveZMQ keys for its hosts and the
client (``net.keys``), and workers start with them unless a test asks for ``secure=False``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from splitc import frontend
from splitc.driver import compile_imported
from splitc.frontend import zoo
from splitc.runtime import security, wire
from splitc.runtime.client import WorkerLost, connect
from splitc.runtime.local import LocalSession

from .helpers import one_per_row
from .runtime_fixtures import random_inputs, write_out
from .test_faults import Capture, found

pytestmark = [pytest.mark.netns, pytest.mark.alone]  # fixed namespace names; links timed

SHAPE = "tbf rate 100mbit burst 32kbit latency 50ms"
PORT = 5555


def sh(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()}")
    return result


class Lab:
    """Namespaces, a switch and shaped veth links; :meth:`close` removes all of it."""

    def __init__(self, n_hosts: int, keys: Path):
        self.keys = keys
        security.generate(keys, [f"dev{i}" for i in range(n_hosts)] + ["client"])
        tag = f"{os.getpid() % 10000}"
        self.subnet = f"10.213.{os.getpid() % 250}"
        self.switch = f"sc{tag}sw"
        self.hosts = [f"sc{tag}d{i}" for i in range(n_hosts)]
        self.client_if = f"sc{tag}c"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        routes = sh("ip", "-4", "route").stdout
        if f"{self.subnet}." in routes:
            pytest.skip(f"{self.subnet}.0/24 is in use on this machine")
        try:
            self._build()
        except Exception:
            self.close()
            raise

    def address(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    def _build(self) -> None:
        for ns in [self.switch, *self.hosts]:
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("ip", "link", "add", "br0", "type", "bridge", ns=self.switch)
        sh("ip", "link", "set", "br0", "up", ns=self.switch)
        # the client's link: this end stays in the root namespace
        self._link(self.client_if, None, "p-client", f"{self.subnet}.1/24")
        for i, ns in enumerate(self.hosts):
            self._link(f"sc{i}x{os.getpid() % 10000}", ns, f"p-d{i}",
                       f"{self.address(i)}/24")

    def _link(self, name: str, ns: str | None, port: str, cidr: str) -> None:
        """A veth from ``ns`` (None: the root namespace) to a switch port, shaped both ways."""
        sh("ip", "link", "add", name, "type", "veth", "peer", "name", port,
           "netns", self.switch)
        sh("ip", "link", "set", port, "master", "br0", ns=self.switch)
        sh("ip", "link", "set", port, "up", ns=self.switch)
        sh("tc", "qdisc", "add", "dev", port, "root", *SHAPE.split(), ns=self.switch)
        if ns is not None:
            sh("ip", "link", "set", name, "netns", ns)
            sh("ip", "link", "set", name, "name", "eth0", ns=ns)
            name = "eth0"
        sh("ip", "addr", "add", cidr, "dev", name, ns=ns)
        sh("ip", "link", "set", name, "up", ns=ns)
        sh("tc", "qdisc", "add", "dev", name, "root", *SHAPE.split(), ns=ns)

    def start_worker(self, i: int, folder: Path, tmp: Path, secure: bool = True) -> str:
        announce = tmp / f"host{i}.ep"
        endpoint = f"tcp://{self.address(i)}:{PORT}"
        security_args = ["--keys", str(self.keys / folder.name)] if secure else ["--insecure"]
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.hosts[i], "env", "TVM_USE_RUNTIME_LIB=1",
             sys.executable, "-m", "splitc.runtime.worker", str(folder), "--bind", endpoint,
             "--announce", str(announce), *security_args], stderr=subprocess.PIPE)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while not announce.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.02)
        return endpoint

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)  # takes its veth ends with it
        sh("ip", "link", "del", self.client_if, check=False)


def lab_or_skip(n_hosts: int, keys: Path) -> Lab:
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    probe = f"scprobe{os.getpid() % 10000}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"`ip netns add` fails here: {result.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    try:
        return Lab(n_hosts, keys)
    except RuntimeError as e:
        pytest.skip(f"cannot build the test network: {e}")


@pytest.fixture
def lab(tmp_path):
    made = []

    def make(n_hosts: int) -> Lab:
        made.append(lab_or_skip(n_hosts, tmp_path / f"keys{len(made)}"))
        return made[-1]

    yield make
    for lab_ in made:
        lab_.close()


@pytest.mark.parametrize("strategy", ["pipeline", "channel"])
def test_workers_in_namespaces_give_the_local_answer(lab, tmp_path, strategy):
    out = tmp_path / "out"
    plan = write_out(out, strategy, 3)
    net = lab(3)
    endpoints = {d.name: net.start_worker(i, out / d.dir, tmp_path)
                 for i, d in enumerate(plan.devices)}
    local = LocalSession(out)
    batches = [random_inputs(plan, seed) for seed in range(6)]
    capture = Capture(net.client_if)
    try:
        with connect(plan, endpoints, timeout=20, keys=net.keys / "client") as session:
            results = session.infer_many(batches, inflight=3)
            stats = session.worker_stats()
    finally:
        captured = capture.stop()
    # CurveZMQ: none of the inputs or outputs can be read on the client's link
    assert len(captured) > sum(x.nbytes for b in batches for x in b)
    assert found([a for b, r in zip(batches, results, strict=True) for a in [*b, *r]],
                 captured) == 0
    for x, got in zip(batches, results, strict=True):
        for y, w in zip(got, local.infer(*x)[0], strict=True):
            assert np.array_equal(y, w)
    sent = sum(v["bytes"] for s in stats.values() for d, v in s["sent"].items()
               if d != "client")
    assert sent == len(batches) * plan.transfer_bytes


def test_a_dropped_link_is_detected_within_two_seconds_and_recovers(lab, tmp_path):
    out = tmp_path / "out"
    plan = write_out(out, "pipeline", 2)
    net = lab(2)
    endpoints = {d.name: net.start_worker(i, out / d.dir, tmp_path, secure=False)
                 for i, d in enumerate(plan.devices)}
    x = random_inputs(plan)
    with connect(plan, endpoints, timeout=30, insecure=True) as session:
        want = session.infer(*x)
        sh("ip", "link", "set", "eth0", "down", ns=net.hosts[1])
        t0 = time.monotonic()
        with pytest.raises(WorkerLost, match=f"dev1 at {endpoints['dev1']} is gone") as err:
            session.infer(*x)  # its deadline is 30 s: the heartbeats tell first
        assert err.value.device == "dev1"
        assert time.monotonic() - t0 <= (wire.HEARTBEAT_IVL_MS + wire.HEARTBEAT_TIMEOUT_MS
                                         ) / 1e3 + 0.3
        sh("ip", "link", "set", "eth0", "up", ns=net.hosts[1])
        session.wait_ready(20)
        assert all(np.array_equal(a, b) for a, b in zip(session.infer(*x), want, strict=True))


def test_the_lab_is_cleaned_up(lab):
    net = lab(1)
    names = list(net.namespaces)
    net.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed.split() for n in names)
    assert net.client_if not in subprocess.run(["ip", "link"], capture_output=True,
                                               text=True).stdout


# the default run takes one strategy per model in turn; -m slow runs the rest
@pytest.mark.parametrize("name, strategy", one_per_row(zoo.names(),
                                                       ["pipeline", "channel", "spatial"]))
def test_zoo_models_across_namespaced_hosts_equal_onnxruntime(lab, tmp_path, name, strategy):
    """Every zoo model and exact strategy, one worker per test host behind a shaped link."""
    model = frontend.load(name, tiny=True)
    out = tmp_path / "out"
    plan = compile_imported(model.mod, out, ["host"] * 3, strategy,
                            source={"model": name, "tiny": True, "input_shapes": {}})
    net = lab(3)
    endpoints = {d.name: net.start_worker(i, out / d.dir, tmp_path)
                 for i, d in enumerate(plan.devices) if plan.pieces_on(d.name)}
    x = model.random_inputs(seed=1)
    with connect(plan, endpoints, timeout=60, keys=net.keys / "client") as session:
        got = session.infer(*x)
    for y, r in zip(got, model.reference(x), strict=True):
        assert np.abs(y - r).max() <= 1e-4 * np.abs(r).max()
