"""Freeze the BatchNorm layers of a model (statistics, affine parameters, or both), and undo it exactly.

``freeze_bn`` swaps each ``BatchNorm1d/2d/3d`` (torch's or bnlab's, exact classes) for a layer whose class
makes the freeze stick (see ``bnlab.nn.frozen``): ``FrozenBatchNorm*d`` when the statistics are frozen,
``FrozenAffineBatchNorm*d`` when only the affine parameters are. The new layer shares the original's tensors
and remembers the original layer object, so ``unfreeze_bn`` can put back the very same module: same class,
same parameter objects (an optimizer built before freezing keeps working), same options and hooks.

The swap, rather than flags on the original layer, is what makes the freeze survive ``model.train()`` and
``model.requires_grad_(True)``: the frozen layer's forward ignores the mode, and frozen weights are buffers.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.nn.frozen import (
    FrozenAffineBatchNorm1d,
    FrozenAffineBatchNorm2d,
    FrozenAffineBatchNorm3d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    _FrozenAffineMixin,
    _FrozenBatchNorm,
)

__all__ = ["freeze_bn", "unfreeze_bn"]

# Exact classes only: a subclass may change what the layer computes, which a frozen layer would silently drop.
_STATS_FROZEN: dict[type[nn.Module], type[_FrozenBatchNorm]] = {
    nn.BatchNorm1d: FrozenBatchNorm1d,
    nn.BatchNorm2d: FrozenBatchNorm2d,
    nn.BatchNorm3d: FrozenBatchNorm3d,
    BatchNorm1d: FrozenBatchNorm1d,
    BatchNorm2d: FrozenBatchNorm2d,
    BatchNorm3d: FrozenBatchNorm3d,
}
_AFFINE_FROZEN: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: FrozenAffineBatchNorm1d,
    nn.BatchNorm2d: FrozenAffineBatchNorm2d,
    nn.BatchNorm3d: FrozenAffineBatchNorm3d,
    BatchNorm1d: FrozenAffineBatchNorm1d,
    BatchNorm2d: FrozenAffineBatchNorm2d,
    BatchNorm3d: FrozenAffineBatchNorm3d,
}

# The original layer is kept in the frozen layer's __dict__, not as a submodule: it must stay out of
# modules(), parameters(), state_dict(), .to() and .train(), yet travel with the layer through deepcopy,
# pickling and moves within the model.
_ORIGINAL = "_bnlab_unfrozen"


def _original_of(module: nn.Module) -> nn.Module | None:
    """The layer that freeze_bn replaced by `module`, or None if `module` was not made by freeze_bn."""
    return module.__dict__.get(_ORIGINAL)


def _target(bn: nn.Module, stats: bool, affine: bool) -> tuple[type[nn.Module], bool] | None:
    """(class, affine_trainable) of the layer that puts `bn` in state (stats, affine); None if nothing to freeze."""
    if stats:
        return _STATS_FROZEN[type(bn)], not affine
    if affine and bn.affine:
        return _AFFINE_FROZEN[type(bn)], False
    return None


def _restore(frozen: nn.Module) -> nn.Module:
    """The original of a freeze_bn layer, brought up to date with it. Mutates the original; returns it.

    The frozen layer's tensors are the truth: they are the original's own tensors unless something replaced
    them while frozen (``.to()``, ``.half()``, a deep copy, an assignment), in which case their values move into
    the original's parameter objects so that optimizers holding those still work.
    """
    original = _original_of(frozen)
    assert original is not None
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        original._buffers[key] = frozen._buffers.get(key)
    for key in ("weight", "bias"):
        param = original._parameters.get(key)
        current = frozen._parameters.get(key) if key in frozen._parameters else frozen._buffers.get(key)
        if param is None or current is None or current is param:
            continue
        if isinstance(current, nn.Parameter):  # trained while frozen, and replaced (e.g. overwritten by .to())
            original._parameters[key] = current
        elif not _same_memory(current, param):
            if current.dtype == param.dtype and current.device == param.device and current.shape == param.shape:
                with torch.no_grad():
                    param.copy_(current)  # keeps the parameter's storage, in case something else views it
            else:
                param.data = current.detach()
    original.train(frozen.training)
    return original


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


def _frozen_layer(bn: nn.Module, stats: bool, affine: bool, name: str) -> nn.Module:
    """The layer that puts `bn` in state (stats, affine), or `bn` itself if that freezes nothing."""
    target = _target(bn, stats, affine)
    if target is None:
        return bn
    cls, affine_trainable = target
    layer = cls.from_bn(bn, affine_trainable=affine_trainable) if stats else cls.from_bn(bn)  # type: ignore[attr-defined]
    if layer.name is None:
        layer.name = name
    if affine:
        # The original parameters leave the model but live on, sharing storage with the frozen tensors: an
        # optimizer built before freezing still holds them, and with a stale .grad (zero_grad(set_to_none=False)),
        # momentum or weight decay it would keep writing into them. Optimizers skip parameters whose grad is None.
        for key in ("weight", "bias"):
            param = bn._parameters.get(key)
            if param is not None:
                param.grad = None
    layer.__dict__[_ORIGINAL] = bn
    return layer


def _check(model: nn.Module, stats: bool) -> list[tuple[str, nn.Module]]:
    """Every BN layer freeze_bn must act on, as (qualified name, module); raises before anything is changed."""
    found = []
    for qualified, module in model.named_modules():
        label = f"{type(module).__name__} {qualified!r}" if qualified else type(module).__name__
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(f"freeze_bn: {label} is not initialized yet; run one forward pass through the model first")
        original = _original_of(module)
        base = module if original is None else original
        if isinstance(module, (_FrozenBatchNorm, _FrozenAffineMixin)) and base is module:
            continue  # built as a frozen layer by the user, not by freeze_bn: nothing to go back to
        if type(base) in _STATS_FROZEN:
            if stats and base._buffers.get("running_mean") is None:
                raise ValueError(
                    f"freeze_bn: {label} has no running statistics (track_running_stats=False): it always "
                    f"normalizes with batch statistics, so stats=True has nothing to freeze. Pass stats=False "
                    f"to freeze only its affine parameters."
                )
            found.append((qualified, module))
        elif isinstance(base, nn.SyncBatchNorm):
            raise TypeError(
                f"freeze_bn: {label} is a SyncBatchNorm, which freeze_bn does not handle (it accepts any input "
                f"rank, so no frozen class fits it). Freeze before nn.SyncBatchNorm.convert_sync_batchnorm: "
                f"layers with frozen statistics need no synchronization, and it leaves them alone."
            )
        elif isinstance(base, nn.modules.batchnorm._BatchNorm):
            raise TypeError(
                f"freeze_bn: {label} is a subclass of a BatchNorm class; freeze_bn handles only the exact "
                f"classes torch.nn.BatchNorm1d/2d/3d and bnlab.nn.BatchNorm1d/2d/3d, and will not guess what a "
                f"subclass computes (leaving it unfrozen would let it drift silently). Freeze it yourself, e.g. "
                f"with bnlab.nn.FrozenBatchNorm2d.from_bn."
            )
    return found


def _replace(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Put replacements[id(child)] in place of every such child (all its occurrences). Mutates `model`."""
    if id(model) in replacements:
        return replacements[id(model)]
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    return model


def freeze_bn(model: nn.Module, *, stats: bool = True, affine: bool = True, inplace: bool = True) -> nn.Module:
    """Freeze the BatchNorm layers of `model`: their running statistics, their affine parameters, or both.

    - ``stats=True``: each layer becomes a ``FrozenBatchNorm*d``: it normalizes with its running statistics
      and never updates them, in train mode as in eval mode (its output is the original's eval-mode output).
    - ``affine=True``: ``weight`` and ``bias`` get no gradient and are not in ``model.parameters()`` (they are
      buffers of the new layer), so no optimizer, weight decay or ``model.requires_grad_(True)`` reaches them;
      their ``.grad`` is cleared, so an optimizer built before freezing skips them too.
    - ``stats=True, affine=False`` (the usual fine-tuning setup): statistics frozen, ``weight`` and ``bias``
      remain the same trainable parameter objects. ``stats=False, affine=True``: a ``FrozenAffineBatchNorm*d``,
      whose statistics train as before. Layers without ``weight`` and ``bias`` need nothing for ``affine``.

    Acts on the exact classes ``torch.nn.BatchNorm1d/2d/3d`` and ``bnlab.nn.BatchNorm1d/2d/3d``; other
    modules are left alone. Refused, before anything changes: ``nn.SyncBatchNorm``, other subclasses of
    torch's BatchNorm, uninitialized lazy layers, and ``stats=True`` on a layer without running statistics.
    Frozen layers built by hand (not by ``freeze_bn``) are left as they are. For distributed training, freeze
    before ``nn.SyncBatchNorm.convert_sync_batchnorm``: it leaves ``FrozenBatchNorm*d`` alone (frozen
    statistics need no synchronization), and refuses a ``FrozenAffineBatchNorm*d`` with a ``TypeError``.

    A call sets the state rather than adding to it: a layer already frozen by ``freeze_bn`` is re-frozen
    from its original with the new flags (``stats=False, affine=False`` is therefore the same as
    ``unfreeze_bn``). Each new layer gets its qualified name for error messages (a bnlab layer keeps its own)
    and the original's ``training`` flag; hooks registered on the original are not carried over (they are
    back after ``unfreeze_bn``).

    Mutates and returns `model` with ``inplace=True`` (the default); with ``inplace=False`` freezes a deep copy
    and leaves `model` untouched. If `model` is itself a BN layer, use the returned module.
    """
    if not inplace:
        model = copy.deepcopy(model)
    layers = _check(model, stats)
    replacements: dict[int, nn.Module] = {}
    for qualified, module in layers:
        original = _original_of(module)
        if original is not None:
            current = (type(module), getattr(module, "affine_trainable", False))
            if current == _target(original, stats, affine):
                continue  # already in the requested state: keep it (and its identity)
            module_now = _restore(module)
        else:
            module_now = module
        new = _frozen_layer(module_now, stats, affine, qualified or type(module_now).__name__)
        if new is not module:
            replacements[id(module)] = new
    return _replace(model, replacements)


def unfreeze_bn(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Undo ``freeze_bn``: put back every original layer, exactly as it was, with the frozen layer's values.

    The restored layers are the original module objects: same class and options, same parameter objects
    (an optimizer built before freezing works again), their ``requires_grad`` flags and hooks. They take
    the ``training`` flag and the current tensors of the frozen layers (so ``.train()``/``.eval()``, ``.to()``
    and ``load_state_dict`` done while frozen carry over, and ``state_dict`` is unchanged by the round trip).
    Frozen layers built by hand, not by ``freeze_bn``, are left as they are: there is no original to restore.

    Mutates and returns `model` with ``inplace=True`` (the default); with ``inplace=False`` works on a deep
    copy and leaves `model` untouched. If `model` is itself a frozen layer, use the returned module.
    """
    if not inplace:
        model = copy.deepcopy(model)
    replacements = {id(module): _restore(module) for module in model.modules() if _original_of(module) is not None}
    return _replace(model, replacements)
