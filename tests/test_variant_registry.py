"""Adding a fusion variant is its module plus one row: a test-only variant appears in the plan, trains,
is evaluated and gets its row in a table, with nothing else edited."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from remamber import vocabulary
from remamber.config import ExperimentConfig
from remamber.models import registry
from remamber.models.layers import LayerNorm2d


class TextGateStage(nn.Module):
    """The test's fusion: image * (1 + tanh(W pooled)), normalised (a one-line FiLM)."""

    def __init__(self, dim: int, text_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(text_dim, dim)
        self.norm = LayerNorm2d(dim)

    def forward(self, image, words, pooled, text_mask, record=None):
        return self.norm(image * (1 + torch.tanh(self.proj(pooled)))[:, :, None, None])


@pytest.fixture()
def text_gate(monkeypatch):
    # the two lines a new variant needs (monkeypatch removes them again after the test)
    monkeypatch.setitem(registry.FUSION_STAGES, "text_gate", lambda cfg, dim, text_dim, ssm: TextGateStage(dim, text_dim))
    monkeypatch.setitem(vocabulary._VARIANTS, "text_gate", vocabulary.Variant("text_gate", "text_gate", "Text Gate"))


def test_registering_twice_is_refused(text_gate):
    with pytest.raises(ValueError, match="already"):
        vocabulary.register_variant(vocabulary.Variant("text_gate", "text_gate", "Text Gate"))
    with pytest.raises(ValueError, match="already"):
        registry.register_fusion("twister", lambda *a: None)


@pytest.mark.slow
def test_a_new_variant_is_planned_trained_evaluated_and_tabled(tmp_path, text_gate):
    from remamber.data.preprocess import preprocess
    from remamber.data.synth import write_synthetic
    from remamber.engine.evaluate import evaluate
    from remamber.engine.train import train
    from remamber.reports.tables import build_table, render_latex

    write_synthetic(tmp_path / "raw", seed=0, size="tiny", progress=False)
    preprocess(tmp_path / "raw", "refcoco", tmp_path / "processed" / "refcoco", progress=False)
    raw = {
        "name": "plugin", "results": str(tmp_path / "results"),
        "data": {"source": "synthetic", "raw": str(tmp_path / "raw"), "processed": str(tmp_path / "processed"),
                 "synth_size": "tiny", "synth_seed": 0, "mask_mode": "union",
                 "datasets": {"refcoco": {"split_by": "unc", "splits": ["val"]}}},
        "model": {"backbone": "vmamba_tiny_test", "text_encoder": "tiny-random-bert", "pretrained_backbone": None,
                  "max_text_len": 12, "local_dim": 32, "channel_scan_width": 32, "channel_scan_grid": 4},
        "train": {"epochs": 1, "global_batch_size": 4, "per_device_batch_size": 4, "lr_new": 1e-3,
                  "lr_pretrained": 1e-3, "min_lr": 1e-5, "weight_decay": 1e-4, "betas": [0.9, 0.999],
                  "amp": False, "ema_decay": None, "grad_clip": 1.0, "seed": 0, "num_workers": 0,
                  "val_subset": None, "deterministic": True},
        "evaluate": {"protocol": "original", "batch_size": 4, "num_workers": 0},
        "tracking": {"enabled": False, "uri": None, "on_error": "fail"},
        "experiments": {"resolutions": {"low": 32},
                        "tables": {"table1": {"resolution": "low", "datasets": ["refcoco"],
                                              "variants": ["twister", "text_gate"]}}},
    }
    path = tmp_path / "plugin.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = ExperimentConfig.from_yaml(path)
    assert [(j.dataset, j.variant) for j in cfg.jobs()] == [("refcoco", "twister"), ("refcoco", "text_gate")]

    out = tmp_path / "results" / "text_gate"
    train(cfg, "refcoco", "text_gate", 32, out)
    from remamber.engine.checkpoint import load_model

    model, meta = load_model(out / "best.pt")
    assert isinstance(model.fusion[0], TextGateStage) and meta["variant"] == "text_gate"
    record = evaluate(out / "best.pt", "val", tmp_path / "m.json", tracking=False)
    assert record["variant"] == "text_gate" and 0.0 <= record["mIoU"] <= 100.0

    spec = {"resolution": 32, "datasets": ["refcoco"], "variants": ["text_gate"], "splits": {"refcoco": ["val"]}}
    frame = build_table("table1", spec, [record])
    assert list(frame[frame["source"] == "ours"]["name"]) == ["Text Gate"]
    assert "Text Gate" in render_latex("table1", spec, [record])
