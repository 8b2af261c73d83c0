"""From a params file to the model of one job: where the `model:` section meets the model code.

`remamber.config` reads the matrix without importing the models (Snakemake and `remamber report` stay
light); the engine, which builds models anyway, checks the `model:` section's values here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from remamber.config import ConfigError, ExperimentConfig
from remamber.models import ModelConfig, variant_config


def model_config(cfg: ExperimentConfig, variant: str) -> ModelConfig:
    """The ModelConfig of `variant` with the params file's `model:` overrides; errors name the file."""
    try:
        return variant_config(variant, **cfg.model)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"{cfg.source}: model (variant {variant!r}): {exc}") from exc


def check_model_section(cfg: ExperimentConfig) -> None:
    """Build the ModelConfig of every variant of the matrix (no weights): a typo fails before any job."""
    for variant in dict.fromkeys(v for t in cfg.tables.values() for v in t["variants"]):
        model_config(cfg, variant)


def out_dir_id(out_dir: str | Path) -> str:
    """A short stable id of an output folder (its absolute path): part of the MLflow run key, so two
    trainings of one model in different folders get two runs."""
    return hashlib.sha256(os.path.abspath(os.fspath(out_dir)).encode("utf-8")).hexdigest()[:12]


def tracking_key(run_key: str, out_dir: str | Path) -> str:
    """The MLflow key of a training (and of its evaluations): run key @ output folder. Computed where it
    is needed, never stored in a checkpoint, so a checkpoint's bytes do not depend on where it was written."""
    return f"{run_key}@{out_dir_id(out_dir)}"
