"""Per-kernel GPU time of bnlab's Triton batch norm, forward+backward, on a few ResNet-50 shapes.

Usage (on a GPU machine): PYTHONPATH=src python3 benchmarks/profile_kernels.py [--dtype bfloat16] [--set large]
For each shape and layout: the plans (`describe_plans`), then every kernel's mean GPU time over 20 training
steps (torch.profiler, CUDA activity), its share of the step, and the minimal-traffic floor of the step at
the device's copy bandwidth: which pass (statistics, normalize, gradient sums, dx) to work on;
and the step as the bench times it (replayed from a CUDA graph), whose excess over the kernels' sum is
the time between them.
Sets: `large` (default) profiles ResNet-50's shapes at the defaults, then a few under other knobs;
`small` profiles the 7x7 and 14x14 layers (28 of the 53, the furthest from the floor after session 5)
under the knobs that change their fixed costs (launches, slices, combine); `nchw`
every NCHW layer shape at the defaults and under the settings they replaced (session 7); `cl` every
channels-last layer shape under narrower channel blocks, deeper statistics, fewer reduction programs /
more elementwise ones.
`--warm-jobs N` compiles every setting's kernels in N processes first.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bnlab import kernels
from bnlab.gpubench import (
    compile_training_steps,
    copy_bandwidth_gbps,
    knobs_set,
    make_timer,
    min_traffic_bytes,
    resnet50_bn_shapes,
    training_step,
    training_tensors,
)

SHAPES = [
    ((256, 64, 112, 112), "NCHW"),
    ((256, 256, 56, 56), "NCHW"),
    ((256, 256, 56, 56), "channels_last"),
    ((256, 512, 28, 28), "channels_last"),
    ((256, 1024, 14, 14), "NCHW"),
    ((256, 2048, 7, 7), "NCHW"),
    ((256, 2048, 7, 7), "channels_last"),
]
STEPS = 20
# Then the split plans of these shapes again under other knobs, one knob setting at a time over all of
# them (a run cut short keeps whole settings). (Run 3 timed the reductions unpipelined and 3 deep, and
# PROGRAMS_PER_SM 8, on these shapes: results/h200-2026-11-27/profile-run3.log; run 4 APPLY_STAGES 2,
# PLANES_MIN_RUN 1024 and GRAD_STAGES_LONG 2: profile-run4.log.)
VARIANT_SHAPES = ([(256, 256, 56, 56), "channels_last"], [(256, 256, 56, 56), "NCHW"], [(256, 2048, 7, 7), "NCHW"])
# Grids as planned, over one wave where they are (session 8's default cuts them): profiled only on the
# shapes whose launches at the defaults were cut (`_was_cut`), i.e. after the defaults.
NO_WAVE_CUT = {"ONE_WAVE": False}
# (session 27) channels-last reductions in 16-warp programs of 4x the tiles, one an SM: 4x fewer slices, one
# combine level (REDUCTION_ROWS_TILE_SCALE; sm_90, Triton 3.6: 127 and 118 registers, no spills, the loops'
# instructions a value as at the defaults). gpu_session.sh's first default candidate.
WIDE_ROWS = {
    "REDUCTION_ROWS_TILE_SCALE": 4,
    "REDUCTION_WARPS": {"planes": 4, "rows": 16},
    "PROGRAMS_PER_SM": {"planes": 2, "rows": 1},
    "SMALL_PROGRAMS_PER_SM": {"planes": 4, "rows": 1},
}
# ... and the 2-byte statistics' loads 3 tiles ahead through shared memory instead of one prefetched in
# registers: more bytes in flight at the same registers (sm_90, Triton 3.6: 128, no spills, 96 KB of shared
# memory, one program an SM; 4-warp programs lost at 2 deep in bf16, run 10). The gradient sums stay 2 deep:
# 3 would take float32's 64 KB tiles of dy and x past the shared memory an SM has (kernel_sass.py: no program
# fits). gpu_session.sh's second default candidate.
WIDE_DEEP = {**WIDE_ROWS, "STATS_PREFETCH": {"planes": False, "rows": False}, "STATS_STAGES": {"planes": 3, "rows": 4}}
# (profile sets `small` and `cl`: both, then the wide reductions with the last combine left to the
# elementwise passes: one group, so no combine in the reductions at all)
WIDE = (WIDE_ROWS, WIDE_DEEP, {**WIDE_ROWS, "LATE_COMBINE": {"planes": True, "rows": True}})
VARIANTS = (
    {"APPLY_STAGES": {"planes": 2, "rows": 2}},  # the elementwise passes' loads pipelined too
    {"PLANES_MAX_RUN": 4096},  # NCHW 56x56: a whole plane a tile (1 x 4096) instead of 4 x 1024
    {"GRAD_STAGES_LONG": {"planes": 2, "rows": 2}},  # the gradient sums 2 deep whatever the loop's length
)
SETS = {
    "large": (SHAPES, VARIANT_SHAPES, VARIANTS),
    "small": (
        [],
        [((256, 512, 7, 7), "NCHW"), ((256, 512, 7, 7), "channels_last"), ((256, 256, 14, 14), "NCHW"),
         ((256, 256, 14, 14), "channels_last")],
        (  # most wanted first (a run cut short keeps the first settings)
            {},  # the defaults
            *WIDE,
            # session 16's defaults: NCHW grouped reductions' per-channel sums by segmented scans, and the
            # combine's last level in the reductions (run 17 made the gather and, for 2-byte planes, the late
            # combine the defaults: the bf16 NCHW sum 0.960 of the step)
            {"GATHER_GROUPED_SUMS": False, "LATE_COMBINE": {"planes": False, "rows": False}},
            {"LATE_COMBINE": {"planes": True, "rows": True}},  # (run 17: channels-last bf16 sum 1.013)
            # channels-last statistics' next tile prefetched in registers (session 15: latency-bound, run 16)
            {"STATS_PREFETCH": {"planes": False, "rows": False}},  # (the default for 2-byte rows since run 17)
            # (session 18) the elementwise passes' input loads with an L2 evict-first hint
            {"SECOND_READ_EVICTION": "evict_first"},
            # channels-last reductions in blocks of 32 bf16 channels (the default 64 since run 13; 128 before;
            # session 18's SMALL_REDUCTION_ROWS_BLOCK_CHANNELS 32 is this on these shapes)
            {"REDUCTION_ROWS_BLOCK_CHANNELS": 32},
            {"REDUCTION_ROWS_BLOCK_CHANNELS": 128},
            {"TILE": 8192},  # bf16 tiles of 8192 values (run 11: 0.90-0.98 of the step on these four)
            # Twice the warps in the reductions (90-98 registers: 2 programs of 8 warps a multiprocessor, sm_90,
            # Triton 3.6); run 11 (rows 8 too): NCHW 14x14 0.95 of the step, 7x7 1.15, channels-last 1.21-1.29
            {"REDUCTION_WARPS": {"planes": 8, "rows": 4}},
            # the reductions of tensors within L2 at a full wave (8 asks for more than fits: ONE_WAVE cuts it
            # to what the compiled kernel holds, 3-4 an SM at 7x7/14x14; run 11: as 4)
            {"SMALL_PROGRAMS_PER_SM": {"planes": 8, "rows": 8}},
            {"COMBINE_VALUES": 8192},  # one combine step instead of two
        ),
    ),
    # Every NCHW layer shape: session 7's defaults, then the candidates most wanted first (run 5 timed the
    # settings these defaults replaced: profile-run5.log); a setting is profiled only on the shapes whose
    # plans, gradient-sum depth or combine step it changes (`_changes`).
    "nchw": (
        [],
        [(shape, "NCHW") for shape in dict.fromkeys(shape for _, shape in resnet50_bn_shapes(256))],
        (
            {},
            {"GATHER_GROUPED_SUMS": False},  # (grouped shapes: 7x7, 14x14; the default since run 17)
            {"LATE_COMBINE": {"planes": False, "rows": False}},  # (the default for 2-byte planes since run 17)
            {"SECOND_READ_EVICTION": "evict_first"},  # (session 18: the elementwise passes' input loads)
            NO_WAVE_CUT,
            {"PLANES_MAX_RUN": 4096},  # 56x56: one plane a tile (1 x 4096) instead of 4 x 1024
            {"APPLY_PROGRAMS_PER_SM": {"planes": 8, "rows": 4}},  # more loads in flight still
            {"PROGRAMS_PER_SM": {"planes": 4, "rows": 4}},  # the reductions as the elementwise passes
            {"SMALL_PROGRAMS_PER_SM": {"planes": 4, "rows": 4}},  # the same on tensors within L2 only
        ),
    ),
    # The channels-last analogue of run 5's finding (reductions at fewer programs, elementwise passes at
    # more), untimed per pass so far (run 2 timed 2 against 4 programs per SM for all passes at once).
    "cl": (
        [],
        [(shape, "channels_last") for shape in dict.fromkeys(shape for _, shape in resnet50_bn_shapes(256))],
        (
            {},
            *WIDE,
            # narrower blocks: fewer slices a block for the same programs (run 4: 7x7 statistics 19.6 us for
            # 12.8 MB at 131 slices of 3 tiles, then a combine of 131 partials)
            # the reductions' alone (default 64 channels since run 13; run 10: all passes, below)
            # (session 15: the combine's last level off the reductions' critical path; run 17, bf16: 1.013 of the
            # channels-last sum)
            {"LATE_COMBINE": {"planes": True, "rows": True}},
            # (session 15: two tiles in flight a program; the default for 2-byte rows since run 17)
            {"STATS_PREFETCH": {"planes": False, "rows": False}},
            {"SECOND_READ_EVICTION": "evict_first"},  # (session 18: the elementwise passes' input loads)
            {"SMALL_REDUCTION_ROWS_BLOCK_CHANNELS": 32},  # (session 18: the layers within L2)
            {"REDUCTION_ROWS_BLOCK_CHANNELS": 128},
            {"REDUCTION_ROWS_BLOCK_CHANNELS": 32},
            {"ROWS_BLOCK_BYTES": 128},  # (64 channels a block in bf16, 32 in float32)
            {"ROWS_BLOCK_BYTES": 64},
            # statistics loads 2 deep (run 4's 14x14 statistics: 25.7 us for 25.7 MB, a dozen tiles a
            # program, each load waited for; at 56x56, ~190 tiles a program, 3 deep was slower): sm_90,
            # Triton 3.6, 128 registers instead of 121, no spills, the same 4 programs an SM
            {"STATS_STAGES": {"planes": 3, "rows": 2}},
            {"PROGRAMS_PER_SM": {"planes": 2, "rows": 2}},
            {"APPLY_PROGRAMS_PER_SM": {"planes": 4, "rows": 8}},
            # run 4: combining 64 partials a step (COMBINE_VALUES 8192) took 256x512x7x7 from 48.5 to 61.9
            # us, the reductions' combine is on the critical path there: smaller steps
            {"COMBINE_VALUES": 1024},
        ),
    ),
}  # fmt: skip
# The knobs each profiled shape's line prints (every knob a set changes: profile_sums.py tells the settings
# apart by them).
PRINTED_KNOBS = (
    "PROGRAMS_PER_SM",
    "SMALL_PROGRAMS_PER_SM",
    "APPLY_PROGRAMS_PER_SM",
    "STATS_STAGES",
    "STATS_STAGES_FLOAT32",
    "GRAD_STAGES",
    "GRAD_STAGES_LONG",
    "LONG_LOOP_TILES",
    "APPLY_STAGES",
    "TILE",
    "TILE_BYTES",
    "COMBINE_VALUES",
    "PLANES_MIN_RUN",
    "PLANES_MAX_RUN",
    "REDUCTION_WARPS",
    "ONE_WAVE",
    "ROWS_BLOCK_BYTES",
    "REDUCTION_ROWS_BLOCK_CHANNELS",
    "SMALL_REDUCTION_ROWS_BLOCK_CHANNELS",
    "GATHER_GROUPED_SUMS",
    "LATE_COMBINE",
    "LATE_COMBINE_FLOAT32",
    "STATS_PREFETCH",
    "STATS_PREFETCH_FLOAT32",
    "SECOND_READ_EVICTION",
    "REDUCTION_ROWS_TILE_SCALE",
)
# Knobs that act only through the plan, the gradient sums' depth and the reductions' constexprs: a setting
# of these alone that leaves them as they are would time the same kernels again.
PLAN_KNOBS = {
    "PLANES_MIN_RUN",
    "PLANES_MAX_RUN",
    "PROGRAMS_PER_SM",
    "SMALL_PROGRAMS_PER_SM",
    "APPLY_PROGRAMS_PER_SM",
    "GRAD_STAGES_LONG",
    "LONG_LOOP_TILES",
    "TILE",
    "TILE_BYTES",
    "COMBINE_VALUES",
    "ROWS_BLOCK_BYTES",
    "REDUCTION_ROWS_BLOCK_CHANNELS",
    "SMALL_REDUCTION_ROWS_BLOCK_CHANNELS",
    "GATHER_GROUPED_SUMS",
    "STATS_PREFETCH",
    "STATS_PREFETCH_FLOAT32",
    "REDUCTION_ROWS_TILE_SCALE",
}


def profile_shape(shape: tuple[int, ...], layout: str, dtype: torch.dtype, copy_gbps: float, timer) -> None:
    """Prints the plans, the step as the bench times it (`timer`: replayed from a CUDA graph, L2 flushed
    first), and each kernel's mean time over STEPS steps called from Python (torch.profiler). The graph's
    step minus the kernels' sum is what lies between and around the kernels: launches, ramp-ups, the
    counters' zeroing in a captured graph, the flush's write-backs."""
    x, rm, rv, w, b, dy = training_tensors(shape, layout, dtype, "cuda")

    def step() -> None:
        training_step(x, rm, rv, w, b, dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    times: dict[str, list[float]] = defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name].append(event.device_time)  # us
    floor_us = min_traffic_bytes(math.prod(shape), dtype.itemsize, "both") / copy_gbps / 1e3
    total = sum(sum(v) for v in times.values()) / STEPS
    graph_us = timer(functools.partial(training_step, x, rm, rv, w, b, dy)) * 1e6
    K = kernels.load()
    knobs = {name: getattr(K, name) for name in PRINTED_KNOBS}
    print(f"{'x'.join(map(str, shape))} {layout} {str(dtype)[6:]} {knobs}: {K.describe_plans(x)}")
    print(f"  kernels {total:8.1f} us a step; floor {floor_us:.1f} us at copy speed ({floor_us / total:.2f} of it)")
    print(f"  graph   {graph_us:8.1f} us a step (the bench's timer), {graph_us - total:+.1f} us beside the kernels")
    for name, values in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        mean = sum(values) / STEPS
        print(f"  {mean:8.1f} us  {len(values) / STEPS:4.1f}x  {100 * mean / total:5.1f}%  {name[:90]}")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--set", default="large", choices=sorted(SETS), help="which shapes and knobs (see above)")
    parser.add_argument("--warm-jobs", type=int, default=0, help="processes compiling every setting's kernels first")
    args = parser.parse_args()
    shapes, variant_shapes, variants = SETS[args.set]
    dtype = getattr(torch, args.dtype)
    K = kernels.load()
    runs = [(shape, layout, {}) for shape, layout in shapes] + [
        (shape, layout, knobs)
        for knobs in variants
        for shape, layout in variant_shapes
        if not (_plan_knobs(knobs) and not _changes(K, shape, layout, dtype, _plan_knobs(knobs)))
    ]
    if args.warm_jobs:
        start = time.perf_counter()
        errors = compile_training_steps(runs, dtype, args.warm_jobs)
        print(f"compiled {len(runs)} settings' kernels in {time.perf_counter() - start:.0f} s; {len(errors)} errors")
    copy = copy_bandwidth_gbps(make_timer("cuda"), "cuda")
    print(f"{torch.cuda.get_device_name()}: copy {copy:.0f} GB/s")
    graph_timer = make_timer("cuda", warmup_ms=3, rep_ms=10, graphs=True)  # (a few hundred replays at most)
    for shape, layout, knobs in runs:
        if knobs == NO_WAVE_CUT and not _was_cut(K, shape, layout, dtype):
            continue
        with knobs_set(K, knobs):
            profile_shape(shape, layout, dtype, copy, graph_timer)
    return 0


def _planning_tensor(shape: tuple[int, ...], layout: str, dtype: torch.dtype, device: str) -> torch.Tensor:
    """An uninitialised tensor of `shape` in `layout` on `device`: enough for the planner, which asks for
    shape, strides, dtype and (on a GPU) the multiprocessor count."""
    x = torch.empty(shape, dtype=dtype, device=device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _was_cut(K, shape: tuple[int, ...], layout: str, dtype: torch.dtype, device: str = "cuda") -> bool:
    """Whether a launch at the defaults cut one of this shape's passes to one wave (K._FITTED, filled by the
    launches so far)."""
    x = _planning_tensor(shape, layout, dtype, device)
    plan = K.make_plan(x, K.layout_of(x))
    apply = K._elementwise_passes(plan, x.device)
    return any(planned in (plan, apply) for _, planned in K._FITTED)


def _plan_knobs(knobs: dict) -> dict:
    """The knobs of a setting that act through the plan: where they leave it as it is, the setting is
    not profiled (it would time the defaults again, or only its other knobs, which other settings time)."""
    return {name: value for name, value in knobs.items() if name in PLAN_KNOBS}


def _changes(K, shape: tuple[int, ...], layout: str, dtype: torch.dtype, knobs: dict, device: str = "cuda") -> bool:
    """Whether `knobs` change the plans (the reductions', the elementwise passes'), the gradient
    sums' depth, the combine's step or the reductions' constexprs (GATHER_SUMS, PREFETCH) on
    this shape (planning asks the GPU's multiprocessor count: an uninitialised tensor on the device)."""
    x = _planning_tensor(shape, layout, dtype, device)

    def plan() -> tuple:
        p = K.make_plan(x, K.layout_of(x))
        kernel_args = (K._block_args(p, True), K._stats_loop(p, x.element_size()))
        return p, K._grad_stages(p), K._elementwise_passes(p, x.device), K._split_block(p), kernel_args

    before = plan()
    with knobs_set(K, knobs):
        after = plan()
    return before != after


if __name__ == "__main__":
    sys.exit(main())
