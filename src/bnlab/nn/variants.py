"""Batch renormalization and ghost batch norm as drop-in layers (same arguments, buffers and state_dict keys
as BatchNorm, plus their own keyword-only options). Inference is plain batch norm for both."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bnlab import functional as F
from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormMixin

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
]


class _RenormMixin(_BatchNormMixin):
    """Batch renorm with the paper's schedule for its clipping limits, driven by num_batches_tracked.

    For the first `warmup_steps` steps rmax = 1 and dmax = 0 (plain batch norm while the running
    statistics settle); then both grow linearly, reaching `rmax` at step `rmax_ramp_end` and `dmax` at step
    `dmax_ramp_end`. The defaults are Ioffe (2017)'s: rmax 3 by 40k steps, dmax 5 by 25k steps, after 5k
    steps of warm-up; set warmup_steps=0 and the ramp ends to 0 for fixed limits from the start. The
    default momentum is the paper's 0.01 rather than BatchNorm's 0.1. With `ghost_batch_size`, statistics
    (and r, d) are per ghost batch: per-device renorm with simulated devices; the schedule then counts
    ghost batches, since num_batches_tracked grows by one per ghost.
    """

    _functional = staticmethod(F.batch_renorm)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 5_000,
        rmax_ramp_end: int = 40_000,
        dmax_ramp_end: int = 25_000,
        ghost_batch_size: int | None = None,
        **options: Any,
    ) -> None:
        label = f"{type(self).__name__}({num_features})"
        if ghost_batch_size is not None and (
            isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, int) or ghost_batch_size < 1
        ):
            raise ValueError(f"{label}: ghost_batch_size must be a positive integer or None, got {ghost_batch_size!r}")
        if not (math.isfinite(rmax) and rmax >= 1.0 and math.isfinite(dmax) and dmax >= 0.0):
            raise ValueError(f"{label}: need finite rmax >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}")
        if min(warmup_steps, rmax_ramp_end, dmax_ramp_end) < 0:
            raise ValueError(f"{label}: warmup_steps and the ramp ends must be >= 0")
        if not track_running_stats:
            raise ValueError(
                f"{label}: batch renorm corrects towards the running statistics; it needs track_running_stats=True"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **options)
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.warmup_steps, self.rmax_ramp_end, self.dmax_ramp_end = warmup_steps, rmax_ramp_end, dmax_ramp_end
        self.ghost_batch_size = ghost_batch_size
        if ghost_batch_size is not None:
            # Per-device renorm: every ghost batch is corrected against the running statistics of the start
            # of the step, as devices running in parallel would be.
            self._functional = F.ghost_batch_norm

    def current_limits(self) -> tuple[float, float]:
        """(rmax, dmax) in force at the current num_batches_tracked (reads the counter on the host)."""
        step = int(self.num_batches_tracked) if self.num_batches_tracked is not None else 0

        def ramp(end: int) -> float:
            if step < self.warmup_steps:
                return 0.0
            return 1.0 if end <= self.warmup_steps else min(1.0, (step - self.warmup_steps) / (end - self.warmup_steps))

        return 1.0 + (self.rmax - 1.0) * ramp(self.rmax_ramp_end), self.dmax * ramp(self.dmax_ramp_end)

    def _limits_on_device(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`current_limits` as float64 0-dim tensors computed from num_batches_tracked where it lives, the
        same values by the same operations: on a GPU, reading the counter on the host would wait for every
        earlier layer's work at each training call (and cannot happen during a CUDA graph's capture)."""
        step = self.num_batches_tracked.to(torch.float64)
        warmup = self.warmup_steps

        def ramp(end: int) -> torch.Tensor:
            rising = torch.ones_like(step) if end <= warmup else ((step - warmup) / (end - warmup)).clamp(max=1.0)
            return torch.where(step < warmup, torch.zeros_like(step), rising)

        return 1.0 + (self.rmax - 1.0) * ramp(self.rmax_ramp_end), self.dmax * ramp(self.dmax_ramp_end)

    def _variant_options(self) -> dict[str, Any]:
        if not self.training:
            return {} if self.ghost_batch_size is None else {"ghost_batch_size": self.ghost_batch_size}
        counter = self.num_batches_tracked
        if counter is not None and counter.device.type in F.DEFERRED_CHECK_DEVICES:
            rmax, dmax = self._limits_on_device()
        else:
            rmax, dmax = self.current_limits()
        ghost = {} if self.ghost_batch_size is None else {"ghost_batch_size": self.ghost_batch_size}
        return {"rmax": rmax, "dmax": dmax, **ghost}

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}, "
            f"rmax_ramp_end={self.rmax_ramp_end}, dmax_ramp_end={self.dmax_ramp_end}"
            + ("" if self.ghost_batch_size is None else f", ghost_batch_size={self.ghost_batch_size}")
        )


class _GhostMixin(_BatchNormMixin):
    """Ghost batch norm: statistics per chunk of `ghost_batch_size` examples (see
    `bnlab.functional.ghost_batch_norm` for the running-statistics convention: one EMA update per ghost)."""

    _functional = staticmethod(F.ghost_batch_norm)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        ghost_batch_size: int,
        **options: Any,
    ) -> None:
        if isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, int) or ghost_batch_size < 1:
            raise ValueError(
                f"{type(self).__name__}({num_features}): ghost_batch_size must be a positive integer, "
                f"got {ghost_batch_size!r}"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **options)
        self.ghost_batch_size = ghost_batch_size
        self._options = {"ghost_batch_size": ghost_batch_size}

    def _variant_options(self) -> dict[str, Any]:
        return self._options

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"


class BatchRenorm1d(_RenormMixin, nn.BatchNorm1d):
    """Batch renormalization over (N, C) or (N, C, L) input."""

    _expected_dims, _shape_hint = BatchNorm1d._expected_dims, BatchNorm1d._shape_hint


class BatchRenorm2d(_RenormMixin, nn.BatchNorm2d):
    """Batch renormalization over (N, C, H, W) input."""

    _expected_dims, _shape_hint = BatchNorm2d._expected_dims, BatchNorm2d._shape_hint


class BatchRenorm3d(_RenormMixin, nn.BatchNorm3d):
    """Batch renormalization over (N, C, D, H, W) input."""

    _expected_dims, _shape_hint = BatchNorm3d._expected_dims, BatchNorm3d._shape_hint


class GhostBatchNorm1d(_GhostMixin, nn.BatchNorm1d):
    """Ghost batch norm over (N, C) or (N, C, L) input."""

    _expected_dims, _shape_hint = BatchNorm1d._expected_dims, BatchNorm1d._shape_hint


class GhostBatchNorm2d(_GhostMixin, nn.BatchNorm2d):
    """Ghost batch norm over (N, C, H, W) input."""

    _expected_dims, _shape_hint = BatchNorm2d._expected_dims, BatchNorm2d._shape_hint


class GhostBatchNorm3d(_GhostMixin, nn.BatchNorm3d):
    """Ghost batch norm over (N, C, D, H, W) input."""

    _expected_dims, _shape_hint = BatchNorm3d._expected_dims, BatchNorm3d._shape_hint
