"""Stateless batch normalization: input checks, policies, then one call into the chosen backend.

``batch_norm`` has the positional signature and meaning of ``torch.nn.functional.batch_norm``. The
keyword-only extras are what a module needs to keep its state honest:

- ``num_batches_tracked``: the layer's counter. It is incremented only when the running statistics
  were actually updated, and it is what ``momentum=None`` (a cumulative average) divides by.
- ``small_batch``: what to do when training sees one value per channel, where no variance exists.
  ``"error"`` (default) raises a ``ValueError`` that names the layer and the options;
  ``"use_running_stats"`` normalizes such a batch with the running statistics and leaves them as they are.
- ``nonfinite``: what to do when a training batch has non-finite statistics (a NaN or inf in the input,
  or an overflowing variance). ``"skip"`` (default) leaves the running statistics and the counter as they
  were and warns, naming the layer; ``"error"`` raises ``FloatingPointError`` with the running statistics
  untouched; ``"ignore"`` does what torch does (no check: one NaN batch poisons the running statistics for
  good) and costs nothing. The check costs two small ops and, in eager mode, one host sync per layer call.
  Under ``torch.compile`` the check runs without a sync and ``"skip"`` and ``"error"`` both restore the
  statistics silently (a compiled graph cannot warn or raise on data).
- ``backend``: a backend name for this call only (see ``bnlab.backends``).
- ``layer``: the name to put in error messages.
"""

from __future__ import annotations

import math
import warnings

import torch

from bnlab import backends

__all__ = ["NONFINITE_POLICIES", "SMALL_BATCH_POLICIES", "batch_norm"]

SMALL_BATCH_POLICIES = ("error", "use_running_stats")
NONFINITE_POLICIES = ("skip", "error", "ignore")


class NonFiniteStatisticsWarning(RuntimeWarning):
    """A training batch had non-finite statistics; the running statistics were left unchanged."""


def _check_policy(value: str, allowed: tuple[str, ...], option: str, layer: str) -> None:
    if value not in allowed:
        raise ValueError(f"{layer}: {option}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _check_channels(input: torch.Tensor, tensor: torch.Tensor | None, what: str, layer: str) -> None:
    if tensor is not None and tensor.numel() != input.shape[1]:
        raise ValueError(
            f"{layer}: input has {input.shape[1]} channels (dim 1 of shape {tuple(input.shape)}) but {what} "
            f"has {tensor.numel()} values; expected one per channel"
        )


def small_batch_message(layer: str, shape: tuple[int, ...]) -> str:
    return (
        f"{layer}: training needs more than one value per channel to compute a batch variance, got input "
        f"of shape {shape}. Options: train with a larger batch; call .eval() to normalize with the running "
        f"statistics; construct the layer with small_batch='use_running_stats' to normalize such batches "
        f"with the running statistics (they are then not updated); or use GroupNorm/LayerNorm, which do "
        f"not depend on the batch."
    )


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    small_batch: str = "error",
    nonfinite: str = "skip",
    backend: str | None = None,
    layer: str | None = None,
) -> torch.Tensor:
    """Batch normalization of an (N, C, *) input; see the module docstring for the keyword-only options.

    In training, normalizes with the batch mean and biased variance and, when ``running_mean`` and
    ``running_var`` are given, updates them in place with the unbiased variance:
    ``running = (1 - momentum) * running + momentum * batch``. Otherwise normalizes with the running
    statistics. ``momentum=None`` means a cumulative average, which needs ``num_batches_tracked``.
    """
    name = layer or "batch_norm"
    if input.dim() < 2:
        raise ValueError(f"{name}: expected input of shape (N, C, ...) with at least 2 dims, got {tuple(input.shape)}")
    if input.shape[1] == 0:  # nothing to normalize, and no count per channel to divide by
        raise ValueError(f"{name}: input has no channels (dim 1 of shape {tuple(input.shape)} is 0)")
    channels = input.shape[1]
    if (
        (running_mean is not None and running_mean.numel() != channels)
        or (running_var is not None and running_var.numel() != channels)
        or (weight is not None and weight.numel() != channels)
        or (bias is not None and bias.numel() != channels)
    ):
        named = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
        for what, tensor in named.items():
            _check_channels(input, tensor, what, name)
    _check_policy(small_batch, SMALL_BATCH_POLICIES, "small_batch", name)
    _check_policy(nonfinite, NONFINITE_POLICIES, "nonfinite", name)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{name}: give both running_mean and running_var, or neither")
    impl = backends.resolve(backend, input)

    if not training:
        if running_mean is None:
            raise ValueError(f"{name}: inference (training=False) needs running_mean and running_var")
        return impl(input, running_mean, running_var, weight, bias, False, 0.0, eps)

    count = input.numel() // channels
    if count == 1:
        if small_batch == "use_running_stats" and running_mean is not None:
            return impl(input, running_mean, running_var, weight, bias, False, 0.0, eps)
        raise ValueError(small_batch_message(name, tuple(input.shape)))
    if running_mean is None or count == 0:
        # Nothing to track: batch statistics only (an empty batch leaves the running statistics alone).
        return impl(input, None, None, weight, bias, True, 0.0, eps)

    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError(f"{name}: momentum=None (cumulative average) needs num_batches_tracked")
        factor = 1.0 / (float(num_batches_tracked) + 1.0)
    else:
        factor = momentum

    if nonfinite == "ignore":
        output, updated = impl(input, running_mean, running_var, weight, bias, True, factor, eps), True
    else:
        output, updated = _update_guarded(
            impl, input, running_mean, running_var, weight, bias, factor, eps, nonfinite, name
        )
    if num_batches_tracked is not None and updated is not False:
        num_batches_tracked.add_(1 if updated is True else updated)
    return output


def _update_guarded(
    impl: backends.BatchNormFn,
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    factor: float,
    eps: float,
    policy: str,
    name: str,
) -> tuple[torch.Tensor, bool | torch.Tensor]:
    """Run a training step and undo its running-statistics update if the batch statistics were not finite.

    Returns the output and whether the update was kept (a 0-dim bool tensor under torch.compile).
    """
    if torch.compiler.is_compiling():
        # No host sync in a graph: update copies, then keep or drop the result with a select. The kernel's
        # autograd node saves the running statistics it was given, so those must not be written afterwards.
        new_mean, new_var = running_mean.clone(), running_var.clone()
        output = impl(input, new_mean, new_var, weight, bias, True, factor, eps)
        finite = torch.isfinite(new_var).all()
        with torch.no_grad():
            running_mean.copy_(torch.where(finite, new_mean, running_mean))
            running_var.copy_(torch.where(finite, new_var, running_var))
        return output, finite

    channels = running_mean.numel()
    # Buffers are 1-D and need no grad: one small copy is the cheapest way to be able to undo the update.
    before = torch.cat(
        (running_mean.view(-1), running_var.view(-1)) if running_mean.dim() != 1 else (running_mean, running_var)
    )
    output = impl(input, running_mean, running_var, weight, bias, True, factor, eps)
    # A non-finite batch mean (an inf in the input) always comes with a NaN variance, so checking the
    # running variance catches every bad update. One float32 sum and a host sync; a finite sum is the
    # common case, and an infinite one from finite values (an overflow of the sum alone) is re-checked.
    if math.isfinite(running_var.sum().item()) or bool(torch.isfinite(running_var).all()):
        return output, True
    # Restore through .data: torch's kernel node saved these tensors for backward (it reads only its own
    # saved batch statistics there), and a tracked in-place write would make backward refuse to run.
    running_mean.data.copy_(before[:channels].view_as(running_mean))
    running_var.data.copy_(before[channels:].view_as(running_var))
    if not torch.isfinite(before).all():
        detail = "the running statistics were already non-finite before this batch"
    else:
        detail = "the batch's mean or variance is NaN or infinite (a non-finite input, or an overflow)"
    if policy == "error":
        raise FloatingPointError(
            f"{name}: non-finite batch statistics in training ({detail}); the running statistics were left "
            f"unchanged. Pass nonfinite='skip' to warn and continue instead."
        )
    warnings.warn(
        f"{name}: non-finite batch statistics in training ({detail}); the running statistics and "
        f"num_batches_tracked were left unchanged for this batch.",
        NonFiniteStatisticsWarning,
        stacklevel=4,
    )
    return output, False
