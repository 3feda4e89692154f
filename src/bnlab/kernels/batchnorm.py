"""Launch planning and launchers for the batch-norm Triton kernels (device code: `bnlab.kernels.device`).

A call's plan (`plan_for`, pure arithmetic) picks the tiles, how many programs share a channel, and
which of the two ways of the device module's doc runs a training direction. Module constants are the
knobs a GPU session tunes (benchmarks/tune_triton.py); the tests shrink them to cross many tiles.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import threading
import types
import warnings
from dataclasses import dataclass, fields, replace

import torch

from bnlab.kernels.device import (
    GROUPS,
    _apply_kernel,
    _grad_kernel,
    _guard_kernel,
    _input_grad_kernel,
    _single_tile_backward_kernel,
    _single_tile_forward_kernel,
    _stats_kernel,
)
from bnlab.kernels.launch import launch as _direct_launch
from bnlab.kernels.layout import PLANES, ROWS, layout_of, to_layout

__all__ = ["PLANES", "ROWS", "Plan", "backward", "forward", "guard_update", "layout_of", "plan_for", "to_layout"]


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
    ghosts > 1: ghost batches read in place (device `_tile`): N is a ghost's samples, C all ghosts'
    channels (ghost j's channel c is j * (C // ghosts) + c), the tensor (ghosts * N, C // ghosts, S); no
    channel block or group straddles two ghosts.
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
    packed: bool = False  # planes: block_a == 1, a tile holds block_b // S samples' runs side by side
    group: int = 0  # planes: > 0, a program takes this many channels, one contiguous span per sample
    reduce_warps: int = 0  # split plans: warps per program of the reductions (others: 0, unused)
    apply: Plan | None = None  # the elementwise passes' tiles where the reductions' differ (`planned`)
    ghosts: int = 1  # ghost batches side by side as channels, read in place (see above)

    def __hash__(self) -> int:  # (the fields' hash, once: plans key the launch memos, looked up every call)
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash(tuple(getattr(self, f.name) for f in fields(self)))

    # (Derived values, each computed once per plan: every launch asks for several. cached_property writes the
    #  instance's __dict__ directly, which a frozen dataclass allows; they are not fields: equality, hashing and
    #  `replace` see the fields only.)
    @functools.cached_property
    def channel_programs(self) -> int:
        if self.layout == ROWS:
            return self.ghosts * _cdiv(self.C // self.ghosts, self.block_b)
        return self.C // self.group if self.group else self.C

    @functools.cached_property
    def grid(self) -> tuple[int, int]:
        return (self.channel_programs, self.splits)

    @functools.cached_property
    def s_blocks(self) -> int:
        return _cdiv(self.S, self.block_b)

    @property
    def samples_per_tile(self) -> int:
        """Planes: the samples one tile covers (device `_samples_per_tile`)."""
        return self.block_b // self.S if self.packed else self.block_a

    @functools.cached_property
    def tiles(self) -> int:
        if self.layout == ROWS:
            return _cdiv(self.N * self.S, self.block_a)
        return _cdiv(self.N, self.samples_per_tile) * self.s_blocks

    @functools.cached_property
    def shape_args(self) -> tuple[int, ...]:
        """The kernels' shape arguments over this plan (N, C, S, s_blocks, tiles, per_split)."""
        return (self.N, self.C, self.S, self.s_blocks, self.tiles, self.per_split)


def _spatial_block(S: int, tile: int, min_run: int = 64, max_run: int = 1024) -> int:
    """The block width for a channel's runs of S contiguous values: least padding, then widest.

    A block that runs past S idles its lanes (49 values in a block of 64 use 77% of them), but blocks
    narrower than 64 values cut each contiguous run into short pieces, which costs more than idle lanes
    (partly used memory sectors): candidates are the powers of two from min(min_run, S) up to min(S, tile,
    max_run). A larger `min_run` trades idle lanes for longer contiguous pieces (see PLANES_MIN_RUN); a
    larger `max_run` lets one tile row take a whole plane (see PLANES_MAX_RUN).
    """
    widest = min(_pow2(S), tile, max_run)
    candidates = []
    b = widest
    while b >= min(min_run, widest):
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
    reduce_warps: int = 0,
    single_tile_max: int = 0,
    single_warps: int = 16,
    group_span: int = 2048,
    min_run: int = 64,
    max_run: int = 1024,
    block_channels: int = 128,
    ghosts: int = 1,
) -> Plan:
    """Tile sizes and the number of slices per channel so that about `target_programs` programs run, of
    `num_warps` warps (`reduce_warps` for a split plan's reductions, when given).

    Slices make the reduction parallel when there are few channels for many values; each slice is at
    least one tile. The elementwise passes take the same tiles in slices of their own (`elementwise_plan`).
    A planes-layout channel that fits in one tile of at most `single_tile_max` values gets the single-pass
    plan instead.
    Grouped planes take groups of channels whose runs of a sample span at most `group_span` lanes; other
    planes tiles are `min_run` to `max_run` positions wide where S allows (`_spatial_block`).
    Rows split plans take blocks of at most `block_channels` channels (a power of two).
    `ghosts` > 1: C channels of that many ghost batches of N samples each, read in place (see `Plan`):
    split plans only, tiled as one ghost's C // ghosts channels are.
    """
    if layout not in (ROWS, PLANES):
        raise ValueError(f"unknown layout {layout!r}")
    if ghosts < 1 or C % ghosts:
        raise ValueError(f"plan_for: {C} channels do not split into {ghosts} ghost batches")
    if block_channels < 1 or block_channels & (block_channels - 1):
        raise ValueError(
            f"plan_for: block_channels (ROWS_BLOCK_BYTES / itemsize) must be a power of two, got {block_channels}"
        )
    single = _pow2(N) * _pow2(S) <= single_tile_max and _offsets_fit(_pow2(N), C * S, _pow2(S))
    if layout == PLANES and single and ghosts == 1:
        bn, bs = _pow2(N), _pow2(S)
        return Plan(PLANES, N, C, S, bn, bs, 1, 1, single_warps, single=True)
    block_a, block_b, tiles, units, packing = _blocks(
        layout, N, C // ghosts, S, tile, group_span, (min_run, max_run), block_channels
    )
    per_split = _per_split(tiles, units * ghosts, target_programs)
    return Plan(layout, N, C, S, block_a, block_b, per_split, _cdiv(tiles, per_split), num_warps,
                reduce_warps=reduce_warps or num_warps, ghosts=ghosts, **packing)  # fmt: skip


def _per_split(tiles: int, units: int, target_programs: int) -> int:
    """Tiles per program so that `units` channel blocks of `tiles` tiles take about `target_programs`."""
    return _cdiv(tiles, max(1, min(tiles, _cdiv(target_programs, units))))


@functools.lru_cache(maxsize=4096)  # pure; called on every layer call
def elementwise_plan(plan: Plan, target_programs: int) -> Plan:
    """`plan` with its tiles regrouped into slices for the elementwise passes (normalize, dx) so that about
    `target_programs` programs run (APPLY_PROGRAMS_PER_SM per multiprocessor): the reductions do best with
    fewer programs (one wave; fewer partials), these with more (more loads in flight). Same tiles;
    single-tile plans, one kernel a direction, are returned as they are."""
    if plan.single:
        return plan
    return _resliced(plan, _per_split(plan.tiles, plan.channel_programs, target_programs))


def _resliced(plan: Plan, per_split: int) -> Plan:
    """`plan`'s tiles in slices of `per_split` tiles (the tiles themselves unchanged)."""
    return replace(plan, per_split=per_split, splits=_cdiv(plan.tiles, per_split))


INT32_LIMIT = 2**31


def _offsets_fit(block_a: int, row_stride: int, block_b: int) -> bool:
    """Whether a tile's offsets relative to its first value (device `_tile`: rows of `row_stride`
    values apart) fit the int32 the kernels compute them in."""
    return (block_a - 1) * row_stride + block_b < INT32_LIMIT


def _group_size(C: int, S: int, tile: int, span: int) -> int:
    """Channels per program for grouped planes (device module doc), or 0: for runs that are not
    16-aligned, when C is a multiple of the group (then every group's span starts 16-byte aligned) and a
    sample's span fits a tile and `span` lanes."""
    if S % 16 == 0:
        return 0
    return next((g for g in GROUPS if C % g == 0 and _pow2(g * S) <= min(tile, span)), 0)


def _packed_block(N: int, C: int, S: int, tile: int) -> int:
    """Lanes of a packed planes tile (device module doc), or 0 where packing does not pay: runs of S
    values that are 16-aligned load as vectors unpacked, and a tile must hold at least two runs."""
    block_b = min(tile, _pow2(N * S))
    samples = block_b // S
    if S % 16 == 0 or samples < 2 or not _offsets_fit(samples, C * S, S):
        return 0
    return block_b


def _blocks(
    layout: str, N: int, C: int, S: int, tile: int, group_span: int, runs: tuple[int, int], width: int = 128
) -> tuple[int, int, int, int, dict]:
    """(block_a, block_b, tiles per channel block, channel blocks, the Plan's packing fields: {}, packed
    or group); rows: blocks of at most `width` channels; grouped planes: spans of at most `group_span`
    lanes; other planes: blocks of `runs` = (min_run, max_run) positions (`_spatial_block`)."""
    if layout == ROWS:
        block_b = min(_pow2(C), width, tile)
        block_a = max(1, min(tile // block_b, _pow2(N * S)))
        while not _offsets_fit(block_a, C, block_b):  # only for millions of channels
            block_a //= 2
        return block_a, block_b, _cdiv(N * S, block_a), _cdiv(C, block_b), {}
    group = _group_size(C, S, tile, group_span)
    if group:
        block_b = _pow2(group * S)
        block_a = max(1, min(tile // block_b, _pow2(N)))
        while not _offsets_fit(block_a, C * S, block_b):
            block_a //= 2
        return block_a, block_b, _cdiv(N, block_a), C // group, {"group": group}
    packed = _packed_block(N, C, S, tile)
    if packed:
        return 1, packed, _cdiv(N, packed // S), C, {"packed": True}
    block_b = _spatial_block(S, tile, *runs)
    block_a = max(1, min(tile // block_b, _pow2(N)))
    while not _offsets_fit(block_a, C * S, block_b):  # samples of 2**31 / block_a values or more
        block_a //= 2
    return block_a, block_b, _cdiv(N, block_a) * _cdiv(S, block_b), C, {}


def _elementwise_passes(plan: Plan, device: torch.device) -> Plan:
    """How normalize and dx run over `plan` (over `plan.apply`'s tiles where it has them): `elementwise_plan`
    at the elementwise passes' target of programs."""
    key = (plan, device)
    passes = _PASSES.get(key)
    if passes is None:
        target = _target_programs(device, plan.layout, elementwise=True)
        passes = _remembered(_PASSES, key, elementwise_plan(plan.apply or plan, target))
    return passes


# `_elementwise_passes`' plans, by (plan, device). Cleared as `_DECIDED` is.
_PASSES: dict[tuple, Plan] = {}


def programs_per_sm(layout: str, elementwise: bool = False, small: bool = False) -> int:
    """Programs per multiprocessor a split pass aims for: the reductions' (PROGRAMS_PER_SM;
    SMALL_PROGRAMS_PER_SM for a `small` tensor, see `_small`) or the elementwise passes'."""
    return (APPLY_PROGRAMS_PER_SM if elementwise else SMALL_PROGRAMS_PER_SM if small else PROGRAMS_PER_SM)[layout]


def _target_programs(device: torch.device, layout: str, elementwise: bool = False, small: bool = False) -> int:
    """Programs a split plan aims for on `device` (`programs_per_sm` on each multiprocessor)."""
    if device.type == "cuda":
        return programs_per_sm(layout, elementwise, small) * _gpu(device)[0]
    # Triton's CPU interpreter: a few programs, enough to exercise the split reductions; the elementwise
    # passes take slices of other lengths than the reductions' there too
    return 8 if elementwise else 4


@functools.cache
def _gpu_properties(index: int) -> tuple[int, int, int, int]:
    properties = torch.cuda.get_device_properties(index)
    return (
        properties.multi_processor_count,
        getattr(properties, "L2_cache_size", 40 * 2**20),
        getattr(properties, "max_threads_per_multi_processor", 2048),
        getattr(properties, "shared_memory_per_multiprocessor", 233472),
    )


def _gpu_index(device: torch.device) -> int:
    """The index of the GPU that `device` names ("cuda" alone: the current one)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _gpu(device: torch.device) -> tuple[int, int, int, int]:
    """(multiprocessors, L2 bytes, threads and shared memory bytes a multiprocessor holds), asked once per
    GPU (planning runs on every call)."""
    return _gpu_properties(_gpu_index(device))


# Multiply-adds compiled as fused multiply-adds (the kernels' arithmetic is written for them, e.g. `_dx`, and
# kernel_sass.py's budgets count them), said explicitly: Triton 3.10 turns the default off.
FP_FUSION = True
# Values per tile and warps per program: the knobs a GPU session tunes (tests shrink TILE to exercise
# many tiles and slices on small inputs). On an H200 (benchmarks/NOTES.md, 2026-11-27, forward+backward
# replayed from CUDA graphs, bf16), 4096 values and 4 warps were best or within 3% of best on the split
# plans of channels-last 56x56/28x28, BatchNorm1d 65536x1024 and NCHW 7x7; 8 warps cost 10-40% there.
TILE = 4096
NUM_WARPS = 4
# ... and at most TILE_BYTES of data a tile: float32 tiles take 2048 values, the bytes of a bf16 tile. At
# 4096 float32 values the sm_90 kernels (Triton 3.6) held 215 registers in the grouped 14x14 statistics
# (2 programs a multiprocessor: 8 warps an SM), 138 in the gradient sums (3; the 56x56 ones at 256-512
# channels then over one wave, 1.29); at 2048, 121 (4) and 64-122 (4-6), no spills, 10 instructions a
# value against a budget of 31. The H200's fp32 NCHW 14x14 layers ran at 0.78-0.95x torch.compile (run
# 6). At 16384 bytes (4096 float32 values, the same as bf16's; session 13, H200, whole sums of the quick
# bench with the two knobs below, against run 9 at 8192): float32 channels-last forward+backward 0.954,
# forward 0.890, NCHW 0.991 / 0.975, fused BN+add+ReLU 0.961-0.990; bf16 unchanged (a control: 0.997).
TILE_BYTES = 16384
# Warps per program of the split reductions (statistics, gradient sums), per layout. At 4 warps and 2
# programs per multiprocessor an SM runs 8 warps of them: too few to hide the loops' instruction latencies?
# On an H200 (run 6, bf16 NCHW) they moved 1.1-1.7 TB/s at 14x14 against 4.3 for normalize and dx there;
# 8 warps double the warps at the same programs and loads in flight (sm_90, Triton 3.6: 90-98 registers
# against 153-168 at 7x7/14x14, no spills, ~1.2x the instructions per value). Untimed (session 8):
# profile_kernels.py's sets time 8 (run 2's "8 warps cost 10-40%" was every pass at 8, unpipelined).
REDUCTION_WARPS = {PLANES: 4, ROWS: 4}
# Grouped planes (NCHW runs that are not 16-aligned): the widest span of a sample's runs that a group of
# channels may take. At 14x14 a group of 16 channels spans 3136 values (a 4096-lane row, 1 sample a
# tile): 578 us on an H200 against 367 us for groups of 8 in 2048 lanes (256x1024x14x14 bf16).
GROUP_SPAN_MAX = 2048
# Planes tiles (NCHW runs that are 16-aligned: 28x28, 56x56, 112x112) at least this many positions wide.
# 64 takes the width with the least padding, which at 28x28 and 56x56 is 64 (tiles of 64 samples x 64
# positions: each row of a tile a separate 128-byte piece of a different sample's plane, 1.6 MB apart at
# 256x256x56x56); 1024 takes tiles of 4 samples x 1024 positions, 2 KB contiguous pieces, 23% idle lanes
# at 56x56 and 28x28. On an H200 (run 4, bf16 256x256x56x56 NCHW, per-kernel profile) 1024 took the step
# from 914 to 882 us: normalize 238 -> 223, dx 339 -> 323; run 5: faster on all seven 28x28-112x112
# shapes at 4 programs per SM (256x512x28x28 516 -> 430 us; benchmarks/NOTES.md, session 7).
PLANES_MIN_RUN = 1024
# ... and at most this many (a power of two): 4096 makes a 56x56 tile one whole plane (1 sample x 4096
# lanes, 3136 busy: one 6 KB contiguous piece) instead of 4 samples x 1024 (2 KB pieces 1.6 MB apart at
# 256x256x56x56); 112x112 and 28x28 keep their tiles. Untimed (session 7): profile set `nchw` times 4096.
PLANES_MAX_RUN = 1024
# Largest channel (N * S, padded to powers of two) for the single-pass kernels, and their warps: at 8192
# values and 16 warps the sm_90 build keeps everything in registers (no spills, cuobjdump); 0 disables.
SINGLE_TILE_MAX = 8192
SINGLE_WARPS = 16
# Programs per multiprocessor that the split reductions (statistics, gradient sums) aim for, per layout,
# and the elementwise passes (normalize, dx; `elementwise_plan`): more slices, more loads in flight, but
# for the reductions more partials to combine and more than one wave (they hold 96-168 registers, 3-5
# programs per multiprocessor). On an H200 (run 5, bf16 NCHW, per-kernel profile, benchmarks/NOTES.md),
# planes at 2 against 4: statistics and gradient sums each faster on 9 of the 12 ResNet-50 shapes (e.g.
# 256x1024x14x14: 43 and 63 us against 57 and 84), normalize slower on 12 and dx on 10 (e.g. 256x64x56x56:
# 64 and 100 us against 54 and 79); run 6 (both settings): bf16 NCHW sum 13.76 -> 13.29 ms. Rows at 2
# against 4 (run 2, whole steps, one setting for all passes): 256x64x56x56 271 against 240 us,
# 256x128x28x28 167 against 149, 65536x1024 386 against 317.
PROGRAMS_PER_SM = {PLANES: 2, ROWS: 4}
APPLY_PROGRAMS_PER_SM = {PLANES: 4, ROWS: 4}
# The reductions' programs per multiprocessor for a tensor of at most SMALL_TENSOR_L2 times the GPU's L2
# (`_small`). On an H200 (run 7, bf16 NCHW, profile set `nchw`, graph-timed steps, one sample each) planes
# reductions at 4 instead of 2 took 0.963-0.981 of the step on every layer of at most 51 MB (7x7 with 512
# and 2048 channels, 14x14 with 256 and 512, 28x28 with 128; their reductions below one wave at 2: e.g.
# 14x14 statistics 0.73 waves, gradient sums 0.55, benchmarks/kernel_sass.py), 0.99-1.03 on the larger
# ones. As a candidate of the whole sums (session 13, runs 9-10, H200, against the defaults of the day):
# bf16 NCHW forward+backward 0.996, float32 NCHW 0.995 (noise on unchanged rows: 0.994-1.004), never
# slower; taken with the float32 knobs below and above (run 11).
SMALL_PROGRAMS_PER_SM = {PLANES: 4, ROWS: 4}
SMALL_TENSOR_L2 = 1.0
# Channels-last split plans: bytes of each tile row (a block of ROWS_BLOCK_BYTES / itemsize channels, a
# power of two: each row of a tile one contiguous piece of that many channels). Fewer channels a block, more
# blocks, so fewer slices a block for the same programs: fewer partials to combine and longer loops. On an
# H200 (run 4, bf16 256x512x7x7 channels-last) the statistics took 19.6 us for 12.8 MB (131 slices of 3
# tiles each, then a combine of 131 partials) and the gradient sums 16.9 us for twice the bytes: latency,
# not bandwidth. Session 11 (H200, float32, profile set `cl`, graph-timed steps): 64 channels a block
# instead of 128 faster on all 10 channels-last shapes with more than 64 channels (0.91-0.98 of the time),
# 32 slower on the large ones: 256 bytes a row, which keeps bf16's 128 channels (untimed there at 64).
ROWS_BLOCK_BYTES = 256
# ... and for the reductions alone (statistics, gradient sums; the elementwise passes keep ROWS_BLOCK_BYTES:
# the passes share only per-channel results, so their tiles may differ, `Plan.apply`): at most this many
# channels a block. Run 10 (H200, bf16, profile set `cl`, per kernel, blocks of 64 / 32 channels against
# 128): the statistics faster on every channels-last shape with more than 64 channels (256x256x14x14
# 26.1 -> 19.3 / 17.2 us, 256x1024x14x14 51.4 -> 41.3 / 37.7, 256x256x56x56 117.0 -> 112.6 / 118.3), the
# gradient sums on most at 64 channels (27.4 -> 23.2, 63.7 -> 60.9, 196.1 -> 192.6), while normalize and
# dx got slower on nearly all (e.g. 256x256x56x56 dx 294.0 -> 322.1 / 417.6). Run 13 (session 14, H200,
# whole sums of the quick bench against its run at 128 bf16 channels): reductions at 64 bf16 channels took
# the bf16 channels-last sum to 0.963 (forward 0.940, fused op 0.982); at 32 to 1.004 (forward 0.938);
# float32 at 32 channels (below its elementwise 64) 1.002 (fused 1.012). So 64 channels in every dtype:
# bf16/fp16 reductions narrower than their passes, float32's as its passes.
REDUCTION_ROWS_BLOCK_CHANNELS = 64
# ... and for a small tensor (`_small`: within the GPU's L2), whose reductions are latency, not bandwidth:
# fewer channels a block means fewer slices a block at the same programs, so fewer partials to combine.
# Runs 14 and 17 (H200, bf16 channels-last, profile sets `cl` and `small`, graph-timed steps): 256x512x7x7
# (12.8 MB, 5 of ResNet-50's layers) at 32 channels 44.4 / 44.5 us against 51.7 / 52.8 at 64 (statistics
# 14.2 -> 9.7 us, gradient sums 13.7 -> 11.1 in run 17); 256x256x14x14 (25.7 MB, 11 layers) 78.8 / 77.2
# against 78.9 / 78.4; the larger layers slower at 32 (51 MB: 0.975-1.035; 56x56: up to 1.11). Predicted
# on the bf16 channels-last sum: ~-0.04 ms (0.3%). A candidate until a run of the whole sums: 64, as above.
SMALL_REDUCTION_ROWS_BLOCK_CHANNELS = 64
# ... and their tiles, this many times the elementwise passes' (TILE, TILE_BYTES): with REDUCTION_WARPS'
# rows as many times NUM_WARPS, each thread holds the values it holds at the defaults (the same registers,
# the same bytes in flight an SM at proportionally fewer programs), while a program covers that many times
# the rows: that many times fewer slices a channel block, so fewer partials and, with `_combine_block`'s
# step scaled by the warps, one combine level where there were two. Session 27 (no GPU): run 14's profile
# read kernel by kernel (`python benchmarks/profile_sums.py LOG --kernels`) has each channels-last
# reduction 8-17 us over its traffic at copy speed whatever the layer's size (statistics 12-17 us, gradient
# sums 8-14 below 56x56), 1.37 ms of the bf16 channels-last sum's excess (its bar needs 0.45 ms less), and
# ncu (run 16, 256x256x14x14 statistics, 4 x 131 programs) the multiprocessors active 58% of the kernel's
# time, against 74-86% for the NCHW statistics and both layouts' dx: a tail after the loops (arrivals and a
# two-level combine of 131 partials). At 4 (with 16 warps and 1 program an SM) that layer's statistics take
# 4 x 33 programs of 256 x 64 values a tile, one combine level. A candidate (profile sets `small` and
# `cl`), untimed.
REDUCTION_ROWS_TILE_SCALE = 1
# The elementwise passes' loads of their inputs (x, the residual; dx's dy too), the last read of them in
# their direction, with this eviction policy: "" (the default) or "evict_first", so that while a pass
# writes its output the lines it has read leave L2 before those it has yet to read (the second pass walks
# the tiles last first, `device._backwards`, to find the first pass's last reads still in L2). A
# candidate of session 18, untimed: run 14's profile had 256x64x56x56's normalize at 0.91 and dx at 0.97
# of a copy of their traffic (103 MB tensors, about twice the L2), with no sign of those L2 hits.
SECOND_READ_EVICTION = ""
# Grouped planes (NCHW 7x7, 14x14): the reductions' per-channel sums over a tile's lanes by regathering
# the lanes as [channels, W] and summing rows, instead of a segmented scan (`device._channel_sum`).
# Session 14 (H200, ncu, run 15): NCHW 256x256x14x14 bf16 statistics issue-bound, not memory-bound (DRAM
# 18% of peak, an issue slot busy 57% of cycles, 3 programs an SM by 168 registers), ~7300 instructions
# a warp of which the per-tile loop (~250 an iteration, ~11 iterations) is ~2750; the kernel's
# straight-line code, read from its sm_90 machine code, ~3500 instructions, most of them the three
# segmented scans (394 shuffles). Session 17 (H200, run 17, candidates against the defaults in one call):
# bf16 NCHW forward+backward 256x256x14x14 89.0 -> 72.9 us, 256x512x14x14 143.6 -> 126.7, 256x512x7x7
# 52.2 -> 47.0, the bf16 NCHW sum 13.05 -> 12.70 ms (0.973), float32 0.985, other layers unchanged: on.
GATHER_GROUPED_SUMS = True
# Partials that the last program of a channel block loads per step ([split_block, channels] values), for a
# program of NUM_WARPS warps; one of more warps takes proportionally more (`_combine_block`).
COMBINE_VALUES = 2048
# Split training directions: the reductions' last combine level (the whole combine where a channel block's
# slices are one group of SPLIT_BLOCK, as at NCHW 7x7/14x14) done at the start of every elementwise
# program of the channel block instead of by the reduction's last program (device `_gather`,
# `_late_stats`, `_late_coefficients`): off the critical path between the two kernels go an arrival
# (a fence and an atomic), the reload of the partials and the finalize's stores (and the running
# statistics' read), ~2-3 round trips to L2; each elementwise program instead loads the rows (the
# slices', or their groups': ~16 x its channels x 3 floats, in the round trip that loaded mean and invstd)
# and combines them, and slice 0 stores the results. Session 15 (no GPU): built from NOTES' list of
# levers (the small layers' reductions take ~4x their traffic time). Per layout, for 2-byte values; float32
# has its own. Session 17 (H200, run 17, against the defaults in one call, with GATHER_GROUPED_SUMS): bf16
# NCHW forward+backward 0.79-0.94 of the step on 7x7/14x14 (the gather alone: 0.82-0.98), 128x28x28 0.93,
# the bf16 NCHW sum 13.05 -> 12.52 ms (0.960; the gather alone 0.973); but bf16 channels-last 1.013 and
# float32 NCHW 14x14 1.01-1.05 of the step (the sums 1.013 and 1.004 alone): on for 2-byte planes only.
LATE_COMBINE = {PLANES: True, ROWS: False}
LATE_COMBINE_FLOAT32 = {PLANES: False, ROWS: False}
# Tiles whose loads are in flight at once in the split reductions' loops (statistics; gradient sums), per
# layout, software-pipelined through shared memory (1: not pipelined; shared memory per program: up to
# STAGES - 1 tiles of each tensor read). On an H200 (bf16, per-kernel profile, benchmarks/NOTES.md), with
# 4 warps: NCHW 256x256x56x56 statistics 273 us unpipelined, 123 at 3 stages; gradient sums 341, 244 at
# 2, 208 at 3; NCHW 256x2048x7x7 gradient sums 51, 37 at 2, 45 at 3. Channels-last 256x256x56x56:
# statistics 117 us unpipelined, 134 at 3 (and the rows layout spills a register at 3 with Triton 3.9);
# gradient sums 219, 196 at 2 or 3.
STATS_STAGES = {PLANES: 3, ROWS: 1}
# ... for float32 inputs (4-byte values: a tile of TILE_BYTES is half as many values). Session 13 (H200,
# whole sums of the quick bench against its run at the defaults): channels-last statistics 2 deep took
# float32 channels-last forward to 0.921 (both directions 0.965) but bf16 to 1.042 (1.017); run 10's
# bf16 profile (set `cl`) has it 1.00-1.06 a step on all 12 channels-last shapes.
STATS_STAGES_FLOAT32 = {PLANES: 3, ROWS: 2}
# ... or, per layout, not pipelined through shared memory but prefetched in registers (device `_slice_stats`:
# the next tile's load issued before the current tile's arithmetic, two tiles in flight a program; the
# statistics then take 1 stage). For the channels-last statistics of the small layers: session 14's ncu
# (run 16, bf16 256x256x14x14, 4 x 131 programs of ~6 tiles) found them latency-bound, 38% of issue slots
# busy, DRAM 23% of peak, a third of the stalls on loads; each unpipelined tile waits for its load, and 2
# stages through shared memory lost in bf16 (run 10: 1.00-1.06 a step). sm_90, Triton 3.6 (session 15):
# see NOTES. Per layout, for 2-byte values; float32 has its own. Session 17 (H200, run 17, against the
# defaults in one call): channels-last bf16 forward+backward 0.955-1.002 of the step on all 12 shapes
# (7x7 0.955 and 0.991, 14x14 0.989-0.995; forward alone 0.948-0.999), the sum 0.995; float32 channels-last
# (2 stages through shared memory by default) 0.93-0.99 on 14x14/7x7 but 1.00-1.008 on the larger ones:
# on for 2-byte rows only.
STATS_PREFETCH = {PLANES: False, ROWS: True}
STATS_PREFETCH_FLOAT32 = {PLANES: False, ROWS: False}
GRAD_STAGES = {PLANES: 2, ROWS: 2}
# The gradient sums of programs that loop over at least LONG_LOOP_TILES tiles take GRAD_STAGES_LONG: the
# two NCHW numbers above are 66 tiles a program (3 stages better by 15%) and 13 (2 better by 16%). The
# threshold between them is a guess (session 6); profile_kernels.py's large set times both on both shapes.
GRAD_STAGES_LONG = {PLANES: 3, ROWS: 2}
LONG_LOOP_TILES = 32
# The same for the elementwise passes (normalize, dx), per layout; 1: not pipelined. On an H200 (run 4,
# bf16 NCHW 256x256x56x56) 2 changed nothing: 911 us a step against 915.
APPLY_STAGES = {PLANES: 1, ROWS: 1}


def _stats_prefetch(plan: Plan, itemsize: int) -> bool:
    """Whether `plan`'s statistics over values of `itemsize` bytes prefetch their next tile in registers
    (STATS_PREFETCH, STATS_PREFETCH_FLOAT32 for 4)."""
    return (STATS_PREFETCH_FLOAT32 if itemsize == 4 else STATS_PREFETCH)[plan.layout]


def _stats_stages(plan: Plan, itemsize: int) -> int:
    """The statistics' pipeline depth for `plan` over values of `itemsize` bytes (1 where prefetched)."""
    if _stats_prefetch(plan, itemsize):
        return 1
    return (STATS_STAGES_FLOAT32 if itemsize == 4 else STATS_STAGES)[plan.layout]


def _stats_loop(plan: Plan, itemsize: int) -> dict[str, int | bool]:
    """The statistics kernel's loop constexprs for `plan` over values of `itemsize` bytes, as the launcher
    passes them (and benchmarks/kernel_sass.py and profile_kernels.py read them): pipeline depth, prefetch.
    (Session 14 built grouped statistics that summed each lane over a tile's rows in the loop,
    GROUPED_STATS_ROW_SUMS: 118 registers instead of 152 at NCHW 14x14 bf16, but 0.999x of the whole sums
    with the gather on an H200, run 17; removed in session 17.)"""
    return {"STAGES": _stats_stages(plan, itemsize), "PREFETCH": _stats_prefetch(plan, itemsize)}


def _grad_stages(plan: Plan) -> int:
    """The gradient sums' pipeline depth for `plan` (GRAD_STAGES, or GRAD_STAGES_LONG for long loops)."""
    return (GRAD_STAGES_LONG if plan.per_split >= LONG_LOOP_TILES else GRAD_STAGES)[plan.layout]


# Launches on a GPU without Triton's per-call dispatch once a kernel's specialization has been launched
# (`bnlab.kernels.launch`): host time only, the kernels are the same. `python benchmarks/launch_overhead.py`
# (no GPU: stand-ins for the driver and the compiled kernel; development VM, session 18, Triton 3.6, the
# apply kernel, four runs): 23.5-29.3 us a launch through Triton's dispatch, 12.5-13.1 direct. On by default
# since session 23's H200 run (run 23: test_triton.py's direct-launch test passed natively, eagerly and in a
# graph; benchmarks/host_gpu.py 48.3/35.3 us for the forward/backward launchers against 54.6/54.2 through
# Triton's dispatch; benchmarks/network_step.py, ResNet-50 batch 128 bf16, a training step 41.6 against 47.3
# ms NCHW and 41.1 against 50.2 channels-last, host-bound both ways).
DIRECT_LAUNCH = True


def _run(
    kernel, grid: tuple[int, ...], args: tuple, options: dict, device: torch.device, variant: object = None
) -> None:
    """``kernel[grid](*args, **options)``, through `bnlab.kernels.launch` on a GPU with DIRECT_LAUNCH
    (`variant`: as `launch.launch`'s)."""
    if DIRECT_LAUNCH and device.type == "cuda":
        _direct_launch(kernel, grid, args, options, device, variant)
    else:
        kernel[grid](*args, **options)


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream of `device`."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _program_channels(plan: Plan) -> int:
    """Channels a program of `plan` takes (a partial row's span of them)."""
    return plan.block_b if plan.layout == ROWS else plan.group or 1


def _program_warps(plan: Plan, reduction: bool = False) -> int:
    """Warps a program of `plan`'s kernels runs (`reduction`: of its split reductions; a single-tile plan has
    no reduce_warps, and inference's backward still runs its split reduction over it)."""
    return (plan.reduce_warps or plan.num_warps) if reduction else plan.num_warps


def _combine_block(plan: Plan, rows: int, reduction: bool = False) -> int:
    """Rows a step of a combine of `rows` partial rows over the channels of `plan`'s programs (`reduction`:
    its reductions', else its elementwise passes'): at most COMBINE_VALUES values a step for NUM_WARPS warps,
    as many values a thread for programs of more."""
    values = COMBINE_VALUES * max(1, _program_warps(plan, reduction) // NUM_WARPS)
    return max(1, min(_pow2(rows), values // _program_channels(plan)))


def _split_block(plan: Plan) -> int:
    """The reductions' groups of slices (device `_gather`): a combine step over all of `plan`'s slices."""
    return _combine_block(plan, plan.splits, reduction=True)


def _late_knob(layout: str, itemsize: int) -> bool:
    """LATE_COMBINE's setting for `layout` over values of `itemsize` bytes (LATE_COMBINE_FLOAT32 for 4)."""
    return (LATE_COMBINE_FLOAT32 if itemsize == 4 else LATE_COMBINE)[layout]


def _late(plan: Plan, itemsize: int) -> bool:
    """Whether a reduction launched over `plan` (values of `itemsize` bytes) leaves its last combine level
    to the elementwise pass (LATE_COMBINE; one slice a channel block has nothing to combine)."""
    return _late_knob(plan.layout, itemsize) and plan.splits > 1


def _late_rows(reduced: Plan, itemsize: int) -> tuple[int, int] | None:
    """(first row, rows) of the partials that the elementwise pass combines after a reduction launched
    over `reduced`: the slices' own rows where they are one group, else the groups' rows (device
    `_gather`); None where the reduction finalized itself (not `_late`)."""
    if not _late(reduced, itemsize):
        return None
    groups = _cdiv(reduced.splits, _split_block(reduced))
    return (0, reduced.splits) if groups == 1 else (reduced.splits, groups)


def _late_options(apply: Plan, late: tuple[int, int] | None) -> dict[str, int | bool]:
    """The elementwise kernels' LATE constexprs over `apply` for `late` (`_late_rows`); one variant where
    not late."""
    return {"LATE": late is not None, "COMBINE_BLOCK": _combine_block(apply, late[1]) if late else 1}


def make_plan(x: torch.Tensor, layout: str, ghosts: int = 1, **overrides: int) -> Plan:
    """The plan for `x` laid out as `layout` (`overrides`: as `planned`'s); with `ghosts` > 1, for its
    `ghosts` ghost batches side by side as channels, read in place (see `Plan`)."""
    key = (x.shape, x.dtype, x.device, layout, ghosts, *overrides.items())
    plan = _PLANS.get(key)
    if plan is None:
        if x.shape[0] % ghosts:
            raise ValueError(f"make_plan: a batch of {x.shape[0]} samples does not split into {ghosts} ghost batches")
        itemsize = x.element_size()
        small = _small(x.device, x.numel() * itemsize)
        target = _target_programs(x.device, layout, small=small)
        N, C, S = x.shape[0] // ghosts, x.shape[1] * ghosts, math.prod(x.shape[2:])
        plan = _remembered(_PLANS, key, planned(layout, N, C, S, itemsize, target, small, ghosts=ghosts, **overrides))
    return plan


# make_plan's plans, by (shape, dtype, device, layout, ghosts, overrides): one Plan object per layer shape,
# which `_launch`'s and `_elementwise_passes`' memos then find by identity. Cleared as `_DECIDED` is.
_PLANS: dict[tuple, Plan] = {}


def planned(
    layout: str, N: int, C: int, S: int, itemsize: int, target_programs: int, small: bool = False, **overrides: int
) -> Plan:
    """`plan_for` with the module's knobs (`knob_args`, then `overrides`), and the reductions in tiles of
    their own where the knobs ask (REDUCTION_ROWS_BLOCK_CHANNELS, or SMALL_REDUCTION_ROWS_BLOCK_CHANNELS for
    a `small` tensor; channels-last): the returned plan is then
    the reductions', with the elementwise passes' as its `apply`. Pure, for planners without the GPU too
    (benchmarks/kernel_sass.py). (Session 13 built NCHW reductions in packed tiles beside grouped elementwise
    passes, PACKED_REDUCTIONS: timed on an H200 in runs 11 and 13, the fused bf16 NCHW sum 1.053x; removed
    in session 17.)"""
    knobs = {**knob_args(layout, itemsize), **overrides}
    plan = plan_for(layout, N, C, S, target_programs=target_programs, **knobs)
    if layout != ROWS:
        return plan
    channels = SMALL_REDUCTION_ROWS_BLOCK_CHANNELS if small else REDUCTION_ROWS_BLOCK_CHANNELS
    own = {"block_channels": min(knobs["block_channels"], channels), "tile": knobs["tile"] * REDUCTION_ROWS_TILE_SCALE}
    reduce = plan_for(layout, N, C, S, target_programs=target_programs, **{**knobs, **own})
    return plan if reduce == plan else replace(reduce, apply=plan)


def _small(device: torch.device, nbytes: int) -> bool:
    """Whether a tensor of `nbytes` on `device` is small (`within_l2` of the GPU's L2; False in Triton's CPU
    interpreter, which has no L2)."""
    return device.type == "cuda" and within_l2(nbytes, _gpu(device)[1])


def within_l2(nbytes: int, l2_bytes: int) -> bool:
    """Whether a tensor of `nbytes` is small for a GPU of `l2_bytes` of L2 (at most SMALL_TENSOR_L2 times
    it), so that its reductions take SMALL_PROGRAMS_PER_SM: pure, for
    planners without the GPU (benchmarks/kernel_sass.py)."""
    return nbytes <= SMALL_TENSOR_L2 * l2_bytes


def knob_args(layout: str, itemsize: int = 2) -> dict[str, int]:
    """`plan_for`'s keyword arguments that the module's knobs set for values of `itemsize` bytes, all but
    the device's (target programs): `planned` adds it."""
    return dict(
        tile=min(TILE, TILE_BYTES // itemsize), num_warps=NUM_WARPS, reduce_warps=REDUCTION_WARPS[layout],
        single_tile_max=SINGLE_TILE_MAX, single_warps=SINGLE_WARPS, group_span=GROUP_SPAN_MAX,
        min_run=PLANES_MIN_RUN, max_run=PLANES_MAX_RUN, block_channels=max(1, ROWS_BLOCK_BYTES // itemsize),
    )  # fmt: skip


def describe_plans(x: torch.Tensor) -> str:
    """How a training step on `x` (as laid out) runs, e.g. "forward split over 131 slices; backward split
    over 131 slices" (with ", packed tiles of K samples" for packed planes): for benchmark rows, so that
    each number names the kernels behind it."""
    layout = layout_of(x) or PLANES
    plan = make_plan(x, layout)
    parts = []
    for direction in ("forward", "backward"):
        elementwise = "normalize" if direction == "forward" else "dx"
        if plan.single:
            how = "single tile"
        else:
            # (as launched: `_launch` may have cut a pass to one wave)
            kernels = _SPLIT_KERNELS[direction == "backward"]
            reduce = _FITTED.get((kernels[0], plan), plan)
            how = f"split over {reduce.splits} slices"
            apply = _elementwise_passes(plan, x.device)
            cut = reduce != plan or (kernels[1], apply) in _FITTED
            apply = _FITTED.get((kernels[1], apply), apply)
            if apply.splits != reduce.splits:
                how += f" ({elementwise} over {apply.splits})"
            stages = _grad_stages(reduce)
            if direction == "backward" and stages != GRAD_STAGES[plan.layout]:
                how += f" (gradient sums {stages} deep)"  # long loops (GRAD_STAGES_LONG)
            if _late(reduce, x.element_size()):
                how += f" (last combine in {elementwise})"
            if cut:
                how += " (cut to one wave)"
        if tiles := _tiling(plan):
            how += f" ({tiles})"
        if plan.apply is not None and plan.layout == ROWS:  # (`planned`: the reductions' blocks of their own)
            how += f" (blocks of {plan.block_b} channels, {elementwise} in blocks of {plan.apply.block_b})"
        elif plan.apply is not None:
            how += f" ({elementwise} in {_tiling(plan.apply)})"
        parts.append(f"{direction} {how}")
    return "; ".join(parts)


def _tiling(plan: Plan) -> str:
    """How `plan` packs its tiles, for describe_plans: packed samples, grouped channels, or "" (plain)."""
    if plan.packed:
        return f"packed tiles of {plan.samples_per_tile} samples"
    return f"grouped tiles of {plan.group} channels" if plan.group else ""


def _planes_code(plan: Plan) -> int:
    """The kernels' PLANES constexpr (device module doc): 0 rows, 1 planes, 2 packed, 3/4 grouped by 16/8."""
    if plan.layout == ROWS:
        return 0
    if plan.group:
        return 3 + GROUPS.index(plan.group)
    return 2 if plan.packed else 1


def _block_args(plan: Plan, reduction: bool = False) -> dict[str, int | bool]:
    """The tile constexprs and launch options of `plan`'s kernels (`reduction`: of its split reductions,
    which also take GATHER_SUMS: grouped planes' per-channel sums by GATHER_GROUPED_SUMS)."""
    args = {
        "BLOCK_A": plan.block_a,
        "BLOCK_B": plan.block_b,
        "PLANES": _planes_code(plan),
        "GHOSTS": plan.ghosts,
        "num_warps": _program_warps(plan, reduction),
        "enable_fp_fusion": FP_FUSION,
    }
    if reduction:
        args["GATHER_SUMS"] = GATHER_GROUPED_SUMS and bool(plan.group)  # (one compiled variant elsewhere)
    return args


def _partials(plan: Plan, device: torch.device, count: int) -> list[torch.Tensor]:
    """`count` float32 workspaces of one partial result per (slice, channel) plus one per group of
    slices, and the int32 counters of `bnlab.kernels.device`'s combining section; placeholders when one
    slice covers a channel."""
    if plan.splits == 1:
        placeholder = torch.empty(0, device=device, dtype=torch.float32)
        return [placeholder] * (count + 1)
    groups = _cdiv(plan.splits, _split_block(plan))
    rows = plan.splits + (groups if groups > 1 else 0)
    parts = list(torch.empty((count, rows, plan.C), device=device, dtype=torch.float32).unbind(0))  # one allocation
    return [*parts, _semaphores(device, plan.channel_programs * (1 + groups))]


# ---- one wave -------------------------------------------------------------------------------------------
# A grid larger than the GPU holds at once runs its last programs after the first ones end, nearly alone;
# at these sizes a program's time is mostly latency, so crossing one wave costs far more than its share.
# On an H200 (bf16 NCHW): 256x256x14x14 statistics took 40 us at 16 slices (1.29 waves) against 23.4 at 9
# (0.73), run 5; 256x1024x14x14 dx 84.6 us at 640 programs (1.21 waves, run 6) against 75.7 at 320 (0.61,
# run 5), while 256x256x14x14 dx, within one wave either way, was faster with more (17.4 against 19.2 us).
# With ONE_WAVE each split pass gets no more programs than the GPU holds at once of its compiled kernel
# (registers, shared memory, warps: `_resident`), fewer slices where it would. Where it binds on ResNet-50's
# layers at batch 256 (sm_90, Triton 3.6, benchmarks/kernel_sass.py's arithmetic): NCHW 14x14 dx at 512 and
# 1024 channels (1.09 and 1.21 waves planned), bf16 and fp32. Not timed yet (session 8).
ONE_WAVE = True


def resident_programs(
    registers: int, shared: int, warps: int, sm_registers: int = 65536, sm_threads: int = 2048,
    sm_shared: int = 233472, sm_programs: int = 32,
) -> int:  # fmt: skip
    """Programs of `warps` warps, `registers` per thread and `shared` bytes of shared memory that one
    multiprocessor holds at once (the CUDA occupancy calculator's arithmetic, simplified: registers
    allocated 256 a warp at a time, 1 KB of shared memory reserved a program); defaults: sm_80/sm_90."""
    per_warp = -(-registers * 32 // 256) * 256
    return max(
        0,
        min(sm_registers // (per_warp * warps), sm_threads // (32 * warps), sm_shared // (shared + 1024), sm_programs),
    )


def within(plan: Plan, programs: int) -> Plan:
    """`plan` cut to at most `programs` programs by taking fewer slices per channel block, as far as one
    slice a block allows (pure; single-tile plans as they are)."""
    units = plan.channel_programs
    if plan.single or units * plan.splits <= programs:
        return plan
    per_split = _cdiv(plan.tiles, max(1, programs // units))
    return plan if per_split == plan.per_split else _resliced(plan, per_split)  # (uncut: the plan itself)


_RESIDENT: dict[tuple, int] = {}


def _resident(kernel, args: tuple, options: dict, device: torch.device) -> int:
    """Programs of this kernel variant that a multiprocessor of `device` holds at once, from the compiled
    kernel, asked once per variant: a launch over an empty grid compiles and loads it and runs nothing.
    Keyed by the kernel, the device, the first tensor's dtype and the constexprs and options (mixed data
    dtypes would share an entry: only the estimate, not a result, could be off)."""
    key = (kernel, device.index, args[0].dtype, *options.items())
    resident = _RESIDENT.get(key)
    if resident is None:
        compiled = kernel[(0, 0)](*args, **options)
        _, _, threads, shared = _gpu(device)
        try:  # (Triton's compiled-kernel attributes, not a documented API: a Triton without them cuts nothing)
            registers, shared_bytes, warps = compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps
        except AttributeError as exc:
            warnings.warn(f"bnlab: no occupancy for {kernel.fn.__name__} ({exc}); its launches are not cut to one "
                          f"wave", RuntimeWarning, stacklevel=3)  # fmt: skip
            registers, shared_bytes, warps = 1, 0, 1  # (as many programs as the multiprocessor has slots)
        resident = _RESIDENT[key] = max(
            1, resident_programs(registers, shared_bytes, warps, sm_threads=threads, sm_shared=shared)
        )
    return resident


def _one_wave_on(device: torch.device) -> bool:
    """Whether launches on `device` are cut to one wave: ONE_WAVE, on a GPU (Triton's CPU interpreter has
    no occupancy; tests make it pretend)."""
    return ONE_WAVE and device.type == "cuda"


def _launch(kernel, plan: Plan, device: torch.device, args_of, options_of, flags: tuple = ()) -> Plan:
    """Launch `kernel` over `plan`, first cut to one wave (ONE_WAVE) on a GPU; the plan launched.
    `args_of(plan)`: its arguments; `options_of(plan, *flags)`: its constexprs and options (both may change
    with the slices, e.g. the combine's step), a function of the plan, `flags` (hashable) and the module's
    knobs only: the cut and the options are decided once per (kernel, plan, flags, device) (`_DECIDED`)."""
    key = (kernel, plan, flags, device)
    decided = _DECIDED.get(key)
    if decided is None:
        decided = _remembered(_DECIDED, key, _decide(kernel, plan, device, args_of(plan), options_of, flags))
    launched, options, variant = decided
    _run(kernel, launched.grid, args_of(launched), options, device, variant)
    return launched


def _decide(
    kernel, plan: Plan, device: torch.device, args: tuple, options_of, flags: tuple
) -> tuple[Plan, dict, object]:
    """(the plan `_launch` runs, its options, the token of (kernel, options) in `_VARIANTS`: the direct
    launch's `variant`): `plan` cut to one wave on a GPU (`args`: a launch's over `plan`, for the compiled
    variant's occupancy)."""
    options = options_of(plan, *flags)
    if _one_wave_on(device):
        fitted = within(plan, _resident(kernel, args, options, device) * _gpu(device)[0])
        if fitted is not plan:  # (`within` returns the plan itself uncut: no field-by-field comparison)
            _FITTED[(kernel, plan)] = plan = fitted
            options = options_of(plan, *flags)
    try:
        variant = _VARIANTS.setdefault((kernel, *options.items()), object())
    except TypeError:  # (an unhashable option value: the launch keys the options itself)
        variant = None
    return plan, options, variant


# A token for each (kernel, options) a decision launched: it stands for them in the direct launch's key
# (`launch.launch`'s `variant`) across the memos' clearing. An object compared by identity, which the keys
# that hold it keep alive: no other token can ever equal it, even were this dict replaced.
_VARIANTS: dict[tuple, object] = {}


# What `_launch` decided, by (kernel, plan, flags, device): ~3 us of Python a launch on the dev VM, the
# same every step. Cleared whenever an attribute of this module is set (a knob, a test's stand-in: `_Knobs`).
_DECIDED: dict[tuple, tuple[Plan, dict, object]] = {}
# Entries a memo keeps at most: shapes that change every call (a BatchNorm1d over a varying number of rows)
# would otherwise grow them without end; a full memo starts afresh.
MEMO_LIMIT = 4096


def _remembered(memo: dict, key: tuple, value: object) -> object:
    """`value`, kept in `memo` under `key` (the memo emptied first when it holds MEMO_LIMIT entries)."""
    if len(memo) >= MEMO_LIMIT:
        memo.clear()
    memo[key] = value
    return value


# The plans `_launch` cut, by (kernel, planned): what a launch of that plan ran (for `describe_plans`).
_FITTED: dict[tuple, Plan] = {}
# A split direction's kernels (forward, backward): the reduction and the elementwise pass.
_SPLIT_KERNELS = ((_stats_kernel, _apply_kernel), (_grad_kernel, _input_grad_kernel))


_SEMAPHORES: dict[tuple[int, int], torch.Tensor] = {}


def _kept_zeros(count: int, device: torch.device) -> torch.Tensor:
    """`count` zeroed int32 counters on a GPU that outlive the call (a stream's semaphores, a graph slab),
    allocated on a short-lived thread of their own and zero once it returns.

    While inductor's CUDA-graph trees (torch.compile(mode="reduce-overhead")) warm a graph up, every
    allocation of the calling thread goes to the graphs' private pool, and a block still alive there after
    the call that no graph output owns is refused ("tensor(s) in the cudagraph pool not tracked as
    outputs"; session 17's H200 run). The pool is chosen per thread, so another thread's allocation comes
    from the ordinary one. That thread's stream is the GPU's default one: synchronized there, the zeros
    are in place before any stream uses them.
    """
    made: list[torch.Tensor] = []
    failed: list[BaseException] = []

    def make() -> None:
        try:
            made.append(torch.zeros(count, device=device, dtype=torch.int32))
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
        except BaseException as error:  # (re-raised on the caller's thread)
            failed.append(error)

    worker = threading.Thread(target=make, name="bnlab-counters")
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    return made[0]


# The current stream's raw handle, asked for as Triton's own launcher does (no Stream object built on
# every call); through the public API where a build lacks the private function (CPU builds).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream
)


class GraphCounters:
    """Counters for the reductions of CUDA graphs being captured, zeroed before any capture.

    A captured reduction needs counters of its own (its graph may replay on another stream, beside eager
    launches on this one) that are zero when the graph's first replay starts; the kernels leave them at
    zero after each replay. `torch.zeros` during the capture would put a fill kernel before every
    reduction in the graph: a node between two dependent kernels (session 8 measured 8.5-13 us a step
    outside the kernels; two fills a step are part of it). So eager calls set a reserve aside (`top_up`:
    zeroed, then the stream synchronized once, so that a capture on any stream finds it zero) and each
    captured reduction takes its own slice of it (`take`).
    A graph keeps the addresses it was captured with, so a slice taken is never given out again:
    `limit` counters a GPU in all, then captures zero their own, as before. A reduction takes a few
    hundred (32 at least); a slab (131072, 512 KB) holds a whole ResNet-50 training step's 106 (19 thousand
    NCHW, 6 thousand channels-last at batch 256 on 132 multiprocessors, by `plan_for`'s arithmetic), and
    an eager call tops it up when less than half of one is left.
    """

    def __init__(self, slab: int = 1 << 17, limit: int = 1 << 23) -> None:
        self.slab, self.limit = slab, limit
        self._free: dict[torch.device, torch.Tensor] = {}  # what is left of the newest slab
        self._slabs: list[torch.Tensor] = []  # every slab, alive for as long as graphs may use it
        self._lock = threading.Lock()  # (captures on two threads must not take the same slice)

    def top_up(self, device: torch.device) -> None:
        """Called outside captures: a new slab when less than half of one is left, within `limit`."""
        free = self._free.get(device)
        if free is not None and 2 * free.numel() >= self.slab:
            return
        with self._lock:
            allocated = sum(slab.numel() for slab in self._slabs if slab.device == device)
            if allocated + self.slab > self.limit or self._free.get(device) is not free:
                return  # (the limit reached, or another thread has just topped up)
            slab = _kept_zeros(self.slab, device)  # (zero before a capture on any stream)
            self._slabs.append(slab)
            self._free[device] = slab

    def take(self, device: torch.device, count: int) -> torch.Tensor | None:
        """`count` zeroed counters no one else has, or None when the reserve cannot give them. Each slice
        starts 128 bytes into a slab times a whole number, as a buffer of its own does: Triton compiles a
        variant per pointer alignment (16 bytes or not), and a capture cannot compile one."""
        with self._lock:
            free = self._free.get(device)
            if free is None or free.numel() < count:
                return None
            self._free[device] = free[min(free.numel(), -(-count // 32) * 32) :]
            return free[:count]

    def left(self, device: torch.device) -> int:
        free = self._free.get(device)
        return 0 if free is None else free.numel()


_GRAPH_COUNTERS = GraphCounters()


def _semaphores(device: torch.device, count: int) -> torch.Tensor:
    """`count` zeroed int32 arrival counters.

    The last program of each channel block zeroes its counter again, so a buffer is all zeros whenever
    no kernel is running on its stream: one buffer per (GPU, stream) serves every launch on it (kernels
    on one stream never overlap; on two streams they could, hence not one buffer per GPU). A reduction
    in a graph being captured gets counters of its own from `_GRAPH_COUNTERS` (its replays may run on
    another stream); the CPU interpreter a fresh buffer.
    """
    if device.type != "cuda":
        return torch.zeros(count, device=device, dtype=torch.int32)
    if device.index is None:  # (a tensor's device always names its GPU; this is for other callers)
        device = torch.device("cuda", _gpu_index(device))
    if _capturing(device):
        taken = _GRAPH_COUNTERS.take(device, count)
        return taken if taken is not None else torch.zeros(count, device=device, dtype=torch.int32)
    _GRAPH_COUNTERS.top_up(device)
    key = (device.index, _raw_stream(device.index))
    buffer = _SEMAPHORES.get(key)
    if buffer is None or buffer.numel() < count:
        buffer = _SEMAPHORES[key] = _kept_zeros(max(count, 1024), device)
    return buffer


# ---- launchers --------------------------------------------------------------------------------------


def _made_current(device: torch.device) -> contextlib.AbstractContextManager:
    """`device` made the current CUDA device for the duration: Triton launches on the current one (a tensor
    on cuda:1 while cuda:0 is current would be read through the wrong context); a no-op where it already is,
    or where the process sees one GPU (nothing to ask then), as in a process per GPU."""
    if (
        device.type == "cuda"
        and device.index is not None
        and _several_gpus()
        and device.index != torch.cuda.current_device()
    ):
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@functools.cache
def _several_gpus() -> bool:
    """Whether this process sees more than one GPU (fixed once CUDA is initialized: CUDA_VISIBLE_DEVICES)."""
    return torch.cuda.device_count() > 1


def _on_input_device(fn):
    """`fn`'s launches on the device of its first argument (see `_made_current`)."""

    @functools.wraps(fn)
    def on_device(t: torch.Tensor, *args, **kwargs):
        with _made_current(t.device):
            return fn(t, *args, **kwargs)

    return on_device


@_on_input_device
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
    layout: str | None = None,
    plan: Plan | None = None,
    guard: torch.Tensor | None = None,
    num_batches_tracked: torch.Tensor | None = None,
    ghosts: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(y, mean, invstd): y in x's layout; mean and invstd float32 per channel, the ones y was computed with.

    `x` (and `residual`) must already be in a kernel layout (see `layout_of`, `to_layout`; `layout`, when
    given, is `layout_of(x)`, saving the caller's second look); in training the
    running statistics, when given, are updated in place (momentum already resolved by the caller). In
    inference, `save_stats=False` (no backward to come) lets the kernel read the running statistics
    directly and returns None for mean and invstd. `plan`: instead of `make_plan`'s (tests).

    `guard` (training with running statistics; int32, on the device or in pinned host memory): the update
    is kept only if every channel's updated statistics are finite, and then `num_batches_tracked` (if
    given) counts the batch; guard[0] gets the verdict word (`bnlab.kernels`' VERDICT_* bits: arrived,
    kept, the old statistics finite; `_guard_kernel`).

    `ghosts` > 1 (ghost batch norm without a copy): x's consecutive chunks of N // ghosts samples are
    normalized each with its own statistics, as if laid side by side as channels; the statistics, the
    parameters, the running statistics (and `backward`'s parameter gradients) have ghosts * C channels,
    ghost j's channel c at j * C + c (see `Plan`).
    """
    layout = layout or layout_of(x)
    if plan is None:
        plan = make_plan(x, layout, ghosts)
    C, itemsize = plan.C, x.element_size()
    y = torch.empty_like(x)
    mean = torch.empty(C, device=x.device, dtype=torch.float32)
    invstd = torch.empty(C, device=x.device, dtype=torch.float32)
    dummy = mean
    epilogue = _epilogue(weight, bias, residual, relu)
    params = (weight if weight is not None else dummy, bias if bias is not None else dummy)
    has_running = running_mean is not None
    running = (running_mean, running_var) if has_running else (dummy, dummy)
    guarded = guard is not None and training and has_running
    # (guarded: the kernels write the updated statistics into scratch, which the guard commits or drops)
    updated = tuple(torch.empty_like(t) for t in running) if guarded else running
    z = residual if residual is not None else x
    if training and plan.single:
        _run(
            _single_tile_forward_kernel, (C,),
            (x, z, y, mean, invstd, *running, *updated, *params, plan.N, C, plan.S, eps, momentum),
            dict(BLOCK_N=plan.block_a, BLOCK_S=plan.block_b, HAS_RUNNING=has_running, num_warps=plan.num_warps,
                 enable_fp_fusion=FP_FUSION, **epilogue),
            x.device,
        )  # fmt: skip
        if guarded:
            guard_update(running, updated, guard, num_batches_tracked)
        return y, mean, invstd
    if training:
        partials = _partials(plan, x.device, 3)  # (one wave cuts slices: never more rows than these)
    elif save_stats:
        # The backward must see the very invstd the forward used (it recomputes the ReLU mask from it).
        mean.copy_(running_mean)
        torch.rsqrt(running_var.float() + eps, out=invstd)
    from_running = not training and not save_stats
    stats = (running_mean, running_var) if from_running else (mean, invstd)
    apply = _elementwise_passes(plan, x.device)

    late = None  # (first row, rows) of the partials that normalize combines (LATE_COMBINE)
    if training:
        update = (running, updated) if has_running else None
        reduced = _launch_statistics(x, plan, partials, (mean, invstd), update, eps, momentum, late_ok=True)
        late = _late_rows(reduced, itemsize)
    combined = (*partials[:3], *running, *updated) if late else (dummy,) * 7
    _launch(
        _apply_kernel, apply, x.device,
        lambda p: (x, z, y, *stats, *params, *combined, *p.shape_args, eps, momentum, *(late or (0, 0))),
        _apply_options, (from_running, late, has_running and late is not None, *epilogue.values()),
    )  # fmt: skip
    if guarded:
        guard_update(running, updated, guard, num_batches_tracked)
    return (y, None, None) if from_running else (y, mean, invstd)


_EPILOGUE = ("HAS_WEIGHT", "HAS_BIAS", "HAS_RESIDUAL", "RELU")  # (the kernels' epilogue flags, in this order)


def _epilogue(
    weight: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None, relu: bool
) -> dict[str, bool]:
    """The kernels' epilogue constexprs, by name in _EPILOGUE's order: the option builders take their values
    positionally (`_apply_options`, `_grad_options`, `_input_grad_options`) and name them again
    (`_epilogue_named`)."""
    return _epilogue_named((weight is not None, bias is not None, residual is not None, relu))


def _epilogue_named(flags: tuple[bool, ...]) -> dict[str, bool]:
    """The epilogue flags `flags` (in _EPILOGUE's order) by their constexprs' names."""
    return dict(zip(_EPILOGUE, flags, strict=True))


def _apply_options(
    p: Plan, from_running: bool, late: tuple[int, int] | None, has_running: bool, *epilogue: bool
) -> dict:
    """The normalize kernel's constexprs and options over `p` (`forward`; `epilogue`: _EPILOGUE's values)."""
    return dict(FROM_RUNNING=from_running, STAGES=APPLY_STAGES[p.layout], **_late_options(p, late),
                HAS_RUNNING=has_running, EVICT=SECOND_READ_EVICTION, **_epilogue_named(epilogue),
                **_block_args(p))  # fmt: skip


def _launch_statistics(
    x: torch.Tensor, plan: Plan, partials: list[torch.Tensor], stats: tuple[torch.Tensor, torch.Tensor],
    update: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None, eps: float,
    momentum: float, late_ok: bool,
) -> Plan:  # fmt: skip
    """The statistics pass of a split plan: `stats` (mean, invstd) of `x`, and with `update` = (running,
    updated) the running statistics updated from `running` into `updated` (the same tensors, or scratch for
    the guard); with `late_ok` the last combine may be left to the normalize pass (LATE_COMBINE), else the
    pass finalizes itself. Returns the plan it was launched over (one wave may cut its slices)."""
    itemsize = x.element_size()
    unread = (stats[0], stats[0])  # (pointers for the kernel's running-statistics arguments, not read)
    running, updated = update if update is not None else (unread, unread)
    return _launch(
        _stats_kernel, plan, x.device,
        lambda p: (x, *partials, *stats, *running, *updated, *p.shape_args, eps, momentum),
        _stats_options, (update is not None, late_ok, itemsize),
    )  # fmt: skip


def _stats_options(p: Plan, has_running: bool, late_ok: bool, itemsize: int) -> dict:
    """The statistics kernel's constexprs and options over `p` (`_launch_statistics`)."""
    return dict(SPLIT=p.splits > 1, SPLIT_BLOCK=_split_block(p), HAS_RUNNING=has_running,
                LATE=late_ok and _late(p, itemsize), **_stats_loop(p, itemsize),
                **_block_args(p, reduction=True))  # fmt: skip


@_on_input_device
def statistics(
    x: torch.Tensor, eps: float, layout: str | None = None, ghosts: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, invstd) of `x` per channel, float32: the batch statistics a training forward would normalize
    with, from one read of `x` by the statistics kernel (a split plan, also where a forward would take the
    single tile; no running statistics). For batch renorm, whose r and d need them before its normalizing
    call: one read of `x` in its own dtype instead of a float32 copy of it and torch's var_mean over that.
    `x` in a kernel layout (`layout`, when given, is `layout_of(x)`); `ghosts`: as in `forward`."""
    layout = layout or layout_of(x)
    plan = make_plan(x, layout, ghosts, single_tile_max=0)
    mean = torch.empty(plan.C, device=x.device, dtype=torch.float32)
    invstd = torch.empty(plan.C, device=x.device, dtype=torch.float32)
    partials = _partials(plan, x.device, 3)
    _launch_statistics(x, plan, partials, (mean, invstd), None, eps, 0.0, late_ok=False)
    return mean, invstd


GUARD_BLOCK = 1024  # channels a step of the guard's one program


def guard_update(
    running: tuple[torch.Tensor, torch.Tensor],
    updated: tuple[torch.Tensor, torch.Tensor],
    verdict: torch.Tensor,
    num_batches_tracked: torch.Tensor | None,
    batches: int = 1,
) -> None:
    """Copy the `updated` running statistics (mean, variance: contiguous, C each) into `running` if every
    updated variance is finite, and then add `batches` to `num_batches_tracked`; `verdict` (int32: its
    first element, on the device or in pinned host memory) gets the verdict word (`bnlab.kernels`'s
    VERDICT_* bits). One launch of `_guard_kernel`, no host sync."""
    count = num_batches_tracked if num_batches_tracked is not None else running[0]  # (unread without one)
    device = running[0].device
    with _made_current(device):
        _run(
            _guard_kernel, (1,), (*running, *updated, verdict, count, running[0].numel(), batches),
            dict(BLOCK=GUARD_BLOCK, HAS_COUNT=num_batches_tracked is not None, num_warps=4), device,
        )  # fmt: skip


@_on_input_device
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
    layout: str | None = None,
    plan: Plan | None = None,
    ghosts: int = 1,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dweight, dbias, dresidual), each None where not needed; dweight/dbias float32.

    `dy` must be in x's layout (see `to_layout`). In training dx needs the per-channel sums, so the
    reduction pass runs whenever dx or a parameter gradient is needed. `plan`, `ghosts`: as in `forward`.
    """
    layout = layout or layout_of(x)
    if plan is None:
        plan = make_plan(x, layout, ghosts)
    C, itemsize = plan.C, x.element_size()
    dummy = mean
    flags = _epilogue(weight, bias, residual, relu)
    tensors = (
        x, residual if residual is not None else x, mean, invstd,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
    )  # fmt: skip
    dx = torch.empty_like(x) if need_input else None
    dz = torch.empty_like(x) if need_residual and residual is not None else None
    outputs = (dx if dx is not None else dy, dz if dz is not None else dy)
    writes = dict(WRITE_DX=dx is not None, WRITE_DZ=dz is not None)
    # One kernel does it all (single tile) when training needs any gradient; the split plan needs the sums
    # for the parameters, or (training) for dx.
    fused = training and plan.single and (need_input or need_params or need_residual)
    dweight = dbias = None
    coef = dummy
    if fused or need_params or (training and need_input):
        dweight = torch.empty(C, device=x.device, dtype=torch.float32)
        dbias = torch.empty(C, device=x.device, dtype=torch.float32)
    if not fused and dweight is not None:  # (dx's two coefficients a channel, from the gradient sums)
        coef = torch.empty(2 * C, device=x.device, dtype=torch.float32)
    if fused:
        _run(
            _single_tile_backward_kernel, (C,),
            (dy, x, tensors[1], *outputs, *tensors[2:], dweight, dbias, plan.N, C, plan.S),
            dict(BLOCK_N=plan.block_a, BLOCK_S=plan.block_b, num_warps=plan.num_warps, enable_fp_fusion=FP_FUSION,
                 **writes, **flags),
            x.device,
        )  # fmt: skip
    else:
        # With the residual's gradient wanted, the sums pass writes it (dz = g, exact in dy's dtype), and dx
        # comes from g and x: 4 + 3 tensor passes instead of 3 + 5 (dx would read dy, x, z for the mask).
        dz_early = dweight is not None and dz is not None and dz.dtype == dy.dtype
        reduce = dweight is not None
        if reduce:
            partials = _partials(plan, x.device, 2)  # (one wave cuts slices: never more rows than these)
            sums_args = (dy, *tensors, dz if dz_early else dy, *partials, dweight, dbias, coef)
        dx_flags = flags  # (the sums pass keeps `flags`)
        if dz_early:  # dx from g: dz read as dy, through no mask and no residual
            dy, tensors = dz, (x, x, *tensors[2:])
            outputs, writes = (outputs[0], dy), {**writes, "WRITE_DZ": False}
            dx_flags = {**flags, "HAS_RESIDUAL": False, "RELU": False}
        elementwise = dx is not None or (dz is not None and not dz_early)
        apply = _elementwise_passes(plan, x.device) if elementwise else plan

        # (dx combines the sums' partials only in training, where it needs them; coef stays allocated: a
        # launch cut to one slice finalizes into it)
        late_ok = training and elementwise
        late = None  # (first row, rows) of the partials that dx combines (LATE_COMBINE)
        if reduce:
            reduced = _launch(
                _grad_kernel, plan, x.device, lambda p: (*sums_args, *p.shape_args), _grad_options,
                (late_ok, itemsize, dz_early, *flags.values()),
            )  # fmt: skip
            late = _late_rows(reduced, itemsize) if late_ok else None
        if elementwise:
            combined = (*partials[:2], dweight, dbias) if late else (dummy,) * 4
            _launch(
                _input_grad_kernel, apply, x.device,
                lambda p: (dy, *tensors[:2], *outputs, *tensors[2:], coef, *combined, *p.shape_args,
                           *(late or (0, 0))),
                _input_grad_options, (training, late, *writes.values(), *dx_flags.values()),
            )  # fmt: skip
    return dx, (dweight if need_params else None), (dbias if need_params else None), dz


def _grad_options(p: Plan, late_ok: bool, itemsize: int, write_dz: bool, *epilogue: bool) -> dict:
    """The gradient sums kernel's constexprs and options over `p` (`backward`; `epilogue`: _EPILOGUE's)."""
    return dict(SPLIT=p.splits > 1, SPLIT_BLOCK=_split_block(p), STAGES=_grad_stages(p),
                LATE=late_ok and _late(p, itemsize), WRITE_DZ=write_dz, **_epilogue_named(epilogue),
                **_block_args(p, reduction=True))  # fmt: skip


def _input_grad_options(
    p: Plan, training: bool, late: tuple[int, int] | None, write_dx: bool, write_dz: bool, *epilogue: bool
) -> dict:
    """The dx kernel's constexprs and options over `p` (`backward`; `epilogue`: _EPILOGUE's values)."""
    return dict(TRAINING=training, STAGES=APPLY_STAGES[p.layout], **_late_options(p, late), WRITE_DX=write_dx,
                WRITE_DZ=write_dz, EVICT=SECOND_READ_EVICTION, **_epilogue_named(epilogue),
                **_block_args(p))  # fmt: skip


# ---- knobs and memos ------------------------------------------------------------------------------------


class _Knobs(types.ModuleType):
    """This module's type: setting any of its attributes (a knob, as `bnlab.gpubench.knobs_set` and the
    tests do; a stand-in for a kernel or a helper) forgets the plans and launch decisions made before
    (`_PLANS`, `_PASSES`, `_DECIDED`), which depend on them. (A knob's dict changed in place is not seen:
    set a new one.)"""

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        for memo in (_PLANS, _PASSES, _DECIDED):
            memo.clear()


sys.modules[__name__].__class__ = _Knobs
