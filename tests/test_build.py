"""splitc.backend.build: weights packed at compile time, in numpy or by TVM, give the same
answer."""

import numpy as np
import tvm
from tvm import relax

from splitc.backend import build as splitc_build

from .helpers import HOST
from .test_pack_layout import Block


def lifted_block():
    """``Block`` with its weights as trailing parameters (as extraction leaves pieces)."""
    func = Block["main"].with_attr("num_input", 1)
    return tvm.IRModule({"main": func})


def weights():
    rng = np.random.default_rng(2)
    return [rng.standard_normal([int(d) for d in p.ty.shape]).astype("float32")
            for p in Block["main"].params[1:]]


def test_numpy_and_tvm_pack_weights_alike():
    lifted = splitc_build.pack(lifted_block(), HOST)
    gv = lifted.get_global_var("main_transform_params")
    moved = splitc_build._move_data(lifted[gv], weights())
    assert moved is not None, "the packing transforms should run in numpy"
    vm = relax.VirtualMachine(tvm.compile(tvm.IRModule({gv: lifted[gv]}), HOST), tvm.cpu())
    compiled = [r.numpy() for r in vm["main_transform_params"](
        [tvm.runtime.tensor(w) for w in weights()])]
    assert [m.shape for m in moved] == [c.shape for c in compiled]
    for m, c in zip(moved, compiled, strict=True):
        np.testing.assert_array_equal(m, c)


def test_build_with_weights_equals_plain():
    x = np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype("float32")
    answers = []
    for schedules in (True, False):
        ex, packed = splitc_build.build(lifted_block(), HOST, {"main": weights()},
                                        schedules=schedules)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        args = [tvm.runtime.tensor(a) for a in [x, *packed["main"]]]
        answers.append(vm["main"](*args).numpy())
    np.testing.assert_allclose(answers[0], answers[1], rtol=1e-5, atol=1e-5)



def test_scalar_weight_stays_scalar():
    """A 0-d weight passes through the weight transform as a 0-d array (not shape (1,))."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 4, 4), "float32"))
    w = relax.Var("w", relax.TensorType((8, 8, 1, 1), "float32"))
    s = relax.Var("s", relax.TensorType((), "float32"))
    with bb.function("main", [x, w, s], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(relax.op.multiply(relax.op.nn.conv2d(x, w), s))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    rng = np.random.default_rng(4)
    xs = rng.standard_normal((1, 8, 4, 4)).astype("float32")
    ws = [rng.standard_normal((8, 8, 1, 1)).astype("float32"), np.array(2.0, "float32")]
    ex, packed = splitc_build.build(bb.get(), HOST, {"main": ws})
    assert sorted(a.ndim for a in packed["main"]) == [0, 6]  # scalar as is, kernel packed
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](
        *[tvm.runtime.tensor(a) for a in [xs, *packed["main"]]]).numpy()
    want = 2.0 * np.einsum("oi,nihw->nohw", ws[0][:, :, 0, 0], xs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
