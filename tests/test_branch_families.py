"""Branch plans on every architecture family people deploy on boards (``cnn_families``:
ShuffleNetV2 units, inception, fire modules, squeeze-and-excitation, hardswish, RegNetY's
grouped convs, ConvNeXt's layer norm, group norm), imported through ONNX and torch.export:
for 2 and 4 branches, every sync point kept gives the original's answer (the branch model
run by torch and its split checked by ``splitc run --check``), no sync point sends at most a
tenth of the channel-parallel bytes, and the torch view trains through every op."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from splitc import frontend
from splitc.backend.torch_program import TorchProgram, check_trainable
from splitc.errors import SplitcError
from splitc.passes.split.branch import BranchRewrite, analyse, plan_branches
from splitc.passes.split.channel import ChannelSplit, plan_channel
from splitc.planning.extract import extract
from splitc.planning.strategies.branch import branch_split

from . import cnn_families

FAMILIES = sorted(cnn_families.FAMILIES)
#: families whose no-sync plan still keeps a whole op with K = 4 (a group norm of 2 groups)
WHOLE_AT_4 = {"groupnorm"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each family exported once per importer and imported: {(family, "onnx"|"pt2"): model}."""
    folder = tmp_path_factory.mktemp("families")
    cache = {}

    def get(name, how):
        if (name, how) not in cache:
            path = folder / f"{name}.{how}"
            (cnn_families.export_onnx if how == "onnx" else cnn_families.export_pt2)(name, path)
            cache[(name, how)] = frontend.load(str(path))
        return cache[(name, how)]

    return get


def torch_run(mod, x):
    with torch.no_grad():
        return TorchProgram(mod)(torch.from_numpy(x))[0].numpy()


@pytest.mark.parametrize("how", ["onnx", "pt2"])
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_branches_exactly_and_cheaply(models, name, how):
    model = models(name, how)
    x = np.random.default_rng(0).standard_normal(cnn_families.INPUT_SHAPE).astype("float32")
    ref = model.reference([x])[0]
    check_trainable(model.mod)  # the teacher trains: every op has a torch implementation
    for k in (2, 4):
        ana = analyse(model.mod, k)
        exact = plan_branches(model.mod, k, "all", analysis=ana)
        assert not exact.branched
        got = torch_run(BranchRewrite(exact)(model.mod), x)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), (k, name, how)
        none = plan_branches(model.mod, k, "none", analysis=ana)
        assert none.branched, (k, "nothing to cut")
        student = BranchRewrite(none)(model.mod)
        check_trainable(student)
        channel = extract(ChannelSplit(plan_channel(model.mod, k))(model.mod)).transfer_bytes
        branch = extract(branch_split(model.mod, none)).transfer_bytes
        if not (k == 4 and name in WHOLE_AT_4):
            assert branch <= 0.1 * channel, (k, branch, channel)


def test_the_student_trains_through_layer_norm_and_gelu(models):
    """Gradients reach every weight of a ConvNeXt branch model (layer norm, GELU, layer
    scale, depthwise convs), and distillation moves it towards the teacher."""
    from splitc.planning.distill import distill

    model = models("convnext", "pt2")
    plan = plan_branches(model.mod, 2, "none")
    student = TorchProgram(BranchRewrite(plan)(model.mod))
    x = np.random.default_rng(1).standard_normal((120, 3, 32, 32)).astype("float32")
    out = student(torch.from_numpy(x[:4]))[0]
    out.square().sum().backward()
    trained = [p for p in student.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    report = distill(TorchProgram(model.mod), student, x, epochs=3,
                     log=lambda _m: None)
    assert report.metric == "top-1 agreement with the teacher"  # no labels: soft targets


def test_an_op_torch_cannot_train_is_named_before_training():
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.cumsum(x, axis=1), name_hint="y")
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    mod = bb.get()
    with pytest.raises(SplitcError, match=r"cannot train through cumsum \(binding y\)"):
        check_trainable(mod)
    assert isinstance(mod, tvm.IRModule)


def splitc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "splitc.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=900, cwd=cwd)


@pytest.mark.parametrize(("name", "how", "k"), [
    pytest.param("shufflenet", "onnx", 2, marks=pytest.mark.slow), ("convnext", "pt2", 4)])
def test_cli_compile_sync_all_runs_and_checks(tmp_path, name, how, k):
    """``splitc compile --strategy branch --sync all``, then ``run --check``: the split gives
    the branch model's answer, and the branch model is the original's."""
    path = tmp_path / f"{name}.{how}"
    (cnn_families.export_onnx if how == "onnx" else cnn_families.export_pt2)(name, path)
    out = tmp_path / "out"
    done = splitc("compile", path, "--strategy", "branch", "--sync", "all", "--devices",
                  ",".join(["host"] * k), "-o", out)
    assert done.returncode == 0, done.stderr
    x = np.random.default_rng(3).standard_normal(cnn_families.INPUT_SHAPE).astype("float32")
    np.save(tmp_path / "x.npy", x)
    check = splitc("run", out, "--check", "--input", tmp_path / "x.npy", "--output",
                   tmp_path / "y.npy")
    assert check.returncode == 0, check.stderr + check.stdout
    assert "the split gives the branch model's answer" in check.stdout
    ref = frontend.load(str(path)).reference([x])[0]
    got = np.load(tmp_path / "y.npy")
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["onnx", "pt2"])
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("k", [2, 4])
def test_cli_every_family_compiles_and_checks(tmp_path, name, how, k):
    path = tmp_path / f"{name}.{how}"
    (cnn_families.export_onnx if how == "onnx" else cnn_families.export_pt2)(name, path)
    out = tmp_path / "out"
    done = splitc("compile", path, "--strategy", "branch", "--sync", "all", "--devices",
                  ",".join(["host"] * k), "-o", out)
    assert done.returncode == 0, done.stderr
    check = splitc("run", out, "--check")
    assert check.returncode == 0, check.stderr + check.stdout


def test_families_module_is_importable_as_a_factory(models):
    """The families double as ``package.module:factory`` models (torch.export in-process)."""
    here = str(Path(__file__).parent)
    sys.path.insert(0, here)
    try:
        model = frontend.load("cnn_families:squeezenet", {"x": cnn_families.INPUT_SHAPE})
    finally:
        sys.path.remove(here)
    assert plan_branches(model.mod, 2, "none").branched


def test_explain_shows_what_a_branch_plan_saves(models):
    """``plan --explain``'s last lines: the branch plan's bytes against the channel plan and
    the exact split that sends the fewest."""
    from splitc.planning.cluster import Cluster
    from splitc.planning.cost import DeviceSpeed
    from splitc.planning.search import branch_savings, search

    model = models("efficientnet", "onnx")
    cluster = Cluster.uniform(["host", "host"])
    result = search(model.mod, cluster, [DeviceSpeed(1e9, 1e-4, "test")] * 2)
    text = branch_savings(model.mod, result)
    channel = next(c for c in result.candidates if c.strategy == "channel")
    none = extract(branch_split(model.mod, plan_branches(model.mod, 2, "none"))).transfer_bytes
    assert f"{none:,} bytes per inference with no sync point" in text
    fewer = (1 - none / channel.estimate.transfer_bytes) * 100
    assert f"vs the channel plan (channel over all): {channel.estimate.transfer_bytes:,} " \
           f"bytes -> {fewer:.1f} % fewer" in text
    assert "vs the exact split sending the fewest" in text
