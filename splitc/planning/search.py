"""``--strategy auto``: price the candidate splits every registered strategy offers, keep
the best.

Each strategy in :mod:`splitc.planning.registry` offers its candidates for the cluster's devices
and speeds (:meth:`~splitc.planning.registry.Strategy.candidates`: the pipeline strategy the
whole model on single devices and pipelines over orders of the devices, the spatial split each
cap on recomputed halo rows and tiled stages, ...). Each candidate is extracted (no TVM build:
that is the expensive part and only the winner needs it) and simulated by
:func:`splitc.planning.cost.estimate`. Candidates over a device's memory cap are dropped; if
none fits, the error says by how much the best one falls short.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import tvm

from splitc.errors import SplitcError
from splitc.planning import strategies
from splitc.planning.cluster import Cluster
from splitc.planning.cost import DeviceSpeed, Estimate, estimate
from splitc.planning.extract import Extracted, extract
from splitc.planning.strategies import Context, Proposal
from splitc.planning.strategies.branch import branch_bytes
from splitc.runtime.plan import Plan
from splitc.runtime.trace import Timeline


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


def _candidate(proposal: Proposal, strategy: str, cluster: Cluster,
               speeds: list[DeviceSpeed], source: str) -> Candidate:
    idx = proposal.devices
    sub = Cluster(tuple(cluster.devices[i] for i in idx), cluster.network, cluster.links)
    ex = extract(proposal.module, [d.name for d in sub.devices])
    plan = ex.plan(sub.targets, strategy, source)
    est = estimate(plan, sub, [speeds[i] for i in idx])
    over = {d.name: est.device_memory[d.name] - c.memory
            for d, c in zip(plan.devices, sub.devices, strict=True)
            if est.device_memory[d.name] > c.memory}
    return Candidate(proposal.label, strategy, idx, proposal.module, ex, plan, est, over)


def search(mod: tvm.IRModule, cluster: Cluster, speeds: list[DeviceSpeed], *,
           objective: str = "latency", source: str = "") -> SearchResult:
    """Find the split of ``mod`` with the lowest predicted latency (or period) on ``cluster``,
    whose devices run at ``speeds`` (:func:`splitc.planning.speeds.cluster_speeds`)."""
    if objective not in ("latency", "throughput"):
        raise SplitcError(f"unknown objective {objective!r}: latency or throughput")
    t0 = time.perf_counter()
    ctx = Context(len(cluster.devices), tuple(speeds), cluster)
    cands = [_candidate(p, strategy.name, cluster, speeds, source)
             for strategy in strategies.all_strategies()
             for p in strategy.candidates(mod, ctx)]
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


def predicted_timeline(candidate: Candidate, cluster: Cluster, speeds: list[DeviceSpeed]
                       ) -> Timeline:
    """The cost model's timeline of one request of ``candidate`` (every piece, message and
    wait as simulated), to lay beside a measured one."""
    idx = candidate.devices
    sub = Cluster(tuple(cluster.devices[i] for i in idx), cluster.network, cluster.links)
    timeline = Timeline()
    estimate(candidate.plan, sub, [speeds[i] for i in idx], timeline=timeline)
    return timeline


def branch_savings(mod: tvm.IRModule, result: SearchResult) -> str:
    """What a branch plan (approximate: each device one branch, exchanging only at the head,
    then distilled with ``splitc finetune``) would send per inference, against the channel
    plan and the best exact plan the search found: for ``plan --explain``."""
    k = max(len(c.plan.devices) for c in result.candidates)
    if k < 2:
        return "branch plan: needs at least 2 devices"
    channel = [c for c in result.candidates if c.strategy == "channel"
               and len(c.plan.devices) == k]
    split = [c for c in result.candidates if c.fits and len(c.plan.devices) > 1]
    none, every = branch_bytes(mod, k, "none"), branch_bytes(mod, k, "all")
    lines = [f"branch plan over {k} devices (approximate; distil with `splitc finetune`): "
             f"{none:,} bytes per inference with no sync point, {every:,} with every sync "
             "point kept (exact)"]

    def versus(label: str, nbytes: int) -> str:
        if not nbytes:
            return f"  vs {label}: 0 bytes"
        return (f"  vs {label}: {nbytes:,} bytes -> {(1 - none / nbytes) * 100:.1f} % fewer"
                if none <= nbytes else
                f"  vs {label}: {nbytes:,} bytes -> {(none / nbytes - 1) * 100:.1f} % more")

    if channel:
        lines.append(versus(f"the channel plan ({channel[0].label})",
                            channel[0].estimate.transfer_bytes))
    if split:
        exact = min(split, key=lambda c: c.estimate.transfer_bytes)
        lines.append(versus(f"the exact split sending the fewest ({exact.label})",
                            exact.estimate.transfer_bytes))
    lines.append(versus(f"the chosen plan ({result.best.label})",
                        result.best.estimate.transfer_bytes))
    return "\n".join(lines)
