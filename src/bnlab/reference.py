"""The paper's algorithms in NumPy: the specification every backend is tested against.

Ioffe & Szegedy (2015), Algorithm 1 (training forward), the backward formulas of section 3, and
Algorithm 2 (population statistics for inference), written as literally as the paper states them.
Nothing here is fast; everything here is easy to check by eye and runs in float64.

Layout: the channel ("activation") axis is axis 1; axis 0 and every trailing axis are reduced, as for
convolutions where "m' = m * p * q" values share one mean and variance (section 3.2).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BatchNormCache",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_inference",
    "population_statistics",
]


def _check_input(x: np.ndarray, name: str = "x") -> None:
    if x.ndim < 2:
        raise ValueError(f"{name}: expected an array of shape (N, C, ...) with at least 2 axes, got {x.shape}")


def _reduce_axes(x: np.ndarray) -> tuple[int, ...]:
    return (0, *range(2, x.ndim))


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a (C,) vector so that it broadcasts against an (N, C, ...) array."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


@dataclass(frozen=True)
class BatchNormCache:
    """What Algorithm 1 keeps for the backward pass."""

    x: np.ndarray
    x_hat: np.ndarray
    mean: np.ndarray  # mu_B, shape (C,)
    var: np.ndarray  # sigma_B^2, biased (divided by m), shape (C,)
    gamma: np.ndarray
    eps: float

    @property
    def m(self) -> int:
        """Number of values that share one channel's statistics (m, or m*p*q for convolutions)."""
        return self.x.size // self.x.shape[1]


def batch_norm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5
) -> tuple[np.ndarray, BatchNormCache]:
    """Algorithm 1: normalize with the mini-batch mean and biased variance, then scale and shift.

    Shapes: x (N, C, *), gamma and beta (C,). Returns y (N, C, *) and the cache for `batch_norm_backward`.
    """
    _check_input(x)
    gamma = np.asarray(gamma, dtype=x.dtype)
    beta = np.asarray(beta, dtype=x.dtype)
    axes = _reduce_axes(x)
    mean = x.mean(axis=axes)  # mu_B = 1/m sum x_i
    var = ((x - _per_channel(mean, x.ndim)) ** 2).mean(axis=axes)  # sigma_B^2 = 1/m sum (x_i - mu_B)^2
    x_hat = (x - _per_channel(mean, x.ndim)) / np.sqrt(_per_channel(var, x.ndim) + eps)
    y = _per_channel(gamma, x.ndim) * x_hat + _per_channel(beta, x.ndim)
    return y, BatchNormCache(x=x, x_hat=x_hat, mean=mean, var=var, gamma=gamma, eps=eps)


def batch_norm_backward(dy: np.ndarray, cache: BatchNormCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's chain-rule formulas (section 3), term by term; returns (dx, dgamma, dbeta).

    dl/dx_hat = dl/dy * gamma
    dl/dvar   = sum dl/dx_hat * (x - mu) * (-1/2) (var + eps)^(-3/2)
    dl/dmu    = sum dl/dx_hat * (-1 / sqrt(var + eps)) + dl/dvar * sum(-2 (x - mu)) / m
    dl/dx     = dl/dx_hat / sqrt(var + eps) + dl/dvar * 2 (x - mu) / m + dl/dmu / m
    dl/dgamma = sum dl/dy * x_hat;   dl/dbeta = sum dl/dy
    """
    if dy.shape != cache.x.shape:
        raise ValueError(f"dy: expected shape {cache.x.shape} (the forward input's), got {dy.shape}")
    x, m, nd = cache.x, cache.m, cache.x.ndim
    axes = _reduce_axes(x)
    mu = _per_channel(cache.mean, nd)
    var_eps = _per_channel(cache.var, nd) + cache.eps
    dx_hat = dy * _per_channel(cache.gamma, nd)
    dvar = (dx_hat * (x - mu) * -0.5 * var_eps**-1.5).sum(axis=axes)
    dmu = (dx_hat * -1.0 / np.sqrt(var_eps)).sum(axis=axes) + dvar * (-2.0 * (x - mu)).sum(axis=axes) / m
    dx = dx_hat / np.sqrt(var_eps) + _per_channel(dvar, nd) * 2.0 * (x - mu) / m + _per_channel(dmu, nd) / m
    dgamma = (dy * cache.x_hat).sum(axis=axes)
    dbeta = dy.sum(axis=axes)
    return dx, dgamma, dbeta


def batch_norm_inference(
    x: np.ndarray, mean: np.ndarray, var: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5
) -> np.ndarray:
    """Algorithm 2, step 11: the fixed affine map y = gamma / sqrt(Var + eps) * (x - E[x]) + beta."""
    _check_input(x)
    scale = np.asarray(gamma) / np.sqrt(np.asarray(var) + eps)
    return _per_channel(scale, x.ndim) * (x - _per_channel(np.asarray(mean), x.ndim)) + _per_channel(
        np.asarray(beta), x.ndim
    )


def population_statistics(batches: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 2, steps 8-10: E[x] and the unbiased Var[x] from several training mini-batches.

    With batches of one size m this is the paper's formula exactly:
        E[x] = mean over batches of mu_B,   Var[x] = m / (m - 1) * mean over batches of sigma_B^2.
    The paper assumes equal batches; for batches of different sizes each batch's terms are weighted by
    its number of values per channel (m_b), so a short last batch counts for what it holds:
        E[x] = sum m_b mu_b / sum m_b,   Var[x] = sum m_b * m_b/(m_b - 1) sigma_b^2 / sum m_b.
    Returns (mean, var), each of shape (C,), in float64.
    """
    weights, means, unbiased_vars = [], [], []
    channels = None
    for i, batch in enumerate(batches):
        b = np.asarray(batch, dtype=np.float64)
        _check_input(b, name=f"batch {i}")
        if channels is None:
            channels = b.shape[1]
        elif b.shape[1] != channels:
            raise ValueError(f"batch {i}: expected {channels} channels (axis 1) like batch 0, got {b.shape}")
        m = b.size // b.shape[1]
        if m < 2:
            raise ValueError(f"batch {i}: needs at least 2 values per channel for an unbiased variance, got {m}")
        axes = _reduce_axes(b)
        weights.append(m)
        means.append(b.mean(axis=axes))
        unbiased_vars.append(b.var(axis=axes) * m / (m - 1))
    if not weights:
        raise ValueError("population_statistics: got no batches")
    w = np.asarray(weights, dtype=np.float64)[:, None]
    return (w * np.stack(means)).sum(0) / w.sum(), (w * np.stack(unbiased_vars)).sum(0) / w.sum()
