"""A manifest of every file below a data folder: written last, so its presence means the folder is whole.

`MANIFEST.json` lists each file's relative path, size and sha256; `verify_manifest` re-hashes them. Its own
sha256 is a stable content hash of the whole folder (used as the data hash of synthetic raw data).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST_NAME = "MANIFEST.json"


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(root: str | os.PathLike, name: str = MANIFEST_NAME) -> Path:
    """Hash every regular file below `root` (except the manifest itself) into `root/name`, atomically."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data folder to list in a manifest")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != name and not p.name.endswith(".tmp"))
    entries = [
        {"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": _sha256(p)} for p in files
    ]
    out = root / name
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"files": entries}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out)
    return out


def verify_manifest(root: str | os.PathLike, name: str = MANIFEST_NAME) -> list[str]:
    """Return the problems found (missing files, size or checksum mismatches); empty when all is well."""
    root = Path(root)
    manifest = root / name
    if not manifest.is_file():
        return [f"{manifest}: missing (the folder was never completed)"]
    problems = []
    for entry in json.loads(manifest.read_text())["files"]:
        path = root / entry["path"]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            problems.append(f"{path}: differs from {manifest}")
    return problems
