"""WinogradConv: before/expected, the per-layer tile choice, and the convolution's answers."""

import numpy as np
import pytest
import tvm
from tvm import relax

from splitc.backend.build import build, coverage, pack, schedule, split_transforms
from splitc.passes.analysis import profile
from splitc.passes.codegen import winograd
from splitc.passes.codegen.winograd import (
    WinogradConv,
    conv2d_winograd,
    winograd_matrices,
    winograd_tile,
    winograd_weights,
)

from .helpers import HOST


def packed_conv(num_input: int, stride: int = 1, kernel: int = 3):
    """A packed (NCHW16c) conv whose kernel is a weight when ``num_input`` is 1."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, 16, 16, 16), "float32"))
    w = relax.Var("w", relax.TensorType((2, 2, kernel, kernel, 16, 16), "float32"))
    with bb.function("main", [x, w], attrs={"num_input": num_input}):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.conv2d(
                x, w, strides=stride, padding=1, data_layout="NCHW16c",
                kernel_layout="OIHW16i16o", out_layout="NCHW16c"))
        bb.emit_func_output(y)
    return bb.get()


def winograd_conv(tile: int):
    """:func:`packed_conv` (a weight kernel) as ``F(tile, 3)``: the kernel's transform is its
    own call on the weight (lifted to compile time by ``build``)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, 16, 16, 16), "float32"))
    w = relax.Var("w", relax.TensorType((2, 2, 3, 3, 16, 16), "float32"))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            u = bb.emit(bb.call_te(winograd_weights, w,
                                   relax.const(winograd_matrices(tile)[2]),
                                   primfunc_name_hint="winograd_weights"))
            y = bb.emit_output(bb.call_te(conv2d_winograd, x, u, [1, 1, 1, 1], 16,
                                          primfunc_name_hint="conv2d_winograd_NCHWc"))
        bb.emit_func_output(y)
    return bb.get()


def test_pass_rewrites_a_weight_conv():
    """32 channels at 16x16: F(4, 3) is predicted faster."""
    tvm.ir.assert_structural_equal(WinogradConv()(packed_conv(num_input=1)), winograd_conv(4))


def test_measured_choice_overrides_the_prediction():
    """A choice measured on the device (by the convolution's key) replaces the prediction:
    direct (0) leaves the convolution, 2 takes F(2, 3); another key changes nothing."""
    before = packed_conv(num_input=1)
    key = winograd.winograd_key(before["main"].body.blocks[0].bindings[0].value)
    assert key == "1x32x16x16/1,1,1,1->32"
    tvm.ir.assert_structural_equal(WinogradConv({key: 0})(before), before)
    tvm.ir.assert_structural_equal(WinogradConv({key: 2})(before), winograd_conv(2))
    tvm.ir.assert_structural_equal(WinogradConv({"1x8x8x8/0,0,0,0->8": 0})(before),
                                   winograd_conv(4))


@pytest.mark.parametrize("num_input,stride,kernel", [(2, 1, 3), (1, 2, 3), (1, 1, 1)])
def test_pass_leaves_other_convs(num_input, stride, kernel):
    """A kernel that is an input (computed per call), stride 2 and 1x1 stay direct."""
    before = packed_conv(num_input, stride, kernel)
    tvm.ir.assert_structural_equal(WinogradConv()(before), before)


@pytest.mark.parametrize("shape,tile", [
    ((1, 56, 56, 64, 64), 4),     # ResNet stage 1: measured 3.4x faster than direct
    # F(4, 3) measures 15 % faster alone, its 9 MB of weights hot in cache; the model prices
    # them as read from memory, as they are in a model
    ((1, 14, 14, 256, 256), 2),
    ((1, 14, 14, 512, 512), 2),   # VGG's last block: few tiles, big weights
    ((1, 7, 7, 512, 512), None),  # ResNet stage 4: transformed weights dominate
    ((8, 7, 7, 512, 512), 4),     # ... unless a batch of 8 reuses them
    ((1, 224, 224, 3, 64), None),  # a 3-channel stem: the transforms dominate
    ((1, 8, 8, 16, 16), None),
])
def test_tile_choice(shape, tile):
    assert winograd_tile(*shape) == tile


def conv_model(c_in, c_out, size, padding, batch=1, residual=False):
    """conv + bias + ReLU (+ a residual input), its weights after ``num_input``."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, c_in, size, size), "float32"))
    s = relax.Var("s", relax.TensorType((batch, c_out, size + sum(padding[::2]) - 2,
                                         size + sum(padding[1::2]) - 2), "float32"))
    w = relax.Var("w", relax.TensorType((c_out, c_in, 3, 3), "float32"))
    b = relax.Var("b", relax.TensorType((1, c_out, 1, 1), "float32"))
    params = [x, s, w, b] if residual else [x, w, b]
    with bb.function("main", params, attrs={"num_input": len(params) - 2}):
        with bb.dataflow():
            y = relax.op.add(relax.op.nn.conv2d(x, w, padding=padding), b)
            if residual:
                y = relax.op.add(y, s)
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("case", [
    dict(c_in=32, c_out=32, size=16, padding=(1, 1, 1, 1)),
    dict(c_in=20, c_out=24, size=13, padding=(1, 1, 1, 1)),   # odd blocks, partial tiles
    dict(c_in=16, c_out=48, size=10, padding=(0, 1, 1, 0)),   # asymmetric padding
    dict(c_in=16, c_out=16, size=9, padding=(0, 0, 0, 0), batch=2),
    dict(c_in=32, c_out=32, size=12, padding=(1, 1, 1, 1), residual=True),
])
def test_answers_match_direct(case, tile, monkeypatch):
    """Forced to ``F(tile, 3)``: the Winograd kernel (scheduled, no plain loops left) gives
    the direct convolution's answer."""
    mod = conv_model(**case)
    rng = np.random.default_rng(3)
    params = mod["main"].params
    n_in = int(mod["main"].attrs["num_input"])
    inputs = [rng.standard_normal([int(d) for d in p.ty.shape]).astype("float32")
              for p in params[:n_in]]
    weights = [rng.standard_normal([int(d) for d in p.ty.shape]).astype("float32") * 0.2
               for p in params[n_in:]]

    def run(schedules: bool) -> np.ndarray:
        ex, packed = build(mod, HOST, {"main": weights}, schedules=schedules)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        return vm["main"](*[tvm.runtime.tensor(a) for a in [*inputs, *packed["main"]]]).numpy()

    direct = run(schedules=False)
    monkeypatch.setattr(winograd, "winograd_tile", lambda *_: tile)
    pieces, _ = split_transforms(pack(mod, HOST))
    done, plain = coverage(schedule(pieces, HOST))
    assert [d for d in done if "winograd" in d] and not plain, (done, plain)
    np.testing.assert_allclose(run(schedules=True), direct, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size,factor", [(56, 4.0), (7, 1.0)])
def test_memory_counts_transformed_weights(size, factor):
    """The cost model's weight bytes are what the artifact stores: a 64-channel conv at 56x56
    keeps its F(4, 3) kernel (36/9 of the kernel's bytes); at 7x7 it stays direct."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 64, size, size), "float32"))
    kernel = np.ones((64, 64, 3, 3), "float32")
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.conv2d(x, relax.const(kernel), padding=1))
        bb.emit_func_output(y)
    (row,) = profile(bb.get())
    assert row.weight_bytes == kernel.nbytes * factor
