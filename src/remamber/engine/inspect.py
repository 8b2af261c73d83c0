"""Figure data dump: run a trained model with ``inspect=True`` on a few fixed evaluation samples
and store what the figures need in one ``.npz`` of plain arrays (no pickled objects).

Keys of the archive (N samples, R input resolution, L max text length, per stage s = 0..3):
  images            uint8   (N, R, R, 3)  the model's input, de-normalised
  gt_masks          bool    (N, R, R)     ground truth at the input resolution
  probs             float32 (N, R, R)     sigmoid of the logits
  texts             <U      (N,)          the expressions
  input_ids         int64   (N, L)
  token_mask        bool    (N, L)        real (non-padding) tokens
  ref_ids, sent_ids int64   (N,)
  interaction_maps_s{s}    float32 (N, L, h_s, w_s)   twister family with a local branch
  attention_maps_s{s}      float32 (N, L, h_s, w_s)   attention variant (mean over heads)
  cube_s{s}, cube_after_channel_s{s}   float16 (N, P*C_s, h_s, w_s)   last Twister block of the stage
  cube_after_spatial_s{s}  float16 (N, C_s', h_s, w_s)
  cube_slices_s{s}  int64 (P, 2) [start, stop) channel range of each cube part, named by
  cube_slice_names  <U (P,)      e.g. image / global_text / local
  n_stages int, variant / dataset / split / checkpoint str (0-d), resolution int (0-d)
Cube features are stored as float16 to keep paper-scale dumps small (they only feed a PCA plot).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from remamber.engine.checkpoint import load_model
from remamber.fileio import temp_file_beside

CUBE_KEYS = ("cube", "cube_after_channel", "cube_after_spatial")
MAP_KEYS = ("interaction_maps", "attention_maps")


def select_items(ref_ids: list[int], n_samples: int) -> list[int]:
    """Indices of the first ``n_samples`` eval items with distinct referred objects, in the
    split's own order: fixed and seed-independent, so every variant is shown the same samples,
    and no object appears twice with another of its sentences."""
    chosen, seen = [], set()
    for i, ref_id in enumerate(ref_ids):
        if ref_id not in seen:
            seen.add(ref_id)
            chosen.append(i)
            if len(chosen) == n_samples:
                break
    return chosen


def _denormalise(images: torch.Tensor) -> np.ndarray:
    """(B, 3, R, R) ImageNet-normalised float -> (B, R, R, 3) uint8."""
    from remamber.data.transforms import denormalize

    pixels = torch.stack([denormalize(image) for image in images]) * 255.0
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)  # honours the umask (mkstemp: 0600)
    try:
        with os.fdopen(fd, "wb") as fh:  # a file object: numpy must not append ".npz" to the name
            np.savez_compressed(fh, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@torch.no_grad()
def dump_inspection(
    checkpoint: str | Path,
    split: str,
    out_npz: str | Path,
    index_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    n_samples: int = 4,
    seed: int = 0,
    batch_size: int = 4,
) -> Path:
    """Write the figure data of ``checkpoint`` on ``split`` to ``out_npz`` (see the module doc).

    index_dir / data_root default to ``<data.processed>/<dataset>`` and ``data.raw`` of the
    checkpoint's config (paths relative to the current directory, as in the pipeline).
    ``seed`` seeds torch for the forward pass (the sample choice does not depend on it).
    """
    from remamber.data.datasets import RefSegDataset, collate_batch

    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    model, meta = load_model(checkpoint)
    config = meta["config"]
    dataset_name, resolution = meta["dataset"], int(meta["resolution"])
    index_dir = Path(index_dir) if index_dir is not None else Path(config["data"]["processed"]) / dataset_name
    data_root = Path(data_root) if data_root is not None else Path(config["data"]["raw"])
    dataset = RefSegDataset(index_dir, split, "eval", resolution, data_root, seed=seed)
    if len(dataset) == 0:
        raise ValueError(f"{index_dir}: split {split!r} has no evaluation items")
    ref_ids = [dataset._objects[obj_i]["ref_id"] for obj_i, _ in dataset._items]
    indices = select_items(ref_ids, n_samples)
    torch.manual_seed(seed)

    collected: dict[str, list[np.ndarray]] = {}
    slices: list[dict[str, tuple[int, int]] | None] = []

    def add(key: str, value: np.ndarray) -> None:
        collected.setdefault(key, []).append(value)

    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    for batch_indices in tqdm(batches, desc=f"inspect {meta['variant']} {split}", unit="batch"):
        batch = collate_batch([dataset[i] for i in batch_indices])
        input_ids, attention_mask = model.tokenize(batch["text"])
        logits, trace = model(batch["image"], input_ids, attention_mask, inspect=True)
        add("images", _denormalise(batch["image"]))
        add("gt_masks", batch["mask"][:, 0].numpy() > 0.5)
        add("probs", torch.sigmoid(logits[:, 0]).float().numpy())
        add("texts", np.asarray(batch["text"], dtype=str))
        add("input_ids", input_ids.numpy().astype(np.int64))
        add("token_mask", attention_mask.numpy().astype(bool))
        add("ref_ids", np.asarray(batch["ref_id"], dtype=np.int64))
        add("sent_ids", np.asarray(batch["sent_id"], dtype=np.int64))
        for key in MAP_KEYS + CUBE_KEYS:
            for stage, value in enumerate(trace.get(key, [])):
                if value is not None:
                    dtype = np.float16 if key in CUBE_KEYS else np.float32
                    add(f"{key}_s{stage}", value.float().numpy().astype(dtype))
        if not slices:
            slices = list(trace.get("cube_slices", []))

    arrays: dict[str, np.ndarray] = {}
    for key, parts in collected.items():
        if key == "texts":  # widths may differ per batch: re-make one fixed-width array
            arrays[key] = np.asarray([t for part in parts for t in part.tolist()], dtype=str)
        else:
            arrays[key] = np.concatenate(parts, axis=0)
    names: list[str] = []
    for stage, stage_slices in enumerate(slices):
        if stage_slices:
            names = list(stage_slices)
            arrays[f"cube_slices_s{stage}"] = np.asarray([stage_slices[n] for n in names], dtype=np.int64)
    if names:
        arrays["cube_slice_names"] = np.asarray(names, dtype=str)
    arrays["n_stages"] = np.asarray(len(model.backbone.layers), dtype=np.int64)
    info: dict[str, Any] = {"variant": meta["variant"], "dataset": dataset_name, "split": split,
                            "checkpoint": Path(checkpoint).name}
    for key, value in info.items():
        arrays[key] = np.asarray(str(value), dtype=str)
    arrays["resolution"] = np.asarray(resolution, dtype=np.int64)
    out_npz = Path(out_npz)
    _write_npz_atomic(out_npz, arrays)
    return out_npz


