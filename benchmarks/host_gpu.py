"""Where the host time of a small layer goes, on a GPU: per-call wall time of each piece of a training step.

Usage (on a GPU machine): PYTHONPATH=src python3 benchmarks/host_gpu.py [--shape 8,64,7,7]
(`--device cpu --calls 3 --no-compile` under TRITON_INTERPRET=1 runs every line once, for the tests.)
Why: on session 5's H200 machine a Python-called forward+backward of a small layer took 0.8-1.3 ms for
bnlab (forward alone ~0.14 ms) and 0.75-0.9 ms for torch.compile, against 0.23-0.54 ms for eager, while
on the development VM bnlab's whole step costs ~70 us of Python (`host_overhead.py`). The layer here is
small enough that the GPU's work is negligible: each line is the host's time per call (many calls
back to back, one synchronize at the end), so the differences between lines locate the cost:
- the kernels' launchers called directly (no autograd) vs through bnlab.functional (checks, autograd);
- backward through autograd vs the launchers' backward called directly: the autograd engine hands a
  CUDA backward to its device thread, which must take the GIL for a Python autograd.Function;
- the same with a short GIL switch interval (if that helps, the device thread waited for the GIL), and
  with the engine's multithreading off (backward on the calling thread: no hand-off at all);
- one Triton launch of the forward's first kernel over an empty grid (Triton's own Python per launch),
  and the launchers with every kernel stubbed (bnlab's own Python);
- the launchers, the functional call and the layer through Triton's dispatch (DIRECT_LAUNCH off; on, the
  default since session 23, skips it after a specialization's first launch: `bnlab.kernels.launch`);
- 53 layers in a row (`--chain-layers`) with one backward a step, torch's, bnlab's native and triton, per
  layer: what a network's step pays for each layer, its fixed costs paid once a step (session 24);
- eager torch and torch.compile for comparison (compile last: it starts worker processes and threads),
  and whole layers (bnlab's, torch's) compiled, also with mode="reduce-overhead" (CUDA graphs: the
  kernels replayed without host time; bnlab's run as custom ops in the graph).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import bnlab.nn
from bnlab import functional as BF
from bnlab import kernels
from bnlab.gpubench import knobs_set


def per_call_us(fn: Callable[[], object], calls: int, device: str) -> float:
    """Wall time per call of `fn`, called `calls` times back to back after a warm-up (median of 3 runs)."""
    return sorted(per_call_runs(fn, calls, device))[1]


def per_call_runs(fn: Callable[[], object], calls: int, device: str, runs: int = 3) -> list[float]:
    """Microseconds per call of `fn` in each of `runs` runs of `calls` calls back to back, after a warm-up
    of up to 20 calls (on a GPU, each run ends with a synchronize)."""

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(min(calls, 20)):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return times


class _Recorder:
    """Stands in for a kernel: a launch runs nothing; with a list, it is recorded there as (kernel, grid,
    arguments, options)."""

    def __init__(self, kernel, launches: list | None) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **options):
            if self.launches is not None:
                self.launches.append((self.kernel, grid, args, options))

        return launch


@contextlib.contextmanager
def _kernels_replaced(K, stand_in):
    """Each kernel replaced by `stand_in(kernel)` (and no occupancy asked of them: ONE_WAVE off) for the
    duration."""
    names = [name for name in dir(K) if name.endswith("_kernel")]
    real, one_wave = {name: getattr(K, name) for name in names}, K.ONE_WAVE
    K.ONE_WAVE = False
    for name in names:
        setattr(K, name, stand_in(real[name]))
    try:
        yield
    finally:
        K.ONE_WAVE = one_wave
        for name, kernel in real.items():
            setattr(K, name, kernel)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,64,7,7", help="a small NCHW shape (default 8,64,7,7)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--calls", type=int, default=300, help="calls per timing (default 300)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile lines")
    parser.add_argument("--chain-layers", type=int, default=53, help="layers in a row for the chain rows (53)")
    parser.add_argument("--profile-chain", action="store_true",
                        help="then cProfile the split-plan triton chain: where its host time goes")  # fmt: skip
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("host_gpu.py: needs a CUDA device (use host_overhead.py on a CPU machine)", file=sys.stderr)
        return 2

    def timed(fn: Callable[[], object]) -> float:
        return per_call_us(fn, args.calls, device)

    shape = tuple(int(v) for v in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    K = kernels.load()
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(shape, device=device, dtype=dtype)
    C = shape[1]
    w = torch.ones(C, device=device, requires_grad=True)
    b = torch.zeros(C, device=device, requires_grad=True)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    wrt = (x, w, b)

    def bnlab_forward() -> torch.Tensor:
        return BF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, backend="triton", nonfinite="ignore")

    def eager_forward() -> torch.Tensor:
        return F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)

    xd, dyd = x.detach(), dy.detach()
    saved = K.forward(xd, w.detach(), b.detach(), rm, rv, training=True, momentum=0.1, eps=1e-5)

    def launchers_forward() -> object:
        return K.forward(xd, w.detach(), b.detach(), rm, rv, training=True, momentum=0.1, eps=1e-5)

    def launchers_backward() -> object:
        return K.backward(dyd, xd, w.detach(), b.detach(), saved[1], saved[2], training=True)

    y_kept = bnlab_forward()

    def bnlab_backward_kept() -> object:
        return torch.autograd.grad(y_kept, wrt, dy, retain_graph=True)

    # The forward's first launch as bnlab makes it (kernel, grid, arguments, options), to time Triton's own
    # launch path over an empty grid: binding and specializing the arguments, no kernel run.
    launches: list[tuple] = []
    with _kernels_replaced(K, lambda kernel: _Recorder(kernel, launches)):
        launchers_forward()
    kernel, grid, launch_args, launch_options = launches[0]

    rows = [
        ("launchers: forward (no autograd)", launchers_forward),
        ("launchers: backward (no autograd)", launchers_backward),
        ("bnlab: forward", bnlab_forward),
        ("bnlab: backward alone (autograd, kept graph)", bnlab_backward_kept),
        ("bnlab: forward + backward", lambda: torch.autograd.grad(bnlab_forward(), wrt, dy)),
        ("eager: forward", eager_forward),
        ("eager: forward + backward", lambda: torch.autograd.grad(eager_forward(), wrt, dy)),
        # The layer's default policy, nonfinite="skip": the update written to scratch and committed by the
        # guard kernel if finite, its verdict written into pinned host memory (`bnlab.late_reports`).
        (
            "bnlab layer, nonfinite='skip': forward + backward",
            _layer_step(bnlab.nn.BatchNorm2d(C, backend="triton"), x, dy),
        ),
        # Evaluation: nothing for autograd to record, so no autograd.Function either (session 21).
        ("bnlab: inference under no_grad", _no_grad(lambda: BF.batch_norm(x, rm, rv, w, b, False, backend="triton"))),
        ("eager: inference under no_grad", _no_grad(lambda: F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5))),
    ]
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    print(f"{name}; torch {torch.__version__}; shape {shape} {args.dtype}; "
          f"GIL switch interval {sys.getswitchinterval() * 1e6:.0f} us; us per call:")  # fmt: skip
    for label, fn in rows:
        print(f"  {timed(fn):8.1f}  {label}", flush=True)
    # The same through Triton's dispatch on every launch (DIRECT_LAUNCH off; on by default: a specialization's
    # later launches call the compiled kernel's launcher, `bnlab.kernels.launch`).
    with knobs_set(K, {"DIRECT_LAUNCH": False}):
        for label, fn in [*rows[:2], rows[4], rows[7]]:
            print(f"  {timed(fn):8.1f}  {label}, Triton's dispatch", flush=True)
    empty = (0,) * len(grid)
    us = timed(lambda: kernel[empty](*launch_args, **launch_options))
    print(f"  {us:8.1f}  Triton: one launch of {kernel.fn.__name__} over an empty grid", flush=True)
    with _kernels_replaced(K, lambda kernel: _Recorder(kernel, None)):
        print(f"  {timed(rows[0][1]):8.1f}  launchers: forward, kernels stubbed (bnlab's Python)", flush=True)
        print(f"  {timed(rows[1][1]):8.1f}  launchers: backward, kernels stubbed (bnlab's Python)", flush=True)
    default_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    for label, fn in rows[4:5] + rows[6:7]:
        print(f"  {timed(fn):8.1f}  {label}, GIL switch interval 10 us", flush=True)
    sys.setswitchinterval(default_interval)
    # Backward on the calling thread instead of the engine's device thread (no GIL hand-off): if these rows
    # drop to about forward + backward alone, the hand-off was the cost (session 11: 525 us against 83 + 203)
    with torch.autograd.set_multithreading_enabled(False):
        for label, fn in rows[4:5] + rows[6:7]:
            print(f"  {timed(fn):8.1f}  {label}, autograd multithreading off", flush=True)
    # Layers in a row with one backward a step, as in a network: the step's fixed costs (the engine's start,
    # its hand-off to the device thread) paid once, so per layer what a network's step pays for each
    # (host_overhead.py --chain has the same with the kernels stubbed, on any machine).
    # The last row: the split plans (two kernels a direction) that most of a network's layers take, where
    # this small shape takes the single tile (one a direction): run 24's ResNet-50 step paid ~500 us a layer
    # over torch's on the host against the single-tile chain's ~210.
    n, split = args.chain_layers, "bnlab triton (split plans)"
    chains = {
        label: (_chain_step([make().to(device) for _ in range(n)], x), knobs)
        for label, make, knobs in (
            ("torch", lambda: torch.nn.BatchNorm2d(C), {}),
            ("bnlab native", lambda: bnlab.nn.BatchNorm2d(C, backend="native"), {}),
            ("bnlab triton", lambda: bnlab.nn.BatchNorm2d(C, backend="triton"), {}),
            (split, lambda: bnlab.nn.BatchNorm2d(C, backend="triton"), {"SINGLE_TILE_MAX": 0}),
        )
    }
    for label, (step, knobs) in chains.items():
        with knobs_set(K, knobs):
            us = per_call_us(step, max(2, args.calls // n), device) / n  # (about as many layer calls as a row's)
        print(f"  {us:8.1f}  {label} layers, {n} in a row: forward + backward, a layer", flush=True)
    if args.profile_chain:
        # (network_step.py's profile: autograd's multithreading off, so that cProfile sees the backward too;
        #  the chain warm from its row above)
        from network_step import host_profile

        step, knobs = chains[split]
        with knobs_set(K, knobs):
            print(f"  split-plan triton chain of {n} layers, a step (divide by {n} for a layer):")
            print("\n".join(host_profile(step, max(2, args.calls // n), device, top=30)), flush=True)
    if args.no_compile:
        return 0
    compiled = torch.compile(F.batch_norm, dynamic=False)

    def compiled_forward() -> torch.Tensor:
        return compiled(x, rm, rv, w, b, True, 0.1, 1e-5)

    print(f"  {timed(compiled_forward):8.1f}  torch.compile: forward", flush=True)
    both = timed(lambda: torch.autograd.grad(compiled_forward(), wrt, dy))
    print(f"  {both:8.1f}  torch.compile: forward + backward", flush=True)
    print(f"  {timed(rows[4][1]):8.1f}  bnlab: forward + backward, after torch.compile was used", flush=True)
    # Whole layers compiled: bnlab's kernels run as custom ops inside the graph (no graph break), so
    # mode="reduce-overhead" replays them from CUDA graphs with no host time per kernel.
    for mode in ("default", "reduce-overhead"):
        for label, layer in (("bnlab", bnlab.nn.BatchNorm2d(C, backend="triton")), ("torch", torch.nn.BatchNorm2d(C))):
            step = _layer_step(layer, x, dy, mode)
            print(f"  {timed(step):8.1f}  {label} layer under torch.compile(mode={mode!r}): forward + backward",
                  flush=True)  # fmt: skip
    return 0


def _chain_step(layers: list[torch.nn.Module], x: torch.Tensor) -> Callable[[], None]:
    """A training step of `layers` in a row (their default policies) from `x`, one backward of the output's
    float32 sum."""

    def step() -> None:
        h = x
        for layer in layers:
            h = layer(h)
        h.float().sum().backward()

    return step


def _no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        with torch.no_grad():
            return fn()

    return call


def _layer_step(
    layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, mode: str | None = None
) -> Callable[[], object]:
    """One training step of `layer` (compiled in `mode`, if given; on x's device): forward, then the input's
    and parameters' gradients."""
    layer = layer.to(x.device)
    forward = layer if mode is None else torch.compile(layer, mode=mode)
    wrt = (x, *layer.parameters())
    if mode != "reduce-overhead":
        return lambda: torch.autograd.grad(forward(x), wrt, dy)

    def step() -> object:
        # (a new step for CUDA-graph trees, as a training loop marks it: else they may take the last step's
        #  outputs as still in use)
        torch.compiler.cudagraph_mark_step_begin()
        return torch.autograd.grad(forward(x), wrt, dy)

    return step


if __name__ == "__main__":
    sys.exit(main())
