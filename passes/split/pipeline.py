"""Pipeline split: contiguous ranges of ``main``'s bindings, one range per device.

:func:`plan_pipeline` is the analysis (where to cut); :class:`PipelineSplit` only applies a
:class:`PipelinePlan` it is given. Cutting inside a residual block sends two tensors, between
blocks one: the planner prefers the cuts with the fewest crossing tensors, so blocks stay whole
whenever the model has enough such cuts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import tvm

from splitc.errors import SplitcError
from splitc.passes.analysis import cut_points, profile
from splitc.passes.ir import main_block, op_name
from splitc.passes.split.outline import OutlinePieces

#: Default pricing when no cluster description is given: seconds = flops / FLOPS + bytes / BPS.
DEFAULT_FLOPS = 10e9
DEFAULT_BYTES_PER_SECOND = 125e6  # 1 Gbit/s


@dataclass(frozen=True)
class PipelinePlan:
    """Stage ``s`` holds the bindings after ``cuts[s-1]`` up to and including ``cuts[s]``.

    ``cuts`` are binding indices (as in :func:`splitc.passes.analysis.cut_points`); stage ``s``
    runs on device ``devices[s]``.
    """

    cuts: tuple[int, ...]
    devices: tuple[int, ...]

    def device_of(self, names: list[str]) -> dict[str, int]:
        bounds = list(self.cuts) + [len(names) - 1]
        out, stage = {}, 0
        for i, name in enumerate(names):
            while i > bounds[stage]:
                stage += 1
            out[name] = self.devices[stage]
        return out


def plan_pipeline(mod: tvm.IRModule, n_devices: int, *,
                  flops_per_second: float | Sequence[float] = DEFAULT_FLOPS,
                  bytes_per_second: float = DEFAULT_BYTES_PER_SECOND,
                  speeds: Sequence | None = None) -> PipelinePlan:
    """Cut ``main`` into ``n_devices`` stages, minimising the slowest stage.

    Stage ``k`` runs on device ``k`` and costs its FLOPs at that device's speed
    (``flops_per_second``: one figure for all, or one per device) plus the bytes it sends
    onward at ``bytes_per_second``. ``speeds``, one per device, price a stage instead as the
    cost model prices a piece: ``speeds[k].piece_seconds(FLOPs, weight bytes, bytes in and
    out)`` (:class:`splitc.planning.cost.DeviceSpeed`), plus the sending. Only cuts crossed by the
    fewest tensors the model allows are considered while there are enough of them (so
    residual blocks are not cut).
    """
    if n_devices < 1:
        raise SplitcError("a pipeline needs at least one device")
    speed = list(flops_per_second) if isinstance(flops_per_second, Sequence) else \
        [flops_per_second] * n_devices
    if speeds is not None:
        speed = list(speeds)
    if len(speed) != n_devices:
        raise SplitcError(f"{len(speed)} device speeds for {n_devices} devices")
    costs = profile(mod)
    if n_devices == 1:
        return PipelinePlan((), (0,))
    bindings = list(main_block(mod).bindings)
    cuts = [c for c in cut_points(mod) if c.crossing and not _splits_bias(bindings, c.index)]
    candidates = []
    for width in sorted({len(c.crossing) for c in cuts}):
        candidates = [c for c in cuts if len(c.crossing) <= width]
        if len(candidates) >= n_devices - 1:
            break
    if len(candidates) < n_devices - 1:
        raise SplitcError(f"the model has {len(cuts)} places to cut; it cannot be split "
                          f"into {n_devices} pipeline stages")

    prefix, weights = [0.0], [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c.flops)
        weights.append(weights[-1] + c.weight_bytes)
    end = len(costs) - 1
    points = [(c.index, c.nbytes / bytes_per_second) for c in candidates]
    crossing = {c.index: c.nbytes for c in candidates}

    def stage_cost(k: int, lo: int, hi: int, send: float) -> float:  # bindings lo+1 .. hi
        flops = prefix[hi + 1] - prefix[lo + 1]
        if speeds is None:
            return flops / speed[k] + send
        edge = crossing.get(lo, 0) + crossing.get(hi, 0)
        return speed[k].piece_seconds(flops, weights[hi + 1] - weights[lo + 1], edge) + send

    # best[k][j]: slowest stage when the first k+1 stages end at candidate j.
    inf = float("inf")
    best = [[inf] * len(points) for _ in range(n_devices - 1)]
    back = [[-1] * len(points) for _ in range(n_devices - 1)]
    for j, (idx, send) in enumerate(points):
        best[0][j] = stage_cost(0, -1, idx, send)
    for k in range(1, n_devices - 1):
        for j, (idx, send) in enumerate(points):
            for i in range(j):
                prev = best[k - 1][i]
                if prev == inf:
                    continue
                value = max(prev, stage_cost(k, points[i][0], idx, send))
                if value < best[k][j]:
                    best[k][j], back[k][j] = value, i
    k = n_devices - 2
    last = min(range(len(points)),
               key=lambda j: max(best[k][j], stage_cost(k + 1, points[j][0], end, 0.0)))
    chosen = [last]
    for kk in range(k, 0, -1):
        chosen.append(back[kk][chosen[-1]])
    cut_idx = tuple(points[j][0] for j in reversed(chosen))
    return PipelinePlan(cut_idx, tuple(range(n_devices)))


def _splits_bias(bindings, index: int) -> bool:
    """A cut right after a matmul or convolution whose next binding adds its constant bias
    would leave the bias add alone in the next stage."""
    if index + 1 >= len(bindings) or op_name(bindings[index].value) not in ("matmul",
                                                                           "nn.conv2d"):
        return False
    nxt = bindings[index + 1].value
    return op_name(nxt) == "add" and bindings[index].var in nxt.args and any(
        isinstance(a, tvm.ir.GenericConst) for a in nxt.args)


@tvm.transform.module_pass(opt_level=0, name="splitc.PipelineSplit")
class PipelineSplit:
    """Apply a :class:`PipelinePlan`: each stage's bindings become its device's piece.

    Parameters
    ----------
    plan : PipelinePlan
        Where to cut, and the device of each stage.
    """

    def __init__(self, plan: PipelinePlan):
        self.plan = plan

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        names = [b.var.name for b in main_block(mod).bindings]
        if len(self.plan.devices) != len(self.plan.cuts) + 1:
            raise SplitcError("a pipeline plan needs one device per stage")
        if any(c >= len(names) - 1 for c in self.plan.cuts) or list(self.plan.cuts) != sorted(
                set(self.plan.cuts)):
            raise SplitcError(f"pipeline cuts {self.plan.cuts} do not fit {len(names)} bindings")
        return OutlinePieces(self.plan.device_of(names))(mod)
