"""MLflow tracking conventions for the pipeline (docs/design.md, section 6)."""

from remamber.tracking.config import TrackingConfig
from remamber.tracking.params import flatten_params
from remamber.tracking.store import TrackingError, resolve_tracking_uri
from remamber.tracking.tracker import NoOpRun, RunHandle, Terminated, Tracker, TrackingWarning, git_commit

__all__ = [
    "NoOpRun",
    "RunHandle",
    "Terminated",
    "Tracker",
    "TrackingConfig",
    "TrackingError",
    "TrackingWarning",
    "flatten_params",
    "git_commit",
    "resolve_tracking_uri",
]
