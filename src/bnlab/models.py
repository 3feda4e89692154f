"""Small models shared by the benchmarks, the tests and the experiments."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

__all__ = ["mlp"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


def mlp(
    in_features: int = 784,
    hidden: Sequence[int] = (100, 100, 100),
    classes: int = 10,
    *,
    norm: Callable[[int], nn.Module] | None = None,
    activation: str = "sigmoid",
) -> nn.Sequential:
    """A fully connected net; with `norm`, each hidden layer is Linear -> norm -> activation.

    The default is the network of Ioffe & Szegedy's Figure 1 (3 hidden layers of 100 sigmoid units).
    As in the paper (section 3.2), a hidden Linear followed by BN has no bias: BN's shift replaces it.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"mlp: activation={activation!r} is not one of {', '.join(map(repr, _ACTIVATIONS))}")
    layers: list[nn.Module] = []
    width = in_features
    for units in hidden:
        layers.append(nn.Linear(width, units, bias=norm is None))
        if norm is not None:
            layers.append(norm(units))
        layers.append(_ACTIVATIONS[activation]())
        width = units
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def fig1_mlp() -> nn.Sequential:
    """Figure 1's network with bnlab BN on every hidden layer (a ready factory for `bnlab doctor`)."""
    from bnlab.nn import BatchNorm1d, name_layers

    return name_layers(mlp(norm=BatchNorm1d))


def small_convnet(
    norm: Callable[[int], nn.Module] | None = None, widths: Sequence[int] = (16, 32, 64), classes: int = 10
) -> nn.Sequential:
    """The experiments' conv network for 1x28x28 images: three 3x3 conv blocks (conv -> norm -> ReLU,
    max-pooling after the first two), global average pooling, and a linear classifier. Convolutions
    followed by a normalization have no bias."""
    layers: list[nn.Module] = []
    channels = 1
    for i, width in enumerate(widths):
        layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=norm is None))
        if norm is not None:
            layers.append(norm(width))
        layers.append(nn.ReLU())
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)
