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
from torch.utils.checkpoint import checkpoint

from remamber.models.interaction import GlobalInteraction, LocalInteraction
from remamber.models.layers import LayerNorm2d, Linear2d
from remamber.models.ss2d import SS2D
from remamber.models.ssm import add_ssm_parameters, resolve_dt_rank, scan_in_orders, scan_in_orders_lean
from remamber.ops import cross_scan_orders, scan_orders
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
        g = self.grid
        pooled = F.interpolate(cube, size=(g, g), mode="bilinear", align_corners=False)
        return F.interpolate(self.mix(pooled), size=cube.shape[2:], mode="bilinear", align_corners=False)

    def mix(self, pooled: torch.Tensor) -> torch.Tensor:
        """The scan at grid resolution: pooled (B, S, grid, grid) -> (B, S, grid, grid)."""
        b, s, g, _ = pooled.shape
        x, z = self.in_proj(pooled.reshape(b, s, g * g)).chunk(2, dim=-1)  # (B, S, width) each
        x = self.act(_depthwise_conv3(x.transpose(1, 2), self.conv2d.weight[:, :, 1]))  # (B, width, S)
        # x, x, flip(x), flip(x), each scanned with its own parameters, un-flipped and summed in fp32 (as the
        # authors); the flips happen inside the scan kernel's indexing
        y = scan_in_orders(self, x, scan_orders("channel", 1, s, x.device))  # (B, width, S)
        y = self.out_norm(y.transpose(1, 2)).to(z.dtype) * self.act(z)  # (B, S, width)
        return self.out_proj(y).reshape(b, s, g, g)


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

    recompute (ModelConfig.twister_recompute): keep little for backward and recompute the rest in it
    (see `_forward_recompute`); same function, equal up to float rounding. Not used when `record` is
    asked for (inspection runs the plain path).
    """

    def __init__(self, dim: int, parts: int, recompute: bool = False, **twisting_kwargs) -> None:
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.twisting = TwistingLayer(dim, parts * dim, **twisting_kwargs)
        self.recompute = recompute

    def forward(
        self, image: torch.Tensor, conditions: list[torch.Tensor], record: dict | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.recompute and record is None:
            return self._forward_recompute(image, conditions)
        parts = [self.norm(image)]
        next_conditions = []
        for cond in conditions:
            if cond.dim() == 2:
                normed = self._normed_vector(cond)
                parts.append(normed[:, :, None, None].expand_as(image))
            else:
                normed = self.norm(cond)
                parts.append(normed)
            next_conditions.append(cond + normed)
        cube = torch.cat(parts, dim=1)  # Eq. 6
        return image + self.twisting(cube, record), next_conditions

    def _normed_vector(self, vec: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(vec, (vec.shape[1],), self.norm.weight, self.norm.bias, self.norm.eps)

    def _part(self, x: torch.Tensor, like: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """One (B, C, h, w) part of the cube, LN(x) with the norm's (weight, bias): for a (B, C) vector
        expanded over h x w; for a map as LayerNorm2d (channels-last layer_norm, permuted back)."""
        n = (x.shape[1],)
        if x.dim() == 2:
            return F.layer_norm(x, n, weight, bias, self.norm.eps)[:, :, None, None].expand_as(like)
        return F.layer_norm(x.permute(0, 2, 3, 1), n, weight, bias, self.norm.eps).permute(0, 3, 1, 2)

    def _forward_recompute(
        self, image: torch.Tensor, conditions: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The block keeping only its stage boundaries for backward; the cube (3C channels) never exists whole.

        channel_spatial (the paper's order), with S = (parts) C and the Spatial Scan's width D = 2C:
          small  = ChannelScan.mix(pool(cube))            (B, S, g, g), checkpointed (pooling is per channel)
          x      = sum_p W_in[:, p] (part_p + up(small_p)) (B, D, h, w): in_proj of cube + CS(cube), one cube
                                                           part at a time, recomputed part by part in backward
          u      = SiLU(conv(x))                          checkpointed
          y      = the four-direction scan of u           `scan_in_orders_lean` (keeps u only)
          out    = image + out_proj(LN(y))                checkpointed
        The other scan orders checkpoint the whole block (cube and Twisting layer).
        """
        next_conditions = [cond + (self._normed_vector(cond) if cond.dim() == 2 else self.norm(cond))
                           for cond in conditions]
        layer = self.twisting
        if layer.scan_order != "channel_spatial":
            def whole(img, *conds):
                cube = torch.cat([self._part(x, img, self.norm.weight, self.norm.bias) for x in (img, *conds)], dim=1)
                return img + layer(cube)
            return checkpoint(whole, image, *conditions, use_reentrant=False), next_conditions
        b, c, h, w = image.shape
        cs, ss = layer.channel_scan, layer.spatial_scan
        g = cs.grid

        def small(img, *conds):
            pooled = torch.cat([F.interpolate(self._part(x, img, self.norm.weight, self.norm.bias), size=(g, g),
                                              mode="bilinear", align_corners=False) for x in (img, *conds)], dim=1)
            return cs.mix(pooled)

        small_out = checkpoint(small, image, *conditions, use_reentrant=False)
        inputs = (image, *conditions)
        n_parts = len(inputs)

        part = _CubeParts(self, n_parts, c, h, w)
        conv = ss.conv2d

        def conv_act(t: torch.Tensor, weight: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
            """SS2D's depthwise conv + SiLU on channels c0:c1 (t holds those channels only)."""
            bias = None if conv.bias is None else conv.bias[c0:c1]
            return ss.act(F.conv2d(t, weight[c0:c1], bias, conv.stride, conv.padding, conv.dilation, c1 - c0))

        u = _ProjectParts.apply(part, conv_act, *inputs, small_out, self.norm.weight, self.norm.bias,
                                ss.in_proj.weight, conv.weight)
        d = u.shape[1]
        y = scan_in_orders_lean(ss, u.reshape(b, d, h * w), cross_scan_orders(h, w, u.device))
        norm = ss.out_norm

        def project_out(t: torch.Tensor, img: torch.Tensor, norm_weight, norm_bias, proj_weight) -> torch.Tensor:
            t = F.layer_norm(t.permute(0, 2, 3, 1), norm.normalized_shape, norm_weight, norm_bias, norm.eps)
            return img + F.conv2d(t.permute(0, 3, 1, 2), proj_weight[:, :, None, None])

        out = _RowChunks.apply(project_out, 2, y.reshape(b, d, h, w), image, norm.weight, norm.bias,
                               ss.out_proj.weight)
        return out, next_conditions


# elements (batch x channels x pixels) of one piece recomputed at a time in backward (2**18 fp32: 1 MiB)
PIECE_ELEMENTS = 2**18


def _spans(total: int, per_unit: int) -> list[tuple[int, int]]:
    """[0, total) cut into spans of about PIECE_ELEMENTS // per_unit units."""
    step = max(1, min(total, PIECE_ELEMENTS // max(1, per_unit)))
    return [(i, min(i + step, total)) for i in range(0, total, step)]


def _leaves(inputs, needs) -> list:
    return [t.detach().requires_grad_(bool(n)) if isinstance(t, torch.Tensor) else t for t, n in zip(inputs, needs)]


class _CubeParts:
    """The cube's parts after the Channel Scan's residual, part(p, *args) = LN(args[p]) + up(small[:, part p]),
    args = (image, *conditions, small (B, P*C, g, g), LN weight, LN bias); a (B, C) condition is expanded."""

    def __init__(self, block: "TwisterBlock", n_parts: int, c: int, h: int, w: int) -> None:
        self.block, self.n_parts, self.c, self.h, self.w = block, n_parts, c, h, w

    def up(self, p: int, small: torch.Tensor) -> torch.Tensor:
        # channels-last, like the LayerNorm's output: their sum is one contiguous pass
        small_p = small[:, p * self.c:(p + 1) * self.c].contiguous(memory_format=torch.channels_last)
        return F.interpolate(small_p, size=(self.h, self.w), mode="bilinear", align_corners=False)

    def __call__(self, p: int, *args) -> torch.Tensor:
        img, small, ln_weight, ln_bias = args[0], *args[self.n_parts:]
        return self.block._part(args[p], img, ln_weight, ln_bias) + self.up(p, small)


class _ProjectParts(torch.autograd.Function):
    """post(sum_p W[:, p] @ parts(p, *args)) for `_CubeParts` parts (B, C, H, W), W (D, P*C) and a
    per-channel `post(x[:, c0:c1], post_weight, c0, c1)`; inputs = (*args, W, post_weight). Keeps only
    the inputs for backward. Backward recomputes x without graph, runs post's backward a few channels at a
    time (-> gx), drops x, then per part: g_a = W_p^T gx, the upsampled term's backward, and the
    LayerNorm's backward a few rows at a time."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # backward recomputes under the forward's autocast state
    def forward(ctx, parts, post, *inputs):
        with torch.no_grad():
            x = _project_parts(parts, inputs[:-2], inputs[-2])
            out = post(x, inputs[-1], 0, x.shape[1])
        ctx.parts, ctx.post = parts, post
        ctx.save_for_backward(*inputs)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, gout):
        inputs = ctx.saved_tensors
        parts = ctx.parts
        n = parts.n_parts
        args, weight, post_weight = inputs[:-2], inputs[-2], inputs[-1]
        needs = ctx.needs_input_grad[2:]
        with torch.no_grad():
            x = _project_parts(parts, args, weight)
        b, d, h, w = x.shape
        gx = torch.empty_like(x)
        g_post = torch.zeros_like(post_weight) if needs[-1] else None
        for c0, c1 in _spans(d, b * h * w):
            with torch.enable_grad():
                xc = x[:, c0:c1].detach().requires_grad_()
                pw = post_weight.detach().requires_grad_(bool(needs[-1]))
                got = torch.autograd.grad(ctx.post(xc, pw, c0, c1), [xc, pw] if needs[-1] else [xc], gout[:, c0:c1])
            gx[:, c0:c1] = got[0]
            if needs[-1]:
                g_post += got[1]
            del xc, pw, got
        del x
        small, ln_weight, ln_bias = args[n:]
        eps = parts.block.norm.eps
        c = parts.c
        grads: list = [None] * n
        g_small = torch.zeros_like(small) if needs[n] else None
        g_ln_w, g_ln_b = torch.zeros_like(ln_weight), torch.zeros_like(ln_bias)
        g_weight = torch.zeros_like(weight)
        for p in range(n):
            w_p = weight[:, p * c:(p + 1) * c]
            g_a = torch.bmm(w_p.t().expand(b, -1, -1), gx.reshape(b, d, h * w)).reshape(b, c, h, w)
            with torch.enable_grad():  # the upsampled Channel Scan term
                s_leaf = small.detach().requires_grad_(bool(needs[n]))
                up = parts.up(p, s_leaf)
                g_w = torch.bmm(gx.reshape(b, d, h * w), up.detach().reshape(b, c, h * w).transpose(1, 2)).sum(0)
                if needs[n]:
                    g_small += torch.autograd.grad(up, s_leaf, g_a)[0]
            del up, s_leaf
            x_p = args[p]
            if x_p.dim() == 2:  # a (B, C) condition, LayerNorm'd then expanded over the map
                with torch.enable_grad():
                    leaves = [x_p.detach().requires_grad_(), ln_weight.detach().requires_grad_(),
                              ln_bias.detach().requires_grad_()]
                    vec = F.layer_norm(leaves[0], (c,), leaves[1], leaves[2], eps)
                    g_w += torch.einsum("bd,bc->dc", gx.sum((2, 3)), vec.detach())
                    got = torch.autograd.grad(vec, leaves, g_a.sum((2, 3)))
                grads[p] = got[0]
            else:
                g_map = torch.empty_like(x_p) if needs[p] else None
                got = [None, torch.zeros_like(ln_weight), torch.zeros_like(ln_bias)]
                for r0, r1 in _spans(h, b * max(c, d) * w):
                    with torch.enable_grad():
                        leaves = [x_p[:, :, r0:r1].detach().requires_grad_(), ln_weight.detach().requires_grad_(),
                                  ln_bias.detach().requires_grad_()]
                        normed = F.layer_norm(leaves[0].permute(0, 2, 3, 1), (c,), leaves[1], leaves[2], eps)
                        g_rows = gx[:, :, r0:r1].permute(0, 2, 3, 1).reshape(b, -1, d)  # (B, rows*w, D)
                        g_w += torch.bmm(g_rows.transpose(1, 2), normed.detach().reshape(b, -1, c)).sum(0)
                        g_in = torch.autograd.grad(normed, leaves, g_a[:, :, r0:r1].permute(0, 2, 3, 1))
                    if g_map is not None:
                        g_map[:, :, r0:r1] = g_in[0]
                    got[1] += g_in[1]
                    got[2] += g_in[2]
                    del leaves, normed, g_rows, g_in
                grads[p] = g_map
            g_ln_w += got[1]
            g_ln_b += got[2]
            g_weight[:, p * c:(p + 1) * c] = g_w
            del g_a, got
        for i in range(n):
            if not needs[i]:
                grads[i] = None
        return (None, None, *grads, g_small, g_ln_w if needs[n + 1] else None, g_ln_b if needs[n + 2] else None,
                g_weight if needs[-2] else None, g_post)


def _project_parts(part: _CubeParts, args, weight: torch.Tensor) -> torch.Tensor:
    """sum_p W[:, p] @ part(p, *args): (B, D, H, W), accumulated in place."""
    c = part.c
    x = None
    for p in range(part.n_parts):
        a = part(p, *args)
        b, _, h, w = a.shape
        w_p = weight[:, p * c:(p + 1) * c]
        if x is None:
            x = torch.bmm(w_p.expand(b, -1, -1), a.reshape(b, c, h * w))
        else:
            x.baddbmm_(w_p.expand(b, -1, -1).to(x.dtype), a.reshape(b, c, h * w).to(x.dtype))  # (AMP: one dtype)
    return x.reshape(b, -1, h, w)


class _RowChunks(torch.autograd.Function):
    """fn(*maps, *params) for a fn that acts on each pixel alone (maps: the first `n_maps` inputs,
    (B, *, H, W)), keeping only the inputs for backward; backward recomputes and differentiates a few
    rows at a time."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # backward recomputes under the forward's autocast state
    def forward(ctx, fn, n_maps, *inputs):
        with torch.no_grad():
            out = fn(*inputs)
        ctx.fn, ctx.n_maps = fn, n_maps
        ctx.save_for_backward(*inputs)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, gout):
        inputs = ctx.saved_tensors
        n_maps = ctx.n_maps
        needs = ctx.needs_input_grad[2:]
        grads: list = [torch.empty_like(t) if n else None for t, n in zip(inputs[:n_maps], needs)]
        grads += [torch.zeros_like(t) if n else None for t, n in zip(inputs[n_maps:], needs[n_maps:])]
        b, _, h, w = gout.shape
        width = max(t.shape[1] for t in inputs[:n_maps])
        wanted = [i for i, n in enumerate(needs) if n]
        for r0, r1 in _spans(h, b * width * w):
            with torch.enable_grad():
                sliced = [t[:, :, r0:r1] if i < n_maps else t for i, t in enumerate(inputs)]
                leaves = _leaves(sliced, needs)
                out = ctx.fn(*leaves)
                got = torch.autograd.grad(out, [leaves[i] for i in wanted], gout[:, :, r0:r1])
            for i, gi in zip(wanted, got):
                if i < n_maps:
                    grads[i][:, :, r0:r1] = gi
                else:
                    grads[i] += gi
        return (None, None, *grads)


class TwisterStage(nn.Module):
    """The fusion after one backbone stage: interactions once, then `depth` Twister blocks.

    forward(image (B, C, h, w), words (B, L, Ct), pooled (B, Ct), text_mask (B, L) bool | None,
            record dict | None) -> (B, C, h, w).
    record receives: interaction_map (B, L, h, w) when the local branch exists, and for the last
    block cube / cube_after_channel / cube_after_spatial plus cube_slices {name: (start, stop)}.
    recompute: the memory-saving path (TwisterBlock; the local interaction is checkpointed), unused
    when a record is asked for.
    """

    def __init__(
        self,
        dim: int,
        text_dim: int,
        max_text_len: int,
        depth: int = 2,
        interaction: str = "global_local",
        local_dim: int = 512,
        recompute: bool = False,
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
            [TwisterBlock(dim, len(names), recompute=recompute, **twisting_kwargs) for _ in range(depth)]
        )
        self.recompute = recompute

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
            if self.recompute and record is None:  # keeps only F~_c; the interaction is recomputed in backward
                local = checkpoint(lambda *a: self.local_interaction(*a)[0], image, words, text_mask,
                                   use_reentrant=False)
            else:
                local, corr = self.local_interaction(image, words, text_mask)
                if record is not None:
                    record["interaction_map"] = corr
            conditions.append(local)
        block_record = {} if record is not None else None
        for block in self.blocks:
            if block_record is not None:
                block_record.clear()
            image, conditions = block(image, conditions, block_record)
        if record is not None:
            record.update(block_record)
            record["cube_slices"] = {n: (i * self.dim, (i + 1) * self.dim) for i, n in enumerate(self.cube_parts)}
        return image
