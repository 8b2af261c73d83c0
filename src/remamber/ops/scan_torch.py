"""Pure-PyTorch selective scan: the readable, differentiable reference backend (CPU and GPU).

Recurrence per (batch b, channel d, state n), with dt = delta (after bias/softplus):
    h[l] = exp(dt[l] * A[d, n]) * h[l-1] + dt[l] * B[n, l] * u[l],   h[-1] = 0
    y[l] = sum_n C[n, l] * h[l]
    out  = (y + D * u) * silu(z)

When one time step is small (batch*dim*N < SMALL_STEP elements) the time loop is split into chunks
of T ~ sqrt(L) steps: all chunks are scanned at once (T steps), then chunk carries are propagated
(L/T steps) and added back scaled by the within-chunk decay exp(cumsum(dt * A)). This is the same
recurrence, exactly (no division by decays, no exp of positive partial sums), in about 2*sqrt(L)
PyTorch steps instead of L. Large steps use the plain loop (one chunk).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_torch", "linear_scan_chunked", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else (fp32, fp16, bf16) is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _group_view(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, d, L[, ...]) -> (b, G, d/G, L[, ...]) without copying."""
    b, d = x.shape[:2]
    return x.reshape(b, groups, d // groups, *x.shape[2:])


def _bc_grouped(X: torch.Tensor, dim: int) -> tuple[torch.Tensor, int]:
    """B or C as a (b|1, G, 1, L|1, N) tensor broadcastable against (b, G, d/G, L, N), plus G.

    (dim, N) shared -> G = dim, one row per channel, constant over batch and time;
    (batch, N, L)   -> G = 1;  (batch, G, N, L) -> G groups of dim/G consecutive channels.
    """
    if X.dim() == 2:
        return X[None, :, None, None, :], dim
    if X.dim() == 3:
        return X.transpose(1, 2)[:, None, None], 1
    return X.transpose(2, 3)[:, :, None], X.shape[1]


SMALL_STEP = 4096  # elements per time step below which per-op overhead dominates a plain loop


def _default_chunk(length: int, step_elems: int) -> int:
    """Steps per chunk: ~sqrt(L) (about 2*sqrt(L) PyTorch steps) when one step is small, else L
    (one chunk, the plain loop: big steps amortise the per-op overhead, and chunking would cost extra
    full-size passes)."""
    if step_elems >= SMALL_STEP or length <= 1:
        return max(1, length)
    return math.isqrt(length - 1) + 1


def linear_scan_chunked(a_log: torch.Tensor, x: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order linear recurrence h[l] = exp(a_log[l]) * h[l-1] + x[l], h[-1] = 0, along dim 2.

    a_log, x: (b, d, L, N). Returns (h (b, d, L, N), last state (b, d, N)).
    chunk: steps per chunk (default: see `_default_chunk`); any value gives the same recurrence.
    """
    b, d, length, n = x.shape
    t = chunk or _default_chunk(length, b * d * n)
    if t >= length:  # one chunk: the plain sequential loop over time, nothing to carry
        decays, inputs = torch.exp(a_log).unbind(2), x.unbind(2)
        del a_log, x  # autograd keeps what it needs; do not hold two more full-size tensors here
        h = inputs[0].new_zeros(b, d, n)  # step 0 also multiplies by its decay, so A stays in the graph at L = 1
        states = []
        for i in range(length):
            h = torch.addcmul(inputs[i], decays[i], h)
            states.append(h)
        return torch.stack(states, dim=2), h
    n_chunks = -(-length // t)
    pad = n_chunks * t - length
    if pad:  # padded steps: decay 1 (log 0), no input, so the carry passes through unchanged
        a_log = F.pad(a_log, (0, 0, 0, pad))
        x = F.pad(x, (0, 0, 0, pad))
    # step-in-chunk axis first, so every per-step slice below is one contiguous block
    a_log = a_log.reshape(b, d, n_chunks, t, n).permute(3, 0, 1, 2, 4).contiguous()  # (T, b, d, chunks, N)
    x = x.reshape(b, d, n_chunks, t, n).permute(3, 0, 1, 2, 4).contiguous()

    # 1) scan every chunk from a zero state, all chunks in parallel: T steps on (b, d, chunks, N).
    #    unbind (not indexing) so autograd writes each step's gradient once, not a full-size zero tensor.
    decays = torch.exp(a_log).unbind(0)
    inputs = x.unbind(0)
    h = inputs[0]
    local = [h]
    for i in range(1, t):
        h = torch.addcmul(inputs[i], decays[i], h)
        local.append(h)
    h_local = torch.stack(local, dim=0)  # (T, b, d, chunks, N)

    # 2) carry the state across chunks: chunk c starts from carry[c]
    cum_decay = torch.exp(torch.cumsum(a_log, dim=0))  # decay from chunk start to step i, inclusive
    ends = local[-1].movedim(2, 0).unbind(0)  # per chunk: end state from a zero start (b, d, N)
    end_decays = cum_decay[-1].movedim(2, 0).unbind(0)
    carry = x.new_zeros(b, d, n)
    carries = []
    for c in range(n_chunks):
        carries.append(carry)
        carry = torch.addcmul(ends[c], end_decays[c], carry)
    carry_in = torch.stack(carries, dim=2)  # (b, d, chunks, N)

    h_all = torch.addcmul(h_local, cum_decay, carry_in)  # (T, b, d, chunks, N)
    h_all = h_all.permute(1, 2, 3, 0, 4).reshape(b, d, n_chunks * t, n)[:, :, :length]
    return h_all, carry


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Selective scan in plain PyTorch (shapes already validated by `selective_scan`).

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (dim, N) | (batch, N, L) | (batch, G, N, L);
    D, delta_bias: (dim,). Returns out (batch, dim, L) in u's dtype [, last_state (batch, dim, N) fp32/64].
    """
    dtype_in = u.dtype
    ct = compute_dtype(dtype_in)
    batch, dim, length = u.shape
    n = A.shape[1]
    u_c = u.to(ct)
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    A_c = A.to(ct)

    B_g, g_b = _bc_grouped(B.to(ct), dim)
    dtu = _group_view((dt * u_c)[..., None], g_b)  # (b, G, d/G, L, 1)
    # decay exponent (b, d, L, N) and input term (b, d, L, N), passed without keeping references here
    h, last = linear_scan_chunked(dt[..., None] * A_c[:, None, :], (dtu * B_g).reshape(batch, dim, length, n))

    C_g, g_c = _bc_grouped(C.to(ct), dim)
    y = (_group_view(h, g_c) * C_g).sum(-1).reshape(batch, dim, length)
    out = y if D is None else y + u_c * D.to(ct)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ct))
    out = out.to(dtype_in)
    return (out, last) if return_last_state else out
