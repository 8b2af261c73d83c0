"""Training on the real tiny model and the real synthetic data: exact resume, DDP equivalence, NaN guard."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import remamber.engine.train as train_module
from remamber.config import ExperimentConfig
from remamber.engine.checkpoint import CheckpointError, load_model, read_checkpoint

RES = 32


def _config_dict(raw: Path, processed: Path, **train_overrides) -> dict:
    train = {
        "epochs": 2, "global_batch_size": 4, "per_device_batch_size": 2, "lr_new": 1e-3,
        "lr_pretrained": 2e-4, "min_lr": 1e-5, "weight_decay": 1e-4, "betas": [0.9, 0.999], "amp": False,
        "ema_decay": 0.9, "grad_clip": 1.0, "seed": 0, "num_workers": 0, "val_subset": None,
        "deterministic": True,
    }
    train.update(train_overrides)
    return {
        "name": "enginetest", "results": "results/enginetest",
        "data": {"source": "synthetic", "raw": str(raw), "processed": str(processed), "synth_size": "tiny",
                 "synth_seed": 0, "mask_mode": "union",
                 "datasets": {"refcoco": {"split_by": "unc", "splits": ["val", "testA", "testB"]}}},
        # The tiny offline model (vmamba_tiny_test + tiny-random-bert), narrowed further for speed.
        "model": {"backbone": "vmamba_tiny_test", "text_encoder": "tiny-random-bert", "pretrained_backbone": None,
                  "max_text_len": 12, "local_dim": 32, "channel_scan_width": 32, "channel_scan_grid": 4},
        "train": train,
        "evaluate": {"protocol": "original", "batch_size": 4, "num_workers": 0},
        "tracking": {"enabled": False, "uri": None, "on_error": "fail"},
        "experiments": {"resolutions": {"low": RES},
                        "tables": {"table1": {"resolution": "low", "datasets": ["refcoco"], "variants": ["twister"]}}},
    }


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    from remamber.data.preprocess import preprocess
    from remamber.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("engine_data")
    write_synthetic(root / "raw", seed=0, size="tiny", progress=False)
    preprocess(root / "raw", "refcoco", root / "processed" / "refcoco", progress=False)
    return root / "raw", root / "processed"


def _write_config(path: Path, data_dirs, **train_overrides) -> ExperimentConfig:
    path.write_text(yaml.safe_dump(_config_dict(*data_dirs, **train_overrides), sort_keys=False))
    return ExperimentConfig.from_yaml(path)


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path, data_dirs, monkeypatch):
    cfg = _write_config(tmp_path / "cfg.yaml", data_dirs)
    straight = tmp_path / "straight"
    train_module.train(cfg, "refcoco", "twister", RES, straight)

    # "Kill" the second run right after its first epoch was checkpointed (the end-of-epoch barrier).
    killed = tmp_path / "killed"
    with monkeypatch.context() as m:
        def die(info):
            raise _Killed()
        m.setattr(train_module, "barrier", die)
        with pytest.raises(_Killed):
            train_module.train(cfg, "refcoco", "twister", RES, killed)
    assert read_checkpoint(killed / "last.pt")["meta"]["epoch"] == 1
    assert len(json.loads((killed / "history.json").read_text())) == 1
    train_module.train(cfg, "refcoco", "twister", RES, killed, resume=True)

    a, b = read_checkpoint(straight / "last.pt"), read_checkpoint(killed / "last.pt")
    assert a["meta"]["epoch"] == b["meta"]["epoch"] == 2
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part} {key} differs after resume"
    opt_a, opt_b = a["training"]["optimizer"]["state"], b["training"]["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    hist_a = json.loads((straight / "history.json").read_text())
    hist_b = json.loads((killed / "history.json").read_text())
    metric_keys = ("epoch", "loss", "lr", "val_mIoU", "val_oIoU")
    assert [{k: h[k] for k in metric_keys} for h in hist_a] == [{k: h[k] for k in metric_keys} for h in hist_b]
    assert [h["epoch"] for h in hist_a] == [1, 2]
    assert set(hist_a[0]) == {"epoch", "loss", "lr", "val_mIoU", "val_oIoU", "images_per_s", "seconds"}
    assert hist_a[1]["lr"] < hist_a[0]["lr"] == 1e-3  # cosine decay per epoch
    best = read_checkpoint(straight / "best.pt")
    assert best["training"] is None
    assert best["meta"]["val_mIoU"] == max(h["val_mIoU"] for h in hist_a)
    # A second resume of a finished run trains nothing and changes nothing.
    before = (killed / "last.pt").read_bytes()
    train_module.train(cfg, "refcoco", "twister", RES, killed, resume=True)
    assert (killed / "last.pt").read_bytes() == before
    # Resuming under another config is refused, naming the file and the difference.
    other = _write_config(tmp_path / "other.yaml", data_dirs, seed=1)
    with pytest.raises(CheckpointError, match=r"last\.pt: cannot resume: config_hash"):
        train_module.train(other, "refcoco", "twister", RES, killed, resume=True)


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(tmp_path, data_dirs, monkeypatch):
    cfg = _write_config(tmp_path / "cfg.yaml", data_dirs, ema_decay=None)
    real_loss = train_module.dice_bce_loss
    calls = {"n": 0}

    def loss_nan_at_fifth(logits, target):
        # Epoch 1 has 2 steps x 2 micro-batches; the 5th call is epoch 2, step 1, micro-batch 1.
        calls["n"] += 1
        loss = real_loss(logits, target)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(train_module, "dice_bce_loss", loss_nan_at_fifth)
    out = tmp_path / "run"
    with pytest.raises(train_module.NonFiniteLossError,
                       match=r"non-finite loss \(nan on rank 0\) at epoch 2, step 1 \(micro-batch 1/2\)"):
        train_module.train(cfg, "refcoco", "twister", RES, out)
    model, meta = load_model(out / "last.pt")
    assert meta["epoch"] == 1 and meta["dataset"] == "refcoco" and meta["resolution"] == RES
    assert read_checkpoint(out / "last.pt")["training"]["history"][0]["epoch"] == 1
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1]
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "history.json", "last.pt"]  # no temp files


_DDP_SCRIPT = """
import sys
from remamber.engine.train import train
train(sys.argv[1], "refcoco", "twister", {res}, sys.argv[2])
"""


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, data_dirs):
    from remamber.models import build_model

    # global 4 = 2 per device x 2 processes x 1 accumulation, or x 1 process x 2 accumulation steps.
    cfg_path = tmp_path / "cfg.yaml"
    # Adam turns rounding-level gradient differences (summation order across processes) into weight
    # differences of up to ~lr per step for parameters whose gradients are near zero: a small lr keeps
    # the comparison at the level of the gradients themselves.
    cfg = _write_config(cfg_path, data_dirs, epochs=1, ema_decay=None, lr_new=1e-4, lr_pretrained=1e-4,
                        min_lr=1e-6)
    script = tmp_path / "run_train.py"
    script.write_text(_DDP_SCRIPT.format(res=RES))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(cfg_path),
                           str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 per device x 2 device(s) x 1 accumulation step(s)" in proc.stderr
    train_module.train(cfg, "refcoco", "twister", RES, tmp_path / "single")

    one, two = read_checkpoint(tmp_path / "single" / "last.pt"), read_checkpoint(tmp_path / "ddp" / "last.pt")
    assert two["meta"]["world_size"] == 2 and len(two["training"]["rng"]) == 2
    torch.manual_seed(cfg.train.seed)  # the initialisation train() starts from
    model = build_model(cfg.model_config("twister"))
    params = [name for name, _ in model.named_parameters()]
    worst = max((one["model"][n] - two["model"][n]).abs().max().item() for n in params)
    print(f"DDP (2 gloo processes) vs 1 process, 2 steps: max |w1 - w2| = {worst:.2e}")
    assert worst <= 1e-5, f"DDP weights differ by {worst}"
    # The weights did move (the comparison is not between two untouched initialisations).
    init = model.state_dict()
    assert max((one["model"][n] - init[n]).abs().max().item() for n in params) > 1e-4  # 2 steps of ~1e-4
    h1 = json.loads((tmp_path / "single" / "history.json").read_text())
    h2 = json.loads((tmp_path / "ddp" / "history.json").read_text())
    assert h1[0]["loss"] == pytest.approx(h2[0]["loss"], abs=1e-6)
    # BatchNorm running statistics are per process in DDP (rank 0's are saved), so only parameters are
    # compared; the decoder does hold BatchNorm layers, which makes that caveat real.
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
