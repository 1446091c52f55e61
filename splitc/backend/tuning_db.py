"""Where tuning records live and how a build uses them (``splitc tune`` writes them: see
:mod:`splitc.backend.tuning`).

A database is a folder per target key (``<root>/<key>/database_*.json``); the key names the
target and, for the host, its CPU, since records measured on one CPU mean nothing on another.

Without ``--tuning-db`` a build uses the schedules selected on this CPU
(:func:`selection_root`, filled by :func:`splitc.backend.tuning.select` on first compile or by
``splitc tune``), else the databases the project ships.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import tvm
from tvm import relax

from splitc import cache_root
from splitc import targets as target_registry
from splitc.errors import SplitcError
from splitc.passes.codegen.cpu_schedules import CODEGEN

#: Databases the project ships, one folder per target key.
SHIPPED = Path(__file__).parent / "tuning_records"


def target_key(spec: target_registry.TargetSpec) -> str:
    """The database folder name for a target: ``rpi4``; the host with its CPU, as LLVM names
    the micro-architecture and by its model (one micro-architecture comes with different
    caches): ``host-znver5-amd-epyc``."""
    if spec.is_host:
        model = re.sub(r"[^a-z0-9]+", "-", target_registry.host_cpu_name().lower()).strip("-")
        return f"{spec.name}-{spec.tvm_target().attrs['mcpu']}-{model[:48]}"
    return spec.name


def selection_root() -> Path:
    """Where the schedules selected on a device are kept, a database per target key, beside
    the device profiles: ``$SPLITC_CACHE/schedules/<code generation>`` (selections made for
    other default schedules are not reused)."""
    return cache_root() / "schedules" / CODEGEN


def database_for(spec: target_registry.TargetSpec, root: str | Path | None = None
                 ) -> Path | None:
    """The database folder a build for ``spec`` uses: under ``root`` if given, else the
    schedules selected for it (:func:`selection_root`), else shipped."""
    for base in ([Path(root)] if root else [selection_root()]) + [SHIPPED]:
        folder = base / target_key(spec)
        if (folder / "database_tuning_record.json").exists():
            return folder
    if root:
        raise SplitcError(f"{root} holds no tuning records for target {spec.name} "
                          f"(expected {Path(root) / target_key(spec)}/database_*.json; "
                          f"`splitc tune --target {spec.name} --db {root}` makes them)")
    return None


def apply_database(folder: Path) -> tvm.transform.Pass:
    """The pass that schedules every kernel with a record in ``folder`` from its best one."""
    return relax.transform.MetaScheduleApplyDatabase(str(folder))


#: In a database folder: the Winograd-or-direct choice measured per convolution
#: (:func:`splitc.passes.codegen.winograd.winograd_key` -> output tile ``m``, 0: direct).
WINOGRAD_FILE = "winograd.json"


def winograd_tiles(folder: Path | None) -> dict[str, int]:
    """The Winograd choices measured into ``folder`` (none without one)."""
    path = Path(folder) / WINOGRAD_FILE if folder is not None else None
    if path is None or not path.exists():
        return {}
    return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}


def save_winograd_tiles(folder: Path, tiles: dict[str, int]) -> None:
    path = Path(folder) / WINOGRAD_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(tiles.items())), indent=1))
    tmp.replace(path)
