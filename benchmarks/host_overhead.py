"""Host (Python) time of the triton backend per call, with the kernels replaced by no-ops.

Usage: python benchmarks/host_overhead.py [--compiled]   (any machine: CPU tensors, Triton's interpreter mode)
Prints the median microseconds of a forward and of a forward+backward through bnlab.functional.batch_norm
(backend "triton", kernels stubbed: planning, checks, allocations, autograd) beside the native backend and
torch's own F.batch_norm (which include their tiny CPU compute); then the triton backend's split plan (2
launches a direction; the input above gets the single-tile plan, 1). On a GPU each Triton launch adds its
own launch cost on top.
`--compiled` adds (session 17): one call of an op with the forward op's schema and a stub body,
registered with `torch.library.custom_op` and with the low-level `torch.library.Library` API (what the
backend uses), and bnlab's and torch's BatchNorm2d under torch.compile (inductor), training forward+backward
and inference under no_grad (20th percentile: inductor's wrappers are noisy on a shared VM).
The last row times a training forward+backward through each of the backend's two autograd.Functions.
`--chain` (session 24) times instead a training step of 53 BN layers in a row (ResNet-50's count; tiny
bf16 tensors, one backward a step, the layers' default policy on the GPU's path: the deferred check, the
guard kernel a stand-in that writes a "kept" verdict as the kernel would), per layer, the providers
alternating: what a network's step pays per layer on the host, where the isolated rows above also carry
each step's fixed costs (torch.autograd.grad's, the engine's).
`--network` (session 26) times instead a training step of ResNet-50's layers at a sixteenth of their width
(network_step.py's `narrow_resnet50`: 53 BN layers between convolutions, batch 2 at 32x32, channels-last,
bf16 autocast, SGD; kernels stubbed, the GPU's deferred-check path as in `--chain`) with torch's BN layers,
bnlab's triton ones, and none (BN removed): a BN layer's host time within a network, (step - the step
without BN) / 53, beside the same layers' in a chain of BN layers alone (split plans, as the network's):
what `network_step.py` measures on a GPU host, where the chain's rows had left ~200 us a layer unexplained.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the backend then accepts CPU tensors

import torch
from host_gpu import (
    _chain_step,
    _kernels_replaced,
    _Recorder,
)  # (the kernels' no-op stand-ins, shared with host_gpu.py)

import bnlab.nn
from bnlab import functional as BF
from bnlab import kernels
from bnlab.backends import triton_backend as TB
from bnlab.gpubench import knobs_set


def _samples_us(fn, reps: int, warmup: int) -> list[float]:
    """Microseconds of each of `reps` calls of `fn`, timed one at a time after `warmup` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return samples


def _median_us(fn, reps: int = 300) -> float:
    return statistics.median(_samples_us(fn, reps, warmup=20))


def _p20_us(fn, reps: int = 1500) -> float:
    return sorted(_samples_us(fn, reps, warmup=30))[reps // 5]


def main() -> None:
    K = kernels.load()
    if "--chain" in sys.argv[1:]:
        _print_chain_rows(K)
        return
    if "--network" in sys.argv[1:]:
        _print_network_rows(K)
        return
    with _kernels_replaced(K, lambda kernel: _Recorder(kernel, None)):
        _print_rows(K)
        if "--compiled" in sys.argv[1:]:
            _print_op_rows()
            _print_compiled_rows()


def _print_op_rows() -> None:
    """One op call with the forward op's schema and a stub body, as `custom_op` registers it (Python
    autograd and ADInplaceOrView kernels around the body) and as the low-level API does (the body alone)."""

    def body(
        x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None,
        running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool, momentum: float,
        eps: float, relu: bool, save_stats: bool, layout: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        return torch.empty_like(x), x.new_empty(3), x.new_empty(3)

    mutates = ("running_mean", "running_var")
    torch.library.custom_op("bnlab_probe::custom", mutates_args=mutates)(body)
    library = torch.library.Library("bnlab_probe", "FRAGMENT")
    library.define("low_level" + torch.library.infer_schema(body, mutates_args=mutates))
    library.impl("low_level", body, "CompositeExplicitAutograd")
    args = (torch.randn(8, 3, 4), torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True), None,
            torch.zeros(3), torch.ones(3), True, 0.1, 1e-5, False, True, "planes")  # fmt: skip
    for label, op in (("custom_op", torch.ops.bnlab_probe.custom), ("low-level", torch.ops.bnlab_probe.low_level)):
        print(f"{'op call, ' + label:>22}: {_p20_us(lambda op=op: op.default(*args)):6.1f} us (stub body)")


def _print_compiled_rows() -> None:
    import bnlab.nn

    x = torch.randn(8, 64, 7, 7, requires_grad=True)
    dy = torch.randn(8, 64, 7, 7)
    for label, layer in (("bnlab triton", bnlab.nn.BatchNorm2d(64, backend="triton", nonfinite="ignore")),
                         ("torch", torch.nn.BatchNorm2d(64))):  # fmt: skip
        compiled, wrt = torch.compile(layer), (x, *layer.parameters())
        both = _p20_us(lambda compiled=compiled, wrt=wrt: torch.autograd.grad(compiled(x), wrt, dy))
        layer.eval()
        with torch.no_grad():
            inference = _p20_us(lambda compiled=compiled: compiled(x))
        print(f"{label + ' compiled':>22}: forward+backward {both:6.1f} us, inference {inference:6.1f} us")


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
    single_tile_max = K.SINGLE_TILE_MAX
    for label, forward in calls.items():
        if label == "triton split":
            K.SINGLE_TILE_MAX = 0
        both = _median_us(step(forward))
        print(f"{label:>22}: forward {_median_us(forward):6.1f} us, forward+backward {both:6.1f} us")
    K.SINGLE_TILE_MAX = single_tile_max
    # Without a graph to record (torch.no_grad: evaluation, precise statistics' forward passes), training
    # and inference forwards.
    with torch.no_grad():
        for label in ("triton", "native"):
            timed = [_median_us(lambda t=t, label=label: BF.batch_norm(x, rm, rv, w, b, t, 0.1, 1e-5, backend=label,
                                                                        nonfinite="ignore"))
                     for t in (True, False)]  # fmt: skip
            print(f"{label + ', no_grad':>22}: training {timed[0]:6.1f} us, inference {timed[1]:6.1f} us")
        inference = _median_us(lambda: torch.nn.functional.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5))
        print(f"{'torch, no_grad':>22}: inference {inference:6.1f} us")
        # What the triton backend saves there since session 21 by launching without its autograd.Function:
        # the whole call both ways, timed alternately (this VM's speed drifts between consecutive medians by
        # more than the difference); each way sets the backend's routing for its calls, at the same cost.
        decide, always = TB._through_function, lambda *tensors: True
        for training in (True, False):
            calls = [_routed(decide, x, rm, rv, w, b, training), _routed(always, x, rm, rv, w, b, training)]
            direct, inside = _alternating_medians_us(calls)
            mode = "training" if training else "inference"
            print(f"{'triton, no_grad':>22}: {mode} direct {direct:6.1f} us, in autograd.Function {inside:6.1f} us")
    # Session 22: calls under torch.func's transforms or forward-mode AD take `_Transformable` (setup_context
    # form, whose apply binds its arguments with inspect.signature every call); all others `_FusedBatchNorm`.
    # Both timed alternately on a plain training forward+backward, each forced by the backend's switch.
    calls = [_switched(transformed, step(bnlab_call("triton"))) for transformed in (False, True)]
    plain, transformable = _alternating_medians_us(calls)
    print(f"{'triton, Functions':>22}: forward+backward _FusedBatchNorm {plain:6.1f} us, "
          f"_Transformable {transformable:6.1f} us")  # fmt: skip


def _switched(transformed: bool, fn):
    """`fn` with the triton backend told whether a transform is active (which Function its calls take)."""

    def call() -> object:
        kept, TB._transformed = TB._transformed, lambda: transformed
        try:
            return fn()
        finally:
            TB._transformed = kept

    return call


def _routed(route, x, rm, rv, w, b, training: bool):
    """A triton-backend call with `route` deciding whether it goes through the autograd.Function."""

    def call() -> object:
        kept, TB._through_function = TB._through_function, route
        try:
            return BF.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, backend="triton", nonfinite="ignore")
        finally:
            TB._through_function = kept

    return call


def _alternating_medians_us(fns, reps: int = 1500, warmup: int = 100) -> list[float]:
    """The median microseconds of each of `fns`, their calls alternating."""
    return [statistics.median(kept) for kept in _alternating_samples_us(fns, reps, warmup)]


def _alternating_samples_us(fns, reps: int, warmup: int) -> list[list[float]]:
    """Microseconds of each of `reps` calls of each of `fns` (after `warmup` each), their calls alternating."""
    samples = [_samples_us(fn, 0, warmup) for fn in fns]
    for _ in range(reps):
        for fn, kept in zip(fns, samples, strict=True):
            kept.extend(_samples_us(fn, 1, 0))
    return samples


class _VerdictWriting(_Recorder):
    """A stubbed kernel; the guard's stand-in writes the verdict word a finite update gets (kept, the old
    statistics finite), so that the late reports read what they would on a GPU."""

    def __getitem__(self, grid):
        if getattr(getattr(self.kernel, "fn", None), "__name__", "") == "_guard_kernel":
            verdict = kernels.VERDICT_ARRIVED | kernels.VERDICT_KEPT | kernels.VERDICT_WERE_FINITE
            return lambda *args, **options: args[4].fill_(verdict)  # (args[4]: the verdict's pointer)
        return super().__getitem__(grid)


@contextlib.contextmanager
def _stubbed_gpu_path(K) -> Iterator[None]:
    """Within the block, the kernels stubbed (the guard's stand-in writing a "kept" verdict) and CPU layers on
    the GPU's path of the update check (deferred: no host sync a layer), as `--chain` and `--network` time."""
    deferred = BF.DEFERRED_CHECK_DEVICES
    BF.DEFERRED_CHECK_DEVICES = deferred | {"cpu"}
    try:
        with _kernels_replaced(K, lambda kernel: _VerdictWriting(kernel, None)):
            yield
    finally:
        BF.DEFERRED_CHECK_DEVICES = deferred


def _print_chain_rows(K, layers: int = 53, steps: int = 60) -> None:
    """`--chain`: see the module doc. 20th percentile of `steps` steps a provider, per layer."""
    import bnlab.nn

    channels = 16
    x = torch.randn(2, channels, 2, 2, dtype=torch.bfloat16, requires_grad=True)
    makers = {
        "torch": lambda: torch.nn.BatchNorm2d(channels),
        "native": lambda: bnlab.nn.BatchNorm2d(channels, backend="native"),
        "triton": lambda: bnlab.nn.BatchNorm2d(channels, backend="triton"),
        "triton, nonfinite='ignore'": lambda: bnlab.nn.BatchNorm2d(channels, backend="triton", nonfinite="ignore"),
    }

    with _stubbed_gpu_path(K):
        chains = [_chain_step([make() for _ in range(layers)], x) for make in makers.values()]
        samples = _alternating_samples_us(chains, reps=steps, warmup=5)
    print(f"{layers} BN layers in a row (2x{channels}x2x2 bf16, one backward a step, kernels stubbed), us a layer, "
          f"20th percentile of {steps} steps:")  # fmt: skip
    for label, kept in zip(makers, samples, strict=True):
        note = "  (its CPU kernels on tiny tensors included)" if label == "torch" else ""
        print(f"{label:>28}: {sorted(kept)[steps // 5] / layers:6.1f}{note}")


def _print_network_rows(K, steps: int = 60, size: int = 32) -> None:
    """`--network`: see the module doc. Medians of `steps` steps a provider, alternating."""
    import network_step as NS

    base = NS.narrow_resnet50()
    layers = NS.bn_layers(base)
    providers = ("torch", "triton", "none")
    channels = 64 // 16
    x = torch.randn(2, channels, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (the convolutions' CPU work on one thread: steadier; on a GPU host it is the GPU's)
    try:
        with _stubbed_gpu_path(K):
            networks = [NS.training_step(NS.prepared(base, p, "channels_last", "cpu"), "channels_last", 2, size, "cpu")
                        for p in providers]  # fmt: skip
            network = dict(zip(providers, _alternating_samples_us(networks, reps=steps, warmup=3), strict=True))
            with knobs_set(K, {"SINGLE_TILE_MAX": 0}):  # (split plans, as the network's layers get)
                makers = (
                    lambda: torch.nn.BatchNorm2d(channels),
                    lambda: bnlab.nn.BatchNorm2d(channels, backend="triton"),
                )
                chains = [_chain_step([make() for _ in range(layers)], x) for make in makers]
                chain = _alternating_samples_us(chains, reps=steps, warmup=3)
    finally:
        torch.set_num_threads(threads)
    median = {p: statistics.median(samples) for p, samples in network.items()}
    print(f"narrow ResNet-50 ({layers} BN layers; batch 2 at {size}x{size}, channels-last, bf16 autocast, SGD; "
          f"kernels stubbed), median of {steps} steps, ms: "
          + ", ".join(f"{p} {median[p] / 1e3:.2f}" for p in providers))  # fmt: skip
    print(f"a BN layer's host time, us: in the network (step - the step without BN, / {layers}) / in a chain of "
          f"{layers} BN layers alone (2x{channels}x8x8 bf16, split plans; median)")  # fmt: skip
    for p, samples in zip(("torch", "triton"), chain, strict=True):
        print(f"{p:>8}: {(median[p] - median['none']) / layers:6.1f} / {statistics.median(samples) / layers:6.1f}")


if __name__ == "__main__":
    main()
