"""ReMamber: VMamba backbone + text encoder + a fusion stage after every backbone stage + decoder.

    images (B, 3, H, W) --patch_embed--> stage 1 blocks -> fusion 1 -> [decoder input 1]
                                                 -> downsample -> stage 2 blocks -> fusion 2 -> ...
    words, pooled = text_encoder(input_ids, attention_mask)       (B, L, Ct), (B, Ct)
    logits = decoder([fused_1 .. fused_4], (H, W))                (B, 1, H, W)

The fused map of each stage feeds both the next stage (through its downsampling) and the decoder.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from remamber.models.backbone import (
    LoadReport,
    VMambaBackbone,
    backbone_config,
    load_vmamba_checkpoint,
    verify_checkpoint_file,
)
from remamber.models.config import ModelConfig
from remamber.models.decoder import build_decoder, he_normal_fan_out_init
from remamber.models.registry import FUSION_STAGES
from remamber.models.layers import trunc_normal_init
from remamber.models.text import TextEncoder, build_text_encoder

__all__ = ["ReMamber", "build_model", "INSPECT_KEYS"]

log = logging.getLogger(__name__)

INSPECT_KEYS = ("interaction_maps", "attention_maps", "cube", "cube_after_channel", "cube_after_spatial",
                "cube_slices")


def _fusion_stage(cfg: ModelConfig, dim: int, text_dim: int, ssm: dict) -> nn.Module:
    return FUSION_STAGES[cfg.fusion](cfg, dim, text_dim, ssm)


class ReMamber(nn.Module):
    """See the module docstring. Build with `build_model(cfg)`; `config` holds the ModelConfig."""

    def __init__(self, config: ModelConfig, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.config = config
        bb = backbone_config(config.backbone)
        self.text_encoder = text_encoder
        self.backbone = VMambaBackbone(bb, drop_path_rate=config.drop_path_rate)
        ssm = dict(d_state=bb.d_state, ssm_ratio=bb.ssm_ratio, dt_rank=bb.dt_rank)
        self.fusion = nn.ModuleList([_fusion_stage(config, d, text_encoder.width, ssm) for d in bb.dims])
        self.decoder = build_decoder(config.decoder, list(bb.dims), **ssm)
        if config.init == "trunc_normal":
            # ours: new Linears start like VMamba's (truncated normal 0.02); SSM parameters keep Mamba's init
            self.fusion.apply(trunc_normal_init)
            self.decoder.apply(trunc_normal_init)
        else:
            # the authors': fusion layers keep PyTorch's defaults (built after VMamba's init ran), the
            # decoder's conv blocks are He-normal by fan-out, its neck keeps PyTorch's defaults
            self.decoder.apply(he_normal_fan_out_init)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (input_ids, attention_mask), LongTensors (B, max_text_len)."""
        return self.text_encoder.tokenize(texts)

    def load_backbone_checkpoint(self, path, sha256: str | None = None, size: int | None = None) -> LoadReport:
        """Load official VMamba ImageNet weights into the backbone after checking the file against the
        given sha256/size (the caller reads the pins of params/datasets.yaml; see load_vmamba_checkpoint
        for the key checks)."""
        verify_checkpoint_file(path, sha256, size)
        report = load_vmamba_checkpoint(self.backbone, path)
        log.info("backbone checkpoint %s: %d tensors loaded, %d ignored (classifier head)",
                 path, report.loaded, len(report.ignored))
        if report.unexpected:
            log.warning("backbone checkpoint %s: %d tensors match no backbone key and were not loaded: %s",
                        path, len(report.unexpected), report.unexpected[:5])
        return report

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"text_encoder", "backbone" (ImageNet-initialisable), "new" (fusion + decoder)}."""
        groups = {
            "text_encoder": list(self.text_encoder.parameters()),
            "backbone": list(self.backbone.parameters()),
            "new": list(self.fusion.parameters()) + list(self.decoder.parameters()),
        }
        assert sum(len(v) for v in groups.values()) == len(list(self.parameters()))
        return groups

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        inspect: bool = False,
    ):
        """images (B, 3, H, W), input_ids/attention_mask (B, L) -> logits (B, 1, H, W);
        with inspect=True -> (logits, dict of per-stage lists, see INSPECT_KEYS)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if input_ids.shape != attention_mask.shape or input_ids.shape[0] != images.shape[0]:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} / attention_mask {tuple(attention_mask.shape)} do not match "
                f"the batch of images {tuple(images.shape)}"
            )
        masking = self.config.mask_text_padding
        words, pooled = self.text_encoder(input_ids, attention_mask, mask_padding=masking)
        text_mask = attention_mask.bool() if masking else None
        trace: dict[str, list] | None = {k: [] for k in INSPECT_KEYS} if inspect else None
        x = self.backbone.patch_embed(images)
        features = []
        for stage, fusion in zip(self.backbone.layers, self.fusion):
            x = stage.blocks(x)
            record: dict | None = {} if inspect else None
            x = fusion(x, words, pooled, text_mask, record)
            features.append(x)
            x = stage.downsample(x)
            if trace is not None:
                _collect(trace, record)
        logits = self.decoder(features, tuple(images.shape[-2:]))
        if trace is None:
            return logits
        return logits, {k: v for k, v in trace.items() if any(item is not None for item in v)}


def _collect(trace: dict[str, list], record: dict) -> None:
    trace["interaction_maps"].append(record.get("interaction_map"))
    trace["attention_maps"].append(record.get("attention_map"))
    for key in ("cube", "cube_after_channel", "cube_after_spatial", "cube_slices"):
        trace[key].append(record.get(key))


def build_model(cfg: ModelConfig, backbone_pin: tuple[str | None, int | None] = (None, None)) -> ReMamber:
    """Build the model of `cfg` (deterministic given torch.manual_seed); loads
    cfg.pretrained_backbone into the backbone when set, checked against `backbone_pin` (sha256, size)."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_model expects a ModelConfig, got {type(cfg).__name__}")
    cfg.validate()
    text_encoder = build_text_encoder(cfg.text_encoder, text_layers=cfg.text_layers, max_text_len=cfg.max_text_len)
    model = ReMamber(cfg, text_encoder)
    if cfg.pretrained_backbone is not None:
        model.load_backbone_checkpoint(cfg.pretrained_backbone, *backbone_pin)
    return model
