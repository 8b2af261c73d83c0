"""The numba kernels' vectorisable exp / softplus / sigmoid against float64 PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numba import njit

from remamber.ops.scan_cpu import vexp, vsigmoid, vsoftplus, vsoftplus_sigmoid


@njit
def _apply(x, e, sp, sg, sp2, sg2):
    for i in range(x.shape[0]):
        e[i] = vexp(x[i])
        sp[i] = vsoftplus(x[i])
        sg[i] = vsigmoid(x[i])
        sp2[i], sg2[i] = vsoftplus_sigmoid(x[i])


@pytest.mark.parametrize("dtype, rel", [(np.float32, 3e-7), (np.float64, 1e-15)])
def test_fast_functions_match_float64(dtype, rel):
    x = np.concatenate([np.linspace(-120.0, 88.0, 100_001), [0.0, -1e-8, 1e-8, 19.999, 20.0, 20.001, -87.0, -87.5]])
    x = x.astype(dtype)
    outs = [np.empty_like(x) for _ in range(5)]
    _apply(x, *outs)
    e, sp, sg, sp2, sg2 = outs
    xd = torch.from_numpy(x.astype(np.float64))
    refs = dict(exp=torch.exp(xd), softplus=torch.nn.functional.softplus(xd), sigmoid=torch.sigmoid(xd))
    for name, got in (("exp", e), ("softplus", sp), ("sigmoid", sg), ("softplus", sp2), ("sigmoid", sg2)):
        want = refs[name].numpy()
        assert np.isfinite(got).all(), name
        # float32 results below exp(-87) (near the denormal range) are flushed to zero by design
        floor = np.exp(-87.0) if dtype == np.float32 else np.finfo(dtype).tiny
        normal = want >= floor
        err = np.abs(got[normal] - want[normal]) / want[normal]
        assert err.max() <= rel, f"{name}: max relative error {err.max():.3g}"
        assert np.all(np.abs(got[~normal]) <= floor), name
    assert np.array_equal(sp, sp2)  # same formula; the fused sigmoid may differ by rounding (checked above)
