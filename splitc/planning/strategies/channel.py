"""``channel``: every convolution and matmul has its output channels divided across the
devices, gathered where a layer needs the whole tensor (:mod:`splitc.passes.split.channel`)."""

from __future__ import annotations

from splitc.passes.split.channel import ChannelPlan, ChannelSplit, plan_channel
from splitc.planning.registry import Context, Strategy, register


@register
class Channel(Strategy):
    name = "channel"
    summary = "output channels of every layer divided across the devices"

    def plan(self, mod, ctx: Context) -> ChannelPlan:
        return plan_channel(mod, ctx.n_devices)

    def rewrite(self, plan: ChannelPlan) -> ChannelSplit:
        return ChannelSplit(plan)
