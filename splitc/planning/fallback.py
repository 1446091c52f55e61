"""``--spares K``: the fallback plans, one for every set of up to K devices of the main plan
being lost, each planned for the devices that remain as the main plan was planned.

The analysis is the main plan's: the same strategy split over the survivors (their speeds
and links, as the cluster gives them), or, for ``auto``, the cost-model search over the
survivors (:func:`splitc.planning.search.search`), which may leave some of them idle. Every
fallback plan must fit the survivors' memory caps; a loss whose plan cannot is named with
the reason, all of them in one error, before anything is built. :func:`check_held` then
checks what a board holds with every plan it takes part in loaded at once (the worker loads
them all so that a switch is immediate).

Fallback plans run on the main plan's devices only: a device the main plan leaves idle runs
no worker, so it is neither lost nor a survivor.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tvm

from splitc.backend.kinds import BuildOptions
from splitc.errors import SplitcError
from splitc.planning import strategies
from splitc.planning.cluster import Cluster
from splitc.planning.cost import DeviceSpeed, device_memory
from splitc.planning.extract import Extracted, extract
from splitc.planning.search import search
from splitc.runtime import fallback as fallback_format
from splitc.runtime.plan import Plan

Log = Callable[[str], None]


@dataclass(frozen=True)
class FallbackSplit:
    """The plan for losing ``lost``: the survivors' split, extracted (not built yet)."""

    lost: tuple[str, ...]
    extracted: Extracted
    targets: tuple[str, ...]  # of the extracted devices, in order
    strategy: str
    label: str                # what was chosen ("pipeline over dev0, dev2", auto's choice)

    @property
    def name(self) -> str:
        return fallback_format.name_of(self.lost)


def losses(devices: Sequence[str], spares: int) -> list[tuple[str, ...]]:
    """Every set of 1 to ``spares`` of ``devices`` (in their order), fewest first."""
    return [lost for k in range(1, spares + 1) for lost in itertools.combinations(devices, k)]


def plan_fallbacks(mod: tvm.IRModule, cluster: Cluster, used: Sequence[int], strategy: str,
                   spares: int, *, speeds: Sequence[DeviceSpeed] | None,
                   options: Mapping[str, Any] | None = None, objective: str = "latency",
                   source: str = "", build_options: BuildOptions | None = None,
                   layer_names: Mapping[str, str] | None = None,
                   log: Log = lambda _msg: None) -> list[FallbackSplit]:
    """The fallback plans for the main plan that runs on ``used`` (cluster device indexes):
    ``strategy`` (a registered one, or ``auto``) over the survivors of every loss of up to
    ``spares`` of them. ``speeds``: one per cluster device (None: devices alike; ``auto``
    needs them). Raises :class:`SplitcError` naming every loss the cluster cannot survive,
    and why."""
    names = [cluster.devices[i].name for i in used]
    if not 1 <= spares < len(names):
        raise SplitcError(f"--spares {spares}: the plan runs on {len(names)} device(s) "
                          f"({', '.join(names)}); give 1 to {len(names) - 1}" if len(names) > 1
                          else f"--spares {spares}: the plan runs on one device "
                          f"({names[0]}); there is nothing left to fall back on")
    found, refused = [], []
    for lost in losses(names, spares):
        keep = [i for i in used if cluster.devices[i].name not in lost]
        sub = Cluster(tuple(cluster.devices[i] for i in keep), cluster.network, cluster.links)
        sub_speeds = None if speeds is None else [speeds[i] for i in keep]
        try:
            if strategy == "auto":
                found.append(_searched(mod, sub, lost, sub_speeds, objective, source,
                                       build_options, layer_names))
            else:
                found.append(_split(mod, sub, lost, strategy, sub_speeds, options or {}, source,
                                    layer_names, log))
        except SplitcError as e:
            refused.append(f"losing {fallback_format.name_of(lost)} ({len(keep)} device(s) "
                           f"left): {e}")
    if refused:
        raise SplitcError(f"--spares {spares}: the cluster cannot survive "
                          + ("this loss" if len(refused) == 1 else f"{len(refused)} losses")
                          + ": " + "; ".join(refused))
    for f in found:
        log(f"fallback for losing {f.name}: {f.label}")
    return found


def _searched(mod, sub: Cluster, lost, speeds, objective, source, build_options,
              layer_names) -> FallbackSplit:
    best = search(mod, sub, speeds, objective=objective, source=source,
                  options=build_options).best
    used = [sub.devices[i] for i in best.devices]
    ex = extract(best.split_mod, [d.name for d in used], layer_names)
    return FallbackSplit(tuple(lost), ex, tuple(d.target for d in used), best.strategy,
                         f"auto chose {best.label} over {', '.join(d.name for d in sub.devices)}"
                         f" (predicted latency {best.estimate.latency * 1e3:.2f} ms)")


def _split(mod, sub: Cluster, lost, strategy: str, speeds, options, source, layer_names,
           log) -> FallbackSplit:
    chosen = strategies.get(strategy)
    if len(sub.devices) < chosen.min_devices:
        raise SplitcError(f"the {strategy} strategy needs at least {chosen.min_devices} "
                          "devices")
    ctx = strategies.Context(len(sub.devices), None if speeds is None else tuple(speeds), sub,
                             options, log)
    ex = extract(chosen.split(mod, ctx).module, [d.name for d in sub.devices], layer_names)
    over = _over_caps(ex.plan(sub.targets, strategy, source), sub)
    if over:
        raise SplitcError(f"the {strategy} plan over {', '.join(d.name for d in sub.devices)} "
                          "exceeds memory: " + ", ".join(over))
    return FallbackSplit(tuple(lost), ex, tuple(sub.targets), strategy,
                         f"{strategy} over {', '.join(d.name for d in sub.devices)}")


def _over_caps(plan: Plan, cluster: Cluster) -> list[str]:
    """Each device whose weights and largest working set pass its memory cap, by how much."""
    memory = device_memory(plan)
    caps = {d.name: d.memory for d in cluster.devices}
    return [f"{name} needs {_size(need)}, over its {_size(caps[name])} cap by "
            f"{_size(need - caps[name])}" for name, need in memory.items()
            if need > caps[name]]


def _size(n: float) -> str:
    """Bytes in the largest unit that keeps a digit before the point."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.2f} GiB"


def check_held(main: Plan, plans: Sequence[Plan], cluster: Cluster) -> None:
    """Refuse a compile whose boards cannot hold every plan they take part in at once (the
    worker loads them all, so that a switch costs no loading): per device, the weights of
    every distinct weights file of its plans plus the largest working set of any of them,
    against its memory cap. Raises :class:`SplitcError` naming the devices."""
    caps = {d.name: d.memory for d in cluster.devices}
    held: dict[str, dict[str, float]] = {}
    working: dict[str, float] = {}
    for plan in (main, *plans):
        memory = device_memory(plan)
        for d in plan.devices:
            pieces = plan.pieces_on(d.name)
            if not pieces:
                continue
            weights = float(sum(p.weight_bytes for p in pieces))
            held.setdefault(d.name, {})[d.weights_sha256 or plan.digest()] = weights
            working[d.name] = max(working.get(d.name, 0.0), memory[d.name] - weights)
    over = []
    for name, files in held.items():
        need = sum(files.values()) + working[name]
        if name in caps and need > caps[name]:
            over.append(f"{name} holds {len(files)} plan(s)' pieces, "
                        f"{_size(need)} with its largest working set, over its "
                        f"{_size(caps[name])} cap by {_size(need - caps[name])}")
    if over:
        raise SplitcError("the boards cannot hold every plan they take part in at once: "
                          + "; ".join(over) + " (give fewer --spares, or more memory)")
