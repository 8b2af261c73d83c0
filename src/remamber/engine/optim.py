"""Optimizer parameter groups, the per-epoch cosine schedule and the EMA of the weights (docs/design.md, section 3)."""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable

import torch
from torch import nn

from remamber.config import TrainConfig

GROUP_NAMES = ("text_encoder", "backbone", "new")
WEIGHT_DECAY_SCOPES = ("weights", "all")


def _no_decay(p: torch.Tensor) -> bool:
    # Biases and norm weights are 1-D; SSM parameters such as A_log/D may be marked by the model.
    return p.ndim <= 1 or bool(getattr(p, "_no_weight_decay", False))


def optimizer_groups(
    model: nn.Module, train: TrainConfig, pretrained_backbone: bool
) -> list[dict[str, Any]]:
    """AdamW groups from `model.param_groups()`.

    The text encoder is always pretrained (lr_pretrained); the backbone is at lr_pretrained only when it
    was initialised from ImageNet weights, else it counts as new (lr_new). With `train.weight_decay_scope`
    "weights" (ours) each group is split into a weight-decay part and a no-decay part (biases, norm weights,
    parameters marked `_no_weight_decay` such as the SSMs' A_logs/Ds); with "all" (the authors' AdamW, whose
    groups set no decay of their own) every parameter decays. Every trainable parameter must be in exactly
    one group.
    """
    scope = train.weight_decay_scope
    if scope not in WEIGHT_DECAY_SCOPES:
        raise ValueError(f"train.weight_decay_scope {scope!r} is not one of {list(WEIGHT_DECAY_SCOPES)}")
    exempt = _no_decay if scope == "weights" else (lambda p: False)
    groups = model.param_groups()
    if set(groups) != set(GROUP_NAMES):
        raise ValueError(f"model.param_groups() returned {sorted(groups)}, expected {list(GROUP_NAMES)}")
    seen: set[int] = set()
    out: list[dict[str, Any]] = []
    for name in GROUP_NAMES:
        lr = train.lr_pretrained if name == "text_encoder" or (name == "backbone" and pretrained_backbone) \
            else train.lr_new
        params = [p for p in groups[name] if p.requires_grad]
        for p in params:
            if id(p) in seen:
                raise ValueError(f"a parameter appears in more than one of model.param_groups() ({name})")
            seen.add(id(p))
        decay = [p for p in params if not exempt(p)]
        no_decay = [p for p in params if exempt(p)]
        for suffix, plist, wd in (("decay", decay, train.weight_decay), ("no_decay", no_decay, 0.0)):
            if plist:
                out.append({"params": plist, "lr": lr, "base_lr": lr, "weight_decay": wd,
                            "name": f"{name}/{suffix}"})
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if trainable - seen:
        raise ValueError(f"{len(trainable - seen)} trainable parameters are in none of model.param_groups()")
    return out


def build_optimizer(model: nn.Module, train: TrainConfig, pretrained_backbone: bool) -> torch.optim.AdamW:
    """AdamW over `optimizer_groups`. The fused implementation where every parameter is a float tensor on
    CPU or CUDA: one kernel for all tensors instead of a dozen small ops per tensor (at the demo's size,
    363 tensors, the per-tensor loop was 23 ms of a training step, the fused step 4 ms)."""
    groups = optimizer_groups(model, train, pretrained_backbone)
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params)
    return torch.optim.AdamW(groups, lr=train.lr_new, betas=tuple(train.betas), weight_decay=train.weight_decay,
                             fused=fused or None)


def cosine_lr(base_lr: float, min_lr: float, epoch: int, epochs: int) -> float:
    """Cosine decay per epoch, no warm-up: base_lr at epoch 0, towards min_lr at the last epoch.

    lr(e) = min_lr + (base_lr - min_lr) * (1 + cos(pi * e / epochs)) / 2, e = 0 .. epochs-1 (0-based).
    """
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


class CosineEpochSchedule:
    """Sets every group's lr from its `base_lr` at the start of each epoch (state: the epoch).

    lagged=False (ours, `train.lr_schedule: cosine`): epoch e at cosine_lr(..., e, epochs).
    lagged=True (`cosine_lagged`, the authors'): their timm CosineLRScheduler is stepped after each epoch
    with the index of the epoch just finished, so epoch e runs at cosine_lr(..., max(e - 1, 0), epochs):
    epochs 0 and 1 both at the base rate, the last epoch at our second-to-last's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, min_lr: float, epochs: int, lagged: bool = False) -> None:
        self.optimizer, self.min_lr, self.epochs, self.lagged = optimizer, min_lr, epochs, lagged
        self.epoch = -1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        t = max(epoch - 1, 0) if self.lagged else epoch
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(group["base_lr"], self.min_lr, t, self.epochs)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "min_lr": self.min_lr, "epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.min_lr, self.epochs = state["min_lr"], state["epochs"]
        if state["epoch"] >= 0:
            self.set_epoch(state["epoch"])


class ModelEMA:
    """Exponential moving average of a model's parameters (buffers copied): ema = d*ema + (1-d)*w."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_p, p in zip(self.module.parameters(), model.parameters()):
            ema_p.mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)


def all_params(groups: Iterable[dict[str, Any]]) -> list[torch.Tensor]:
    return [p for g in groups for p in g["params"]]
