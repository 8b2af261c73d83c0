"""The fusion stages by name: how a `fusion` of the vocabulary becomes a module after each backbone stage.

A builder takes (ModelConfig, stage width C, text width Ct, the backbone's SSM settings) and returns a
module with forward(image (B, C, h, w), words (B, L, Ct), pooled (B, Ct), text_mask (B, L) | None,
record dict | None) -> (B, C, h, w). A new fusion variant is its module, one builder registered here
(`register_fusion`) and one row of `remamber.vocabulary.VARIANTS`.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from remamber.models.attention import AttentionStage
from remamber.models.in_context import InContextStage
from remamber.models.norm_adaptation import NormAdaptationStage
from remamber.models.twisting import TwisterStage

__all__ = ["FUSION_STAGES", "register_fusion"]

FusionBuilder = Callable[[Any, int, int, dict], nn.Module]


def _twister(cfg, dim: int, text_dim: int, ssm: dict) -> nn.Module:
    return TwisterStage(dim, text_dim, cfg.max_text_len, depth=cfg.fusion_depth, interaction=cfg.interaction,
                        local_dim=cfg.local_dim, scan_order=cfg.scan_order, grid=cfg.channel_scan_grid,
                        width=cfg.channel_scan_width, recompute=getattr(cfg, "twister_recompute", False), **ssm)


FUSION_STAGES: dict[str, FusionBuilder] = {
    "twister": _twister,
    "in_context": lambda cfg, dim, text_dim, ssm: InContextStage(dim, text_dim, depth=cfg.fusion_depth, **ssm),
    "attention": lambda cfg, dim, text_dim, ssm: AttentionStage(dim, text_dim, depth=cfg.fusion_depth,
                                                                head_dim=cfg.attention_head_dim, **ssm),
    "norm_adaptation": lambda cfg, dim, text_dim, ssm: NormAdaptationStage(dim, text_dim, depth=cfg.fusion_depth,
                                                                           **ssm),
}


def register_fusion(name: str, builder: FusionBuilder) -> None:
    """Make `name` a buildable fusion (a plug-in's or a test's); refuses to replace an existing one."""
    if name in FUSION_STAGES:
        raise ValueError(f"fusion {name!r} is already registered")
    FUSION_STAGES[name] = builder
