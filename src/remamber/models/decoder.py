"""Segmentation decoders: stage features (shallowest first) -> one logit map at the input size.

conv  (paper Sec. 3.7, authors' ConvDecoder): from the deepest stage up, a conv block mixes each
      stage with the deeper map resampled to that stage's size; a neck (3x3 conv-BN-ReLU, x2
      upsample, 3x3 conv-BN-ReLU, upsample, 3x3 conv -> 1) brings it to the input resolution.
mamba (the authors' later Mamba decoder, simplified): the same topology with VSS blocks in place
      of the conv blocks (a 1x1 projection + LayerNorm to the hidden width, then VSS blocks).
Resampling goes to explicit sizes, never by a fixed factor, so any input size works.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from remamber.models.layers import LayerNorm2d, Linear2d
from remamber.models.ss2d import VSSBlock

__all__ = [
    "DECODERS", "ConvBlock", "ConvDecoder", "LogitHead", "MambaDecoder", "build_decoder", "he_normal_fan_out_init",
]

DECODERS = ("conv", "mamba")


class ConvBlock(nn.Module):
    """(B, in, h, w) -> (B, out, h, w): 1x1 conv-BN-Hardswish, depthwise 3x3-BN-Hardswish, 1x1 conv-BN."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_dim, in_dim, 1, bias=False), nn.BatchNorm2d(in_dim), nn.Hardswish(),
            nn.Conv2d(in_dim, in_dim, 3, padding=1, groups=in_dim, bias=False), nn.BatchNorm2d(in_dim),
            nn.Hardswish(),
            nn.Conv2d(in_dim, out_dim, 1, bias=False), nn.BatchNorm2d(out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class VSSMixer(nn.Module):
    """(B, in, h, w) -> (B, out, h, w): Linear2d + LayerNorm2d to `out`, then `depth` VSS blocks."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 1, **ssm_kwargs) -> None:
        super().__init__()
        self.proj = Linear2d(in_dim, out_dim, bias=False)
        self.norm = LayerNorm2d(out_dim)
        self.blocks = nn.Sequential(*[VSSBlock(out_dim, **ssm_kwargs) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.norm(self.proj(x)))


class LogitHead(nn.Conv2d):
    """(B, C, H, W) -> (B, 1, H, W): a 3x3 convolution to one logit, padding 1 (an `nn.Conv2d`: same
    parameters, state-dict keys and initialisation).

    Computed as one 1x1 convolution to the nine taps' partial sums (B, 9, H, W), then the nine maps
    shifted into place and added: the same sums up to float rounding, and on CPU several times faster
    in forward and backward than the direct kernel, which handles a single output channel poorly
    (demo twister at 48 px: 37 of about 330 ms per training step went to this one layer).

    forward(x, size) is head(resize(x, size)) with the bilinear resize moved after the 1x1 convolution:
    both are linear maps acting on different axes (channels, pixels), so they commute; resizing 9 maps
    instead of C, and convolving before upsampling, does a quarter of the work at twice the size.
    """

    def __init__(self, in_dim: int) -> None:
        super().__init__(in_dim, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """x (B, C, h, w) -> (B, 1, H, W), (H, W) = size or (h, w)."""
        taps = self.weight[0].reshape(x.shape[1], 9).t()  # (9, C): tap (i, j) at row 3 * i + j
        partial = F.conv2d(x, taps[:, :, None, None])  # (B, 9, h, w)
        if size is not None:
            partial = _resize(partial, size)
        h, w = partial.shape[-2:]
        partial = F.pad(partial, (1, 1, 1, 1))  # (B, 9, H + 2, W + 2)
        # out[y, x] = sum over taps (i, j) of partial_(i, j)[y + i - 1, x + j - 1]: padded offsets i, j
        out = self.bias.view(1, 1, 1, 1)
        for i in range(3):
            for j in range(3):
                out = out + partial[:, 3 * i + j:3 * i + j + 1, i:i + h, j:j + w]
        return out


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class _Decoder(nn.Module):
    """Shared top-down path; subclasses provide `mixers` (deepest first) and the neck."""

    def __init__(self, dims: list[int], hidden: int, make_mixer) -> None:
        super().__init__()
        deep_to_shallow = list(reversed(dims))
        mixers = [make_mixer(deep_to_shallow[0], hidden)]
        mixers += [make_mixer(d + hidden, hidden) for d in deep_to_shallow[1:-1]]
        self.mixers = nn.ModuleList(mixers)
        self.neck_in = nn.Sequential(
            nn.Conv2d(hidden + dims[0], hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU()
        )
        self.neck_mid = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU())
        self.head = LogitHead(hidden)

    def forward(self, features: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        """features: [(B, C_1, h_1, w_1), ..., (B, C_4, h_4, w_4)] shallowest first -> (B, 1, H, W)."""
        deep = list(reversed(features))
        x = self.mixers[0](deep[0])
        for mixer, skip in zip(self.mixers[1:], deep[1:-1]):
            x = mixer(torch.cat([_resize(x, skip.shape[-2:]), skip], dim=1))
        skip = deep[-1]
        # the neck's 3x3 convolutions run in channels-last layout: on CPU (oneDNN) forward + backward
        # of the demo's neck take ~0.75x the time of NCHW; same results up to float rounding
        x = torch.cat([_resize(x, skip.shape[-2:]), skip], dim=1).contiguous(memory_format=torch.channels_last)
        x = self.neck_in(x)
        half = ((out_size[0] + 1) // 2, (out_size[1] + 1) // 2)
        x = self.neck_mid(_resize(x, half))
        return self.head(x, out_size)  # = head(_resize(x, out_size)), resized after the head's 1x1 part


class ConvDecoder(_Decoder):
    """Authors' conv decoder; hidden width 4 x C_1 (512 for VMamba-B)."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__(dims, 4 * dims[0], ConvBlock)


class MambaDecoder(_Decoder):
    """The conv decoder's topology with VSS blocks as mixers."""

    def __init__(self, dims: list[int], depth: int = 1, **ssm_kwargs) -> None:
        super().__init__(dims, 4 * dims[0], lambda i, o: VSSMixer(i, o, depth=depth, **ssm_kwargs))


def he_normal_fan_out_init(module: nn.Module) -> None:
    """The authors' decoder init, for `decoder.apply(...)`: inside each conv block, conv weights
    ~ N(0, 2 / fan_out) with fan_out = k * k * out / groups, BatchNorm (1, 0). The neck and head keep
    PyTorch's defaults, as in yyh-rain-song/ReMamber's ConvDecoder."""
    if not isinstance(module, ConvBlock):
        return
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_decoder(kind: str, dims: list[int], **ssm_kwargs) -> nn.Module:
    if kind == "conv":
        return ConvDecoder(dims)
    if kind == "mamba":
        return MambaDecoder(dims, **ssm_kwargs)
    raise ValueError(f"unknown decoder {kind!r}; valid: {list(DECODERS)}")
