"""Instructions per loop iteration of the Triton kernels' main loops, read from their sm_90 machine code.

Usage (no GPU needed; Triton's bundled ptxas and cuobjdump do the work):
    TRITON_INTERPRET=0 PYTHONPATH=src python benchmarks/kernel_sass.py [--dtype bf16] [--arch 90] [--check 0.8]
        [--knob NAME=VALUE ...]
(--check: exit 1 if a split pass spends more than that fraction of its budget, or anything spills; CI
runs it, tests/test_triton.py).
To read what the GPU machines run, put Triton 3.6 first on the path (see the README's compile check).

Why: BN moves few bytes per value, so a kernel whose loop spends too many instructions per value runs
out of issue slots before it runs out of memory bandwidth. An SM issues at most 4 warp-instructions a
cycle; at an H200's copy bandwidth (~4.3 TB/s over 132 SMs at 1.98 GHz: ~16.5 bytes per cycle per SM) a
pass that moves B bytes per value can afford about 4 * 32 * B / 16.5 instructions per value per thread
(a bf16 statistics pass, 2 bytes: ~15.5; a bf16 normalize pass, 4 bytes: ~31) before issue, not memory,
sets its speed; in practice well under that. Prints, per kernel and tile shape, the size of each loop
(SASS instructions between a backward branch and its target), the per-tile one (a reduction's first
loop, an elementwise pass's last) per value a thread holds, and the spills (LDL/STL); then the
registers per thread, the programs a multiprocessor holds at once with them, and the waves the plan's
grid takes on 132 multiprocessors (a grid of 1.2 waves runs its last 0.2 after the first programs
finish, nearly alone).

Each shape is compiled with the tiles its plan gets (TILE / TILE_BYTES), specialized as Triton's launcher
specializes them (16-divisible integers, S_BLOCKS of 1). Per busy value: per value over the share of lanes
that hold values (NCHW runs of 49 in 64 lanes: 77%; packed tiles hold several samples' runs side by side:
98%).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import triton_aot  # the signatures of the ahead-of-time compile test
from bnlab.gpubench import knobs_set, parse_knobs
from bnlab.kernels import batchnorm as K

# (name, layout, N, C, S): ResNet-50 layer shapes at batch 256 that get different tiles.
SHAPES = [
    ("NCHW 7x7", K.PLANES, 256, 512, 49),
    ("NCHW 14x14", K.PLANES, 256, 256, 196),
    ("NCHW 56x56", K.PLANES, 256, 64, 3136),
    ("NHWC 56x56", K.ROWS, 256, 64, 3136),
]
EPILOGUE = {"HAS_WEIGHT": True, "HAS_BIAS": True, "HAS_RESIDUAL": False, "RELU": False}
ELEMENTWISE = ("normalize", "dx")  # the passes that run `elementwise_plan`'s slices
REDUCTIONS = ("stats", "grad sums")  # the passes that run REDUCTION_WARPS warps a program
# LATE_COMBINE's constexprs (the elementwise passes combine 16 rows of partials, a ResNet-50 NCHW 14x14
# layer's slices at batch 256), per layout and value size as the knobs say when a reading runs (`--knob
# LATE_COMBINE=...` sets them then).
LATE = {
    "LATE": lambda plan, itemsize: K._late_knob(plan.layout, itemsize),
    "COMBINE_BLOCK": lambda plan, itemsize: K._combine_block(plan, 16) if K._late_knob(plan.layout, itemsize) else 1,
}
KERNELS = {  # name: (kernel, its other constexprs)
    "stats": (  # (its loop's constexprs as the launcher computes them: a function of the plan and value size)
        K._stats_kernel,
        lambda plan, itemsize: {"SPLIT": True, "SPLIT_BLOCK": 16, "HAS_RUNNING": True,
                                "LATE": LATE["LATE"](plan, itemsize), **K._stats_loop(plan, itemsize)},
    ),
    "normalize": (
        K._apply_kernel,
        {"FROM_RUNNING": False, "STAGES": K.APPLY_STAGES, **LATE, "HAS_RUNNING": LATE["LATE"],
         "EVICT": lambda plan, itemsize: K.SECOND_READ_EVICTION},
    ),
    "grad sums": (
        K._grad_kernel,
        {"SPLIT": True, "SPLIT_BLOCK": 16, "WRITE_DZ": False, "STAGES": lambda plan, _: K._grad_stages(plan),
         "LATE": LATE["LATE"]},
    ),
    "dx": (
        K._input_grad_kernel,
        {"TRAINING": True, "WRITE_DX": True, "WRITE_DZ": False, "STAGES": K.APPLY_STAGES, **LATE,
         "EVICT": lambda plan, itemsize: K.SECOND_READ_EVICTION},
    ),
}  # fmt: skip
_INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(?:\s+(0x[0-9a-f]+))?")


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def machine_code(fn, dtype: str, plan: K.Plan, extra: dict, arch: int, reduction: bool = False) -> tuple[str, int, int]:
    """(SASS, registers per thread, shared memory bytes) of the kernel variant that `plan` launches
    (`reduction`: one of its split reductions), specialized as Triton's launcher would: pointers 16-byte
    aligned, integers that are multiples of 16 marked so, S_BLOCKS == 1 a constant."""
    args = K._block_args(plan, reduction)
    warps = args.pop("num_warps")
    fusion = args.pop("enable_fp_fusion")
    constexprs = {**args, **extra, **{k: v for k, v in EPILOGUE.items() if k in fn.arg_names}}
    if plan.s_blocks == 1 and "S_BLOCKS" in fn.arg_names:
        constexprs["S_BLOCKS"] = 1
    ints = {"N": plan.N, "C": plan.C, "S": plan.S}
    names = fn.arg_names
    divisible = [a for a in names if a.endswith(("_ptr", "_out"))]
    divisible += [a for a, v in ints.items() if v % 16 == 0 and a not in constexprs]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=fn, signature=triton_aot.signature(fn, dtype, constexprs), constexprs=constexprs, attrs=attrs)
    options = {"num_warps": warps, "enable_fp_fusion": fusion}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory(prefix="bnlab-sass-") as tmp:  # (one per call: runs side by side, e.g.
        path = Path(tmp) / f"{fn.__name__}.cubin"  # the tests' and a hand run, once read each other's cubins)
        path.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([_cuobjdump(), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run(
            [_cuobjdump(), "-res-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
    return sass, int(re.search(r"REG:(\d+)", usage).group(1)), compiled.metadata.shared


MULTIPROCESSORS = 132  # an H100's or H200's; each holds `K.resident_programs` programs at once


def busy_fraction(plan: K.Plan) -> float:
    """The share of a tile's lanes that hold values (planes: runs padded to the tile's width)."""
    if plan.layout == K.ROWS:
        return min(1.0, plan.C / plan.block_b)
    if plan.packed:
        return plan.samples_per_tile * plan.S / plan.block_b
    if plan.group:
        return plan.group * plan.S / plan.block_b
    return plan.S / (plan.s_blocks * plan.block_b)


def loops_and_ops(sass: str) -> tuple[list[int], collections.Counter]:
    """(instructions in each loop: backward branch to its target; opcode counts)."""
    loops, ops = [], collections.Counter()
    for line in sass.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        at, opcode, target = int(match.group(1), 16), match.group(2), match.group(3)
        ops[opcode] += 1
        if opcode == "BRA" and target is not None and int(target, 16) < at:
            loops.append((at - int(target, 16)) // 16 + 1)
    return loops, ops


# Memory traffic of a split pass per value, in element sizes.
TRAFFIC = {"stats": 1, "normalize": 2, "grad sums": 2, "dx": 3}
BYTES_PER_CYCLE = 16.5  # an H200 copying at ~4.3 TB/s over 132 SMs at 1.98 GHz, per SM
ISSUE_PER_CYCLE = 4 * 32  # thread-instructions an SM issues per cycle at most


def budget(kernel: str, itemsize: int) -> float:
    """Instructions per value at which a split pass's loop would issue as fast as memory copies."""
    return ISSUE_PER_CYCLE * TRAFFIC[kernel] * itemsize / BYTES_PER_CYCLE


@dataclass(frozen=True)
class Loop:
    shape: str
    kernel: str
    tile: str
    loops: tuple[int, ...]
    per_value: float  # the per-tile loop's instructions per value a thread holds
    per_busy_value: float  # ... per value that is not padding
    spills: int
    registers: int = 0
    programs_per_sm: int = 0
    waves: float = 0.0  # the plan's grid over what the GPU holds at once (1.2: a tail of 0.2 runs alone)


def measure(dtype: str = "bf16", arch: int = 90) -> list[Loop]:
    """Compile each kernel with the tiles each of SHAPES gets and read its loops (see the module doc)."""
    itemsize = 4 if dtype == "fp32" else 2
    results = []
    for name, layout, N, C, S in SHAPES:
        # The module's knobs, as make_plan passes them, with an H100/H200's 132 multiprocessors (make_plan asks
        # the device); no single-tile plans (batch 256: none would be taken).
        small = K.within_l2(N * C * S * itemsize, 50 * 2**20)  # (make_plan's choices at a 50 MB L2)
        target = K.programs_per_sm(layout, small=small) * MULTIPROCESSORS
        split = K.planned(layout, N, C, S, itemsize, target, small, single_tile_max=0)
        for kname, (fn, extra) in KERNELS.items():
            plan = (split.apply or split) if kname in ELEMENTWISE else split  # (channels-last: two tilings)
            # per layout (a dict), or per plan and value size (a function); or all of them a function
            extra = extra(plan, itemsize) if callable(extra) else {
                k: v[plan.layout] if isinstance(v, dict) else v(plan, itemsize) if callable(v) else v
                for k, v in extra.items()
            }  # fmt: skip
            reduction = kname in REDUCTIONS
            sass, registers, shared = machine_code(fn, dtype, plan, extra, arch, reduction)
            loops, ops = loops_and_ops(sass)
            warps = K._block_args(plan, reduction)["num_warps"]
            # (the per-tile loop: a reduction's first, its combine's loops follow; an elementwise pass's last, a
            # late combine's loop comes first)
            per_tile = loops[-1 if kname in ELEMENTWISE else 0] if loops else float("nan")
            per_value = per_tile / (plan.block_a * plan.block_b / (warps * 32))
            tile = f"{plan.block_a}x{plan.block_b}{' packed' if plan.packed else ''}{' grouped' if plan.group else ''}"
            resident = K.resident_programs(registers, shared, warps)
            if kname in ELEMENTWISE:  # the same tiles in more slices (the machine code does not change)
                plan = K.elementwise_plan(plan, K.programs_per_sm(layout, elementwise=True) * MULTIPROCESSORS)
            if K.ONE_WAVE:  # as launched: cut to what the GPU holds at once
                plan = K.within(plan, resident * MULTIPROCESSORS)
            waves = plan.grid[0] * plan.grid[1] / (resident * MULTIPROCESSORS)
            results.append(Loop(name, kname, tile, tuple(loops), per_value, per_value / busy_fraction(plan),
                                ops["LDL"] + ops["STL"], registers, resident, waves))  # fmt: skip
    return results


def over_budget(results: list[Loop], itemsize: int, fraction: float) -> list[str]:
    """What breaks the limits CI holds the kernels to: a split pass above `fraction` of its budget per busy
    value, or any spill."""
    failures = [f"{r.shape} {r.kernel}: spills {r.spills}" for r in results if r.spills]
    for r in results:
        if r.per_busy_value > fraction * budget(r.kernel, itemsize):
            failures.append(f"{r.shape} {r.kernel}: {r.per_busy_value:.1f} instructions per busy value > "
                            f"{fraction} x {budget(r.kernel, itemsize):.1f}")  # fmt: skip
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--check", type=float, default=None, metavar="FRACTION",
                        help="exit 1 if a split pass exceeds FRACTION of its budget or any kernel spills")  # fmt: skip
    parser.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                        help="a kernel knob for this reading, e.g. TILE=8192 (repeatable)")  # fmt: skip
    args = parser.parse_args()
    try:
        knobs = dict(parse_knobs(args.knob))
    except ValueError as exc:
        parser.error(str(exc))
    with knobs_set(K, knobs):
        return _report(args)


def _report(args: argparse.Namespace) -> int:
    print(f"Triton {triton.__version__}, sm_{args.arch}, {args.dtype}; SASS instructions per loop iteration, and "
          f"of the per-tile loop per value a thread holds and per busy value")  # fmt: skip
    itemsize = 4 if args.dtype == "fp32" else 2
    results = measure(args.dtype, args.arch)
    for r in results:
        print(f"{r.shape:>11} {r.kernel:>15} {r.tile:>12}: loops {list(r.loops)}, {r.per_value:5.1f} per value, "
              f"{r.per_busy_value:5.1f} per busy value (budget {budget(r.kernel, itemsize):.1f}); spills {r.spills}; "
              f"{r.registers} registers, {r.programs_per_sm} programs/SM, {r.waves:.2f} waves")  # fmt: skip
    if args.check is None:
        return 0
    failures = over_budget(results, itemsize, args.check)
    print("\n".join(failures) or f"check: every split pass within {args.check} of its budget, no spills")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
