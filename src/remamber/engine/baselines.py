"""Text-blind baselines: what a referring-segmentation score is worth when the sentence is ignored.

Each baseline picks one object of the image without reading the expression and predicts its mask for
every sentence of the referred object; the metrics are the models' (same samples, original resolution):

    largest_object   the object with the largest mask area,
    centre_object    the object whose mask centroid is nearest the image centre,
    random_object    an object drawn uniformly, from a generator seeded by (seed, ref_id), so the
                     draw is reproducible and independent of sample order.

The candidates are all annotations of the image in the dataset's ``instances.json`` (not only the referred
ones; crowd regions excluded), with the masks built by the index's own ``mask_mode``. No torch import:
this runs in seconds next to the models' evaluations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from remamber.data.preprocess import index_path, read_meta
from remamber.data.refer import annotation_mask, decode_mask, load_instances
from remamber.engine.metrics import METRIC_KEYS, MetricAccumulator
from remamber.vocabulary import BASELINES


def _candidates(instances: dict[str, Any], image_id: int, mask_mode: str, where: str) -> list[np.ndarray]:
    img = instances["images"][image_id]
    h, w = int(img["height"]), int(img["width"])
    masks = []
    for ann in instances["annotations"].values():  # annotation order of the file: deterministic
        if ann.get("image_id") != image_id or ann.get("iscrowd", 0):
            continue
        masks.append(annotation_mask(ann["segmentation"], h, w, mask_mode, f"{where}: ann_id {ann['id']}"))
    return masks


def _pick(kind: str, masks: list[np.ndarray], seed: int, ref_id: int) -> np.ndarray:
    if kind == "largest_object":
        return masks[int(np.argmax([m.sum() for m in masks]))]
    if kind == "centre_object":
        h, w = masks[0].shape
        centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
        dists = []
        for m in masks:
            ys, xs = np.nonzero(m)
            dists.append(np.inf if ys.size == 0 else float(np.hypot(ys.mean() - centre[0], xs.mean() - centre[1])))
        return masks[int(np.argmin(dists))]
    rng = np.random.default_rng([int(seed), int(ref_id)])
    return masks[int(rng.integers(len(masks)))]


def evaluate_baselines(index_dir: str | Path, split: str, data_root: str | Path,
                       kinds: tuple[str, ...] = BASELINES, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Score the text-blind baselines on every sentence of `split`; returns {kind: metrics record}.

    Records look like the models' evaluation records, with ``variant`` = the baseline's name,
    ``resolution`` None (scored at the original size) and ``text`` = "none"."""
    unknown = [k for k in kinds if k not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; known: {list(BASELINES)}")
    index_dir, data_root = Path(index_dir), Path(data_root)
    meta = read_meta(index_dir)
    dataset, mask_mode = meta["dataset"], meta["mask_mode"]
    instances_file = data_root / dataset / "instances.json"
    instances = load_instances(instances_file)
    table = pq.read_table(index_path(index_dir, split),
                          columns=["ref_id", "image_id", "width", "height", "sentences", "mask_counts"]).to_pydict()
    accs = {k: MetricAccumulator() for k in kinds}
    cache: dict[int, list[np.ndarray]] = {}
    for ref_id, image_id, w, h, sentences, counts in zip(*table.values()):
        if image_id not in instances["images"]:
            raise ValueError(f"{instances_file}: image_id {image_id} of ref_id {ref_id} ({index_dir}, split "
                             f"{split}) is not in the file")
        if image_id not in cache:
            cache = {image_id: _candidates(instances, image_id, mask_mode, str(instances_file))}
        target = decode_mask(counts, h, w)
        for kind in kinds:
            pred = _pick(kind, cache[image_id], seed, ref_id)
            for _ in sentences:  # every sentence is one sample, as for the models
                accs[kind].add(pred, target)
    out = {}
    for kind, acc in accs.items():
        scores = acc.result()
        out[kind] = {"dataset": dataset, "variant": kind, "resolution": None, "split": split,
                     "protocol": "original", "text": "none", "n": scores["n"],
                     **{k: scores[k] for k in METRIC_KEYS}, "index": str(index_dir),
                     "data_hash": meta.get("data_hash", ""), "seed": int(seed)}
    return out
