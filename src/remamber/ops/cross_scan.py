"""Cross-scans: turn a 2-D map into four 1-D scan sequences and back (VMamba SS2D), and the
bidirectional 1-D pair used by the Twister channel scan.

All functions are differentiable through plain indexing and flips.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["cross_scan", "cross_merge", "bidirectional_scan", "bidirectional_merge", "cross_scan_orders", "scan_orders"]


def _require_dims(x: torch.Tensor, ndim: int, name: str, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected shape {layout} ({ndim} dims), got {tuple(x.shape)}")


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """Four scan orders of a feature map.

    x: (B, C, H, W) -> (B, 4, C, H*W) where direction
      0: row-major flatten (index h*W + w),
      1: column-major flatten (index w*H + h),
      2: direction 0 reversed,
      3: direction 1 reversed.
    """
    _require_dims(x, 4, "cross_scan x", "(B, C, H, W)")
    b, c, h, w = x.shape
    row = x.reshape(b, c, h * w)
    col = x.transpose(2, 3).reshape(b, c, h * w)
    fwd = torch.stack([row, col], dim=1)  # (B, 2, C, L)
    return torch.cat([fwd, fwd.flip(-1)], dim=1)


def cross_merge(y: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Inverse permutations of `cross_scan`, summed.

    y: (B, 4, C, H*W) -> (B, C, H*W) in row-major order. `height`/`width` give the map size;
    when omitted the map is taken as square (H = W = sqrt(H*W)).
    """
    _require_dims(y, 4, "cross_merge y", "(B, 4, C, H*W)")
    b, k, c, length = y.shape
    if k != 4:
        raise ValueError(f"cross_merge y: expected 4 directions in dim 1 of (B, 4, C, H*W), got shape {tuple(y.shape)}")
    height, width = _map_size(length, height, width, "cross_merge")
    undone = y[:, 0:2] + y[:, 2:4].flip(-1)  # (B, 2, C, L): reversed directions back to forward order
    row = undone[:, 0]
    col = undone[:, 1].reshape(b, c, width, height).transpose(2, 3).reshape(b, c, length)
    return row + col


def _map_size(length: int, height: int | None, width: int | None, who: str) -> tuple[int, int]:
    if height is None and width is None:
        side = int(round(length**0.5))
        if side * side != length:
            raise ValueError(f"{who}: sequence length {length} is not a square; pass height= and width=")
        return side, side
    if height is None:
        height = length // width  # type: ignore[operator]
    if width is None:
        width = length // height
    if height * width != length:
        raise ValueError(f"{who}: height*width = {height}*{width} != sequence length {length}")
    return height, width


def bidirectional_scan(x: torch.Tensor) -> torch.Tensor:
    """Forward and reversed copies of a sequence: x (B, C, L) -> (B, 2, C, L)."""
    _require_dims(x, 3, "bidirectional_scan x", "(B, C, L)")
    return torch.stack([x, x.flip(-1)], dim=1)


def bidirectional_merge(y: torch.Tensor) -> torch.Tensor:
    """Undo the reversal of direction 1 and sum: y (B, 2, C, L) -> (B, C, L)."""
    _require_dims(y, 4, "bidirectional_merge y", "(B, 2, C, L)")
    if y.shape[1] != 2:
        raise ValueError(f"bidirectional_merge y: expected 2 directions in dim 1 of (B, 2, C, L), got shape {tuple(y.shape)}")
    return y[:, 0] + y[:, 1].flip(-1)


@functools.lru_cache(maxsize=64)
def _orders_cpu(kind: str, height: int, width: int) -> torch.Tensor:
    length = height * width
    row = torch.arange(length)
    if kind == "cross":  # the four orders of `cross_scan`
        col = row.reshape(height, width).t().reshape(length)  # step w*H + h visits h*W + w
        out = torch.stack([row, col, row.flip(0), col.flip(0)])
    else:  # "channel": the Twister channel scan's x, x, flip(x), flip(x)
        out = torch.stack([row, row, row.flip(0), row.flip(0)])
    return out


def cross_scan_orders(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(4, H*W) int64 map positions visited by the four directions of `cross_scan` (for
    `directional_selective_scan`): row-major, column-major, and both reversed."""
    return scan_orders("cross", height, width, device)


def scan_orders(kind: str, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Cached scan orders: "cross" (see `cross_scan_orders`) or "channel" (a sequence of H*W steps
    scanned forward twice and reversed twice, the Twister's channel scan). Do not modify in place."""
    if kind not in ("cross", "channel"):
        raise ValueError(f"scan_orders: unknown kind {kind!r}; known: cross, channel")
    out = _orders_cpu(kind, int(height), int(width))
    return out if torch.device(device).type == "cpu" else out.to(device)
