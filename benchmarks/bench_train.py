"""Training throughput and peak memory.

Default (CPU): the demo configuration (params/demo.yaml: its model, its recipe, its low resolution) trained
by the real `remamber.engine.train.train` for one epoch on the synthetic `demo` RefCOCO written to a
temporary folder. Each configuration runs in a fresh subprocess; peak memory is that process's max RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`), images/s is the epoch's training images over its training
time (validation excluded), as `history.json` reports it.

--paper (CUDA): the paper configuration (vmamba_base + CLIP-L/14 text encoder + twister) at 256 and 480,
per-device batch 8, AdamW + bf16 autocast, on random images/masks/expressions, once with the mamba_ssm
CUDA scan kernels and once with the pure PyTorch scan; peak memory is torch.cuda.max_memory_allocated.
The CLIP weights come from the Hugging Face cache (HF_HOME); pass --text-encoder tiny-random-bert on a
machine without it (the row then says so).

    python benchmarks/bench_train.py [--epochs 1] [--resolution 64] [--variants twister,attention]
    python benchmarks/bench_train.py --paper [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cpu_worker(args: argparse.Namespace) -> dict:
    import torch

    from remamber.config import ExperimentConfig
    from remamber.engine.train import train

    base = ExperimentConfig.from_yaml(ROOT / "params" / "demo.yaml").to_dict()
    base["data"]["raw"] = str(Path(args.data) / "raw")
    base["data"]["processed"] = str(Path(args.data) / "processed")
    base["train"]["epochs"] = args.epochs
    base["train"]["val_subset"] = 8  # validation is not what is measured; keep it short
    base["tracking"]["enabled"] = False
    cfg = ExperimentConfig.from_dict(base, source="params/demo.yaml (benchmark copy)")
    out = Path(args.data) / f"run-{args.variant}-{args.resolution}"
    result = train(cfg, "refcoco", args.variant, args.resolution, out, tables=[], experiment="bench")
    history = json.loads(Path(result["history"]).read_text())
    return {
        "variant": args.variant, "resolution": args.resolution,
        "batch": cfg.train.per_device_batch_size, "threads": torch.get_num_threads(),
        "images_per_s": history[-1]["images_per_s"], "epoch_s": history[-1]["seconds"],
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _force_scan_backend(backend: str) -> None:
    """Route every selective_scan call of the models to `backend` (benchmark only)."""
    import functools

    import remamber.ops as ops

    original = ops.selective_scan
    forced = functools.partial(original, backend=backend)
    for name, module in list(sys.modules.items()):
        if name.startswith("remamber.models") and getattr(module, "selective_scan", None) is original:
            module.selective_scan = forced


def _paper_worker(args: argparse.Namespace) -> dict:
    import torch

    import remamber.models  # noqa: F401  (import the modules whose scan gets routed)
    from remamber.models import build_model, dice_bce_loss, variant_config

    _force_scan_backend(args.backend)
    torch.manual_seed(0)
    device = torch.device("cuda")
    cfg = variant_config("twister", backbone="vmamba_base", text_encoder=args.text_encoder)
    model = build_model(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=1e-4)
    b, r = args.batch, args.resolution
    images = torch.randn(b, 3, r, r, device=device)
    masks = (torch.rand(b, 1, r, r, device=device) > 0.7).float()
    ids, am = model.tokenize(["the second red cup from the left on the table"] * b)
    ids, am = ids.to(device), am.to(device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(images, ids, am)
        dice_bce_loss(logits.float(), masks).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"resolution": r, "backend": args.backend, "text_encoder": args.text_encoder, "batch": b,
            "images_per_s": args.steps * b / seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def _run_child(argv: list[str]) -> dict | str:
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:120]}"
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paper", action="store_true", help="the paper configuration on CUDA")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--resolution", type=int, default=None, help="default: demo low (CPU) / 256 and 480")
    p.add_argument("--variants", default="twister")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-encoder", default="clip-vit-large-patch14")
    p.add_argument("--worker", choices=["cpu", "paper"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker == "cpu":
        print(json.dumps(_cpu_worker(args)))
        return
    if args.worker == "paper":
        print(json.dumps(_paper_worker(args)))
        return

    if args.paper:
        rows = []
        for res in [args.resolution] if args.resolution else [256, 480]:
            for backend in ("mamba_ssm", "torch"):
                got = _run_child(["--worker", "paper", "--resolution", str(res), "--backend", backend,
                                  "--steps", str(args.steps), "--batch", str(args.batch),
                                  "--text-encoder", args.text_encoder])
                rows.append(got if isinstance(got, dict) else {"resolution": res, "backend": backend,
                                                               "error": got})
        print(f"{'res':>4} {'scan':>10} {'batch':>5} {'img/s':>8} {'peak GiB':>9}  text encoder")
        for r in rows:
            if "error" in r:
                print(f"{r['resolution']:>4} {r['backend']:>10}  {r['error']}")
            else:
                print(f"{r['resolution']:>4} {r['backend']:>10} {r['batch']:>5} {r['images_per_s']:>8.2f} "
                      f"{r['peak_gib']:>9.2f}  {r['text_encoder']}")
        return

    from remamber.config import ExperimentConfig
    from remamber.data.preprocess import preprocess
    from remamber.data.synth import write_synthetic

    demo = ExperimentConfig.from_yaml(ROOT / "params" / "demo.yaml", check_model=False)
    resolution = args.resolution or demo.experiments.resolutions["low"]
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        write_synthetic(Path(tmp) / "raw", seed=0, size="demo", progress=False)
        preprocess(Path(tmp) / "raw", "refcoco", Path(tmp) / "processed" / "refcoco", progress=False)
        rows = []
        for variant in args.variants.split(","):
            got = _run_child(["--worker", "cpu", "--data", tmp, "--variant", variant, "--resolution",
                              str(resolution), "--epochs", str(args.epochs)])
            rows.append(got if isinstance(got, dict) else {"variant": variant, "error": got})
    print(f"demo configuration ({demo.model['backbone']} + {demo.model['text_encoder']}), CPU, "
          f"{os.cpu_count()} cores, synthetic demo RefCOCO")
    print(f"{'variant':>16} {'res':>4} {'batch':>5} {'threads':>7} {'img/s':>7} {'epoch s':>8} {'max RSS MB':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:>16}  {r['error']}")
        else:
            print(f"{r['variant']:>16} {r['resolution']:>4} {r['batch']:>5} {r['threads']:>7} "
                  f"{r['images_per_s']:>7.1f} {r['epoch_s']:>8.1f} {r['max_rss_mb']:>11.0f}")


if __name__ == "__main__":
    main()
