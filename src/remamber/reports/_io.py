"""Atomic writes: a temporary file in the target folder, then ``os.replace``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from remamber.fileio import temp_file_beside


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``, on error it is
    removed, so a reader never sees a half-written file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(target, ".tmp" + target.suffix)  # honours the umask (mkstemp: 0600)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_with(target: str | Path, writer: Callable[[Path], None]) -> None:
    """``writer(tmp_path)`` writes the content; the result is moved into place atomically."""
    with atomic_path(target) as tmp:
        writer(tmp)
