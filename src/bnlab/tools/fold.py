"""Fold inference-mode BatchNorm into the convolution or linear layer that feeds it.

In eval mode a BN layer is a fixed affine map per channel. When its input comes straight from a layer that is
itself affine in its input (a convolution, a transposed convolution, a linear layer), the two collapse into one
layer with new weights and the BN becomes ``nn.Identity``: the same numbers, one layer fewer.

The math. Let the layer compute z = W x + b and BN in eval mode compute, for each channel c,

    BN(z)_c = gamma_c * (z_c - mu_c) / sqrt(var_c + eps) + beta_c

with mu, var the running (population) statistics, and gamma = 1, beta = 0 when BN is not affine. With
s_c = gamma_c / sqrt(var_c + eps),

    BN(W x + b)_c = s_c * (W x)_c + s_c * (b_c - mu_c) + beta_c = (W' x)_c + b'_c,
    W'[c] = s_c * W[c]                 (every weight that feeds output channel c)
    b'_c  = (b_c - mu_c) * s_c + beta_c   (b = 0 when the layer has no bias).

Which slice of the weight tensor "feeds output channel c" depends on the layer:

- ``Conv{1,2,3}d``, weight (C_out, C_in / groups, *k), and ``Linear``, weight (out_features, in_features):
  ``weight[c]``, whatever the groups (``out_channel_dim=0``).
- ``ConvTranspose{1,2,3}d``, weight (C_in, C_out / groups, *k) (``out_channel_dim=1``): output channel
  c = g * (C_out / groups) + j of group g is fed by ``weight[g * C_in/groups : (g + 1) * C_in/groups, j]``.
  So the weight is viewed as (groups, C_in/groups, C_out/groups, *k) and scaled by s viewed as
  (groups, 1, C_out/groups, 1, ...). Scaling dim 1 by s as if groups were 1 is right only for groups == 1:
  with groups > 1 that dim has only C_out / groups entries.

As everywhere in ``bnlab.tools``, a pure tensor-level core (`fold_weights`, mutates nothing) and a model-level
walker (`fold_bn`, returns a new model and leaves its input untouched).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, overload

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

__all__ = ["FoldError", "FoldReport", "FoldedPair", "SkippedBN", "fold_bn", "fold_weights"]


class FoldError(ValueError):
    """`fold_bn` refused the model, or the folded model does not match the original; the message says why."""


# ---------------------------------------------------------------------------------------------------------------
# The tensor-level core
# ---------------------------------------------------------------------------------------------------------------


def fold_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_mean: torch.Tensor,
    bn_var: torch.Tensor,
    bn_eps: float,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    *,
    out_channel_dim: int = 0,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of the one layer equal to eval-mode ``BN(layer(x))``; see the module docstring.

    W' = W * s per output channel and b' = (b - mean) * s + beta, with s = gamma / sqrt(var + eps).

    Args:
        weight: the layer's weight; its output channels are on ``out_channel_dim``.
        bias: the layer's bias, or None (then b = 0).
        bn_mean, bn_var, bn_eps: BN's running mean, running (unbiased) variance and eps.
        bn_weight, bn_bias: gamma and beta, or None when BN has no affine parameters (then 1 and 0).
        out_channel_dim: 0 for ``Conv*d`` and ``Linear`` (weight (out, in, *k)), 1 for ``ConvTranspose*d``
            (weight (in, out / groups, *k)).
        groups: the layer's groups. Only needed with ``out_channel_dim=1``, where the output channels of a
            grouped transposed convolution are spread over dim 0 and dim 1 (see the module docstring).

    Returns:
        ``(new_weight, new_bias)``: new tensors, computed in float64 and cast back to the dtype of `weight`
        (and of `bias`, or of `weight` when there was no bias), on `weight`'s device. A bias is returned even
        when the layer had none, since BN's shift has to go somewhere.

    Mutates nothing. Differentiable (no ``torch.no_grad`` inside), so it can also fold inside a training graph.

    Raises:
        ValueError: a per-channel tensor that does not have one value per output channel, a bad
            ``out_channel_dim`` or ``groups``, non-finite running statistics, or ``var + eps <= 0`` for a channel.
    """
    channels = _output_channels(weight, out_channel_dim, groups)
    expected = (channels,)
    for what, tensor in (
        ("bias", bias),
        ("bn_mean", bn_mean),
        ("bn_var", bn_var),
        ("bn_weight", bn_weight),
        ("bn_bias", bn_bias),
    ):
        if tensor is not None and tuple(tensor.shape) != expected:
            raise ValueError(
                f"fold_weights: {what} has shape {tuple(tensor.shape)}, expected {expected}: one value per output "
                f"channel of a weight of shape {tuple(weight.shape)} (out_channel_dim={out_channel_dim}, "
                f"groups={groups})"
            )
    if isinstance(bn_eps, bool) or not isinstance(bn_eps, (int, float)) or not math.isfinite(bn_eps) or bn_eps < 0:
        raise ValueError(f"fold_weights: bn_eps must be a finite number >= 0, got {bn_eps!r}")

    # float64 throughout: s can be large (a nearly constant channel) and b - mean can cancel; one rounding at the
    # end, when casting back, is all the folded layer should add to the layer's own arithmetic.
    f64 = torch.float64
    mean, var = bn_mean.to(f64), bn_var.to(f64)
    if not bool(torch.isfinite(mean).all()) or not bool(torch.isfinite(var).all()):
        raise ValueError("fold_weights: the running statistics (bn_mean, bn_var) contain NaN or inf")
    denominator = var + bn_eps
    if not bool((denominator > 0).all()):
        raise ValueError(
            f"fold_weights: bn_var + bn_eps must be > 0 for every channel (its inverse square root is the scale), "
            f"got a minimum of {denominator.min().item():g}"
        )
    scale = torch.rsqrt(denominator)
    if bn_weight is not None:
        scale = scale * bn_weight.to(f64)
    new_bias = ((-mean) if bias is None else (bias.to(f64) - mean)) * scale
    if bn_bias is not None:
        new_bias = new_bias + bn_bias.to(f64)
    new_weight = _scale_output_channels(weight.to(f64), scale, out_channel_dim, groups)
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return new_weight.to(weight.dtype), new_bias.to(device=weight.device, dtype=bias_dtype)


def _output_channels(weight: torch.Tensor, out_channel_dim: int, groups: int) -> int:
    if out_channel_dim not in (0, 1):
        raise ValueError(
            f"fold_weights: out_channel_dim must be 0 (Conv, Linear) or 1 (ConvTranspose), got {out_channel_dim!r}"
        )
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"fold_weights: groups must be a positive integer, got {groups!r}")
    if weight.dim() < 2:
        raise ValueError(f"fold_weights: weight must have 2 or more dims (out/in, in/out, *k), got {weight.dim()}")
    if out_channel_dim == 0:
        return weight.shape[0]
    if weight.shape[0] % groups:
        raise ValueError(
            f"fold_weights: a transposed-convolution weight of shape {tuple(weight.shape)} has {weight.shape[0]} "
            f"input channels, which groups={groups} does not divide"
        )
    return weight.shape[1] * groups


def _scale_output_channels(
    weight: torch.Tensor, scale: torch.Tensor, out_channel_dim: int, groups: int
) -> torch.Tensor:
    """`weight` with every entry that feeds output channel c multiplied by scale[c] (a new tensor)."""
    kernel_ones = [1] * (weight.dim() - 2)
    if out_channel_dim == 0:
        return weight * scale.reshape(-1, 1, *kernel_ones)
    in_channels, out_per_group = weight.shape[0], weight.shape[1]
    grouped = weight.reshape(groups, in_channels // groups, out_per_group, *weight.shape[2:])
    return (grouped * scale.reshape(groups, 1, out_per_group, *kernel_ones)).reshape(weight.shape)


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldedPair:
    """One BN folded into the layer before it. Names are qualified names in the model (``""`` is the model)."""

    layer: str
    bn: str
    layer_type: str
    bn_type: str
    # True when example_input showed that the layer's output channels are the axis BN normalizes (dim 1).
    # Without it this is inferred from the classes and sizes, which is certain for convolutions fed a batch but
    # an assumption for Linear -> BatchNorm1d: see fold_bn.
    shape_checked: bool


@dataclass(frozen=True)
class SkippedBN:
    """A BN layer left in the model, and why."""

    bn: str
    bn_type: str
    reason: str


@dataclass
class FoldReport:
    """What `fold_bn` did: the pairs it folded, the BN layers it left and why, and what its check measured."""

    folded: list[FoldedPair] = field(default_factory=list)
    skipped: list[SkippedBN] = field(default_factory=list)
    # The check's largest max|folded - original| / max(1, max|original|) over the outputs; None if no check ran.
    max_relative_error: float | None = None

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BN layer(s), left {len(self.skipped)}"]
        lines += [f"  folded {p.bn_type} {p.bn!r} into {p.layer_type} {p.layer!r}" for p in self.folded]
        lines += [f"  left {s.bn_type} {s.bn!r}: {s.reason}" for s in self.skipped]
        if self.max_relative_error is not None:
            lines.append(f"  check: max relative difference {self.max_relative_error:.3g}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Which layers fold
# ---------------------------------------------------------------------------------------------------------------

_BN_CLASSES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class _LayerKind:
    base: type[nn.Module]
    out_channel_dim: int  # the weight's output-channel axis
    output_rank: int  # rank of the layer's output when its channels are on dim 1, the axis BN normalizes
    bn_class: type[nn.Module]  # the BN that takes an output of that rank


_LAYER_KINDS = (
    _LayerKind(nn.Conv1d, 0, 3, nn.BatchNorm1d),
    _LayerKind(nn.Conv2d, 0, 4, nn.BatchNorm2d),
    _LayerKind(nn.Conv3d, 0, 5, nn.BatchNorm3d),
    _LayerKind(nn.ConvTranspose1d, 1, 3, nn.BatchNorm1d),
    _LayerKind(nn.ConvTranspose2d, 1, 4, nn.BatchNorm2d),
    _LayerKind(nn.ConvTranspose3d, 1, 5, nn.BatchNorm3d),
    _LayerKind(nn.Linear, 0, 2, nn.BatchNorm1d),
)


def _layer_kind(module: nn.Module) -> _LayerKind | None:
    """The kind of a layer whose output is W x + b, or None (also for subclasses that change the computation)."""
    for kind in _LAYER_KINDS:
        if isinstance(module, kind.base):
            # QAT convolutions, weight-standardized convolutions and the like subclass Conv2d but compute
            # something else; only the stock forward is known to be W x + b.
            cls = type(module)
            stock = cls.forward is kind.base.forward and getattr(cls, "_conv_forward", None) is getattr(
                kind.base, "_conv_forward", None
            )
            return kind if stock else None
    return None


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _label(module: nn.Module, name: str) -> str:
    return f"{type(module).__name__} {name!r}"


# ---------------------------------------------------------------------------------------------------------------
# The graph: finding (layer, BN) pairs in the data flow
# ---------------------------------------------------------------------------------------------------------------


class _PairTracer(fx.Tracer):
    """Records every BN and every foldable layer as one ``call_module`` node.

    torch.fx already keeps modules of ``torch.nn`` whole; bnlab's BN layers live in ``bnlab.nn``, and tracing into
    their forward would fail on its input-rank check, and a user's subclass of Conv2d would be traced down to
    ``F.conv2d`` and lose its name.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.modules.batchnorm._NormBase) or _layer_kind(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> fx.Graph:
    """The data-flow graph of `model`'s forward; `model` is left as it was."""
    attributes = set(vars(model))
    try:
        return _PairTracer().trace(model)
    except Exception as error:
        raise FoldError(
            f"fold_bn: torch.fx could not trace {type(model).__name__} ({type(error).__name__}: {error}). fold_bn "
            f"reads each BN's input off the data-flow graph, so the forward must be symbolically traceable; the "
            f"usual obstacle is Python control flow on tensor values (`if x.sum() > 0:`). Options: fold the "
            f"traceable submodules one at a time and put them back (`model.backbone = fold_bn(model.backbone)`); "
            f"make the branch traceable (torch.where, or branch on shapes and flags rather than values); or, for a "
            f"pair you know is adjacent, torch.nn.utils.fusion.fuse_conv_bn_eval."
        ) from error
    finally:
        # The tracer stores tensors created inside forward on the root as `_tensor_constant<k>` attributes; the
        # model we return must not carry them. (The graph's get_attr nodes then no longer resolve, which only
        # means those tensors count as nobody's parameters, as is true.)
        for name in set(vars(model)) - attributes:
            delattr(model, name)


@dataclass
class _Candidate:
    layer_name: str
    bn_name: str
    layer: nn.Module
    bn: nn.Module
    kind: _LayerKind


def _input_node(node: fx.Node) -> Any:
    return node.args[0] if node.args else node.kwargs.get("input")


def _describe(node: Any) -> str:
    if not isinstance(node, fx.Node):
        return f"the constant {node!r}"
    if node.op == "placeholder":
        return f"the model's input {node.target!r}"
    if node.op == "call_module":
        return f"the module {node.target!r}"
    target = getattr(node.target, "__name__", node.target)
    return f"{node.op} {target!r}"


def _graph_facts(model: nn.Module, graph: fx.Graph) -> tuple[dict[int, int], set[int]]:
    """How many times each module is called, and the ids of the tensors the forward reads directly."""
    calls: dict[int, int] = {}
    read: set[int] = set()
    for node in graph.nodes:
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            calls[id(module)] = calls.get(id(module), 0) + 1
        elif node.op == "get_attr":
            owner, _, attribute = node.target.rpartition(".")
            value = getattr(model.get_submodule(owner), attribute, None)
            if isinstance(value, torch.Tensor):
                read.add(id(value))
    return calls, read


def _refuse_training_mode(model: nn.Module, graph: fx.Graph) -> None:
    for node in graph.nodes:
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if isinstance(module, _BN_CLASSES) and module.training:
                raise FoldError(
                    f"fold_bn: {_label(module, node.target)} is in training mode. In training mode BN normalizes "
                    f"with each batch's own statistics, which no fixed weights reproduce; folding uses the running "
                    f"statistics, which only eval mode uses. Call model.eval() first (torch's fuse_conv_bn_eval "
                    f"refuses training mode too)."
                )


def _find_pairs(model: nn.Module, graph: fx.Graph) -> tuple[list[_Candidate], list[SkippedBN]]:
    """The (layer, BN) pairs that the graph allows folding, and the BN layers it does not, with the reason."""
    calls, read = _graph_facts(model, graph)
    candidates: list[_Candidate] = []
    skipped: list[SkippedBN] = []
    seen: set[int] = set()
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        bn = model.get_submodule(node.target)
        if not isinstance(bn, _BN_CLASSES) or id(bn) in seen:
            continue
        seen.add(id(bn))
        found = _pair_for(model, node, bn, calls, read)
        if isinstance(found, str):
            skipped.append(SkippedBN(node.target, type(bn).__name__, found))
        else:
            candidates.append(found)
    for name, module in model.named_modules():
        if isinstance(module, _BN_CLASSES) and id(module) not in seen:
            seen.add(id(module))
            skipped.append(SkippedBN(name, type(module).__name__, "the traced forward never calls it"))
    return candidates, skipped


def _pair_for(
    model: nn.Module, bn_node: fx.Node, bn: nn.Module, calls: dict[int, int], read: set[int]
) -> _Candidate | str:
    """The pair this BN call makes with the layer before it, or the reason there is none."""
    bn_name = bn_node.target
    if calls[id(bn)] > 1:
        return f"it is called {calls[id(bn)]} times in forward; replacing it by Identity would change every call"
    if bn.running_mean is None or bn.running_var is None:
        return (
            "it has no running statistics (track_running_stats=False): in eval mode it still normalizes each batch "
            "with that batch's own statistics, which no fixed weights reproduce"
        )
    source = _input_node(bn_node)
    if not isinstance(source, fx.Node) or source.op != "call_module":
        return f"its input is {_describe(source)}, not the output of a Conv, ConvTranspose or Linear module"
    layer_name = source.target
    layer = model.get_submodule(layer_name)
    kind = _layer_kind(layer)
    layer_label = _label(layer, layer_name)
    if kind is None:
        return (
            f"its input comes from {layer_label}, which is not a Conv, ConvTranspose or Linear layer (or is a "
            f"subclass that overrides forward)"
        )
    if calls[id(layer)] > 1:
        return f"{layer_label} is called {calls[id(layer)]} times in forward; new weights would change every call"
    other_users = [user for user in source.users if user is not bn_node]
    if other_users:
        # Folding rewrites the layer, so every consumer of its output would get BN's output; the others (a
        # residual branch, a second head, a returned feature map) need the raw output and would silently change.
        uses = ", ".join(_describe(user) for user in other_users)
        return f"the output of {layer_label} is also used by {uses}; folding would change it for them too"
    if parametrize.is_parametrized(layer):
        return f"{layer_label} has a parametrized weight (e.g. weight_norm); remove the parametrization first"
    for module, name in ((layer, layer_name), (bn, bn_name)):
        # Hooks may recompute the weight (old-style weight_norm, spectral_norm) or observe BN's output; after
        # folding they would run on different tensors or not at all.
        if module._forward_hooks or module._forward_pre_hooks:
            return f"{_label(module, name)} has forward hooks, which folding would bypass or invalidate"
    tensors = [layer.weight, layer.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    if any(tensor is not None and id(tensor) in read for tensor in tensors):
        return f"forward also reads the parameters or buffers of {layer_label} or of the BN directly"
    if not isinstance(bn, kind.bn_class) or bn.num_features != _out_channels(layer):
        return (
            f"shape mismatch: the output channels of {layer_label} would be normalized by a "
            f"{kind.bn_class.__name__}({_out_channels(layer)}), but this is a {type(bn).__name__}({bn.num_features}), "
            f"so the axis it normalizes is not the layer's output channels (a 3-D input to Linear, or an "
            f"unbatched input to a convolution)"
        )
    return _Candidate(layer_name, bn_name, layer, bn, kind)


def _rank_mismatch(candidate: _Candidate, shape: tuple[int, ...]) -> str | None:
    """Why a layer output of this shape cannot take BN's per-channel scale, or None when it can."""
    if len(shape) == candidate.kind.output_rank:
        return None
    where = "its last dim" if candidate.kind.base is nn.Linear else "dim 0 (unbatched input)"
    return (
        f"on example_input {_label(candidate.layer, candidate.layer_name)} returns a {len(shape)}-D output of shape "
        f"{shape} whose channels are {where}, while {type(candidate.bn).__name__} normalizes dim 1: BN's "
        f"per-channel scale does not act on the layer's output channels, so it cannot move into the weight"
    )


# ---------------------------------------------------------------------------------------------------------------
# Rewriting the model
# ---------------------------------------------------------------------------------------------------------------


def _replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `old` is registered under `root` (a module can be registered under several names)."""
    slots = [
        (parent, name)
        for _, parent in root.named_modules(remove_duplicate=False)
        for name, child in parent._modules.items()
        if child is old
    ]
    for parent, name in slots:
        setattr(parent, name, new)


@torch.no_grad()
def _fold_pair(model: nn.Module, candidate: _Candidate) -> None:
    layer, bn = candidate.layer, candidate.bn
    weight, bias = fold_weights(
        layer.weight,
        layer.bias,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        bn.weight,
        bn.bias,
        out_channel_dim=candidate.kind.out_channel_dim,
        groups=getattr(layer, "groups", 1),
    )
    # New Parameter objects rather than in-place copies: a weight tied to another module keeps its value there.
    layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    bias_grad = layer.weight.requires_grad if layer.bias is None else layer.bias.requires_grad
    layer.bias = nn.Parameter(bias, requires_grad=bias_grad)
    _replace_module(model, bn, nn.Identity())


# ---------------------------------------------------------------------------------------------------------------
# Running and comparing on example_input
# ---------------------------------------------------------------------------------------------------------------

_CHECK_SEED = 0


def _record_shape(shapes: dict[str, tuple[int, ...]], name: str, module: nn.Module, args: Any, output: Any) -> None:
    if isinstance(output, torch.Tensor):
        shapes[name] = tuple(output.shape)


def _run(model: nn.Module, args: tuple[Any, ...], record: list[str]) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """`model(*args)` with the output shapes of the modules named in `record`, leaving `model` as it was.

    No autograd; a fixed RNG seed, so that dropout left in training mode draws the same masks for the original and
    the folded model; and a copy when any submodule is in training mode, since its forward may update state.
    """
    runner = copy.deepcopy(model) if any(m.training for m in model.modules()) else model
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        runner.get_submodule(name).register_forward_hook(partial(_record_shape, shapes, name)) for name in record
    ]
    cuda = sorted({t.device.index or 0 for t in runner.parameters() if t.device.type == "cuda"})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(_CHECK_SEED)
            output = runner(*args)
    finally:
        for handle in handles:
            handle.remove()
    return output, shapes


def _leaves(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(path, value) for every leaf of nested tuples, lists and mappings, in order: ``output[1]['logits']``."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _leaves(item, f"{path}[{key!r}]")
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{path}[{index}]")
    else:
        yield path, value


def _relative_difference(original: torch.Tensor, folded: torch.Tensor) -> tuple[float, float, float]:
    """(max |folded - original|, scale, their ratio), with scale = max(1, max |finite original|).

    NaN against NaN and inf against the same inf count as equal; NaN or inf in only one of them as infinitely far.
    """
    wide = torch.complex128 if original.is_complex() or folded.is_complex() else torch.float64
    a, b = original.detach().to(wide), folded.detach().to(wide)
    both_nan = torch.isnan(a) & torch.isnan(b)
    difference = torch.where((a == b) | both_nan, torch.zeros_like(a), a - b).abs()
    difference = torch.nan_to_num(difference, nan=math.inf)
    finite = a[torch.isfinite(a)].abs()
    scale = max(1.0, finite.max().item() if finite.numel() else 1.0)
    worst = difference.max().item() if difference.numel() else 0.0
    return worst, scale, worst / scale


def _compare(original: Any, folded: Any, atol: float, report: FoldReport) -> float:
    """The largest relative difference over the outputs; raises FoldError at the first output beyond atol."""
    expected, actual = list(_leaves(original, "output")), list(_leaves(folded, "output"))
    if [path for path, _ in expected] != [path for path, _ in actual]:
        raise FoldError(
            f"fold_bn: check failed: the folded model's outputs are {[p for p, _ in actual]}, the original's "
            f"{[p for p, _ in expected]}"
        )
    folded_pairs = ", ".join(f"{p.bn!r} into {p.layer!r}" for p in report.folded) or "nothing"
    largest = 0.0
    for (path, a), (_, b) in zip(expected, actual, strict=True):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            raise FoldError(
                f"fold_bn: check failed: {path} of the folded model has shape {tuple(b.shape)} and dtype {b.dtype}, "
                f"the original's {tuple(a.shape)} and {a.dtype} (folded: {folded_pairs})"
            )
        if not (a.is_floating_point() or a.is_complex()):
            if not torch.equal(a, b):
                raise FoldError(f"fold_bn: check failed: {path} ({a.dtype}) differs (folded: {folded_pairs})")
            continue
        worst, scale, relative = _relative_difference(a, b)
        if not relative <= atol:
            raise FoldError(
                f"fold_bn: check failed: {path} of the folded model differs from the original's on example_input by "
                f"up to {worst:.3g}, more than atol * scale = {atol:g} * {scale:.3g} (scale = max(1, max "
                f"|original {path}|)). Folded: {folded_pairs}. A BN subclass whose eval forward is not the standard "
                f"one, or extreme weights, can cause this; check=False keeps the result anyway."
            )
        largest = max(largest, relative)
    return largest


# ---------------------------------------------------------------------------------------------------------------
# The model-level walker
# ---------------------------------------------------------------------------------------------------------------


@overload
def fold_bn(
    model: nn.Module,
    example_input: Any = ...,
    *,
    check: bool = ...,
    atol: float = ...,
    strict: bool = ...,
    return_report: Literal[False] = ...,
) -> nn.Module: ...


@overload
def fold_bn(
    model: nn.Module,
    example_input: Any = ...,
    *,
    check: bool = ...,
    atol: float = ...,
    strict: bool = ...,
    return_report: Literal[True],
) -> tuple[nn.Module, FoldReport]: ...


def fold_bn(
    model: nn.Module,
    example_input: Any = None,
    *,
    check: bool = True,
    atol: float = 1e-5,
    strict: bool = False,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, FoldReport]:
    """A copy of `model` with every eval-mode BN that directly follows a Conv/ConvTranspose/Linear folded into it.

    What folds: a ``BatchNorm1d/2d/3d`` (torch's, bnlab's, any subclass) whose input is the output of a
    ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` (any groups, padding, stride, dilation, output_padding) or
    ``Linear`` (or a subclass that keeps the stock forward), of the matching rank (Conv{k}d and
    ConvTranspose{k}d with BatchNorm{k}d, Linear with BatchNorm1d) and channel count. The layer gets the weight and
    bias of `fold_weights` (a bias is added if it had none) and the BN is replaced by ``nn.Identity``, so the
    model keeps its class and its own forward code; its ``state_dict`` loses the BN entries and may gain a bias.

    How pairs are found: from the data flow, not from the order modules were registered in. ``torch.fx``
    traces the model symbolically (no input needed) with BN and foldable layers kept whole as ``call_module``
    nodes; a BN folds only if its input node is a foldable layer's call. The graph is used only to find pairs:
    the returned model is a deep copy of `model` with parameters and submodules swapped, not a GraphModule.
    (``torch.export`` would also give the data flow, but it needs an example input, and it lowers modules to
    aten ops, so pairs would have to be mapped back to modules through metadata.)

    What is left alone, and reported in ``FoldReport.skipped`` with the reason:

    - a BN whose input is not a foldable layer's output (an input, an addition, a ReLU, a functional call);
    - fan-out: a layer whose output is also used elsewhere (a residual branch, a second head, a returned
      feature). Folding changes the layer itself, so every user of its output would see BN's output;
    - a layer or BN called more than once (shared modules), one with forward hooks or a parametrized weight,
      or whose tensors the forward also reads directly;
    - a BN without running statistics (``track_running_stats=False``): in eval mode it still uses each batch's
      statistics, which no fixed weights reproduce;
    - a shape mismatch: a BN whose channel count or rank does not match the layer's output channels. With
      `example_input` the ranks are measured: ``Linear`` on a 3-D input (N, C, L) returns (N, C, out) and
      ``BatchNorm1d(C)`` normalizes dim 1, which is not Linear's feature axis, so it cannot fold. Without
      `example_input` rank is unknown, and ``Linear -> BatchNorm1d(out_features)`` is folded on the assumption of
      a 2-D (N, C) input, the usual MLP (``FoldedPair.shape_checked`` is then False); pass `example_input` to
      have it measured.

    ``strict=True`` raises `FoldError` instead of leaving any BN layer unfolded.

    Refused with `FoldError` (a ``ValueError``), naming the layer: any BN called in forward that is in training
    mode (call ``model.eval()``; as in torch's fuse functions), a model ``torch.fx`` cannot trace (the message
    says what to do), running statistics that are not finite or have ``var + eps <= 0``, and uninitialized lazy
    modules.

    The check: with ``check=True`` and an `example_input` (a tensor, or a tuple of positional arguments), the
    original and the folded model run on it (no grad, same RNG seed, on copies if anything is in training mode)
    and every floating output must satisfy ``max |folded - original| <= atol * max(1, max |original|)``: an
    absolute tolerance for outputs of magnitude up to 1, relative to the largest magnitude beyond that. Outputs may
    be nested tuples, lists and dicts; the error names the first output that differs (``output[1]['logits']``).
    Non-floating tensors must be equal. Without `example_input` nothing is checked.

    Returns:
        The folded copy; with ``return_report=True``, ``(folded, report)`` with a `FoldReport`.

    Does not mutate `model`: its modules, parameters, buffers and training flags are as they were.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise FoldError(
                f"fold_bn: {_label(module, name)} is not initialized yet; run one forward pass through the model first"
            )
    folded = copy.deepcopy(model)
    graph = _trace(folded)
    _refuse_training_mode(folded, graph)
    candidates, skipped = _find_pairs(folded, graph)
    report = FoldReport(skipped=skipped)

    args = None if example_input is None else (example_input if isinstance(example_input, tuple) else (example_input,))
    original_output, shapes = None, {}
    if args is not None:
        original_output, shapes = _run(folded, args, record=[c.layer_name for c in candidates])
    to_fold = []
    for candidate in candidates:
        shape = shapes.get(candidate.layer_name)
        reason = None if shape is None else _rank_mismatch(candidate, shape)
        if reason is None:
            to_fold.append(candidate)
        else:
            report.skipped.append(SkippedBN(candidate.bn_name, type(candidate.bn).__name__, reason))
    if strict and report.skipped:
        raise FoldError(
            "fold_bn(strict=True): these BN layers cannot be folded: "
            + "; ".join(f"{s.bn_type} {s.bn!r}: {s.reason}" for s in report.skipped)
        )

    for candidate in to_fold:
        _fold_pair(folded, candidate)
        report.folded.append(
            FoldedPair(
                layer=candidate.layer_name,
                bn=candidate.bn_name,
                layer_type=type(candidate.layer).__name__,
                bn_type=type(candidate.bn).__name__,
                shape_checked=candidate.layer_name in shapes,
            )
        )

    if check and args is not None:
        try:
            folded_output, _ = _run(folded, args, record=[])
        except Exception as error:
            raise FoldError(
                f"fold_bn: check failed: the folded model raised {type(error).__name__}: {error}. Its forward may "
                f"read an attribute of a BN layer that is now nn.Identity (e.g. `self.bn.num_features`)."
            ) from error
        report.max_relative_error = _compare(original_output, folded_output, atol, report)
    return (folded, report) if return_report else folded
