"""Targets: every description loads and builds a TVM target, and the libraries compiled for it
are real ELF files for that CPU (architecture, ABI, NEON/VFP attributes)."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from splitc import targets
from splitc.targets import TargetError

NAMES = ["host", "rpi4", "rpi3", "pynq-z1-arm", "aarch64"]
JSON_FILES = sorted((Path(targets.__file__).parent).glob("*.json"))
SHAPE = (1, 64, 16, 16)


@I.ir_module
class ReluAdd:
    @R.function
    def main(x: R.Tensor((1, 64, 16, 16), "float32"), y: R.Tensor((1, 64, 16, 16), "float32")):
        with R.dataflow():
            a = R.nn.relu(x)
            b = R.add(a, y)
            R.output(b)
        return b


def run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    """One ``.so`` of ReluAdd per target (None where the cross compiler is not installed)."""
    folder = tmp_path_factory.mktemp("targets")
    out = {}
    for spec in targets.all_targets():
        if spec.is_fpga:
            continue  # hls4ml builds its pieces (tests/test_fpga.py)
        if spec.cross_compiler and not shutil.which(spec.cross_compiler):
            out[spec.name] = None
            continue
        ex = tvm.compile(ReluAdd, target=spec.tvm_target())
        out[spec.name] = spec.export_library(ex, folder / f"{spec.name}.so")
    return out


def library(libraries, name):
    if libraries[name] is None:
        pytest.skip(f"{targets.get(name).cross_compiler} not installed")
    return libraries[name]


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: p.stem)
def test_json_is_complete_and_labelled(path):
    d = json.loads(path.read_text())
    spec = targets.get(d["name"])
    assert d["name"] == path.stem
    if spec.is_fpga:
        assert d["arch"] == "fpga" and d["tvm_target"] == {}
        assert {"part", "hls4ml_board", "clock_mhz", "dsp", "lut", "ff", "bram36"} <= set(d["fpga"])
        assert d["fpga"]["note"].startswith("published: ")
        with pytest.raises(TargetError, match="FPGA fabric"):
            spec.tvm_target()
        return
    assert spec.elf_machine in {"x86_64", "aarch64", "arm"}
    for note in ("peak_gflops_per_core_note", "peak_gflops_note", "memory_bandwidth_note"):
        assert re.match(r"(published|derived|unknown): \S", d[note]), (note, d[note])
    for value, note in [("peak_gflops_per_core", "peak_gflops_per_core_note"),
                        ("peak_gflops", "peak_gflops_note"),
                        ("memory_bandwidth_gbs", "memory_bandwidth_note")]:
        assert (d[value] is None) == d[note].startswith("unknown:"), value
    if d["peak_gflops"] is not None:
        assert d["peak_gflops"] == pytest.approx(d["peak_gflops_per_core"] * d["cores"])
    if d["cross_compiler"] is not None:  # a cross target names its CPU in both places
        assert d["tvm_target"].get("mcpu", "generic") == d["cpu"]
        assert d["tvm_target"].get("num-cores") == d["cores"]


@pytest.mark.parametrize("name", NAMES)
def test_tvm_target_constructs(name):
    spec = targets.get(name)
    target = spec.tvm_target()
    assert target.kind.name == "llvm"
    for key, value in spec.tvm_target_dict.items():
        if key != "kind":
            got = target.attrs[key]
            assert (list(got) if key == "mattr" else got) == value, key
    triple = target.attrs.get("mtriple") or tvm.target.codegen.llvm_get_system_triple()
    cpu = target.attrs.get("mcpu", "generic")
    assert tvm.target.codegen.llvm_is_valid_cpu(cpu, triple)
    features = set(tvm.target.codegen.llvm_get_cpu_features(target))
    for attr in target.attrs.get("mattr", []):  # each +feature is one LLVM knows and enables
        assert attr.lstrip("+") in features


def test_host_target_names_this_cpu():
    target = targets.get("host").tvm_target()
    assert target.attrs["mcpu"] == tvm.target.codegen.llvm_get_system_cpu()
    assert target.attrs["mcpu"] not in ("", "generic")
    assert target.attrs["num-cores"] == os.cpu_count()


def test_names_and_table():
    assert set(NAMES) <= set(targets.names())
    assert [t.name for t in targets.all_targets()] == targets.names()
    table = targets.describe_table()
    assert "aarch64/cortex-a72" in table and "arm-linux-gnueabihf-g++" in table
    assert targets.host_cpu() in table and "estimates" in table


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(TargetError, match="known targets: .*rpi4"):
        targets.get("toaster")


@pytest.mark.parametrize("name", NAMES)
def test_library_is_elf_for_the_target(libraries, name):
    spec, lib = targets.get(name), library(libraries, name)
    assert targets.elf_machine(lib) == spec.elf_machine
    readelf = {"x86_64": "Advanced Micro Devices X86-64", "aarch64": "AArch64", "arm": "ARM"}
    machine = re.search(r"Machine:\s+(.*)", run("readelf", "-h", str(lib))).group(1).strip()
    assert machine == readelf[spec.elf_machine]
    if shutil.which("file"):
        described = run("file", "-b", str(lib))
        expect = {"x86_64": "x86-64", "aarch64": "ARM aarch64", "arm": "ARM, EABI5"}
        assert expect[spec.elf_machine] in described


def test_armv7_is_eabi5_hard_float_with_neon(libraries):
    lib = library(libraries, "pynq-z1-arm")
    raw = lib.read_bytes()
    assert raw[4] == 1  # ELFCLASS32
    flags = int.from_bytes(raw[36:40], "little")  # e_flags of an ELF32 header
    assert flags >> 24 == 5  # EF_ARM_EABI_VER5
    assert flags & 0x400  # EF_ARM_ABI_FLOAT_HARD
    assert "Version5 EABI, hard-float ABI" in run("readelf", "-h", str(lib))
    attrs = run("readelf", "-A", str(lib))
    assert "Tag_CPU_arch: v7" in attrs
    assert "Tag_FP_arch: VFPv3" in attrs
    assert re.search(r"Tag_Advanced_SIMD_arch: NEON", attrs)
    assert "Tag_ABI_VFP_args: VFP registers" in attrs


def disassembly(lib: Path, objdump: str) -> dict[str, str]:
    """Function name -> its disassembly."""
    if not shutil.which(objdump):
        pytest.skip(f"{objdump} not installed")
    parts = re.split(r"^[0-9a-f]+ <([^>]+)>:$", run(objdump, "-d", str(lib)), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.mark.parametrize("name", ["rpi4", "rpi3", "aarch64"])
def test_aarch64_relu_add_use_neon(libraries, name):
    """Untuned TVM code still gets LLVM's loop vectoriser: 4 x fp32 NEON ops on v registers."""
    funcs = disassembly(library(libraries, name), "aarch64-linux-gnu-objdump")
    relu = "".join(text for f, text in funcs.items() if "relu" in f and not f.startswith("__"))
    add = "".join(text for f, text in funcs.items() if "add" in f and not f.startswith("__"))
    assert re.search(r"\bfmax(nm)?\s+v\d+\.4s", relu)
    assert re.search(r"\bfadd\s+v\d+\.4s", add)


def test_host_library_runs(libraries):
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(libraries["host"])), tvm.cpu())
    rng = np.random.default_rng(1)
    x, y = (rng.standard_normal(SHAPE).astype("float32") for _ in range(2))
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y)).numpy()
    np.testing.assert_allclose(got, np.maximum(x, 0) + y, rtol=1e-6, atol=1e-6)


def test_elf_machine_refuses_non_elf(tmp_path):
    (tmp_path / "x").write_bytes(b"hello")
    with pytest.raises(TargetError, match="not an ELF"):
        targets.elf_machine(tmp_path / "x")
