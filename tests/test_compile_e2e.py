"""Every zoo model x exact strategy x N devices: compiled per-device artifacts, run over ZeroMQ
with one worker process per device, give ONNX Runtime's answer on the original model
(max abs diff <= 1e-4 x max abs reference); the in-process runner agrees bit for bit."""

import functools

import numpy as np
import pytest

from splitc import frontend
from splitc.driver import compile_imported
from splitc.frontend import zoo
from splitc.planning import strategies
from splitc.runtime.client import connect
from splitc.runtime.local import LocalSession
from splitc.runtime.plan import Plan

from .helpers import one_per_row


@functools.cache
def tiny(name: str) -> frontend.ImportedModel:
    return frontend.load(name, tiny=True)


def compile_and_run(name, strategy, n, out):
    model = tiny(name)
    plan = compile_imported(model.mod, out, ["host"] * n, strategy,
                            source={"model": name, "tiny": True, "input_shapes": {}})
    x = model.random_inputs(seed=n)
    with connect(out) as session:  # one local worker process per device
        outputs = session.infer(*x)
    local, stats = LocalSession(out).infer(*x)
    for a, b in zip(outputs, local, strict=True):
        np.testing.assert_array_equal(a, b)
    return plan, outputs, model.reference(x), stats


EXACT = sorted(s.name for s in strategies.all_strategies() if s.exact)


# the default run takes half the pairs, in a checkerboard over models x strategies (every
# model under two strategies, every strategy on three or four models), each at one device
# count (2, 3, 4 in turn); -m slow runs the rest of the cross product
PAIRS = [(name, strategy) for name in zoo.names() for strategy in EXACT]
CHECKERBOARD = {(name, strategy) for m, name in enumerate(zoo.names())
                for s, strategy in enumerate(EXACT) if (m + s) % 2 == 0}


@pytest.mark.parametrize("name, strategy, n", one_per_row(PAIRS, [2, 3, 4], CHECKERBOARD))
def test_split_equals_onnxruntime(name, strategy, n, tmp_path):
    plan, outputs, reference, stats = compile_and_run(name, strategy, n, tmp_path / "out")
    for y, r in zip(outputs, reference, strict=True):
        assert y.shape == r.shape
        assert np.abs(y - r).max() <= 1e-4 * np.abs(r).max()
    assert stats.transfer_bytes == sum(t.nbytes for t in plan.transfers)
    assert Plan.load(tmp_path / "out") == plan  # the plan round-trips through JSON
    for d in plan.devices:
        assert (tmp_path / "out" / d.dir / "plan.json").exists()


def test_cross_compiled_artifacts_are_elf_for_their_boards(tmp_path):
    """One plan over an x86 host, a Raspberry Pi 4 (aarch64) and a PYNQ-Z1 (armv7)."""
    from splitc import targets

    model = tiny("resnet18")
    plan = compile_imported(model.mod, tmp_path / "out", ["host", "rpi4", "pynq-z1-arm"],
                            "pipeline", source={"model": "resnet18", "tiny": True,
                                                "input_shapes": {}})
    machines = {d.target: targets.elf_machine(tmp_path / "out" / d.dir / d.lib)
                for d in plan.devices}
    assert machines == {"host": "x86_64", "rpi4": "aarch64", "pynq-z1-arm": "arm"}
