"""``splitc profile --target host``: measure how fast this machine runs compiled pieces.

The cost model prices a piece call as ``FLOPs / rate + weight bytes x per_weight_byte +
boundary bytes x per_byte + call overhead`` (+ FLOPs x tile_seconds_per_flop in a spatial
split's pieces, + boundary bytes x channel_seconds_per_byte in a channel split's). The three
rates are fitted (least squares, in relative error; the whole-model timings weigh as much as
all the pieces together, :func:`fit_model_rates`) to timings of what splits are made of:

* the whole model compiled as one piece, at its input size and at half the rows and columns
  (a quarter of the FLOPs does not take a quarter of the time: every weight is still read
  once, which is what a spatial split's tiles each pay);
* the pieces of the model split two ways spatially (``tile_ways``: as many ways as the cluster
  it is for has devices; at the most and the least recomputation
  the search tries), timed one after another as a worker runs them: each converts its inputs
  and outputs between layouts, slices and concatenates rows.
  What they took beyond the fitted rates, per FLOP, is the tile term: a layer computed a few
  rows at a time runs slower than the whole layer;
* one device's pieces of the model split as many ways by output channels: each reads the
  whole gathered input of its layer and writes a slice, so they move many bytes per FLOP
  (ResNet-50, four ways: 52 MB in and out of one device's pieces for 2 GFLOP), 1.7x what the
  rates say on one core alone (3.4x in the emulated cluster) and more than the rates fitted
  with them can take in (the boundary term moved 35 -> 42 ps per byte). What they took
  beyond the rates, per byte in or out, is the channel term.

Every layer also becomes its own piece (the outline pass with one device per binding), timed
with TVM's time evaluator: FLOP/s per operator kind, and the fixed cost of a call (the
median of the pieces that compute next to nothing). The table is stored where the cost
model reads it for that target.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from splitc import frontend
from splitc import targets as target_registry
from splitc.backend.build import build
from splitc.backend.kinds import select_by_default, select_here
from splitc.backend.tuning_db import database_for
from splitc.errors import SplitcError
from splitc.passes.analysis import profile as binding_costs
from splitc.passes.codegen.cpu_schedules import CODEGEN
from splitc.passes.ir import lift_weights, main_block, op_name
from splitc.passes.split.channel import ChannelSplit, plan_channel
from splitc.passes.split.outline import OutlinePieces
from splitc.passes.split.spatial import HALO_CAPS, SpatialSplit, plan_spatial
from splitc.planning.cost import PROFILE_FORMAT, DeviceSpeed, profile_dir
from splitc.planning.extract import extract

#: ``progress(fraction done, what now)``: told as the measurement goes.
Progress = Callable[[float, str], None]


def measure(model: str, target: str = "host", *, tiny: bool = False, number: int = 5,
            input_shapes=None, progress: Progress | None = None, tile_ways: int = 2) -> dict:
    """Time every layer of ``model`` compiled for ``target`` on this machine
    (``tile_ways``: the spatial splits whose tiles fit the tile term)."""
    tell = progress or (lambda _f, _what: None)
    spec = target_registry.get(target)
    if spec.cross_compiler:
        raise SplitcError(f"profiling runs the code here; {target} code does not run on this "
                          "machine (profile on the board, or give gflops in the cluster file)")
    tell(0.0, f"importing {model}")
    imported = frontend.load(model, input_shapes, tiny=tiny)
    if spec.is_host and select_by_default():
        # timed as compiles will build it: with the schedules selected on this CPU
        tell(0.01, "selecting schedules on this CPU")
        func, _ = lift_weights(imported.mod["main"])
        select_here(tvm.IRModule({"main": func}), spec, lambda _m: None)
    bindings = list(main_block(imported.mod).bindings)
    split = OutlinePieces({b.var.name: i for i, b in enumerate(bindings)})(imported.mod)
    tell(0.02, f"compiling {len(bindings)} layers, each as its own piece")
    ex, vm, weights = _compile_pieces(split, spec)
    env = {name: tvm.runtime.tensor(x) for name, x in
           zip(imported.input_names, imported.random_inputs(), strict=True)}
    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # kind -> [flops, seconds]
    overhead = []
    for i, p in enumerate(ex.pieces):
        tell(0.2 + 0.3 * i / len(ex.pieces), f"timing layer {i + 1} of {len(ex.pieces)}")
        args = [env[t] for t in p.inputs] + [tvm.runtime.tensor(w) for w in weights[p.name]]
        out = vm[p.name](*args)
        outs = [out] if len(p.outputs) == 1 else [out[i] for i in range(len(p.outputs))]
        env.update(zip(p.outputs, outs, strict=True))
        seconds = vm.time_evaluator(p.name, tvm.cpu(), number=number)(*args).mean
        kind = op_name(split[p.name].body.blocks[0].bindings[0].value)
        kinds[kind][0] += p.flops
        kinds[kind][1] += seconds
        if p.flops < 1e4:
            overhead.append(seconds)
    total_flops = sum(v[0] for v in kinds.values())
    total_seconds = sum(v[1] for v in kinds.values())
    call = overhead_of(overhead)
    tell(0.5, "timing the whole model")
    runs, notes = [_whole_model_run(imported, spec, number)], []
    half = halved_inputs(imported)
    if half is None:
        notes.append("no smaller input (not images)")
    else:  # the whole model at half the rows and columns: FLOPs / 4, the same weights
        tell(0.65, f"timing the whole model at {half}")
        try:
            runs.append(_whole_model_run(frontend.load(model, half, tiny=tiny), spec, number))
            notes.append(f"the model at {half}")
        except Exception as e:  # (any importer or compiler failure: fit without it)
            notes.append(f"not the model at {half}: {e}".splitlines()[0])
    tell(0.8, f"timing the pieces of {tile_ways}-way spatial splits")
    spatial = _spatial_runs(imported.mod, spec, number, tile_ways)
    tell(0.9, f"timing one device's pieces of a {tile_ways}-way channel split")
    channel = _channel_runs(imported.mod, spec, number, tile_ways)
    tell(1.0, "fitting the rates")
    whole = len(runs)
    runs += spatial + channel
    notes.append(f"{len(spatial)} pieces of {tile_ways}-way spatial splits" if spatial else
                 "no spatial split (nothing to tile)")
    notes.append(f"{len(channel)} pieces of a {tile_ways}-way channel split" if channel else
                 "no channel split (no layer to divide)")
    runs = [(x, seconds - call) for x, seconds in runs]
    rate, per_weight_byte, per_byte = fit_model_rates(runs, whole)
    # what the spatial split's tiles took beyond the three rates, per FLOP: a layer computed
    # a few rows at a time runs slower than the whole layer (ResNet-50's two-way tiles:
    # ~13 % over the rates that fit the whole model)
    fitted = DeviceSpeed(rate, 0.0, "fit", per_byte, per_weight_byte)
    tiles = runs[whole:whole + len(spatial)]
    tile_seconds_per_flop = max(0.0, sum(t - fitted.piece_seconds(*x) for x, t in tiles)) / \
        max(sum(x[0] for x, _ in tiles), 1)
    # and what the channel split's pieces took beyond them, per byte in or out: the rates
    # cannot also fit them (ResNet-50, four ways: 1.7x their price; the extra tracks the
    # bytes a piece moves, 240-570 ps per byte, better than its FLOPs, 5-36 ps per FLOP)
    divided = runs[whole + len(spatial):]
    channel_seconds_per_byte = max(0.0, sum(t - fitted.piece_seconds(*x)
                                            for x, t in divided)) / \
        max(sum(x[2] for x, _ in divided), 1)
    # and the three rates fitted to each split's pieces alone, which price them where
    # measured: the one extra term above cannot follow a thin tile's weights and boundary
    tile_rates, channel_rates = split_rates(tiles), split_rates(divided)
    fitted = dataclasses.replace(fitted, tile_seconds_per_flop=tile_seconds_per_flop,
                                 channel_seconds_per_byte=channel_seconds_per_byte,
                                 tile_rates=tile_rates, channel_rates=channel_rates)
    error = float(np.mean([abs(fitted.piece_seconds(
        *x, tiled=whole <= i < whole + len(spatial), divided=i >= whole + len(spatial)) - t)
        / t for i, (x, t) in enumerate(runs)]))
    return {
        "target": target, "model": model + (" (tiny)" if tiny else ""), "codegen": CODEGEN,
        "format": PROFILE_FORMAT,
        # fitted to whole-model and split-piece timings (module docstring); one layer per
        # piece, the pieces also convert every tensor (kept as layer_flops_per_second)
        "flops_per_second": rate,
        "seconds_per_weight_byte": per_weight_byte,
        "seconds_per_byte": per_byte,
        "tile_seconds_per_flop": tile_seconds_per_flop,
        "channel_seconds_per_byte": channel_seconds_per_byte,
        "tile_rates": list(tile_rates), "channel_rates": list(channel_rates),
        "fitted_on": "the whole model, " + ", ".join(notes),
        "fit_error": error,
        "layer_flops_per_second": total_flops / total_seconds,
        "call_overhead": call,
        "ops": {k: {"flops": f, "seconds": s, "flops_per_second": f / s if s else None}
                for k, (f, s) in sorted(kinds.items(), key=lambda kv: -kv[1][1])},
        "total_seconds": total_seconds,
    }


def _compile_pieces(split: tvm.IRModule, spec, first_device: bool = False):
    """Extract the pieces of ``split`` and compile them all (or only the first device's)
    into one module for ``spec``."""
    ex = extract(split)
    module = tvm.IRModule()
    for device, dev_mod in ex.modules.items():
        if first_device and device != ex.names[0]:
            continue
        for gv, func in dev_mod.functions.items():
            if gv.name_hint not in [g.name_hint for g in module.get_global_vars()]:
                module[gv] = func
    names = {g.name_hint for g in module.get_global_vars()}
    executable, weights = build(module, spec.tvm_target(),
                                {k: v for k, v in ex.weights.items() if k in names},
                                tuning_db=database_for(spec))
    return ex, relax.VirtualMachine(executable, tvm.cpu()), weights


Run = tuple[tuple[float, float, float], float]  # ((FLOPs, weight bytes, edge bytes), seconds)
#: The share of the rates' fit the whole-model timings carry together, against the split
#: pieces' (see measure). A fixed weight of 10 per timing let the pieces outvote them as
#: tiles grew more and thinner: ResNet-50 profiled for 16-way tiles (550 pieces) priced the
#: whole model 15 % over its own timing (the one-device row of the N=16 cluster run +22-25 %),
#: for 2-way tiles (83 pieces) 9 % under; weighed as much as the pieces, within 1 % at both.
WHOLE_MODEL_SHARE = 0.5


def _spatial_runs(mod: tvm.IRModule, spec, number: int, ways: int = 2) -> list[Run]:
    """The pieces of ``mod`` split ``ways`` ways spatially, at the most and the least
    recomputation the search tries (few long pieces, or many short ones that hand on more
    bytes: without these the boundary term took in what the long tiles' layers lose), each
    timed in plan order as a worker runs them; none where the model has nothing to tile."""
    plans = {}  # segments -> plan: two caps can give the same split
    for cap in (max(HALO_CAPS), min(HALO_CAPS)):
        plan = plan_spatial(mod, ways, max_overhead=cap)
        if plan.segments:
            plans.setdefault(plan.segments, plan)
    return [run for plan in plans.values()
            for run in _split_pieces(SpatialSplit(plan)(mod), spec, number)]


def _channel_runs(mod: tvm.IRModule, spec, number: int, ways: int) -> list[Run]:
    """The first device's pieces of ``mod`` split ``ways`` ways by output channels (the
    other devices' are alike), timed as its worker runs them; none where no layer divides."""
    plan = plan_channel(mod, ways)
    if not plan.layers:
        return []
    return _split_pieces(ChannelSplit(plan)(mod), spec, number, first_device=True)


def _split_pieces(split: tvm.IRModule, spec, number: int, first_device: bool = False
                  ) -> list[Run]:
    """The pieces of ``split`` (only the first device's: ``first_device``), each device's
    timed one after another as its worker runs them (what one piece leaves in the caches is
    not the next one's), each the median of ``max(number, 3)`` rounds."""
    ex, vm, weights = _compile_pieces(split, spec, first_device)
    rng = np.random.default_rng(0)
    tensors = ex.tensors
    pieces = [p for p in ex.pieces if not first_device or p.device == ex.names[0]]
    calls = [(p, vm[p.name], [tvm.runtime.tensor(rng.random(tensors[t].shape, "float32")
                                                 .astype(tensors[t].dtype)) for t in p.inputs]
              + [tvm.runtime.tensor(w) for w in weights[p.name]]) for p in pieces]
    # one device's pieces after another, as its worker runs them: in plan order the next
    # piece is the same layers' next tile, whose weights the last one left in the caches (on
    # eight-way tiles of ResNet-50 that made them look twice as fast as a worker runs them)
    calls.sort(key=lambda call: call[0].device)
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(max(number, 3) + 1):  # (the first round warms up)
        for p, f, args in calls:
            t0 = time.perf_counter()
            f(*args)
            times[p.name].append(time.perf_counter() - t0)
    return [((p.flops, p.weight_bytes, sum(tensors[t].nbytes for t in (*p.inputs, *p.outputs))),
             float(np.median(times[p.name][1:]))) for p, _, _ in calls]


def halved_inputs(imported: frontend.ImportedModel) -> dict | None:
    """The input shapes with half the rows and columns, or None unless every input is an
    image batch (N, C, H, W) of at least 8x8."""
    shapes = {name: tuple(x.shape) for name, x in
              zip(imported.input_names, imported.random_inputs(), strict=True)}
    if not all(len(s) == 4 and min(s[2:]) >= 8 for s in shapes.values()):
        return None
    return {name: (*s[:2], s[2] // 2, s[3] // 2) for name, s in shapes.items()}


def fit_rates(runs: list[Run], weights: list[float] | None = None
              ) -> tuple[float, float, float]:
    """FLOP/s, seconds per weight byte and seconds per boundary byte that fit ``runs`` best,
    ``seconds = FLOPs / rate + weight bytes x per_weight_byte + edge bytes x per_byte``, in
    relative error (least squares, each run's error times its weight, default 1). Terms the
    runs cannot tell apart (fewer runs than terms) are left out, last first; a term fitted
    negative is dropped and the rest fitted again; a run set that cannot tell FLOPs from the
    rest gives their plain ratio."""
    x = np.array([r[0] for r in runs], dtype=float)
    t = np.array([r[1] for r in runs], dtype=float)
    w = (np.ones(len(runs)) if weights is None else np.array(weights)) / np.maximum(t, 1e-9)
    keep = [0, 1, 2]
    while len(keep) > 1 and np.linalg.matrix_rank(x[:, keep] * w[:, None]) < len(keep):
        keep.pop()
    while True:
        coef = np.zeros(3)
        coef[keep] = np.linalg.lstsq(x[:, keep] * w[:, None], t * w, rcond=None)[0]
        if coef[0] <= 0:
            return float(x[:, 0].sum() / max(t.sum(), 1e-9)), 0.0, 0.0
        negative = [k for k in keep[1:] if coef[k] < 0]
        if not negative:
            return 1.0 / float(coef[0]), float(coef[1]), float(coef[2])
        keep.remove(min(negative, key=lambda k: coef[k]))


def fit_model_rates(runs: list[Run], whole: int) -> tuple[float, float, float]:
    """:func:`fit_rates` of a profile: the first ``whole`` runs time the whole model, the rest
    split pieces. The whole-model timings weigh WHOLE_MODEL_SHARE of the fit together,
    however many pieces there are: the one-device plan, which every split is weighed against,
    is priced to within a few per cent; the pieces fit as well as three rates allow
    (ResNet-50's first pieces, with the stem convolution, take ~30 % longer than the rates
    say), and each split's own rates price its pieces (:func:`split_rates`)."""
    pieces = len(runs) - whole
    heavy = max(1.0, WHOLE_MODEL_SHARE / (1 - WHOLE_MODEL_SHARE) * pieces / max(whole, 1))
    return fit_rates(runs, [heavy] * whole + [1.0] * pieces)


def split_rates(runs: list[Run]) -> tuple[float, ...]:
    """Seconds per FLOP, per weight byte and per byte in or out fitted to one split's pieces
    (:func:`fit_rates`); none for fewer than three pieces, or pieces without FLOPs. A piece
    shorter than the median piece counts as if it were that long: what is left of a few-
    microsecond piece after the call overhead is noise (some come out below zero), and fitted
    in relative error it outweighed the pieces that make a split's time (the tiny ResNet-18's
    fit fell back to FLOPs alone in one profile of four)."""
    if len(runs) < 3:
        return ()
    seconds = np.array([t for _, t in runs])
    floor = max(float(np.median(seconds)), 1e-9)
    weights = np.maximum(seconds, 1e-12) / np.maximum(seconds, floor)
    rate, per_weight_byte, per_byte = fit_rates(runs, list(weights))
    return (1.0 / rate, per_weight_byte, per_byte) if rate > 0 else ()


def overhead_of(calls: list[float]) -> float:
    return float(np.median(calls)) if calls else 0.0


def _whole_model_run(imported: frontend.ImportedModel, spec, number: int) -> Run:
    """The whole model compiled as one function (weights lifted, as in pieces), timed."""
    rows = binding_costs(imported.mod)
    edge = sum(x.nbytes for x in imported.random_inputs()) + sum(
        r.out_bytes for r in rows[-1:])
    return ((float(sum(r.flops for r in rows)), float(sum(r.weight_bytes for r in rows)),
             float(edge)), _whole_model_seconds(imported, spec, number))


def _whole_model_seconds(imported: frontend.ImportedModel, spec, number: int) -> float:
    """Seconds for the whole model compiled as one function (weights lifted, as in pieces)."""
    func, arrays = lift_weights(imported.mod["main"])
    executable, weights = build(tvm.IRModule({"main": func}), spec.tvm_target(),
                                {"main": arrays}, tuning_db=database_for(spec))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(x) for x in imported.random_inputs()]
    args += [tvm.runtime.tensor(w) for w in weights["main"]]
    # warmed up first (ResNet-50: 85-86 ms for the first two calls of two, 66-70 after, as
    # its buffers are first touched), then the fastest of five: the rates come from
    # differences of these timings
    vm["main"](*args)
    return min(vm.time_evaluator("main", tvm.cpu(), number=number, repeat=5)(*args).results)


def save(table: dict, path: str | Path | None = None) -> Path:
    """Store the table where the cost model looks for ``table['target']``."""
    path = Path(path) if path else profile_dir() / f"{table['target']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1))
    return path


def describe(table: dict) -> str:
    weights = table.get("seconds_per_weight_byte", 0.0)
    lines = [f"{table['target']}: {table['flops_per_second'] / 1e9:.2f} GFLOP/s overall on "
             f"{table['model']}, " + (f"weights read at {1 / weights / 1e9:.1f} GB/s, "
                                      if weights else "") +
             f"{table['call_overhead'] * 1e6:.0f} µs per piece call, "
             f"{table.get('seconds_per_byte', 0) * 1e12:.0f} ps per byte in or out of a piece, "
             f"tiles {table.get('tile_seconds_per_flop', 0) * 1e12:.2f} ps more per FLOP, "
             f"a channel split's pieces {table.get('channel_seconds_per_byte', 0) * 1e12:.0f} "
             "ps more per byte in or out",
             *(f"{what}'s pieces alone: {1 / rates[0] / 1e9:.2f} GFLOP/s, "
               f"{rates[1] * 1e12:.0f} ps per weight byte, {rates[2] * 1e12:.0f} ps per byte in "
               "or out (these price them)"
               for what, rates in (("a spatial split", table.get("tile_rates")),
                                   ("a channel split", table.get("channel_rates"))) if rates),
             f"fitted on {table.get('fitted_on', 'the whole model')}: mean error "
             f"{table.get('fit_error', 0) * 100:.1f} %",
             (f"the runtime: {table['seconds_per_message'] * 1e6:.0f} µs of CPU per message "
              f"sent or received + {table.get('runtime_seconds_per_byte', 0) * 1e12:.0f} ps "
              f"per byte of it + {table.get('runtime_seconds_per_piece', 0) * 1e6:.0f} µs per "
              f"piece run (measured on {table.get('runtime_measured_on', '?')})"
              if "seconds_per_message" in table else
              "the runtime's cost per message: not measured (the cost model's default)"),
             f"{'op':<24} {'GFLOP/s':>9} {'ms':>9}"]
    for kind, row in table["ops"].items():
        rate = row["flops_per_second"]
        lines.append(f"{kind:<24} {rate / 1e9 if rate else 0:>9.2f} {row['seconds'] * 1e3:>9.3f}")
    return "\n".join(lines)
