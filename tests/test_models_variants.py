"""Every variant of the paper's tables: builds, runs forward and backward at any size, sends
gradients everywhere, really differs from the others, masks padded words, and configs are strict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from remamber.models import VARIANTS, ModelConfig, ReMamber, build_model, dice_bce_loss, variant_config

# Small fusion sizes keep the tiny test model fast; the paper's sizes are tested in test_models_paper.py.
SMALL = dict(local_dim=16, channel_scan_grid=4, channel_scan_width=16)
TEXTS = ["the red circle on the left", "blue"]
REPO = Path(__file__).resolve().parents[1]


def _model(name: str, **overrides) -> ReMamber:
    torch.manual_seed(0)
    return build_model(variant_config(name, **{**SMALL, **overrides}))


def test_variant_names_are_the_papers():
    # in the order of the paper's tables: Table 1's fusions, Table 3's scan orders, Table 4's interactions
    assert tuple(VARIANTS) == ("attention", "in_context", "norm_adaptation", "twister", "channel_only",
                               "spatial_only", "parallel", "spatial_channel", "global_only", "local_only")


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_forward_backward_at_200x152(name):
    model = _model(name).train()
    ids, mask = model.tokenize(TEXTS)
    images = torch.randn(2, 3, 200, 152)
    logits = model(images, ids, mask)
    assert logits.shape == (2, 1, 200, 152)
    assert torch.isfinite(logits).all()
    loss = dice_bce_loss(logits, (torch.rand(2, 1, 200, 152) > 0.5).float())
    loss.backward()
    groups = model.param_groups()

    def has_grad(params):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    assert has_grad(groups["text_encoder"]), "no gradient reaches the text encoder"
    assert has_grad(groups["backbone"]), "no gradient reaches the backbone"
    for i, stage in enumerate(model.fusion):
        assert has_grad(stage.parameters()), f"no gradient reaches fusion stage {i}"
    assert has_grad(model.decoder.parameters())


def _fusion_names(model: ReMamber) -> set[str]:
    return {n for n, _ in model.fusion.named_modules()}


def _has(model: ReMamber, part: str) -> bool:
    return any(n.split(".")[-1] == part for n in _fusion_names(model))


def test_variants_really_differ_by_their_modules():
    parts = ("channel_scan", "spatial_scan", "channel_proj", "global_interaction", "local_interaction",
             "cross_attention", "text_proj", "op")
    table = {name: {p for p in parts if _has(_model(name), p)} for name in VARIANTS}
    assert table["twister"] == {"channel_scan", "spatial_scan", "global_interaction", "local_interaction",
                                "text_proj"}  # text_proj: W_t of the local interaction
    assert table["channel_only"] == {"channel_scan", "channel_proj", "global_interaction", "local_interaction",
                                     "text_proj"}
    assert table["spatial_only"] == {"spatial_scan", "global_interaction", "local_interaction", "text_proj"}
    assert table["parallel"] == table["twister"] | {"channel_proj"}
    assert table["spatial_channel"] == table["twister"]
    assert table["global_only"] == {"channel_scan", "spatial_scan", "global_interaction"}
    assert table["local_only"] == {"channel_scan", "spatial_scan", "local_interaction", "text_proj"}
    assert table["in_context"] == {"text_proj", "op"}
    assert table["attention"] == {"cross_attention", "spatial_scan"}
    assert table["norm_adaptation"] == {"spatial_scan"}
    assert any(n.endswith(".film") for n in _fusion_names(_model("norm_adaptation")))
    # spatial_channel differs from twister by the order: the channel scan sees C, not 3C, channels
    twister, swapped = _model("twister"), _model("spatial_channel")
    assert twister.fusion[0].blocks[0].twisting.spatial_scan.d_in == 3 * 8
    assert swapped.fusion[0].blocks[0].twisting.spatial_scan.d_in == 3 * 8
    x, (ids, mask) = torch.randn(1, 3, 32, 32), twister.tokenize(["red"])
    _, t_rec = twister.eval()(x, ids, mask, inspect=True)
    _, s_rec = swapped.eval()(x, ids, mask, inspect=True)
    assert t_rec["cube_after_channel"][0].shape[1] == 24 and s_rec["cube_after_channel"][0].shape[1] == 8


@pytest.mark.parametrize("name", VARIANTS)
def test_padded_positions_cannot_change_the_logits_when_masked(name):
    model = _model(name).eval()
    ids, mask = model.tokenize(TEXTS)
    assert (mask == 0).any()
    other = ids.clone()
    other[mask == 0] = torch.randint(1000, 2000, (int((mask == 0).sum()),))
    images = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        base = model(images, ids, mask)
        changed = model(images, other, mask)
    torch.testing.assert_close(changed, base, rtol=1e-5, atol=1e-5)


def _padded_word_gradient(model: ReMamber, images, ids, mask) -> float:
    """Largest |d sum(logits) / d words| over the padded positions of the text encoder's output."""
    captured = {}

    def keep(module, inputs, outputs):
        outputs[0].retain_grad()
        captured["words"] = outputs[0]

    handle = model.text_encoder.register_forward_hook(keep)
    try:
        model(images, ids, mask).sum().backward()
    finally:
        handle.remove()
    return float(captured["words"].grad[mask == 0].abs().max())


@pytest.mark.parametrize("name", VARIANTS)
def test_padded_words_get_exactly_zero_gradient_when_masked(name):
    model = _model(name).eval()
    ids, mask = model.tokenize(TEXTS)
    assert _padded_word_gradient(model, torch.randn(2, 3, 40, 32), ids, mask) == 0.0


@pytest.mark.parametrize("name", ["twister", "local_only", "in_context", "attention"])
def test_without_masking_padded_words_reach_the_output(name):
    model = _model(name, mask_text_padding=False).eval()
    ids, mask = model.tokenize(TEXTS)
    assert _padded_word_gradient(model, torch.randn(2, 3, 40, 32), ids, mask) > 0.0


def test_same_seed_same_model_same_logits():
    a, b = _model("twister"), _model("twister")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    ids, mask = a.tokenize(TEXTS)
    x = torch.randn(2, 3, 40, 40)
    torch.manual_seed(5)
    la = a.train()(x, ids, mask)
    torch.manual_seed(5)
    lb = b.train()(x, ids, mask)
    assert torch.equal(la, lb)


@pytest.mark.parametrize("name", ["twister", "global_only", "attention"])
def test_inspect_returns_the_figure_inputs(name):
    model = _model(name).eval()
    ids, mask = model.tokenize(TEXTS)
    with torch.no_grad():
        logits, rec = model(torch.randn(2, 3, 64, 48), ids, mask, inspect=True)
    assert logits.shape == (2, 1, 64, 48)
    sizes = [(16, 12), (8, 6), (4, 3), (2, 2)]
    dims = [8, 16, 24, 32]
    if name == "attention":
        assert set(rec) == {"attention_maps"}
        for amap, hw in zip(rec["attention_maps"], sizes):
            assert amap.shape == (2, 20, *hw)
            torch.testing.assert_close(amap.sum(1), torch.ones(2, *hw))  # a distribution over words
            assert amap[1, 3:].abs().max() == 0  # "blue" = [CLS] blue [SEP]: padded words get no weight
        return
    parts = 3 if name == "twister" else 2
    for i, (hw, c) in enumerate(zip(sizes, dims)):
        assert rec["cube"][i].shape == (2, parts * c, *hw)
        assert rec["cube_after_channel"][i].shape == (2, parts * c, *hw)
        assert rec["cube_after_spatial"][i].shape == (2, c, *hw)
        slices = rec["cube_slices"][i]
        assert list(slices) == (["image", "global_text", "local"] if parts == 3 else ["image", "global_text"])
        assert slices["image"] == (0, c) and slices["global_text"] == (c, 2 * c)
        # the global text part is the same vector at every pixel (Eq. 4 expansion)
        g = rec["cube"][i][:, c:2 * c]
        torch.testing.assert_close(g, g[:, :, :1, :1].expand_as(g))
    if name == "twister":
        for amap, hw in zip(rec["interaction_maps"], sizes):
            assert amap.shape == (2, 20, *hw)
            assert amap[1, 3:].abs().max() == 0
    else:
        assert "interaction_maps" not in rec


def test_param_groups_partition_the_parameters():
    model = _model("twister")
    groups = model.param_groups()
    assert set(groups) == {"text_encoder", "backbone", "new"}
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in groups["backbone"]} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in groups["text_encoder"]} == {id(p) for p in model.text_encoder.parameters()}


def test_pretrained_backbone_is_loaded_at_build(tmp_path):
    source = _model("twister")
    path = tmp_path / "vssm.pth"
    state = {k: v + 1.0 for k, v in source.backbone.state_dict().items()}
    state["classifier.head.weight"] = torch.zeros(10, 32)
    torch.save({"model": state}, path)
    model = _model("twister", pretrained_backbone=str(path))
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.config.pretrained_backbone == str(path)


def test_unknown_variant_and_misspelt_keys_are_clear_errors():
    with pytest.raises(KeyError, match="'twisted'.*known variants.*twister"):
        variant_config("twisted")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['mask_text_pading'\].*valid keys.*mask_text_padding"):
        ModelConfig.from_dict({"backbone": "vmamba_demo", "mask_text_pading": True})
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['decodr'\]"):
        variant_config("twister", decodr="conv")
    with pytest.raises(ValueError, match="backbone='vmamba_large' is not one of"):
        ModelConfig(backbone="vmamba_large")
    with pytest.raises(ValueError, match="fusion='attention' needs the defaults"):
        ModelConfig(fusion="attention", scan_order="parallel")
    with pytest.raises(ValueError, match="sets \\['scan_order'\\] itself"):
        variant_config("channel_only", scan_order="parallel")
    with pytest.raises(ValueError, match="max_text_len must be a positive integer"):
        ModelConfig(max_text_len=0)


def test_config_round_trip_and_the_params_files(tmp_path):
    cfg = variant_config("parallel", backbone="vmamba_base", text_encoder="clip-vit-large-patch14")
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.scan_order == "parallel"
    for params in ("paper.yaml", "demo.yaml"):
        path = REPO / "params" / params
        section = yaml.safe_load(path.read_text())["model"]
        from_file = ModelConfig.from_yaml(path)
        assert from_file.to_dict().items() >= section.items()
        assert variant_config("twister", **section).backbone == section["backbone"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: vmamba_demo\n  fusoin: twister\n")
    with pytest.raises(ValueError, match=r"bad\.yaml:model: unknown key\(s\) \['fusoin'\]"):
        ModelConfig.from_yaml(bad)
