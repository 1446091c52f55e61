"""Small torch models for the ``package.module:factory`` and ``.pt2`` import paths.

Imported by the importer tests as ``factories:NAME`` (this folder is put on ``sys.path``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallNet(nn.Module):
    """Conv → BN → ReLU → conv (stride 2) → global mean → linear: one input, one output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv1(x)))
        y = F.relu(self.conv2(y)).mean(dim=(2, 3))
        return self.fc(y)


class TwoInOut(nn.Module):
    """Two inputs, two outputs (a tuple)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.fc(x)) + y
        return h, h.sum(dim=-1)


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class ResidualNet(nn.Module):
    """Six residual blocks between a stem and a hardswish head: its torch import repeats
    binding names (``lv5`` twice...)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(*[_Block(8) for _ in range(6)])
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(F.hardswish(x).mean((2, 3)))


class SkipNet(nn.Module):
    """A small U-Net-like detector: an encoder whose every level's output skips to the
    decoder, most of the FLOPs late (full-resolution decoder convolutions), a sigmoid map out.
    Few places to cut cross one tensor, and those are badly balanced."""

    def __init__(self) -> None:
        super().__init__()
        self.e1, self.e2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, 2, 1)
        self.e3 = nn.Conv2d(16, 16, 3, 2, 1)
        self.d2 = nn.Conv2d(32, 16, 3, padding=1)
        self.d1 = nn.Conv2d(24, 24, 3, padding=1)
        self.d0 = nn.Conv2d(24, 24, 3, padding=1)
        self.head = nn.Conv2d(24, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.e1(x))
        b = F.relu(self.e2(a))
        c = F.relu(self.e3(b))
        u = F.interpolate(c, scale_factor=2.0, mode="nearest")
        d = F.relu(self.d2(torch.cat([u, b], 1)))
        d = F.interpolate(d, scale_factor=2.0, mode="nearest")
        d = F.relu(self.d1(torch.cat([d, a], 1)))
        d = F.relu(self.d0(d))
        return torch.sigmoid(self.head(d))


def _seeded(model: nn.Module) -> nn.Module:
    """Deterministic weights and non-trivial BatchNorm statistics, in eval mode."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def small_net() -> nn.Module:
    """A seeded :class:`SmallNet`."""
    return _seeded(SmallNet())


def two_in_out() -> nn.Module:
    """A seeded :class:`TwoInOut`."""
    return _seeded(TwoInOut())


def residual_net() -> nn.Module:
    """A seeded :class:`ResidualNet`."""
    return _seeded(ResidualNet())


def skip_net() -> nn.Module:
    """A seeded :class:`SkipNet`."""
    return _seeded(SkipNet())


def not_a_module() -> int:
    """A factory that returns the wrong thing."""
    return 42


NOT_CALLABLE = 3
