"""Predict the mask of one referring expression on one image, with evaluation's preprocessing/threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from remamber.data.checks import ImageFileError, report_long_text
from remamber.engine.checkpoint import load_model
from remamber.engine.evaluate import logits_to_masks
from remamber.fileio import atomic_open

OVERLAY_COLOUR = np.array([255, 40, 40], dtype=np.float32)
OVERLAY_ALPHA = 0.5


def _save_png_atomic(image: Image.Image, path: Path) -> None:
    with atomic_open(path) as fh:  # the package's writer: umask honoured, no temporary left on an error
        image.save(fh, format="PNG")


def overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """RGB image with the mask's pixels tinted red (alpha 0.5); same size as the image."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = rgb.copy()
    out[mask] = (1 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * OVERLAY_COLOUR
    return Image.fromarray(out.round().astype(np.uint8), mode="RGB")


@torch.no_grad()
def predict(
    checkpoint: str | Path, image: str | Path, text: str, out: str | Path, mask_out: str | Path | None = None
) -> np.ndarray:
    """Write the overlay PNG to `out` and the binary mask PNG (0/255) to `mask_out` (default:
    `<out stem>_mask.png` beside `out`), both at the image's size; returns the bool mask (H, W).

    Preprocessing is the evaluation's: square bilinear resize to the checkpoint's resolution, ImageNet
    normalisation; logits resized to the image size (nearest), sigmoid > 0.5.
    """
    from remamber.data.transforms import image_to_tensor

    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty expression, got {text!r}")
    image_path, out = Path(image), Path(out)
    mask_out = Path(mask_out) if mask_out is not None else out.with_name(f"{out.stem}_mask.png")
    if mask_out == out:
        raise ValueError(f"mask_out and out are the same file: {out}")
    try:
        with Image.open(image_path) as im:
            im.load()
            pil = im.convert("RGB")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{image_path}: image not found") from exc
    except OSError as exc:  # truncated or not an image: PIL's message does not name the file
        raise ImageFileError(f"{image_path}: not a readable image ({exc})") from exc

    model, meta = load_model(checkpoint)
    report_long_text(model, text)  # a cut expression is said, not silent
    tensor = image_to_tensor(pil, int(meta["resolution"]))[None]  # (1, 3, R, R)
    input_ids, attention_mask = model.tokenize([text])
    logits = model(tensor, input_ids, attention_mask)  # (1, 1, R, R)
    mask = logits_to_masks(logits, "original", [(pil.height, pil.width)])[0]  # bool (H, W)

    _save_png_atomic(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"), mask_out)
    _save_png_atomic(overlay(pil, mask), out)
    return mask
