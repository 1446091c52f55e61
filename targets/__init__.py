"""Targets as data: one JSON file per device kind in this folder.

Each file gives the TVM target (as a dict: TVM 0.27 takes no target strings), the cross
compiler that links libraries for it, the ELF machine its libraries must have, and figures
(cores, memory, peak fp32 FLOP/s, memory bandwidth). The figures are published or derived
estimates, never measurements: every one has a note that starts with ``published:``,
``derived:`` or ``unknown:``. ``host.json`` leaves the CPU, architecture, cores and memory
empty; they are read from this machine.

TVM is imported only inside the functions that need it, so the board runtime can read these
files without loading the compiler.
"""

from __future__ import annotations

import copy
import json
import os
import platform
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path

_HERE = Path(__file__).parent


class TargetError(ValueError):
    """An unknown target name, a malformed target file, or a file of no known architecture.
    (Targets are data the board side reads too: they raise their own error, which the
    compile side and the CLI treat as bad input.)"""


#: ELF ``e_machine`` values of the architectures splitc builds for.
ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64", 0x28: "arm"}

#: ``platform.machine()`` spellings -> (arch, ELF machine), for the host.
_HOST_ARCHES = {
    "x86_64": ("x86_64", "x86_64"), "amd64": ("x86_64", "x86_64"),
    "aarch64": ("aarch64", "aarch64"), "arm64": ("aarch64", "aarch64"),
    "armv7l": ("armv7", "arm"), "armv7": ("armv7", "arm"),
}


@dataclass(frozen=True)
class TargetSpec:
    """One device kind splitc compiles for, as read from ``targets/<name>.json``.

    Attributes
    ----------
    name, description : str
        The name users give (``--targets rpi4``) and a one-line description.
    arch : str
        ``x86_64``, ``aarch64`` or ``armv7`` (the host's is read from this machine).
    cpu : str or None
        LLVM CPU name; None for the host until :func:`host_cpu` asks LLVM.
    tvm_target_dict : dict
        The TVM target as a dict (``kind``, ``mtriple``, ``mcpu``, ``mattr``, ...).
    cross_compiler : str or None
        The C++ compiler that links libraries for the target; None for the host.
    elf_machine : str
        What :func:`elf_machine` must read from the target's libraries.
    cores, memory_bytes : int or None
        Published figures (the host's: ``os.cpu_count()`` and physical memory); None if unknown.
    peak_gflops_per_core, peak_gflops : float or None
        Estimated fp32 peak of one core and of all cores, GFLOP/s; None if unknown.
    memory_bandwidth_gbs : float or None
        Estimated (theoretical) memory bandwidth, GB/s; None if unknown.
    peak_gflops_per_core_note, peak_gflops_note, memory_bandwidth_note : str
        Where each figure comes from: ``published: ...``, ``derived: ...`` or ``unknown: ...``.
    fpga : dict or None
        For an FPGA fabric (arch ``fpga``): the part, hls4ml's board name, clock (MHz) and
        resources (``dsp``, ``lut``, ``ff``, ``bram36``); its pieces become hls4ml projects
        (:mod:`splitc.backend.fpga`), not TVM code. None for CPUs.
    """

    name: str
    description: str
    arch: str
    cpu: str | None
    tvm_target_dict: dict
    cross_compiler: str | None
    elf_machine: str
    cores: int | None
    memory_bytes: int | None
    peak_gflops_per_core: float | None
    peak_gflops_per_core_note: str
    peak_gflops: float | None
    peak_gflops_note: str
    memory_bandwidth_gbs: float | None
    memory_bandwidth_note: str
    fpga: dict | None = None

    @property
    def is_fpga(self) -> bool:
        return self.fpga is not None

    @property
    def kind(self) -> str:
        """How pieces are built and loaded for this target (the plan's ``Device.kind``):
        ``tvm`` for CPUs, ``hls4ml`` for an FPGA fabric."""
        return "hls4ml" if self.is_fpga else "tvm"

    @property
    def is_host(self) -> bool:
        """True for code that runs on this machine (no cross compiler)."""
        return self.cross_compiler is None

    @property
    def resolved_cores(self) -> int:
        """Cores to plan for: the published count, else this machine's, else 1."""
        return self.cores or os.cpu_count() or 1

    @property
    def resolved_memory(self) -> float:
        """Memory in bytes: the published figure (the host's is measured), else no cap."""
        return float(self.memory_bytes) if self.memory_bytes else float("inf")

    def tvm_target(self):
        """The target as a ``tvm.target.Target``.

        Returns
        -------
        tvm.target.Target
            For the host, with this machine's CPU named (``mcpu=native`` would be silently
            generic) and ``num-cores`` set to ``os.cpu_count()``.
        """
        import tvm

        if self.is_fpga:
            raise TargetError(f"{self.name} is an FPGA fabric: its pieces are built by hls4ml, "
                              "not TVM")
        spec = copy.deepcopy(self.tvm_target_dict)
        if self.is_host:
            spec.setdefault("mcpu", host_cpu())
            spec.setdefault("num-cores", self.resolved_cores)
        return tvm.target.Target(spec)

    def export_library(self, executable, path: str | os.PathLike) -> Path:
        """Write a compiled executable as a shared library linked for this target.

        Parameters
        ----------
        executable : tvm.relax.VMExecutable
            What ``tvm.compile(mod, target=self.tvm_target())`` returned.
        path : str or PathLike
            The ``.so`` to write.

        Returns
        -------
        Path
            ``path``.
        """
        path = Path(path)
        if self.is_host:
            executable.export_library(str(path))
        else:
            from tvm.support.cc import cross_compiler

            executable.export_library(str(path), fcompile=cross_compiler(self.cross_compiler))
        return path


@cache
def host_cpu() -> str:
    """This machine's CPU as LLVM names it (e.g. ``znver5``, ``cortex-a72``)."""
    import tvm

    return str(tvm.target.codegen.llvm_get_system_cpu())


def host_cpu_name() -> str:
    """This machine's CPU by the model name the kernel reports (``AMD EPYC``, ``Intel(R)
    Xeon(R) ...``): every saved result names it, and schedules selected here are kept per
    model (:func:`splitc.backend.tuning_db.target_key`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _host_arch() -> tuple[str, str]:
    machine = platform.machine().lower()
    return _HOST_ARCHES.get(machine, (machine, machine))


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


def _from_json(path: Path) -> TargetSpec:
    d = json.loads(path.read_text())
    names = [f.name for f in fields(TargetSpec)]
    d["tvm_target_dict"] = d.pop("tvm_target")
    d.setdefault("fpga", None)
    if sorted(d) != sorted(names):
        raise TargetError(f"{path}: fields {sorted(set(d) ^ set(names))} missing or unexpected")
    if d["cross_compiler"] is None:  # the host: what this machine is
        arch, machine = _host_arch()
        d["arch"] = d["arch"] or arch
        d["elf_machine"] = d["elf_machine"] or machine
        d["cores"] = d["cores"] or os.cpu_count()
        d["memory_bytes"] = d["memory_bytes"] or _physical_memory()
    return TargetSpec(**d)


@cache
def _load_all() -> dict[str, TargetSpec]:
    return {spec.name: spec for spec in map(_from_json, sorted(_HERE.glob("*.json")))}


def names() -> list[str]:
    """Names of all known targets, sorted."""
    return list(_load_all())


def all_targets() -> list[TargetSpec]:
    """All known targets, sorted by name."""
    return list(_load_all().values())


def get(name: str) -> TargetSpec:
    """The target called ``name``.

    Raises
    ------
    TargetError
        If there is none; the message lists the known names.
    """
    try:
        return _load_all()[name]
    except KeyError:
        raise TargetError(f"unknown device target {name!r}; known targets: "
                          f"{', '.join(names())}") from None


def describe_table() -> str:
    """The plain-text table ``splitc targets`` prints (asks LLVM for the host's CPU)."""
    rows = [("name", "arch/cpu", "cores", "memory", "peak GFLOP/s", "cross compiler")]
    for t in all_targets():
        cpu = host_cpu() if t.is_host else (t.fpga["part"] if t.is_fpga else t.cpu)
        mem = _bytes(t.memory_bytes) if t.memory_bytes else "?"
        peak = f"{t.peak_gflops:.1f}" if t.peak_gflops else ("measure" if t.is_host else "?")
        rows.append((t.name, f"{t.arch}/{cpu}", str(t.cores or "?"), mem, peak,
                     t.cross_compiler or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.append("peak GFLOP/s: fp32, all cores. Figures are published or derived estimates,")
    lines.append("not measurements (sources: targets/*.json); `splitc profile` measures the host.")
    return "\n".join(lines)


def _bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def elf_machine(path: str | os.PathLike) -> str:
    """The architecture an ELF file was built for.

    Parameters
    ----------
    path : str or PathLike
        A shared library or other ELF file.

    Returns
    -------
    str
        ``x86_64``, ``aarch64`` or ``arm``; ``unknown(0x..)`` for another ``e_machine``.

    Raises
    ------
    TargetError
        If the file is not ELF.
    """
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise TargetError(f"{path} is not an ELF file")
    order = "little" if head[5] == 1 else "big"  # EI_DATA: 1 little-endian, 2 big-endian
    machine = int.from_bytes(head[18:20], order)
    return ELF_MACHINES.get(machine, f"unknown(0x{machine:x})")
