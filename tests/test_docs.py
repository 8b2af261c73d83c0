"""The project's documentation stands alone and says what the code does (issue 12 item 16).

Every `remamber` command the README shows parses with the command line as it is now; every document a
docstring, rule or test points to is in the project (they cited a DESIGN.md it never shipped); the
README's parameter count of the demo model is the count of the model `params/demo.yaml` builds (it said
"about 2M"; the model has 17M, most of them MiniLM's).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _fenced_commands(text: str) -> list[str]:
    """`remamber ...` lines of the README's code blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("remamber "):
                commands.append(line)
    return commands


def _inline_commands(text: str) -> list[str]:
    """Inline `remamber ... --option ...` commands (a bare `remamber fetch` is a mention, not a command)."""
    found = (m.group(1).replace("\n", " ") for m in re.finditer(r"`(remamber [^`]+)`", text))
    return [c for c in found if " --" in c]


def _readme_commands() -> list[str]:
    text = README.read_text()
    return _fenced_commands(text) + _inline_commands(text)


def _parse(command: str):
    from remamber.cli import build_parser

    argv = shlex.split(command)
    assert argv[0] == "remamber"
    return build_parser().parse_args(argv[1:])


def test_readme_shows_the_steps_by_hand():
    commands = _readme_commands()
    shown = {_parse(c).command for c in commands}
    # data, train (and resume), evaluate, baselines, predict on one's own image, real-data download
    assert {"synth", "preprocess", "train", "evaluate", "baseline", "predict", "fetch", "extract"} <= shown
    assert any(c.command == "train" and c.resume for c in map(_parse, commands))


@pytest.mark.parametrize("command", _readme_commands())
def test_readme_commands_parse(command, capsys):
    try:
        args = _parse(command)
    except SystemExit:
        pytest.fail(f"README command does not parse: {command}\n{capsys.readouterr().err}")
    assert args.command and args.func


def _doc_references() -> dict[str, list[str]]:
    """Documents (*.md) named in the code, rules, params and tests: name -> files naming it."""
    refs: dict[str, list[str]] = {}
    files = [*ROOT.glob("src/**/*.py"), *ROOT.glob("workflow/**/*.smk"), *ROOT.glob("tests/*.py"),
             *ROOT.glob("params/*.yaml"), ROOT / "Snakefile", README, *ROOT.glob("docs/*.md")]
    for path in files:
        if path.resolve() == Path(__file__).resolve():  # this file names the missing one on purpose
            continue
        for name in re.findall(r"(?<![\w/.-])([\w./-]+\.md)\b", path.read_text(encoding="utf-8")):
            refs.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return refs


def test_every_document_named_is_in_the_project():
    refs = _doc_references()
    assert "docs/design.md" in refs  # the design notes are referenced, so this check is not vacuous
    missing = {name: where for name, where in refs.items()
               if not (ROOT / name).is_file() and not (ROOT / "docs" / name).is_file()}
    assert not missing, f"documents named but not in the project: {missing}"


def test_readme_parameter_count_of_the_demo_model():
    import torch

    from remamber.config import ExperimentConfig
    from remamber.engine.jobs import model_config
    from remamber.models import build_model

    match = re.search(r"demo twister \((\d+\.\d\d)M parameters,\s+(\d+\.\d\d)M of them MiniLM\)",
                      README.read_text())
    assert match, "the README no longer states the demo model's parameter count"
    total, text = (float(g) for g in match.groups())
    cfg = ExperimentConfig.from_yaml(ROOT / "params" / "demo.yaml")
    torch.manual_seed(0)
    model = build_model(model_config(cfg, "twister"))
    n_total = sum(p.numel() for p in model.parameters())
    n_text = sum(p.numel() for p in model.text_encoder.parameters())
    assert round(n_total / 1e6, 2) == total, n_total
    assert round(n_text / 1e6, 2) == text, n_text
    assert "about 2M parameters" not in README.read_text()
