"""Converters for Keras/Flax BN conventions: momentum, eps, names, biased vs unbiased variance."""

import numpy as np
import pytest
import torch
from torch import nn

import bnlab
from bnlab.tools.conventions import convert_momentum, load_foreign_batchnorm, variance_correction


@pytest.mark.parametrize(("value", "source", "target", "expected"), [
    (0.99, "keras", "torch", 0.01), (0.9, "flax", "torch", 0.1),
    (0.1, "torch", "keras", 0.9), (0.99, "keras", "flax", 0.99),
])  # fmt: skip
def test_momentum_conventions(value, source, target, expected):
    assert convert_momentum(value, source, target) == pytest.approx(expected)


def test_keras_update_rule_equals_torch_rule_with_converted_momentum():
    running, batch, keras_m = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]), 0.99
    keras = keras_m * running + (1 - keras_m) * batch
    torch_m = convert_momentum(keras_m, "keras")
    torch.testing.assert_close((1 - torch_m) * running + torch_m * batch, keras)


def test_variance_correction_round_trip():
    x = torch.randn(7, 3, dtype=torch.float64)
    biased = x.var(0, unbiased=False)
    torch.testing.assert_close(variance_correction(biased, 7), x.var(0, unbiased=True))
    torch.testing.assert_close(variance_correction(variance_correction(biased, 7), 7, to="biased"), biased)
    with pytest.raises(ValueError, match="at least 2 values"):
        variance_correction(biased, 1)


@pytest.mark.parametrize("cls", [nn.BatchNorm2d, bnlab.nn.BatchNorm2d])
def test_load_keras_layer_reproduces_keras_inference(cls):
    rng = np.random.default_rng(0)
    gamma, beta = rng.uniform(0.5, 2, 4), rng.normal(size=4)
    mean, var = rng.normal(size=4), rng.uniform(0.5, 2, 4)
    layer = load_foreign_batchnorm(
        cls(4), {"gamma": gamma, "beta": beta, "moving_mean": mean, "moving_variance": var}, "keras",
        momentum=0.99, eps=1e-3,
    )  # fmt: skip
    assert layer.momentum == pytest.approx(0.01) and layer.eps == 1e-3
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    keras_out = (
        gamma[None, :, None, None] * (x.numpy() - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-3)
        + beta[None, :, None, None]
    )
    np.testing.assert_allclose(layer.double().eval()(x).detach().numpy(), keras_out, rtol=1e-6, atol=1e-6)


def test_load_flax_layer_corrects_the_biased_variance():
    var = np.array([1.0, 2.0])
    layer = load_foreign_batchnorm(
        bnlab.nn.BatchNorm1d(2),
        {"scale": [1, 1], "bias": [0, 0], "mean": [0, 0], "var": var},
        "flax",
        values_per_channel=4,
    )
    torch.testing.assert_close(layer.running_var, torch.tensor(var * 4 / 3, dtype=torch.float32))
    with pytest.raises(ValueError, match="pass values_per_channel"):
        load_foreign_batchnorm(bnlab.nn.BatchNorm1d(2), {"var": var}, "flax")


def test_bad_foreign_weights_are_named():
    with pytest.raises(ValueError, match=r"unexpected keras names \['weight'\]"):
        load_foreign_batchnorm(nn.BatchNorm1d(2), {"weight": [1, 1]}, "keras")
    with pytest.raises(ValueError, match="gamma has 3 values, the layer has 2 channels"):
        load_foreign_batchnorm(nn.BatchNorm1d(2), {"gamma": [1, 1, 1]}, "keras")
    with pytest.raises(ValueError, match="the layer has no weight"):
        load_foreign_batchnorm(nn.BatchNorm1d(2, affine=False), {"gamma": [1, 1]}, "keras")
    with pytest.raises(ValueError, match="unknown framework 'caffe'"):
        convert_momentum(0.9, "caffe")
