"""Referring-segmentation metrics: oIoU, mIoU and Prec@X (docs/design.md, section 4).

All arithmetic lives in `_metrics_from_counts`: `segmentation_metrics` (lists of masks) and
`MetricAccumulator` (streaming, memory flat: two integers per sample) both end there.

Definitions, per sample i with boolean prediction P_i and target G_i of the same shape:
    I_i = |P_i & G_i|, U_i = |P_i | G_i|, IoU_i = I_i / U_i, and IoU_i = 0 when U_i = 0;
    oIoU = sum_i I_i / sum_i U_i (0 when the total union is 0); mIoU = mean_i IoU_i;
    prec@X = percentage of samples with IoU_i >= X / 100, X in 50, 60, 70, 80, 90.
Values are percentages (0-100); `n` is the number of samples.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

PREC_THRESHOLDS = (50, 60, 70, 80, 90)
METRIC_KEYS = ("oIoU", "mIoU", *(f"prec@{x}" for x in PREC_THRESHOLDS))


def iou_counts(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """(intersection, union) pixel counts of two boolean masks of the same shape."""
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match target shape {target.shape}")
    if pred.dtype != np.bool_ or target.dtype != np.bool_:
        raise TypeError(f"masks must be boolean, got {pred.dtype} and {target.dtype}")
    return int(np.count_nonzero(pred & target)), int(np.count_nonzero(pred | target))


def _metrics_from_counts(intersections: Sequence[int], unions: Sequence[int]) -> dict[str, float | int]:
    inter = np.asarray(intersections, dtype=np.int64)
    union = np.asarray(unions, dtype=np.int64)
    n = int(inter.size)
    if n == 0:
        raise ValueError("no samples to score")
    # Integer counts: the only rounding is in the final divisions (float64).
    iou = np.divide(inter, union, out=np.zeros(n, dtype=np.float64), where=union > 0)
    total_union = int(union.sum())
    result: dict[str, float | int] = {
        "oIoU": 100.0 * int(inter.sum()) / total_union if total_union else 0.0,
        "mIoU": 100.0 * float(iou.mean()),
    }
    for x in PREC_THRESHOLDS:
        # Compare I >= x/100 * U in integers (100*I >= x*U) so an IoU of exactly 0.5 counts for prec@50
        # whatever the float rounding; an empty union (IoU 0) never counts.
        hits = (100 * inter >= x * union) & (union > 0)
        result[f"prec@{x}"] = 100.0 * int(hits.sum()) / n
    result["n"] = n
    return result


def segmentation_metrics(preds: Iterable[np.ndarray], targets: Iterable[np.ndarray]) -> dict[str, float | int]:
    """Metrics over paired boolean masks (each pair of matching shape); see the module docstring."""
    acc = MetricAccumulator()
    preds, targets = list(preds), list(targets)
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions but {len(targets)} targets")
    for p, t in zip(preds, targets):
        acc.add(p, t)
    return acc.result()


class MetricAccumulator:
    """Streaming version of `segmentation_metrics`: keeps only (I_i, U_i) per sample."""

    def __init__(self) -> None:
        self.intersections: list[int] = []
        self.unions: list[int] = []

    def add(self, pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
        i, u = iou_counts(pred, target)
        self.intersections.append(i)
        self.unions.append(u)
        return i, u

    def __len__(self) -> int:
        return len(self.intersections)

    def result(self) -> dict[str, float | int]:
        return _metrics_from_counts(self.intersections, self.unions)
