"""Faults and strangers: workers killed, frozen and restarted; every request in flight answered
or failed naming the device (none lost); sessions that recover by themselves; a worker holding
another compile refused by name; CurveZMQ keys that keep strangers out and tensors unreadable
on the wire; a flood that does not grow the worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zmq

from splitc.runtime import security, wire
from splitc.runtime.client import AuthFailure, WorkerLost, connect
from splitc.runtime.plan import Plan, PlanError, sha256_file

from .runtime_fixtures import random_inputs, reference, write_out

pytestmark = pytest.mark.alone  # heartbeats and timeouts are timed: run one at a time

ROOT = Path(__file__).resolve().parents[1]
#: libzmq heartbeats notice a silent peer within IVL + TIMEOUT; the issue's goal is 2 s.
DETECT_S = (wire.HEARTBEAT_IVL_MS + wire.HEARTBEAT_TIMEOUT_MS) / 1e3


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "pipeline2"
    write_out(path, "pipeline", 2)
    return path


def close_to(got, want) -> bool:
    return all(float(np.abs(g - w).max()) <= 1e-5 * float(np.abs(w).max())
               for g, w in zip(got, want, strict=True))


class Board:
    """``python -m splitc.runtime.worker FOLDER [--restart] ...`` as a board runs it."""

    def __init__(self, folder: Path, tmp: Path, *args: str, bind: str = "tcp://127.0.0.1:*",
                 env: dict[str, str] | None = None):
        self.announce = tmp / f"{folder.name}-{time.monotonic_ns()}.ep"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "splitc.runtime.worker", str(folder), "--bind", bind,
             "--announce", str(self.announce), *args],
            env={**os.environ, "TVM_USE_RUNTIME_LIB": "1", **(env or {})},
            stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 60
        while not self.announce.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode())
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.02)
        self.endpoint = self.announce.read_text().strip()

    def worker_pid(self) -> int:
        """The serving process: the supervisor's child with --restart, else the process (not
        the worker's own helper, ``splitc.runtime.guard``)."""
        for proc in [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children()]:
            cmd = proc.cmdline()
            if "splitc.runtime.worker" in cmd and "--restart" not in cmd:
                return proc.pid
        raise AssertionError("no serving process")

    def kill(self) -> None:
        """Gone for good: the worker and its helpers, at once."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            return None
        finally:
            try:  # (what is left of its group: helpers, a supervisor's child)
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


@pytest.fixture
def boards(out, tmp_path):
    started: list[Board] = []

    def start(*args: str, **kw) -> dict[str, Board]:
        plan = Plan.load(out)
        made = {d.name: Board(out / d.dir, tmp_path, *args, **kw) for d in plan.devices}
        started.extend(made.values())
        return made

    yield start
    for b in started:
        b.stop()


# -- liveness and recovery -------------------------------------------------------------------
def test_a_killed_worker_fails_requests_at_once_and_the_session_recovers(out, boards):
    plan = Plan.load(out)
    x = random_inputs(plan)
    want = reference(*x)
    b = boards("--restart")
    with connect(plan, {d: w.endpoint for d, w in b.items()}, timeout=30) as session:
        assert close_to(session.infer(*x), want)
        pid = b["dev1"].worker_pid()
        os.kill(pid, signal.SIGSTOP)  # (so that they are still in flight when it dies)
        rids = [session.submit(*x) for _ in range(6)]
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        outcomes = []
        for rid in rids:
            try:
                outcomes.append(close_to(session.result(rid), want))
            except WorkerLost as e:
                assert e.device == "dev1" and e.endpoint == b["dev1"].endpoint
                assert f"request {rid}: worker dev1 at {b['dev1'].endpoint} is gone" in str(e)
                outcomes.append("failed")
        assert time.monotonic() - t0 < DETECT_S + 0.5
        assert outcomes == ["failed"] * 6  # every one answered with an error, none lost
        with pytest.raises(WorkerLost, match=r"dev1 .* is gone.*\(down for .* reconnecting\)"):
            session.submit(*x)  # fails fast while it is down
        session.wait_ready(30)  # the supervisor restarted it; the session set up again
        assert close_to(session.infer(*x), want)
        assert [e[2] for e in session.events if e[1] == "dev1"][0] == "its connection dropped"
        # retries: killed again, the request is sent again once dev1 is back
        os.kill(b["dev1"].worker_pid(), signal.SIGKILL)
        assert close_to(session.infer(*x, retries=3), want)
        assert session.retried >= 1


def test_a_frozen_worker_is_detected_by_heartbeats_within_two_seconds(out, boards):
    plan = Plan.load(out)
    x = random_inputs(plan)
    b = boards()
    with connect(plan, {d: w.endpoint for d, w in b.items()}, timeout=60) as session:
        session.infer(*x)
        pid = b["dev0"].worker_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(WorkerLost, match=f"worker dev0 at {b['dev0'].endpoint} is gone: "
                                                  "its connection dropped"):
                session.infer(*x)  # the request deadline is 60 s: heartbeats tell first
            detected = time.monotonic() - t0
            assert detected <= 2.0, detected
        finally:
            os.kill(pid, signal.SIGCONT)
        session.wait_ready(20)  # thawed: it answers pings again and is set up afresh
        assert close_to(session.infer(*x), reference(*x))


def test_a_worker_that_comes_back_with_another_compile_stays_refused(out, boards, tmp_path):
    plan = Plan.load(out)
    x = random_inputs(plan)
    b = boards()
    with connect(plan, {d: w.endpoint for d, w in b.items()}, timeout=30) as session:
        session.infer(*x)
        port = b["dev1"].endpoint
        b["dev1"].stop()
        with pytest.raises(WorkerLost):
            session.infer(*x)
        other = tmp_path / "other"
        write_out(other, "pipeline", 2, mod=None)
        weights = other / "dev1" / "weights.npz"
        with np.load(weights) as w:
            arrays = {k: v + 1 for k, v in w.items()}
        np.savez(weights, **arrays)
        dev1 = Plan.load(other)
        devices = tuple(d if d.name != "dev1" else
                        type(d)(**{**d.__dict__, "weights_sha256": sha256_file(weights)})
                        for d in dev1.devices)
        Plan(**{**dev1.__dict__, "devices": devices}).save(other / "dev1" / "plan.json")
        back = Board(other / "dev1", tmp_path, bind=port)
        try:
            with pytest.raises(WorkerLost, match=r"dev1 came back, but device dev1 at .* holds "
                                                 r"another compile .*: its weights \w+…"):
                session.wait_ready(5)
        finally:
            back.stop()


# -- consistency -----------------------------------------------------------------------------
def test_connect_names_the_device_whose_weights_differ(out, tmp_path):
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    weights = mixed / "dev0" / "weights.npz"
    with np.load(weights) as w:
        np.savez(weights, **{k: v * 2 for k, v in w.items()})
    plan = Plan.load(mixed / "dev0")
    devices = tuple(type(d)(**{**d.__dict__, "weights_sha256": sha256_file(weights)})
                    if d.name == "dev0" else d for d in plan.devices)
    Plan(**{**plan.__dict__, "devices": devices}).save(mixed / "dev0" / "plan.json")
    with pytest.raises(PlanError, match=r"device dev0 at \S+ holds another compile .*: its "
                                        r"weights \w+… \(this plan's: \w+…\)\. Copy OUT/dev0"):
        connect(mixed, start_timeout=30)


# -- CurveZMQ --------------------------------------------------------------------------------
def cli(*args):
    return subprocess.run([sys.executable, "-m", "splitc.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_splitc_keys_writes_a_folder_per_device_and_refuses_to_overwrite(out, tmp_path):
    result = cli("keys", tmp_path / "k", "--plan", out)
    assert result.returncode == 0, result.stderr
    for name in ("dev0", "dev1", "client"):
        folder = tmp_path / "k" / name
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [f"{name}.key_secret", "dev0.key", "dev1.key", "client.key"])
        assert (folder / f"{name}.key_secret").stat().st_mode & 0o077 == 0
    again = cli("keys", tmp_path / "k", "--plan", out)
    assert again.returncode == 2 and "already holds keys" in again.stderr


def test_with_keys_only_the_right_client_gets_anything_run(out, tmp_path):
    plan = Plan.load(out)
    x = random_inputs(plan)
    keys, other = tmp_path / "keys", tmp_path / "other"
    security.generate(keys, ["dev0", "dev1", "client"])
    security.generate(other, ["dev0", "dev1", "client"])
    # a stranger: its own client key, the right public keys of the devices
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    for f in ("client.key_secret", "client.key"):
        (stranger / f).write_bytes((other / "client" / f).read_bytes())
    for f in ("dev0.key", "dev1.key"):
        (stranger / f).write_bytes((keys / "client" / f).read_bytes())
    b = {d.name: Board(out / d.dir, tmp_path, "--keys", str(keys / d.name))
         for d in plan.devices}
    try:
        endpoints = {d: w.endpoint for d, w in b.items()}
        with pytest.raises(AuthFailure, match=r"dev\d at \S+: it refused this client's key"):
            connect(plan, endpoints, keys=stranger, start_timeout=10)
        with pytest.raises(AuthFailure, match=r"dev\d at \S+: it closed the connection during "
                                              r"the CurveZMQ handshake"):
            connect(plan, endpoints, keys=other / "client", start_timeout=10)
        # (libzmq reports a mechanism mismatch, or just drops the connection: either way)
        with pytest.raises(AuthFailure, match="it probably requires CurveZMQ keys|one side uses "
                                              "CurveZMQ keys and the other does not"):
            connect(plan, endpoints, start_timeout=10)
        with connect(plan, endpoints, keys=keys / "client") as session:
            stats = session.worker_stats()
            assert all(s["pieces_run"] == 0 and s["recv"] == {} for s in stats.values())
            assert close_to(session.infer(*x), reference(*x))
    finally:
        for board in b.values():
            board.stop()


def test_off_loopback_needs_keys_or_insecure(out, tmp_path):
    bad = subprocess.run([sys.executable, "-m", "splitc.runtime.worker", str(out / "dev0"),
                          "--bind", "tcp://0.0.0.0:*"], capture_output=True, text=True,
                         env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"}, timeout=60)
    assert bad.returncode == 2
    assert "refusing to bind dev0 to tcp://0.0.0.0:* unencrypted" in bad.stderr
    with pytest.raises(PlanError, match=r"refusing to connect to tcp://10\.9\.9\.9:5555 "
                                        r"unencrypted.*--keys DIR.*--insecure"):
        connect(out, {"dev0": "tcp://127.0.0.1:9", "dev1": "tcp://10.9.9.9:5555"})
    assert security.is_loopback("tcp://127.0.0.1:5") and security.is_loopback("ipc:///x")
    assert security.is_loopback("tcp://[::1]:5") and not security.is_loopback("tcp://*:5")


class Capture:
    """Every packet on an interface while it runs (AF_PACKET; needs root)."""

    def __init__(self, interface: str = "lo"):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        self.sock.bind((interface, 0))
        self.sock.settimeout(0.1)
        self.packets: list[bytes] = []
        self.running = True
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self):
        while self.running:
            try:
                self.packets.append(self.sock.recv(1 << 17))
            except TimeoutError:
                pass

    def stop(self) -> bytes:
        self.running = False
        self.thread.join()
        self.sock.close()
        return b"".join(self.packets)


def found(pieces_of: list[np.ndarray], captured: bytes) -> int:
    """How many 16-byte windows (every 256 bytes) of the arrays appear in the capture; only
    varied windows count (a run of zeros, from a relu say, is in any capture)."""
    hits = 0
    for a in pieces_of:
        raw = np.ascontiguousarray(a).tobytes()
        windows = [raw[i:i + 16] for i in range(0, len(raw) - 16, 256)]
        hits += sum(w in captured for w in windows if len(set(w)) >= 12)
    return hits


@pytest.mark.skipif(os.geteuid() != 0, reason="capturing packets needs root")
def test_with_keys_no_tensor_crosses_the_wire_in_the_clear(out, tmp_path):
    plan = Plan.load(out)
    x = random_inputs(plan, seed=7)
    keys = tmp_path / "keys"
    security.generate(keys, ["dev0", "dev1", "client"])
    seen = {}
    for mode in ("plain", "curve"):
        cap = Capture()
        try:
            with connect(out, keys=keys if mode == "curve" else None) as session:
                y = session.infer(*x)
        finally:
            captured = cap.stop()
        seen[mode] = found([*x, *y], captured)
    assert seen["plain"] > 10, seen  # the capture does see tensors sent in the clear
    assert seen["curve"] == 0, seen


# -- bounded memory --------------------------------------------------------------------------
def test_a_flood_does_not_grow_the_worker(out, boards):
    plan = Plan.load(out)
    x = random_inputs(plan)
    b = boards()
    worker = psutil.Process(b["dev0"].worker_pid())
    with connect(plan, {d: w.endpoint for d, w in b.items()}, timeout=30) as session:
        session.infer(*x)
        before = worker.memory_info().rss
        ctx = zmq.Context()
        try:
            big = np.zeros(3 << 20, np.uint8)  # 3 MiB: over the 1 MiB frame limit
            junk = np.zeros(900 << 10, np.uint8)  # under it: read, refused, answered
            for i in range(400):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(b["dev0"].endpoint)
                head = wire.header(wire.TENSORS, src="client", session=session.id,
                                   digest=session.digest, rid=10**6 + i)
                wire.send(s, head, [big if i % 4 == 0 else junk], ["x"])
                s.close() if i % 4 == 0 else None
            time.sleep(1.0)
            grown = (worker.memory_info().rss - before) / 2**20
            assert grown < 80, f"the worker grew by {grown:.0f} MiB"
        finally:
            ctx.destroy(linger=0)
        assert close_to(session.infer(*x), reference(*x))  # and still serves
