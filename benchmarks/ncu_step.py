"""Training steps of bnlab's Triton batch norm on one shape, for Nsight Compute's hardware counters.

Usage (on a GPU machine with `ncu`; gpu_session.sh's `ncu` step):
  ncu --kernel-name 'regex:^(_stats_kernel|_grad_kernel)$' --launch-skip 2 --launch-count 2 --section ... \\
      python3 benchmarks/ncu_step.py --shape 256,256,14,14 --layout NCHW --dtype bfloat16
It runs --steps training steps (forward+backward) of `bnlab.gpubench.training_step` after printing the
plans; ncu profiles the kernels its filters pick (by default ncu flushes the caches before each profiled
kernel: the reductions then read from memory, as in the bench's timer, which flushes L2 before each step).
The question it was written for (session 11): NCHW 256x256x14x14's statistics take ~24 us for 25.7 MB, 4x
their traffic at copy speed: memory latency, too few loads in flight, or the combine step?
"""

from __future__ import annotations

import argparse

import torch

from bnlab.gpubench import training_step, training_tensors
from bnlab.kernels import batchnorm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="256,256,14,14", help="N,C,H,W (default 256,256,14,14)")
    parser.add_argument("--layout", default="NCHW", choices=("NCHW", "channels_last"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--steps", type=int, default=3, help="training steps (the first compiles)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu with TRITON_INTERPRET=1 (the tests)")
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    tensors = training_tensors(shape, args.layout, getattr(torch, args.dtype), args.device)
    print(f"{args.shape} {args.layout} {args.dtype}: {batchnorm.describe_plans(tensors[0])}", flush=True)
    for _ in range(args.steps):
        training_step(*tensors)
    if tensors[0].is_cuda:
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
