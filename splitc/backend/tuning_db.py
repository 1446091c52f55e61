"""Where tuning records live and how a build uses them (``splitc tune`` writes them: see
:mod:`splitc.backend.tuning`).

A database is a folder per target key (``<root>/<key>/database_*.json``); the key names the
target and, for the host, its CPU, since records measured on one CPU mean nothing on another.

Without ``--tuning-db`` a build uses the schedules selected on this CPU
(:func:`selection_root`, filled by :func:`splitc.backend.tuning.select` on first compile or by
``splitc tune``), else the databases the project ships.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import re
import time
from collections.abc import Callable, Iterator
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


#: In a database folder: the lock that splitc processes sharing it take (:func:`locked`).
LOCK_FILE = ".lock"


@contextlib.contextmanager
def locked(folder: Path, *, shared: bool = False,
           log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold ``folder``'s lock: exclusive while records are written (selection, tuning), shared
    while a build reads them. Every splitc process on a machine shares the selection cache, and
    TVM's JSON database appends its records a line at a time: a compile that read the files
    while another process wrote them failed in TVM's parser. ``log`` is told when the lock is
    held elsewhere and this process waits. The databases the project ships, and any folder
    where no lock file can be made (read-only), are read unlocked: nothing writes there."""
    folder = Path(folder)
    if shared and folder.resolve().is_relative_to(SHIPPED.resolve()):
        yield
        return
    try:
        if not shared:
            folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 (held across the yield)
    except OSError as e:
        if shared and e.errno in (errno.EACCES, errno.EROFS, errno.ENOENT, errno.EPERM):
            yield
            return
        raise SplitcError(f"cannot lock the schedule database {folder}: {e.strerror}") from None
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    with handle:
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None:
                log(f"waiting for {folder}: another splitc process is "
                    f"{'writing schedules there' if shared else 'using it'}")
            fcntl.flock(handle, mode)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


#: TVM's files in a database folder (the records refer to the workloads by line number)
DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")


def _reason(error: Exception) -> str:
    """What TVM's database reader said, in one line."""
    text = " ".join(str(error).split()).removeprefix("parallel_for_dynamic error with ")
    if not text or text == "(not rendered)":  # (TVM lost its own message)
        return "TVM's reader failed on its records"
    return text[:200]


def _cannot_read(folder: Path, why: str, advice: str) -> SplitcError:
    return SplitcError(f"the tuning database {folder} cannot be read: {why} (written by two "
                       f"processes at once, or cut short?); {advice}")


def open_database(folder: Path, *, cache: bool, log: Callable[[str], None]):
    """TVM's JSON database in ``folder``, to select or tune into (hold :func:`locked`). One
    that TVM cannot read (records that name the wrong workloads, as two processes appending
    at once left them before splitc locked the folder, or a file cut short) is, in the
    selection cache (``cache``: it is measured again on demand), moved aside into
    ``<folder>.unreadable-<time>`` with a warning and begun again; a database the user gave
    is an error that names it."""
    from tvm.s_tir import meta_schedule as ms

    folder = Path(folder)
    try:
        return ms.database.JSONDatabase(work_dir=str(folder))
    except Exception as e:  # (TVM raises RuntimeError with its check's text)
        why = _reason(e)
    if not cache:
        raise _cannot_read(folder, why, "give another, or tune again into an empty folder")
    aside = folder.with_name(f"{folder.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
    aside.mkdir(parents=True, exist_ok=True)
    for name in (*DATABASE_FILES, WINOGRAD_FILE):
        if (folder / name).exists():
            (folder / name).replace(aside / name)
    log(f"warning: the schedules selected in {folder} could not be read ({why}); moved to "
        f"{aside}, selecting again")
    return ms.database.JSONDatabase(work_dir=str(folder))


def readable(folder: Path) -> None:
    """Raise a :class:`SplitcError` naming ``folder`` if TVM cannot read its database (after
    a build failed with one: TVM's own error says neither which file nor why)."""
    from tvm.s_tir import meta_schedule as ms

    try:
        ms.database.JSONDatabase(work_dir=str(folder))
    except Exception as e:
        raise _cannot_read(folder, _reason(e), "delete it to select the schedules again, or "
                                               "give another") from None


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
