"""``spatial``: runs of row-local layers divided into row tiles with halo rows
(:mod:`splitc.passes.split.spatial`), rows in proportion to the devices' speeds when they differ.

Offered to ``auto``: the split over all devices at each cap on recomputed halo rows
(:data:`~splitc.passes.split.spatial.HALO_CAPS`: fewer exchanges or less recomputation,
priced, not guessed), and from four devices on, pipelines of 2 or 4 spatially split stages,
each on its own group of devices (with requests in flight, the throughput choice)."""

from __future__ import annotations

from splitc.passes.split.spatial import (
    HALO_CAPS,
    SpatialPlan,
    SpatialSplit,
    plan_spatial,
    plan_spatial_stages,
)
from splitc.planning.registry import Context, Proposal, Strategy, register


def row_shares(speeds) -> tuple[float, ...]:
    """A spatial split's row shares: in proportion to each device's FLOP/s, or none (equal
    rows) when the devices are alike or their speeds unknown."""
    rates = tuple(s.flops_per_second for s in speeds or ())
    return rates if len(set(rates)) > 1 else ()


@register
class Spatial(Strategy):
    name = "spatial"
    summary = "row tiles with halo rows over runs of row-local layers"

    def plan(self, mod, ctx: Context) -> SpatialPlan:
        return plan_spatial(mod, ctx.n_devices, shares=row_shares(ctx.speeds))

    def rewrite(self, plan: SpatialPlan) -> SpatialSplit:
        return SpatialSplit(plan)

    def candidates(self, mod, ctx: Context):
        n, everyone = ctx.n_devices, tuple(range(ctx.n_devices))
        if n < 2:
            return
        shares = row_shares(ctx.speeds)
        tried = set()
        for cap in HALO_CAPS:
            plan = plan_spatial(mod, n, max_overhead=cap, shares=shares)
            if plan.segments not in tried:
                tried.add(plan.segments)
                yield Proposal(f"spatial over all (halo <= {cap - 1:.0%})",
                               SpatialSplit(plan)(mod), everyone)
        for stages in (2, 4) if n >= 4 else ():  # tiled stages in a pipeline (mixed)
            if stages < n:
                plan = plan_spatial_stages(mod, n, stages, shares=shares)
                if plan.groups and len(set(plan.groups)) == stages:
                    sizes = "+".join(str(hi - lo) for lo, hi in dict.fromkeys(plan.groups))
                    yield Proposal(f"spatial stages [{sizes}]", SpatialSplit(plan)(mod),
                                   everyone)

