"""The importer: zoo / ONNX / .pt2 / factory → Relax, ONNX normalisation, and its errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import tvm
from onnx import TensorProto, helper
from torch import nn
from tvm import relax

from splitc import frontend
from splitc.errors import SplitcError
from splitc.frontend import onnx_import, relax_cleanup, zoo

from .helpers import run_module

TESTS = Path(__file__).parent
TARGET = {"kind": "llvm"}


# --------------------------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def zoo_cache(tmp_path_factory):
    """Zoo exports go to a private cache, not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPLITC_CACHE", str(tmp_path_factory.mktemp("splitc-cache")))
        yield


@pytest.fixture
def factories(monkeypatch):
    """Make ``factories:NAME`` importable whatever pytest's import mode."""
    monkeypatch.syspath_prepend(str(TESTS))


def run_tvm(mod: tvm.IRModule, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Compile for the host CPU and run ``main``; outputs as a list."""
    ex = tvm.compile(mod, tvm.target.Target(TARGET))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x) for x in inputs])
    if isinstance(out, tvm.runtime.Tensor):
        return [out.numpy()]
    return [o.numpy() for o in out]


def assert_close(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    """Same shapes, and max abs error ≤ 1e-4 of the reference's max abs value."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert np.abs(g - e).max() <= 1e-4 * max(np.abs(e).max(), 1e-6)


def check_against_reference(imported: frontend.ImportedModel) -> None:
    inputs = imported.random_inputs(seed=1)
    assert_close(run_tvm(imported.mod, inputs), imported.reference(inputs))


class DynamicNet(nn.Module):
    """What real exports look like: shape arithmetic that the exporter turns into
    Shape → Gather → Concat → Reshape/Resize chains and a Range over a dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv1(x)))
        y = F.interpolate(y, size=(x.shape[2] * 2, x.shape[3] * 2), mode="nearest")
        y = y + torch.arange(y.shape[-1], dtype=torch.float32) * 0.01  # position ramp
        y = F.relu(self.conv2(y)).mean(dim=(2, 3), keepdim=True)
        y = y.view(y.size(0), -1)
        return self.fc(y)


@pytest.fixture(scope="module")
def dynamic_onnx(tmp_path_factory) -> Path:
    """DynamicNet exported with dynamic batch/height/width axes."""
    torch.manual_seed(0)
    model = DynamicNet().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_(0, 0.1)
        model.bn.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("dyn") / "dynamic.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False,
                          input_names=["input"], output_names=["output"], opset_version=17,
                          dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"},
                                        "output": {0: "batch"}})
    return path


def raw_tvm_import_and_run(path: Path, shape_dict: dict | None) -> None:
    """What splitc would do without normalisation: TVM's importer on the file as exported."""
    from tvm.relax.frontend.onnx import from_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = from_onnx(onnx.load(str(path)), shape_dict=shape_dict)
    run_tvm(mod, [np.zeros(shape_dict["input"] if shape_dict else (1, 3, 16, 16), "float32")])


# --------------------------------------------------------------------------------------------
# Zoo models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_tiny_imports_and_matches_onnxruntime(name: str) -> None:
    imported = frontend.load(name, tiny=True)
    assert imported.input_names == ["input"]
    assert imported.input_shapes == [zoo.input_shape(name, tiny=True)]
    assert imported.input_dtypes == ["float32"]
    assert imported.output_names == ["output"]
    assert name in imported.source
    assert imported.path is not None and imported.path.suffix == ".onnx"
    assert not relax_cleanup.dynamic_bindings(imported.mod["main"])
    check_against_reference(imported)


def test_zoo_export_is_cached(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPLITC_CACHE", str(tmp_path))
    first = frontend.load("mlp", tiny=True)
    assert first.path.parent == tmp_path / "zoo"
    mtime = first.path.stat().st_mtime_ns
    assert frontend.load("mlp", tiny=True).path == first.path
    assert first.path.stat().st_mtime_ns == mtime, "second load reuses the export"


def test_zoo_input_shape_selects_batch_and_image_size() -> None:
    imported = frontend.load("resnet18", {"input": (2, 3, 48, 48)}, tiny=True)
    assert imported.input_shapes == [(2, 3, 48, 48)]
    check_against_reference(imported)


def test_zoo_rejects_bad_shape_and_names() -> None:
    with pytest.raises(SplitcError, match="S, S"):
        frontend.load("resnet18", {"input": (1, 3, 32)}, tiny=True)
    with pytest.raises(SplitcError, match="'x'"):
        frontend.load("resnet18", {"x": (1, 3, 32, 32)}, tiny=True)


def test_mobilenet_clip_becomes_relax_clip() -> None:
    """TVM lowers ONNX Clip (ReLU6) to call_tir; the importer turns it back into R.clip."""
    mod = frontend.load("mobilenet_v2", tiny=True).mod
    ops = {getattr(b.value.op, "name", "") for block in mod["main"].body.blocks
           for b in block.bindings if isinstance(b.value, relax.Call)}
    assert "relax.clip" in ops and "relax.call_tir" not in ops
    assert [gv.name_hint for gv in mod.functions] == ["main"]


# --------------------------------------------------------------------------------------------
# A real exported ONNX file with dynamic shapes
# --------------------------------------------------------------------------------------------


def test_dynamic_export_has_shape_arithmetic(dynamic_onnx: Path) -> None:
    ops = {n.op_type for n in onnx.load(str(dynamic_onnx)).graph.node}
    assert {"Shape", "Gather", "Concat", "Reshape", "Resize", "Range"} <= ops


def test_dynamic_export_defeats_raw_tvm(dynamic_onnx: Path) -> None:
    """Why normalisation exists. Without input shapes TVM's importer fails on the
    Shape→Concat chain feeding Resize; with pinned input shapes it imports, but Range over
    a dimension leaves a data-dependent shape that the VM cannot build."""
    with pytest.raises(Exception):  # noqa: B017 - any failure inside TVM
        raw_tvm_import_and_run(dynamic_onnx, None)
    with pytest.raises(Exception):  # noqa: B017
        raw_tvm_import_and_run(dynamic_onnx, {"input": [1, 3, 16, 16]})


def test_dynamic_export_imports_after_normalisation(dynamic_onnx: Path) -> None:
    imported = frontend.load(str(dynamic_onnx), {"input": (1, 3, 16, 16)})
    assert imported.input_shapes == [(1, 3, 16, 16)]
    assert imported.output_names == ["output"]
    check_against_reference(imported)


def test_dynamic_export_any_pinned_shape(dynamic_onnx: Path) -> None:
    imported = frontend.load(str(dynamic_onnx), {"input": (2, 3, 12, 20)})
    inputs = imported.random_inputs(seed=2)
    out = run_tvm(imported.mod, inputs)
    assert out[0].shape == (2, 10)
    assert_close(out, imported.reference(inputs))


def test_normalise_removes_shape_computation(dynamic_onnx: Path) -> None:
    model = onnx.load(str(dynamic_onnx))
    shapes, pinned = onnx_import.normalise_onnx(model, {"input": (1, 3, 16, 16)})
    assert shapes == [(1, 3, 16, 16)] and pinned is not None
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Shape", "Gather", "Concat", "Range", "Cast", "Unsqueeze", "Constant"}
    out = model.graph.output[0].type.tensor_type.shape
    assert [d.dim_value for d in out.dim] == [1, 10]


def test_unpinned_dynamic_dim_is_an_error(dynamic_onnx: Path) -> None:
    with pytest.raises(SplitcError) as err:
        frontend.load(str(dynamic_onnx))
    msg = str(err.value)
    assert "'input'" in msg and "'batch'" in msg and "'height'" in msg
    assert dynamic_onnx.name in msg


def test_wrong_rank_and_unknown_input_are_errors(dynamic_onnx: Path) -> None:
    with pytest.raises(SplitcError, match=r"'input' has rank 4.*rank 3"):
        frontend.load(str(dynamic_onnx), {"input": (1, 16, 16)})
    with pytest.raises(SplitcError, match=r"no input named 'image'.*input"):
        frontend.load(str(dynamic_onnx), {"image": (1, 3, 16, 16)})
    with pytest.raises(SplitcError, match="dimension 1 is fixed at 3"):
        frontend.load(str(dynamic_onnx), {"input": (1, 4, 16, 16)})


# --------------------------------------------------------------------------------------------
# torch sources: .pt2 and package.module:factory
# --------------------------------------------------------------------------------------------


def test_pt2_file(tmp_path, factories) -> None:
    import factories as f

    model = f.small_net()
    x = torch.randn(1, 3, 16, 16)
    path = tmp_path / "small.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    imported = frontend.load(str(path))
    assert imported.input_names == ["x"]
    assert imported.input_shapes == [(1, 3, 16, 16)]
    assert imported.output_names == ["output"]
    check_against_reference(imported)
    with torch.no_grad():
        expected = model(x).numpy()
    assert_close(run_tvm(imported.mod, [x.numpy()]), [expected])


def test_pt2_dynamic_batch_needs_a_pin(tmp_path, factories) -> None:
    import factories as f

    batch = torch.export.Dim("batch", min=1, max=8)
    ep = torch.export.export(f.small_net(), (torch.randn(2, 3, 16, 16),),
                             dynamic_shapes={"x": {0: batch}})
    path = tmp_path / "dyn.pt2"
    torch.export.save(ep, str(path))
    with pytest.raises(SplitcError, match=r"'x' has dynamic dimension"):
        frontend.load(str(path))
    imported = frontend.load(str(path), {"x": (3, 3, 16, 16)})
    assert imported.input_shapes == [(3, 3, 16, 16)]
    check_against_reference(imported)


def test_factory(factories) -> None:
    imported = frontend.load("factories:small_net", {"x": (1, 3, 16, 16)})
    assert imported.input_names == ["x"]
    assert "factories:small_net" in imported.source
    check_against_reference(imported)


def test_factory_two_inputs_two_outputs(factories) -> None:
    imported = frontend.load("factories:two_in_out", {"x": (2, 8), "y": (2, 8)})
    assert imported.input_names == ["x", "y"]
    assert imported.output_names == ["output_0", "output_1"]
    check_against_reference(imported)


def test_factory_errors(factories) -> None:
    with pytest.raises(SplitcError, match=r"give the input shape.*x"):
        frontend.load("factories:small_net")
    with pytest.raises(SplitcError, match=r"cannot import module 'no_such_module_xyz'"):
        frontend.load("no_such_module_xyz:make", {"x": (1, 3)})
    with pytest.raises(SplitcError, match=r"no attribute 'missing'"):
        frontend.load("factories:missing", {"x": (1, 3)})
    with pytest.raises(SplitcError, match="not callable"):
        frontend.load("factories:NOT_CALLABLE", {"x": (1, 3)})
    with pytest.raises(SplitcError, match="not a torch.nn.Module"):
        frontend.load("factories:not_a_module", {"x": (1, 3)})
    with pytest.raises(SplitcError, match=r"forward takes x"):
        frontend.load("factories:small_net", {"input": (1, 3, 16, 16)})


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(SplitcError, match="does not exist") as err:
        frontend.load(str(missing))
    assert str(missing) in str(err.value)


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_garbage_file(tmp_path, suffix: str) -> None:
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(SplitcError) as err:
        frontend.load(str(path))
    assert str(path) in str(err.value)


def test_unknown_model_name_lists_zoo() -> None:
    with pytest.raises(SplitcError) as err:
        frontend.load("resnet9000")
    assert "resnet9000" in str(err.value) and "resnet50" in str(err.value)


def test_tiny_only_for_zoo(dynamic_onnx: Path) -> None:
    with pytest.raises(SplitcError, match="zoo models only"):
        frontend.load(str(dynamic_onnx), {"input": (1, 3, 16, 16)}, tiny=True)


def unsupported_ops() -> list[str]:
    """Two real ONNX ops missing from TVM's converter table (checked, not assumed)."""
    table = onnx_import.tvm_onnx_ops()
    ops = [op for op in ("Celu", "Det", "ReverseSequence", "STFT") if op not in table]
    assert len(ops) >= 2
    return ops[:2]


def test_unsupported_operators_are_listed(tmp_path) -> None:
    first, second = unsupported_ops()
    assert (first, second) == ("Celu", "Det")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Celu", ["a"], ["b"]),
         helper.make_node("Det", ["b"], ["y"])],
        "unsupported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = tmp_path / "unsupported.onnx"
    onnx.save(model, str(path))
    with pytest.raises(SplitcError) as err:
        frontend.load(str(path))
    msg = str(err.value)
    assert "Celu" in msg and "Det" in msg and "Relu" not in msg and str(path) in msg


def test_tvm_failure_is_wrapped_with_file_name(tmp_path, monkeypatch) -> None:
    path = zoo.export_onnx("mlp", tmp_path / "mlp.onnx", tiny=True)

    def broken(*args, **kwargs):
        raise RuntimeError("boom inside TVM")

    import tvm.relax.frontend.onnx as tvm_onnx

    monkeypatch.setattr(tvm_onnx, "from_onnx", broken)
    with pytest.raises(SplitcError, match=r"TVM could not import .*mlp\.onnx.*boom inside TVM"):
        frontend.load(str(path))


def test_reference_checks_inputs() -> None:
    imported = frontend.load("mlp", tiny=True)
    with pytest.raises(SplitcError, match="takes 1 inputs"):
        imported.reference([])
    with pytest.raises(SplitcError, match="must have shape"):
        imported.reference([np.zeros((1, 3), "float32")])


def _conv_bn_onnx(path: Path, bn_after_conv: bool) -> Path:
    """Conv → BatchNormalization → Relu as real exporters leave it (batch norm not folded),
    or a batch norm straight on the input."""
    rng = np.random.default_rng(0)
    init = [helper.make_tensor("w", TensorProto.FLOAT, [8, 3, 3, 3],
                               rng.standard_normal(216).astype(np.float32))]
    channels = 8 if bn_after_conv else 3
    for name, lo in (("scale", 0.5), ("bias", -1.0), ("mean", -1.0), ("var", 0.5)):
        init.append(helper.make_tensor(name, TensorProto.FLOAT, [channels],
                                       rng.uniform(lo, 1.5, channels).astype(np.float32)))
    bn_in = "c" if bn_after_conv else "x"
    nodes = [helper.make_node("BatchNormalization", [bn_in, "scale", "bias", "mean", "var"],
                              ["b"], epsilon=1e-5)]
    if bn_after_conv:
        nodes.insert(0, helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", ["b"], ["y"]))
    else:
        nodes.append(helper.make_node("Conv", ["b", "w"], ["y"], pads=[1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "conv_bn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             [1, 8, 6, 6])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("bn_after_conv", [True, False])
def test_batch_norm_folds_and_leaves_no_tuple(tmp_path, bn_after_conv) -> None:
    """A batch norm after a convolution folds into its weights and a bias add; any other is
    per-channel arithmetic bound directly (no ``(y, mean, var)[0]`` for passes to trip on)."""
    model = frontend.load(str(_conv_bn_onnx(tmp_path / "m.onnx", bn_after_conv)))
    ops = []
    for binding in model.mod["main"].body.blocks[0].bindings:
        assert not isinstance(binding.value, (relax.Tuple, relax.TupleGetItem)), binding
        if isinstance(binding.value, relax.Call):
            ops.append(binding.value.op.name)
    if bn_after_conv:
        assert ops == ["relax.nn.conv2d", "relax.add", "relax.nn.relu"]
    else:
        assert "relax.nn.batch_norm" not in ops and "relax.nn.conv2d" in ops
    x = model.random_inputs()
    np.testing.assert_allclose(run_module(model.mod, *x), model.reference(x)[0],
                               rtol=1e-4, atol=1e-4)
