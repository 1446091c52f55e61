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


def not_a_module() -> int:
    """A factory that returns the wrong thing."""
    return 42


NOT_CALLABLE = 3
