"""Where tuning records live and how a build uses them (``splitc tune`` writes them: see
:mod:`splitc.backend.tuning`).

A database is a folder per target key (``<root>/<key>/database_*.json``); the key names the
target and, for the host, its CPU, since records measured on one CPU mean nothing on another.
"""

from __future__ import annotations

from pathlib import Path

import tvm
from tvm import relax

from splitc import targets as target_registry
from splitc.errors import SplitcError

#: Databases the project ships, one folder per target key.
SHIPPED = Path(__file__).parent / "tuning_records"


def target_key(spec: target_registry.TargetSpec) -> str:
    """The database folder name for a target: ``rpi4``; the host with its CPU: ``host-znver3``."""
    if spec.is_host:
        return f"{spec.name}-{spec.tvm_target().attrs['mcpu']}"
    return spec.name


def database_for(spec: target_registry.TargetSpec, root: str | Path | None = None
                 ) -> Path | None:
    """The database folder a build for ``spec`` uses: under ``root`` if given, else shipped."""
    for base in ([Path(root)] if root else []) + [SHIPPED]:
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
