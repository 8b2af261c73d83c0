"""The Snakemake DAG: the paper's matrix plans exactly the jobs of the four tables; configs are validated."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _dry_run(*args: str, cwd: Path = ROOT) -> str:
    out = subprocess.run(
        [*SNAKEMAKE, *args, "-n", "--cores", "1"], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def _job_counts(text: str) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table of a dry run."""
    table = text.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
        if m:
            counts[m.group(1)] = int(m.group(2))
    return counts


def _isolated_checkout(tmp_path: Path) -> Path:
    """The workflow files alone, so a dry run plans from scratch whatever exists in the real checkout."""
    dst = tmp_path / "wf"
    dst.mkdir()
    for name in ["Snakefile", "workflow", "params"]:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst / name)
    return dst


def test_paper_matrix_plans_21_trainings_and_one_evaluation_per_model_and_split(tmp_path):
    wf = _isolated_checkout(tmp_path)
    counts = _job_counts(_dry_run("all", "--configfile", "params/paper.yaml", cwd=wf))
    # Table 1: 4 variants x 3 datasets = 12; Table 3: +4 (twister shared); Table 4: +2; Table 2: 3 at 480.
    assert counts["train"] == 21
    # one evaluation job per model scores all the splits of its dataset
    assert counts["evaluate"] == 21
    assert counts["preprocess"] == 3
    assert counts["fetch"] == 4 and counts["extract"] == 4
    assert counts["table"] == 4
    # Table 1's controls, per dataset: the twister with shuffled text, the text-blind baselines; no training.
    assert counts["evaluate_shuffled_text"] == 3 and counts["baselines"] == 3


def test_demo_matrix_plans_the_same_jobs_on_synthetic_data(tmp_path):
    wf = _isolated_checkout(tmp_path)
    counts = _job_counts(_dry_run("all", cwd=wf))
    assert counts["train"] == 21 and counts["evaluate"] == 21
    assert counts["evaluate_shuffled_text"] == 3 and counts["baselines"] == 3
    assert counts["synth"] == 1 and "fetch" not in counts


def test_slurm_profile_passes_a_dry_run(tmp_path):
    wf = _isolated_checkout(tmp_path)
    counts = _job_counts(_dry_run("all", "--profile", "workflow/profiles/slurm", cwd=wf))
    assert counts["train"] == 21


def test_config_typo_fails_at_start_naming_the_key(tmp_path):
    wf = _isolated_checkout(tmp_path)
    text = (wf / "params/demo.yaml").read_text().replace("  epochs: ", "  epocs: ")
    (wf / "params/bad.yaml").write_text(text)
    out = subprocess.run(
        [*SNAKEMAKE, "-n", "--cores", "1", "--configfile", "params/bad.yaml"],
        cwd=wf, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode != 0
    assert "epocs" in out.stdout + out.stderr
