"""Tracker against a real SQLite MLflow store, checked back through MlflowClient."""

from __future__ import annotations

import shutil
import socket
import warnings
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from remamber.tracking import (
    NoOpRun,
    Tracker,
    TrackingConfig,
    TrackingError,
    TrackingWarning,
    flatten_params,
    resolve_tracking_uri,
)
from remamber.tracking.store import with_retries

CONFIG = {
    "name": "demo",
    "train": {"epochs": 3, "lr_new": 1.0e-3, "betas": [0.9, 0.999], "ema_decay": None, "amp": False},
    "model": {"backbone": "vmamba_demo"},
    # a real dataset name MLflow refuses inside a param name: the store must accept the flattened key
    "data": {"datasets": {"refcoco+": {"split_by": "unc"}}},
}


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised, empty store, created once: copying it saves the schema migration per test."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    Tracker(TrackingConfig(uri=f"sqlite:///{db}"))
    return db


@pytest.fixture()
def store(tmp_path: Path, template_db: Path) -> str:
    shutil.copy(template_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def runs_of(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- config and params ----


def test_config_from_dict_is_strict() -> None:
    assert TrackingConfig.from_dict({"enabled": False, "uri": None, "on_error": "warn"}) == TrackingConfig(
        enabled=False, uri=None, on_error="warn"
    )
    assert TrackingConfig.from_dict(None) == TrackingConfig()
    with pytest.raises(ValueError, match="on_eror"):
        TrackingConfig.from_dict({"on_eror": "warn"})
    with pytest.raises(ValueError, match="'ignore'"):
        TrackingConfig.from_dict({"on_error": "ignore"})
    with pytest.raises(ValueError, match="enabled"):
        TrackingConfig.from_dict({"enabled": "yes"})


def test_flatten_params() -> None:
    flat = flatten_params({"b": {"x": 1, "y": {"z": [1, 2.5]}, "e": {}}, "a": None, "c": True, "s": "text"})
    assert flat == {"a": "null", "b.e": "{}", "b.x": "1", "b.y.z": "[1, 2.5]", "c": "true", "s": "text"}
    assert list(flat) == sorted(flat)
    assert flatten_params({"data": {"refcoco+": {"a b/c": 1}}}) == {"data.refcoco_plus.a b/c": "1"}
    with pytest.raises(ValueError, match="'long'"):
        flatten_params({"long": "x" * 6001})


def test_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path / 'sub' / 'x.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"  # config beats env
    for bad in ("./mlruns", "file:///x/mlruns"):
        with pytest.raises(TrackingError, match="sqlite:///"):
            resolve_tracking_uri(bad)


# ---- runs ----


def test_training_run_logs_params_metrics_tags_artifacts(store: str, tmp_path: Path) -> None:
    tracker = Tracker(TrackingConfig(uri=store))
    history = tmp_path / "history.json"
    history.write_text('[{"epoch": 0}]')
    losses = [0.9, 0.5, 0.25]
    with tracker.training_run("table1", "refcoco/twister/64", CONFIG, {"remamber.data_hash": "abc"}) as run:
        for epoch, loss in enumerate(losses):
            run.log_metrics({"loss": loss, "val_mIoU": 10.0 * epoch}, step=epoch)
        run.set_tags({"remamber.best_epoch": 2})
        run.log_artifact(history)

    client = MlflowClient(store)
    got = client.get_run(run.run_id)
    assert got.data.params == flatten_params(CONFIG)
    assert got.data.params["train.betas"] == "[0.9, 0.999]"
    assert got.data.params["data.datasets.refcoco_plus.split_by"] == "unc"
    assert got.data.tags["remamber.run_key"] == "refcoco/twister/64"
    assert got.data.tags["remamber.data_hash"] == "abc"
    assert got.data.tags["remamber.best_epoch"] == "2"
    assert got.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "loss")] == list(enumerate(losses))
    assert [m.value for m in client.get_metric_history(run.run_id, "val_mIoU")] == [0.0, 10.0, 20.0]
    # artifacts live beside the db, not in ./mlruns of the cwd
    [artifact] = client.list_artifacts(run.run_id)
    assert artifact.path == "history.json"
    copied = tmp_path / "mlartifacts" / "table1" / run.run_id / "artifacts" / "history.json"
    assert copied.read_text() == history.read_text()
    with pytest.raises(FileNotFoundError, match="missing.json"):
        run.log_artifact(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="'loss'"):
        run.log_metrics({"loss": "high"}, step=0)


def test_failed_run_is_marked_failed(store: str) -> None:
    tracker = Tracker(TrackingConfig(uri=store))
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.training_run("table1", "refcoco/attention/64", CONFIG) as run:
            raise RuntimeError("boom")
    assert MlflowClient(store).get_run(run.run_id).info.status == "FAILED"


def test_rerun_reuses_run_and_nested_eval_runs(store: str) -> None:
    tracker = Tracker(TrackingConfig(uri=store))
    first = tracker.training_run("table1", "refcoco/twister/64", CONFIG)
    first.log_metrics({"loss": 1.0}, step=0)
    first.end()
    evals = {}
    for split in ("val", "testA"):
        with tracker.eval_run("table1", "refcoco/twister/64", split, {"protocol": "original"}) as ev:
            ev.log_metrics({"mIoU": 40.0, "oIoU": 42.0}, step=0)
        evals[split] = ev.run_id

    # a fresh process-like tracker on the same store: the same runs come back, nothing duplicated
    again = Tracker(TrackingConfig(uri=store))
    second = again.training_run("table1", "refcoco/twister/64", CONFIG)
    assert second.run_id == first.run_id
    client = MlflowClient(store)
    assert client.get_run(first.run_id).info.status == "RUNNING"  # reopened for the resumed job
    second.log_metrics({"loss": 0.5}, step=1)
    second.end()
    ev_again = again.eval_run("table1", "refcoco/twister/64", "val", {"protocol": "original"})
    assert ev_again.run_id == evals["val"]
    ev_again.end()

    runs = runs_of(client, "table1")
    assert len(runs) == 3
    assert [m.value for m in client.get_metric_history(first.run_id, "loss")] == [1.0, 0.5]
    for split, run_id in evals.items():
        tags = client.get_run(run_id).data.tags
        assert tags["mlflow.parentRunId"] == first.run_id
        assert tags["remamber.split"] == split
        assert client.get_run(run_id).data.params == {"protocol": "original"}
        assert client.get_metric_history(run_id, "oIoU")[0].value == 42.0


def test_changed_config_supersedes_old_run(store: str) -> None:
    tracker = Tracker(TrackingConfig(uri=store))
    old = tracker.training_run("table3", "refcoco/parallel/64", CONFIG)
    old.end()
    changed = {**CONFIG, "train": {**CONFIG["train"], "epochs": 5}}
    with pytest.warns(TrackingWarning, match="train.epochs"):
        new = tracker.training_run("table3", "refcoco/parallel/64", changed)
    assert new.run_id != old.run_id
    client = MlflowClient(store)
    old_tags = client.get_run(old.run_id).data.tags
    assert "remamber.run_key" not in old_tags
    assert old_tags["remamber.superseded_run_key"] == "refcoco/parallel/64"
    assert client.get_run(new.run_id).data.params["train.epochs"] == "5"


def test_eval_without_tracked_training_creates_parent(store: str) -> None:
    tracker = Tracker(TrackingConfig(uri=store))
    ev = tracker.eval_run("table2", "refcocog/twister/96", "test")
    ev.end()
    client = MlflowClient(store)
    parent_id = client.get_run(ev.run_id).data.tags["mlflow.parentRunId"]
    parent = client.get_run(parent_id)
    assert parent.data.tags["remamber.run_key"] == "refcocog/twister/96"
    assert parent.info.status == "FINISHED"


def test_bad_run_key_is_rejected(store: str) -> None:
    tracker = Tracker(TrackingConfig(uri=store))
    with pytest.raises(ValueError, match="run_key"):
        tracker.training_run("table1", "it's bad", CONFIG)


# ---- disabled and broken stores ----


def test_disabled_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(TrackingConfig(enabled=False))
    assert not tracker.active
    with tracker.training_run("table1", "refcoco/twister/64", CONFIG) as run:
        assert isinstance(run, NoOpRun)
        run.log_metrics({"loss": 1.0}, step=0)
        run.log_artifact(tmp_path / "absent")  # no-op handles accept anything
    tracker.eval_run("table1", "refcoco/twister/64", "val").end()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["http_closed_port", "sqlite_under_a_file", "not_a_database"])
def test_unusable_store_fail_vs_warn(kind: str, tmp_path: Path) -> None:
    if kind == "http_closed_port":
        uri = f"http://127.0.0.1:{closed_port()}"
    elif kind == "sqlite_under_a_file":
        (tmp_path / "plainfile").write_text("x")
        uri = f"sqlite:///{tmp_path / 'plainfile' / 'mlflow.db'}"
    else:
        (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
        uri = f"sqlite:///{tmp_path / 'junk.db'}"

    with pytest.raises(TrackingError) as err:
        Tracker(TrackingConfig(uri=uri, on_error="fail"))
    assert uri in str(err.value)

    with pytest.warns(TrackingWarning, match="continuing without tracking"):
        tracker = Tracker(TrackingConfig(uri=uri, on_error="warn"))
    assert not tracker.active
    run = tracker.training_run("table1", "refcoco/twister/64", CONFIG)
    assert isinstance(run, NoOpRun)
    run.log_metrics({"loss": 1.0}, step=0)
    run.end()


def test_store_lost_midway_warns_then_noops(store: str) -> None:
    tracker = Tracker(TrackingConfig(uri=store, on_error="warn"))
    run = tracker.training_run("table1", "refcoco/twister/64", CONFIG)

    class Broken:
        def __getattr__(self, name: str):
            def fail(*args, **kwargs):
                raise OSError("disk gone")

            return fail

    tracker.client = Broken()
    with pytest.warns(TrackingWarning, match="disk gone"):
        run.log_metrics({"loss": 1.0}, step=0)
    assert not run.active
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run.log_metrics({"loss": 2.0}, step=1)  # silent no-op from now on
        run.end()


# ---- retry policy ----


def test_retries_on_lock_then_gives_up_with_uri() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert with_retries(flaky, "log", "sqlite:///x.db", base_delay_s=0.001) == "ok"
    assert len(calls) == 3

    def locked() -> None:
        raise RuntimeError("database is locked")

    with pytest.raises(TrackingError, match=r"sqlite:///x.db.*still locked after 4 attempts"):
        with_retries(locked, "log", "sqlite:///x.db", attempts=4, base_delay_s=0.001)

    calls.clear()

    def broken() -> None:
        calls.append(1)
        raise ValueError("no such table")

    with pytest.raises(TrackingError, match="no such table"):
        with_retries(broken, "log", "sqlite:///x.db", base_delay_s=0.001)
    assert len(calls) == 1  # only lock contention is retried


# ---- history replay, signals, provenance, UI conventions (issue 12 items 10, 11, 15) ----


def test_sync_history_logs_each_step_once(store: str) -> None:
    """MLflow as a replayable view of history.json: a sync logs exactly the (metric, step) pairs the store
    lacks, so a replay after a kill or an outage neither loses nor doubles an epoch."""
    history = [{"epoch": 1, "loss": 0.9, "val_mIoU": 10.0}, {"epoch": 2, "loss": 0.5, "val_mIoU": 20.0},
               {"epoch": 3, "loss": 0.25, "val_mIoU": 30.0}]
    tracker = Tracker(TrackingConfig(uri=store))
    with tracker.training_run("table1", "refcoco/twister/64", CONFIG) as run:
        assert run.sync_history(history[:1], ("loss", "val_mIoU"), "epoch") == 2
        run.log_metrics({"loss": 0.5}, step=2)  # e.g. logged before a kill, val_mIoU of epoch 2 was not
    again = Tracker(TrackingConfig(uri=store)).training_run("table1", "refcoco/twister/64", CONFIG)
    assert again.run_id == run.run_id
    assert again.sync_history(history, ("loss", "val_mIoU"), "epoch") == 3  # val 2, loss 3, val 3
    assert again.sync_history(history, ("loss", "val_mIoU"), "epoch") == 0
    again.end()
    client = MlflowClient(store)
    for key in ("loss", "val_mIoU"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, key))
        assert logged == [(h["epoch"], h[key]) for h in history]


def test_fresh_training_supersedes_a_run_with_metrics(store: str) -> None:
    tracker = Tracker(TrackingConfig(uri=store))
    empty = tracker.training_run("table1", "k@1", CONFIG, fresh=True)
    empty.end()
    assert tracker.training_run("table1", "k@1", CONFIG, fresh=True).run_id == empty.run_id  # nothing to lose
    with tracker.training_run("table1", "k@1", CONFIG) as old:
        old.log_metrics({"loss": 1.0}, step=1)
    new = tracker.training_run("table1", "k@1", CONFIG, run_name="k", fresh=True)
    new.end()
    client = MlflowClient(store)
    assert new.run_id != old.run_id
    assert client.get_run(old.run_id).data.tags["remamber.superseded_run_key"] == "k@1"
    assert client.get_run(new.run_id).data.tags["mlflow.runName"] == "k"
    assert client.get_metric_history(new.run_id, "loss") == []


_SIGTERM_SCRIPT = """
import os, signal, sys
from remamber.tracking import Tracker, TrackingConfig
run = Tracker(TrackingConfig(uri=sys.argv[1])).training_run("table1", "refcoco/twister/64", {})
print(run.run_id, flush=True)
with run:
    os.kill(os.getpid(), signal.SIGTERM)
    import time; time.sleep(30)
"""


def test_sigterm_ends_the_run_killed(store: str) -> None:
    """What Slurm and Snakemake send: the run ends KILLED (not RUNNING for good), the exit status is
    128 + 15 as for an unhandled SIGTERM."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _SIGTERM_SCRIPT, store], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 143, proc.stderr[-2000:]
    run_id = proc.stdout.split()[0]
    assert MlflowClient(store).get_run(run_id).info.status == "KILLED"


def test_git_commit_is_the_package_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit of the code that ran: the checkout remamber was loaded from, whatever the cwd (a
    folder outside git, or another repository)."""
    import subprocess

    import remamber
    from remamber.tracking import git_commit

    package = Path(remamber.__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("remamber is not loaded from a git checkout here")
    outside = tmp_path / "outside"
    outside.mkdir()
    monkeypatch.chdir(outside)
    found = git_commit()
    assert found is not None and found[0] == subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True).stdout.strip()
    other = tmp_path / "other-repo"
    other.mkdir()
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e", "PATH": __import__("os").environ["PATH"]}
    for cmd in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(cmd, cwd=other, env=env, check=True, capture_output=True)
    other_head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=other, capture_output=True,
                                text=True).stdout.strip()
    monkeypatch.chdir(other)
    assert git_commit()[0] != other_head
    assert git_commit(other)[0] == other_head  # an explicit folder is still honoured


def test_experiments_are_model_training_experiments(store: str) -> None:
    """The MLflow 3 UI opens an experiment without a kind in the GenAI view ("Traces: 0"); ours are marked
    model training, also when the experiment was created by an older version."""
    client = MlflowClient(store)
    old_id = client.create_experiment("table4")  # as an older version left it: no kind tag
    tracker = Tracker(TrackingConfig(uri=store))
    with tracker.training_run("table1", "refcoco/twister/64", CONFIG) as run:
        run.log_dataset("refcoco", "ab" * 32, "data/processed/refcoco", "train")
        run.log_dataset("refcoco", "ab" * 32, "data/processed/refcoco", "train")  # a replay adds nothing
    tracker.training_run("table4", "refcoco/twister/64", CONFIG).end()
    for name in ("table1", "table4"):
        assert client.get_experiment_by_name(name).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(old_id).tags["mlflow.experimentKind"] == "custom_model_development"
    [dataset_input] = client.get_run(run.run_id).inputs.dataset_inputs
    assert (dataset_input.dataset.name, dataset_input.dataset.digest) == ("refcoco", "ab" * 8)
    tags = client.get_run(run.run_id).data.tags
    assert tags["mlflow.source.type"] == "LOCAL"
    commit = tags.get("mlflow.source.git.commit")  # absent only outside a git checkout
    assert tags["mlflow.source.name"] == ("remamber" if commit is None else
                                          f"remamber@{commit[:10]}" + ("+dirty" if tags["remamber.git_dirty"] == "true" else ""))


_SIGTERM_DURING_SAVE = """
import os, signal, sys, torch
import remamber.engine.checkpoint as ck
from remamber.tracking import Tracker, TrackingConfig
real_save = torch.save
def save_with_sigterm(obj, fh):
    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the checkpoint is being written
    real_save(obj, fh)
ck.torch.save = save_with_sigterm
run = Tracker(TrackingConfig(uri=sys.argv[1])).training_run("table1", "refcoco/twister/64", {})
print(run.run_id, flush=True)
with run:
    ck.atomic_torch_save({"w": torch.arange(1000.0)}, sys.argv[2])
    print("after save", flush=True)
"""


def test_sigterm_during_a_checkpoint_save_keeps_the_checkpoint(store: str, tmp_path: Path) -> None:
    """SIGTERM is held back while a checkpoint is written: the file is complete, nothing after the save
    runs, the run ends KILLED, exit 143."""
    import subprocess
    import sys

    import torch

    target = tmp_path / "last.pt"
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_DURING_SAVE, store, str(target)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr[-2000:]
    run_id, *rest = proc.stdout.split("\n")
    assert "after save" not in proc.stdout
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(1000.0))
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    assert MlflowClient(store).get_run(run_id.strip()).info.status == "KILLED"
