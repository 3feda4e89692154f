"""Synchronized batch normalization over ``torch.distributed``, and conversion to and from it.

`SyncBatchNorm` normalizes each rank's batch with the statistics of the union of all ranks' batches in its
process group. It takes ``torch.nn.SyncBatchNorm``'s arguments and has its parameters, buffers and
``state_dict`` keys and version (both come from torch's ``_NormBase``), so checkpoints load both ways, and it
takes bnlab's options (``small_batch``, ``nonfinite``, ``backend``, ``name``). Unlike torch's, it runs on CPU
tensors with gloo as well as on GPUs with nccl: the arithmetic is plain tensor ops on the input's device.

It subclasses torch's ``_BatchNorm``, not ``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses to wrap
a CPU model that holds any ``isinstance(m, torch.nn.SyncBatchNorm)`` layer ("SyncBatchNorm layers only work
with GPU modules", torch 2.13), which would rule out the gloo-on-CPU use this layer exists for. The price:
``isinstance(m, torch.nn.SyncBatchNorm)`` is False (``isinstance(m, _BatchNorm)`` holds, as for the
BatchNorm*d classes).

Communication per training step and layer, with more than one process in the group:
- forward: ONE all-reduce (sum) of a float64 (3, C) tensor: per channel sum(x - K), sum((x - K)^2) and the
  count, where K is a shift that is the same on every rank (see `_common_shift`);
- backward: ONE all-reduce (sum) of a float64 (2, C) tensor: per channel sum(dy) and sum(dy * x_hat),
  when the input needs a gradient (as in torch).
Plus one host sync for the global count (the policies depend on it) and, unless ``nonfinite="ignore"``,
one for the finiteness check of the new running statistics.

Everything that decides control flow after the all-reduce (the count, the finiteness of the statistics) is
computed from the all-reduced values, so every rank takes the same branch: a rank with an empty batch still
joins both collectives and returns an empty output, a global count of one value per channel raises (or uses
the running statistics) on every rank, and a non-finite statistic is skipped on every rank. What a rank checks
before the all-reduce (input rank, channel count) is local: if one rank raises there, the others wait in the
collective until the process group's timeout, as with torch.

The conversion helpers `to_sync` and `from_sync` live here too; `from_sync` needs to know which of
BatchNorm1d/2d/3d to rebuild (see its docstring).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from bnlab import functional as F
from bnlab.nn._swap import rebuild, replace_modules, shared_groups
from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormMixin

__all__ = ["SyncBatchNorm", "from_sync", "to_sync"]

_Group = Any  # a torch.distributed ProcessGroup; None means the default (world) group


# ---- the statistics: one all-reduce ------------------------------------------------------------------------


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-element work: float64 for float64 input, float32 otherwise (as torch's GPU kernels).

    Only C-sized vectors are handled in float64 (see `_local_shifted_sums`), so a large activation is never
    copied to float64: that would double the memory traffic of a layer meant for GPU training.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view((1, -1) + (1,) * (ndim - 2))


def _reduce_dims(ndim: int) -> list[int]:
    return [0, *range(2, ndim)]


def _pivot(x: torch.Tensor) -> torch.Tensor:
    """One sample per channel (the first), in the per-element dtype; zeros for an empty batch."""
    if x.numel() == 0:
        return torch.zeros(x.shape[1], dtype=_opmath(x.dtype), device=x.device)
    return x[(0, slice(None), *(0,) * (x.dim() - 2))].to(_opmath(x.dtype))


def _common_shift(running_mean: torch.Tensor | None, channels: int, device: torch.device) -> torch.Tensor:
    """K: the per-channel shift of the all-reduced sums, float64; it must be the same on every rank.

    The running mean is the natural choice: it is identical on every rank (this layer updates it from the
    all-reduced statistics only, and DDP broadcasts buffers from rank 0), and once it has tracked the data,
    mean - K is small, so the variance S2/N - (S1/N)^2 below cancels nothing. Before that (the first step,
    or without running statistics, where K = 0) the cancellation costs a relative error of about
    1e-16 * ((mean - K) / std)^2 in float64: 1e-8 for a float32 input of 1e4 + N(0, 1), which is below
    float32 resolution. A per-rank choice (a local sample, the local mean) would be better for each rank
    but cannot be combined by a single sum; agreeing on one would cost a second collective. Non-finite
    running means (a layer poisoned under ``nonfinite="ignore"``) are replaced by 0 so they cannot poison
    the batch statistics too.
    """
    if running_mean is None:
        return torch.zeros(channels, dtype=torch.float64, device=device)
    shift = running_mean.detach().to(torch.float64)
    return torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))


def _local_shifted_sums(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """This rank's (3, C) float64 contribution: sum(x - K), sum((x - K)^2) and the count, per channel.

    The sums are not formed from the raw values. Per element, in the input's precision, the values are
    shifted by a local pivot (one of their samples: values close to each other subtract exactly, so a large
    common offset never enters a rounded sum) and reduced in two passes to the local mean and M2 =
    sum((x - mean_local)^2). Only then, per channel in float64, they are re-expressed around K:
        d  = mean_local - K
        S1 = n * d
        S2 = M2 + n * d^2
    which is exact algebra (sum((x - K)^2) = M2 + n * d^2), so each rank's sums are as accurate as its
    two-pass statistics. An empty batch contributes zeros.
    """
    channels = x.shape[1]
    count = x.numel() // channels
    if count == 0:
        return torch.zeros(3, channels, dtype=torch.float64, device=x.device)
    nd, dims = x.dim(), _reduce_dims(x.dim())
    pivot = _pivot(x)
    shifted = x.to(pivot.dtype) - _channel_view(pivot, nd)
    shifted_mean = shifted.mean(dims)
    centered = shifted - _channel_view(shifted_mean, nd)
    m2 = (centered * centered).sum(dims).to(torch.float64)
    d = pivot.to(torch.float64) + shifted_mean.to(torch.float64) - shift
    n = float(count)
    return torch.stack((n * d, m2 + n * d * d, torch.full_like(d, n)))


def _global_statistics(x: torch.Tensor, shift: torch.Tensor, group: _Group) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(count, mean, biased var) over every rank's batch, float64 per channel. One all-reduce; one host sync.

    For a global count of 0 the mean and variance are NaN; the caller must not use them.
    """
    with torch.no_grad():  # inputs to `_SyncBatchNormFunction`, whose backward accounts for them by hand
        total = _local_shifted_sums(x, shift)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        sum_shifted, sum_squares, counts = total
        count = int(counts[0].item())  # the same on every rank: it comes out of the all-reduce
        shifted_mean = sum_shifted / counts
        # Shifted by K, the cancellation in S2/N - (S1/N)^2 is bounded (see `_common_shift`); a rounding that
        # still dips below zero for a constant channel is clipped, a NaN stays NaN (clamp propagates it).
        var = (sum_squares / counts - shifted_mean * shifted_mean).clamp_min(0.0)
        return count, shift + shifted_mean, var


# ---- normalization and its backward: one all-reduce --------------------------------------------------------


class _SyncBatchNormFunction(torch.autograd.Function):
    r"""y = weight * (x - mean) * invstd + bias, with mean and invstd of the union of all ranks' batches.

    ``mean`` and ``invstd = 1 / sqrt(var + eps)`` come in already synchronized (float64, per channel) and
    are treated as the functions of x they are: the backward below is the closed form for batch statistics,
    taken over the global batch of ``count`` values per channel. With g = dy * weight and
    x_hat = (x - mean) * invstd, for the loss L = sum over ranks of each rank's loss (each rank's dy is
    dL/dy on its own batch), per channel:

        dbias   = sum dy                       (this rank's values only)
        dweight = sum dy * x_hat               (this rank's values only)
        dx      = invstd * (g - G1 / count - x_hat * G2 / count)
        G1 = sum over ALL ranks of sum(g),  G2 = sum over ALL ranks of sum(g * x_hat)

    G1 and G2 are weight * (one all-reduce of [sum dy, sum dy * x_hat]). This is the backward of
    ``bnlab.backends.reference`` with the sums collected over the process group; the formula itself is
    derived there.

    The weight and bias gradients are NOT all-reduced: each rank returns its own batch's share, like every
    other parameter of the model, and DDP's gradient all-reduce adds (and averages) the shares. Summed over
    ranks they are the gradients of one layer on the concatenated batch; all-reducing them here as well
    would count them ``world_size`` times over after DDP's reduction.

    An empty batch takes part in the backward all-reduce with zeros and gets zero (not None) gradients, so
    the autograd hooks DDP relies on fire on every rank. Double backward is not supported.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, group):  # type: ignore[override]
        nd = x.dim()
        pivot = _pivot(x)
        # Subtract in two steps, (x - pivot) - (mean - pivot): the first is exact for values near each other,
        # the second is a small number computed in float64. Subtracting a float32-rounded mean directly would
        # put its rounding (ulp(1e4) = 1e-3 for a 1e4 offset) into every output.
        offset = (mean - pivot.to(torch.float64)).to(pivot.dtype)
        inv = invstd.to(pivot.dtype)
        scale = inv if weight is None else inv * weight.to(pivot.dtype)
        y = ((x.to(pivot.dtype) - _channel_view(pivot, nd)) - _channel_view(offset, nd)) * _channel_view(scale, nd)
        if bias is not None:
            y = y + _channel_view(bias.to(y.dtype), nd)
        ctx.save_for_backward(x, weight, pivot, offset, inv)
        ctx.count = count
        ctx.group = group
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, pivot, offset, inv = ctx.saved_tensors
        nd, dims = x.dim(), _reduce_dims(x.dim())
        acc = pivot.dtype
        dya = dy.to(acc)
        x_hat = ((x.to(acc) - _channel_view(pivot, nd)) - _channel_view(offset, nd)) * _channel_view(inv, nd)
        local = torch.stack((dya.sum(dims), (dya * x_hat).sum(dims))).to(torch.float64)
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        dx = None
        if needs_x:
            total = local.clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
            mean_dy, mean_dy_xhat = (total / ctx.count).to(acc)
            scale = inv if weight is None else inv * weight.to(acc)
            # weight is per channel, so g - mean(g) - x_hat * mean(g x_hat) = weight * (the same in dy).
            dx = (dya - _channel_view(mean_dy, nd) - x_hat * _channel_view(mean_dy_xhat, nd)) * _channel_view(scale, nd)
            dx = dx.to(x.dtype)
        weight_dtype, bias_dtype = ctx.param_dtypes
        dweight = local[1].to(weight_dtype) if needs_weight else None
        dbias = local[0].to(bias_dtype) if needs_bias else None
        return dx, dweight, dbias, None, None, None, None


# ---- the module --------------------------------------------------------------------------------------------


class SyncBatchNorm(_BatchNormMixin, nn.modules.batchnorm._BatchNorm):
    """Batch normalization over (N, C, *) input with statistics synchronized across a process group.

    A drop-in for `torch.nn.SyncBatchNorm` (same arguments and ``state_dict``; the module docstring says why
    it is not a subclass) that also runs on CPU with gloo, takes bnlab's keyword-only options
    (``small_batch``, ``nonfinite``, ``backend``, ``name``; see `bnlab.nn.BatchNorm2d`), and handles uneven
    and empty per-rank batches.

    In training, with ``torch.distributed`` initialized and more than one process in ``process_group``
    (default: the world), each rank's batch is normalized with the mean and biased variance of all ranks'
    batches together (weighted by their sizes), and the running statistics are updated identically on every
    rank with the unbiased variance over the global count. The module docstring lists the collectives; every
    rank in the group must call the layer the same number of times, empty batch or not. Otherwise (no
    distributed, a group of one, eval mode) it is exactly `bnlab.functional.batch_norm`, as in
    `bnlab.nn.BatchNorm2d` (``backend`` applies to this path only).

    Policies with synchronization, decided on the global batch so that all ranks agree: a global count of one
    value per channel follows ``small_batch``; an empty global batch returns empty outputs and leaves the
    running statistics alone; non-finite global statistics follow ``nonfinite`` (running statistics and
    ``num_batches_tracked`` untouched on every rank for ``"skip"`` and ``"error"``).

    Side effects: a training forward updates ``running_mean``, ``running_var`` and ``num_batches_tracked``
    in place (as torch's does) and runs collectives on ``process_group``; the training backward runs one.

    ``original_class`` is the BatchNorm class `to_sync` replaced with this layer (None otherwise); `from_sync`
    uses it to rebuild the right dimensionality.
    """

    _expected_dims = ()  # any rank >= 2; `_check_input_dim` below is the whole check

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: _Group = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        small_batch: str = "error",
        nonfinite: str = "skip",
        backend: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            small_batch=small_batch,
            nonfinite=nonfinite,
            backend=backend,
            name=name,
        )
        self.process_group = process_group
        self.original_class: type[nn.Module] | None = None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"{self._label}: expected input of shape (N, {self.num_features}, *) with at least 2 dims, got "
                f"{input.dim()}-D input of shape {tuple(input.shape)}"
            )

    def _sync_group(self) -> _Group | None:
        """The group to synchronize over, or None when there is nothing to synchronize with."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        # A group of one has nothing to share; a rank outside the group (size -1) normalizes its own batch.
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self._sync_group() if self.training else None
        if group is None:
            # The mixin's forward: `_check_input_dim` (always called, as `_expected_dims` is empty), then
            # bnlab.functional.batch_norm with torch's buffer logic.
            return super().forward(input)
        return self._forward_synchronized(input, group)

    def _forward_synchronized(self, input: torch.Tensor, group: _Group) -> torch.Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{self._label}: expected input of shape (N, {self.num_features}, *), got {tuple(input.shape)} "
                f"({input.shape[1]} channels)"
            )
        params, buffers = self._parameters, self._buffers
        weight, bias = params["weight"], params["bias"]
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        track = self.track_running_stats and running_mean is not None and running_var is not None

        shift = _common_shift(running_mean if track else None, self.num_features, input.device)
        count, mean, var = _global_statistics(input, shift, group)

        if count == 0:  # every rank is empty: an empty output, running statistics left alone, no backward sync
            return F.batch_norm(
                input, None, None, weight, bias, True, 0.0, self.eps, backend=self.backend, layer=self._label
            )
        if count == 1:  # one value per channel in the whole group: no variance exists
            if self.small_batch == "use_running_stats" and track:
                return F.batch_norm(
                    input,
                    running_mean,
                    running_var,
                    weight,
                    bias,
                    False,
                    0.0,
                    self.eps,
                    backend=self.backend,
                    layer=self._label,
                )
            world = dist.get_world_size(group)
            raise ValueError(
                F.small_batch_message(self._label, tuple(input.shape))
                + f" (The statistics are synchronized over {world} processes, which hold 1 value per channel "
                f"in all.)"
            )

        output = _SyncBatchNormFunction.apply(input, weight, bias, mean, torch.rsqrt(var + self.eps), count, group)
        if track:
            self._update_running_statistics(mean, var, count)
        return output

    def _update_running_statistics(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """running = (1 - factor) * running + factor * batch (unbiased variance), as in bnlab.functional.

        Every input here is the same on every rank (all-reduced statistics, synchronized buffers), so every
        rank computes the same update and takes the same ``nonfinite`` branch.
        """
        buffers = self._buffers
        running_mean, running_var, tracked = (
            buffers["running_mean"],
            buffers["running_var"],
            buffers["num_batches_tracked"],
        )
        assert running_mean is not None and running_var is not None
        if self.momentum is None:
            if tracked is None:
                raise ValueError(f"{self._label}: momentum=None (cumulative average) needs num_batches_tracked")
            factor = 1.0 / (float(tracked) + 1.0)
        else:
            factor = self.momentum
        # Computed in float64 and rounded once into the buffers' dtype.
        new_mean = running_mean.to(torch.float64) * (1.0 - factor) + mean * factor
        new_var = running_var.to(torch.float64) * (1.0 - factor) + var * (factor * count / (count - 1))
        if self.nonfinite != "ignore" and not bool(torch.isfinite(new_mean).all() & torch.isfinite(new_var).all()):
            self._reject_nonfinite(running_mean, running_var)
            return
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
            if tracked is not None:
                tracked.add_(1)

    def _reject_nonfinite(self, running_mean: torch.Tensor, running_var: torch.Tensor) -> None:
        if not bool(torch.isfinite(running_mean).all() & torch.isfinite(running_var).all()):
            detail = "the running statistics were already non-finite before this batch"
        else:
            detail = "the global batch's mean or variance is NaN or infinite (a non-finite input on some rank)"
        if self.nonfinite == "error":
            raise FloatingPointError(
                f"{self._label}: non-finite batch statistics in training ({detail}); the running statistics "
                f"were left unchanged on every rank. Pass nonfinite='skip' to warn and continue instead."
            )
        warnings.warn(
            f"{self._label}: non-finite batch statistics in training ({detail}); the running statistics and "
            f"num_batches_tracked were left unchanged for this batch on every rank.",
            F.NonFiniteStatisticsWarning,
            stacklevel=4,
        )


# ---- conversion --------------------------------------------------------------------------------------------

# The exact classes each direction replaces (subclasses are someone else's layers, left alone).
_DIMS_OF_CLASS: dict[type[nn.Module], int] = {
    nn.BatchNorm1d: 1,
    nn.BatchNorm2d: 2,
    nn.BatchNorm3d: 3,
    BatchNorm1d: 1,
    BatchNorm2d: 2,
    BatchNorm3d: 3,
}
_BNLAB_OF_DIMS: dict[int, type[nn.Module]] = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_SYNC_CLASSES = (SyncBatchNorm, nn.SyncBatchNorm)
_OPTIONS = ("small_batch", "nonfinite", "backend")


def _bnlab_options(module: nn.Module) -> dict[str, Any]:
    """bnlab's layer options of `module` (empty for torch's layers, which get bnlab's defaults)."""
    if not isinstance(module, _BatchNormMixin):
        return {}
    return {key: getattr(module, key) for key in _OPTIONS}


def to_sync(model: nn.Module, process_group: _Group = None, *, inplace: bool = False) -> nn.Module:
    """Replace every ``BatchNorm1d/2d/3d`` (torch's or bnlab's, exact classes) by a bnlab `SyncBatchNorm`.

    Each new layer holds the old layer's parameters and buffers (the same tensors), its training mode and,
    for a bnlab layer, its options and name (a torch layer's gets its qualified name); it synchronizes over
    `process_group` (None: the world) and remembers the class it replaced in ``original_class``, for
    `from_sync`. Subclasses, torch's ``SyncBatchNorm`` and existing bnlab `SyncBatchNorm` layers are left as
    they are; hooks registered on a replaced layer are not carried over.

    Returns a converted deep copy and leaves `model` untouched, unless ``inplace=True`` (then `model` is
    changed and returned; if `model` is itself a BN layer, the returned layer is the one to use).
    """

    def make(qualified: str, module: nn.Module) -> nn.Module | None:
        if type(module) not in _DIMS_OF_CLASS:
            return None
        options = _bnlab_options(module)
        name = getattr(module, "name", None) or qualified or None
        new = rebuild(module, SyncBatchNorm, {**options, "process_group": process_group, "name": name})
        new.original_class = type(module)
        return new

    return replace_modules(model, make, inplace)


def from_sync(model: nn.Module, *, dims: int | Mapping[str, int] | None = None, inplace: bool = False) -> nn.Module:
    """Replace every ``SyncBatchNorm`` (bnlab's or torch's, exact classes) by bnlab's ``BatchNorm1d/2d/3d``.

    Which of the three: the class `to_sync` replaced (``original_class``, bnlab's twin of it) when the layer
    remembers one; otherwise ``dims`` (1, 2 or 3 for BatchNorm1d/2d/3d; or a mapping from qualified layer
    names to those), which layers that remember their class ignore. A layer with neither is an error that
    names it, raised before anything is changed. (Why not guess from the first input a layer sees: that
    would be state outside the ``state_dict``, lost by every checkpoint, recorded by a side effect of
    forward, and absent for a model that never ran; a torch SyncBatchNorm never has it at all.)

    Each new layer holds the old layer's parameters and buffers (the same tensors), its training mode and,
    for a bnlab layer, its options and name; the process group is dropped.

    Returns a converted deep copy (process groups are shared, not copied) and leaves `model` untouched,
    unless ``inplace=True`` (then `model` is changed and returned; if `model` is itself a SyncBatchNorm, the
    returned layer is the one to use).
    """
    if dims is not None and not isinstance(dims, Mapping):
        dims = _check_dims(dims, "dims")
    # Decide every layer's class first, so that an unknown one fails before `model` is changed. Keyed by
    # identity: a layer that appears under two names is one layer.
    targets: dict[int, type[nn.Module]] = {}
    unknown: list[str] = []
    for qualified, module in model.named_modules():
        if type(module) not in _SYNC_CLASSES:
            continue
        original = getattr(module, "original_class", None)
        if original in _DIMS_OF_CLASS:
            targets[id(module)] = _BNLAB_OF_DIMS[_DIMS_OF_CLASS[original]]
        elif isinstance(dims, Mapping) and qualified in dims:
            targets[id(module)] = _BNLAB_OF_DIMS[_check_dims(dims[qualified], f"dims[{qualified!r}]")]
        elif isinstance(dims, int):
            targets[id(module)] = _BNLAB_OF_DIMS[dims]
        else:
            unknown.append(qualified or "<the model itself>")
    if isinstance(dims, Mapping):
        sync_names = {qualified for qualified, module in model.named_modules() if type(module) in _SYNC_CLASSES}
        strays = sorted(set(dims) - sync_names)
        if strays:  # most likely a typo, which would otherwise surface as an unknown layer, or not at all
            raise ValueError(f"from_sync: dims names {strays}, which are not SyncBatchNorm layers of the model")
    if unknown:
        raise ValueError(
            f"from_sync: cannot tell whether {', '.join(map(repr, unknown))} should become a BatchNorm1d, 2d or "
            f"3d (made without to_sync, they do not remember); pass dims=1, 2 or 3, or a mapping such as "
            f"dims={{{unknown[0]!r}: 2}}"
        )
    if not inplace:  # copy here, where the identities above still hold, and map them to the copies
        memo = shared_groups(model)
        model = copy.deepcopy(model, memo=memo)
        targets = {id(memo[key]): cls for key, cls in targets.items()}

    def make(qualified: str, module: nn.Module) -> nn.Module | None:
        if type(module) not in _SYNC_CLASSES:
            return None
        options = _bnlab_options(module)
        options["name"] = getattr(module, "name", None) or qualified or None
        return rebuild(module, targets[id(module)], options)

    return replace_modules(model, make, inplace=True)


def _check_dims(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value not in _BNLAB_OF_DIMS:
        raise ValueError(f"from_sync: {what} must be 1, 2 or 3 (BatchNorm1d/2d/3d), got {value!r}")
    return value  # type: ignore[return-value]
