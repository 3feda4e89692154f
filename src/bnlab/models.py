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
