"""``splitc profile --target host``: measure how fast this machine runs compiled pieces.

Every layer of a model becomes its own piece (the outline pass with one device per binding),
the module is compiled once for the target (default schedules, as every artifact is), and
each piece is timed with TVM's time evaluator on its real inputs. The table — FLOP/s per
operator kind, overall FLOP/s (from the whole model compiled as one piece), the fixed cost of
a piece call, and the cost per byte crossing a piece's boundary (what the one-layer pieces
took beyond the whole model) — is what the cost model uses for that target.
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
from splitc.cost import profile_dir
from splitc.errors import SplitcError
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
    whole = _whole_model_seconds(imported, spec, number)
    call = overhead_of(overhead)
    rate = total_flops / max(whole - call, 1e-9)
    # what one-layer pieces cost beyond their FLOPs and calls is converting what crosses
    # their boundaries (layouts, copies): seconds per byte in or out of a piece
    tensors = ex.all_tensors
    edge = sum(tensors[t].nbytes for p in ex.pieces for t in (*p.inputs, *p.outputs))
    per_byte = max(0.0, total_seconds - total_flops / rate - len(ex.pieces) * call) / edge
    return {
        "target": target, "model": model + (" (tiny)" if tiny else ""), "codegen": CODEGEN,
        # The model compiled as one piece: what multi-layer pieces achieve. Layer by layer,
        # each piece also packs and unpacks its tensors, which a real piece does only at its
        # ends (that rate is kept as layer_flops_per_second).
        "flops_per_second": rate,
        "layer_flops_per_second": total_flops / total_seconds,
        "call_overhead": call,
        "seconds_per_byte": per_byte,
        "ops": {k: {"flops": f, "seconds": s, "flops_per_second": f / s if s else None}
                for k, (f, s) in sorted(kinds.items(), key=lambda kv: -kv[1][1])},
        "total_seconds": total_seconds,
    }


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
    return vm.time_evaluator("main", tvm.cpu(), number=number)(*args).mean


def save(table: dict, path: str | Path | None = None) -> Path:
    """Store the table where the cost model looks for ``table['target']``."""
    path = Path(path) if path else profile_dir() / f"{table['target']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1))
    return path


def describe(table: dict) -> str:
    lines = [f"{table['target']}: {table['flops_per_second'] / 1e9:.2f} GFLOP/s overall on "
             f"{table['model']}, {table['call_overhead'] * 1e6:.0f} µs per piece call, "
             f"{table.get('seconds_per_byte', 0) * 1e12:.0f} ps per byte in or out of a piece",
             f"{'op':<24} {'GFLOP/s':>9} {'ms':>9}"]
    for kind, row in table["ops"].items():
        rate = row["flops_per_second"]
        lines.append(f"{kind:<24} {rate / 1e9 if rate else 0:>9.2f} {row['seconds'] * 1e3:>9.3f}")
    return "\n".join(lines)
