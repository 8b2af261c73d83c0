"""In-context conditioning (paper Sec. 3.6, Fig. 3a): the words, projected to C, are placed before
the image tokens of every scan sequence of an SS2D; the outputs at the word positions are dropped.

Padding: with `text_mask`, padded words are moved to the front of the prefix and their scan input
set to zero. A selective scan started from the zero state stays at zero through zero inputs, so the
image outputs are exactly those of a prefix holding only the real words.
"""

from __future__ import annotations

import torch
from torch import nn

from remamber.models.layers import LayerNorm2d
from remamber.models.ss2d import SS2D
from remamber.models.ssm import directional_scan
from remamber.ops import cross_merge, cross_scan

__all__ = ["InContextBlock", "InContextStage"]


class InContextBlock(nn.Module):
    """img (B, C, h, w) + SS2D_[text; image](LN(img)) -> (B, C, h, w).

    Words (B, L, Ct) -> text_proj (Ct -> C) -> LayerNorm (the image tokens are normalised too) -> the
    SS2D's in_proj and SiLU (the 3x3 conv is 2-D and applies to the image only) -> prefix (B, D, L)
    of each of the four directions.
    """

    def __init__(self, dim: int, text_dim: int, d_state: int = 1, ssm_ratio: float = 2.0,
                 dt_rank: int | str = "auto") -> None:
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.text_norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank)

    def forward(self, image: torch.Tensor, words: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        u = self.op.project_in(self.norm(image))  # (B, D, h, w)
        b, d, h, w = u.shape
        t = self.text_norm(self.text_proj(words)).transpose(1, 2)[..., None]  # (B, C, L, 1)
        ut = self.op.act(self.op.in_proj(t))[..., 0]  # (B, D, L)
        if text_mask is not None:
            order = torch.argsort(text_mask.to(torch.int8), dim=1, stable=True)  # pads first, words in order
            keep = torch.gather(text_mask, 1, order).to(ut.dtype)
            ut = torch.gather(ut, 2, order[:, None, :].expand(-1, d, -1)) * keep[:, None, :]
        length = ut.shape[-1]
        xs = torch.cat([ut[:, None].expand(-1, 4, -1, -1), cross_scan(u)], dim=-1)  # (B, 4, D, L + hw)
        ys = directional_scan(self.op, xs)[..., length:]
        y = cross_merge(ys.contiguous(), h, w).reshape(b, d, h, w)
        return image + self.op.project_out(y)


class InContextStage(nn.Module):
    """`depth` in-context blocks. forward(image, words, pooled, text_mask, record) -> image."""

    def __init__(self, dim: int, text_dim: int, depth: int = 2, **ssm_kwargs) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([InContextBlock(dim, text_dim, **ssm_kwargs) for _ in range(depth)])

    def forward(self, image, words, pooled, text_mask, record=None):
        for block in self.blocks:
            image = block(image, words, text_mask)
        return image
