"""A small ReMamber overfits 8 synthetic image-expression pairs in which only the text says which
of the two objects of an image is meant: each image is used twice, once per object."""

from __future__ import annotations

import time

import pytest
import torch

from remamber.models import build_model, dice_bce_loss, variant_config

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.2, 1.0), "yellow": (1.0, 0.9, 0.1)}
SIZE = 40


def _scene(gen: torch.Generator, colours: tuple[str, str]):
    """One image (3, SIZE, SIZE) with a disc and a square of two colours, and their two masks."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    image = torch.full((3, SIZE, SIZE), 0.5) + 0.05 * torch.randn(3, SIZE, SIZE, generator=gen)
    masks = []
    # left and right halves so the objects never overlap; shape and side drawn at random
    sides = torch.randperm(2, generator=gen).tolist()
    for colour, side in zip(colours, sides):
        cx = int(torch.randint(8, 13, (1,), generator=gen)) + side * 20
        cy = int(torch.randint(8, 32, (1,), generator=gen))
        r = int(torch.randint(5, 8, (1,), generator=gen))
        if torch.rand(1, generator=gen) < 0.5:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            mask = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
        image[:, mask] = torch.tensor(COLOURS[colour])[:, None]
        masks.append(mask.float())
    return image, masks


def _dataset():
    gen = torch.Generator().manual_seed(0)
    pairs = [("red", "blue"), ("green", "yellow"), ("blue", "green"), ("yellow", "red")]
    images, masks, texts = [], [], []
    for colours in pairs:
        image, object_masks = _scene(gen, colours)
        for colour, mask in zip(colours, object_masks):
            images.append(image)
            masks.append(mask[None])
            texts.append(f"the {colour} object")
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (torch.stack(images) - mean) / std, torch.stack(masks), texts


def _iou(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    pred = logits > 0
    gt = masks > 0.5
    inter = (pred & gt).flatten(1).sum(1).float()
    union = (pred | gt).flatten(1).sum(1).float()
    return inter / union.clamp(min=1)


@pytest.mark.slow
def test_small_twister_overfits_eight_grounded_pairs():
    images, masks, texts = _dataset()
    # the same image appears with both of its objects: a model that ignores the text cannot pass
    assert torch.equal(images[0], images[1]) and not torch.equal(masks[0], masks[1])
    torch.manual_seed(0)
    cfg = variant_config("twister", local_dim=32, channel_scan_grid=4, channel_scan_width=32, drop_path_rate=0.0)
    model = build_model(cfg)
    ids, attn = model.tokenize(texts)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    start, best, steps = time.time(), torch.zeros(8), 0
    for steps in range(1, 201):
        model.train()
        loss = dice_bce_loss(model(images, ids, attn), masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if steps % 25 == 0:
            model.eval()
            with torch.no_grad():
                best = _iou(model(images, ids, attn), masks)
            if best.min() >= 0.9:
                break
    print(f"\noverfit: {steps} steps, {time.time() - start:.1f} s, per-pair IoU {[round(float(v), 3) for v in best]}")
    assert best.min() >= 0.9, f"IoU per pair after {steps} steps: {best.tolist()}"
