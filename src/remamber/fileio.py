"""Temporary files for atomic writes that honour the umask.

`tempfile.mkstemp` creates files readable by their owner only (0600) whatever the umask, so a file
renamed into place from it stays owner-only: a lab's shared data folder becomes unreadable to colleagues.
`temp_file_beside` opens a fresh, exclusive file with mode 0o666 left to the umask, as `open()` does.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


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
