"""PackConvLayout: before/expected TVMScript, the block plan, and equal answers."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from splitc.passes.codegen.pack_layout import (
    ConvPacking,
    PackConvLayout,
    channel_block,
    plan_packing,
)

from .helpers import run_built, run_module


class TestConvBiasRelu:
    """A conv, its bias and ReLU run packed; the result is unpacked once, at the output."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 16, 8, 8), "float32"), w: R.Tensor((16, 16, 3, 3), "float32"),
                 b: R.Tensor((1, 16, 1, 1), "float32")):
            with R.dataflow():
                y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
                z = R.add(y, b)
                r = R.nn.relu(z)
                R.output(r)
            return r

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 16, 8, 8), "float32"), w: R.Tensor((16, 16, 3, 3), "float32"),
                 b: R.Tensor((1, 16, 1, 1), "float32")):
            with R.dataflow():
                xp = R.layout_transform(x, index_map=lambda n, c, h, w: (n, c // 8, h, w, c % 8))
                wp = R.layout_transform(
                    w, index_map=lambda o, i, h, w: (o // 8, i // 8, h, w, i % 8, o % 8))
                y = R.nn.conv2d(xp, wp, padding=[1, 1, 1, 1], data_layout="NCHW8c",
                                kernel_layout="OIHW8i8o", out_layout="NCHW8c")
                bp = R.layout_transform(b, index_map=lambda n, c, h, w: (n, c // 8, h, w, c % 8))
                z = R.add(y, bp)
                rp = R.nn.relu(z)
                r = R.layout_transform(
                    rp, index_map=lambda n, c, h, w, b: (n, c * 8 + b, h, w))
                R.output(r)
            return r

    def test_rewrite(self):
        tvm.ir.assert_structural_equal(PackConvLayout(8)(self.Before), self.Expected)

    def test_same_answer(self):
        assert_same_answer(self.Before, PackConvLayout(8)(self.Before))


class TestGroupedConv:
    """A grouped (ResNeXt) convolution with 4 channels per group packs in blocks of 4, so
    each block lies in one group; its kernel keeps the per-group input channels."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 16, 8, 8), "float32"), w: R.Tensor((16, 4, 3, 3), "float32")):
            with R.dataflow():
                y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], groups=4)
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 16, 8, 8), "float32"), w: R.Tensor((16, 4, 3, 3), "float32")):
            with R.dataflow():
                xp = R.layout_transform(x, index_map=lambda n, c, h, w: (n, c // 4, h, w, c % 4))
                wp = R.layout_transform(
                    w, index_map=lambda o, i, h, w: (o // 4, i // 4, h, w, i % 4, o % 4))
                yp = R.nn.conv2d(xp, wp, padding=[1, 1, 1, 1], groups=4, data_layout="NCHW4c",
                                 kernel_layout="OIHW4i4o", out_layout="NCHW4c")
                y = R.layout_transform(
                    yp, index_map=lambda n, c, h, w, b: (n, c * 4 + b, h, w))
                R.output(y)
            return y

    def test_rewrite(self):
        tvm.ir.assert_structural_equal(PackConvLayout(8)(self.Before), self.Expected)

    def test_same_answer(self):
        assert_same_answer(self.Before, PackConvLayout(8)(self.Before))


@I.ir_module
class Block:
    """Stem with 3 input channels, depthwise, clip, 1x1 projection, a residual add across
    packed tensors, max pooling, then a mean that needs NCHW again."""

    @R.function
    def main(x: R.Tensor((1, 3, 16, 16), "float32"), w: R.Tensor((24, 3, 3, 3), "float32"),
             b: R.Tensor((24, 1, 1), "float32"), wd: R.Tensor((24, 1, 3, 3), "float32"),
             w1: R.Tensor((24, 24, 1, 1), "float32")):
        with R.dataflow():
            y = R.nn.conv2d(x, w, strides=[2, 2], padding=[1, 1, 1, 1])
            z = R.nn.relu(R.add(y, b))
            d = R.nn.conv2d(z, wd, padding=[1, 1, 1, 1], groups=24)
            e = R.clip(d, R.prim_value(0), R.prim_value(6))
            g = R.nn.conv2d(e, w1)
            s = R.add(g, z)
            p = R.nn.max_pool2d(s, pool_size=[3, 3], strides=[2, 2], padding=[1, 1, 1, 1])
            m = R.mean(p, axis=[2, 3])
            R.output(m)
        return m


def test_plan_blocks():
    plan = plan_packing(Block["main"], lanes=8)
    assert sorted(plan.values(), key=repr) == sorted([
        ConvPacking(3, 8), ConvPacking(8, 8, depthwise=True), ConvPacking(8, 8)], key=repr)
    assert channel_block(24, 8) == 8 and channel_block(20, 8) == 5 and channel_block(3, 8) == 3


def test_residual_stays_packed():
    """One pack at the input, one unpack before the mean: the rest runs packed."""
    packed = PackConvLayout(8)(Block)
    transforms = [b.value for b in packed["main"].body.blocks[0].bindings
                  if isinstance(b.value, relax.Call)
                  and b.value.op == tvm.ir.Op.get("relax.layout_transform")]
    activations = [t for t in transforms if t.args[0].name in ("x",) or t.ty.ndim == 4]
    assert len(activations) == 2, packed.script()
    assert_same_answer(Block, packed)


@pytest.mark.parametrize("lanes", [4, 8, 16])
def test_lanes(lanes):
    assert_same_answer(Block, PackConvLayout(lanes)(Block))


def assert_same_answer(before: tvm.IRModule, after: tvm.IRModule) -> None:
    rng = np.random.default_rng(0)
    args = [rng.standard_normal([int(d) for d in p.ty.shape]).astype("float32")
            for p in before["main"].params]
    np.testing.assert_allclose(run_built(after, *args), run_module(before, *args),
                               rtol=1e-5, atol=1e-5)


@I.ir_module
class Fire:
    """SqueezeNet-style: two convs concatenated on channels, batch-norm arithmetic, avg pool."""

    @R.function
    def main(x: R.Tensor((1, 16, 12, 12), "float32"), wa: R.Tensor((16, 16, 1, 1), "float32"),
             wb: R.Tensor((8, 16, 3, 3), "float32"), m: R.Tensor((1, 24, 1, 1), "float32"),
             v: R.Tensor((1, 24, 1, 1), "float32")):
        with R.dataflow():
            a = R.nn.conv2d(x, wa)
            b = R.nn.conv2d(x, wb, padding=[1, 1, 1, 1])
            c = R.concat((a, b), axis=1)
            n = R.divide(R.subtract(c, m), v)
            p = R.nn.avg_pool2d(n, pool_size=[2, 2], strides=[2, 2])
            R.output(p)
        return p


def test_concat_and_avg_pool_stay_packed():
    packed = PackConvLayout(8)(Fire)
    ops = [b.value.op.name for b in packed["main"].body.blocks[0].bindings
           if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)]
    assert "relax.concat" in ops and "relax.nn.avg_pool2d" in ops
    unpacks = [b for b in packed["main"].body.blocks[0].bindings
               if isinstance(b.value, relax.Call) and b.value.ty.ndim == 4
               and b.value.op == tvm.ir.Op.get("relax.layout_transform")]
    assert len(unpacks) == 1, packed.script()  # only the output leaves the packed layout
    assert_same_answer(Fire, packed)
