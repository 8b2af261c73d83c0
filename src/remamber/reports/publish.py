"""Publish a rendered report file into the top-level `reports/` folder that users (and git) see.

The pipeline renders into `<results>/reports/` and copies each file here as its last step, so a fresh
clone, whose `reports/` already holds the committed demo outputs, still runs the whole DAG: the copy is
stale as soon as its rendered source is (re)made.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from remamber.reports._io import write_with


def publish(src: str | Path, dst: str | Path) -> Path:
    """Copy `src` to `dst` atomically (a reader never sees a half-copied file); returns `dst`."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no rendered report to publish")
    write_with(dst, lambda tmp: shutil.copyfile(src, tmp))
    return dst
