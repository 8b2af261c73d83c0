"""Initialisation of the new layers: `init: authors` gives the fusion layers PyTorch's defaults and the
decoder's conv blocks He-normal by fan-out (yyh-rain-song/ReMamber); `init: trunc_normal` (ours) gives
every new Linear VMamba's truncated N(0, 0.02) and zero bias. Checked against the distributions'
closed-form bounds and standard deviations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from remamber.models import build_model, variant_config
from remamber.models.decoder import ConvBlock, build_decoder, he_normal_fan_out_init

SMALL = dict(local_dim=64, channel_scan_grid=4, channel_scan_width=16)


def _model(init: str):
    torch.manual_seed(0)
    return build_model(variant_config("twister", init=init, **SMALL))


def test_authors_init_keeps_pytorch_defaults_in_the_fusion_layers():
    model = _model("authors")
    linear = model.fusion[3].local_interaction.text_proj[0]  # nn.Linear(text_dim, 64)
    bound = 1 / math.sqrt(linear.in_features)  # kaiming_uniform(a=sqrt(5)) and the bias: U(-b, b)
    w, b = linear.weight.detach(), linear.bias.detach()
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert b.abs().max() <= bound and b.abs().min() > 0 and b.abs().max() > 0.5 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_trunc_normal_init_is_ours():
    model = _model("trunc_normal")
    linear = model.fusion[3].local_interaction.text_proj[0]
    w = linear.weight.detach()
    # torch's trunc_normal_ cuts at +-2 absolute, so with std 0.02 it is N(0, 0.02) in practice
    assert w.std().item() == pytest.approx(0.02, rel=0.1)
    assert w.abs().max() < 6 * 0.02
    assert torch.count_nonzero(linear.bias) == 0
    with pytest.raises(ValueError, match=r"init='xavier' is not one of \['trunc_normal', 'authors'\]"):
        variant_config("twister", init="xavier")


def test_decoder_conv_blocks_are_he_normal_by_fan_out_and_the_neck_keeps_defaults():
    torch.manual_seed(0)
    decoder = build_decoder("conv", [32, 64, 128, 256])
    neck_before = decoder.neck_in[0].weight.detach().clone()
    decoder.apply(he_normal_fan_out_init)
    block = decoder.mixers[0]
    assert isinstance(block, ConvBlock)
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.groups) for c in convs] == [((1, 1), 1), ((3, 3), 256), ((1, 1), 1)]
    for conv in convs:
        fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    assert torch.equal(decoder.neck_in[0].weight, neck_before)
    bns = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(bn.weight == 1) and torch.all(bn.bias == 0) for bn in bns)
