"""The Twisting layer and the Mamba Twister stage (paper Sec. 3.5, Eq. 4-7).

Reading order, as in the paper:
  1. Eq. 4/5  GlobalInteraction / LocalInteraction (interaction.py) give F~_t and F~_c, once per stage.
  2. Eq. 6    cube = [F_i, F~_t, F~_c] along channels -> (B, 3C, h, w), each part after one LayerNorm
              shared by the three inputs of the block.
  3. Eq. 7    F_out = SSM_spatial(SSM_channel(cube)):
              ChannelScan: the cube resampled to a fixed G x G grid; its channels are the sequence and
              the G*G pooled positions the features of each step (a gated SS block scanning
              [x, x, flip(x), flip(x)] with four parameter sets, as the authors' code);
              resampled back to h x w and added to the cube as a residual.
              SpatialScan: an SS2D whose in_proj maps 3C -> 2C, four-direction scan, out_proj 2C -> C.
  4. The block adds F_out to the image path (residual); two blocks per stage. As in the authors'
     stage, the second block's conditions are g + LN1(g) and l + LN1(l) (LN1: the first block's norm).

Scan-order ablations (paper Table 3), with the minimal projections where shapes must meet:
  channel_spatial  out = SS(cube + CS(cube))                     (the paper's default)
  spatial_channel  s = SS(cube); out = s + CS(s)                 (channel scan over the C channels of s)
  parallel         out = SS(cube) + P(cube + CS(cube))           P: Linear2d 3C -> C, no bias
  channel_only     out = P(cube + CS(cube))                      P: Linear2d 3C -> C, no bias
  spatial_only     out = SS(cube)
Interaction ablations (Table 4): global_only / local_only build a 2C cube [F_i, F~_t] / [F_i, F~_c]
and create no parameters of the missing branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from remamber.models.interaction import GlobalInteraction, LocalInteraction
from remamber.models.layers import LayerNorm2d, Linear2d
from remamber.models.ss2d import SS2D
from remamber.models.ssm import add_ssm_parameters, resolve_dt_rank, scan_in_orders
from remamber.ops import scan_orders
from remamber.vocabulary import INTERACTIONS, SCAN_ORDERS

__all__ = ["SCAN_ORDERS", "INTERACTIONS", "ChannelScan", "TwistingLayer", "TwisterBlock", "TwisterStage"]



class ChannelScan(nn.Module):
    """SSM along the channel axis: (B, S, h, w) -> (B, S, h, w) (the residual branch only).

    The map is resampled (bilinear) to grid x grid; the S channels become a sequence of S steps with
    grid^2 features each. in_proj (grid^2 -> 2 x width) splits into x and z; x goes through a
    depthwise conv along the sequence and SiLU; four selective scans, each with its own parameters,
    run over [x, x, flip(x), flip(x)] and their outputs (un-flipped) are summed in fp32; then
    LayerNorm and the gate SiLU(z); out_proj (width -> grid^2); resampled back to h x w.

    This is the authors' channel scan (an SS2D over a 1 x S map whose "bidirectional" cross-scan
    copies each direction twice). Their conv is 3x3 over that 1-pixel-high map: only the kernel's
    middle row ever meets data (the outer rows meet zero padding and get zero gradient), so we keep
    the 3x3 weight for the authors' parameter count and apply its middle row as a width-3 1-D conv.
    """

    directions = 4

    def __init__(self, grid: int = 16, width: int = 512, d_state: int = 1, dt_rank: int | str = "auto") -> None:
        super().__init__()
        self.grid = grid
        features = grid * grid
        self.in_proj = nn.Linear(features, 2 * width, bias=False)
        self.conv2d = nn.Conv2d(width, width, kernel_size=3, padding=1, groups=width, bias=False)
        self.act = nn.SiLU()
        add_ssm_parameters(self, self.directions, width, d_state, resolve_dt_rank(dt_rank, features))
        self.out_norm = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, features, bias=False)

    def forward(self, cube: torch.Tensor) -> torch.Tensor:
        b, s, h, w = cube.shape
        g = self.grid
        pooled = F.interpolate(cube, size=(g, g), mode="bilinear", align_corners=False)
        x, z = self.in_proj(pooled.reshape(b, s, g * g)).chunk(2, dim=-1)  # (B, S, width) each
        x = self.act(_depthwise_conv3(x.transpose(1, 2), self.conv2d.weight[:, :, 1]))  # (B, width, S)
        # x, x, flip(x), flip(x), each scanned with its own parameters, un-flipped and summed in fp32 (as the
        # authors); the flips happen inside the scan kernel's indexing
        y = scan_in_orders(self, x, scan_orders("channel", 1, s, x.device))  # (B, width, S)
        y = self.out_norm(y.transpose(1, 2)).to(z.dtype) * self.act(z)  # (B, S, width)
        out = self.out_proj(y).reshape(b, s, g, g)
        return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)


def _depthwise_conv3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Width-3 depthwise conv along the last axis with zero padding: x (B, D, S), weight (D, 1, 3).

    Same result as the Conv1d it belongs to; three shifted multiply-adds are much faster on CPU than
    the grouped convolution kernel for these short sequences.
    """
    xp = F.pad(x, (1, 1))
    w = weight[:, 0, :, None]  # (D, 3, 1)
    return xp[..., :-2] * w[:, 0] + xp[..., 1:-1] * w[:, 1] + xp[..., 2:] * w[:, 2]


class TwistingLayer(nn.Module):
    """cube (B, P*C, h, w) -> (B, C, h, w) by the configured scan order (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        cube_dim: int,
        scan_order: str = "channel_spatial",
        grid: int = 16,
        width: int = 512,
        d_state: int = 1,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
    ) -> None:
        super().__init__()
        if scan_order not in SCAN_ORDERS:
            raise ValueError(f"unknown scan_order {scan_order!r}; valid: {list(SCAN_ORDERS)}")
        self.scan_order = scan_order
        if scan_order != "spatial_only":
            self.channel_scan = ChannelScan(grid=grid, width=width, d_state=d_state)
        if scan_order != "channel_only":
            self.spatial_scan = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, d_in=cube_dim)
        if scan_order in ("parallel", "channel_only"):
            self.channel_proj = Linear2d(cube_dim, dim, bias=False)

    def forward(self, cube: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        order = self.scan_order
        after_channel = after_spatial = None
        if order == "channel_spatial":
            after_channel = cube + self.channel_scan(cube)
            out = after_spatial = self.spatial_scan(after_channel)
        elif order == "spatial_channel":
            after_spatial = self.spatial_scan(cube)
            out = after_channel = after_spatial + self.channel_scan(after_spatial)
        elif order == "parallel":
            after_channel = cube + self.channel_scan(cube)
            after_spatial = self.spatial_scan(cube)
            out = after_spatial + self.channel_proj(after_channel)
        elif order == "channel_only":
            after_channel = cube + self.channel_scan(cube)
            out = self.channel_proj(after_channel)
        else:  # spatial_only
            out = after_spatial = self.spatial_scan(cube)
        if record is not None:
            record.update(cube=cube, cube_after_channel=after_channel, cube_after_spatial=after_spatial)
        return out


class TwisterBlock(nn.Module):
    """One Mamba Twister block: img (B, C, h, w) + Twisting([LN(img), LN(F~_t), LN(F~_c)]).

    `conditions` are the (B, C, h, w) text parts of the cube (global and/or local), or a (B, C)
    vector for the global part, which is normalised before expansion (same result, less work).
    Returns the new image and the conditions for the next block, cond + LN(cond): the authors'
    block applies its residual to every input of the list, and the Twisting layer hands the
    normalised conditions through unchanged.
    """

    def __init__(self, dim: int, parts: int, **twisting_kwargs) -> None:
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.twisting = TwistingLayer(dim, parts * dim, **twisting_kwargs)

    def forward(
        self, image: torch.Tensor, conditions: list[torch.Tensor], record: dict | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, c, h, w = image.shape
        parts = [self.norm(image)]
        next_conditions = []
        for cond in conditions:
            if cond.dim() == 2:
                vec = F.layer_norm(cond, (c,), self.norm.weight, self.norm.bias, self.norm.eps)
                parts.append(vec[:, :, None, None].expand(b, c, h, w))
                next_conditions.append(cond + vec)
            else:
                normed = self.norm(cond)
                parts.append(normed)
                next_conditions.append(cond + normed)
        cube = torch.cat(parts, dim=1)  # Eq. 6
        return image + self.twisting(cube, record), next_conditions


class TwisterStage(nn.Module):
    """The fusion after one backbone stage: interactions once, then `depth` Twister blocks.

    forward(image (B, C, h, w), words (B, L, Ct), pooled (B, Ct), text_mask (B, L) bool | None,
            record dict | None) -> (B, C, h, w).
    record receives: interaction_map (B, L, h, w) when the local branch exists, and for the last
    block cube / cube_after_channel / cube_after_spatial plus cube_slices {name: (start, stop)}.
    """

    def __init__(
        self,
        dim: int,
        text_dim: int,
        max_text_len: int,
        depth: int = 2,
        interaction: str = "global_local",
        local_dim: int = 512,
        **twisting_kwargs,
    ) -> None:
        super().__init__()
        if interaction not in INTERACTIONS:
            raise ValueError(f"unknown interaction {interaction!r}; valid: {list(INTERACTIONS)}")
        names = ["image"]
        if interaction in ("global_local", "global_only"):
            self.global_interaction = GlobalInteraction(text_dim, dim)
            names.append("global_text")
        if interaction in ("global_local", "local_only"):
            self.local_interaction = LocalInteraction(dim, text_dim, max_text_len, local_dim)
            names.append("local")
        self.cube_parts = tuple(names)
        self.dim = dim
        self.blocks = nn.ModuleList(
            [TwisterBlock(dim, len(names), **twisting_kwargs) for _ in range(depth)]
        )

    def forward(
        self,
        image: torch.Tensor,
        words: torch.Tensor,
        pooled: torch.Tensor,
        text_mask: torch.Tensor | None,
        record: dict | None = None,
    ) -> torch.Tensor:
        conditions: list[torch.Tensor] = []
        if hasattr(self, "global_interaction"):
            conditions.append(self.global_interaction(pooled))  # (B, C), expanded in the block
        if hasattr(self, "local_interaction"):
            local, corr = self.local_interaction(image, words, text_mask)
            conditions.append(local)
            if record is not None:
                record["interaction_map"] = corr
        block_record = {} if record is not None else None
        for block in self.blocks:
            if block_record is not None:
                block_record.clear()
            image, conditions = block(image, conditions, block_record)
        if record is not None:
            record.update(block_record)
            record["cube_slices"] = {n: (i * self.dim, (i + 1) * self.dim) for i, n in enumerate(self.cube_parts)}
        return image
