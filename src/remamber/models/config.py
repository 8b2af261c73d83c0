"""Model configuration and the named variants of the paper's tables."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields

import yaml

from remamber.models.backbone import BACKBONES
from remamber.models.decoder import DECODERS
from remamber.models.text import TEXT_ENCODERS
from remamber.models.registry import FUSION_STAGES
from remamber.vocabulary import FUSIONS, INTERACTIONS, SCAN_ORDERS
from remamber.vocabulary import VARIANTS as VOCABULARY

__all__ = ["FUSIONS", "VARIANTS", "ModelConfig", "variant_config"]

INITS = ("trunc_normal", "authors")


@dataclass
class ModelConfig:
    """Everything that defines a ReMamber model. Defaults: the small offline test model with the
    paper's Twister; `backbone="vmamba_base", text_encoder="clip-vit-large-patch14"` is the paper's.

    local_dim, channel_scan_grid, channel_scan_width: the authors' Twister sizes (512, 16, 512).
    drop_path_rate: the backbone's stochastic depth (fusion blocks use none, as the authors).
    mask_text_padding: False lets padded words into the fusion, as the authors' code does.
    twister_recompute: the Twister stages keep only their stage boundaries for backward and recompute the
        rest in it (TwisterBlock._forward_recompute): much less activation memory for more time; the same
        function, equal up to float rounding. Off: the plain path (bit-identical to before the option).
    init: how new layers start. "authors": PyTorch's defaults for the fusion layers and He-normal
        (fan-out) for the decoder's conv blocks, as yyh-rain-song/ReMamber; "trunc_normal": ours,
        VMamba's truncated N(0, 0.02) for every new Linear (fusion and decoder).
    """

    backbone: str = "vmamba_tiny_test"
    text_encoder: str = "tiny-random-bert"
    text_layers: int | None = None
    fusion: str = "twister"
    scan_order: str = "channel_spatial"
    interaction: str = "global_local"
    decoder: str = "conv"
    fusion_depth: int = 2
    max_text_len: int = 20
    mask_text_padding: bool = True
    pretrained_backbone: str | None = None
    drop_path_rate: float = 0.1
    local_dim: int = 512
    channel_scan_grid: int = 16
    channel_scan_width: int = 512
    attention_head_dim: int = 64
    init: str = "trunc_normal"
    twister_recompute: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        choices = {
            "backbone": tuple(BACKBONES),
            "text_encoder": tuple(TEXT_ENCODERS),
            "fusion": tuple(FUSION_STAGES),  # the paper's FUSIONS and any registered one
            "scan_order": SCAN_ORDERS,
            "interaction": INTERACTIONS,
            "decoder": DECODERS,
            "init": INITS,
        }
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"model config: {key}={getattr(self, key)!r} is not one of {list(valid)}")
        positive = ("fusion_depth", "max_text_len", "local_dim", "channel_scan_grid", "channel_scan_width",
                    "attention_head_dim")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model config: {key} must be a positive integer, got {value!r}")
        if self.text_layers is not None and (not isinstance(self.text_layers, int) or self.text_layers < 1):
            raise ValueError(f"model config: text_layers must be null or a positive integer, got {self.text_layers!r}")
        for key in ("mask_text_padding", "twister_recompute"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"model config: {key} must be true or false, got {getattr(self, key)!r}")
        if not isinstance(self.drop_path_rate, (int, float)) or not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"model config: drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")
        if self.pretrained_backbone is not None and not isinstance(self.pretrained_backbone, (str, os.PathLike)):
            raise ValueError(f"model config: pretrained_backbone must be a path or null, got {self.pretrained_backbone!r}")
        if self.fusion != "twister" and (self.scan_order != "channel_spatial" or self.interaction != "global_local"):
            raise ValueError(
                f"model config: scan_order/interaction are Twister ablations; fusion={self.fusion!r} needs the "
                f"defaults, got scan_order={self.scan_order!r}, interaction={self.interaction!r}"
            )

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if out["pretrained_backbone"] is not None:
            out["pretrained_backbone"] = os.fspath(out["pretrained_backbone"])
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: dict, source: str = "model config") -> "ModelConfig":
        """Strict: an unknown key raises naming it and listing the valid keys."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping, got {type(data).__name__}")
        valid = cls.field_names()
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; valid keys: {valid}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, section: str | None = "model") -> "ModelConfig":
        """Read a YAML file; `section` selects a sub-mapping (the `model:` part of params/*.yaml)."""
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
        where = os.fspath(path)
        if section is not None and isinstance(data, dict) and section in data:
            data = data[section]
            where = f"{where}:{section}"
        return cls.from_dict(data or {}, source=where)


# Names as in the paper's tables -> the ModelConfig fields that define them (the vocabulary's table).
VARIANTS = VOCABULARY  # a live view: a variant registered later (remamber.vocabulary.register_variant) is here too


def variant_config(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of variant `name` with `overrides` (ModelConfig fields, e.g. the `model:`
    section of params/*.yaml). An override may not redefine what the variant itself sets."""
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known variants: {list(VARIANTS)}")
    defining = VARIANTS[name].fields
    clash = {k: v for k, v in overrides.items() if k in defining and v != defining[k]}
    if clash:
        raise ValueError(f"variant {name!r} sets {sorted(clash)} itself; cannot override with {clash}")
    valid = ModelConfig.field_names()
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"variant {name!r}: unknown model config key(s) {unknown}; valid keys: {valid}")
    return ModelConfig(**{**overrides, **defining})
