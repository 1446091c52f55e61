"""``--strategy auto``: price the candidate splits every registered strategy offers, keep
the best.

Each strategy in :mod:`splitc.planning.registry` offers its candidates for the cluster's devices
and speeds (:meth:`~splitc.planning.registry.Strategy.candidates`: the pipeline strategy the
whole model on single devices and pipelines over orders of the devices, the spatial split each
cap on recomputed halo rows and tiled stages, ...). Each candidate is extracted (no TVM build:
that is the expensive part and only the winner needs it) and simulated by
:func:`splitc.planning.cost.estimate`; pieces on a device whose kind prices them itself (an
FPGA fabric) are priced by it (:func:`splitc.planning.cost.kind_prices`: the piece's hls4ml
resource and latency estimate), and a candidate whose piece such a device cannot take (an op
the fabric has no layer for, or too big for the part) is dropped with the reason. Candidates
over a device's memory cap are dropped; if none fits, the error says by how much the best one
falls short.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import tvm

from splitc.backend.kinds import BuildOptions, PiecePrice
from splitc.errors import SplitcError
from splitc.planning import strategies
from splitc.planning.cluster import Cluster
from splitc.planning.cost import DeviceSpeed, Estimate, estimate, kind_prices
from splitc.planning.extract import Extracted, extract
from splitc.planning.strategies import Context, Proposal
from splitc.planning.strategies.branch import branch_bytes
from splitc.runtime.plan import Plan
from splitc.runtime.trace import Timeline

#: What marks a candidate a strategy cut a second time, with the fabric at the FLOP rate its
#: pieces' estimates reached (see :func:`search`).
RECUT = " (re-cut)"


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
    #: pieces their device's kind priced itself (FPGA pieces), by name
    priced: dict[str, PiecePrice] = field(default_factory=dict)

    @property
    def refused(self) -> dict[str, str]:
        """Pieces their device cannot take (an FPGA fabric: an op or the part's size), with
        the reason."""
        return {n: p.note for n, p in self.priced.items() if p.seconds is None}

    @property
    def fits(self) -> bool:
        return not self.over_memory and not self.refused


@dataclass
class SearchResult:
    best: Candidate
    candidates: list[Candidate]
    objective: str
    seconds: float
    speeds: list[DeviceSpeed]
    #: the speeds strategies were asked to cut with a second time (a fabric at the rate its
    #: pieces' estimates reach); ``speeds`` where nothing was re-cut
    steer: list[DeviceSpeed] | None = None

    def __post_init__(self):
        if self.steer is None:
            self.steer = self.speeds

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
                if c.over_memory else
                "refused by " + ", ".join(sorted({_device_of(c, n) for n in c.refused}))
                + " (below)" if c.refused else "")
            lines.append(f"{c.label:<34} {c.estimate.latency * 1e3:>10.2f} "
                         f"{c.estimate.period * 1e3:>10.2f} {c.estimate.transfer_bytes:>12,} "
                         f"{max(c.estimate.device_memory.values()) / 2**20:>11.1f}  {note}")
        b = self.best
        lines.append(f"why: {b.label} has the lowest predicted {key} among the candidates "
                     "that fit in memory" + (" and whose pieces their devices take"
                                             if any(c.priced for c in self.candidates) else ""))
        for d in b.plan.devices:
            weights = b.estimate.device_weights.get(d.name, 0.0)
            lines.append(f"  {d.name}: busy {b.estimate.device_busy[d.name] * 1e3:.2f} ms"
                         + (f" (reading weights {weights * 1e3:.2f} ms)" if weights else "")
                         + f", memory {b.estimate.device_memory[d.name] / 2**20:.1f} MiB")
        for t in b.plan.transfers:
            lines.append(f"  {t.src} -> {t.dst}: {t.tensor} {t.nbytes:,} bytes")
        lines += self._explain_priced(cluster, key)
        return "\n".join(lines)

    def _explain_priced(self, cluster: Cluster, key: str) -> list[str]:
        """Devices whose kind priced the pieces (FPGA fabrics): what the chosen plan puts
        there, what those pieces would cost on the other devices, and the best plan with
        and without the fabric side by side — or why none of it went there."""
        if not any(c.priced for c in self.candidates):
            return []
        lines = ["priced by their own estimates (hls4ml: resources and cycles, not synthesis "
                 "results):"]
        b = self.best

        def uses(c: Candidate) -> bool:
            return any(p.seconds is not None for p in c.priced.values())

        for piece in b.plan.pieces:
            price = b.priced.get(piece.name)
            if price is None or price.seconds is None:
                continue
            dev = b.plan.device(piece.device)
            lines.append(f"  {piece.name} on {dev.name} ({dev.target}): {price.note}; "
                         f"{price.seconds * 1e3:.3f} ms a call (and the runtime's "
                         "handling of each message in and out)")
            edge = sum(b.plan.tensors[t].nbytes for t in (*piece.inputs, *piece.outputs))
            for d, speed in zip(cluster.devices, self.speeds, strict=True):
                if not any(c.devices[c.plan.device(p.device).index] == cluster.devices.index(d)
                           for c in self.candidates for p in c.plan.pieces
                           if p.name in c.priced):
                    there = speed.piece_seconds(piece.flops, piece.weight_bytes, edge)
                    lines.append(f"    on {d.name} ({d.target}) its {piece.flops / 1e6:,.2f} "
                                 f"MFLOP would take {there * 1e3:.3f} ms")
        fitting = [c for c in self.candidates if c.fits]
        without = [c for c in fitting if not uses(c)]
        using = [c for c in fitting if uses(c)]
        if uses(b):
            if without:
                alt = min(without, key=lambda c: getattr(c.estimate, key))
                lines.append(f"  the fabric pays: {b.label} is predicted "
                             f"{getattr(b.estimate, key) * 1e3:.2f} ms ({key}); the best plan "
                             f"without it, {alt.label}, {getattr(alt.estimate, key) * 1e3:.2f} "
                             "ms")
        elif using:
            alt = min(using, key=lambda c: getattr(c.estimate, key))
            lines.append(f"  nothing goes to the fabric: the best candidate using it, "
                         f"{alt.label}, is predicted {getattr(alt.estimate, key) * 1e3:.2f} ms "
                         f"({key}) against {getattr(b.estimate, key) * 1e3:.2f} ms")
        else:
            lines.append("  nothing goes to the fabric: no candidate's pieces fit it (below)")
        if self.steer != self.speeds:
            for d, before, after in zip(cluster.devices, self.speeds, self.steer, strict=True):
                if before != after:
                    lines.append(f"  {d.name}'s pieces reach {after.flops_per_second / 1e9:.2f} "
                                 "GFLOP/s by their estimates; the candidates marked "
                                 f"'{RECUT.strip()}' were cut again at that rate")
        reasons: dict[str, str] = {}
        for c in self.candidates:
            for why in c.refused.values():
                reasons.setdefault(why, c.label)
        for why, label in reasons.items():
            lines.append(f"  refused ({label}): {why}")
        return lines


def _reached(cands: list[Candidate], speeds: list[DeviceSpeed]) -> list[DeviceSpeed]:
    """``speeds`` with each device whose kind priced its pieces running at the FLOP rate its
    fitting pieces reached by their estimates (unchanged where none fit)."""
    out = list(speeds)
    for i in range(len(speeds)):
        flops = seconds = 0.0
        for c in cands:
            for piece in c.plan.pieces:
                price = c.priced.get(piece.name)
                if price is not None and price.seconds and c.devices[
                        c.plan.device(piece.device).index] == i:
                    flops += piece.flops
                    seconds += price.seconds
        if seconds:
            out[i] = dataclasses.replace(speeds[i], flops_per_second=flops / seconds,
                                         source=speeds[i].source + "; cut at the "
                                         f"{flops / seconds / 1e9:.2f} GFLOP/s its pieces' "
                                         "estimates reach")
    return out


def _same(a: Candidate, b: Candidate) -> bool:
    """The same split on the same devices (a re-cut that changed nothing)."""
    return a.devices == b.devices and [(p.device, p.flops) for p in a.plan.pieces] == \
        [(p.device, p.flops) for p in b.plan.pieces]


def _device_of(c: Candidate, piece: str) -> str:
    return next(p.device for p in c.plan.pieces if p.name == piece)


def _candidate(proposal: Proposal, strategy: str, cluster: Cluster,
               speeds: list[DeviceSpeed], source: str,
               options: BuildOptions | None = None) -> Candidate:
    idx = proposal.devices
    sub = Cluster(tuple(cluster.devices[i] for i in idx), cluster.network, cluster.links)
    ex = extract(proposal.module, [d.name for d in sub.devices])
    plan = ex.plan(sub.targets, strategy, source)
    priced = kind_prices(plan, ex.modules, options)
    est = estimate(plan, sub, [speeds[i] for i in idx],
                   piece_seconds={n: p.seconds for n, p in priced.items()
                                  if p.seconds is not None})
    # a device whose kind priced its pieces checked them against its own memories (an FPGA
    # estimate counts its block RAM); float32 weight bytes do not say what it holds
    checked = {p.device for p in plan.pieces if p.name in priced}
    over = {d.name: est.device_memory[d.name] - c.memory
            for d, c in zip(plan.devices, sub.devices, strict=True)
            if est.device_memory[d.name] > c.memory and d.name not in checked}
    return Candidate(proposal.label, strategy, idx, proposal.module, ex, plan, est, over,
                     priced)


def search(mod: tvm.IRModule, cluster: Cluster, speeds: list[DeviceSpeed], *,
           objective: str = "latency", source: str = "",
           options: BuildOptions | None = None) -> SearchResult:
    """Find the split of ``mod`` with the lowest predicted latency (or period) on ``cluster``,
    whose devices run at ``speeds`` (:func:`splitc.planning.speeds.cluster_speeds`).
    ``options``: how the devices would be built (an FPGA's precision and reuse factor, which
    its pieces' estimates depend on)."""
    if objective not in ("latency", "throughput"):
        raise SplitcError(f"unknown objective {objective!r}: latency or throughput")
    t0 = time.perf_counter()

    def offered(steer: list[DeviceSpeed], note: str = "") -> list[Candidate]:
        ctx = Context(len(cluster.devices), tuple(steer), cluster)
        out = []
        for strategy in strategies.all_strategies():
            for p in strategy.candidates(mod, ctx):
                c = _candidate(p, strategy.name, cluster, speeds, source, options)
                c.label += note
                out.append(c)
        return out

    cands = offered(speeds)
    # Strategies cut with one FLOP rate per device; a fabric's is its peak, which its pieces'
    # estimates rarely reach. Cut again with the rate they do reach on this model (the
    # candidates are still priced piece by piece), so that a stage's share can fit the fabric.
    steer = _reached(cands, speeds)
    if steer != speeds:
        seen = {c.label for c in cands}
        cands += [c for c in offered(steer, RECUT) if c.label.removesuffix(RECUT) in seen
                  and not any(_same(c, d) for d in cands)]
    key = (lambda c: c.estimate.latency) if objective == "latency" else \
        (lambda c: c.estimate.period)
    fitting = [c for c in cands if c.fits]
    if not fitting and not any(c.over_memory for c in cands):
        raise SplitcError("no candidate split runs on these devices: " + "; ".join(
            sorted({why for c in cands for why in c.refused.values()})))
    if not fitting:
        closest = min((c for c in cands if c.over_memory),
                      key=lambda c: max(c.over_memory.values()))
        short = ", ".join(f"{d} by {b / 2**20:,.1f} MiB" for d, b in closest.over_memory.items())
        raise SplitcError(f"the cluster cannot hold the model: the closest plan "
                          f"({closest.label}) exceeds memory on {short}")
    best = min(fitting, key=key)
    return SearchResult(best, cands, objective, time.perf_counter() - t0, speeds, steer)


def predicted_timeline(candidate: Candidate, cluster: Cluster, speeds: list[DeviceSpeed]
                       ) -> Timeline:
    """The cost model's timeline of one request of ``candidate`` (every piece, message and
    wait as simulated), to lay beside a measured one."""
    idx = candidate.devices
    sub = Cluster(tuple(cluster.devices[i] for i in idx), cluster.network, cluster.links)
    timeline = Timeline()
    estimate(candidate.plan, sub, [speeds[i] for i in idx], timeline=timeline,
             piece_seconds={n: p.seconds for n, p in candidate.priced.items()
                            if p.seconds is not None})
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
