"""Selective-scan speed on CPU: plain PyTorch loop vs our torch and cpu backends vs a memory floor.

Workload (the VMamba SS2D call): u, delta (batch, dim, L); A (dim, N); B, C per step (batch, N, L);
D and delta_bias (dim,), delta_softplus=True, no z. Prints milliseconds (median of repeats run
round-robin over the cells, warm-up (numba compile) excluded) and the ratios
    loop/cpu f+b   (plain PyTorch loop forward+backward over our cpu backend's)
    cpu/floor fwd  (our cpu backend's forward over one memory pass reading u, delta, B, C, writing out).

Usage: python benchmarks/bench_scan.py [--quick] [--repeats R] [--lengths 1024 4096 16384]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from remamber.ops import selective_scan

CONFIGS = [(512, 1), (192, 16)]  # (dim, d_state)


def loop_scan(u, delta, A, B, C, D, delta_bias):
    """Best plain PyTorch loop: decay and input terms computed once, then one fused multiply-add
    per time step over `unbind`; states stacked and contracted with C once at the end."""
    dt = F.softplus(delta + delta_bias[:, None])
    decay = torch.exp(dt[..., None] * A[:, None, :])  # (b, d, L, N)
    drive = (dt * u)[..., None] * B.transpose(1, 2)[:, None]  # (b, d, L, N)
    h = torch.zeros_like(drive[:, :, 0])
    states = []
    for a_t, x_t in zip(decay.unbind(2), drive.unbind(2)):
        h = torch.addcmul(x_t, a_t, h)
        states.append(h)
    hs = torch.stack(states, dim=2)
    y = (hs * C.transpose(1, 2)[:, None]).sum(-1)
    return y + u * D[:, None]


@njit(parallel=True, cache=True)
def _floor_kernel(u, delta, B, C, out):
    batch, dim, L = u.shape
    N = B.shape[1]
    bc = np.zeros((batch, L), dtype=u.dtype)
    for bi in range(batch):  # B and C are read once, not once per channel
        for n in range(N):
            for l in range(L):
                bc[bi, l] += B[bi, n, l] * C[bi, n, l]
    for row in prange(batch * dim):
        bi = row // dim
        d = row % dim
        for l in range(L):
            out[bi, d, l] = u[bi, d, l] * delta[bi, d, l] + bc[bi, l]


def memory_floor(u, delta, B, C):
    """One pass: read u, delta, B, C, write out once (no scan, no transcendental)."""
    out = torch.empty_like(u)
    _floor_kernel(u.numpy(), delta.numpy(), B.numpy(), C.numpy(), out.numpy())
    return out


def make_inputs(batch, dim, n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(batch, dim, length, generator=g),
        delta=0.5 * torch.rand(batch, dim, length, generator=g) - 2.0,
        A=-torch.rand(dim, n, generator=g) - 0.5,
        B=torch.randn(batch, n, length, generator=g),
        C=torch.randn(batch, n, length, generator=g),
        D=torch.randn(dim, generator=g),
        delta_bias=0.1 * torch.rand(dim, generator=g),
    )


def timed_round_robin(cells: dict, repeats: int) -> dict:
    """Median milliseconds per cell. Each cell is warmed up once (numba compile excluded), then the
    repeats run round-robin over the cells, so load from other processes hits all cells alike and
    ratios measured in the same run stay comparable."""
    for fn in cells.values():
        fn()
    times = {name: [] for name in cells}
    for _ in range(repeats):
        for name, fn in cells.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def _no_grad(fn, inputs):
    with torch.no_grad():
        return fn(inputs)


def fwd_bwd(fn, inputs):
    grad_names = ("u", "delta", "A", "B", "C", "D", "delta_bias")

    def run():
        leaves = {k: (v.detach().requires_grad_(True) if k in grad_names else v) for k, v in inputs.items()}
        out = fn(leaves)
        out.backward(torch.ones_like(out))

    return run


def bench_one(dim, n, length, repeats, batch=2):
    x = make_inputs(batch, dim, n, length)
    impls = {
        "loop": lambda a: loop_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["delta_bias"]),
        "torch": lambda a: selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"],
                                          delta_bias=a["delta_bias"], delta_softplus=True, backend="torch"),
        "cpu": lambda a: selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"],
                                        delta_bias=a["delta_bias"], delta_softplus=True, backend="cpu"),
    }
    cells = {}
    for name, fn in impls.items():
        cells[f"{name}_fwd"] = (lambda f: lambda: _no_grad(f, x))(fn)
        cells[f"{name}_fb"] = fwd_bwd(fn, x)
    cells["floor_fwd"] = lambda: memory_floor(x["u"], x["delta"], x["B"], x["C"])
    row = timed_round_robin(cells, repeats)
    # sanity: all three agree (the benchmark must time correct code)
    ref = impls["loop"](x)
    for name in ("torch", "cpu"):
        err = (impls[name](x) - ref).abs().max().item()
        if err > 1e-3 * (1 + ref.abs().max().item()):
            raise SystemExit(f"{name} backend disagrees with the loop at dim={dim} N={n} L={length}: {err}")
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="L=1024 and 4096 only, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per cell (median reported)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    args = ap.parse_args(argv)
    lengths = args.lengths or ([1024, 4096] if args.quick else [1024, 4096, 16384])
    repeats = args.repeats or (3 if args.quick else 5)

    print(f"torch {torch.__version__}, threads: torch {torch.get_num_threads()}, "
          f"numba {__import__('numba').get_num_threads()}; batch 2, B/C per step, softplus+bias+D; "
          f"median of {repeats}, ms")
    head = (f"{'dim':>4} {'N':>3} {'L':>6} | {'loop fwd':>9} {'loop f+b':>9} | {'torch fwd':>9} {'torch f+b':>9} | "
            f"{'cpu fwd':>8} {'cpu f+b':>8} | {'floor':>7} | {'loop/cpu f+b':>12} {'cpu/floor fwd':>13}")
    print(head)
    print("-" * len(head))
    for dim, n in CONFIGS:
        for length in lengths:
            r = bench_one(dim, n, length, repeats)
            print(f"{dim:>4} {n:>3} {length:>6} | {r['loop_fwd']:9.1f} {r['loop_fb']:9.1f} | "
                  f"{r['torch_fwd']:9.1f} {r['torch_fb']:9.1f} | {r['cpu_fwd']:8.1f} {r['cpu_fb']:8.1f} | "
                  f"{r['floor_fwd']:7.2f} | {r['loop_fb'] / r['cpu_fb']:12.1f} {r['cpu_fwd'] / r['floor_fwd']:13.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
