"""Stateless batch normalization: input checks, policies, then one call into the chosen backend.

``batch_norm`` has the positional signature and meaning of ``torch.nn.functional.batch_norm``. The
keyword-only extras are what a module needs to keep its state honest:

- ``num_batches_tracked``: the layer's counter. It is incremented only when the running statistics
  were actually updated, and it is what ``momentum=None`` (a cumulative average) divides by (on a GPU
  read there, not on the host, unless ``nonfinite="error"``).
- ``small_batch``: what to do when training sees one value per channel, where no variance exists.
  ``"error"`` (default) raises a ``ValueError`` that names the layer and the options;
  ``"use_running_stats"`` normalizes such a batch with the running statistics and leaves them as they are.
- ``nonfinite``: what to do when a training batch has non-finite statistics (a NaN or inf in the input,
  or an overflowing variance). ``"skip"`` (default) leaves the running statistics and the counter as they
  were and warns, naming the layer; ``"error"`` raises ``FloatingPointError`` with the running statistics
  untouched; ``"ignore"`` does what torch does (no check: one NaN batch poisons the running statistics for
  good) and costs nothing. The check costs a few small ops and, on a CPU, one host sync per layer call.
  On a GPU ``"skip"`` waits for nothing: the statistics are kept or restored on the device, and the
  warning comes once the GPU has got there (a later call, or exit); ``"error"`` must sync to raise.
  Under ``torch.compile`` or CUDA-graph capture the check runs without a sync and ``"skip"`` (and under
  compile ``"error"``) restore the statistics silently (a compiled graph cannot warn or raise on data).
- ``backend``: a backend name for this call only (see ``bnlab.backends``).
- ``layer``: the name to put in error messages.
- ``residual`` and ``activation``: the output becomes ``activation(bn(input) + residual)`` (``activation``
  None or ``"relu"``; ``residual`` of the input's shape), the tail of a ResNet block. The ``triton`` backend
  fuses them into its kernels (no intermediate tensors, the ReLU mask recomputed in backward); the
  other backends apply them as separate torch ops, with the same result.
"""

from __future__ import annotations

import atexit
import functools
import math
import warnings
from collections.abc import Callable

import torch

from bnlab import backends, kernels
from bnlab.backends import native
from bnlab.kernels import layout as kl
from bnlab.late_reports import LateReports

__all__ = ["ACTIVATIONS", "NONFINITE_POLICIES", "SMALL_BATCH_POLICIES", "batch_norm"]

SMALL_BATCH_POLICIES = ("error", "use_running_stats")
NONFINITE_POLICIES = ("skip", "error", "ignore")
ACTIVATIONS = (None, "relu")


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
    residual: torch.Tensor | None = None,
    activation: str | None = None,
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
    guards = backends.guards_update(impl)  # (asked before the epilogue wraps it)
    if residual is not None or activation is not None:
        impl = _with_epilogue(impl, input, residual, activation, name)

    if not training:
        if running_mean is None:
            raise ValueError(f"{name}: inference (training=False) needs running_mean and running_var")
        return impl(input, running_mean, running_var, weight, bias, False, 0.0, eps)

    _refuse_vmapped_update(name, running_mean, input, weight, bias, residual, running_var)
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
        if _deferred(running_var, nonfinite) or torch.compiler.is_compiling():
            # The cumulative average without reading the counter on the host (a sync per call, as torch's
            # BatchNorm makes, and a graph break under torch.compile): the batch's statistics into fresh
            # buffers (momentum 1 writes them there), then the update on the device, as one ghost batch's.
            batch_mean, batch_var = torch.zeros_like(running_mean), torch.zeros_like(running_var)
            output = impl(input, batch_mean, batch_var, weight, bias, True, 1.0, eps)
            _update_sequentially(
                running_mean, running_var, batch_mean[None], batch_var[None], None, num_batches_tracked, nonfinite,
                name,
            )  # fmt: skip
            return output
        factor = 1.0 / (float(num_batches_tracked) + 1.0)
    else:
        factor = momentum

    if nonfinite == "ignore":
        output, updated = impl(input, running_mean, running_var, weight, bias, True, factor, eps), True
    else:
        output, updated = _update_guarded(
            impl, input, running_mean, running_var, weight, bias, factor, eps, nonfinite, name,
            guards, num_batches_tracked,
        )  # fmt: skip
    if num_batches_tracked is not None and updated is not False and updated is not None:
        num_batches_tracked.add_(1 if updated is True else updated)
    return output


def _refuse_vmapped_update(name: str, running_mean: torch.Tensor | None, *tensors: torch.Tensor | None) -> None:
    """A training call that would update `running_mean` (and its variance) refuses torch.func.vmap over any
    of `tensors` (checked under any of functorch's wrappers: vmap inside grad, grad inside vmap), as torch's
    own batch norm does for shared buffers: one update per slice cannot go into one set of buffers, and the
    update's checks read values on the host. (jacfwd's batched tangents hide under unbatched primals: fine.)"""
    if running_mean is None or not torch._C._are_functorch_transforms_active():
        return
    functorch = torch._C._functorch
    for t in (running_mean, *tensors):
        while t is not None and functorch.is_functorch_wrapped_tensor(t):
            if functorch.is_batchedtensor(t):
                raise ValueError(
                    f"{name}: training under torch.func.vmap cannot update running statistics. Options: "
                    f"running_mean=None and running_var=None (track_running_stats=False on a layer; "
                    f"torch.func.replace_all_batch_norm_modules_(model) sets that on every layer), or .eval() "
                    f"to normalize with the running statistics"
                )
            t = functorch.get_unwrapped(t)


def _with_epilogue(
    impl: backends.BatchNormFn,
    input: torch.Tensor,
    residual: torch.Tensor | None,
    activation: str | None,
    name: str,
) -> backends.BatchNormFn:
    """`impl` followed by ``+ residual`` and the activation: fused where the backend can, else torch ops."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation={activation!r} is not one of {', '.join(map(repr, ACTIVATIONS))}")
    if residual is not None and (residual.shape != input.shape or residual.device != input.device):
        raise ValueError(
            f"{name}: residual has shape {tuple(residual.shape)} on {residual.device} but the input has "
            f"{tuple(input.shape)} on {input.device}; they must match (it is added to the normalized input)"
        )
    # (A residual of another dtype is added as torch adds, promoting: the fused kernels write the input's.)
    if backends.fuses_epilogue(impl) and (residual is None or residual.dtype == input.dtype):
        return functools.partial(impl, residual=residual, activation=activation)

    def composed(*args: object) -> torch.Tensor:
        return native.epilogue(impl(*args), residual, activation)

    return composed


# Devices whose work runs behind the host: there policy "skip" checks the statistics on the device and
# reports later (`bnlab.late_reports`), since a host sync per layer call would stall every layer of a training
# step (and cannot happen while a CUDA graph is being captured). Tests add "cpu" to run that path.
DEFERRED_CHECK_DEVICES = frozenset({"cuda"})


# Where Triton runs on the statistics' device, the deferred check of any backend is one Triton kernel
# (`kernels.batchnorm.guard_update`) rather than torch ops; the tests turn it off to run those.
GUARD_KERNEL = True


def _deferred(running_var: torch.Tensor, policy: str) -> bool:
    """Whether a training call's running-statistics update is checked (policy "skip") or left unchecked
    ("ignore") without a host sync: on DEFERRED_CHECK_DEVICES, outside torch.compile (which has its own
    path, `_update_guarded`) and outside torch.func's transforms (whose wrapped tensors neither the guard
    kernel nor an in-place select into the captured buffers can take; torch's own kernel updates them
    below the transforms, as on the CPU). Policy "error" must sync to raise."""
    return (
        policy != "error"
        and running_var.device.type in DEFERRED_CHECK_DEVICES
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
    )


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
    guards: bool = False,
    num_batches_tracked: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool | torch.Tensor | None]:
    """Run a training step and undo its running-statistics update if the batch statistics were not finite.

    Returns the output and whether the update was kept (a 0-dim bool tensor under torch.compile, and for
    policy "skip" on DEFERRED_CHECK_DEVICES, whose warning `_LATE_REPORTS` issues once the GPU got there),
    or None where the device's guard kernel kept or dropped the update and counted it in
    `num_batches_tracked` itself (policy "skip" on DEFERRED_CHECK_DEVICES where Triton runs; `guards`: the
    backend's kernels run it, see `backends.guards_update`).
    """
    if torch.compiler.is_compiling():
        # No host sync in a graph: update copies, then keep or drop the result with a select. The kernel's
        # autograd node saves the running statistics it was given, so those must not be written afterwards.
        new_mean, new_var = running_mean.clone(), running_var.clone()
        output = impl(input, new_mean, new_var, weight, bias, True, factor, eps)
        return output, _commit_if_finite(running_mean, running_var, new_mean, new_var)

    channels = running_mean.numel()
    deferred = policy == "skip" and _deferred(running_var, policy)
    if deferred and (guards or _guard_kernel_runs(running_var)):
        # The check in one kernel (`guard_update`) instead of ~15 small torch kernels: the update goes to
        # scratch first (the backend's own kernels write it there, or the backend updates a copy) and the
        # guard commits it if finite and counts the batch. The verdict comes back for the late report.
        verdict, slot = _LATE_REPORTS.verdict(running_var.device)
        if guards:
            output = impl(input, running_mean, running_var, weight, bias, True, factor, eps, guard=verdict,
                          num_batches_tracked=num_batches_tracked)  # fmt: skip
        else:
            updated = _scratch_copy(running_mean, running_var)
            output = impl(input, *updated, weight, bias, True, factor, eps)
            if not _guard_update((running_mean, running_var), updated, verdict, num_batches_tracked):
                old = _joined(running_mean, running_var)
                finite = _commit_if_finite(running_mean, running_var, *updated)
                _LATE_REPORTS.add(finite, old, name)
                return output, finite
        _LATE_REPORTS.queue(verdict, slot, name)
        return output, None

    # Buffers are 1-D and need no grad: one small copy is the cheapest way to be able to undo the update.
    before = _joined(running_mean, running_var)
    output = impl(input, running_mean, running_var, weight, bias, True, factor, eps)
    if deferred:
        # (Without Triton:) no host sync either: the update kept or undone on the device by selects.
        finite = torch.isfinite(running_var).all()
        # Written through .data, as the restore below: the kernel's autograd node may have saved them.
        for stat, old in ((running_mean, before[:channels]), (running_var, before[channels:])):
            torch.where(finite, stat.data, old.view_as(stat), out=stat.data)
        _LATE_REPORTS.add(finite, before, name)
        return output, finite
    # A non-finite batch mean (an inf in the input) always comes with a NaN variance, so checking the
    # running variance catches every bad update. One float32 sum and a host sync; a finite sum is the
    # common case, and an infinite one from finite values (an overflow of the sum alone) is re-checked.
    if math.isfinite(running_var.sum().item()) or bool(torch.isfinite(running_var).all()):
        return output, True
    # Restore through .data: torch's kernel node saved these tensors for backward (it reads only its own
    # saved batch statistics there), and a tracked in-place write would make backward refuse to run.
    running_mean.data.copy_(before[:channels].view_as(running_mean))
    running_var.data.copy_(before[channels:].view_as(running_var))
    already_bad = not bool(torch.isfinite(before).all())
    _report_nonfinite(policy, name, already_bad, stacklevel=5)
    return output, False


def _joined(running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """A copy of the running statistics, mean then variance, in one flat tensor (one small kernel)."""
    return torch.cat((running_mean.reshape(-1), running_var.reshape(-1)))


def _scratch_copy(running_mean: torch.Tensor, running_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the running statistics for a backend to update in place (one small kernel, one buffer),
    each shaped as its original. (Stacked and unbound where the shapes agree, as they do in every layer:
    half the host time of slicing a flat copy, which is the general case's.)"""
    if running_mean.shape == running_var.shape and running_mean.dtype == running_var.dtype:
        mean, var = torch.stack((running_mean, running_var)).unbind(0)
        return mean, var
    scratch, channels = _joined(running_mean, running_var), running_mean.numel()
    return scratch[:channels].view_as(running_mean), scratch[channels:].view_as(running_var)


def _commit_if_finite(
    running_mean: torch.Tensor, running_var: torch.Tensor, new_mean: torch.Tensor, new_var: torch.Tensor
) -> torch.Tensor:
    """Copy updated statistics into the running ones if every updated variance is finite, with torch ops
    and no host sync; returns that verdict (a 0-dim bool tensor)."""
    finite = torch.isfinite(new_var).all()
    with torch.no_grad():
        running_mean.copy_(torch.where(finite, new_mean, running_mean))
        running_var.copy_(torch.where(finite, new_var, running_var))
    return finite


def _guard_kernel_runs(running_var: torch.Tensor) -> bool:
    """Whether the deferred check of these running statistics can take the guard kernel (GUARD_KERNEL, and
    Triton runs on their device)."""
    return GUARD_KERNEL and kernels.unavailable_reason(running_var.device.type) is None


def _guard_update(
    running: tuple[torch.Tensor, torch.Tensor],
    updated: tuple[torch.Tensor, torch.Tensor],
    verdict: torch.Tensor,
    num_batches_tracked: torch.Tensor | None,
    batches: int = 1,
) -> bool:
    """The guard kernel (`kernels.batchnorm.guard_update`); False if Triton fails on this device (an
    architecture it does not support: torch's CUDA wheels install it everywhere), after which the check
    takes torch ops, with one warning."""
    global GUARD_KERNEL
    try:
        kernels.load().guard_update(running, updated, verdict, num_batches_tracked, batches)
        return True
    except Exception as exc:  # (an optional accelerator of a default path: never let it break training)
        GUARD_KERNEL = False
        warnings.warn(
            f"bnlab: the non-finite check's Triton kernel failed on {running[0].device} ({type(exc).__name__}: "
            f"{str(exc)[:300]}); checking with torch ops from now on",
            RuntimeWarning,
            stacklevel=6,
        )
        return False


def _report_nonfinite(policy: str, name: str, already_bad: bool, stacklevel: int, late: bool = False) -> None:
    """Raise (policy "error") or warn (policy "skip") that a batch's statistics were not used (`late`: a
    batch of an earlier call, checked on the GPU without waiting)."""
    if already_bad:
        detail = "the running statistics were already non-finite before this batch"
    else:
        detail = "the batch's mean or variance is NaN or infinite (a non-finite input, or an overflow)"
    if policy == "error":
        raise FloatingPointError(
            f"{name}: non-finite batch statistics in training ({detail}); the running statistics were left "
            f"unchanged. Pass nonfinite='skip' to warn and continue instead."
        )
    when = " (an earlier call's batch: on a GPU the check waits for nothing)" if late else ""
    warnings.warn(
        f"{name}: non-finite batch statistics in training ({detail}); the running statistics and "
        f"num_batches_tracked were left unchanged for this batch{when}.",
        NonFiniteStatisticsWarning,
        stacklevel=stacklevel,
    )


# Policy "skip"'s warnings on a GPU, issued once the device's verdict reaches the host (`bnlab.late_reports`).
_LATE_REPORTS = LateReports(_report_nonfinite)
atexit.register(_LATE_REPORTS.flush)


# ---- variants: small siblings of batch_norm that reuse its checks, policies and backends -----------------


def batch_renorm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.01,
    eps: float = 1e-5,
    *,
    rmax: float | torch.Tensor = 3.0,
    dmax: float | torch.Tensor = 5.0,
    num_batches_tracked: torch.Tensor | None = None,
    small_batch: str = "error",
    nonfinite: str = "skip",
    backend: str | None = None,
    layer: str | None = None,
) -> torch.Tensor:
    """Batch Renormalization (Ioffe 2017): x_hat = (x - mu_B) / sigma_B * r + d in training.

    r = clip(sigma_B / sigma, 1/rmax, rmax) and d = clip((mu_B - mu) / sigma, -dmax, dmax), where mu and
    sigma = sqrt(running_var + eps) are the running statistics before this batch's update, and both are
    constants for the gradient (stop_gradient). Since r and d are per-channel constants,
    weight * x_hat + bias = (weight * r) * x_hat_B + (weight * d + bias): renorm is batch norm with an
    effective affine, and runs through `batch_norm` (same backends, checks, policies, running-statistics
    update). With rmax = 1 and dmax = 0 it is exactly batch norm. Inference is batch norm's.

    The running statistics keep torch's convention (an EMA of the unbiased variance, not of sigma as in the
    paper), so checkpoints and inference are interchangeable with BatchNorm.

    `rmax` and `dmax` may be 0-dim tensors on the input's device (BatchRenorm's schedule on a GPU, computed
    there without a host sync): then they are not checked, and rmax = 1, dmax = 0 takes the renorm path,
    whose r = 1 and d = 0 give batch norm's results.
    """
    name = layer or "batch_renorm"
    limits_on_host = _checked_limits(rmax, dmax, name)
    common = dict(
        num_batches_tracked=num_batches_tracked,
        small_batch=small_batch,
        nonfinite=nonfinite,
        backend=backend,
        layer=layer,
    )
    count = input.numel() // max(input.shape[1], 1) if input.dim() >= 2 else 0
    plain = limits_on_host and rmax == 1.0 and dmax == 0.0
    if (
        not training
        or plain
        or running_mean is None
        or running_var is None
        or count < 2
        or not _channels_match(input, running_mean, running_var, weight, bias)
    ):
        # No running statistics to correct towards, or nothing to correct: plain batch norm (which also
        # owns the tiny-batch and empty-batch policies, and the errors for mismatched shapes).
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, **common)
    _refuse_vmapped_update(name, running_mean, input, weight, bias, running_var)
    eff_weight, eff_bias = _renorm_affine(input, running_mean, running_var, weight, bias, eps, rmax, dmax, backend)
    return batch_norm(input, running_mean, running_var, eff_weight, eff_bias, True, momentum, eps, **common)


def _checked_limits(rmax: float | torch.Tensor, dmax: float | torch.Tensor, name: str) -> bool:
    """Whether batch renorm's limits are host numbers, which are checked (rmax >= 1, dmax >= 0); 0-dim
    tensors on the device (BatchRenorm's schedule on a GPU) are not: reading them would be a sync."""
    on_host = not (isinstance(rmax, torch.Tensor) or isinstance(dmax, torch.Tensor))
    if on_host and not (rmax >= 1.0 and dmax >= 0.0):
        raise ValueError(f"{name}: need rmax >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}")
    return on_host


def _renorm_affine(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    rmax: float | torch.Tensor,
    dmax: float | torch.Tensor,
    backend: str | None,
    ghosts: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch renorm's effective (weight * r, weight * d + bias), r and d held constant for the gradient.

    With `ghosts` > 1, per ghost batch of `input` (consecutive chunks of N // ghosts samples): r, d, and
    `weight` and `bias` then have ghosts * C entries, ghost j's channel c at j * C + c, each ghost's
    compared with the same running statistics. The batch statistics come from `backend`'s own reduction
    where it has one (the triton backend's statistics kernel: one read of the input in its dtype), else
    from torch's var_mean over a float32 (float64) copy.
    """
    with torch.no_grad():
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        statistics = backends.batch_statistics(backends.resolve(backend, input))(input, eps, ghosts)
        if statistics is None:
            chunks = input.reshape(ghosts, input.shape[0] // ghosts, *input.shape[1:])
            batch_var, batch_mean = torch.var_mean(chunks.to(acc), dim=[1, *range(3, chunks.dim())], correction=0)
            batch_var, batch_mean = batch_var.reshape(-1), batch_mean.reshape(-1)
            batch_sigma = torch.sqrt(batch_var + eps)
        else:  # (float32: the kernels refuse float64)
            batch_mean, invstd = statistics
            batch_sigma = invstd.reciprocal()
        sigma = torch.sqrt(running_var.to(acc) + eps).repeat(ghosts)
        r = (batch_sigma / sigma).clamp(1.0 / rmax, rmax)
        d = ((batch_mean - running_mean.to(acc).repeat(ghosts)) / sigma).clamp(-dmax, dmax)
    param_dtype = weight.dtype if weight is not None else (bias.dtype if bias is not None else acc)
    r, d = r.to(param_dtype), d.to(param_dtype)
    eff_weight = r if weight is None else weight * r
    eff_bias = d if weight is None else weight * d
    if bias is not None:
        eff_bias = eff_bias + bias
    return eff_weight, eff_bias


def ghost_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    ghost_batch_size: int,
    rmax: float | torch.Tensor | None = None,
    dmax: float | torch.Tensor | None = None,
    num_batches_tracked: torch.Tensor | None = None,
    small_batch: str = "error",
    nonfinite: str = "skip",
    backend: str | None = None,
    layer: str | None = None,
) -> torch.Tensor:
    """Ghost batch norm (Hoffer et al. 2017): in training, statistics per consecutive chunk of
    `ghost_batch_size` examples, all chunks in one vectorized call.

    The k ghost batches of an (N, C, *) input are laid side by side as k*C channels of an (N/k, k*C, *)
    tensor, normalized by one batch-norm call (weight and bias repeated k times, so their gradients sum
    over the ghosts), and laid back. The result equals k separate batch-norm calls on the chunks.

    Running statistics: as if the k chunks had gone through the layer one after the other, i.e. k EMA
    updates in a row, in closed form: running = (1-m)^k running + sum_j m (1-m)^(k-1-j) stat_j (and for
    momentum=None the cumulative average over all ghost batches seen); num_batches_tracked grows by k.
    A batch whose size is not a multiple of `ghost_batch_size` is an error (use drop_last=True in the
    DataLoader); a batch no larger than one ghost is plain batch norm. Inference is plain batch norm.

    With `rmax` and `dmax`, each ghost batch is batch-renormalized (see `batch_renorm`) against the running
    statistics: per-device batch renorm, as in the batch renorm paper's micro-batch experiment. As there,
    they may be 0-dim tensors on the input's device (not checked; rmax = 1, dmax = 0 takes the renorm path).
    """
    name = layer or "ghost_batch_norm"
    if isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, int) or ghost_batch_size < 1:
        raise ValueError(f"{name}: ghost_batch_size must be a positive integer, got {ghost_batch_size!r}")
    common = dict(small_batch=small_batch, nonfinite=nonfinite, backend=backend, layer=layer)
    batch = input.shape[0] if input.dim() >= 2 else 0
    renorm = rmax is not None and dmax is not None
    if renorm and _checked_limits(rmax, dmax, name) and rmax == 1.0 and dmax == 0.0:
        renorm = False  # (exactly batch norm)
    if not training or batch <= ghost_batch_size:
        plain = batch_renorm if renorm else batch_norm
        extra = {"rmax": rmax, "dmax": dmax} if renorm else {}
        return plain(
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            num_batches_tracked=num_batches_tracked, **common, **extra,
        )  # fmt: skip
    if batch % ghost_batch_size:
        raise ValueError(
            f"{name}: a batch of {batch} examples does not split into ghost batches of {ghost_batch_size}; "
            f"use batch sizes that are multiples of {ghost_batch_size} (e.g. DataLoader(drop_last=True))"
        )
    k, channels, rest = batch // ghost_batch_size, input.shape[1], input.shape[2:]
    if ghost_batch_size * math.prod(rest) == 1:  # one value per channel in each ghost: no variance
        if small_batch == "use_running_stats" and running_mean is not None and running_var is not None:
            return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps, **common)
        raise ValueError(small_batch_message(name, tuple(input.shape)) + f" (ghost batches of {ghost_batch_size})")
    if not _channels_match(input, running_mean, running_var, weight, bias):
        return batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps, **common)  # raises
    wide_weight = None if weight is None else weight.repeat(k)
    wide_bias = None if bias is None else bias.repeat(k)
    track = running_mean is not None and running_var is not None
    _refuse_vmapped_update(name, running_mean, input, weight, bias, running_var)
    if renorm and track:
        wide_weight, wide_bias = _renorm_affine(
            input, running_mean, running_var, wide_weight, wide_bias, eps, rmax, dmax, backend, ghosts=k
        )
    if track:
        # momentum 1 makes the kernel write each ghost's mean and unbiased variance into these buffers.
        ghost_mean = torch.zeros(k * channels, dtype=running_mean.dtype, device=input.device)
        ghost_var = torch.zeros(k * channels, dtype=running_var.dtype, device=input.device)
        # (the ghost statistics are checked below, before any update)
        out = _normalized_ghosts(input, k, ghost_mean, ghost_var, wide_weight, wide_bias, 1.0, eps,
                                 {**common, "nonfinite": "ignore"})  # fmt: skip
    else:
        out = _normalized_ghosts(input, k, None, None, wide_weight, wide_bias, 0.0, eps, common)
    if track:
        _update_sequentially(
            running_mean, running_var, ghost_mean.view(k, channels), ghost_var.view(k, channels), momentum,
            num_batches_tracked, nonfinite, name,
        )  # fmt: skip
    return out


def _channels_match(input: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    return input.dim() >= 2 and all(t is None or t.numel() == input.shape[1] for t in tensors)


def _normalized_ghosts(
    input: torch.Tensor,
    k: int,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    momentum: float,
    eps: float,
    options: dict,
) -> torch.Tensor:
    """A training call over the k ghost batches of `input` laid side by side as k*C channels (the
    statistics, parameters and running statistics given are of those), laid out as `input`: read in place
    where the backend can (`backends.ghosts_in_place`: the triton backend's kernels, eagerly), else through
    `_ghosts_side_by_side` and `batch_norm` with `options`."""
    impl = backends.resolve(options["backend"], input)
    if backends.ghosts_in_place(impl, input):
        return impl(input, running_mean, running_var, weight, bias, True, momentum, eps, ghosts=k)
    side_by_side, laid_back = _ghosts_side_by_side(input, k)
    return laid_back(batch_norm(side_by_side, running_mean, running_var, weight, bias, True, momentum, eps, **options))


def _ghosts_side_by_side(input: torch.Tensor, k: int) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The k ghost batches of `input` (N, C, *S) side by side as the k*C channels of an (N/k, k*C, *S)
    tensor (ghost j's channel c becomes channel j*C + c), and the function that lays an output of that
    shape back as `input` is laid out. One copy each way: an input with its channels innermost
    (channels-last, or (N, C, L) with C contiguous) keeps them innermost, so that the normalizing call
    reads it in place and the output comes back channels-last as it is. (Through NCHW such an input took
    three copies in the forward, the third to restore channels-last: `bnlab bench`'s `ghost-cl` case, dev
    VM, session 20: 1.37x the time of torch's chunk loop before, 0.93x after.) Other inputs go through
    NCHW."""
    n, channels, spatial = input.shape[0], input.shape[1], input.shape[2:]
    g = n // k
    if kl.layout_of(input) == kl.ROWS:  # (the kernels' test for channels innermost; (N, C) takes it too)
        # (N, *S, C) -> (k, g, *S, C) -> (g, *S, k, C) -> (g, *S, k*C), read as (g, k*C, *S) channels-last
        last = input.movedim(1, -1)
        wide = last.reshape(k, g, *spatial, channels).movedim(0, -2).reshape(g, *spatial, k * channels)

        def laid_back(out: torch.Tensor) -> torch.Tensor:
            rows = out.movedim(1, -1).reshape(g, *spatial, k, channels).movedim(-2, 0)
            return rows.reshape(n, *spatial, channels).movedim(-1, 1)

        return wide.movedim(-1, 1), laid_back
    # (N, C, *S) -> (k, g, C, *S) -> (g, k, C, *S) -> (g, k*C, *S)
    wide = input.reshape(k, g, channels, *spatial).transpose(0, 1).reshape(g, k * channels, *spatial)
    return wide, lambda out: out.reshape(g, k, channels, *spatial).transpose(0, 1).reshape(input.shape)


def _update_sequentially(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    means: torch.Tensor,
    variances: torch.Tensor,
    momentum: float | None,
    num_batches_tracked: torch.Tensor | None,
    policy: str,
    name: str,
) -> None:
    """Apply k running-statistics updates (rows of `means`/`variances`, unbiased) as one closed-form step.

    Everything data-dependent stays on the statistics' device (the counter of momentum=None too); policy
    "skip" on DEFERRED_CHECK_DEVICES keeps or drops the update with a select and reports later, as
    `_update_guarded` does, so a GPU step waits for nothing; under torch.compile (any policy but "ignore")
    the select, without a report, as there; elsewhere the check is a host sync. Where the guard kernel
    runs (policy "skip" on a GPU, outside torch.compile), the check and the commit are that one kernel."""
    k = means.shape[0]
    compiling = torch.compiler.is_compiling()
    with torch.no_grad():
        deferred = (policy == "skip" and _deferred(running_var, policy)) or (compiling and policy != "ignore")
        by_kernel = deferred and not compiling and _guard_kernel_runs(running_var)

        def batches_finite() -> torch.Tensor:
            return torch.isfinite(variances).all() & torch.isfinite(means).all()

        finite = None if policy == "ignore" or by_kernel else batches_finite()
        if finite is not None and not deferred and not bool(finite):
            _report_nonfinite(policy, name, not bool(torch.isfinite(running_var).all()), stacklevel=4)
            return
        if momentum is None:
            if num_batches_tracked is None:
                raise ValueError(f"{name}: momentum=None (cumulative average) needs num_batches_tracked")
            seen = num_batches_tracked.to(torch.float64)  # (float64 0-dim on the device: exact, no sync)
            keep = seen / (seen + k)
            weights = (1.0 / (seen + k)).expand(k)
        else:
            keep = (1.0 - momentum) ** k
            # ghost j's weight momentum * (1 - momentum) ** (k - 1 - j), computed where the statistics are
            # (a tensor built on the host would be a copy, and a sync, on every call). In float32 the same
            # bits as Python's `**` in all 3128 (momentum, k) tried (session 12); float64 may differ in the
            # last bit (torch's vectorized pow).
            powers = torch.arange(k - 1, -1, -1, dtype=torch.float64, device=means.device)
            weights = momentum * torch.pow(1.0 - momentum, powers)
        weights = weights.to(means.dtype)
        new_mean = running_mean * keep + (weights[:, None] * means).sum(0)
        new_var = running_var * keep + (weights[:, None] * variances).sum(0)
        if not deferred:
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
            if num_batches_tracked is not None:
                num_batches_tracked.add_(k)
            return
        if by_kernel:
            # (a non-finite ghost mean always comes with a non-finite variance, so new_var tells both)
            verdict, slot = _LATE_REPORTS.verdict(running_var.device)
            if _guard_update((running_mean, running_var), (new_mean, new_var), verdict, num_batches_tracked, k):
                _LATE_REPORTS.queue(verdict, slot, name)
                return
            finite = batches_finite()  # (the kernel failed: torch ops)
        if not compiling:
            _LATE_REPORTS.add(finite, running_var, name)  # (its verdict on the old statistics: queued first)
        torch.where(finite, new_mean, running_mean, out=running_mean)
        torch.where(finite, new_var, running_var, out=running_var)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(finite.to(num_batches_tracked.dtype) * k)
