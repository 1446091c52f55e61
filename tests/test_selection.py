"""The quick schedule selection: each kernel's default-schedule candidates give the plain
loops' answer, are measured once per CPU and kept, and compiles use them by themselves."""

import numpy as np
import pytest
import tvm
from tvm.s_tir import meta_schedule as ms

from splitc import targets
from splitc.backend.build import has_reduction
from splitc.backend.tuning import build_kernel, kernels, tune
from splitc.backend.tuning_db import database_for, selection_root, target_key
from splitc.passes.codegen import cpu_schedules
from splitc.passes.codegen.cpu_schedules import Knobs, candidate_knobs, candidates, conv_tile

from .test_cpu_schedules import conv_module, matmul_module
from .test_winograd import conv_model

pytestmark = pytest.mark.alone  # candidates are chosen by measured time: run one at a time

HOST = targets.get("host")

MODELS = {
    "conv-3x3": lambda: conv_module(16, 32, 14, 3, 1, 1),
    "conv-1x1-stride2": lambda: conv_module(32, 64, 9, 1, 2, 0),
    "conv-1x1-wide": lambda: conv_module(320, 32, 7, 1, 1, 0),  # chunks of 128: 128, 128, 64
    "conv-prime-width": lambda: conv_module(16, 24, 13, 3, 1, 1),
    "depthwise": lambda: conv_module(24, 24, 11, 3, 2, 1, groups=24),
    "grouped": lambda: conv_module(64, 64, 9, 3, 1, 1, groups=16),
    "matmul": lambda: matmul_module(23, 48, 96, transpose=True),
    "matmul-odd": lambda: matmul_module(31, 20, 197),
    "winograd": lambda: conv_model(32, 32, 16, (1, 1, 1, 1)),
}


def _tasks(mod):
    target = HOST.tvm_target()
    fused = kernels(mod, target)
    return [t.dispatched[0]["main"] for t in ms.relax_integration.extract_tasks(fused, target)
            if has_reduction(t.dispatched[0]["main"])]


def _run(lib, func, inputs):
    args = [tvm.runtime.tensor(a) for a in inputs]
    lib["main"](*args)
    return args[-1].numpy()


@pytest.mark.parametrize("registers", [16, 32])
@pytest.mark.parametrize("case", list(MODELS))
def test_every_candidate_gives_the_plain_answer(case, registers, monkeypatch):
    """Each distinct candidate of each kernel, built as the selection builds it, computes
    what the kernel's plain loops compute (the knobs change speed, never the answer); the
    default comes first and conv and matmul kernels have alternatives to measure."""
    monkeypatch.setattr(cpu_schedules, "vector_registers", lambda _target: registers)
    target = HOST.tvm_target()
    rng = np.random.default_rng(4)
    for func in _tasks(MODELS[case]()):
        info = ms.arg_info.ArgInfo.from_prim_func(func)
        inputs = [rng.standard_normal([int(d) for d in a.shape]).astype(a.dtype) for a in info]
        expected = _run(tvm.compile(tvm.IRModule({"main": func}), target=target), func,
                        inputs)
        found = candidates(func, target)
        assert found and found[0][0] == Knobs(), found
        if case != "matmul-odd":  # (its one padded vector leaves the tiles nothing to vary)
            assert len(found) >= 2, [k.label for k, _ in found]
        if case == "conv-1x1-wide":  # more input channels than a chunk: summed in chunks
            assert any(k.ic_chunk for k, _ in found), [k.label for k, _ in found]
        for knobs, sch in found:
            got = _run(build_kernel(sch.mod, target), func, inputs)
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4,
                                       err_msg=f"{case}: candidate {knobs.label}")


def test_candidate_knobs_start_with_the_default():
    for registers in (16, 32):
        knobs = candidate_knobs(registers)
        assert knobs[0] == Knobs() and len(set(knobs)) == len(knobs) >= 4
        assert any(k.rows_outer for k in knobs)


def test_conv_tile_knobs():
    assert conv_tile(56, 4, 32, Knobs()) == conv_tile(56, 4, 32) == (8, 2)
    assert conv_tile(56, 4, 32, Knobs(columns=4, accumulators=16)) == (4, 4)
    assert conv_tile(56, 4, 32, Knobs(columns=14, accumulators=14)) == (14, 1)
    assert conv_tile(56, 8, 16, Knobs(columns=4, accumulators=12)) == (4, 2)  # 3 does not divide
    assert conv_tile(7, 32, 32, Knobs(columns=6, accumulators=24)) == (7, 2)  # 7 <= 6 + slack
    # the old 16-register default (one block of up to 12 columns) stays a candidate
    assert conv_tile(56, 32, 16, Knobs(columns=12, accumulators=12)) == (8, 1)


def test_host_key_names_the_cpu():
    key = target_key(HOST)
    mcpu = HOST.tvm_target().attrs["mcpu"]
    assert key.startswith(f"host-{mcpu}-") and len(key) > len(f"host-{mcpu}-")
    assert target_key(targets.get("rpi4")) == "rpi4"


def test_selection_is_measured_once_and_reused(tmp_path):
    """The first selection measures every candidate and keeps the fastest as the kernel's
    record (never slower than the default schedule); a second finds them all and measures
    nothing; a build then takes its schedules from the selection."""
    mod = conv_module(16, 32, 14, 3, 1, 1)
    messages = []
    rows = tune(mod, HOST, tmp_path, 0, log=messages.append)
    assert rows and all(not r["reused"] and r["candidates"] >= 1 for r in rows), rows
    conv = [r for r in rows if "conv" in r["kernel"]]
    assert conv and conv[0]["candidates"] >= 2
    assert all(r["selected_s"] <= r["default_s"] for r in rows), rows
    assert "selected on this machine" in messages[-1], messages
    again = []
    rows2 = tune(mod, HOST, tmp_path, 0, log=again.append)
    assert all(r["reused"] and r["candidates"] == 0 for r in rows2), rows2
    assert "all selected before" in again[-1], again
    assert database_for(HOST, tmp_path) == tmp_path / target_key(HOST)


def test_compile_selects_on_first_use_then_reuses(tmp_path):
    """`splitc compile` for the host selects its kernels' schedules on this CPU, keeps them
    in the cache and builds with them; the next compile of a model with the same kernels
    measures nothing; `run --check` still gives the model's answer; SPLITC_SELECT=0 (the
    suite's default) does not select."""
    import os

    from .test_cli import splitc

    env = {**os.environ, "SPLITC_CACHE": str(tmp_path / "cache"), "SPLITC_SELECT": "1"}
    out = tmp_path / "out"
    r = splitc("compile", "mlp", "--tiny", "-o", out, "--devices", "host", env=env)
    assert r.returncode == 0, r.stderr
    assert "selected on this machine" in r.stderr, r.stderr
    assert "from tuning records in" in r.stderr and "schedules" in r.stderr, r.stderr
    r = splitc("compile", "mlp", "--tiny", "-o", tmp_path / "out2", "--devices", "host,host",
               "--strategy", "pipeline", env=env)
    assert r.returncode == 0, r.stderr
    assert "selected on this machine" not in r.stderr and "all selected before" in r.stderr
    r = splitc("run", out, "--check", env=env)
    assert r.returncode == 0, r.stderr + r.stdout
    r = splitc("compile", "mlp", "--tiny", "-o", tmp_path / "out3", "--devices", "host",
               env={**env, "SPLITC_CACHE": str(tmp_path / "cache2"), "SPLITC_SELECT": "0"})
    assert r.returncode == 0 and "selected" not in r.stderr, r.stderr
    assert not (tmp_path / "cache2" / "schedules").exists()


def test_selection_root_is_per_code_generation(monkeypatch, tmp_path):
    monkeypatch.setenv("SPLITC_CACHE", str(tmp_path))
    assert selection_root() == tmp_path / "schedules" / cpu_schedules.CODEGEN


def test_winograd_choice_is_measured_kept_and_used(tmp_path):
    """Winograd or direct is measured per 3x3 convolution on the device (not predicted from
    rates of another CPU), kept beside the records and not measured again; a build reads it
    (forced direct here: no Winograd kernel, the same answer)."""
    from tvm import relax

    from splitc.backend.build import build, pack
    from splitc.backend.tuning_db import save_winograd_tiles, winograd_tiles

    mod = conv_model(64, 64, 32, (1, 1, 1, 1))
    messages = []
    tune(mod, HOST, tmp_path, 0, log=messages.append)
    folder = tmp_path / target_key(HOST)
    key = "1x64x32x32/1,1,1,1->64"
    tiles = winograd_tiles(folder)
    assert list(tiles) == [key] and tiles[key] in (0, 2, 4), tiles
    assert any(m.startswith("Winograd or direct, measured on this machine") for m in messages)
    again = []
    tune(mod, HOST, tmp_path, 0, log=again.append)
    assert not any("Winograd or direct" in m for m in again), again

    rng = np.random.default_rng(2)
    params = mod["main"].params
    inputs = [rng.standard_normal([int(d) for d in params[0].ty.shape]).astype("float32")]
    weights = [rng.standard_normal([int(d) for d in p.ty.shape]).astype("float32") * 0.1
               for p in params[1:]]
    answers = []
    for tile in (4, 0):
        save_winograd_tiles(folder, {key: tile})
        lifted = pack(mod, HOST.tvm_target(), winograd_tiles(folder))
        assert ("conv2d_winograd" in lifted.script()) == bool(tile)
        ex, packed = build(mod, HOST.tvm_target(), {"main": weights}, tuning_db=folder)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        answers.append(vm["main"](*[tvm.runtime.tensor(a)
                                    for a in [*inputs, *packed["main"]]]).numpy())
    np.testing.assert_allclose(answers[0], answers[1], rtol=1e-4, atol=1e-4)


def test_the_database_lock_lets_readers_share_and_writers_wait(tmp_path):
    """Builds read a database together; a writer (selection, tuning) waits for them and they
    for it, saying so; the databases the project ships are read without a lock file."""
    import threading

    from splitc.backend import tuning_db
    from splitc.backend.tuning_db import locked

    folder = tmp_path / "db"
    folder.mkdir()  # (a build reads only a folder that holds records)
    held, release = threading.Event(), threading.Event()

    def hold(shared):
        with locked(folder, shared=shared):
            held.set()
            release.wait(10)

    def waiter(shared, got, said):
        with locked(folder, shared=shared, log=said.append):
            got.set()

    for holder_shared, waiter_shared, waits in ((True, True, False), (True, False, True),
                                                (False, True, True), (False, False, True)):
        held.clear(), release.clear()
        holder = threading.Thread(target=hold, args=(holder_shared,))
        holder.start()
        assert held.wait(10)
        got, said = threading.Event(), []
        other = threading.Thread(target=waiter, args=(waiter_shared, got, said))
        other.start()
        assert got.wait(0.5) is not waits, (holder_shared, waiter_shared)
        assert bool(said) is waits and all("waiting for" in m for m in said), said
        release.set()
        assert got.wait(10)
        holder.join(), other.join()
    shipped = tuning_db.SHIPPED / "some-target"
    with locked(shipped, shared=True):
        pass
    assert not (shipped / tuning_db.LOCK_FILE).exists()


def test_two_compiles_at_once_share_the_selection_cache(tmp_path):
    """Two `splitc compile` processes started together on an empty cache (two benchmarks at
    once did this: one read the other's half-written records and failed in TVM's parser) both
    compile, select each kernel once between them, and give the model's answer."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "SPLITC_CACHE": str(tmp_path / "cache"), "SPLITC_SELECT": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "splitc.cli", "compile", "resnet18", "--tiny",
                               "-o", str(tmp_path / f"out{i}"), "--devices", "host,host",
                               "--strategy", "spatial"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (_out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    errs = [err for _out, err in results]
    assert sum("selected on this machine" in e for e in errs) >= 1, errs
    for i in range(2):
        r = subprocess.run([sys.executable, "-m", "splitc.cli", "run", str(tmp_path / f"out{i}"),
                            "--check"], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]


def _spoil(folder):
    """A database TVM cannot read: a workload line cut short (as a crash mid-append leaves it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "database_workload.json").write_text('["0x1234", {"nodes": [\n')
    (folder / "database_tuning_record.json").write_text("")


def test_an_unreadable_selection_is_moved_aside_and_selected_again(tmp_path, monkeypatch):
    """The selection cache is a cache: a database there that TVM cannot read (two processes
    appended to it at once before splitc locked it) is moved aside with a warning and the
    kernels are selected again, rather than every compile failing in TVM's parser."""
    monkeypatch.setenv("SPLITC_CACHE", str(tmp_path))
    folder = selection_root() / target_key(HOST)
    _spoil(folder)
    messages = []
    rows = tune(matmul_module(8, 16, 32), HOST, None, 0, log=messages.append)
    assert rows and not any(r["reused"] for r in rows), rows
    warned = [m for m in messages if m.startswith("warning: the schedules selected in")]
    assert warned and "could not be read" in warned[0], messages
    aside = list(folder.parent.glob(f"{folder.name}.unreadable-*"))
    assert len(aside) == 1 and (aside[0] / "database_workload.json").exists()
    assert database_for(HOST) == folder


def test_an_unreadable_database_the_user_gave_is_an_error_naming_it(tmp_path):
    """`splitc tune --db` and `splitc compile --tuning-db` into a database TVM cannot read: a
    clear error naming the folder (exit 2), not TVM's parser error, and nothing moved."""
    from splitc.backend.build import build
    from splitc.errors import SplitcError

    folder = tmp_path / target_key(HOST)
    _spoil(folder)
    with pytest.raises(SplitcError, match="cannot be read"):
        tune(matmul_module(8, 16, 32), HOST, tmp_path, 0, log=lambda _m: None)
    assert (folder / "database_workload.json").exists()
    with pytest.raises(SplitcError, match=str(folder)):
        build(matmul_module(8, 16, 32), HOST.tvm_target(), tuning_db=folder)

    from .test_cli import assert_user_error, splitc

    r = splitc("compile", "mlp", "--tiny", "-o", tmp_path / "out", "--devices", "host",
               "--tuning-db", tmp_path)
    assert_user_error(r, "cannot be read", str(folder))
