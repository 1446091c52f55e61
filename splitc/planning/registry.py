"""The strategy registry: every way splitc knows to split a model, in one table.

A strategy is one object (usually one module under :mod:`splitc.planning.strategies`) that
registers its plan analysis, its rewrite and the candidates it offers ``auto``. ``compile``,
the ``auto`` search, ``plan --explain`` and the CLI's help read this table, so adding a
strategy touches one file and its tests::

    @register
    class LastDevice(Strategy):
        name = "last"
        summary = "everything on the last device"

        def plan(self, mod, ctx):
            return ctx.n_devices

        def rewrite(self, plan):
            return lambda mod: OutlinePieces({...: plan - 1})(mod)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm

from splitc.errors import SplitcError
from splitc.planning.cluster import DEFAULT_BANDWIDTH, Cluster, device_names
from splitc.planning.cost import DeviceSpeed

Log = Callable[[str], None]


@dataclass(frozen=True)
class Context:
    """What a strategy plans with.

    ``speeds``: one per device when the devices' speeds are known (the search's measured or
    stated figures, or a cluster file that states them), else None: the devices count as
    equal. ``options``: the compile's strategy options by name (branch: ``sync``,
    ``calibration``, ...); a strategy reads the ones it knows."""

    n_devices: int
    speeds: tuple[DeviceSpeed, ...] | None = None
    cluster: Cluster | None = None  # the devices' names and links, when known
    options: Mapping[str, Any] = field(default_factory=dict)
    log: Log = lambda _msg: None

    @property
    def bytes_per_second(self) -> float:
        return self.cluster.network.bytes_per_second if self.cluster else DEFAULT_BANDWIDTH

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.cluster.devices] if self.cluster else \
            device_names(self.n_devices)


@dataclass(frozen=True)
class Proposal:
    """A split a strategy offers ``auto``: the module in split form, and which cluster device
    each device of the split is (``devices[i]`` is the cluster index of split device ``i``)."""

    label: str
    module: tvm.IRModule
    devices: tuple[int, ...]


@dataclass(frozen=True)
class Split:
    """What a strategy gives a compile: the module in split form, and the extra files it
    keeps in the output folder (name -> text or bytes)."""

    module: tvm.IRModule
    files: Mapping[str, str | bytes] = field(default_factory=dict)


class Strategy:
    """One way to split a model. Subclasses set ``name`` and ``summary`` and implement
    :meth:`plan` and :meth:`rewrite`; the rest has defaults."""

    name: str = ""
    summary: str = ""
    #: the split gives the original's answer (else: approximate, checked against its own
    #: reference, see :meth:`reference`)
    exact: bool = True
    min_devices: int = 1

    def needs_speeds(self, options: Mapping[str, Any]) -> bool:
        """Whether planning with these options prices plans, so needs every device's speed
        (measured first where none is known); else the devices count as equal unless the
        cluster file states speeds."""
        return False

    def plan(self, mod: tvm.IRModule, ctx: Context) -> Any:
        """The analysis: a frozen plan value (where to cut, which layers, which rows)."""
        raise NotImplementedError

    def rewrite(self, plan: Any) -> Callable[[tvm.IRModule], tvm.IRModule]:
        """The pass that applies ``plan``, giving the module in split form."""
        raise NotImplementedError

    def split(self, mod: tvm.IRModule, ctx: Context) -> Split:
        """Plan and rewrite (a strategy with more to do — training, extra files — overrides)."""
        return Split(self.rewrite(self.plan(mod, ctx))(mod))

    def candidates(self, mod: tvm.IRModule, ctx: Context) -> Iterator[Proposal]:
        """What this strategy offers ``auto`` on ``ctx.n_devices`` devices of the given speeds:
        by default its split over all of them (approximate strategies offer nothing)."""
        if self.exact and ctx.n_devices >= self.min_devices:
            yield Proposal(f"{self.name} over all", self.split(mod, ctx).module,
                           tuple(range(ctx.n_devices)))

    def recreate(self, mod: tvm.IRModule, n_devices: int, out_dir: Path) -> tvm.IRModule:
        """The split module of a compiled plan again (for ``splitc tune OUT``), from the
        model and what the compile kept in ``out_dir``."""
        return self.split(mod, Context(n_devices)).module

    def reference(self, out_dir: Path, original):
        """What the compiled plan must compute, for ``run --check``: for an exact strategy
        the original model (anything with ``reference(inputs) -> outputs``)."""
        return original


_REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy | type[Strategy]) -> Strategy | type[Strategy]:
    """Add a strategy (an instance, or a class with no constructor arguments) to the table;
    usable as a class decorator."""
    instance = strategy() if isinstance(strategy, type) else strategy
    if not instance.name or instance.name in ("auto",):
        raise SplitcError(f"a strategy needs a name other than 'auto', got {instance.name!r}")
    _REGISTRY[instance.name] = instance
    return strategy


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> Strategy:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SplitcError(f"unknown strategy {name!r}; choose one of "
                          f"{', '.join([*_REGISTRY, 'auto'])}") from None


def all_strategies() -> Iterable[Strategy]:
    return list(_REGISTRY.values())


def names() -> list[str]:
    return list(_REGISTRY)


def describe() -> str:
    """One line per strategy, for the CLI's help."""
    return " | ".join(f"{s.name} ({s.summary})" for s in _REGISTRY.values())
