"""A manifest of a data folder: every file's relative path, size and sha256, written last and atomically,
so its presence marks a complete folder (the Snakemake output of `remamber synth`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from remamber.data._io import atomic_write_json

MANIFEST = "MANIFEST.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or rel == MANIFEST or path.name.endswith((".tmp", ".part")):
            continue
        out[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return out


def write_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Write `root/MANIFEST.json` ({"files": {relpath: {size, sha256}}}, sorted); returns it."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    manifest = {"files": _files(root)}
    atomic_write_json(root / MANIFEST, manifest)
    return manifest


def verify_manifest(root: str | os.PathLike) -> None:
    """Raise ValueError naming every file that is missing, extra or changed relative to the manifest."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    expected = json.loads(path.read_text(encoding="utf-8"))["files"]
    found = _files(root)
    problems = [f"missing {k}" for k in sorted(expected.keys() - found.keys())]
    problems += [f"unexpected {k}" for k in sorted(found.keys() - expected.keys())]
    problems += [f"changed {k}" for k in sorted(expected.keys() & found.keys()) if expected[k] != found[k]]
    if problems:
        raise ValueError(f"{path}: folder does not match its manifest: " + "; ".join(problems[:20]))
