"""The Snakemake rules with paths that hold spaces (issue 12 item 3): every path in every rule is quoted.

The data rules (synth, preprocess) really run in a checkout whose own folder and whose data, results and
log folders hold spaces; a dry run prints every other rule's command (fetch and extract on the real-data
config, training, evaluation, reports), which must split into the arguments intended.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
SPACED = {"raw": "data/raw zq", "processed": "data/processed zq", "results": "results/res zq"}


def _checkout(tmp_path: Path) -> Path:
    wf = tmp_path / "check out"  # the checkout's own path holds a space too
    wf.mkdir()
    for name in ["Snakefile", "workflow", "params"]:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, wf / name)
    return wf


def _spaced_params(wf: Path, source: str, **data) -> str:
    cfg = yaml.safe_load((wf / "params" / source).read_text())
    cfg["results"] = SPACED["results"]
    cfg["data"].update(raw=SPACED["raw"], processed=SPACED["processed"], **data)
    name = f"params/spaced_{source}"
    (wf / name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return name


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the `remamber` command
    return env


def _snakemake(wf: Path, *args: str, timeout: int = 600) -> str:
    out = subprocess.run([*SNAKEMAKE, *args], cwd=wf, capture_output=True, text=True, timeout=timeout, env=_env())
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout + out.stderr


def _commands(text: str) -> list[list[str]]:
    """The `remamber ...` shell commands a dry run with -p printed, split as the shell would."""
    prefix = "Shell command: "
    return [shlex.split(line.strip()[len(prefix):]) for line in text.splitlines()
            if line.strip().startswith(prefix)]


def _check_tokens(commands: list[list[str]]) -> None:
    assert commands
    for argv in commands:
        for token in argv:
            # a path cut at its space leaves a token that starts with the second half
            assert not token.startswith("zq"), f"path split at its space: {argv}"
        for option in ("--out", "--data-root", "--index-dir", "--dest", "--checkpoint", "--config"):
            if option in argv:
                value = argv[argv.index(option) + 1]
                assert not value.startswith("-"), argv


def test_data_rules_run_with_spaces_in_every_path(tmp_path):
    wf = _checkout(tmp_path)
    cfg = _spaced_params(wf, "demo.yaml", synth_size="tiny")
    _snakemake(wf, "data_all", "--cores", "1", "--configfile", cfg)
    processed = wf / SPACED["processed"]
    datasets = yaml.safe_load((wf / cfg).read_text())["data"]["datasets"]
    for name in datasets:
        meta = json.loads((processed / name / "meta.json").read_text())
        assert meta["dataset"] == name and meta["counts"]
        assert (wf / "logs" / "demo" / "preprocess" / f"{name}.log").is_file()
    assert (wf / SPACED["raw"] / "MANIFEST.json").is_file()
    assert not (wf / "data" / "raw").exists() and not (wf / "zq").exists()  # nothing written at a cut path
    # and every later rule's command keeps its paths whole
    _check_tokens(_commands(_snakemake(wf, "all", "-n", "-p", "--cores", "1", "--configfile", cfg)))


def test_fetch_and_extract_commands_keep_spaced_paths_whole(tmp_path):
    wf = _checkout(tmp_path)
    cfg = _spaced_params(wf, "paper.yaml")
    commands = _commands(_snakemake(wf, "data_all", "-n", "-p", "--cores", "1", "--configfile", cfg))
    _check_tokens(commands)
    fetches = [c for c in commands if c[:2] == ["remamber", "fetch"]]
    assert fetches and all(c[c.index("--dest") + 1] == f"{SPACED['raw']}/archives" for c in fetches)
    preprocesses = [c for c in commands if c[:2] == ["remamber", "preprocess"]]
    assert preprocesses and all(c[c.index("--data-root") + 1] == SPACED["raw"] for c in preprocesses)
    assert all(c[c.index("--expected-counts") + 1] == "params/datasets.yaml" for c in preprocesses)
