"""GPU check: our pure-PyTorch scan vs mamba_ssm's CUDA kernel, on CUDA (< 5 min on one H200).

For a grid like the CPU tests (batch 2, dim 4, d_state 1/8, L in 1..4096, B/C shared / per step /
grouped G=1,2, switches D, z, delta_bias, softplus, return_last_state) it runs
    torch      selective_scan(..., backend="torch") in fp32 on CUDA
    mamba_ssm  selective_scan(..., backend="mamba_ssm") (our dispatch to the CUDA kernel)
    reference  backend="torch" in float64 on CUDA
and prints max abs / max rel error of the forward, last state and every gradient for both against the
reference (and fails if either exceeds mamba's test tolerances), then times forward and
forward+backward of both at model sizes.

With no CUDA device it prints a message and exits 0. With CUDA but no mamba_ssm it checks the torch
backend only and says so (exit 0; pass --require-mamba to make that an error, exit 3).

Usage: python benchmarks/gpu_check.py [--quick] [--require-mamba]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

from remamber.ops import available_backends, selective_scan

LENGTHS = [1, 7, 65, 128, 512, 1024, 4096]
LAYOUTS = ["shared", "per_step", "grouped1", "grouped2"]
SWITCH_ROWS = [  # OA(8, 5, 2, 2): has_D, has_z, has_bias, softplus, return_last_state
    (0, 0, 0, 0, 0), (0, 0, 1, 1, 1), (0, 1, 0, 1, 1), (0, 1, 1, 0, 0),
    (1, 0, 0, 1, 0), (1, 0, 1, 0, 1), (1, 1, 0, 0, 1), (1, 1, 1, 1, 0),
]
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def grid(quick: bool):
    cases = []
    for i, (n, layout) in enumerate(itertools.product([1, 8], LAYOUTS)):
        for j in range(2 if quick else 4):
            k = 4 * i + j
            flags = SWITCH_ROWS[(k + i) % 8]
            cases.append(dict(n=n, layout=layout, length=LENGTHS[(3 * k + j) % 7], seed=k,
                              has_D=bool(flags[0]), has_z=bool(flags[1]), has_bias=bool(flags[2]),
                              softplus=bool(flags[3]), last=bool(flags[4])))
    return cases


def make_inputs(c, device, batch=2, dim=4):
    g = torch.Generator().manual_seed(1000 + c["seed"])
    n, length = c["n"], c["length"]

    def bc():
        if c["layout"] == "shared":
            return torch.randn(dim, n, generator=g)
        if c["layout"] == "per_step":
            return torch.randn(batch, n, length, generator=g)
        return torch.randn(batch, 1 if c["layout"] == "grouped1" else 2, n, length, generator=g)

    x = dict(u=torch.randn(batch, dim, length, generator=g), delta=0.5 * torch.rand(batch, dim, length, generator=g),
             A=-0.5 * torch.rand(dim, n, generator=g), B=bc(), C=bc(),
             D=torch.randn(dim, generator=g) if c["has_D"] else None,
             z=torch.randn(batch, dim, length, generator=g) if c["has_z"] else None,
             delta_bias=0.5 * torch.rand(dim, generator=g) if c["has_bias"] else None)
    return {k: None if v is None else v.to(device) for k, v in x.items()}


def run(x, c, backend, dtype, g_out, g_last):
    leaves = {k: None if v is None else v.to(dtype).detach().requires_grad_(True) for k, v in x.items()}
    res = selective_scan(*(leaves[k] for k in NAMES), delta_softplus=c["softplus"], return_last_state=c["last"],
                         backend=backend)
    out, last = res if c["last"] else (res, None)
    loss = (out.double() * g_out).sum() + ((last.double() * g_last).sum() if last is not None else 0)
    names = [k for k in NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return dict(out=out, last=last, **{f"d{k}": gr for k, gr in zip(names, grads)})


def tolerances(c):
    rtol, atol = 6e-4, 2e-3
    rtolw, atolw = (max(1e-3, rtol), max(1e-3, atol)) if c["has_z"] else (1e-3, 1e-3)
    var = c["layout"] != "shared"
    return dict(out=(rtol, atol), last=(rtol, atol), du=(2 * rtol, 2 * atol), ddelta=(5 * rtol, 10 * atol),
                dA=(rtolw, 5 * atolw), dB=(rtol, atol) if var else (rtolw, atolw),
                dC=(rtol, atol) if var else (rtolw, atolw), dD=(rtolw, atolw), dz=(rtolw, atolw),
                ddelta_bias=(rtolw, atolw))


def compare(got, ref, tols):
    """-> (max abs err, max rel err, within tolerance) over all outputs/gradients."""
    worst_abs = worst_rel = 0.0
    ok = True
    for k, r in ref.items():
        if r is None:
            continue
        g, r = got[k].double(), r.double()
        diff = (g - r).abs()
        worst_abs = max(worst_abs, diff.max().item() if diff.numel() else 0.0)
        worst_rel = max(worst_rel, (diff / r.abs().clamp_min(1e-6)).max().item() if diff.numel() else 0.0)
        rtol, atol = tols[k]
        ok &= bool((diff <= atol + rtol * r.abs()).all()) and bool(torch.isfinite(g).all())
    return worst_abs, worst_rel, ok


def timing(backends, device, repeats=20):
    print("\ntiming (batch 2, B/C per step, softplus+bias+D; median ms):")
    print(f"{'dim':>4} {'N':>3} {'L':>6} | " + " | ".join(f"{b + ' fwd':>14} {b + ' f+b':>14}" for b in backends))
    for dim, n in [(512, 1), (192, 16), (2048, 1)]:
        for length in [4096, 16384]:
            g = torch.Generator(device=device).manual_seed(0)
            x = dict(u=torch.randn(2, dim, length, device=device, generator=g),
                     delta=torch.rand(2, dim, length, device=device, generator=g) - 2,
                     A=-torch.rand(dim, n, device=device, generator=g) - 0.5,
                     B=torch.randn(2, n, length, device=device, generator=g),
                     C=torch.randn(2, n, length, device=device, generator=g),
                     D=torch.randn(dim, device=device, generator=g),
                     delta_bias=torch.rand(dim, device=device, generator=g))
            cells = []
            for backend in backends:
                def fwd():
                    with torch.no_grad():
                        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], delta_bias=x["delta_bias"],
                                       delta_softplus=True, backend=backend)

                def fb():
                    leaves = {k: v.detach().requires_grad_(True) for k, v in x.items()}
                    out = selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"],
                                         delta_bias=leaves["delta_bias"], delta_softplus=True, backend=backend)
                    out.backward(torch.ones_like(out))

                for fn in (fwd, fb):
                    fn()
                    torch.cuda.synchronize()
                    ts = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        fn()
                        torch.cuda.synchronize()
                        ts.append(time.perf_counter() - t0)
                    cells.append(1e3 * sorted(ts)[len(ts) // 2])
            print(f"{dim:>4} {n:>3} {length:>6} | " + " | ".join(f"{a:14.2f} {b:14.2f}" for a, b in zip(cells[::2], cells[1::2])),
                  flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="half the grid, fewer timing repeats")
    ap.add_argument("--require-mamba", action="store_true", help="exit 3 if mamba_ssm is not importable")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (run this on a GPU machine).")
        return 0
    device = torch.device("cuda")
    backends = ["torch"] + (["mamba_ssm"] if "mamba_ssm" in available_backends() else [])
    print(f"gpu_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}; backends: {backends}")
    if "mamba_ssm" not in backends:
        print("gpu_check: mamba_ssm does not import here, so only the torch backend is checked. "
              "Install the kernels with: pip install -e '.[cuda]'")
        if args.require_mamba:
            return 3
    failures = 0
    print(f"\n{'case':<44} " + " ".join(f"{b + ' abs':>14} {b + ' rel':>14}" for b in backends))
    for c in grid(args.quick):
        x = make_inputs(c, device)
        g = torch.Generator(device=device).manual_seed(7 + c["seed"])
        g_out = torch.randn(2, 4, c["length"], device=device, dtype=torch.float64, generator=g)
        g_last = torch.randn(2, 4, c["n"], device=device, dtype=torch.float64, generator=g)
        ref = run(x, c, "torch", torch.float64, g_out, g_last)
        cells = []
        for backend in backends:
            got = run(x, c, backend, torch.float32, g_out, g_last)
            worst_abs, worst_rel, ok = compare(got, ref, tolerances(c))
            failures += not ok
            cells.append(f"{worst_abs:14.2e} {worst_rel:14.2e}{'' if ok else ' FAIL'}")
        flags = "".join(s for s, on in zip("Dzbsl", (c["has_D"], c["has_z"], c["has_bias"], c["softplus"], c["last"])) if on)
        name = f"N{c['n']} {c['layout']} L{c['length']} {flags or 'plain'}"
        print(f"{name:<44} " + " ".join(cells), flush=True)
    timing(backends, device, repeats=5 if args.quick else 20)
    print(f"\ngpu_check: {failures} case(s) outside mamba's tolerances")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
