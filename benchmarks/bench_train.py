"""Training throughput and where a step's time goes.

Default (CPU): one training step of the demo twister (the `model:` section of params/demo.yaml, its
per-device batch, its two resolutions), one thread, with the text encoder trained and frozen
(`TextEncoder.freeze()`: no gradients, eval mode, forward under no_grad, out of the optimizer; and, as the
engine does, `remember()` of the batch's sentences, so their features are read back, not encoded). The step
is the engine's: forward, Dice+BCE loss, backward, gradient clipping, AdamW step, zero_grad, on a fixed
random batch (data loading is not measured). Times are process CPU seconds (one thread: this is the
step's compute even on a loaded machine), the median over --repeats steps after two warm-up steps.
Printed per row:
    img/s           batch / step time
    shares          each part's forward+backward replayed alone on the inputs and output gradients it
                    saw in a real step (text encoder, backbone, fusion, decoder, loss, optimizer); "rest"
                    is the step minus their sum (Python glue; noise can make it negative)
    GFLOP, floor    forward+backward FLOPs counted by torch.utils.flop_counter (matmuls, convolutions,
                    attention; elementwise ops and the selective scan are not counted), and the fraction
                    of the arithmetic floor reached: FLOPs / (step time x measured 1-thread fp32 matmul
                    GFLOP/s of this machine)
--baseline SRC runs the same measurement with SRC (another checkout's src/, e.g. a git worktree of an
older commit) on PYTHONPATH, interleaved round by round with the current one, and prints both.

--paper (CUDA): the paper configuration (vmamba_base + CLIP-L/14 text encoder + twister) at 256 and 480,
per-device batch 8, AdamW + bf16 autocast, on random images/masks/expressions, once with the mamba_ssm
CUDA scan kernels and once with the pure PyTorch scan; peak memory is torch.cuda.max_memory_allocated.
The CLIP weights come from the Hugging Face cache (HF_HOME); pass --text-encoder tiny-random-bert on a
machine without it (the row then says so).

    python benchmarks/bench_train.py [--resolutions 48 64] [--repeats 5] [--rounds 2] [--baseline SRC]
    python benchmarks/bench_train.py --paper [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("text", "backbone", "fusion", "decoder", "loss", "optimizer")


def _matmul_gflops() -> float:
    """Best-of fp32 matmul throughput of this machine at the current thread count (GFLOP/s)."""
    import torch

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    best = float("inf")
    for _ in range(20):
        t0 = time.process_time()
        for _ in range(4):
            torch.mm(a, b)
        best = min(best, (time.process_time() - t0) / 4)
    return 2 * 512**3 / best / 1e9


def _demo_setup(resolution: int, frozen: bool, batch: int | None):
    """(model, optimizer, params, images, masks, ids, mask, train_cfg) for the demo twister."""
    import torch

    import remamber
    from remamber.config import ExperimentConfig
    from remamber.engine.optim import build_optimizer
    from remamber.models import build_model

    params_file = Path(remamber.__file__).resolve().parents[2] / "params" / "demo.yaml"  # the library's own
    cfg = ExperimentConfig.from_yaml(params_file)
    try:
        from remamber.engine.jobs import model_config

        model_cfg = model_config(cfg, "twister")
    except ImportError:  # an older checkout (--baseline): the config built the model section itself
        model_cfg = cfg.model_config("twister")
    torch.manual_seed(0)
    model = build_model(model_cfg).train()
    if frozen:
        enc = model.text_encoder
        if hasattr(enc, "freeze"):
            enc.freeze()
        else:  # an older checkout: the same by hand
            enc.requires_grad_(False)
            forward = enc.forward
            enc.forward = lambda *a, **k: torch.no_grad()(forward)(*a, **k)
            enc.train = lambda mode=True: torch.nn.Module.train(enc, False)
            enc.eval()
    optimizer = build_optimizer(model, cfg.train, False)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    b = batch or cfg.train.per_device_batch_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, resolution, resolution, generator=g)
    masks = (torch.rand(b, 1, resolution, resolution, generator=g) > 0.7).float()
    sentences = [f"the red circle left of the blue square number {i}" for i in range(b)]
    ids, am = model.tokenize(sentences)
    if frozen and hasattr(model.text_encoder, "remember"):  # as the engine: a frozen encoder's features kept
        model.text_encoder.remember(sentences)
    return model, optimizer, params, images, masks, ids, am, cfg.train


def _cpu_worker(args: argparse.Namespace) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from remamber.models import dice_bce_loss

    frozen = args.text == "frozen"
    model, opt, params, images, masks, ids, am, tc = _demo_setup(args.resolution, frozen, args.batch)
    model(images[:2], ids[:2], am[:2])  # imports and compiles the scan kernels (numba starts its threads)
    import numba

    torch.set_num_threads(1)  # after numba's start-up, which can reset the OpenMP thread count
    numba.set_num_threads(1)
    b = images.shape[0]

    def step() -> float:
        loss = dice_bce_loss(model(images, ids, am), masks)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    # one step by hand, mirroring ReMamber.forward, keeping every part's inputs and output gradients
    masking = model.config.mask_text_padding
    text_mask = am.bool() if masking else None
    words, pooled = model.text_encoder(ids, am, mask_padding=masking)
    seen: dict[str, list] = {"blocks": [], "fusion": [], "down": []}
    x = model.backbone.patch_embed(images)
    seen["patch"] = x
    features = []
    for stage, fusion in zip(model.backbone.layers, model.fusion):
        xin = x
        x = stage.blocks(xin)
        seen["blocks"].append((xin, x))
        fin = x
        x = fusion(fin, words, pooled, text_mask)
        seen["fusion"].append((fin, x))
        features.append(x)
        dout = stage.downsample(x)
        seen["down"].append((x, dout))
        x = dout
    logits = model.decoder(features, tuple(images.shape[-2:]))
    for t in [seen["patch"], logits, *(o for pair in seen["blocks"] + seen["fusion"] + seen["down"] for o in pair)]:
        if t.requires_grad:
            t.retain_grad()
    if words.requires_grad:
        words.retain_grad()
        pooled.retain_grad()
    dice_bce_loss(logits, masks).backward()
    grad = lambda t: t.grad if t.grad is not None else torch.zeros_like(t)  # noqa: E731
    opt.zero_grad(set_to_none=True)

    def leaf(t):
        return t.detach().requires_grad_(t.requires_grad)

    def replay(fn, inputs, outputs_and_grads):
        outs = fn(*inputs)
        outs = outs if isinstance(outs, (tuple, list)) else [outs]
        pairs = [(o, g) for o, g in zip(outs, outputs_and_grads) if o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])

    def part_text():
        replay(lambda: model.text_encoder(ids, am, mask_padding=masking), [],
               [grad(words), grad(pooled)] if words.requires_grad else [])

    def part_backbone():
        replay(model.backbone.patch_embed, [images], [grad(seen["patch"])])
        for stage, (xin, xout), (din, dout) in zip(model.backbone.layers, seen["blocks"], seen["down"]):
            replay(stage.blocks, [leaf(xin)], [grad(xout)])
            replay(stage.downsample, [leaf(din)], [grad(dout)])

    w, p = leaf(words), leaf(pooled)

    def part_fusion():
        for fusion, (fin, fout) in zip(model.fusion, seen["fusion"]):
            replay(lambda a: fusion(a, w, p, text_mask), [leaf(fin)], [grad(fout)])

    feats = [leaf(f) for f in features]

    def part_decoder():
        replay(lambda *f: model.decoder(list(f), tuple(images.shape[-2:])), feats, [grad(logits)])

    lg = leaf(logits)

    def part_loss():
        dice_bce_loss(lg, masks).backward()

    def part_optimizer():
        for q in params:
            if q.grad is None:
                q.grad = torch.zeros_like(q)
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    parts = dict(text=part_text, backbone=part_backbone, fusion=part_fusion, decoder=part_decoder,
                 loss=part_loss, optimizer=part_optimizer)
    losses = [step(), step()]  # warm-up (compiled kernels, allocator)
    times: dict[str, list[float]] = {k: [] for k in ("step", *PARTS)}
    for _ in range(args.repeats):  # round-robin: load changes hit every part alike
        t0 = time.process_time()
        losses.append(step())
        times["step"].append(time.process_time() - t0)
        for name, fn in parts.items():
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
            model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        loss = dice_bce_loss(model(images, ids, am), masks)
        loss.backward()
    opt.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"resolution": args.resolution, "text": args.text, "batch": b, "threads": torch.get_num_threads(),
            "step_s": med["step"], "parts_s": {k: med[k] for k in PARTS}, "flops": counter.get_total_flops(),
            "matmul_gflops": _matmul_gflops(), "losses": losses[:3]}


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


def _run_child(argv: list[str], pythonpath: str | None = None) -> dict | str:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath] + [q for q in [env.get("PYTHONPATH")] if q])
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paper", action="store_true", help="the paper configuration on CUDA")
    p.add_argument("--resolutions", type=int, nargs="+", default=None,
                   help="CPU: default the demo's two resolutions (params/demo.yaml)")
    p.add_argument("--resolution", type=int, default=None, help="--paper: one resolution (default 256 and 480)")
    p.add_argument("--repeats", type=int, default=5, help="CPU: measured steps per child process")
    p.add_argument("--rounds", type=int, default=2, help="CPU: child processes per row, interleaved")
    p.add_argument("--baseline", default=None, help="CPU: another checkout's src/ to measure alongside")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=None, help="default: demo per-device batch (CPU) / 8 (--paper)")
    p.add_argument("--text-encoder", default="clip-vit-large-patch14")
    p.add_argument("--worker", choices=["cpu", "paper"], help=argparse.SUPPRESS)
    p.add_argument("--text", choices=["trained", "frozen"], help=argparse.SUPPRESS)
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
                                  "--steps", str(args.steps), "--batch", str(args.batch or 8),
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

    if args.resolutions is None:
        import yaml

        demo = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())
        args.resolutions = sorted(demo["experiments"]["resolutions"].values())
    results: dict[tuple, list[dict]] = {}
    sides = [("current", None)] + ([("baseline", args.baseline)] if args.baseline else [])
    for _ in range(args.rounds):
        for res in args.resolutions:
            for text in ("trained", "frozen"):
                for side, src in sides:
                    got = _run_child(["--worker", "cpu", "--resolution", str(res), "--text", text,
                                      "--repeats", str(args.repeats)] + (["--batch", str(args.batch)] if args.batch else []),
                                     pythonpath=src)
                    if isinstance(got, str):
                        raise SystemExit(f"bench_train: {side} {res}px text {text}: {got}")
                    results.setdefault((side, res, text), []).append(got)
    print(f"demo twister training step, CPU ({os.cpu_count()} cores), 1 thread, process CPU time, "
          f"median of {args.repeats} steps x {args.rounds} rounds")
    print(f"{'code':>8} {'res':>4} {'text':>7} {'batch':>5} {'ms/step':>8} {'img/s':>6}  "
          + " ".join(f"{p:>9}" for p in PARTS) + f" {'rest':>6} {'GFLOP':>6} {'floor':>6}")
    for (side, res, text), rows in results.items():
        step = statistics.median(r["step_s"] for r in rows)
        parts = {p: statistics.median(r["parts_s"][p] for r in rows) for p in PARTS}
        r0 = rows[0]
        gflop = r0["flops"] / 1e9
        floor = gflop / (step * statistics.median(r["matmul_gflops"] for r in rows))
        rest = 1 - sum(parts.values()) / step
        print(f"{side:>8} {res:>4} {text:>7} {r0['batch']:>5} {1000 * step:8.1f} {r0['batch'] / step:6.1f}  "
              + " ".join(f"{100 * parts[p] / step:8.1f}%" for p in PARTS)
              + f" {100 * rest:5.1f}% {gflop:6.2f} {100 * floor:5.1f}%")
    print(f"matmul (512^3 fp32, 1 thread): {statistics.median(r['matmul_gflops'] for v in results.values() for r in v):.1f} "
          "GFLOP/s; floor = FLOPs / (step time x that rate)")


if __name__ == "__main__":
    main()
