"""Selective-scan parameters shared by every directional scan in the model (SS2D, Channel Scan,
in-context scan): per direction k, x_proj (k, R + 2N, D), dt_proj (k, D, R) + bias (k, D),
A = -exp(A_logs) (k*D, N) and the skip D (k*D). Names follow VMamba so checkpoints load as-is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from remamber.ops import directional_selective_scan, selective_scan

__all__ = ["add_ssm_parameters", "directional_scan", "scan_in_orders", "resolve_dt_rank"]


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
