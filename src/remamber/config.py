"""Experiment configuration: strict, typed reading of params/*.yaml and the experiment matrix.

This module is the one check of a params file's shape: every value is read by a checker below, which
also carries its JSON-schema fragment, so `workflow/schemas/config.schema.yaml` is generated from it
(`python -m remamber.config > workflow/schemas/config.schema.yaml`; a test keeps the file current) and
never restates a rule by hand. Cross-references (a table's datasets and resolution key, batch sizes) are
checked once, in `ExperimentConfig._check_cross_references`. Every message is one line naming the file,
the key path and the value.

This module imports neither torch nor the model code (it sits below `engine`, beside `models`), so
Snakemake and `remamber report` read the matrix quickly. Variant names are checked against the ground
floor's vocabulary; the `model:` section's values are checked where a model is built
(`remamber.engine.jobs.model_config`).

Paths in the file (`results`, `data.raw`, `data.processed`, `model.pretrained_backbone`) are kept exactly as
written: relative paths are relative to the working directory of the command (the project root).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from remamber.errors import RemamberError
from remamber.vocabulary import BASELINES, CONTROLS, SHUFFLED_TEXT, SHUFFLED_TEXT_VARIANT, SPLIT_BYS, VARIANTS

__all__ = [
    "ConfigError",
    "DatasetSpec",
    "DataConfig",
    "TrainConfig",
    "EvaluateConfig",
    "TableSpec",
    "ExperimentsConfig",
    "TrainingJob",
    "ExperimentConfig",
]


class ConfigError(RemamberError, ValueError):
    """A bad experiment configuration; the message names the file and the key path."""


# --------------------------------------------------------------------------- value checkers
# Each checker takes (value, where) and returns the normalised value or raises ConfigError; `where` is the
# "file: key.path" prefix used in every message. Its `schema` attribute is the same rule as a JSON-schema
# fragment (what `json_schema()` assembles).

Checker = Callable[[Any, str], Any]


def _schema(fragment: dict[str, Any]) -> Callable[[Checker], Checker]:
    def attach(check: Checker) -> Checker:
        check.schema = fragment  # type: ignore[attr-defined]
        return check

    return attach


def _bounds(minimum: float | None, maximum: float | None = None, open_min: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if minimum is not None:
        out["exclusiveMinimum" if open_min else "minimum"] = minimum
    if maximum is not None:
        out["maximum"] = maximum
    return out


def _fail(where: str, message: str) -> None:
    raise ConfigError(f"{where}: {message}")


def _as_int(minimum: int | None = None) -> Checker:
    @_schema({"type": "integer", **_bounds(minimum)})
    def check(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(where, f"expected an integer, got {value!r} ({type(value).__name__})")
        if minimum is not None and value < minimum:
            _fail(where, f"must be >= {minimum}, got {value}")
        return int(value)

    return check


def _as_float(minimum: float | None = None, maximum: float | None = None, open_min: bool = False) -> Checker:
    @_schema({"type": "number", **_bounds(minimum, maximum, open_min)})
    def check(value: Any, where: str) -> float:
        # PyYAML reads `1e-4` (no dot) as a string: accept a numeric string, since that is a YAML quirk,
        # not a user mistake.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                _fail(where, f"expected a number, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(where, f"expected a number, got {value!r} ({type(value).__name__})")
        value = float(value)
        if not math.isfinite(value):
            _fail(where, f"must be finite, got {value}")
        if minimum is not None and (value <= minimum if open_min else value < minimum):
            _fail(where, f"must be {'>' if open_min else '>='} {minimum}, got {value}")
        if maximum is not None and value > maximum:
            _fail(where, f"must be <= {maximum}, got {value}")
        return value

    return check


@_schema({"type": "boolean"})
def _as_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        _fail(where, f"expected true or false, got {value!r}")
    return value


def _as_str(choices: tuple[str, ...] | None = None, pattern: str | None = None) -> Checker:
    fragment: dict[str, Any] = {"enum": list(choices)} if choices is not None else {"type": "string", "minLength": 1}
    if pattern is not None:
        fragment["pattern"] = f"^{pattern}$"

    @_schema(fragment)
    def check(value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            _fail(where, f"expected a non-empty string, got {value!r}")
        if choices is not None and value not in choices:
            _fail(where, f"{value!r} is not one of {', '.join(choices)}")
        if pattern is not None and not re.fullmatch(pattern, value):
            _fail(where, f"{value!r} does not match {pattern}")
        return value

    return check


def _optional(inner: Checker) -> Checker:
    @_schema({"anyOf": [inner.schema, {"type": "null"}]})  # type: ignore[attr-defined]
    def check(value: Any, where: str) -> Any:
        return None if value is None else inner(value, where)

    return check


def _list_schema(items: dict[str, Any], min_items: int) -> dict[str, Any]:
    return {"type": "array", "minItems": min_items, "uniqueItems": True, "items": items}


@_schema(_list_schema(_as_str().schema, 1))  # type: ignore[attr-defined]
def _as_str_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        _fail(where, f"expected a non-empty list of names, got {value!r}")
    names = tuple(_as_str()(v, f"{where}[{i}]") for i, v in enumerate(value))
    if len(set(names)) != len(names):
        _fail(where, f"duplicate names in {list(names)}")
    return names


@_schema(_list_schema(_as_str().schema, 0))  # type: ignore[attr-defined]
def _as_name_list(value: Any, where: str) -> tuple[str, ...]:
    """Like _as_str_list, but an empty list is fine."""
    return () if value == [] else _as_str_list(value, where)


@_schema({"type": "array", "minItems": 2, "maxItems": 2, "items": _as_float(0.0, 1.0).schema})  # type: ignore[attr-defined]
def _as_betas(value: Any, where: str) -> tuple[float, float]:
    if not isinstance(value, list) or len(value) != 2:
        _fail(where, f"expected a list of two numbers, got {value!r}")
    return tuple(_as_float(0.0, 1.0)(v, f"{where}[{i}]") for i, v in enumerate(value))  # type: ignore[return-value]


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        _fail(where, f"expected a mapping, got {value!r}")
    return value


def _check_keys(raw: dict, spec: dict[str, Checker], where: str, required: bool = True,
                defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every key of `raw` against `spec`: unknown keys and (if `required`) missing keys are errors;
    a key of `defaults` may be left out and then takes its default."""
    valid = ", ".join(spec)
    defaults = defaults or {}
    for key in raw:
        if key not in spec:
            _fail(_join(where, str(key)), f"unknown key; valid: {valid}")
    out = {}
    for key, checker in spec.items():
        path = _join(where, key)
        if key not in raw:
            if key in defaults:
                out[key] = defaults[key]
            elif required:
                _fail(path, f"missing key; required: {', '.join(k for k in spec if k not in defaults)}")
            continue
        out[key] = checker(raw[key], path)
    return out


def _join(where: str, key: str) -> str:
    """`file: a.b` + `c` -> `file: a.b.c`; `file: ` + `c` -> `file: c`."""
    return f"{where}{key}" if where.endswith(": ") else f"{where}.{key}"


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DatasetSpec:
    split_by: str
    splits: tuple[str, ...]


@dataclass(frozen=True)
class DataConfig:
    source: str
    raw: str
    processed: str
    synth_size: str | None
    synth_seed: int
    mask_mode: str
    datasets: dict[str, DatasetSpec]
    text_field: str = "raw"  # refer sentence field fed to the text encoder: raw, or sent (the authors')


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    global_batch_size: int
    per_device_batch_size: int
    lr_new: float
    lr_pretrained: float
    min_lr: float
    weight_decay: float
    betas: tuple[float, float]
    amp: bool
    ema_decay: float | None
    grad_clip: float | None
    seed: int
    num_workers: int
    val_subset: int | None
    deterministic: bool
    # True: the text encoder keeps its pretrained weights (no gradients, eval mode, out of the optimizer),
    # and checkpoints reference those weights by name and hash instead of copying them.
    freeze_text_encoder: bool = False
    amp_dtype: str = "auto"  # auto: bf16 where the GPU has it, else fp16 (ours); float16: the authors'
    eval_amp: bool = True  # False: validation and evaluation in fp32, as the authors
    ema_select: str = "ema"  # which weights validation scores, selects best.pt by and evaluate uses by
    #                          default when ema_decay is set; raw: the authors' (EMA kept, not used)
    weight_decay_scope: str = "weights"  # weights: biases, norm weights, SSM A_logs/Ds not decayed (ours);
    #                                      all: every parameter decays, as the authors' AdamW
    lr_schedule: str = "cosine"  # cosine: epoch e at cos(pi e / epochs) (ours); cosine_lagged: the authors'
    #                              timm scheduler stepped after each epoch, so epoch e runs at e-1's (0 at 0)


@dataclass(frozen=True)
class EvaluateConfig:
    protocol: str
    batch_size: int
    num_workers: int


@dataclass(frozen=True)
class TableSpec:
    resolution: str  # a key of experiments.resolutions
    datasets: tuple[str, ...]
    variants: tuple[str, ...]
    controls: tuple[str, ...] = ()  # CONTROLS: extra rows that show how much the models use the text



@dataclass(frozen=True)
class ExperimentsConfig:
    resolutions: dict[str, int]
    tables: dict[str, TableSpec]


@dataclass(frozen=True)
class TrainingJob:
    """One model to train: (dataset, variant, resolution in pixels), shared by the tables listed."""

    dataset: str
    variant: str
    resolution: int
    tables: tuple[str, ...]
    experiment: str  # the first table using it: the MLflow experiment of its run

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.variant}/{self.resolution}"


SPLIT_BY = SPLIT_BYS
PROTOCOLS = ("original", "input")
NAME_PATTERN = r"[A-Za-z0-9_-]+"


def _object_schema(spec: dict[str, Checker], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON schema of a mapping read by `_check_keys(raw, spec, ..., defaults=defaults)`."""
    return {"type": "object", "additionalProperties": False,
            "required": [k for k in spec if k not in (defaults or {})],
            "properties": {k: check.schema for k, check in spec.items()}}  # type: ignore[attr-defined]


def _map_schema(values: Checker, keys: dict[str, Any] | None = None) -> dict[str, Any]:
    """A non-empty mapping of free names (`keys`: their schema) to values read by `values`."""
    return {"type": "object", "minProperties": 1, "propertyNames": keys or {"minLength": 1},
            "additionalProperties": values.schema}  # type: ignore[attr-defined]


_DATASET_SPEC: dict[str, Checker] = {"split_by": _as_str(SPLIT_BY), "splits": _as_str_list}


@_schema(_object_schema(_DATASET_SPEC) | {"not": {"properties": {"splits": {"contains": {"const": "train"}}},
                                                  "required": ["splits"]}})
def _dataset_spec(value: Any, where: str) -> DatasetSpec:
    raw = _mapping(value, where)
    got = _check_keys(raw, _DATASET_SPEC, where)
    if "train" in got["splits"]:
        _fail(_join(where, "splits"), "lists the evaluated splits; 'train' is not one")
    return DatasetSpec(**got)


@_schema(_map_schema(_dataset_spec))
def _datasets(value: Any, where: str) -> dict[str, DatasetSpec]:
    raw = _mapping(value, where)
    if not raw:
        _fail(where, "no datasets")
    return {_as_str()(name, where): _dataset_spec(spec, _join(where, name)) for name, spec in raw.items()}


_DATA_SPEC: dict[str, Checker] = {
    "source": _as_str(("download", "synthetic")),
    "raw": _as_str(),
    "processed": _as_str(),
    "synth_size": _optional(_as_str()),
    "synth_seed": _as_int(0),
    "mask_mode": _as_str(("union", "refer_eq1")),
    "datasets": _datasets,
    "text_field": _as_str(("raw", "sent")),
}

_TRAIN_SPEC: dict[str, Checker] = {
    "epochs": _as_int(1),
    "global_batch_size": _as_int(1),
    "per_device_batch_size": _as_int(1),
    "lr_new": _as_float(0.0, open_min=True),
    "lr_pretrained": _as_float(0.0, open_min=True),
    "min_lr": _as_float(0.0),
    "weight_decay": _as_float(0.0),
    "betas": _as_betas,
    "amp": _as_bool,
    "ema_decay": _optional(_as_float(0.0, 1.0)),
    "grad_clip": _optional(_as_float(0.0, open_min=True)),
    "seed": _as_int(0),
    "num_workers": _as_int(0),
    "val_subset": _optional(_as_int(1)),
    "deterministic": _as_bool,
    "freeze_text_encoder": _as_bool,
    "amp_dtype": _as_str(("auto", "float16", "bfloat16")),
    "eval_amp": _as_bool,
    "ema_select": _as_str(("ema", "raw")),
    "weight_decay_scope": _as_str(("weights", "all")),
    "lr_schedule": _as_str(("cosine", "cosine_lagged")),
}
# Keys added after the first params files: optional, and left out of config_hash at their default, so
# the hash (and resumability) of a file that does not use them is unchanged.
_TRAIN_DEFAULTS: dict[str, Any] = {"freeze_text_encoder": False, "amp_dtype": "auto", "eval_amp": True,
                                   "ema_select": "ema", "weight_decay_scope": "weights",
                                   "lr_schedule": "cosine"}
_DATA_DEFAULTS: dict[str, Any] = {"text_field": "raw"}

_EVALUATE_SPEC: dict[str, Checker] = {
    "protocol": _as_str(PROTOCOLS),
    "batch_size": _as_int(1),
    "num_workers": _as_int(0),
}

# The keyword arguments of remamber.tracking.TrackingConfig (the one class of this section; `tracking`
# sits beside `config`, so neither imports the other: the engine joins them).
_TRACKING_SPEC: dict[str, Checker] = {
    "enabled": _as_bool,
    "uri": _optional(_as_str()),
    "on_error": _as_str(("fail", "warn")),
}


@_schema(_map_schema(_as_int(8)))
def _resolutions(value: Any, where: str) -> dict[str, int]:
    raw = _mapping(value, where)
    if not raw:
        _fail(where, "no resolutions")
    return {_as_str()(k, where): _as_int(8)(v, _join(where, k)) for k, v in raw.items()}


@_schema(_list_schema({"enum": list(CONTROLS)}, 0))
def _controls(value: Any, where: str) -> tuple[str, ...]:
    names = _as_name_list(value, where)
    for control in names:
        if control not in CONTROLS:
            _fail(where, f"unknown control {control!r}; choose from {list(CONTROLS)}")
    return names


# resolution: a key of experiments.resolutions, datasets: keys of data.datasets, variants: rows of the
# vocabulary (cross-references, checked by ExperimentConfig once the whole file is read)
_TABLE_SPEC: dict[str, Checker] = {"resolution": _as_str(), "datasets": _as_str_list, "variants": _as_str_list,
                                   "controls": _controls}
_TABLE_DEFAULTS: dict[str, Any] = {"controls": ()}


@_schema(_object_schema(_TABLE_SPEC, _TABLE_DEFAULTS))
def _table(value: Any, where: str) -> TableSpec:
    raw = _mapping(value, where)
    got = _check_keys(raw, _TABLE_SPEC, where, defaults=_TABLE_DEFAULTS)
    if SHUFFLED_TEXT in got["controls"] and SHUFFLED_TEXT_VARIANT not in got["variants"]:
        _fail(_join(where, "controls"), f"{SHUFFLED_TEXT!r} evaluates the table's {SHUFFLED_TEXT_VARIANT!r}, "
                                        f"which is not among its variants {list(got['variants'])}")
    return TableSpec(**got)


# In a params file, `tables` may also name the shared matrix file (resolved before checking).
@_schema({"anyOf": [{"type": "string", "minLength": 1}, _map_schema(_table)]})
def _tables(value: Any, where: str) -> dict[str, TableSpec]:
    raw = _mapping(value, where)
    if not raw:
        _fail(where, "no tables")
    return {_as_str()(k, where): _table(v, _join(where, k)) for k, v in raw.items()}


_EXPERIMENTS_SPEC: dict[str, Checker] = {"resolutions": _resolutions, "tables": _tables}


def _include_matrix(raw: Any, path: Path) -> None:
    """`experiments.tables: <file>` names a YAML file beside the params file that holds the tables (one
    matrix shared by several configurations); replace the name by its content, in place."""
    tables = raw.get("experiments", {}).get("tables") if isinstance(raw, dict) and \
        isinstance(raw.get("experiments"), dict) else None
    if not isinstance(tables, str):
        return
    matrix = path.parent / tables
    where = f"{path}: experiments.tables"
    try:
        content = yaml.safe_load(matrix.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the matrix file {matrix} ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: {matrix} is not valid YAML: {exc}") from exc
    if not isinstance(content, dict) or not isinstance(content.get("tables"), dict):
        raise ConfigError(f"{where}: {matrix} must hold a mapping 'tables: {{table1: ..., ...}}'")
    raw["experiments"]["tables"] = content["tables"]


def _section(checker_spec: dict[str, Checker], cls: type | None, defaults: dict[str, Any] | None = None) -> Checker:
    """A mapping of fixed keys, read into `cls` (None: kept as a dict)."""
    @_schema(_object_schema(checker_spec, defaults))
    def check(value: Any, where: str) -> Any:
        got = _check_keys(_mapping(value, where), checker_spec, where, defaults=defaults)
        return got if cls is None else cls(**got)

    return check


@_schema({"type": "object", "propertyNames": {"minLength": 1},
          "description": "remamber.models.ModelConfig fields applied to every variant (checked where a model "
                         "is built: remamber.engine.jobs.model_config)"})
def _model_section(value: Any, where: str) -> dict[str, Any]:
    # Shape only here; the field names and values are checked by ModelConfig (validate_model).
    raw = _mapping(value, where)
    for key in raw:
        _as_str()(key, where)
    return copy.deepcopy(raw)


_TOP_SPEC: dict[str, Checker] = {
    "name": _as_str(pattern=NAME_PATTERN),  # part of paths and MLflow run keys
    "results": _as_str(),
    "data": _section(_DATA_SPEC, DataConfig, _DATA_DEFAULTS),
    "model": _model_section,
    "train": _section(_TRAIN_SPEC, TrainConfig, _TRAIN_DEFAULTS),
    "evaluate": _section(_EVALUATE_SPEC, EvaluateConfig),
    "tracking": _section(_TRACKING_SPEC, None),
    "experiments": _section(_EXPERIMENTS_SPEC, ExperimentsConfig),
}


def json_schema() -> dict[str, Any]:
    """The JSON schema of a params file, assembled from the checkers above: the same rules, for editors and
    other tools (workflow/schemas/config.schema.yaml is this, written by `python -m remamber.config`).
    Cross-references and the variant names are checked by ExperimentConfig only."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "remamber params file (params/paper.yaml, params/demo.yaml)",
            "description": "Generated by `python -m remamber.config` from remamber.config, the one validator "
                           "of params files (which also checks cross-references); do not edit by hand.",
            **_object_schema(_TOP_SPEC)}


def _plain(value: Any) -> Any:
    """Dataclasses/tuples -> plain dicts/lists (JSON- and YAML-ready)."""
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- the whole file


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    results: str
    data: DataConfig
    model: dict[str, Any]  # ModelConfig overrides applied to every variant
    train: TrainConfig
    evaluate: EvaluateConfig
    tracking: dict[str, Any]  # {enabled, uri, on_error}: the arguments of remamber.tracking.TrackingConfig
    experiments: ExperimentsConfig
    source: str = field(default="<dict>", compare=False)  # the file it came from, for messages

    # ---- construction
    @classmethod
    def from_yaml(cls, path: str | Path, check_model: bool = True) -> "ExperimentConfig":
        """Read and validate a params file; `check_model=False` skips the variant-name check."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from exc
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        _include_matrix(raw, path)
        return cls.from_dict(raw, source=str(path), check_model=check_model)

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<dict>", check_model: bool = True) -> "ExperimentConfig":
        top = f"{source}: "
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
        got = _check_keys(raw, _TOP_SPEC, top)
        cfg = cls(**got, source=source)
        cfg._check_cross_references()
        if check_model:
            cfg.validate_model()
        return cfg

    def _check_cross_references(self) -> None:
        where = f"{self.source}: experiments.tables"
        t = self.train
        if t.global_batch_size % t.per_device_batch_size:
            _fail(f"{self.source}: train.global_batch_size",
                  f"{t.global_batch_size} is not a multiple of train.per_device_batch_size "
                  f"{t.per_device_batch_size}")
        if t.min_lr > min(t.lr_new, t.lr_pretrained):
            _fail(f"{self.source}: train.min_lr", f"{t.min_lr} exceeds a base learning rate")
        for name, table in self.experiments.tables.items():
            if table.resolution not in self.experiments.resolutions:
                _fail(f"{where}.{name}.resolution",
                      f"{table.resolution!r} is not in experiments.resolutions "
                      f"({', '.join(self.experiments.resolutions)})")
            for ds in table.datasets:
                if ds not in self.data.datasets:
                    _fail(f"{where}.{name}.datasets",
                          f"{ds!r} is not in data.datasets ({', '.join(self.data.datasets)})")

    def validate_model(self) -> None:
        """Every variant of the tables is a known one, and the `model:` section does not redefine what a
        variant sets (fusion, scan order, interaction)."""
        for name, table in self.experiments.tables.items():
            for variant in table.variants:
                if variant not in VARIANTS:
                    _fail(f"{self.source}: experiments.tables.{name}.variants",
                          f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
        defining = sorted({k for v in VARIANTS.values() for k in ("fusion", "scan_order", "interaction")} & set(self.model))
        if defining:
            _fail(f"{self.source}: model.{defining[0]}", "is set by each variant (experiments.tables.*.variants); "
                  "remove it from the model section")

    # ---- the experiment matrix
    @property
    def tables(self) -> dict[str, dict[str, Any]]:
        """Per table: {"resolution": int (pixels), "datasets": [...], "variants": [...], "controls": [...]}."""
        res = self.experiments.resolutions
        return {
            name: {"resolution": res[t.resolution], "datasets": list(t.datasets), "variants": list(t.variants),
                   "controls": list(t.controls)}
            for name, t in self.experiments.tables.items()
        }

    def table_specs(self) -> dict[str, dict[str, Any]]:
        """Same as `tables`."""
        return self.tables

    def jobs(self) -> list[TrainingJob]:
        """Training jobs of the matrix, each (dataset, variant, resolution) once, in table order."""
        order: list[tuple[str, str, int]] = []
        users: dict[tuple[str, str, int], list[str]] = {}
        for name, table in self.tables.items():
            for ds in table["datasets"]:
                for variant in table["variants"]:
                    key = (ds, variant, table["resolution"])
                    if key not in users:
                        order.append(key)
                        users[key] = []
                    users[key].append(name)
        return [TrainingJob(ds, v, r, tuple(users[(ds, v, r)]), users[(ds, v, r)][0]) for ds, v, r in order]

    def evaluations(self) -> list[tuple[TrainingJob, str]]:
        """(job, split) for every evaluated split of every job's dataset."""
        return [(job, split) for job in self.jobs() for split in self.data.datasets[job.dataset].splits]

    def shuffled_text_evaluations(self) -> list[tuple[TrainingJob, str]]:
        """(job, split) of the shuffled-text control: the twister of every table that asks for it."""
        out: list[tuple[TrainingJob, str]] = []
        for table in self.tables.values():
            if SHUFFLED_TEXT not in table["controls"]:
                continue
            for ds in table["datasets"]:
                job = self.find_job(ds, SHUFFLED_TEXT_VARIANT, table["resolution"])
                out += [(job, s) for s in self.data.datasets[ds].splits if (job, s) not in out]
        return out

    def baseline_splits(self) -> list[tuple[str, str]]:
        """(dataset, split) on which the text-blind baselines are scored (any table asking for one)."""
        out: list[tuple[str, str]] = []
        for table in self.tables.values():
            if not set(table["controls"]) & set(BASELINES):
                continue
            for ds in table["datasets"]:
                out += [(ds, s) for s in self.data.datasets[ds].splits if (ds, s) not in out]
        return out

    def find_job(self, dataset: str, variant: str, resolution: int) -> TrainingJob:
        for job in self.jobs():
            if (job.dataset, job.variant, job.resolution) == (dataset, variant, int(resolution)):
                return job
        known = ", ".join(j.key for j in self.jobs())
        raise ConfigError(f"{self.source}: no training job {dataset}/{variant}/{resolution} in the "
                          f"experiment matrix; known: {known}")

    def run_key(self, dataset: str, variant: str, resolution: int) -> str:
        """The MLflow run key of a trained model: "{config name}/{dataset}/{variant}/{resolution}"."""
        return f"{self.name}/{dataset}/{variant}/{int(resolution)}"

    # ---- serialisation
    def to_dict(self) -> dict[str, Any]:
        """The normalised config as plain data (the same layout as the YAML file)."""
        d = _plain({k: getattr(self, k) for k in _TOP_SPEC})
        return d

    def config_hash(self) -> str:
        """sha256 (hex, first 16 chars) of the normalised config: stable across key order and formatting."""
        d = self.to_dict()
        for section, defaults in (("train", _TRAIN_DEFAULTS), ("data", _DATA_DEFAULTS)):
            for key, default in defaults.items():
                if d[section].get(key) == default:
                    del d[section][key]
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


if __name__ == "__main__":  # python -m remamber.config > workflow/schemas/config.schema.yaml
    import sys

    sys.stdout.write("# Generated by `python -m remamber.config`: do not edit (tests/test_config.py checks it).\n")
    class _NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    yaml.dump(json_schema(), sys.stdout, Dumper=_NoAliases, sort_keys=False, width=110)
