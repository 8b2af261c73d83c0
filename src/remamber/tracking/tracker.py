"""MLflow tracking conventions: one experiment per table, one run per trained model (keyed by a
stable ``run_key`` so a rerun reuses its run), one nested run per evaluated split.

Everything goes through :class:`mlflow.MlflowClient` with explicit run ids (never the fluent global
active-run state), so several handles in one process and several processes on one store stay apart.
"""

from __future__ import annotations

import abc
import contextlib
import io
import math
import re
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, TypeVar

from remamber.tracking.config import TrackingConfig
from remamber.tracking.params import flatten_params
from remamber.tracking.store import (
    TrackingError,
    artifact_root_for,
    check_http_reachable,
    quiet_mlflow_logs,
    resolve_tracking_uri,
    store_lock,
    with_retries,
)

T = TypeVar("T")

RUN_KEY_TAG = "remamber.run_key"
SUPERSEDED_TAG = "remamber.superseded_run_key"
PARENT_TAG = "mlflow.parentRunId"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
# Marks an experiment as model training, so the MLflow 3 UI opens it on its runs, not the GenAI traces view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# run keys end up inside a search filter string: keep them to characters that need no quoting.
_RUN_KEY_RE = re.compile(r"^[A-Za-z0-9_.:/@=+\-]+$")
_BATCH_PARAMS = 100  # MLflow's per-batch limits for params/tags and metrics
_BATCH_METRICS = 1000


class TrackingWarning(UserWarning):
    """Tracking failed and was switched off (``on_error: warn``)."""


class Terminated(SystemExit):
    """SIGTERM (what Slurm, Snakemake and `kill` send) turned into an exception inside an open run, so the
    run ends as KILLED; the process still exits with 128 + 15 like an unhandled SIGTERM."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


_SIGTERM_RECEIVED = threading.Event()


def _raise_terminated(signum: int, frame: Any) -> None:
    _SIGTERM_RECEIVED.set()
    raise Terminated()


def _package_dir() -> Path:
    return Path(__file__).resolve().parents[1]


def git_commit(cwd: str | Path | None = None) -> tuple[str, bool] | None:
    """(HEAD commit, dirty?) of the git checkout the remamber package was loaded from (or of ``cwd``),
    or None when the package is not a tracked part of a checkout (e.g. installed into site-packages: a
    venv inside some other checkout must not lend that checkout's commit)."""
    if cwd is None:
        package = _package_dir()
        try:
            subprocess.run(["git", "ls-files", "--error-unmatch", "__init__.py"], cwd=package,
                           capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        cwd = package
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return (head, bool(status.strip())) if head else None


def _check_run_key(name: str, value: str) -> None:
    if not isinstance(value, str) or not _RUN_KEY_RE.match(value):
        raise ValueError(
            f"{name} {value!r} must be a non-empty string of letters, digits and _ . : / @ = + -"
        )


def _quiet_call(fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn`` with stdout captured: MLflow prints emoji "View run ... at" banners to stdout when
    ending runs on a server store, which would clutter every pipeline log."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _string_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (tags or {}).items()}


class _Handle(abc.ABC):
    """Shared API of live and no-op run handles."""

    run_id: str | None = None
    _previous_sigterm: Any = None

    def __enter__(self) -> "_Handle":
        # SIGTERM would end the process without unwinding: the run would stay RUNNING for good.
        if threading.current_thread() is threading.main_thread():
            _SIGTERM_RECEIVED.clear()
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        if exc_type is None:
            self.end("FINISHED")
            return
        # The Terminated raised in the handler may have been replaced on its way up (an error raised by
        # the library code it interrupted, e.g. a half-written file being closed): the flag still tells.
        killed = issubclass(exc_type, (Terminated, KeyboardInterrupt)) or _SIGTERM_RECEIVED.is_set()
        status = "KILLED" if killed else "FAILED"
        try:
            self.end(status)
        except TrackingError as end_exc:  # never mask the exception that is already propagating
            warnings.warn(f"could not mark run {status}: {end_exc}", TrackingWarning, stacklevel=2)
        if _SIGTERM_RECEIVED.is_set() and not issubclass(exc_type, Terminated):
            raise Terminated() from exc  # exit as SIGTERM does (143), not as the replacement error

    @abc.abstractmethod
    def end(self, status: str = "FINISHED") -> None:
        """Close the run with `status` (FINISHED, FAILED or KILLED)."""

    @abc.abstractmethod
    def sync_history(self, history: list[Mapping[str, Any]], keys: tuple[str, ...], step_key: str) -> int:
        """Log the entries of `history` whose step is not logged yet; returns how many values it logged."""

    @abc.abstractmethod
    def log_dataset(self, name: str, digest: str, source: str, context: str) -> None:
        """Record a dataset this run used (the UI's Dataset column)."""


class NoOpRun(_Handle):
    """What disabled (or failed, under ``on_error: warn``) tracking hands out: accepts everything."""

    active = False

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass

    def sync_history(self, history: list[Mapping[str, Any]], keys: tuple[str, ...], step_key: str) -> int:
        return 0

    def log_dataset(self, name: str, digest: str, source: str, context: str) -> None:
        pass


class RunHandle(_Handle):
    """A live MLflow run. Store failures raise :class:`TrackingError` (``on_error: fail``) or warn
    once and turn the handle into a no-op (``on_error: warn``); bad arguments always raise."""

    def __init__(self, tracker: "Tracker", run_id: str) -> None:
        self._tracker = tracker
        self.run_id = run_id
        self.active = True

    def _call(self, fn: Callable[[], T], what: str) -> T | None:
        if not self.active:
            return None
        try:
            return with_retries(fn, f"{what} (run {self.run_id})", self._tracker.uri)
        except TrackingError as exc:
            if self._tracker.config.on_error == "fail":
                raise
            warnings.warn(f"{exc}; tracking for this run is off from here on", TrackingWarning, stacklevel=3)
            self.active = False
            return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log ``{name: value}`` at ``step`` (e.g. the epoch) in one batch."""
        from mlflow.entities import Metric

        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"metric step must be an int, got {step!r}")
        timestamp = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"metric {key!r}: value {value!r} is not a number") from None
            if math.isnan(number):
                warnings.warn(f"metric {key!r} is NaN at step {step}", TrackingWarning, stacklevel=2)
            entries.append(Metric(str(key), number, timestamp, step))
        client = self._tracker.client
        for start in range(0, len(entries), _BATCH_METRICS):
            chunk = entries[start:start + _BATCH_METRICS]
            self._call(lambda: client.log_batch(self.run_id, metrics=chunk), "log_metrics")

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (nested mappings are flattened); a value already logged must not change."""
        if self.active:
            self._call(lambda: self._tracker._log_params(self.run_id, flatten_params(params)), "log_params")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(k, v) for k, v in _string_tags(tags).items()]
        client = self._tracker.client
        for start in range(0, len(entries), _BATCH_PARAMS):
            chunk = entries[start:start + _BATCH_PARAMS]
            self._call(lambda: client.log_batch(self.run_id, tags=chunk), "set_tags")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file (or folder) into the run's artifacts."""
        local = Path(path)
        if not local.exists():
            raise FileNotFoundError(f"artifact {local} does not exist")
        client = self._tracker.client
        self._call(lambda: client.log_artifact(self.run_id, str(local), artifact_path), "log_artifact")

    def sync_history(self, history: list[Mapping[str, Any]], keys: tuple[str, ...], step_key: str) -> int:
        """Make the run's metrics a view of `history` (one dict per step, e.g. history.json): every
        (key, step) not yet in the store is logged, none twice. So a kill between a checkpoint and its
        metrics, or a store outage, is repaired by the next sync, and a replay changes nothing."""
        if not self.active:
            return 0
        from mlflow.entities import Metric

        client = self._tracker.client
        logged: dict[str, set[int]] = {}
        for key in keys:
            found = self._call(lambda: client.get_metric_history(self.run_id, key), "read metric history")
            if found is None:  # store gone under on_error: warn
                return 0
            logged[key] = {m.step for m in found}
        timestamp = int(time.time() * 1000)
        entries = [Metric(key, float(entry[key]), timestamp, int(entry[step_key]))
                   for entry in history for key in keys
                   if key in entry and int(entry[step_key]) not in logged[key]]
        for start in range(0, len(entries), _BATCH_METRICS):
            chunk = entries[start:start + _BATCH_METRICS]
            self._call(lambda: client.log_batch(self.run_id, metrics=chunk), "log_metrics")
        return len(entries)

    def log_dataset(self, name: str, digest: str, source: str, context: str) -> None:
        """A dataset input: `name`, `digest` (e.g. the index's data hash), `source` (its path). MLflow
        keeps digests of at most 36 characters: the first 16 are the digest, the whole one an input tag."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        if not self.active:
            return
        short = digest[:16]
        client = self._tracker.client
        existing = self._call(lambda: client.get_run(self.run_id).inputs.dataset_inputs, "read inputs") or []
        if any(d.dataset.name == name and d.dataset.digest == short for d in existing):
            return  # logged by an earlier attempt of this run
        dataset = Dataset(name=name, digest=short, source_type="local", source=json.dumps({"uri": source}))
        entry = DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context),
                                            InputTag("remamber.data_hash", digest)])
        self._call(lambda: client.log_inputs(self.run_id, datasets=[entry]), "log_dataset")

    def end(self, status: str = "FINISHED") -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {list(RUN_STATUSES)}, got {status!r}")
        client = self._tracker.client
        self._call(lambda: _quiet_call(client.set_terminated, self.run_id, status), "end")


class Tracker:
    """Entry point: ``Tracker(TrackingConfig(...))``; only rank 0 of a job should create one.

    The store is opened (and a fresh SQLite file initialised, under the store lock) at
    construction, so a bad URI fails here, naming it, or warns and leaves a no-op tracker.
    """

    def __init__(self, cfg: TrackingConfig | None = None, source_dir: str | Path | None = None) -> None:
        self.config = cfg if cfg is not None else TrackingConfig()
        self.uri: str | None = None
        self.artifact_root: Path | None = None
        self.client: Any = None
        self._experiment_ids: dict[str, str] = {}
        self._source_dir = source_dir
        if not self.config.enabled:
            return
        try:
            self.uri = resolve_tracking_uri(self.config.uri)
            self.artifact_root = artifact_root_for(self.uri)
            check_http_reachable(self.uri)
            from mlflow import MlflowClient  # importing mlflow configures its loggers: quiet after

            quiet_mlflow_logs()

            with store_lock(self.uri):
                client = with_retries(lambda: MlflowClient(tracking_uri=self.uri), "open", self.uri)
                with_retries(lambda: client.search_experiments(max_results=1), "open", self.uri)
            self.client = client
        except TrackingError as exc:
            self._disable(exc)

    @property
    def active(self) -> bool:
        return self.client is not None

    def _disable(self, exc: TrackingError) -> None:
        if self.config.on_error == "fail":
            raise exc
        warnings.warn(f"{exc}; continuing without tracking", TrackingWarning, stacklevel=3)
        self.client = None

    # ---- store operations (callers hold the store lock where find-or-create must be atomic) ----

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return with_retries(fn, what, self.uri or "")

    def _experiment_id(self, name: str) -> str:
        if name in self._experiment_ids:
            return self._experiment_ids[name]
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"experiment name must be a non-empty string, got {name!r}")
        from mlflow.exceptions import MlflowException

        experiment = self._retry(lambda: self.client.get_experiment_by_name(name), f"get experiment {name!r}")
        if experiment is None:
            location = None
            if self.artifact_root is not None:
                safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
                location = (self.artifact_root / safe).as_uri()

            def create() -> str | None:
                try:
                    return self.client.create_experiment(name, artifact_location=location,
                                                         tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
                except MlflowException as exc:  # another process won the race (remote stores)
                    if exc.error_code == "RESOURCE_ALREADY_EXISTS":
                        return None
                    raise

            experiment_id = self._retry(create, f"create experiment {name!r}")
            if experiment_id is None:
                experiment_id = self._retry(
                    lambda: self.client.get_experiment_by_name(name), f"get experiment {name!r}"
                ).experiment_id
        elif experiment.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow store {self.uri}: experiment {name!r} is deleted; restore it "
                f"(mlflow experiments restore) or purge it (mlflow gc) before logging to it"
            )
        else:
            experiment_id = experiment.experiment_id
            if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made by an older version
                self._retry(lambda: self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG,
                                                                   EXPERIMENT_KIND), "tag experiment")
        self._experiment_ids[name] = experiment_id
        return experiment_id

    def _find_run(self, experiment_id: str, run_key: str) -> Any:
        from mlflow.entities import ViewType

        runs = self._retry(
            lambda: self.client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=10,
                order_by=["attributes.start_time DESC"],
            ),
            f"search run {run_key!r}",
        )
        if len(runs) > 1:
            warnings.warn(
                f"{len(runs)} runs carry {RUN_KEY_TAG}={run_key!r}; using the newest ({runs[0].info.run_id})",
                TrackingWarning,
                stacklevel=4,
            )
        return runs[0] if runs else None

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        changed = {k: (existing[k], v) for k, v in params.items() if k in existing and existing[k] != v}
        if changed:
            raise ValueError(f"run {run_id}: params already logged with other values: {changed}")
        entries = [Param(k, v) for k, v in params.items() if k not in existing]
        for start in range(0, len(entries), _BATCH_PARAMS):
            self.client.log_batch(run_id, params=entries[start:start + _BATCH_PARAMS])

    def _source_tags(self) -> dict[str, str]:
        # The runs table shows mlflow.source.name as "Source" (so the commit goes there too) and
        # mlflow.source.git.commit as "Version" (a column hidden by default).
        tags = {"mlflow.source.name": "remamber", "mlflow.source.type": "LOCAL"}
        found = git_commit(self._source_dir)
        if found is None:
            return tags
        commit, dirty = found
        return {**tags, "mlflow.source.name": f"remamber@{commit[:10]}{'+dirty' if dirty else ''}",
                "mlflow.source.git.commit": commit, "remamber.git_dirty": str(dirty).lower()}

    def _get_or_create_run(
        self,
        experiment_id: str,
        run_key: str,
        params: dict[str, str],
        tags: dict[str, str],
        run_name: str,
        resume: bool,
        fresh: bool = False,
    ) -> str:
        """Find the run tagged ``run_key`` or create it. A found run whose logged params conflict
        with ``params`` belongs to another configuration: it keeps its history but loses the key
        (tagged ``remamber.superseded_run_key``) and a new run takes over. ``fresh``: the caller starts
        its history again (a training from scratch), so a found run that holds metrics is superseded
        the same way."""
        from mlflow.entities import Param, RunTag

        run = self._find_run(experiment_id, run_key)
        if run is not None:
            old = run.data.params
            conflicts = sorted(k for k, v in params.items() if k in old and old[k] != v)
            if fresh and run.data.metrics and not conflicts:
                run_id = run.info.run_id
                self._retry(lambda: self.client.set_tag(run_id, SUPERSEDED_TAG, run_key), "supersede run")
                self._retry(lambda: self.client.delete_tag(run_id, RUN_KEY_TAG), "supersede run")
                run = None
            elif conflicts:
                run_id = run.info.run_id
                warnings.warn(
                    f"run {run_id} ({RUN_KEY_TAG}={run_key!r}) was logged with different values of "
                    f"{conflicts[:5]}{'...' if len(conflicts) > 5 else ''}; starting a new run",
                    TrackingWarning,
                    stacklevel=4,
                )
                self._retry(lambda: self.client.set_tag(run_id, SUPERSEDED_TAG, run_key), "supersede run")
                self._retry(lambda: self.client.delete_tag(run_id, RUN_KEY_TAG), "supersede run")
                run = None
        all_tags = {**self._source_tags(), **tags, RUN_KEY_TAG: run_key}
        if run is None:
            created = self._retry(
                lambda: self.client.create_run(experiment_id, tags=all_tags, run_name=run_name),
                f"create run {run_key!r}",
            )
            run_id = created.info.run_id
            new_params = params
        else:
            run_id = run.info.run_id
            if resume:
                self._retry(lambda: self.client.update_run(run_id, status="RUNNING"), "reopen run")
            new_params = {k: v for k, v in params.items() if k not in run.data.params}
            tag_entries = [RunTag(k, v) for k, v in all_tags.items()]
            for start in range(0, len(tag_entries), _BATCH_PARAMS):
                chunk = tag_entries[start:start + _BATCH_PARAMS]
                self._retry(lambda: self.client.log_batch(run_id, tags=chunk), "set tags")
        entries = [Param(k, v) for k, v in new_params.items()]
        for start in range(0, len(entries), _BATCH_PARAMS):
            chunk = entries[start:start + _BATCH_PARAMS]
            self._retry(lambda: self.client.log_batch(run_id, params=chunk), "log params")
        return run_id

    # ---- public API ----

    def training_run(
        self,
        experiment: str,
        run_key: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        run_name: str | None = None,
        fresh: bool = False,
    ) -> RunHandle | NoOpRun:
        """The run of one trained model (e.g. run_key ``refcoco/twister/256``) in ``experiment``,
        created with ``params`` (flattened) and ``tags``, or the existing one with that key (unless
        ``fresh`` and it holds metrics: see _get_or_create_run). ``run_name`` defaults to the key."""
        _check_run_key("run_key", run_key)
        flat = flatten_params(params or {})
        if not self.active:
            return NoOpRun()
        try:
            with store_lock(self.uri):
                experiment_id = self._experiment_id(experiment)
                run_id = self._get_or_create_run(
                    experiment_id, run_key, flat, _string_tags(tags), run_name=run_name or run_key,
                    resume=True, fresh=fresh,
                )
        except TrackingError as exc:
            self._disable(exc)
            return NoOpRun()
        return RunHandle(self, run_id)

    def eval_run(
        self,
        experiment: str,
        parent_run_key: str,
        split: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> RunHandle | NoOpRun:
        """The nested run of one evaluated split under the training run ``parent_run_key``
        (tag ``mlflow.parentRunId``); idempotent like :meth:`training_run`. If the parent run
        does not exist (training was not tracked), an empty FINISHED parent is created for it."""
        _check_run_key("parent_run_key", parent_run_key)
        _check_run_key("split", split)
        flat = flatten_params(params or {})
        if not self.active:
            return NoOpRun()
        try:
            with store_lock(self.uri):
                experiment_id = self._experiment_id(experiment)
                parent = self._find_run(experiment_id, parent_run_key)
                if parent is None:
                    parent_id = self._get_or_create_run(
                        experiment_id, parent_run_key, {}, {}, run_name=parent_run_key, resume=False
                    )
                    self._retry(lambda: _quiet_call(self.client.set_terminated, parent_id, "FINISHED"), "end parent")
                else:
                    parent_id = parent.info.run_id
                child_tags = {
                    **_string_tags(tags),
                    PARENT_TAG: parent_id,
                    "remamber.parent_run_key": parent_run_key,
                    "remamber.split": split,
                }
                run_id = self._get_or_create_run(
                    experiment_id,
                    f"{parent_run_key}/eval/{split}",
                    flat,
                    child_tags,
                    run_name=f"eval-{split}",
                    resume=True,
                )
        except TrackingError as exc:
            self._disable(exc)
            return NoOpRun()
        return RunHandle(self, run_id)
