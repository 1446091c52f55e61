"""Spatial split: before/expected, the segment rule, and exactness on awkward shapes."""

import functools

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from splitc.errors import SplitcError
from splitc.passes.ir import CLIENT, main_block
from splitc.passes.split.spatial import (
    MAX_HALO_OVERHEAD,
    RowGeometry,
    SpatialPlan,
    SpatialSplit,
    home_after,
    plan_spatial,
    row_local,
)

from .helpers import run_module

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((2, 2, 3, 3)).astype("float32")
W2 = RNG.standard_normal((2, 2, 3, 3)).astype("float32")
F32 = "float32"


def conv_relu_conv() -> tvm.IRModule:
    """x (8 rows) -> conv 3x3 pad 1 -> relu -> conv 3x3 pad 1."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, 8, 8), F32))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, relax.const(W1), padding=1), name_hint="a")
            b = bb.emit(relax.op.nn.relu(a), name_hint="b")
            c = bb.emit_output(relax.op.nn.conv2d(b, relax.const(W2), padding=1),
                               name_hint="c")
        bb.emit_func_output(c)
    return bb.get()


def expected_two_tiles() -> tvm.IRModule:
    """Device 0 owns output rows 0-3, device 1 rows 4-7. Each conv needs one halo row: device
    0 computes ``a``/``b`` rows 0-4 from input rows 0-5, device 1 rows 3-7 from input rows
    2-7. Padding stays only at the image border (top on device 0, bottom on device 1); the
    caller cuts each device's input rows (the client piece); device 0 stitches the output."""
    bb = relax.BlockBuilder()
    rows = [(0, 6, [1, 1, 0, 1]), (2, 8, [0, 1, 1, 1])]
    x = relax.Var("x", relax.TensorType((1, 2, 8, 8), F32))
    with bb.function("client_p0", [x], attrs={"splitc.device": -1}, private=False):
        with bb.dataflow():
            cuts = [bb.emit_output(relax.op.strided_slice(x, axes=[2], begin=[lo], end=[hi]),
                                   name_hint=f"x_r{k}") for k, (lo, hi, _) in enumerate(rows)]
        client = bb.emit_func_output(relax.Tuple(cuts))
    pieces = []
    for k, (lo, hi, pad) in enumerate(rows):
        xs = relax.Var(f"x_r{k}", relax.TensorType((1, 2, hi - lo, 8), F32))
        with bb.function(f"dev{k}_p0", [xs], attrs={"splitc.device": k}, private=False):
            with bb.dataflow():
                a = bb.emit(relax.op.nn.conv2d(xs, relax.const(W1), padding=pad),
                            name_hint=f"a_t{k}")
                b = bb.emit(relax.op.nn.relu(a), name_hint=f"b_t{k}")
                c = bb.emit_output(relax.op.nn.conv2d(b, relax.const(W2), padding=pad),
                                   name_hint=f"c_t{k}")
            pieces.append(bb.emit_func_output(c))
    c0 = relax.Var("c_t0", relax.TensorType((1, 2, 4, 8), F32))
    c1 = relax.Var("c_t1", relax.TensorType((1, 2, 4, 8), F32))
    with bb.function("dev0_p1", [c0, c1], attrs={"splitc.device": 0}, private=False):
        with bb.dataflow():
            g = bb.emit(relax.op.concat([c0, c1], axis=2), name_hint="c_g0")
            out = bb.emit_output(g, name_hint="c_out")
        gather = bb.emit_func_output(out)
    x = relax.Var("x", relax.TensorType((1, 2, 8, 8), F32))
    with bb.function("main", [x]):
        with bb.dataflow():
            cut = bb.emit(relax.Call(client, [x]))
            x0 = bb.emit(relax.TupleGetItem(cut, 0))
            x1 = bb.emit(relax.TupleGetItem(cut, 1))
            t0 = bb.emit(relax.Call(pieces[0], [x0]))
            t1 = bb.emit(relax.Call(pieces[1], [x1]))
            out = bb.emit_output(relax.Call(gather, [t0, t1]))
        bb.emit_func_output(out)
    return bb.get()


def binding_names(mod: tvm.IRModule, func: str) -> list[str]:
    return [b.var.name for b in mod[func].body.blocks[0].bindings]


def pieces_by_device(mod: tvm.IRModule) -> dict[str, int]:
    return {gv.name_hint: int(f.attrs["splitc.device"]) for gv, f in mod.functions.items()
            if gv.name_hint != "main"}


def test_two_tiles_before_expected():
    before = conv_relu_conv()
    plan = plan_spatial(before, 2)
    assert plan == SpatialPlan(2, ((0, 3),))
    after = SpatialSplit(plan)(before)
    relax.analysis.well_formed(after)
    tvm.ir.assert_structural_equal(after, expected_two_tiles())
    assert binding_names(after, "dev1_p0") == ["a_t1", "b_t1", "c_t1"]
    assert binding_names(after, "client_p0") == ["x_r0", "x_r1"]


def test_halo_exchange_sends_only_the_missing_rows():
    """Two one-conv segments: each device's second tile takes its own rows of ``a`` and only
    the one halo row it lacks from its neighbour, sliced on the neighbour."""
    before = conv_relu_conv()
    after = SpatialSplit(SpatialPlan(2, ((0, 1), (1, 3))))(before)
    relax.analysis.well_formed(after)
    assert binding_names(after, "dev0_p0") == ["a_t0", "a_r1"]
    second = after["dev1_p1"]
    assert [tuple(int(d) for d in p.ty.shape) for p in second.params] == [(1, 2, 1, 8),
                                                                         (1, 2, 4, 8)]
    assert binding_names(after, "dev1_p1")[0] == "a_g1"  # halo row ++ own rows
    x = RNG.standard_normal((1, 2, 8, 8)).astype(F32)
    np.testing.assert_allclose(run_module(after, x), run_module(before, x), rtol=1e-5,
                               atol=1e-5)


def test_rows_a_neighbour_waits_for_leave_before_the_next_segment():
    """A stride-2 conv's top half reads only device 0's own rows: device 0 needs nothing at
    the second segment and would run straight on, but device 1 needs its row 3. That row
    leaves in a piece of its own (the first segment's), not after device 0's second tile."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, 8, 8), F32))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, relax.const(W1), padding=1), name_hint="a")
            c = bb.emit_output(relax.op.nn.conv2d(a, relax.const(W2), strides=2, padding=1),
                               name_hint="c")
        bb.emit_func_output(c)
    before = bb.get()
    after = SpatialSplit(SpatialPlan(2, ((0, 1), (1, 2))))(before)
    relax.analysis.well_formed(after)
    assert binding_names(after, "dev0_p0") == ["a_t0", "a_r1"]
    assert binding_names(after, "dev0_p1") == ["c_t0"]
    assert binding_names(after, "dev1_p1")[-1] == "c_t1"
    x = RNG.standard_normal((1, 2, 8, 8)).astype(F32)
    np.testing.assert_allclose(run_module(after, x), run_module(before, x), rtol=1e-5,
                               atol=1e-5)


def test_fewer_rows_than_devices_uses_as_many_devices_as_rows():
    """Eight rows over ten devices: eight tiles of one row on devices 0-7; what follows the
    segment (here the gathering of the output) runs on the last device that owns no rows
    (9), which waits through the segment rather than queueing the gather behind a tile."""
    before = conv_relu_conv()
    plan = plan_spatial(before, 10)
    assert plan.segments
    after = SpatialSplit(plan)(before)
    assert set(pieces_by_device(after).values()) == set(range(8)) | {9, CLIENT}
    x = RNG.standard_normal((1, 2, 8, 8)).astype(F32)
    np.testing.assert_allclose(run_module(after, x), run_module(before, x), rtol=1e-5,
                               atol=1e-5)


def test_home_after_a_segment_is_a_device_without_rows():
    """The home device after a segment: the group's last device that owns none of its output
    rows (it holds no weights of the segment and waits through it) and is no slower than the
    group's first, else the group's first."""
    assert home_after((0, 8), set(range(7))) == 7
    assert home_after((0, 10), set(range(8))) == 9
    assert home_after((0, 4), set(range(4))) == 0
    assert home_after((4, 8), {4, 5, 6, 7}) == 4
    assert home_after((4, 8), {4, 5}) == 7
    # by speed: never a slower device than the first (3:1 shares leave the slow one rowless)
    assert home_after((0, 2), {0}, (3.0, 1.0)) == 0
    assert home_after((0, 3), {0}, (3.0, 3.0, 1.0)) == 1


@I.ir_module
class OneRow:
    @R.function
    def main(x: R.Tensor((1, 2, 1, 8), "float32"), w: R.Tensor((2, 2, 1, 3), "float32")):
        with R.dataflow():
            a = R.nn.conv2d(x, w, padding=[0, 1, 0, 1])
            b = R.mean(a, axis=[3])
            R.output(b)
        return b


def test_nothing_to_tile_runs_whole_on_device0():
    """A single row cannot be tiled: no segment, one piece on device 0 doing what main did."""
    plan = plan_spatial(OneRow, 2)
    assert plan.segments == ()
    after = SpatialSplit(plan)(OneRow)
    assert pieces_by_device(after) == {"dev0_p0": 0}
    assert binding_names(after, "dev0_p0") == ["a", "b", "b_out"]
    x = RNG.standard_normal((1, 2, 1, 8)).astype(F32)
    w = RNG.standard_normal((2, 2, 1, 3)).astype(F32)
    np.testing.assert_allclose(run_module(after, x, w), run_module(OneRow, x, w))


def test_one_device_tiles_nothing():
    assert plan_spatial(conv_relu_conv(), 1).segments == ()


def test_plan_must_name_row_local_bindings():
    with pytest.raises(SplitcError, match="not row-local"):
        SpatialSplit(SpatialPlan(2, ((0, 2),)))(OneRow)
    with pytest.raises(SplitcError, match="out of order"):
        SpatialSplit(SpatialPlan(2, ((1, 3), (0, 1))))(conv_relu_conv())


def conv_chain(depth: int, height: int) -> tvm.IRModule:
    """``depth`` 3x3 convs with ReLU, then a global mean."""
    rng = np.random.default_rng(depth)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, height, 6), F32))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = x
            for _ in range(depth):
                w = relax.const(rng.standard_normal((2, 2, 3, 3)).astype(F32))
                y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.nn.conv2d(y, w, padding=1))))
            out = bb.emit_output(relax.op.mean(y, axis=[2, 3]))
        bb.emit_func_output(out)
    return bb.get()


def test_segments_stop_growing_at_the_halo_budget():
    """Every fused conv adds a halo row per tile boundary: a long chain becomes several
    segments, each within the budget and each too costly to extend by one more binding."""
    mod = conv_chain(8, 16)
    bindings = list(main_block(mod).bindings)
    geo = RowGeometry(bindings, mod["main"])
    plan = plan_spatial(mod, 4)
    assert len(plan.segments) > 1
    assert plan.segments[0][0] == 0 and plan.segments[-1][1] == len(bindings) - 1  # not mean
    for (start, end), (nxt, _) in zip(plan.segments, plan.segments[1:], strict=False):
        assert end == nxt
        tiled, plain = geo.tiled_flops(start, end, 4)
        assert tiled <= MAX_HALO_OVERHEAD * plain
        tiled, plain = geo.tiled_flops(start, end + 1, 4)
        assert tiled > MAX_HALO_OVERHEAD * plain


def test_avg_pool_counting_padding_is_row_local_unless_ceil_adds_a_window():
    def pool(height):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((1, 1, height, height), F32))
        with bb.function("main", [x]):
            with bb.dataflow():
                y = bb.emit_output(relax.op.nn.avg_pool2d(
                    x, pool_size=3, strides=2, padding=1, ceil_mode=True,
                    count_include_pad=True))
            bb.emit_func_output(y)
        return main_block(bb.get()).bindings[0]

    assert row_local(pool(9))  # ceil and floor agree: 5 rows either way
    assert not row_local(pool(10))  # ceil adds a sixth window


def const(rng, *shape):
    return relax.const(rng.standard_normal(shape).astype(F32))


@functools.cache
def awkward(height: int) -> tvm.IRModule:
    """Stride 2, dilation, ceil-mode pooling that adds a row and a column, a residual add,
    depthwise and grouped convs, a squeeze-and-excitation gate (one-row tensors inside a
    segment), a per-pixel constant of rank 3, and average pooling without padding counted."""
    rng = np.random.default_rng(height)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, height, 10), F32))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, const(rng, 8, 4, 3, 3), strides=2, padding=1))
            b = bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(a, const(rng, 1, 8, 1, 1)))))
            c = bb.emit(relax.op.nn.conv2d(b, const(rng, 8, 1, 3, 3), padding=2, dilation=2,
                                           groups=8))
            d = bb.emit(relax.op.add(c, b))
            e = bb.emit(relax.op.nn.max_pool2d(d, pool_size=2, strides=2, padding=0,
                                               ceil_mode=True))
            s = bb.emit(relax.op.mean(e, axis=[2, 3], keepdims=True))
            s = bb.emit(relax.op.sigmoid(bb.emit(relax.op.nn.conv2d(s, const(rng, 8, 8, 1, 1)))))
            f = bb.emit(relax.op.multiply(e, s))
            g = bb.emit(relax.op.nn.conv2d(f, const(rng, 8, 4, 1, 1), groups=2))
            h = bb.emit(relax.op.add(g, const(rng, 8, *static_hw(g))))
            i = bb.emit(relax.op.nn.avg_pool2d(h, pool_size=2, strides=1, padding=1,
                                               count_include_pad=False))
            out = bb.emit_output(relax.op.mean(i, axis=[2, 3]))
        bb.emit_func_output(out)
    return bb.get()


def static_hw(var: relax.Var) -> tuple[int, int]:
    return tuple(int(d) for d in var.ty.shape)[2:]


@functools.cache
def reference(height: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(height).standard_normal((1, 4, height, 10)).astype(F32)
    return x, run_module(awkward(height), x)


@pytest.mark.parametrize("height", [15, 17])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_awkward_shapes_exact(height, n):
    mod = awkward(height)
    plan = plan_spatial(mod, n)
    assert plan.segments, "the conv chain should be tiled"
    after = SpatialSplit(plan)(mod)
    relax.analysis.well_formed(after)
    assert set(pieces_by_device(after).values()) - {CLIENT} == set(range(n))
    x, ref = reference(height)
    out = run_module(after, x)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def mistyped(mod: tvm.IRModule) -> list[str]:
    """Every operator call in ``mod`` whose binding's type is not the one TVM infers for it
    anew (the splits give the calls they build their types, instead of having TVM infer
    them: see :func:`splitc.passes.ir.typed`)."""
    bb, wrong = relax.BlockBuilder(), []
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        for block in func.body.blocks:
            for b in block.bindings:
                v = b.value
                if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op):
                    fresh = bb.normalize(relax.Call(v.op, v.args, v.attrs, v.ty_args))
                    try:
                        tvm.ir.assert_structural_equal(b.var.ty, fresh.ty)
                    except ValueError:
                        wrong.append(f"{gv.name_hint}: {b.var.name} is {b.var.ty}, "
                                     f"inferred {fresh.ty}")
    return wrong


@pytest.mark.parametrize("strategy", ["spatial", "channel", "hybrid"])
@pytest.mark.parametrize("height", [15, 17])
def test_the_types_a_split_gives_its_calls_are_those_tvm_infers(strategy, height):
    """Tiles (strides, dilation, ceil-mode pools cut to a row range), channel slices (grouped
    and depthwise too), re-emitted pieces and their lifted weights."""
    from splitc.planning import strategies  # noqa: F401  (registers them)
    from splitc.planning.extract import extract
    from splitc.planning.registry import Context, get

    mod = awkward(height)
    proposals = list(get(strategy).candidates(mod, Context(3)))
    assert proposals
    for p in proposals:
        assert mistyped(p.module) == []
        for piece in extract(p.module).modules.values():
            assert mistyped(piece) == []


@functools.cache
def imported_cnn(tmp_dir: str) -> tvm.IRModule:
    """A small torch CNN through ONNX, as splitc imports models (bias adds, folded BN)."""
    import onnx
    import torch
    from torch import nn
    from tvm.relax.frontend.onnx import from_onnx

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1),
                                      nn.BatchNorm2d(8), nn.ReLU())
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.pw = nn.Conv2d(8, 8, 1)
            self.branch = nn.Conv2d(8, 4, 3, padding=1)
            self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
            self.fc = nn.Linear(12, 5)

        def forward(self, x):
            y = self.stem(x)
            y = y + torch.relu(self.pw(self.dw(y)))
            y = torch.cat([y, self.branch(y)], dim=1)
            y = nn.functional.avg_pool2d(self.pool(y), 2, stride=1, padding=1)
            return self.fc(y.mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.stem[1].running_mean.normal_(0, 0.1)
        net.stem[1].running_var.uniform_(0.5, 2.0)
    path = f"{tmp_dir}/net.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 17, 13),), path, dynamo=False,
                      input_names=["input"])
    mod = from_onnx(onnx.load(path), shape_dict={"input": [1, 3, 17, 13]})
    return relax.transform.FoldConstant()(mod)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_imported_cnn_exact(n, tmp_path_factory):
    mod = imported_cnn(str(tmp_path_factory.getbasetemp()))
    plan = plan_spatial(mod, n)
    assert plan.segments
    after = SpatialSplit(plan)(mod)
    x = np.random.default_rng(n).standard_normal((1, 3, 17, 13)).astype(F32)
    ref = run_module(mod, x)
    out = run_module(after, x)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_shares_divide_rows_in_proportion():
    """Shares 3:1 over 8 rows: device 0 owns rows 0-5, device 1 rows 6-7; the answer holds."""
    from splitc.passes.ops import share_bounds

    assert share_bounds(8, (3, 1)) == ((0, 6), (6, 8))
    assert share_bounds(7, (10, 0.1, 1)) == ((0, 6), (6, 6), (6, 7))
    with pytest.raises(SplitcError, match="shares"):
        share_bounds(8, (0, 0))
    before = conv_relu_conv()
    plan = plan_spatial(before, 2, shares=(3.0, 1.0))
    after = SpatialSplit(plan)(before)
    relax.analysis.well_formed(after)
    assert [int(d) for d in after["dev0_p0"].ret_ty.shape] == [1, 2, 6, 8]
    assert [int(d) for d in after["dev1_p0"].ret_ty.shape] == [1, 2, 2, 8]
    x = RNG.standard_normal((1, 2, 8, 8)).astype(F32)
    np.testing.assert_allclose(run_module(after, x), run_module(before, x), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(SplitcError, match="needs as many shares"):
        SpatialSplit(SpatialPlan(3, plan.segments, (1.0, 2.0)))


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_a_reduction_over_rows_sends_partials_not_rows(reduce):
    """A global pool after the tiles: each device reduces its own rows and only those partial
    results travel (not the rows themselves), and the answer holds."""
    from splitc.planning.extract import extract

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, 8, 8), F32))
    op = relax.op.mean if reduce == "mean" else relax.op.max
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, relax.const(W1), padding=1), name_hint="a")
            b = bb.emit(relax.op.nn.relu(a), name_hint="b")
            c = bb.emit_output(op(b, axis=[2, 3], keepdims=True), name_hint="c")
        bb.emit_func_output(c)
    before = bb.get()
    after = SpatialSplit(plan_spatial(before, 2))(before)
    relax.analysis.well_formed(after)
    ex = extract(after)
    [t] = ex.transfers
    assert (ex.tensors[t.tensor].shape, t.src, t.dst) == ((1, 2, 1, 1), "dev1", "dev0")
    xv = RNG.standard_normal((1, 2, 8, 8)).astype(F32)
    np.testing.assert_allclose(run_module(after, xv), run_module(before, xv), rtol=1e-5,
                               atol=1e-6)


def test_segments_on_device_groups_form_a_pipeline_of_tiled_stages():
    """Segment 1 tiled over devices 0-1, segment 2 over devices 2-3: the second stage takes
    the rows it needs from the first stage's tiles, runs the rest at home (device 2) and the
    answer holds."""
    from splitc.planning.extract import extract

    before = conv_relu_conv()
    plan = SpatialPlan(4, ((0, 1), (1, 3)), groups=((0, 2), (2, 4)))
    after = SpatialSplit(plan)(before)
    relax.analysis.well_formed(after)
    ex = extract(after)
    first = {p.device for p in ex.pieces if any(o.startswith("a_t") for o in p.outputs)}
    second = {p.device for p in ex.pieces if any(o.startswith("c_t") for o in p.outputs)}
    assert (first, second) == ({"dev0", "dev1"}, {"dev2", "dev3"})
    assert [(e.tensor, e.device) for e in ex.outputs] == [("c_out", "dev2")]
    x = RNG.standard_normal((1, 2, 8, 8)).astype(F32)
    np.testing.assert_allclose(run_module(after, x), run_module(before, x), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(SplitcError, match="groups"):
        SpatialSplit(SpatialPlan(4, ((0, 1), (1, 3)), groups=((0, 2),)))(before)
