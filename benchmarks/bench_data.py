"""Data-layer throughput: synthetic generation, preprocessing (objects/s) and DataLoader (images/s).

Run: python benchmarks/bench_data.py [--size small] [--resolution 256] [--workers 0 2] [--batch 16]
Writes the synthetic data to a temporary folder and prints a table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from remamber.data.datasets import RefSegDataset, collate_batch
from remamber.data.preprocess import preprocess
from remamber.data.synth import write_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        raw, idx = Path(tmp) / "raw", Path(tmp) / "idx"
        t0 = time.perf_counter()
        summary = write_synthetic(raw, seed=0, size=args.size, progress=False)
        dt = time.perf_counter() - t0
        n_images = len(list((raw / "train2014").glob("*.jpg")))
        rows.append((f"synth write ({args.size})", f"{n_images} images", f"{n_images / dt:8.1f} images/s"))
        for dataset in summary:
            t0 = time.perf_counter()
            meta = preprocess(raw, dataset, idx / dataset, progress=False)
            dt = time.perf_counter() - t0
            n = sum(c["objects"] for c in meta["counts"].values())
            rows.append((f"preprocess {dataset}", f"{n} objects", f"{n / dt:8.1f} objects/s"))
        ds = RefSegDataset(idx / "refcoco", "train", "train", args.resolution, raw)
        for workers in args.workers:
            loader = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=workers,
                                collate_fn=collate_batch, generator=torch.Generator().manual_seed(0))
            t0 = time.perf_counter()
            n = sum(batch["image"].shape[0] for batch in loader)
            dt = time.perf_counter() - t0
            rows.append((f"DataLoader train @{args.resolution}, workers={workers}", f"{n} images",
                         f"{n / dt:8.1f} images/s"))
    width = max(len(r[0]) for r in rows)
    print(f"{'step':<{width}}  {'items':>14}  {'throughput':>18}")
    for step, items, rate in rows:
        print(f"{step:<{width}}  {items:>14}  {rate:>18}")


if __name__ == "__main__":
    main()
