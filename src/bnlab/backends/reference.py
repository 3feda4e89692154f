"""The ``reference`` backend: Algorithm 1 in torch ops with the backward written out by hand.

This is the specification in executable, differentiable form. It is checked against autograd, finite
differences and the NumPy reference (``bnlab.reference``), and every other backend is checked against it.

Numerics, written down once:
- it computes in float32 for half-precision inputs and in float64 for float32 and float64 inputs, and
  casts the output back to the input's dtype. It is the oracle, not the fast path: with float32
  arithmetic, the backward of a tiny batch (m = 2, where dx is a difference of nearly equal terms
  proportional to eps / (var + eps)) loses most of its digits, as torch's CPU kernels would if they did
  not accumulate in double;
- the variance is two-pass, mean((x - mean)^2), never E[x^2] - E[x]^2, which cancels catastrophically
  for inputs with a large offset; and the values are shifted by one sample of their channel before
  anything is summed (see `_shifted_statistics`), so the offset never enters a rounded sum;
- the normalization subtracts the mean before scaling, (x - mean) * (weight / std) + bias, so a large
  offset cancels exactly instead of through rounded products.

Backward (per channel, N values share one mean and variance; g = dy * weight; x_hat = (x - mean) * invstd):
    dbias   = sum dy
    dweight = sum dy * x_hat
    dx      = invstd * (g - mean(g) - x_hat * mean(g * x_hat))
This is the paper's chain of dl/dvar and dl/dmu (see ``bnlab.reference.batch_norm_backward``) with the
sums collected. For double backward, the backward recomputes mean and invstd from the saved input with
differentiable ops, so second derivatives see the statistics' dependence on x. (The backward above is
hand-written; the inference map, being affine, leaves its backward to autograd.)

Forward mode (`tangent`: the tangent of y for tangents dx, dweight, dbias; torch.func.jvp, jacfwd):
    dy      = weight * invstd * (dx - mean(dx) - x_hat * mean(x_hat * dx)) + dweight * x_hat + dbias
the backward's projection again (it is symmetric). torch.func's vmap gets a rule generated from the
forward's torch ops.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in: half precision in float32, float32 and float64 in float64."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view((1, -1) + (1,) * (ndim - 2))


def _reduce_dims(ndim: int) -> list[int]:
    return [0, *range(2, ndim)]


def _shifted_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pivot, shifted_mean, var): mean = pivot + shifted_mean; everything per channel, accumulation dtype.

    The values are first shifted by one sample of their channel (the pivot). Values close to each other
    subtract exactly, so a large common offset (1e4 + N(0, 1) in float32) never enters a rounded sum: the
    sum of raw values would carry an error of about ulp(1e4) * sqrt(m) into the mean, and from there into
    every normalized value.
    """
    xa = x.to(accumulation_dtype(x.dtype))
    nd = x.dim()
    dims = _reduce_dims(nd)
    pivot = xa[(0, slice(None), *(0,) * (nd - 2))]
    shifted = xa - _channel_view(pivot, nd)
    shifted_mean = shifted.mean(dims)
    centered = shifted - _channel_view(shifted_mean, nd)
    return pivot, shifted_mean, (centered * centered).mean(dims)


def _centered(x: torch.Tensor, pivot: torch.Tensor, shifted_mean: torch.Tensor) -> torch.Tensor:
    nd = x.dim()
    return x.to(pivot.dtype) - _channel_view(pivot, nd) - _channel_view(shifted_mean, nd)


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of an (N, C, *) tensor, in the accumulation dtype."""
    pivot, shifted_mean, var = _shifted_statistics(x)
    return pivot + shifted_mean, var


def _training_grads(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    pivot: torch.Tensor,
    shifted_mean: torch.Tensor,
    invstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nd = x.dim()
    dims = _reduce_dims(nd)
    acc = invstd.dtype
    dya = dy.to(acc)
    x_hat = _centered(x, pivot, shifted_mean) * _channel_view(invstd, nd)
    dbias = dya.sum(dims)
    dweight = (dya * x_hat).sum(dims)
    n = x.numel() // x.shape[1]
    # With g = dy * weight, sum(g) = weight * dbias and sum(g * x_hat) = weight * dweight per channel.
    if weight is None:
        g, sum_g, sum_g_xhat = dya, dbias, dweight
    else:
        w = weight.to(acc)
        g, sum_g, sum_g_xhat = dya * _channel_view(w, nd), dbias * w, dweight * w
    dx = (g - _channel_view(sum_g / n, nd) - x_hat * _channel_view(sum_g_xhat / n, nd)) * _channel_view(invstd, nd)
    return dx.to(x.dtype), dweight, dbias


def tangent(
    x_hat: torch.Tensor,
    invstd: torch.Tensor,
    training: bool,
    dx: torch.Tensor | None,
    weight: torch.Tensor | None,
    dweight: torch.Tensor | None,
    dbias: torch.Tensor | None,
) -> torch.Tensor:
    """The output's tangent (forward-mode derivative) for tangents dx, dweight, dbias (None: zero), in
    x_hat's dtype: ``weight * invstd * P(dx) + dweight * x_hat + dbias``, where P(dx) is dx itself in
    inference (fixed statistics) and ``dx - mean(dx) - x_hat * mean(x_hat * dx)`` in training (the
    tangents of the batch mean and of 1 / std: the backward's projection, transposed)."""
    nd = x_hat.dim()
    out = torch.zeros_like(x_hat)
    if dx is not None:
        d = dx.to(x_hat.dtype)
        if training:
            dims = _reduce_dims(nd)
            d = d - d.mean(dims, keepdim=True) - x_hat * (x_hat * d).mean(dims, keepdim=True)
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        out = out + d * _channel_view(scale.to(x_hat.dtype), nd)
    if dweight is not None:
        out = out + x_hat * _channel_view(dweight.to(x_hat.dtype), nd)
    if dbias is not None:
        out = out + _channel_view(dbias.to(x_hat.dtype), nd)
    return out


def training_gradients(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of a training batch norm, the statistics recomputed from x in torch ops: with grad
    mode on, differentiable again (double backward), the statistics' dependence on x included; dweight and
    dbias in the accumulation dtype."""
    pivot, shifted_mean, var = _shifted_statistics(x)
    return _training_grads(dy, x, weight, pivot, shifted_mean, torch.rsqrt(var + eps))


class _TrainingBatchNorm(torch.autograd.Function):
    """y = weight * (x - mean_B) / sqrt(var_B + eps) + bias; also returns the statistics (pivot,
    shifted_mean, var_B: `_shifted_statistics`), not differentiable. In the form torch.func's transforms
    take (forward without ctx, `setup_context`): grad, jacrev; jvp, jacfwd and vmap with `_Transformable`."""

    @staticmethod
    def forward(x, weight, bias, eps, running_mean, running_var, momentum):  # type: ignore[override]
        nd = x.dim()
        pivot, shifted_mean, var = _shifted_statistics(x)
        # The running statistics are updated here, on the values under the transforms' wrappers (a grad
        # transform refuses an in-place write of a tensor it did not wrap with one it did).
        update_running_stats(running_mean, running_var, pivot + shifted_mean, var, x.numel() // x.shape[1], momentum)
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = scale * weight.to(scale.dtype)
        y = _centered(x, pivot, shifted_mean) * _channel_view(scale, nd)
        if bias is not None:
            y = y + _channel_view(bias.to(y.dtype), nd)
        return y.to(x.dtype), pivot, shifted_mean, var

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, weight, bias, eps, *_ = inputs
        _, pivot, shifted_mean, var = output
        ctx.save_for_backward(x, weight, pivot, shifted_mean, var)
        ctx.save_for_forward(x, weight, pivot, shifted_mean, var)
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(pivot, shifted_mean, var)

    @staticmethod
    def backward(ctx, dy, _dpivot, _dshifted_mean, _dvar):  # type: ignore[override]
        x, weight, pivot, shifted_mean, var = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: rebuild the statistics from x inside the graph (see the module doc).
            dx, dweight, dbias = training_gradients(dy, x, weight, ctx.eps)
        else:
            dx, dweight, dbias = _training_grads(dy, x, weight, pivot, shifted_mean, torch.rsqrt(var + ctx.eps))
        needs = ctx.needs_input_grad
        return (
            dx if needs[0] else None,
            dweight.to(weight.dtype) if needs[1] else None,
            dbias.to(ctx.bias_dtype) if needs[2] else None,
            *(None,) * 4,
        )


class _Transformable(_TrainingBatchNorm):
    """`_TrainingBatchNorm` with forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) and a
    vmap rule generated from the forward's torch ops, for eager calls (torch.compile refuses a Function with a
    custom jvp)."""

    generate_vmap_rule = True

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, *_):  # type: ignore[override]
        x, weight, pivot, shifted_mean, var = ctx.saved_tensors
        invstd = torch.rsqrt(var + ctx.eps)
        x_hat = _centered(x, pivot, shifted_mean) * _channel_view(invstd, x.dim())
        return tangent(x_hat, invstd, True, dx, weight, dweight, dbias).to(x.dtype), None, None, None


def _inference(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    # Algorithm 2's fixed affine map. Its backward is autograd's: the map is affine in x, weight and bias.
    nd = x.dim()
    acc = accumulation_dtype(x.dtype)
    scale = torch.rsqrt(var.to(acc) + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    y = (x.to(acc) - _channel_view(mean.to(acc), nd)) * _channel_view(scale, nd)
    if bias is not None:
        y = y + _channel_view(bias.to(acc), nd)
    return y.to(x.dtype)


def update_running_stats(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    count: int,
    momentum: float,
) -> None:
    """running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance."""
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1.0 - momentum).add_(batch_mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            bessel = count / (count - 1)
            running_var.mul_(1.0 - momentum).add_(batch_var.to(running_var.dtype), alpha=momentum * bessel)


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("reference batch_norm: inference needs running_mean and running_var")
        return _inference(input, running_mean, running_var, weight, bias, eps)
    if input.numel() == 0:  # no values, no statistics: an empty output that still carries the graph
        channels = input.shape[1]
        zeros = input.new_zeros(channels, dtype=accumulation_dtype(input.dtype))
        return _inference(input, zeros, zeros + 1, weight, bias, eps)
    function = _TrainingBatchNorm if torch.compiler.is_compiling() else _Transformable
    return function.apply(input, weight, bias, eps, running_mean, running_var, momentum)[0]
