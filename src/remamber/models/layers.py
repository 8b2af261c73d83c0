"""Channel-first building blocks shared by the backbone, the fusion blocks and the decoder.

Every module here takes and returns (B, C, H, W) maps. `Linear2d` subclasses `nn.Linear` so that its
weight keeps the (out, in) shape of the official VMamba checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear2d", "LayerNorm2d", "DropPath", "Mlp2d", "trunc_normal_init"]


class Linear2d(nn.Linear):
    """A per-pixel linear layer: (B, in, H, W) -> (B, out, H, W), weight (out, in)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training.

    x: (B, ...) -> (B, ...), scaled by 1 / keep_prob so the expectation is unchanged.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp2d(nn.Module):
    """Per-pixel MLP: fc1 (C -> hidden), GELU, fc2 (hidden -> C). (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear2d(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear2d(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def trunc_normal_init(module: nn.Module) -> None:
    """VMamba's default init: Linear weights ~ truncated N(0, 0.02), biases 0, LayerNorm (1, 0).

    Meant for `module.apply(...)`; parameters created by explicit initialisers (SSM dt/A/D) are
    not nn.Linear and are left alone.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
