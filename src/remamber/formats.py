"""On-disk formats that several layers read, with no torch import (ground floor).

- metrics files: one evaluation record (a JSON object) or a list of them (one model's splits, one
  baseline job's splits x baselines); `read_metrics_records` flattens either.
- inspection dumps (`remamber inspect`): a NumPy .npz of plain arrays, read without unpickling.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from remamber.errors import RemamberError

__all__ = ["FormatError", "read_metrics_records", "load_inspection"]


class FormatError(RemamberError, ValueError):
    """A file that is not in the format its reader expects; the message names the file."""


def read_metrics_records(paths: list[str | os.PathLike]) -> list[dict]:
    """The evaluation records of metrics JSON files, in file order."""
    records: list[dict] = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise FormatError(f"{path}: not a readable metrics JSON ({exc})") from exc
        items = data if isinstance(data, list) else [data]
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise FormatError(f"{path}: item {i} is a {type(item).__name__}, not an evaluation record")
        records.extend(items)
    return records


def load_inspection(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an inspection dump back (never unpickles: ``allow_pickle=False``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: inspection file not found (run `remamber inspect`)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (ValueError, OSError) as exc:
        raise FormatError(f"{path}: not a readable inspection .npz ({exc})") from exc
