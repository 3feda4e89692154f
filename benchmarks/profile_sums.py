"""A profile log's settings as whole ResNet-50 sums: what each setting, and the best one per layer, would do.

Usage: python benchmarks/profile_sums.py LOG [--layout channels_last] [--dtype bfloat16] [--kernels]
(LOG: a `profile_kernels.py` log, e.g. results/h200-2026-11-27/profile-run14-cl.log; no GPU needed)

For each profiled setting, the graph-timed steps (the bench's timer) of the layer shapes it covers, summed
with each shape's multiplicity in ResNet-50 at batch 256 (`bnlab.gpubench.resnet50_bn_shapes`), against the
first setting of the log (the defaults of that run) over the same shapes; then, per shape, the fastest
setting, and what taking it on every shape would save: the most that choosing these knobs per layer
could give, as far as that run's settings go (one sample each: differences under ~0.5% are noise).

`--kernels` (session 27): instead, the first setting's kernels, each against the time its tensor passes
would take at the log's copy speed (a split step: statistics 1 pass, normalize 2, gradient sums 2, dx 3),
per shape and as excess summed over ResNet-50's layers: which kernels hold a layout's distance from the
two-read ideal. (The profile calls the kernels from Python, the L2 not flushed between them: a small
layer's tensors may be read from L2, so its elementwise passes can run under their "ideal".)
"""

from __future__ import annotations

import argparse
import ast
import collections
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from bnlab.gpubench import resnet50_bn_shapes

_HEADER = re.compile(r"(\S+) (\S+) (\S+) (\{.*\}):")
_KERNEL = re.compile(r"\s+([\d.]+) us\s+[\d.]+x\s+[\d.]+%\s+(\w+)$")
# Tensor passes of each kernel of a split training step (plain BN: no residual, no ReLU).
PASSES = {"_stats_kernel": 1, "_apply_kernel": 2, "_grad_kernel": 2, "_input_grad_kernel": 3}


def _shapes(text: str, layout: str, dtype: str) -> Iterator[tuple[str, str, list[str]]]:
    """(shape, setting: its knobs' text, the block's lines after its header) of each profiled shape of one
    layout and dtype, in log order."""
    for block in re.split(r"\n(?=\d+x)", text):
        lines = block.splitlines()
        header = _HEADER.match(lines[0]) if lines else None
        if header and header.group(2) == layout and header.group(3) == dtype:
            yield header.group(1), header.group(4), lines[1:]


def read(text: str, layout: str, dtype: str) -> dict[str, dict[str, float]]:
    """{setting (its knobs' text): {shape: graph-timed step, us}} for one layout and dtype, in log order."""
    steps: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for shape, setting, lines in _shapes(text, layout, dtype):
        graph = [line for line in lines if line.strip().startswith("graph")]
        if graph:
            steps[setting][shape] = float(graph[0].split()[1])
    return steps


def read_kernels(text: str, layout: str, dtype: str) -> dict[str, dict[str, float]]:
    """{shape: {kernel: mean us a step}} of the log's first setting for one layout and dtype."""
    first: str | None = None
    kernels: dict[str, dict[str, float]] = {}
    for shape, setting, lines in _shapes(text, layout, dtype):
        first = first or setting
        if setting == first:
            rows = (_KERNEL.match(line) for line in lines)
            kernels[shape] = {m.group(2): float(m.group(1)) for m in rows if m}
    return kernels


def print_kernels(log: Path, text: str, layout: str, dtype: str, layers: collections.Counter) -> int:
    """`--kernels`: see the module doc."""
    kernels = read_kernels(text, layout, dtype)
    copy = re.search(r"copy (\d+) GB/s", text)
    if not kernels or not copy:
        print(f"profile_sums: no {dtype} {layout} kernels (or no copy speed) in {log}", file=sys.stderr)
        return 1
    gbps, itemsize = float(copy.group(1)), getattr(torch, dtype).itemsize
    print(f"{log.name}: {dtype} {layout}, the first setting's kernels, us a step (+ excess over their tensor "
          f"passes at {gbps:.0f} GB/s)")  # fmt: skip
    print(f"  {'shape':16s} {'':3s}" + "".join(f"{name:>22s}" for name in PASSES))
    excess = collections.Counter()
    for shape, times in kernels.items():
        size_us = math.prod(map(int, shape.split("x"))) * itemsize / gbps / 1e3
        cells = []
        for name, passes in PASSES.items():
            if name not in times:
                cells.append(f"{'-':>22s}")
                continue
            over = times[name] - passes * size_us
            excess[name] += layers[shape] * over
            cells.append(f"{times[name]:11.1f} ({over:+6.1f})  ")
        print(f"  {shape:16s} x{layers[shape]:<2d}" + "".join(cells))
    print(f"excess over ResNet-50's {sum(layers[s] for s in kernels)} layers of these shapes, ms: "
          + ", ".join(f"{name} {excess[name] / 1e3:+.3f}" for name in PASSES))  # fmt: skip
    return 0


def changed(setting: str, defaults: str) -> dict[str, object]:
    """The knobs of `setting` that differ from `defaults` (both as the log prints them)."""
    ours, theirs = ast.literal_eval(setting), ast.literal_eval(defaults)
    return {name: value for name, value in ours.items() if theirs.get(name) != value}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--layout", default="channels_last", choices=("NCHW", "channels_last"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kernels", action="store_true", help="the first setting's kernels against copy speed")
    args = parser.parse_args(argv)
    layers = collections.Counter("x".join(map(str, shape)) for _, shape in resnet50_bn_shapes(256))
    if args.kernels:
        return print_kernels(args.log, args.log.read_text(), args.layout, args.dtype, layers)
    steps = read(args.log.read_text(), args.layout, args.dtype)
    if not steps:
        print(f"profile_sums: no {args.dtype} {args.layout} steps in {args.log}", file=sys.stderr)
        return 1
    defaults, *_ = steps
    base = steps[defaults]
    print(f"{args.log.name}: {args.dtype} {args.layout}, ms over ResNet-50's layers at batch 256 (against the "
          f"first setting)")  # fmt: skip
    for setting, shapes in steps.items():
        common = [shape for shape in shapes if shape in base]
        ours = sum(layers[shape] * shapes[shape] for shape in common) / 1e3
        theirs = sum(layers[shape] * base[shape] for shape in common) / 1e3
        print(f"  {len(common):2d} shapes {ours:8.3f} against {theirs:8.3f} ({ours / theirs:.3f})  "
              f"{changed(setting, defaults) or 'the defaults'}")  # fmt: skip
    total = saved = 0.0
    print("fastest setting per shape:")
    for shape, default_us in base.items():
        timed = {setting: shapes[shape] for setting, shapes in steps.items() if shape in shapes}
        best = min(timed, key=timed.get)
        total += layers[shape] * default_us
        saved += layers[shape] * (default_us - timed[best])
        print(f"  {shape:16s} x{layers[shape]:<2d} {default_us:7.1f} -> {timed[best]:7.1f} us "
              f"({timed[best] / default_us:.3f})  {changed(best, defaults) or 'the defaults'}")  # fmt: skip
    print(f"the fastest per shape: {total / 1e3:.3f} -> {(total - saved) / 1e3:.3f} ms ({1 - saved / total:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
