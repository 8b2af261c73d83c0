"""The Twisting layer's parts and the other fusion blocks against independent references:
Channel Scan vs a float64 recurrence, Eq. 5 by explicit sums, exact padding behaviour of the
in-context and attention blocks, FiLM identity, decoder sizes and the loss by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from remamber.models import dice_bce_loss
from remamber.models.attention import CrossAttention
from remamber.models.decoder import ConvDecoder, LogitHead, MambaDecoder, build_decoder
from remamber.models.in_context import InContextBlock
from remamber.models.interaction import LocalInteraction
from remamber.models.norm_adaptation import FiLMLayerNorm2d
from remamber.models.twisting import ChannelScan, TwisterStage, TwistingLayer


def _reference_channel_scan(module: ChannelScan, cube: torch.Tensor) -> torch.Tensor:
    """Channel Scan from the authors' definition, float64, one channel step at a time: the full 3x3
    depthwise conv on the 1 x S map, then four selective scans over [x, x, flip(x), flip(x)], each
    with its own parameters, un-flipped and summed."""
    p = {k: v.detach().double() for k, v in module.state_dict().items()}
    b, s, h, w = cube.shape
    g = module.grid
    pooled = F.interpolate(cube.double(), size=(g, g), mode="bilinear", align_corners=False).reshape(b, s, g * g)
    xz = pooled @ p["in_proj.weight"].T  # (B, S, 2W)
    width = xz.shape[-1] // 2
    x, z = xz[..., :width], xz[..., width:]
    one_row = x.transpose(1, 2)[:, :, None, :]  # (B, W, 1, S): the authors' 1-pixel-high map
    conv = F.conv2d(one_row, p["conv2d.weight"], padding=1, groups=width)[:, :, 0].transpose(1, 2)
    u = F.silu(conv)  # (B, S, W)
    n = p["A_logs"].shape[1]
    r = p["dt_projs_weight"].shape[2]
    a = -torch.exp(p["A_logs"]).reshape(4, width, n)
    dskip = p["Ds"].reshape(4, width)
    y = torch.zeros(b, s, width, dtype=torch.float64)
    orders = (range(s), range(s), reversed(range(s)), reversed(range(s)))
    for k, steps in enumerate(orders):
        state = torch.zeros(b, width, n, dtype=torch.float64)
        for t in steps:
            proj = u[:, t] @ p["x_proj_weight"][k].T
            dt = F.softplus(proj[:, :r] @ p["dt_projs_weight"][k].T + p["dt_projs_bias"][k])
            bt, ct = proj[:, r:r + n], proj[:, r + n:]
            state = torch.exp(dt[..., None] * a[k]) * state + dt[..., None] * bt[:, None] * u[:, t, :, None]
            y[:, t] += (state * ct[:, None]).sum(-1) + dskip[k] * u[:, t]
    y = F.layer_norm(y, (width,), p["out_norm.weight"], p["out_norm.bias"], module.out_norm.eps) * F.silu(z)
    out = (y @ p["out_proj.weight"].T).reshape(b, s, g, g)
    return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("hw", [(4, 4), (7, 5)])
def test_channel_scan_matches_float64_reference(hw):
    torch.manual_seed(0)
    module = ChannelScan(grid=4, width=6, d_state=2)
    with torch.no_grad():  # every direction's parameters different, so a shared or unused set shows
        for name in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"):
            getattr(module, name).add_(0.3 * torch.randn_like(getattr(module, name)))
        module.conv2d.weight.normal_()
        module.out_norm.weight.normal_()
    assert module.x_proj_weight.shape[0] == 4 and module.conv2d.weight.shape == (6, 1, 3, 3)
    cube = torch.randn(2, 9, *hw)
    got = module(cube)
    assert got.shape == cube.shape
    torch.testing.assert_close(got.double(), _reference_channel_scan(module, cube), rtol=1e-4, atol=1e-5)


def test_twister_stage_second_block_gets_the_conditions_plus_their_first_norm():
    """The authors' stage: block k returns [img + Twisting(cube), g + LN_k(g), l + LN_k(l)], so block 2
    builds its cube from LN_2(g + LN_1(g)) and LN_2(l + LN_1(l)). Reference by explicit composition."""
    torch.manual_seed(0)
    stage = TwisterStage(dim=6, text_dim=5, max_text_len=4, depth=2, local_dim=7, grid=4, width=8)
    with torch.no_grad():
        for block in stage.blocks:  # norms away from the identity, as after training
            block.norm.weight.copy_(1 + torch.randn(6))
            block.norm.bias.copy_(torch.randn(6))
    image, words, pooled = torch.randn(2, 6, 5, 3), torch.randn(2, 4, 5), torch.randn(2, 5)

    def ln(x, block):  # LayerNorm over channels of (B, C, h, w)
        return F.layer_norm(x.permute(0, 2, 3, 1), (6,), block.norm.weight, block.norm.bias, block.norm.eps).permute(0, 3, 1, 2)

    g = stage.global_interaction(pooled)[:, :, None, None].expand(2, 6, 5, 3)
    l, _ = stage.local_interaction(image, words, None)
    img = image
    for block in stage.blocks:
        cube = torch.cat([ln(img, block), ln(g, block), ln(l, block)], dim=1)
        img = img + block.twisting(cube)
        g, l = g + ln(g, block), l + ln(l, block)
    got = stage(image, words, pooled, None)
    torch.testing.assert_close(got, img, rtol=1e-5, atol=1e-5)


def test_channel_scan_mixes_channels_and_spatial_scan_does_not_reorder_them():
    torch.manual_seed(0)
    module = ChannelScan(grid=4, width=8)
    cube = torch.randn(1, 6, 4, 4, requires_grad=True)
    out = module(cube)
    out[0, 5].sum().backward()
    # the last channel's output depends on the first channel (sequence along channels, both directions)
    assert cube.grad[0, 0].abs().sum() > 0


def test_local_interaction_is_eq5_with_masked_words():
    torch.manual_seed(0)
    li = LocalInteraction(dim=5, text_dim=7, max_text_len=4, local_dim=6)
    image, words = torch.randn(2, 5, 3, 2), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    local, corr = li(image, words, mask)
    assert local.shape == (2, 5, 3, 2) and corr.shape == (2, 4, 3, 2)
    wi, bi = li.image_proj[0].weight, li.image_proj[0].bias
    wt, bt = li.text_proj[0].weight, li.text_proj[0].bias
    for b in range(2):
        for l in range(4):
            for y in range(3):
                for x in range(2):
                    fi = F.gelu(wi @ image[b, :, y, x] + bi)
                    ft = F.gelu(wt @ words[b, l] + bt)
                    want = (fi * ft).sum() * mask[b, l]
                    torch.testing.assert_close(corr[b, l, y, x], want)
    # padded words cannot reach the output
    words2 = words.clone()
    words2[0, 2:] = 100 * torch.randn(2, 7)
    torch.testing.assert_close(li(image, words2, mask)[0], local, rtol=0, atol=0)
    with pytest.raises(ValueError, match="expects 4 text tokens, got 3"):
        li(image, words[:, :3], None)


@pytest.mark.parametrize("order", ["channel_spatial", "spatial_channel", "parallel", "channel_only", "spatial_only"])
def test_twisting_orders_map_the_cube_to_c_channels(order):
    torch.manual_seed(0)
    layer = TwistingLayer(dim=4, cube_dim=12, scan_order=order, grid=4, width=8)
    record: dict = {}
    cube = torch.randn(2, 12, 5, 3, requires_grad=True)
    out = layer(cube, record)
    assert out.shape == (2, 4, 5, 3)
    out.square().sum().backward()
    assert cube.grad.abs().sum() > 0
    names = {n.split(".")[0] for n, _ in layer.named_parameters()}
    expect = {
        "channel_spatial": {"channel_scan", "spatial_scan"},
        "spatial_channel": {"channel_scan", "spatial_scan"},
        "parallel": {"channel_scan", "spatial_scan", "channel_proj"},
        "channel_only": {"channel_scan", "channel_proj"},
        "spatial_only": {"spatial_scan"},
    }[order]
    assert names == expect
    assert record["cube"] is cube
    if order == "channel_spatial":  # Eq. 7: SS(cube + CS(cube))
        torch.testing.assert_close(record["cube_after_channel"], cube + layer.channel_scan(cube))
        torch.testing.assert_close(out, layer.spatial_scan(record["cube_after_channel"]))
    if order == "spatial_channel":
        assert record["cube_after_spatial"].shape == (2, 4, 5, 3)
    with pytest.raises(ValueError, match="unknown scan_order 'diagonal'"):
        TwistingLayer(4, 12, scan_order="diagonal")


def test_in_context_with_padding_mask_equals_a_prefix_of_only_the_real_words():
    torch.manual_seed(0)
    block = InContextBlock(dim=6, text_dim=5)
    image = torch.randn(2, 6, 4, 3)
    words = torch.randn(2, 7, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    padded = block(image, words, mask)
    for b, n in ((0, 3), (1, 7)):
        alone = block(image[b:b + 1], words[b:b + 1, :n], None)
        torch.testing.assert_close(padded[b:b + 1], alone, rtol=1e-5, atol=1e-6)
    # without the mask, the padded words take part
    assert not torch.allclose(block(image, words, None)[0], padded[0], atol=1e-4)


def test_cross_attention_mask_equals_attending_to_only_the_real_words():
    torch.manual_seed(0)
    attn = CrossAttention(dim=8, text_dim=5, heads=2)
    image, words = torch.randn(2, 8, 3, 3), torch.randn(2, 6, 5)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    out, maps = attn(image, words, mask)
    assert maps.shape == (2, 2, 9, 6)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 9))
    assert maps[0, :, :, 2:].abs().max() == 0
    for b, n in ((0, 2), (1, 5)):
        alone, _ = attn(image[b:b + 1], words[b:b + 1, :n], None)
        torch.testing.assert_close(out[b:b + 1], alone, rtol=1e-5, atol=1e-6)


def test_film_is_a_plain_layernorm_at_zero_modulation():
    torch.manual_seed(0)
    film = FiLMLayerNorm2d(dim=4, text_dim=3)
    x, pooled = torch.randn(2, 4, 3, 3), torch.randn(2, 3)
    with torch.no_grad():
        film.film.weight.zero_()
    want = F.layer_norm(x.permute(0, 2, 3, 1), (4,), eps=film.eps).permute(0, 3, 1, 2)
    torch.testing.assert_close(film(x, pooled), want)
    with torch.no_grad():
        film.film.bias[:4] = 1.0  # gamma = 1 -> scale 2
        film.film.bias[4:] = 0.5  # beta
    torch.testing.assert_close(film(x, pooled), 2 * want + 0.5)


@pytest.mark.parametrize("kind", ["conv", "mamba"])
@pytest.mark.parametrize("size", [(64, 64), (61, 45)])
def test_decoders_reach_the_input_size(kind, size):
    torch.manual_seed(0)
    dims = [4, 8, 12, 16]
    decoder = build_decoder(kind, dims)
    h, w = size
    sizes = []
    s = (math.ceil(h / 4), math.ceil(w / 4))
    for _ in range(4):
        sizes.append(s)
        s = (math.ceil(s[0] / 2), math.ceil(s[1] / 2))
    feats = [torch.randn(2, d, *hw, requires_grad=True) for d, hw in zip(dims, sizes)]
    out = decoder(feats, size)
    assert out.shape == (2, 1, h, w)
    out.sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)
    assert isinstance(decoder, ConvDecoder if kind == "conv" else MambaDecoder)
    with pytest.raises(ValueError, match="unknown decoder 'mlp'"):
        build_decoder("mlp", dims)


@pytest.mark.parametrize("size, out_size", [((1, 1), None), ((5, 3), None), ((24, 24), None),
                                             ((12, 12), (24, 24)), ((5, 3), (9, 6)), ((3, 3), (1, 2))])
def test_logit_head_is_a_3x3_convolution_to_one_channel(size, out_size):
    """The head's tap-sum form against torch's direct convolution in float64, of the input bilinearly
    resized first when out_size is given (the head resizes its 9 partial maps instead): output and every
    gradient."""
    torch.manual_seed(0)
    head = LogitHead(6)
    x = torch.randn(2, 6, *size, dtype=torch.float64, requires_grad=True)
    weight = head.weight.detach().double().requires_grad_()
    bias = head.bias.detach().double().requires_grad_()
    resized = x if out_size is None else F.interpolate(x, size=out_size, mode="bilinear", align_corners=True)
    want = F.conv2d(resized, weight, bias, padding=1)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x, weight, bias], g)
    head = head.double()
    got = head(x, out_size)
    got_grads = torch.autograd.grad(got, [x, head.weight, head.bias], g)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert isinstance(head, torch.nn.Conv2d) and sorted(head.state_dict()) == ["bias", "weight"]


def test_dice_bce_loss_by_hand():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]], [[[1.0, -2.0], [0.5, 0.0]]]])
    target = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]], [[[1.0, 0.0], [0.0, 0.0]]]])
    p = [[0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1)), 1 / (1 + math.exp(-3))],
         [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(2)), 1 / (1 + math.exp(-0.5)), 0.5]]
    t = [[0, 1, 0, 1], [1, 0, 0, 0]]
    dice = 0.0
    bce = 0.0
    for pb, tb in zip(p, t):
        inter = sum(a * b for a, b in zip(pb, tb))
        dice += 1 - (2 * inter + 1) / (sum(pb) + sum(tb) + 1)
        bce += sum(-(b * math.log(a) + (1 - b) * math.log(1 - a)) for a, b in zip(pb, tb))
    want = dice / 2 + bce / 8
    assert dice_bce_loss(logits, target).item() == pytest.approx(want, rel=1e-6)
    perfect = dice_bce_loss(torch.full((1, 1, 2, 2), -30.0).masked_fill(target[1:].bool(), 30.0), target[1:])
    assert perfect.item() < 1e-6
    with pytest.raises(ValueError, match=r"logits \(1, 1, 2, 2\) and target \(1, 2, 2\)"):
        dice_bce_loss(logits[:1], target[0])

