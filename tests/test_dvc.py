"""DVC for both configurations: the demo's pipeline (dvc.yaml) and the paper's (dvc/paper/dvc.yaml) are
one pipeline over two params files; each stage depends on all the code it runs; `dvc push` / `dvc pull`
round-trip data and checkpoints through a remote, and after a pull nothing already trained is trained again.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "remamber"
DEMO_PIPELINE = ROOT / "dvc.yaml"
PAPER_PIPELINE = ROOT / "dvc" / "paper" / "dvc.yaml"
BIN = Path(sys.executable).parent


def _stages(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["stages"]


def _vars(path: Path) -> dict:
    out = {}
    for item in yaml.safe_load(path.read_text())["vars"]:
        if isinstance(item, dict):
            out.update(item)
    return out


def test_paper_pipeline_mirrors_the_demo_pipeline():
    """Same stages, deps, params and outputs (paths from the params file); only the params file, the reports
    folder and the working directory differ."""
    demo, paper = _stages(DEMO_PIPELINE), _stages(PAPER_PIPELINE)
    assert list(demo) == list(paper) == ["data", "models", "evaluate", "reports"]
    pretrained = yaml.safe_load((ROOT / "params/paper.yaml").read_text())["model"]["pretrained_backbone"]
    assert Path(pretrained).parent.as_posix() == "data/pretrained"
    paper["models"]["deps"].remove("data/pretrained")  # the paper's ImageNet backbone (the demo has none)
    for name in demo:
        assert paper[name].pop("wdir") == "../..", name  # paths relative to the project root
        assert paper[name] == demo[name], name
    dv, pv = _vars(DEMO_PIPELINE), _vars(PAPER_PIPELINE)
    assert (dv["CONFIG"], dv["REPORTS"], pv["CONFIG"], pv["REPORTS"]) == (
        "params/demo.yaml", "reports", "params/paper.yaml", "reports/paper")
    assert pv["SMK"] == dv["SMK"].replace("params/demo.yaml", "params/paper.yaml --config reports=reports/paper")
    for path, cfg in ((DEMO_PIPELINE, "params/demo.yaml"), (PAPER_PIPELINE, "../../params/paper.yaml")):
        assert f"{cfg}:results,data" in yaml.safe_load(path.read_text())["vars"]


# --------------------------------------------------------------------------- the code each stage runs


def _module_file(module: str) -> Path | None:
    path = PACKAGE.parent.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _imports_of(nodes: list[ast.AST], module: str, is_package: bool) -> set[str]:
    out: set[str] = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out |= {name} | {f"{name}.{a.name}" for a in node.names}
    return {n for n in out if n == "remamber" or n.startswith("remamber.")}


def _closure(modules: set[str]) -> set[Path]:
    """Every file of the package that importing `modules` runs (parent packages included)."""
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            path = _module_file(name)
            if path is None or path in seen:
                continue
            seen.add(path)
            tree = ast.parse(path.read_text(encoding="utf-8"))
            todo += _imports_of([tree], name, path.name == "__init__.py")
    return seen


def _cli_entries(subcommands: set[str]) -> set[str]:
    """What `remamber <subcommand>` imports: cli's module level and helpers, and the command functions."""
    tree = ast.parse((PACKAGE / "cli.py").read_text(encoding="utf-8"))
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    commands = {name for name in functions if name.startswith("cmd_")}
    missing = {f"cmd_{s}" for s in subcommands} - commands
    assert not missing, f"rules call subcommands cli.py does not define: {missing}"
    module_level = [n for n in tree.body if not isinstance(n, ast.FunctionDef)]
    helpers = [f for name, f in functions.items() if name not in commands]
    used = [functions[f"cmd_{s}"] for s in subcommands]
    return {"remamber.config"} | _imports_of(module_level + helpers + used, "remamber.cli", False)


def _subcommands(rule_file: Path) -> set[str]:
    text = rule_file.read_text(encoding="utf-8")
    return set(re.findall(r"(?:remamber|\{params\.launch\})(?: --threads \{threads\})? ([a-z]+)\b", text))


@pytest.mark.parametrize("pipeline", [DEMO_PIPELINE, PAPER_PIPELINE], ids=["demo", "paper"])
def test_stage_deps_cover_all_the_code_each_stage_runs(pipeline):
    """Derived from the rules each stage runs (their `remamber` subcommands) and the imports of those
    commands, followed through the package with `ast` (common.smk reads remamber.config in every stage)."""
    for name, stage in _stages(pipeline).items():
        deps = [ROOT / d for d in stage["deps"] if not d.startswith("${")]
        rules = [d for d in deps if d.suffix == ".smk" and d.name != "common.smk"]
        assert rules and {ROOT / "Snakefile", ROOT / "workflow/rules/common.smk"} <= set(deps), name
        subcommands = set().union(*(_subcommands(r) for r in rules))
        assert subcommands, f"{name}: no remamber command found in {rules}"
        needed = _closure(_cli_entries(subcommands)) | {PACKAGE / "cli.py"}
        uncovered = sorted(str(p.relative_to(ROOT)) for p in needed
                           if not any(p == d or d in p.parents for d in deps))
        assert not uncovered, f"{pipeline.name}: stage {name} runs {uncovered} but does not depend on them"


def test_stage_dep_checker_sees_a_missing_dep():
    needed = _closure(_cli_entries({"train"}))
    assert PACKAGE / "tracking" / "tracker.py" in needed and PACKAGE / "ops" / "selective_scan.py" in needed
    assert PACKAGE / "reports" / "tables.py" not in needed


def test_demo_and_paper_outputs_do_not_collide():
    """DVC refuses two stages with one output (or one inside another): list both pipelines at once."""
    out = subprocess.run([str(BIN / "dvc"), "stage", "list", "--all"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "dvc/paper/dvc.yaml:models" in out.stdout and "reports/paper/table1.tex" in out.stdout


# --------------------------------------------------------------------------- push / pull round trip


def _tiny_paper_config() -> dict:
    """A tiny stand-in for params/paper.yaml: synthetic data, test-sized model, 2 trainings (the twister
    shared by the four tables, the attention variant for Table 1 and the figures)."""
    cfg = yaml.safe_load((ROOT / "params/demo.yaml").read_text())
    cfg["name"] = "tinypaper"
    cfg["results"] = "results/tinypaper"
    cfg["data"].update(raw="data/tinypaper-raw", processed="data/tinypaper-processed", synth_size="tiny")
    cfg["data"]["datasets"] = {"refcoco": {"split_by": "unc", "splits": ["val", "testA", "testB"]}}
    cfg["model"].update(backbone="vmamba_tiny_test", text_encoder="tiny-random-bert")
    cfg["train"].update(epochs=1, global_batch_size=4, per_device_batch_size=4, val_subset=8)
    cfg["evaluate"].update(batch_size=8)
    low = {"resolution": "low", "datasets": ["refcoco"]}
    cfg["experiments"] = {"resolutions": {"low": 32, "high": 32}, "tables": {
        "table1": {**low, "variants": ["attention", "twister"]},
        "table2": {"resolution": "high", "datasets": ["refcoco"], "variants": ["twister"]},
        "table3": {**low, "variants": ["twister"]},
        "table4": {**low, "variants": ["twister"]}}}
    return cfg


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 1200) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((cwd / "logs").rglob("*.log"))) if out.returncode else ""
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}\n{logs}"
    return out.stdout + out.stderr


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_paper_pipeline_push_pull_round_trip_retrains_nothing(tmp_path):
    wd = tmp_path / "checkout"
    wd.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for item in ["Snakefile", "workflow", "params", "src", "dvc", "dvc.yaml", ".dvcignore"]:
        src = ROOT / item
        (shutil.copytree(src, wd / item, ignore=ignore) if src.is_dir() else shutil.copy(src, wd / item))
    (wd / "params/paper.yaml").write_text(yaml.safe_dump(_tiny_paper_config(), sort_keys=False))
    (wd / "data/pretrained").mkdir(parents=True)  # the ImageNet backbone's folder (unused by the tiny model)
    (wd / "data/pretrained/README").write_text("vssm_base_0229_ckpt_epoch_237.pth goes here\n")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", MPLBACKEND="Agg",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", DVC_NO_ANALYTICS="1")
    dvc = [str(BIN / "dvc")]
    _run(dvc + ["init", "--no-scm", "-q"], wd, env)
    _run(dvc + ["remote", "add", "-d", "store", str(tmp_path / "remote")], wd, env)

    ran = _run(dvc + ["repro", "dvc/paper/dvc.yaml"], wd, env)
    for stage in ("data", "models", "evaluate", "reports"):
        assert f"Running stage 'dvc/paper/dvc.yaml:{stage}'" in ran
    models = wd / "results/tinypaper/models"
    assert sorted(p.relative_to(models).as_posix() for p in models.rglob("best.pt")) == [
        "refcoco/attention/32/best.pt", "refcoco/twister/32/best.pt"]
    assert (wd / "reports/paper/table1.tex").is_file() and (wd / "reports/paper/metrics.json").is_file()
    assert not (wd / "reports/table1.tex").exists()  # the demo's reports are not touched
    trained = _files(models)
    reports = _files(wd / "reports/paper")
    _run(dvc + ["push", "dvc/paper/dvc.yaml"], wd, env)

    # Another machine: the same checkout without outputs, DVC cache or Snakemake metadata.
    for gone in ["data/tinypaper-raw", "data/tinypaper-processed", "results", "reports", ".dvc/cache", ".snakemake",
                 "logs"]:
        shutil.rmtree(wd / gone, ignore_errors=True)
    _run(dvc + ["pull", "dvc/paper/dvc.yaml"], wd, env)
    assert _files(models) == trained and _files(wd / "reports/paper") == reports

    assert "up to date" in _run(dvc + ["status", "dvc/paper/dvc.yaml"], wd, env)
    dry = _run(dvc + ["repro", "--dry", "dvc/paper/dvc.yaml"], wd, env)
    assert "Running stage" not in dry, dry
    # Even a stage forced to run finds nothing to train: Snakemake ignores the fresh mtimes of the pull.
    forced = _run(dvc + ["repro", "--force", "--single-item", "dvc/paper/dvc.yaml:models"], wd, env)
    assert "Running stage 'dvc/paper/dvc.yaml:models'" in forced
    assert not (wd / "logs/tinypaper/train").exists(), "a model was trained again after the pull"
    assert _files(models) == trained
