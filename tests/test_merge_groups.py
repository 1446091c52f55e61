"""MergeGroups: before/expected, the merge factor, and equal answers."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from splitc.backend.build import build
from splitc.passes.codegen.merge_groups import MergeGroups, merge_factor

from .helpers import HOST, run_built


class TestFourChannelGroups:
    """8 groups of 4 channels, lanes 16: groups merge 4 at a time, the kernel spread over the
    block diagonal of each merged group."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 32, 8, 8), "float32"), w: R.Tensor((32, 4, 3, 3), "float32")):
            with R.dataflow():
                y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], groups=8)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 32, 8, 8), "float32"), w: R.Tensor((32, 4, 3, 3), "float32")):
            with R.dataflow():
                spread = R.reshape(w, (2, 4, 4, 1, 4, 3, 3))
                diagonal = R.multiply(
                    spread, R.const(np.eye(4, dtype="float32").reshape(1, 4, 1, 4, 1, 1, 1)))
                merged = R.reshape(diagonal, (32, 16, 3, 3))
                y = R.nn.conv2d(x, merged, padding=[1, 1, 1, 1], groups=2)
                R.output(y)
            return y

    def test_rewrite(self):
        tvm.ir.assert_structural_equal(MergeGroups(16)(self.Before), self.Expected)


class TestWholeVectorGroups:
    """16 channels per group already fill a vector: nothing changes."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 64, 8, 8), "float32"), w: R.Tensor((64, 16, 3, 3), "float32")):
            with R.dataflow():
                y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], groups=4)
                R.output(y)
            return y

    def test_unchanged(self):
        tvm.ir.assert_structural_equal(MergeGroups(16)(self.Before), self.Before)


@pytest.mark.parametrize("channels,groups,per_group,lanes,factor", [
    (128, 32, 4, 16, 4),    # ResNeXt-50 stage 1
    (256, 32, 8, 16, 2),    # stage 2
    (512, 32, 16, 16, 1),   # stage 3: whole vectors already
    (32, 32, 1, 16, 1),     # depthwise has its own kernel
    (24, 8, 3, 16, 1),      # 3 does not divide 16
    (8, 2, 4, 16, 1),       # too few groups to fill a vector
    (64, 64, 1, 4, 1),
    (32, 8, 4, 4, 1),       # NEON's 4 lanes: already whole vectors
])
def test_merge_factor(channels, groups, per_group, lanes, factor):
    assert merge_factor(channels, groups, per_group, lanes) == factor


@pytest.mark.parametrize("c_in,c_out,groups,stride", [(32, 32, 8, 1), (64, 64, 8, 2),
                                                      (32, 64, 16, 1)])
def test_answers_match_unmerged(c_in, c_out, groups, stride):
    """Merged and packed (this CPU's lanes) against TVM's plain grouped convolution, with
    the kernel a weight that the build transforms once."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, c_in, 9, 9), "float32"))
    w = relax.Var("w", relax.TensorType((c_out, c_in // groups, 3, 3), "float32"))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.relu(
                relax.op.nn.conv2d(x, w, strides=stride, padding=1, groups=groups)))
        bb.emit_func_output(y)
    mod = bb.get()
    rng = np.random.default_rng(4)
    xv = rng.standard_normal((1, c_in, 9, 9)).astype("float32")
    wv = rng.standard_normal((c_out, c_in // groups, 3, 3)).astype("float32")
    unbound = relax.transform.BindParams("main", {"w": wv})(mod)
    plain = run_built(unbound, xv, schedules=False)
    ex, weights = build(mod, HOST, {"main": [wv]})
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](
        tvm.runtime.tensor(xv), *[tvm.runtime.tensor(a) for a in weights["main"]]).numpy()
    np.testing.assert_allclose(got, plain, rtol=1e-4, atol=1e-4)
