"""A profile log's settings as whole ResNet-50 sums: what each setting, and the best one per layer, would do.

Usage: python benchmarks/profile_sums.py LOG [--layout channels_last] [--dtype bfloat16]
(LOG: a `profile_kernels.py` log, e.g. results/h200-2026-11-27/profile-run14-cl.log; no GPU needed)

For each profiled setting, the graph-timed steps (the bench's timer) of the layer shapes it covers, summed
with each shape's multiplicity in ResNet-50 at batch 256 (`bnlab.gpubench.resnet50_bn_shapes`), against the
first setting of the log (the defaults of that run) over the same shapes; then, per shape, the fastest
setting, and what taking it on every shape would save: the most that choosing these knobs per layer
could give, as far as that run's settings go (one sample each: differences under ~0.5% are noise).
"""

from __future__ import annotations

import argparse
import ast
import collections
import re
import sys
from pathlib import Path

from bnlab.gpubench import resnet50_bn_shapes

_HEADER = re.compile(r"(\S+) (\S+) (\S+) (\{.*\}):")


def read(text: str, layout: str, dtype: str) -> dict[str, dict[str, float]]:
    """{setting (its knobs' text): {shape: graph-timed step, us}} for one layout and dtype, in log order."""
    steps: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for block in re.split(r"\n(?=\d+x)", text):
        lines = block.splitlines()
        header = _HEADER.match(lines[0]) if lines else None
        graph = [line for line in lines[1:] if line.strip().startswith("graph")]
        if header and graph and header.group(2) == layout and header.group(3) == dtype:
            steps[header.group(4)][header.group(1)] = float(graph[0].split()[1])
    return steps


def changed(setting: str, defaults: str) -> dict[str, object]:
    """The knobs of `setting` that differ from `defaults` (both as the log prints them)."""
    ours, theirs = ast.literal_eval(setting), ast.literal_eval(defaults)
    return {name: value for name, value in ours.items() if theirs.get(name) != value}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--layout", default="channels_last", choices=("NCHW", "channels_last"))
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    steps = read(args.log.read_text(), args.layout, args.dtype)
    if not steps:
        print(f"profile_sums: no {args.dtype} {args.layout} steps in {args.log}", file=sys.stderr)
        return 1
    layers = collections.Counter("x".join(map(str, shape)) for _, shape in resnet50_bn_shapes(256))
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
