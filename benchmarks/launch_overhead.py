"""Host time of one Triton launch: Triton's dispatch against bnlab's direct path, without a GPU.

Usage: python benchmarks/launch_overhead.py [--kernel _apply_kernel] [--calls 20000]
(any machine with Triton 3.4+; no GPU: the driver and the compiled kernel are stand-ins)

What it times, per launch of one of bnlab's kernels with the arguments a bf16 forward gives it:
- Triton: ``kernel[grid](*args, **constexprs)``, Triton's JIT dispatch (binding, specialization, cache key,
  device and stream, launch metadata) with its cache holding a stand-in for the compiled kernel, whose
  launcher calls the launch hooks as Triton's C launcher does and launches nothing;
- direct: `bnlab.kernels.launch.launch` on the same kernel and arguments (its cache key, then the same
  stand-in launcher, without hooks);
- variant: the same with a token for the kernel and its options in the key instead of the options (session
  26: bnlab's split launches pass one).
The GPU's own launch (the C launcher, the driver) comes on top of both, the same for each. Minimum and
median over 7 runs of `--calls` launches (after 20), microseconds a launch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("launch_overhead.py: unset TRITON_INTERPRET (it times the compiled kernels' dispatch)")

import torch
from host_gpu import per_call_runs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from bnlab.kernels import device as D
from bnlab.kernels import launch as L


class _Driver:
    """The active driver as a launch asks it: device 0, stream 0, an sm_90 target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, index: int) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_device_interface(self):
        return None


class _Compiled:
    """A compiled kernel: `run` calls the hooks it is given, as Triton's C launcher does, and no more."""

    function, packed_metadata = 0, (4, 1, 0)

    def launch_metadata(self, grid, stream, *args):
        return {"name": "stand-in", "stream": stream}

    def run(self, gx, gy, gz, stream, function, packed, metadata, enter, exit_, *args) -> None:
        if enter is not None:
            enter(metadata)
        if exit_ is not None:
            exit_(metadata)


def _apply_call(x: torch.Tensor) -> tuple[tuple, dict]:
    """The apply kernel's arguments and constexprs as a split bf16 channels-last forward passes them."""
    f = torch.empty(64)
    args = (x, x, x, f, f, f, f, f, f, f, f, f, f, f, 256, 64, 49, 1, 100, 7, 1e-5, 0.1, 0, 0)
    options = dict(FROM_RUNNING=False, STAGES=1, LATE=False, COMBINE_BLOCK=64, HAS_RUNNING=False, HAS_WEIGHT=True,
                   HAS_BIAS=True, HAS_RESIDUAL=False, RELU=False, BLOCK_A=32, BLOCK_B=128, PLANES=0, num_warps=4,
                   EVICT="", GHOSTS=1, enable_fp_fusion=True)  # fmt: skip
    return args, options


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    import triton

    driver.set_active(_Driver())
    kernel = D._apply_kernel
    stand_in = _Compiled()

    def compiled_already(key, *rest, **kwargs):  # (Triton's cache filled with the stand-in, no compile)
        kernel.device_caches[0][0][key] = stand_in
        return stand_in

    kernel._do_compile = compiled_already
    x = torch.empty(256 * 64 * 49, dtype=torch.bfloat16)
    call_args, options = _apply_call(x)
    grid, cuda0, token = (1, 131), torch.device("cuda", 0), object()
    rows = {
        "Triton": lambda: kernel[grid](*call_args, **options),
        "direct": lambda: L.launch(kernel, grid, call_args, options, cuda0),
        # (as bnlab's split launches call it since session 26: a token for the kernel and its options)
        "variant": lambda: L.launch(kernel, grid, call_args, options, cuda0, variant=token),
    }
    print(f"Triton {triton.__version__}, torch {torch.__version__}; {kernel.fn.__name__}, {len(call_args)} "
          f"arguments and {len(options)} constexprs/options; us a launch (min, median of 7):")  # fmt: skip
    for label, fn in rows.items():
        runs = per_call_runs(fn, args.calls, "cpu", runs=7)
        low, mid = min(runs), statistics.median(runs)
        print(f"  {label:>8}: {low:6.1f} {mid:6.1f}", flush=True)
    if not L._COMPILED:
        print("  (the direct path kept nothing: every 'direct' launch went through Triton)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
