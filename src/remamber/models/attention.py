"""Attention-based conditioning (paper Sec. 3.6, Fig. 3b): cross-attention with the image tokens as
queries and the words as keys and values, residual on the image; then a spatial SS2D (residual),
so the variant keeps the spatial scan of the Twister and differs only in how text enters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from remamber.models.layers import LayerNorm2d
from remamber.models.ss2d import SS2D

__all__ = ["CrossAttention", "AttentionBlock", "AttentionStage"]


class CrossAttention(nn.Module):
    """image (B, C, h, w), words (B, L, Ct), key padding mask (B, L) bool (True = real word) | None
    -> (out (B, C, h, w), attention (B, heads, h*w, L))."""

    def __init__(self, dim: int, text_dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(text_dim, dim)
        self.v = nn.Linear(text_dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, image: torch.Tensor, words: torch.Tensor, text_mask: torch.Tensor | None):
        b, c, h, w = image.shape
        nh, hd = self.heads, c // self.heads
        q = self.q(image.flatten(2).transpose(1, 2)).reshape(b, h * w, nh, hd).transpose(1, 2)
        k = self.k(words).reshape(b, -1, nh, hd).transpose(1, 2)
        v = self.v(words).reshape(b, -1, nh, hd).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, heads, hw, L)
        if text_mask is not None:
            valid = text_mask | ~text_mask.any(dim=1, keepdim=True)  # an all-padding row attends to all
            scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        attn = scores.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, h * w, c)
        return self.out(out).transpose(1, 2).reshape(b, c, h, w), attn


class AttentionBlock(nn.Module):
    """img + CrossAttn(LN(img), words); then + SS2D(LN(img)). (B, C, h, w) in and out."""

    def __init__(self, dim: int, text_dim: int, head_dim: int = 64, d_state: int = 1, ssm_ratio: float = 2.0,
                 dt_rank: int | str = "auto") -> None:
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.cross_attention = CrossAttention(dim, text_dim, heads=max(1, dim // head_dim))
        self.norm2 = LayerNorm2d(dim)
        self.spatial_scan = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank)

    def forward(self, image, words, text_mask):
        attended, attn = self.cross_attention(self.norm(image), words, text_mask)
        image = image + attended
        image = image + self.spatial_scan(self.norm2(image))
        return image, attn


class AttentionStage(nn.Module):
    """`depth` attention blocks; record["attention_map"] = last block's map averaged over heads
    (B, L, h, w)."""

    def __init__(self, dim: int, text_dim: int, depth: int = 2, head_dim: int = 64, **ssm_kwargs) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [AttentionBlock(dim, text_dim, head_dim=head_dim, **ssm_kwargs) for _ in range(depth)]
        )

    def forward(self, image, words, pooled, text_mask, record=None):
        attn = None
        for block in self.blocks:
            image, attn = block(image, words, text_mask)
        if record is not None and attn is not None:
            b, _, h, w = image.shape
            record["attention_map"] = attn.mean(dim=1).transpose(1, 2).reshape(b, -1, h, w)
        return image
