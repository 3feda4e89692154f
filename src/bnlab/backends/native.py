"""The ``native`` backend: torch's own kernels (CPU, cuDNN, MIOpen), with their numerics.

Known trait, documented rather than hidden: torch applies the normalization as ``x * a + b`` with
``a = weight / std`` and ``b = bias - mean * a``; for inputs with a large common offset (say 1e4 + N(0, 1)
in float32) that loses about ``ulp(offset) / std`` of accuracy in the output. The ``reference`` backend
subtracts the mean first and does not.
"""

from __future__ import annotations

import torch


def epilogue(out: torch.Tensor, residual: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """``activation(out + residual)`` with torch ops: how a backend that does not fuse them finishes."""
    if residual is not None:
        out = out + residual
    return torch.relu(out) if activation == "relu" else out


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    # torch.nn.functional.batch_norm minus its Python-side batch-size check, which bnlab.functional has
    # already done with a better message; the op picks cuDNN/MIOpen/native kernels exactly as it does.
    return torch.batch_norm(
        input, weight, bias, running_mean, running_var, training, momentum, eps, torch.backends.cudnn.enabled
    )
