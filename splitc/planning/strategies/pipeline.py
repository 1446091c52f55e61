"""``pipeline``: contiguous layer ranges, one per device (:mod:`splitc.passes.split.pipeline`).

Offered to ``auto``: the whole model on the first and on the fastest device, and pipelines over
the devices in the cluster's order and fastest first, each cut by dynamic programming with its
stages priced as the cost model prices a piece on its device."""

from __future__ import annotations

from splitc.passes.split.pipeline import PipelinePlan, PipelineSplit, plan_pipeline
from splitc.planning.registry import Context, Proposal, Strategy, register


@register
class Pipeline(Strategy):
    name = "pipeline"
    summary = "contiguous layer ranges, one per device, cut where the fewest bytes cross"

    def plan(self, mod, ctx: Context) -> PipelinePlan:
        if ctx.speeds is None:
            return plan_pipeline(mod, ctx.n_devices)
        return plan_pipeline(mod, ctx.n_devices, speeds=list(ctx.speeds),
                             bytes_per_second=ctx.bytes_per_second)

    def rewrite(self, plan: PipelinePlan) -> PipelineSplit:
        return PipelineSplit(plan)

    def candidates(self, mod, ctx: Context):
        n, names, speeds = ctx.n_devices, ctx.names, ctx.speeds
        rate = (lambda i: speeds[i].flops_per_second) if speeds else (lambda i: 0.0)
        everyone = tuple(range(n))
        fastest = max(everyone, key=rate)
        whole = PipelineSplit(PipelinePlan((), (0,)))(mod)
        for i in sorted({0, fastest}):
            yield Proposal(f"single device {names[i]}", whole, (i,))
        if n < 2:
            return
        for order in sorted({everyone, tuple(sorted(everyone, key=lambda i: -rate(i)))}):
            plan = plan_pipeline(mod, n, speeds=[speeds[i] for i in order] if speeds else None,
                                 bytes_per_second=ctx.bytes_per_second)
            yield Proposal(f"pipeline [{','.join(names[i] for i in order)}]",
                           PipelineSplit(plan)(mod), order)
