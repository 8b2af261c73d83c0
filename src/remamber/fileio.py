"""Atomic writes, one helper for the whole package: write a temporary file beside the target, then
`os.replace` it into place, so a reader never sees a half-written file.

The temporary file honours the umask: `tempfile.mkstemp` creates files readable by their owner only (0600)
whatever the umask, so a file renamed into place from it stays owner-only and a lab's shared data folder
becomes unreadable to colleagues. `temp_file_beside` opens a fresh, exclusive file with mode 0o666 left to
the umask, as `open()` does. (Checkpoints have their own writer in `engine/checkpoint.py`: fsync, SIGTERM
held back, and a pid-named temporary that a restarted training recognises and removes.)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO


def temp_file_beside(path: str | os.PathLike, suffix: str = ".tmp") -> tuple[int, Path]:
    """Create `.<name>.<random><suffix>` in `path`'s folder (which must exist) and return `(fd, tmp)`,
    open for binary writing. The caller renames it over `path` (same file system: atomic) or removes it."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: could not create a temporary file beside {path.name}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary binary file beside `path`; on clean exit it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target` for a writer that wants a file name (pandas, matplotlib);
    on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(target, ".tmp" + target.suffix)  # the suffix tells writers the format
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Deterministic JSON (sorted keys, two-space indent, trailing newline), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """`writer(tmp_path)` writes the content; the result is moved into place atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
