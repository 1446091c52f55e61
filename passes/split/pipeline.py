"""Pipeline split: contiguous ranges of ``main``'s bindings, one range per device.

:func:`plan_pipeline` is the analysis (where to cut); :class:`PipelineSplit` only applies a
:class:`PipelinePlan` it is given. The cuts balance the priced stage times: each stage's
compute plus what it sends on; cutting inside a residual block sends two tensors, between
blocks one, so blocks stay whole unless cutting one pays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
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
    out)`` (:class:`splitc.planning.cost.DeviceSpeed`), plus the sending. Every cut is
    priced (dynamic programming over the cuts): one inside a residual block sends two tensors,
    so blocks are cut only where that balances the stages by more than the bytes cost.
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
    if len(cuts) < n_devices - 1:
        raise SplitcError(f"the model has {len(cuts)} places to cut; it cannot be split "
                          f"into {n_devices} pipeline stages")
    flops = np.concatenate([[0.0], np.cumsum([c.flops for c in costs], dtype=float)])
    weights = np.concatenate([[0.0], np.cumsum([c.weight_bytes for c in costs], dtype=float)])
    end = len(costs) - 1
    # every cut is a candidate, priced: what crosses it is sent at bytes_per_second (a cut
    # inside a residual block sends two tensors, so blocks stay whole unless cutting one
    # balances the stages by more than the extra bytes cost)
    index = np.array([-1] + [c.index for c in cuts] + [end])
    sent = np.array([0.0] + [c.nbytes for c in cuts] + [0.0])

    def stage_cost(k: int, lo, hi):  # stage k runs bindings index[lo]+1 .. index[hi]
        work = flops[index[hi] + 1] - flops[index[lo] + 1]
        send = sent[hi] / bytes_per_second
        if speeds is None:
            return work / speed[k] + send
        return speed[k].piece_seconds(work, weights[index[hi] + 1] - weights[index[lo] + 1],
                                      sent[lo] + sent[hi]) + send

    # best[k][j]: the slowest of stages 0..k when stage k ends at point j (0: before the
    # first binding, 1..P: the cuts, P+1: the end); a vector over j, filled stage by stage
    points = len(index)
    everything = np.arange(points)
    best = np.full((n_devices, points), np.inf)
    back = np.zeros((n_devices, points), dtype=int)
    best[0, 1:] = stage_cost(0, np.zeros(points - 1, dtype=int), everything[1:])
    for k in range(1, n_devices):
        for j in range(k + 1, points):
            starts = everything[k:j]
            value = np.maximum(best[k - 1, starts], stage_cost(k, starts, np.full(len(starts), j)))
            i = int(np.argmin(value))
            best[k, j], back[k, j] = value[i], starts[i]
    chosen, j = [], points - 1
    for k in range(n_devices - 1, 0, -1):
        j = back[k, j]
        chosen.append(int(index[j]))
    return PipelinePlan(tuple(reversed(chosen)), tuple(range(n_devices)))


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
