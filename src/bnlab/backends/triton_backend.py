"""The ``triton`` backend: fused Triton kernels (``bnlab.kernels``) behind torch's batch-norm contract.

What it adds to the contract: ``residual=`` and ``activation="relu"`` fuse ``relu(bn(x) + residual)``
into the batch norm's own kernels (the other backends compose those ops; see
``bnlab.functional.batch_norm``). The running-statistics update is fused in as well. How each call runs
(split or single-tile kernels) is `bnlab.kernels.batchnorm`'s plan.

Where it runs: CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's interpreter, for
tests: slow). Input dtypes float32, float16, bfloat16, with float32 statistics and accumulation; the
parameters and running statistics may be float32 or the input's dtype. Layouts: contiguous (NCHW) and
channels-last are read in place; any other strides are copied to contiguous first.

Limits, by design: no double backward (the backward is a kernel, not differentiable ops: use the
``reference`` backend for higher derivatives); under ``torch.compile`` the call is a graph break.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from bnlab import kernels
from bnlab.backends import native

__all__ = ["SUPPORTED_DTYPES", "batch_norm"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_VALUES_PER_CHANNEL = 2**31 - 1  # N x spatial: row and count arithmetic in the kernels is 32-bit


class _FusedBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu, layout):  # type: ignore[override]
        k = kernels.load()
        needs_grad = any(ctx.needs_input_grad[:4])
        y, mean, invstd = k.forward(
            x, weight, bias, running_mean, running_var, training=training, momentum=momentum, eps=eps,
            residual=residual, relu=relu, save_stats=training or needs_grad, layout=layout,
        )  # fmt: skip
        if needs_grad:
            ctx.save_for_backward(x, weight, bias, residual, mean, invstd)
        ctx.training, ctx.relu, ctx.layout = training, relu, layout
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        # Grad mode is on only under create_graph=True: then the gradients must refuse a second
        # differentiation (the kernels are not differentiable ops). once_differentiable does that, at a few
        # microseconds per call, so the common case (grad mode off) skips it.
        if torch.is_grad_enabled():
            return _backward_once(ctx, dy)
        return _backward(ctx, dy)


def _backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    k = kernels.load()
    x, weight, bias, residual, mean, invstd = ctx.saved_tensors
    need_x, need_w, need_b, need_z = ctx.needs_input_grad[:4]
    dx, dweight, dbias, dz = k.backward(
        k.to_layout(dy, ctx.layout), x, weight, bias, mean, invstd, training=ctx.training, residual=residual,
        relu=ctx.relu, need_input=need_x, need_params=need_w or need_b, need_residual=need_z, layout=ctx.layout,
    )  # fmt: skip
    # dweight and dbias are float32: cast (a copy) only for parameters kept in another dtype.
    if need_w and dweight.dtype != weight.dtype:
        dweight = dweight.to(weight.dtype)
    if need_b and dbias.dtype != bias.dtype:
        dbias = dbias.to(bias.dtype)
    return dx, dweight if need_w else None, dbias if need_b else None, dz, *(None,) * 7


_backward_once = once_differentiable(_backward)


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


@torch.compiler.disable
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
) -> torch.Tensor:
    """torch's batch_norm contract, optionally fused with ``+ residual`` and ReLU (see the module doc)."""
    _check(input)
    if input.numel() == 0:  # nothing to launch: torch's op gives the empty result and its graph
        out = native.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return native.epilogue(out, residual, activation)
    k = kernels.load()
    layout = k.layout_of(input)
    if layout is None:
        input, layout = input.contiguous(), k.PLANES
    if residual is not None:
        residual = k.to_layout(residual.to(input.dtype), layout)
    return _FusedBatchNorm.apply(
        input, weight, bias, residual, running_mean, running_var, training, momentum, eps, activation == "relu", layout
    )


batch_norm.fuses_epilogue = True  # type: ignore[attr-defined]
