"""The model zoo: topology faithful to torchvision, tiny variants, deterministic weights, ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from splitc.errors import SplitcError
from splitc.frontend import zoo

ALL = zoo.names()

#: torchvision's parameter counts at width 1.0, 1000 classes (torchvision.models.*).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "resnext50_32x4d": 25_028_904,
    "mobilenet_v2": 3_504_872,
    "vgg16": 138_357_544,
}


def full_on_meta(name: str) -> nn.Module:
    """The full-size model with storage-free (meta) weights: cheap even for VGG-16."""
    spec = zoo.MODELS[name]
    cfg = zoo.resolve(name)
    kwargs = dict(width=cfg.width, num_classes=cfg.num_classes, **cfg.extra)
    if cfg.image_size:
        kwargs["image_size"] = cfg.image_size
    with torch.device("meta"):
        return spec.factory(**kwargs)


def layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


def out_size(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def same_conv_kind(small: nn.Module, big: nn.Module) -> bool:
    """Both plain, both depthwise, or the same group count (ResNeXt keeps 32 groups even where
    that leaves one channel per group)."""
    if not isinstance(big, nn.Conv2d):
        return True
    if big.groups == big.in_channels > 1:
        return small.groups == small.in_channels
    return small.groups == big.groups


def test_registry() -> None:
    assert ALL == sorted(["resnet18", "resnet50", "resnext50_32x4d", "mobilenet_v2", "vgg16",
                          "vit_tiny", "mlp"])
    assert set(zoo.MODELS) == set(ALL) == set(zoo.TINY)


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(SplitcError) as err:
        zoo.build("resnet1000")
    assert "resnet1000" in str(err.value)
    for name in ALL:
        assert name in str(err.value)
    with pytest.raises(SplitcError):
        zoo.input_shape("nope")


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_full_size_matches_torchvision_param_count(name: str) -> None:
    assert zoo.num_params(full_on_meta(name)) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name", ALL)
def test_tiny_keeps_topology_and_width_floor(name: str) -> None:
    full, tiny = layers(full_on_meta(name)), layers(zoo.build(name, tiny=True))
    assert list(full) == list(tiny), "same layers in the same order"
    for layer, big in full.items():
        small = tiny[layer]
        assert type(small) is type(big)
        assert same_conv_kind(small, big), layer
        if out_size(big) >= 64:
            assert out_size(small) >= 8, layer


def test_resnext_keeps_32_groups() -> None:
    convs = [m for m in zoo.build("resnext50_32x4d", tiny=True).modules()
             if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(convs) == 16  # one grouped 3x3 per bottleneck: 3 + 4 + 6 + 3
    assert all(m.groups == 32 and m.in_channels >= 32 for m in convs)


@pytest.mark.parametrize("name", ALL)
def test_tiny_builds_and_runs(name: str) -> None:
    model = zoo.build(name, tiny=True)
    assert not model.training
    x = zoo.example_input(name, tiny=True)
    assert tuple(x.shape) == zoo.input_shape(name, tiny=True)
    with torch.no_grad():
        y = model(x)
    assert tuple(y.shape) == (1, 10)
    assert torch.isfinite(y).all() and y.abs().max() > 1e-3


def test_input_shapes() -> None:
    assert zoo.input_shape("resnet50") == (1, 3, 224, 224)
    assert zoo.input_shape("resnet50", tiny=True) == (1, 3, 32, 32)
    assert zoo.input_shape("vgg16", tiny=True, image_size=64, batch=2) == (2, 3, 64, 64)
    assert zoo.input_shape("mlp") == (1, 512)
    assert zoo.input_shape("mlp", tiny=True) == (1, 64)


def test_overrides() -> None:
    model = zoo.build("resnet18", width=0.25, image_size=64, num_classes=7)
    assert model.conv1.out_channels == 16
    with torch.no_grad():
        assert tuple(model(torch.zeros(1, 3, 64, 64)).shape) == (1, 7)


def test_deterministic_weights_and_nontrivial_batchnorm() -> None:
    a, b = zoo.build("resnet18", tiny=True), zoo.build("resnet18", tiny=True)
    c = zoo.build("resnet18", tiny=True, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])
    bn = a.bn1
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))


def test_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zoo.build("mlp", tiny=True)
    assert torch.equal(torch.rand(3), expected)


def test_vit_rejects_image_not_multiple_of_patch() -> None:
    with pytest.raises(SplitcError, match="patch"):
        zoo.build("vit_tiny", tiny=True, image_size=36)


@pytest.mark.parametrize("name", ALL)
def test_onnx_export_matches_torch(name: str, tmp_path) -> None:
    import onnxruntime as ort

    path = zoo.export_onnx(name, tmp_path / f"{name}.onnx", tiny=True)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert tuple(dims) == zoo.input_shape(name, tiny=True), "static input shape"
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}, "BN folded"

    x = zoo.example_input(name, tiny=True, seed=1)
    with torch.no_grad():
        expected = zoo.build(name, tiny=True)(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
