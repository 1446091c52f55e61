"""``hybrid``: rows for the early layers, channels for the late ones
(:mod:`splitc.passes.split.hybrid`), switching where the spatial tiles become a few rows tall.

Where to switch is priced, not guessed: each place :func:`~splitc.passes.split.hybrid.
boundaries` proposes (before the first segment under 1, 2 or 4 rows per device) is split and
simulated by the cost model on the devices' speeds (the cluster's when known, else alike at a
nominal speed), and the fastest kept. ``auto`` is offered every one of them.
"""

from __future__ import annotations

import tvm

from splitc.passes.ir import main_block
from splitc.passes.split.hybrid import HybridPlan, HybridSplit, boundaries, plan_hybrid
from splitc.planning.cluster import Cluster
from splitc.planning.cost import (
    DEFAULT_CALL_OVERHEAD,
    DEFAULT_SECONDS_PER_BYTE,
    TILE_OVERHEAD,
    DeviceSpeed,
    estimate,
)
from splitc.planning.extract import extract
from splitc.planning.registry import Context, Proposal, Strategy, register
from splitc.planning.strategies.spatial import row_shares

#: Devices of unknown speed are priced alike at this rate (only the comparison between the
#: places to switch matters, and it depends on compute against the network).
NOMINAL_FLOPS = 10e9


def nominal_speeds(n: int) -> list[DeviceSpeed]:
    return [DeviceSpeed(NOMINAL_FLOPS, DEFAULT_CALL_OVERHEAD, "nominal",
                        DEFAULT_SECONDS_PER_BYTE,
                        tile_seconds_per_flop=TILE_OVERHEAD / NOMINAL_FLOPS)] * n


def _label(mod: tvm.IRModule, plan: HybridPlan) -> str:
    names = [b.var.name for b in main_block(mod).bindings]
    return f"hybrid (rows, channels from {names[plan.boundary]})"


@register
class Hybrid(Strategy):
    name = "hybrid"
    summary = "row tiles for the early layers, output channels divided for the late ones"
    min_devices = 2

    def _plans(self, mod, ctx: Context) -> list[HybridPlan]:
        shares = row_shares(ctx.speeds)
        return [plan_hybrid(mod, ctx.n_devices, b, shares=shares)
                for b in boundaries(mod, ctx.n_devices, shares=shares)]

    def plan(self, mod, ctx: Context) -> HybridPlan:
        plans = self._plans(mod, ctx)
        if not plans:  # every segment stays tall: rows all the way, channels for the rest
            return plan_hybrid(mod, ctx.n_devices, len(main_block(mod).bindings),
                               shares=row_shares(ctx.speeds))
        if len(plans) == 1:
            return plans[0]
        cluster = ctx.cluster or Cluster.uniform(["host"] * ctx.n_devices)
        speeds = list(ctx.speeds) if ctx.speeds else nominal_speeds(ctx.n_devices)

        def latency(plan: HybridPlan) -> float:
            ex = extract(HybridSplit(plan)(mod), ctx.names)
            return estimate(ex.plan(cluster.targets, self.name), cluster, speeds).latency

        priced = [(latency(p), p) for p in plans]
        best = min(priced, key=lambda lp: lp[0])[1]
        ctx.log("hybrid: " + ", ".join(f"{_label(mod, p)} {t * 1e3:.1f} ms"
                                        for t, p in priced) + f"; chose {_label(mod, best)}")
        return best

    def rewrite(self, plan: HybridPlan) -> HybridSplit:
        return HybridSplit(plan)

    def candidates(self, mod, ctx: Context):
        everyone = tuple(range(ctx.n_devices))
        if ctx.n_devices < 2:
            return
        for plan in self._plans(mod, ctx):
            yield Proposal(_label(mod, plan), HybridSplit(plan)(mod), everyone)
