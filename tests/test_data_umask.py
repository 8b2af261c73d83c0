"""Every atomic writer of the project leaves files with mode 0o666 & ~umask and folders with 0o777 & ~umask
(issue 12 item 4: mkstemp made them 0600, unreadable to the colleagues sharing a data folder)."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _writers():
    """name -> function(folder) that writes one file through a project writer and returns its path."""
    from remamber.fileio import atomic_write_bytes, atomic_write_json
    from remamber.data.fetch import extract
    from remamber.data.manifest import write_manifest
    from remamber.engine import checkpoint, evaluate, inspect, predict
    from remamber import fileio as reports_io

    def extracted(d: Path) -> Path:
        archive = d / "a.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("inner/file.txt", "x")
        extract(archive, d / "out", progress=False)
        return d / "out" / "inner" / "file.txt"

    def manifest(d: Path) -> Path:
        (d / "m").mkdir()
        (d / "m" / "f").write_bytes(b"1")
        return write_manifest(d / "m")

    def synthetic(d: Path) -> Path:
        from remamber.data.synth import write_synthetic
        write_synthetic(d / "raw", seed=0, size="tiny", progress=False)
        return d / "raw" / "refcoco" / "instances.json"

    return {
        "synthetic data (images, pickles, instances)": synthetic,
        "data atomic_write_json (meta.json, markers)": lambda d: (atomic_write_json(d / "meta.json", {"a": 1}),
                                                                 d / "meta.json")[1],
        "data atomic_write_bytes (indices, images)": lambda d: (atomic_write_bytes(d / "x.parquet", b"1"),
                                                               d / "x.parquet")[1],
        "reports write_text_atomic (tables)": lambda d: (reports_io.atomic_write_text(d / "t.tex", "x"), d / "t.tex")[1],
        "reports write_with (figures)": lambda d: (reports_io.atomic_write_with(d / "f.png", lambda p: p.write_bytes(b"1")),
                                                   d / "f.png")[1],
        "engine atomic_torch_save (checkpoints)": lambda d: (checkpoint.atomic_torch_save({"a": 1}, d / "c.pt"),
                                                             d / "c.pt")[1],
        "engine inspect npz": lambda d: (inspect._write_npz_atomic(d / "i.npz", {"a": np.zeros(2)}), d / "i.npz")[1],
        "engine predict png": lambda d: (predict._save_png_atomic(Image.new("RGB", (2, 2)), d / "p.png"),
                                         d / "p.png")[1],
        "fetch extract": extracted,
        "manifest": manifest,
    }


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_atomic_writers_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        wrong = {}
        for i, (name, write) in enumerate(_writers().items()):
            folder = tmp_path / f"w{i}"
            folder.mkdir()
            path = write(folder)
            assert path.is_file(), name
            for f in [p for p in folder.rglob("*") if p.is_file()]:  # every file it wrote, not just one
                if _mode(f) != 0o666 & ~umask:
                    wrong[f"{name}: {f.relative_to(folder)}"] = oct(_mode(f))
            leftovers = [p.name for p in folder.rglob(".*") if p.is_file() and not p.name.endswith(".extracted")]
            assert not leftovers, f"{name} left {leftovers}"
        assert not wrong, f"expected {oct(0o666 & ~umask)} under umask {oct(umask)}, got {wrong}"
        # folders an atomic writer creates for its file
        from remamber.fileio import atomic_write_json
        atomic_write_json(tmp_path / "new" / "deep" / "meta.json", {})
        assert _mode(tmp_path / "new") == _mode(tmp_path / "new" / "deep") == 0o777 & ~umask
    finally:
        os.umask(old)


def test_temporary_names_are_unique_and_exclusive(tmp_path):
    from remamber.fileio import temp_file_beside

    target = tmp_path / "x.json"
    made = set()
    for _ in range(20):
        fd, tmp = temp_file_beside(target)
        os.close(fd)
        assert tmp.parent == tmp_path and tmp.name.startswith(".x.json.") and tmp.name.endswith(".tmp")
        made.add(tmp)
    assert len(made) == 20
