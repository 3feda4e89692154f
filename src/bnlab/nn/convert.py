"""Swap every BatchNorm layer of an existing model between torch's classes, bnlab's, and synchronized BN."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from bnlab.nn._swap import rebuild, replace_modules
from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _NamedLayer
from bnlab.nn.sync import SyncBatchNorm, from_sync, to_sync

__all__ = ["convert", "name_layers"]

_TO_BNLAB: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in _TO_BNLAB.items()}
_TARGETS = ("bnlab", "torch", "sync")


def name_layers(model: nn.Module) -> nn.Module:
    """Give every bnlab BN layer its qualified name in `model` (used in error messages). Mutates; returns model."""
    for qualified, module in model.named_modules():
        if isinstance(module, _NamedLayer):
            module.name = qualified or type(module).__name__
    return model


def convert(
    model: nn.Module,
    to: str = "bnlab",
    *,
    inplace: bool = False,
    process_group: Any = None,
    dims: int | Mapping[str, int] | None = None,
    **layer_options: object,
) -> nn.Module:
    """Replace every ``BatchNorm1d/2d/3d`` of `model` by the same layer of another kind.

    - ``to="bnlab"``: torch's layers become bnlab's (`layer_options`, such as ``small_batch=`` or
      ``backend=``, go to each new layer, and each gets its qualified name). Synchronized layers (bnlab's or
      torch's SyncBatchNorm) become plain bnlab layers too: see `bnlab.nn.from_sync` for ``dims``.
    - ``to="torch"``: bnlab's layers become torch's.
    - ``to="sync"``: torch's and bnlab's layers become `bnlab.nn.SyncBatchNorm` over `process_group`
      (default: the whole world); ``convert(model, to="bnlab")`` turns them back.

    Parameters and buffers are the same tensors, so values, ``requires_grad``, devices and dtypes carry
    over and outputs are unchanged. Only the exact classes are swapped: subclasses and other normalizations
    are left alone. Forward/backward hooks registered on a swapped layer are not carried over.

    Returns a converted deep copy and leaves `model` untouched, unless ``inplace=True`` (then `model` is
    changed and returned; if `model` is itself a BN layer, the returned layer is the one to use).
    """
    if to not in _TARGETS:
        raise ValueError(f"convert: to={to!r} is not one of {', '.join(map(repr, _TARGETS))}")
    if to != "bnlab" and layer_options:
        raise ValueError(f"convert: options {sorted(layer_options)} apply only with to='bnlab'")
    for qualified, module in model.named_modules():
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(
                f"convert: {type(module).__name__} {qualified!r} is not initialized yet; run one forward pass "
                f"through the model first"
            )
    if to == "sync":
        return to_sync(model, process_group, inplace=inplace)
    if to == "bnlab" and any(isinstance(m, (SyncBatchNorm, nn.SyncBatchNorm)) for m in model.modules()):
        model = from_sync(model, dims=dims, inplace=inplace)
        inplace = True  # from_sync already made the copy, if one was asked for
    mapping = _TO_BNLAB if to == "bnlab" else _TO_TORCH

    def swap(name: str, module: nn.Module) -> nn.Module | None:
        cls = mapping.get(type(module))
        return None if cls is None else rebuild(module, cls, dict(layer_options))

    result = replace_modules(model, swap, inplace)
    return name_layers(result) if to == "bnlab" else result
