"""The text controls: the shuffled-text permutation and the text-blind baselines, against hand-made data."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from remamber.data.controls import shuffled_sources
from remamber.data.datasets import RefSegDataset
from remamber.data.preprocess import preprocess
from remamber.data.refer import encode_mask
from remamber.data.synth import write_synthetic
from remamber.engine.baselines import evaluate_baselines


@pytest.mark.parametrize("sizes", [[1, 1], [2, 2], [3, 1, 1, 1], [1] * 9, [4, 3, 3, 2, 1, 5]])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_shuffled_sources_is_a_derangement_across_images(sizes, seed):
    keys = [f"img{g}" for g, size in enumerate(sizes) for _ in range(size)]
    keys = [keys[i] for i in np.random.default_rng(seed + 100).permutation(len(keys))]  # interleaved
    src = shuffled_sources(keys, seed)
    assert sorted(src) == list(range(len(keys)))  # a permutation: every sentence used exactly once
    assert all(keys[src[i]] != keys[i] for i in range(len(keys)))  # none stays with its image
    assert src == shuffled_sources(keys, seed)  # reproducible


def test_shuffled_sources_refuses_when_impossible():
    with pytest.raises(ValueError, match="more than half"):
        shuffled_sources(["a", "a", "a", "b"], 0)


def test_shuffled_dataset_moves_every_sentence_to_another_image(tmp_path):
    write_synthetic(tmp_path / "raw", seed=0, size="tiny", progress=False)
    preprocess(tmp_path / "raw", "refcoco", tmp_path / "idx", progress=False)
    matched = RefSegDataset(tmp_path / "idx", "train", "eval", 32, tmp_path / "raw")
    shuffled = RefSegDataset(tmp_path / "idx", "train", "eval", 32, tmp_path / "raw", text="shuffled")
    a = [matched[i] for i in range(len(matched))]
    b = [shuffled[i] for i in range(len(shuffled))]
    assert len(a) == len(b) > 2
    # same samples (image, mask, ids), other sentences: the multiset of sentences is unchanged
    for x, y in zip(a, b):
        assert x["image_path"] == y["image_path"] and x["sent_id"] == y["sent_id"]
        assert np.array_equal(x["orig_mask"], y["orig_mask"])
    assert Counter(x["text"] for x in a) == Counter(y["text"] for y in b)
    own = {}
    for x in a:
        own.setdefault(x["image_path"], set()).add(x["text"])
    for y in b:  # the sentence a sample gets was written for another image
        assert y["text"] not in own[y["image_path"]] or sum(y["text"] in s for s in own.values()) > 1
    with pytest.raises(ValueError, match="evaluation"):
        RefSegDataset(tmp_path / "idx", "train", "train", 32, tmp_path / "raw", text="shuffled")


def _square(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _poly(y0, y1, x0, x1):
    return [[float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]]


def test_baselines_against_hand_computed_ious(tmp_path):
    """One 20x20 image with three non-overlapping boxes: big (top-left, 8x8), centred (4x4) and small
    (bottom-right, 2x2). Two refs: the centred box (2 sentences) and the small box (1 sentence)."""
    h = w = 20
    boxes = {1: (0, 8, 0, 8), 2: (8, 12, 8, 12), 3: (17, 19, 17, 19)}
    raw = tmp_path / "raw" / "toy"
    raw.mkdir(parents=True)
    instances = {
        "images": [{"id": 5, "file_name": "x.jpg", "height": h, "width": w}],
        "annotations": [{"id": k, "image_id": 5, "category_id": 1, "segmentation": _poly(*b), "iscrowd": 0,
                         "bbox": [0, 0, 1, 1], "area": 1.0} for k, b in boxes.items()]
        + [{"id": 9, "image_id": 5, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 1, 1], "area": 400.0,
            "segmentation": {"size": [h, w], "counts": encode_mask(np.ones((h, w), bool))["counts"]}}],
        "categories": [{"id": 1, "name": "box", "supercategory": "shape"}],
    }
    (raw / "instances.json").write_text(json.dumps(instances))
    idx = tmp_path / "idx"
    idx.mkdir()
    # polygon corners rasterise like COCO: take the masks from the same code path the baselines use
    from remamber.data.refer import annotation_mask

    masks = {k: annotation_mask(_poly(*b), h, w) for k, b in boxes.items()}
    rows = [{"ref_id": 1, "image_id": 5, "width": w, "height": h, "sentences": ["centre box", "middle one"],
             "mask_counts": encode_mask(masks[2])["counts"]},
            {"ref_id": 2, "image_id": 5, "width": w, "height": h, "sentences": ["tiny box"],
             "mask_counts": encode_mask(masks[3])["counts"]}]
    pq.write_table(pa.Table.from_pylist(rows), idx / "val.parquet")
    (idx / "meta.json").write_text(json.dumps({"dataset": "toy", "mask_mode": "union", "data_hash": "h"}))

    out = evaluate_baselines(idx, "val", tmp_path / "raw", seed=0)
    # largest picks box 1 (disjoint from both targets): IoU 0 for all three samples; the crowd region
    # (the whole image) is not a candidate, or it would be "largest".
    assert out["largest_object"]["mIoU"] == 0.0 and out["largest_object"]["n"] == 3
    # centre picks box 2: samples 1-2 hit (IoU 1), sample 3 misses -> mIoU 2/3, oIoU = 2*a2 / (2*a2 + a2 + a3)
    a2, a3 = int(masks[2].sum()), int(masks[3].sum())
    assert out["centre_object"]["mIoU"] == pytest.approx(100 * 2 / 3)
    assert out["centre_object"]["oIoU"] == pytest.approx(100 * 2 * a2 / (3 * a2 + a3))
    assert out["centre_object"]["prec@90"] == pytest.approx(100 * 2 / 3)
    # random: the draw for each ref_id comes from default_rng([seed, ref_id]) over the 3 candidates
    picks = {rid: int(np.random.default_rng([0, rid]).integers(3)) + 1 for rid in (1, 2)}
    expected = [1.0 if picks[1] == 2 else 0.0] * 2 + [1.0 if picks[2] == 3 else 0.0]
    assert out["random_object"]["mIoU"] == pytest.approx(100 * np.mean(expected))
    for record in out.values():
        assert record["text"] == "none" and record["resolution"] is None and record["split"] == "val"
