"""cross_scan / cross_merge and the bidirectional pair against explicit index arithmetic."""

from __future__ import annotations

import pytest
import torch

from remamber.ops import bidirectional_merge, bidirectional_scan, cross_merge, cross_scan


def expected_cross_scan(x: torch.Tensor) -> torch.Tensor:
    """Loops over (h, w): the flat position of pixel (h, w) in each of the four scan orders."""
    b, c, height, width = x.shape
    length = height * width
    out = torch.empty(b, 4, c, length, dtype=x.dtype)
    for h in range(height):
        for w in range(width):
            row_major = h * width + w
            col_major = w * height + h
            out[:, 0, :, row_major] = x[:, :, h, w]
            out[:, 1, :, col_major] = x[:, :, h, w]
            out[:, 2, :, length - 1 - row_major] = x[:, :, h, w]
            out[:, 3, :, length - 1 - col_major] = x[:, :, h, w]
    return out


def expected_cross_merge(y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Loops over (h, w): gather each direction's value for pixel (h, w), sum, store row-major."""
    b, _, c, length = y.shape
    out = torch.zeros(b, c, length, dtype=y.dtype)
    for h in range(height):
        for w in range(width):
            row_major = h * width + w
            col_major = w * height + h
            out[:, :, row_major] = (y[:, 0, :, row_major] + y[:, 1, :, col_major]
                                    + y[:, 2, :, length - 1 - row_major] + y[:, 3, :, length - 1 - col_major])
    return out


@pytest.mark.parametrize("height, width", [(1, 1), (1, 5), (4, 1), (3, 5), (6, 6)])
def test_cross_scan_matches_index_arithmetic(height, width):
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height * 10 + width))
    got = cross_scan(x)
    assert got.shape == (2, 4, 3, height * width)
    assert torch.equal(got, expected_cross_scan(x))


@pytest.mark.parametrize("height, width", [(1, 1), (2, 7), (5, 3), (4, 4)])
def test_cross_merge_matches_index_arithmetic(height, width):
    y = torch.randn(2, 4, 3, height * width, generator=torch.Generator().manual_seed(height * 10 + width + 1))
    got = cross_merge(y, height, width)
    assert got.shape == (2, 3, height * width)
    torch.testing.assert_close(got, expected_cross_merge(y, height, width), rtol=0, atol=1e-6)
    if height == width:  # square maps need no explicit size
        assert torch.equal(cross_merge(y), got)


def test_merge_of_scan_is_four_times_the_map():
    x = torch.randn(1, 2, 3, 4)
    torch.testing.assert_close(cross_merge(cross_scan(x), 3, 4), 4 * x.reshape(1, 2, 12), rtol=0, atol=1e-6)


def test_cross_merge_size_errors():
    with pytest.raises(ValueError, match="not a square"):
        cross_merge(torch.randn(1, 4, 2, 12))
    with pytest.raises(ValueError, match=r"height\*width = 5\*3 != sequence length 12"):
        cross_merge(torch.randn(1, 4, 2, 12), 5, 3)
    with pytest.raises(ValueError, match="expected 4 directions"):
        cross_merge(torch.randn(1, 3, 2, 9))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        cross_scan(torch.randn(2, 3, 4))


def test_bidirectional_pair_matches_index_arithmetic():
    x = torch.randn(2, 3, 7)
    y = bidirectional_scan(x)
    assert y.shape == (2, 2, 3, 7)
    for i in range(7):
        assert torch.equal(y[:, 0, :, i], x[:, :, i])
        assert torch.equal(y[:, 1, :, i], x[:, :, 6 - i])
    z = torch.randn(2, 2, 3, 7)
    merged = bidirectional_merge(z)
    for i in range(7):
        torch.testing.assert_close(merged[:, :, i], z[:, 0, :, i] + z[:, 1, :, 6 - i], rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected 2 directions"):
        bidirectional_merge(torch.randn(2, 3, 3, 7))
    with pytest.raises(ValueError, match=r"\(B, C, L\)"):
        bidirectional_scan(torch.randn(2, 3))


def test_gradients_flow_through_scan_and_merge():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, 3, 20, dtype=torch.float64)
    # gradient of <cross_scan(x), w> w.r.t. x is cross_merge(w) reshaped to the map
    (gx,) = torch.autograd.grad((cross_scan(x) * w).sum(), [x])
    torch.testing.assert_close(gx, cross_merge(w, 4, 5).reshape(2, 3, 4, 5))
    assert torch.autograd.gradcheck(lambda t: cross_merge(cross_scan(t) * w, 4, 5), (x,))
    s = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 3, 6, dtype=torch.float64)
    (gs,) = torch.autograd.grad((bidirectional_scan(s) * v).sum(), [s])
    torch.testing.assert_close(gs, bidirectional_merge(v))
    assert torch.autograd.gradcheck(lambda t: bidirectional_merge(bidirectional_scan(t) * v), (s,))
