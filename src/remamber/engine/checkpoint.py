"""Checkpoint files: atomic writes, safe reads (`weights_only=True`), and `load_model`.

A checkpoint is a dict written by `torch.save`:
    "format":   CHECKPOINT_FORMAT
    "meta":     plain data: config (the full params dict), model_config (ModelConfig dict), dataset,
                variant, resolution, epoch, data_hash, and more (config_name, config_hash, run_key, ...)
    "model":    the model state dict (raw weights)
    "ema":      the EMA state dict, or None
    "training": None in best.pt; in last.pt the optimizer, schedule, scaler, RNG and data-order states,
                the history and the best val mIoU so far, from which `train(resume=True)` continues exactly.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from remamber.errors import RemamberError

CHECKPOINT_FORMAT = "remamber-checkpoint-v1"
REQUIRED_META = ("config", "model_config", "dataset", "variant", "resolution", "epoch", "data_hash")


class CheckpointError(RemamberError, RuntimeError):
    """A missing, unreadable or malformed checkpoint; the message names the file."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    meta: dict[str, Any],
    *,
    ema_state: dict[str, torch.Tensor] | None = None,
    training: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically. `meta` must hold REQUIRED_META except model_config (taken from
    `model.config` when absent)."""
    bare = unwrap(model)
    meta = dict(meta)
    if "model_config" not in meta:
        meta["model_config"] = bare.config.to_dict()
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"checkpoint meta for {path} lacks {', '.join(missing)}")
    state = {
        "format": CHECKPOINT_FORMAT,
        "meta": meta,
        "model": {k: v.detach().cpu() for k, v in bare.state_dict().items()},
        "ema": None if ema_state is None else {k: v.detach().cpu() for k, v in ema_state.items()},
        "training": training,
    }
    atomic_torch_save(state, path)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with `weights_only=True` and check its layout."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, ...: all mean "not a checkpoint of ours"
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a remamber checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    for key in ("meta", "model", "ema", "training"):
        if key not in state:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    missing = [k for k in REQUIRED_META if k not in state["meta"]]
    if missing:
        raise CheckpointError(f"{path}: checkpoint meta lacks {', '.join(missing)}")
    return state


def build_model_from_meta(meta: dict[str, Any]) -> nn.Module:
    """A freshly initialised model of the checkpoint's architecture.

    The backbone's ImageNet file is not re-read (`pretrained_backbone` -> None): the checkpoint holds every
    weight, and the file need not exist where the checkpoint is used.
    """
    from remamber.models import ModelConfig, build_model

    cfg_dict = dict(meta["model_config"])
    if "pretrained_backbone" in cfg_dict:
        cfg_dict["pretrained_backbone"] = None
    return build_model(ModelConfig.from_dict(cfg_dict))


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu", weights: str = "auto"
) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, meta) from a checkpoint.

    weights: "auto" (the weights validation scored: the EMA's when the run kept an EMA and selected by it,
    train.ema_select "ema", else the raw weights),
    "ema" or "raw". `meta["weights"]` tells which were loaded; `meta["model_config"]` is the config as
    trained (with its original pretrained_backbone path).
    """
    state = read_checkpoint(path, map_location)
    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"weights must be auto, ema or raw, got {weights!r}")
    if weights == "ema" and state["ema"] is None:
        raise CheckpointError(f"{path}: no EMA weights in this checkpoint")
    selected = state["meta"].get("config", {}).get("train", {}).get("ema_select", "ema")
    use_ema = state["ema"] is not None and (weights == "ema" or (weights == "auto" and selected == "ema"))
    model = build_model_from_meta(state["meta"])
    try:
        model.load_state_dict(state["ema"] if use_ema else state["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the model config: {exc}") from exc
    model.to(map_location)
    model.eval()
    meta = dict(state["meta"])
    meta["weights"] = "ema" if use_ema else "raw"
    return model, meta
