"""Outline and pipeline split: before/expected TVMScript, and the planner's cut choice."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from splitc.errors import SplitcError
from splitc.passes.analysis import cut_points, profile
from splitc.passes.split.outline import OutlinePieces
from splitc.passes.split.pipeline import PipelinePlan, PipelineSplit, plan_pipeline


@I.ir_module
class Residual:
    @R.function
    def main(x: R.Tensor((1, 4), "float32"), y: R.Tensor((1, 4), "float32")):
        with R.dataflow():
            a = R.nn.relu(x)
            b = R.add(a, y)
            c = R.multiply(b, a)
            d = R.nn.relu(c)
            R.output(d)
        return d


class TestTwoStages:
    """Cutting after ``a``: ``a`` crosses, ``y`` goes straight to the second device."""

    plan = PipelinePlan(cuts=(0,), devices=(0, 1))

    @I.ir_module
    class Expected:
        @R.function
        def dev0_p0(x: R.Tensor((1, 4), "float32")) -> R.Tensor((1, 4), "float32"):
            R.func_attr({"splitc.device": 0})
            with R.dataflow():
                a = R.nn.relu(x)
                R.output(a)
            return a

        @R.function
        def dev1_p0(a: R.Tensor((1, 4), "float32"),
                    y: R.Tensor((1, 4), "float32")) -> R.Tensor((1, 4), "float32"):
            R.func_attr({"splitc.device": 1})
            with R.dataflow():
                b = R.add(a, y)
                c = R.multiply(b, a)
                d = R.nn.relu(c)
                R.output(d)
            return d

        @R.function
        def main(x: R.Tensor((1, 4), "float32"), y: R.Tensor((1, 4), "float32")):
            cls = Expected  # noqa: F821 (TVMScript resolves the module by name)
            with R.dataflow():
                a = cls.dev0_p0(x)
                d = cls.dev1_p0(a, y)
                R.output(d)
            return d

    def test_rewrite(self):
        after = PipelineSplit(self.plan)(Residual)
        relax.analysis.well_formed(after)
        tvm.ir.assert_structural_equal(after, self.Expected)


class TestInsideResidual:
    """A cut inside the residual sends both tensors the rest reads: a piece with two outputs."""

    @I.ir_module
    class Expected:
        @R.function
        def dev0_p0(x: R.Tensor((1, 4), "float32"), y: R.Tensor((1, 4), "float32")):
            R.func_attr({"splitc.device": 0})
            with R.dataflow():
                a = R.nn.relu(x)
                b = R.add(a, y)
                R.output(a, b)
            return (a, b)

        @R.function
        def dev1_p0(b: R.Tensor((1, 4), "float32"), a: R.Tensor((1, 4), "float32")):
            R.func_attr({"splitc.device": 1})
            with R.dataflow():
                c = R.multiply(b, a)
                d = R.nn.relu(c)
                R.output(d)
            return d

        @R.function
        def main(x: R.Tensor((1, 4), "float32"), y: R.Tensor((1, 4), "float32")):
            cls = Expected  # noqa: F821 (TVMScript resolves the module by name)
            with R.dataflow():
                dev0_p0 = cls.dev0_p0(x, y)
                a = dev0_p0[0]
                b = dev0_p0[1]
                d = cls.dev1_p0(b, a)
                R.output(d)
            return d

    def test_rewrite(self):
        after = PipelineSplit(PipelinePlan(cuts=(1,), devices=(0, 1)))(Residual)
        tvm.ir.assert_structural_equal(after, self.Expected)

    def test_cut_points_name_what_crosses(self):
        crossing = [[t.name for t in c.crossing] for c in cut_points(Residual)]
        assert crossing == [["a"], ["a", "b"], ["c"]]


class TestStagesCutARunThatSends:
    """Device 0 computes ``a`` (read by device 1) and, needing nothing from it, goes on to
    ``b`` and ``c``. In one stage that is one piece, and device 1 would wait for ``c`` too;
    with ``b`` and ``c`` in a later stage, ``a`` leaves in a piece of its own."""

    device_of = {"a": 0, "b": 0, "c": 0, "d": 1, "e": 0}
    stage_of = {"a": 1, "b": 2, "c": 2, "d": 2, "e": 3}

    @I.ir_module
    class Expected:
        @R.function
        def dev0_p0(x: R.Tensor((1, 4), "float32")) -> R.Tensor((1, 4), "float32"):
            R.func_attr({"splitc.device": 0})
            with R.dataflow():
                a = R.nn.relu(x)
                R.output(a)
            return a

        @R.function
        def dev0_p1(a: R.Tensor((1, 4), "float32")) -> R.Tensor((1, 4), "float32"):
            R.func_attr({"splitc.device": 0})
            with R.dataflow():
                b = R.multiply(a, a)
                c = R.nn.relu(b)
                R.output(c)
            return c

        @R.function
        def dev1_p0(a: R.Tensor((1, 4), "float32")) -> R.Tensor((1, 4), "float32"):
            R.func_attr({"splitc.device": 1})
            with R.dataflow():
                d = R.negative(a)
                R.output(d)
            return d

        @R.function
        def dev0_p2(c: R.Tensor((1, 4), "float32"),
                    d: R.Tensor((1, 4), "float32")) -> R.Tensor((1, 4), "float32"):
            R.func_attr({"splitc.device": 0})
            with R.dataflow():
                e = R.add(c, d)
                R.output(e)
            return e

        @R.function
        def main(x: R.Tensor((1, 4), "float32")):
            cls = Expected  # noqa: F821 (TVMScript resolves the module by name)
            with R.dataflow():
                a = cls.dev0_p0(x)
                c = cls.dev0_p1(a)
                d = cls.dev1_p0(a)
                e = cls.dev0_p2(c, d)
                R.output(e)
            return e

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4), "float32")):
            with R.dataflow():
                a = R.nn.relu(x)
                b = R.multiply(a, a)
                c = R.nn.relu(b)
                d = R.negative(a)
                e = R.add(c, d)
                R.output(e)
            return e

    def test_rewrite(self):
        after = OutlinePieces(self.device_of, self.stage_of)(self.Before)
        relax.analysis.well_formed(after)
        tvm.ir.assert_structural_equal(after, self.Expected)

    def test_one_stage_is_one_piece_per_run(self):
        after = OutlinePieces(self.device_of)(self.Before)
        assert [b.var.name for b in after["dev0_p0"].body.blocks[0].bindings] == ["a", "b", "c"]


def test_one_device_is_one_piece():
    after = PipelineSplit(PipelinePlan(cuts=(), devices=(0,)))(Residual)
    assert sorted(gv.name_hint for gv in after.get_global_vars()) == ["dev0_p0", "main"]


def test_planner_keeps_residual_whole():
    """With equal costs, cuts with one crossing tensor are preferred over the residual's two."""
    plan = plan_pipeline(Residual, 2)
    assert plan.cuts in ((0,), (2,))


def test_outline_needs_every_binding_assigned():
    with pytest.raises(SplitcError, match="no device assigned"):
        OutlinePieces({"a": 0})(Residual)


def test_bad_plan_is_refused():
    with pytest.raises(SplitcError, match="do not fit"):
        PipelineSplit(PipelinePlan(cuts=(7,), devices=(0, 1)))(Residual)


def test_profile_counts_flops_and_weights():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = relax.const(np.ones((4, 3, 3, 3), "float32"))
            y = bb.emit(relax.op.nn.conv2d(x, w, padding=1), name_hint="y")
            z = bb.emit_output(relax.op.nn.relu(y), name_hint="z")
        bb.emit_func_output(z)
    rows = profile(bb.get())
    assert rows[0].op == "nn.conv2d"
    assert rows[0].flops == 2 * (4 * 8 * 8) * (3 * 3 * 3)
    assert rows[0].weight_bytes == 4 * 3 * 3 * 3 * 4
    assert rows[1].flops == 4 * 8 * 8 and rows[1].out_bytes == 4 * 8 * 8 * 4


def test_planner_prices_stages_as_the_cost_model_does():
    """A wide convolution has the FLOPs, two 1x1 convolutions on one pixel the weights: cut
    by FLOPs alone, one stage gets both weight-heavy layers; with each device's speed (its
    time per weight byte), they are split between the stages."""
    from splitc.planning.cost import DeviceSpeed

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 32, 32), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, relax.const(np.ones((8, 4, 3, 3), "float32")),
                                           padding=1))
            b = bb.emit(relax.op.nn.relu(a))
            c = bb.emit(relax.op.mean(b, axis=[2, 3], keepdims=True))
            d = bb.emit(relax.op.nn.conv2d(c, relax.const(np.ones((4096, 8, 1, 1), "float32"))))
            e = bb.emit(relax.op.nn.relu(d))
            f = bb.emit_output(relax.op.nn.conv2d(
                e, relax.const(np.ones((8, 4096, 1, 1), "float32"))))
        bb.emit_func_output(f)
    mod = bb.get()
    by_flops = plan_pipeline(mod, 2, flops_per_second=1e9, bytes_per_second=1e15)
    assert by_flops.cuts == (0,)  # the wide convolution alone
    weighing = [DeviceSpeed(1e9, 0.0, "test", 0.0, 1e-8)] * 2
    priced = plan_pipeline(mod, 2, speeds=weighing, bytes_per_second=1e15)
    assert priced.cuts == (3,)  # one weight-heavy layer on each device


# -- imported models: repeated names, skips --------------------------------------------------
@pytest.fixture
def factories(monkeypatch):
    """Make ``factories:NAME`` importable whatever pytest's import mode."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent))


@pytest.mark.parametrize(("factory", "n"), [("residual_net", 2), ("residual_net", 4),
                                            ("skip_net", 2), ("skip_net", 3)])
def test_a_pipeline_has_one_contiguous_stage_per_device(factories, factory, n):
    """A torch import repeats binding names (residual_net's has lv5 twice before the
    frontend renames them), and a skip-heavy detector has few one-tensor cuts: either way a
    pipeline over N devices is N pieces, device k running the k-th contiguous stage, with its
    stages balanced by their priced time, and the answer is the original's."""
    from splitc import frontend
    from splitc.planning.extract import extract

    from .helpers import run_module

    imported = frontend.load(f"factories:{factory}", {"x": (1, 3, 32, 32)})
    names = [b.var.name for b in imported.mod["main"].body.blocks[0].bindings]
    assert len(set(names)) == len(names)
    # (a fast network: these small models' stages are worth balancing, not their sends)
    plan = plan_pipeline(imported.mod, n, bytes_per_second=1.25e9)
    split = PipelineSplit(plan)(imported.mod)
    ex = extract(split)
    assert [p.device for p in ex.pieces] == [f"dev{k}" for k in range(n)]
    flops = [p.flops for p in ex.pieces]
    assert max(flops) < 1.6 * sum(flops) / n, flops  # no stage holds most of the work
    x = imported.random_inputs()
    np.testing.assert_allclose(run_module(split, *x), imported.reference(x)[0], rtol=1e-4,
                               atol=1e-5)
