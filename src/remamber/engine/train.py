"""Training loop: one (dataset, variant, resolution) job of the experiment matrix (docs/design.md, section 3).

Outputs in `out_dir`: `last.pt` (every epoch, with everything needed to resume exactly), `best.pt` (the
validated weights of the best val mIoU, nothing else), `history.json` (one dict per epoch; the MLflow run's
metrics are a replayable view of it). Launch under `torchrun --nproc_per_node N` for DDP.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from remamber.config import ConfigError, ExperimentConfig
from remamber.errors import RemamberError
from remamber.data.catalog import pinned_pretrained
from remamber.engine.jobs import model_config
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
# Temporary files of the atomic writers (checkpoint.atomic_torch_save, _write_json_atomic): ".NAME.tmp-PID".
_TMP_RE = re.compile(r"^\.(last\.pt|best\.pt|history\.json)\.tmp-(\d+)$")


class NonFiniteLossError(RemamberError, FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is left as it was."""


def _log(info: DistInfo, message: str) -> None:
    if info.is_main:
        tqdm.write(message, file=sys.stderr)


def _write_json_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def out_dir_id(out_dir: str | Path) -> str:
    """A short stable id of an output folder (its absolute path): part of the MLflow run key, so two
    trainings of one model in different folders get two runs."""
    return hashlib.sha256(os.path.abspath(os.fspath(out_dir)).encode("utf-8")).hexdigest()[:12]


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


def _train(cfg: ExperimentConfig, dataset: str, variant: str, resolution: int, out_dir: Path, resume: bool,
           experiment: str, tables: list[str], device: torch.device, info: DistInfo, overwrite: bool,
           tracking_uri: str | None) -> dict[str, Any]:
    from remamber.data.checks import check_images, report_long_sentences
    from remamber.data.datasets import RefSegDataset, collate_batch
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
    if info.is_main:
        report_long_sentences(model, index_dir, ["train", "val"])  # a warning with the count, not silence
    pretrained_backbone = model_cfg.pretrained_backbone is not None
    optimizer = build_optimizer(model, tc, pretrained_backbone)
    schedule = CosineEpochSchedule(optimizer, tc.min_lr, tc.epochs)
    amp_dtype = _amp_dtype(tc.amp, device, tc.amp_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = ModelEMA(model, tc.ema_decay) if tc.ema_decay is not None else None

    meta_base = {
        "config": cfg.to_dict(), "config_name": cfg.name, "config_hash": cfg.config_hash(),
        "model_config": model_cfg.to_dict(), "dataset": dataset, "variant": variant,
        "resolution": resolution, "data_hash": d_hash, "run_key": run_key, "experiment": experiment,
        "tables": list(tables), "world_size": info.world_size,
        "tracking_key": f"{run_key}@{out_dir_id(out_dir)}", "index": str(index_dir),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path, history_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "history.json"
    if info.is_main:
        for stale in _remove_stale_temporaries(out_dir):
            _log(info, f"[train] removed {stale}, left by a writer that was killed")
        if overwrite and not (resume and last_path.exists()):
            for path in (last_path, best_path, history_path):
                path.unlink(missing_ok=True)
    barrier(info)

    history: list[dict[str, Any]] = []
    best_miou = -math.inf
    start_epoch = 0
    if resume and last_path.exists():
        state = read_checkpoint(last_path)
        _check_resumable(last_path, state["meta"], meta_base)
        load_weights(model, state["model"], state["meta"], last_path)
        training = state["training"]
        if training is None:
            raise CheckpointError(f"{last_path}: holds no training state, cannot resume from it")
        if training["optimizer"] is not None:
            optimizer.load_state_dict(training["optimizer"])
        elif int(state["meta"]["epoch"]) < tc.epochs:
            raise CheckpointError(f"{last_path}: holds no optimizer state but only epoch "
                                  f"{state['meta']['epoch']} of {tc.epochs} finished; cannot resume from it")
        schedule.load_state_dict(training["schedule"])
        scaler.load_state_dict(training["scaler"])
        if ema is not None:
            if state["ema"] is None:
                raise CheckpointError(f"{last_path}: no EMA state but train.ema_decay is set")
            load_weights(ema.module, state["ema"], state["meta"], last_path)
        rng = training["rng"]
        if len(rng) != info.world_size:
            _log(info, f"[train] note: {last_path} was written by {len(rng)} process(es), now "
                       f"{info.world_size}: the data order is unchanged, per-process RNG streams are not")
        set_rng_state(rng[info.rank % len(rng)])
        history = list(training["history"])
        best_miou = float(training["best_val_mIoU"])
        start_epoch = int(state["meta"]["epoch"])
        _log(info, f"[train] resuming {run_key} after epoch {start_epoch} from {last_path}")
    elif resume:
        _log(info, f"[train] no {last_path}: starting {run_key} from scratch")

    ddp_model: nn.Module = model
    bn_replay = None
    if info.enabled:
        # BatchNorm running statistics are replayed in one-process order (see BatchNormReplay), so DDP's
        # buffer broadcast from rank 0 is not wanted.
        bn_replay = BatchNormReplay(model, info)
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True, broadcast_buffers=False)

    tracker_run = _open_tracking(cfg, info, experiment, meta_base, tables, fresh=start_epoch == 0,
                                 uri=tracking_uri)
    params = all_params(optimizer.param_groups)
    with tracker_run as run:
        run.log_dataset(dataset, d_hash, str(index_dir), "train")
        run.sync_history(history, TRACKED_KEYS, "epoch")  # what a kill or a store outage kept from it
        for epoch in range(start_epoch, tc.epochs):
            t0 = time.perf_counter()
            schedule.set_epoch(epoch)
            train_ds.set_epoch(epoch)
            sampler = GlobalBatchSampler(len(train_ds), tc.per_device_batch_size, info.world_size, info.rank,
                                         accumulation, tc.seed, epoch)
            loader = torch.utils.data.DataLoader(
                train_ds, batch_sampler=sampler, num_workers=tc.num_workers, collate_fn=collate_batch,
                generator=torch.Generator().manual_seed(epoch_seed(tc.seed, epoch)),
                pin_memory=device.type == "cuda")
            ddp_model.train()
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
                    with _autocast(device, amp_dtype):
                        logits = ddp_model(batch["image"].to(device, non_blocking=True),
                                           input_ids.to(device), attention_mask.to(device))
                    loss = dice_bce_loss(logits.float(), batch["mask"].to(device, non_blocking=True))
                    if any_rank(not bool(torch.isfinite(loss)), info, device):
                        kept = (f"The last good checkpoint {last_path} is untouched." if last_path.exists()
                                else "No checkpoint was written (no epoch finished).")
                        raise NonFiniteLossError(
                            f"{run_key}: non-finite loss ({loss.item()} on rank {info.rank}) at epoch "
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
                    if bn_replay is not None:
                        bn_replay.finish_step()
                    if ema is not None:
                        ema.update(model)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.close()
            train_seconds = time.perf_counter() - t0
            n_micro = sampler.steps * accumulation
            mean_loss = _global_mean(loss_sum, n_micro, info, device)
            images = sampler.steps * tc.global_batch_size

            val = None
            if info.is_main:
                val_loader = torch.utils.data.DataLoader(
                    val_ds, batch_size=cfg.evaluate.batch_size, shuffle=False,
                    num_workers=cfg.evaluate.num_workers, collate_fn=collate_batch)
                # the authors select (and report) the raw model even when they keep an EMA: ema_select raw
                scored = ema.module if ema is not None and tc.ema_select == "ema" else model
                val = score_loader(scored, val_loader, cfg.evaluate.protocol, device, desc=f"val {epoch + 1}",
                                   amp_dtype=amp_dtype if tc.eval_amp else None).result()
            rng_states = gather_rng_states(info)
            if info.is_main:
                entry = {"epoch": epoch + 1, "loss": mean_loss, "lr": _new_lr(optimizer),
                         "val_mIoU": val["mIoU"], "val_oIoU": val["oIoU"],
                         "images_per_s": images / train_seconds if train_seconds > 0 else 0.0,
                         "seconds": time.perf_counter() - t0}
                history.append(entry)
                improved = val["mIoU"] > best_miou
                best_miou = max(best_miou, val["mIoU"])
                meta = {**meta_base, "epoch": epoch + 1, "val_mIoU": val["mIoU"], "val_oIoU": val["oIoU"]}
                ema_state = ema.state_dict() if ema is not None else None
                validated_ema = ema is not None and tc.ema_select == "ema"
                if improved:  # the validated weights only: what evaluation and prediction load
                    save_checkpoint(best_path, model, meta, model_state=ema_state if validated_ema else None,
                                    model_weights="ema" if validated_ema else "raw", frozen=frozen)
                save_checkpoint(last_path, model, meta, ema_state=ema_state, frozen=frozen, training={
                    # After the last epoch nothing resumes from the optimizer's moments (twice the weights):
                    # they are dropped, a finished last.pt keeps the weights and the history.
                    "optimizer": optimizer.state_dict() if epoch + 1 < tc.epochs else None,
                    "schedule": schedule.state_dict(),
                    "scaler": scaler.state_dict(), "rng": rng_states, "history": history,
                    "best_val_mIoU": best_miou,
                    "data_order": {"seed": tc.seed, "next_epoch": epoch + 1, "world_size": info.world_size},
                })
                _write_json_atomic(history, history_path)
                run.sync_history(history, TRACKED_KEYS, "epoch")
                _log(info, f"[train] epoch {epoch + 1}/{tc.epochs}: loss {mean_loss:.4f}, "
                           f"val mIoU {val['mIoU']:.2f}, oIoU {val['oIoU']:.2f}, "
                           f"{entry['images_per_s']:.1f} img/s{' (best)' if improved else ''}")
            barrier(info)

        if info.is_main:
            if not history_path.exists() or start_epoch >= tc.epochs:
                _write_json_atomic(history, history_path)
            run.log_artifact(history_path)
            if best_path.exists():
                run.set_tags({"remamber.checkpoint": str(best_path),
                              "remamber.checkpoint_sha256": file_sha256(best_path)})
    return {"best": str(best_path), "last": str(last_path), "history": str(history_path),
            "best_val_mIoU": best_miou}


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
                   tables: list[str], fresh: bool, uri: str | None):
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
    return tracker.training_run(experiment, meta["tracking_key"], params=params, tags=tags,
                                run_name=meta["run_key"], fresh=fresh)
