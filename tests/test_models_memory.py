"""The Twister's memory-saving path (ModelConfig.twister_recompute) computes the same function and the
same gradients as the plain path: to float64 rounding in float64, to float32 rounding in float32."""

from __future__ import annotations

import pytest
import torch

import remamber.models.ssm as ssm
import remamber.models.twisting as twisting
from remamber.models import build_model, variant_config
from remamber.models.ss2d import SS2D
from remamber.models.ssm import scan_in_orders, scan_in_orders_lean
from remamber.models.twisting import TwisterStage
from remamber.ops import cross_scan_orders


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of a few channels / rows, so the tiny maps below are cut into several pieces."""
    monkeypatch.setattr(ssm, "LEAN_PIECE_ELEMENTS", 2 * 30 * 5)
    monkeypatch.setattr(twisting, "PIECE_ELEMENTS", 2 * 16 * 6 * 2)


def _grads(module, tensors, out_fn):
    module.zero_grad(set_to_none=True)
    for t in tensors:
        t.grad = None
    out = out_fn()
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * weight).sum().backward()
    named = {f"input{i}": t.grad for i, t in enumerate(tensors) if t.grad is not None}
    named.update({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    return out.detach(), named


def _assert_close(a, b, rtol):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert grads_a.keys() == grads_b.keys()
    for name, x, y in [("out", out_a, out_b)] + [(n, grads_a[n], grads_b[n]) for n in grads_a]:
        scale = x.abs().max().clamp_min(1e-30)
        assert ((x - y).abs().max() / scale).item() <= rtol, name


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_lean_scan_matches_scan_in_orders(small_pieces, dtype, rtol):
    torch.manual_seed(0)
    module = SS2D(8, d_state=2).to(dtype)
    u = torch.randn(2, 16, 5 * 7, dtype=dtype, requires_grad=True)
    orders = cross_scan_orders(5, 7)
    plain = _grads(module, [u], lambda: scan_in_orders(module, u, orders))
    lean = _grads(module, [u], lambda: scan_in_orders_lean(module, u, orders))
    assert {"x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"} <= plain[1].keys()
    _assert_close(plain, lean, rtol)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("scan_order", ["channel_spatial", "parallel"])
@pytest.mark.parametrize("interaction", ["global_local", "local_only", "global_only"])
def test_twister_stage_gradients_with_and_without_recompute(small_pieces, dtype, rtol, scan_order, interaction):
    torch.manual_seed(0)
    stage = TwisterStage(16, 24, 5, depth=2, local_dim=8, grid=4, width=8, scan_order=scan_order,
                         interaction=interaction).to(dtype)
    image = torch.randn(2, 16, 5, 6, dtype=dtype, requires_grad=True)
    words = torch.randn(2, 5, 24, dtype=dtype, requires_grad=True)
    pooled = torch.randn(2, 24, dtype=dtype, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    results = []
    for recompute in (False, True):
        stage.recompute = recompute
        for block in stage.blocks:
            block.recompute = recompute
        results.append(_grads(stage, [image, words, pooled], lambda: stage(image, words, pooled, mask)))
    assert len(results[0][1]) == len(list(stage.parameters())) + (3 if interaction == "global_local" else 2)
    _assert_close(*results, rtol)


def test_model_option_builds_recomputing_stages_and_record_uses_plain_path():
    cfg = variant_config("twister", twister_recompute=True)
    model = build_model(cfg)
    blocks = [b for stage in model.fusion for b in stage.blocks]
    assert blocks and all(b.recompute for b in blocks)
    assert not any(b.recompute for s in build_model(variant_config("twister")).fusion for b in s.blocks)
    with pytest.raises(ValueError, match="twister_recompute"):
        variant_config("twister", twister_recompute="yes")
    # an inspection record still gets the cube (the plain path runs when a record is asked for)
    stage = model.fusion[0]
    image = torch.randn(1, stage.dim, 6, 6)
    words = torch.randn(1, cfg.max_text_len, model.text_encoder.width)
    record: dict = {}
    with torch.no_grad():
        out = stage(image, words, words[:, 0], None, record)
        again = stage(image, words, words[:, 0], None)
    assert {"cube", "interaction_map"} <= record.keys()
    torch.testing.assert_close(out, again, rtol=1e-5, atol=1e-6)
