"""Host (Python) time of the triton backend per call, with the kernels replaced by no-ops.

Usage: python benchmarks/host_overhead.py   (any machine: it runs on CPU tensors, Triton's interpreter mode)
Prints the median microseconds of a forward and of a forward+backward through bnlab.functional.batch_norm
(backend "triton", kernels stubbed: planning, checks, allocations, autograd) beside the native backend and
torch's own F.batch_norm (which include their tiny CPU compute); then the triton backend's split plan (2
launches a direction; the input above gets the single-tile plan, 1). On a GPU each Triton launch adds its
own launch cost on top.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the backend then accepts CPU tensors

import torch
from host_gpu import _kernels_replaced, _Recorder  # (the kernels' no-op stand-ins, shared with host_gpu.py)

from bnlab import functional as BF
from bnlab import kernels


def _median_us(fn, reps: int = 300) -> float:
    for _ in range(20):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    K = kernels.load()
    with _kernels_replaced(K, lambda kernel: _Recorder(kernel, None)):
        _print_rows(K)


def _print_rows(K) -> None:
    x = torch.randn(2, 64, 3, 3, requires_grad=True)
    dy = torch.randn(2, 64, 3, 3)
    w, b = torch.ones(64, requires_grad=True), torch.zeros(64, requires_grad=True)
    rm, rv = torch.zeros(64), torch.ones(64)

    def step(forward):
        return lambda: torch.autograd.grad(forward(), (x, w, b), dy)

    def bnlab_call(backend: str):
        return lambda: BF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, backend=backend, nonfinite="ignore")

    calls = {"triton": bnlab_call("triton"), "native": bnlab_call("native")}
    calls["torch F.batch_norm"] = lambda: torch.nn.functional.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    calls["triton split"] = calls["triton"]
    for label, forward in calls.items():
        if label == "triton split":
            K.SINGLE_TILE_MAX = 0
        both = _median_us(step(forward))
        print(f"{label:>22}: forward {_median_us(forward):6.1f} us, forward+backward {both:6.1f} us")


if __name__ == "__main__":
    main()
