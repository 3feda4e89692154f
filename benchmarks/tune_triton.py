"""Sweep the Triton kernels' launch knobs on a GPU: tile size, warps, single-pass threshold, programs per SM.

Usage (on a GPU machine): PYTHONPATH=src python3 benchmarks/tune_triton.py [--out FILE.csv]
Times training forward+backward (bnlab.functional.batch_norm, backend "triton") on shapes that stress
each plan: many values per channel (split reductions), few (7x7), channels-last, BatchNorm1d, with the
same timer as `bnlab bench --gpu` (CUDA events, L2 flushed). Prints one line per (shape, knobs) with the
fraction of the measured copy bandwidth on the minimal traffic, and the best knobs per shape; the
defaults in bnlab/kernels/batchnorm.py (TILE, NUM_WARPS, SINGLE_TILE_MAX, PROGRAMS_PER_SM) come from here.
Two stages per shape: the knobs that change the compiled kernels (TILE x NUM_WARPS x SINGLE_TILE_MAX),
then at the best of those PROGRAMS_PER_SM (how many slices the split reductions use), COMBINE_VALUES
(partials combined per step), APPLY_STAGES 2 (the elementwise passes pipelined) and, where it changes
the tiles, PLANES_MIN_RUN 64 (NCHW runs in the short pieces that the default of 1024 replaced).
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import math
import sys
import time

import torch

from bnlab import kernels
from bnlab.gpubench import (
    compile_training_steps,
    copy_bandwidth_gbps,
    knobs_set,
    make_timer,
    min_traffic_bytes,
    training_step,
    training_tensors,
)

SHAPES = [  # batch 256 first (the acceptance bar's shapes): a run cut short keeps those
    ((256, 64, 56, 56), "NCHW"),
    ((256, 64, 56, 56), "channels_last"),
    ((256, 2048, 7, 7), "NCHW"),
    ((256, 128, 28, 28), "channels_last"),
    ((256, 1024, 14, 14), "NCHW"),  # grouped planes
    ((32, 1024, 14, 14), "NCHW"),
    ((32, 2048, 7, 7), "NCHW"),
    ((65536, 1024), "NC"),
]
KNOBS = {
    "TILE": (2048, 4096, 8192),
    "NUM_WARPS": (4, 8),
    "SINGLE_TILE_MAX": (0, 8192, 16384),
}
PROGRAMS_PER_SM = (2, 4, 8)  # per multiprocessor, either layout; the module's default during the first stage
COMBINE_VALUES = (2048, 8192)  # the first one during the first stage


def _plan_with(K, x: torch.Tensor, knobs: dict[str, int]):
    """The plan for `x` under `knobs`."""
    with knobs_set(K, knobs):
        return K.make_plan(x, K.layout_of(x))


def stage_one(K, x: torch.Tensor) -> list[dict]:
    """The first stage's knob settings for `x`: the ones that change the compiled kernels."""
    could_be_single = _plan_with(K, x, {"SINGLE_TILE_MAX": max(KNOBS["SINGLE_TILE_MAX"])}).single
    # Where no threshold makes the plan single-pass, sweeping it would time the same kernels again.
    grid = {**KNOBS, "SINGLE_TILE_MAX": KNOBS["SINGLE_TILE_MAX"] if could_be_single else (0,)}
    # (TILE_BYTES lifted: TILE alone sets the tiles here, in values, whatever the dtype)
    fixed = {"PROGRAMS_PER_SM": dict(K.PROGRAMS_PER_SM), "COMBINE_VALUES": COMBINE_VALUES[0],
             "TILE_BYTES": 4 * max(KNOBS["TILE"])}  # fmt: skip
    return [{**dict(zip(grid, values, strict=True)), **fixed} for values in itertools.product(*grid.values())]


def sweep_shape(
    K, timer, copy: float, shape: tuple[int, ...], layout: str, dtype: torch.dtype, device: str = "cuda"
) -> list[dict]:
    """Both stages for one shape; prints a line per measurement and the best knobs."""
    x, rm, rv, w, b, dy = training_tensors(shape, layout, dtype, device)
    nbytes = min_traffic_bytes(math.prod(shape), dtype.itemsize, "both")
    step = functools.partial(training_step, x, rm, rv, w, b, dy)
    rows: list[dict] = []
    best = None

    def plan_with(knobs: dict[str, int]):
        return _plan_with(K, x, knobs)

    def measure(knobs: dict[str, int]) -> None:
        nonlocal best
        with knobs_set(K, knobs):
            plan = K.make_plan(x, K.layout_of(x))
            try:
                seconds = timer(step)
                frac = nbytes / seconds / 1e9 / copy
                err = ""
            except Exception as exc:  # keep sweeping; the row says what failed
                seconds, frac, err = float("nan"), float("nan"), f"{type(exc).__name__}: {exc}"[:200]
        row = {"shape": "x".join(map(str, shape)), "layout": layout, **knobs, "us": seconds * 1e6,
               "frac_of_copy": frac, "plan": f"{plan.layout} blocks={plan.block_a}x{plan.block_b} "
               f"splits={plan.splits} single={plan.single} packed={plan.packed}", "error": err}  # fmt: skip
        rows.append(row)
        print(f"{row['shape']:>16} {layout:>13} {knobs} {row['us']:9.1f} us {frac:6.3f} {row['plan']} {err}",
              flush=True)  # fmt: skip
        if err == "" and (best is None or seconds < best[0]):
            best = (seconds, knobs, frac)

    for knobs in stage_one(K, x):
        measure(knobs)
    if best is not None:
        first = best[1]
        for programs in PROGRAMS_PER_SM:
            fewer_or_more = {**first, "PROGRAMS_PER_SM": {"planes": programs, "rows": programs}}
            if plan_with(fewer_or_more) != plan_with(first):  # (the default's value for this layout is timed)
                measure(fewer_or_more)
        for combine in COMBINE_VALUES[1:]:
            measure({**first, "COMBINE_VALUES": combine})
        measure({**first, "APPLY_STAGES": {"planes": 2, "rows": 2}})  # elementwise passes pipelined
        short_runs = {**first, "PLANES_MIN_RUN": 64}
        if plan_with(short_runs) != plan_with(first):  # NCHW 28x28, 56x56: 64x64 tiles instead of 4x1024
            measure(short_runs)
        print(f"BEST {shape} {layout}: {best[1]} {best[0] * 1e6:.1f} us, {best[2]:.3f} of copy", flush=True)
    return rows


def warm_compile_cache(K, shapes, dtype: torch.dtype, jobs: int, device: str = "cuda") -> list[str]:
    """Compile every first-stage kernel variant of `shapes` in `jobs` processes at once
    (`compile_training_steps`). Returns the errors."""
    runs = []
    for shape, layout in shapes:
        x = training_tensors(shape, layout, dtype, device)[0]
        runs += [(shape, layout, knobs) for knobs in stage_one(K, x)]
        del x
    return compile_training_steps(runs, dtype, jobs, device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="CSV of every measurement")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warm-jobs", type=int, default=8, help="processes compiling the kernels first (0: none)")
    args = parser.parse_args()
    K = kernels.load()
    dtype = getattr(torch, args.dtype)
    if args.warm_jobs:
        start = time.perf_counter()
        errors = warm_compile_cache(K, SHAPES, dtype, args.warm_jobs)
        print(f"compiled the first stage's kernels in {time.perf_counter() - start:.0f} s with {args.warm_jobs} "
              f"processes; {len(errors)} errors{': ' + errors[0] if errors else ''}", flush=True)  # fmt: skip
    timer = make_timer("cuda", warmup_ms=5, rep_ms=15, graphs=True)  # the GPU's time, not the host's
    # The copy is timed called from Python, as `bnlab bench --gpu` does: captured in a graph, a copy becomes
    # a memcpy node, which ran at 2760 GB/s on an H200 against 4250 for the copy kernel.
    copy = copy_bandwidth_gbps(make_timer("cuda", warmup_ms=5, rep_ms=15), "cuda")
    print(f"{torch.cuda.get_device_name()}: copy {copy:.0f} GB/s; dtype {args.dtype}", flush=True)
    rows: list[dict] = []
    for shape, layout in SHAPES:
        rows += sweep_shape(K, timer, copy, shape, layout, dtype)
        if args.out:  # after every shape: a run cut short by a time limit keeps what it measured
            _write(args.out, rows)
    return 0


def _write(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        fields = list(dict.fromkeys(key for row in rows for key in row))  # rows differ in the knobs they set
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
