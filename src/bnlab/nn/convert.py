"""Swap every BatchNorm layer of an existing model between torch's classes and bnlab's."""

from __future__ import annotations

import copy

from torch import nn

from bnlab.nn.batchnorm import _TORCH_HAS_BIAS_FLAG, BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormMixin

__all__ = ["convert", "name_layers"]

_TO_BNLAB: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in _TO_BNLAB.items()}
_TARGETS = ("bnlab", "torch")


def name_layers(model: nn.Module) -> nn.Module:
    """Give every bnlab BN layer its qualified name in `model` (used in error messages). Mutates; returns model."""
    for qualified, module in model.named_modules():
        if isinstance(module, _BatchNormMixin):
            module.name = qualified or type(module).__name__
    return model


def _swap(module: nn.Module, cls: type[nn.Module], options: dict[str, object]) -> nn.Module:
    """A `cls` layer that shares `module`'s parameters and buffers (same tensors: optimizers keep working)."""
    if _TORCH_HAS_BIAS_FLAG and module.affine:
        options = {**options, "bias": module.bias is not None}
    new = cls(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        device="meta",  # placeholders only: the real tensors are moved over just below
        **options,
    )
    for key in ("weight", "bias"):
        setattr(new, key, getattr(module, key))
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[key] = module._buffers.get(key)
    new.train(module.training)
    return new


def convert(model: nn.Module, to: str = "bnlab", *, inplace: bool = False, **layer_options: object) -> nn.Module:
    """Replace every ``BatchNorm1d/2d/3d`` of `model` by the same layer of the other library.

    ``to="bnlab"`` swaps torch's layers for bnlab's (`layer_options`, such as ``small_batch=`` or
    ``backend=``, go to each new layer, and each gets its qualified name); ``to="torch"`` swaps them back.
    Parameters and buffers are the same tensors, so values, ``requires_grad``, devices and dtypes carry
    over and outputs are unchanged. Only the exact classes are swapped: subclasses, ``SyncBatchNorm``
    and other normalizations are left alone. Forward/backward hooks registered on a swapped layer are
    not carried over.

    Returns a converted deep copy and leaves `model` untouched, unless ``inplace=True`` (then `model` is
    changed and returned; if `model` is itself a BN layer, the returned layer is the one to use).
    """
    if to not in _TARGETS:
        raise ValueError(f"convert: to={to!r} is not one of {', '.join(map(repr, _TARGETS))}")
    if to == "torch" and layer_options:
        raise ValueError(f"convert: options {sorted(layer_options)} apply only with to='bnlab'")
    mapping = _TO_BNLAB if to == "bnlab" else _TO_TORCH
    for qualified, module in model.named_modules():
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(
                f"convert: {type(module).__name__} {qualified!r} is not initialized yet; run one forward pass "
                f"through the model first"
            )
    if not inplace:
        model = copy.deepcopy(model)
    if type(model) in mapping:
        result = _swap(model, mapping[type(model)], layer_options)
    else:
        result = model
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) in mapping:
                    setattr(parent, child_name, _swap(child, mapping[type(child)], layer_options))
    return name_layers(result) if to == "bnlab" else result
