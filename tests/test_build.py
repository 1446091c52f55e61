"""splitc.build: weights packed at compile time, in numpy or by TVM, give the same answer."""

import numpy as np
import tvm
from tvm import relax

from splitc import build as splitc_build

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

