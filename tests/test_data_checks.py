"""Bad data is found before a job spends time on it (issue 12 item 13): a training with a missing val image
fails before its first step, an evaluation before it scores anything, and over-long text is reported."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from remamber.data.checks import MissingImageError

RES = 32


def _config(raw: Path, processed: Path) -> dict:
    return {
        "name": "checktest", "results": "results/checktest",
        "data": {"source": "synthetic", "raw": str(raw), "processed": str(processed), "synth_size": "tiny",
                 "synth_seed": 0, "mask_mode": "union",
                 "datasets": {"refcoco": {"split_by": "unc", "splits": ["val", "testA", "testB"]}}},
        "model": {"backbone": "vmamba_tiny_test", "text_encoder": "tiny-random-bert", "pretrained_backbone": None,
                  "max_text_len": 4, "local_dim": 32, "channel_scan_width": 32, "channel_scan_grid": 4},
        "train": {"epochs": 1, "global_batch_size": 4, "per_device_batch_size": 4, "lr_new": 1e-3,
                  "lr_pretrained": 2e-4, "min_lr": 1e-5, "weight_decay": 1e-4, "betas": [0.9, 0.999], "amp": False,
                  "ema_decay": None, "grad_clip": 1.0, "seed": 0, "num_workers": 0, "val_subset": 4,
                  "deterministic": True},
        "evaluate": {"protocol": "original", "batch_size": 4, "num_workers": 0},
        "tracking": {"enabled": False, "uri": None, "on_error": "fail"},
        "experiments": {"resolutions": {"low": RES},
                        "tables": {"table1": {"resolution": "low", "datasets": ["refcoco"], "variants": ["twister"]}}},
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from remamber.data.preprocess import preprocess
    from remamber.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("checks")
    write_synthetic(root / "raw", seed=0, size="tiny", progress=False)
    preprocess(root / "raw", "refcoco", root / "processed" / "refcoco", progress=False)
    return root / "raw", root / "processed"


def _without_a_val_image(data, tmp_path) -> tuple[Path, str]:
    raw, processed = data
    copy = tmp_path / "raw"
    shutil.copytree(raw, copy)
    train_images = set(pd.read_parquet(processed / "refcoco" / "train.parquet").image_path)
    victim = sorted(set(pd.read_parquet(processed / "refcoco" / "val.parquet").image_path) - train_images)[-1]
    (copy / victim).unlink()
    return copy, victim


def test_training_with_a_missing_val_image_fails_before_the_first_step(data, tmp_path, monkeypatch):
    from remamber.config import ExperimentConfig
    from remamber.engine import train as train_module

    raw, victim = _without_a_val_image(data, tmp_path)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(raw, data[1]), sort_keys=False))
    built = []
    monkeypatch.setattr(train_module, "build_model", lambda *a, **k: built.append(1) or 1 / 0)
    with pytest.raises(MissingImageError, match=rf"are missing \(val: 1\), e\.g\. .*{victim}"):
        train_module.train(ExperimentConfig.from_yaml(cfg_path), "refcoco", "twister", RES, tmp_path / "out",
                           device="cpu")
    assert not built  # found before the model is even built
    assert not (tmp_path / "out" / "last.pt").exists()


def test_training_reports_sentences_cut_at_max_text_len(data, tmp_path, caplog):
    """max_text_len 4 cuts most synthetic expressions: the count is logged before training."""
    from remamber.config import ExperimentConfig
    from remamber.data.checks import hf_token_lengths, split_sentences
    from remamber.engine.train import train
    from remamber.models.text import build_text_encoder

    raw, processed = data
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(raw, processed), sort_keys=False))
    with caplog.at_level("WARNING", logger="remamber.data.checks"):
        train(ExperimentConfig.from_yaml(cfg_path), "refcoco", "twister", RES, tmp_path / "out", device="cpu")
    tokenizer = build_text_encoder("tiny-random-bert", max_text_len=4).tokenizer
    for split in ("train", "val"):
        sentences = split_sentences(processed / "refcoco", split)
        n = sum(n > 4 for n in hf_token_lengths(tokenizer)(sentences))
        assert n > 0
        assert f"{split}.parquet: {n} of {len(sentences)} sentences are longer than max_text_len = 4" in caplog.text
    # evaluation: the same checks before scoring, and a batch size of 0 is an error, not the default
    from remamber.engine.evaluate import evaluate

    caplog.clear()
    with caplog.at_level("WARNING", logger="remamber.data.checks"):
        evaluate(tmp_path / "out" / "best.pt", "testA", tmp_path / "testA.json", tracking=False)
    sentences = split_sentences(processed / "refcoco", "testA")
    n = sum(n > 4 for n in hf_token_lengths(tokenizer)(sentences))
    assert f"testA.parquet: {n} of {len(sentences)} sentences are longer than max_text_len = 4" in caplog.text
    assert "train.parquet" not in caplog.text  # only the splits the job reads
    copy, victim = _without_a_val_image(data, tmp_path)
    with pytest.raises(MissingImageError, match=rf"\(val: 1\), e\.g\. .*{victim}"):
        evaluate(tmp_path / "out" / "best.pt", "val", tmp_path / "m.json", data_root=copy, tracking=False)
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        evaluate(tmp_path / "out" / "best.pt", "val", tmp_path / "m.json", batch_size=0, tracking=False)
    assert not (tmp_path / "m.json").exists()
    # prediction on one's own image: a truncated file is named, and the command says so in one line
    from PIL import Image

    from remamber.cli import main
    from remamber.data.checks import ImageFileError
    from remamber.engine.predict import predict

    own = tmp_path / "my photo.jpg"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(own)
    # a sentence longer than max_text_len is cut: said, not silent ([CLS] the big red one [SEP]: 6 tokens)
    caplog.clear()
    with caplog.at_level("WARNING", logger="remamber"):
        predict(tmp_path / "out" / "best.pt", own, "the big red one", tmp_path / "whole.png")
    assert "the text has 6 tokens, more than max_text_len = 4: only its first 4 are read" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="remamber"):
        predict(tmp_path / "out" / "best.pt", own, "red", tmp_path / "whole.png")
    assert "max_text_len" not in caplog.text
    own.write_bytes(own.read_bytes()[:300])
    with pytest.raises(ImageFileError, match=r"my photo\.jpg: not a readable image \("):
        predict(tmp_path / "out" / "best.pt", own, "the red one", tmp_path / "o.png")
    assert main(["predict", "--checkpoint", str(tmp_path / "out" / "best.pt"), "--image", str(own),
                 "--text", "the red one", "--out", str(tmp_path / "o.png")]) == 2
    assert not (tmp_path / "o.png").exists()


def test_multi_split_evaluation_checks_every_split_before_scoring_any(data, tmp_path, monkeypatch, capsys):
    from remamber.cli import main
    from remamber.engine import evaluate as evaluate_module

    raw, processed = data
    copy = tmp_path / "raw"
    shutil.copytree(raw, copy)
    used = set(pd.read_parquet(processed / "refcoco" / "val.parquet").image_path)
    victim = sorted(set(pd.read_parquet(processed / "refcoco" / "testB.parquet").image_path) - used)[0]
    (copy / victim).unlink()
    scored = []
    monkeypatch.setattr(evaluate_module, "score_loader", lambda *a, **k: scored.append(a[1]))
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "best.pt"), "--split", "val", "testB",
               "--index-dir", str(processed / "refcoco"), "--data-root", str(copy), "--out", str(tmp_path / "m.json")])
    assert rc == 2 and scored == []  # val was not scored only to fail on testB
    assert f"(testB: 1), e.g. {copy / victim}" in capsys.readouterr().err
