"""Spatial split: before/expected TVMScript, and exactness on awkward shapes."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from splitc.passes.spatial_split import SpatialPlan, SpatialSplit, plan_spatial

from .helpers import run_module


@I.ir_module
class ConvRelu:
    @R.function
    def main(x: R.Tensor((1, 1, 4, 4), "float32"), w: R.Tensor((1, 1, 3, 3), "float32")):
        R.func_attr({"num_input": 2})
        with R.dataflow():
            a = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            b = R.nn.relu(a)
            R.output(b)
        return b


class TestTwoTiles:
    """Device 0 computes rows 0-1 from input rows 0-2 (padding kept on top only); device 1
    rows 2-3 from input rows 1-3 (padding kept at the bottom only); device 0 stitches."""

    @I.ir_module
    class Expected:
        @R.function
        def dev0_p0(x: R.Tensor((1, 1, 4, 4), "float32"), w: R.Tensor((1, 1, 3, 3), "float32")):
            R.func_attr({"splitc.device": 0})
            with R.dataflow():
                x_rows0 = R.strided_slice(x, axes=[2], begin=[0], end=[3])
                a_t0 = R.nn.conv2d(x_rows0, w, padding=[1, 1, 0, 1])
                b_t0 = R.nn.relu(a_t0)
                R.output(b_t0)
            return b_t0

        @R.function
        def dev0_p1(b_t0: R.Tensor((1, 1, 2, 4), "float32"),
                    b_t1: R.Tensor((1, 1, 2, 4), "float32")):
            R.func_attr({"splitc.device": 0})
            with R.dataflow():
                b_g0 = R.concat((b_t0, b_t1), axis=2)
                b_out = b_g0
                R.output(b_out)
            return b_out

        @R.function
        def dev1_p0(x: R.Tensor((1, 1, 4, 4), "float32"), w: R.Tensor((1, 1, 3, 3), "float32")):
            R.func_attr({"splitc.device": 1})
            with R.dataflow():
                x_rows1 = R.strided_slice(x, axes=[2], begin=[1], end=[4])
                a_t1 = R.nn.conv2d(x_rows1, w, padding=[0, 1, 1, 1])
                b_t1 = R.nn.relu(a_t1)
                R.output(b_t1)
            return b_t1

        @R.function
        def main(x: R.Tensor((1, 1, 4, 4), "float32"), w: R.Tensor((1, 1, 3, 3), "float32")):
            R.func_attr({"num_input": 2})
            cls = Expected
            with R.dataflow():
                b_t0 = cls.dev0_p0(x, w)
                b_t1 = cls.dev1_p0(x, w)
                b_out = cls.dev0_p1(b_t0, b_t1)
                R.output(b_out)
            return b_out

    def test_rewrite(self):
        plan = plan_spatial(ConvRelu, 2)
        assert plan == SpatialPlan(2, ((0, 2),))
        after = SpatialSplit(plan)(ConvRelu)
        relax.analysis.well_formed(after)
        tvm.ir.assert_structural_equal(after, self.Expected)


def test_fewer_rows_than_devices_uses_as_many_devices_as_rows():
    """Four rows over five devices: four tiles of one row, the fifth device idle."""
    after = SpatialSplit(plan_spatial(ConvRelu, 5))(ConvRelu)
    devices = {int(f.attrs["splitc.device"]) for gv, f in after.functions.items()
               if gv.name_hint != "main"}
    assert devices == {0, 1, 2, 3}


@I.ir_module
class OneRow:
    @R.function
    def main(x: R.Tensor((1, 2, 1, 8), "float32"), w: R.Tensor((2, 2, 1, 3), "float32")):
        with R.dataflow():
            a = R.nn.conv2d(x, w, padding=[0, 1, 0, 1])
            R.output(a)
        return a


def test_a_single_row_is_left_whole():
    plan = plan_spatial(OneRow, 2)
    assert plan.segments == ()
    after = SpatialSplit(plan)(OneRow)
    assert sorted(gv.name_hint for gv in after.get_global_vars()) == ["dev0_p0", "main"]


def awkward(height: int) -> tvm.IRModule:
    """Stride 2, dilation, ceil-mode pooling, a residual add, depthwise and grouped convs."""
    rng = np.random.default_rng(height)

    def const(*shape):
        return relax.const(rng.standard_normal(shape).astype("float32"))

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, height, 9), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, const(8, 4, 3, 3), strides=2, padding=1))
            b = bb.emit(relax.op.nn.relu(relax.op.add(a, const(1, 8, 1, 1))))
            c = bb.emit(relax.op.nn.conv2d(b, const(8, 1, 3, 3), padding=2, dilation=2,
                                           groups=8))
            d = bb.emit(relax.op.add(c, b))
            e = bb.emit(relax.op.nn.max_pool2d(d, pool_size=3, strides=2, padding=1,
                                               ceil_mode=True))
            f = bb.emit(relax.op.nn.conv2d(e, const(8, 4, 1, 1), groups=2))
            g = bb.emit(relax.op.nn.avg_pool2d(f, pool_size=2, strides=1, padding=1,
                                               count_include_pad=False))
            out = bb.emit_output(relax.op.mean(g, axis=[2, 3]))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("height", [15, 17])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_awkward_shapes_exact(height, n):
    mod = awkward(height)
    x = np.random.default_rng(n).standard_normal((1, 4, height, 9)).astype("float32")
    plan = plan_spatial(mod, n)
    assert plan.segments, "the conv chain should be tiled"
    after = SpatialSplit(plan)(mod)
    relax.analysis.well_formed(after)
    np.testing.assert_allclose(run_module(after, x), run_module(mod, x), rtol=1e-5, atol=1e-5)
