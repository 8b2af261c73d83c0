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
from remamber.engine.jobs import out_dir_id
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
            if (killed / "last.pt").exists():  # the end-of-epoch barrier, not the one at start
                raise _Killed()
        m.setattr(train_module, "barrier", die)
        with pytest.raises(_Killed):
            train_module.train(cfg, "refcoco", "twister", RES, killed)
    mid = read_checkpoint(killed / "last.pt")
    assert mid["meta"]["epoch"] == 1 and mid["training"]["optimizer"]["state"]  # the resume state
    assert len(json.loads((killed / "history.json").read_text())) == 1
    train_module.train(cfg, "refcoco", "twister", RES, killed, resume=True)

    a, b = read_checkpoint(straight / "last.pt"), read_checkpoint(killed / "last.pt")
    assert a["meta"]["epoch"] == b["meta"]["epoch"] == 2
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part} {key} differs after resume"
    # A finished last.pt drops the optimizer's moments (nothing resumes from them); epoch 1's had them.
    assert a["training"]["optimizer"] is None and b["training"]["optimizer"] is None
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
    from remamber.engine.jobs import model_config
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
    model = build_model(model_config(cfg, "twister"))
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
    # BatchNorm running statistics (issue 12 item 12): each process normalises its own micro-batches, as
    # one accumulating process does, and the running statistics are replayed in one-process order, so they
    # match too (rank 0 alone would have seen half the micro-batches).
    bns = [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns  # the decoder holds BatchNorm layers, so the comparison is real
    for name in bns:
        for buf in ("running_mean", "running_var"):
            key = f"{name}.{buf}"
            assert not torch.equal(one["model"][key], init[key])  # updated by training
            diff = (one["model"][key] - two["model"][key]).abs().max().item()
            assert diff <= 1e-5, f"{key}: DDP differs from one process by {diff}"
        key = f"{name}.num_batches_tracked"
        assert int(one["model"][key]) == int(two["model"][key]) == 2 * 2  # 2 steps x 2 micro-batches


def test_nan_in_the_first_epoch_names_no_checkpoint(tmp_path, data_dirs, monkeypatch):
    """Issue 12 item 14: before any epoch finished there is no last.pt: the error must not name one."""
    cfg = _write_config(tmp_path / "cfg.yaml", data_dirs, ema_decay=None)
    real_loss = train_module.dice_bce_loss
    monkeypatch.setattr(train_module, "dice_bce_loss", lambda lg, t: real_loss(lg, t) * float("nan"))
    out = tmp_path / "run"
    with pytest.raises(train_module.NonFiniteLossError, match="epoch 1, step 1") as err:
        train_module.train(cfg, "refcoco", "twister", RES, out)
    assert "No checkpoint was written" in str(err.value) and "last.pt" not in str(err.value)
    assert not (out / "last.pt").exists()


def _tracked_config(path, data_dirs, uri, **train_overrides) -> ExperimentConfig:
    raw = _config_dict(*data_dirs, **train_overrides)
    raw["tracking"] = {"enabled": True, "uri": uri, "on_error": "fail"}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return ExperimentConfig.from_yaml(path)


def _runs(uri, run_name="enginetest/refcoco/twister/32"):
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("table1")
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL,
                              filter_string=f"tags.`mlflow.runName` = '{run_name}'")
    return client, runs


@pytest.mark.slow
def test_frozen_text_encoder_checkpoints_resume_exactly_and_mlflow_replays(tmp_path, data_dirs, monkeypatch):
    """Issue 10 item 3 + issue 12 item 10. With train.freeze_text_encoder the checkpoints hold no text
    encoder weights (a name + hash instead), best.pt only the validated weights; a run killed after its
    epoch-1 checkpoint but before MLflow got the epoch's metrics resumes bit-identically, and the resumed run
    replays the missing epoch from history.json (each epoch logged once)."""
    from remamber.engine.checkpoint import state_sha256
    from remamber.models.text import build_text_encoder
    from remamber.tracking.tracker import RunHandle

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _write_config(tmp_path / "cfg.yaml", data_dirs, freeze_text_encoder=True)
    tracked = _tracked_config(tmp_path / "tracked.yaml", data_dirs, uri, freeze_text_encoder=True)
    assert tracked.config_hash() != cfg.config_hash()  # tracking.uri is part of the config
    straight = tmp_path / "straight"
    train_module.train(tracked, "refcoco", "twister", RES, straight)
    killed = tmp_path / "killed"
    real_sync = RunHandle.sync_history
    with monkeypatch.context() as m:
        def die_before_logging(self, history, keys, step_key):
            if history:  # the end-of-epoch sync, after last.pt and history.json were written
                raise _Killed()
            return real_sync(self, history, keys, step_key)
        m.setattr(RunHandle, "sync_history", die_before_logging)
        with pytest.raises(_Killed):
            train_module.train(tracked, "refcoco", "twister", RES, killed)
    assert read_checkpoint(killed / "last.pt")["meta"]["epoch"] == 1
    train_module.train(tracked, "refcoco", "twister", RES, killed, resume=True)

    a, b = read_checkpoint(straight / "last.pt"), read_checkpoint(killed / "last.pt")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert not [k for k in a[part] if k.startswith("text_encoder.")]  # referenced, not copied
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part} {key} differs after resume"
    fresh_encoder = build_text_encoder("tiny-random-bert", max_text_len=12)
    ref = a["meta"]["frozen"]["text_encoder"]
    assert (ref["name"], ref["prefix"], ref["tensors"]) == \
        ("tiny-random-bert", "text_encoder.", len(fresh_encoder.state_dict()))
    assert ref["sha256"] == state_sha256(fresh_encoder.state_dict())
    # best.pt: the validated (EMA) weights, nothing to resume from.
    best = read_checkpoint(straight / "best.pt")
    assert best["ema"] is None and best["training"] is None and best["meta"]["model_weights"] == "ema"
    if best["meta"]["epoch"] == 2:
        assert all(torch.equal(best["model"][k], a["ema"][k]) for k in a["ema"])
    model, meta = load_model(straight / "best.pt")
    assert meta["weights"] == "ema"
    # The rebuilt encoder is the pretrained one, bit for bit (it was never trained).
    assert all(torch.equal(v, fresh_encoder.state_dict()[k]) for k, v in model.text_encoder.state_dict().items())
    with pytest.raises(CheckpointError, match=r"best\.pt: holds the EMA weights only"):
        load_model(straight / "best.pt", weights="raw")
    n_trained = sum(v.numel() * v.element_size() for v in best["model"].values())
    n_encoder = sum(v.numel() * v.element_size() for v in fresh_encoder.state_dict().values())
    assert (straight / "best.pt").stat().st_size < n_trained + n_encoder / 2

    # MLflow: one run per output folder; the killed one replayed epoch 1 on resume, each epoch once.
    history = json.loads((killed / "history.json").read_text())
    client, runs = _runs(uri)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    killed_run = next(r for r in runs if r.data.tags["remamber.run_key"].endswith(
        out_dir_id(killed)))
    for key in train_module.TRACKED_KEYS:
        logged = [(m.step, m.value) for m in client.get_metric_history(killed_run.info.run_id, key)]
        assert sorted(logged) == [(h["epoch"], h[key]) for h in history], key

    # Weights of the referenced encoder that differ from the recorded hash are refused, at load and resume.
    import remamber.models.remamber as remamber_module

    real_build = remamber_module.build_text_encoder

    def other_weights(*args, **kwargs):
        encoder = real_build(*args, **kwargs)
        with torch.no_grad():
            next(encoder.parameters()).add_(1e-3)
        return encoder

    monkeypatch.setattr(remamber_module, "build_text_encoder", other_weights)
    with pytest.raises(CheckpointError, match=r"best\.pt: refused: its frozen text_encoder 'tiny-random-bert' "
                                              r".*differ: sha256"):
        load_model(straight / "best.pt")
    with pytest.raises(CheckpointError, match=r"last\.pt: refused: its frozen text_encoder"):
        train_module.train(tracked, "refcoco", "twister", RES, killed, resume=True)


def test_finished_training_is_not_overwritten_without_flag(tmp_path, data_dirs):
    """Issue 12 items 10 and 14: a second training into a folder that holds one is refused unless --resume or
    --overwrite; --overwrite starts a new MLflow run (the old one keeps its history, superseded) instead of
    doubling its steps; another folder gets its own run; stale temporaries of dead writers are removed."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _tracked_config(tmp_path / "cfg.yaml", data_dirs, uri, epochs=1, ema_decay=None,
                          freeze_text_encoder=True)
    out = tmp_path / "a"
    train_module.train(cfg, "refcoco", "twister", RES, out)
    before = (out / "best.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"a: already holds a training \(last\.pt, best\.pt, history\.json\);"
                                              r" pass --resume to continue it or --overwrite"):
        train_module.train(cfg, "refcoco", "twister", RES, out)
    assert (out / "best.pt").read_bytes() == before
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = out / f".last.pt.tmp-{dead}"
    live = out / f".best.pt.tmp-{os.getppid()}"  # a writer that still runs is left alone
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    train_module.train(cfg, "refcoco", "twister", RES, out, overwrite=True)
    assert not stale.exists() and live.exists()
    train_module.train(cfg, "refcoco", "twister", RES, tmp_path / "b")

    client, runs = _runs(uri)
    assert len(runs) == 3
    superseded = [r for r in runs if "remamber.superseded_run_key" in r.data.tags]
    assert len(superseded) == 1 and "remamber.run_key" not in superseded[0].data.tags
    for run in runs:  # every run: epoch 1 once
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]
    keys = {r.data.tags.get("remamber.run_key") for r in runs} - {None}
    assert keys == {f"enginetest/refcoco/twister/{RES}@{out_dir_id(p)}" for p in (out, tmp_path / "b")}


def test_cli_train_errors_are_one_line(tmp_path, data_dirs, capsys):
    """At the command line: a folder holding a training, or a CUDA device on a machine without one, is
    one error line naming the flag to use (exit status 2), not a traceback."""
    from remamber.cli import main

    _write_config(tmp_path / "cfg.yaml", data_dirs)
    out = tmp_path / "out"
    out.mkdir()
    (out / "best.pt").write_bytes(b"a finished training's")
    args = ["train", "--config", str(tmp_path / "cfg.yaml"), "--dataset", "refcoco", "--variant", "twister",
            "--resolution", str(RES), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a training (best.pt); pass --resume" in err[0] and "--overwrite" in err[0]
    if not torch.cuda.is_available():
        assert main([*args[:-1], str(tmp_path / "new"), "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["remamber: error: --device cuda: CUDA is not available here (use --device cpu)"]


def test_store_outage_at_the_last_epoch_is_replayed_by_resume(tmp_path, data_dirs, monkeypatch):
    """Issue 12 item 10: with on_error: warn, a store that fails when the last epoch's metrics are logged
    leaves that epoch out of MLflow; `--resume` on the finished folder trains nothing and logs it from
    history.json, once, and the run ends FINISHED."""
    from mlflow import MlflowClient as Client

    from remamber.tracking.tracker import TrackingWarning

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = _config_dict(*data_dirs, epochs=2, ema_decay=None, freeze_text_encoder=True)
    raw["tracking"] = {"enabled": True, "uri": uri, "on_error": "warn"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = ExperimentConfig.from_yaml(tmp_path / "cfg.yaml")
    out = tmp_path / "run"
    real_log_batch = Client.log_batch

    def store_down_at_epoch_2(self, run_id, metrics=(), *args, **kwargs):
        if any(m.step == 2 for m in metrics):
            raise OSError("database disk image is malformed")
        return real_log_batch(self, run_id, metrics, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Client, "log_batch", store_down_at_epoch_2)
        with pytest.warns(TrackingWarning, match="malformed"):
            train_module.train(cfg, "refcoco", "twister", RES, out)
    client, [run] = _runs(uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]  # epoch 2 lost
    last_before = (out / "last.pt").read_bytes()

    train_module.train(cfg, "refcoco", "twister", RES, out, resume=True)
    assert (out / "last.pt").read_bytes() == last_before  # nothing trained again
    history = json.loads((out / "history.json").read_text())
    client, [run] = _runs(uri)
    assert run.info.status == "FINISHED"
    for key in train_module.TRACKED_KEYS:
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert logged == [(h["epoch"], h[key]) for h in history], key


@pytest.mark.parametrize(("lr_schedule", "want"), [("cosine", [1e-3, 5.05e-4]), ("cosine_lagged", [1e-3, 1e-3])])
def test_lr_schedule_reaches_the_training(tmp_path, data_dirs, lr_schedule, want):
    """train.lr_schedule is what the training runs: over 2 epochs ours halves the way to min_lr at epoch 2
    (1e-5 + 9.9e-4 / 2); the authors' lagged cosine runs epochs 1 and 2 both at the base rate."""
    cfg = _write_config(tmp_path / "cfg.yaml", data_dirs, ema_decay=None, freeze_text_encoder=True,
                        lr_schedule=lr_schedule, weight_decay_scope="all")
    train_module.train(cfg, "refcoco", "twister", RES, tmp_path / "out")
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [h["lr"] for h in history] == pytest.approx(want, rel=1e-12)
