"""The ZeroMQ runtime: one worker process per device, answers equal the in-process run and the
unsplit model, tensors go device to device, bad messages and dead workers give errors (never a
crash or a hang), and the board side imports no compiler."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from splitc.runtime import wire
from splitc.runtime.client import RemoteError, RequestTimeout, WorkerLost, connect
from splitc.runtime.local import LocalSession
from splitc.runtime.plan import Plan, PlanError

from .runtime_fixtures import break_device, random_inputs, reference, write_out

pytestmark = pytest.mark.alone  # timeouts and compute priority are timed: run one at a time

ROOT = Path(__file__).resolve().parents[1]
PLANS = [("pipeline", 2), ("pipeline", 3), ("channel", 2), ("channel", 3), ("spatial", 2),
         ("stages", 4)]


@pytest.fixture(scope="module")
def outs(tmp_path_factory) -> dict[tuple[str, int], Path]:
    root = tmp_path_factory.mktemp("runtime")
    built = {}
    for strategy, n in PLANS:
        write_out(root / f"{strategy}{n}", strategy, n)
        built[strategy, n] = root / f"{strategy}{n}"
    return built


def close_to(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and float(np.abs(a - b).max()) <= 1e-5 * float(np.abs(b).max())


def start_worker(folder: Path, tmp: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """A worker process as a board runs it (with more command-line ``args``); returns it and
    its endpoint."""
    announce = tmp / f"{folder.name}.ep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitc.runtime.worker", str(folder), "--bind",
         "tcp://127.0.0.1:*", "--announce", str(announce), *args],
        env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not announce.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "worker did not start"
        time.sleep(0.02)
    return proc, announce.read_text().strip()


def stop_worker(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()


# -- answers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,n", PLANS)
def test_answers_equal_local_and_unsplit_and_tensors_go_device_to_device(outs, strategy, n):
    out = outs[strategy, n]
    plan = Plan.load(out)
    batches = [random_inputs(plan, seed) for seed in range(3)]
    local = LocalSession(out)
    with connect(out) as session:
        for x in batches:
            got = session.infer(*x)
            want, _ = local.infer(*x)
            for y, w, r in zip(got, want, reference(*x), strict=True):
                assert np.array_equal(y, w)  # same compiled pieces: bit-identical
                assert close_to(y, r)
        stats = session.worker_stats()
        # the client received model outputs only, one per request each
        assert dict(session.received) == {e.tensor: len(batches) for e in plan.outputs}
    # every transfer of the plan went from its source worker straight to its destination
    for src in {t.src for t in plan.transfers} | {t.dst for t in plan.transfers}:
        for dst in {t.dst for t in plan.transfers if t.src == src}:
            want_bytes = len(batches) * sum(t.nbytes for t in plan.transfers
                                            if t.src == src and t.dst == dst)
            assert stats[src]["sent"][dst]["bytes"] == want_bytes
            assert stats[dst]["recv"][src]["bytes"] == want_bytes
            # one message per piece run and destination (what the cost model prices)
            crossing = {t.tensor for t in plan.transfers if t.src == src and t.dst == dst}
            messages = len(batches) * sum(bool(crossing & set(p.outputs))
                                          for p in plan.pieces_on(src))
            assert stats[src]["sent"][dst]["messages"] == messages
            assert stats[dst]["recv"][src]["messages"] == messages
    # the client sent each device exactly the model inputs, or slices of them, it reads
    for d in plan.devices:
        reads = {t for p in plan.pieces_on(d.name) for t in p.inputs} & set(plan.client_tensors)
        if reads:
            want_bytes = len(batches) * sum(plan.tensors[t].nbytes for t in reads)
            assert stats[d.name]["recv"]["client"]["bytes"] == want_bytes
            if strategy in ("spatial", "stages"):  # only the rows its tiles read
                assert want_bytes < len(batches) * sum(plan.tensors[e.tensor].nbytes
                                                       for e in plan.inputs)
    if strategy in ("spatial", "stages"):
        assert plan.slices
    for dev, s in stats.items():
        assert s["errors"] == 0 and s["pending"] == 0
        assert set(s["sent"]) <= {t.dst for t in plan.transfers if t.src == dev} | {"client"}
        assert s["requests_done"] == len(batches)
        # the serving thread's CPU: its pieces' and, beside them, the runtime's own, part of
        # it on its messages
        assert s["thread_cpu_s"] > s["loop_cpu_s"] > s["piece_cpu_s"] + s["message_cpu_s"]
        assert s["piece_cpu_s"] > 0 and s["message_cpu_s"] > 0


def test_many_requests_in_flight_each_get_their_own_answer(outs):
    out = outs["channel", 3]
    plan = Plan.load(out)
    batches = [random_inputs(plan, seed) for seed in range(16)]
    local = LocalSession(out)
    with connect(out) as session:
        results = session.infer_many(batches, inflight=4)
        assert len(session.latencies) == len(batches)
        # and submit/result out of order
        rids = [session.submit(*x) for x in batches[:4]]
        late = [session.result(r) for r in reversed(rids)][::-1]
    for x, got in zip(batches + batches[:4], results + late, strict=True):
        want, _ = local.infer(*x)
        for y, w in zip(got, want, strict=True):
            assert np.array_equal(y, w)


def test_bad_inputs_are_refused_on_the_client(outs):
    out = outs["pipeline", 2]
    plan = Plan.load(out)
    x, y = random_inputs(plan)
    with connect(out) as session:
        with pytest.raises(PlanError, match="takes 2 inputs"):
            session.infer(x)
        with pytest.raises(PlanError, match="input 'y' must be float32"):
            session.infer(x, y.astype("float64"))
        assert len(session.infer(x, y)) == 2


# -- wire format -----------------------------------------------------------------------------
class Spec:
    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype


@pytest.fixture
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://wire-test")
    b.connect("inproc://wire-test")
    yield a, b
    ctx.destroy(linger=0)


@pytest.mark.parametrize("use_specs", [True, False])
def test_wire_round_trip(pair, use_specs):
    a, b = pair
    rng = np.random.default_rng(0)
    arrays = {
        "small": rng.standard_normal((2, 3)).astype("float32"),
        "big": rng.standard_normal((256, 128)).astype("float32"),  # 128 KiB: sent zero-copy
        "half": rng.standard_normal((5,)).astype("float16"),
        "mask": rng.standard_normal((3, 3)) > 0,
        "idx": np.arange(7, dtype="int64"),
        "scalar": np.array(3.5, "float64"),
        "noncontig": np.arange(24, dtype="int32").reshape(4, 6)[:, ::2],
    }
    specs = {n: Spec(x.shape, str(x.dtype)) for n, x in arrays.items()} if use_specs else None
    head = wire.header(wire.TENSORS, src="client", session="s", digest="d", rid=7)
    sent = wire.send(a, head, list(arrays.values()), list(arrays))
    assert sent == sum(x.nbytes for x in arrays.values())
    msg = wire.recv(b, specs=specs)
    assert msg.kind == wire.TENSORS and msg.rid == 7 and msg.src == "client"
    assert msg.names == list(arrays)
    for name, got in msg.named().items():
        assert got.dtype == arrays[name].dtype and np.array_equal(got, arrays[name])
        # recv_into our buffer (numpy's, aligned for TVM to take without a copy) vs a
        # zero-copy frame (zmq's)
        root = got
        while isinstance(root.base, np.ndarray):
            root = root.base
        assert (root.base is None) == use_specs
        assert not use_specs or got.ctypes.data % wire.ALIGNMENT == 0


def test_wire_receives_into_the_given_buffer(pair):
    a, b = pair
    x = np.arange(12, dtype="float32").reshape(3, 4)
    target = np.zeros((3, 4), "float32")
    wire.send(a, wire.header(wire.TENSORS, src="dev0", rid=0), [x], ["t"])
    msg = wire.recv(b, specs={"t": Spec((3, 4), "float32")}, alloc=lambda s, d: target)
    assert msg.arrays[0] is target and np.array_equal(target, x)


@pytest.mark.parametrize("deadline", [None, 1234.5678901234, 7, 1e-7, 3.0e15])
def test_an_encoded_tensors_header_reads_as_the_dict_sent_whole(pair, deadline):
    a, b = pair
    x, y = np.arange(6, dtype="float32").reshape(2, 3), np.array([True, False])
    fixed = wire.header(wire.TENSORS, src="dev1", session="s" * 32, digest="d" * 16)
    head = wire.TensorsHead(fixed, [x, y], ["x", "y"])
    for rid in (0, 41, 2**40):
        wire.send(a, head.raw(rid, deadline), [x, y])
        got = wire.recv(b, specs={"x": Spec((2, 3), "float32"), "y": Spec((2,), "bool")})
        extra = {} if deadline is None else {"deadline": deadline}
        wire.send(a, {**fixed, "rid": rid, **extra}, [x, y], ["x", "y"])
        whole = wire.recv(b)
        assert got.head == whole.head and got.rid == rid
        assert np.array_equal(got.named()["x"], x) and np.array_equal(got.named()["y"], y)
    with pytest.raises(ValueError, match="request id"):
        wire.TensorsHead({**fixed, "rid": 1}, [x], ["x"])


def _read_whole(raw, specs):
    """What reading ``raw`` in full gives: (header, entries), or the error's text."""
    try:
        head = wire.parse_header(raw)
        return head, list(wire.tensor_entries(head, specs))
    except wire.WireError as e:
        return str(e)


def test_a_header_read_again_from_its_known_prefix_is_what_reading_it_whole_gives():
    x = np.zeros((2, 3), "float32")
    specs = {"x": Spec((2, 3), "float32")}
    fixed = wire.header(wire.TENSORS, src="dev1", session="s" * 32, digest="d" * 16)
    prefix = wire.TensorsHead(fixed, [x], ["x"]).raw(0)[:-len(b',"rid":0}')]
    raws = [wire.TensorsHead(fixed, [x], ["x"]).raw(rid, deadline)
            for rid in (0, 41, 2**40, 10**19) for deadline in
            (None, 1234.5678901234, 7, 1e-7, 3.0e15, -2.5, 1e308)]
    raws += [prefix + tail for tail in (
        b',"rid":5,"deadline":1e999}',     # not finite: refused
        b',"rid":5,"deadline":12}',         # an integer stays one
        b',"rid":-1}', b',"rid":01}', b',"rid":1.5}', b',"rid":true}',
        b',"rid":1,"deadline":"soon"}', b',"rid":1,"deadline":NaN}',
        b',"rid":1,"kind":"ping"}',         # a field after the request's: read whole
        b',"rid":1} ', b',"rid":1}}')]
    # the bytes before the request's fields carry a request id of their own: never known
    twice = json.dumps({**fixed, "rid": 3, "tensors": [
        {"name": "x", "dtype": "float32", "shape": [2, 3]}]}, separators=(",", ":"))
    raws += [twice[:-1].encode() + b',"rid":5}'] * 2
    headers = wire.Headers()
    for raw in raws * 2:  # the second time from what the first taught it
        want = _read_whole(raw, specs)
        try:
            head, entries = headers.read(raw, specs)
            got = head, list(entries)
        except wire.WireError as e:
            got = str(e)
        assert got == want, raw
        assert not isinstance(got, tuple) or type(got[0].get("deadline")) is \
            type(want[0].get("deadline"))
    # other specs: the entries are checked again
    with pytest.raises(wire.WireError, match="plan says"):
        headers.read(raws[1], {"x": Spec((3, 2), "float32")})


def raw_send(sock, parts):
    sock.send_multipart([p if isinstance(p, bytes) else json.dumps(p).encode() for p in parts])


def tensor_head(name="t", dtype="float32", shape=(2, 2), rid=1, **kw):
    return {"v": 1, "kind": "tensors", "src": "dev0", "session": "", "digest": "", "rid": rid,
            "tensors": [{"name": name, "dtype": dtype, "shape": list(shape)}], **kw}


MALFORMED = {
    "not json": ([b"{nope"], "not JSON"),
    "not an object": ([b"[1, 2]"], "not a JSON object"),
    "wrong version": ([{"v": 9, "kind": "ping"}], "version 9"),
    "unknown kind": ([{"v": 1, "kind": "pickle"}], "unknown message kind"),
    "no rid": ([{**tensor_head(), "rid": None}, np.zeros(4, "f4").tobytes()], "request id"),
    "dtype not allowed": ([tensor_head(dtype="object"), b"x" * 16], "not allowed"),
    "wrong dtype": ([tensor_head(dtype="float64"), np.zeros(4).tobytes()], "plan says"),
    "wrong shape": ([tensor_head(shape=(4,)), np.zeros(4, "f4").tobytes()], "plan says"),
    "negative dim": ([tensor_head(shape=(-2, 2)), b""], "malformed shape"),
    "unknown tensor": ([tensor_head(name="zz"), np.zeros(4, "f4").tobytes()], "not one"),
    "short frame": ([tensor_head(), b"\0" * 15], "frame of 15 bytes"),
    "long frame": ([tensor_head(), b"\0" * 17], "frame of 17 bytes"),
    "truncated": ([tensor_head()], "truncated"),
    "extra frame": ([tensor_head(), b"\0" * 16, b"\0"], "more frames"),
    "frames on a ping": ([{"v": 1, "kind": "ping"}, b"\0"], "more frames"),
    "huge header": ([b" " * (wire.MAX_HEADER + 1)], "longer than"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_wire_refuses_malformed_messages(pair, case):
    a, b = pair
    parts, why = MALFORMED[case]
    raw_send(a, parts)
    with pytest.raises(wire.WireError, match=why):
        wire.recv(b, specs={"t": Spec((2, 2), "float32")})
    # the bad message was drained whole: the next one reads cleanly
    wire.send(a, wire.header(wire.PING, src="client"))
    assert wire.recv(b).kind == wire.PING


def test_worker_answers_bad_messages_with_errors_and_keeps_serving(outs):
    out = outs["pipeline", 2]
    plan = Plan.load(out)
    x = random_inputs(plan)
    with connect(out) as session:
        want = session.infer(*x)
        ctx = zmq.Context()
        try:
            sock = wire.tune(ctx.socket(zmq.DEALER))
            sock.connect(session.endpoints["dev1"])
            sock.setsockopt(zmq.RCVTIMEO, 5000)
            dev1_input = next(t.tensor for t in plan.transfers if t.dst == "dev1")
            spec = plan.tensors[dev1_input]
            ours = {"session": session.id, "digest": session.digest}
            frame = np.zeros(spec.shape, spec.dtype).tobytes()
            transfer = tensor_head(dev1_input, spec.dtype, spec.shape, rid=10**6, **ours)
            raw_send(sock, [transfer, frame])  # well-formed: held, waiting for the model input
            cases = {**{name: parts for name, (parts, _) in MALFORMED.items()},
                     "arrived twice": [transfer, frame],
                     "wrong sender": [{**transfer, "src": "client"}, frame],
                     "stale session": [{**transfer, "session": "stale"}, frame],
                     "kind a worker sends": [{"v": 1, "kind": "ready", "src": "x",
                                              "session": "", "digest": ""}]}
            for name, parts in cases.items():
                raw_send(sock, parts)
                try:
                    reply = wire.recv(sock)
                except zmq.Again:
                    pytest.fail(f"no answer to {name}")
                assert reply.kind == wire.ERROR and reply.head["device"] == "dev1", name
            assert session.worker_stats()["dev1"]["pending"] == 1
            # only the session's client may drop a request: this stranger's drop is refused
            wire.send(sock, wire.header(wire.DROP, src="client", rid=10**6, **ours))
            reply = wire.recv(sock)
            assert reply.kind == wire.ERROR and reply.head["code"] == "refused"
            assert session.worker_stats()["dev1"]["pending"] == 1
            session._drop(10**6)  # the client's own (its stats request comes after it)
            assert session.worker_stats()["dev1"]["pending"] == 0
        finally:
            ctx.destroy(linger=0)
        # the session still works, with the right answers
        for y, w in zip(session.infer(*x), want, strict=True):
            assert np.array_equal(y, w)


# -- failures --------------------------------------------------------------------------------
def test_a_piece_that_fails_is_reported_with_device_piece_and_request(outs, tmp_path):
    out = tmp_path / "broken"
    shutil.copytree(outs["pipeline", 2], out)
    plan = break_device(out, "dev1")
    with connect(out) as session:
        with pytest.raises(RemoteError, match=r"dev1 running dev1_p0 \(request 0\)") as err:
            session.infer(*random_inputs(plan))
        assert (err.value.device, err.value.piece, err.value.rid) == ("dev1", "dev1_p0", 0)
        assert session.worker_stats()["dev1"]["errors"] == 1  # still serving
        with pytest.raises(RemoteError, match=r"request 1"):
            session.infer(*random_inputs(plan))


def test_a_worker_with_another_plan_refuses_and_names_its_device(outs, tmp_path):
    out = tmp_path / "mixed"
    shutil.copytree(outs["pipeline", 2], out)
    other = json.loads((out / "dev1" / "plan.json").read_text())
    other["model"]["source"] = "another compile"
    (out / "dev1" / "plan.json").write_text(json.dumps(other))
    # the client checks every worker's plan digest in its pong, before any setup
    with pytest.raises(PlanError, match=r"device dev1 at tcp://\S+ holds another compile "
                                        r"\(plan \w+, this client's is \w+\)"):
        connect(out, start_timeout=20)


def test_a_worker_that_dies_at_start_is_reported_with_its_output(outs, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(outs["pipeline", 2], out)
    (out / "dev1" / "lib.so").write_bytes(b"not a library")
    t0 = time.monotonic()
    with pytest.raises(WorkerLost, match="(?s)dev1 exited with status 2.*does not match"):
        connect(out)
    assert time.monotonic() - t0 < 15


def test_unreachable_endpoint_times_out_naming_it(outs):
    plan = Plan.load(outs["pipeline", 2])
    t0 = time.monotonic()
    with pytest.raises(RequestTimeout, match=r"dev0 at tcp://127.0.0.1:9, dev1 at"):
        connect(plan, {"dev0": "tcp://127.0.0.1:9", "dev1": "tcp://127.0.0.1:11"},
                start_timeout=1.0)
    assert time.monotonic() - t0 < 5
    with pytest.raises(PlanError, match="no endpoint for dev1"):
        connect(plan, {"dev0": "tcp://127.0.0.1:9"})
    with pytest.raises(PlanError, match="devices the plan does not have: dev7"):
        connect(plan, {"dev0": "tcp://127.0.0.1:9", "dev1": "x", "dev7": "y"})
    with pytest.raises(PlanError, match="endpoint for dev1, 'x', is not one splitc takes"):
        connect(plan, {"dev0": "tcp://127.0.0.1:9", "dev1": "x"})


def test_a_local_worker_killed_mid_session_fails_infer_naming_it(outs):
    out = outs["pipeline", 3]
    plan = Plan.load(out)
    x = random_inputs(plan)
    with connect(out) as session:
        session.infer(*x)
        session._local.procs["dev1"].kill()
        t0 = time.monotonic()
        with pytest.raises(WorkerLost, match=r"worker dev1 at tcp://127\.0\.0\.1:\d+ is gone"):
            session.infer(*x)
        assert time.monotonic() - t0 < 3
        with pytest.raises(WorkerLost):  # and the session stays failed
            session.infer(*x)


def test_a_remote_worker_killed_mid_session_fails_infer_naming_it(outs, tmp_path):
    """Workers started as a board would (``python -m splitc.runtime.worker``), the client
    given their endpoints: the dropped connection is what tells."""
    out = outs["pipeline", 2]
    plan = Plan.load(out)
    x = random_inputs(plan)
    procs = {d.name: start_worker(out / d.dir, tmp_path) for d in plan.devices}
    try:
        with pytest.raises(PlanError, match="given for dev0, .* is served by device 'dev1'"):
            connect(plan, {"dev0": procs["dev1"][1], "dev1": procs["dev0"][1]})
        with connect(plan, {d: ep for d, (_, ep) in procs.items()}, timeout=30) as session:
            session.infer(*x)
            procs["dev0"][0].kill()
            t0 = time.monotonic()
            with pytest.raises(WorkerLost, match=f"worker dev0 at {procs['dev0'][1]} is gone"):
                session.infer(*x)
            assert time.monotonic() - t0 < 3
    finally:
        codes = {d: stop_worker(p) for d, (p, _) in procs.items()}
    assert codes["dev1"] == 0  # SIGTERM: a clean exit


def thread_policies(pid: int) -> dict[str, set[int]]:
    """Scheduling policy of each thread of process ``pid``, by thread name ('main' for its
    first thread)."""
    out: dict[str, set[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        tid = int(task.name)
        name = "main" if tid == pid else (task / "comm").read_text().strip()
        out.setdefault(name, set()).add(os.sched_getscheduler(tid))
    return out


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")
@pytest.mark.parametrize("priority", ["default", "normal"])
def test_pieces_run_at_idle_priority_below_the_io_thread(outs, tmp_path, priority):
    """By default the worker's own thread, which runs the pieces, is SCHED_IDLE and ZeroMQ's
    I/O thread is not, so a tensor sent before the next piece starts leaves at once."""
    out = outs["pipeline", 2]
    plan = Plan.load(out)
    args = () if priority == "default" else ("--compute-priority", priority)
    procs = {d.name: start_worker(out / d.dir, tmp_path, *args) for d in plan.devices}
    try:
        with connect(plan, {d: ep for d, (_, ep) in procs.items()}, timeout=30) as session:
            x = random_inputs(plan)
            for a, b in zip(session.infer(*x), reference(*x), strict=True):
                assert close_to(a, b)
            policies = thread_policies(procs["dev0"][0].pid)
    finally:
        for p, _ in procs.values():
            stop_worker(p)
    io = {name for name in policies if name.startswith("ZMQbg/IO")}
    assert io, policies
    assert all(policies[name] == {os.SCHED_OTHER} for name in io)
    assert policies["main"] == {os.SCHED_IDLE if priority == "default" else os.SCHED_OTHER}


def test_a_bad_compute_priority_is_refused(outs, tmp_path):
    folder = outs["pipeline", 2] / "dev0"
    done = subprocess.run([sys.executable, "-m", "splitc.runtime.worker", str(folder),
                           "--compute-priority", "high"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "--compute-priority: invalid choice: 'high'" in done.stderr


def test_a_hung_worker_times_out_instead_of_hanging(outs):
    out = outs["pipeline", 2]
    plan = Plan.load(out)
    x = random_inputs(plan)
    with connect(out, timeout=1.0) as session:
        session.infer(*x)
        proc = session._local.procs["dev1"]
        proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(RequestTimeout, match=r"request 1: no answer in 1 s; still "
                                                     r"waiting for .* from dev1 at tcp://"):
                session.infer(*x)
            assert time.monotonic() - t0 < 3
        finally:
            proc.send_signal(signal.SIGCONT)
        # the late answer to request 1 is dropped; the next request is answered
        assert len(session.infer(*x)) == 2


# -- the board side --------------------------------------------------------------------------
BOARD_CHECK = r"""
import json, sys, threading
sys.modules["torch"] = None  # a board has no torch (tvm_ffi imports it when present)
from splitc.runtime import wire, worker
w = worker.Worker(sys.argv[1], "tcp://127.0.0.1:*")
thread = threading.Thread(target=w.serve)
thread.start()
import zmq
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.connect(w.endpoint)
wire.send(s, wire.header(wire.PING, src="test"))
s.setsockopt(zmq.RCVTIMEO, 10000)
pong = wire.recv(s).head
w.stop()
thread.join()
ctx.destroy(linger=0)
heavy = ["torch", "onnx", "onnxruntime", "tvm.relax", "tvm.relax.frontend",
         "splitc.passes", "splitc.driver", "splitc.frontend", "splitc.runtime.client",
         "typer"]
print(json.dumps({"pong": pong["device"], "pieces": pong["pieces"],
                  "loaded": [m for m in heavy if sys.modules.get(m) is not None]}))
"""


def test_the_worker_imports_no_compiler(outs):
    folder = outs["pipeline", 2] / "dev1"
    result = subprocess.run([sys.executable, "-c", BOARD_CHECK, str(folder)],
                            env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"}, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"pong": "dev1", "pieces": ["dev1_p0"], "loaded": []}


# -- the command line ------------------------------------------------------------------------
@pytest.fixture
def cli():
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    from splitc import cli_runtime

    app = typer.Typer()
    cli_runtime.register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_cli_run_prints_outputs_bytes_and_latency(outs, tmp_path, cli, monkeypatch):
    out = outs["channel", 2]
    plan = Plan.load(out)
    x = random_inputs(plan, seed=3)
    for i, a in enumerate(x):
        np.save(tmp_path / f"in{i}.npy", a)
    result = cli("run", out, "--input", tmp_path / "in0.npy", "--input", tmp_path / "in1.npy",
                 "--output", tmp_path / "y.npy", "--requests", 12, "--inflight", 3)
    assert result.exit_code == 0, result.output
    assert f"{plan.transfer_bytes * 12:,} bytes crossed between devices" in result.output
    assert "p50" in result.output and "requests/s" in result.output
    assert np.array_equal(np.load(tmp_path / "y.npy"), LocalSession(out).infer(*x)[0][0])

    class Reference:  # --check compares with the original model
        def reference(self, inputs):
            return reference(*inputs)

    import splitc.driver

    monkeypatch.setattr(splitc.driver, "load_reference", lambda _out: Reference())
    result = cli("run", out, "--check")
    assert result.exit_code == 0, result.output
    assert "check passed" in result.output


def test_cli_run_with_endpoints_and_bad_endpoints(outs, tmp_path, cli):
    from splitc.errors import SplitcError

    out = outs["pipeline", 2]
    plan = Plan.load(out)
    procs = {d.name: start_worker(out / d.dir, tmp_path) for d in plan.devices}
    try:
        spec = ",".join(f"{d}={ep}" for d, (_, ep) in procs.items())
        result = cli("run", out, "--endpoints", spec)
        assert result.exit_code == 0, result.output
        assert f"{plan.transfer_bytes:,} bytes crossed" in result.output
    finally:
        for p, _ in procs.values():
            stop_worker(p)
    result = cli("run", out, "--endpoints", "dev0")
    assert isinstance(result.exception, SplitcError)
    assert "DEVICE=ENDPOINT" in str(result.exception)


def test_local_workers_end_with_a_client_that_is_killed(tmp_path):
    """A client killed before it can stop its local workers (SIGKILL: no cleanup runs) does
    not leave them serving: the kernel ends them with it."""
    out = tmp_path / "out"
    write_out(out, "pipeline", 2)
    script = ("import os, sys\n"
              "from splitc.runtime.client import connect\n"
              "s = connect(sys.argv[1], None, timeout=60)\n"
              "print(*[p.pid for p in s._local.procs.values()], flush=True)\n"
              "os.kill(os.getpid(), 9)\n")
    r = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    pids = [int(p) for p in r.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 15
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in pids if _running(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their client"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_worker_indexes_its_pieces_by_the_tensors_they_take():
    """What a message makes ready is found from the tensors it carries (the index the worker
    builds with the plan), not by looking at every piece: each tensor names the pieces taking
    it, in run order, and pieces taking no tensor run with a request's first message."""
    from splitc.runtime.plan import Piece
    from splitc.runtime.worker import _Served

    pieces = [Piece("p0", "dev0", ("x",), ("a",)), Piece("p1", "dev0", ("a", "h"), ("b",)),
              Piece("p2", "dev0", (), ("c",)), Piece("p3", "dev0", ("a", "c"), ("y",))]
    served = _Served("", None, "digest", pieces, {}, {}, {})
    assert served.consumers == {"x": [0], "a": [1, 3], "h": [1], "c": [3]}
    assert served.unfed == (2,)
