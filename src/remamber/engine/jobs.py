"""From a params file to the model of one job: where the `model:` section meets the model code.

`remamber.config` reads the matrix without importing the models (Snakemake and `remamber report` stay
light); the engine, which builds models anyway, checks the `model:` section's values here.
"""

from __future__ import annotations

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
