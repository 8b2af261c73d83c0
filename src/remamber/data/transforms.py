"""Square resize and ImageNet normalisation with PIL and torch only (no torchvision: it would replace the
pinned CPU torch with a CUDA build; docs/design.md, section 2)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (x / 255 - mean) / std folded into one multiply-add per channel
_SCALE = np.array([1.0 / (255.0 * s) for s in IMAGENET_STD], dtype=np.float32).reshape(3, 1, 1)
_SHIFT = np.array([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], dtype=np.float32).reshape(3, 1, 1)


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """PIL image -> float32 (3, R, R): RGB, bilinear square resize, ImageNet mean/std."""
    image = image.convert("RGB").resize((resolution, resolution), Image.BILINEAR)
    chw = np.asarray(image).transpose(2, 0, 1).astype(np.float32, order="C")  # (3, R, R), a fresh copy
    chw *= _SCALE
    chw += _SHIFT
    return torch.from_numpy(chw)  # numpy, not torch ops: no intra-op thread pool inside DataLoader workers


def mask_to_tensor(mask: np.ndarray, resolution: int) -> torch.Tensor:
    """bool (H, W) -> float32 (1, R, R) in {0, 1}, nearest-neighbour square resize."""
    pil = Image.fromarray(mask.astype(np.uint8) * 255).resize((resolution, resolution), Image.NEAREST)
    return torch.from_numpy((np.asarray(pil) > 127).astype(np.float32))[None]


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """float32 (3, H, W) normalised -> float32 (3, H, W) in [0, 1] (for figures)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1)
