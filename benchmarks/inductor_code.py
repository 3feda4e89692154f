"""The kernels torch.compile generates for one batch-norm training step, printed: how many, and how they tile.

Usage (on a GPU machine): PYTHONPATH=src python3 benchmarks/inductor_code.py [--shape 256,256,14,14]
    [--dtype bfloat16] [--layout NCHW|channels_last]
Why: on session 5's H200, torch.compile beat bnlab's split plans on the NCHW 14x14 layers and on
256x512x7x7 (benchmarks/NOTES.md): its forward+backward there is what to learn from (how many launches,
how it splits the per-channel reduction of an NCHW tensor). Prints each generated module's source (the
Triton kernels and the Python that launches them, with their grids), then a count of launches per module.
On a CPU (`--device cpu`) inductor generates C++ instead: the tests run it that way on a tiny shape.
"""

from __future__ import annotations

import argparse
import re
import sys

import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from bnlab.gpubench import training_tensors


def generated_code(shape: tuple[int, ...], dtype: torch.dtype, layout: str, device: str) -> list[str]:
    """Sources of the modules torch.compile generates for F.batch_norm's training forward and backward."""
    x, rm, rv, w, b, dy = training_tensors(shape, layout, dtype, device)
    torch.compiler.reset()
    compiled = torch.compile(F.batch_norm, dynamic=False)

    def step() -> object:
        y = compiled(x, rm, rv, w, b, True, 0.1, 1e-5)
        return torch.autograd.grad(y, (x, w, b), dy)

    _, sources = run_and_get_code(step)
    return sources


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="256,256,14,14")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layout", default="NCHW", choices=("NCHW", "channels_last"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("inductor_code.py: needs a CUDA device (or --device cpu, which shows C++ instead)", file=sys.stderr)
        return 2
    shape = tuple(int(v) for v in args.shape.split(","))
    sources = generated_code(shape, getattr(torch, args.dtype), args.layout, args.device)
    for i, source in enumerate(sources):
        print(f"# ==== generated module {i + 1} of {len(sources)} ====")
        print(source)
    for i, source in enumerate(sources):
        kernels = sorted(set(re.findall(r"^def (triton_\w+)\(", source, flags=re.M)))
        print(f"module {i + 1}: {len(kernels)} Triton kernels {', '.join(kernels)}")
    print(f"{args.shape} {args.dtype} {args.layout}: {len(sources)} generated modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
