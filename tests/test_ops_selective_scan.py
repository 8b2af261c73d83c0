"""selective_scan (torch and cpu backends) against an independent float64 sequential recurrence.

Grid: mamba's test_selective_scan grid (batch 2, dim 4), d_state 1 and 8, L in {1, 7, 65, 128, 512,
1024, 4096}, B/C shared (dim, N) / per step (batch, N, L) / grouped G=1 / grouped G=2, with and
without D, z, delta_bias, softplus, return_last_state. The cheap axes (backend, d_state, B/C layout)
are crossed fully; the five switches follow a 2-level orthogonal array (every pair of values of
every two switches occurs) and L cycles through its values, so every value of every axis is covered
(checked by `test_grid_covers_every_axis_value`). Tolerances are mamba's: fp32 forward rtol 6e-4 /
atol 2e-3, gradients scaled per argument as in mamba's test; bf16 rtol 3e-2 / atol 5e-2.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from remamber.ops import available_backends, selective_scan

BACKENDS = ["torch", "cpu"]
LENGTHS = [1, 7, 65, 128, 512, 1024, 4096]
BC_LAYOUTS = ["shared", "per_step", "grouped1", "grouped2"]
STATES = [1, 8]
# 2-level orthogonal array OA(8, 5, 2, 2): columns has_D, has_z, has_bias, softplus, return_last_state
SWITCH_ROWS = [
    (0, 0, 0, 0, 0),
    (0, 0, 1, 1, 1),
    (0, 1, 0, 1, 1),
    (0, 1, 1, 0, 0),
    (1, 0, 0, 1, 0),
    (1, 0, 1, 0, 1),
    (1, 1, 0, 0, 1),
    (1, 1, 1, 1, 0),
]
BATCH, DIM = 2, 4


def _grid():
    cases = []
    for i, (backend, n, layout) in enumerate(itertools.product(BACKENDS, STATES, BC_LAYOUTS)):
        for j in range(2):
            k = 2 * i + j
            length = LENGTHS[(3 * k + j) % len(LENGTHS)]
            has_D, has_z, has_bias, softplus, last = map(bool, SWITCH_ROWS[(k + i) % len(SWITCH_ROWS)])
            cases.append(dict(backend=backend, n=n, layout=layout, length=length, has_D=has_D, has_z=has_z,
                              has_bias=has_bias, softplus=softplus, last=last, seed=k))
    return cases


GRID = _grid()


def _case_id(c):
    flags = "".join(name for name, on in (("D", c["has_D"]), ("z", c["has_z"]), ("b", c["has_bias"]),
                                          ("s", c["softplus"]), ("l", c["last"])) if on)
    return f"{c['backend']}-N{c['n']}-{c['layout']}-L{c['length']}-{flags or 'plain'}"


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """float64 sequential recurrence, one time step at a time (written independently of the library).

    Returns (out (batch, dim, L), last state (batch, dim, N)); differentiable through autograd."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double().unsqueeze(-1)
    if delta_softplus:
        delta = torch.log1p(torch.exp(-delta.abs())) + delta.clamp(min=0)  # softplus, written out
    batch, dim, length = u.shape
    n = A.shape[1]

    def per_step(X):  # coefficient of every (batch, channel, state), one tensor per step
        if X.dim() == 2:  # (dim, N): the same at every step
            return [X.unsqueeze(0).expand(batch, dim, n)] * length
        if X.dim() == 3:  # (batch, N, L)
            X = X.unsqueeze(1).expand(batch, dim, n, length)
        else:  # (batch, G, N, L): channel d uses group d // (dim // G)
            X = X[:, torch.arange(dim) // (dim // X.shape[1])]
        return X.unbind(-1)  # unbind, so autograd does not build a full-size gradient per step

    B_l, C_l, u_l, dt_l = per_step(B), per_step(C), u.unbind(-1), delta.unbind(-1)
    h = torch.zeros(batch, dim, n, dtype=torch.float64)
    ys = []
    for l in range(length):
        dt = dt_l[l].unsqueeze(-1)
        h = torch.exp(dt * A) * h + dt * B_l[l] * u_l[l].unsqueeze(-1)
        ys.append((h * C_l[l]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D.double().unsqueeze(-1) * u
    if z is not None:
        zz = z.double()
        y = y * zz / (1 + torch.exp(-zz))
    return y, h


def make_inputs(c, dtype=torch.float32, gen_seed=None):
    g = torch.Generator().manual_seed(1000 + (c["seed"] if gen_seed is None else gen_seed))
    n, length = c["n"], c["length"]
    layout = c["layout"]

    def bc():
        if layout == "shared":
            return torch.randn(DIM, n, generator=g)
        if layout == "per_step":
            return torch.randn(BATCH, n, length, generator=g)
        groups = 1 if layout == "grouped1" else 2
        return torch.randn(BATCH, groups, n, length, generator=g)

    x = dict(
        u=torch.randn(BATCH, DIM, length, generator=g).to(dtype),
        delta=(0.5 * torch.rand(BATCH, DIM, length, generator=g)).to(dtype),
        A=-0.5 * torch.rand(DIM, n, generator=g),
        B=bc(), C=bc(),
        D=torch.randn(DIM, generator=g) if c["has_D"] else None,
        z=torch.randn(BATCH, DIM, length, generator=g).to(dtype) if c["has_z"] else None,
        delta_bias=0.5 * torch.rand(DIM, generator=g) if c["has_bias"] else None,
    )
    if layout != "shared":  # per-step B/C are activations: input dtype (as mamba's test)
        x["B"], x["C"] = x["B"].to(dtype), x["C"].to(dtype)
    return x


def _leaves(x):
    return {k: (None if v is None else v.detach().clone().requires_grad_(True)) for k, v in x.items()}


def _run(fn, x, c, g_out, g_last):
    """Forward, then gradients of <out, g_out> (+ <last, g_last>) w.r.t. every tensor argument."""
    leaves = _leaves(x)
    res = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"], leaves["z"],
             leaves["delta_bias"], c["softplus"], c["last"])
    out, last = res if c["last"] else (res, None)
    loss = (out.double() * g_out).sum()
    if last is not None:
        loss = loss + (last.double() * g_last).sum()
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return out, last, dict(zip(names, grads))


def _lib(backend):
    def fn(u, delta, A, B, C, D, z, bias, softplus, last):
        return selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=softplus, return_last_state=last,
                              backend=backend)
    return fn


def _ref(u, delta, A, B, C, D, z, bias, softplus, last):
    out, h = reference_scan(u, delta, A, B, C, D, z, bias, softplus)
    return (out, h) if last else out


def _grad_tolerances(c, rtol, atol):
    """mamba's test_selective_scan scaling of the gradient tolerances."""
    rtolw, atolw = 1e-3, 1e-3
    if c["has_z"]:
        rtolw, atolw = max(rtolw, rtol), max(atolw, atol)
    var_b = c["layout"] != "shared"
    return dict(
        u=(2 * rtol, 2 * atol), delta=(5 * rtol, 10 * atol), A=(rtolw, 5 * atolw),
        B=(rtol, atol) if var_b else (rtolw, atolw), C=(rtol, atol) if var_b else (rtolw, atolw),
        D=(rtolw, atolw), z=(rtolw, atolw), delta_bias=(rtolw, atolw),
    )


def _assert_close(name, got, want, rtol, atol):
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    excess = ((got - want).abs() - (atol + rtol * want.abs())).max().item()
    assert excess <= 0, f"{name}: max |diff| {(got - want).abs().max().item():.3g} exceeds tolerance by {excess:.3g}"


def test_grid_covers_every_axis_value():
    axes = dict(backend=BACKENDS, n=STATES, layout=BC_LAYOUTS, length=LENGTHS, has_D=[False, True],
                has_z=[False, True], has_bias=[False, True], softplus=[False, True], last=[False, True])
    for axis, values in axes.items():
        assert {c[axis] for c in GRID} == set(values), axis
    switches = ["has_D", "has_z", "has_bias", "softplus", "last"]
    for a, b in itertools.combinations(switches, 2):
        assert {(c[a], c[b]) for c in GRID} == set(itertools.product([False, True], repeat=2)), (a, b)
    for backend in BACKENDS:  # each backend sees every length and every layout
        assert {c["length"] for c in GRID if c["backend"] == backend} == set(LENGTHS), backend
    assert 1 <= sum(c["length"] == 4096 for c in GRID) <= 6


@pytest.mark.parametrize("c", GRID, ids=_case_id)
def test_matches_float64_recurrence(c):
    x = make_inputs(c)
    g = torch.Generator().manual_seed(7 + c["seed"])
    g_out = torch.randn(BATCH, DIM, c["length"], generator=g, dtype=torch.float64)
    g_last = torch.randn(BATCH, DIM, c["n"], generator=g, dtype=torch.float64)
    out, last, grads = _run(_lib(c["backend"]), x, c, g_out, g_last)
    out_ref, last_ref, grads_ref = _run(_ref, x, c, g_out, g_last)
    rtol, atol = 6e-4, 2e-3
    assert out.dtype == torch.float32 and out.shape == (BATCH, DIM, c["length"])
    _assert_close("out", out, out_ref, rtol, atol)
    if c["last"]:
        assert last.shape == (BATCH, DIM, c["n"])
        _assert_close("last_state", last, last_ref, rtol, atol)
    tols = _grad_tolerances(c, rtol, atol)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        _assert_close(f"d{name}", grads[name], grads_ref[name], *tols[name])


def test_backends_available_here():
    assert available_backends()[:2] == ["torch", "cpu"]


@pytest.mark.parametrize("layout", BC_LAYOUTS)
def test_cpu_gradients_agree_with_torch_backend(layout):
    c = dict(n=4, layout=layout, length=300, has_D=True, has_z=True, has_bias=True, softplus=True, last=True,
             seed=90 + BC_LAYOUTS.index(layout))
    x = make_inputs(c)
    g = torch.Generator().manual_seed(5)
    g_out = torch.randn(BATCH, DIM, c["length"], generator=g, dtype=torch.float64)
    g_last = torch.randn(BATCH, DIM, c["n"], generator=g, dtype=torch.float64)
    out_c, last_c, grads_c = _run(_lib("cpu"), x, c, g_out, g_last)
    out_t, last_t, grads_t = _run(_lib("torch"), x, c, g_out, g_last)
    _assert_close("out", out_c, out_t, 1e-4, 1e-5)
    _assert_close("last_state", last_c, last_t, 1e-4, 1e-5)
    for name in grads_t:
        _assert_close(f"d{name}", grads_c[name], grads_t[name], 1e-4, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["shared", "grouped2"])
def test_bfloat16_inputs(backend, layout):
    c = dict(n=8, layout=layout, length=256, has_D=True, has_z=True, has_bias=True, softplus=True, last=False,
             seed=70 + BC_LAYOUTS.index(layout))
    x = make_inputs(c, dtype=torch.bfloat16)
    g_out = torch.randn(BATCH, DIM, c["length"], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out, _, grads = _run(_lib(backend), x, c, g_out, None)
    out_ref, _, grads_ref = _run(_ref, x, c, g_out, None)  # reference on the same bf16-rounded values
    assert out.dtype == torch.bfloat16
    rtol, atol = 3e-2, 5e-2
    _assert_close("out", out, out_ref, rtol, atol)
    for name in ("u", "delta", "z"):
        assert grads[name].dtype == torch.bfloat16
    tols = _grad_tolerances(c, rtol, atol)
    for name in grads:
        _assert_close(f"d{name}", grads[name], grads_ref[name], *tols[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs_are_exact(backend):
    c = dict(n=3, layout="grouped2", length=200, has_D=True, has_z=True, has_bias=True, softplus=True, last=True,
             seed=60)
    x = make_inputs(c, dtype=torch.float64)
    x = {k: None if v is None else v.double() for k, v in x.items()}
    g = torch.Generator().manual_seed(4)
    g_out = torch.randn(BATCH, DIM, c["length"], generator=g, dtype=torch.float64)
    g_last = torch.randn(BATCH, DIM, c["n"], generator=g, dtype=torch.float64)
    out, last, grads = _run(_lib(backend), x, c, g_out, g_last)
    out_ref, last_ref, grads_ref = _run(_ref, x, c, g_out, g_last)
    assert out.dtype == torch.float64 and last.dtype == torch.float64
    _assert_close("out", out, out_ref, 1e-10, 1e-10)
    _assert_close("last_state", last, last_ref, 1e-10, 1e-10)
    for name in grads:
        _assert_close(f"d{name}", grads[name], grads_ref[name], 1e-9, 1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, 300])
def test_no_overflow_for_large_delta_and_very_negative_A(backend, length):
    g = torch.Generator().manual_seed(11 + length)
    n = 8
    u = torch.randn(BATCH, DIM, length, generator=g, requires_grad=True)
    delta = (20 * torch.rand(BATCH, DIM, length, generator=g)).requires_grad_()
    A = (-50 * torch.rand(DIM, n, generator=g) - 1e-3).requires_grad_()
    B = torch.randn(BATCH, n, length, generator=g, requires_grad=True)
    C = torch.randn(BATCH, n, length, generator=g, requires_grad=True)
    bias = torch.full((DIM,), 5.0, requires_grad=True)  # pre-softplus values up to 25: past the threshold
    leaves = [u, delta, A, B, C, bias]
    out, last = selective_scan(u, delta, A, B, C, delta_bias=bias, delta_softplus=True, return_last_state=True,
                               backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    grads = torch.autograd.grad(out.sum() + last.sum(), leaves)
    for name, gr in zip(["u", "delta", "A", "B", "C", "delta_bias"], grads):
        assert torch.isfinite(gr).all(), name
    ref, _ = reference_scan(u, delta, A, B, C, delta_bias=bias, delta_softplus=True)
    _assert_close("out", out, ref, 6e-4, 2e-3)


def test_cpu_backend_is_bit_reproducible():
    c = dict(n=8, layout="grouped2", length=700, has_D=True, has_z=True, has_bias=True, softplus=True, last=True,
             seed=50)
    x = make_inputs(c)
    g = torch.Generator().manual_seed(9)
    g_out = torch.randn(BATCH, DIM, c["length"], generator=g, dtype=torch.float64)
    g_last = torch.randn(BATCH, DIM, c["n"], generator=g, dtype=torch.float64)
    first = _run(_lib("cpu"), x, c, g_out, g_last)
    second = _run(_lib("cpu"), x, c, g_out, g_last)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name in first[2]:
        assert torch.equal(first[2][name], second[2][name]), name


def test_auto_uses_the_cpu_kernel_on_cpu_tensors():
    c = dict(n=2, layout="per_step", length=50, has_D=True, has_z=False, has_bias=True, softplus=True, last=False,
             seed=40)
    x = make_inputs(c)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"])
    kw = dict(delta_bias=x["delta_bias"], delta_softplus=True)
    auto = selective_scan(*args, **kw)
    assert torch.equal(auto, selective_scan(*args, backend="cpu", **kw))
    assert not torch.equal(auto, selective_scan(*args, backend="torch", **kw))  # a different computation order


def test_needs_no_grad_and_partial_grads():
    """Only some inputs require grad (e.g. frozen A); no-grad mode returns plain tensors."""
    c = dict(n=4, layout="per_step", length=33, has_D=True, has_z=False, has_bias=False, softplus=False, last=False,
             seed=41)
    x = make_inputs(c)
    with torch.no_grad():
        out = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], backend="cpu")
    assert not out.requires_grad
    u = x["u"].clone().requires_grad_(True)
    out = selective_scan(u, x["delta"], x["A"], x["B"], x["C"], x["D"], backend="cpu")
    (gu,) = torch.autograd.grad(out.sum(), [u])
    ref = reference_scan(u, x["delta"], x["A"], x["B"], x["C"], x["D"])[0]
    (gu_ref,) = torch.autograd.grad(ref.sum(), [u])
    _assert_close("du", gu, gu_ref, 2 * 6e-4, 2 * 2e-3)


# ---------------------------------------------------------------------------------------------- errors

def _good():
    return dict(u=torch.randn(2, 4, 10), delta=torch.rand(2, 4, 10), A=-torch.rand(4, 3),
                B=torch.randn(2, 3, 10), C=torch.randn(2, 3, 10))


@pytest.mark.parametrize("name, bad, expected", [
    ("u", torch.randn(2, 4), "u must have shape (batch, dim, L)"),
    ("delta", torch.rand(2, 4, 11), "delta must have shape (batch, dim, L)=(2, 4, 10)"),
    ("A", -torch.rand(5, 3), "A must have shape (dim, N) with dim=4"),
    ("B", torch.randn(2, 3, 9), "B must have shape"),
    ("B", torch.randn(2, 3, 3, 10), "B must have shape"),  # 3 groups do not divide dim 4
    ("C", torch.randn(4, 2), "C must have shape"),
    ("D", torch.randn(3), "D must have shape (dim,)=(4,)"),
    ("delta_bias", torch.randn(4, 1), "delta_bias must have shape (dim,)=(4,)"),
    ("z", torch.randn(2, 4, 9), "z must have shape (batch, dim, L)=(2, 4, 10)"),
])
def test_bad_shapes_name_the_argument(name, bad, expected):
    args = _good()
    args[name] = bad
    with pytest.raises(ValueError) as err:
        selective_scan(**args)
    assert expected in str(err.value)
    assert f"got {tuple(bad.shape)}" in str(err.value)


def test_unknown_backend_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown backend 'triton'.*auto, torch, cpu, mamba_ssm"):
        selective_scan(**_good(), backend="triton")


@pytest.mark.skipif("mamba_ssm" in available_backends(), reason="mamba_ssm is installed here")
def test_mamba_ssm_unavailable_gives_install_hint():
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[cuda\]'"):
        selective_scan(**_good(), backend="mamba_ssm")


def test_non_tensor_argument_is_rejected():
    args = _good()
    args["A"] = [[-1.0]]
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        selective_scan(**args)


# ------------------------------------------------------------------------- torch backend chunking

@pytest.mark.parametrize("length, chunk", [(1, 1), (10, 1), (10, 3), (10, 10), (10, 64), (97, 10), (256, 16)])
def test_chunked_linear_scan_matches_sequential_loop(length, chunk):
    from remamber.ops.scan_torch import linear_scan_chunked

    g = torch.Generator().manual_seed(length * 100 + chunk)
    a_log = -3 * torch.rand(2, 3, length, 4, generator=g, dtype=torch.float64)
    x = torch.randn(2, 3, length, 4, generator=g, dtype=torch.float64)
    h, last = linear_scan_chunked(a_log, x, chunk=chunk)
    state = torch.zeros(2, 3, 4, dtype=torch.float64)
    for l in range(length):
        state = torch.exp(a_log[:, :, l]) * state + x[:, :, l]
        torch.testing.assert_close(h[:, :, l], state, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, state, rtol=1e-12, atol=1e-12)


def test_torch_backend_plain_loop_path_for_large_steps():
    """batch*dim*N >= SMALL_STEP takes the one-chunk path; it must match the reference too."""
    from remamber.ops.scan_torch import SMALL_STEP

    batch, dim, n, length = 2, 256, 8, 20
    assert batch * dim * n >= SMALL_STEP
    g = torch.Generator().manual_seed(21)
    u = torch.randn(batch, dim, length, generator=g, requires_grad=True)
    delta = (0.5 * torch.rand(batch, dim, length, generator=g)).requires_grad_()
    A = (-0.5 * torch.rand(dim, n, generator=g)).requires_grad_()
    B = torch.randn(batch, n, length, generator=g, requires_grad=True)
    C = torch.randn(batch, n, length, generator=g, requires_grad=True)
    out, last = selective_scan(u, delta, A, B, C, delta_softplus=True, return_last_state=True, backend="torch")
    ref, ref_last = reference_scan(u, delta, A, B, C, delta_softplus=True)
    _assert_close("out", out, ref, 6e-4, 2e-3)
    _assert_close("last_state", last, ref_last, 6e-4, 2e-3)
    grads = torch.autograd.grad(out.sum(), [u, A])
    grads_ref = torch.autograd.grad(ref.sum(), [u, A])
    _assert_close("du", grads[0], grads_ref[0], 2 * 6e-4, 2 * 2e-3)
    _assert_close("dA", grads[1], grads_ref[1], 1e-3, 5e-3)


def test_cpu_kernel_uses_at_most_torch_threads():
    """The numba kernel follows torch's thread count (no second pool as wide as the machine) and leaves
    numba's own setting as it found it; results do not depend on the thread count."""
    import numba

    from remamber.ops import scan_cpu

    seen = []
    before_torch, before_numba = torch.get_num_threads(), numba.get_num_threads()
    try:
        torch.set_num_threads(1)
        with scan_cpu._torch_threads():
            seen.append(numba.get_num_threads())
    finally:
        torch.set_num_threads(before_torch)
    assert seen == [1]
    assert numba.get_num_threads() == before_numba
