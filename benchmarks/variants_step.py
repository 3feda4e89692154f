"""Ghost BN and batch renorm on the triton backend, each beside the path it ran before session 20: the GPU
time of one layer's training step (forward + backward).

Usage (on a GPU machine): PYTHONPATH=src python3 benchmarks/variants_step.py
    [--shapes 256x256x56x56,256x1024x14x14] [--dtype bfloat16] [--layouts nchw,channels_last] [--ghost 32]
    [--out DIR]
(`--device cpu --shapes 8x4x3x3 --ghost 2` runs every line on CPU through Triton's interpreter, for the tests.)

Rows, microseconds a forward+backward (gpubench's timer: CUDA-graph replays, the L2 flushed before each):
- `bn`: bnlab's BatchNorm2d, the floor the variants' extra work stands on;
- `ghost`: GhostBatchNorm2d(ghost_batch_size=--ghost), the ghost batches read where they lie (session 20);
  `ghost, side by side`: copied into an (N/k, k*C, ...) tensor and the output copied back (the path before;
  `backends.ghosts_in_place` patched off); `ghost, torch loop`: nn.BatchNorm2d over the chunks and a cat;
- `renorm`: BatchRenorm2d with rmax 3 and dmax 5 from the first step, its batch statistics from the
  statistics kernel (session 20); `renorm, var_mean`: from torch's var_mean over a float32 copy (before).
Predicted from the bytes moved (bf16, two-read kernels: a BN step 8 tensor-sizes): ghost ~1.0x bn and side
by side ~2x; renorm ~9/8 of bn and var_mean ~13/8. Every layer with nonfinite="ignore" (no guard kernel:
the same for every row). Prints a table and writes a CSV (with the machine) under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

import bnlab.backends
import bnlab.nn
from bnlab import gpubench
from bnlab.bench import ChunkLoop

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
ROWS = ("bn", "ghost", "ghost, side by side", "ghost, torch loop", "renorm", "renorm, var_mean")


def layer_for(row: str, channels: int, ghost: int) -> nn.Module:
    """The layer a row times (bnlab's on the triton backend, but for the torch loop)."""
    common = {"backend": "triton", "nonfinite": "ignore"}
    if row == "bn":
        return bnlab.nn.BatchNorm2d(channels, **common)
    if row.startswith("ghost, torch"):
        return ChunkLoop(nn.BatchNorm2d(channels), ghost)
    if row.startswith("ghost"):
        return bnlab.nn.GhostBatchNorm2d(channels, ghost_batch_size=ghost, **common)
    limits = {"warmup_steps": 0, "rmax_ramp_end": 0, "dmax_ramp_end": 0}
    return bnlab.nn.BatchRenorm2d(channels, **limits, **common)


@contextlib.contextmanager
def earlier_path(row: str) -> Iterator[None]:
    """The path a row's variant ran before session 20: ghosts laid side by side, renorm's var_mean."""
    saved = bnlab.backends.ghosts_in_place, bnlab.backends.batch_statistics
    if row == "ghost, side by side":
        bnlab.backends.ghosts_in_place = lambda fn, input: False
    elif row == "renorm, var_mean":
        bnlab.backends.batch_statistics = lambda fn: lambda input, eps, ghosts=1: None
    try:
        yield
    finally:
        bnlab.backends.ghosts_in_place, bnlab.backends.batch_statistics = saved


def step_fn(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[object], object]:
    """One training step of `layer` on `x` (forward, then the input's and parameters' gradients)."""
    wrt = [x, *layer.parameters()]
    return lambda _: torch.autograd.grad(layer(x), wrt, dy)


def measure(
    shape: tuple[int, ...], dtype: torch.dtype, layout: str, ghost: int, device: str, timer: gpubench.Timer
) -> list[dict[str, object]]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    fmt = LAYOUTS[layout]
    x = torch.randn(shape, generator=gen).to(device, dtype).contiguous(memory_format=fmt).requires_grad_(True)
    dy = torch.randn(shape, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
    rows = []
    for row in ROWS:
        layer = layer_for(row, shape[1], ghost).to(device)
        with earlier_path(row):
            seconds = timer(step_fn(layer, x, dy))
        rows.append({"row": row, "shape": "x".join(map(str, shape)), "dtype": str(dtype).removeprefix("torch."),
                     "layout": layout, "ghost": ghost, "us": round(seconds * 1e6, 2)})  # fmt: skip
    bn_us = rows[0]["us"]
    for r in rows:
        r["vs_bn"] = round(r["us"] / bn_us, 3) if bn_us else float("nan")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="256x256x56x56,256x1024x14x14")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layouts", default="nchw,channels_last")
    parser.add_argument("--ghost", type=int, default=32, help="examples per ghost batch (default 32)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the CSV")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("variants_step.py: needs a CUDA device (or --device cpu with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    timer = gpubench.make_timer(args.device, graphs=args.device == "cuda")
    machine = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (Triton interpreter)"
    print(f"{machine}; torch {torch.__version__}; us a forward+backward, and against the bn row", flush=True)
    rows = []
    for text in args.shapes.split(","):
        shape = tuple(int(v) for v in text.split("x"))
        for layout in args.layouts.split(","):
            for r in measure(shape, dtype, layout, args.ghost, args.device, timer):
                rows.append(r)
                print(f"  {r['shape']:>16} {layout:>13} {r['row']:>20}: {r['us']:10.1f} us  {r['vs_bn']:6.3f}x",
                      flush=True)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = out / f"variants-{stamp}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "machine", "torch"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "machine": machine, "torch": torch.__version__})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
