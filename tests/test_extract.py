"""Extraction: per-device modules with weights lifted out, and explicit transfers."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from splitc.errors import SplitcError
from splitc.passes.split.channel import ChannelSplit, plan_channel
from splitc.passes.split.pipeline import PipelinePlan, PipelineSplit
from splitc.planning.extract import extract
from splitc.runtime.plan import Endpoint, Tensor, Transfer

from .test_channel_split import W1, W2, conv_relu_conv


class TestPipelineExtract:
    split = PipelineSplit(PipelinePlan(cuts=(1,), devices=(0, 1)))(conv_relu_conv())

    @I.ir_module
    class ExpectedDevice1:
        @R.function
        def dev1_p0(b: R.Tensor((1, 4, 4, 4), "float32"),
                    w0: R.Tensor((2, 4, 1, 1), "float32")) -> R.Tensor((1, 2, 4, 4), "float32"):
            R.func_attr({"splitc.device": 1, "num_input": 1})
            with R.dataflow():
                c = R.nn.relu(b)
                d = R.nn.conv2d(c, w0)
                R.output(d)
            return d

    def test_device_module(self):
        ex = extract(self.split)
        tvm.ir.assert_structural_equal(ex.modules["dev1"], self.ExpectedDevice1)
        np.testing.assert_array_equal(ex.weights["dev1_p0"][0], W2)
        np.testing.assert_array_equal(ex.weights["dev0_p0"][0], W1)

    def test_boundaries(self):
        ex = extract(self.split)
        assert [(p.name, p.device, p.inputs, p.outputs, p.num_weights) for p in ex.pieces] == [
            ("dev0_p0", "dev0", ("x",), ("b",), 2), ("dev1_p0", "dev1", ("b",), ("d",), 1)]
        assert ex.transfers == (Transfer("b", "dev0", "dev1", 4 * 16 * 4),)
        assert ex.tensors["b"] == Tensor((1, 4, 4, 4), "float32")
        assert ex.inputs == (Endpoint("x", "x"),) and ex.tensors["x"].shape == (1, 2, 4, 4)
        assert ex.outputs == (Endpoint("d", "d", "dev1"),)

    def test_devices_take_the_names_given(self):
        """A cluster file's names reach the plan: pieces, transfers, outputs, modules."""
        ex = extract(self.split, ["pi0", "pi1"])
        assert [p.device for p in ex.pieces] == ["pi0", "pi1"]
        assert ex.transfers == (Transfer("b", "pi0", "pi1", 256),)
        assert set(ex.modules) == {"pi0", "pi1"}
        plan = ex.plan(["rpi4", "rpi4"], "pipeline", "test", ["logits"])
        assert [(d.name, d.dir) for d in plan.devices] == [("pi0", "pi0"), ("pi1", "pi1")]
        assert plan.outputs == (Endpoint("logits", "d", "pi1"),)


def test_channel_transfers_are_the_all_gather():
    ex = extract(ChannelSplit(plan_channel(conv_relu_conv(), 2))(conv_relu_conv()))
    moves = sorted((t.src, t.dst, ex.tensors[t.tensor].shape) for t in ex.transfers)
    # c's halves go both ways (all-gather for the second conv); d's half comes back to device 0.
    assert moves == [("dev0", "dev1", (1, 2, 4, 4)), ("dev1", "dev0", (1, 1, 4, 4)),
                     ("dev1", "dev0", (1, 2, 4, 4))]
    for mod in ex.modules.values():
        relax.analysis.well_formed(mod)
        for func in mod.functions.values():
            assert not any(isinstance(c, tvm.ir.GenericConst) for c in _constants(func))


def _constants(func):
    found = []
    relax.analysis.post_order_visit(func, lambda e: found.append(e))
    return [e for e in found if isinstance(e, tvm.ir.GenericConst)]


def test_unsplit_module_is_refused():
    with pytest.raises(SplitcError, match="not in split form"):
        extract(conv_relu_conv())


def test_spatial_input_rows_become_slices_the_client_cuts():
    """A spatial split's tiles read rows of the model input: the caller cuts and sends only
    those rows; the client piece is neither a piece nor a transfer, and the plan carries the
    slices through JSON."""
    from splitc.passes.split.spatial import SpatialPlan, SpatialSplit
    from splitc.runtime.plan import Plan, PlanError

    from .test_spatial_split import conv_relu_conv as row_chain

    ex = extract(SpatialSplit(SpatialPlan(2, ((0, 3),)))(row_chain()))
    assert [(s.tensor, s.source, s.axis, s.begin, s.end) for s in ex.slices] == [
        ("x_r0", "x", 2, 0, 6), ("x_r1", "x", 2, 2, 8)]
    assert ex.tensors["x_r1"] == Tensor((1, 2, 6, 8), "float32")
    assert [p.name for p in ex.pieces] == ["dev0_p0", "dev1_p0", "dev0_p1"]
    assert [(t.tensor, t.src, t.dst) for t in ex.transfers] == [("c_t1", "dev1", "dev0")]
    plan = ex.plan(["host", "host"], "spatial", "test")
    again = Plan.from_dict(plan.to_dict())
    assert again == plan and again.client_tensors == ["x", "x_r0", "x_r1"]
    x = np.arange(2 * 64, dtype="float32").reshape(1, 2, 8, 8)
    cut = again.cut({"x": x})
    np.testing.assert_array_equal(cut["x_r1"], x[:, :, 2:8])
    assert cut["x_r1"].flags.c_contiguous
    bad = plan.to_dict()
    bad["slices"][1]["end"] = 9
    with pytest.raises(PlanError, match="slice 'x_r1' of 'x' does not fit"):
        Plan.from_dict(bad)


def test_a_client_piece_may_only_slice_model_inputs():
    @I.ir_module
    class Bad:
        @R.function
        def client_p0(x: R.Tensor((1, 2, 4, 4), "float32")) -> R.Tensor((1, 2, 4, 4), "float32"):
            R.func_attr({"splitc.device": -1})
            with R.dataflow():
                y = R.nn.relu(x)
                R.output(y)
            return y

        @R.function
        def dev0_p0(y: R.Tensor((1, 2, 4, 4), "float32")) -> R.Tensor((1, 2, 4, 4), "float32"):
            R.func_attr({"splitc.device": 0})
            with R.dataflow():
                z = R.nn.relu(y)
                R.output(z)
            return z

        @R.function
        def main(x: R.Tensor((1, 2, 4, 4), "float32")) -> R.Tensor((1, 2, 4, 4), "float32"):
            cls = Bad
            with R.dataflow():
                y = cls.client_p0(x)
                z = cls.dev0_p0(y)
                R.output(z)
            return z

    with pytest.raises(SplitcError, match="the client can only slice model inputs; y"):
        extract(Bad)
