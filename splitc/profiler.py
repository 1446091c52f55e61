"""``splitc profile --target host``: measure how fast this machine runs compiled pieces.

Every layer of a model becomes its own piece (the outline pass with one device per binding),
the module is compiled once for the target (default schedules, as every artifact is), and
each piece is timed with TVM's time evaluator on its real inputs. The table — FLOP/s per
operator kind, overall FLOP/s and seconds per weight byte, the fixed cost of a piece call,
and the cost per byte crossing a piece's boundary (what the one-layer pieces took beyond the
whole model) — is what the cost model uses for that target.

Overall FLOP/s and seconds per weight byte come from the whole model compiled as one piece,
timed twice: at its input size and at half the rows and columns. A quarter of the FLOPs does
not take a quarter of the time: every weight is still read once. The two timings give the
two rates, so a piece that computes a few rows of a layer (a spatial split's tile) is priced
with its weights read in full. Where the smaller input does not compile (a model whose
layers need its input size), the weights are not priced apart (``weight_term`` says why).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from splitc import importer
from splitc import targets as target_registry
from splitc.build import CODEGEN, build
from splitc.cost import PROFILE_FORMAT, profile_dir
from splitc.errors import SplitcError
from splitc.passes.analysis import profile as binding_costs
from splitc.passes.extract import extract, lift_weights
from splitc.passes.ir import main_block, op_name
from splitc.passes.outline import OutlinePieces


def measure(model: str, target: str = "host", *, tiny: bool = False, number: int = 5,
            input_shapes=None) -> dict:
    """Time every layer of ``model`` compiled for ``target`` on this machine."""
    spec = target_registry.get(target)
    if spec.cross_compiler:
        raise SplitcError(f"profiling runs the code here; {target} code does not run on this "
                          "machine (profile on the board, or give gflops in the cluster file)")
    imported = importer.load(model, input_shapes, tiny=tiny)
    bindings = list(main_block(imported.mod).bindings)
    split = OutlinePieces({b.var.name: i for i, b in enumerate(bindings)})(imported.mod)
    ex = extract(split)
    module = tvm.IRModule()
    for dev_mod in ex.modules.values():
        for gv, func in dev_mod.functions.items():
            if gv.name_hint not in [g.name_hint for g in module.get_global_vars()]:
                module[gv] = func
    executable, weights = build(module, spec.tvm_target(), ex.weights)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    env = {name: tvm.runtime.tensor(x) for name, x in
           zip(imported.input_names, imported.random_inputs(), strict=True)}
    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # kind -> [flops, seconds]
    overhead = []
    for p in ex.pieces:
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
    half = halved_inputs(imported)
    try:  # the whole model at half the rows and columns: FLOPs / 4, the same weights
        smaller = importer.load(model, half, tiny=tiny) if half else None
    except Exception as e:  # (any importer or compiler failure: then not priced apart)
        smaller, why = None, f"not measured: the model at {half} fails ({e})".splitlines()[0]
    else:
        why = "not measured: the model's inputs are not images" if half is None else ""
    runs = [(_work(m.mod), _whole_model_seconds(m, spec, number) - call)
            for m in (imported, smaller) if m is not None]
    rate, per_weight_byte = fit_rates(*runs)
    if smaller is not None:
        why = (f"measured at {list(imported.random_inputs()[0].shape)} and {half}"
               if per_weight_byte else f"none: the model at {half} took a quarter of the time")
    # what one-layer pieces cost beyond their FLOPs, weights and calls is converting what
    # crosses their boundaries (layouts, copies): seconds per byte in or out of a piece
    tensors = ex.all_tensors
    edge = sum(tensors[t].nbytes for p in ex.pieces for t in (*p.inputs, *p.outputs))
    weights_read = sum(p.weight_bytes for p in ex.pieces)
    per_byte = max(0.0, total_seconds - total_flops / rate - weights_read * per_weight_byte
                   - len(ex.pieces) * call) / edge
    return {
        "target": target, "model": model + (" (tiny)" if tiny else ""), "codegen": CODEGEN,
        "format": PROFILE_FORMAT,
        # The model compiled as one piece: what multi-layer pieces achieve. Layer by layer,
        # each piece also packs and unpacks its tensors, which a real piece does only at its
        # ends (that rate is kept as layer_flops_per_second).
        "flops_per_second": rate,
        "seconds_per_weight_byte": per_weight_byte,
        "weight_term": why,
        "layer_flops_per_second": total_flops / total_seconds,
        "call_overhead": call,
        "seconds_per_byte": per_byte,
        "ops": {k: {"flops": f, "seconds": s, "flops_per_second": f / s if s else None}
                for k, (f, s) in sorted(kinds.items(), key=lambda kv: -kv[1][1])},
        "total_seconds": total_seconds,
    }


def halved_inputs(imported: importer.ImportedModel) -> dict | None:
    """The input shapes with half the rows and columns, or None unless every input is an
    image batch (N, C, H, W) of at least 8x8."""
    shapes = {name: tuple(x.shape) for name, x in
              zip(imported.input_names, imported.random_inputs(), strict=True)}
    if not all(len(s) == 4 and min(s[2:]) >= 8 for s in shapes.values()):
        return None
    return {name: (*s[:2], s[2] // 2, s[3] // 2) for name, s in shapes.items()}


def _work(mod: tvm.IRModule) -> tuple[float, float]:
    """(FLOPs, weight bytes) of ``mod``'s ``main``."""
    rows = binding_costs(mod)
    return float(sum(r.flops for r in rows)), float(sum(r.weight_bytes for r in rows))


Run = tuple[tuple[float, float], float]  # ((FLOPs, weight bytes), seconds)


def fit_rates(big: Run, small: Run | None = None) -> tuple[float, float]:
    """FLOP/s and seconds per weight byte from two runs of one model at two input sizes:
    ``seconds = FLOPs / rate + weight bytes x per_weight_byte``. Without a second run, or
    where the two give a negative term, the weights are not priced apart (0)."""
    (f1, w1), t1 = big
    if small is not None:
        (f2, w2), t2 = small
        det = f1 * w2 - f2 * w1
        if det > 0:
            a = (t1 * w2 - t2 * w1) / det  # seconds per FLOP
            b = (f1 * t2 - f2 * t1) / det  # seconds per weight byte
            if a > 0 and b > 0:
                return 1.0 / a, b
    return f1 / max(t1, 1e-9), 0.0


def overhead_of(calls: list[float]) -> float:
    return float(np.median(calls)) if calls else 0.0


def _whole_model_seconds(imported: importer.ImportedModel, spec, number: int) -> float:
    """Seconds for the whole model compiled as one function (weights lifted, as in pieces)."""
    func, arrays = lift_weights(imported.mod["main"])
    executable, weights = build(tvm.IRModule({"main": func}), spec.tvm_target(),
                                {"main": arrays})
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(x) for x in imported.random_inputs()]
    args += [tvm.runtime.tensor(w) for w in weights["main"]]
    # the fastest of three: the rates come from differences of these timings
    return min(vm.time_evaluator("main", tvm.cpu(), number=number, repeat=3)(*args).results)


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
             f"{table.get('seconds_per_byte', 0) * 1e12:.0f} ps per byte in or out of a piece",
             f"weights priced apart: {table.get('weight_term', 'no')}",
             f"{'op':<24} {'GFLOP/s':>9} {'ms':>9}"]
    for kind, row in table["ops"].items():
        rate = row["flops_per_second"]
        lines.append(f"{kind:<24} {rate / 1e9 if rate else 0:>9.2f} {row['seconds'] * 1e3:>9.3f}")
    return "\n".join(lines)
