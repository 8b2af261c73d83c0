"""benchmarks/gpu_paper_check.py, the prepared GPU check of the paper configuration (issue 14): without a
CUDA device it says so in one line and exits 0, before any data or model work."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_paper_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_paper_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_cuda_device_is_one_line_and_exit_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    module = _load()
    monkeypatch.setattr(module, "_data", lambda *a, **k: (_ for _ in ()).throw(AssertionError("data built")))
    assert module.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["gpu_paper_check: no CUDA device here; nothing to check (run this on a GPU machine)."]


def test_the_script_runs_as_a_program_without_cuda():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--steps", "3"], capture_output=True, text=True,
                          env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        "gpu_paper_check: no CUDA device here; nothing to check (run this on a GPU machine)."]
