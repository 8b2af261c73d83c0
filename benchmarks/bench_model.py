"""Model cost on CPU: forward+backward time and peak memory per image against input size.

Whole model (small config: vmamba_demo backbone, tiny random text encoder, demo-sized Twister)
for the twister, attention and in_context variants, and one fusion block alone: the Twister
stage (interactions + one Twister block) against a joint self-attention block (LayerNorm, QKV,
torch's scaled_dot_product_attention over [image tokens; 20 text tokens], out-proj, residual) of
the same width. The fitted log-log exponent of time against the number of image tokens is printed
for each row (target <= 1.15 for the Twister block and the whole twister model), and of memory too.
The `_recompute` rows are the same models with ModelConfig.twister_recompute (TwisterStage(recompute=True)):
the Twister keeps only its stage boundaries for backward and recomputes the rest.

Peak memory: every (case, size) runs in a fresh subprocess that first runs the case once at 64 px
(loading the compiled scan kernels); peak = ru_maxrss after one forward+backward at the measured
size minus the resident set (VmRSS) just before it, divided by the batch size.
Times are the median of --repeats steps after one warm-up step. By default the RSS peak includes what
glibc's allocator keeps of freed tensors (its heap grows to the high-water mark of a fragmented mix of
sizes); --live-memory makes every tensor of 64 KiB or more its own mapping, so the peak follows the live
tensors (closer to what a GPU's caching allocator must hold), at the price of slower times.

    python benchmarks/bench_model.py            # sizes 128 192 256 384 512
    python benchmarks/bench_model.py --quick    # sizes 128 192 256, fewer repeats
    python benchmarks/bench_model.py --cases twister_block twister_block_recompute joint_attention_block \\
        --sizes 128 256 512 --live-memory       # the Twister block's memory with and without recompute
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

SIZES = (128, 192, 256, 384, 512)
LIVE_MMAP_THRESHOLD = 65536  # --live-memory: glibc serves every allocation from this size up by its own mapping
QUICK_SIZES = (128, 192, 256)
MODEL_CASES = ("twister", "twister_recompute", "attention", "in_context")
BLOCK_CASES = ("twister_block", "twister_block_recompute", "joint_attention_block")
BLOCK_WIDTH = 64  # width of the fusion block alone (a stage-2-like map of VMamba-B would be 256)
SMALL = dict(backbone="vmamba_demo", text_encoder="tiny-random-bert", local_dim=64, channel_scan_grid=8,
             channel_scan_width=128, drop_path_rate=0.0)


def _vm_rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS not found in /proc/self/status")


def _build(case: str, size: int, batch: int):
    """-> (step function, number of image tokens at the fusion's resolution)."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    if case in MODEL_CASES:
        from remamber.models import build_model, variant_config

        recompute = case.endswith("_recompute")
        model = build_model(variant_config(case.removesuffix("_recompute"), twister_recompute=recompute,
                                           **SMALL)).train()
        ids, mask = model.tokenize(["the red circle left of the blue square"] * batch)
        images = torch.randn(batch, 3, size, size)

        def step():
            model.zero_grad(set_to_none=True)
            model(images, ids, mask).mean().backward()

        return step, math.ceil(size / 4) ** 2

    if case == "paper":
        return _build_paper(size, batch)

    side = math.ceil(size / 4)  # the first stage's map for this input size
    image = torch.randn(batch, BLOCK_WIDTH, side, side, requires_grad=True)
    words = torch.randn(batch, 20, 384)
    if case in ("twister_block", "twister_block_recompute"):
        from remamber.models.twisting import TwisterStage

        block = TwisterStage(BLOCK_WIDTH, 384, 20, depth=1, local_dim=64, grid=8, width=128,
                             recompute=case == "twister_block_recompute")
        pooled = torch.randn(batch, 384)
        text_mask = torch.ones(batch, 20, dtype=torch.bool)

        def step():
            block.zero_grad(set_to_none=True)
            image.grad = None
            block(image, words, pooled, text_mask).mean().backward()

        return step, side * side

    class JointAttention(nn.Module):
        def __init__(self, dim: int, text_dim: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.text_proj = nn.Linear(text_dim, dim)
            self.norm = nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.out = nn.Linear(dim, dim)

        def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
            b, c, h, w = img.shape
            tokens = torch.cat([txt_proj := self.text_proj(txt), img.flatten(2).transpose(1, 2)], dim=1)
            q, k, v = self.qkv(self.norm(tokens)).reshape(b, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
            y = self.out(y)[:, txt_proj.shape[1]:]
            return img + y.transpose(1, 2).reshape(b, c, h, w)

    block = JointAttention(BLOCK_WIDTH, 384, heads=BLOCK_WIDTH // 32)

    def step():
        block.zero_grad(set_to_none=True)
        image.grad = None
        block(image, words).mean().backward()

    return step, side * side


def _build_paper(size: int, batch: int):
    """The paper configuration: VMamba-B, a CLIP-L/14-sized text encoder built offline from its config
    (random weights: cost, not accuracy, is measured), Twister widths 512 / 16x16, conv decoder."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from remamber.models import variant_config
    from remamber.models.remamber import ReMamber
    from remamber.models.text import TextEncoder

    torch.manual_seed(0)
    cfg = variant_config("twister", backbone="vmamba_base", text_encoder="clip-vit-large-patch14")
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
    model = ReMamber(cfg, TextEncoder("clip-l-random", clip, None, "pooler", cfg.max_text_len)).train()
    ids = torch.randint(1, 49000, (batch, cfg.max_text_len))
    mask = torch.ones_like(ids)
    images = torch.randn(batch, 3, size, size)

    def step():
        model.zero_grad(set_to_none=True)
        model(images, ids, mask).mean().backward()

    step.params = sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]
    return step, math.ceil(size / 4) ** 2


def _child(case: str, size: int, batch: int, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    if case != "paper":
        _build(case, 64, 2)[0]()  # loads the compiled scan kernels, so their code is not counted below
    else:
        _build("twister_block", 64, 2)[0]()
    step, tokens = _build(case, size, batch)
    before = _vm_rss_kib()
    step()  # warm-up; also the memory high-water mark of one step
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"case": case, "size": size, "tokens": tokens, "ms_per_image": 1000 * statistics.median(times) / batch,
            "peak_mib_per_image": max(peak - before, 0) / 1024 / batch, "params": getattr(step, "params", None)}


def _run(case: str, size: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps([case, size, args.batch, args.repeats, args.threads])]
    env = dict(os.environ)
    if getattr(args, "live_memory", False):
        env["MALLOC_MMAP_THRESHOLD_"] = str(LIVE_MMAP_THRESHOLD)
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{case} at {size}px failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _slope(rows: list[dict], key: str = "ms_per_image") -> float:
    xs = [math.log(r["tokens"]) for r in rows]
    ys = [math.log(max(r[key], 1e-9)) for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="sizes 128/192/256 and 2 repeats")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=list(MODEL_CASES + BLOCK_CASES),
                        choices=MODEL_CASES + BLOCK_CASES)
    parser.add_argument("--live-memory", action="store_true",
                        help="children run with MALLOC_MMAP_THRESHOLD_=65536: every tensor of 64 KiB or more is its own "
                             "mapping, given back when freed, so the RSS peak follows the live tensors instead of "
                             "glibc's heap high-water mark (times are then slower: page faults)")
    parser.add_argument("--paper", action="store_true",
                        help="the paper configuration, one image at 256 and 480 px (see _paper_table)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*json.loads(args.child))))
        return
    if args.paper:
        _paper_table(args)
        return
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    from tqdm import tqdm

    results: dict[str, list[dict]] = {}
    jobs = [(c, s) for c in args.cases for s in sizes]
    for case, size in tqdm(jobs, desc="bench_model", unit="run"):
        results.setdefault(case, []).append(_run(case, size, args))
    print(f"\nforward+backward on CPU, batch {args.batch}, {args.threads} threads, median of {args.repeats} "
          f"(peak memory: ru_maxrss delta in a fresh subprocess"
          + (f", MALLOC_MMAP_THRESHOLD_={LIVE_MMAP_THRESHOLD}: live tensors" if args.live_memory else "") + ")")
    header = "case".ljust(24) + "".join(f"{s:>9d}px" for s in sizes) + "   exponent"
    for title, key, unit in (("time", "ms_per_image", "ms/image"), ("peak memory", "peak_mib_per_image", "MiB/image")):
        print(f"\n{title} ({unit})")
        print(header)
        for case, rows in results.items():
            cells = "".join(f"{r[key]:11.1f}" for r in rows)
            exponent = f"{_slope(rows, key):9.2f}" if len(rows) > 1 else ""
            print(case.ljust(24) + cells + "   " + exponent)
        base = results.get("joint_attention_block")
        for case, label in (("twister_block", "  ratio twister/attn"), ("twister_block_recompute", "  ratio recompute/attn")):
            if base and case in results:
                cells = "".join(f"{r[key] / a[key]:11.2f}" for r, a in zip(results[case], base))
                print(label.ljust(24) + cells)
    print("\nexponent: least-squares slope of log(time or memory) against log(image tokens at the first stage); "
          "1 = linear in tokens, 2 = quadratic")


def _paper_table(args) -> None:
    """Paper configuration (VMamba-B, CLIP-L/14-sized text encoder, Twister 512 / 16x16), forward+backward
    of one image at 256 and 480 px on CPU: seconds, peak memory (ru_maxrss delta, fp32 activations), and a
    projection for 8 images per GPU: 8 x activations + weights, gradients and AdamW's two moments
    (16 bytes per parameter). "AMP" halves the activations (bf16 autocast keeps most saved tensors in
    16 bits; norms, the scan's state checkpoints and the loss stay fp32, so this is a lower bound).
    LAVT-style Swin-B models: LAVT (Yang et al., CVPR 2022), CRIS, ReLA and the ReMamber paper publish no
    per-image training memory that we could find, so no figure is printed beside ours."""
    rows = [_run("paper", size, argparse.Namespace(batch=1, repeats=1, threads=args.threads)) for size in (256, 480)]
    print(f"\npaper configuration, forward+backward of one image on CPU ({args.threads} threads), "
          f"{rows[0]['params'] / 1e6:.1f}M parameters")
    state_gib = rows[0]["params"] * 16 / 2**30
    print(f"{'px':>5} {'seconds':>8} {'peak MiB':>9} {'8 img/GPU fp32 GiB':>19} {'8 img/GPU AMP GiB':>18}")
    for r in rows:
        act = r["peak_mib_per_image"] / 1024
        print(f"{r['size']:>5} {r['ms_per_image'] / 1000:8.1f} {r['peak_mib_per_image']:9.0f} "
              f"{8 * act + state_gib:19.1f} {4 * act + state_gib:18.1f}")
    print(f"(weights + grads + AdamW moments: {state_gib:.1f} GiB; published per-image memory of LAVT-style "
          "Swin-B models: none found, so none is shown)")


if __name__ == "__main__":
    main()
