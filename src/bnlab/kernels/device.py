"""Device code of the Triton kernels for batch norm, optionally fused with ``+ residual`` and ReLU.

Launch planning and the launchers are in `bnlab.kernels.batchnorm`; this module is the arithmetic.

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
and writes one partial result per (slice, channel). The programs that finish last (integer atomic
counters, the only atomics) combine the partials in slice order, in two levels (see the combining
section), and finalize; no float atomics, so results are identical run to run, and no separate
finalize launch (or, the planner's LATE_COMBINE, the last level is left to the elementwise kernel that
follows, each of whose programs combines its channels' rows at its start: `_late_stats`,
`_late_coefficients`). When one slice covers the whole channel the program finalizes directly. Each
program's sums are shifted by the mean of its first tile (the pivot), so that a large common offset
(1e4 + N(0, 1)) never enters a rounded sum of squares; the programs' (count, mean, M2), their means
relative to the channel's first value (digits kept near a large offset), are combined with Chan et
al.'s pairwise update, which has no E[x^2] - E[x]^2 cancellation.

Two ways to run a training direction (the planner in `batchnorm` picks one per call):
- split (two launches): a reduction kernel (statistics, or the gradient sums) whose last program per
  channel block finalizes (see "combining" below), then an elementwise kernel (normalize, or dx). Reads
  the input twice. When the residual's gradient is wanted, the gradient sums write it (dz = g) and dx
  reads g (as dy, with no residual and no ReLU) instead of dy, the residual and the recomputed mask.
- single tile (one launch, planes only): a channel fits one program's registers; read once.
(A third way, persistent kernels that kept a round of channel blocks in L2 for the second read, was
removed in session 13: slower than the split plans on every shape timed on an H200, benchmarks/NOTES.md.)

Layouts. A tensor of shape (N, C, *spatial), S = prod(spatial), is addressed in one of two ways:
- "rows": channels contiguous, value (r, c) at r * C + c with r in [0, N * S): channels-last 2-D/3-D
  tensors, (N, C) matrices (BatchNorm1d), and (N, C, L) with C contiguous. Tiles are [BLOCK_R, BLOCK_C].
- "planes": NCHW-contiguous, value (n, c, s) at (n * C + c) * S + s. One channel per program, tiles of
  [BLOCK_N, BLOCK_S] values of that channel. Packed planes, for short runs that are not 16-value
  aligned (7x7, 14x14, ...): a power-of-two block of lanes would idle up to half of them on each run
  (49 of 64), and such runs load one value per instruction anyway; so a tile is one row of BLOCK_B
  lanes holding the runs of BLOCK_B // S consecutive samples side by side (98% of the lanes busy at 7x7).
  Grouped planes, for the same runs when C is a multiple of 8 (preferred to packing): a program takes a
  group of 16 (or 8) channels, whose runs in one sample are one contiguous span, 16-byte aligned when
  C % 16 == 0 (16 x 49 values at 7x7): tiles of [samples, span padded to a power of two] load 8 bf16
  values per instruction (77% of lanes busy, yet about half the instructions per value of packed
  tiles). Per-channel vectors have the group's 16 (or 8) entries; `_spread` gathers them to the lanes,
  `_channel_sum` is a segmented scan over the lanes read at the runs' ends (or, the reductions' GATHER_SUMS,
  the lanes gathered into one padded row a channel and summed along the rows).
The kernels' PLANES constexpr says which: 0 rows, 1 planes, 2 packed planes, 3 and 4 grouped planes
(16 and 8 channels a group); all but 0 are truthy.
Other strides are made contiguous first (a copy, documented in the backend).
Ghost batches (ghost BN: the split kernels' GHOSTS constexpr, > 1): each of the input's GHOSTS
consecutive chunks of samples has statistics of its own, addressed where it lies, as if the chunks lay
side by side as GHOSTS * C channels (`_tile`, `_channels`, `_anchor`); GHOSTS == 1 compiles to the
code above unchanged (session 20: the PTX of every variant sampled, debug lines aside, identical).
"""

from __future__ import annotations

import triton
import triton.language as tl

from bnlab import kernels as _package

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
def _residual(z_ptr, offs, mask, x, HAS_RESIDUAL: tl.constexpr, EVICT: tl.constexpr):
    """The residual's tile in float32 (x stands in when there is none: never used then); EVICT: the load's
    eviction policy (`_normalize`)."""
    if HAS_RESIDUAL:
        return tl.load(z_ptr + offs, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
    return x


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


# Channels a grouped-planes program takes: GROUPS[PLANES - 3] (the planner, bnlab.kernels.batchnorm, picks
# from the same tuple). Constant group sizes let the compiler prove the runs' 16-byte alignment.
GROUPS = (16, 8)


@triton.constexpr_function
def _group_width(planes):
    return GROUPS[planes - 3]


@triton.jit
def _group(pid_c, S, PLANES: tl.constexpr):
    """Grouped planes: (first channel, values per sample) of program pid_c's group of channels."""
    G: tl.constexpr = _group_width(PLANES)
    return pid_c * G, G * S


@triton.jit
def _channels(pid_c, C, BLOCK_B: tl.constexpr, PLANES: tl.constexpr, GHOSTS: tl.constexpr):
    """The channels of a program: one (planes), a block of BLOCK_B (rows) or a group (grouped planes); and
    which of them exist. Rows of GHOSTS > 1 ghost batches: each ghost's C // GHOSTS channels in blocks of
    their own (`_ghost_block`), so that no block straddles two ghosts."""
    if PLANES >= 3:
        G: tl.constexpr = _group_width(PLANES)
        cols = pid_c * G + tl.arange(0, G)
        cmask = cols < C
    elif PLANES:
        cols = pid_c + tl.arange(0, 1)
        cmask = cols < C
    elif GHOSTS > 1:
        j, first = _ghost_block(pid_c, C, BLOCK_B, GHOSTS)
        lanes = first + tl.arange(0, BLOCK_B)
        cols = j * (C // GHOSTS) + lanes
        cmask = lanes < C // GHOSTS
    else:
        cols = pid_c * BLOCK_B + tl.arange(0, BLOCK_B)
        cmask = cols < C
    return cols, cmask


@triton.jit
def _ghost_block(pid_c, C, BLOCK_B: tl.constexpr, GHOSTS: tl.constexpr):
    """Rows of ghost batches: (ghost, its first channel) of channel block pid_c; each ghost's C // GHOSTS
    channels take cdiv(C // GHOSTS, BLOCK_B) blocks."""
    per_ghost = tl.cdiv(C // GHOSTS, BLOCK_B)
    j = pid_c // per_ghost
    return j, (pid_c - j * per_ghost) * BLOCK_B


@triton.jit
def _ghost_of(c, C, GHOSTS: tl.constexpr):
    """Ghost batches: (ghost, its channel) of channel c (a scalar or a vector) of C // GHOSTS a ghost."""
    j = c // (C // GHOSTS)
    return j, c - j * (C // GHOSTS)


@triton.jit
def _ghost_start(j, c, N, S, CG, stride):
    """Ghost batches: where channel c of ghost j begins (its sample j * N, position 0) in the tensor as it
    lies, (GHOSTS * N, CG, S), int64; `stride` between channels: S (planes) or 1 (rows)."""
    return j.to(tl.int64) * N * S * CG + c * stride


@triton.jit
def _samples_per_tile(S, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PLANES: tl.constexpr):
    """Planes: samples a tile covers (packed: as many whole runs of S values as fit in BLOCK_B lanes)."""
    if PLANES == 2:
        return BLOCK_B // S
    return BLOCK_A


@triton.jit
def _tile(
    i, pid_c, N, C, S, S_BLOCKS, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PLANES: tl.constexpr,
    GHOSTS: tl.constexpr,
):  # fmt: skip
    """(base, offsets, mask) of a program's tile i: its values are at base + offsets (base: a 64-bit
    scalar; offsets: int32, relative to it, the same for every tile, so the compiler computes them once
    per program and each pointer costs one or two instructions per value instead of a 64-bit
    multiply-add; the planner keeps them below 2**31).

    rows:   rows [i * BLOCK_A, +BLOCK_A) of the (N * S, C) matrix, channels [pid_c * BLOCK_B, +BLOCK_B).
    planes: channel pid_c; tile i in (n-block, s-block) order covers n in [nb * BLOCK_A, +BLOCK_A) and
            s in [sb * BLOCK_B, +BLOCK_B).
    packed planes (PLANES == 2; BLOCK_A == 1, S_BLOCKS == 1): the runs of S values of BLOCK_B // S
            consecutive samples side by side in one row of BLOCK_B lanes (see the module doc).
    grouped planes (PLANES 3, 4; S_BLOCKS == 1): samples [nb * BLOCK_A, +BLOCK_A), each a span of the
            group's runs (G * S values from channel G * pid_c on).
    GHOSTS > 1 ghost batches (ghost BN without a copy): the tensor in memory is (GHOSTS * N, C // GHOSTS,
            S), and channel j * (C // GHOSTS) + c is channel c of samples [j * N, +N), ghost j's: N is a
            ghost's samples, C all ghosts' channels (as in the statistics), the addresses the tensor's.
    """
    a = tl.arange(0, BLOCK_A)
    b = tl.arange(0, BLOCK_B)
    if PLANES:
        nb = i // S_BLOCKS
        sb = i - nb * S_BLOCKS
        samples = _samples_per_tile(S, BLOCK_A, BLOCK_B, PLANES)
        n0 = nb * samples
        s0 = sb * BLOCK_B
        if PLANES >= 3:  # a sample's runs of the group's channels: one contiguous, aligned span
            c0, width = _group(pid_c, S, PLANES)
        else:
            c0, width = pid_c, S - s0
        if GHOSTS > 1:  # (a group never straddles two ghosts: the planner's groups divide C // GHOSTS)
            CG = C // GHOSTS
            j, c = _ghost_of(c0, C, GHOSTS)
            stride = CG * S
            base = _ghost_start(j, c, N, S, CG, S) + n0.to(tl.int64) * stride + s0
        else:
            base = (n0.to(tl.int64) * C + c0) * S + s0
            stride = C * S
        if PLANES == 2:
            n = b // S  # lane -> (sample, position): computed once per program, like all the offsets
            offs = (n * stride + (b - n * S))[None, :]
            mask = (n < tl.minimum(samples, N - n0))[None, :]
        else:
            offs = (a * stride)[:, None] + b[None, :]
            mask = (a < N - n0)[:, None] & (b < width)[None, :]
    else:
        r0 = i * BLOCK_A
        if GHOSTS > 1:
            CG = C // GHOSTS
            j, c0 = _ghost_block(pid_c, C, BLOCK_B, GHOSTS)
            base = _ghost_start(j, c0, N, S, CG, 1) + r0.to(tl.int64) * CG
            offs = (a * CG)[:, None] + b[None, :]
            mask = (a < N * S - r0)[:, None] & (b < CG - c0)[None, :]
        else:
            c0 = pid_c * BLOCK_B
            base = r0.to(tl.int64) * C + c0
            offs = (a * C)[:, None] + b[None, :]
            mask = (a < N * S - r0)[:, None] & (b < C - c0)[None, :]
    return base, offs, mask


@triton.jit
def _tile_count(i, N, S, S_BLOCKS, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PLANES: tl.constexpr):
    """How many values of each of its channels tile i holds (a scalar: counting a mask per value costs
    the statistics loop two instructions per value)."""
    if PLANES:
        nb = i // S_BLOCKS
        sb = i - nb * S_BLOCKS
        samples = _samples_per_tile(S, BLOCK_A, BLOCK_B, PLANES)
        if PLANES == 2:
            return tl.minimum(N - nb * samples, samples) * S
        return tl.minimum(N - nb * samples, samples) * tl.minimum(S - sb * BLOCK_B, BLOCK_B)
    return tl.minimum(N * S - i * BLOCK_A, BLOCK_A)


@triton.jit
def _spread(v, S, BLOCK_B: tl.constexpr, PLANES: tl.constexpr):
    """A per-channel vector shaped to broadcast against the program's tiles (grouped planes: each lane
    gets its channel's value)."""
    if PLANES == 1 or PLANES == 2:
        return v[:, None]
    elif PLANES >= 3:
        lane = tl.arange(0, BLOCK_B)
        return tl.gather(v, tl.minimum(lane // S, v.shape[0] - 1), 0)[None, :]
    else:
        return v[None, :]


@triton.jit
def _segment_add(a, start_a, b, start_b):
    """Segmented sum for an inclusive scan: a lane that starts a run starts its sum afresh."""
    return tl.where(start_b, b, a + b), start_a | start_b


@triton.jit
def _channel_sum(t, S, PLANES: tl.constexpr, GATHER_SUMS: tl.constexpr):
    """Sum a tile per channel: over both axes (planes: one channel), over rows (rows), or over rows and
    then over each channel's run of S lanes (grouped planes). Grouped, two ways: a segmented scan over
    the lanes read at the runs' ends; or (GATHER_SUMS) the lanes regathered as [channels, W] (W =
    BLOCK_B / channels >= S: channel c's run in row c, padded) and summed along the rows. The scan is
    log2(BLOCK_B) rounds of shuffles of (value, flag) pairs; the gather is one trip through shared memory
    and a plain reduction (sm_90, Triton 3.6: the statistics kernel of NCHW 14x14 had ~3500 instructions
    outside its loop, three such sums among them, against ~250 a loop iteration: see benchmarks/NOTES.md)."""
    if PLANES == 1 or PLANES == 2:
        return tl.sum(tl.sum(t, axis=1), axis=0)
    elif PLANES >= 3:
        lanes = tl.sum(t, axis=0)
        if GATHER_SUMS:
            G: tl.constexpr = _group_width(PLANES)
            W: tl.constexpr = t.shape[1] // G
            j = tl.arange(0, W)[None, :]
            at = tl.minimum(tl.arange(0, G)[:, None] * S + j, t.shape[1] - 1)  # (lanes past a run: masked)
            rows = tl.reshape(tl.gather(lanes, tl.reshape(at, [G * W]), 0), [G, W])
            return tl.sum(tl.where(j < S, rows, 0.0), axis=1)
        lane = tl.arange(0, t.shape[1])
        runs, _ = tl.associative_scan((lanes, lane % S == 0), 0, _segment_add)
        ends = tl.arange(0, _group_width(PLANES)) * S + S - 1
        return tl.gather(runs, tl.minimum(ends, t.shape[1] - 1), 0)
    else:
        return tl.sum(t, axis=0)


@triton.jit
def _slice(pid_s, TILES, tiles_per_split):
    start = pid_s * tiles_per_split
    return start, tl.minimum(start + tiles_per_split, TILES)


# ---- combining the programs of a channel block ---------------------------------------------------------
# Each of the K programs of a channel block writes its partial to row `split` of (row, channel)
# workspaces of K + G rows. They finish in groups of SPLIT_BLOCK (G groups): the last member of a group
# to arrive combines the group's rows into row K + g, and the last group to finish combines the G group
# rows: two short steps on the critical path instead of one long loop over K partials. Every combine
# runs in row order, so the result does not depend on who finishes when (deterministic). With LATE the
# reduction stops after the groups (or, with one group, before any combine) and the elementwise programs
# combine the rows left (`_late_stats`, `_late_coefficients`), in row order too: the reduction ends with
# its groups' rows written (with one group, with its partials), its finalize moved to the next kernel.
# sem_ptr holds int32 counters, zero whenever no kernel runs: [0, U) per channel block (U = channel
# blocks), then G per block for the groups.


@triton.jit
def _arrive(counter_ptr, expected):
    """Count this program in; True for the last of `expected`, who also zeroes the counter for the next
    launch. The barrier makes every thread's stores precede the release; the acquire makes the others'
    stores visible to the last one, which reads them with .cg loads (L2, never a stale L1). The zeroing is
    a plain store (session 27; it was an acq_rel exchange): nothing in this launch touches the counter
    after its last arrival, and the launch's end orders the store before the next launch's atomics. The
    exchange cost each combine level's critical path a fence, an atomic from every thread and an L1
    invalidation (sm_90 machine code, Triton 3.6: one predicated store now)."""
    tl.debug_barrier()
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel") == expected - 1
    if last:
        tl.store(counter_ptr, 0)
    return last


@triton.jit
def _reduce_rows(p0, p1, p2, start, end, cols, cmask, C, SPLIT_BLOCK: tl.constexpr, CHAN: tl.constexpr):
    """Rows [start, end) of the workspaces combined in row order: Chan's update of (count, mean, M2)
    (CHAN), or sums of the first two (the third is unused)."""
    a = tl.zeros(cols.shape, tl.float32)
    b = tl.zeros(cols.shape, tl.float32)
    c = tl.zeros(cols.shape, tl.float32)
    for s0 in range(start, end, SPLIT_BLOCK):
        s = s0 + tl.arange(0, SPLIT_BLOCK)
        mask = (s < end)[:, None] & cmask[None, :]
        offs = s[:, None] * C + cols[None, :]
        block_a = tl.load(p0 + offs, mask=mask, other=0.0, cache_modifier=".cg")
        block_b = tl.load(p1 + offs, mask=mask, other=0.0, cache_modifier=".cg")
        if CHAN:
            block_c = tl.load(p2 + offs, mask=mask, other=0.0, cache_modifier=".cg")
            a_s, b_s, c_s = tl.reduce((block_a, block_b, block_c), 0, _chan_combine)
            a, b, c = _chan_combine(a, b, c, a_s, b_s, c_s)
        else:
            a += tl.sum(block_a, 0)
            b += tl.sum(block_b, 0)
    return a, b, c


@triton.jit
def _gather(
    p0, p1, p2, sem_ptr, unit, split, UNITS, cols, cmask, C,
    SPLIT_BLOCK: tl.constexpr, CHAN: tl.constexpr, LATE: tl.constexpr,
):  # fmt: skip
    """After this program stored its partial in row `split`: (done, a, b, c), done for the one program
    that ends up holding the channel block's combined result (a, b, c); see the section comment. LATE:
    the last level is left to the elementwise pass (`_late_stats`, `_late_coefficients`): the groups'
    rows are written and no program is done; with a single group nothing is combined here at all."""
    splits = tl.num_programs(1)
    groups = tl.cdiv(splits, SPLIT_BLOCK)
    group = split // SPLIT_BLOCK
    first = group * SPLIT_BLOCK
    members = tl.minimum(splits - first, SPLIT_BLOCK)
    done = split < 0  # False, as a tensor that the branches below may replace
    a = tl.zeros(cols.shape, tl.float32)
    b = tl.zeros(cols.shape, tl.float32)
    c = tl.zeros(cols.shape, tl.float32)
    if LATE:
        grouped = groups > 1
    else:
        grouped = split >= 0  # (True)
    if grouped:
        if _arrive(sem_ptr + UNITS + unit * groups + group, members):
            a, b, c = _reduce_rows(p0, p1, p2, first, first + members, cols, cmask, C, SPLIT_BLOCK, CHAN)
            if groups == 1:
                done = split >= 0
            else:
                row = (splits + group) * C + cols
                tl.store(p0 + row, a, mask=cmask)
                tl.store(p1 + row, b, mask=cmask)
                if CHAN:
                    tl.store(p2 + row, c, mask=cmask)
                if not LATE:
                    if _arrive(sem_ptr + unit, groups):
                        a, b, c = _reduce_rows(p0, p1, p2, splits, splits + groups, cols, cmask, C, SPLIT_BLOCK, CHAN)
                        done = split >= 0
    return done, a, b, c


# ---- statistics -----------------------------------------------------------------------------------------


@triton.jit
def _anchor(x_ptr, cols, cmask, N, C, S, PLANES: tl.constexpr, GHOSTS: tl.constexpr):
    """The channel's first value: partial means are stored relative to it (see module doc; ghosts: the
    first of the channel's ghost, see `_tile`)."""
    stride = S if PLANES else 1
    if GHOSTS > 1:
        j, c = _ghost_of(cols, C, GHOSTS)
        first = _ghost_start(j, c, N, S, C // GHOSTS, stride)
        return tl.load(x_ptr + first, mask=cmask, other=0.0).to(tl.float32)
    return tl.load(x_ptr + cols.to(tl.int64) * stride, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def _tile_values(x_ptr, t, t_end, unit, N, C, S, S_BLOCKS, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                 PLANES: tl.constexpr, GHOSTS: tl.constexpr):  # fmt: skip
    """Tile t's values as stored (not converted), or zeros where t is past the slice (t_end): a
    prefetch's load, which must not read the next slice's tile."""
    base, offs, mask = _tile(t, unit, N, C, S, S_BLOCKS, BLOCK_A, BLOCK_B, PLANES, GHOSTS)
    # (the bound broadcast first: Triton's interpreter refuses a scalar condition in a tensor mask)
    return tl.load(x_ptr + base + offs, mask=mask & (tl.zeros(mask.shape, tl.int32) + t < t_end), other=0.0)


@triton.jit
def _slice_stats(
    x_ptr, unit, t_start, t_end, anchor, N, C, S, S_BLOCKS,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PLANES: tl.constexpr, STAGES: tl.constexpr,
    GATHER_SUMS: tl.constexpr, PREFETCH: tl.constexpr, GHOSTS: tl.constexpr,
):  # fmt: skip
    """(count, mean relative to `anchor`, M2) per channel over the unit's tiles [t_start, t_end), t_start < t_end.

    Sums per lane, shifted by the first tile's mean (the pivot); one reduction across lanes at the end.
    STAGES > 1: the loop's loads are software-pipelined through shared memory (`tl.range`'s num_stages).
    PREFETCH (with STAGES 1): the next tile's load is issued before the current tile's arithmetic, in
    registers (double-buffered, as stored: bf16 costs half the registers of its float32 values), so that
    two loads of a program are in flight, not one; the second tile's load also overlaps the pivot's sum.
    """
    base, offs, mask = _tile(t_start, unit, N, C, S, S_BLOCKS, BLOCK_A, BLOCK_B, PLANES, GHOSTS)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if PREFETCH:
        ahead = _tile_values(x_ptr, t_start + 1, t_end, unit, N, C, S, S_BLOCKS, BLOCK_A, BLOCK_B, PLANES, GHOSTS)
    count = _tile_count(t_start, N, S, S_BLOCKS, BLOCK_A, BLOCK_B, PLANES)
    # (planes: the scalar sum, shaped like the anchor to broadcast over the tiles)
    pivot = _channel_sum(x, S, PLANES, GATHER_SUMS) / count.to(tl.float32) + tl.zeros_like(anchor)
    shift = _spread(pivot, S, BLOCK_B, PLANES)
    d = tl.where(mask, x - shift, 0.0)
    s1, s2 = d, d * d
    for t in tl.range(t_start + 1, t_end, num_stages=STAGES):
        base, offs, mask = _tile(t, unit, N, C, S, S_BLOCKS, BLOCK_A, BLOCK_B, PLANES, GHOSTS)
        if PREFETCH:
            x = ahead.to(tl.float32)
            ahead = _tile_values(x_ptr, t + 1, t_end, unit, N, C, S, S_BLOCKS, BLOCK_A, BLOCK_B, PLANES, GHOSTS)
        else:
            x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - shift, 0.0)
        count += _tile_count(t, N, S, S_BLOCKS, BLOCK_A, BLOCK_B, PLANES)
        s1 += d
        s2 += d * d
    n = count.to(tl.float32) + tl.zeros_like(anchor)
    total = _channel_sum(s1, S, PLANES, GATHER_SUMS)
    shifted_mean = total / tl.maximum(n, 1.0)
    m2 = _channel_sum(s2, S, PLANES, GATHER_SUMS) - shifted_mean * total
    m2 = tl.where(m2 < 0.0, 0.0, m2)  # rounding can go below 0; a NaN (bad input) must stay NaN
    # Relative to the channel's first value, so that partial means near a large offset keep their digits.
    return n, (pivot - anchor) + shifted_mean, m2


@triton.jit
def _store_stats_partials(pn_ptr, pmean_ptr, pm2_ptr, split, C, cols, cmask, n, rel_mean, m2):
    tl.store(pn_ptr + split * C + cols, n, mask=cmask)
    tl.store(pmean_ptr + split * C + cols, rel_mean, mask=cmask)
    tl.store(pm2_ptr + split * C + cols, m2, mask=cmask)


@triton.jit
def _mean_invstd(n, rel_mean, m2, anchor, eps):
    """A channel's (mean, invstd) from its combined (count, mean relative to `anchor`, M2)."""
    var = m2 / tl.maximum(n, 1.0)  # n is 0 only in padding lanes past C, whose stores are masked
    return anchor + rel_mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _finalize_stats(
    n, rel_mean, m2, anchor, cols, cmask, eps, momentum,
    mean_out, invstd_out, rmean_ptr, rvar_ptr, rmean_out, rvar_out, HAS_RUNNING: tl.constexpr,
):  # fmt: skip
    mean, invstd = _mean_invstd(n, rel_mean, m2, anchor, eps)
    _store_stats(mean, invstd, n, m2, cols, cmask, momentum, mean_out, invstd_out, rmean_ptr, rvar_ptr, rmean_out,
                 rvar_out, HAS_RUNNING)  # fmt: skip


@triton.jit
def _store_stats(
    mean, invstd, n, m2, cols, cmask, momentum, mean_out, invstd_out, rmean_ptr, rvar_ptr, rmean_out, rvar_out,
    HAS_RUNNING: tl.constexpr,
):  # fmt: skip
    """Store the batch statistics (for the backward) and the updated running ones: in place (rmean_out is
    rmean_ptr), or into scratch that `_guard_kernel` commits if every channel's is finite."""
    tl.store(mean_out + cols, mean, mask=cmask)
    tl.store(invstd_out + cols, invstd, mask=cmask)
    if HAS_RUNNING:
        rm = tl.load(rmean_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        rv = tl.load(rvar_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        unbiased = m2 / tl.maximum(n - 1.0, 1.0)
        tl.store(rmean_out + cols, (rm + momentum * (mean - rm)).to(rmean_out.dtype.element_ty), mask=cmask)
        tl.store(rvar_out + cols, (rv + momentum * (unbiased - rv)).to(rvar_out.dtype.element_ty), mask=cmask)


@triton.jit
def _load_stats(mean_ptr, invstd_ptr, cols, cmask, eps, FROM_RUNNING: tl.constexpr):
    """Per-channel mean and invstd: saved batch statistics, or running mean and variance (inference).

    .cg loads (L2, not L1): from the persistent kernels (removed in session 13), where another program of
    the same launch wrote them; kept, so that the split kernels' machine code stays as measured.
    """
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0, cache_modifier=".cg").to(tl.float32)
    if FROM_RUNNING:
        var = tl.load(invstd_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
        invstd = 1.0 / tl.sqrt(var + eps)
    else:
        invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0, cache_modifier=".cg")
    return mean, invstd


@triton.jit
def _late_stats(
    x_ptr, pn_ptr, pmean_ptr, pm2_ptr, first_row, rows, split, cols, cmask, N, C, S, eps, momentum,
    mean_out, invstd_out, rmean_ptr, rvar_ptr, rmean_out, rvar_out,
    PLANES: tl.constexpr, COMBINE_BLOCK: tl.constexpr, HAS_RUNNING: tl.constexpr, GHOSTS: tl.constexpr,
):  # fmt: skip
    """LATE: (mean, invstd) of the program's channels from the statistics' partial rows [first_row, +rows)
    (the slices' own, or their groups'), combined in row order, COMBINE_BLOCK rows a step: what the
    statistics' last program would have done (see `_gather`). Every program of a channel computes the
    same values; its slice 0 also stores them (for the backward) and updates the running statistics."""
    anchor = _anchor(x_ptr, cols, cmask, N, C, S, PLANES, GHOSTS)
    n, rel_mean, m2 = _reduce_rows(
        pn_ptr, pmean_ptr, pm2_ptr, first_row, first_row + rows, cols, cmask, C, COMBINE_BLOCK, True
    )
    mean, invstd = _mean_invstd(n, rel_mean, m2, anchor, eps)
    if split == 0:
        _store_stats(mean, invstd, n, m2, cols, cmask, momentum, mean_out, invstd_out, rmean_ptr, rvar_ptr, rmean_out,
                     rvar_out, HAS_RUNNING)  # fmt: skip
    return mean, invstd


@triton.jit
def _normalizer(
    mean_ptr, invstd_ptr, w_ptr, b_ptr, cols, cmask, eps, S, BLOCK_B: tl.constexpr,
    PLANES: tl.constexpr, FROM_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """invstd per channel, and shaped for the tiles: mean, scale = invstd * weight, shift = bias."""
    mean, invstd = _load_stats(mean_ptr, invstd_ptr, cols, cmask, eps, FROM_RUNNING)
    return _normalizer_of(mean, invstd, w_ptr, b_ptr, cols, cmask, S, BLOCK_B, PLANES, HAS_WEIGHT, HAS_BIAS)


@triton.jit
def _normalizer_of(
    mean, invstd, w_ptr, b_ptr, cols, cmask, S, BLOCK_B: tl.constexpr,
    PLANES: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """`_normalizer` for a mean and invstd at hand."""
    w, shift = _channel_params(w_ptr, b_ptr, cols, cmask, HAS_WEIGHT, HAS_BIAS)
    return (
        invstd,
        _spread(mean, S, BLOCK_B, PLANES),
        _spread(invstd * w, S, BLOCK_B, PLANES),
        _spread(shift, S, BLOCK_B, PLANES),
    )


@triton.jit
def _backwards(i, t_start, t_end):
    """Tile i of a second pass, counted from the end: the tiles a first pass read last are the likeliest
    to be still in L2, so a second pass over the same values starts with them."""
    return t_end - 1 - (i - t_start)


@triton.jit
def _second_pass_program():
    """(channel block, slice) of an elementwise program, in the reverse of launch order: the programs
    launched first take the values that the previous launch's last programs read (see `_backwards`)."""
    return tl.num_programs(0) - 1 - tl.program_id(0), tl.num_programs(1) - 1 - tl.program_id(1)


@triton.jit
def _apply_slice(
    x_ptr, z_ptr, y_ptr, unit, t_start, t_end, mean, scale, shift, N, C, S, S_BLOCKS,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PLANES: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, STAGES: tl.constexpr, EVICT: tl.constexpr, GHOSTS: tl.constexpr,
):  # fmt: skip
    """y over the unit's tiles [t_start, t_end), last first (`_backwards`); STAGES > 1: the loads
    software-pipelined, as in `_slice_stats`; EVICT as in `_normalize`."""
    for i in tl.range(t_start, t_end, num_stages=STAGES):
        base, offs, mask = _tile(
            _backwards(i, t_start, t_end), unit, N, C, S, S_BLOCKS, BLOCK_A, BLOCK_B, PLANES, GHOSTS
        )
        _normalize(x_ptr + base, z_ptr + base, y_ptr + base, offs, mask, mean, scale, shift, HAS_RESIDUAL, RELU, EVICT)


@triton.jit
def _normalize(
    x_ptr, z_ptr, y_ptr, offs, mask, mean, scale, shift, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    EVICT: tl.constexpr,
):  # fmt: skip
    """y = the pre-activation (ReLU'd) at `offs` from the pointers (a tile's base already added). EVICT:
    the inputs' loads' eviction policy ("" or "evict_first": a second pass's last read of them, whose lines
    may then leave L2 before those it has yet to read; the SECOND_READ_EVICTION knob)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
    z = _residual(z_ptr, offs, mask, x, HAS_RESIDUAL, EVICT)
    p = _pre_activation(x, mean, scale, shift, z, HAS_RESIDUAL)
    if RELU:
        p = tl.maximum(p, 0.0)
    tl.store(y_ptr + offs, p.to(y_ptr.dtype.element_ty), mask=mask)


# ---- gradients ------------------------------------------------------------------------------------------


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
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, EVICT: tl.constexpr, GHOSTS: tl.constexpr,
):  # fmt: skip
    """Tile t's base, offsets and mask (see `_tile`), x and g (dy through the recomputed ReLU mask), float32;
    EVICT as in `_normalize`."""
    base, offs, mask = _tile(t, pid_c, N, C, S, S_BLOCKS, BLOCK_A, BLOCK_B, PLANES, GHOSTS)
    x, g = _grad_values(
        dy_ptr + base, x_ptr + base, z_ptr + base, offs, mask, mean, scale, shift, HAS_RESIDUAL, RELU, EVICT
    )
    return base, offs, mask, x, g


@triton.jit
def _grad_values(
    dy_ptr, x_ptr, z_ptr, offs, mask, mean, scale, shift, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    EVICT: tl.constexpr,
):  # fmt: skip
    """x and g (dy through the recomputed ReLU mask) at `offs` from the pointers, float32; EVICT as in
    `_normalize`."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
    z = _residual(z_ptr, offs, mask, x, HAS_RESIDUAL, EVICT)
    return x, _masked_grad(dy, x, z, mean, scale, shift, HAS_RESIDUAL, RELU)


@triton.jit
def _slice_grad_sums(
    dy_ptr, x_ptr, z_ptr, dz_ptr, unit, t_start, t_end, mean, scale, shift, N, C, S, S_BLOCKS,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PLANES: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, WRITE_DZ: tl.constexpr, STAGES: tl.constexpr,
    GATHER_SUMS: tl.constexpr, GHOSTS: tl.constexpr,
):  # fmt: skip
    """(sum g, sum g * (x - mean)) per channel over the unit's tiles [t_start, t_end): per lane, then across;
    the loop's loads software-pipelined over STAGES tiles (see `_slice_stats`). WRITE_DZ: also stores
    dz = g, the residual's gradient, so that dx can read g instead of dy, z and the mask (see the
    split backward in `batchnorm.backward`)."""
    sum_g = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    sum_gc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    for t in tl.range(t_start, t_end, num_stages=STAGES):  # g is 0 in masked lanes (dy loads as 0 there)
        base, offs, mask, x, g = _grad_tile(
            t, unit, dy_ptr, x_ptr, z_ptr, mean, scale, shift, N, C, S, S_BLOCKS,
            BLOCK_A, BLOCK_B, PLANES, HAS_RESIDUAL, RELU, "", GHOSTS,
        )  # fmt: skip
        if WRITE_DZ:
            tl.store(dz_ptr + base + offs, g.to(dz_ptr.dtype.element_ty), mask=mask)
        sum_g += g
        sum_gc += g * (x - mean)
    return _channel_sum(sum_g, S, PLANES, GATHER_SUMS), _channel_sum(sum_gc, S, PLANES, GATHER_SUMS)


@triton.jit
def _grad_coefficients(sum_g, sum_gc, n, invstd):
    """(dweight, k1, k2) from a channel's gradient sums: dx = weight * invstd * (g - k1 - (x - mean) * k2),
    k1 = mean of g, k2 = invstd * mean of g * x_hat."""
    dweight = sum_gc * invstd
    return dweight, sum_g / n, dweight * invstd / n


@triton.jit
def _finalize_grads(sum_g, sum_gc, n, cols, cmask, invstd, dw_ptr, db_ptr, coef_ptr, C):
    dweight, k1, k2 = _grad_coefficients(sum_g, sum_gc, n, invstd)
    tl.store(dw_ptr + cols, dweight, mask=cmask)
    tl.store(db_ptr + cols, sum_g, mask=cmask)
    tl.store(coef_ptr + cols, k1, mask=cmask)
    tl.store(coef_ptr + C + cols, k2, mask=cmask)


@triton.jit
def _late_coefficients(
    psum_ptr, psumc_ptr, first_row, rows, split, cols, cmask, C, S, n, invstd, dw_ptr, db_ptr,
    BLOCK_B: tl.constexpr, PLANES: tl.constexpr, COMBINE_BLOCK: tl.constexpr,
):  # fmt: skip
    """LATE: `_coefficients`' (k1, k2), shaped for the tiles, from the gradient sums' partial rows
    [first_row, +rows) (see `_late_stats`); slice 0 of each channel block also stores dweight and dbias."""
    sum_g, sum_gc, _ = _reduce_rows(
        psum_ptr, psumc_ptr, psumc_ptr, first_row, first_row + rows, cols, cmask, C, COMBINE_BLOCK, False
    )
    dweight, k1, k2 = _grad_coefficients(sum_g, sum_gc, n, invstd)
    if split == 0:
        tl.store(dw_ptr + cols, dweight, mask=cmask)
        tl.store(db_ptr + cols, sum_g, mask=cmask)
    return _spread(k1, S, BLOCK_B, PLANES), _spread(k2, S, BLOCK_B, PLANES)


@triton.jit
def _coefficients(coef_ptr, cols, cmask, C, S, BLOCK_B: tl.constexpr, PLANES: tl.constexpr):
    """(k1, k2) of `_finalize_grads`, shaped for the tiles (.cg loads: see `_load_stats`)."""
    k1 = tl.load(coef_ptr + cols, mask=cmask, other=0.0, cache_modifier=".cg")
    k2 = tl.load(coef_ptr + C + cols, mask=cmask, other=0.0, cache_modifier=".cg")
    return _spread(k1, S, BLOCK_B, PLANES), _spread(k2, S, BLOCK_B, PLANES)


@triton.jit
def _dx(g, x, mean, scale, k1, k2, TRAINING: tl.constexpr):
    """scale * (g - k1 - (x - mean) * k2), as two fused multiply-adds after x - mean (the per-channel
    products are the same for every tile: computed once per program)."""
    if TRAINING:
        return g * scale - ((x - mean) * (k2 * scale) + k1 * scale)
    return g * scale


@triton.jit
def _input_grad_slice(
    dy_ptr, x_ptr, z_ptr, dx_ptr, dz_ptr, unit, t_start, t_end, mean, scale, shift, k1, k2, N, C, S, S_BLOCKS,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PLANES: tl.constexpr, TRAINING: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DZ: tl.constexpr,
    STAGES: tl.constexpr, EVICT: tl.constexpr, GHOSTS: tl.constexpr,
):  # fmt: skip
    """dx (and dz) over the unit's tiles, last first; STAGES as in `_apply_slice`, EVICT as in `_normalize`."""
    for i in tl.range(t_start, t_end, num_stages=STAGES):
        base, offs, mask, x, g = _grad_tile(
            _backwards(i, t_start, t_end), unit, dy_ptr, x_ptr, z_ptr, mean, scale, shift, N, C, S, S_BLOCKS,
            BLOCK_A, BLOCK_B, PLANES, HAS_RESIDUAL, RELU, EVICT, GHOSTS,
        )  # fmt: skip
        _store_grads(dx_ptr + base, dz_ptr + base, offs, mask, g, x, mean, scale, k1, k2, TRAINING, WRITE_DX, WRITE_DZ)


@triton.jit
def _store_grads(
    dx_ptr, dz_ptr, offs, mask, g, x, mean, scale, k1, k2,
    TRAINING: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DZ: tl.constexpr,
):  # fmt: skip
    """dz = g and dx (see `_dx`) at `offs` from the pointers, as asked."""
    if WRITE_DZ:
        tl.store(dz_ptr + offs, g.to(dz_ptr.dtype.element_ty), mask=mask)
    if WRITE_DX:
        dx = _dx(g, x, mean, scale, k1, k2, TRAINING)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---- split kernels: grid (channel blocks, slices) ---------------------------------------------------------


@triton.jit
def _stats_kernel(
    x_ptr, pn_ptr, pmean_ptr, pm2_ptr, sem_ptr, mean_out, invstd_out, rmean_ptr, rvar_ptr, rmean_out, rvar_out,
    N, C, S, S_BLOCKS, TILES, tiles_per_split, eps, momentum,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PLANES: tl.constexpr, SPLIT: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr, HAS_RUNNING: tl.constexpr, STAGES: tl.constexpr,
    GATHER_SUMS: tl.constexpr, LATE: tl.constexpr, PREFETCH: tl.constexpr, GHOSTS: tl.constexpr,
):  # fmt: skip
    unit, split = tl.program_id(0), tl.program_id(1)
    t_start, t_end = _slice(split, TILES, tiles_per_split)
    cols, cmask = _channels(unit, C, BLOCK_B, PLANES, GHOSTS)
    anchor = _anchor(x_ptr, cols, cmask, N, C, S, PLANES, GHOSTS)
    n, rel_mean, m2 = _slice_stats(x_ptr, unit, t_start, t_end, anchor, N, C, S, S_BLOCKS, BLOCK_A, BLOCK_B, PLANES,
                                   STAGES, GATHER_SUMS, PREFETCH, GHOSTS)  # fmt: skip
    if SPLIT:
        _store_stats_partials(pn_ptr, pmean_ptr, pm2_ptr, split, C, cols, cmask, n, rel_mean, m2)
        done, n_c, mean_c, m2_c = _gather(
            pn_ptr, pmean_ptr, pm2_ptr, sem_ptr, unit, split, tl.num_programs(0), cols, cmask, C, SPLIT_BLOCK, True,
            LATE,
        )  # fmt: skip
        if done:
            _finalize_stats(n_c, mean_c, m2_c, anchor, cols, cmask, eps, momentum,
                            mean_out, invstd_out, rmean_ptr, rvar_ptr, rmean_out, rvar_out, HAS_RUNNING)  # fmt: skip
    else:
        _finalize_stats(n, rel_mean, m2, anchor, cols, cmask, eps, momentum,
                        mean_out, invstd_out, rmean_ptr, rvar_ptr, rmean_out, rvar_out, HAS_RUNNING)  # fmt: skip


@triton.jit
def _apply_kernel(
    x_ptr, z_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, pn_ptr, pmean_ptr, pm2_ptr, rmean_ptr, rvar_ptr,
    rmean_out, rvar_out, N, C, S, S_BLOCKS, TILES, tiles_per_split, eps, momentum, first_row, rows,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PLANES: tl.constexpr, FROM_RUNNING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    STAGES: tl.constexpr, LATE: tl.constexpr, COMBINE_BLOCK: tl.constexpr,
    HAS_RUNNING: tl.constexpr, EVICT: tl.constexpr, GHOSTS: tl.constexpr,
):  # fmt: skip
    """LATE: the statistics are combined here from their partials (`_late_stats`; mean_ptr and invstd_ptr
    are then outputs); otherwise read (saved, or running ones: FROM_RUNNING). EVICT: see `_normalize`."""
    unit, split = _second_pass_program()
    t_start, t_end = _slice(split, TILES, tiles_per_split)
    cols, cmask = _channels(unit, C, BLOCK_B, PLANES, GHOSTS)
    if LATE:
        mean, invstd = _late_stats(
            x_ptr, pn_ptr, pmean_ptr, pm2_ptr, first_row, rows, split, cols, cmask, N, C, S, eps, momentum,
            mean_ptr, invstd_ptr, rmean_ptr, rvar_ptr, rmean_out, rvar_out, PLANES, COMBINE_BLOCK, HAS_RUNNING,
            GHOSTS,
        )  # fmt: skip
    else:
        mean, invstd = _load_stats(mean_ptr, invstd_ptr, cols, cmask, eps, FROM_RUNNING)
    _, mean, scale, shift = _normalizer_of(mean, invstd, w_ptr, b_ptr, cols, cmask, S, BLOCK_B, PLANES, HAS_WEIGHT,
                                           HAS_BIAS)  # fmt: skip
    _apply_slice(x_ptr, z_ptr, y_ptr, unit, t_start, t_end, mean, scale, shift, N, C, S, S_BLOCKS,
                 BLOCK_A, BLOCK_B, PLANES, HAS_RESIDUAL, RELU, STAGES, EVICT, GHOSTS)  # fmt: skip


@triton.jit
def _grad_kernel(
    dy_ptr, x_ptr, z_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, dz_ptr, psum_ptr, psumc_ptr, sem_ptr, dw_ptr,
    db_ptr, coef_ptr, N, C, S, S_BLOCKS, TILES, tiles_per_split,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PLANES: tl.constexpr, SPLIT: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr, WRITE_DZ: tl.constexpr, STAGES: tl.constexpr,
    GATHER_SUMS: tl.constexpr, LATE: tl.constexpr, GHOSTS: tl.constexpr,
):  # fmt: skip
    unit, split = tl.program_id(0), tl.program_id(1)
    t_start, t_end = _slice(split, TILES, tiles_per_split)
    cols, cmask = _channels(unit, C, BLOCK_B, PLANES, GHOSTS)
    invstd, mean, scale, shift = _normalizer(
        mean_ptr, invstd_ptr, w_ptr, b_ptr, cols, cmask, 0.0, S, BLOCK_B, PLANES, False, HAS_WEIGHT, HAS_BIAS
    )
    sum_g, sum_gc = _slice_grad_sums(dy_ptr, x_ptr, z_ptr, dz_ptr, unit, t_start, t_end, mean, scale, shift,
                                     N, C, S, S_BLOCKS, BLOCK_A, BLOCK_B, PLANES, HAS_RESIDUAL, RELU,
                                     WRITE_DZ, STAGES, GATHER_SUMS, GHOSTS)  # fmt: skip
    count = (N * S).to(tl.float32)
    if SPLIT:
        tl.store(psum_ptr + split * C + cols, sum_g, mask=cmask)
        tl.store(psumc_ptr + split * C + cols, sum_gc, mask=cmask)
        done, all_g, all_gc, _ = _gather(
            psum_ptr, psumc_ptr, psumc_ptr, sem_ptr, unit, split, tl.num_programs(0), cols, cmask, C, SPLIT_BLOCK,
            False, LATE,
        )  # fmt: skip
        if done:
            _finalize_grads(all_g, all_gc, count, cols, cmask, invstd, dw_ptr, db_ptr, coef_ptr, C)
    else:
        _finalize_grads(sum_g, sum_gc, count, cols, cmask, invstd, dw_ptr, db_ptr, coef_ptr, C)


@triton.jit
def _input_grad_kernel(
    dy_ptr, x_ptr, z_ptr, dx_ptr, dz_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, coef_ptr, psum_ptr, psumc_ptr,
    dw_ptr, db_ptr, N, C, S, S_BLOCKS, TILES, tiles_per_split, first_row, rows,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PLANES: tl.constexpr, TRAINING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    WRITE_DX: tl.constexpr, WRITE_DZ: tl.constexpr, STAGES: tl.constexpr,
    LATE: tl.constexpr, COMBINE_BLOCK: tl.constexpr, EVICT: tl.constexpr, GHOSTS: tl.constexpr,
):  # fmt: skip
    """LATE (training): dx's coefficients combined here from the gradient sums' partials
    (`_late_coefficients`, which also stores dweight and dbias); otherwise read from coef_ptr. EVICT: see
    `_normalize`."""
    unit, split = _second_pass_program()
    t_start, t_end = _slice(split, TILES, tiles_per_split)
    cols, cmask = _channels(unit, C, BLOCK_B, PLANES, GHOSTS)
    invstd, mean, scale, shift = _normalizer(
        mean_ptr, invstd_ptr, w_ptr, b_ptr, cols, cmask, 0.0, S, BLOCK_B, PLANES, False, HAS_WEIGHT, HAS_BIAS
    )
    k1 = mean
    k2 = mean
    if LATE:
        count = (N * S).to(tl.float32)
        k1, k2 = _late_coefficients(
            psum_ptr, psumc_ptr, first_row, rows, split, cols, cmask, C, S, count, invstd, dw_ptr, db_ptr,
            BLOCK_B, PLANES, COMBINE_BLOCK,
        )  # fmt: skip
    elif TRAINING:
        k1, k2 = _coefficients(coef_ptr, cols, cmask, C, S, BLOCK_B, PLANES)
    _input_grad_slice(
        dy_ptr, x_ptr, z_ptr, dx_ptr, dz_ptr, unit, t_start, t_end, mean, scale, shift, k1, k2, N, C, S, S_BLOCKS,
        BLOCK_A, BLOCK_B, PLANES, TRAINING, HAS_RESIDUAL, RELU, WRITE_DX, WRITE_DZ, STAGES, EVICT, GHOSTS,
    )  # fmt: skip


# ---- one tile per channel: a single pass over memory -----------------------------------------------
# When a whole channel fits in one program's registers (small N * S, e.g. ResNet's 7x7 layers), the
# statistics and the normalization (or the gradient sums and dx) come from the same loaded values: x is
# read once per direction instead of twice, and one launch replaces two or three.


@triton.jit
def _single_tile_forward_kernel(
    x_ptr, z_ptr, y_ptr, mean_out, invstd_out, rmean_ptr, rvar_ptr, rmean_out, rvar_out, w_ptr, b_ptr,
    N, C, S, eps, momentum,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, HAS_RUNNING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    cols = c + tl.arange(0, 1)
    cmask = cols < C
    base, offs, mask = _tile(0, c, N, C, S, 1, BLOCK_N, BLOCK_S, True, 1)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    n = (N * S).to(tl.float32)
    # Two passes over registers: the mean (relative to the channel's first value: a sum of values near a
    # large offset would round at the offset's scale), then the centred sum of squares.
    anchor = _anchor(x_ptr, cols, cmask, N, C, S, True, 1)
    rel_mean = tl.sum(tl.sum(tl.where(mask, x - anchor[:, None], 0.0), axis=1), axis=0) / n
    mean = anchor + rel_mean
    d = tl.where(mask, x - mean[:, None], 0.0)
    m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
    zero = tl.zeros([1], tl.float32)
    _finalize_stats(
        zero + n, zero + rel_mean, zero + m2, anchor, cols, cmask, eps, momentum,
        mean_out, invstd_out, rmean_ptr, rvar_ptr, rmean_out, rvar_out, HAS_RUNNING,
    )  # fmt: skip
    invstd = 1.0 / tl.sqrt(m2 / n + eps)
    w, shift = _channel_params(w_ptr, b_ptr, cols, cmask, HAS_WEIGHT, HAS_BIAS)
    z = _residual(z_ptr + base, offs, mask, x, HAS_RESIDUAL, "")
    p = _pre_activation(x, mean[:, None], (invstd * w)[:, None], shift[:, None], z, HAS_RESIDUAL)
    if RELU:
        p = tl.maximum(p, 0.0)
    tl.store(y_ptr + base + offs, p.to(y_ptr.dtype.element_ty), mask=mask)


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
    invstd, mean, scale, shift = _normalizer(
        mean_ptr, invstd_ptr, w_ptr, b_ptr, cols, cmask, 0.0, S, BLOCK_S, True, False, HAS_WEIGHT, HAS_BIAS
    )
    base, offs, mask, x, g = _grad_tile(
        0, c, dy_ptr, x_ptr, z_ptr, mean, scale, shift, N, C, S, 1, BLOCK_N, BLOCK_S, True, HAS_RESIDUAL, RELU, "", 1
    )
    sum_g = tl.sum(tl.sum(g, axis=1), axis=0)
    sum_gc = tl.sum(tl.sum(g * (x - mean), axis=1), axis=0)  # g is 0 in masked lanes
    n = (N * S).to(tl.float32)
    dweight = sum_gc * invstd
    tl.store(dw_ptr + cols, dweight, mask=cmask)
    tl.store(db_ptr + cols, sum_g + tl.zeros([1], tl.float32), mask=cmask)
    if WRITE_DZ:
        tl.store(dz_ptr + base + offs, g.to(dz_ptr.dtype.element_ty), mask=mask)
    if WRITE_DX:
        k1 = sum_g / n
        k2 = dweight * invstd / n
        dx = _dx(g, x, mean, scale, k1, k2[:, None], True)
        tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _all_finite(ptr, C, BLOCK: tl.constexpr):
    """Whether all C values at `ptr` are finite (NaN fails x == x; +-inf fails |x| < inf)."""
    ok = tl.full([BLOCK], 1, tl.int32)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        v = tl.load(ptr + cols, mask=cols < C, other=0.0)  # (in its own dtype: float64's range is its own)
        ok &= ((v == v) & (tl.abs(v) < float("inf"))).to(tl.int32)
    return tl.min(ok, axis=0)


# (the verdict word's bits, `bnlab.kernels`: kernels read globals as constexprs only)
VERDICT_ARRIVED = tl.constexpr(_package.VERDICT_ARRIVED)
VERDICT_KEPT = tl.constexpr(_package.VERDICT_KEPT)
VERDICT_WERE_FINITE = tl.constexpr(_package.VERDICT_WERE_FINITE)


@triton.jit
def _guard_kernel(
    rmean_ptr, rvar_ptr, new_mean_ptr, new_var_ptr, verdict_ptr, count_ptr, C, batches,
    BLOCK: tl.constexpr, HAS_COUNT: tl.constexpr,
):  # fmt: skip
    """The non-finite guard of a training call's running-statistics update, on the device (one program,
    after the forward's kernels wrote the updated statistics into scratch): if every channel's updated
    variance is finite (a non-finite batch mean always comes with a non-finite variance), commit the
    scratch and count the `batches` (1, or ghost BN's k) in `count_ptr` (num_batches_tracked); else keep
    the old statistics. No host sync, one launch, instead of ~15 small torch kernels.

    The verdict is one int32 at verdict_ptr, `VERDICT_ARRIVED | VERDICT_KEPT (the update was kept) |
    VERDICT_WERE_FINITE (the old statistics were finite: the late report's wording)`, written in one
    system-scope store: verdict_ptr may be host memory (a pinned ring, `bnlab.late_reports`)
    that the host polls without a copy or an event, a nonzero word telling it everything at once."""
    finite = _all_finite(new_var_ptr, C, BLOCK)
    were_finite = _all_finite(rmean_ptr, C, BLOCK) & _all_finite(rvar_ptr, C, BLOCK)
    if finite != 0:
        for start in range(0, C, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < C
            tl.store(rmean_ptr + cols, tl.load(new_mean_ptr + cols, mask=mask), mask=mask)
            tl.store(rvar_ptr + cols, tl.load(new_var_ptr + cols, mask=mask), mask=mask)
        if HAS_COUNT:
            tl.store(count_ptr, tl.load(count_ptr) + batches)
    verdict = VERDICT_ARRIVED + VERDICT_KEPT * (finite != 0).to(tl.int32) + VERDICT_WERE_FINITE * were_finite
    tl.atomic_xchg(verdict_ptr, verdict, sem="release", scope="sys")
