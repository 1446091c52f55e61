"""``--strategy auto``: price candidate splits with the cost model and keep the best.

The candidates are every exact strategy over all devices (the spatial split with rows in
proportion to each device's speed and each cap on recomputed halo rows in
:data:`~splitc.passes.spatial_split.HALO_CAPS`: fewer exchanges or less recomputation),
pipelines over the devices in the cluster's order and fastest-first (cut by dynamic
programming, each stage priced as :meth:`~splitc.cost.DeviceSpeed.piece_seconds` prices a
piece on its device), and the whole model on each single device. Each
candidate is planned, rewritten and extracted (no TVM build: that is the expensive part and
only the winner needs it), then simulated by :func:`splitc.cost.estimate`. Candidates over a
device's memory cap are dropped; if none fits, the error says by how much the best one falls
short.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import tvm

from splitc.cluster import Cluster
from splitc.cost import DeviceSpeed, Estimate, device_speed, estimate
from splitc.errors import SplitcError
from splitc.passes.channel_split import ChannelSplit, plan_channel
from splitc.passes.extract import Extracted, extract
from splitc.passes.pipeline_split import PipelinePlan, PipelineSplit, plan_pipeline
from splitc.passes.spatial_split import (
    HALO_CAPS,
    SpatialSplit,
    plan_spatial,
    plan_spatial_stages,
)
from splitc.runtime.plan import Plan


@dataclass
class Candidate:
    """One priced way to split the model."""

    label: str
    strategy: str
    devices: tuple[int, ...]  # cluster device index for each plan device
    split_mod: tvm.IRModule
    extracted: Extracted
    plan: Plan
    estimate: Estimate
    over_memory: dict[str, float]  # device -> bytes over its cap

    @property
    def fits(self) -> bool:
        return not self.over_memory


@dataclass
class SearchResult:
    best: Candidate
    candidates: list[Candidate]
    objective: str
    seconds: float
    speeds: list[DeviceSpeed]

    def explain(self, cluster: Cluster) -> str:
        """A table of every candidate and why the best one won."""
        key = "latency" if self.objective == "latency" else "period"
        lines = [f"objective: {self.objective} (search took {self.seconds:.2f} s)",
                 "devices:"]
        for d, s in zip(cluster.devices, self.speeds, strict=True):
            weights = (f", weights at {1 / s.seconds_per_weight_byte / 1e9:.1f} GB/s"
                       if s.seconds_per_weight_byte else "")
            lines.append(f"  {d.name:<10} {d.target:<12} {s.flops_per_second / 1e9:8.2f} "
                         f"GFLOP/s{weights} ({s.source}), memory cap "
                         f"{d.memory / 2**20:,.0f} MiB")
        lines.append(f"network: {cluster.network.bytes_per_second * 8 / 1e6:,.0f} Mbit/s, "
                     f"{cluster.network.latency * 1e3:.2f} ms per message")
        lines.append(f"{'candidate':<34} {'latency ms':>10} {'period ms':>10} "
                     f"{'bytes/inf':>12} {'max mem MiB':>11}  note")
        for c in sorted(self.candidates, key=lambda c: (not c.fits,
                                                        getattr(c.estimate, key))):
            note = "chosen" if c is self.best else (
                "over memory: " + ", ".join(f"{d} by {b / 2**20:,.1f} MiB"
                                            for d, b in c.over_memory.items())
                if not c.fits else "")
            lines.append(f"{c.label:<34} {c.estimate.latency * 1e3:>10.2f} "
                         f"{c.estimate.period * 1e3:>10.2f} {c.estimate.transfer_bytes:>12,} "
                         f"{max(c.estimate.device_memory.values()) / 2**20:>11.1f}  {note}")
        b = self.best
        lines.append(f"why: {b.label} has the lowest predicted {key} among the candidates "
                     "that fit in memory")
        for d in b.plan.devices:
            lines.append(f"  {d.name}: busy {b.estimate.device_busy[d.name] * 1e3:.2f} ms, "
                         f"memory {b.estimate.device_memory[d.name] / 2**20:.1f} MiB")
        for t in b.plan.transfers:
            lines.append(f"  {t.src} -> {t.dst}: {t.tensor} {t.nbytes:,} bytes")
        return "\n".join(lines)


def row_shares(speeds: list[DeviceSpeed]) -> tuple[float, ...]:
    """A spatial split's row shares: in proportion to each device's FLOP/s, or none (equal
    rows) when the devices are alike."""
    rates = tuple(s.flops_per_second for s in speeds)
    return rates if len(set(rates)) > 1 else ()


def _candidate(label, strategy, split_mod, device_idx, cluster, speeds, source):
    from splitc.compiler import build_plan

    ex = extract(split_mod)
    sub = Cluster(tuple(cluster.devices[i] for i in device_idx), cluster.network, cluster.links)
    plan = build_plan(ex, sub.targets, strategy, source)
    est = estimate(plan, sub, [speeds[i] for i in device_idx])
    over = {d.name: est.device_memory[d.name] - c.memory
            for d, c in zip(plan.devices, sub.devices, strict=True)
            if est.device_memory[d.name] > c.memory}
    return Candidate(label, strategy, tuple(device_idx), split_mod, ex, plan, est, over)


def search(mod: tvm.IRModule, cluster: Cluster, *, objective: str = "latency",
           source: str = "") -> SearchResult:
    """Find the split of ``mod`` with the lowest predicted latency (or period) on ``cluster``."""
    if objective not in ("latency", "throughput"):
        raise SplitcError(f"unknown objective {objective!r}: latency or throughput")
    t0 = time.perf_counter()
    speeds = [device_speed(d) for d in cluster.devices]
    n = len(cluster.devices)
    everyone = tuple(range(n))
    cands: list[Candidate] = []

    def add(label, strategy, split_mod, idx):
        cands.append(_candidate(label, strategy, split_mod, idx, cluster, speeds, source))

    fastest = max(everyone, key=lambda i: speeds[i].flops_per_second)
    for i in sorted({0, fastest}):
        add(f"single device {cluster.devices[i].name}", "pipeline",
            PipelineSplit(PipelinePlan((), (0,)))(mod), (i,))
    if n > 1:
        orders = {everyone, tuple(sorted(everyone, key=lambda i: -speeds[i].flops_per_second))}
        for order in sorted(orders):
            plan = plan_pipeline(mod, n, speeds=[speeds[i] for i in order],
                                 bytes_per_second=cluster.network.bytes_per_second)
            names = ",".join(cluster.devices[i].name for i in order)
            add(f"pipeline [{names}]", "pipeline", PipelineSplit(plan)(mod), order)
        add("channel over all", "channel", ChannelSplit(plan_channel(mod, n))(mod), everyone)
        tried = set()
        shares = row_shares(speeds)
        for cap in HALO_CAPS:  # less recomputation, or fewer exchanges: priced, not guessed
            plan = plan_spatial(mod, n, max_overhead=cap, shares=shares)
            if plan.segments not in tried:
                tried.add(plan.segments)
                add(f"spatial over all (halo <= {cap - 1:.0%})", "spatial",
                    SpatialSplit(plan)(mod), everyone)
        for stages in (2, 4) if n >= 4 else ():  # tiled stages in a pipeline (mixed)
            if stages < n:
                plan = plan_spatial_stages(mod, n, stages, shares=shares)
                if plan.groups and len(set(plan.groups)) == stages:
                    sizes = "+".join(str(hi - lo) for lo, hi in dict.fromkeys(plan.groups))
                    add(f"spatial stages [{sizes}]", "spatial", SpatialSplit(plan)(mod),
                        everyone)
    key = (lambda c: c.estimate.latency) if objective == "latency" else \
        (lambda c: c.estimate.period)
    fitting = [c for c in cands if c.fits]
    if not fitting:
        closest = min(cands, key=lambda c: max(c.over_memory.values()))
        short = ", ".join(f"{d} by {b / 2**20:,.1f} MiB" for d, b in closest.over_memory.items())
        raise SplitcError(f"the cluster cannot hold the model: the closest plan "
                          f"({closest.label}) exceeds memory on {short}")
    best = min(fitting, key=key)
    return SearchResult(best, cands, objective, time.perf_counter() - t0, speeds)
