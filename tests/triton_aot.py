"""Compile every Triton kernel variant for an NVIDIA architecture, ahead of time, without a GPU.

Usage: python tests/triton_aot.py ARCH (e.g. 90 for H100/H200). Run with TRITON_INTERPRET unset or 0.
Prints one line per failure and "compiled K variants, F failed"; exits 1 if any failed.
"""

from __future__ import annotations

import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bnlab.kernels import batchnorm as K

DATA_POINTERS = {"x_ptr", "y_ptr", "z_ptr", "dy_ptr", "dx_ptr", "dz_ptr"}


def signature(fn, dtype: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("sem_ptr", "verdict_ptr"):
            sig[name] = "*i32"
        elif name == "count_ptr":  # (num_batches_tracked)
            sig[name] = "*i64"
        elif name.endswith(("_ptr", "_out")):
            sig[name] = "*" + (dtype if name in DATA_POINTERS else "fp32")
        elif name in ("eps", "momentum", "count"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


# The elementwise kernels' LATE_COMBINE constexprs (`batchnorm._late_options`): off, and on over 16 rows.
NOT_LATE = {"LATE": False, "COMBINE_BLOCK": 1}
LATE = {"LATE": True, "COMBINE_BLOCK": 16}
# The elementwise passes' eviction policy for their inputs (`batchnorm.SECOND_READ_EVICTION`).
KEEP, EVICT_FIRST = {"EVICT": ""}, {"EVICT": "evict_first"}


def compile_cases():
    layouts = (
        {"BLOCK_A": 32, "BLOCK_B": 128, "PLANES": 0},
        {"BLOCK_A": 64, "BLOCK_B": 64, "PLANES": 1},
        {"BLOCK_A": 1, "BLOCK_B": 2048, "PLANES": 2},  # packed planes
        {"BLOCK_A": 2, "BLOCK_B": 1024, "PLANES": 3},  # grouped planes, 16 channels
        {"BLOCK_A": 1, "BLOCK_B": 2048, "PLANES": 4},  # grouped planes, 8 channels
    )
    epilogues = [
        dict(HAS_WEIGHT=w, HAS_BIAS=w, HAS_RESIDUAL=res, RELU=relu)
        for w, (res, relu) in itertools.product((True, False), ((False, False), (False, True), (True, True)))
    ]
    for blocks in layouts:
        split_block = {"SPLIT_BLOCK": 16 if blocks["PLANES"] else 4}
        # (the reductions' per-channel sums of grouped planes: a segmented scan, or gathered rows, a knob;
        # compiled once a kernel, split and with the fullest epilogue, to keep the cold compile short)
        gathers = (False, True) if blocks["PLANES"] >= 3 else (False,)
        layout = K.PLANES if blocks["PLANES"] else K.ROWS
        # (LATE_COMBINE, a knob: the elementwise passes combine the reductions' partials; compiled for rows,
        # plain and grouped planes, whose per-channel vectors differ in shape; packed planes' are plain
        # planes', 16-channel groups' are 8-channel groups')
        late_too = blocks["PLANES"] in (0, 1, 4)
        for split in (True, False):  # (pipelined as configured, and not: a knob a GPU session may turn)
            stages = K.STATS_STAGES[layout] if split else 1
            for gather in gathers if split else (False,):
                yield K._stats_kernel, {**blocks, **split_block, "SPLIT": split, "HAS_RUNNING": split,
                                        "STAGES": stages, "GATHER_SUMS": gather, "LATE": False,
                                        "PREFETCH": False}  # fmt: skip
            if split and late_too:  # (and prefetched in registers, STATS_PREFETCH: a knob)
                # (grouped planes late as the default takes them since session 17: with the gather)
                knobs = {**blocks, **split_block, "SPLIT": True, "HAS_RUNNING": True,
                         "GATHER_SUMS": blocks["PLANES"] >= 3}  # fmt: skip
                yield K._stats_kernel, {**knobs, "STAGES": stages, "LATE": True, "PREFETCH": False}
                yield K._stats_kernel, {**knobs, "STAGES": 1, "LATE": False, "PREFETCH": True}
            if split and blocks["PLANES"] == 3:  # (batch statistics alone, `statistics`: batch renorm's r, d)
                yield K._stats_kernel, {**blocks, **split_block, "SPLIT": True, "HAS_RUNNING": False, "STAGES": stages,
                                        "GATHER_SUMS": True, "LATE": False, "PREFETCH": False}  # fmt: skip
        # The planes variants (packed, grouped) differ in tiling, not in the epilogue: two epilogues cover
        # them.
        ends = (epilogues[0], epilogues[-1])
        for ep in epilogues if blocks["PLANES"] <= 1 else ends:
            # (the elementwise passes pipelined 2 deep too, once an epilogue: a knob a GPU session may turn)
            apply_stages = (K.APPLY_STAGES[layout], 2) if ep == epilogues[0] else (K.APPLY_STAGES[layout],)
            for stages in dict.fromkeys(apply_stages):
                yield K._apply_kernel, {**blocks, **ep, "FROM_RUNNING": not ep["HAS_WEIGHT"], "STAGES": stages,
                                        **NOT_LATE, "HAS_RUNNING": False, **KEEP}  # fmt: skip
            if ep is ends[-1] and late_too:
                yield K._apply_kernel, {**blocks, **ep, "FROM_RUNNING": False, "STAGES": apply_stages[0], **LATE,
                                        "HAS_RUNNING": True, **KEEP}  # fmt: skip
            if ep is ends[-1]:  # (the second reads' eviction hint, SECOND_READ_EVICTION: a knob)
                yield K._apply_kernel, {**blocks, **ep, "FROM_RUNNING": False, "STAGES": apply_stages[0],
                                        **NOT_LATE, "HAS_RUNNING": False, **EVICT_FIRST}  # fmt: skip
            stages = K.GRAD_STAGES[layout] if ep["HAS_WEIGHT"] else 1
            grad = {**blocks, **ep, **split_block, "SPLIT": ep["RELU"], "WRITE_DZ": ep["HAS_RESIDUAL"],
                    "GATHER_SUMS": False, "LATE": False}  # fmt: skip
            yield K._grad_kernel, {**grad, "STAGES": stages}
            if ep is ends[-1] and late_too:
                yield K._grad_kernel, {**grad, "STAGES": stages, "SPLIT": True, "LATE": True}
            if ep is ends[-1] and len(gathers) > 1:
                yield K._grad_kernel, {**grad, "STAGES": stages, "GATHER_SUMS": True}
            if ep in ends and K.GRAD_STAGES_LONG[layout] != K.GRAD_STAGES[layout]:  # long loops' depth
                long = {"SPLIT": True, "STAGES": K.GRAD_STAGES_LONG[layout]}
                yield K._grad_kernel, {**grad, **long}
            for training in (True, False):
                flags = {"TRAINING": training, "WRITE_DX": True, "WRITE_DZ": ep["HAS_RESIDUAL"]}
                for stages in dict.fromkeys(apply_stages if training else apply_stages[:1]):
                    yield K._input_grad_kernel, {**blocks, **ep, **flags, "STAGES": stages, **NOT_LATE, **KEEP}
                if training and ep is ends[-1] and late_too:
                    yield K._input_grad_kernel, {**blocks, **ep, **flags, "STAGES": apply_stages[0], **LATE, **KEEP}
                if training and ep is ends[-1]:
                    yield K._input_grad_kernel, {**blocks, **ep, **flags, "STAGES": apply_stages[0], **NOT_LATE,
                                                 **EVICT_FIRST}  # fmt: skip
    single = {"BLOCK_N": 64, "BLOCK_S": 64}
    for ep in epilogues:
        yield K._single_tile_forward_kernel, {**single, **ep, "HAS_RUNNING": ep["HAS_WEIGHT"]}
        flags = {"WRITE_DX": ep["HAS_WEIGHT"], "WRITE_DZ": ep["HAS_RESIDUAL"]}
        yield K._single_tile_backward_kernel, {**single, **ep, **flags}
    for has_count in (True, False):  # (the update's non-finite guard: once, with the data dtype's name unused)
        yield K._guard_kernel, {"BLOCK": K.GUARD_BLOCK, "HAS_COUNT": has_count}


def ghost_cases():
    """The split kernels with ghost batches read in place (GHOSTS > 1: other addressing), once a kernel for
    rows, plain planes and 16-channel groups (the first variant of each that `compile_cases` makes)."""
    seen = set()
    for fn, constexprs in compile_cases():
        key = (fn, constexprs.get("PLANES"))
        if "GHOSTS" in fn.arg_names and key[1] in (0, 1, 3) and key not in seen:
            seen.add(key)
            yield fn, {**constexprs, "GHOSTS": 4}


def main(arch: int) -> int:
    dtypes = ("bf16", "fp32") if arch >= 90 else ("fp16",)
    done, failures = 0, []
    for fn, constexprs in itertools.chain(compile_cases(), ghost_cases()):
        if "GHOSTS" in fn.arg_names:  # (the split kernels: ghost batches in place, 1 = none)
            constexprs = {"GHOSTS": 1, **constexprs}
        # (float32 not for packed and grouped planes, whose tiles hold the same bytes as bf16's and differ
        # from plain planes in tiling only: 53 compiles of CI's time; a GPU session compiles them natively)
        for dtype in dtypes if constexprs.get("PLANES", 0) <= 1 else dtypes[:1]:
            src = ASTSource(fn=fn, signature=signature(fn, dtype, constexprs), constexprs=constexprs)
            options = {"num_warps": K.NUM_WARPS, "enable_fp_fusion": K.FP_FUSION}
            try:
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                assert "cubin" in compiled.asm
            except Exception as exc:  # report every failure, not just the first
                failures.append(f"{fn.__name__} {dtype} {constexprs}: {type(exc).__name__}: {str(exc)[:400]}")
            done += 1
    print("\n".join(failures))
    print(f"compiled {done} variants for sm_{arch}, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
