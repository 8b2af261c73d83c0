"""Norm adaptation (paper Sec. 3.6, Fig. 3c): FiLM. The pooled sentence vector F_t^CLS is mapped by
a Linear to a scale and a shift of the LayerNorm in front of a spatial SS2D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from remamber.models.ss2d import SS2D

__all__ = ["FiLMLayerNorm2d", "NormAdaptationBlock", "NormAdaptationStage"]


class FiLMLayerNorm2d(nn.Module):
    """x (B, C, h, w), pooled (B, Ct) -> LN(x) * (1 + gamma) + beta, (gamma, beta) = Linear(pooled).

    The LayerNorm has no affine of its own: FiLM provides it (identity at gamma = beta = 0).
    """

    def __init__(self, dim: int, text_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.film = nn.Linear(text_dim, 2 * dim)
        nn.init.trunc_normal_(self.film.weight, std=0.02)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x.permute(0, 2, 3, 1), (self.dim,), eps=self.eps).permute(0, 3, 1, 2)
        gamma, beta = self.film(pooled).chunk(2, dim=-1)  # (B, C) each
        return normed * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]


class NormAdaptationBlock(nn.Module):
    """img + SS2D(FiLM-LN(img, pooled)). (B, C, h, w) in and out."""

    def __init__(self, dim: int, text_dim: int, d_state: int = 1, ssm_ratio: float = 2.0,
                 dt_rank: int | str = "auto") -> None:
        super().__init__()
        self.norm = FiLMLayerNorm2d(dim, text_dim)
        self.spatial_scan = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank)

    def forward(self, image: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return image + self.spatial_scan(self.norm(image, pooled))


class NormAdaptationStage(nn.Module):
    """`depth` FiLM blocks. forward(image, words, pooled, text_mask, record) -> image."""

    def __init__(self, dim: int, text_dim: int, depth: int = 2, **ssm_kwargs) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([NormAdaptationBlock(dim, text_dim, **ssm_kwargs) for _ in range(depth)])

    def forward(self, image, words, pooled, text_mask, record=None):
        for block in self.blocks:
            image = block(image, pooled)
        return image
