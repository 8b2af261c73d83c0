"""Four processes logging to one fresh SQLite store at once lose nothing and do not fail."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

N_PROCS = 4
N_EPOCHS = 30
SPLITS = ("val", "testA")

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from remamber.tracking import Tracker, TrackingConfig

    uri, work, rank, epochs = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    (work / f"ready{rank}").touch()
    while not (work / "go").exists():  # start together, so the schema creation races too
        time.sleep(0.01)
    tracker = Tracker(TrackingConfig(uri=uri))
    key = f"ds{rank}/twister/64"
    with tracker.training_run("concurrency", key, {"rank": rank, "train": {"epochs": epochs}}) as run:
        for epoch in range(epochs):
            # separate calls on purpose: many small write transactions contend for the lock
            run.log_metrics({"loss": rank + 1.0 / (epoch + 1)}, step=epoch)
            run.log_metrics({"val_mIoU": 100.0 * rank + epoch}, step=epoch)
            run.set_tags({"last_epoch": epoch})
    for split in sys.argv[5:]:
        with tracker.eval_run("concurrency", key, split, {"split_param": split}) as ev:
            ev.log_metrics({"mIoU": rank * 10.0 + len(split)}, step=0)
    print(run.run_id)
    """
)


@pytest.mark.slow  # ~20 s alone (four interpreters importing mlflow); more on a loaded machine
def test_four_processes_one_sqlite_store(tmp_path: Path) -> None:
    db = tmp_path / "store" / "mlflow.db"
    uri = f"sqlite:///{db}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, uri, str(tmp_path), str(rank), str(N_EPOCHS), *SPLITS],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(N_PROCS)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{r}").exists() for r in range(N_PROCS)):
        assert time.monotonic() < deadline, "children did not start"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.05)
    (tmp_path / "go").touch()
    run_ids = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
        run_ids.append(out.strip().splitlines()[-1])

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("concurrency")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert len(runs) == N_PROCS * (1 + len(SPLITS))
    assert len(client.search_experiments()) == 2  # "Default" and ours: created exactly once
    for rank, run_id in enumerate(run_ids):
        run = client.get_run(run_id)
        assert run.data.tags["remamber.run_key"] == f"ds{rank}/twister/64"
        assert run.data.params == {"rank": str(rank), "train.epochs": str(N_EPOCHS)}
        assert run.info.status == "FINISHED"
        losses = client.get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in losses) == [
            (e, rank + 1.0 / (e + 1)) for e in range(N_EPOCHS)
        ]
        mious = client.get_metric_history(run_id, "val_mIoU")
        assert sorted((m.step, m.value) for m in mious) == [(e, 100.0 * rank + e) for e in range(N_EPOCHS)]
        assert run.data.tags["last_epoch"] == str(N_EPOCHS - 1)
        children = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'"
        )
        assert sorted(c.data.tags["remamber.split"] for c in children) == sorted(SPLITS)
        for child in children:
            split = child.data.tags["remamber.split"]
            assert child.data.metrics["mIoU"] == rank * 10.0 + len(split)
