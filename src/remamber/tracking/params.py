"""Flatten a nested config into MLflow params (dotted keys, string values)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

# MLflow's limits (mlflow.utils.validation): longer values are refused or truncated by the store.
MAX_PARAM_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
# MLflow param names allow alphanumerics and `_-. :/` only; dataset names such as "refcoco+" do not fit.
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")


def _safe_key(key: str) -> str:
    """`refcoco+` -> `refcoco_plus`; any other character MLflow refuses becomes `_`."""
    return _UNSAFE_KEY_CHARS.sub("_", key.replace("+", "_plus"))


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, int, float, list, tuple)):
        # JSON keeps null/true/false and lists unambiguous and parseable.
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return str(value)


def flatten_params(nested: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-3}, "name": "demo"}`` -> ``{"train.lr": "0.001", "name": "demo"}``.

    Mappings recurse with "." joined keys (an empty mapping becomes ``"{}"``); lists, None and bools
    are JSON-encoded. Keys come out sorted so logging order is stable. A key or value longer than
    MLflow accepts is an error naming the key (values are never silently truncated). Characters MLflow
    refuses in names are replaced (`refcoco+` -> `refcoco_plus`).
    """
    if not isinstance(nested, Mapping):
        raise TypeError(f"flatten_params expects a mapping, got {type(nested).__name__}")
    flat: dict[str, str] = {}
    for key in nested:
        if not isinstance(key, str):
            raise TypeError(f"param key {key!r} under {prefix or '<root>'!r} is not a string")
        full_key = f"{prefix}.{_safe_key(key)}" if prefix else _safe_key(key)
        value = nested[key]
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, full_key))
            continue
        text = "{}" if isinstance(value, Mapping) else _format_value(value)
        if len(full_key) > MAX_PARAM_KEY_LENGTH:
            raise ValueError(f"param key {full_key!r} is longer than {MAX_PARAM_KEY_LENGTH} characters")
        if len(text) > MAX_PARAM_VALUE_LENGTH:
            raise ValueError(
                f"param {full_key!r}: value of {len(text)} characters exceeds MLflow's "
                f"{MAX_PARAM_VALUE_LENGTH}"
            )
        flat[full_key] = text
    return dict(sorted(flat.items()))
