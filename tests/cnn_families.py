"""Small CNNs of the architecture families people deploy on boards, built in code (random,
seeded weights; 32x32 inputs; widths divisible by 4 so that K = 2 and 4 branches fit):

* ``shufflenet``: ShuffleNetV2 units — channel split, depthwise convs, concat, channel
  shuffle (reshape-transpose-reshape);
* ``googlenet``: inception modules — four parallel paths concatenated;
* ``squeezenet``: SqueezeNet fire modules — squeeze, two expands concatenated;
* ``efficientnet``: MBConv with squeeze-and-excitation (SiLU, sigmoid), residual;
* ``mobilenetv3``: MobileNetV3 blocks — hardswish, SE with hardsigmoid;
* ``regnety``: RegNetY blocks — grouped convs with SE;
* ``convnext``: ConvNeXt blocks — depthwise 7x7, layer norm over channels (channels last),
  GELU, layer scale; layer-norm downsampling;
* ``groupnorm``: residual blocks with group norm.

Imported by the branch tests as ``cnn_families:NAME`` (``package.module:factory``) and
exported to ONNX and ``.pt2`` from :data:`FAMILIES`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (1, 3, 32, 32)


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups,
                                         bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: stride 1 splits the channels in two halves, stride 2 feeds both
    paths the whole input; the paths are concatenated and shuffled."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        mid = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, cin, act=None),
                                         conv_bn(cin, mid))
        path_in = cin if stride > 1 else cin // 2
        self.branch2 = nn.Sequential(conv_bn(path_in, mid), conv_bn(mid, mid, 3, stride, mid,
                                                                    act=None), conv_bn(mid, mid))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.units = nn.Sequential(ShuffleUnit(16, 32, 2), ShuffleUnit(32, 32, 1),
                                   ShuffleUnit(32, 64, 2), ShuffleUnit(64, 64, 1))
        self.last = conv_bn(64, 128)
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        x = self.last(self.units(self.pool(self.stem(x))))
        return self.fc(x.mean([2, 3]))


class Inception(nn.Module):
    """GoogLeNet's module: 1x1 | 1x1 → 3x3 | 1x1 → 3x3 | 3x3 max pool → 1x1, concatenated."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pp: int):
        super().__init__()
        self.b1 = conv_bn(cin, c1)
        self.b2 = nn.Sequential(conv_bn(cin, c3r), conv_bn(c3r, c3, 3))
        self.b3 = nn.Sequential(conv_bn(cin, c5r), conv_bn(c5r, c5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), conv_bn(cin, pp))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 3, 2), conv_bn(16, 32, 3))
        self.a = Inception(32, 8, 8, 16, 4, 8, 8)       # -> 40
        self.b = Inception(40, 16, 16, 24, 4, 12, 12)   # -> 64
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.c = Inception(64, 24, 16, 32, 8, 16, 16)   # -> 88
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(88, classes)

    def forward(self, x):
        x = self.c(self.pool(self.b(self.a(self.stem(x)))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.dropout(x))


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, e1: int, e3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.e1 = nn.Conv2d(squeeze, e1, 1)
        self.e3 = nn.Conv2d(squeeze, e3, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.e1(x)), F.relu(self.e3(x))], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1's layout: conv, pool, fire modules, a 1x1 conv classifier."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 8, 16, 16), Fire(32, 8, 16, 16), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(32, 16, 32, 32), Fire(64, 16, 32, 32))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(64, classes, 1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


class SqueezeExcite(nn.Module):
    """Global pool → 1x1 reduce → act → 1x1 expand → gate → scale the input."""

    def __init__(self, c: int, squeeze: int, act=nn.SiLU, gate=nn.Sigmoid):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)
        self.act, self.gate = act(), gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class MBConv(nn.Module):
    """EfficientNet / MnasNet's block: expand, depthwise, SE, project (+ residual)."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int, act=nn.SiLU,
                 gate=nn.Sigmoid):
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(conv_bn(cin, mid, act=act), conv_bn(mid, mid, 3, stride, mid,
                                                                      act=act),
                                  SqueezeExcite(mid, max(4, cin // 4), act, gate),
                                  conv_bn(mid, cout, act=None))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class EfficientNet(nn.Module):
    def __init__(self, classes: int = 10, act=nn.SiLU, gate=nn.Sigmoid):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2, act=act)
        self.blocks = nn.Sequential(MBConv(16, 16, 2, 1, act, gate), MBConv(16, 24, 4, 2, act,
                                                                              gate),
                                    MBConv(24, 24, 4, 1, act, gate), MBConv(24, 32, 4, 2, act,
                                                                              gate))
        self.head = conv_bn(32, 128, act=act)
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean([2, 3]))


class YBlock(nn.Module):
    """RegNetY's block: 1x1, grouped 3x3 (group width 8), SE, 1x1, residual, relu."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int = 8):
        super().__init__()
        self.a = conv_bn(cin, cout)
        self.b = conv_bn(cout, cout, 3, stride, cout // group_width)
        self.se = SqueezeExcite(cout, cin // 4, nn.ReLU, nn.Sigmoid)
        self.c = conv_bn(cout, cout, act=None)
        self.proj = (None if stride == 1 and cin == cout
                     else conv_bn(cin, cout, 1, stride, act=None))

    def forward(self, x):
        short = x if self.proj is None else self.proj(x)
        return F.relu(short + self.c(self.se(self.b(self.a(x)))))


class RegNetY(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        self.blocks = nn.Sequential(YBlock(16, 32, 2), YBlock(32, 32, 1), YBlock(32, 64, 2),
                                    YBlock(64, 64, 1))
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean([2, 3]))


class LayerNorm2d(nn.LayerNorm):
    """Layer norm over the channels of an NCHW tensor (torchvision's, for ConvNeXt)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """ConvNeXt's block: depthwise 7x7, channels-last layer norm, MLP (GELU), layer scale,
    residual."""

    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, 4), LayerNorm2d(16, eps=1e-6))
        self.stage1 = CNBlock(16)
        self.down = nn.Sequential(LayerNorm2d(16, eps=1e-6), nn.Conv2d(16, 32, 2, 2))
        self.stage2 = nn.Sequential(CNBlock(32), CNBlock(32))
        self.norm = nn.LayerNorm(32, eps=1e-6)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(self.norm(x.mean([2, 3])))


class GNBlock(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(groups, c)
        self.c2, self.n2 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(groups, c)

    def forward(self, x):
        return F.relu(x + self.n2(self.c2(F.relu(self.n1(self.c1(x))))))


class GroupNormNet(nn.Module):
    """Residual blocks with group norm: 8 groups (aligned with 2 and 4 branches) and 2
    groups (not aligned with 4)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.GroupNorm(8, 16), nn.ReLU())
        self.b1 = GNBlock(16, 8)
        self.b2 = GNBlock(16, 2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.b2(self.b1(self.stem(x))).mean([2, 3]))


def _seeded(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Non-trivial norm parameters and statistics (torch's default init otherwise), eval
    mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.LayerNorm | nn.GroupNorm):
                n = m.weight.shape
                m.weight.copy_(1.0 + 0.2 * torch.randn(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


FAMILIES = {
    "shufflenet": ShuffleNet,
    "googlenet": GoogLeNet,
    "squeezenet": SqueezeNet,
    "efficientnet": EfficientNet,
    "mobilenetv3": lambda: EfficientNet(act=nn.Hardswish, gate=nn.Hardsigmoid),
    "regnety": RegNetY,
    "convnext": ConvNeXt,
    "groupnorm": GroupNormNet,
}


def build(name: str, seed: int = 0) -> nn.Module:
    """Family ``name`` with seeded weights, in eval mode."""
    torch.manual_seed(seed)
    return _seeded(FAMILIES[name](), torch.Generator().manual_seed(seed))


def shufflenet():
    return build("shufflenet")


def googlenet():
    return build("googlenet")


def squeezenet():
    return build("squeezenet")


def efficientnet():
    return build("efficientnet")


def mobilenetv3():
    return build("mobilenetv3")


def regnety():
    return build("regnety")


def convnext():
    return build("convnext")


def groupnorm():
    return build("groupnorm")


def export_onnx(name: str, path) -> None:
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(build(name), (torch.zeros(INPUT_SHAPE),), str(path), dynamo=False,
                          input_names=["input"], output_names=["output"],
                          do_constant_folding=True, opset_version=17)


def export_pt2(name: str, path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(build(name), (torch.zeros(INPUT_SHAPE),))
    torch.export.save(ep, str(path))
