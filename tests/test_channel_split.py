"""Channel split: before/expected, and exactness on small convolutional graphs."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from splitc.passes.ops import even_bounds
from splitc.passes.split.channel import ChannelPlan, ChannelSplit, plan_channel

from .helpers import run_module

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((4, 2, 1, 1)).astype("float32")
B1 = RNG.standard_normal((1, 4, 1, 1)).astype("float32")
W2 = RNG.standard_normal((2, 4, 1, 1)).astype("float32")


def conv_relu_conv() -> tvm.IRModule:
    """x -> conv(4 filters) -> +bias -> relu -> conv(2 filters)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, 4, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, relax.const(W1)), name_hint="a")
            b = bb.emit(relax.op.add(a, relax.const(B1)), name_hint="b")
            c = bb.emit(relax.op.nn.relu(b), name_hint="c")
            d = bb.emit_output(relax.op.nn.conv2d(c, relax.const(W2)), name_hint="d")
        bb.emit_func_output(d)
    return bb.get()


def expected_two_devices() -> tvm.IRModule:
    """What the split must be: each device computes two of ``a``'s four channels, its bias
    slice and relu locally; ``c`` is gathered on both devices for the next split conv; the
    output's two halves (one channel each) are gathered on device 0."""
    def piece_first(bb, k):
        x = relax.Var("x", relax.TensorType((1, 2, 4, 4), "float32"))
        with bb.function(f"dev{k}_p0", [x], attrs={"splitc.device": k}, private=False):
            with bb.dataflow():
                a = bb.emit(relax.op.nn.conv2d(x, relax.const(W1[2 * k:2 * k + 2])),
                            name_hint=f"a_c{k}")
                b = bb.emit(relax.op.add(a, relax.const(B1[:, 2 * k:2 * k + 2])),
                            name_hint=f"b_c{k}")
                c = bb.emit_output(relax.op.nn.relu(b), name_hint=f"c_c{k}")
            return bb.emit_func_output(c)

    def piece_second(bb, k):
        c0 = relax.Var("c_c0", relax.TensorType((1, 2, 4, 4), "float32"))
        c1 = relax.Var("c_c1", relax.TensorType((1, 2, 4, 4), "float32"))
        with bb.function(f"dev{k}_p1", [c0, c1], attrs={"splitc.device": k}, private=False):
            with bb.dataflow():
                g = bb.emit(relax.op.concat([c0, c1], axis=1), name_hint=f"c_g{k}")
                d = bb.emit_output(relax.op.nn.conv2d(g, relax.const(W2[k:k + 1])),
                                   name_hint=f"d_c{k}")
            return bb.emit_func_output(d)

    bb = relax.BlockBuilder()
    p00, p10 = piece_first(bb, 0), piece_first(bb, 1)
    p01, p11 = piece_second(bb, 0), piece_second(bb, 1)
    d0 = relax.Var("d_c0", relax.TensorType((1, 1, 4, 4), "float32"))
    d1 = relax.Var("d_c1", relax.TensorType((1, 1, 4, 4), "float32"))
    with bb.function("dev0_p2", [d0, d1], attrs={"splitc.device": 0}, private=False):
        with bb.dataflow():
            g = bb.emit(relax.op.concat([d0, d1], axis=1), name_hint="d_g0")
            out = bb.emit_output(g, name_hint="d_out")
        p02 = bb.emit_func_output(out)
    x = relax.Var("x", relax.TensorType((1, 2, 4, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            c0 = bb.emit(relax.Call(p00, [x]))
            c1 = bb.emit(relax.Call(p10, [x]))
            e0 = bb.emit(relax.Call(p01, [c0, c1]))
            e1 = bb.emit(relax.Call(p11, [c0, c1]))
            out = bb.emit_output(relax.Call(p02, [e0, e1]))
        bb.emit_func_output(out)
    return bb.get()


def test_two_devices_before_expected():
    before = conv_relu_conv()
    plan = plan_channel(before, 2)
    assert plan == ChannelPlan(2, frozenset({"a", "d"}))
    after = ChannelSplit(plan)(before)
    relax.analysis.well_formed(after)
    tvm.ir.assert_structural_equal(after, expected_two_devices())


def test_nothing_split_is_one_piece_on_device0():
    before = conv_relu_conv()
    after = ChannelSplit(ChannelPlan(2, frozenset()))(before)
    pieces = sorted(gv.name_hint for gv in after.get_global_vars() if gv.name_hint != "main")
    assert pieces == ["dev0_p0"]


@I.ir_module
class GroupedResidual:
    """conv -> relu -> depthwise conv -> grouped conv (2 groups) -> + skip -> pool -> dense."""

    @R.function
    def main(x: R.Tensor((1, 3, 9, 9), "float32"), w1: R.Tensor((8, 3, 3, 3), "float32"),
             w2: R.Tensor((8, 1, 3, 3), "float32"), w3: R.Tensor((8, 4, 1, 1), "float32"),
             wd: R.Tensor((8, 5), "float32"), bd: R.Tensor((5,), "float32")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            a = R.nn.conv2d(x, w1, padding=[1, 1, 1, 1])
            b = R.nn.relu(a)
            c = R.nn.conv2d(b, w2, padding=[1, 1, 1, 1], groups=8, strides=[2, 2])
            d = R.nn.conv2d(c, w3, groups=2)
            e = R.nn.max_pool2d(b, pool_size=[3, 3], strides=[2, 2], padding=[1, 1, 1, 1])
            f = R.add(d, e)
            g = R.mean(f, axis=[2, 3])
            h = R.matmul(g, wd)
            y = R.add(h, bd)
            R.output(y)
        return y


@pytest.mark.parametrize("n", [2, 3, 4])
def test_grouped_residual_exact(n):
    rng = np.random.default_rng(n)
    params = [rng.standard_normal([int(d) for d in p.ty.shape]).astype("float32")
              for p in GroupedResidual["main"].params[1:]]
    mod = relax.transform.BindParams("main", {
        p.name: tvm.runtime.tensor(v)
        for p, v in zip(GroupedResidual["main"].params[1:], params, strict=True)})(
        GroupedResidual)
    x = rng.standard_normal((1, 3, 9, 9)).astype("float32")
    after = ChannelSplit(plan_channel(mod, n))(mod)
    relax.analysis.well_formed(after)
    devices = {int(f.attrs["splitc.device"]) for gv, f in after.functions.items()
               if gv.name_hint != "main"}
    assert devices == set(range(n))
    np.testing.assert_allclose(run_module(after, x), run_module(mod, x), rtol=1e-5, atol=1e-5)


def test_even_bounds():
    assert even_bounds(8, 3) == ((0, 3), (3, 5), (5, 8))
    assert even_bounds(32, 4, align=8) == ((0, 8), (8, 16), (16, 24), (24, 32))
    assert even_bounds(2, 4) == ((0, 1), (1, 2))
