"""params/paper.yaml follows the authors' code (yyh-rain-song/ReMamber) on every item where ours differs,
and each of our choices stays a named option: the values are read back from the file, and the options
that change behaviour are exercised (EMA selection by checkpoint loading, the AMP dtype choice)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from remamber.config import ConfigError, ExperimentConfig
from remamber.engine.checkpoint import load_model, save_checkpoint
from remamber.engine.evaluate import amp_dtype_for
from remamber.models import build_model, variant_config

ROOT = Path(__file__).resolve().parents[1]


def test_paper_config_is_the_authors():
    cfg = ExperimentConfig.from_yaml(ROOT / "params" / "paper.yaml")
    assert (cfg.data.mask_mode, cfg.data.text_field) == ("refer_eq1", "sent")
    assert cfg.model["mask_text_padding"] is False and cfg.model["max_text_len"] == 20
    assert cfg.model["init"] == "authors"
    t = cfg.train
    assert (t.amp, t.amp_dtype, t.eval_amp) == (True, "float16", False)
    assert (t.ema_decay, t.ema_select) == (0.9999, "raw")
    assert (t.weight_decay, t.weight_decay_scope, t.lr_schedule) == (1e-4, "all", "cosine_lagged")


def test_the_demo_keeps_our_defaults():
    cfg = ExperimentConfig.from_yaml(ROOT / "params" / "demo.yaml")
    assert (cfg.data.mask_mode, cfg.data.text_field) == ("union", "raw")
    assert (cfg.train.amp_dtype, cfg.train.eval_amp, cfg.train.ema_select) == ("auto", True, "ema")
    assert (cfg.train.weight_decay_scope, cfg.train.lr_schedule) == ("weights", "cosine")


def test_optimizer_options_at_their_defaults_leave_the_config_hash_unchanged():
    """The demo does not set the two optimiser options: writing their defaults changes neither its
    config_hash (so its runs stay resumable) nor its behaviour; the authors' values change the hash."""
    text = (ROOT / "params" / "demo.yaml").read_text()
    assert "weight_decay_scope" not in text and "lr_schedule" not in text
    demo = ExperimentConfig.from_yaml(ROOT / "params" / "demo.yaml")
    raw = demo.to_dict()
    assert (raw["train"]["weight_decay_scope"], raw["train"]["lr_schedule"]) == ("weights", "cosine")
    before = demo.config_hash()
    assert ExperimentConfig.from_dict(raw).config_hash() == before
    del raw["train"]["weight_decay_scope"], raw["train"]["lr_schedule"]
    assert ExperimentConfig.from_dict(raw).config_hash() == before
    raw["train"].update(weight_decay_scope="all")
    assert ExperimentConfig.from_dict(raw).config_hash() != before


@pytest.mark.parametrize(("section", "key", "value", "message"), [
    ("train", "amp_dtype", "half", r"train\.amp_dtype: 'half' is not one of"),
    ("train", "ema_select", "best", r"train\.ema_select: 'best' is not one of"),
    ("train", "weight_decay_scope", "bias", r"train\.weight_decay_scope: 'bias' is not one of"),
    ("train", "lr_schedule", "step", r"train\.lr_schedule: 'step' is not one of"),
    ("data", "text_field", "tokens", r"data\.text_field: 'tokens' is not one of"),
])
def test_bad_option_values_are_named(section, key, value, message):
    import yaml

    raw = yaml.safe_load((ROOT / "params" / "paper.yaml").read_text())
    raw[section][key] = value
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_dict(raw)


def test_amp_dtype_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype_for(True, cpu, "float16") is None  # no AMP on CPU
    assert amp_dtype_for(False, cuda, "float16") is None
    assert amp_dtype_for(True, cuda, "float16") is torch.float16
    assert amp_dtype_for(True, cuda, "bfloat16") is torch.bfloat16


@pytest.mark.parametrize(("select", "want"), [("raw", "raw"), ("ema", "ema")])
def test_ema_select_decides_which_weights_a_checkpoint_gives_by_default(tmp_path, select, want):
    torch.manual_seed(0)
    model = build_model(variant_config("twister", local_dim=16, channel_scan_grid=4, channel_scan_width=16))
    ema_state = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    meta = {"config": {"name": "t", "train": {"ema_select": select}}, "dataset": "refcoco",
            "variant": "twister", "resolution": 32, "epoch": 1, "data_hash": "abc"}
    path = tmp_path / "best.pt"
    save_checkpoint(path, model, meta, ema_state=ema_state)
    key = "decoder.head.weight"
    loaded, info = load_model(path)
    expect = model.state_dict()[key] + (1.0 if want == "ema" else 0.0)
    assert torch.equal(loaded.state_dict()[key], expect)
    assert info["weights"] == want
    ema_loaded, _ = load_model(path, weights="ema")  # asked for explicitly, the EMA is there either way
    assert torch.equal(ema_loaded.state_dict()[key], model.state_dict()[key] + 1.0)


def test_ema_select_raw_trains_with_an_ema_but_validates_and_keeps_the_raw_model(tmp_path):
    """The authors' recipe: EMA updated every step, best epoch chosen by the raw model, best.pt = raw."""
    import yaml
    from test_engine_train import _config_dict

    from remamber.data.datasets import RefSegDataset, collate_batch
    from remamber.data.preprocess import preprocess
    from remamber.data.synth import write_synthetic
    from remamber.engine.checkpoint import read_checkpoint
    from remamber.engine.evaluate import score_loader
    from remamber.engine.train import train

    write_synthetic(tmp_path / "raw", seed=0, size="tiny", progress=False)
    preprocess(tmp_path / "raw", "refcoco", tmp_path / "processed" / "refcoco", progress=False)
    raw_cfg = _config_dict(tmp_path / "raw", tmp_path / "processed", epochs=1, ema_decay=0.5, ema_select="raw")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw_cfg, sort_keys=False))
    out = train(tmp_path / "cfg.yaml", "refcoco", "twister", 32, tmp_path / "run")
    last, best = read_checkpoint(out["last"]), read_checkpoint(out["best"])
    assert last["ema"] is not None  # the EMA was kept ...
    assert any(not torch.equal(last["ema"][k], last["model"][k]) for k in last["model"])
    assert best["meta"]["model_weights"] == "raw"  # ... but best.pt holds the raw weights
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])
    # and the recorded validation score is the raw model's
    model, _ = load_model(out["best"])
    val = RefSegDataset(tmp_path / "processed" / "refcoco", "val", "eval", 32, tmp_path / "raw", seed=0)
    loader = torch.utils.data.DataLoader(val, batch_size=4, shuffle=False, collate_fn=collate_batch)
    scores = score_loader(model, loader, "original", torch.device("cpu")).result()
    assert scores["mIoU"] == pytest.approx(out["best_val_mIoU"], abs=1e-9)


def test_paper_precision_fp16_with_a_grad_scaler_and_fp32_validation_and_evaluation(tmp_path, monkeypatch):
    """The authors' precision on a GPU, emulated on CPU (the AMP dtype choice answers float16 as it does on
    CUDA): training under fp16 autocast with an active GradScaler; validation and evaluation with no
    autocast at all (eval_amp false), so they score in fp32."""
    import yaml
    from test_engine_train import _config_dict

    import remamber.engine.evaluate as evaluate_module
    import remamber.engine.train as train_module
    from remamber.data.preprocess import preprocess
    from remamber.data.synth import write_synthetic
    from remamber.engine.checkpoint import read_checkpoint

    write_synthetic(tmp_path / "raw", seed=0, size="tiny", progress=False)
    preprocess(tmp_path / "raw", "refcoco", tmp_path / "processed" / "refcoco", progress=False)
    cfg = _config_dict(tmp_path / "raw", tmp_path / "processed", epochs=1, amp=True, amp_dtype="float16",
                       eval_amp=False, ema_decay=0.5, ema_select="raw", val_subset=4)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    def as_on_cuda(enabled, device, choice="auto"):
        return torch.float16 if enabled and choice == "float16" else None

    scored_with: list = []

    def recording(score):
        def wrapped(*args, **kwargs):
            scored_with.append(kwargs.get("amp_dtype"))
            return score(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(train_module, "_amp_dtype", as_on_cuda)
    monkeypatch.setattr(train_module, "score_loader", recording(train_module.score_loader))
    out = train_module.train(tmp_path / "cfg.yaml", "refcoco", "twister", 32, tmp_path / "run")
    scaler = read_checkpoint(out["last"])["training"]["scaler"]
    assert scaler.get("scale") is not None  # the GradScaler was enabled (a disabled one saves {})
    assert scored_with == [None]  # validation: no autocast

    monkeypatch.setattr(evaluate_module, "amp_dtype_for", as_on_cuda)
    monkeypatch.setattr(evaluate_module, "score_loader", recording(evaluate_module.score_loader))
    evaluate_module.evaluate(out["best"], "testB", tmp_path / "testB.json", tracking=False,
                             index_dir=tmp_path / "processed" / "refcoco", data_root=tmp_path / "raw")
    assert scored_with == [None, None]  # evaluation: no autocast either

    # and with our eval_amp (true) the same emulated GPU validates under fp16 autocast
    cfg["train"]["eval_amp"] = True
    (tmp_path / "ours.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    train_module.train(tmp_path / "ours.yaml", "refcoco", "twister", 32, tmp_path / "ours")
    assert scored_with[-1] is torch.float16
