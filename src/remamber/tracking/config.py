"""Where and whether MLflow tracking happens: the one class of the `tracking:` section of params/*.yaml.

`remamber.config` checks the section's shape with the rest of the params file and keeps it as a dict of
this class's arguments; the engine builds the class from it (`tracking` and `config` sit side by side, so
neither imports the other). The checks below guard direct use of the class (tests, scripts)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

ON_ERROR_CHOICES = ("fail", "warn")


@dataclass(frozen=True)
class TrackingConfig:
    """Where and whether MLflow tracking happens.

    enabled:  False turns every handle into a no-op and never touches a store.
    uri:      tracking URI; None means env MLFLOW_TRACKING_URI, else ``sqlite:///<cwd>/mlflow.db``.
    on_error: "fail" raises :class:`TrackingError` naming the URI when the store cannot be used;
              "warn" emits a warning and continues with no-op handles.
    """

    enabled: bool = True
    uri: str | None = None
    on_error: str = "fail"

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"tracking.enabled must be true or false, got {self.enabled!r}")
        if self.uri is not None and (not isinstance(self.uri, str) or not self.uri.strip()):
            raise ValueError(f"tracking.uri must be a non-empty string or null, got {self.uri!r}")
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(
                f"tracking.on_error must be one of {list(ON_ERROR_CHOICES)}, got {self.on_error!r}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "TrackingConfig":
        """Strict: unknown keys are an error naming the key; missing keys take the defaults."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"tracking: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"tracking: unknown key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
