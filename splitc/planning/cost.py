"""The cost model, in one place.

    piece seconds    = piece FLOPs / device FLOP/s + piece weight bytes / weight bandwidth
                       + per-call overhead
                       + bytes in and out of the piece x seconds per boundary byte
                       (+ piece FLOPs x tile seconds per FLOP in a spatial split; where
                       `splitc profile` fitted the three rates to a split's pieces alone,
                       those price that split's pieces instead)
    message seconds  = the runtime's CPU per message + its bytes x the runtime's per byte, on
                       the device that sends it and again on the device that receives it
                       (one serving thread: it runs neither pieces nor other messages
                       meanwhile)
    transfer seconds = bytes / link bandwidth + link latency   (each sender's link is shared:
                       messages that leave together get fair shares of it, as TCP flows do)
    device memory    = its weights + its largest piece's inputs and outputs

A piece on a device whose target kind prices pieces itself (an FPGA fabric: the piece's
hls4ml estimate, :meth:`splitc.backend.kinds.TargetKind.price_piece`) costs that estimate plus
the runtime's dispatch instead of the first line (:func:`kind_prices`).

A plan is priced by simulating it: each device runs its pieces in plan order as soon as their
inputs have arrived; each message (a piece's outputs for one destination, delivered whole)
waits for the sender's link. *Latency* is when the last output reaches the caller; the
*period* (1 / throughput with requests pipelined) is the busiest device's or link's time per
request.

Every piece reads all of its weights once however few rows it computes, so a spatial split's
tiles each pay the whole weight term, and a layer computed a few rows at a time runs slower
per FLOP than the whole layer (the tile term). Measured figures for these terms, per CPU, are
in ``benchmarks/README.md`` and ``benchmarks/results/``.

Device speed comes from, in order: the cluster file's ``gflops`` (which prices the weights
in with the FLOPs) or the table it names as the device's ``profile``; the table `splitc
profile` measured for that target on this machine; else, for a target that cannot be
measured here, its kind's published figures (:meth:`splitc.backend.kinds.TargetKind.
published_speed`). A host with no table must be profiled first — an explicit step
(:func:`splitc.planning.speeds.cluster_speeds` announces and runs it), never a side effect of
asking a speed: :func:`device_speed` raises :class:`NeedsProfile`. A cached profile measured
with other code generation, or in an older table format, is stale and ignored; one the
cluster file names is an error.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from splitc import cache_root
from splitc import targets as target_registry
from splitc.backend.kinds import BuildOptions, PiecePrice, PublishedSpeed, kind_of
from splitc.errors import SplitcError
from splitc.passes.codegen.cpu_schedules import CODEGEN
from splitc.planning.cluster import Cluster, ClusterDevice
from splitc.runtime.plan import Plan
from splitc.runtime.trace import CLIENT, Timeline

#: How much longer a spatial split's tiles take per FLOP than whole layers, as a fraction of a
#: FLOP's time, where no profile measured it (cluster-file ``gflops``, published peaks): 10 to
#: 17 % in four profiles of ResNet-50 on an x86 core (AVX-512); boards are assumed alike.
TILE_OVERHEAD = 0.13
#: CPU seconds the ZeroMQ runtime's serving thread spends per message it sends or receives
#: (header, checks, bookkeeping, handing frames to and from ZeroMQ, waking for it), and per
#: byte of the message (copies, first touches of its buffers), where `splitc profile` did not
#: measure them (:func:`splitc.driver.measure_runtime_cost`): 74-85 us and 0.1-0.6 ns on an AMD
#: EPYC (Zen 5) core. A board's Python is slower than that core (a Pi 4's several times): its
#: table from `splitc profile` run on it prices that; without one, these flatter the board.
DEFAULT_SECONDS_PER_MESSAGE = 80e-6
DEFAULT_RUNTIME_SECONDS_PER_BYTE = 0.6e-9
#: CPU seconds the serving thread spends per piece it runs, besides the piece and its messages
#: (finding the pieces a message made ready, checking the client is still there, routing and
#: keeping the outputs, its polls): 88-101 us on the tiny ResNet-18, 214 us on ResNet-50 224
#: on a Zen 4 core, measured apart from the messages' part since 2026-12-07. Charged to the
#: messages of 1- and 2-worker splits before, it made a message cost 283-324 us there and
#: overpriced ResNet-50's 8-way tiles (3.8 messages a piece) by half. Unmeasured, 0: the
#: defaults above were measured with it folded into the messages.
DEFAULT_RUNTIME_SECONDS_PER_PIECE = 0.0
#: Seconds a piece call costs besides its FLOPs when no profile says otherwise (the VM call).
DEFAULT_CALL_OVERHEAD = 50e-6
#: Seconds per byte a piece reads or writes at its boundary: a piece converts its inputs into
#: the packed layouts its kernels use (NCHW16c, ...) and its outputs back, and the runtime
#: copies them in and out. `splitc profile` measures it; when no profile says otherwise, about
#: 6 GB/s (ResNet-50's one-layer pieces against the whole model on an x86 core).
DEFAULT_SECONDS_PER_BYTE = 1.6e-10
#: Profile tables older than this (or of other code generation) are measured again. 2: the
#: weights are priced apart (``seconds_per_weight_byte``).
PROFILE_FORMAT = 2


def profile_dir() -> Path:
    return cache_root() / "profiles"


@dataclass(frozen=True)
class DeviceSpeed:
    flops_per_second: float
    call_overhead: float
    source: str  # where the figure came from, for --explain
    seconds_per_byte: float = 0.0  # at piece boundaries (see DEFAULT_SECONDS_PER_BYTE)
    seconds_per_weight_byte: float = 0.0  # each weight a piece reads, once per call
    tile_seconds_per_flop: float = 0.0  # a spatial split's pieces: a few rows at a time
    seconds_per_message: float = DEFAULT_SECONDS_PER_MESSAGE  # the runtime's, sent or received
    runtime_seconds_per_byte: float = DEFAULT_RUNTIME_SECONDS_PER_BYTE  # of those messages
    #: a channel split's pieces: each byte in or out of one costs this more (each reads its
    #: layer's whole gathered input to write a slice of the channels); measured by
    #: `splitc profile`, 0 where not (a board priced from published figures)
    channel_seconds_per_byte: float = 0.0
    #: seconds per FLOP, per weight byte and per byte in or out fitted to the pieces of
    #: spatial splits alone (`splitc profile --tile-ways N`), which price a spatial split's
    #: pieces instead of the rates above plus the tile term where measured: the rates that fit
    #: the whole model left ResNet-50's 8-way tiles 0-20 % off, by how the tile term's one
    #: number fell from one profile to the next (0 or 1 ps per FLOP on one Zen 4)
    tile_rates: tuple[float, ...] = ()
    #: the same fitted to one device's pieces of a channel split
    channel_rates: tuple[float, ...] = ()
    #: the runtime's, per piece it runs (see DEFAULT_RUNTIME_SECONDS_PER_PIECE)
    runtime_seconds_per_piece: float = DEFAULT_RUNTIME_SECONDS_PER_PIECE

    def _fitted(self, tiled: bool, divided: bool) -> tuple[float, ...]:
        """The rates fitted to this kind of piece alone, where measured (else empty)."""
        return self.tile_rates if tiled else self.channel_rates if divided else ()

    def weight_seconds(self, weight_bytes: float, tiled: bool = False,
                       divided: bool = False) -> float:
        """What reading a piece's weights adds to one call of it (:meth:`piece_seconds`)."""
        rates = self._fitted(tiled, divided)
        return weight_bytes * (rates[1] if rates else self.seconds_per_weight_byte)

    def message_seconds(self, nbytes: float) -> float:
        """The runtime's CPU for one message of ``nbytes`` (sending it, or receiving it)."""
        return self.seconds_per_message + nbytes * self.runtime_seconds_per_byte

    @classmethod
    def from_profile(cls, table: dict, source: str) -> DeviceSpeed:
        """The speed `splitc profile` measured (a table from :func:`~.profiler.measure`, with
        the runtime's cost from :func:`splitc.driver.measure_runtime_cost` where measured)."""
        return cls(table["flops_per_second"], table.get("call_overhead", 0.0), source,
                   table.get("seconds_per_byte", DEFAULT_SECONDS_PER_BYTE),
                   table.get("seconds_per_weight_byte", 0.0),
                   table.get("tile_seconds_per_flop", 0.0),
                   *table_message_seconds(table),
                   table.get("channel_seconds_per_byte", 0.0),
                   tuple(table.get("tile_rates", ())), tuple(table.get("channel_rates", ())),
                   table.get("runtime_seconds_per_piece", DEFAULT_RUNTIME_SECONDS_PER_PIECE))

    @classmethod
    def from_published(cls, published: PublishedSpeed) -> DeviceSpeed:
        """The speed a target kind states from published figures (cost-model defaults for
        what it leaves open)."""
        rate = published.flops_per_second
        return cls(rate,
                   DEFAULT_CALL_OVERHEAD if published.call_overhead is None
                   else published.call_overhead, published.source,
                   DEFAULT_SECONDS_PER_BYTE if published.seconds_per_byte is None
                   else published.seconds_per_byte,
                   1 / published.weight_bytes_per_second
                   if published.weight_bytes_per_second else 0.0,
                   TILE_OVERHEAD / rate if published.tiles_slower else 0.0,
                   *table_message_seconds({}))

    def piece_seconds(self, flops: float, weight_bytes: float, edge_bytes: float,
                      tiled: bool = False, divided: bool = False) -> float:
        """One call of a piece with these FLOPs, weights, and bytes in and out (``tiled``: a
        piece of a spatial split, its layers computed a few rows at a time; ``divided``: a
        piece of a channel split, its layer's output channels divided)."""
        rates = self._fitted(tiled, divided)
        if rates:
            per_flop, _, per_byte = rates
            return (flops * per_flop + self.weight_seconds(weight_bytes, tiled, divided)
                    + edge_bytes * per_byte + self.call_overhead)
        return (flops * (1 / self.flops_per_second
                         + (self.tile_seconds_per_flop if tiled else 0.0))
                + self.weight_seconds(weight_bytes, tiled, divided)
                + self.call_overhead
                + edge_bytes * (self.seconds_per_byte
                                + (self.channel_seconds_per_byte if divided else 0.0)))


def table_message_seconds(table: dict) -> tuple[float, float]:
    """The runtime's cost per message and per byte a profile table measured, else the
    defaults."""
    if "seconds_per_message" in table:
        return table["seconds_per_message"], table.get("runtime_seconds_per_byte", 0.0)
    return DEFAULT_SECONDS_PER_MESSAGE, DEFAULT_RUNTIME_SECONDS_PER_BYTE


def named_profile(device: ClusterDevice) -> dict:
    """The table a cluster file names for ``device``, checked: one the cost model can read,
    measured for the device's target with today's code generation (a stale table is an
    error here, not skipped: the user chose it)."""
    try:
        table = json.loads(Path(device.profile).read_text())
    except (OSError, ValueError) as e:
        raise SplitcError(f"device {device.name}: cannot read profile {device.profile}: "
                          f"{e}") from None
    if not isinstance(table, dict) or "flops_per_second" not in table:
        raise SplitcError(f"device {device.name}: {device.profile} is not a `splitc profile` "
                          "table")
    if table.get("target") != device.target:
        raise SplitcError(f"device {device.name}: profile {device.profile} was measured for "
                          f"{table.get('target')!r}, the device is a {device.target!r}")
    if table.get("codegen") != CODEGEN or table.get("format") != PROFILE_FORMAT:
        raise SplitcError(f"device {device.name}: profile {device.profile} was measured with "
                          "another version of splitc's code generation; measure it again "
                          f"(`splitc profile --target {device.target} --output ...`)")
    return table


class NeedsProfile(SplitcError):
    """A device whose speed must be measured first (`splitc profile --target TARGET`, or
    :func:`splitc.planning.speeds.cluster_speeds`, which announces it and runs it)."""

    def __init__(self, target: str):
        super().__init__(f"target {target} has no speed table yet: run `splitc profile "
                         f"--target {target}` (or give gflops in the cluster file)")
        self.target = target


def cached_profile(target: str) -> tuple[dict, Path] | None:
    """The table `splitc profile` stored for ``target`` on this machine, if it is current."""
    path = profile_dir() / f"{target}.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if table.get("codegen") == CODEGEN and table.get("format") == PROFILE_FORMAT:
        return table, path
    return None


def needs_profile(device: ClusterDevice) -> bool:
    """Whether ``device``'s speed can only come from measuring it here first."""
    return (not device.gflops and not device.profile and cached_profile(device.target) is None
            and target_registry.get(device.target).is_host)


def device_speed(device: ClusterDevice) -> DeviceSpeed:
    """How fast ``device`` runs compiled pieces (see the module docstring for the order).
    Measures nothing: a host without a table raises :class:`NeedsProfile`."""
    if device.gflops:
        return DeviceSpeed(device.gflops * 1e9, DEFAULT_CALL_OVERHEAD, "cluster file",
                           DEFAULT_SECONDS_PER_BYTE,
                           0.0, TILE_OVERHEAD / (device.gflops * 1e9),
                           *table_message_seconds({}))
    if device.profile:
        return DeviceSpeed.from_profile(named_profile(device), f"profile {device.profile}")
    cached = cached_profile(device.target)
    if cached is not None:
        return DeviceSpeed.from_profile(cached[0], f"profile {cached[1]}")
    spec = target_registry.get(device.target)
    if spec.is_host:
        raise NeedsProfile(device.target)
    return DeviceSpeed.from_published(kind_of(spec).published_speed(spec))


@dataclass(frozen=True)
class Estimate:
    """What the cost model predicts for one plan on one cluster."""

    latency: float
    period: float
    device_busy: dict[str, float]
    device_memory: dict[str, float]
    transfer_bytes: int
    #: of ``device_busy``, the time its pieces spend reading their weights (a spatial split's
    #: tiles each read all of a layer's weights: at N=8 most of ResNet-50's, on every device)
    device_weights: dict[str, float] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return 1.0 / self.period if self.period else float("inf")


def device_memory(plan: Plan) -> dict[str, float]:
    """Weights plus the largest piece's inputs and outputs, per device (bytes)."""
    out = {}
    for d in plan.devices:
        pieces = plan.pieces_on(d.name)
        weights = sum(p.weight_bytes for p in pieces)
        working = max((sum(plan.tensors[t].nbytes for t in (*p.inputs, *p.outputs))
                       for p in pieces), default=0)
        out[d.name] = float(weights + working)
    return out


#: Strategies whose pieces compute layers a few rows at a time (they pay the tile term).
TILED_STRATEGIES = frozenset({"spatial", "hybrid"})


def kind_prices(plan: Plan, modules: dict, options: BuildOptions | None = None
                ) -> dict[str, PiecePrice]:
    """The pieces whose device's target kind prices them itself (FPGA pieces: their hls4ml
    estimates), by piece name; ``modules``: each device's module of pieces, by device name."""
    out = {}
    for dev in plan.devices:
        spec = target_registry.get(dev.target)
        for piece in plan.pieces_on(dev.name):
            price = kind_of(spec).price_piece(spec, piece.name, modules[dev.name][piece.name],
                                              options or BuildOptions())
            if price is not None:
                out[piece.name] = price
    return out


def estimate(plan: Plan, cluster: Cluster, speeds: list[DeviceSpeed] | None = None,
             *, client: str | None = None, piece_seconds: dict[str, float] | None = None,
             timeline: Timeline | None = None) -> Estimate:
    """Simulate one request of ``plan`` on ``cluster`` (device ``i`` of the plan is the
    cluster's device ``i``). The caller sits on the cluster's network (or at ``client``).
    ``piece_seconds``: pieces priced by their device's kind (:func:`kind_prices`), which
    take that long plus the runtime's dispatch. ``timeline``: filled with every piece and
    message as simulated (the predicted trace)."""
    if len(plan.devices) != len(cluster.devices):
        raise SplitcError(f"the plan has {len(plan.devices)} devices, the cluster "
                          f"{len(cluster.devices)}")
    speeds = speeds or [device_speed(d) for d in cluster.devices]
    node = {d.name: c.name for d, c in zip(plan.devices, cluster.devices, strict=True)}
    speed = {d.name: s for d, s in zip(plan.devices, speeds, strict=True)}

    def link(a: str | None, b: str | None):
        if a is None or b is None:
            return cluster.network
        return cluster.link(node[a], node[b])

    ready: dict[tuple[str, str | None], float] = {}  # (tensor, where) -> time available
    # (tensor, where) -> the message that brought it there: (its number, arrival, bytes),
    # handled once by the receiving device's serving thread, before the first piece that
    # reads it
    carried: dict[tuple[str, str], tuple[int, float, int]] = {}
    handled: set[int] = set()
    numbers = itertools.count()
    free = {d.name: 0.0 for d in plan.devices}
    nic: dict[str | None, float] = {d.name: 0.0 for d in plan.devices}  # sender's link free
    nic[None] = 0.0
    busy = {d.name: 0.0 for d in plan.devices}
    weights = {d.name: 0.0 for d in plan.devices}
    link_busy = {d.name: 0.0 for d in plan.devices}
    # a spatial split's pieces compute their layers a few rows at a time (its few untiled
    # pieces, a classifier head say, are priced alike)
    tiled = plan.strategy in TILED_STRATEGIES and len(plan.devices) > 1
    divided = plan.strategy == "channel" and len(plan.devices) > 1
    # where each tensor goes: the devices of the pieces that read it, and the caller
    wanted: dict[str, set[str | None]] = defaultdict(set)
    for p in plan.pieces:
        for t in p.inputs:
            wanted[t].add(p.device)
    for e in plan.outputs:
        wanted[e.tensor].add(None)

    def send(src: str | None, at: float, tensors) -> float:
        """``src`` sends ``tensors`` at ``at``, one message per destination (ZeroMQ delivers a
        message whole), after its serving thread has handled each (returns that time). The
        messages leave together and share the sender's link (TCP flows to several hosts get
        fair shares): each arrives when the link has carried it and, of every other message,
        as much as it."""
        by_dst: dict[str | None, list[str]] = defaultdict(list)
        for t in tensors:
            ready[(t, src)] = at
            for dst in sorted(wanted[t] - {src}, key=str):
                by_dst[dst].append(t)
        nbytes = {dst: sum(plan.tensors[t].nbytes for t in ts) for dst, ts in by_dst.items()}
        handling = 0.0 if src is None else sum(speed[src].message_seconds(b)
                                               for b in nbytes.values())
        wire = {dst: b / link(src, dst).bytes_per_second for dst, b in nbytes.items()}
        start = max(at + handling, nic[src])
        for dst, ts in by_dst.items():
            others = sum(min(w, wire[dst]) for d, w in wire.items() if d != dst)
            done = start + others + link(src, dst).seconds(nbytes[dst])
            number = next(numbers)
            for t in ts:
                ready[(t, dst)] = done
                if dst is not None:
                    carried[(t, dst)] = (number, done, nbytes[dst])
            if timeline is not None:
                timeline.message(", ".join(ts), src or CLIENT, dst or CLIENT, start, done,
                                 nbytes[dst], 0)
        nic[src] = start + sum(wire.values())
        if src is not None:
            link_busy[src] += sum(wire.values())
            busy[src] += handling
        return at + handling

    send(None, 0.0, plan.client_tensors)  # the caller has these at time 0
    for p in plan.pieces:
        # the messages bringing its inputs, handled in the order they arrive
        arrivals = sorted({carried[(t, p.device)] for t in p.inputs
                           if (t, p.device) in carried
                           and carried[(t, p.device)][0] not in handled}, key=lambda m: m[1])
        start = max([free[p.device]] + [ready[(t, p.device)] for t in p.inputs
                                        if (t, p.device) not in carried])
        for number, arrival, size in arrivals:
            handled.add(number)
            cost = speed[p.device].message_seconds(size)
            start = max(start, arrival) + cost
            busy[p.device] += cost
        edge = sum(plan.tensors[t].nbytes for t in (*p.inputs, *p.outputs))
        if piece_seconds and p.name in piece_seconds:
            run = piece_seconds[p.name]
        else:
            run = speed[p.device].piece_seconds(p.flops, p.weight_bytes, edge, tiled, divided)
            weights[p.device] += speed[p.device].weight_seconds(p.weight_bytes, tiled, divided)
        if timeline is not None:
            waited = [t for t in p.inputs if ready[(t, p.device)] > free[p.device]]
            if start > free[p.device] and waited:
                timeline.span(p.device, "wait", "waiting for " + ", ".join(waited),
                              free[p.device], start, 0)
            timeline.span(p.device, "compute", p.name, start, start + run, 0,
                          flops=p.flops, weight_bytes=p.weight_bytes)
        dispatch = speed[p.device].runtime_seconds_per_piece  # the serving thread's, around it
        free[p.device] = start + run + dispatch
        busy[p.device] += run + dispatch
        free[p.device] = send(p.device, free[p.device], p.outputs)
    latency = max(ready[(e.tensor, None)] for e in plan.outputs)
    period = max(list(busy.values()) + list(link_busy.values()))
    return Estimate(latency, period, busy, device_memory(plan), plan.transfer_bytes, weights)
