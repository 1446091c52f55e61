"""A model zoo built in code: torchvision-faithful CNNs, a small ViT and an MLP, no downloads.

Every model is written here in plain torch (torchvision is not importable in splitc's
environment) with the same block structure, depths and group counts as the torchvision
original at width 1.0, 1000 classes and 224x224 input. A ``width`` multiplier and an
``image_size`` give *tiny* variants with the same topology for tests: same number of blocks,
same block kinds, same ResNeXt group count, only narrower and on smaller images.

Weights are random but deterministic (``seed``). BatchNorm layers get seeded, non-trivial
running statistics and affine parameters so that folding BN into the convolutions is
exercised for real. Models are returned in ``eval()`` mode.

Examples
--------
>>> from splitc import zoo
>>> model = zoo.build("resnet50", tiny=True)          # width 1/8, 32x32, 10 classes
>>> zoo.input_shape("resnet50", tiny=True)
(1, 3, 32, 32)
>>> zoo.export_onnx("resnet50", "/tmp/r50.onnx", tiny=True)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from splitc.errors import SplitcError

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def scale_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded to the nearest integer, at least 1."""
    return max(1, int(round(channels * width)))


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding for MobileNet: nearest multiple of ``divisor``.

    Never rounds down by more than 10 % and never returns less than ``divisor``.
    """
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def conv_bn_act(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv (no bias, "same" padding) → BatchNorm → activation, as torchvision's
    ``Conv2dNormActivation``."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------
# ResNet / ResNeXt (torchvision.models.resnet)
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1,
                 group_width: int | None = None) -> None:
        super().__init__()
        if groups != 1:
            raise ValueError("BasicBlock only supports groups=1")
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce → 3x3 (grouped for ResNeXt, strided) → 1x1 expand, with a residual."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1,
                 group_width: int | None = None) -> None:
        super().__init__()
        width = (group_width if group_width is not None else planes) * groups
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet/ResNeXt with a width multiplier.

    Parameters
    ----------
    block : type
        :class:`BasicBlock` or :class:`Bottleneck`.
    layers : sequence of int
        Blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
    width : float
        Multiplier on every channel count (stem, planes, ResNeXt group width).
    num_classes : int
        Size of the final linear layer.
    groups, width_per_group : int
        ResNeXt cardinality and per-group width at width 1.0 (32 and 4 for ResNeXt-50 32x4d).
        The group count never changes with ``width``; each group keeps at least one channel.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: Sequence[int], *,
                 width: float = 1.0, num_classes: int = 1000, groups: int = 1,
                 width_per_group: int = 64) -> None:
        super().__init__()
        self.block = block
        self.groups = groups
        self.width_per_group = width_per_group
        self.width = width
        self.in_ch = scale_channels(64, width)
        self.conv1 = nn.Conv2d(3, self.in_ch, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, layers[0], 1)
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.in_ch, num_classes)

    def _make_layer(self, base_planes: int, blocks: int, stride: int) -> nn.Sequential:
        planes = scale_channels(base_planes, self.width)
        # torchvision: width = int(planes * width_per_group / 64) * groups
        group_width = scale_channels(base_planes * self.width_per_group / 64, self.width)
        out_ch = planes * self.block.expansion
        downsample = None
        if stride != 1 or self.in_ch != out_ch:
            downsample = nn.Sequential(nn.Conv2d(self.in_ch, out_ch, 1, stride, bias=False),
                                       nn.BatchNorm2d(out_ch))
        layers = []
        for i in range(blocks):
            layers.append(self.block(self.in_ch, planes, stride if i == 0 else 1,
                                     downsample if i == 0 else None, self.groups, group_width))
            self.in_ch = out_ch
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(*, width: float = 1.0, num_classes: int = 1000, **_: Any) -> ResNet:
    """ResNet-18: BasicBlock x (2, 2, 2, 2)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), width=width, num_classes=num_classes)


def resnet50(*, width: float = 1.0, num_classes: int = 1000, **_: Any) -> ResNet:
    """ResNet-50: Bottleneck x (3, 4, 6, 3)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), width=width, num_classes=num_classes)


def resnext50_32x4d(*, width: float = 1.0, num_classes: int = 1000, **_: Any) -> ResNet:
    """ResNeXt-50 32x4d: Bottleneck x (3, 4, 6, 3), 32 groups of 4 channels at width 1."""
    return ResNet(Bottleneck, (3, 4, 6, 3), width=width, num_classes=num_classes, groups=32,
                  width_per_group=4)


# --------------------------------------------------------------------------------------------
# MobileNetV2 (torchvision.models.mobilenetv2)
# --------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) → 3x3 depthwise (ReLU6) → 1x1 linear project, residual if shapes
    allow."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_act(in_ch, hidden, 1, act=nn.ReLU6))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (``width_mult``, channels rounded to multiples of 8)."""

    #: expansion t, output channels c, repeats n, first stride s
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, *, width: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        in_ch = make_divisible(32 * width)
        self.last_channel = make_divisible(1280 * max(1.0, width))
        features: list[nn.Module] = [conv_bn_act(3, in_ch, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in self.SETTINGS:
            out_ch = make_divisible(c * width)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features.append(conv_bn_act(in_ch, self.last_channel, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2),
                                        nn.Linear(self.last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(*, width: float = 1.0, num_classes: int = 1000, **_: Any) -> MobileNetV2:
    """MobileNetV2 with 17 inverted-residual blocks."""
    return MobileNetV2(width=width, num_classes=num_classes)


# --------------------------------------------------------------------------------------------
# VGG-16 (torchvision.models.vgg, configuration "D", no BatchNorm)
# --------------------------------------------------------------------------------------------


class VGG(nn.Module):
    """torchvision's VGG with a width multiplier on convs and the classifier's hidden layers.

    torchvision pools the features to 7x7, which is the feature size at 224x224 (an identity
    there). Here the pool size is the feature size at any ``image_size``
    (``image_size // 32``), so smaller images keep that identity pool instead of upsampling.
    """

    CFG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
             "M")

    def __init__(self, *, width: float = 1.0, num_classes: int = 1000,
                 image_size: int = 224) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in self.CFG_D:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out_ch = scale_channels(int(v), width)
                layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU(inplace=True)]
                in_ch = out_ch
        self.features = nn.Sequential(*layers)
        pool = max(1, image_size // 32)
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        hidden = scale_channels(4096, width)
        self.classifier = nn.Sequential(
            nn.Linear(in_ch * pool * pool, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg16(*, width: float = 1.0, num_classes: int = 1000, image_size: int = 224,
          **_: Any) -> VGG:
    """VGG-16: 13 3x3 convs in 5 stages, 3 linear layers."""
    return VGG(width=width, num_classes=num_classes, image_size=image_size)


# --------------------------------------------------------------------------------------------
# A small ViT
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention written out (qkv linear, softmax(q kᵀ / √d) v, projection)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(),
                                 nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small Vision Transformer: conv patch embedding, class token, learned position
    embedding, ``depth`` pre-norm blocks, final LayerNorm, linear head on the class token.

    At width 1.0: embedding 192, 4 heads, 4 blocks, MLP ratio 4, patch 16 (DeiT-Tiny's width
    with fewer blocks; 4 heads so attention splits evenly over up to 4 devices).
    """

    def __init__(self, *, width: float = 1.0, num_classes: int = 1000, image_size: int = 224,
                 patch_size: int = 16, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        if image_size % patch_size:
            raise SplitcError(f"vit_tiny: image size {image_size} is not a multiple of the "
                              f"patch size {patch_size}")
        dim = heads * scale_channels(192 // heads, width)
        self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        num_patches = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny(*, width: float = 1.0, num_classes: int = 1000, image_size: int = 224,
             patch_size: int = 16, **_: Any) -> ViT:
    """The small ViT (4 blocks)."""
    return ViT(width=width, num_classes=num_classes, image_size=image_size,
               patch_size=patch_size)


# --------------------------------------------------------------------------------------------
# A small MLP
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Linear → ReLU → Linear → ReLU → Linear on a flat feature vector."""

    def __init__(self, *, in_features: int = 512, width: float = 1.0,
                 num_classes: int = 1000) -> None:
        super().__init__()
        hidden = scale_channels(2048, width)
        self.layers = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(),
                                    nn.Linear(hidden, hidden), nn.ReLU(),
                                    nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def mlp(*, width: float = 1.0, num_classes: int = 1000, in_features: int = 512,
        **_: Any) -> MLP:
    """The MLP: ``in_features`` → 2048·width → 2048·width → classes."""
    return MLP(in_features=in_features, width=width, num_classes=num_classes)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """How to build one zoo model.

    Attributes
    ----------
    name : str
        Registry name.
    factory : callable
        ``factory(width=, num_classes=, image_size=, **extra) -> nn.Module``.
    tiny : dict
        The tiny preset: ``width``, ``image_size``, ``num_classes`` and architecture extras
        (e.g. ``patch_size``) that :func:`build` uses with ``tiny=True``.
    image_size : int
        Default input height and width (224). ``None`` for models on flat vectors.
    extra : dict
        Architecture options of the full-size model (e.g. ``in_features`` of the MLP).
    description : str
        One line for listings.
    """

    name: str
    factory: Callable[..., nn.Module]
    tiny: dict[str, Any]
    image_size: int | None = 224
    extra: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def is_image(self) -> bool:
        """Whether the input is an NCHW image (else a flat ``(batch, features)`` vector)."""
        return self.image_size is not None


#: Tiny presets: same topology, every conv/linear that has ≥ 64 outputs at full size keeps
#: ≥ 8 here, 32x32 inputs, 10 classes.
TINY: dict[str, dict[str, Any]] = {
    "resnet18": dict(width=0.125, image_size=32, num_classes=10),
    "resnet50": dict(width=0.125, image_size=32, num_classes=10),
    "resnext50_32x4d": dict(width=0.25, image_size=32, num_classes=10),
    "mobilenet_v2": dict(width=0.25, image_size=32, num_classes=10),
    "vgg16": dict(width=0.125, image_size=32, num_classes=10),
    "vit_tiny": dict(width=0.25, image_size=32, num_classes=10, patch_size=8),
    "mlp": dict(width=0.125, num_classes=10, in_features=64),
}

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("resnet18", resnet18, TINY["resnet18"],
                  description="ResNet-18 (BasicBlock x 2,2,2,2)"),
        ModelSpec("resnet50", resnet50, TINY["resnet50"],
                  description="ResNet-50 (Bottleneck x 3,4,6,3)"),
        ModelSpec("resnext50_32x4d", resnext50_32x4d, TINY["resnext50_32x4d"],
                  description="ResNeXt-50 32x4d (grouped Bottleneck x 3,4,6,3, 32 groups)"),
        ModelSpec("mobilenet_v2", mobilenet_v2, TINY["mobilenet_v2"],
                  description="MobileNetV2 (17 inverted residuals, depthwise convs)"),
        ModelSpec("vgg16", vgg16, TINY["vgg16"],
                  description="VGG-16 (13 convs, 3 linears, no BN)"),
        ModelSpec("vit_tiny", vit_tiny, TINY["vit_tiny"], extra={"patch_size": 16},
                  description="small ViT (patch 16, dim 192, 4 heads, 4 blocks)"),
        ModelSpec("mlp", mlp, TINY["mlp"], image_size=None, extra={"in_features": 512},
                  description="MLP (512 -> 2048 -> 2048 -> classes, ReLU)"),
    )
}


def names() -> list[str]:
    """Names of the zoo models, sorted."""
    return sorted(MODELS)


def get(name: str) -> ModelSpec:
    """The spec of model ``name``, or a :class:`SplitcError` listing the known names."""
    try:
        return MODELS[name]
    except KeyError:
        raise SplitcError(f"unknown zoo model {name!r}; known models: "
                          f"{', '.join(names())}") from None


@dataclass(frozen=True)
class Config:
    """The resolved options of one build: what ``build`` passes to the factory."""

    width: float
    image_size: int | None
    num_classes: int
    extra: dict[str, Any]


def resolve(name: str, *, tiny: bool = False, width: float | None = None,
            image_size: int | None = None, num_classes: int | None = None) -> Config:
    """Merge explicit options over the tiny preset (``tiny=True``) or the full-size defaults.

    ``image_size`` is ignored for models on flat vectors (``mlp``).
    """
    spec = get(name)
    preset = dict(spec.tiny) if tiny else {}
    extra = dict(spec.extra)
    extra.update({k: v for k, v in preset.items()
                  if k not in ("width", "image_size", "num_classes")})
    size = None
    if spec.is_image:
        size = image_size or preset.get("image_size") or spec.image_size
        if size < 32:
            raise SplitcError(f"{name}: image size {size} is too small (at least 32)")
    resolved_width = width if width is not None else preset.get("width", 1.0)
    if resolved_width <= 0:
        raise SplitcError(f"{name}: width must be positive, got {resolved_width}")
    return Config(width=resolved_width, image_size=size,
                  num_classes=num_classes or preset.get("num_classes", 1000), extra=extra)


def init_weights(model: nn.Module) -> None:
    """Seeded, non-trivial initialisation from the global torch RNG (caller seeds it).

    Convs: Kaiming normal (fan-out, as torchvision) with small random biases. Linears: torch's
    default uniform init. BatchNorm: weight U(0.5, 1.5), bias N(0, 0.1), running mean
    N(0, 0.1), running variance U(0.5, 2): BN is far from identity and stays non-trivial when
    folded. LayerNorm: weight U(0.5, 1.5), bias N(0, 0.1). ViT tokens: N(0, 0.02).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.normal_(m.bias, 0.0, 0.05)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.1)
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.1)
        elif isinstance(m, ViT):
            nn.init.normal_(m.cls_token, 0.0, 0.02)
            nn.init.normal_(m.pos_embed, 0.0, 0.02)


def build(name: str, *, tiny: bool = False, width: float | None = None,
          image_size: int | None = None, num_classes: int | None = None,
          seed: int = 0) -> nn.Module:
    """Build zoo model ``name`` with deterministic random weights, in ``eval()`` mode.

    Parameters
    ----------
    name : str
        A name from :func:`names`.
    tiny : bool
        Start from the model's :data:`TINY` preset instead of the full-size defaults.
    width : float, optional
        Channel multiplier (overrides the preset).
    image_size : int, optional
        Input height and width (overrides the preset; ignored by ``mlp``).
    num_classes : int, optional
        Classifier size (overrides the preset).
    seed : int
        Weight seed; the global torch RNG state is left untouched.

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    SplitcError
        Unknown name (the message lists the known ones) or impossible options.
    """
    spec = get(name)
    cfg = resolve(name, tiny=tiny, width=width, image_size=image_size, num_classes=num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kwargs = dict(width=cfg.width, num_classes=cfg.num_classes, **cfg.extra)
        if cfg.image_size is not None:
            kwargs["image_size"] = cfg.image_size
        model = spec.factory(**kwargs)
        init_weights(model)
    return model.eval()


def input_shape(name: str, *, tiny: bool = False, image_size: int | None = None,
                batch: int = 1) -> tuple[int, ...]:
    """Input shape of model ``name``: ``(batch, 3, S, S)``, or ``(batch, features)`` for ``mlp``.
    """
    spec = get(name)
    cfg = resolve(name, tiny=tiny, image_size=image_size)
    if spec.is_image:
        return (batch, 3, cfg.image_size, cfg.image_size)
    return (batch, int(cfg.extra["in_features"]))


def example_input(name: str, *, tiny: bool = False, image_size: int | None = None,
                  batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A seeded standard-normal input of :func:`input_shape`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(input_shape(name, tiny=tiny, image_size=image_size, batch=batch),
                       generator=gen)


def export_onnx(name: str, path: str | Path, *, tiny: bool = False,
                image_size: int | None = None, opset: int = 17, batch: int = 1) -> Path:
    """Export zoo model ``name`` (seed 0) to ONNX with static shapes.

    Uses the TorchScript exporter (``dynamo=False``) with constant folding, which folds
    BatchNorm into the preceding convolution. The input is named ``input`` and the output
    ``output``.

    Parameters
    ----------
    name : str
        A name from :func:`names`.
    path : str or Path
        Where to write the ``.onnx`` file (parent folders are created).
    tiny, image_size
        As for :func:`build`.
    opset : int
        ONNX opset version.
    batch : int
        The (static) batch size of the exported input.

    Returns
    -------
    Path
        ``path``.
    """
    model = build(name, tiny=tiny, image_size=image_size)
    x = example_input(name, tiny=tiny, image_size=image_size, batch=batch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"],
                          output_names=["output"], do_constant_folding=True,
                          opset_version=opset)
    return path


def num_params(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(math.prod(p.shape) for p in model.parameters())
