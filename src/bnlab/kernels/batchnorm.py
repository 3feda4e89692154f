"""Triton kernels for training and inference batch norm, optionally fused with ``+ residual`` and ReLU.

Math (per channel c; n values share one mean and variance; all arithmetic in float32 whatever the
input dtype; the affine parameters default to weight 1, bias 0):

    forward    mean, var = batch statistics (biased var)          invstd = 1 / sqrt(var + eps)
               p = (x - mean) * (invstd * weight) + bias [+ z]    y = relu(p) if relu else p
    running    running = (1 - momentum) * running + momentum * (mean, var * n / (n - 1))
    backward   g = dy * (p > 0) if relu else dy                   dz = g   (the residual's gradient)
               dbias = sum g        dweight = invstd * sum g * (x - mean)
               training:  dx = weight * invstd * (g - dbias / n - (x - mean) * invstd * dweight / n)
               inference: dx = weight * invstd * g   (mean and invstd are constants there)

The ReLU mask is recomputed from x (and z) in backward instead of being stored: the same shared
`_pre_activation` code runs in both directions, so the mask is bit for bit the forward's.

Every reduction is split deterministically: each program owns a fixed slice of a channel's values
and accumulates per lane (no cross-lane reduction inside its loop), reduces its lanes once at the end
and writes one partial result per (slice, channel). The last program of a channel to finish (an
integer atomic counter, the only atomic) combines the partials of that channel in slice order and
finalizes; no float atomics, so results are identical run to run, and no separate finalize launch.
When one slice covers the whole channel the program finalizes directly. Each program's sums are
shifted by the mean of its first tile (the pivot), so that a large common offset (1e4 + N(0, 1))
never enters a rounded sum of squares; the programs' (count, mean, M2), their means relative to the
channel's first value (digits kept near a large offset), are combined with Chan et al.'s pairwise
update, which has no E[x^2] - E[x]^2 cancellation.

Layouts. A tensor of shape (N, C, *spatial), S = prod(spatial), is addressed in one of two ways:
- "rows": channels contiguous, value (r, c) at r * C + c with r in [0, N * S): channels-last 2-D/3-D
  tensors, (N, C) matrices (BatchNorm1d), and (N, C, L) with C contiguous. Tiles are [BLOCK_R, BLOCK_C].
- "planes": NCHW-contiguous, value (n, c, s) at (n * C + c) * S + s. One channel per program, tiles of
  [BLOCK_N, BLOCK_S] values of that channel.
Other strides are made contiguous first (a copy, documented in the backend).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["Plan", "backward", "forward", "plan_for"]

ROWS = "rows"
PLANES = "planes"


# ---- shared device code -----------------------------------------------------------------------------


@triton.jit
def _chan_combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries (Chan, Golub & LeVeque): exact up to rounding, no cancellation."""
    n = n_a + n_b
    frac = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def _pre_activation(x, mean, scale, shift, z, HAS_RESIDUAL: tl.constexpr):
    """p = (x - mean) * scale + shift [+ z]: the one place both directions compute the pre-activation."""
    p = (x - mean) * scale + shift
    if HAS_RESIDUAL:
        p = p + z
    return p


@triton.jit
def _channel_params(w_ptr, b_ptr, cols, cmask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
    else:
        w = tl.full(cols.shape, 1.0, tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros(cols.shape, tl.float32)
    return w, b


@triton.jit
def _channels(pid_c, C, BLOCK_B: tl.constexpr, PLANES: tl.constexpr):
    """The channels of a program: one (planes) or a block of BLOCK_B (rows); and which of them exist."""
    if PLANES:
        cols = pid_c + tl.arange(0, 1)
    else:
        cols = pid_c * BLOCK_B + tl.arange(0, BLOCK_B)
    return cols, cols < C


@triton.jit
def _tile(i, pid_c, N, C, S, S_BLOCKS, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PLANES: tl.constexpr):
    """Offsets and mask of a program's tile i.

    rows:   rows [i * BLOCK_A, +BLOCK_A) of the (N * S, C) matrix, channels [pid_c * BLOCK_B, +BLOCK_B).
    planes: channel pid_c; tile i in (n-block, s-block) order covers n in [nb * BLOCK_A, +BLOCK_A) and
            s in [sb * BLOCK_B, +BLOCK_B).
    """
    if PLANES:
        nb = i // S_BLOCKS
        sb = i - nb * S_BLOCKS
        n = nb * BLOCK_A + tl.arange(0, BLOCK_A)
        s = sb * BLOCK_B + tl.arange(0, BLOCK_B)
        mask = (n < N)[:, None] & (s < S)[None, :]
        offs = (n.to(tl.int64) * C + pid_c)[:, None] * S + s[None, :]
    else:
        rows = i * BLOCK_A + tl.arange(0, BLOCK_A)
        cols = pid_c * BLOCK_B + tl.arange(0, BLOCK_B)
        mask = (rows < N * S)[:, None] & (cols < C)[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    return offs, mask


@triton.jit
def _spread(v, PLANES: tl.constexpr):
    """A per-channel vector shaped to broadcast against the program's tiles."""
    if PLANES:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _channel_sum(t, PLANES: tl.constexpr):
    """Sum a tile per channel: over both axes (planes: one channel) or over rows (rows)."""
    if PLANES:
        return tl.sum(tl.sum(t, axis=1), axis=0)
    else:
        return tl.sum(t, axis=0)


@triton.jit
def _slice(pid_s, TILES, tiles_per_split):
    start = pid_s * tiles_per_split
    return start, tl.minimum(start + tiles_per_split, TILES)


@triton.jit
def _anchor(x_ptr, cols, cmask, S, PLANES: tl.constexpr):
    """The channel's first value: partial means are stored relative to it (see module doc)."""
    stride = S if PLANES else 1
    return tl.load(x_ptr + cols.to(tl.int64) * stride, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def _last_to_finish(sem_ptr, pid_c):
    """Whether this program is the last of its channel block to arrive (after writing its partials).

    The barrier makes every thread's partial stores precede the release; the acquire makes the other
    programs' partials visible to the last one, which reads them with .cg loads (L2, never a stale L1).
    """
    tl.debug_barrier()
    return tl.atomic_add(sem_ptr + pid_c, 1, sem="acq_rel") == tl.num_programs(1) - 1


@triton.jit
def _release(sem_ptr, pid_c):
    """Zero the channel block's counter again: the next kernel on the stream reuses the buffer."""
    tl.atomic_xchg(sem_ptr + pid_c, 0)


@triton.jit
def _partial_block(ptr, s0, cols, cmask, C, SPLITS, SPLIT_BLOCK: tl.constexpr):
    """Partials [s0, s0 + SPLIT_BLOCK) x cols of a (slice, channel) workspace, zero past the end."""
    s = s0 + tl.arange(0, SPLIT_BLOCK)
    mask = (s < SPLITS)[:, None] & cmask[None, :]
    return tl.load(ptr + s[:, None] * C + cols[None, :], mask=mask, other=0.0, cache_modifier=".cg")


@triton.jit
def _combine_stats(pn_ptr, pmean_ptr, pm2_ptr, cols, cmask, C, SPLITS, SPLIT_BLOCK: tl.constexpr):
    """All slices' (count, mean, M2) of the channels, combined in a fixed order (deterministic)."""
    n = tl.zeros(cols.shape, tl.float32)
    mean = tl.zeros(cols.shape, tl.float32)
    m2 = tl.zeros(cols.shape, tl.float32)
    for s0 in range(0, SPLITS, SPLIT_BLOCK):
        n_b, mean_b, m2_b = tl.reduce(
            (
                _partial_block(pn_ptr, s0, cols, cmask, C, SPLITS, SPLIT_BLOCK),
                _partial_block(pmean_ptr, s0, cols, cmask, C, SPLITS, SPLIT_BLOCK),
                _partial_block(pm2_ptr, s0, cols, cmask, C, SPLITS, SPLIT_BLOCK),
            ),
            0,
            _chan_combine,
        )
        n, mean, m2 = _chan_combine(n, mean, m2, n_b, mean_b, m2_b)
    return n, mean, m2


@triton.jit
def _finalize_stats(
    n, rel_mean, m2, anchor, cols, cmask, eps, momentum,
    mean_out, invstd_out, rmean_ptr, rvar_ptr, HAS_RUNNING: tl.constexpr,
):  # fmt: skip
    mean = anchor + rel_mean
    var = m2 / tl.maximum(n, 1.0)  # n is 0 only in padding lanes past C, whose stores are masked
    tl.store(mean_out + cols, mean, mask=cmask)
    tl.store(invstd_out + cols, 1.0 / tl.sqrt(var + eps), mask=cmask)
    if HAS_RUNNING:
        rm = tl.load(rmean_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        rv = tl.load(rvar_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        unbiased = m2 / tl.maximum(n - 1.0, 1.0)
        tl.store(rmean_ptr + cols, (rm + momentum * (mean - rm)).to(rmean_ptr.dtype.element_ty), mask=cmask)
        tl.store(rvar_ptr + cols, (rv + momentum * (unbiased - rv)).to(rvar_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _finalize_grads(sum_g, sum_gc, n, cols, cmask, invstd_ptr, dw_ptr, db_ptr, coef_ptr, C):
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    dweight = sum_gc * invstd
    tl.store(dw_ptr + cols, dweight, mask=cmask)
    tl.store(db_ptr + cols, sum_g, mask=cmask)
    # dx = weight * invstd * (g - k1 - (x - mean) * k2): k1 = mean of g, k2 = invstd * mean of g * x_hat.
    tl.store(coef_ptr + cols, sum_g / n, mask=cmask)
    tl.store(coef_ptr + C + cols, dweight * invstd / n, mask=cmask)


# ---- forward ----------------------------------------------------------------------------------------


@triton.jit
def _stats_kernel(
    x_ptr, pn_ptr, pmean_ptr, pm2_ptr, sem_ptr, mean_out, invstd_out, rmean_ptr, rvar_ptr,
    N, C, S, S_BLOCKS, TILES, tiles_per_split, eps, momentum,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PLANES: tl.constexpr, SPLIT: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr, HAS_RUNNING: tl.constexpr,
):  # fmt: skip
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    t_start, t_end = _slice(split, TILES, tiles_per_split)
    cols, cmask = _channels(pid_c, C, BLOCK_B, PLANES)
    anchor = _anchor(x_ptr, cols, cmask, S, PLANES)
    # The slice's first tile gives the pivot (its mean per channel); every slice has at least one tile.
    offs, mask = _tile(t_start, pid_c, N, C, S, S_BLOCKS, BLOCK_A, BLOCK_B, PLANES)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    count = mask.to(tl.float32)
    pivot = _channel_sum(x, PLANES) / tl.maximum(_channel_sum(count, PLANES), 1.0) + tl.zeros(cols.shape, tl.float32)
    shift = _spread(pivot, PLANES)  # (planes: the scalar sum, shaped like cols to broadcast over the tiles)
    d = tl.where(mask, x - shift, 0.0)
    s1 = d
    s2 = d * d
    for t in range(t_start + 1, t_end):  # per-lane sums: no reduction across lanes inside the loop
        offs, mask = _tile(t, pid_c, N, C, S, S_BLOCKS, BLOCK_A, BLOCK_B, PLANES)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - shift, 0.0)
        count += mask.to(tl.float32)
        s1 += d
        s2 += d * d
    n = _channel_sum(count, PLANES)
    total = _channel_sum(s1, PLANES)
    shifted_mean = total / tl.maximum(n, 1.0)
    m2 = _channel_sum(s2, PLANES) - shifted_mean * total
    m2 = tl.where(m2 < 0.0, 0.0, m2)  # rounding can go below 0; a NaN (bad input) must stay NaN
    # Relative to the channel's first value, so that partial means near a large offset keep their digits.
    rel_mean = (pivot - anchor) + shifted_mean
    if SPLIT:
        tl.store(pn_ptr + split * C + cols, n, mask=cmask)
        tl.store(pmean_ptr + split * C + cols, rel_mean, mask=cmask)
        tl.store(pm2_ptr + split * C + cols, m2, mask=cmask)
        if _last_to_finish(sem_ptr, pid_c):
            n_c, mean_c, m2_c = _combine_stats(
                pn_ptr, pmean_ptr, pm2_ptr, cols, cmask, C, tl.num_programs(1), SPLIT_BLOCK
            )
            _finalize_stats(
                n_c, mean_c, m2_c, anchor, cols, cmask, eps, momentum,
                mean_out, invstd_out, rmean_ptr, rvar_ptr, HAS_RUNNING,
            )  # fmt: skip
            _release(sem_ptr, pid_c)
    else:
        _finalize_stats(
            n, rel_mean, m2, anchor, cols, cmask, eps, momentum, mean_out, invstd_out, rmean_ptr, rvar_ptr, HAS_RUNNING
        )


@triton.jit
def _load_stats(mean_ptr, invstd_ptr, cols, cmask, eps, FROM_RUNNING: tl.constexpr):
    """Per-channel mean and invstd: saved batch statistics, or running mean and variance (inference)."""
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if FROM_RUNNING:
        var = tl.load(invstd_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
        invstd = 1.0 / tl.sqrt(var + eps)
    else:
        invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    return mean, invstd


@triton.jit
def _apply_kernel(
    x_ptr, z_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr,
    N, C, S, S_BLOCKS, TILES, tiles_per_split, eps,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PLANES: tl.constexpr, FROM_RUNNING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
):  # fmt: skip
    pid_c = tl.program_id(0)
    t_start, t_end = _slice(tl.program_id(1), TILES, tiles_per_split)
    cols, cmask = _channels(pid_c, C, BLOCK_B, PLANES)
    mean, invstd = _load_stats(mean_ptr, invstd_ptr, cols, cmask, eps, FROM_RUNNING)
    w, shift = _channel_params(w_ptr, b_ptr, cols, cmask, HAS_WEIGHT, HAS_BIAS)
    mean, scale, shift = _spread(mean, PLANES), _spread(invstd * w, PLANES), _spread(shift, PLANES)
    for t in range(t_start, t_end):
        offs, mask = _tile(t, pid_c, N, C, S, S_BLOCKS, BLOCK_A, BLOCK_B, PLANES)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = x
        if HAS_RESIDUAL:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = _pre_activation(x, mean, scale, shift, z, HAS_RESIDUAL)
        if RELU:
            p = tl.maximum(p, 0.0)
        tl.store(y_ptr + offs, p.to(y_ptr.dtype.element_ty), mask=mask)


# ---- backward ---------------------------------------------------------------------------------------


@triton.jit
def _masked_grad(dy, x, z, mean, scale, shift, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr):
    """g = dy where the forward's ReLU passed its input (recomputed), else 0; dy itself without ReLU."""
    if RELU:
        p = _pre_activation(x, mean, scale, shift, z, HAS_RESIDUAL)
        dy = tl.where(p > 0.0, dy, 0.0)
    return dy


@triton.jit
def _grad_tile(
    t, pid_c, dy_ptr, x_ptr, z_ptr, mean, scale, shift, N, C, S, S_BLOCKS,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PLANES: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
):  # fmt: skip
    """Tile t's offsets, mask, x and g (dy through the recomputed ReLU mask), all float32."""
    offs, mask = _tile(t, pid_c, N, C, S, S_BLOCKS, BLOCK_A, BLOCK_B, PLANES)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = x
    if HAS_RESIDUAL:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return offs, mask, x, _masked_grad(dy, x, z, mean, scale, shift, HAS_RESIDUAL, RELU)


@triton.jit
def _grad_kernel(
    dy_ptr, x_ptr, z_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, psum_ptr, psumc_ptr, sem_ptr, dw_ptr, db_ptr,
    coef_ptr, N, C, S, S_BLOCKS, TILES, tiles_per_split,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PLANES: tl.constexpr, SPLIT: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr,
):  # fmt: skip
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    t_start, t_end = _slice(split, TILES, tiles_per_split)
    cols, cmask = _channels(pid_c, C, BLOCK_B, PLANES)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    w, shift = _channel_params(w_ptr, b_ptr, cols, cmask, HAS_WEIGHT, HAS_BIAS)
    mean_t, scale, shift = _spread(mean, PLANES), _spread(invstd * w, PLANES), _spread(shift, PLANES)
    sum_g = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    sum_gc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    for t in range(t_start, t_end):  # per-lane sums; g is 0 in masked lanes (dy loads as 0 there)
        _, _, x, g = _grad_tile(
            t, pid_c, dy_ptr, x_ptr, z_ptr, mean_t, scale, shift, N, C, S, S_BLOCKS,
            BLOCK_A, BLOCK_B, PLANES, HAS_RESIDUAL, RELU,
        )  # fmt: skip
        sum_g += g
        sum_gc += g * (x - mean_t)
    total_g = _channel_sum(sum_g, PLANES)
    total_gc = _channel_sum(sum_gc, PLANES)
    count = (N * S).to(tl.float32)
    if SPLIT:
        tl.store(psum_ptr + split * C + cols, total_g, mask=cmask)
        tl.store(psumc_ptr + split * C + cols, total_gc, mask=cmask)
        if _last_to_finish(sem_ptr, pid_c):
            splits = tl.num_programs(1)
            all_g = tl.zeros(cols.shape, tl.float32)
            all_gc = tl.zeros(cols.shape, tl.float32)
            for s0 in range(0, splits, SPLIT_BLOCK):  # fixed order: deterministic
                all_g += tl.sum(_partial_block(psum_ptr, s0, cols, cmask, C, splits, SPLIT_BLOCK), 0)
                all_gc += tl.sum(_partial_block(psumc_ptr, s0, cols, cmask, C, splits, SPLIT_BLOCK), 0)
            _finalize_grads(all_g, all_gc, count, cols, cmask, invstd_ptr, dw_ptr, db_ptr, coef_ptr, C)
            _release(sem_ptr, pid_c)
    else:
        _finalize_grads(total_g, total_gc, count, cols, cmask, invstd_ptr, dw_ptr, db_ptr, coef_ptr, C)


@triton.jit
def _dx(g, x, mean, scale, k1, k2, TRAINING: tl.constexpr):
    if TRAINING:
        g = g - k1 - (x - mean) * k2
    return g * scale


@triton.jit
def _input_grad_kernel(
    dy_ptr, x_ptr, z_ptr, dx_ptr, dz_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, coef_ptr,
    N, C, S, S_BLOCKS, TILES, tiles_per_split,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PLANES: tl.constexpr, TRAINING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    WRITE_DX: tl.constexpr, WRITE_DZ: tl.constexpr,
):  # fmt: skip
    pid_c = tl.program_id(0)
    t_start, t_end = _slice(tl.program_id(1), TILES, tiles_per_split)
    cols, cmask = _channels(pid_c, C, BLOCK_B, PLANES)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    w, shift = _channel_params(w_ptr, b_ptr, cols, cmask, HAS_WEIGHT, HAS_BIAS)
    k1 = mean
    k2 = mean
    if TRAINING:
        k1 = tl.load(coef_ptr + cols, mask=cmask, other=0.0)
        k2 = tl.load(coef_ptr + C + cols, mask=cmask, other=0.0)
    mean, scale, shift = _spread(mean, PLANES), _spread(invstd * w, PLANES), _spread(shift, PLANES)
    k1, k2 = _spread(k1, PLANES), _spread(k2, PLANES)
    for t in range(t_start, t_end):
        offs, mask, x, g = _grad_tile(
            t, pid_c, dy_ptr, x_ptr, z_ptr, mean, scale, shift, N, C, S, S_BLOCKS,
            BLOCK_A, BLOCK_B, PLANES, HAS_RESIDUAL, RELU,
        )  # fmt: skip
        if WRITE_DZ:
            tl.store(dz_ptr + offs, g.to(dz_ptr.dtype.element_ty), mask=mask)
        if WRITE_DX:
            dx = _dx(g, x, mean, scale, k1, k2, TRAINING)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---- one tile per channel: a single pass over memory -----------------------------------------------
# When a whole channel fits in one program's registers (small N * S, e.g. ResNet's 7x7 layers), the
# statistics and the normalization (or the gradient sums and dx) come from the same loaded values: x is
# read once per direction instead of twice, and one launch replaces two or three.


@triton.jit
def _single_tile_forward_kernel(
    x_ptr, z_ptr, y_ptr, mean_out, invstd_out, rmean_ptr, rvar_ptr, w_ptr, b_ptr,
    N, C, S, eps, momentum,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, HAS_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    cols = c + tl.arange(0, 1)
    cmask = cols < C
    offs, mask = _tile(0, c, N, C, S, 1, BLOCK_N, BLOCK_S, True)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    n = (N * S).to(tl.float32)
    # Two passes over registers: the exact mean, then the centred sum of squares.
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / n
    d = tl.where(mask, x - mean, 0.0)
    m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
    zero = tl.zeros([1], tl.float32)
    _finalize_stats(
        zero + n, zero, zero + m2, zero + mean, cols, cmask, eps, momentum,
        mean_out, invstd_out, rmean_ptr, rvar_ptr, HAS_RUNNING,
    )  # fmt: skip
    invstd = 1.0 / tl.sqrt(m2 / n + eps)
    w, shift = _channel_params(w_ptr, b_ptr, cols, cmask, HAS_WEIGHT, HAS_BIAS)
    z = x
    if HAS_RESIDUAL:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = _pre_activation(x, mean, (invstd * w)[:, None], shift[:, None], z, HAS_RESIDUAL)
    if RELU:
        p = tl.maximum(p, 0.0)
    tl.store(y_ptr + offs, p.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _single_tile_backward_kernel(
    dy_ptr, x_ptr, z_ptr, dx_ptr, dz_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, dw_ptr, db_ptr,
    N, C, S,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DZ: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    cols = c + tl.arange(0, 1)
    cmask = cols < C
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    w, shift = _channel_params(w_ptr, b_ptr, cols, cmask, HAS_WEIGHT, HAS_BIAS)
    scale = invstd * w
    offs, mask, x, g = _grad_tile(
        0, c, dy_ptr, x_ptr, z_ptr, mean[:, None], scale[:, None], shift[:, None], N, C, S, 1,
        BLOCK_N, BLOCK_S, True, HAS_RESIDUAL, RELU,
    )  # fmt: skip
    sum_g = tl.sum(tl.sum(g, axis=1), axis=0)
    sum_gc = tl.sum(tl.sum(tl.where(mask, g * (x - mean[:, None]), 0.0), axis=1), axis=0)
    n = (N * S).to(tl.float32)
    dweight = sum_gc * invstd
    tl.store(dw_ptr + cols, dweight, mask=cmask)
    tl.store(db_ptr + cols, sum_g + tl.zeros([1], tl.float32), mask=cmask)
    if WRITE_DZ:
        tl.store(dz_ptr + offs, g.to(dz_ptr.dtype.element_ty), mask=mask)
    if WRITE_DX:
        k1 = sum_g / n
        k2 = dweight * invstd / n
        dx = _dx(g, x, mean[:, None], scale[:, None], k1, k2[:, None], True)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---- launch planning --------------------------------------------------------------------------------


# Host-side integer helpers: triton.cdiv and triton.next_power_of_2 are constexpr-function wrappers that
# cost microseconds per call, and planning runs on every layer call.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class Plan:
    """How a (N, C, S) tensor is cut into tiles and slices; pure arithmetic, unit-tested on its own.

    rows:   tiles of [block_a rows, block_b channels]; a program owns block_b channels.
    planes: tiles of [block_a samples, block_b spatial positions] of one channel per program.
    Each program (channel block, slice) covers `per_split` consecutive tiles of its channels.
    """

    layout: str
    N: int
    C: int
    S: int
    block_a: int
    block_b: int
    per_split: int
    splits: int
    num_warps: int
    single: bool = False  # planes, one tile per channel: the single-pass kernels (training)

    @property
    def channel_programs(self) -> int:
        return _cdiv(self.C, self.block_b) if self.layout == ROWS else self.C

    @property
    def grid(self) -> tuple[int, int]:
        return (self.channel_programs, self.splits)

    @property
    def s_blocks(self) -> int:
        return _cdiv(self.S, self.block_b)

    @property
    def tiles(self) -> int:
        if self.layout == ROWS:
            return _cdiv(self.N * self.S, self.block_a)
        return _cdiv(self.N, self.block_a) * self.s_blocks


def _spatial_block(S: int, tile: int) -> int:
    """The block width for a channel's runs of S contiguous values: least padding, then widest.

    A block that runs past S idles its lanes (49 values in a block of 64 use 77% of them), but blocks
    narrower than 64 values cut each contiguous run into short pieces, which costs more than idle lanes
    (partly used memory sectors): candidates are the powers of two from min(64, S) up to min(S, tile).
    """
    widest = min(_pow2(S), tile, 1024)
    candidates = []
    b = widest
    while b >= min(64, widest):
        candidates.append(b)
        b //= 2
    return min(candidates, key=lambda b: (_cdiv(S, b) * b - S, -b))


@functools.lru_cache(maxsize=4096)  # pure; called on every layer call with a handful of shapes
def plan_for(
    layout: str,
    N: int,
    C: int,
    S: int,
    *,
    target_programs: int,
    tile: int = 4096,
    num_warps: int = 8,
    single_tile_max: int = 0,
    single_warps: int = 16,
) -> Plan:
    """Tile sizes and the number of slices per channel so that about `target_programs` programs run.

    Slices make the reduction parallel when there are few channels for many values; each slice is at
    least one tile. The same plan serves the partial and the elementwise passes. A planes-layout channel
    that fits in one tile of at most `single_tile_max` values gets the single-pass plan instead.
    """
    if layout == PLANES and _pow2(N) * _pow2(S) <= single_tile_max:
        bn, bs = _pow2(N), _pow2(S)
        return Plan(PLANES, N, C, S, bn, bs, 1, 1, single_warps, single=True)
    if layout == ROWS:
        R = N * S
        block_c = min(_pow2(C), 128)
        block_r = max(1, min(tile // block_c, _pow2(R)))
        row_tiles = _cdiv(R, block_r)
        want = max(1, min(row_tiles, _cdiv(target_programs, _cdiv(C, block_c))))
        per_split = _cdiv(row_tiles, want)
        return Plan(ROWS, N, C, S, block_r, block_c, per_split, _cdiv(row_tiles, per_split), num_warps)
    if layout != PLANES:
        raise ValueError(f"unknown layout {layout!r}")
    block_s = _spatial_block(S, tile)
    block_n = max(1, min(tile // block_s, _pow2(N)))
    tiles = _cdiv(N, block_n) * _cdiv(S, block_s)
    want = max(1, min(tiles, _cdiv(target_programs, C)))
    per_split = _cdiv(tiles, want)
    return Plan(PLANES, N, C, S, block_n, block_s, per_split, _cdiv(tiles, per_split), num_warps)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return PROGRAMS_PER_SM * _multiprocessors(index)
    return 4  # Triton's CPU interpreter: a few programs, enough to exercise the split reductions


@functools.cache
def _multiprocessors(index: int) -> int:
    # Asked on every launch plan: once per GPU is enough.
    return torch.cuda.get_device_properties(index).multi_processor_count


def layout_of(x: torch.Tensor) -> str | None:
    """The kernel layout that addresses `x` as it is in memory, or None if it needs a copy first."""
    S = math.prod(x.shape[2:])
    if x.is_contiguous():
        return ROWS if S == 1 else PLANES
    if x.movedim(1, -1).is_contiguous():
        return ROWS
    return None


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """`t` laid out as `layout` (a copy only if it is not already)."""
    if layout == PLANES or math.prod(t.shape[2:]) == 1:
        return t.contiguous()
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


# Values per tile and warps per program: the knobs a GPU session tunes (tests shrink TILE to exercise
# many tiles and slices on small inputs).
TILE = 4096
NUM_WARPS = 8
# Largest channel (N * S, padded to powers of two) for the single-pass kernels, and their warps: at 8192
# values and 16 warps the sm_90 build keeps everything in registers (no spills, cuobjdump); 0 disables.
SINGLE_TILE_MAX = 8192
SINGLE_WARPS = 16
# Programs per multiprocessor that the split reductions aim for (more slices: more parallel loads, but
# more partials for the last program of a channel block to combine).
PROGRAMS_PER_SM = 4
# Partials that the last program of a channel block loads per step ([split_block, channels] values).
COMBINE_VALUES = 2048


def _split_block(plan: Plan) -> int:
    channels = plan.block_b if plan.layout == ROWS else 1
    return max(1, min(_pow2(plan.splits), COMBINE_VALUES // channels))


def make_plan(x: torch.Tensor, layout: str) -> Plan:
    return plan_for(
        layout, x.shape[0], x.shape[1], math.prod(x.shape[2:]),
        target_programs=_target_programs(x.device), tile=TILE, num_warps=NUM_WARPS,
        single_tile_max=SINGLE_TILE_MAX, single_warps=SINGLE_WARPS,
    )  # fmt: skip


def _shape_args(plan: Plan) -> tuple[int, ...]:
    return (plan.N, plan.C, plan.S, plan.s_blocks, plan.tiles, plan.per_split)


def _block_args(plan: Plan) -> dict[str, int]:
    return {
        "BLOCK_A": plan.block_a,
        "BLOCK_B": plan.block_b,
        "PLANES": plan.layout == PLANES,
        "num_warps": plan.num_warps,
    }


def _partials(plan: Plan, device: torch.device, count: int) -> list[torch.Tensor]:
    """`count` float32 workspaces of one partial result per (slice, channel), and the channel blocks'
    arrival counters; placeholders when one slice covers a channel (nothing to combine)."""
    if plan.splits == 1:
        placeholder = torch.empty(0, device=device, dtype=torch.float32)
        return [placeholder] * count + [placeholder]
    parts = [torch.empty((plan.splits, plan.C), device=device, dtype=torch.float32) for _ in range(count)]
    return [*parts, _semaphores(device, plan.channel_programs)]


_SEMAPHORES: dict[tuple[int, int], torch.Tensor] = {}


def _semaphores(device: torch.device, count: int) -> torch.Tensor:
    """`count` zeroed int32 arrival counters.

    The last program of each channel block zeroes its counter again, so a buffer is all zeros whenever
    no kernel is running on its stream: one buffer per (GPU, stream) serves every launch on it (kernels
    on one stream never overlap; on two streams they could, hence not one buffer per GPU). A graph being
    captured gets its own buffer (its replays may run on another stream), as does the CPU interpreter.
    """
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return torch.zeros(count, device=device, dtype=torch.int32)
    key = (device.index if device.index is not None else torch.cuda.current_device(),
           torch.cuda.current_stream(device).cuda_stream)  # fmt: skip
    buffer = _SEMAPHORES.get(key)
    if buffer is None or buffer.numel() < count:
        buffer = _SEMAPHORES[key] = torch.zeros(max(count, 1024), device=device, dtype=torch.int32)
    return buffer


# ---- launchers --------------------------------------------------------------------------------------


def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    save_stats: bool = True,
    plan: Plan | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(y, mean, invstd): y in x's layout; mean and invstd float32 per channel, the ones y was computed with.

    `x` (and `residual`) must already be in a kernel layout (see `layout_of`, `to_layout`); in training the
    running statistics, when given, are updated in place (momentum already resolved by the caller). In
    inference, `save_stats=False` (no backward to come) lets the kernel read the running statistics
    directly and returns None for mean and invstd.
    """
    plan = plan or make_plan(x, layout_of(x))
    C = plan.C
    y = torch.empty_like(x)
    mean = torch.empty(C, device=x.device, dtype=torch.float32)
    invstd = torch.empty(C, device=x.device, dtype=torch.float32)
    dummy = mean
    epilogue = dict(
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=relu
    )
    params = (weight if weight is not None else dummy, bias if bias is not None else dummy)
    if training and plan.single:
        has_running = running_mean is not None
        _single_tile_forward_kernel[(C,)](
            x, residual if residual is not None else x, y, mean, invstd,
            running_mean if has_running else dummy, running_var if has_running else dummy, *params,
            plan.N, C, plan.S, eps, momentum,
            BLOCK_N=plan.block_a, BLOCK_S=plan.block_b, HAS_RUNNING=has_running, num_warps=plan.num_warps,
            **epilogue,
        )  # fmt: skip
        return y, mean, invstd
    if training:
        has_running = running_mean is not None
        _stats_kernel[plan.grid](
            x, *_partials(plan, x.device, 3), mean, invstd,
            running_mean if has_running else dummy, running_var if has_running else dummy,
            *_shape_args(plan), eps, momentum,
            SPLIT=plan.splits > 1, SPLIT_BLOCK=_split_block(plan), HAS_RUNNING=has_running, **_block_args(plan),
        )  # fmt: skip
    elif save_stats:
        # The backward must see the very invstd the forward used (it recomputes the ReLU mask from it).
        mean.copy_(running_mean)
        torch.rsqrt(running_var.float() + eps, out=invstd)
    from_running = not training and not save_stats
    stats = (running_mean, running_var) if from_running else (mean, invstd)
    _apply_kernel[plan.grid](
        x, residual if residual is not None else x, y, *stats, *params, *_shape_args(plan), eps,
        FROM_RUNNING=from_running, **epilogue, **_block_args(plan),
    )  # fmt: skip
    return (y, None, None) if from_running else (y, mean, invstd)


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    *,
    training: bool,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    need_input: bool = True,
    need_params: bool = True,
    need_residual: bool = False,
    plan: Plan | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dweight, dbias, dresidual), each None where not needed; dweight/dbias float32.

    `dy` must be in x's layout (see `to_layout`). In training dx needs the per-channel sums, so the
    reduction pass runs whenever dx or a parameter gradient is needed.
    """
    plan = plan or make_plan(x, layout_of(x))
    C = plan.C
    dummy = mean
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=relu)
    tensors = (
        x, residual if residual is not None else x, mean, invstd,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
    )  # fmt: skip
    dweight = dbias = None
    coef = dummy
    if training and plan.single and (need_input or need_params or need_residual):
        dweight = torch.empty(C, device=x.device, dtype=torch.float32)
        dbias = torch.empty(C, device=x.device, dtype=torch.float32)
        dx = torch.empty_like(x) if need_input else None
        dz = torch.empty_like(x) if need_residual and residual is not None else None
        _single_tile_backward_kernel[(C,)](
            dy, x, tensors[1], dx if dx is not None else dy, dz if dz is not None else dy, *tensors[2:],
            dweight, dbias, plan.N, C, plan.S,
            BLOCK_N=plan.block_a, BLOCK_S=plan.block_b, WRITE_DX=dx is not None, WRITE_DZ=dz is not None,
            num_warps=plan.num_warps, **flags,
        )  # fmt: skip
        return dx, (dweight if need_params else None), (dbias if need_params else None), dz
    if need_params or (training and need_input):
        dweight = torch.empty(C, device=x.device, dtype=torch.float32)
        dbias = torch.empty(C, device=x.device, dtype=torch.float32)
        coef = torch.empty(2 * C, device=x.device, dtype=torch.float32)
        _grad_kernel[plan.grid](
            dy, *tensors, *_partials(plan, x.device, 2), dweight, dbias, coef, *_shape_args(plan),
            SPLIT=plan.splits > 1, SPLIT_BLOCK=_split_block(plan), **flags, **_block_args(plan),
        )  # fmt: skip
    dx = torch.empty_like(x) if need_input else None
    dz = torch.empty_like(x) if need_residual and residual is not None else None
    if dx is not None or dz is not None:
        _input_grad_kernel[plan.grid](
            dy, tensors[0], tensors[1], dx if dx is not None else dy, dz if dz is not None else dy, *tensors[2:],
            coef, *_shape_args(plan),
            TRAINING=training, WRITE_DX=dx is not None, WRITE_DZ=dz is not None, **flags, **_block_args(plan),
        )  # fmt: skip
    return dx, (dweight if need_params else None), (dbias if need_params else None), dz
