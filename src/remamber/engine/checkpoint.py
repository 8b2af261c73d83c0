"""Checkpoint files: atomic writes, safe reads (`weights_only=True`), and `load_model`.

A checkpoint is a dict written by `torch.save`:
    "format":   CHECKPOINT_FORMAT
    "meta":     plain data: config (the full params dict), model_config (ModelConfig dict), dataset,
                variant, resolution, epoch, data_hash, and more (config_name, config_hash, run_key, ...);
                "model_weights": what "model" holds ("raw" or "ema"); "frozen": the frozen pretrained parts
                left out of the file, each {"prefix", "name", "text_layers", "sha256", "tensors"}
    "model":    the model state dict without the frozen parts (best.pt: the weights that were validated,
                the EMA's when the run kept one; last.pt: the raw weights)
    "ema":      the EMA state dict (without the frozen parts), or None (always None in best.pt)
    "training": None in best.pt; in last.pt the optimizer, schedule, scaler, RNG and data-order states,
                the history and the best val mIoU so far, from which `train(resume=True)` continues exactly.

A frozen part (the text encoder under train.freeze_text_encoder) is rebuilt from its pretrained source at
load time and must hash to the value recorded at training time, else the checkpoint is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import signal
import threading
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


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's tensors: names, dtypes, shapes and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        # Viewed as bytes: numpy has no bfloat16, and the hash is of the stored bits, not the values.
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def frozen_reference(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{"text_encoder": {...}} when the model's text encoder is frozen (see TextEncoder.freeze), else {}."""
    bare = unwrap(model)
    encoder = getattr(bare, "text_encoder", None)
    if encoder is None or not getattr(encoder, "frozen", False):
        return {}
    state = encoder.state_dict()
    cfg = getattr(bare, "config", None)
    return {"text_encoder": {"prefix": "text_encoder.", "name": encoder.name,
                             "text_layers": getattr(cfg, "text_layers", None),
                             "sha256": state_sha256(state), "tensors": len(state)}}


def _without(state: dict[str, torch.Tensor], frozen: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    prefixes = tuple(ref["prefix"] for ref in frozen.values())
    return {k: v.detach().cpu() for k, v in state.items() if not (prefixes and k.startswith(prefixes))}


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with _sigterm_deferred():
            with open(tmp, "wb") as fh:
                torch.save(obj, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def _sigterm_deferred():
    """Hold SIGTERM back while a checkpoint is written (a second or so): delivered right after, so a
    stopped job keeps the checkpoint it was writing, and torch's writer is never interrupted mid-file.

    A Python-level hold, not a thread signal mask: a process-directed SIGTERM may be taken by any thread
    that does not block it (MLflow's, a data loader's), and its handler then runs in the main thread
    anyway. Here the handler only records it; the previous handler gets it once the file is in place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if received:
            signal.raise_signal(signal.SIGTERM)


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
    model_state: dict[str, torch.Tensor] | None = None,
    model_weights: str = "raw",
    frozen: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Write a checkpoint atomically. `meta` must hold REQUIRED_META except model_config (taken from
    `model.config` when absent). `model_state` (default: the model's own) is stored as "model", described
    by `model_weights` ("raw" or "ema"). Frozen parts (`frozen`, default computed from the model) are
    left out of every state dict and referenced by hash in meta["frozen"]."""
    bare = unwrap(model)
    meta = dict(meta)
    if "model_config" not in meta:
        meta["model_config"] = bare.config.to_dict()
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"checkpoint meta for {path} lacks {', '.join(missing)}")
    if model_weights not in ("raw", "ema"):
        raise ValueError(f"model_weights must be 'raw' or 'ema', got {model_weights!r}")
    frozen = frozen_reference(bare) if frozen is None else frozen
    meta["frozen"] = frozen
    meta["model_weights"] = model_weights
    meta.pop("weights", None)  # load_model's note of what it loaded, not a property of this file
    state = {
        "format": CHECKPOINT_FORMAT,
        "meta": meta,
        "model": _without(bare.state_dict() if model_state is None else model_state, frozen),
        "ema": None if ema_state is None else _without(ema_state, frozen),
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
    except pickle.UnpicklingError as exc:
        # torch's message advises retrying with weights_only=False, i.e. running the file's code: never
        # pass that on. Keep only the unpickler's own finding. `from None`: not even in a traceback.
        found = next((line.strip().replace("WeightsUnpickler error: ", "") for line in str(exc).splitlines()
                      if line.strip() and "weights_only" not in line and "Weights only" not in line
                      and "you have two options" not in line), "")
        found = re.split(r"\. Please| was not an allowed global", found)[0]  # and its allowlisting advice
        raise CheckpointError(
            f"{path}: refused: the file holds objects other than tensors and plain data"
            f"{f' ({found})' if found else ''}; a remamber checkpoint never does, so it is not one "
            f"(or it was tampered with): do not load it") from None
    except Exception as exc:  # truncated zip, foreign file, ...: all mean "not a checkpoint of ours"
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: "
                              f"{_first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a remamber checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    for key in ("meta", "model", "ema", "training"):
        if key not in state:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    missing = [k for k in REQUIRED_META if k not in state["meta"]]
    if missing:
        raise CheckpointError(f"{path}: checkpoint meta lacks {', '.join(missing)}")
    return state


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def build_model_from_meta(meta: dict[str, Any]) -> nn.Module:
    """A freshly initialised model of the checkpoint's architecture.

    The backbone's ImageNet file is not re-read (`pretrained_backbone` -> None): the checkpoint holds every
    weight, and the file need not exist where the checkpoint is used.
    """
    from remamber.models import ModelConfig, build_model

    cfg_dict = dict(meta["model_config"])
    if "pretrained_backbone" in cfg_dict:
        cfg_dict["pretrained_backbone"] = None
    model = build_model(ModelConfig.from_dict(cfg_dict))
    if "text_encoder" in (meta.get("frozen") or {}):
        model.text_encoder.freeze()
    return model


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], meta: dict[str, Any],
                 path: str | Path) -> None:
    """Load a checkpoint's state dict into `model` (strict), the frozen parts excepted: those must be in
    the model already, rebuilt from their pretrained source, and hash to what the checkpoint recorded."""
    bare = unwrap(model)
    frozen = meta.get("frozen") or {}
    for part, ref in frozen.items():
        module = getattr(bare, part, None)
        if module is None:
            raise CheckpointError(f"{path}: references a frozen {part!r} the model does not have")
        now = state_sha256(module.state_dict())
        if now != ref["sha256"]:
            raise CheckpointError(
                f"{path}: refused: its frozen {part} {ref['name']!r} (text_layers {ref.get('text_layers')}) "
                f"is not stored in the file but referenced by hash, and the pretrained weights found here "
                f"differ: sha256 {now[:16]}... now, {ref['sha256'][:16]}... at training time; install the "
                f"weights it was trained with (the same package or hub revision) or retrain")
    prefixes = tuple(ref["prefix"] for ref in frozen.values())
    expected_missing = {k for k in bare.state_dict() if prefixes and k.startswith(prefixes)}
    try:
        result = bare.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the model config: {_first_line(exc)}") from exc
    missing = set(result.missing_keys) - expected_missing
    unexpected = set(result.unexpected_keys) | (set(state) & expected_missing)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model config: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


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
    held = state["meta"].get("model_weights", "raw")  # what "model" holds
    if weights == "ema" and state["ema"] is None and held != "ema":
        raise CheckpointError(f"{path}: no EMA weights in this checkpoint")
    if weights == "raw" and held != "raw":
        raise CheckpointError(f"{path}: holds the EMA weights only (the raw ones are in the run's last.pt)")
    selected = state["meta"].get("config", {}).get("train", {}).get("ema_select", "ema")
    use_ema = state["ema"] is not None and (weights == "ema" or (weights == "auto" and selected == "ema"))
    model = build_model_from_meta(state["meta"])
    load_weights(model, state["ema"] if use_ema else state["model"], state["meta"], path)
    model.to(map_location)
    model.eval()
    meta = dict(state["meta"])
    meta["weights"] = "ema" if use_ema else held
    return model, meta
