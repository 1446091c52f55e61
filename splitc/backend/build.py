"""Build Relax modules into fast executables for a target: splitc's one way to call TVM.

``tvm.compile`` alone emits plain loops for convolutions and matmuls (TVM 0.27 has no default
CPU schedules). :func:`build` adds what makes the code fast without tuning:

1. :class:`~splitc.passes.codegen.merge_groups.MergeGroups` widens narrow groups to whole vectors,
   :class:`~.codegen.pack_layout.PackConvLayout` packs convolutions ``NCHW[x]c`` for the
   target's vector width, and :class:`~splitc.passes.codegen.winograd.WinogradConv` turns the 3x3
   stride-1 ones a cost model predicts faster into Winograd ``F(m, 3)`` matmuls;
2. the weight transforms this creates (layout changes, merged and Winograd kernels) are
   lifted out of the piece functions (``relax.transform.LiftTransformParams``) and applied
   once, here, to the weights — the artifact stores weights already packed and transformed,
   so no inference pays for it;
3. legalization with :func:`~splitc.passes.codegen.cpu_schedules.legalize_conv2d`, fusion, then the
   default schedules (:func:`~splitc.passes.codegen.cpu_schedules.default_rules`) on every fused
   function they match; the rest of TVM's CPU pipeline follows;
4. code generation with LLVM allowed to reorder float sums
   (:func:`~splitc.passes.codegen.cpu_schedules.reassociating`).

``schedules=False`` gives TVM's plain lowering (the reference the schedules are tested
against).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import tvm
from tvm import relax, s_tir
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.s_tir import dlight

from splitc.backend.tuning_db import apply_database, locked, readable, winograd_tiles
from splitc.passes.codegen.cpu_schedules import (
    RowSoftmax,
    default_rules,
    legalize_conv2d,
    reassociating,
    reduces,
    top_blocks,
    vector_lanes,
)
from splitc.passes.codegen.merge_groups import MergeGroups
from splitc.passes.codegen.pack_layout import PackConvLayout
from splitc.passes.codegen.winograd import WinogradConv

TRANSFORM_SUFFIX = "_transform_params"


def legalize_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """Lower Relax ops to fused TIR kernels, not yet scheduled (what tuning sees)."""
    return (cpu_pipeline.library_dispatch_passes(target)
            # exp, erf and tanh as the polynomial approximations TVM vectorises (the libm
            # calls are scalar: GELU's erf took 60 % of a ViT MLP layer)
            + [RowSoftmax(vector_lanes(target)),
               relax.transform.FastMathTransform(),
               relax.transform.LegalizeOps({"relax.nn.conv2d": legalize_conv2d}),
               relax.transform.AnnotateTIROpPattern(),
               relax.transform.FoldConstant(),
               relax.transform.FuseOps(),
               relax.transform.FuseTIR()])


def schedule(module: tvm.IRModule, target: tvm.target.Target, tuning_db: Path | None = None,
             log: Callable[[str], None] | None = None) -> tvm.IRModule:
    """Legalize, fuse, apply tuning records (if a database is given), then the default
    schedules to what is left (no packing): the Relax+TIR module."""
    with target:
        mod = tvm.transform.Sequential(legalize_passes(target))(module)
        tuned: list[str] = []
        if tuning_db is not None:
            mod = apply_database(tuning_db)(mod)
            tuned, _ = coverage(mod)
        mod = dlight.ApplyDefaultSchedule(*default_rules())(mod)
    if log is not None:
        done, plain = coverage(mod)
        source = (f"{len(tuned)} from tuning records in {tuning_db}, the rest default"
                  if tuning_db is not None else "default schedules")
        log(f"scheduled {len(done)} of {len(done) + len(plain)} kernels with a reduction "
            f"({source})" + (f"; plain loops: {', '.join(plain)}" if plain else ""))
    return mod


def coverage(scheduled: tvm.IRModule) -> tuple[list[str], list[str]]:
    """Names of the kernels with a reduction (conv, matmul, pool, ...) that got a default
    schedule, and of those left with TVM's plain loops."""
    done, plain = [], []
    for gv, func in scheduled.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        if not has_reduction(func):
            continue  # element-wise kernels: cheap either way, not counted
        if func.attrs and "tirx.is_scheduled" in func.attrs:
            done.append(gv.name_hint)
        else:
            plain.append(gv.name_hint)
    return sorted(done), sorted(plain)


def has_reduction(func: tvm.tirx.PrimFunc) -> bool:
    """Whether a (not yet scheduled) kernel has a reduction block: the ones worth scheduling."""
    sch = s_tir.Schedule(func)
    return any(reduces(sch, b) for b in top_blocks(sch))


def relax_pipeline(target: tvm.target.Target, log: Callable[[str], None] | None = None,
                   tuning_db: Path | None = None) -> tvm.transform.Pass:
    """TVM's CPU pipeline with splitc's conv legalization, tuning records and default
    schedules."""

    @tvm.transform.module_pass(opt_level=0, name="SplitcCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod = schedule(mod, target, tuning_db, log)
        with target:
            return tvm.transform.Sequential(cpu_pipeline.dataflow_lower_passes(target)
                                            + cpu_pipeline.finalize_passes(target))(mod)

    return _pipeline


def pack(module: tvm.IRModule, target: tvm.target.Target,
         winograd: Mapping[str, int] | None = None) -> tvm.IRModule:
    """Pack convolutions for ``target`` and lift the weight transforms into
    ``<function>_transform_params`` functions. ``winograd``: Winograd choices measured on the
    device (:func:`~splitc.backend.tuning_db.winograd_tiles`); the rest are predicted."""
    with target:
        lanes = vector_lanes(target)
        packed = WinogradConv(winograd)(PackConvLayout(lanes)(MergeGroups(lanes)(module)))
        return relax.transform.LiftTransformParams()(packed)


def split_transforms(lifted: tvm.IRModule) -> tuple[tvm.IRModule, dict[str, tvm.ir.GlobalVar]]:
    """``lifted`` without its ``*_transform_params`` functions (nor the kernels only they
    call), and those functions by the name of the function whose weights they transform."""
    transforms = {gv.name_hint.removesuffix(TRANSFORM_SUFFIX): gv
                  for gv in lifted.get_global_vars() if gv.name_hint.endswith(TRANSFORM_SUFFIX)}
    roots = [gv for gv, f in lifted.functions_items()
             if isinstance(f, relax.Function) and gv not in transforms.values()]
    return _with_callees(lifted, roots), transforms


def _with_callees(mod: tvm.IRModule, roots: Sequence[tvm.ir.GlobalVar]) -> tvm.IRModule:
    """The functions ``roots`` of ``mod`` and every function they call."""
    keep = set(roots)
    for gv in roots:
        relax.analysis.post_order_visit(
            mod[gv], lambda e: keep.add(e) if isinstance(e, tvm.ir.GlobalVar) else None)
    return tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv in keep})


def build(module: tvm.IRModule, target: tvm.target.Target,
          weights: Mapping[str, Sequence[np.ndarray]] | None = None, *,
          schedules: bool = True, log: Callable[[str], None] | None = None,
          tuning_db: Path | None = None,
          ) -> tuple[tvm.runtime.Executable, dict[str, list[np.ndarray]]]:
    """Compile ``module`` for ``target``; returns the executable and the weights it takes.

    Parameters
    ----------
    module : IRModule
        Relax functions. A function whose ``num_input`` attribute is set takes its weights as
        the parameters after the first ``num_input``; ``weights[name]`` gives their values.
    target : Target
        What to compile for (``TargetSpec.tvm_target()``).
    weights : mapping of function name to arrays, optional
        The weights of the functions that take any.
    schedules : bool
        Pack convolutions and apply the default schedules (True), or use TVM's plain lowering.
    log : callable, optional
        Told how many kernels got a default schedule and which kept plain loops.
    tuning_db : Path, optional
        A tuning database folder for this target (:func:`splitc.backend.tuning_db.database_for`):
        kernels with a record get their best one, the rest the default schedules; its
        measured Winograd choices replace the predicted ones.

    Returns
    -------
    executable, weights
        ``weights[name]`` are the arrays to pass after the inputs of function ``name``: packed
        to the layouts the executable expects when ``schedules`` is True.
    """
    weights = {k: list(v) for k, v in (weights or {}).items()}
    if not schedules:
        with target:
            return tvm.compile(module, target=target), weights
    lifted = pack(module, target, winograd_tiles(tuning_db))
    pieces, transforms = split_transforms(lifted)
    if transforms:
        weights = _transform_weights(lifted, transforms, weights)
    with locked(tuning_db, shared=True, log=log) if tuning_db is not None else nullcontext():
        try:
            executable = tvm.compile(pieces, target=reassociating(target),  # (reads records)
                                     relax_pipeline=relax_pipeline(target, log, tuning_db))
        except Exception:
            if tuning_db is not None:
                readable(tuning_db)  # (the cause named, if it is the database)
            raise
    return executable, weights


def _transform_weights(mod: tvm.IRModule, transforms: Mapping[str, tvm.ir.GlobalVar],
                       weights: dict[str, list[np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """Run the lifted ``*_transform_params`` functions once: in numpy when they only move
    data (layout transforms, dims), else compiled for this machine's CPU."""
    out = dict(weights)
    compiled = []
    for name, gv in transforms.items():
        moved = _move_data(mod[gv], weights.get(name, []))
        if moved is None:
            compiled.append(name)
        else:
            out[name] = moved
    if compiled:
        host = tvm.target.Target({"kind": "llvm"})
        only = _with_callees(mod, [transforms[n] for n in compiled])
        vm = relax.VirtualMachine(tvm.compile(only, target=host), tvm.cpu())
        for name in compiled:
            args = [tvm.runtime.tensor(np.require(w, requirements="C"))
                    for w in weights.get(name, [])]
            out[name] = [np.asarray(r.numpy()) for r in vm[transforms[name].name_hint](args)]
    return out


class _Unsupported(Exception):
    pass


#: Largest tensor :func:`_move_data` rearranges with index arrays (8 bytes x rank per element).
_MOVE_LIMIT = 1 << 24


def _move_data(func: relax.Function, arrays: Sequence[np.ndarray]) -> list[np.ndarray] | None:
    """Evaluate a transform-params function that only rearranges data; None if it does more."""
    env: dict[relax.Var, object] = {func.params[0]: list(arrays)}
    try:
        for block in func.body.blocks:
            for binding in block.bindings:
                env[binding.var] = _move_value(binding.value, env)
        result = _move_value(func.body.body, env)
    except _Unsupported:
        return None
    return [np.require(a, requirements="C") for a in result]  # keeps 0-d arrays 0-d


def _move_value(expr: relax.Expr, env: dict) -> object:
    if isinstance(expr, relax.Var):
        return env[expr]
    if isinstance(expr, relax.Tuple):
        return [_move_value(f, env) for f in expr.fields]
    if isinstance(expr, relax.TupleGetItem):
        return _move_value(expr.tuple_value, env)[expr.index]
    if not (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)):
        raise _Unsupported(type(expr).__name__)
    op, a = expr.op.name, expr.attrs
    x = _move_value(expr.args[0], env)
    if op == "relax.layout_transform" and a.pad_value is None and x.size <= _MOVE_LIMIT:
        return _layout_transform(x, a.index_map, [int(d) for d in expr.ty.shape])
    if op == "relax.expand_dims":
        return np.expand_dims(x, tuple(int(i) for i in a.axis))
    if op == "relax.permute_dims":
        return np.transpose(x, None if a.axes is None else [int(i) for i in a.axes])
    if op == "relax.reshape":
        return np.reshape(x, [int(d) for d in expr.ty.shape])
    raise _Unsupported(op)


def _layout_transform(x: np.ndarray, index_map, out_shape: list[int]) -> np.ndarray:
    """``out[index_map(i)] = x[i]`` for every index ``i`` of ``x`` (a bijective map)."""
    if int(np.prod(out_shape)) != x.size:
        raise _Unsupported("padding layout transform")
    coords = dict(zip(index_map.initial_indices, np.indices(x.shape), strict=True))
    out = np.empty(out_shape, dtype=x.dtype)
    out[tuple(_index(e, coords) for e in index_map.final_indices)] = x
    return out


_INDEX_OPS = {tvm.tirx.FloorDiv: np.floor_divide, tvm.tirx.FloorMod: np.mod,
              tvm.tirx.Add: np.add, tvm.tirx.Sub: np.subtract, tvm.tirx.Mul: np.multiply}


def _index(expr, coords):
    """Evaluate an index expression (vars, integers, + - * // %) on numpy index arrays."""
    if isinstance(expr, tvm.ir.Var):
        return coords[expr]
    if isinstance(expr, tvm.tirx.IntImm):
        return int(expr.value)
    for kind, fn in _INDEX_OPS.items():
        if isinstance(expr, kind):
            return fn(_index(expr.a, coords), _index(expr.b, coords))
    raise _Unsupported(type(expr).__name__)
