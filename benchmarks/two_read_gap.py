"""Where a bench run's ResNet-50 sums lose time against a two-read design running at copy speed.

Usage: python benchmarks/two_read_gap.py RUN.csv [--dtype bfloat16] [--batch 256]   (any machine)

A split BN moves 8 tensor-sizes a training step where the minimal traffic is 5 (x read twice each way,
dy twice), so its best is the minimal-traffic time over 0.625. "At copy speed" takes the CSV's
`size_copy_us` (an elementwise copy of the minimal traffic at that size, timed in the same run): small
tensors do not reach the device copy's bandwidth either. Prints, per layer shape and layout, bnlab's
forward+backward time, that ideal, their ratio, the excess times the layer count, and the fractions of the
device copy's bandwidth (on the minimal traffic) bnlab reached and the ideal would reach, beside issue 6's
per-layer bar of 0.55; then each layout's sums beside torch.compile's and the sum 1.2x compile would need
(issue 6's bar), and the layer shapes that miss 0.55 even at the ideal.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from bnlab.gpubench import BNLAB, COMPILE, GpuRow, read_rows

TWO_READS = 5 / 8  # minimal traffic over a split plan's traffic
PER_LAYER_BAR = 0.55  # issue 6: each layer's forward+backward at this fraction of the device copy, at least


class Gap(NamedTuple):
    """One layer shape: its count in the network, bnlab's time, the two-read ideal's, torch.compile's (NaN
    without a row) and bnlab's fraction of the device copy (None where the CSV has none)."""

    shape: str
    layers: int
    ours_us: float
    ideal_us: float
    compile_us: float
    frac: float | None


def gaps(rows: Iterable[GpuRow], dtype: str = "bfloat16", batch: int = 256) -> dict[str, list[Gap]]:
    """Per layout, a `Gap` for each layer shape of the resnet50 rows of `dtype`, forward+backward, at `batch`
    (pure, on the bench's rows as `read_rows` gives them)."""
    found: dict[tuple[str, str], dict[str, GpuRow]] = defaultdict(dict)
    for row in rows:
        if (row.case, row.direction, row.dtype) != ("resnet50", "both", dtype):
            continue
        if not row.shape.startswith(f"{batch}x") or row.error or not row.median_us:
            continue
        found[row.layout, row.shape][row.provider] = row
    out: dict[str, list[Gap]] = defaultdict(list)
    for (layout, shape), by in found.items():
        ours, compiled = by.get(BNLAB), by.get(COMPILE)
        if ours is None or not ours.size_copy_us:
            continue
        compile_us = compiled.median_us if compiled else float("nan")
        ideal = ours.size_copy_us / TWO_READS
        out[layout].append(Gap(shape, ours.layers, ours.median_us, ideal, compile_us, ours.frac_of_copy))
    return dict(out)


def report(table: dict[str, list[Gap]]) -> str:
    lines, below = [], []
    for layout, entries in table.items():
        lines.append(
            f"{layout}: shape, layers, bnlab us, two-read ideal us, ideal/bnlab, excess x layers (ms),"
            f" fraction of copy: bnlab, ideal"
        )
        for shape, n, ours, ideal, _, frac in entries:
            fracs = ""
            if frac is not None:  # (the ideal moves the same bytes in ideal/ours of the time)
                ideal_frac = frac * ours / ideal
                fracs = f"  {frac:4.2f} {ideal_frac:4.2f}"
                if ideal_frac < PER_LAYER_BAR:
                    fracs += f" < {PER_LAYER_BAR} even at the ideal"
                    below.append(f"{shape} {layout} ({ideal_frac:.2f})")
            lines.append(
                f"  {shape:16s} x{n:<3d} {ours:8.1f} {ideal:8.1f}  {ideal / ours:4.2f}"
                f"  {n * (ours - ideal) / 1e3:5.2f}{fracs}"
            )
        ours_ms = sum(e.layers * e.ours_us for e in entries) / 1e3
        ideal_ms = sum(e.layers * e.ideal_us for e in entries) / 1e3
        compile_ms = sum(e.layers * e.compile_us for e in entries) / 1e3
        lines.append(
            f"  sum: bnlab {ours_ms:.2f} ms, two-read ideal {ideal_ms:.2f} (compile / ideal"
            f" {compile_ms / ideal_ms:.2f}x), torch.compile {compile_ms:.2f};"
            f" 1.2x compile needs {compile_ms / 1.2:.2f} ms"
        )
    counted = sum(e.frac is not None for entries in table.values() for e in entries)
    lines.append(
        f"below {PER_LAYER_BAR} of copy even at the two-read ideal: {len(below)} of {counted} layer shapes"
        + (f": {', '.join(below)}" if below else "")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    table = gaps(read_rows(args.csv), args.dtype, args.batch)
    if not table:
        parser.error(f"{args.csv}: no resnet50 forward+backward rows of {args.dtype} at batch {args.batch}")
    print(report(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
