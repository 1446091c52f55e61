"""Default CPU schedules give the plain lowering's answers, and really apply.

Per op family, with odd shapes: channels that are not a multiple of the vector width, stride 2,
asymmetric padding, depthwise and grouped convolutions, matmuls with odd sizes, pooling with
padding. Each case is built twice through :func:`splitc.backend.build.build` (default
schedules, and TVM's plain lowering) and must agree; :func:`splitc.backend.build.coverage` must
show the heavy kernel scheduled, so a rule that silently stops matching fails here.
"""

import numpy as np
import pytest
import tvm
from tvm import relax

from splitc.backend.build import coverage, pack, schedule
from splitc.passes.codegen import cpu_schedules
from splitc.passes.codegen.cpu_schedules import (
    RowSoftmax,
    conv_tile,
    matmul_tile,
    recomputes,
    register_tile,
    row_softmax,
    vector_lanes,
    vector_registers,
)

from .helpers import HOST, run_built


def conv_module(c_in, c_out, size, kernel, stride, padding, groups=1, pool=False, bias=True):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, c_in, size, size), "float32"))
    w = relax.Var("w", relax.TensorType((c_out, c_in // groups, kernel, kernel), "float32"))
    b = relax.Var("b", relax.TensorType((1, c_out, 1, 1), "float32"))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, strides=stride, padding=padding, groups=groups))
            if bias:
                y = bb.emit(relax.op.nn.relu(relax.op.add(y, b)))
            if pool:
                y = bb.emit(relax.op.nn.max_pool2d(y, pool_size=3, strides=2, padding=1))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def matmul_module(m, k, n, transpose=False):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    w = relax.Var("w", relax.TensorType((n, k) if transpose else (k, n), "float32"))
    b = relax.Var("b", relax.TensorType((n,), "float32"))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            wt = relax.op.permute_dims(w) if transpose else w
            y = bb.emit(relax.op.add(relax.op.matmul(x, wt), b))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


CONVS = {
    "3x3": (16, 16, 8, 3, 1, 1),
    "stem-3ch-stride2": (3, 16, 17, 3, 2, 1),
    "odd-channels": (12, 20, 9, 3, 1, 1),
    "1x1": (16, 24, 7, 1, 1, 0),
    "1x1-stride2": (16, 32, 8, 1, 2, 0),
    "7x7-stride2-pad3": (3, 8, 20, 7, 2, 3),
    "asymmetric-pad": (8, 8, 10, 3, 2, (0, 1, 1, 0)),
    "no-bias-output": (8, 16, 6, 3, 1, 1),
    "prime-width-partial-tile": (16, 24, 31, 3, 1, 1),
    "many-blocks-width-7": (16, 64, 7, 3, 1, 1),
}


@pytest.mark.parametrize("registers", [16, 32])
@pytest.mark.parametrize("case", list(CONVS))
def test_conv(case, registers, monkeypatch):
    """Every case with the one-block tile of 16-register CPUs and the multi-block tile of
    32-register ones (whatever this CPU has: the tile changes speed, never the answer)."""
    monkeypatch.setattr(cpu_schedules, "vector_registers", lambda _target: registers)
    c_in, c_out, size, k, s, p = CONVS[case]
    check(conv_module(c_in, c_out, size, k, s, p, bias=case != "no-bias-output"),
          expect_scheduled=1)


@pytest.mark.parametrize("channels,stride", [(24, 1), (24, 2), (12, 1), (20, 2)])
def test_depthwise(channels, stride):
    check(conv_module(channels, channels, 9, 3, stride, 1, groups=channels), expect_scheduled=1)


@pytest.mark.parametrize("registers", [16, 32])
@pytest.mark.parametrize("c_in,c_out,groups,stride", [(16, 16, 4, 1), (64, 64, 16, 2),
                                                      (16, 32, 4, 1), (48, 48, 3, 1),
                                                      (12, 18, 3, 1)])
def test_grouped_conv(c_in, c_out, groups, stride, registers, monkeypatch):
    """Grouped (ResNeXt) convolutions run packed, a block inside one group (blocks of 4 for
    4 channels per group; 16 in and 16 out per group fill a vector; 4 in and 6 out: blocks
    of 2), with the regular convolution's schedule."""
    monkeypatch.setattr(cpu_schedules, "vector_registers", lambda _target: registers)
    mod = conv_module(c_in, c_out, 9, 3, stride, 1, groups=groups)
    check(mod, expect_scheduled=1)
    assert "conv2d_NCHWc" in str(schedule(pack(mod, HOST), HOST).get_global_vars())


def test_conv_then_pool():
    check(conv_module(8, 16, 12, 3, 1, 1, pool=True), expect_scheduled=2)


@pytest.mark.parametrize("registers", [16, 32])
@pytest.mark.parametrize("m,k,n,transpose", [(1, 64, 1000, False), (1, 100, 10, True),
                                             (5, 24, 10, False), (17, 48, 96, True),
                                             (23, 12, 67, False), (31, 20, 197, True)])
def test_matmul(m, k, n, transpose, registers, monkeypatch):
    """Odd widths above 4 vectors (67, 197: attention over 197 tokens) run padded."""
    monkeypatch.setattr(cpu_schedules, "vector_registers", lambda _target: registers)
    check(matmul_module(m, k, n, transpose), expect_scheduled=1)


@pytest.mark.parametrize("shape", [(1, 1000), (4, 10), (2, 3, 7)])
def test_softmax_is_not_recomputed(shape):
    """dlight's reduction rule nests a batch-1 softmax's reductions in a parallel loop over
    its outputs (n^2 work); the guarded rule leaves such a function to its plain loops."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.softmax(x, axis=-1))
        bb.emit_func_output(out)
    mod = bb.get()
    scheduled = schedule(pack(mod, HOST), HOST)
    for _, func in scheduled.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            assert not recomputes(tvm.s_tir.Schedule(func)), func.script()
    check(mod, expect_scheduled=None)


def softmax_module(shape, axis=-1):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.softmax(x, axis=axis))
        bb.emit_func_output(out)
    return bb.get()


def test_row_softmax_pass():
    """Softmax over the last axis becomes the padded-row TE; over another axis it stays."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((3, 197), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.softmax(x, axis=-1))
            out = bb.emit_output(relax.op.nn.softmax(a, axis=0))
        bb.emit_func_output(out)
    before = bb.get()

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((3, 197), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(bb.call_te(row_softmax, x, 16, primfunc_name_hint="row_softmax"))
            out = bb.emit_output(relax.op.nn.softmax(a, axis=0))
        bb.emit_func_output(out)
    expected = bb.get()
    tvm.ir.assert_structural_equal(RowSoftmax(16)(before), expected)


@pytest.mark.parametrize("shape", [(2, 3, 197), (4, 16), (5, 7), (1, 1000)])
def test_row_softmax(shape):
    """Rows that are and are not whole vectors: the per-lane maximum and sum run as vectors
    (the padding adds nothing), and the answer is softmax's, large and -inf inputs included."""
    mod = softmax_module(shape)
    check(mod, expect_scheduled=1)
    x = np.random.default_rng(2).standard_normal(shape).astype("float32") * 30
    x.reshape(-1, shape[-1])[0, 0] = -np.inf
    x.reshape(-1, shape[-1])[-1, -1] = 80.0
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(run_built(mod, x), e / e.sum(-1, keepdims=True),
                               rtol=1e-4, atol=1e-6)
    func = next(f for _, f in schedule(pack(mod, HOST), HOST).functions_items()
                if isinstance(f, tvm.tirx.PrimFunc))
    part = func.script().split('T.sblock("row_max_part")')[0].rsplit("for ", 1)[1]
    assert "T.vectorized" in part, func.script()


@pytest.mark.parametrize("shape", [(1, 8, 14, 16), (1, 3, 5, 7)])
def test_elementwise_chain(shape):
    """A batch norm + ReLU before a concatenation (DenseNet's pattern), with no convolution to
    absorb it: vectorised over the innermost axis where it is whole vectors."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    y = relax.Var("y", relax.TensorType(shape, "float32"))
    c = relax.Var("c", relax.TensorType((1, shape[1], 1, 1), "float32"))
    with bb.function("main", [x, y, c]):
        with bb.dataflow():
            z = bb.emit(relax.op.nn.relu(relax.op.add(relax.op.divide(x, c), c)))
            out = bb.emit_output(relax.op.concat([z, y], axis=1))
        bb.emit_func_output(out)
    mod = bb.get()
    check(mod, expect_scheduled=None)
    funcs = [f for _, f in schedule(pack(mod, HOST), HOST).functions_items()
             if isinstance(f, tvm.tirx.PrimFunc)]
    assert funcs and all("tirx.is_scheduled" in f.attrs for f in funcs)
    vectorised = any("T.vectorized" in f.script() for f in funcs)
    assert vectorised == (shape[-1] % vector_lanes(HOST) == 0)


def test_matmul_tile():
    assert matmul_tile(197, 768, lanes=16, registers=32) == (5, 3, 16)   # rows padded to 200
    assert matmul_tile(197, 768, lanes=8, registers=16) == (4, 3, 8)     # 12 accumulators
    assert matmul_tile(197, 64, lanes=16, registers=32) == (8, 2, 16)    # 2 vectors divide 4
    assert matmul_tile(208, 208, lanes=16, registers=32) == (16, 1, 16)  # 13 vectors: one
    assert matmul_tile(10, 64, lanes=16, registers=32) == (5, 2, 16)     # a divisor: no padding
    assert register_tile(197, 3) == 3                  # not 1: a prime extent
    assert matmul_tile(788, 48, lanes=16, registers=32) == (4, 3, 16)    # 3 vectors, 4 rows
    assert matmul_tile(1, 10, lanes=16, registers=32) == (1, 1, 10)      # narrow: one vector


@pytest.mark.parametrize("m,n", [(197, 768), (197, 197)])
def test_matmul_tile_is_never_predicated(m, n):
    """Rows and columns that the register tile does not divide are padded: a partial tile
    predicates every FMA (197 x 192 x 768 ran at 108 GFLOP/s, padded at 240)."""
    mod = matmul_module(m, 48, n, False)
    check(mod, expect_scheduled=1)
    func = next(f for _, f in schedule(pack(mod, HOST), HOST).functions_items()
                if isinstance(f, tvm.tirx.PrimFunc))
    update = func.script().split('T.sblock("matmul_update")')[1].split("T.sblock(")[0]
    assert "T.where" not in update and "T.vectorized" in func.script()


@pytest.mark.parametrize("shape", [(1, 197, 192), (3, 5, 7)])
def test_layer_norm_rows(shape):
    """Layer norm: rows in parallel, both reductions and the scaling computed per row."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    g = relax.Var("g", relax.TensorType(shape[-1:], "float32"))
    b = relax.Var("b", relax.TensorType(shape[-1:], "float32"))
    with bb.function("main", [x, g, b]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.layer_norm(x, g, b, axes=[-1]))
        bb.emit_func_output(out)
    mod = bb.get()
    check(mod, expect_scheduled=1)
    func = next(f for _, f in schedule(pack(mod, HOST), HOST).functions_items()
                if isinstance(f, tvm.tirx.PrimFunc))
    assert "T.parallel" in func.script() and not recomputes(tvm.s_tir.Schedule(func))


def test_register_tile():
    assert register_tile(13, 12, slack=2) == 13      # whole row
    assert register_tile(56, 12) == 8                # a divisor
    assert register_tile(55, 12) == 11
    assert register_tile(31, 12) == 8                # prime: 4 tiles, the last one partial
    assert register_tile(1000, 3) == 2


def test_conv_tile():
    # AVX2, armv7: up to 6 columns x 2 blocks (a broadcast input feeds two weight vectors;
    # 12 x 1 loads 12 inputs per weight vector), as many blocks as 12 accumulators allow
    assert conv_tile(56, 4, registers=16) == (4, 2)
    assert conv_tile(56, 48, registers=16) == (4, 3)
    assert conv_tile(14, 64, registers=16) == (5, 2)   # 5 wastes one column of 14, 4 two
    assert conv_tile(13, 4, registers=16) == (5, 2)
    assert conv_tile(7, 32, registers=16) == (7, 1)
    assert conv_tile(56, 4, registers=32) == (8, 2)    # AVX-512: 8 columns x 2 blocks
    assert conv_tile(7, 32, registers=32) == (7, 2)
    assert conv_tile(7, 3, registers=32) == (7, 1)     # 2 does not divide 3 blocks
    assert conv_tile(4, 8, registers=32) == (4, 4)     # narrow rows: more blocks
    assert conv_tile(10, 4, registers=32) == (10, 1)


def test_vector_registers():
    target = tvm.target.Target
    assert vector_registers(target({"kind": "llvm", "mcpu": "znver3"})) == 16
    assert vector_registers(target({"kind": "llvm", "mcpu": "znver5"})) == 32
    assert vector_registers(target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})) == 32
    assert vector_registers(target({"kind": "llvm", "mtriple": "armv7l-linux-gnueabihf"})) == 16


def test_vector_lanes():
    target = tvm.target.Target
    assert vector_lanes(target({"kind": "llvm", "mcpu": "znver3"})) == 8
    assert vector_lanes(target({"kind": "llvm", "mcpu": "skylake-avx512"})) == 16
    # read from LLVM's features of the CPU, not from a list of names: an AVX-512 CPU the
    # list did not name (Rocket Lake) got the AVX2 schedules, 1.6x slower on ResNet-50
    assert vector_lanes(target({"kind": "llvm", "mcpu": "rocketlake"})) == 16
    assert vector_registers(target({"kind": "llvm", "mcpu": "rocketlake"})) == 32
    assert vector_lanes(target({"kind": "llvm", "mcpu": "znver3", "mattr": ["+avx512f"]})) == 16
    assert vector_lanes(target({"kind": "llvm", "mcpu": "znver5", "mattr": ["-avx512f"]})) == 8
    assert vector_lanes(target({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                "mcpu": "cortex-a72"})) == 4


def check(mod: tvm.IRModule, expect_scheduled: int | None) -> None:
    rng = np.random.default_rng(1)
    args = [rng.standard_normal([int(d) for d in p.ty.shape]).astype("float32")
            for p in mod["main"].params]
    fast = run_built(mod, *args)
    plain = run_built(mod, *args, schedules=False)
    np.testing.assert_allclose(fast, plain, rtol=1e-4, atol=1e-4)
    if expect_scheduled is not None:
        done, _ = coverage(schedule(pack(mod, HOST), HOST))
        assert len(done) == expect_scheduled, done
