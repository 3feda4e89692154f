"""Property-based: every backend against the float64 NumPy reference over random shapes, dtypes and scales."""

import numpy as np
import pytest
import torch
from hypothesis import assume, event, given
from hypothesis import strategies as st

from bnlab import functional as BF
from bnlab import reference as R
from conftest import BACKENDS, FLOAT64_BACKENDS

# Output tolerance per input dtype, for normalized values of order 1: the input itself is rounded to the
# dtype before the reference sees it, so what is left is the arithmetic and the rounding of the output.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@st.composite
def cases(draw):
    ndim = draw(st.integers(2, 5))
    shape = (draw(st.integers(2, 7)), draw(st.integers(1, 5)), *(draw(st.integers(1, 4)) for _ in range(ndim - 2)))
    dtype = draw(st.sampled_from(list(TOLERANCE)))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    offset = draw(st.sampled_from([0.0, -3.0, 50.0]))
    return shape, dtype, seed, scale, offset


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases())
def test_training_forward_and_backward_match_the_numpy_reference(backend, case):
    shape, dtype, seed, scale, offset = case
    assume(dtype != torch.float64 or backend in FLOAT64_BACKENDS)
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.normal(offset, scale, size=shape)).to(dtype)
    # Channels with (nearly) no spread are ill-conditioned for any finite precision; the reference is
    # compared where a relative spread of at least 1e-2 makes the output well defined in the input dtype.
    x64 = x.double().numpy()
    spread = x64.std(axis=(0, *range(2, len(shape))))
    assume(np.all(spread >= 1e-2 * np.abs(x64).max(axis=(0, *range(2, len(shape)))) + 1e-3 * scale))
    event(f"{dtype} ndim={len(shape)}")
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # half inputs keep float32 params
    w = torch.tensor(rng.uniform(0.5, 1.5, shape[1]), dtype=param_dtype, requires_grad=True)
    b = torch.tensor(rng.normal(size=shape[1]), dtype=param_dtype, requires_grad=True)
    dy = torch.tensor(rng.normal(size=shape)).to(dtype)
    eps = 1e-3 * scale**2
    y_ref, cache = R.batch_norm_forward(x64, w.detach().double().numpy(), b.detach().double().numpy(), eps)
    dx_ref, dgamma_ref, dbeta_ref = R.batch_norm_backward(dy.double().numpy(), cache)

    xt = x.clone().requires_grad_(True)
    rm = torch.zeros(shape[1], dtype=w.dtype)
    rv = torch.ones(shape[1], dtype=w.dtype)
    y = BF.batch_norm(xt, rm, rv, w, b, training=True, momentum=0.5, eps=eps, backend=backend)
    y.backward(dy)

    tol = TOLERANCE[dtype]
    assert y.dtype == dtype
    np.testing.assert_allclose(y.double().detach().numpy(), y_ref, atol=tol * 4, rtol=tol)
    m = x64.size // shape[1]
    np.testing.assert_allclose(rm.double().numpy(), 0.5 * cache.mean, atol=tol * scale + tol * abs(offset), rtol=tol)
    np.testing.assert_allclose(rv.double().numpy(), 0.5 + 0.5 * cache.var * m / (m - 1), rtol=max(tol, 1e-6) * 10)
    # Gradients: dx scales like 1/std, so compare relative to the largest reference value.
    for got, want in ((xt.grad, dx_ref), (w.grad, dgamma_ref), (b.grad, dbeta_ref)):
        got = got.double().numpy()
        bound = tol * 20 * (np.abs(want).max() + dy.abs().max().item() * m / scale)
        np.testing.assert_allclose(got, want, atol=bound, rtol=tol * 10)
