"""Metrics on hand-computed cases, and the two evaluation protocols on a tiny example."""

import numpy as np
import pytest
import torch
from torch import nn

from remamber.engine.evaluate import batch_targets, logits_to_masks, score_loader
from remamber.engine.metrics import MetricAccumulator, iou_counts, segmentation_metrics


def _mask(shape, *cells):
    m = np.zeros(shape, dtype=bool)
    for r, c in cells:
        m[r, c] = True
    return m


def test_oiou_differs_from_miou_hand_computed():
    # Sample 1 (4x4): pred = 4 pixels of row 0, target = 2 of them + 2 of row 1 -> I = 2, U = 6.
    p1 = _mask((4, 4), (0, 0), (0, 1), (0, 2), (0, 3))
    t1 = _mask((4, 4), (0, 0), (0, 1), (1, 0), (1, 1))
    # Sample 2 (5x2, another shape): pred = target = all 10 pixels -> I = 10, U = 10.
    p2 = np.ones((5, 2), dtype=bool)
    t2 = np.ones((5, 2), dtype=bool)
    assert iou_counts(p1, t1) == (2, 6)
    m = segmentation_metrics([p1, p2], [t1, t2])
    # mIoU = (2/6 + 10/10) / 2 = 2/3; oIoU = (2 + 10) / (6 + 10) = 3/4.
    assert m["mIoU"] == pytest.approx(100 * 2 / 3, abs=1e-12)
    assert m["oIoU"] == pytest.approx(75.0, abs=1e-12)
    assert m["n"] == 2
    # IoUs 1/3 and 1: one of two passes every threshold.
    for x in (50, 60, 70, 80, 90):
        assert m[f"prec@{x}"] == 50.0


def test_empty_union_counts_as_zero():
    p1 = _mask((3, 3), (1, 1), (1, 2), (2, 2))
    empty = np.zeros((3, 3), dtype=bool)
    m = segmentation_metrics([p1, empty], [p1.copy(), empty])
    # IoUs 1 and 0 (empty union): mIoU 50; the empty pair adds nothing to oIoU: 3/3.
    assert m["mIoU"] == 50.0
    assert m["oIoU"] == 100.0
    assert m["prec@50"] == 50.0 and m["prec@90"] == 50.0
    only_empty = segmentation_metrics([empty], [empty])
    assert only_empty["mIoU"] == 0.0 and only_empty["oIoU"] == 0.0 and only_empty["prec@50"] == 0.0


def test_iou_exactly_at_threshold_counts():
    # I = 2, U = 4: IoU exactly 0.5 -> counts for prec@50, not prec@60.
    half_p = _mask((2, 4), (0, 0), (0, 1), (0, 2))
    half_t = _mask((2, 4), (0, 1), (0, 2), (0, 3))
    assert iou_counts(half_p, half_t) == (2, 4)
    # I = 7, U = 10: IoU exactly 0.7 (not representable in binary) -> counts for prec@70.
    p7 = np.zeros(10, dtype=bool)
    p7[:10] = True
    t7 = np.zeros(10, dtype=bool)
    t7[:7] = True
    assert iou_counts(p7, t7) == (7, 10)
    m = segmentation_metrics([half_p, p7], [half_t, t7])
    assert m["prec@50"] == 100.0
    assert m["prec@60"] == 50.0
    assert m["prec@70"] == 50.0
    assert m["prec@80"] == 0.0


def test_accumulator_matches_list_version_and_bad_inputs():
    rng = np.random.default_rng(0)
    preds = [rng.random((6, 7)) > 0.5 for _ in range(20)]
    targets = [rng.random((6, 7)) > 0.4 for _ in range(20)]
    acc = MetricAccumulator()
    for p, t in zip(preds, targets):
        acc.add(p, t)
    # Independent float64 reference of the definitions.
    ious, inter, union = [], 0, 0
    for p, t in zip(preds, targets):
        i, u = float((p & t).sum()), float((p | t).sum())
        inter, union = inter + i, union + u
        ious.append(i / u if u else 0.0)
    ref = segmentation_metrics(preds, targets)
    assert acc.result() == ref
    assert ref["mIoU"] == pytest.approx(100 * np.mean(ious), abs=1e-9)
    assert ref["oIoU"] == pytest.approx(100 * inter / union, abs=1e-9)
    assert ref["prec@50"] == pytest.approx(100 * np.mean(np.array(ious) >= 0.5), abs=1e-9)
    with pytest.raises(ValueError, match="shape"):
        iou_counts(np.zeros((2, 2), bool), np.zeros((2, 3), bool))
    with pytest.raises(TypeError, match="boolean"):
        iou_counts(np.zeros((2, 2)), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="no samples"):
        segmentation_metrics([], [])
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        segmentation_metrics(preds[:2], targets[:1])


class _FixedLogits(nn.Module):
    """Stands in for a model: returns the given logits whatever the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def tokenize(self, texts):
        return torch.zeros(len(texts), 2, dtype=torch.long), torch.ones(len(texts), 2, dtype=torch.long)

    def forward(self, images, input_ids, attention_mask):
        return self.logits.expand(images.shape[0], -1, -1, -1)


def test_protocols_original_vs_input_hand_computed():
    from remamber.data.transforms import mask_to_tensor

    # Network output at the input resolution R = 2: only the top-left cell is foreground.
    logits = torch.tensor([[[[3.0, -2.0], [-1.0, -4.0]]]])
    # Original image 4x4; the object covers rows 0-1, cols 0-2 (6 pixels).
    orig = np.zeros((4, 4), dtype=bool)
    orig[0:2, 0:3] = True
    # "input": the target is the mask resized to 2x2 with PIL nearest, which samples source pixels (1, 1),
    # (1, 3), (3, 1), (3, 3) -> [[1, 0], [0, 0]]: equal to the prediction, IoU 1.
    small = mask_to_tensor(orig, 2)
    assert small[0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    # "original": nearest upsampling of the 2x2 prediction to 4x4 -> rows 0-1, cols 0-1 (4 pixels);
    # I = 4, U = 6 -> IoU 2/3.
    up = logits_to_masks(logits, "original", [(4, 4)])[0]
    assert up.shape == (4, 4) and up.sum() == 4 and up[0:2, 0:2].all()

    batch = {"image": torch.zeros(1, 3, 2, 2), "mask": small[None], "text": ["the thing"],
             "orig_mask": [orig], "orig_size": [(4, 4)]}
    model = _FixedLogits(logits)
    res_original = score_loader(model, [batch], "original", torch.device("cpu"), progress=False).result()
    res_input = score_loader(model, [batch], "input", torch.device("cpu"), progress=False).result()
    assert res_original["mIoU"] == pytest.approx(100 * 4 / 6, abs=1e-12)
    assert res_original["oIoU"] == pytest.approx(100 * 4 / 6, abs=1e-12)
    assert res_original["prec@60"] == 100.0 and res_original["prec@70"] == 0.0
    assert res_input["mIoU"] == 100.0 and res_input["prec@90"] == 100.0
    assert [t.shape for t in batch_targets(batch, "input")] == [(2, 2)]
    with pytest.raises(ValueError, match="protocol"):
        logits_to_masks(logits, "lavt")
