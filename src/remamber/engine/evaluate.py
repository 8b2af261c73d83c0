"""Evaluation: every sentence of every referred object of a split -> metrics.json (docs/design.md, section 4).

Protocols:
    "original": logits resized to the original image size (nearest, as the authors do), sigmoid > 0.5,
                scored against the mask at the original size;
    "input":    sigmoid > 0.5 at the network's input resolution, scored against the mask resized to it
                (nearest), as LAVT does.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from remamber.engine.checkpoint import file_sha256, load_model
from remamber.engine.jobs import tracking_key
from remamber.engine.metrics import METRIC_KEYS, MetricAccumulator
from remamber.errors import RemamberError
from remamber.fileio import atomic_write_json

PROTOCOLS = ("original", "input")


def logits_to_masks(
    logits: torch.Tensor, protocol: str, orig_sizes: Sequence[tuple[int, int]] | None = None
) -> list[np.ndarray]:
    """Binary masks from logits (B, 1, R, R): (H_i, W_i) bool arrays ("original") or (R, R) ("input")."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(f"expected logits of shape (B, 1, H, W), got {tuple(logits.shape)}")
    logits = logits.detach().float()
    if protocol == "input":
        return list((torch.sigmoid(logits[:, 0]) > 0.5).cpu().numpy())
    if orig_sizes is None or len(orig_sizes) != logits.shape[0]:
        raise ValueError("protocol 'original' needs one original (H, W) per sample")
    masks = []
    for i, (h, w) in enumerate(orig_sizes):
        up = F.interpolate(logits[i:i + 1], size=(int(h), int(w)), mode="nearest")
        masks.append((torch.sigmoid(up[0, 0]) > 0.5).cpu().numpy())
    return masks


def batch_targets(batch: dict[str, Any], protocol: str) -> list[np.ndarray]:
    """Target masks of a collated eval batch for the protocol (bool arrays)."""
    if protocol == "original":
        return [np.asarray(m, dtype=bool) for m in batch["orig_mask"]]
    return list((batch["mask"][:, 0] > 0.5).cpu().numpy())


@torch.no_grad()
def amp_dtype_for(enabled: bool, device: torch.device, choice: str = "auto") -> torch.dtype | None:
    """The autocast dtype: None without AMP or off CUDA; `choice` "float16" / "bfloat16", or "auto" (bf16
    where the GPU supports it, else fp16)."""
    if not enabled or device.type != "cuda":
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[choice]


def score_loader(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    protocol: str,
    device: torch.device,
    desc: str = "evaluate",
    progress: bool = True,
    amp_dtype: torch.dtype | None = None,
) -> MetricAccumulator:
    """Run `model` over an eval-mode loader and accumulate (I, U) per sample."""
    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
            input_ids, attention_mask = model.tokenize(list(batch["text"]))
            with nullcontext() if amp_dtype is None else torch.autocast(device.type, dtype=amp_dtype):
                logits = model(batch["image"].to(device), input_ids.to(device), attention_mask.to(device))
            preds = logits_to_masks(logits, protocol, batch.get("orig_size"))
            for p, t in zip(preds, batch_targets(batch, protocol)):
                acc.add(p, t)
    finally:
        model.train(was_training)
    return acc


class DestinationError(RemamberError, ValueError):
    """--out cannot become the metrics file."""


def _check_destination(out: Path) -> None:
    """Fail before scoring (minutes to hours), not after, when `out` cannot become the metrics file."""
    if out.is_dir():
        raise DestinationError(f"--out {out}: is a folder; give the path of the metrics JSON file to write")
    parent = next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise DestinationError(f"--out {out}: cannot create it under {parent} (not a writable folder)")


def evaluate(checkpoint: str | Path, split: str, out: str | Path, **options: Any) -> dict[str, Any]:
    """Score `checkpoint` on one split (`evaluate_splits` with one split); returns its metrics record."""
    [record] = evaluate_splits(checkpoint, {split: out}, **options)
    return record


def evaluate_splits(
    checkpoint: str | Path,
    outs: dict[str, str | Path],
    index_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    protocol: str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    tracking: bool = True,
    text: str = "matched",
    tracking_uri: str | None = None,
) -> list[dict[str, Any]]:
    """Score `checkpoint` on every sentence of each split of `outs` ({split: out}); write each `out`
    (metrics.json) atomically and return the records in `outs` order. The model is built and the MLflow
    store opened once per call (at the demo's scale they cost about as much as scoring a split).

    Defaults come from the checkpoint's config: index_dir = <data.processed>/<dataset>,
    data_root = data.raw, protocol/batch_size/num_workers from `evaluate:`.
    text="shuffled" is the shuffled-text control: every sample gets the sentence of a sample of another
    image (remamber.data.controls); the record says which in its "text" field.
    The MLflow store is `tracking_uri`, else MLFLOW_TRACKING_URI, else ./mlflow.db: never the one named in
    the checkpoint, which is a file being read, not the user's choice.
    """
    from remamber.data.checks import check_images, report_long_sentences
    from remamber.data.datasets import RefSegDataset, collate_batch
    from remamber.data.preprocess import data_hash

    if batch_size is not None and batch_size < 1:  # 0 used to fall back to the config's silently
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    checkpoint = Path(checkpoint)
    outs = {split: Path(out) for split, out in outs.items()}
    for out in outs.values():
        _check_destination(out)
    images_checked = index_dir is not None and data_root is not None
    if images_checked:  # every missing image named before the model is built and any split scored
        check_images(index_dir, list(outs), data_root)
    model, meta = load_model(checkpoint, map_location="cpu")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    config = meta["config"]
    eval_cfg = config["evaluate"]
    dataset, variant, resolution = meta["dataset"], meta["variant"], int(meta["resolution"])
    protocol = protocol or eval_cfg["protocol"]
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    index_dir = Path(index_dir) if index_dir is not None else Path(config["data"]["processed"]) / dataset
    data_root = Path(data_root) if data_root is not None else Path(config["data"]["raw"])
    if not images_checked:
        check_images(index_dir, list(outs), data_root)
    report_long_sentences(model, index_dir, list(outs))
    train_cfg = config["train"]
    amp_dtype = None
    if train_cfg.get("eval_amp", True):  # false: evaluate in fp32, as the authors do
        amp_dtype = amp_dtype_for(train_cfg["amp"], device, train_cfg.get("amp_dtype", "auto"))
    tracker = _eval_tracker(meta, tracking_uri) if tracking else None
    provenance = {"checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint),
                  "config_name": meta.get("config_name", config.get("name")),
                  # what was scored (the training data's hash is the checkpoint's meta["data_hash"])
                  "index": str(index_dir), "index_data_hash": data_hash(index_dir)}
    records = []
    for split, out in outs.items():
        ds = RefSegDataset(index_dir, split, "eval", resolution, data_root, seed=config["train"]["seed"],
                           text=text)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=eval_cfg["batch_size"] if batch_size is None else batch_size, shuffle=False,
            num_workers=eval_cfg["num_workers"] if num_workers is None else num_workers,
            collate_fn=collate_batch)
        scores = score_loader(model, loader, protocol, device,
                              desc=f"evaluate {dataset}/{variant}/{split} ({text} text)", amp_dtype=amp_dtype).result()
        record: dict[str, Any] = {
            "dataset": dataset, "variant": variant, "resolution": resolution, "split": split,
            "protocol": protocol, "text": text, "n": scores["n"], **{k: scores[k] for k in METRIC_KEYS},
            **provenance,
        }
        atomic_write_json(out, record)
        if tracker is not None:
            # The control gets its own nested run beside the split's ordinary one.
            _track_eval(tracker, meta, split if text == "matched" else f"{split}-{text}-text", record, out)
        records.append(record)
    return records


def _eval_tracker(meta: dict[str, Any], uri: str | None):
    from remamber.tracking import Tracker, TrackingConfig

    # Whether and how strictly to track may come from the checkpoint's config; where to, never (uri).
    stored = meta["config"].get("tracking") or {}
    return Tracker(TrackingConfig(enabled=bool(stored.get("enabled", True)), uri=uri,
                                  on_error="warn" if stored.get("on_error") == "warn" else "fail"))


def _track_eval(tracker, meta: dict[str, Any], split: str, record: dict[str, Any], out: Path) -> None:
    # the training's run: run key @ the checkpoint's folder (where it was trained)
    run_key = tracking_key(meta.get("run_key") or
                           f"{meta['config']['name']}/{meta['dataset']}/{meta['variant']}/{meta['resolution']}",
                           Path(record["checkpoint"]).parent)
    experiment = meta.get("experiment") or "default"
    params = {"split": split, "protocol": record["protocol"], "checkpoint": record["checkpoint"]}
    tags = {"remamber.checkpoint_sha256": record["checkpoint_sha256"], "remamber.split": split,
            "remamber.data_hash": record["index_data_hash"], "remamber.index": record["index"],
            "remamber.train_data_hash": meta.get("data_hash", "")}
    with tracker.eval_run(experiment, run_key, split, params=params, tags=tags) as run:
        run.log_dataset(record["dataset"], record["index_data_hash"], record["index"], f"eval/{record['split']}")
        run.log_metrics({k.replace("@", "_at_"): float(record[k]) for k in METRIC_KEYS}, step=0)
        run.log_artifact(out)
