"""Converters between the BN conventions users bring from other frameworks and PyTorch's.

The same layer is written three ways:

| framework | running update | momentum meaning | default momentum | default eps |
|---|---|---|---|---|
| PyTorch | running = (1 - m) * running + m * batch | weight of the NEW batch | 0.1 | 1e-5 |
| Keras / TensorFlow | moving = m * moving + (1 - m) * batch | weight of the OLD average | 0.99 | 1e-3 |
| Flax (linen) | ra = m * ra + (1 - m) * batch | weight of the OLD average | 0.99 | 1e-5 |

so PyTorch's momentum is 1 - Keras's (0.99 -> 0.01), not 0.99. Keras and Flax name the parameters
gamma/beta (scale/bias in Flax) and the statistics moving_mean/moving_variance (mean/var in Flax), and all
three put eps inside the square root, sqrt(var + eps), so eps carries over unchanged.

Variance: every one of them normalizes with the biased batch variance; PyTorch and Keras keep the
unbiased one in the running estimate, Flax keeps the biased one. A checkpoint whose running variance is
biased (Flax, some exporters) is converted with m / (m - 1), m being the number of values per channel in
the training batches (batch size times spatial size); the difference matters only for small m.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["FRAMEWORKS", "convert_momentum", "load_foreign_batchnorm", "variance_correction"]

FRAMEWORKS = ("torch", "keras", "flax")


def convert_momentum(value: float, source: str, target: str = "torch") -> float:
    """Translate a momentum between frameworks: torch's m is 1 - keras's or flax's."""
    for name in (source, target):
        if name not in FRAMEWORKS:
            raise ValueError(f"convert_momentum: unknown framework {name!r}; choose one of {', '.join(FRAMEWORKS)}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"convert_momentum: momentum must be in [0, 1], got {value}")
    new_batch_weight = value if source == "torch" else 1.0 - value
    return new_batch_weight if target == "torch" else 1.0 - new_batch_weight


def variance_correction(var: torch.Tensor, values_per_channel: int, to: str = "unbiased") -> torch.Tensor:
    """Biased <-> unbiased variance for statistics gathered over batches of `values_per_channel` values.

    Returns a new tensor (the input is not changed): var * m/(m-1) for to="unbiased", var * (m-1)/m for
    to="biased".
    """
    if values_per_channel < 2:
        raise ValueError(f"variance_correction: needs at least 2 values per channel, got {values_per_channel}")
    m = values_per_channel
    if to == "unbiased":
        return var * (m / (m - 1))
    if to == "biased":
        return var * ((m - 1) / m)
    raise ValueError(f"variance_correction: to={to!r} is not 'unbiased' or 'biased'")


_NAMES = {
    "keras": {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"},
    "flax": {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"},
}


def load_foreign_batchnorm(
    layer: nn.modules.batchnorm._BatchNorm,
    weights: Mapping[str, Any],
    source: str,
    *,
    momentum: float | None = None,
    eps: float | None = None,
    biased_variance: bool | None = None,
    values_per_channel: int | None = None,
) -> nn.modules.batchnorm._BatchNorm:
    """Copy a Keras or Flax BN layer's weights into a torch/bnlab BN layer. Mutates `layer`; returns it.

    `weights` maps the framework's names (Keras: gamma, beta, moving_mean, moving_variance; Flax: scale,
    bias, mean, var) to arrays. `momentum` and `eps`, if given, are in the source framework's convention
    and are converted and set on the layer. `biased_variance` (default: True for Flax, False for Keras)
    says whether the stored variance is biased; a biased one needs `values_per_channel` to be corrected.
    Missing gamma/beta (a layer without scale or center) leave the layer's weight at 1 and bias at 0.
    """
    if source not in _NAMES:
        raise ValueError(f"load_foreign_batchnorm: source={source!r} is not one of {', '.join(_NAMES)}")
    names = _NAMES[source]
    unknown = set(weights) - set(names.values())
    if unknown:
        raise ValueError(
            f"load_foreign_batchnorm: unexpected {source} names {sorted(unknown)}; known: {sorted(names.values())}"
        )
    biased = (source == "flax") if biased_variance is None else biased_variance
    channels = layer.num_features
    converted: dict[str, torch.Tensor] = {}
    for ours, theirs in names.items():
        if theirs not in weights:
            continue
        value = torch.as_tensor(weights[theirs]).detach().reshape(-1)
        if value.numel() != channels:
            raise ValueError(
                f"load_foreign_batchnorm: {theirs} has {value.numel()} values, the layer has {channels} channels"
            )
        converted[ours] = value
    if "running_var" in converted and biased:
        if values_per_channel is None:
            raise ValueError(
                "load_foreign_batchnorm: the stored variance is biased; pass values_per_channel (batch size times "
                "spatial size of the training batches) to correct it, or biased_variance=False to keep it as is"
            )
        converted["running_var"] = variance_correction(converted["running_var"], values_per_channel)
    with torch.no_grad():
        for ours, value in converted.items():
            target = getattr(layer, ours)
            if target is None:
                raise ValueError(f"load_foreign_batchnorm: the layer has no {ours} (affine or track_running_stats off)")
            target.copy_(value.to(dtype=target.dtype, device=target.device))
    if momentum is not None:
        layer.momentum = convert_momentum(momentum, source, "torch")
    if eps is not None:
        layer.eps = float(eps)
    return layer
