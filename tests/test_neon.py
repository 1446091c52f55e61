"""The ARM builds' convolution kernels use NEON vector instructions (disassembly check)."""

import re
import shutil
import subprocess

import numpy as np
import pytest

from splitc import targets
from splitc.backend.build import build

from .test_cpu_schedules import conv_module
from .test_winograd import conv_model

CASES = {
    # aarch64 (Raspberry Pi 4): fused multiply-add on four fp32 lanes of a 128-bit register.
    "rpi4": ("aarch64-linux-gnu-objdump", r"\bfmla\s+v\d+\.4s"),
    # armv7 (PYNQ-Z1's Cortex-A9, NEON without FMA): multiplies on 128-bit q registers (LLVM
    # keeps vmul + vadd apart without fast-math, so no vmla).
    "pynq-z1-arm": ("arm-linux-gnueabihf-objdump", r"\bv(?:mla|fma|mul)\.f32\s+q\d+"),
}


def kernel_disassembly(objdump: str, lib, name_part: str) -> str:
    """The disassembly of every function whose symbol contains ``name_part``."""
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(lib)], check=True,
                          capture_output=True, text=True).stdout
    sections = re.split(r"\n(?=[0-9a-f]+ <)", text)
    return "\n".join(s for s in sections if name_part in s.split("\n", 1)[0])


@pytest.mark.parametrize("target", list(CASES))
def test_conv_hot_loop_is_neon(target, tmp_path):
    objdump, pattern = CASES[target]
    if shutil.which(objdump) is None:
        pytest.skip(f"{objdump} is missing: run scripts/setup.sh")
    spec = targets.get(target)
    ex, _ = build(conv_module(16, 32, 8, 3, 1, 1), spec.tvm_target())
    lib = spec.export_library(ex, tmp_path / "lib.so")
    kernel = kernel_disassembly(objdump, lib, "conv2d_NCHWc")
    assert kernel, "no conv2d_NCHWc kernel in the library"
    assert len(re.findall(pattern, kernel)) >= 8, kernel[:3000]


@pytest.mark.parametrize("target", ["rpi4"])
def test_winograd_matmuls_are_neon(target, tmp_path):
    """The Winograd kernel's matmuls (64 channels at 32x32 take F(4, 3)) use NEON FMAs."""
    objdump, pattern = CASES[target]
    if shutil.which(objdump) is None:
        pytest.skip(f"{objdump} is missing: run scripts/setup.sh")
    spec = targets.get(target)
    mod = conv_model(64, 64, 32, (1, 1, 1, 1))
    weights = [np.zeros([int(d) for d in p.ty.shape], "float32")
               for p in mod["main"].params[1:]]
    ex, _ = build(mod, spec.tvm_target(), {"main": weights})
    lib = spec.export_library(ex, tmp_path / "lib.so")
    kernel = kernel_disassembly(objdump, lib, "conv2d_winograd")
    assert kernel, "no conv2d_winograd kernel in the library"
    assert len(re.findall(pattern, kernel)) >= 8, kernel[:3000]


@pytest.mark.parametrize("model", ["conv-3x3", "conv-1x1-wide"])
@pytest.mark.parametrize("target", list(CASES))
def test_every_selection_candidate_is_neon(target, model, tmp_path):
    """What the selection may pick on a board: each distinct candidate of the conv kernel,
    cross-compiled as `splitc tune --rpc` sends it, keeps its hot loop in NEON (the wide
    1x1 convolution's include the input channels summed in chunks)."""
    from tvm.s_tir import meta_schedule as ms

    from splitc.backend.build import has_reduction
    from splitc.backend.tuning import build_kernel, kernels
    from splitc.passes.codegen.cpu_schedules import candidates

    objdump, pattern = CASES[target]
    if shutil.which(objdump) is None:
        pytest.skip(f"{objdump} is missing: run scripts/setup.sh")
    spec = targets.get(target)
    tvm_target = spec.tvm_target()
    module = conv_module(16, 32, 8, 3, 1, 1) if model == "conv-3x3" else \
        conv_module(320, 32, 7, 1, 1, 0)
    fused = kernels(module, tvm_target)
    (conv,) = [t.dispatched[0]["main"] for t in ms.relax_integration.extract_tasks(
        fused, tvm_target) if has_reduction(t.dispatched[0]["main"])]
    found = candidates(conv, tvm_target)
    assert len(found) >= 3 or (model == "conv-1x1-wide" and len(found) >= 2), \
        [k.label for k, _ in found]
    if model == "conv-1x1-wide":
        assert any(k.ic_chunk for k, _ in found), [k.label for k, _ in found]
    for i, (knobs, sch) in enumerate(found):
        lib = spec.export_library(build_kernel(sch.mod, tvm_target), tmp_path / f"{i}.so")
        kernel = kernel_disassembly(objdump, lib, "main")
        assert len(re.findall(pattern, kernel)) >= 8, (knobs.label, kernel[:3000])
