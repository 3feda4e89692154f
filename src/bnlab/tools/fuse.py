"""Fuse each BN layer with the ReLU (and the residual add) that follows it: ``relu(bn(x))`` and
``relu(bn(x) + residual)`` become one call of the layer with ``activation="relu"`` (and ``residual=``).

Why: the end of a ResNet block is BN, add, ReLU: eager PyTorch runs three kernels (each reading and writing
the whole tensor, and three more in backward) and pays the host's launch costs three times. bnlab's
functional fuses them (`bnlab.functional.batch_norm`'s ``residual=`` and ``activation=``; on the `triton`
backend one kernel a pass, the ReLU's mask recomputed in backward rather than stored; other backends
compute the same with torch ops), but a model written with ``nn.ReLU`` modules never asks for it. This
pass does, on the model's torch.fx graph.

What is fused: a bnlab ``BatchNorm1d/2d/3d`` (exactly those classes and their frozen-affine subclasses:
batch renorm and ghost BN have no fused form) called as a module, whose output goes only to

- a ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu``, in place or not), or
- an addition (``+``, ``+=``, ``torch.add`` without ``alpha``) of another tensor whose result goes only to
  such a ReLU: that tensor becomes ``residual``.

torch's own BN layers are left alone: `bnlab.nn.convert` them first. The layers stay where they were, so
``state_dict`` keys, parameters and buffers are the model's own (copies: see `fuse_bn_relu`), and
``bnlab.nn.convert(fused, to="torch")`` still finds every layer, though the graph keeps calling them fused:
convert the original model instead.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnlab.functional import batch_norm
from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["FuseError", "bn_relu", "fuse_bn_relu"]

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_RELU_METHODS = ("relu", "relu_")
_ADDS = (operator.add, operator.iadd, torch.add)


class FuseError(ValueError):
    """`fuse_bn_relu` could not trace the model; the message says why and what to do."""


def bn_relu(layer: nn.Module, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(layer(input) + residual)`` (``relu(layer(input))`` without a residual) in one call of the bnlab
    BN `layer` (through its ``__call__``: its hooks run, as `bnlab.tools.precise_bn`'s do): what the fused
    graph of `fuse_bn_relu` calls in place of the three nodes."""
    if not _fusable(layer):
        raise TypeError(
            f"bn_relu: {type(layer).__name__} is not a bnlab BN layer, so it cannot run fused (a fused model "
            f"converted back to torch's layers? Convert the model from before fuse_bn_relu instead)"
        )
    return layer(input, residual=residual, activation="relu")


def _fusable(module: nn.Module) -> bool:
    """A bnlab plain-BN layer (or a subclass with the same functional): batch renorm and ghost BN are not."""
    return isinstance(module, (BatchNorm1d, BatchNorm2d, BatchNorm3d)) and module._functional is batch_norm


class _LeafBN(fx.Tracer):
    """Keeps every BN layer one ``call_module`` node (bnlab's live outside torch.nn, which fx would trace into)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.modules.batchnorm._NormBase) or super().is_leaf_module(m, module_qualified_name)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":  # (not one with hooks of its own: fused, it would not run)
        module = modules.get(str(node.target))
        return isinstance(module, nn.ReLU) and not (module._forward_hooks or module._forward_pre_hooks)
    if node.op == "call_function":  # (F.relu's `inplace`, positional or keyword, changes nothing once fused)
        flags = [*node.args[1:], *node.kwargs.values()]
        only_flags = set(node.kwargs) <= {"inplace"} and all(type(flag) is bool for flag in flags)
        return node.target in _RELU_FUNCTIONS and only_flags
    return node.op == "call_method" and node.target in _RELU_METHODS and len(node.args) == 1 and not node.kwargs


def _fusable_bn(node: object, modules: dict[str, nn.Module]) -> bool:
    """A single-use call of a fusable layer on one tensor."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and _fusable(modules.get(str(node.target), nn.Identity()))
        and len(node.args) == 1
        and not node.kwargs
        and len(node.users) == 1
    )


def _match(relu: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node, fx.Node | None, list[fx.Node]] | None:
    """(the BN node, the residual or None, the nodes the fused call replaces) for a ReLU node, or None."""
    if not _is_relu(relu, modules):
        return None
    source = relu.args[0]
    if _fusable_bn(source, modules):
        return source, None, [relu, source]
    if not (
        isinstance(source, fx.Node)
        and source.op == "call_function"
        and source.target in _ADDS
        and len(source.args) == 2
        and not source.kwargs
        and len(source.users) == 1
    ):
        return None
    for bn, other in (source.args, source.args[::-1]):
        if _fusable_bn(bn, modules) and isinstance(other, fx.Node):
            return bn, other, [relu, source, bn]
    return None


def fuse_bn_relu(model: nn.Module) -> fx.GraphModule:
    """A copy of `model` with every ``relu(bn(x))`` and ``relu(bn(x) + residual)`` of a bnlab BN layer fused
    into one call (see the module doc). `model` is left untouched; the copy's parameters and buffers are
    copies too, under the same ``state_dict`` keys (a torch.fx GraphModule: its modules, and so
    ``parameters()``, come in the order the forward first uses them, as in any GraphModule; build the
    optimizer for the fused model). The names of the fused layers are in the result's
    ``fused_bn_relu`` attribute (a list, in graph order). Raises `FuseError` if torch.fx cannot trace the
    model's forward symbolically."""
    root = copy.deepcopy(model)
    try:
        graph = _LeafBN().trace(root)
    except Exception as error:
        raise FuseError(
            f"fuse_bn_relu: torch.fx could not trace {type(model).__name__} ({type(error).__name__}: {error}); "
            f"the pass reads which layer feeds which off the data-flow graph, so the forward must be "
            f"symbolically traceable (no Python branches on tensor values). Fuse a traceable submodule "
            f"instead (`model.backbone = fuse_bn_relu(model.backbone)`), or call bnlab.functional.batch_norm "
            f"with residual= and activation='relu' in the forward yourself."
        ) from error
    modules = dict(root.named_modules())
    fused = []
    for relu in list(graph.nodes):
        found = _match(relu, modules)
        if found is None:
            continue
        bn, residual, replaced = found
        with graph.inserting_before(bn):  # (where the layer was called: the copy's modules keep that order)
            layer = graph.get_attr(str(bn.target))
        with graph.inserting_before(relu):
            call = graph.call_function(bn_relu, (layer, bn.args[0], residual))
        relu.replace_all_uses_with(call)
        for node in replaced:  # (the ReLU first: each node is erased once nothing uses it)
            graph.erase_node(node)
        fused.append(str(bn.target))
    graph.lint()
    result = fx.GraphModule(root, graph, class_name=type(model).__name__)
    result.fused_bn_relu = fused
    return result
