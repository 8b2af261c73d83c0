"""environment.yml and the workflow's conda envs must ask for what pyproject.toml asks for."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return data["dependencies"], data["optional-dependencies"]


def _pip_section(path: Path) -> list[str]:
    env = yaml.safe_load(path.read_text())
    pips = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, f"{path}: expected one pip section"
    return [r for r in pips[0] if not r.startswith("-e")]


def test_environment_yml_matches_pyproject_runtime_pipeline_and_test_extras():
    deps, extras = _pyproject()
    wanted = sorted(deps + extras["pipeline"] + extras["test"])
    assert sorted(_pip_section(ROOT / "environment.yml")) == wanted


def test_rule_envs_carry_the_runtime_dependencies_and_cuda_env_the_cuda_extra():
    deps, extras = _pyproject()
    assert sorted(_pip_section(ROOT / "workflow/envs/remamber.yaml")) == sorted(deps)
    assert sorted(_pip_section(ROOT / "workflow/envs/remamber-cuda.yaml")) == sorted(deps + extras["cuda"])


def test_torch_is_pinned_everywhere_so_pip_never_swaps_in_another_build():
    deps, _ = _pyproject()
    assert "torch==2.13.0" in deps
    for env in ["environment.yml", "workflow/envs/remamber.yaml", "workflow/envs/remamber-cuda.yaml"]:
        assert "torch==2.13.0" in _pip_section(ROOT / env), env
    banned = {"torchvision", "timm", "open-clip-torch"}
    assert not banned & {_name(r) for r in deps}
