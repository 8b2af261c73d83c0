"""Training loop: one (dataset, variant, resolution) job of the experiment matrix (docs/design.md, section 3).

Outputs in `out_dir`: `last.pt` (every epoch, with everything needed to resume exactly), `best.pt` (the
validated weights of the best val mIoU, nothing else), `history.json` (one dict per epoch; the MLflow run's
metrics are a replayable view of it). Launch under `torchrun --nproc_per_node N` for DDP.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from remamber.config import ConfigError, ExperimentConfig
from remamber.errors import RemamberError
from remamber.fileio import atomic_write_text
from remamber.data.catalog import pinned_pretrained
from remamber.engine.jobs import model_config, tracking_key
from remamber.engine.checkpoint import (
    CheckpointError, file_sha256, frozen_reference, load_weights, read_checkpoint, save_checkpoint,
)
from remamber.engine.distributed import (
    BatchNormReplay, DistInfo, GlobalBatchSampler, any_rank, barrier, batch_split, dist_info_from_env,
    epoch_seed, gather_rng_states, init_distributed, micro_batch_seed, resolve_device, seed_everything,
    set_rng_state, shutdown_distributed,
)
from remamber.engine.evaluate import amp_dtype_for, score_loader
from remamber.engine.optim import CosineEpochSchedule, ModelEMA, all_params, build_optimizer
from remamber.models import build_model, dice_bce_loss

TRAIN_CACHE_BYTES = 1 << 30  # decoded training images kept in memory when the whole set fits (demo: ~70 MB)
HISTORY_KEYS = ("epoch", "loss", "lr", "val_mIoU", "val_oIoU", "images_per_s", "seconds")
TRACKED_KEYS = ("loss", "lr", "val_mIoU", "val_oIoU", "images_per_s")  # MLflow metrics, step = epoch
OUTPUT_NAMES = ("last.pt", "best.pt", "history.json")
# Temporary files of checkpoint.atomic_torch_save (and of history.json's writer before it was fileio's):
# ".NAME.tmp-PID".
_TMP_RE = re.compile(r"^\.(last\.pt|best\.pt|history\.json)\.tmp-(\d+)$")


class NonFiniteLossError(RemamberError, FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is left as it was."""


def _log(info: DistInfo, message: str) -> None:
    if info.is_main:
        tqdm.write(message, file=sys.stderr)


def _remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Temporary files left by a killed writer (its pid no longer runs): nothing else removes them."""
    removed = []
    if not out_dir.is_dir():
        return removed
    for path in out_dir.iterdir():
        match = _TMP_RE.match(path.name)
        if match is None or int(match.group(2)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(2)), 0)
            continue  # a live writer (another process on this folder): not ours to touch
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _amp_dtype(enabled: bool, device: torch.device, choice: str = "auto") -> torch.dtype | None:
    """See remamber.engine.evaluate.amp_dtype (fp16 trains with a GradScaler)."""
    return amp_dtype_for(enabled, device, choice)


def train(
    cfg: ExperimentConfig | str | Path,
    dataset: str,
    variant: str,
    resolution: int,
    out_dir: str | Path,
    resume: bool = False,
    experiment: str | None = None,
    tables: list[str] | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Train one model; returns {"best": path, "last": path, "history": path, "best_val_mIoU": float}.

    `cfg` is an ExperimentConfig or the path of a params file. `resume=True` continues from
    `out_dir/last.pt` when it exists (else starts afresh). A folder that already holds a training is
    refused unless `resume` or `overwrite` (which starts again from scratch, replacing it).
    `experiment`/`tables` default to the job's entry in the experiment matrix (the first table using it /
    all of them). `tracking_uri` (the command line's) overrides the params file's tracking.uri.
    """
    if not isinstance(cfg, ExperimentConfig):
        cfg = ExperimentConfig.from_yaml(cfg)
    resolution = int(resolution)
    if dataset not in cfg.data.datasets:
        raise ConfigError(f"{cfg.source}: dataset {dataset!r} is not in data.datasets "
                          f"({', '.join(cfg.data.datasets)})")
    if experiment is None or tables is None:
        job = cfg.find_job(dataset, variant, resolution)
        experiment = experiment or job.experiment
        tables = list(job.tables) if tables is None else tables

    out_dir = Path(out_dir)
    existing = [name for name in OUTPUT_NAMES if (out_dir / name).exists()]
    if existing and not (resume or overwrite):
        raise CheckpointError(
            f"{out_dir}: already holds a training ({', '.join(existing)}); pass --resume to continue it or "
            f"--overwrite to train again from scratch (replacing it)")
    info = dist_info_from_env()
    device = resolve_device(device, info)
    init_distributed(info, device)
    try:
        return _train(cfg, dataset, variant, resolution, out_dir, resume, experiment, list(tables),
                      device, info, overwrite, tracking_uri)
    finally:
        shutdown_distributed()


@dataclass
class _Training:
    """One training's state, shared by the parts of `_train`: what setup built, and what the epochs change."""

    cfg: ExperimentConfig
    info: DistInfo
    device: torch.device
    run_key: str
    accumulation: int
    train_ds: Any
    val_ds: Any
    model: nn.Module
    frozen: dict[str, Any]
    optimizer: torch.optim.Optimizer
    schedule: CosineEpochSchedule
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None
    meta_base: dict[str, Any]
    out_dir: Path
    ddp_model: nn.Module | None = None  # the model under DDP (the model itself in one process)
    bn_replay: BatchNormReplay | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_miou: float = -math.inf
    start_epoch: int = 0

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def history_path(self) -> Path:
        return self.out_dir / "history.json"


def _train(cfg: ExperimentConfig, dataset: str, variant: str, resolution: int, out_dir: Path, resume: bool,
           experiment: str, tables: list[str], device: torch.device, info: DistInfo, overwrite: bool,
           tracking_uri: str | None) -> dict[str, Any]:
    t = _set_up(cfg, dataset, variant, resolution, out_dir, experiment, tables, device, info)
    _prepare_out_dir(t, resume, overwrite)
    if resume and t.last_path.exists():
        _resume_from_last(t)
    elif resume:
        _log(info, f"[train] no {t.last_path}: starting {t.run_key} from scratch")
    t.ddp_model, t.bn_replay = _wrap_for_ddp(t.model, info, device)

    tracker_run = _open_tracking(cfg, info, experiment, t.meta_base, tables,
                                 tracking_key(t.run_key, out_dir), fresh=t.start_epoch == 0, uri=tracking_uri)
    with tracker_run as run:
        run.log_dataset(dataset, t.meta_base["data_hash"], t.meta_base["index"], "train")
        run.sync_history(t.history, TRACKED_KEYS, "epoch")  # what a kill or a store outage kept from it
        for epoch in range(t.start_epoch, cfg.train.epochs):
            t0 = time.perf_counter()
            mean_loss, images = _train_epoch(t, epoch)
            train_seconds = time.perf_counter() - t0
            val = _validate(t, epoch)
            rng_states = gather_rng_states(info)
            if info.is_main:
                _end_epoch(t, run, epoch, mean_loss, val, images, train_seconds, t0, rng_states)
            barrier(info)

        if info.is_main:
            _finish(t, run)
    return {"best": str(t.best_path), "last": str(t.last_path), "history": str(t.history_path),
            "best_val_mIoU": t.best_miou}


def _set_up(cfg: ExperimentConfig, dataset: str, variant: str, resolution: int, out_dir: Path, experiment: str,
            tables: list[str], device: torch.device, info: DistInfo) -> _Training:
    """Seed, data, model, optimizer, schedule, AMP and EMA, in this order (the RNG draws depend on it)."""
    from remamber.data.checks import check_images, report_long_sentences
    from remamber.data.datasets import RefSegDataset
    from remamber.data.preprocess import data_hash

    tc = cfg.train
    accumulation = batch_split(tc.global_batch_size, tc.per_device_batch_size, info.world_size)
    run_key = cfg.run_key(dataset, variant, resolution)
    _log(info, f"[train] {run_key}: global batch {tc.global_batch_size} = {tc.per_device_batch_size} per device"
               f" x {info.world_size} device(s) x {accumulation} accumulation step(s); device {device}")
    seed_everything(tc.seed, tc.deterministic)

    index_dir = Path(cfg.data.processed) / dataset
    data_root = Path(cfg.data.raw)
    # no augmentation: small training sets (the CPU demo) keep their decoded images in memory
    train_ds = RefSegDataset(index_dir, "train", "train", resolution, data_root, seed=tc.seed,
                             cache_max_bytes=TRAIN_CACHE_BYTES)
    val_ds = RefSegDataset(index_dir, "val", "eval", resolution, data_root, seed=tc.seed,
                           max_items=tc.val_subset)
    check_images(index_dir, ["train", "val"], data_root)  # a missing val image fails now, not after an epoch
    d_hash = data_hash(index_dir)
    if len(train_ds) < tc.global_batch_size:
        raise ValueError(f"{index_dir}: {len(train_ds)} training items, fewer than one global batch "
                         f"({tc.global_batch_size}); lower train.global_batch_size")

    model_cfg = model_config(cfg, variant)
    pin = pinned_pretrained(model_cfg.pretrained_backbone) if model_cfg.pretrained_backbone else (None, None)
    model = build_model(model_cfg, backbone_pin=pin).to(device)
    if tc.freeze_text_encoder:
        model.text_encoder.freeze()  # before the optimizer is built: its parameters stay out of it
    frozen = frozen_reference(model)  # hashed once; every checkpoint references it
    if tc.freeze_text_encoder:  # a fixed function of the sentence: encode each one once, not once per epoch
        kept = model.text_encoder.remember(train_ds.sentences() + val_ds.sentences())
        _log(info, f"[train] frozen text encoder: {kept} distinct sentences encoded once" if kept else
                   "[train] frozen text encoder: too many sentences to keep their features; encoded per batch")
    if info.is_main:
        report_long_sentences(model, index_dir, ["train", "val"])  # a warning with the count, not silence
    optimizer = build_optimizer(model, tc, model_cfg.pretrained_backbone is not None)
    schedule = CosineEpochSchedule(optimizer, tc.min_lr, tc.epochs, lagged=tc.lr_schedule == "cosine_lagged")
    amp_dtype = _amp_dtype(tc.amp, device, tc.amp_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = ModelEMA(model, tc.ema_decay) if tc.ema_decay is not None else None

    meta_base = {
        "config": cfg.to_dict(), "config_name": cfg.name, "config_hash": cfg.config_hash(),
        "model_config": model_cfg.to_dict(), "dataset": dataset, "variant": variant,
        "resolution": resolution, "data_hash": d_hash, "run_key": run_key, "experiment": experiment,
        "tables": list(tables), "world_size": info.world_size,
        "index": str(index_dir),
    }
    return _Training(cfg, info, device, run_key, accumulation, train_ds, val_ds, model, frozen, optimizer,
                     schedule, amp_dtype, scaler, ema, meta_base, out_dir)


def _prepare_out_dir(t: _Training, resume: bool, overwrite: bool) -> None:
    """Create the folder; remove dead writers' temporaries, and the old training when overwriting."""
    t.out_dir.mkdir(parents=True, exist_ok=True)
    if t.info.is_main:
        for stale in _remove_stale_temporaries(t.out_dir):
            _log(t.info, f"[train] removed {stale}, left by a writer that was killed")
        if overwrite and not (resume and t.last_path.exists()):
            for path in (t.last_path, t.best_path, t.history_path):
                path.unlink(missing_ok=True)
    barrier(t.info)


def _resume_from_last(t: _Training) -> None:
    """Weights, optimizer, schedule, scaler, EMA, RNG and history from last.pt (checked to be this job's)."""
    last_path, tc = t.last_path, t.cfg.train
    state = read_checkpoint(last_path)
    _check_resumable(last_path, state["meta"], t.meta_base)
    load_weights(t.model, state["model"], state["meta"], last_path)
    training = state["training"]
    if training is None:
        raise CheckpointError(f"{last_path}: holds no training state, cannot resume from it")
    if training["optimizer"] is not None:
        t.optimizer.load_state_dict(training["optimizer"])
    elif int(state["meta"]["epoch"]) < tc.epochs:
        raise CheckpointError(f"{last_path}: holds no optimizer state but only epoch "
                              f"{state['meta']['epoch']} of {tc.epochs} finished; cannot resume from it")
    t.schedule.load_state_dict(training["schedule"])
    t.scaler.load_state_dict(training["scaler"])
    if t.ema is not None:
        if state["ema"] is None:
            raise CheckpointError(f"{last_path}: no EMA state but train.ema_decay is set")
        load_weights(t.ema.module, state["ema"], state["meta"], last_path)
    rng = training["rng"]
    if len(rng) != t.info.world_size:
        _log(t.info, f"[train] note: {last_path} was written by {len(rng)} process(es), now "
                     f"{t.info.world_size}: the data order is unchanged, per-process RNG streams are not")
    set_rng_state(rng[t.info.rank % len(rng)])
    t.history = list(training["history"])
    t.best_miou = float(training["best_val_mIoU"])
    t.start_epoch = int(state["meta"]["epoch"])
    _log(t.info, f"[train] resuming {t.run_key} after epoch {t.start_epoch} from {last_path}")


def _wrap_for_ddp(model: nn.Module, info: DistInfo,
                  device: torch.device) -> tuple[nn.Module, BatchNormReplay | None]:
    """The model under DDP and its BatchNorm replay; the model itself and None in one process."""
    if not info.enabled:
        return model, None
    # BatchNorm running statistics are replayed in one-process order (see BatchNormReplay), so DDP's
    # buffer broadcast from rank 0 is not wanted.
    bn_replay = BatchNormReplay(model, info)
    ddp_model = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True, broadcast_buffers=False)
    return ddp_model, bn_replay


def _train_epoch(t: _Training, epoch: int) -> tuple[float, int]:
    """One pass over the training set; returns (mean micro-batch loss over all ranks, images seen)."""
    from remamber.data.datasets import collate_batch

    tc, info, device, accumulation = t.cfg.train, t.info, t.device, t.accumulation
    model, ddp_model, optimizer, scaler = t.model, t.ddp_model, t.optimizer, t.scaler
    t.schedule.set_epoch(epoch)
    t.train_ds.set_epoch(epoch)
    sampler = GlobalBatchSampler(len(t.train_ds), tc.per_device_batch_size, info.world_size, info.rank,
                                 accumulation, tc.seed, epoch)
    loader = torch.utils.data.DataLoader(
        t.train_ds, batch_sampler=sampler, num_workers=tc.num_workers, collate_fn=collate_batch,
        generator=torch.Generator().manual_seed(epoch_seed(tc.seed, epoch)),
        pin_memory=device.type == "cuda")
    ddp_model.train()
    params = all_params(optimizer.param_groups)
    loss_sum = torch.zeros((), dtype=torch.float64)
    bar = tqdm(total=sampler.steps, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not info.is_main,
               dynamic_ncols=True, leave=False)
    for micro, batch in enumerate(loader):
        step, k = divmod(micro, accumulation)
        last_micro = k == accumulation - 1
        # Dropout/drop-path masks depend on the micro-batch's place in the epoch only, so N
        # processes draw what one process would (and a resumed run what the straight one did).
        torch.manual_seed(micro_batch_seed(tc.seed, epoch, sampler.global_micro_index(micro)))
        input_ids, attention_mask = model.tokenize(list(batch["text"]))
        sync = nullcontext() if (last_micro or not info.enabled) else ddp_model.no_sync()
        with sync:
            with _autocast(device, t.amp_dtype):
                logits = ddp_model(batch["image"].to(device, non_blocking=True),
                                   input_ids.to(device), attention_mask.to(device))
            loss = dice_bce_loss(logits.float(), batch["mask"].to(device, non_blocking=True))
            if any_rank(not bool(torch.isfinite(loss)), info, device):
                kept = (f"The last good checkpoint {t.last_path} is untouched." if t.last_path.exists()
                        else "No checkpoint was written (no epoch finished).")
                raise NonFiniteLossError(
                    f"{t.run_key}: non-finite loss ({loss.item()} on rank {info.rank}) at epoch "
                    f"{epoch + 1}, step {step + 1} (micro-batch {k + 1}/{accumulation}); stopped. "
                    f"{kept}")
            scaler.scale(loss / accumulation).backward()
        loss_sum += loss.detach().double().cpu()
        if last_micro:
            if tc.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if t.bn_replay is not None:
                t.bn_replay.finish_step()
            if t.ema is not None:
                t.ema.update(model)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    mean_loss = _global_mean(loss_sum, sampler.steps * accumulation, info, device)
    return mean_loss, sampler.steps * tc.global_batch_size


def _scored_model(t: _Training) -> nn.Module:
    """The weights validation scores, best.pt keeps and evaluation uses: the EMA's unless ema_select is raw
    (the authors select and report the raw model even when they keep an EMA)."""
    return t.ema.module if t.ema is not None and t.cfg.train.ema_select == "ema" else t.model


def _validate(t: _Training, epoch: int) -> dict[str, Any] | None:
    """Val mIoU/oIoU of this epoch's weights, on rank 0 (None elsewhere)."""
    from remamber.data.datasets import collate_batch

    if not t.info.is_main:
        return None
    ev = t.cfg.evaluate
    val_loader = torch.utils.data.DataLoader(t.val_ds, batch_size=ev.batch_size, shuffle=False,
                                             num_workers=ev.num_workers, collate_fn=collate_batch)
    return score_loader(_scored_model(t), val_loader, ev.protocol, t.device, desc=f"val {epoch + 1}",
                        amp_dtype=t.amp_dtype if t.cfg.train.eval_amp else None).result()


def _end_epoch(t: _Training, run: Any, epoch: int, mean_loss: float, val: dict[str, Any], images: int,
               train_seconds: float, t0: float, rng_states: list[dict[str, Any]]) -> None:
    """Rank 0 after an epoch: the history entry, best.pt when val mIoU improved, last.pt, history.json, the
    MLflow run."""
    tc = t.cfg.train
    entry = {"epoch": epoch + 1, "loss": mean_loss, "lr": _new_lr(t.optimizer),
             "val_mIoU": val["mIoU"], "val_oIoU": val["oIoU"],
             "images_per_s": images / train_seconds if train_seconds > 0 else 0.0,
             "seconds": time.perf_counter() - t0}
    t.history.append(entry)
    improved = val["mIoU"] > t.best_miou
    t.best_miou = max(t.best_miou, val["mIoU"])
    meta = {**t.meta_base, "epoch": epoch + 1, "val_mIoU": val["mIoU"], "val_oIoU": val["oIoU"]}
    ema_state = t.ema.state_dict() if t.ema is not None else None
    validated_ema = t.ema is not None and tc.ema_select == "ema"
    if improved:  # the validated weights only: what evaluation and prediction load
        save_checkpoint(t.best_path, t.model, meta, model_state=ema_state if validated_ema else None,
                        model_weights="ema" if validated_ema else "raw", frozen=t.frozen)
    save_checkpoint(t.last_path, t.model, meta, ema_state=ema_state, frozen=t.frozen, training={
        # After the last epoch nothing resumes from the optimizer's moments (twice the weights):
        # they are dropped, a finished last.pt keeps the weights and the history.
        "optimizer": t.optimizer.state_dict() if epoch + 1 < tc.epochs else None,
        "schedule": t.schedule.state_dict(),
        "scaler": t.scaler.state_dict(), "rng": rng_states, "history": t.history,
        "best_val_mIoU": t.best_miou,
        "data_order": {"seed": tc.seed, "next_epoch": epoch + 1, "world_size": t.info.world_size},
    })
    _write_history(t)
    run.sync_history(t.history, TRACKED_KEYS, "epoch")
    _log(t.info, f"[train] epoch {epoch + 1}/{tc.epochs}: loss {mean_loss:.4f}, "
                 f"val mIoU {val['mIoU']:.2f}, oIoU {val['oIoU']:.2f}, "
                 f"{entry['images_per_s']:.1f} img/s{' (best)' if improved else ''}")


def _write_history(t: _Training) -> None:
    atomic_write_text(t.history_path, json.dumps(t.history, indent=2) + "\n")


def _finish(t: _Training, run: Any) -> None:
    """Rank 0 after the last epoch: history.json (also when nothing was left to train), the MLflow run's
    artifact and the checkpoint tags."""
    if not t.history_path.exists() or t.start_epoch >= t.cfg.train.epochs:
        _write_history(t)
    run.log_artifact(t.history_path)
    if t.best_path.exists():
        run.set_tags({"remamber.checkpoint": str(t.best_path),
                      "remamber.checkpoint_sha256": file_sha256(t.best_path)})


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return nullcontext() if amp_dtype is None else torch.autocast(device_type=device.type, dtype=amp_dtype)


def _new_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the new modules (fusion + decoder), the one the history reports."""
    return next(g["lr"] for g in optimizer.param_groups if g["name"].startswith("new/"))


def _global_mean(total: torch.Tensor, count: int, info: DistInfo, device: torch.device) -> float:
    """Mean micro-batch loss over all ranks (the same number as one process would report)."""
    if info.enabled:
        import torch.distributed as dist

        t = torch.stack([total, torch.tensor(float(count), dtype=torch.float64)]).to(device)
        dist.all_reduce(t)
        return float(t[0] / t[1])
    return float(total / count)


def _check_resumable(path: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    for key in ("config_hash", "dataset", "variant", "resolution", "data_hash"):
        if saved.get(key) != now[key]:
            raise CheckpointError(f"{path}: cannot resume: {key} was {saved.get(key)!r}, now {now[key]!r} "
                                  f"(delete the folder or train without resume)")


def _open_tracking(cfg: ExperimentConfig, info: DistInfo, experiment: str, meta: dict[str, Any],
                   tables: list[str], key: str, fresh: bool, uri: str | None):
    """The MLflow run of this model (keyed by run key and output folder) on rank 0; a no-op handle
    elsewhere or when tracking is off. `fresh`: the history starts again, so a run that already holds
    metrics under this key is superseded rather than mixed with the new ones."""
    from remamber.tracking import NoOpRun, Tracker, TrackingConfig

    if not info.is_main or not cfg.tracking["enabled"]:
        return NoOpRun()
    tracker = Tracker(TrackingConfig(**{**cfg.tracking, "uri": uri or cfg.tracking["uri"]}))
    tags = {"remamber.config_hash": meta["config_hash"], "remamber.data_hash": meta["data_hash"],
            "remamber.dataset": meta["dataset"], "remamber.variant": meta["variant"],
            "remamber.resolution": meta["resolution"], "remamber.tables": ",".join(tables),
            "remamber.config_name": cfg.name, "remamber.index": meta["index"]}
    params = {**cfg.to_dict(), "job": {"dataset": meta["dataset"], "variant": meta["variant"],
                                       "resolution": meta["resolution"]}}
    return tracker.training_run(experiment, key, params=params, tags=tags,
                                run_name=meta["run_key"], fresh=fresh)
