"""What ``splitc inspect`` and ``splitc run --check`` print: plain-text tables, and the
comparison of a plan's answers with its reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
    and what would cross a pipeline cut right after it: bytes, and how many tensors."""
    rows = profile(mod)
    crossing = {c.index: c for c in cut_points(mod)}
    lines = [f"{'#':>4}  {'name':<14} {'op':<22} {'output':<20} {'MFLOPs':>10} "
             f"{'weights':>10} {'activation':>11} {'cut: bytes':>11} {'tensors':>7}"]
    for r in rows:
        cut = crossing.get(r.index)
        cut_text = f"{human_bytes(cut.nbytes):>11} {len(cut.crossing):>7}" if cut else \
            f"{'-':>11} {'-':>7}"
        shape = "x".join(map(str, r.out.shape)) if r.out else "-"
        lines.append(f"{r.index:>4}  {r.name:<14} {r.op:<22} {shape:<20} "
                     f"{r.flops / 1e6:>10.2f} {human_bytes(r.weight_bytes):>10} "
                     f"{human_bytes(r.out_bytes):>11} {cut_text}")
    lines.append("cut: what a pipeline cut right after the row sends on (bytes, tensors)")
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


#: ``run --check``'s default tolerances: an output passes when every element differs from the
#: reference by at most ``ATOL + RTOL x max |reference|`` (relative to the output's scale, as
#: float rounding errors are, with an absolute floor for outputs near zero everywhere).
RTOL, ATOL = 1e-4, 1e-6
#: A reference output whose largest magnitude is below this is "nearly zero everywhere".
DEGENERATE = 1e-3


@dataclass(frozen=True)
class Comparison:
    """One output against its reference."""

    max_abs: float  # largest |output - reference|
    scale: float  # largest |reference|
    tolerance: float  # atol + rtol x scale
    passed: bool
    note: str = ""  # why the relative error means little, when it does

    @property
    def relative(self) -> float:
        return self.max_abs / self.scale if self.scale else float("inf") * self.max_abs

    def describe(self) -> str:
        return (f"max abs error {self.max_abs:.3g}, relative {self.relative:.3g} (reference max "
                f"abs {self.scale:.3g}; allowed {self.tolerance:.3g} = atol + rtol x max abs)"
                + (f"; {self.note}" if self.note else ""))


def compare(output: np.ndarray, reference: np.ndarray, *, rtol: float = RTOL,
            atol: float = ATOL) -> Comparison:
    """``output`` against ``reference`` (same shape): every element within ``atol + rtol x
    max |reference|``; NaNs must sit where the reference has them."""
    y, r = np.asarray(output, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if y.shape != r.shape:
        return Comparison(float("inf"), 0.0, 0.0, False,
                          f"shape {list(y.shape)} where the reference has {list(r.shape)}")
    nan_y, nan_r = np.isnan(y), np.isnan(r)
    finite = ~nan_r
    diff = np.abs(y - r)[finite]
    scale = float(np.abs(r[finite]).max()) if finite.any() else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    tolerance = atol + rtol * scale
    passed = bool(np.array_equal(nan_y, nan_r)) and not (diff > tolerance).any()
    note = ""
    if scale < DEGENERATE:
        note = (f"the reference is nearly zero everywhere (max abs {scale:.3g}): the relative "
                "error means little, the absolute tolerance decides")
    elif finite.any() and float(np.ptp(r[finite])) == 0.0:
        note = "the reference is constant: the input may not exercise the model"
    if not np.array_equal(nan_y, nan_r):
        note = "NaNs where the reference has none, or none where it has them"
    return Comparison(max_abs, scale, tolerance, passed, note)


def same_top1(output: np.ndarray, reference: np.ndarray) -> bool:
    """Whether each batch row's largest element is in the same place (fixed-point plans)."""
    y, r = np.asarray(output), np.asarray(reference)
    return y.shape == r.shape and bool(np.array_equal(
        y.reshape(y.shape[0], -1).argmax(-1), r.reshape(r.shape[0], -1).argmax(-1)))

