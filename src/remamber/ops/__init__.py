"""Scan primitives: the selective scan (pure PyTorch, numba CPU kernel, mamba_ssm CUDA dispatch)
and the cross-scans that turn 2-D maps / channel sequences into scan sequences and back."""

from .cross_scan import bidirectional_merge, bidirectional_scan, cross_merge, cross_scan, cross_scan_orders, scan_orders
from .selective_scan import ScanTape, available_backends, directional_selective_scan, selective_scan

__all__ = [
    "selective_scan",
    "directional_selective_scan",
    "ScanTape",
    "cross_scan_orders",
    "scan_orders",
    "available_backends",
    "cross_scan",
    "cross_merge",
    "bidirectional_scan",
    "bidirectional_merge",
]
