"""Hybrid split: the early, high-resolution layers in spatial row tiles, the late layers with
their output channels divided, each segment on its own devices.

Early layers have big activations and small weights: row tiles (:mod:`.spatial`) exchange only
halo rows, but every device reads all of a layer's weights. Late layers are the other way
round: a channel split (:mod:`.channel`) gives each device 1/N of the weights to hold and read,
at the price of gathering each split layer's input. A :class:`HybridPlan` takes the spatial
plan's segments up to a *boundary* binding and splits the channels of chosen layers after it;
the transition is exact: each device that runs a channel slice of the first split layers
gathers the row tiles it needs from their devices itself (rather than receiving the whole
tensor gathered elsewhere).

:class:`HybridSplit` runs the spatial rewrite, then the channel rewrite over its result, each
binding keeping the device the spatial rewrite gave it unless the channel plan splits it, and
hands the device assignment to :class:`~splitc.passes.split.outline.OutlinePieces`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import tvm

from splitc.errors import SplitcError
from splitc.passes.ir import main_block
from splitc.passes.split.channel import ChannelPlan, ChannelRewriter, plan_channel
from splitc.passes.split.outline import OutlinePieces
from splitc.passes.split.spatial import (
    MAX_HALO_OVERHEAD,
    RowGeometry,
    SpatialPlan,
    SpatialRewriter,
    _height,
    check_plan,
    plan_spatial,
)


@dataclass(frozen=True)
class HybridPlan:
    """Spatial segments before ``boundary`` (a binding index of ``main``), channel-split
    layers (bindings of ``main`` by name) at or after it, over the same devices."""

    spatial: SpatialPlan
    channel: ChannelPlan
    boundary: int

    @property
    def n_devices(self) -> int:
        return self.spatial.n_devices


def _validate(plan: HybridPlan, mod: tvm.IRModule) -> None:
    if plan.spatial.n_devices != plan.channel.n_devices:
        raise SplitcError(f"a hybrid plan's spatial part is over {plan.spatial.n_devices} "
                          f"devices, its channel part over {plan.channel.n_devices}")
    bindings = list(main_block(mod).bindings)
    if not 0 <= plan.boundary <= len(bindings):
        raise SplitcError(f"hybrid boundary {plan.boundary} is outside main's "
                          f"{len(bindings)} bindings")
    late = [s for s in plan.spatial.segments if s[1] > plan.boundary]
    if late:
        raise SplitcError(f"spatial segments {late} end after the hybrid boundary "
                          f"{plan.boundary}")
    index = {b.var.name: i for i, b in enumerate(bindings)}
    early = sorted(n for n in plan.channel.layers if index.get(n, -1) < plan.boundary)
    if early:
        raise SplitcError(f"channel-split layers {early[:5]} are not bindings of main at or "
                          f"after the hybrid boundary {plan.boundary}")
    check_plan(plan.spatial, mod)


@tvm.transform.module_pass(opt_level=0, name="splitc.HybridSplit")
class HybridSplit:
    """Apply a :class:`HybridPlan`: tile the early segments' rows, split the late layers'
    channels.

    Parameters
    ----------
    plan : HybridPlan
        The spatial segments, the channel-split layers and the boundary between them.
    """

    def __init__(self, plan: HybridPlan):
        self.plan = plan

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        _validate(self.plan, mod)
        spatial = SpatialRewriter(self.plan.spatial)
        tiled = spatial.run(mod)
        channel = ChannelRewriter(self.plan.channel, home=spatial.device_of,
                                  gathers=spatial.gathers)
        flat = channel.run(tiled)
        names = [b.var.name for b in main_block(flat).bindings]
        repeated = [n for n, c in Counter(names).items() if c > 1]
        if repeated:
            raise SplitcError(f"hybrid split: bindings named alike after the rewrite: "
                              f"{repeated[:5]}")
        # stages (where a device's run may be cut to send early) must not decrease along a
        # dependency: the spatial rewrite's up to the first binding the channel rewrite
        # added, one stage after all of them from there on
        last = max(spatial.stage_of.values(), default=0) + 1
        stage_of, after = {}, False
        for name in names:
            after = after or name not in spatial.stage_of
            stage_of[name] = last if after else spatial.stage_of[name]
        return OutlinePieces(channel.device_of, stage_of)(flat)


def boundaries(mod: tvm.IRModule, n_devices: int, max_overhead: float = MAX_HALO_OVERHEAD,
               shares: tuple[float, ...] = (), rows_per_device: tuple[int, ...] = (1, 2, 4)
               ) -> list[int]:
    """Where a hybrid plan should switch from rows to channels: before the first segment the
    spatial plan would tile whose outputs have fewer than ``r`` rows per device, for each
    ``r`` in ``rows_per_device`` (tiles of a row or two recompute their halo many times over,
    and every tile reads all the weights, which late layers have most of). Distinct, in
    order; none where every segment stays tall enough."""
    geo = RowGeometry(list(main_block(mod).bindings), mod["main"])
    segments = plan_spatial(mod, n_devices, max_overhead, shares).segments
    heights = [min((_height(v) or 0) for v in geo.outputs(s, e)) for s, e in segments]
    found = []
    for r in sorted(rows_per_device):
        for (start, _), h in zip(segments, heights, strict=True):
            if h < r * n_devices:
                if start not in found:
                    found.append(start)
                break
    return sorted(found)


def plan_hybrid(mod: tvm.IRModule, n_devices: int, boundary: int,
                max_overhead: float = MAX_HALO_OVERHEAD,
                shares: tuple[float, ...] = ()) -> HybridPlan:
    """Rows before ``boundary``, channels from there on: the segments the spatial plan tiles
    that end by the boundary (``max_overhead``, ``shares``: as for
    :func:`~.spatial.plan_spatial`), and every layer after it the channel plan splits
    (:func:`~.channel.plan_channel`)."""
    spatial = plan_spatial(mod, n_devices, max_overhead, shares)
    index = {b.var.name: i for i, b in enumerate(main_block(mod).bindings)}
    layers = frozenset(n for n in plan_channel(mod, n_devices).layers if index[n] >= boundary)
    return HybridPlan(
        SpatialPlan(n_devices, tuple(s for s in spatial.segments if s[1] <= boundary), shares),
        ChannelPlan(n_devices, layers), boundary)
