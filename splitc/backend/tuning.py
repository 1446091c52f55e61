"""Schedule selection and tuning records: a MetaSchedule database per target, every build
uses one.

A tuning database is a folder per target (``<root>/<key>/database_*.json``, the key names the
target and, for the host, its CPU: records measured on one CPU mean nothing on another).
Records are keyed by the kernel's structure (op, shapes, dtype), so a record for one model
serves every model and every split piece with the same kernel.

:func:`tune` extracts the kernels of a model exactly as :func:`splitc.backend.build.build` compiles
them (packed layouts, fused), then:

1. **selects** (seconds per kernel, not a search): each kernel's default schedule and its few
   candidates under other CPU-dependent choices (:func:`~splitc.passes.codegen.cpu_schedules.
   candidate_knobs`: register tiles, loop order) are measured on the device and committed as
   records, so the database gives the kernel the fastest, and never one slower than the
   default schedule. A compile for the host does this by itself, once per kernel and CPU
   (:func:`splitc.backend.kinds.select_here`, into :func:`~.tuning_db.selection_root`);
2. with ``trials`` > 0, **tunes**: MetaSchedule searches from there and keeps what is faster.

At build time (:func:`~.tuning_db.database_for`), a database given with ``--tuning-db``
is used, else the selection for that target key, else one shipped in
``splitc/backend/tuning_records/``; kernels without a record keep their default schedule.

Where candidates are measured: the host tunes on this machine. A board tunes through TVM's
RPC: candidates are cross-compiled here (a shared library linked by the target's cross
compiler) and sent through an RPC tracker to a board running the runtime-only RPC server
(``splitc tune-agent`` / ``python -m splitc.runtime.tune_agent``), which loads and times them.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tvm

from splitc import targets as target_registry
from splitc.backend.build import has_reduction, legalize_passes, pack, split_transforms
from splitc.backend.tuning_db import (
    locked,
    open_database,
    save_winograd_tiles,
    selection_root,
    target_key,
    winograd_tiles,
)
from splitc.errors import SplitcError
from splitc.passes.codegen import winograd
from splitc.passes.codegen.cpu_schedules import (
    Knobs,
    candidates,
    default_schedule,
    is_winograd,
    reassociating,
    vector_lanes,
)
from splitc.passes.codegen.merge_groups import MergeGroups
from splitc.passes.codegen.pack_layout import PackConvLayout


def kernels(module: tvm.IRModule, target: tvm.target.Target,
            winograd: dict[str, int] | None = None) -> tvm.IRModule:
    """The fused, not yet scheduled kernels of ``module`` as a build compiles them (with the
    Winograd choices ``winograd``)."""
    pieces, _ = split_transforms(pack(module, target, winograd))
    with target:
        return tvm.transform.Sequential(legalize_passes(target))(pieces)


@dataclass(frozen=True)
class Rpc:
    """An RPC tracker (``host:port``) and the key the target's boards register under."""

    host: str
    port: int
    key: str
    session_timeout: int = 120

    @classmethod
    def parse(cls, tracker: str, key: str, session_timeout: int = 120) -> Rpc:
        host, sep, port = tracker.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise SplitcError(f"--rpc {tracker!r}: give the tracker as HOST:PORT")
        if not key:
            raise SplitcError("--key: give the key the boards registered with the tracker")
        return cls(host, int(port), key, session_timeout)


def export_cross(mod, compiler: str) -> str:
    """MetaSchedule's export for a board: a shared library linked by ``compiler``."""
    from tvm.support.cc import cross_compiler

    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=cross_compiler(compiler))
    return path


def alloc_from_here(session, device, args_info, alloc_repeat):
    """MetaSchedule's argument allocation on a board whose runtime has no random fill (the
    runtime-only library lacks ``tvm.contrib.random``): values are drawn here and copied."""
    import numpy as np
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    rng = np.random.default_rng(0)

    def fill(arr):
        arr.copyfrom(rng.uniform(-1, 1, size=tuple(arr.shape)).astype(str(arr.dtype)))

    return alloc_argument_common(fill, device, args_info, alloc_repeat)


def _require_measurable(spec, rpc: Rpc | None) -> None:
    """Refuse what cannot be measured: an FPGA fabric, a board's code without ``rpc``."""
    if spec.is_fpga:
        raise SplitcError(f"{spec.name} is an FPGA fabric: hls4ml builds its pieces, there "
                          "is nothing to tune")
    if rpc is None and not spec.is_host:
        raise SplitcError(
            f"tuning measures on the device; {spec.name} code does not run here: give --rpc "
            f"TRACKER_HOST:PORT --key KEY, with a board running `splitc tune-agent --tracker "
            f"TRACKER_HOST:PORT --key KEY` (an armv7 board, for which TVM has no Python "
            "wheel: TVM's C++ RPC server, `tvm_rpc server --tracker=TRACKER_HOST:PORT "
            "--key=KEY`, built by scripts/armhf-rpc.sh; start a tracker with `python -m "
            "tvm.exec.rpc_tracker --port 9190`)")


#: How a kernel is timed (selection, Winograd choice, tuning): as it runs inside a model, its
#: weights and output not in cache (every argument but the first, the input that the kernel
#: before just wrote, is flushed before each call), one call per sample, ten samples. Timed
#: warm, over and over, the candidates ranked differently than inside the model: on the
#: AVX-512 Xeon, ResNet-50's 1x1 convolutions ran 18 % slower in the model than warm, and
#: ResNet-18 with its warm-selected schedules measured 6 % slower than with the defaults.
IN_MODEL = {"number": 1, "repeat": 10, "min_repeat_ms": 0, "enable_cpu_cache_flush": True}


def _measurer(spec, rpc: Rpc | None):
    """MetaSchedule's builder and runner for ``spec``: local for the host, cross-compiled
    and timed through RPC for a board (each starts worker processes: made only when there
    is something to measure)."""
    from tvm.s_tir import meta_schedule as ms

    _require_measurable(spec, rpc)
    if spec.is_host and rpc is None:
        builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=120, f_build=build_kernel)
        return builder, ms.runner.LocalRunner(
            timeout_sec=60, evaluator_config=ms.runner.EvaluatorConfig(**IN_MODEL))
    export = "meta_schedule.builder.default_export" if spec.is_host else \
        functools.partial(export_cross, compiler=spec.cross_compiler)
    builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=300, f_build=build_kernel,
                                      f_export=export)
    runner = ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(rpc.host, rpc.port, rpc.key,
                                       session_timeout_sec=rpc.session_timeout),
        evaluator_config=ms.runner.EvaluatorConfig(**IN_MODEL),
        f_alloc_argument=alloc_from_here, max_workers=1)
    return builder, runner


def _progress(total: int, tell: Callable[[float, str], None]):
    """A measure callback that tells ``tell(fraction, text)`` how many trials are measured
    and the best time of the kernel just measured."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            self.done, self.best = 0, {}

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            self.done += len(measure_candidates)
            for r in runner_results:
                if not r.error_msg and r.run_secs:
                    secs = sum(float(s) for s in r.run_secs) / len(r.run_secs)
                    self.best[task_id] = min(self.best.get(task_id, secs), secs)
            best = self.best.get(task_id)
            tell(min(1.0, self.done / max(1, total)),
                 f"{self.done}/{total} trials; kernel {task_id}: best {_ms(best)}")

    return Progress()


def tune(module: tvm.IRModule, spec: target_registry.TargetSpec, root: str | Path | None,
         trials: int, log: Callable[[str], None] = print, *, rpc: Rpc | None = None,
         progress: Callable[[float, str], None] | None = None) -> list[dict]:
    """Select, then tune, the kernels of ``module`` for ``spec`` into ``root/<key>`` (``root``
    None: :func:`~.tuning_db.selection_root`, what builds use by default): on this machine
    for the host, through ``rpc`` on a board.

    First the quick selection: Winograd or direct per 3x3 convolution (:func:`_choose_winograd`)
    and each kernel's handful of default-schedule candidates (:func:`_commit_candidates`),
    measured, seconds per kernel; then, if ``trials`` > 0, MetaSchedule's
    search from there. Identical kernels (same structure) are measured once however many
    pieces hold them; kernels already in the database are not selected again. Returns one row
    per kernel with a reduction (none if it has none): name, default-schedule seconds, the
    selection's seconds and choice, the best seconds after tuning. ``progress(fraction,
    text)`` is told as candidates and trials are measured.
    """
    _require_measurable(spec, rpc)
    work = Path(root if root is not None else selection_root()) / target_key(spec)
    try:
        with locked(work, log=log):  # (other splitc processes read and write it too)
            database = open_database(work, cache=root is None, log=log)
            return _select_and_tune(module, spec, work, database, trials, log, rpc, progress)
    finally:  # (also when a measurement fails: the pools' processes would outlive this one)
        _stop_pools()


def _select_and_tune(module, spec, work: Path, database, trials, log, rpc, progress
                     ) -> list[dict]:
    from tvm.s_tir import meta_schedule as ms

    target = spec.tvm_target()
    measurer = functools.cache(lambda: _measurer(spec, rpc))
    where = f"through RPC ({rpc.host}:{rpc.port}, key {rpc.key})" if rpc else "on this machine"
    start = time.perf_counter()
    tiles = winograd_tiles(work)
    chosen = _choose_winograd(module, target, tiles, measurer, log)
    if chosen:
        tiles.update(chosen)
        save_winograd_tiles(work, tiles)
        log(f"Winograd or direct, measured {where} for {len(chosen)} convolutions: "
            + ", ".join(f"{k} {f'F({m},3)' if m else 'direct'}" for k, m in chosen.items()))
    fused = kernels(module, target, tiles)
    tasks = [t for t in ms.relax_integration.extract_tasks(fused, target)
             if has_reduction(t.dispatched[0]["main"])]
    if not tasks:
        return []
    selected = _commit_candidates([t.dispatched[0] for t in tasks], target, database,
                                  measurer, log, progress)
    rows = [{"kernel": t.task_name, **row} for t, row in zip(tasks, selected, strict=True)]
    fresh = [r for r in rows if not r["reused"]]
    if fresh:
        log(f"{len(tasks)} distinct kernels for {spec.name}: {len(fresh)} selected {where} "
            f"({sum(r['candidates'] for r in fresh)} candidate schedules, "
            f"{time.perf_counter() - start:.1f} s), {len(tasks) - len(fresh)} already in "
            f"{work}")
    else:
        log(f"{len(tasks)} distinct kernels for {spec.name}: all selected before, in {work}")
    # MetaSchedule's generic rules do not unroll a Winograd kernel's transforms into its
    # constant terms: for ResNet-18's 56x56x64 layer the best of 64 candidates ran about 9x
    # slower than the default schedule, and each candidate takes LLVM seconds to build. Those
    # kernels keep their selected record; the trials go to the others.
    searched = [t for t in tasks if not is_winograd(t.dispatched[0]["main"])]
    if trials > 0 and len(searched) < len(tasks):
        log(f"{len(tasks) - len(searched)} Winograd kernels keep their selected schedule "
            "(not searched)")
    if trials > 0 and searched:
        builder, runner = measurer()
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            searched, work_dir=str(work))
        start = time.perf_counter()
        callbacks = ms.measure_callback.MeasureCallback.create("default")
        if progress is not None:
            callbacks = [*callbacks, _progress(trials, progress)]
        ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work),
                           max_trials_global=trials, num_trials_per_iter=min(64, trials),
                           builder=builder, runner=runner, database=database,
                           measure_callbacks=callbacks)
        log(f"tuned {len(searched)} kernels, {trials} trials in "
            f"{time.perf_counter() - start:.0f} s")
    for row, task in zip(rows, tasks, strict=True):
        best = database.get_top_k(database.commit_workload(task.dispatched[0]), 1)
        row["best_s"] = _seconds(best[0]) if best else None
    return rows


def _stop_pools() -> None:
    """Stop the worker processes MetaSchedule's builder and runner pools started (they
    would otherwise outlive this process)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if "tvm.exec.popen_worker" in " ".join(child.cmdline()):
                child.terminate()
        except psutil.Error:
            pass


def build_kernel(mod, target, _params=None):
    """MetaSchedule's default build without ``import tvm.s_tir.tensor_intrin`` (which parses
    every GPU and int8 intrinsic: ~30 s per builder process; fp32 CPU kernels use none), with
    the code generator's freedom :func:`splitc.backend.build.build` gives (candidates are timed as
    they will run)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock


    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod),
                     target=reassociating(target))


def _choose_winograd(module: tvm.IRModule, target: tvm.target.Target, known: dict[str, int],
                     measurer: Callable[[], tuple], log: Callable[[str], None]
                     ) -> dict[str, int]:
    """Winograd or direct, measured: for each 3x3 stride-1 convolution of ``module`` with no
    choice in ``known``, the direct kernel and each Winograd tile are built alone (conv, bias,
    ReLU), with their default schedules, and timed on the device. Winograd is taken where it
    runs in at most :data:`~splitc.passes.codegen.winograd.MARGIN` of the direct kernel's
    time, as the predicted choice is. Returns the new choices (tile, 0: direct)."""
    from tvm.s_tir import meta_schedule as ms

    lanes = vector_lanes(target)
    with target:
        packed = PackConvLayout(lanes)(MergeGroups(lanes)(module))
    todo: dict[str, tvm.IRModule] = {}
    for _, func in packed.functions_items():
        if isinstance(func, tvm.relax.Function):
            for call in winograd.eligible_convs(func):
                key = winograd.winograd_key(call)
                if key not in known and key not in todo:
                    todo[key] = _lone_conv(call)
    if not todo:
        return {}
    variants = [(key, m) for key in todo for m in (0, *winograd.TILES)]
    inputs, owners = [], []
    for key, m in variants:
        for task in ms.relax_integration.extract_tasks(kernels(todo[key], target, {key: m}),
                                                       target):
            func = task.dispatched[0]["main"]
            sch = default_schedule(func, target) if has_reduction(func) else None
            if sch is not None:
                inputs.append(ms.builder.BuilderInput(sch.mod, target))
                owners.append(((key, m), func))
    builder, runner = measurer()
    seconds: dict[tuple[str, int], float] = {}
    built = builder.build(inputs)
    ran, runs = [], []
    for owner, b in zip(owners, built, strict=True):
        if b.error_msg:
            seconds[owner[0]] = float("inf")
            continue
        args_info = ms.arg_info.ArgInfo.from_prim_func(owner[1])
        runs.append(ms.runner.RunnerInput(b.artifact_path, "cpu", args_info))
        ran.append(owner)
    for (variant, _), future in zip(ran, runner.run(runs), strict=True):
        result = future.result()
        secs = [float(s) for s in result.run_secs] if not result.error_msg else []
        seconds[variant] = seconds.get(variant, 0.0) + (
            sum(secs) / len(secs) if secs else float("inf"))
    chosen = {}
    for key in todo:
        direct = seconds.get((key, 0), float("inf"))
        best = min(winograd.TILES, key=lambda m, k=key: seconds.get((k, m), float("inf")))
        fast = seconds.get((key, best), float("inf")) <= winograd.MARGIN * direct
        chosen[key] = best if fast else 0
        if direct == float("inf"):
            log(f"  {key}: the direct convolution did not build or run; Winograd by "
                "measurement only")
    return chosen


def _lone_conv(call: tvm.relax.Call) -> tvm.IRModule:
    """The convolution of packed ``call`` alone, as a model holds it (``NCHW``, weights after
    the input, bias and ReLU fused after it): what :func:`_choose_winograd` times."""
    from tvm import relax

    batch, i_chunks, height, width, ib = (int(d) for d in call.args[0].ty.shape)
    c_in, c_out = i_chunks * ib, int(call.ty.shape[1]) * int(call.ty.shape[4])
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, c_in, height, width), "float32"))
    w = relax.Var("w", relax.TensorType((c_out, c_in, 3, 3), "float32"))
    b = relax.Var("b", relax.TensorType((1, c_out, 1, 1), "float32"))
    with bb.function("main", [x, w, b], attrs={"num_input": 1}):
        with bb.dataflow():
            y = relax.op.nn.conv2d(x, w, padding=[int(p) for p in call.attrs.padding])
            out = bb.emit_output(relax.op.nn.relu(relax.op.add(y, b)))
        bb.emit_func_output(out)
    return bb.get()


def _commit_candidates(mods, target, database, measurer: Callable[[], tuple],
                       log: Callable[[str], None] = print,
                       progress: Callable[[float, str], None] | None = None) -> list[dict]:
    """The quick selection: build every distinct candidate of each kernel's default schedule
    (:func:`~splitc.passes.codegen.cpu_schedules.candidates`), measure them the way
    MetaSchedule measures its own, and commit each as a tuning record (the database then
    gives a kernel its fastest). Kernels that already have records are not measured again.

    Returns per kernel: ``default_s`` (the default schedule's seconds; None where it has
    none, failed, or was not measured again), ``selected_s`` (the best record's),
    ``choice`` (the knobs of the best candidate measured now), ``candidates`` (how many),
    ``reused`` (records were there already)."""
    from tvm.s_tir import meta_schedule as ms

    rows, todo = [], []
    for i, mod in enumerate(mods):
        reused = database.has_workload(mod)
        rows.append({"default_s": None, "selected_s": None, "choice": None,
                     "candidates": 0, "reused": reused})
        if reused:
            continue
        for knobs, sch in candidates(mod["main"], target):
            todo.append((i, knobs, sch))
            rows[i]["candidates"] += 1
    if not todo:
        return _selected(mods, database, rows)
    builder, runner = measurer()
    if progress is not None:
        progress(0.0, f"building {len(todo)} candidate schedules")
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, _, sch in todo])
    inputs, ran = [], []
    for (i, knobs, sch), b in zip(todo, built, strict=True):
        if b.error_msg:
            log(f"  kernel {i}: candidate {knobs.label} did not build: "
                f"{b.error_msg.strip().splitlines()[-1][:300]}")
            continue
        args_info = ms.arg_info.ArgInfo.from_prim_func(mods[i]["main"])
        inputs.append(ms.runner.RunnerInput(b.artifact_path, "cpu", args_info))
        ran.append((i, knobs, sch))
    best: dict[int, float] = {}
    for n, ((i, knobs, sch), future) in enumerate(zip(ran, runner.run(inputs), strict=True)):
        result = future.result()
        if progress is not None:
            progress((n + 1) / len(ran), f"measured {n + 1}/{len(ran)} candidate schedules")
        if result.error_msg or not result.run_secs:
            log(f"  kernel {i}: candidate {knobs.label} did not run: "
                f"{(result.error_msg or 'no times').strip().splitlines()[-1][:300]}")
            continue
        secs = [float(s) for s in result.run_secs]
        database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, database.commit_workload(mods[i]), secs, target,
            ms.arg_info.ArgInfo.from_prim_func(mods[i]["main"])))
        mean = sum(secs) / len(secs)
        if knobs == Knobs():
            rows[i]["default_s"] = mean
        if mean < best.get(i, float("inf")):
            best[i], rows[i]["choice"] = mean, knobs.label
    return _selected(mods, database, rows)


def _selected(mods, database, rows: list[dict]) -> list[dict]:
    """``rows`` with each kernel's best record's seconds as ``selected_s``."""
    for i, mod in enumerate(mods):
        top = database.get_top_k(database.commit_workload(mod), 1) \
            if database.has_workload(mod) else []
        rows[i]["selected_s"] = _seconds(top[0]) if top else None
    return rows


def _seconds(record) -> float | None:
    secs = [float(s) for s in record.run_secs] if record.run_secs else []
    return sum(secs) / len(secs) if secs and max(secs) < 1e9 else None


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3f} ms"
