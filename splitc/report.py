"""Plain-text tables for ``splitc inspect``."""

from __future__ import annotations

import tvm

from splitc.passes.analysis import cut_points, profile
from splitc.runtime.plan import Plan


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def layer_table(mod: tvm.IRModule) -> str:
    """One row per binding of ``main``: op, output shape, FLOPs, weights, activation size,
    and the bytes that would cross a cut right after it."""
    rows = profile(mod)
    crossing = {c.index: c for c in cut_points(mod)}
    lines = [f"{'#':>4}  {'name':<14} {'op':<22} {'output':<20} {'MFLOPs':>10} "
             f"{'weights':>10} {'activation':>11} {'cut after':>11}"]
    for r in rows:
        cut = crossing.get(r.index)
        cut_text = f"{human_bytes(cut.nbytes)}/{len(cut.crossing)}t" if cut else "-"
        shape = "x".join(map(str, r.out.shape)) if r.out else "-"
        lines.append(f"{r.index:>4}  {r.name:<14} {r.op:<22} {shape:<20} "
                     f"{r.flops / 1e6:>10.2f} {human_bytes(r.weight_bytes):>10} "
                     f"{human_bytes(r.out_bytes):>11} {cut_text:>11}")
    lines.append(f"total: {sum(r.flops for r in rows) / 1e9:.3f} GFLOPs, "
                 f"{human_bytes(sum(r.weight_bytes for r in rows))} of weights, "
                 f"{len(rows)} bindings")
    return "\n".join(lines)


def plan_summary(plan: Plan) -> str:
    """Devices, their pieces, and every transfer with its size."""
    lines = [f"strategy {plan.strategy}; model {plan.source}; "
             f"splitc {plan.versions.get('splitc', '?')}, TVM {plan.versions.get('tvm', '?')}"]
    for e in plan.inputs:
        t = plan.tensors[e.tensor]
        lines.append(f"input  {e.name}: {t.dtype}{list(t.shape)}")
    for s in plan.slices:
        readers = sorted({p.device for p in plan.pieces if s.tensor in p.inputs})
        lines.append(f"  the client cuts {s.tensor} = {s.source}[{s.begin}:{s.end}] on axis "
                     f"{s.axis} ({human_bytes(plan.tensors[s.tensor].nbytes)}) for "
                     f"{', '.join(readers)}")
    for e in plan.outputs:
        t = plan.tensors[e.tensor]
        lines.append(f"output {e.name}: {t.dtype}{list(t.shape)} from {e.device}")
    for d in plan.devices:
        pieces = plan.pieces_on(d.name)
        lines.append(f"{d.name} ({d.target}): {len(pieces)} pieces, "
                     f"{sum(p.flops for p in pieces) / 1e6:.1f} MFLOPs, "
                     f"{human_bytes(sum(p.weight_bytes for p in pieces))} of weights, "
                     f"lib {d.lib or '-'} sha256 {d.lib_sha256[:12] or '-'}")
    lines.append(f"transfers: {len(plan.transfers)}, {human_bytes(plan.transfer_bytes)} "
                 "per inference")
    for t in plan.transfers:
        shape = plan.tensors[t.tensor]
        lines.append(f"  {t.src} -> {t.dst}  {t.tensor:<16} {shape.dtype}{list(shape.shape)} "
                     f"{human_bytes(t.nbytes)}")
    return "\n".join(lines)
