"""Device speeds for planning, with profiling as an explicit, visible step.

:func:`cluster_speeds` is what ``compile`` and ``plan`` call before any pricing: every device's
:func:`~splitc.planning.cost.device_speed`, after profiling, once and announced, each target
that has no table yet and can be measured here (the host: ResNet-18 timed, ~30 s, then cached
where `splitc profile` stores tables).
"""

from __future__ import annotations

from collections.abc import Callable

from splitc.planning import profiler
from splitc.planning.cluster import Cluster
from splitc.planning.cost import DeviceSpeed, device_speed, needs_profile

#: The model timed when the host is profiled on first use: layers of the sizes real models
#: have (a tiny model's layers are too small to show the speed of real ones), in seconds.
FIRST_USE_MODEL = "resnet18"


def cluster_speeds(cluster: Cluster, *, log: Callable[[str], None] = lambda _m: None,
                   progress: profiler.Progress | None = None) -> list[DeviceSpeed]:
    """Each device's speed, profiling first (and saying so) any target that needs it."""
    for target in sorted({d.target for d in cluster.devices if needs_profile(d)}):
        log(f"profiling {target} (first use): timing {FIRST_USE_MODEL}'s layers on this "
            "machine, about 30 s; the table is kept for later compiles "
            f"(`splitc profile --target {target}` measures it again)")
        table = profiler.measure(FIRST_USE_MODEL, target, number=2, progress=progress)
        log(f"wrote {profiler.save(table)}")
    return [device_speed(d) for d in cluster.devices]
