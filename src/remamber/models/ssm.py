"""Selective-scan parameters shared by every directional scan in the model (SS2D, Channel Scan,
in-context scan): per direction k, x_proj (k, R + 2N, D), dt_proj (k, D, R) + bias (k, D),
A = -exp(A_logs) (k*D, N) and the skip D (k*D). Names follow VMamba so checkpoints load as-is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from remamber.ops import ScanTape, directional_selective_scan, selective_scan

__all__ = ["add_ssm_parameters", "directional_scan", "scan_in_orders", "scan_in_orders_lean", "resolve_dt_rank"]


def resolve_dt_rank(dt_rank: int | str, d_model: int) -> int:
    """VMamba's "auto" rank: ceil(d_model / 16)."""
    if dt_rank == "auto":
        return math.ceil(d_model / 16)
    if isinstance(dt_rank, int) and dt_rank > 0:
        return dt_rank
    raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")


def add_ssm_parameters(
    module: nn.Module,
    directions: int,
    d_inner: int,
    d_state: int,
    dt_rank: int,
    dt_min: float = 0.001,
    dt_max: float = 0.1,
    dt_init_floor: float = 1e-4,
) -> None:
    """Register x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs and Ds on `module`.

    Mamba's initialisation: dt_proj weight ~ U(-R^-0.5, R^-0.5); softplus(dt bias) log-uniform in
    [dt_min, dt_max]; A = -(1..N) per channel (S4D-real); D = 1.
    """
    k, d, n, r = directions, d_inner, d_state, dt_rank
    x_proj_bound = 1.0 / math.sqrt(d)  # nn.Linear's default bound for a (R+2N, D) weight
    module.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * n, d).uniform_(-x_proj_bound, x_proj_bound))
    dt_std = r**-0.5
    module.dt_projs_weight = nn.Parameter(torch.empty(k, d, r).uniform_(-dt_std, dt_std))
    dt = torch.exp(torch.rand(k, d) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    module.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    a = torch.arange(1, n + 1, dtype=torch.float32).repeat(k * d, 1)
    module.A_logs = nn.Parameter(torch.log(a))  # (K*D, N)
    module.Ds = nn.Parameter(torch.ones(k * d))
    module.A_logs._no_weight_decay = True  # type: ignore[attr-defined]
    module.Ds._no_weight_decay = True  # type: ignore[attr-defined]


def directional_scan(module: nn.Module, xs: torch.Tensor) -> torch.Tensor:
    """Run one selective scan per direction with the parameters registered by `add_ssm_parameters`.

    xs: (B, K, D, L) already-ordered sequences (one per direction) -> ys (B, K, D, L).
    B and C are input-dependent and grouped per direction: (B, K, N, L), as in VMamba.
    """
    b, k, d, length = xs.shape
    x_proj_weight: torch.Tensor = module.x_proj_weight  # type: ignore[assignment]
    dt_projs_weight: torch.Tensor = module.dt_projs_weight  # type: ignore[assignment]
    n = module.A_logs.shape[1]  # type: ignore[union-attr]
    r = dt_projs_weight.shape[2]
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight)  # (B, K, R + 2N, L)
    dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, dt_projs_weight)  # (B, K, D, L)
    ys = selective_scan(
        xs.reshape(b, k * d, length),
        dts.reshape(b, k * d, length),
        -torch.exp(module.A_logs.float()),  # type: ignore[union-attr]
        bs.contiguous(),
        cs.contiguous(),
        D=module.Ds.float(),  # type: ignore[union-attr]
        delta_bias=module.dt_projs_bias.reshape(-1).float(),  # type: ignore[union-attr]
        delta_softplus=True,
    )
    return ys.reshape(b, k, d, length)


def scan_in_orders(module: nn.Module, u: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """`directional_scan` of the K re-orderings u[..., orders[k]], un-permuted and summed, without the copies.

    u: (B, D, L) in map order; orders: (K, L) (see `remamber.ops.cross_scan_orders`) -> (B, D, L) in
    the compute dtype (fp32 for half inputs: the directions are summed in fp32, as VMamba does).
    x_proj and dt_proj act on each position alone, so they are applied in map order and the re-ordering
    happens inside the scan kernel (`remamber.ops.directional_selective_scan`).
    """
    b, d, length = u.shape
    k = orders.shape[0]
    dt_projs_weight: torch.Tensor = module.dt_projs_weight  # type: ignore[assignment]
    n = module.A_logs.shape[1]  # type: ignore[union-attr]
    r = dt_projs_weight.shape[2]
    # matmuls whose outputs are already in the scan's layout (einsum would return permuted views that
    # cost a full-size copy to reshape)
    x_proj_weight: torch.Tensor = module.x_proj_weight  # type: ignore[assignment]
    x_dbl = torch.matmul(x_proj_weight.reshape(-1, d), u).view(b, k, -1, length)  # (B, K, R + 2N, L)
    dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
    dts = torch.matmul(dt_projs_weight, dts)  # (K, D, R) @ (B, K, R, L) -> (B, K, D, L), contiguous
    return directional_selective_scan(
        u, dts.reshape(b, k * d, length),
        -torch.exp(module.A_logs.float()),  # type: ignore[union-attr]
        bs.contiguous(), cs.contiguous(), orders,
        D=module.Ds.float(),  # type: ignore[union-attr]
        delta_bias=module.dt_projs_bias.reshape(-1).float(),  # type: ignore[union-attr]
        delta_softplus=True,
    )


# elements (batch x channels x steps) of one piece of `scan_in_orders_lean`: its delta, the scan's largest
# saved input, is one piece at a time (2**19 fp32 values: 2 MiB; much smaller pieces cost the scan kernel's
# per-call overhead, larger ones memory)
LEAN_PIECE_ELEMENTS = 2**19


def _lean_chunks(batch: int, d: int, length: int) -> list[tuple[int, int]]:
    step = max(1, min(d, LEAN_PIECE_ELEMENTS // max(1, batch * length)))
    return [(c, min(c + step, d)) for c in range(0, d, step)]


def _project(weight: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(O, D) @ (B, D, L) -> (B, O, L) as one bmm (torch.matmul would copy u transposed)."""
    return torch.bmm(weight.expand(u.shape[0], -1, -1), u)


def _lean_piece(u_c, x_dbl, dtw, dtb, a_logs, ds, orders, k, c0, c1, tape):
    """Direction k's scan of channels c0:c1 (u_c = u[:, c0:c1] of u (B, D, L)) -> (B, c1 - c0, L) in the
    compute dtype. x_dbl: direction k's (B, R + 2N, L) = x_proj_weight[k] @ u; the others: module parameters;
    tape: the piece's ScanTape (filled in forward, replayed in backward)."""
    d = dtw.shape[1]
    n = a_logs.shape[1]
    r = dtw.shape[2]
    dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=1)
    delta = torch.bmm(dtw[k, c0:c1].expand(dts.shape[0], -1, -1), dts)  # (B, c1 - c0, L)
    lo, hi = k * d + c0, k * d + c1
    return directional_selective_scan(
        u_c, delta, -torch.exp(a_logs[lo:hi].float()), bs[:, None].contiguous(), cs[:, None].contiguous(),
        orders[k:k + 1], D=ds[lo:hi].float(), delta_bias=dtb[k, c0:c1].float(), delta_softplus=True, tape=tape,
    )


class _LeanScan(torch.autograd.Function):
    """`scan_in_orders` keeping only u and the parameters for backward: the backward recomputes x_proj,
    dt_proj and each scan piece (one direction, a few channels) and runs that piece's backward at once,
    so at most one piece's delta and scan state exist at a time. Each piece's ScanTape keeps the scan's
    chunk start states (L/256 values per channel on CPU), so the backward replays the scan without
    running its forward kernel again."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # backward recomputes under the forward's autocast state
    def forward(ctx, u, xw, dtw, dtb, a_logs, ds, orders):
        b, d, length = u.shape
        k_dirs = orders.shape[0]
        chunks = _lean_chunks(b, d, length)  # (larger pieces here were no faster and left glibc's heap larger)
        y = None
        ctx.tapes = {}
        for k in range(k_dirs):
            x_dbl = _project(xw[k], u)  # (B, R + 2N, L)
            for c0, c1 in chunks:
                tape = ctx.tapes[k, c0] = ScanTape()
                piece = _lean_piece(u[:, c0:c1], x_dbl, dtw, dtb, a_logs, ds, orders, k, c0, c1, tape)
                if y is None:
                    y = u.new_zeros((b, d, length), dtype=piece.dtype)
                y[:, c0:c1] += piece
        ctx.save_for_backward(u, xw, dtw, dtb, a_logs, ds, orders)
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, gy):
        u, xw, dtw, dtb, a_logs, ds, orders = ctx.saved_tensors
        b, d, length = u.shape
        chunks = _lean_chunks(b, d, length)
        du = torch.zeros_like(u)
        dxw, ddtw, ddtb = torch.zeros_like(xw), torch.zeros_like(dtw), torch.zeros_like(dtb)
        da, dds = torch.zeros_like(a_logs), torch.zeros_like(ds)
        params = [t.detach().requires_grad_() for t in (dtw, dtb, a_logs, ds)]
        for k in range(orders.shape[0]):
            x_dbl = _project(xw[k], u)  # (B, R + 2N, L)
            g_dbl = torch.zeros_like(x_dbl)
            for c0, c1 in chunks:
                with torch.enable_grad():
                    dbl = x_dbl.detach().requires_grad_()
                    u_c = u[:, c0:c1].detach().requires_grad_()
                    piece = _lean_piece(u_c, dbl, *params, orders, k, c0, c1, ctx.tapes[k, c0])
                    g_u, g_dbl_c, g_dtw, g_dtb, g_a, g_ds = torch.autograd.grad(
                        piece, [u_c, dbl, *params], gy[:, c0:c1].to(piece.dtype))
                du[:, c0:c1] += g_u
                g_dbl += g_dbl_c
                ddtw += g_dtw
                ddtb += g_dtb
                da += g_a
                dds += g_ds
                del g_u, g_dbl_c, piece, u_c, dbl
            # x_dbl = W_k u: du += W_k^T g_dbl in place (no full-size temporary), dW_k = sum_b g_dbl u^T
            g_dbl = g_dbl.to(u.dtype)
            du.baddbmm_(xw[k].t().to(u.dtype).expand(b, -1, -1), g_dbl)
            dxw[k] += torch.matmul(u, g_dbl.transpose(1, 2)).sum(0).t()  # (D, R + 2N) products: no copy of u
        return du, dxw, ddtw, ddtb, da, dds, None


def scan_in_orders_lean(module: nn.Module, u: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """`scan_in_orders` with little memory for backward (same result up to float rounding: the directions
    and the channel pieces are computed separately and summed in the compute dtype)."""
    return _LeanScan.apply(u, module.x_proj_weight, module.dt_projs_weight, module.dt_projs_bias,
                           module.A_logs, module.Ds, orders)
