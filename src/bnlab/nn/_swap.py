"""Swapping BN layers inside a model, shared by `convert`, `to_sync`/`from_sync` and friends."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from bnlab.nn.batchnorm import _TORCH_HAS_BIAS_FLAG

__all__ = ["rebuild", "replace_modules", "shared_groups"]


def rebuild(module: nn.Module, cls: type[nn.Module], options: dict[str, Any]) -> nn.Module:
    """A `cls` layer that holds `module`'s parameters and buffers (the same tensors: optimizers keep working)."""
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
        new._parameters[key] = module._parameters.get(key)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[key] = module._buffers.get(key)
    new.train(module.training)
    return new


def shared_groups(model: nn.Module) -> dict[int, Any]:
    """A `copy.deepcopy` memo that maps each process group of `model` to itself: groups cannot be copied."""
    return {
        id(group): group for module in model.modules() if (group := getattr(module, "process_group", None)) is not None
    }


def replace_modules(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None], inplace: bool) -> nn.Module:
    """Replace every module `make(qualified_name, module)` returns a layer for; a deep copy unless inplace.

    A layer that appears in several places is replaced once, by one new layer, everywhere.
    """
    if not inplace:
        model = copy.deepcopy(model, memo=shared_groups(model))
    replacement = make("", model)
    if replacement is not None:
        return replacement
    done: dict[int, nn.Module | None] = {}
    for qualified, parent in list(model.named_modules()):
        # `_modules` rather than `named_children()`, which skips the second place of a layer used twice.
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in done:
                done[id(child)] = make(f"{qualified}.{child_name}" if qualified else child_name, child)
            if done[id(child)] is not None:
                setattr(parent, child_name, done[id(child)])
    return model
