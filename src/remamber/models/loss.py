"""Training loss: Dice (per sample, +1 smoothing) + BCE-with-logits, 1:1, on full-resolution logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dice_bce_loss"]


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits (B, 1, H, W), target (B, 1, H, W) in {0, 1} -> scalar.

    dice_b = 1 - (2 sum(p t) + 1) / (sum p + sum t + 1) with p = sigmoid(logits), averaged over the
    batch; BCE averaged over every pixel.
    """
    if logits.shape != target.shape:
        raise ValueError(f"dice_bce_loss: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    target = target.to(logits.dtype)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return dice.mean() + bce
