"""Targets: every description builds a TVM target, and cross-compiled libraries are real ELF
files for that CPU."""

import shutil
import subprocess

import numpy as np
import pytest
import tvm
from tvm import relax

from splitc import targets
from splitc.errors import SplitcError


def small_module():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 8, 8), "float32"))
    w = relax.const(np.random.default_rng(0).standard_normal((4, 4, 3, 3)).astype("float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, padding=1))
            z = bb.emit_output(relax.op.nn.relu(relax.op.add(y, x)))
        bb.emit_func_output(z)
    return bb.get()


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    folder = tmp_path_factory.mktemp("targets")
    mod = small_module()
    out = {}
    for spec in targets.all_targets():
        ex = tvm.compile(mod, target=spec.tvm_target())
        out[spec.name] = spec.export_library(ex, folder / f"{spec.name}.so")
    return out


def test_names_and_table():
    assert {"host", "rpi4", "rpi3", "pynq-z1-arm", "aarch64"} <= set(targets.names())
    table = targets.describe_table()
    assert "cortex-a72" in table and "arm-linux-gnueabihf-g++" in table


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(SplitcError, match="rpi4"):
        targets.get("toaster")


@pytest.mark.parametrize("name", ["host", "rpi4", "rpi3", "pynq-z1-arm", "aarch64"])
def test_library_is_elf_for_the_target(libraries, name):
    spec = targets.get(name)
    assert targets.elf_machine(libraries[name]) == spec.elf_machine
    if shutil.which("file"):
        described = subprocess.run(["file", "-b", str(libraries[name])], capture_output=True,
                                   text=True).stdout
        expect = {"x86_64": "x86-64", "aarch64": "ARM aarch64", "arm": "ARM, EABI5"}
        assert expect[spec.elf_machine] in described


def test_armv7_is_hard_float_with_neon(libraries):
    header = subprocess.run(["readelf", "-h", str(libraries["pynq-z1-arm"])],
                            capture_output=True, text=True).stdout
    assert "hard-float ABI" in header
    attrs = subprocess.run(["readelf", "-A", str(libraries["pynq-z1-arm"])],
                           capture_output=True, text=True).stdout
    assert "Tag_CPU_arch: v7" in attrs
    assert "Tag_Advanced_SIMD_arch: NEON" in attrs
    assert "Tag_ABI_VFP_args: VFP registers" in attrs


def test_host_library_runs(libraries):
    mod = small_module()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(libraries["host"])), tvm.cpu())
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype("float32")
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())["main"](
        tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_host_target_names_this_cpu():
    assert targets.get("host").tvm_target().attrs["mcpu"] not in ("", "generic")


def test_elf_machine_refuses_non_elf(tmp_path):
    (tmp_path / "x").write_bytes(b"hello")
    with pytest.raises(SplitcError, match="not an ELF"):
        targets.elf_machine(tmp_path / "x")
