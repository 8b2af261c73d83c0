"""Selective scan on CPU: numba kernels with a hand-written backward (the reverse scan).

Per channel d of batch b, with dt = softplus(delta + delta_bias) (or its variants):
    h[l, n] = exp(dt[l] * A[d, n]) * h[l-1, n] + dt[l] * u[l] * B[n, l],   h[-1] = 0
    out[l]  = sum_n C[n, l] * h[l, n] + D[d] * u[l]          (the gate * silu(z) is applied in PyTorch)

Kernel layout (C-contiguous, compute dtype fp32 or fp64):
    u, delta, out: (batch, dim, L);  A: (dim, N);  D, delta_bias: (dim,)
    B, C: (Bb, G, N, LB), Bb in {1, batch}, LB in {1, L}; channel d reads group d // (dim // G):
          shared (dim, N) -> (1, dim, N, 1); per step (batch, N, L) -> (batch, 1, N, L); grouped as given.

Speed: channels are processed in blocks of R rows (R*N ~ LANES independent recurrence chains, so the
sequential part is throughput- rather than latency-bound) and in chunks of K = CHUNK steps: per chunk,
dt, exp(dt*A) and dt*u*B are computed in loops LLVM vectorises (`_fastmath`), then the short recurrence
runs over the chunk buffers.

Memory for backward: the forward keeps only the state at each chunk start (checkpoints
(batch, dim, ceil(L/K), N), 1/K of the state history). The backward recomputes a chunk's states from
its checkpoint, then walks the chunk in reverse: one extra forward of compute, O(L/K) state memory.

Parallelism: forward over (batch, row block). Backward over work items (batch, group, slice of
channels): each item owns a private slot for per-step dB, dC sums (added afterwards in a fixed order),
so there are no write races, and the split depends only on shapes: results are bit-reproducible.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numba
import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import njit, prange, types
from numba.core.extending import intrinsic, overload

from .scan_torch import compute_dtype

# numba's pedantic SSA check warns (once per compilation) about phi variables of the inlined vexp /
# vsoftplus overloads in the step-major kernels; the compiled code is unaffected (tests compare it with
# float64 references), so the warning would only alarm a user at the first training.
warnings.filterwarnings("ignore", category=numba.core.errors.NumbaIRAssumptionWarning)

__all__ = ["selective_scan_cpu", "directional_scan_cpu", "CHUNK", "LANES"]


# ------------------------------------------------------------------ vectorisable transcendental functions
# Kept in this file on purpose: numba's on-disk cache (cache=True) is invalidated only by changes to the
# file that defines the cached kernel, not by changes to helpers imported from elsewhere.
#
# Vectorisable exp, softplus and sigmoid for the numba kernels.
#
# libm's scalar exp stops LLVM from vectorising a loop (numba has no SVML here), and exp is the bulk of
# the scan's arithmetic. `vexp` is exp for float32 as a branch-free polynomial (Cody-Waite range
# reduction, degree-7 Taylor on |r| <= ln2/2, exponent built by a bitcast), about 2 ulp, that LLVM
# vectorises; results below exp(-87) (where float32 turns denormal) are flushed to 0. For float64 it is
# math.exp unchanged (tests and fp64 callers keep libm accuracy).
#
# `vsoftplus(x)` = x for x > 20 (torch's threshold), else max(x, 0) + log1p(exp(-|x|)) with log1p on
# (0, 1] as 2*atanh(y / (2 + y)) (odd series to s^15, |s| <= 1/3: no cancellation for small y).
# `vsigmoid(x)` = 1 / (1 + exp(-x)).

_F = np.float32
_LOG2E = _F(1.4426950408889634)
_LN2_HI = _F(0.693359375)  # ln 2 split so k * _LN2_HI is exact for |k| < 2^9
_LN2_LO = _F(-2.12194440e-4)
_X_MIN = _F(-87.0)
_X_MAX = _F(88.0)
_HALF = _F(0.5)
_ONE = _F(1.0)
_ZERO = _F(0.0)
_C2, _C3, _C4, _C5, _C6, _C7 = (_F(1.0 / math.factorial(i)) for i in range(2, 8))


@intrinsic
def _int32_bits_as_float32(typingctx, bits):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


def vexp(x):
    """exp(x); compiled by numba through the overload below."""
    return math.exp(x)


@overload(vexp, inline="always")
def _vexp_overload(x):
    if x == types.float32:

        def exp_f32(x):
            xc = min(max(x, _X_MIN), _X_MAX)
            k = np.floor(xc * _LOG2E + _HALF)
            r = xc - k * _LN2_HI - k * _LN2_LO
            p = _ONE + r * (_ONE + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * (_C6 + r * _C7))))))
            scale = _int32_bits_as_float32((np.int32(k) + np.int32(127)) << np.int32(23))
            return p * scale if x >= _X_MIN else _ZERO

        return exp_f32
    if isinstance(x, types.Float):
        return lambda x: math.exp(x)
    return None


def vsoftplus(x):
    """softplus(x) with threshold 20; compiled by numba through the overload below."""
    return x if x > 20.0 else math.log1p(math.exp(x))


def vsigmoid(x):
    """1 / (1 + exp(-x)); compiled by numba through the overload below."""
    return 1.0 / (1.0 + math.exp(-x))


_TWENTY = _F(20.0)
_TWO = _F(2.0)
# 2 * atanh(s) = 2 * (s + s^3/3 + ... + s^15/15)
_S3, _S5, _S7, _S9, _S11, _S13, _S15 = (_F(1.0 / k) for k in (3, 5, 7, 9, 11, 13, 15))


@overload(vsoftplus, inline="always")
def _vsoftplus_overload(x):
    if x == types.float32:

        def softplus_f32(x):
            y = vexp(-abs(x))  # in (0, 1]
            s = y / (_TWO + y)
            s2 = s * s
            series = _ONE + s2 * (_S3 + s2 * (_S5 + s2 * (_S7 + s2 * (_S9 + s2 * (_S11 + s2 * (_S13 + s2 * _S15))))))
            sp = max(x, _ZERO) + _TWO * s * series
            return x if x > _TWENTY else sp

        return softplus_f32
    if isinstance(x, types.Float):
        return lambda x: x if x > 20.0 else math.log1p(math.exp(x))
    return None


@overload(vsigmoid, inline="always")
def _vsigmoid_overload(x):
    if x == types.float32:
        return lambda x: _ONE / (_ONE + vexp(-x))
    if isinstance(x, types.Float):
        return lambda x: 1.0 / (1.0 + math.exp(-x))
    return None


def vsoftplus_sigmoid(x):
    """(softplus(x), sigmoid(x)) sharing one exp; compiled by numba through the overload below."""
    return vsoftplus(x), vsigmoid(x)


@overload(vsoftplus_sigmoid, inline="always")
def _vsoftplus_sigmoid_overload(x):
    if x == types.float32:

        def softplus_sigmoid_f32(x):
            y = vexp(-abs(x))  # in (0, 1]
            s = y / (_TWO + y)
            s2 = s * s
            series = _ONE + s2 * (_S3 + s2 * (_S5 + s2 * (_S7 + s2 * (_S9 + s2 * (_S11 + s2 * (_S13 + s2 * _S15))))))
            sp = max(x, _ZERO) + _TWO * s * series
            inv = _ONE / (_ONE + y)
            return (x if x > _TWENTY else sp), (inv if x >= _ZERO else y * inv)

        return softplus_sigmoid_f32
    if isinstance(x, types.Float):
        return lambda x: (x if x > 20.0 else math.log1p(math.exp(x)), 1.0 / (1.0 + math.exp(-x)))
    return None

CHUNK = 256  # steps per chunk: checkpoint interval and length of the vector buffers
LANES = 16  # target number of independent recurrence chains (rows x states) per block
_TARGET_ITEMS = 32  # backward work items; fixed (not thread-count dependent) so sums are reproducible


def _rows_per_block(n_state: int) -> int:
    return max(1, LANES // n_state)


def _chunk(length: int) -> int:
    """Chunk length: CHUNK, or L when shorter, so short sequences (a 2 x 2 map, a 48-channel cube) do not
    pay for CHUNK-long buffers; the recurrence and the order of every sum are the same either way."""
    return max(1, min(CHUNK, length))


@njit(inline="always", error_model="numpy")
def _block_inputs(bi, d0, R, l0, T, u, delta, bias, softplus, A, B, var_lb, need_sig,
                  dtbuf, dtubuf, sgbuf, abuf, xbuf):
    """For rows d0..d0+R-1, steps l0..l0+T-1: dtbuf[r,t] = dt, dtubuf[r,t] = dt*u, sgbuf[r,t] = sigmoid
    of the pre-softplus value (if need_sig), abuf[r*N+n, t] = exp(dt*A), xbuf[r*N+n, t] = dt*u*B."""
    N = A.shape[1]
    dim = u.shape[1]
    dpg_b = dim // B.shape[1]
    for r in range(R):
        d = d0 + r
        bd = bias[d]  # zeros when there is no bias (keeps the compute dtype; no float64 promotion)
        # chunk slices: indices t in range(T) are provably non-negative, so loops stay vectorisable
        u_seg = u[bi, d, l0:l0 + T]
        x_seg = delta[bi, d, l0:l0 + T]
        dt_r = dtbuf[r]
        dtu_r = dtubuf[r]
        if softplus and need_sig:
            sg_r = sgbuf[r]
            for t in range(T):
                v, sg = vsoftplus_sigmoid(x_seg[t] + bd)
                dt_r[t] = v
                dtu_r[t] = v * u_seg[t]
                sg_r[t] = sg
        elif softplus:
            for t in range(T):
                v = vsoftplus(x_seg[t] + bd)
                dt_r[t] = v
                dtu_r[t] = v * u_seg[t]
        else:
            for t in range(T):
                v = x_seg[t] + bd
                dt_r[t] = v
                dtu_r[t] = v * u_seg[t]
        Bm = B[bi if B.shape[0] > 1 else 0, d // dpg_b]  # (N, LB)
        for n in range(N):
            k = r * N + n
            an = A[d, n]
            a_k = abuf[k]
            x_k = xbuf[k]
            for t in range(T):
                a_k[t] = vexp(dt_r[t] * an)
            if var_lb:
                b_seg = Bm[n, l0:l0 + T]
                for t in range(T):
                    x_k[t] = dtu_r[t] * b_seg[t]
            else:
                bn = Bm[n, 0]
                for t in range(T):
                    x_k[t] = dtu_r[t] * bn


@njit(inline="always", error_model="numpy")
def _sum(buf, T):
    """sum(buf[:T]) in float64 with 8 interleaved partial sums (fixed order: reproducible, and not
    one long dependent add chain)."""
    p = np.zeros(8, dtype=np.float64)
    full = T - T % 8
    for t in range(0, full, 8):
        for j in range(8):
            p[j] += buf[t + j]
    for t in range(full, T):
        p[t - full] += buf[t]
    return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]))


@njit(inline="always", error_model="numpy")
def _block_states(lanes, T, abuf, xbuf, hbuf):
    """hbuf[:, 0] holds the chunk's start states; hbuf[k, t+1] = abuf[k, t] * hbuf[k, t] + xbuf[k, t]."""
    for t in range(T):
        for k in range(lanes):
            hbuf[k, t + 1] = abuf[k, t] * hbuf[k, t] + xbuf[k, t]


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _scan_fwd(u, delta, A, B, C, D, bias, softplus, K, R, out, ckpt, last):
    """out (batch, dim, L); ckpt (batch, dim, ceil(L/K), N) chunk start states; last (batch, dim, N)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    n_chunks = ckpt.shape[2]
    dpg_c = dim // C.shape[1]
    var_lb = B.shape[3] > 1
    var_lc = C.shape[3] > 1
    blocks = -(-dim // R)
    for job in prange(batch * blocks):
        bi = job // blocks
        d0 = (job % blocks) * R
        Rb = min(R, dim - d0)
        lanes = Rb * N
        dtbuf = np.empty((R, K), dtype=u.dtype)
        dtubuf = np.empty((R, K), dtype=u.dtype)
        abuf = np.empty((R * N, K), dtype=u.dtype)
        xbuf = np.empty((R * N, K), dtype=u.dtype)
        hbuf = np.zeros((R * N, K + 1), dtype=u.dtype)
        ybuf = np.empty(K, dtype=u.dtype)
        for c in range(n_chunks):
            l0 = c * K
            T = min(L, l0 + K) - l0
            for r in range(Rb):
                for n in range(N):
                    ckpt[bi, d0 + r, c, n] = hbuf[r * N + n, 0]
            _block_inputs(bi, d0, Rb, l0, T, u, delta, bias, softplus, A, B, var_lb, False,
                          dtbuf, dtubuf, dtbuf, abuf, xbuf)
            _block_states(lanes, T, abuf, xbuf, hbuf)
            for r in range(Rb):
                d = d0 + r
                u_seg = u[bi, d, l0:l0 + T]
                Cm = C[bi if C.shape[0] > 1 else 0, d // dpg_c]
                dd = D[d]  # zeros when there is no D
                for t in range(T):
                    ybuf[t] = dd * u_seg[t]
                for n in range(N):
                    h_k = hbuf[r * N + n, 1:T + 1]
                    if var_lc:
                        c_seg = Cm[n, l0:l0 + T]
                        for t in range(T):
                            ybuf[t] += h_k[t] * c_seg[t]
                    else:
                        cn = Cm[n, 0]
                        for t in range(T):
                            ybuf[t] += h_k[t] * cn
                out_seg = out[bi, d, l0:l0 + T]
                for t in range(T):
                    out_seg[t] = ybuf[t]
            for k in range(lanes):
                hbuf[k, 0] = hbuf[k, T]
        for r in range(Rb):
            for n in range(N):
                last[bi, d0 + r, n] = hbuf[r * N + n, 0]


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _scan_bwd(u, delta, A, B, C, D, bias, softplus, K, R, ckpt, gout, glast, has_glast,
              shared_b, shared_c, groups, slices, du, ddelta, dA_part, dD_part, dB_buf, dC_buf):
    """Reverse scan. Work item = (bi, group, slice): a run of channels inside one group of `groups`,
    processed in blocks of R rows.

    ddelta: gradient w.r.t. delta (before bias/softplus; the bias gradient is its sum over batch, L).
    dA_part (batch, dim, N), dD_part (batch, dim): per-row sums, reduced over batch by the caller.
    dB_buf / dC_buf (slots, N, LB): slot bi*dim + d for shared B/C, else the work item.
    """
    batch, dim, L = u.shape
    N = A.shape[1]
    n_chunks = ckpt.shape[2]
    dpg = dim // groups
    dpg_c = dim // C.shape[1]
    dpg_b = dim // B.shape[1]
    var_lb = B.shape[3] > 1
    var_lc = C.shape[3] > 1
    for item_u in prange(batch * groups * slices):
        item = np.int64(item_u)  # the parfor index may be unsigned; keep slot arithmetic in int64
        bi = item // (groups * slices)
        gp = (item // slices) % groups
        s = item % slices
        d_lo = gp * dpg + (s * dpg) // slices
        d_hi = gp * dpg + ((s + 1) * dpg) // slices
        dtbuf = np.empty((R, K), dtype=u.dtype)
        dtubuf = np.empty((R, K), dtype=u.dtype)
        sgbuf = np.empty((R, K), dtype=u.dtype)
        abuf = np.empty((R * N, K), dtype=u.dtype)
        xbuf = np.empty((R * N, K), dtype=u.dtype)
        hbuf = np.empty((R * N, K + 1), dtype=u.dtype)
        cbuf = np.empty((R * N, K), dtype=u.dtype)
        gbuf = np.empty((R * N, K), dtype=u.dtype)  # dLoss/dh[k, t] with later steps folded in
        gobuf = np.empty((R, K), dtype=u.dtype)
        dubuf = np.empty((R, K), dtype=u.dtype)
        ddtbuf = np.empty((R, K), dtype=u.dtype)
        qbuf = np.empty(K, dtype=u.dtype)
        g = np.empty(R * N, dtype=u.dtype)
        # per-position partial sums of dA and dD over the chunks of a row (vector adds, no reduction
        # chain in the hot loop); reduced once per row
        dA_vec = np.empty((R * N, K), dtype=u.dtype)
        dD_vec = np.empty((R, K), dtype=u.dtype)
        for d0 in range(d_lo, d_hi, R):
            Rb = min(R, d_hi - d0)
            lanes = Rb * N
            for r in range(Rb):
                dD_vec[r, :] = 0.0
                for n in range(N):
                    g[r * N + n] = glast[bi, d0 + r, n] if has_glast else 0.0
                    dA_vec[r * N + n, :] = 0.0
            for c in range(n_chunks - 1, -1, -1):
                l0 = c * K
                T = min(L, l0 + K) - l0
                for r in range(Rb):
                    for n in range(N):
                        hbuf[r * N + n, 0] = ckpt[bi, d0 + r, c, n]
                _block_inputs(bi, d0, Rb, l0, T, u, delta, bias, softplus, A, B, var_lb, True,
                              dtbuf, dtubuf, sgbuf, abuf, xbuf)
                _block_states(lanes, T, abuf, xbuf, hbuf)
                for r in range(Rb):
                    d = d0 + r
                    dd = D[d]  # zeros when there is no D
                    go_seg = gout[bi, d, l0:l0 + T]
                    u_seg = u[bi, d, l0:l0 + T]
                    go_r = gobuf[r]
                    du_r = dubuf[r]
                    ddt_r = ddtbuf[r]
                    dD_r = dD_vec[r]
                    for t in range(T):
                        go_r[t] = go_seg[t]
                        du_r[t] = go_seg[t] * dd
                        ddt_r[t] = 0.0
                        dD_r[t] += go_seg[t] * u_seg[t]
                    Cm = C[bi if C.shape[0] > 1 else 0, d // dpg_c]
                    for n in range(N):
                        c_k = cbuf[r * N + n]
                        if var_lc:
                            c_seg = Cm[n, l0:l0 + T]
                            for t in range(T):
                                c_k[t] = c_seg[t]
                        else:
                            cn = Cm[n, 0]
                            for t in range(T):
                                c_k[t] = cn
                # sequential part: the adjoint recurrence, all lanes of the block interleaved
                for t in range(T - 1, -1, -1):
                    for r in range(Rb):
                        go = gobuf[r, t]
                        for n in range(N):
                            k = r * N + n
                            gn = g[k] + go * cbuf[k, t]
                            gbuf[k, t] = gn
                            g[k] = gn * abuf[k, t]
                # vectorisable part: gradients of the chunk
                for r in range(Rb):
                    d = d0 + r
                    u_seg = u[bi, d, l0:l0 + T]
                    Bm = B[bi if B.shape[0] > 1 else 0, d // dpg_b]
                    dBm = dB_buf[bi * dim + d if shared_b else item]
                    dCm = dC_buf[bi * dim + d if shared_c else item]
                    go_r = gobuf[r]
                    dt_r = dtbuf[r]
                    dtu_r = dtubuf[r]
                    du_r = dubuf[r]
                    ddt_r = ddtbuf[r]
                    for n in range(N):
                        k = r * N + n
                        an = A[d, n]
                        g_k = gbuf[k]
                        a_k = abuf[k]
                        dA_k = dA_vec[k]
                        h_prev = hbuf[k, 0:T]
                        h_cur = hbuf[k, 1:T + 1]
                        if var_lc:
                            dc_seg = dCm[n, l0:l0 + T]
                            for t in range(T):
                                dc_seg[t] += go_r[t] * h_cur[t]
                        else:
                            for t in range(T):
                                qbuf[t] = go_r[t] * h_cur[t]
                            dCm[n, 0] += _sum(qbuf, T)
                        if var_lb:
                            b_seg = Bm[n, l0:l0 + T]
                            db_seg = dBm[n, l0:l0 + T]
                            for t in range(T):
                                gn = g_k[t]
                                bv = b_seg[t]
                                db_seg[t] += gn * dtu_r[t]
                                du_r[t] += gn * dt_r[t] * bv
                                q = gn * h_prev[t] * a_k[t]  # dLoss / d(dt*A) through the decay
                                ddt_r[t] += gn * bv * u_seg[t] + q * an
                                dA_k[t] += q * dt_r[t]
                        else:
                            bv = Bm[n, 0]
                            for t in range(T):
                                gn = g_k[t]
                                du_r[t] += gn * dt_r[t] * bv
                                q = gn * h_prev[t] * a_k[t]
                                ddt_r[t] += gn * bv * u_seg[t] + q * an
                                dA_k[t] += q * dt_r[t]
                                qbuf[t] = gn * dtu_r[t]
                            dBm[n, 0] += _sum(qbuf, T)
                    du_seg = du[bi, d, l0:l0 + T]
                    ddelta_seg = ddelta[bi, d, l0:l0 + T]
                    for t in range(T):
                        du_seg[t] = du_r[t]
                    if softplus:
                        sg_r = sgbuf[r]
                        for t in range(T):
                            ddelta_seg[t] = ddt_r[t] * sg_r[t]
                    else:
                        for t in range(T):
                            ddelta_seg[t] = ddt_r[t]
            for r in range(Rb):
                dD_part[bi, d0 + r] = _sum(dD_vec[r], K)
                for n in range(N):
                    dA_part[bi, d0 + r, n] = _sum(dA_vec[r * N + n], K)


def _bc_kernel_layout(X: torch.Tensor) -> torch.Tensor:
    """B/C from the public layout to the kernel layout (Bb, G, N, LB), contiguous."""
    if X.dim() == 2:
        X = X[None, :, :, None]
    elif X.dim() == 3:
        X = X[:, None]
    return X.detach().contiguous()


def _bc_grad_to_public(gk: torch.Tensor, ndim: int) -> torch.Tensor:
    """Inverse of `_bc_kernel_layout` for a gradient (Bb, G, N, LB) -> public shape."""
    if ndim == 2:
        return gk[0, :, :, 0]
    if ndim == 3:
        return gk[:, 0]
    return gk


def _work_split(batch: int, dim: int, g_b: int | None, g_c: int | None) -> tuple[int, int]:
    """(groups, slices) of the backward partition: items never straddle a group of a per-step B or C."""
    groups = 1
    for g in (g_b, g_c):
        if g is not None:
            groups = groups * g // math.gcd(groups, g)
    slices = max(1, min(dim // groups, -(-_TARGET_ITEMS // (batch * groups))))
    return groups, slices


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


@contextlib.contextmanager
def _torch_threads():
    """Run a numba kernel on at most torch's thread count. The kernels run between torch ops, never
    beside them, so a caller that gave torch its share of the cores (parallel jobs, a benchmark at one
    thread) bounds the scan too, instead of numba starting one thread per core next to other jobs."""
    before = numba.get_num_threads()
    want = max(1, min(before, torch.get_num_threads()))
    if want == before:
        yield
        return
    numba.set_num_threads(want)
    try:
        yield
    finally:
        numba.set_num_threads(before)


class _ScanCore(torch.autograd.Function):
    """(u, delta, A, B, C, D, delta_bias) -> (sum_n C h + D u, last_state); one compute dtype, public
    B/C layout; dt = softplus(delta + delta_bias) when `softplus`."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, softplus):
        batch, dim, length = u.shape
        n = A.shape[1]
        has_D, has_bias = D is not None, delta_bias is not None
        zeros = torch.zeros(dim, dtype=u.dtype)  # absent D / bias read as zeros: one code path, one dtype
        Dk = D.detach().contiguous() if has_D else zeros
        bk = delta_bias.detach().contiguous() if has_bias else zeros
        uk, xk, Ak = u.detach().contiguous(), delta.detach().contiguous(), A.detach().contiguous()
        Bk, Ck = _bc_kernel_layout(B), _bc_kernel_layout(C)
        out = torch.empty(batch, dim, length, dtype=u.dtype)
        ckpt = torch.empty(batch, dim, -(-length // _chunk(length)), n, dtype=u.dtype)
        last = torch.empty(batch, dim, n, dtype=u.dtype)
        with _torch_threads():
            _scan_fwd(_np(uk), _np(xk), _np(Ak), _np(Bk), _np(Ck), _np(Dk), _np(bk), softplus,
                      _chunk(length), _rows_per_block(n), out.numpy(), ckpt.numpy(), last.numpy())
        ctx.save_for_backward(uk, xk, Ak, Bk, Ck, Dk, bk, ckpt)
        ctx.flags = (has_D, has_bias, softplus)
        ctx.bc_ndim = (B.dim(), C.dim())
        return out, last

    @staticmethod
    def backward(ctx, gout, glast):
        uk, xk, Ak, Bk, Ck, Dk, bk, ckpt = ctx.saved_tensors
        has_D, has_bias, softplus = ctx.flags
        ct = uk.dtype
        batch, dim, length = uk.shape
        n = Ak.shape[1]
        b_ndim, c_ndim = ctx.bc_ndim
        shared_b, shared_c = b_ndim == 2, c_ndim == 2
        groups, slices = _work_split(batch, dim, None if shared_b else Bk.shape[1], None if shared_c else Ck.shape[1])
        items = batch * groups * slices
        gout = torch.zeros_like(uk) if gout is None else gout.detach().to(ct).contiguous()
        has_glast = glast is not None
        glast_k = glast.detach().to(ct).contiguous() if has_glast else torch.zeros(1, 1, 1, dtype=ct)

        du = torch.empty_like(uk)
        ddelta = torch.empty_like(xk)
        dA_part = torch.empty(batch, dim, n, dtype=ct)
        dD_part = torch.empty(batch, dim, dtype=ct)
        dB_buf = torch.zeros(batch * dim if shared_b else items, n, Bk.shape[3], dtype=ct)
        dC_buf = torch.zeros(batch * dim if shared_c else items, n, Ck.shape[3], dtype=ct)
        with _torch_threads():
            _scan_bwd(_np(uk), _np(xk), _np(Ak), _np(Bk), _np(Ck), _np(Dk), _np(bk), softplus,
                      _chunk(length), _rows_per_block(n), _np(ckpt), _np(gout), _np(glast_k), has_glast,
                      shared_b, shared_c, groups, slices,
                      du.numpy(), ddelta.numpy(), dA_part.numpy(), dD_part.numpy(), dB_buf.numpy(), dC_buf.numpy())

        def reduce_bc(buf: torch.Tensor, kshape: torch.Size, shared: bool) -> torch.Tensor:
            if shared:  # slots are (batch, dim): sum over batch
                return buf.reshape(batch, dim, n, 1).sum(0, keepdim=True)
            g = kshape[1]
            per = buf.reshape(batch, g, (groups // g) * slices, n, buf.shape[2]).sum(2)
            return per if kshape[0] == batch else per.sum(0, keepdim=True)

        dB = _bc_grad_to_public(reduce_bc(dB_buf, Bk.shape, shared_b), b_ndim)
        dC = _bc_grad_to_public(reduce_bc(dC_buf, Ck.shape, shared_c), c_ndim)
        dD = dD_part.sum(0) if has_D else None
        dbias = ddelta.sum((0, 2)) if has_bias else None
        return du, ddelta, dA_part.sum(0), dB, dC, dD, dbias, None


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Selective scan with the numba CPU kernel (shapes already validated by `selective_scan`).

    Same arguments and returns as `remamber.ops.selective_scan`. Half precision is computed in fp32,
    fp64 in fp64; out has u's dtype, last_state the compute dtype.
    """
    dtype_in = u.dtype
    ct = compute_dtype(dtype_in)
    cast = lambda t: None if t is None else t.to(ct)  # noqa: E731  (differentiable casts)
    out, last = _ScanCore.apply(cast(u), cast(delta), cast(A), cast(B), cast(C), cast(D), cast(delta_bias),
                                bool(delta_softplus))
    if z is not None:
        out = out * F.silu(z.to(ct))
    out = out.to(dtype_in)
    return (out, last) if return_last_state else out


# ------------------------------------------------------------------ directional scan (cross-scan fused)
# The same recurrence as above for nd directions that all scan one input u in different orders
# (VMamba's cross-scan, the Twister's channel scan). Instead of materialising nd re-ordered copies of
# u, delta, B and C and un-permuting nd outputs, each chunk gathers its steps through `orders` into
# chunk buffers and scatters (adds) its output back to map order. Layout: u (batch, Du, L); delta
# (batch, nd*Du, L) and B, C (batch, nd, N, L) in map order; channel k*Du + d is channel d of direction
# k; out (batch, Du, L) = sum over directions.
#
# The chunk buffers are step-major, (step, channel of the block): one step of a block's channels is a
# contiguous vector, so the recurrence and every elementwise term run across channels. At d_state 1
# (VMamba's, the paper's) a 2 x 2 or 3 x 3 map, 4 or 9 steps long, then costs about what a long
# sequence does per element (the time-major layout paid per-row loop overhead there: 30 ns per element
# at 4 steps against 5 at 144). Short loops with few arrays each: LLVM gives up vectorising a loop that
# touches many arrays it cannot prove apart.
DIR_LANES = 32  # channels (x states) per block of the directional kernels
DIR_LANES_LONG = 16  # the same beyond DIR_LONG steps, where a block's rows no longer stay in cache
DIR_LONG = 512  # (blocks of 32 at 1,024 and 4,096 steps: 1.05x and 1.1x the time of blocks of 16)


def _dir_rows_per_block(n_state: int, length: int) -> int:
    """Rows (channels) per block: a function of the shape only, so sums are bit-reproducible."""
    return max(1, (DIR_LANES if length <= DIR_LONG else DIR_LANES_LONG) // n_state)


@njit(inline="always", error_model="numpy")
def _lane_gather(bi, k, d0, ch0, Rb, l0, T, orders, u, delta, bias, ub, xb):
    """ub[t, r] = u[bi, d0 + r, p] and xb[t, r] = delta[bi, ch0 + r, p] + bias[ch0 + r], p = orders[k, l0 + t]:
    the chunk's steps in scan order, one row per step and the block's channels side by side."""
    for r in range(Rb):
        u_row = u[bi, d0 + r]
        x_row = delta[bi, ch0 + r]
        bd = bias[ch0 + r]
        for t in range(T):
            p = orders[k, l0 + t]
            ub[t, r] = u_row[p]
            xb[t, r] = x_row[p] + bd


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _dscan_fwd(u, delta, A, B, C, D, bias, softplus, orders, K, R, out, ckpt):
    """out (batch, Du, L) = sum over directions (map order); ckpt (batch, nd*Du, ceil(L/K), N)."""
    batch, Du, L = u.shape
    nd = orders.shape[0]
    N = A.shape[1]
    n_chunks = ckpt.shape[2]
    blocks = -(-Du // R)
    for job in prange(batch * blocks):
        bi = job // blocks
        d0 = (job % blocks) * R
        Rb = min(R, Du - d0)
        ub = np.zeros((K, R), dtype=u.dtype)
        xb = np.zeros((K, R), dtype=u.dtype)
        yb = np.zeros((K, R), dtype=u.dtype)
        h = np.zeros(R * N, dtype=u.dtype)
        an = np.zeros(R * N, dtype=u.dtype)
        dd = np.zeros(R, dtype=u.dtype)
        for k in range(nd):
            ch0 = k * Du + d0
            for r in range(Rb):
                dd[r] = D[ch0 + r]
                for n in range(N):
                    h[r * N + n] = 0.0
                    an[r * N + n] = A[ch0 + r, n]
            for c in range(n_chunks):
                l0 = c * K
                T = min(L, l0 + K) - l0
                for r in range(Rb):
                    for n in range(N):
                        ckpt[bi, ch0 + r, c, n] = h[r * N + n]
                _lane_gather(bi, k, d0, ch0, Rb, l0, T, orders, u, delta, bias, ub, xb)
                for t in range(T):
                    p = orders[k, l0 + t]
                    u_t = ub[t]
                    x_t = xb[t]
                    y_t = yb[t]
                    if N == 1:
                        bv = B[bi, k, 0, p]
                        cv = C[bi, k, 0, p]
                        if softplus:
                            for r in range(Rb):
                                v = vsoftplus(x_t[r])
                                hr = vexp(v * an[r]) * h[r] + v * u_t[r] * bv
                                h[r] = hr
                                y_t[r] = hr * cv + dd[r] * u_t[r]
                        else:
                            for r in range(Rb):
                                v = x_t[r]
                                hr = vexp(v * an[r]) * h[r] + v * u_t[r] * bv
                                h[r] = hr
                                y_t[r] = hr * cv + dd[r] * u_t[r]
                    else:
                        for r in range(Rb):
                            v = vsoftplus(x_t[r]) if softplus else x_t[r]
                            dtu = v * u_t[r]
                            y = dd[r] * u_t[r]
                            for n in range(N):
                                kk = r * N + n
                                hn = vexp(v * an[kk]) * h[kk] + dtu * B[bi, k, n, p]
                                h[kk] = hn
                                y += hn * C[bi, k, n, p]
                            y_t[r] = y
                for r in range(Rb):
                    o_row = out[bi, d0 + r]
                    if k == 0:
                        for t in range(T):
                            o_row[orders[k, l0 + t]] = yb[t, r]
                    else:
                        for t in range(T):
                            o_row[orders[k, l0 + t]] += yb[t, r]


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _dscan_bwd(u, delta, A, B, C, D, bias, softplus, orders, K, R, ckpt, gout, slices,
               du, ddelta, dA_part, dD_part, dB_buf, dC_buf):
    """Reverse of `_dscan_fwd`. Work item (bi, s): channels d_lo..d_hi of every direction, so du
    (zero-initialised, map order) is summed over directions without races. Per chunk, backwards: the
    states again from the chunk's checkpoint, then the adjoint recurrence, then each step's terms.
    ddelta (batch, nd*Du, L) map order; dA_part (batch, nd*Du, N), dD_part (batch, nd*Du) (accumulated in
    float64); dB_buf, dC_buf (batch*slices, nd, N, L) zero-initialised, one slot per item."""
    batch, Du, L = u.shape
    nd = orders.shape[0]
    N = A.shape[1]
    n_chunks = ckpt.shape[2]
    LN = R * N
    for item_u in prange(batch * slices):
        item = np.int64(item_u)
        bi = item // slices
        s = item % slices
        d_lo = (s * Du) // slices
        d_hi = ((s + 1) * Du) // slices
        ub = np.zeros((K, R), dtype=u.dtype)
        xb = np.zeros((K, R), dtype=u.dtype)
        gob = np.zeros((K, R), dtype=u.dtype)
        dtb = np.zeros((K, R), dtype=u.dtype)
        sgb = np.zeros((K, R), dtype=u.dtype)
        dub = np.zeros((K, R), dtype=u.dtype)
        dxb = np.zeros((K, R), dtype=u.dtype)
        hs = np.zeros((K + 1, LN), dtype=u.dtype)  # hs[t]: the state before step t of the chunk
        ab = np.zeros((K, LN), dtype=u.dtype)
        dbp = np.zeros((K, LN), dtype=u.dtype)  # per (step, lane) terms of dB and dC, summed over the block's rows
        dcp = np.zeros((K, LN), dtype=u.dtype)
        g = np.zeros(LN, dtype=u.dtype)
        h = np.zeros(LN, dtype=u.dtype)
        xvb = np.zeros((K, LN), dtype=u.dtype)
        gnb = np.zeros((K, LN), dtype=u.dtype)
        an = np.zeros(LN, dtype=u.dtype)
        dd = np.zeros(R, dtype=u.dtype)
        dA_acc = np.zeros(LN, dtype=np.float64)
        dD_acc = np.zeros(R, dtype=np.float64)
        for k in range(nd):
            dBk = dB_buf[item, k]
            dCk = dC_buf[item, k]
            for d0 in range(d_lo, d_hi, R):
                Rb = min(R, d_hi - d0)
                ch0 = k * Du + d0
                for r in range(Rb):
                    dd[r] = D[ch0 + r]
                    dD_acc[r] = 0.0
                    for n in range(N):
                        g[r * N + n] = 0.0
                        an[r * N + n] = A[ch0 + r, n]
                        dA_acc[r * N + n] = 0.0
                for c in range(n_chunks - 1, -1, -1):
                    l0 = c * K
                    T = min(L, l0 + K) - l0
                    for r in range(Rb):
                        for n in range(N):
                            hs[0, r * N + n] = ckpt[bi, ch0 + r, c, n]
                    _lane_gather(bi, k, d0, ch0, Rb, l0, T, orders, u, delta, bias, ub, xb)
                    for r in range(Rb):
                        g_row = gout[bi, d0 + r]
                        for t in range(T):
                            gob[t, r] = g_row[orders[k, l0 + t]]
                    # the chunk's states again, from its checkpoint
                    if N == 1:
                        for r in range(Rb):
                            h[r] = hs[0, r]
                        for t in range(T):
                            p = orders[k, l0 + t]
                            bv = B[bi, k, 0, p]
                            x_t = xb[t]
                            u_t = ub[t]
                            dt_t = dtb[t]
                            sg_t = sgb[t]
                            a_t = ab[t]
                            xv_t = xvb[t]
                            if softplus:
                                for r in range(Rb):
                                    v, sg = vsoftplus_sigmoid(x_t[r])
                                    dt_t[r] = v
                                    sg_t[r] = sg
                                    a_t[r] = vexp(v * an[r])
                                    xv_t[r] = v * u_t[r] * bv
                            else:
                                for r in range(Rb):
                                    v = x_t[r]
                                    dt_t[r] = v
                                    sg_t[r] = 1.0
                                    a_t[r] = vexp(v * an[r])
                                    xv_t[r] = v * u_t[r] * bv
                        for t in range(T):
                            a_t = ab[t]
                            xv_t = xvb[t]
                            h_t = hs[t + 1]
                            for r in range(Rb):
                                hr = a_t[r] * h[r] + xv_t[r]
                                h[r] = hr
                                h_t[r] = hr
                        for t in range(T - 1, -1, -1):
                            cv = C[bi, k, 0, orders[k, l0 + t]]
                            go_t = gob[t]
                            a_t = ab[t]
                            gn_t = gnb[t]
                            for r in range(Rb):
                                gn = g[r] + go_t[r] * cv
                                gn_t[r] = gn
                                g[r] = gn * a_t[r]
                        for t in range(T):
                            go_t = gob[t]
                            gn_t = gnb[t]
                            h1 = hs[t + 1]
                            dt_t = dtb[t]
                            u_t = ub[t]
                            dc_t = dcp[t]
                            db_t = dbp[t]
                            for r in range(Rb):
                                dc_t[r] = go_t[r] * h1[r]
                                db_t[r] = gn_t[r] * (dt_t[r] * u_t[r])
                        for t in range(T):
                            bv = B[bi, k, 0, orders[k, l0 + t]]
                            go_t = gob[t]
                            gn_t = gnb[t]
                            h0 = hs[t]
                            a_t = ab[t]
                            dt_t = dtb[t]
                            u_t = ub[t]
                            sg_t = sgb[t]
                            dx_t = dxb[t]
                            du_t = dub[t]
                            for r in range(Rb):
                                q = gn_t[r] * h0[r] * a_t[r]  # dLoss / d(dt*A) through the decay
                                dx_t[r] = (gn_t[r] * bv * u_t[r] + q * an[r]) * sg_t[r]
                                dA_acc[r] += q * dt_t[r]
                                du_t[r] = go_t[r] * dd[r] + gn_t[r] * dt_t[r] * bv
                                dD_acc[r] += go_t[r] * u_t[r]
                    else:  # any d_state: lanes r * N + n
                        for t in range(T):
                            p = orders[k, l0 + t]
                            u_t = ub[t]
                            x_t = xb[t]
                            h0 = hs[t]
                            h1 = hs[t + 1]
                            for r in range(Rb):
                                if softplus:
                                    v, sg = vsoftplus_sigmoid(x_t[r])
                                else:
                                    v, sg = x_t[r], 1.0
                                dtb[t, r] = v
                                sgb[t, r] = sg
                                dtu = v * u_t[r]
                                for n in range(N):
                                    kk = r * N + n
                                    a = vexp(v * an[kk])
                                    ab[t, kk] = a
                                    h1[kk] = a * h0[kk] + dtu * B[bi, k, n, p]
                        for t in range(T - 1, -1, -1):
                            p = orders[k, l0 + t]
                            h0 = hs[t]
                            h1 = hs[t + 1]
                            for r in range(Rb):
                                go = gob[t, r]
                                uu = ub[t, r]
                                v = dtb[t, r]
                                dtu = v * uu
                                du_r = go * dd[r]
                                ddt = 0.0
                                for n in range(N):
                                    kk = r * N + n
                                    bv = B[bi, k, n, p]
                                    a = ab[t, kk]
                                    gn = g[kk] + go * C[bi, k, n, p]
                                    dcp[t, kk] = go * h1[kk]
                                    dbp[t, kk] = gn * dtu
                                    q = gn * h0[kk] * a
                                    du_r += gn * v * bv
                                    ddt += gn * bv * uu + q * an[kk]
                                    dA_acc[kk] += q * v
                                    g[kk] = gn * a
                                dub[t, r] = du_r
                                dxb[t, r] = ddt * sgb[t, r]
                                dD_acc[r] += go * uu
                    # dB, dC: the block's rows summed in row order, then added at the map positions
                    for t in range(T):
                        p = orders[k, l0 + t]
                        for n in range(N):
                            sb = dbp[t, n]
                            sc = dcp[t, n]
                            for r in range(1, Rb):
                                sb += dbp[t, r * N + n]
                                sc += dcp[t, r * N + n]
                            dBk[n, p] += sb
                            dCk[n, p] += sc
                    for r in range(Rb):
                        du_row = du[bi, d0 + r]
                        dx_row = ddelta[bi, ch0 + r]
                        for t in range(T):
                            p = orders[k, l0 + t]
                            du_row[p] += dub[t, r]
                            dx_row[p] = dxb[t, r]
                for r in range(Rb):
                    dD_part[bi, ch0 + r] = dD_acc[r]
                    for n in range(N):
                        dA_part[bi, ch0 + r, n] = dA_acc[r * N + n]


class _DirScanCore(torch.autograd.Function):
    """(u, delta, A, B, C, D, delta_bias, orders) -> sum over directions of each direction's output, map
    order; one compute dtype; D and delta_bias may be None."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, orders, softplus, tape=None):
        batch, du_, length = u.shape
        n = A.shape[1]
        zeros = torch.zeros(A.shape[0], dtype=u.dtype)
        Dk = D.detach().contiguous() if D is not None else zeros
        bk = delta_bias.detach().contiguous() if delta_bias is not None else zeros
        uk, xk, Ak = u.detach().contiguous(), delta.detach().contiguous(), A.detach().contiguous()
        Bk, Ck = B.detach().contiguous(), C.detach().contiguous()
        ok = orders.contiguous()
        ckpt_shape = (batch, A.shape[0], -(-length // _chunk(length)), n)
        if tape is not None and tape.states is not None:  # a replay (ScanTape): backward only
            if tuple(tape.states.shape) != ckpt_shape or tape.states.dtype != u.dtype:
                raise ValueError(f"ScanTape: states {tuple(tape.states.shape)} {tape.states.dtype} do not belong to "
                                 f"this scan ({ckpt_shape} {u.dtype})")
            out, ckpt = torch.zeros(batch, du_, length, dtype=u.dtype), tape.states
        else:
            out = torch.empty(batch, du_, length, dtype=u.dtype)
            ckpt = torch.empty(ckpt_shape, dtype=u.dtype)
            with _torch_threads():
                _dscan_fwd(_np(uk), _np(xk), _np(Ak), _np(Bk), _np(Ck), _np(Dk), _np(bk), softplus, ok.numpy(),
                           _chunk(length), _dir_rows_per_block(n, length), out.numpy(), ckpt.numpy())
            if tape is not None:
                tape.states = ckpt
        ctx.save_for_backward(uk, xk, Ak, Bk, Ck, Dk, bk, ok, ckpt)
        ctx.flags = (D is not None, delta_bias is not None, softplus)
        return out

    @staticmethod
    def backward(ctx, gout):
        uk, xk, Ak, Bk, Ck, Dk, bk, ok, ckpt = ctx.saved_tensors
        has_D, has_bias, softplus = ctx.flags
        ct = uk.dtype
        batch, du_, length = uk.shape
        nd, n = ok.shape[0], Ak.shape[1]
        rows = _dir_rows_per_block(n, length)
        slices = max(1, min(-(-du_ // rows), -(-_TARGET_ITEMS // batch)))  # items of whole blocks
        gout = gout.detach().to(ct).contiguous()
        du = torch.zeros_like(uk)
        ddelta = torch.empty_like(xk)
        dA_part = torch.empty(batch, nd * du_, n, dtype=ct)
        dD_part = torch.empty(batch, nd * du_, dtype=ct)
        dB_buf = torch.zeros(batch * slices, nd, n, length, dtype=ct)
        dC_buf = torch.zeros(batch * slices, nd, n, length, dtype=ct)
        with _torch_threads():
            _dscan_bwd(_np(uk), _np(xk), _np(Ak), _np(Bk), _np(Ck), _np(Dk), _np(bk), softplus, ok.numpy(),
                       _chunk(length), rows, _np(ckpt), _np(gout), slices,
                       du.numpy(), ddelta.numpy(), dA_part.numpy(), dD_part.numpy(), dB_buf.numpy(),
                       dC_buf.numpy())
        dB = dB_buf.reshape(batch, slices, nd, n, length).sum(1)
        dC = dC_buf.reshape(batch, slices, nd, n, length).sum(1)
        dD = dD_part.sum(0) if has_D else None
        dbias = ddelta.sum((0, 2)) if has_bias else None
        return du, ddelta, dA_part.sum(0), dB, dC, dD, dbias, None, None, None


def directional_scan_cpu(u, delta, A, B, C, orders, D=None, delta_bias=None, delta_softplus=False, tape=None):
    """Directional selective scan with the numba kernels (arguments validated by the caller); returns
    (batch, Du, L) in the compute dtype (fp32, or fp64 for fp64 inputs)."""
    ct = compute_dtype(u.dtype)
    cast = lambda t: None if t is None else t.to(ct)  # noqa: E731
    return _DirScanCore.apply(cast(u), cast(delta), cast(A), cast(B), cast(C), cast(D), cast(delta_bias),
                              orders, bool(delta_softplus), tape)
