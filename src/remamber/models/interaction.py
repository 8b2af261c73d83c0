"""Vision-language interactions that build the Twister's hybrid feature cube (paper Sec. 3.5).

Global interaction (Eq. 4): F~_t = Expand(ReLU(Linear(F_t^CLS))) over h x w.
Local interaction (Eq. 5): F_c = (F_i W_i) . (F_t W_t)^T, a (B, L, h, w) map of image-word
similarities, then a 3x3 conv (L -> local_dim) + GELU and a Linear (local_dim -> C) give F~_c.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GlobalInteraction", "LocalInteraction"]


class GlobalInteraction(nn.Module):
    """pooled (B, Ct) -> (B, C): Linear(Ct -> C) + ReLU. Eq. 4's Expand over h x w happens where the
    cube is built (TwisterBlock), after the LayerNorm, which commutes with the expansion."""

    def __init__(self, text_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(text_dim, dim)
        self.act = nn.ReLU()

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.act(self.proj(pooled))


class LocalInteraction(nn.Module):
    """Image map (B, C, h, w) and words (B, L, Ct) -> (F~_c (B, C, h, w), F_c (B, L, h, w)).

    W_i: Linear(C -> local_dim) + GELU on every pixel; W_t: Linear(Ct -> local_dim) + GELU on every
    word; F_c[b, l, y, x] = <W_i f_i[b, :, y, x], W_t f_t[b, l]> (Eq. 5). With `text_mask` (B, L)
    the rows of padded words are zeroed, so they cannot reach the output. Then
    Conv3x3(L -> local_dim) + GELU and Linear(local_dim -> C).
    """

    def __init__(self, dim: int, text_dim: int, max_text_len: int, local_dim: int = 512) -> None:
        super().__init__()
        self.image_proj = nn.Sequential(nn.Linear(dim, local_dim), nn.GELU())
        self.text_proj = nn.Sequential(nn.Linear(text_dim, local_dim), nn.GELU())
        self.expand = nn.Sequential(nn.Conv2d(max_text_len, local_dim, 3, padding=1), nn.GELU())
        self.out_proj = nn.Linear(local_dim, dim)
        self.max_text_len = max_text_len

    def forward(
        self, image: torch.Tensor, words: torch.Tensor, text_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if words.shape[1] != self.max_text_len:
            raise ValueError(f"local interaction expects {self.max_text_len} text tokens, got {words.shape[1]}")
        vis = self.image_proj(image.permute(0, 2, 3, 1))  # (B, h, w, local_dim)
        txt = self.text_proj(words)  # (B, L, local_dim)
        corr = torch.einsum("byxc,blc->blyx", vis, txt)  # (B, L, h, w): Eq. 5
        if text_mask is not None:
            corr = corr * text_mask[:, :, None, None].to(corr.dtype)
        feat = self.expand(corr)  # (B, local_dim, h, w)
        local = self.out_proj(feat.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C, h, w)
        return local, corr
