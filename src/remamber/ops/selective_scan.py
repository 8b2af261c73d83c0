"""Public selective-scan entry point: argument checks and backend dispatch.

Semantics are those of mamba_ssm's `selective_scan_fn` / `selective_scan_ref`.
"""

from __future__ import annotations

import functools

import torch

from .scan_torch import compute_dtype, selective_scan_torch

__all__ = ["selective_scan", "directional_selective_scan", "ScanTape", "available_backends", "KNOWN_BACKENDS"]


class ScanTape:
    """What a directional scan's backward needs besides its inputs, kept by a first call for a second.

    For callers that recompute in backward (`remamber.models.ssm.scan_in_orders_lean`): a forward call
    with an empty tape fills it (the "cpu" backend: its chunk start states, L/256 values per channel);
    a second call with the same inputs and the filled tape then skips the forward kernel (its returned
    value is zeros: only its graph is meant to be used) and its backward reads the kept states. The
    other backends ignore the tape and compute as usual.
    """

    __slots__ = ("states",)

    def __init__(self) -> None:
        self.states: torch.Tensor | None = None

KNOWN_BACKENDS = ("auto", "torch", "cpu", "mamba_ssm")
CUDA_INSTALL_HINT = (
    "pip install -e '.[cuda]'  (the `cuda` extra: mamba-ssm and causal-conv1d; building them needs a CUDA toolchain)"
)


@functools.lru_cache(maxsize=1)
def _mamba_ssm_fn():
    """mamba_ssm's CUDA selective_scan_fn, or None when the package does not import."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a broken CUDA build raising at import time
        return None
    return selective_scan_fn


@functools.lru_cache(maxsize=1)
def _cpu_available() -> bool:
    try:
        from . import scan_cpu  # noqa: F401  (imports numba)
    except ImportError:
        return False
    return True


def available_backends() -> list[str]:
    """Backends usable in this process ("torch" always; "cpu" with numba; "mamba_ssm" with CUDA)."""
    names = ["torch"]
    if _cpu_available():
        names.append("cpu")
    if torch.cuda.is_available() and _mamba_ssm_fn() is not None:
        names.append("mamba_ssm")
    return names


def _shape_error(name: str, expected: str, got: torch.Tensor) -> ValueError:
    return ValueError(f"selective_scan: {name} must have shape {expected}, got {tuple(got.shape)}")


def _check_bc(name: str, X: torch.Tensor, batch: int, dim: int, n: int, length: int) -> None:
    expected = f"(dim, N)=({dim}, {n}) or (batch, N, L)=({batch}, {n}, {length}) or (batch, G, N, L) with dim % G == 0"
    if X.dim() == 2:
        if tuple(X.shape) != (dim, n):
            raise _shape_error(name, expected, X)
    elif X.dim() == 3:
        if tuple(X.shape) != (batch, n, length):
            raise _shape_error(name, expected, X)
    elif X.dim() == 4:
        g = X.shape[1]
        if X.shape[0] != batch or X.shape[2] != n or X.shape[3] != length or g < 1 or dim % g != 0:
            raise _shape_error(name, expected, X)
    else:
        raise _shape_error(name, expected, X)


def _validate(u, delta, A, B, C, D, z, delta_bias) -> None:
    tensors = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must have shape (batch, dim, L), got {tuple(u.shape)}")
    batch, dim, length = u.shape
    if tuple(delta.shape) != (batch, dim, length):
        raise _shape_error("delta", f"(batch, dim, L)=({batch}, {dim}, {length}) like u", delta)
    if A.dim() != 2 or A.shape[0] != dim:
        raise _shape_error("A", f"(dim, N) with dim={dim}", A)
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported (only real A, as VMamba/ReMamber use)")
    n = A.shape[1]
    _check_bc("B", B, batch, dim, n, length)
    _check_bc("C", C, batch, dim, n, length)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise _shape_error(name, f"(dim,)=({dim},)", t)
    if z is not None and tuple(z.shape) != (batch, dim, length):
        raise _shape_error("z", f"(batch, dim, L)=({batch}, {dim}, {length}) like u", z)
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) > 1:
        raise ValueError(f"selective_scan: all tensors must be on one device, got {sorted(map(str, devices))}")


def _resolve_backend(backend: str, u: torch.Tensor) -> str:
    if backend not in KNOWN_BACKENDS:
        raise ValueError(f"selective_scan: unknown backend {backend!r}; known backends: {', '.join(KNOWN_BACKENDS)}")
    if backend == "auto":
        if u.is_cuda and _mamba_ssm_fn() is not None:
            return "mamba_ssm"
        if u.device.type == "cpu" and _cpu_available():
            return "cpu"
        return "torch"
    if backend == "mamba_ssm":
        if _mamba_ssm_fn() is None:
            raise RuntimeError(f"selective_scan: backend 'mamba_ssm' needs the mamba_ssm package, which does not import here. Install it with: {CUDA_INSTALL_HINT}")
        if not u.is_cuda:
            raise RuntimeError("selective_scan: backend 'mamba_ssm' runs on CUDA tensors only; got tensors on "
                               f"{u.device}. Use backend='cpu' or 'torch' (or 'auto').")
    if backend == "cpu":
        if u.device.type != "cpu":
            raise RuntimeError(f"selective_scan: backend 'cpu' needs CPU tensors, got tensors on {u.device}")
        if not _cpu_available():
            raise RuntimeError("selective_scan: backend 'cpu' needs numba (pip install numba)")
    return backend


def selective_scan(
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
    backend: str = "auto",
):
    """Selective scan (Mamba S6), same semantics as mamba_ssm's `selective_scan_fn`.

    u, delta: (batch, dim, L); A: (dim, N); B, C: (dim, N) shared, (batch, N, L) per step, or
    (batch, G, N, L) grouped (channel d uses group d // (dim // G)); D, delta_bias: (dim,);
    z: (batch, dim, L), gate out * silu(z). delta := softplus(delta + delta_bias) when asked.
    Half-precision inputs are computed in fp32; out has u's dtype.

    Returns out (batch, dim, L), or (out, last_state (batch, dim, N)) if return_last_state.
    backend: "auto" (mamba_ssm on CUDA if importable, "cpu" on CPU tensors, else "torch"),
    "torch" (pure PyTorch), "cpu" (numba kernel, hand-written backward), "mamba_ssm" (CUDA kernel).
    """
    _validate(u, delta, A, B, C, D, z, delta_bias)
    name = _resolve_backend(backend, u)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "torch":
        return selective_scan_torch(*args)
    if name == "cpu":
        from .scan_cpu import selective_scan_cpu

        return selective_scan_cpu(*args)
    return _selective_scan_mamba(*args)


def _selective_scan_mamba(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    fn = _mamba_ssm_fn()
    # the CUDA kernel wants contiguous inputs with the time axis last; fp32 A/D/delta_bias
    contig = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return fn(
        contig(u), contig(delta), contig(A), contig(B), contig(C),
        D=None if D is None else D.float().contiguous(), z=contig(z),
        delta_bias=None if delta_bias is None else delta_bias.float().contiguous(),
        delta_softplus=delta_softplus, return_last_state=return_last_state,
    )


def directional_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    orders: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
    tape: ScanTape | None = None,
) -> torch.Tensor:
    """nd selective scans of one input in nd orders, summed back in map order (a fused cross-scan).

    u: (batch, Du, L) in map order; orders: (nd, L) int64, each row a permutation: step l of
    direction k reads map position orders[k, l]. delta: (batch, nd*Du, L) and B, C: (batch, nd, N, L),
    also in map order (channel k*Du + d is channel d of direction k, with B[:, k], C[:, k]);
    A: (nd*Du, N); D, delta_bias: (nd*Du,).
    Same as gathering xs[:, k] = u[..., orders[k]] (and delta, B, C alike), `selective_scan` over the
    nd*Du channels, and summing the outputs scattered back to map order; but the "cpu" backend does the
    gather and scatter inside its kernel, so no re-ordered copies are made or kept for backward.
    Returns (batch, Du, L) in the compute dtype (fp32; fp64 for fp64 inputs): the directions are
    summed in fp32, as VMamba does. `tape`: see `ScanTape`.
    """
    if not isinstance(orders, torch.Tensor) or orders.dim() != 2 or orders.dtype != torch.int64:
        got = tuple(orders.shape) if isinstance(orders, torch.Tensor) else type(orders).__name__
        raise ValueError(f"directional_selective_scan: orders must be an int64 tensor (directions, L), got {got}")
    if u.dim() != 3 or B.dim() != 4 or C.dim() != 4:
        raise ValueError(f"directional_selective_scan: u must be (batch, Du, L) and B, C (batch, directions, N, L); "
                         f"got u {tuple(u.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}")
    batch, du, length = u.shape
    nd = orders.shape[0]
    if orders.shape[1] != length or B.shape[1] != nd or C.shape[1] != nd:
        raise ValueError(f"directional_selective_scan: orders {tuple(orders.shape)} must be (directions, L={length}) "
                         f"with directions = B.shape[1] = C.shape[1] (got {B.shape[1]}, {C.shape[1]})")
    expanded = u.new_empty(()).expand(batch, nd * du, length)  # shape-only stand-in for the nd*Du channels
    _validate(expanded, delta, A, B, C, D, None, delta_bias)
    if orders.device != u.device:
        raise ValueError(f"directional_selective_scan: orders on {orders.device}, tensors on {u.device}")
    ref = torch.arange(length, device=orders.device).expand(nd, length)
    if not torch.equal(orders.sort(dim=1).values, ref):
        raise ValueError("directional_selective_scan: every row of orders must be a permutation of 0..L-1")
    name = _resolve_backend(backend, u)
    if name == "cpu":
        from .scan_cpu import directional_scan_cpu

        return directional_scan_cpu(u, delta, A, B, C, orders, D, delta_bias, delta_softplus, tape)
    ct = compute_dtype(u.dtype)
    n = A.shape[1]
    idx = orders[None, :, None, :]
    u, delta, B, C = (t.to(ct) for t in (u, delta, B, C))  # each direction's output stays fp32 until summed
    xs = u[:, :, orders].transpose(1, 2).reshape(batch, nd * du, length)
    ds = delta.reshape(batch, nd, du, length).gather(3, idx.expand(batch, nd, du, length)).reshape(batch, nd * du, length)
    bs = B.gather(3, idx.expand(batch, nd, n, length))
    cs = C.gather(3, idx.expand(batch, nd, n, length))
    ys = selective_scan(xs, ds, A, bs, cs, D=D, delta_bias=delta_bias, delta_softplus=delta_softplus, backend=name)
    inverse = orders.argsort(dim=1)[None, :, None, :].expand(batch, nd, du, length)
    return ys.to(ct).reshape(batch, nd, du, length).gather(3, inverse).sum(1)
