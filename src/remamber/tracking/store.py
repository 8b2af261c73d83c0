"""Tracking-store plumbing: URI resolution, a cross-process lock for SQLite stores, retries.

Several Snakemake jobs may log to one SQLite file at once. SQLite serialises writers; MLflow sets a
20 s busy timeout, and on top of that every store call here is retried with jittered exponential
backoff when the error says the database is locked/busy. Operations that must not interleave
(creating the schema of a fresh file, find-or-create of an experiment or a run) run under an
advisory file lock next to the database.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from remamber.errors import RemamberError

T = TypeVar("T")

DEFAULT_DB_NAME = "mlflow.db"
ARTIFACTS_DIR_NAME = "mlartifacts"
_TRANSIENT_MARKERS = ("database is locked", "database table is locked", "database is busy", "sqlite_busy")


class TrackingError(RemamberError, RuntimeError):
    """The tracking store cannot be used (unreachable, invalid, or kept failing)."""


def resolve_tracking_uri(uri: str | None) -> str:
    """Config uri, else env MLFLOW_TRACKING_URI, else ``sqlite:///<cwd>/mlflow.db`` (absolute).

    A relative SQLite path is made absolute against the current directory, so that every process
    of a pipeline (whatever its cwd later) and the artifact root agree on one file.
    """
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    chosen = chosen.strip()
    if not chosen:
        return "sqlite:///" + str(Path.cwd() / DEFAULT_DB_NAME)
    if chosen.startswith("sqlite:///"):
        path = chosen[len("sqlite:///"):]
        if path and not path.startswith("/") and not _is_windows_abs(path):
            return "sqlite:///" + str(Path.cwd() / path)
    if chosen.startswith("file:") or "://" not in chosen:
        raise TrackingError(
            f"tracking URI {chosen!r}: use sqlite:///path/to/mlflow.db or http(s)://host:port "
            "(MLflow 3 no longer supports the ./mlruns file store)"
        )
    return chosen


def _is_windows_abs(path: str) -> bool:
    return len(path) > 2 and path[1] == ":" and path[2] in "/\\"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, None for other stores (or in-memory SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def artifact_root_for(uri: str) -> Path | None:
    """Local artifact root beside a SQLite store (``<db dir>/mlartifacts``).

    MLflow 3.17 would otherwise put a SQLite store's artifacts under ``./mlruns`` of whatever the
    current directory is when an experiment is created; pinning the root beside the db keeps the
    store and its artifacts together. Remote stores choose their own artifact root: None.
    """
    db = sqlite_path(uri)
    return None if db is None else db.parent / ARTIFACTS_DIR_NAME


def is_transient(exc: BaseException) -> bool:
    """True for SQLite lock/busy contention, anywhere in the exception chain."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if any(marker in str(cur).lower() for marker in _TRANSIENT_MARKERS):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def with_retries(
    fn: Callable[[], T],
    what: str,
    uri: str,
    attempts: int = 12,
    base_delay_s: float = 0.05,
    max_delay_s: float = 2.0,
    rng: random.Random | None = None,
) -> T:
    """Call ``fn``; on lock/busy errors retry with full-jitter exponential backoff (bounded).

    Any other error, or a lock that outlasts the attempts, becomes a :class:`TrackingError` naming
    the operation and the URI.
    """
    rng = rng or random.Random()
    for attempt in range(attempts):
        try:
            return fn()
        except TrackingError:
            raise
        except Exception as exc:  # MLflow wraps DB errors in MlflowException; test the message chain
            if not is_transient(exc):
                raise TrackingError(f"MLflow store {uri}: {what} failed: {exc}") from exc
            if attempt == attempts - 1:
                raise TrackingError(
                    f"MLflow store {uri}: {what} still locked after {attempts} attempts: {exc}"
                ) from exc
            time.sleep(rng.uniform(0.0, min(max_delay_s, base_delay_s * 2**attempt)))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Exclusive advisory lock on ``<db>-remamber.lock`` for SQLite stores; a no-op for others.

    POSIX ``flock``; on platforms without fcntl the retries alone have to do.
    """
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock_path = db.with_name(db.name + "-remamber.lock")  # beside SQLite's own <db>-journal
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+b")
    except OSError as exc:
        raise TrackingError(f"MLflow store {uri}: cannot create lock file {lock_path}: {exc}") from exc
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def check_http_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an http(s) store that does not answer ``/health`` (MLflow's own client would
    retry for minutes)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - configured URI
            if response.status != 200:
                raise TrackingError(f"MLflow server {uri} answered {response.status} on /health")
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(f"MLflow server {uri} is unreachable: {exc}") from exc


class _DropLockNoise(logging.Filter):
    """MLflow logs a full traceback for every lock error before raising; we retry those."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_transient(Exception(record.getMessage()))


_QUIETED = False


def quiet_mlflow_logs() -> None:
    """Keep MLflow/alembic INFO chatter (schema migrations, run links) out of pipeline logs."""
    global _QUIETED
    if _QUIETED:
        return
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").addFilter(_DropLockNoise())
    _QUIETED = True
