"""Hybrid split: rows for the early layers, channels for the late ones — before/expected
TVMScript for a small chain, exact on imported CNNs, and the places it switches."""

import numpy as np
import pytest
import tvm
from tvm import relax

from splitc import frontend
from splitc.errors import SplitcError
from splitc.passes.split.channel import ChannelPlan
from splitc.passes.split.hybrid import HybridPlan, HybridSplit, boundaries, plan_hybrid
from splitc.passes.split.spatial import SpatialPlan

from .helpers import one_per_row, run_module

F32 = "float32"
RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((4, 2, 3, 3)).astype(F32)
W2 = RNG.standard_normal((4, 4, 1, 1)).astype(F32)


def chain() -> tvm.IRModule:
    """x (8 rows) -> conv 3x3 pad 1 -> relu -> conv 1x1 (4 output channels)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, 8, 8), F32))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, relax.const(W1), padding=1), name_hint="a")
            b = bb.emit(relax.op.nn.relu(a), name_hint="b")
            c = bb.emit_output(relax.op.nn.conv2d(b, relax.const(W2)), name_hint="c")
        bb.emit_func_output(c)
    return bb.get()


def expected() -> tvm.IRModule:
    """Rows for conv 1 and relu (device 0 rows 0-3 from input rows 0-4, device 1 rows 4-7 from
    input rows 3-7, padding only at the image border), then conv 2's output channels split:
    each device concatenates the two row tiles itself and computes two channels; device 0
    concatenates the channels."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, 8, 8), F32))
    with bb.function("client_p0", [x], attrs={"splitc.device": -1}, private=False):
        with bb.dataflow():
            r0 = bb.emit_output(relax.op.strided_slice(x, axes=[2], begin=[0], end=[5]),
                                name_hint="x_r0")
            r1 = bb.emit_output(relax.op.strided_slice(x, axes=[2], begin=[3], end=[8]),
                                name_hint="x_r1")
        client = bb.emit_func_output(relax.Tuple([r0, r1]))
    tiles = {}
    for k, pad in ((0, [1, 1, 0, 1]), (1, [0, 1, 1, 1])):
        xr = relax.Var(f"x_r{k}", relax.TensorType((1, 2, 5, 8), F32))
        with bb.function(f"dev{k}_p0", [xr], attrs={"splitc.device": k}, private=False):
            with bb.dataflow():
                a = bb.emit(relax.op.nn.conv2d(xr, relax.const(W1), padding=pad),
                            name_hint=f"a_t{k}")
                b = bb.emit_output(relax.op.nn.relu(a), name_hint=f"b_t{k}")
            tiles[k] = bb.emit_func_output(b)
    slices = {}
    for k, gathered in ((0, "b_g0"), (1, "b_g0_at1")):
        t0, t1 = (relax.Var(f"b_t{j}", relax.TensorType((1, 4, 4, 8), F32)) for j in (0, 1))
        with bb.function(f"dev{k}_p1", [t0, t1], attrs={"splitc.device": k}, private=False):
            with bb.dataflow():
                g = bb.emit(relax.op.concat([t0, t1], axis=2), name_hint=gathered)
                c = bb.emit_output(relax.op.nn.conv2d(g, relax.const(W2[2 * k:2 * k + 2])),
                                   name_hint=f"c_c{k}")
            slices[k] = bb.emit_func_output(c)
    c0, c1 = (relax.Var(f"c_c{k}", relax.TensorType((1, 2, 8, 8), F32)) for k in (0, 1))
    with bb.function("dev0_p2", [c0, c1], attrs={"splitc.device": 0}, private=False):
        with bb.dataflow():
            g = bb.emit(relax.op.concat([c0, c1], axis=1), name_hint="c_g0")
            out = bb.emit(g, name_hint="c_out")
            out = bb.emit_output(out, name_hint="c_out_out")
        last = bb.emit_func_output(out)
    x = relax.Var("x", relax.TensorType((1, 2, 8, 8), F32))
    with bb.function("main", [x]):
        with bb.dataflow():
            cut = bb.emit(relax.Call(client, [x]), name_hint="client_p0")
            r0 = bb.emit(relax.TupleGetItem(cut, 0), name_hint="x_r0")
            r1 = bb.emit(relax.TupleGetItem(cut, 1), name_hint="x_r1")
            b0 = bb.emit(relax.Call(tiles[0], [r0]), name_hint="b_t0")
            b1 = bb.emit(relax.Call(tiles[1], [r1]), name_hint="b_t1")
            c0 = bb.emit(relax.Call(slices[0], [b0, b1]), name_hint="c_c0")
            c1 = bb.emit(relax.Call(slices[1], [b0, b1]), name_hint="c_c1")
            out = bb.emit_output(relax.Call(last, [c0, c1]), name_hint="c_out_out")
        bb.emit_func_output(out)
    return bb.get()


PLAN = HybridPlan(SpatialPlan(2, ((0, 2),)), ChannelPlan(2, frozenset({"c"})), 2)


class TestRowsThenChannels:
    def test_rewrite(self):
        tvm.ir.assert_structural_equal(HybridSplit(PLAN)(chain()), expected())

    def test_exact(self):
        x = RNG.standard_normal((1, 2, 8, 8)).astype(F32)
        after = HybridSplit(PLAN)(chain())
        relax.analysis.well_formed(after)
        np.testing.assert_allclose(run_module(after, x), run_module(chain(), x), rtol=1e-5,
                                   atol=1e-5)


def test_a_plan_that_mixes_its_sides_is_refused():
    with pytest.raises(SplitcError, match="end after the hybrid boundary"):
        HybridSplit(HybridPlan(SpatialPlan(2, ((0, 2),)), ChannelPlan(2, frozenset()), 1))(
            chain())
    with pytest.raises(SplitcError, match=r"channel-split layers \['a'\]"):
        HybridSplit(HybridPlan(SpatialPlan(2, ()), ChannelPlan(2, frozenset({"a"})), 1))(
            chain())


# the default run takes one device count per model in turn; -m slow runs the rest
@pytest.mark.parametrize("name, n", one_per_row(["resnet18", "mobilenet_v2"], [2, 3]))
def test_imported_cnns_are_exact_at_every_switch(name, n):
    model = frontend.load(name, tiny=True)
    x = model.random_inputs()
    want = model.reference(x)[0]
    places = boundaries(model.mod, n)
    assert places  # the tiny models' late layers are a few rows tall
    for b in places:
        after = HybridSplit(plan_hybrid(model.mod, n, b))(model.mod)
        np.testing.assert_allclose(run_module(after, *x), want, rtol=1e-4,
                                   atol=1e-4 * np.abs(want).max())
