"""The NumPy reference against the definition: finite differences, autograd, and Algorithm 2's formula."""

import numpy as np
import pytest
import torch

from bnlab import reference as R

SHAPES = [(4, 3), (5, 2, 7), (3, 2, 4, 5), (2, 3, 2, 3, 2), (7, 1, 1, 1)]


def _rand(shape, seed=0, offset=0.0):
    return np.random.default_rng(seed).normal(offset, 1.0, size=shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_normalizes_each_channel(shape):
    x = _rand(shape) * 3 + 2
    y, cache = R.batch_norm_forward(x, np.ones(shape[1]), np.zeros(shape[1]), eps=0.0)
    axes = (0, *range(2, x.ndim))
    np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=axes), 1.0, rtol=1e-12)
    assert cache.m == x.size // shape[1]


def test_forward_applies_gamma_beta_per_channel():
    x = _rand((6, 2, 3))
    gamma, beta = np.array([2.0, -0.5]), np.array([1.0, 3.0])
    y, cache = R.batch_norm_forward(x, gamma, beta)
    np.testing.assert_allclose(y, gamma[None, :, None] * cache.x_hat + beta[None, :, None])


def _loss_and_grads(x, gamma, beta, dy):
    y, cache = R.batch_norm_forward(x, gamma, beta)
    return float((y * dy).sum()), R.batch_norm_backward(dy, cache)


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_finite_differences(shape):
    rng = np.random.default_rng(1)
    x, dy = _rand(shape, 2), rng.normal(size=shape)
    gamma, beta = rng.uniform(0.5, 2.0, shape[1]), rng.normal(size=shape[1])
    _, (dx, dgamma, dbeta) = _loss_and_grads(x, gamma, beta, dy)
    h = 1e-6

    def numeric(array, index):
        plus, minus = array.copy(), array.copy()
        plus[index] += h
        minus[index] -= h
        args = {"x": x, "gamma": gamma, "beta": beta}
        name = next(k for k, v in args.items() if v is array)
        lp = _loss_and_grads(**{**args, name: plus}, dy=dy)[0]
        lm = _loss_and_grads(**{**args, name: minus}, dy=dy)[0]
        return (lp - lm) / (2 * h)

    for analytic, array in ((dx, x), (dgamma, gamma), (dbeta, beta)):
        fd = np.array([numeric(array, i) for i in np.ndindex(array.shape)]).reshape(array.shape)
        rel = np.linalg.norm(analytic - fd) / max(np.linalg.norm(fd), 1e-12)
        assert rel < 1e-6, rel


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_torch_autograd(shape):
    rng = np.random.default_rng(3)
    x, dy = _rand(shape, 4), rng.normal(size=shape)
    gamma, beta = rng.uniform(0.5, 2.0, shape[1]), rng.normal(size=shape[1])
    _, (dx, dgamma, dbeta) = _loss_and_grads(x, gamma, beta, dy)
    tx, tg, tb = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    ty = torch.nn.functional.batch_norm(tx, None, None, tg, tb, training=True, eps=1e-5)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dgamma, tg.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dbeta, tb.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_inference_is_the_fixed_affine_map():
    x = _rand((5, 3, 2))
    mean, var = np.array([0.5, -1.0, 2.0]), np.array([1.0, 4.0, 0.25])
    gamma, beta = np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0, -1.0])
    y = R.batch_norm_inference(x, mean, var, gamma, beta, eps=0.0)
    expected = gamma[None, :, None] / np.sqrt(var[None, :, None]) * (x - mean[None, :, None]) + beta[None, :, None]
    np.testing.assert_allclose(y, expected)


def test_population_statistics_is_algorithm_2_for_equal_batches():
    batches = [_rand((8, 3, 2), seed=s, offset=s) for s in range(5)]
    mean, var = R.population_statistics(batches)
    m = 8 * 2
    mus = [b.mean(axis=(0, 2)) for b in batches]
    vars_ = [b.var(axis=(0, 2)) for b in batches]
    np.testing.assert_allclose(mean, np.mean(mus, axis=0))
    np.testing.assert_allclose(var, m / (m - 1) * np.mean(vars_, axis=0))


def test_population_statistics_weighs_batches_by_size():
    big, small = _rand((9, 2), seed=1), _rand((3, 2), seed=2, offset=5.0)
    mean, var = R.population_statistics([big, small])
    np.testing.assert_allclose(mean, (9 * big.mean(0) + 3 * small.mean(0)) / 12)
    np.testing.assert_allclose(var, (9 * big.var(0, ddof=1) + 3 * small.var(0, ddof=1)) / 12)


def test_population_statistics_bad_input():
    with pytest.raises(ValueError, match="no batches"):
        R.population_statistics([])
    with pytest.raises(ValueError, match=r"batch 1: expected 3 channels"):
        R.population_statistics([np.zeros((4, 3)), np.zeros((4, 2))])
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        R.population_statistics([np.zeros((1, 3))])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least 2 axes"):
        R.batch_norm_forward(np.zeros(3), np.ones(3), np.zeros(3))
    _, cache = R.batch_norm_forward(np.ones((2, 3)), np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match=r"dy: expected shape \(2, 3\)"):
        R.batch_norm_backward(np.ones((3, 3)), cache)
