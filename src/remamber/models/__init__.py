"""ReMamber models: VMamba backbone, text encoders, the Twisting layer, the other fusion variants,
decoders, loss, and `build_model` for any variant of the paper's tables."""

from remamber.models.backbone import (
    BACKBONES,
    BackboneConfig,
    LoadReport,
    VMambaBackbone,
    backbone_config,
    load_vmamba_checkpoint,
)
from remamber.models.config import FUSIONS, VARIANTS, ModelConfig, variant_config
from remamber.models.loss import dice_bce_loss
from remamber.models.remamber import INSPECT_KEYS, ReMamber, build_model
from remamber.models.text import TEXT_ENCODERS, TextEncoder, build_text_encoder

__all__ = [
    "BACKBONES",
    "BackboneConfig",
    "FUSIONS",
    "INSPECT_KEYS",
    "LoadReport",
    "ModelConfig",
    "ReMamber",
    "TEXT_ENCODERS",
    "TextEncoder",
    "VARIANTS",
    "VMambaBackbone",
    "backbone_config",
    "build_model",
    "build_text_encoder",
    "dice_bce_loss",
    "load_vmamba_checkpoint",
    "variant_config",
]
