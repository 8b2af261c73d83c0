import subprocess
import sys

from remamber import __version__
from remamber.cli import main


def test_version_flag_prints_package_version():
    out = subprocess.run(
        [sys.executable, "-m", "remamber.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"remamber {__version__}"


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: remamber" in capsys.readouterr().out


# --- issue 12 item 6: the project's errors reach the user as one line, exit status 2 ------------------

import os  # noqa: E402
import pickle  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


class _Evil:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def _error_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """command line -> the start of the message it must print (one case per kind of project error)."""
    (tmp_path / "evil" / "refcoco").mkdir(parents=True)
    (tmp_path / "evil" / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([_Evil()], protocol=2))
    (tmp_path / "bad.yaml").write_text("name: x\nepocs: 3\n")
    (tmp_path / "datasets.yaml").write_text("archives: {}\ndatasets: {}\n")
    return {
        "malformed annotation": (["preprocess", "--data-root", str(tmp_path / "none"), "--dataset", "refcoco",
                                  "--out", str(tmp_path / "idx")], f"{tmp_path / 'none' / 'refcoco'}"),
        "unsafe pickle": (["preprocess", "--data-root", str(tmp_path / "evil"), "--dataset", "refcoco",
                           "--out", str(tmp_path / "idx")], f"{tmp_path / 'evil' / 'refcoco' / 'refs(unc).p'}: "
                                                              f"refusing to load global"),
        "split_by": (["preprocess", "--data-root", str(tmp_path), "--dataset", "toy", "--out",
                      str(tmp_path / "idx")], "no default split_by for dataset 'toy'"),
        "config": (["plan", "--config", str(tmp_path / "bad.yaml")], f"{tmp_path / 'bad.yaml'}"),
        "catalog": (["fetch", "refcoco", "--dest", str(tmp_path), "--datasets-yaml", str(tmp_path / "datasets.yaml")],
                    f"{tmp_path / 'datasets.yaml'}: unknown archive 'refcoco'"),
        "missing file": (["summarize", str(tmp_path / "nope.json"), "--out", str(tmp_path / "m.json")],
                         f"{tmp_path / 'nope.json'}: not a readable metrics JSON"),
    }


@pytest.mark.parametrize("case", ["malformed annotation", "unsafe pickle", "split_by", "config", "catalog",
                                  "missing file"])
def test_project_errors_are_one_line_with_exit_status_2(tmp_path, capsys, monkeypatch, case):
    monkeypatch.delenv("REMAMBER_DEBUG", raising=False)
    argv, start = _error_cases(tmp_path)[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"remamber: error: {start}"), err
    assert "Traceback" not in err
    if case == "split_by":
        assert "pass --split-by" in err


def test_debug_flag_or_environment_shows_the_traceback(tmp_path, capsys, monkeypatch):
    argv, start = _error_cases(tmp_path)["unsafe pickle"]
    monkeypatch.delenv("REMAMBER_DEBUG", raising=False)
    for args in (["--debug", *argv], [*argv, "--debug"]):  # before or after the subcommand
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "UnsafePickleError" in err
        assert err.rstrip().splitlines()[-1].startswith(f"remamber: error: {start}")
    monkeypatch.setenv("REMAMBER_DEBUG", "1")
    assert main(argv) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.setenv("REMAMBER_DEBUG", "0")
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_command_line_subprocess_prints_only_the_message(tmp_path):
    argv, start = _error_cases(tmp_path)["unsafe pickle"]
    env = {k: v for k, v in os.environ.items() if k != "REMAMBER_DEBUG"}
    out = subprocess.run([sys.executable, "-m", "remamber.cli", *argv], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [out.stderr.strip()]  # exactly one line
    assert out.stderr.startswith(f"remamber: error: {start}")


def test_a_bug_still_shows_its_traceback(monkeypatch, capsys):
    import remamber.cli as cli

    def boom(args):
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(cli, "cmd_plan", boom)
    with pytest.raises(ZeroDivisionError):
        main(["plan", "--config", "x.yaml"])


@pytest.mark.parametrize("argv, fragment", [
    (["evaluate", "--checkpoint", "c.pt", "--split", "val", "--out", "o", "--batch-size", "0"],
     "--batch-size: must be at least 1, got 0"),
    (["evaluate", "--checkpoint", "c.pt", "--split", "val", "--out", "o", "--batch-size", "-3"],
     "--batch-size: must be at least 1, got -3"),
    (["evaluate", "--checkpoint", "c.pt", "--split", "../../x", "--out", "o"],
     "--split: split '../../x' is not a plain split name"),
    (["inspect", "--checkpoint", "c.pt", "--split", "val/../train", "--out", "o"],
     "--split: split 'val/../train' is not a plain split name"),
    (["evaluate", "--checkpoint", "c.pt", "--split", "val", "--out", "o", "--num-workers", "-1"],
     "--num-workers: must be 0 or more"),
    (["--threads", "0", "plan", "--config", "x.yaml"], "--threads: must be at least 1, got 0"),
])
def test_bad_option_values_are_refused(capsys, argv, fragment):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


def _tiny_refer(tmp_path):
    """tmp_path/raw: one image, one ref of dataset 'toy', an object with a 2-point polygon part."""
    import json

    from PIL import Image

    ddir = tmp_path / "raw" / "toy"
    ddir.mkdir(parents=True)
    (tmp_path / "raw" / "train2014").mkdir()
    Image.new("RGB", (8, 6)).save(tmp_path / "raw" / "train2014" / "a.jpg")
    refs = [{"ref_id": 1, "ann_id": 2, "image_id": 3, "category_id": 1, "split": "train",
             "sentences": [{"raw": "the box", "sent_id": 0}]}]
    (ddir / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (ddir / "instances.json").write_text(json.dumps({
        "images": [{"id": 3, "file_name": "a.jpg", "height": 6, "width": 8}],
        "annotations": [{"id": 2, "image_id": 3, "bbox": [0, 0, 2, 2],
                         "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4], [1, 1, 2, 2]]}],
        "categories": [{"id": 1}]}))


def test_layer_warnings_reach_the_user_as_one_line_each(tmp_path):
    """preprocess's warning (no expected counts) is printed by the command, prefixed, one line."""
    _tiny_refer(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "REMAMBER_DEBUG"}
    out = subprocess.run([sys.executable, "-m", "remamber.cli", "preprocess", "--data-root", str(tmp_path / "raw"),
                          "--dataset", "toy", "--split-by", "unc", "--out", str(tmp_path / "idx")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("remamber: WARNING: ")]
    assert any("skipped 1 polygon(s) of fewer than 3 points in 1 object(s)" in line for line in lines), out.stderr
    assert any("no expected counts given" in line for line in lines), out.stderr


def test_unknown_synthetic_size_is_one_line(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "s"), "--size", "huge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("remamber: error: --size: unknown synthetic size 'huge'; choose one of tiny, demo")
    assert not (tmp_path / "s").exists()


def test_count_mismatch_is_the_message_without_traceback(tmp_path, capsys, monkeypatch):
    """Issue 12 item 6: counts that differ from the published ones reach the user as the message alone
    (one line per difference), exit status 2 (the checksum error's twin is in test_data_fetch.py)."""
    import hashlib

    import yaml

    monkeypatch.delenv("REMAMBER_DEBUG", raising=False)
    _tiny_refer(tmp_path)
    catalog = {"archives": {"blob": {"filename": "blob.zip", "urls": ["https://example.org/blob.zip"],
                                     "size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}},
               "datasets": {"toy": {"archives": ["blob"], "split_by": "unc",
                                    "counts": {"train": {"objects": 1, "images": 1, "sentences": 2}}}}}
    (tmp_path / "datasets.yaml").write_text(yaml.safe_dump(catalog))
    assert main(["preprocess", "--data-root", str(tmp_path / "raw"), "--dataset", "toy", "--split-by", "unc",
                 "--expected-counts", str(tmp_path / "datasets.yaml"), "--out", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err
    assert "\nremamber: error: toy (unc) in " in err and "counts do not match" in err, err  # after the bar
    assert "train sentences: expected 2, found 1" in err and "Traceback" not in err
    assert not (tmp_path / "idx" / "meta.json").exists()

