"""SS2D (VMamba's 2-D selective scan) and the VSS block, channel-first.

Module and parameter names match MzeroMiko/VMamba (forward type v05_noz, ln2d norm) so that the
official ImageNet checkpoints load key for key.
"""

from __future__ import annotations

import torch
from torch import nn

from remamber.models.layers import DropPath, LayerNorm2d, Linear2d, Mlp2d
from remamber.models.ssm import add_ssm_parameters, resolve_dt_rank, scan_in_orders
from remamber.ops import cross_scan_orders

__all__ = ["SS2D", "VSSBlock"]


class SS2D(nn.Module):
    """2-D selective scan without gate (VMamba "noz").

    (B, d_in, H, W) -> in_proj (d_in -> d_inner) -> depthwise 3x3 conv -> SiLU -> four-direction
    cross-scan (row-major, column-major, both reversed; own x_proj/dt_proj/A/D per direction) ->
    un-permute and sum -> LayerNorm -> out_proj (d_inner -> d_model) -> (B, d_model, H, W).

    d_in defaults to d_model; the Twister's Spatial Scan uses d_in = 3C (the feature cube).
    """

    directions = 4

    def __init__(
        self,
        d_model: int,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        d_in: int | None = None,
    ) -> None:
        super().__init__()
        d_inner = int(ssm_ratio * d_model)
        self.d_model, self.d_inner, self.d_in = d_model, d_inner, d_in or d_model
        self.in_proj = Linear2d(self.d_in, d_inner, bias=False)
        self.act = nn.SiLU()
        self.conv2d = nn.Conv2d(
            d_inner, d_inner, kernel_size=d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias
        )
        add_ssm_parameters(self, self.directions, d_inner, d_state, resolve_dt_rank(dt_rank, d_model))
        self.out_norm = LayerNorm2d(d_inner)
        self.out_proj = Linear2d(d_inner, d_model, bias=False)

    def project_in(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d_in, H, W) -> (B, d_inner, H, W): the scan input u."""
        return self.act(self.conv2d(self.in_proj(x)))

    def project_out(self, y: torch.Tensor) -> torch.Tensor:
        """(B, d_inner, H, W) -> (B, d_model, H, W)."""
        return self.out_proj(self.out_norm(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.project_in(x)
        b, d, h, w = u.shape
        # the four cross-scan directions, summed in fp32 (as VMamba), re-ordered inside the scan kernel
        y = scan_in_orders(self, u.reshape(b, d, h * w), cross_scan_orders(h, w, u.device))
        return self.project_out(y.reshape(b, d, h, w))


class VSSBlock(nn.Module):
    """VMamba block: x + DropPath(SS2D(LN(x))), then x + DropPath(MLP(LN(x))). (B, C, H, W) in/out."""

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.op = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank)
        self.drop_path = DropPath(drop_path)
        self.mlp_ratio = mlp_ratio
        if mlp_ratio > 0:
            self.norm2 = LayerNorm2d(dim)
            self.mlp = Mlp2d(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp_ratio > 0:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x
