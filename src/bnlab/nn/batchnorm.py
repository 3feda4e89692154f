"""Drop-in ``BatchNorm1d/2d/3d`` modules.

Each class subclasses its ``torch.nn`` twin, so parameters, buffers, ``state_dict`` keys and versioning,
``reset_*`` methods and ``isinstance(m, torch.nn.BatchNorm2d)`` are torch's own, and checkpoints move both
ways unchanged. What differs is ``forward``: it goes through ``bnlab.functional.batch_norm`` (switchable
backends, clear errors that name the layer, protected running statistics; keyword-only ``residual=`` and
``activation=`` fuse ``relu(bn(x) + residual)``), and the constructor takes a few keyword-only options
(``small_batch``, ``nonfinite``, ``backend``, ``name``) documented there.

Traps worth knowing, as in torch: the batch is normalized with the *biased* variance (divided by m), while
the running estimate uses the *unbiased* one (divided by m - 1); ``momentum`` is the weight of the new
batch in the running average (``running = (1 - momentum) * running + momentum * batch``), not optimizer
momentum, and ``momentum=None`` makes the running statistics a plain cumulative average.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from bnlab import functional as F
from bnlab.backends import _validate as _validate_backend

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

# torch 2.13 added `bias=False` (a scale without a shift); older releases have no such argument.
_TORCH_HAS_BIAS_FLAG = "bias" in inspect.signature(nn.modules.batchnorm._NormBase.__init__).parameters


_NO_OPTIONS: dict[str, Any] = {}


class _NamedLayer:
    """A `name` (the layer's qualified name in its model), the `_label` that error messages start with, and
    the input-rank check that uses them (`_expected_dims` and `_shape_hint` come from each class)."""

    num_features: int
    _expected_dims: tuple[int, ...] = ()
    _shape_hint: str = ""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in self._expected_dims:
            raise ValueError(
                f"{self._label}: expected input of shape {self._shape_hint.format(C=self.num_features)}, got "
                f"{input.dim()}-D input of shape {tuple(input.shape)}"
            )

    @property
    def name(self) -> str | None:
        """The layer's name in its model (set by `bnlab.nn.name_layers` and `convert`), used in messages."""
        return self._name

    @name.setter
    def name(self, value: str | None) -> None:
        self._name = value
        base = f"{type(self).__name__}({self.num_features})"
        self._label = base if value is None else f"{base} '{value}'"


class _BatchNormMixin(_NamedLayer):
    """The forward pass and options shared by the 1d/2d/3d classes; they differ only in the input check.

    Variants (batch renorm, ghost BN) reuse it by naming their functional and its extra arguments.
    """

    _expected_dims: tuple[int, ...] = ()
    _shape_hint: str = ""
    _functional = staticmethod(F.batch_norm)
    # Where forward finds weight and bias: the parameters, or the buffers for a layer whose affine is frozen.
    _affine_store = "_parameters"

    def _variant_options(self) -> dict[str, Any]:
        """Extra keyword arguments for `_functional` (none for plain batch norm)."""
        return _NO_OPTIONS

    # Declared for type checkers; torch's base class creates them.
    num_features: int
    eps: float
    momentum: float | None
    track_running_stats: bool
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    training: bool

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
        bias: bool = True,
        small_batch: str = "error",
        nonfinite: str = "skip",
        backend: str | None = None,
        name: str | None = None,
    ) -> None:
        cls = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"{cls}: num_features must be a positive integer, got {num_features!r}")
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(
                f"{cls}({num_features}): eps must be a finite number > 0 (it keeps 1/sqrt(var + eps) finite "
                f"for a constant channel), got {eps!r}"
            )
        if momentum is not None and (
            not isinstance(momentum, (int, float)) or not math.isfinite(momentum) or not 0.0 <= momentum <= 1.0
        ):
            raise ValueError(
                f"{cls}({num_features}): momentum must be in [0, 1] (the new batch's weight in the running "
                f"average) or None (cumulative average), got {momentum!r}"
            )
        label = f"{cls}({num_features})"
        F._check_policy(small_batch, F.SMALL_BATCH_POLICIES, "small_batch", label)
        F._check_policy(nonfinite, F.NONFINITE_POLICIES, "nonfinite", label)
        if backend is not None:
            backend = _validate_backend(backend, f"{label}: backend=")
        if not bias and not _TORCH_HAS_BIAS_FLAG:
            raise ValueError(f"{label}: bias=False needs torch >= 2.13 (this is torch {torch.__version__})")
        extra = {"bias": bias} if _TORCH_HAS_BIAS_FLAG else {}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **extra)  # type: ignore[call-arg]
        self.small_batch = small_batch
        self.nonfinite = nonfinite
        self.backend = backend
        self.name = name

    def forward(
        self, input: torch.Tensor, *, residual: torch.Tensor | None = None, activation: str | None = None
    ) -> torch.Tensor:
        """Batch norm of `input`, then ``+ residual`` if given and the ``activation`` ("relu") if given, in one
        call: ``relu(bn(input) + residual)`` is fused on the `triton` backend (`bnlab.tools.fuse_bn_relu`
        rewrites a model's BN, add and ReLU into it). Hooks see `input`, and that result as the output."""
        if residual is None and activation is None:
            epilogue = _NO_OPTIONS
        elif self._functional is F.batch_norm:
            epilogue = {"residual": residual, "activation": activation}
        else:
            raise ValueError(
                f"{self._label}: residual= and activation= are for plain batch norm; apply them after this layer"
            )
        if input.dim() not in self._expected_dims:
            self._check_input_dim(input)
        # The same buffer logic as torch's _BatchNorm.forward, so behaviour matches flag for flag. Buffers and
        # parameters are read from their dicts directly: nn.Module.__getattr__ costs more than the check.
        buffers, affine = self._buffers, getattr(self, self._affine_store)
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        training, track = self.training, self.track_running_stats
        use_buffers = not training or track
        return self._functional(
            input,
            running_mean if use_buffers else None,
            running_var if use_buffers else None,
            affine["weight"],
            affine["bias"],
            training or (running_mean is None and running_var is None),
            self.momentum,
            self.eps,
            num_batches_tracked=buffers["num_batches_tracked"] if training and track else None,
            small_batch=self.small_batch,
            nonfinite=self.nonfinite,
            backend=self.backend,
            layer=self._label,
            **self._variant_options(),
            **epilogue,
        )

    def extra_repr(self) -> str:
        text = super().extra_repr()  # type: ignore[misc]
        for option, default in (("small_batch", "error"), ("nonfinite", "skip"), ("backend", None)):
            value = getattr(self, option)
            if value != default:
                text += f", {option}={value!r}"
        return text


class BatchNorm1d(_BatchNormMixin, nn.BatchNorm1d):
    """Batch normalization over (N, C) or (N, C, L) input; a drop-in for `torch.nn.BatchNorm1d`."""

    _expected_dims = (2, 3)
    _shape_hint = "(N, {C}) or (N, {C}, L)"


class BatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    """Batch normalization over (N, C, H, W) input; a drop-in for `torch.nn.BatchNorm2d`."""

    _expected_dims = (4,)
    _shape_hint = "(N, {C}, H, W)"


class BatchNorm3d(_BatchNormMixin, nn.BatchNorm3d):
    """Batch normalization over (N, C, D, H, W) input; a drop-in for `torch.nn.BatchNorm3d`."""

    _expected_dims = (5,)
    _shape_hint = "(N, {C}, D, H, W)"
