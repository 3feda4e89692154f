"""Frozen batch normalization: layers that stay frozen whatever ``.train()`` or ``requires_grad_()`` says.

Why these exist: in PyTorch, ``bn.eval()`` and ``bn.weight.requires_grad_(False)`` do not keep a BN layer
frozen. The next ``model.train()`` (every training loop calls it) puts the layer back into training mode,
where each forward pass normalizes with the batch statistics and pulls the running statistics towards the
fine-tuning data; the next ``model.requires_grad_(True)`` re-enables the affine parameters, and an optimizer
built over ``model.parameters()`` trains them again. The layers here make "frozen" a property of the layer's
class and of where its tensors live, not of flags that other code resets.

- ``FrozenBatchNorm1d/2d/3d``: the fixed affine map of Algorithm 2 (inference),
  ``y = weight / sqrt(running_var + eps) * (x - running_mean) + bias``, in every mode. The running statistics
  and ``num_batches_tracked`` are never written. By default ``weight`` and ``bias`` are frozen too: they
  are then *buffers*, so they are not in ``model.parameters()`` (no optimizer, weight decay, gradient
  clipping or DDP sees them), no gradient flows to them, and ``model.requires_grad_(True)`` cannot reach
  them. With ``affine_trainable=True`` they are ordinary parameters (frozen statistics, trainable affine:
  the usual fine-tuning setup).
- ``FrozenAffineBatchNorm1d/2d/3d``: the opposite split, made by ``bnlab.tools.freeze_bn(stats=False)``: a
  bnlab ``BatchNorm`` in every respect (batch statistics in training, running statistics updated) except
  that ``weight`` and ``bias`` are buffers, frozen as above.

Both keep the ``state_dict`` keys of ``torch.nn.BatchNorm*d`` (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``) and its version, so checkpoints load both ways: a buffer and a
parameter of the same name are the same entry in a ``state_dict``.

``FrozenBatchNorm*d`` subclasses ``nn.Module``, not ``nn.BatchNorm*d``, on purpose: code that looks for BN
layers with ``isinstance`` (``nn.SyncBatchNorm.convert_sync_batchnorm``, "put every BN in train mode",
"set every BN's momentum", conversion and fusion helpers) would otherwise treat a frozen layer as a trainable
one. ``FrozenAffineBatchNorm*d`` does train its statistics, so it stays a ``BatchNorm*d`` subclass.

The ``training`` flag of a frozen layer still follows ``.train()``/``.eval()`` like every module's (so a
model's flags stay consistent and ``unfreeze_bn`` can restore them); it just does not change the arithmetic.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import torch
from torch import nn

from bnlab import functional as F
from bnlab.backends import _validate as _validate_backend
from bnlab.nn.batchnorm import _TORCH_HAS_BIAS_FLAG, BatchNorm1d, BatchNorm2d, BatchNorm3d, _NamedLayer

__all__ = [
    "FrozenAffineBatchNorm1d",
    "FrozenAffineBatchNorm2d",
    "FrozenAffineBatchNorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
]

_AFFINE_KEYS = ("weight", "bias")
_Frozen = TypeVar("_Frozen", bound="_FrozenBatchNorm")
_STATISTICS_KEYS = ("running_mean", "running_var", "num_batches_tracked")


def _check_source(cls: type, bn: nn.Module, expected: type[nn.Module]) -> None:
    """Refuse anything from_bn cannot faithfully freeze, with the reason."""
    if not isinstance(bn, expected):
        hint = ""
        if isinstance(bn, nn.SyncBatchNorm):
            hint = (
                " (a SyncBatchNorm accepts any input rank, so the frozen class cannot be chosen for it; freeze "
                "before nn.SyncBatchNorm.convert_sync_batchnorm, which leaves FrozenBatchNorm layers alone)"
            )
        raise TypeError(
            f"{cls.__name__}.from_bn: expected a {expected.__name__} (torch's or bnlab's), got "
            f"{type(bn).__name__}{hint}"
        )


class _FrozenBatchNorm(_NamedLayer, nn.Module):
    """Inference-mode BN in every mode; the 1d/2d/3d classes differ only in the input check."""

    # Version 2 of torch's BN added num_batches_tracked; saying so in our checkpoints lets torch load them as is.
    _version = 2
    _expected_dims: tuple[int, ...] = ()
    _shape_hint: str = ""
    _bn_class: type[nn.Module] = nn.Module  # the torch class whose layers from_bn accepts

    num_features: int
    eps: float
    affine: bool
    backend: str | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        affine: bool = True,
        bias: bool = True,
        affine_trainable: bool = False,
        backend: str | None = None,
        name: str | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        # Everything after eps is keyword-only: torch's BN takes momentum third, and a frozen layer has none,
        # so `FrozenBatchNorm2d(64, 1e-5, 0.1)` must fail rather than read 0.1 as `affine`.
        super().__init__()
        cls = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"{cls}: num_features must be a positive integer, got {num_features!r}")
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(
                f"{cls}({num_features}): eps must be a finite number > 0 (it keeps 1/sqrt(var + eps) finite "
                f"for a constant channel), got {eps!r}"
            )
        if backend is not None:
            backend = _validate_backend(backend, f"{cls}({num_features}): backend=")
        self.num_features = num_features
        self.eps = float(eps)
        self.affine = bool(affine)
        self.backend = backend
        self.name = name
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        weight = torch.ones(num_features, **factory) if affine else None
        shift = torch.zeros(num_features, **factory) if affine and bias else None
        # Where weight and bias live *is* the freeze: parameters train, buffers cannot be reached by
        # model.parameters() or model.requires_grad_(True). Registered first to keep torch's key order.
        for key, value in (("weight", weight), ("bias", shift)):
            if affine_trainable:
                self.register_parameter(key, None if value is None else nn.Parameter(value))
            else:
                self.register_buffer(key, value)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=factory["device"]))

    @property
    def affine_trainable(self) -> bool:
        """Whether ``weight`` and ``bias`` are parameters (trainable) rather than buffers (frozen).

        Read-only: it reports where the tensors live, so it cannot disagree with what the layer does.
        """
        return "weight" in self._parameters

    @classmethod
    def from_bn(cls: type[_Frozen], bn: nn.Module, *, affine_trainable: bool = False) -> _Frozen:
        """A frozen layer that normalizes exactly as `bn` does in eval mode, sharing its tensors. Does not mutate `bn`.

        `bn` is any torch or bnlab ``BatchNorm`` of this class's rank (1d/2d/3d), with running statistics.
        The running statistics and ``num_batches_tracked`` are the same tensor objects. With
        ``affine_trainable=True`` ``weight`` and ``bias`` are `bn`'s parameter objects (an optimizer that
        holds them keeps training them); otherwise they are detached views of them (same storage, so values
        stay in step, but no gradient and not parameters). eps, the bnlab options ``backend`` and ``name``,
        and the ``training`` flag carry over; forward/backward hooks do not.

        `bn`'s own parameter objects still exist after freezing: an optimizer that holds them and has a
        stale ``.grad`` for them would still write into the shared storage. ``bnlab.tools.freeze_bn`` clears
        those gradients; when calling ``from_bn`` yourself, rebuild or clear the optimizer's view of them.
        """
        _check_source(cls, bn, cls._bn_class)
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"{cls.__name__}.from_bn: {type(bn).__name__}({bn.num_features}) has no running statistics "
                f"(track_running_stats=False): it always normalizes with batch statistics, so there is nothing "
                f"to freeze"
            )
        frozen = cls(
            bn.num_features,
            bn.eps,
            affine=bn.affine,
            bias=bn.bias is not None or not bn.affine,
            affine_trainable=affine_trainable,
            backend=getattr(bn, "backend", None),
            name=getattr(bn, "name", None),
            device="meta",  # placeholders only: bn's tensors replace them just below
        )
        store = frozen._parameters if affine_trainable else frozen._buffers
        for key in _AFFINE_KEYS:
            tensor = getattr(bn, key)
            if tensor is None:
                store[key] = None
            elif affine_trainable:
                store[key] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor.detach())
            else:
                store[key] = tensor.detach()
        for key in _STATISTICS_KEYS:
            tensor = bn._buffers.get(key)
            if tensor is None and key == "num_batches_tracked":
                tensor = torch.tensor(0, dtype=torch.long, device=bn.running_mean.device)
            frozen._buffers[key] = tensor
        frozen.train(bn.training)
        return frozen

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() not in self._expected_dims:
            self._check_input_dim(input)
        buffers = self._buffers
        affine = self._parameters if "weight" in self._parameters else buffers
        # training=False whatever self.training says: the inference map, which reads the running statistics
        # and never writes them. Going through bnlab.functional keeps the backend switch and its checks.
        return F.batch_norm(
            input,
            buffers["running_mean"],
            buffers["running_var"],
            affine["weight"],
            affine["bias"],
            False,
            0.0,
            self.eps,
            backend=self.backend,
            layer=self._label,
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # As torch's BN does: checkpoints from before version 2 (and torchvision's FrozenBatchNorm2d, which
        # drops the key) have no num_batches_tracked; keep the current count instead of failing a strict load.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and key not in state_dict:
            current = self._buffers.get("num_batches_tracked")
            usable = current is not None and current.device != torch.device("meta")
            state_dict[key] = current if usable else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}, affine={self.affine}"
        if self.affine:
            if self.bias is None:
                text += ", bias=False"
            text += f", affine_trainable={self.affine_trainable}"
        if self.backend is not None:
            text += f", backend={self.backend!r}"
        return text


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen batch normalization over (N, C) or (N, C, L) input; see the module docstring."""

    _expected_dims = BatchNorm1d._expected_dims
    _shape_hint = BatchNorm1d._shape_hint
    _bn_class = nn.BatchNorm1d


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen batch normalization over (N, C, H, W) input; see the module docstring."""

    _expected_dims = BatchNorm2d._expected_dims
    _shape_hint = BatchNorm2d._shape_hint
    _bn_class = nn.BatchNorm2d


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen batch normalization over (N, C, D, H, W) input; see the module docstring."""

    _expected_dims = BatchNorm3d._expected_dims
    _shape_hint = BatchNorm3d._shape_hint
    _bn_class = nn.BatchNorm3d


# ---- frozen affine, training statistics ---------------------------------------------------------------------


class _FrozenAffineMixin:
    """A bnlab BatchNorm whose ``weight`` and ``bias`` are buffers: statistics train, the affine map does not."""

    _affine_store = "_buffers"  # bnlab's BatchNorm forward reads weight and bias from here

    # Declared for type checkers; the BatchNorm classes below create them.
    _buffers: dict[str, torch.Tensor | None]
    _parameters: dict[str, nn.Parameter | None]
    _expected_dims: tuple[int, ...]
    _label: str
    training: bool
    track_running_stats: bool
    momentum: float | None
    eps: float
    small_batch: str
    nonfinite: str
    backend: str | None
    _bn_class: type[nn.Module]  # the torch class whose layers from_bn accepts

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Move weight and bias from the parameters to the buffers, in front, so state_dict keeps torch's order.
        affine = {key: self._parameters.pop(key, None) for key in _AFFINE_KEYS}
        rest = dict(self._buffers)
        self._buffers.clear()
        self._buffers.update({key: None if p is None else p.detach() for key, p in affine.items()})
        self._buffers.update(rest)

    @classmethod
    def from_bn(cls, bn: nn.Module) -> nn.Module:
        """This layer for `bn` (a torch or bnlab BatchNorm of the same rank), sharing its tensors. Does not mutate `bn`.

        Running statistics are the same tensor objects (they keep training); ``weight`` and ``bias`` become
        detached views of `bn`'s parameters (same storage, no gradient). A bnlab `bn` passes on its options
        (``small_batch``, ``nonfinite``, ``backend``, ``name``); a torch `bn` gets ``nonfinite="ignore"``,
        torch's own behaviour, so freezing its affine parameters changes nothing else. The same caveat on
        stale gradients as for ``FrozenBatchNorm*d.from_bn`` applies.
        """
        _check_source(cls, bn, cls._bn_class)
        options: dict[str, Any] = {
            "small_batch": getattr(bn, "small_batch", "error"),
            "nonfinite": getattr(bn, "nonfinite", "ignore"),
            "backend": getattr(bn, "backend", None),
            "name": getattr(bn, "name", None),
        }
        if _TORCH_HAS_BIAS_FLAG and bn.affine:
            options["bias"] = bn.bias is not None
        layer = cls(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
            device="meta",  # placeholders only: bn's tensors replace them just below
            **options,
        )
        for key in _AFFINE_KEYS:
            tensor = getattr(bn, key)
            layer._buffers[key] = None if tensor is None else tensor.detach()
        for key in _STATISTICS_KEYS:
            layer._buffers[key] = bn._buffers.get(key)
        layer.train(bn.training)
        return layer


class FrozenAffineBatchNorm1d(_FrozenAffineMixin, BatchNorm1d):
    """`bnlab.nn.BatchNorm1d` with ``weight`` and ``bias`` frozen (buffers); statistics train as usual."""

    _bn_class = nn.BatchNorm1d


class FrozenAffineBatchNorm2d(_FrozenAffineMixin, BatchNorm2d):
    """`bnlab.nn.BatchNorm2d` with ``weight`` and ``bias`` frozen (buffers); statistics train as usual."""

    _bn_class = nn.BatchNorm2d


class FrozenAffineBatchNorm3d(_FrozenAffineMixin, BatchNorm3d):
    """`bnlab.nn.BatchNorm3d` with ``weight`` and ``bias`` frozen (buffers); statistics train as usual."""

    _bn_class = nn.BatchNorm3d
