"""Targets as data: one JSON file per device kind in this folder.

Each file gives the TVM target (as a dict: TVM 0.27 takes no target strings), the cross
compiler that links libraries for it, the ELF machine its libraries must have, and published
figures (cores, memory, peak FLOP/s) labelled as such. TVM is imported only when a target is
built, so the board runtime can read these files too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from splitc.errors import SplitcError

_HERE = Path(__file__).parent
#: ELF ``e_machine`` values of the architectures splitc builds for.
ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64", 0x28: "arm"}


@dataclass(frozen=True)
class TargetSpec:
    """One device kind splitc compiles for (see the JSON files beside this module)."""

    name: str
    description: str
    arch: str
    cpu: str
    tvm_target_dict: dict
    cross_compiler: str | None
    elf_machine: str
    cores: int | None
    memory_bytes: int | None
    peak_gflops_per_core: float | None
    peak_note: str
    memory_bandwidth_gbs: float | None

    @property
    def is_host(self) -> bool:
        return self.cross_compiler is None

    @property
    def resolved_cores(self) -> int:
        return self.cores or os.cpu_count() or 1

    @property
    def peak_gflops(self) -> float | None:
        """Published peak of all cores (GFLOP/s, fp32), or None when unknown."""
        if self.peak_gflops_per_core is None:
            return None
        return self.peak_gflops_per_core * self.resolved_cores

    @property
    def resolved_memory(self) -> float:
        """Memory in bytes: the published figure, this machine's for the host, else no cap."""
        if self.memory_bytes:
            return self.memory_bytes
        if self.is_host:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return float("inf")

    def tvm_target(self):
        """The ``tvm.target.Target``; for the host, with this machine's CPU named (LLVM's
        ``-mcpu=native`` is silently generic)."""
        import tvm

        spec = dict(self.tvm_target_dict)
        if self.is_host:
            spec.setdefault("mcpu", tvm.target.codegen.llvm_get_system_cpu())
            spec.setdefault("num-cores", self.resolved_cores)
        return tvm.target.Target(spec)

    def export_library(self, executable, path: str | Path) -> Path:
        """Write ``executable`` as a shared library linked for this target."""
        path = Path(path)
        if self.is_host:
            executable.export_library(str(path))
        else:
            from tvm.support.cc import cross_compiler

            executable.export_library(str(path), fcompile=cross_compiler(self.cross_compiler))
        return path


@cache
def _load_all() -> dict[str, TargetSpec]:
    specs = {}
    for path in sorted(_HERE.glob("*.json")):
        d = json.loads(path.read_text())
        specs[d["name"]] = TargetSpec(
            name=d["name"], description=d["description"], arch=d["arch"], cpu=d["cpu"],
            tvm_target_dict=d["tvm_target"], cross_compiler=d["cross_compiler"],
            elf_machine=d["elf_machine"], cores=d["cores"], memory_bytes=d["memory_bytes"],
            peak_gflops_per_core=d["peak_gflops_per_core"], peak_note=d["peak_note"],
            memory_bandwidth_gbs=d["memory_bandwidth_gbs"])
    return specs


def names() -> list[str]:
    return list(_load_all())


def all_targets() -> list[TargetSpec]:
    return list(_load_all().values())


def get(name: str) -> TargetSpec:
    """The target called ``name``, or a SplitcError listing the known ones."""
    try:
        return _load_all()[name]
    except KeyError:
        raise SplitcError(f"unknown device target {name!r}; known targets: "
                          f"{', '.join(names())}") from None


def describe_table() -> str:
    """The table `splitc targets` prints."""
    rows = [("name", "arch", "cpu", "cores", "memory", "peak GFLOP/s", "cross compiler")]
    for t in all_targets():
        unknown = "this machine" if t.is_host else "?"
        mem = f"{t.memory_bytes / 2**30:.1f} GiB" if t.memory_bytes else unknown
        peak = f"{t.peak_gflops:.1f}" if t.peak_gflops else ("measure" if t.is_host else "?")
        cores = str(t.resolved_cores) if t.cores or t.is_host else "?"
        rows.append((t.name, t.arch, t.cpu, cores, mem, peak, t.cross_compiler or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append("peak figures are published or derived estimates (see targets/*.json); "
                 "`splitc profile` measures the host")
    return "\n".join(lines)


def elf_machine(path: str | Path) -> str:
    """The architecture an ELF file was built for (``x86_64``, ``aarch64``, ``arm``)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        raise SplitcError(f"{path} is not an ELF file")
    little = head[5] == 1
    machine = int.from_bytes(head[18:20], "little" if little else "big")
    return ELF_MACHINES.get(machine, f"unknown(0x{machine:x})")
