"""GPU check of the paper configuration (issue 14): a short training with the authors' recipe, then the
CUDA forward (mamba_ssm kernels) against the CPU forward (the project's numba `cpu` scan) on the same
weights and inputs. One prepared script for a lent GPU (about 5-8 min on one H100 at the defaults).

1. Data: `write_synthetic` (what `remamber synth` writes) of --synth-size (default demo: 600 train
   images) in a temporary folder, preprocessed as params/paper.yaml's data section asks (mask_mode,
   text_field), read by the engine's RefSegDataset at --resolution (default 256) px: a real refer-format
   set, not random tensors.
2. Model: params/paper.yaml's `model:` section, variant twister. The CLIP-L/14 text encoder is read from
   the Hugging Face cache (HF_HOME, offline); where it is absent, tiny-random-bert replaces it and the
   output says so. The ImageNet backbone is loaded when its file (paper.yaml's pretrained_backbone) is
   here, else the backbone starts random (said too).
3. Training, the authors' way: params/paper.yaml's train section (AdamW groups of engine/optim.py with
   its weight_decay_scope, lr at epoch 0 of its schedule, EMA 0.9999), fp16 autocast and a GradScaler,
   per-device batch --batch (default: paper's 8), --steps steps (default 300) with the mamba_ssm CUDA
   scan. Prints the mean loss every 50 steps, the median step time and peak CUDA memory.
4. CUDA vs CPU: the trained weights in eval mode on one batch: CUDA fp32 (mamba_ssm), CUDA under fp16
   autocast, and the same weights copied to CPU (scan backend `cpu`) in fp32; max abs / max rel
   difference of the logits and of the sigmoid masks, and the IoU of the two binarised masks.

With no CUDA device it prints one line and exits 0; with CUDA but no mamba_ssm it exits 3.

    python benchmarks/gpu_paper_check.py [--steps 300] [--resolution 256] [--batch 8] [--synth-size demo]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _build_model(cfg, device):
    """(model, text encoder name, note) from paper.yaml's model section; CLIP, else tiny-random-bert."""
    import dataclasses

    import torch

    from remamber.data.catalog import pinned_pretrained
    from remamber.engine.jobs import model_config
    from remamber.models import build_model

    mc = model_config(cfg, "twister")
    notes = []
    if mc.pretrained_backbone:
        path = ROOT / mc.pretrained_backbone  # an absolute path stays itself
        if not path.is_file():
            notes.append(f"backbone: {mc.pretrained_backbone} is not here, so it starts from random weights")
        mc = dataclasses.replace(mc, pretrained_backbone=str(path) if path.is_file() else None)
    pin = pinned_pretrained(mc.pretrained_backbone) if mc.pretrained_backbone else (None, None)
    torch.manual_seed(0)
    try:
        model = build_model(mc, backbone_pin=pin)
    except OSError as exc:  # the CLIP weights are not in the cache (no network on the GPU machines)
        notes.append(f"text encoder: {mc.text_encoder} is not in the Hugging Face cache ({str(exc)[:80]}...), "
                     "so tiny-random-bert replaces it: the loss and timings are not the paper's text path")
        mc = dataclasses.replace(mc, text_encoder="tiny-random-bert")
        torch.manual_seed(0)
        model = build_model(mc, backbone_pin=pin)
    return model.to(device), mc, notes


def _data(cfg, tmp: Path, size: str, resolution: int):
    from remamber.data.datasets import RefSegDataset
    from remamber.data.preprocess import preprocess
    from remamber.data.synth import write_synthetic

    write_synthetic(tmp / "raw", seed=0, size=size, progress=False)
    preprocess(tmp / "raw", "refcoco", tmp / "processed", mask_mode=cfg.data.mask_mode, progress=False,
               text_field=cfg.data.text_field)
    return RefSegDataset(tmp / "processed", "train", "train", resolution, tmp / "raw", seed=0)


def _batches(ds, batch: int, workers: int):
    import torch

    from remamber.data.datasets import collate_batch

    g = torch.Generator().manual_seed(0)
    while True:  # as many passes as the steps need
        yield from torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, generator=g,
                                               num_workers=workers, collate_fn=collate_batch, pin_memory=True)


def _train(model, cfg, mc, ds, args, device):
    import torch

    from remamber.engine.optim import CosineEpochSchedule, ModelEMA, build_optimizer
    from remamber.models import dice_bce_loss

    tc = cfg.train
    optimizer = build_optimizer(model, tc, mc.pretrained_backbone is not None)
    CosineEpochSchedule(optimizer, tc.min_lr, tc.epochs, lagged=tc.lr_schedule == "cosine_lagged").set_epoch(0)
    scaler = torch.amp.GradScaler("cuda")  # the authors' NativeScaler
    ema = ModelEMA(model, tc.ema_decay) if tc.ema_decay is not None else None
    print(f"train: {args.steps} steps, batch {args.batch}, {args.resolution} px, fp16 autocast + GradScaler, "
          f"weight_decay_scope {tc.weight_decay_scope}, lr_schedule {tc.lr_schedule}, "
          f"EMA {tc.ema_decay}; lr {({g['name']: g['lr'] for g in optimizer.param_groups})}", flush=True)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    batches = _batches(ds, args.batch, args.workers)
    for step in range(1, args.steps + 1):
        batch = next(batches)
        ids, am = model.tokenize(list(batch["text"]))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16):
            logits = model(batch["image"].to(device, non_blocking=True), ids.to(device), am.to(device))
        loss = dice_bce_loss(logits.float(), batch["mask"].to(device, non_blocking=True))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)  # the step on the GPU; loading and tokenising excluded
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            print(f"step {step}: non-finite loss {losses[-1]}; stopped")
            return False
        if step % 50 == 0 or step == args.steps:
            window = losses[-50:]
            print(f"step {step:>5}: loss {statistics.fmean(window):.4f} (mean of last {len(window)}), "
                  f"median step {1e3 * statistics.median(times[-50:]):.1f} ms, scale {scaler.get_scale():.0f}",
                  flush=True)
    skip = 5 if len(times) > 5 else 0  # the first steps pick cuDNN algorithms and fill the allocator
    steady = statistics.median(times[skip:])
    print(f"train: median step {1e3 * steady:.1f} ms ({args.batch / steady:.1f} img/s) over steps "
          f"{skip + 1}..{args.steps}; peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB "
          f"allocated, {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved", flush=True)
    return True


def _compare(model, ds, batch: int, device) -> None:
    import torch

    from remamber.data.datasets import collate_batch

    items = collate_batch([ds[i] for i in range(min(batch, len(ds)))])
    ids, am = model.tokenize(list(items["text"]))
    model.eval()
    with torch.no_grad():
        cuda32 = model(items["image"].to(device), ids.to(device), am.to(device)).double().cpu()
        with torch.autocast("cuda", dtype=torch.float16):
            cuda16 = model(items["image"].to(device), ids.to(device), am.to(device)).double().cpu()
        cpu_model = copy.deepcopy(model).cpu()
        cpu = cpu_model(items["image"], ids, am).double()

    def row(name, got):
        diff = (got - cpu).abs()
        rel = (diff / cpu.abs().clamp_min(1e-6)).max().item()
        p, q = got.sigmoid(), cpu.sigmoid()
        a, b = got > 0, cpu > 0
        union = (a | b).sum().item()
        iou = (a & b).sum().item() / union if union else 1.0  # both empty: the same mask
        print(f"{name:<34} logits max abs {diff.max().item():.3e}, max rel {rel:.3e}, mean abs {diff.mean().item():.3e}"
              f"; sigmoid max abs {(p - q).abs().max().item():.3e}; mask IoU {iou:.6f}", flush=True)

    print(f"compare on {cuda32.shape[0]} training images ({tuple(cuda32.shape)} logits, |logit| max "
          f"{cpu.abs().max().item():.2f}), against the CPU forward (scan backend cpu, fp32):")
    row("CUDA fp32 (mamba_ssm)", cuda32)
    row("CUDA fp16 autocast (mamba_ssm)", cuda16)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=None, help="default: params/paper.yaml's per-device batch")
    ap.add_argument("--synth-size", default="demo", help="remamber synth --size (demo: 600 train images)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_paper_check: no CUDA device here; nothing to check (run this on a GPU machine).")
        return 0
    from remamber.config import ExperimentConfig
    from remamber.ops import available_backends

    if "mamba_ssm" not in available_backends():
        print("gpu_paper_check: mamba_ssm does not import here; install the kernels (pip install -e '.[cuda]')")
        return 3
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machines reach no network: read the cache only
    torch.backends.cudnn.benchmark = True  # as the authors
    cfg = ExperimentConfig.from_yaml(ROOT / "params" / "paper.yaml")
    args.batch = args.batch or cfg.train.per_device_batch_size
    device = torch.device("cuda")
    print(f"gpu_paper_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}; "
          f"scan backends {available_backends()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_paper_check_") as tmp:
        t0 = time.perf_counter()
        ds = _data(cfg, Path(tmp), args.synth_size, args.resolution)
        print(f"data: synthetic refcoco ({args.synth_size}), {len(ds)} training objects at {args.resolution} px, "
              f"mask_mode {cfg.data.mask_mode}, text_field {cfg.data.text_field} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        model, mc, notes = _build_model(cfg, device)
        for note in notes:
            print(f"NOTE {note}")
        n = sum(p.numel() for n_, p in model.named_parameters() if not n_.startswith("text_encoder."))
        print(f"model: paper.yaml twister, text encoder {mc.text_encoder}, {n / 1e6:.3f}M parameters outside it",
              flush=True)
        ok = _train(model, cfg, mc, ds, args, device)
        _compare(model, ds, 2, device)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
