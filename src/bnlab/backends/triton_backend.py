"""The ``triton`` backend: fused Triton kernels (``bnlab.kernels``) behind torch's batch-norm contract.

What it adds to the contract: ``residual=`` and ``activation="relu"`` fuse ``relu(bn(x) + residual)``
into the batch norm's own kernels (the other backends compose those ops; see
``bnlab.functional.batch_norm``). The running-statistics update is fused in as well. How each call runs
(split or single-tile kernels) is `bnlab.kernels.batchnorm`'s plan.

Where it runs: CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's interpreter, for
tests: slow). Input dtypes float32, float16, bfloat16, with float32 statistics and accumulation; the
parameters and running statistics may be float32 or the input's dtype. Layouts: contiguous (NCHW) and
channels-last are read in place; any other strides are copied to contiguous first.

Under ``torch.compile`` the training launchers run as custom ops (``bnlab::triton_forward``,
``bnlab::triton_backward``; see below), so a model with these layers compiles as one graph; inference is
traced as torch ops there, which inductor fuses with its neighbours.

Double backward (``create_graph=True``: gradient penalties, Hessian-vector products): the kernels' backward
is not differentiable, so where the gradients must be differentiable again they come from torch ops instead
(`_backward_differentiable`: the reference backend's formulas, statistics recomputed from x), which autograd
differentiates again. Slower, and eager only (torch.compile refuses double backward).

torch.func's transforms: grad, vjp, jacrev, hessian (the backward in torch ops, as for double backward:
functorch always asks for a differentiable one), jvp, jacfwd and ``torch.autograd.forward_ad`` (`_tangent`:
the tangent in torch ops), vmap (`_vmapped`: a launch per slice; training there cannot update running
statistics). The forward runs the kernels under all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as forward_ad

from bnlab import kernels
from bnlab.backends import native, reference
from bnlab.kernels import layout as kl

__all__ = ["SUPPORTED_DTYPES", "batch_norm"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_VALUES_PER_CHANNEL = 2**31 - 1  # N x spatial: row and count arithmetic in the kernels is 32-bit


class _Transformable(torch.autograd.Function):
    """The kernels under autograd in the form torch.func's transforms take (forward without ctx, then
    `setup_context`), with rules for forward-mode AD (`jvp`) and vmap: for calls under a transform or with
    dual tensors. The forward returns the statistics it used (mean, invstd), which backward and jvp need."""

    # The differentiable inputs, then the rest in one tuple: Function.apply's Python and C++ look at every
    # argument (a one-off probe on the dev VM, session 18: a do-nothing Function's apply with 14 arguments
    # 24 us a call, with 5 13-17; bnlab's whole stubbed forward moved within that VM's noise).
    @staticmethod
    def forward(x, weight, bias, residual, rest):  # type: ignore[override]
        return _forward(x, weight, bias, residual, rest)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        _save(ctx, inputs, output)
        x, weight, bias, residual, _ = inputs
        y, mean, invstd = output
        ctx.save_for_forward(x, weight, bias, residual, mean, invstd, y)
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)  # (no zero tensors for mean's and invstd's gradients: never used)

    @staticmethod
    def backward(ctx, dy, _dmean, _dinvstd):  # type: ignore[override]
        return _backward_either(ctx, dy)

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, dresidual, _drest):  # type: ignore[override]
        return _tangent(ctx, dx, dweight, dbias, dresidual), None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, residual, rest):  # type: ignore[override]
        return _vmapped(info, in_dims, x, weight, bias, residual, rest)


class _FusedBatchNorm(torch.autograd.Function):
    """`_Transformable` with a forward that takes ctx, one output and no rules: what every other call takes,
    plain eager and torch.compile. (Function.apply binds a setup_context-style forward's arguments with
    inspect.signature on every call; two more outputs cost ~10-20 us a training step in autograd's own
    bookkeeping, kernels stubbed on the dev VM; and torch.compile refuses a Function with a custom jvp.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, rest):  # type: ignore[override]
        # The forward's launch plan, kept for the backward's (the same tensor, the same plan): one planning
        # a layer step instead of two (~11 us on the dev VM). Traced by torch.compile, the ops plan.
        plan = None if torch.compiler.is_compiling() else kernels.load().make_plan(x, rest[6], rest[9])
        output = _forward(x, weight, bias, residual, rest, plan)
        _save(ctx, (x, weight, bias, residual, rest), output)
        ctx.plan = plan
        return output[0]

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        return _backward_either(ctx, dy)


# (The two Functions' bodies are functions of their own: torch.compile refuses a Function that calls another
# Function's methods with its ctx.)
def _forward(x, weight, bias, residual, rest, plan=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    running_mean, running_var, training, momentum, eps, relu, layout, guard, counter, ghosts = rest
    # (save_stats: a call comes here only where autograd records it, or under a transform or compile)
    args = (x, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu, True)
    if torch.compiler.is_compiling():  # (bnlab.functional guards the update with torch ops there)
        return torch.ops.bnlab.triton_forward(*args)  # (training: `batch_norm` traces inference)
    return _forward_kernels(*args, layout, guard, counter, ghosts, plan)  # type: ignore[return-value]


def _backward_either(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    # Grad mode is on under create_graph=True, and under torch.func's reverse transforms (which always create
    # a graph, to compose): then the gradients must be differentiable again, which the kernels' are not.
    # (Traced by torch.compile, the backward calls the custom op, for which no derivative is registered:
    # compiled graphs refuse double backward.)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _backward_differentiable(ctx, dy)
    return _backward(ctx, dy)


def _save(ctx, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """What the backward needs of a call (the forward's inputs and the statistics it used)."""
    x, weight, bias, residual, rest = inputs
    ctx.save_for_backward(x, weight, bias, residual, output[1], output[2])
    ctx.training, ctx.eps, ctx.relu, ctx.layout, ctx.ghosts = rest[2], rest[4], rest[5], rest[6], rest[9]
    ctx.plan = None  # (the backward plans for itself; `_FusedBatchNorm` keeps its forward's plan here)


def _backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight, bias, residual, mean, invstd = ctx.saved_tensors
    need_x, need_w, need_b, need_z = ctx.needs_input_grad[:4]
    args = (kl.to_layout(dy, ctx.layout), x, weight, bias, residual, mean, invstd, ctx.training, ctx.relu, need_x,
            need_w or need_b, need_z)  # fmt: skip
    if torch.compiler.is_compiling():  # (ghost batches in place are eager only: see `batch_norm`)
        dx, dweight, dbias, dz = torch.ops.bnlab.triton_backward(*args)
    else:
        dx, dweight, dbias, dz = _backward_kernels(*args, ctx.layout, ghosts=ctx.ghosts, plan=ctx.plan)
    # dweight and dbias are float32: cast (a copy) only for parameters kept in another dtype.
    if need_w and dweight.dtype != weight.dtype:
        dweight = dweight.to(weight.dtype)
    if need_b and dbias.dtype != bias.dtype:
        dbias = dbias.to(bias.dtype)
    # (the custom ops return empty tensors, not None, for the gradients not asked for)
    dz = dz if need_z and residual is not None else None
    return dx if need_x else None, dweight if need_w else None, dbias if need_b else None, dz, None


def _backward_differentiable(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The gradients in torch ops, differentiable again: through the ReLU's mask (recomputed from the saved
    statistics; its own derivative is zero) and the residual, then per ghost batch the reference backend's
    formulas in training (`reference.training_gradients`: statistics recomputed from x, so second derivatives
    see their dependence on x), the affine map's in inference. Rounds as the reference backend does."""
    x, weight, bias, residual, mean, invstd = ctx.saved_tensors
    need_x, need_w, need_b, need_z = ctx.needs_input_grad[:4]
    k, dims = ctx.ghosts, [0, *range(2, x.dim())]
    parts = list(zip(x.chunk(k), mean.chunk(k), invstd.chunk(k), _chunks(weight, k), _chunks(bias, k), strict=True))
    if ctx.relu:
        with torch.no_grad():  # (the mask's own derivative is zero)
            pre = torch.cat([_normalized(*part) for part in parts])
            positive = (pre if residual is None else pre + residual.float()) > 0
        dy = torch.where(positive, dy, 0.0)
    grads = []
    for (xj, mj, sj, wj, _), gj in zip(parts, dy.chunk(k), strict=True):
        if ctx.training:
            grads.append(reference.training_gradients(gj, xj, wj, ctx.eps))
        else:
            g, shape = gj.float(), (1, -1) + (1,) * (x.dim() - 2)
            scale = sj if wj is None else sj * wj.float()
            grads.append(((g * scale.view(shape)).to(x.dtype), (g * _normalized(xj, mj, sj)).sum(dims), g.sum(dims)))
    dx, dweight, dbias = (torch.cat(g) for g in zip(*grads, strict=True))
    return (
        dx if need_x else None,
        dweight.to(weight.dtype) if need_w else None,
        dbias.to(bias.dtype) if need_b else None,
        dy if need_z else None,
        None,
    )


def _chunks(t: torch.Tensor | None, k: int) -> list[torch.Tensor | None]:
    """`t` in k chunks along dim 0 (ghost batches: of samples, or of a ghost-major parameter); or k Nones."""
    return [None] * k if t is None else list(t.chunk(k))


def _normalized(
    x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """(x - mean) * invstd * weight + bias in float32, the statistics given (per channel of x)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = (x.float() - mean.view(shape)) * (invstd if weight is None else invstd * weight.float()).view(shape)
    return out if bias is None else out + bias.float().view(shape)


def _tangent(
    ctx, dx: torch.Tensor | None, dweight: torch.Tensor | None, dbias: torch.Tensor | None,
    dresidual: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """y's tangent (forward-mode AD: torch.func.jvp, jacfwd, torch.autograd.forward_ad) in torch ops: the
    reference backend's formula (`reference.tangent`, in float32) on each ghost batch with the statistics the
    forward used, plus the residual's tangent, through the ReLU's mask (relu'(p) = [p > 0] = [y > 0])."""
    x, weight, _, _, mean, invstd, y = ctx.saved_tensors
    k = ctx.ghosts
    tangents = zip(_chunks(dx, k), _chunks(weight, k), _chunks(dweight, k), _chunks(dbias, k), strict=True)
    statistics = zip(x.chunk(k), mean.chunk(k), invstd.chunk(k), strict=True)
    parts = [reference.tangent(_normalized(xj, mj, sj), sj, ctx.training, *rest)
             for (xj, mj, sj), rest in zip(statistics, tangents, strict=True)]  # fmt: skip
    out = torch.cat(parts)
    if dresidual is not None:
        out = out + dresidual.float()
    if ctx.relu:
        out = torch.where(y > 0, out, 0.0)
    return out.to(x.dtype)


def _vmapped(info, in_dims, x, weight, bias, residual, rest) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
    """`_Transformable.vmap`: one call per slice of the vmapped dimension (the kernels have no batch
    dimension of their own; each slice is laid out for them anew), the outputs stacked along dim 0."""
    running_mean, running_var, training, momentum, eps, relu, _, guard, counter, ghosts = rest
    if training and running_mean is not None:  # (bnlab.functional refuses it first, naming the layer)
        raise RuntimeError("backend 'triton': under vmap, training cannot update running statistics")

    def at(t: torch.Tensor | None, dim: int | None, i: int) -> torch.Tensor | None:
        return t if t is None or dim is None else t.select(dim, i)

    dims = (*in_dims[:4], *in_dims[4][:2])
    outs = [_fused(*(at(t, d, i) for t, d in zip((x, weight, bias, residual, running_mean, running_var), dims,
                                                 strict=True)),
                   training, momentum, eps, relu, guard, counter, ghosts, statistics=True)
            for i in range(info.batch_size)]  # fmt: skip
    return tuple(torch.stack(out) for out in zip(*outs, strict=True)), (0, 0, 0)


# ---- the launchers, and the same as torch custom ops for torch.compile ---------------------------------------
# Under torch.compile the launchers (plans, caches, Triton's own Python) are not traced: they run as
# opaque custom ops (training's forward, the backward), so a model compiles as one graph
# (fullgraph=True works) and CUDA graphs (mode="reduce-overhead") replay the kernels with no host time at
# all. Eager calls the launchers directly (no dispatch at all). The ops are registered with torch.library's
# low-level API (`_op`), not `torch.library.custom_op`: that one wraps every call in Python kernels of its
# own (an autograd kernel that redispatches, and for a mutating op an ADInplaceOrView kernel that walks
# the schema's arguments): 115 us a call against 12.5 (dev VM, torch 2.13, a stub body: `python
# benchmarks/host_overhead.py --compiled`); with them a compiled layer's forward+backward cost ~0.9 ms more
# host time than torch's on the H200's host (run 19).
# Their autograd is `_FusedBatchNorm` around them; the compiled graphs call them with grad disabled.


def _forward_kernels(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None,
    running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool, momentum: float,
    eps: float, relu: bool, save_stats: bool, layout: str, guard: torch.Tensor | None = None,
    num_batches_tracked: torch.Tensor | None = None, ghosts: int = 1, plan: object = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(y, mean, invstd); mean and invstd None in inference without `save_stats`. `x`, `residual` in a kernel
    layout; the running statistics updated in place in training (kept only if finite with `guard`);
    `ghosts`: ghost batches read in place (see `batch_norm`); `plan`: x's launch plan, if made already."""
    return kernels.load().forward(
        x, weight, bias, running_mean, running_var, training=training, momentum=momentum, eps=eps,
        residual=residual, relu=relu, save_stats=save_stats, layout=layout, guard=guard,
        num_batches_tracked=num_batches_tracked, ghosts=ghosts, plan=plan,
    )  # fmt: skip


def _backward_kernels(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    residual: torch.Tensor | None, mean: torch.Tensor, invstd: torch.Tensor, training: bool, relu: bool,
    need_input: bool, need_params: bool, need_residual: bool, layout: str, ghosts: int = 1, plan: object = None,
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """(dx, dweight, dbias, dresidual), None where not needed; `dy` in x's layout; `plan`: x's launch plan, if
    the forward kept it."""
    return kernels.load().backward(
        dy, x, weight, bias, mean, invstd, training=training, residual=residual, relu=relu, need_input=need_input,
        need_params=need_params, need_residual=need_residual, layout=layout, ghosts=ghosts, plan=plan,
    )  # fmt: skip


def _filled(tensors: tuple[torch.Tensor | None, ...], like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A custom op returns tensors only: an empty float32 one (each its own: outputs must not alias) for None."""
    return tuple(t if t is not None else like.new_empty(0, dtype=torch.float32) for t in tensors)


# The ops take their tensors in whatever layout inductor gives them (tag flexible_layout) and decide the
# kernels' layout from x at run time (not while tracing: the tensors' strides then are eager's). Why: with
# the default constraint (exact strides) inductor copied every layer's input into the strides traced from
# eager and its output back wherever it lays a model out otherwise: its layout optimization runs an NCHW
# conv net's convolutions channels-last, and then each bnlab layer cost a copy each way in forward and in
# backward (seen on CPU, tests/test_triton.py; on an H200, run 24, ResNet-50 NCHW under reduce-overhead:
# 27.8 ms a step with bnlab's fused layers against inductor's own BN at 20.3).


def _kernel_input(x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """(x, its kernel layout): as it is where the kernels address it in place, else a contiguous copy."""
    layout = kl.layout_of(x)
    return (x, layout) if layout is not None else (x.contiguous(), kl.PLANES)


def _like_kernel_input(x: torch.Tensor, wanted: bool = True) -> torch.Tensor:
    """An empty tensor with the strides the kernels give an output like `x` (`_kernel_input`'s), for the fakes;
    `wanted` False: an empty float32 stand-in for an output not asked for."""
    if not wanted:
        return x.new_empty(0, dtype=torch.float32)
    return torch.empty_like(_kernel_input(x)[0])


def _forward_filled(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None,
    running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool, momentum: float,
    eps: float, relu: bool, save_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    x, layout = _kernel_input(x)
    residual = kl.to_layout(residual, layout) if residual is not None else None
    out = _forward_kernels(x, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu,
                           save_stats, layout)  # fmt: skip
    return _filled(out, x)  # type: ignore[return-value]


def _forward_fake(x, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu, save_stats):
    channels = x.shape[1] if training or save_stats else 0
    stats = [x.new_empty(channels, dtype=torch.float32) for _ in range(2)]
    return _like_kernel_input(x), *stats


_LIBRARY = torch.library.Library("bnlab", "FRAGMENT")  # (kept: the registrations last as long as it)


def _op(name: str, body: Callable, fake: Callable, mutates: tuple[str, ...] = ()) -> None:
    """`body` as the op ``bnlab::name`` on every device (its schema inferred from the type hints, with the
    arguments in `mutates` marked written; its tensors in any layout), `fake` its implementation for fake
    tensors (torch.compile)."""
    schema = name + torch.library.infer_schema(body, mutates_args=mutates)
    # (the tag came with torch 2.5/2.6's stride-keeping default for custom ops; before it, inductor was free
    #  to lay their tensors out anyway)
    flexible = getattr(torch.Tag, "flexible_layout", None)
    _LIBRARY.define(schema, tags=(flexible,) if flexible is not None else ())
    _LIBRARY.impl(name, body, "CompositeExplicitAutograd")
    torch.library.register_fake(f"bnlab::{name}", fake, lib=_LIBRARY)


def _backward_filled(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    residual: torch.Tensor | None, mean: torch.Tensor, invstd: torch.Tensor, training: bool, relu: bool,
    need_input: bool, need_params: bool, need_residual: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    x, layout = _kernel_input(x)  # (the forward's: the same x; dy and the residual then laid out as it)
    dy = kl.to_layout(dy, layout)
    residual = kl.to_layout(residual, layout) if residual is not None else None
    out = _backward_kernels(dy, x, weight, bias, residual, mean, invstd, training, relu, need_input, need_params,
                            need_residual, layout)  # fmt: skip
    return _filled(out, x)  # type: ignore[return-value]


def _backward_fake(dy, x, weight, bias, residual, mean, invstd, training, relu, need_input, need_params,
                   need_residual):  # fmt: skip
    params = [x.new_empty(mean.shape[0] if need_params else 0, dtype=torch.float32) for _ in range(2)]
    return _like_kernel_input(x, need_input), *params, _like_kernel_input(x, need_residual and residual is not None)


_op("triton_forward", _forward_filled, _forward_fake, mutates=("running_mean", "running_var"))
_op("triton_backward", _backward_filled, _backward_fake)


def _check(input: torch.Tensor) -> None:
    """What only this backend needs; the contract's checks (shapes, residual, activation) are bnlab.functional's."""
    reason = kernels.unavailable_reason(input.device.type)
    if reason is not None:
        raise RuntimeError(f"backend 'triton': {reason}; use backend='native' or 'reference' here")
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"backend 'triton': input dtype {input.dtype} is not supported (float32, float16, bfloat16); "
            f"use backend='reference' or 'native' for it"
        )
    per_channel = input.numel() // max(input.shape[1], 1)
    if per_channel > MAX_VALUES_PER_CHANNEL:
        raise ValueError(
            f"backend 'triton': input of shape {tuple(input.shape)} has {per_channel} values per channel; the "
            f"kernels index a channel's values with 32-bit integers (at most {MAX_VALUES_PER_CHANNEL}): use "
            f"backend='native' for it"
        )


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
    activation: str | None = None,
    guard: torch.Tensor | None = None,
    num_batches_tracked: torch.Tensor | None = None,
    ghosts: int = 1,
) -> torch.Tensor:
    """torch's batch_norm contract, optionally fused with ``+ residual`` and ReLU (see the module doc), and
    with the running-statistics update's non-finite check on the device (`guard`: see
    `bnlab.backends.guards_update`; bnlab.functional's policy "skip" passes it on a GPU).

    `ghosts` > 1 (ghost batch norm, training, outside torch.compile; `ghosts_in_place`): the input's
    consecutive chunks of N // ghosts samples are normalized each with its own statistics, read where they
    are (no copy into an (N // ghosts, ghosts * C, ...) tensor and back); weight, bias and the running
    statistics then have ghosts * C entries, ghost j's channel c at j * C + c, as for that tensor."""
    _check(input)
    if input.numel() == 0:  # nothing to launch: torch's op gives the empty result and its graph
        out = native.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return native.epilogue(out, residual, activation)
    if not training and torch.compiler.is_compiling():
        # Inference is elementwise with the running statistics: traced as torch ops, inductor fuses it into
        # its neighbours (a convolution's epilogue, the next pointwise op) rather than launching an opaque
        # kernel per layer (and an op call's host time). (Session 16 had an op of its own for it.)
        out = native.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
        return native.epilogue(out, residual, activation)
    relu = activation == "relu"
    return _fused(input, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu, guard,
                  num_batches_tracked, ghosts)[0]  # fmt: skip


def _fused(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None,
    running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool, momentum: float,
    eps: float, relu: bool, guard: torch.Tensor | None, counter: torch.Tensor | None, ghosts: int,
    statistics: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(y, mean, invstd) of `batch_norm`'s kernels, x and the residual first laid out for them; with
    `statistics` (vmap's rule) the statistics used always, else where they come at no cost (None in
    inference without a graph, and where a graph is recorded outside torch.func's transforms)."""
    layout = kl.layout_of(x)
    if layout is None:
        x, layout = x.contiguous(), kl.PLANES
    if residual is not None:
        residual = kl.to_layout(residual.to(x.dtype), layout)
        if residual is x:  # relu(bn(x) + x): a view, as torch.compile refuses one tensor as two inputs
            residual = residual.view_as(x)
    if not _through_function(x, weight, bias, residual):
        return _forward_kernels(x, weight, bias, residual, running_mean, running_var, training, momentum, eps,
                                relu, training or statistics, layout, guard, counter, ghosts)  # fmt: skip
    rest = (running_mean, running_var, training, momentum, eps, relu, layout, guard, counter, ghosts)
    if statistics or _transformed():
        return _Transformable.apply(x, weight, bias, residual, rest)
    return _FusedBatchNorm.apply(x, weight, bias, residual, rest), None, None


def _through_function(*tensors: torch.Tensor | None) -> bool:
    """Whether a call goes through an autograd.Function (`_FusedBatchNorm`, `_Transformable`): where autograd
    has something to record, under torch.func's transforms and forward-mode AD (which only a Function's rules
    pass), and under torch.compile (the Function's custom ops). Elsewhere (evaluation, torch.no_grad, frozen
    inputs) the launchers run without Function.apply's own bookkeeping (`python benchmarks/host_overhead.py`,
    its no_grad rows, times both)."""
    return (
        torch.compiler.is_compiling()
        or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
        or _transformed()
    )


def _transformed() -> bool:
    """Whether a torch.func transform is active, or a forward-mode AD level (whose dual tensors a launch would
    take for plain ones, dropping their tangents)."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def batch_statistics(input: torch.Tensor, eps: float, ghosts: int = 1) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, invstd) of a training batch per channel, float32, from one read of `input` by the statistics
    kernel (no gradient; for batch renorm's r and d: `bnlab.functional`); with `ghosts`, of each ghost
    batch's channels (ghosts * C, as `batch_norm`'s); None where the caller should use torch ops instead:
    under torch.compile (the launcher is not traced: inductor fuses torch's reduction), under torch.func's
    transforms, and for strides that would need a copy first (torch's var_mean reads them as they are)."""
    # (A launch needs real tensors, not functorch's wrappers. Dual tensors, which `_transformed` also counts,
    # are fine here: their primal is read, and r and d take no derivative.)
    if not ghosts_in_place(input) or torch._C._are_functorch_transforms_active():
        return None
    _check(input)
    with torch.no_grad():
        return kernels.load().statistics(input.detach(), eps, kl.layout_of(input), ghosts)


def ghosts_in_place(input: torch.Tensor) -> bool:
    """Whether `batch_norm(..., ghosts=k)` and `batch_statistics` read `input` where it is: outside
    torch.compile (the custom ops have no ghosts), a non-empty input in a kernel layout."""
    return not torch.compiler.is_compiling() and input.numel() > 0 and kl.layout_of(input) is not None


batch_norm.fuses_epilogue = True  # type: ignore[attr-defined]
batch_norm.guards_update = True  # type: ignore[attr-defined]
batch_norm.batch_statistics = batch_statistics  # type: ignore[attr-defined]
batch_norm.ghosts_in_place = ghosts_in_place  # type: ignore[attr-defined]
