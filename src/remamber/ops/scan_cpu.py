"""Selective scan on CPU: numba kernels with a hand-written backward (the reverse scan).

Layout inside the kernels (all C-contiguous, compute dtype fp32 or fp64):
    u, delta, z, out: (batch, dim, L);  A: (dim, N);  D, delta_bias: (dim,)
    B, C: (Bb, G, LB, N) with Bb in {1, batch}, LB in {1, L}; channel d reads group d // (dim // G).
          shared (dim, N) -> (1, dim, 1, N); per-step (batch, N, L) -> (batch, 1, L, N);
          grouped (batch, G, N, L) -> (batch, G, L, N). Time before state so the inner N loop is contiguous.

Memory choice for backward: the forward keeps only the state every K = CHUNK steps
(checkpoints (batch, dim, ceil(L/K), N), i.e. 1/K of the full state history). The backward re-runs the
forward from each checkpoint into a K-step buffer, then walks that chunk in reverse. Cost: one extra
forward; memory: O(L/K) per channel instead of O(L).

Parallelism: forward over batch x dim rows. Backward over work items (batch, group, slice of channels):
each item owns a private accumulation slot for per-step/grouped dB, dC (summed afterwards, in a fixed
order), so there are no write races and results do not depend on thread scheduling.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from .scan_torch import compute_dtype

__all__ = ["selective_scan_cpu", "CHUNK"]

CHUNK = 64  # checkpoint interval (steps) of the forward states kept for backward
_TARGET_ITEMS = 32  # backward work items; fixed (not thread-dependent) so sums are reproducible


@njit(inline="always")
def _softplus(x):
    # same threshold as torch.nn.functional.softplus and the mamba CUDA kernel
    return x if x > 20.0 else math.log1p(math.exp(x))


@njit(inline="always")
def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@njit(parallel=True, cache=True, fastmath=False)
def _scan_fwd(u, delta, A, B, C, D, z, bias, has_D, has_z, has_bias, softplus, K, out, ckpt, last):
    """out (batch, dim, L); ckpt (batch, dim, ceil(L/K), N) state before each chunk; last (batch, dim, N)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    dpg_b = dim // B.shape[1]
    dpg_c = dim // C.shape[1]
    var_lb = B.shape[2] > 1
    var_lc = C.shape[2] > 1
    for row in prange(batch * dim):
        bi = row // dim
        d = row % dim
        Bm = B[bi if B.shape[0] > 1 else 0, d // dpg_b]  # (LB, N)
        Cm = C[bi if C.shape[0] > 1 else 0, d // dpg_c]
        Ad = A[d]
        h = np.zeros(N, dtype=u.dtype)
        for l in range(L):
            if l % K == 0:
                ckpt[bi, d, l // K, :] = h
            dt = delta[bi, d, l]
            if has_bias:
                dt = dt + bias[d]
            if softplus:
                dt = _softplus(dt)
            uu = u[bi, d, l]
            dtu = dt * uu
            lb = l if var_lb else 0
            lc = l if var_lc else 0
            y = 0.0
            for n in range(N):
                h[n] = math.exp(dt * Ad[n]) * h[n] + dtu * Bm[lb, n]
                y += h[n] * Cm[lc, n]
            if has_D:
                y += D[d] * uu
            if has_z:
                zz = z[bi, d, l]
                y *= zz * _sigmoid(zz)
            out[bi, d, l] = y
        last[bi, d, :] = h


@njit(parallel=True, cache=True, fastmath=False)
def _scan_bwd(u, delta, A, B, C, D, z, bias, has_D, has_z, has_bias, softplus, K, ckpt,
              gout, glast, has_glast, shared_b, shared_c, groups, slices,
              du, ddelta, dz, dA_part, dD_part, dbias_part, dB_buf, dC_buf):
    """Reverse scan. Work item i = (bi, group, slice) covers channels of one group of `groups`.

    dA_part, dD_part, dbias_part: per (batch, dim) partial sums (reduced over batch by the caller).
    dB_buf/dC_buf: (slots, LB, N) where slot = bi*dim + d for shared B/C, else the work item.
    """
    batch, dim, L = u.shape
    N = A.shape[1]
    n_chunks = ckpt.shape[2]
    dpg = dim // groups
    dpg_b = dim // B.shape[1]
    dpg_c = dim // C.shape[1]
    var_lb = B.shape[2] > 1
    var_lc = C.shape[2] > 1
    for item_u in prange(batch * groups * slices):
        item = np.int64(item_u)  # the parfor index may be unsigned; keep slot arithmetic in int64
        bi = item // (groups * slices)
        gp = (item // slices) % groups
        s = item % slices
        d_lo = gp * dpg + (s * dpg) // slices
        d_hi = gp * dpg + ((s + 1) * dpg) // slices
        hbuf = np.empty((K + 1, N), dtype=u.dtype)
        abuf = np.empty((K, N), dtype=u.dtype)
        dtbuf = np.empty(K, dtype=u.dtype)
        sgbuf = np.empty(K, dtype=u.dtype)
        ybuf = np.empty(K, dtype=u.dtype)
        g = np.empty(N, dtype=u.dtype)
        dA_acc = np.empty(N, dtype=np.float64)
        for d in range(d_lo, d_hi):
            Bm = B[bi if B.shape[0] > 1 else 0, d // dpg_b]
            Cm = C[bi if C.shape[0] > 1 else 0, d // dpg_c]
            dBm = dB_buf[bi * dim + d if shared_b else item]
            dCm = dC_buf[bi * dim + d if shared_c else item]
            Ad = A[d]
            for n in range(N):
                g[n] = glast[bi, d, n] if has_glast else 0.0
                dA_acc[n] = 0.0
            dD_acc = 0.0
            dbias_acc = 0.0
            for c in range(n_chunks - 1, -1, -1):
                l0 = c * K
                T = min(L, l0 + K) - l0
                # re-run the forward over this chunk from its checkpoint
                for n in range(N):
                    hbuf[0, n] = ckpt[bi, d, c, n]
                for t in range(T):
                    l = l0 + t
                    dt = delta[bi, d, l]
                    if has_bias:
                        dt = dt + bias[d]
                    if softplus:
                        sgbuf[t] = 1.0 if dt > 20.0 else _sigmoid(dt)
                        dt = _softplus(dt)
                    dtbuf[t] = dt
                    dtu = dt * u[bi, d, l]
                    lb = l if var_lb else 0
                    lc = l if var_lc else 0
                    y = 0.0
                    for n in range(N):
                        a = math.exp(dt * Ad[n])
                        abuf[t, n] = a
                        hbuf[t + 1, n] = a * hbuf[t, n] + dtu * Bm[lb, n]
                        y += hbuf[t + 1, n] * Cm[lc, n]
                    ybuf[t] = y
                # walk it backwards; g[n] = dLoss/dh[l, n] (future steps already folded in)
                for t in range(T - 1, -1, -1):
                    l = l0 + t
                    go = gout[bi, d, l]
                    uu = u[bi, d, l]
                    dt = dtbuf[t]
                    if has_z:
                        zz = z[bi, d, l]
                        sz = _sigmoid(zz)
                        pre = ybuf[t] + D[d] * uu if has_D else ybuf[t]
                        dz[bi, d, l] = go * pre * sz * (1.0 + zz * (1.0 - sz))
                        go = go * zz * sz
                    duu = 0.0
                    if has_D:
                        dD_acc += go * uu
                        duu = go * D[d]
                    lb = l if var_lb else 0
                    lc = l if var_lc else 0
                    ddt = 0.0
                    for n in range(N):
                        gn = g[n] + go * Cm[lc, n]
                        dCm[lc, n] += go * hbuf[t + 1, n]
                        bv = Bm[lb, n]
                        dBm[lb, n] += gn * dt * uu
                        duu += gn * dt * bv
                        gpa = gn * hbuf[t, n] * abuf[t, n]  # d/d(dt*A) of the decay term
                        ddt += gn * bv * uu + gpa * Ad[n]
                        dA_acc[n] += gpa * dt
                        g[n] = gn * abuf[t, n]
                    if softplus:
                        ddt *= sgbuf[t]
                    ddelta[bi, d, l] = ddt
                    dbias_acc += ddt
                    du[bi, d, l] = duu
            for n in range(N):
                dA_part[bi, d, n] = dA_acc[n]
            dD_part[bi, d] = dD_acc
            dbias_part[bi, d] = dbias_acc


def _bc_kernel_layout(X: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    """B/C from the public layout to the kernel layout (Bb, G, LB, N), contiguous, compute dtype."""
    X = X.detach().to(ct)
    if X.dim() == 2:
        X = X[None, :, None, :]
    elif X.dim() == 3:
        X = X.transpose(1, 2)[:, None]
    else:
        X = X.transpose(2, 3)
    return X.contiguous()


def _bc_grad_to_public(gk: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of `_bc_kernel_layout` for a gradient (Bb, G, LB, N) -> public shape."""
    if len(shape) == 2:
        return gk[0, :, 0, :]
    if len(shape) == 3:
        return gk[:, 0].transpose(1, 2)
    return gk.transpose(2, 3)


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def _work_split(batch: int, dim: int, g_b: int | None, g_c: int | None) -> tuple[int, int]:
    """(groups, slices) of the backward partition: items never straddle a B or C group."""
    groups = 1
    for g in (g_b, g_c):
        if g is not None:
            groups = _lcm(groups, g)
    per_group = dim // groups
    slices = max(1, min(per_group, -(-_TARGET_ITEMS // (batch * groups))))
    return groups, slices


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class _SelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        ct = compute_dtype(u.dtype)
        batch, dim, length = u.shape
        n = A.shape[1]
        dummy = torch.zeros(1, dtype=ct)
        uc, dc, Ac = (t.detach().to(ct).contiguous() for t in (u, delta, A))
        Bk, Ck = _bc_kernel_layout(B, ct), _bc_kernel_layout(C, ct)
        Dc = dummy if D is None else D.detach().to(ct).contiguous()
        zc = dummy.reshape(1, 1, 1) if z is None else z.detach().to(ct).contiguous()
        bc = dummy if delta_bias is None else delta_bias.detach().to(ct).contiguous()
        out = torch.empty(batch, dim, length, dtype=ct)
        ckpt = torch.empty(batch, dim, -(-length // CHUNK), n, dtype=ct)
        last = torch.empty(batch, dim, n, dtype=ct)
        _scan_fwd(_np(uc), _np(dc), _np(Ac), _np(Bk), _np(Ck), _np(Dc), _np(zc), _np(bc),
                  D is not None, z is not None, delta_bias is not None, bool(delta_softplus), CHUNK,
                  out.numpy(), ckpt.numpy(), last.numpy())
        ctx.save_for_backward(uc, dc, Ac, Bk, Ck, Dc, zc, bc, ckpt)
        ctx.flags = (D is not None, z is not None, delta_bias is not None, bool(delta_softplus))
        ctx.meta = dict(
            dtypes=[None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias)],
            b_shape=B.shape, c_shape=C.shape,
        )
        out = out.to(u.dtype)
        if return_last_state:
            return out, last
        return out

    @staticmethod
    def backward(ctx, gout, glast=None):
        uc, dc, Ac, Bk, Ck, Dc, zc, bc, ckpt = ctx.saved_tensors
        has_D, has_z, has_bias, softplus = ctx.flags
        meta = ctx.meta
        ct = uc.dtype
        batch, dim, length = uc.shape
        n = Ac.shape[1]
        shared_b, shared_c = len(meta["b_shape"]) == 2, len(meta["c_shape"]) == 2
        groups, slices = _work_split(batch, dim, None if shared_b else Bk.shape[1], None if shared_c else Ck.shape[1])
        items = batch * groups * slices
        gout = gout.detach().to(ct).contiguous()
        has_glast = glast is not None
        glast_c = glast.detach().to(ct).contiguous() if has_glast else torch.zeros(1, 1, 1, dtype=ct)

        du = torch.empty_like(uc)
        ddelta = torch.empty_like(dc)
        dz = torch.empty_like(zc) if has_z else torch.zeros(1, 1, 1, dtype=ct)
        dA_part = torch.empty(batch, dim, n, dtype=ct)
        dD_part = torch.empty(batch, dim, dtype=ct)
        dbias_part = torch.empty(batch, dim, dtype=ct)
        dB_buf = torch.zeros(batch * dim if shared_b else items, Bk.shape[2], n, dtype=ct)
        dC_buf = torch.zeros(batch * dim if shared_c else items, Ck.shape[2], n, dtype=ct)
        _scan_bwd(_np(uc), _np(dc), _np(Ac), _np(Bk), _np(Ck), _np(Dc), _np(zc), _np(bc),
                  has_D, has_z, has_bias, softplus, CHUNK, _np(ckpt),
                  _np(gout), _np(glast_c), has_glast, shared_b, shared_c, groups, slices,
                  du.numpy(), ddelta.numpy(), dz.numpy(), dA_part.numpy(), dD_part.numpy(),
                  dbias_part.numpy(), dB_buf.numpy(), dC_buf.numpy())

        def reduce_bc(buf: torch.Tensor, kernel_shape: torch.Size, shared: bool) -> torch.Tensor:
            if shared:  # slots are (batch, dim): sum over batch
                return buf.reshape(batch, dim, 1, n).sum(0, keepdim=True)
            g = kernel_shape[1]
            per = buf.reshape(batch, g, (groups // g) * slices, buf.shape[1], n).sum(2)
            return per if kernel_shape[0] == batch else per.sum(0, keepdim=True)

        dB = _bc_grad_to_public(reduce_bc(dB_buf, Bk.shape, shared_b), meta["b_shape"])
        dC = _bc_grad_to_public(reduce_bc(dC_buf, Ck.shape, shared_c), meta["c_shape"])
        dt_u, dt_delta, dt_A, dt_B, dt_C, dt_D, dt_z, dt_bias = meta["dtypes"]
        need = ctx.needs_input_grad
        return (
            du.to(dt_u) if need[0] else None,
            ddelta.to(dt_delta) if need[1] else None,
            dA_part.sum(0).to(dt_A) if need[2] else None,
            dB.to(dt_B) if need[3] else None,
            dC.to(dt_C) if need[4] else None,
            dD_part.sum(0).to(dt_D) if has_D and need[5] else None,
            dz.to(dt_z) if has_z and need[6] else None,
            dbias_part.sum(0).to(dt_bias) if has_bias and need[7] else None,
            None,
            None,
        )


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Selective scan with the numba CPU kernel (shapes already validated by `selective_scan`).

    Same arguments and returns as `remamber.ops.selective_scan`; differentiable through a
    hand-written reverse scan. last_state is returned in the compute dtype (fp32, or fp64 for fp64 u).
    """
    return _SelectiveScanCPU.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(return_last_state))
