"""Tracker against a real `mlflow server` (REST store) on 127.0.0.1, started and stopped here."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from remamber.tracking import Tracker, TrackingConfig

pytestmark = pytest.mark.slow  # the server takes 10-40 s to start on a shared 2-core machine


@pytest.fixture(scope="module")
def server_uri(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [str(mlflow_cli), "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--default-artifact-root", str(root / "art")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 80
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: our own process group
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_runs_through_a_server(server_uri: str, capfd: pytest.CaptureFixture) -> None:
    tracker = Tracker(TrackingConfig(uri=server_uri))
    params = {"train": {"epochs": 2, "lr": 0.001}}
    with tracker.training_run("table1", "demo/refcoco/twister/64", params, {"remamber.data_hash": "h"}) as run:
        for epoch in range(2):
            run.log_metrics({"loss": 1.0 / (epoch + 1)}, step=epoch)
    with tracker.eval_run("table1", "demo/refcoco/twister/64", "val", {"protocol": "original"}) as ev:
        ev.log_metrics({"mIoU": 55.5}, step=0)
    again = Tracker(TrackingConfig(uri=server_uri)).training_run("table1", "demo/refcoco/twister/64", params)
    again.end()
    assert again.run_id == run.run_id

    client = MlflowClient(server_uri)
    got = client.get_run(run.run_id)
    assert got.data.params == {"train.epochs": "2", "train.lr": "0.001"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "loss")] == [(0, 1.0), (1, 0.5)]
    child = client.get_run(ev.run_id)
    assert child.data.tags["mlflow.parentRunId"] == run.run_id
    assert child.data.metrics["mIoU"] == 55.5
    experiment = client.get_experiment_by_name("table1")
    assert len(client.search_runs([experiment.experiment_id])) == 2
    assert "View run" not in capfd.readouterr().out  # MLflow's emoji banners are kept out of logs
