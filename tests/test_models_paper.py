"""The paper configuration (VMamba-B + Twister + conv decoder) has the authors' parameter budget,
exactly and part by part: 131.52M outside the text encoder (backbone 87.53M, Twister blocks 29.11M,
global 1.48M, local 3.92M, decoder 9.485M), counted by hand from yyh-rain-song/ReMamber's modules. Built on the meta device with a
768-wide offline text encoder standing in for CLIP-L/14's width, so nothing large is allocated."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertModel

from remamber.models import VARIANTS, variant_config
from remamber.models.remamber import ReMamber
from remamber.models.text import TextEncoder, _bert_tokenizer, minilm_dir

# The authors' figures (rounded as they report them), per part outside the text encoder.
AUTHORS_ROUNDED = {"backbone": 87.53e6, "twister_blocks": 29.11e6, "decoder": 9.485e6, "total": 131.52e6}


def _authors_ss2d(dim: int, d_in: int | None = None, gate: bool = False, d_state: int = 1) -> int:
    """Parameters of VMamba's SS2D (ssm_ratio 2, 3x3 depthwise conv without bias, 4 directions)."""
    d_in = d_in or dim
    inner, rank = 2 * dim, math.ceil(dim / 16)
    return (d_in * inner * (2 if gate else 1)  # in_proj (x and, with the gate, z)
            + 9 * inner  # conv2d
            + 4 * (rank + 2 * d_state) * inner  # x_proj_weight
            + 4 * inner * rank + 4 * inner  # dt_projs weight + bias
            + 4 * inner * d_state + 4 * inner  # A_logs, Ds
            + 2 * inner + inner * dim)  # out_norm, out_proj


def _authors_counts() -> dict[str, int]:
    """Counted by hand from the module definitions of yyh-rain-song/ReMamber (model/customized_model.py,
    model/utils.py, model/conv_segmenter.py) and MzeroMiko/VMamba (VMamba-B 0229: dims 128..1024,
    depths 2/2/15/2, d_state 1, patch embed v2, downsample v3; the classifier head is dropped)."""
    dims, depths = (128, 256, 512, 1024), (2, 2, 15, 2)
    backbone = 3 * 64 * 9 + 64 + 2 * 64 + 64 * 128 * 9 + 128 + 2 * 128  # two stride-2 convs + LN
    for i, (c, depth) in enumerate(zip(dims, depths)):
        block = 2 * c + _authors_ss2d(c) + 2 * c + (c * 4 * c + 4 * c) + (4 * c * c + c)  # LN, SS2D, LN, MLP
        backbone += depth * block
        if i < 3:
            backbone += 9 * c * 2 * c + 2 * c + 2 * 2 * c  # stride-2 conv + LN
    # two Twister blocks per stage: ln_1, SS2D with in_proj 3C -> 2C (no gate), and the channel
    # scan: a gated SS2D with d_model 16*16 = 256 (its four directions all used)
    twister = sum(2 * (2 * c + _authors_ss2d(c, d_in=3 * c) + _authors_ss2d(256, gate=True)) for c in dims)
    global_ = sum(768 * c + c for c in dims)  # Linear(768, C) + ReLU
    local = sum((c * 512 + 512) + (768 * 512 + 512) + (20 * 512 * 9 + 512) + (512 * c + c) for c in dims)

    def res_block(cin: int, cout: int) -> int:  # 1x1 conv + BN, 3x3 depthwise + BN, 1x1 conv + BN
        return cin * cin + 2 * cin + 9 * cin + 2 * cin + cin * cout + 2 * cout

    decoder = (res_block(1024, 512) + res_block(1024, 512) + res_block(768, 512)
               + (640 * 512 * 9 + 512) + 2 * 512 + (512 * 512 * 9 + 512) + 2 * 512 + (512 * 9 + 1))
    return {"backbone": backbone, "twister_blocks": twister, "global": global_, "local": local,
            "decoder": decoder}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _paper_model(variant: str = "twister") -> ReMamber:
    stand_in = BertModel(BertConfig(hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                                    intermediate_size=32, vocab_size=64, max_position_embeddings=32))
    text = TextEncoder("width-768 stand-in", stand_in, _bert_tokenizer(minilm_dir()), "pooler", 20)
    cfg = variant_config(variant, backbone="vmamba_base", text_encoder="clip-vit-large-patch14")
    with torch.device("meta"):
        return ReMamber(cfg, text)


def test_paper_twister_parameter_budget():
    model = _paper_model()
    parts = {
        "backbone": _count(model.backbone),
        "twister_blocks": sum(_count(stage.blocks) for stage in model.fusion),
        "global": sum(_count(stage.global_interaction) for stage in model.fusion),
        "local": sum(_count(stage.local_interaction) for stage in model.fusion),
        "decoder": _count(model.decoder),
    }
    total = _count(model) - _count(model.text_encoder)
    assert total == sum(parts.values())
    authors = _authors_counts()
    print("\nparameters outside the text encoder (ours vs the authors' modules):")
    for name, n in parts.items():
        print(f"  {name:15s} {n:11d}   authors {authors[name]:11d}")
    print(f"  {'total':15s} {total:11d}   authors {sum(authors.values()):11d}")
    assert parts == authors  # exact, part by part
    # and the hand count is the one the authors report
    assert round(authors["backbone"] / 1e4) * 1e4 == AUTHORS_ROUNDED["backbone"]
    assert round(authors["twister_blocks"] / 1e4) * 1e4 == AUTHORS_ROUNDED["twister_blocks"]
    assert round(authors["decoder"] / 1e3) * 1e3 == AUTHORS_ROUNDED["decoder"]
    assert round(total / 1e4) * 1e4 == AUTHORS_ROUNDED["total"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_builds_at_paper_size(variant):
    model = _paper_model(variant)
    n = _count(model) - _count(model.text_encoder)
    print(f"{variant}: {n / 1e6:.1f}M outside the text encoder")
    assert 87.5e6 < n < 145e6
