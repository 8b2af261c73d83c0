"""directional_selective_scan (the cross-scan fused into the scan kernel) against an independent
float64 reference: explicit re-ordered copies, a sequential recurrence per direction, un-permuted
by explicit index loops and summed. Also the models' use of it (SS2D, Channel Scan) against the
unfused composition cross_scan -> selective_scan -> cross_merge."""

from __future__ import annotations

import pytest
import torch

from remamber.ops import (cross_merge, cross_scan, cross_scan_orders, directional_selective_scan,
                          scan_orders, selective_scan)

from test_ops_selective_scan import reference_scan


def _inputs(batch, du, nd, n, length, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return dict(u=r(batch, du, length), delta=r(batch, nd * du, length) - 1.0,
                A=-(torch.rand(nd * du, n, generator=g, dtype=torch.float64) + 0.2).to(dtype),
                B=r(batch, nd, n, length), C=r(batch, nd, n, length), D=r(nd * du), delta_bias=r(nd * du) * 0.5)


def _reference(x, orders, softplus=True):
    """float64: gather each direction with a Python index list, scan, scatter back with a loop, sum."""
    batch, du, length = x["u"].shape
    nd, n = orders.shape[0], x["A"].shape[1]
    total = torch.zeros(batch, du, length, dtype=torch.float64)
    for k in range(nd):
        order = [int(p) for p in orders[k]]
        rows = slice(k * du, (k + 1) * du)
        y, _ = reference_scan(x["u"][:, :, order], x["delta"][:, rows][:, :, order], x["A"][rows],
                              x["B"][:, k][:, :, order], x["C"][:, k][:, :, order], D=x["D"][rows],
                              delta_bias=x["delta_bias"][rows], delta_softplus=softplus)
        for step, pos in enumerate(order):
            total[:, :, pos] = total[:, :, pos] + y[:, :, step]
    return total


CASES = [  # (kind, height, width, d_state): lengths below, at and across the kernel's 256-step chunks
    ("cross", 5, 7, 1), ("cross", 16, 16, 1), ("cross", 20, 30, 2), ("channel", 1, 300, 1), ("cross", 3, 3, 4),
]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("kind,height,width,n", CASES)
def test_matches_float64_reference(backend, kind, height, width, n):
    orders = scan_orders(kind, height, width)
    x = {k: v.requires_grad_() for k, v in _inputs(2, 3, 4, n, height * width, torch.float64, height).items()}
    names = list(x)
    out = directional_selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], orders, D=x["D"],
                                     delta_bias=x["delta_bias"], delta_softplus=True, backend=backend)
    ref = _reference(x, orders)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    gout = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x[k] for k in names], gout)
    want = torch.autograd.grad(ref, [x[k] for k in names], gout)
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("kind,height,width", [("cross", 2, 2), ("channel", 1, 270)])
def test_matches_float64_reference_without_softplus_across_channel_blocks(kind, height, width, n):
    """dt = delta + bias as given (no softplus), and 40 channels per direction: the CPU kernel's blocks of 32
    channels end in a partial one, and its backward work items split the channels."""
    orders = scan_orders(kind, height, width)
    x = _inputs(3, 40, 4, n, height * width, torch.float64, 11)
    x["delta"], x["delta_bias"] = x["delta"].abs() * 0.3, x["delta_bias"].abs() * 0.1  # dt > 0 without softplus
    x = {k: v.requires_grad_() for k, v in x.items()}
    out = directional_selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], orders, D=x["D"],
                                     delta_bias=x["delta_bias"], delta_softplus=False, backend="cpu")
    ref = _reference(x, orders, softplus=False)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    gout = torch.randn_like(ref)
    got = torch.autograd.grad(out, list(x.values()), gout)
    want = torch.autograd.grad(ref, list(x.values()), gout)
    for name, a, b in zip(x, got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{name}: {m}")


def test_float32_cpu_kernel_close_to_float64_and_bit_reproducible():
    orders = cross_scan_orders(12, 10)
    x64 = _inputs(2, 8, 4, 1, 120, torch.float64, 7)
    x32 = {k: v.float().requires_grad_() for k, v in x64.items()}
    outs = []
    for _ in range(2):
        out = directional_selective_scan(x32["u"], x32["delta"], x32["A"], x32["B"], x32["C"], orders, D=x32["D"],
                                         delta_bias=x32["delta_bias"], delta_softplus=True, backend="cpu")
        outs.append((out, torch.autograd.grad(out.square().sum(), list(x32.values()))))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
    torch.testing.assert_close(outs[0][0].double(), _reference(x64, orders), rtol=6e-4, atol=2e-3)


def test_same_as_unfused_cross_scan_composition():
    """The fused op equals cross_scan -> selective_scan -> cross_merge (the layout it replaces)."""
    h, w, du, n = 6, 9, 5, 1
    x = _inputs(2, du, 4, n, h * w, torch.float64, 3)
    # the unfused path takes delta, B, C in scan order: gather them the way cross_scan orders u
    orders = cross_scan_orders(h, w)
    idx = orders[None, :, None, :]
    delta_s = x["delta"].reshape(2, 4, du, h * w).gather(3, idx.expand(2, 4, du, h * w)).reshape(2, 4 * du, h * w)
    xs = cross_scan(x["u"].reshape(2, du, h, w)).reshape(2, 4 * du, h * w)
    ys = selective_scan(xs, delta_s, x["A"], x["B"].gather(3, idx.expand(2, 4, n, h * w)),
                        x["C"].gather(3, idx.expand(2, 4, n, h * w)), D=x["D"], delta_bias=x["delta_bias"],
                        delta_softplus=True, backend="cpu")
    unfused = cross_merge(ys.reshape(2, 4, du, h * w), h, w)
    fused = directional_selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], orders, D=x["D"],
                                       delta_bias=x["delta_bias"], delta_softplus=True, backend="cpu")
    torch.testing.assert_close(fused, unfused, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_directions_are_summed_in_fp32(backend):
    """bf16 inputs: each direction's output and the sum stay fp32 (256 + 1 + 1 + 1 = 259; bf16 gives 258)."""
    du, length = 2, 6
    u = torch.ones(1, du, length, dtype=torch.bfloat16)
    zeros = torch.zeros(1, 4, 1, length, dtype=torch.bfloat16)
    D = torch.tensor([256.0] * du + [1.0] * (3 * du))
    out = directional_selective_scan(u, torch.zeros(1, 4 * du, length, dtype=torch.bfloat16), -torch.ones(4 * du, 1),
                                     zeros, zeros, cross_scan_orders(2, 3), D=D, backend=backend)
    assert out.dtype == torch.float32
    assert torch.all(out == 259.0)


def test_orders_and_shapes_are_checked():
    x = _inputs(1, 2, 4, 1, 6, torch.float32, 0)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    bad = cross_scan_orders(2, 3).clone()
    bad[1, 0] = bad[1, 1]  # a repeated position: not a permutation
    with pytest.raises(ValueError, match="permutation"):
        directional_selective_scan(*args, bad)
    with pytest.raises(ValueError, match="orders"):
        directional_selective_scan(*args, cross_scan_orders(3, 3))
    with pytest.raises(ValueError, match="int64"):
        directional_selective_scan(*args, cross_scan_orders(2, 3).int())
    with pytest.raises(ValueError, match="delta"):
        directional_selective_scan(x["u"], x["delta"][:, :4], *args[2:], cross_scan_orders(2, 3))


def test_scan_orders_index_arithmetic():
    h, w = 3, 4
    o = cross_scan_orders(h, w)
    for l in range(h * w):  # direction 1 walks columns: step w*H + h visits h*W + w
        assert int(o[1, l]) == (l % h) * w + l // h
        assert int(o[2, l]) == h * w - 1 - l
        assert int(o[3, l]) == int(o[1, h * w - 1 - l])
    c = scan_orders("channel", 1, 5)
    assert c.tolist() == [[0, 1, 2, 3, 4]] * 2 + [[4, 3, 2, 1, 0]] * 2
    with pytest.raises(ValueError, match="unknown kind"):
        scan_orders("diagonal", 2, 2)


def _unfused_scan_in_orders(module, u, orders):
    """The layout the fused scan replaced: explicit re-ordered copies, one scan per direction through
    `directional_scan` (the plain selective-scan kernel), outputs un-permuted and summed."""
    from remamber.models.ssm import directional_scan

    xs = u[:, :, orders].transpose(1, 2)  # (B, K, D, L) in each direction's order
    ys = directional_scan(module, xs).to(torch.promote_types(u.dtype, torch.float32))
    inverse = orders.argsort(dim=1)[None, :, None, :].expand_as(ys)
    return ys.gather(3, inverse).sum(1)


def test_twister_stage_gradients_same_with_and_without_the_fused_scan(monkeypatch):
    """A whole Twister stage (interactions + two blocks) in float64: output and every gradient equal
    with the memory-saving fused scan and with the unfused copies, to float64 rounding."""
    import remamber.models.ss2d as ss2d_module
    import remamber.models.twisting as twisting_module
    from remamber.models.twisting import TwisterStage

    torch.manual_seed(0)
    stage = TwisterStage(16, 24, 5, depth=2, local_dim=8, grid=4, width=12).double()
    image = torch.randn(2, 16, 6, 5, dtype=torch.float64, requires_grad=True)
    words = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    pooled = torch.randn(2, 24, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    leaves = [image, words, pooled, *stage.parameters()]

    def run():
        out = stage(image, words, pooled, mask)
        return out, torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum(),
                                        leaves, allow_unused=True)

    fused_out, fused_grads = run()
    monkeypatch.setattr(ss2d_module, "scan_in_orders", _unfused_scan_in_orders)
    monkeypatch.setattr(twisting_module, "scan_in_orders", _unfused_scan_in_orders)
    ref_out, ref_grads = run()
    torch.testing.assert_close(fused_out, ref_out, rtol=1e-12, atol=1e-12)
    assert sum(g is not None for g in fused_grads) == len(leaves)
    for a, b in zip(fused_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_scan_tape_replays_the_backward_without_the_forward_kernel(backend, monkeypatch):
    """ScanTape: a first call fills it (cpu: the chunk start states); a second call with the filled tape runs
    no forward kernel, returns zeros, and its backward gives the first call's gradients exactly (float64,
    600 steps: three chunks). The torch backend ignores the tape. A tape of another shape is refused."""
    import remamber.ops.scan_cpu as scan_cpu
    from remamber.ops import ScanTape

    orders = scan_orders("cross", 20, 30)
    x = _inputs(2, 3, 4, 1, 600, torch.float64, 3)
    g = torch.randn(2, 3, 600, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run(tape):
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
        out = directional_selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], orders,
                                         D=leaves["D"], delta_bias=leaves["delta_bias"], delta_softplus=True,
                                         backend=backend, tape=tape)
        return out, torch.autograd.grad(out, list(leaves.values()), g)

    tape = ScanTape()
    first, first_grads = run(tape)
    torch.testing.assert_close(first, _reference(x, orders), rtol=0, atol=1e-10)
    calls = []
    real = scan_cpu._dscan_fwd
    monkeypatch.setattr(scan_cpu, "_dscan_fwd", lambda *a: calls.append(1) or real(*a))
    replay, replay_grads = run(tape)
    if backend == "cpu":
        assert tuple(tape.states.shape) == (2, 12, 3, 1) and not calls and not replay.any()
        with pytest.raises(ValueError, match="ScanTape: states"):
            bad = ScanTape()
            bad.states = tape.states[:1]
            run(bad)
    else:
        assert tape.states is None and torch.equal(replay, first)
    for a, b in zip(replay_grads, first_grads):
        assert torch.equal(a, b)
