"""``bnlab bench --gpu``: time bnlab's Triton batch norm against torch eager and torch.compile on a GPU.

What is timed, and why:

- every BN layer of ResNet-50 (torchvision's layout, 224x224 input) at batch 256 and 32: the layer shapes a
  user actually trains. Its 53 layers have only 12 distinct shapes; each is timed once and the
  per-iteration sum multiplies by the number of layers that share it;
- three BatchNorm1d shapes (wide, very wide, long and thin), where the reduction runs over the batch only;
- BN + add + ReLU (``relu(bn(x) + residual)``, the end of every bottleneck block) on the ``bn3`` shapes,
  forward+backward: the case a fused kernel exists for;

in float32, bfloat16 and float16 (parameters and running statistics in float32, as under mixed precision),
NCHW and channels_last, and three directions: ``forward`` (training mode, running statistics updated, the
autograd graph built), ``backward`` (the backward alone: ``torch.autograd.grad`` on a kept graph) and
``both``. Providers: ``bnlab-triton`` (``bnlab.functional.batch_norm(..., backend="triton")``),
``torch-eager`` (``torch.nn.functional.batch_norm``) and ``torch-compile`` (that function under
``torch.compile(dynamic=False)``, compiled once per shape, dtype and layout; compile time excluded).

Timing: the median of CUDA-event timings with the L2 cache flushed before every call (the loop of
``triton.testing.do_bench``, plus an untimed setup so that backward is timed alone; see `make_timer`); on
CPU, used only by the tests, ``time.perf_counter`` medians. Each call is timed twice: replayed from a CUDA
graph (``median_us``: the GPU's time, what the bandwidth columns and the acceptance check use) and called
from Python (``stream_us``: with the host's launch overhead, which a GPU that waits on the host counts
too; on a slow host it can exceed the kernels' time at the smaller layers). Backward alone has no graph
(its input comes from an untimed forward) and is timed from Python only. Bandwidth is the minimal traffic
(`min_traffic_bytes`) over the median time, also as a fraction of the device's own copy bandwidth,
measured once at the start. Beside each direction's rows, a copy kernel moving the same minimal traffic
is timed the same way (``size_copy_us``): at the smaller layers even a copy stays well below the device's
copy bandwidth (launch, ramp-up, the flushed L2's write-backs), which bounds what any kernel can reach there.

The run is made for one unattended 10-minute command on a borrowed machine, so: a failure of one provider
on one case becomes an error row and the run goes on; the CSV is rewritten every few seconds, so a killed
run leaves what it measured; groups run in order of priority (what the acceptance check needs first), and
after a time budget the rest are recorded as skipped instead of run. With ``--warm-jobs N``, N worker
processes first compile every group's kernels (torch.compile's, bnlab's Triton JIT) into the on-disk
caches, so that the budget goes to timing rather than to compiling one group after another.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import csv
import dataclasses
import datetime as _dt
import math
import multiprocessing
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from operator import attrgetter
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F

import bnlab
import bnlab.functional
from bnlab import kernels
from bnlab.bench import write_csv
from bnlab.provenance import gpu_provenance, provenance

__all__ = [
    "PROVIDERS",
    "QUICK",
    "Case",
    "GpuRow",
    "Group",
    "IterationSum",
    "Settings",
    "Verdict",
    "acceptance",
    "build_plan",
    "copy_bandwidth_gbps",
    "distinct_shapes",
    "errors_in_processes",
    "format_acceptance",
    "format_sums",
    "make_provider",
    "make_timer",
    "measure_group",
    "min_traffic_bytes",
    "per_iteration_sums",
    "read_rows",
    "resnet50_bn_shapes",
    "run_cli",
    "run_gpu_bench",
    "torch_bn",
]

BNLAB = "bnlab-triton"
EAGER = "torch-eager"
COMPILE = "torch-compile"
PROVIDERS = (BNLAB, EAGER, COMPILE)

RESNET = "resnet50"
FUSED = "resnet50-bn-add-relu"
BN1D = "bn1d"
CASE_LAYERS = {RESNET: 53, FUSED: 16}  # BN layers per ResNet-50 iteration; fused: the bn3 layers (residual adds)

NCHW, CHANNELS_LAST, NC = "NCHW", "channels_last", "NC"
DIRECTIONS = ("forward", "backward", "both")
MOMENTUM, EPS = 0.1, 1e-5
FALLBACK_NOTE = "unfused"
SKIPPED = "skipped: over the time budget"

# Rough costs for the printed estimate (not measured on a GPU here): one torch.compile of BN forward+backward
# for a new shape, and one timing's fixed overhead on top of its warm-up and repetitions.
COMPILE_S_GUESS = 2.5
TIMING_OVERHEAD_S = 0.03
CSV_EVERY_S = 5.0  # rewriting the whole CSV after every group would cost seconds over a full run


# ---- what is measured ----------------------------------------------------------------------------------


def resnet50_bn_shapes(
    batch: int,
    widths: Sequence[int] = (64, 128, 256, 512),
    resolutions: Sequence[int] = (56, 28, 14, 7),
    blocks: Sequence[int] = (3, 4, 6, 3),
) -> list[tuple[str, tuple[int, int, int, int]]]:
    """The input shape of every BatchNorm2d of torchvision's ResNet-50 at 224x224, in module order.

    Built from the architecture's rule rather than from torchvision (not a dependency): stem ``bn1`` at
    twice the first stage's resolution with ``widths[0]`` channels; then per stage, bottleneck blocks with
    ``bn1`` (width), ``bn2`` (width), ``bn3`` (4 x width) and, in the first block, the downsample BN
    (4 x width). The stride sits on the 3x3 conv, so the first block's ``bn1`` still sees the previous
    stage's resolution. Other widths and resolutions give the same structure at toy sizes (tests).
    """
    shapes: list[tuple[str, tuple[int, int, int, int]]] = [
        ("bn1", (batch, widths[0], 2 * resolutions[0], 2 * resolutions[0]))
    ]
    previous = resolutions[0]
    for stage, (width, res, count) in enumerate(zip(widths, resolutions, blocks, strict=True), 1):
        for block in range(count):
            name = f"layer{stage}.{block}"
            first = previous if block == 0 else res
            shapes += [
                (f"{name}.bn1", (batch, width, first, first)),
                (f"{name}.bn2", (batch, width, res, res)),
                (f"{name}.bn3", (batch, 4 * width, res, res)),
            ]
            if block == 0:
                shapes.append((f"{name}.downsample.1", (batch, 4 * width, res, res)))
        previous = res
    return shapes


def distinct_shapes(
    layers: Iterable[tuple[str, tuple[int, ...]]],
) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
    """Group layers by shape (first appearance order): each shape is timed once, then counted per layer."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, shape in layers:
        groups.setdefault(tuple(shape), []).append(name)
    return [(shape, tuple(names)) for shape, names in groups.items()]


def min_traffic_bytes(numel: int, itemsize: int, direction: str, fused: bool = False) -> int:
    """Bytes a perfect kernel must move, the yardstick for "achieved bandwidth".

    Plain BN: forward reads x and writes y (2 tensors); backward reads x and dy and writes dx (3); both: 5.
    BN + add + ReLU: forward reads x and z and writes y (3); backward reads x, z and dy and writes dx and dz
    (5); both: 8. Per-channel vectors (statistics, weight, bias and their gradients) are negligible and left
    out; so is anything a real kernel saves or rereads beyond this (that is its inefficiency).
    """
    per_direction = {"forward": 3 if fused else 2, "backward": 5 if fused else 3}
    per_direction["both"] = per_direction["forward"] + per_direction["backward"]
    if direction not in per_direction:
        raise ValueError(f"unknown direction {direction!r}; choose from {', '.join(DIRECTIONS)}")
    return per_direction[direction] * numel * itemsize


@dataclass(frozen=True)
class Case:
    """One tensor shape of one kind of case; `layers` names the ResNet-50 layers that have it."""

    name: str
    shape: tuple[int, ...]
    layers: tuple[str, ...] = ()

    @property
    def fused(self) -> bool:
        return self.name == FUSED


@dataclass(frozen=True)
class Group:
    """One set of input tensors on which every provider is timed in every direction (one compile each)."""

    case: Case
    dtype: str
    layout: str
    directions: tuple[str, ...]


@dataclass(frozen=True)
class Settings:
    """What a run measures and how long it may take; the defaults are the full benchmark of the issue."""

    device: str = "cuda"
    providers: tuple[str, ...] = PROVIDERS
    backend: str = "triton"  # the bnlab backend behind the "bnlab-triton" provider (tests: reference, native)
    batches: tuple[int, ...] = (256, 32)
    dtypes: tuple[str, ...] = ("bfloat16", "float32", "float16")
    layouts: tuple[str, ...] = (NCHW, CHANNELS_LAST)
    directions: tuple[str, ...] = DIRECTIONS
    bn1d_shapes: tuple[tuple[int, int], ...] = ((65536, 1024), (8192, 4096), (100000, 32))
    fused: bool = True
    warmup_ms: float = 5.0
    rep_ms: float = 20.0
    budget_s: float = 480.0
    copy_bytes: int = 2**30
    compile_backend: str = "inductor"
    profile: str = "default"
    warm_jobs: int = 0  # processes that compile every group's kernels before the timed loop (0: none)
    graphs: bool = True  # also time each call replayed from a CUDA graph (the GPU's time; see the module doc)
    # The Triton kernels' knobs (bnlab.kernels.batchnorm's module constants) set for the whole run, as
    # (name, value) pairs: a candidate setting timed as the defaults are (`parse_knobs`, `--knob`)
    knobs: tuple[tuple[str, object], ...] = ()


QUICK = Settings(batches=(256,), dtypes=("bfloat16", "float32"), directions=("forward", "both"), profile="quick")


def build_plan(
    settings: Settings,
    resnet_shapes: Callable[[int], list[tuple[str, tuple[int, int, int, int]]]] = resnet50_bn_shapes,
) -> list[Group]:
    """Every group to time, most important first: the dtypes, then the batches, in the order given.

    So a run cut short by its time budget still has the first dtypes (bf16, fp32: what the acceptance
    check reads) at the first batch. BatchNorm1d cases ride with the first batch.
    """
    keyed: list[tuple[tuple[int, int, int], Group]] = []
    for d, dtype in enumerate(settings.dtypes):
        for b, batch in enumerate(settings.batches):
            distinct = distinct_shapes(resnet_shapes(batch))
            bn3 = distinct_shapes((n, s) for n, s in resnet_shapes(batch) if n.endswith(".bn3"))
            for layout in settings.layouts:
                for shape, names in distinct:
                    keyed.append(((d, b, 0), Group(Case(RESNET, shape, names), dtype, layout, settings.directions)))
                if settings.fused and "both" in settings.directions:
                    for shape, names in bn3:
                        keyed.append(((d, b, 1), Group(Case(FUSED, shape, names), dtype, layout, ("both",))))
        for shape in settings.bn1d_shapes:
            keyed.append(((d, 0, 2), Group(Case(BN1D, tuple(shape)), dtype, NC, settings.directions)))
    keyed.sort(key=lambda item: item[0])  # stable: within a key, the order above
    return [group for _, group in keyed]


# ---- providers -----------------------------------------------------------------------------------------

T = TypeVar("T")
BNFn = Callable[..., torch.Tensor]  # (x, running_mean, running_var, weight, bias, residual or None) -> y


def torch_bn(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch's training-mode batch norm, followed by ``relu(. + residual)`` when a residual is given."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, True, MOMENTUM, EPS)
    return y if residual is None else torch.relu(y + residual)


def _bnlab_bn(backend: str) -> tuple[BNFn, str]:
    """bnlab's batch norm on `backend`, with ``relu(bn(x) + residual)`` passed to bnlab.functional whole.

    The note says when that backend does not fuse it (it then adds torch ops), so that acceptance check 3
    does not credit an unfused sequence as fused.
    """
    options = {"backend": backend, "nonfinite": "ignore"}  # "ignore": no guard, the same work as torch
    fused = bnlab.backends.fuses_epilogue(bnlab.backends.resolve(backend, torch.empty(0)))

    def bn(x, running_mean, running_var, weight, bias, residual=None):
        args = (x, running_mean, running_var, weight, bias, True, MOMENTUM, EPS)
        if residual is None:
            return bnlab.functional.batch_norm(*args, **options)
        return bnlab.functional.batch_norm(*args, residual=residual, activation="relu", **options)

    note = "" if fused else f"{FALLBACK_NOTE}: backend {backend!r} applies + residual and ReLU as torch ops"
    return bn, note


def make_provider(name: str, backend: str = "triton", compile_backend: str = "inductor") -> tuple[BNFn, str]:
    """The function a provider times, and a note for its rows (e.g. that its backend does not fuse).

    torch-compile starts from a reset compiler cache: the benchmark compiles the same function for a new
    shape in every group, and past Dynamo's recompile limit it would silently run eager code instead.
    """
    if name == BNLAB:
        return _bnlab_bn(backend)
    if name == EAGER:
        return torch_bn, ""
    if name == COMPILE:
        torch.compiler.reset()
        return torch.compile(torch_bn, dynamic=False, backend=compile_backend), "compile time excluded"
    raise ValueError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")


# ---- timing --------------------------------------------------------------------------------------------

# timer(fn, setup=None) -> median seconds of fn(setup()), setup() untimed (backward's fresh forward)
Timer = Callable[..., float]
MAX_REPS = 1000


def make_timer(device: str, warmup_ms: float = 5.0, rep_ms: float = 20.0, graphs: bool = False) -> Timer:
    """A median-seconds timer: CUDA events with the L2 flushed before each call on a GPU, perf_counter on CPU.

    With `graphs` (GPU), `fn` is captured once into a CUDA graph and its replays are timed: the GPU's time
    without the host's (Python, launch) overhead between kernels; a call with a `setup` is not captured.

    The GPU loop is triton.testing.do_bench's (one call, a 5-call estimate, warm-up for `warmup_ms`, then
    about `rep_ms` of calls, each after zeroing a 256 MB buffer, timed by its own pair of events), with one
    addition do_bench lacks: an untimed `setup` before each call. Backward is timed that way, after a fresh
    forward, instead of repeating backward on a kept graph: torch.compile's backward refuses
    ``retain_graph=True`` (its donated buffers), and a kept graph is not what training runs.
    """
    if torch.device(device).type != "cuda":
        return _cpu_median
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    if graphs:
        return lambda fn, setup=None: _graph_median(fn, setup, flush, warmup_ms, rep_ms)
    return lambda fn, setup=None: _event_median(fn, setup, flush, warmup_ms, rep_ms)


def _no_setup() -> None:
    return None


def _cpu_median(fn: Callable[[object], object], setup: Callable[[], object] | None = None, reps: int = 3) -> float:
    prepare = setup or _no_setup
    fn(prepare())  # warm-up
    samples = []
    for _ in range(reps):
        arg = prepare()
        start = time.perf_counter()
        fn(arg)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _event_median(
    fn: Callable[[object], object],
    setup: Callable[[], object] | None,
    flush: torch.Tensor,
    warmup_ms: float,
    rep_ms: float,
) -> float:
    prepare = setup or _no_setup
    fn(prepare())
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):  # the estimate includes setup and flush: it sizes the loop by wall time, not by fn alone
        arg = prepare()
        flush.zero_()
        fn(arg)
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn(prepare())
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(min(MAX_REPS, max(3, int(rep_ms / estimate_ms))))
    ]
    for begin, finish in events:
        arg = prepare()
        flush.zero_()
        begin.record()
        fn(arg)
        finish.record()
    torch.cuda.synchronize()
    return statistics.median(begin.elapsed_time(finish) for begin, finish in events) / 1e3


def _graph_median(
    fn: Callable[[object], object],
    setup: Callable[[], object] | None,
    flush: torch.Tensor,
    warmup_ms: float,
    rep_ms: float,
) -> float:
    if setup is not None:
        raise ValueError("a call with an untimed setup cannot be timed from a CUDA graph")
    side = torch.cuda.Stream()  # capture needs the lazy first-call work (compiles, handles) done outside it
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(None)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(None)
    return _event_median(lambda _: graph.replay(), None, flush, warmup_ms, rep_ms)  # (its pool freed after)


def copy_bandwidth_gbps(timer: Timer, device: str, nbytes: int = 2**30) -> float:
    """The device's practical bandwidth: a `nbytes` copy (read + write = 2 x nbytes) over its median time."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timer(lambda _: dst.copy_(src)) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- measuring one group -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuRow:
    """One case x provider x direction. Times in microseconds; None where there is no number."""

    case: str
    shape: str
    dtype: str
    layout: str
    direction: str
    provider: str
    median_us: float | None  # replayed from a CUDA graph where `timing` says so (see the module doc)
    gbps: float | None
    frac_of_copy: float | None
    speedup_vs_eager: float | None
    speedup_vs_best_torch: float | None
    error: str
    layers: int  # ResNet-50 layers with this shape (the multiplicity in per-iteration sums); 0 otherwise
    layer_names: str
    bytes: int
    max_abs_diff: float | None  # vs torch eager, over output and input gradients of one forward+backward
    note: str
    timing: str = ""  # "cuda-graph" or "stream" (called from Python): how median_us was taken
    stream_us: float | None = None  # called from Python, host overhead included
    # A copy kernel moving the same `bytes`, timed as median_us was: what the memory system and the timer
    # allow at this size (small tensors stay well below the device copy's bandwidth, whatever the kernel)
    size_copy_us: float | None = None


@dataclass
class _Inputs:
    x: torch.Tensor
    dy: torch.Tensor
    residual: torch.Tensor | None
    weight: torch.Tensor
    bias: torch.Tensor

    def wrt(self) -> list[torch.Tensor]:
        """What backward differentiates: the activation(s) first (compared with eager's), then parameters."""
        return [t for t in (self.x, self.residual, self.weight, self.bias) if t is not None]

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        channels = self.weight.numel()
        return (
            torch.zeros(channels, device=self.x.device, dtype=torch.float32),
            torch.ones(channels, device=self.x.device, dtype=torch.float32),
        )


def _make_inputs(group: Group, device: str) -> _Inputs:
    dtype = getattr(torch, group.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    fmt = torch.channels_last if group.layout == CHANNELS_LAST else torch.contiguous_format

    def activation(requires_grad: bool) -> torch.Tensor:
        t = torch.randn(group.case.shape, generator=gen, device=device, dtype=dtype).contiguous(memory_format=fmt)
        return t.requires_grad_(requires_grad)

    channels = group.case.shape[1]
    weight = (1 + 0.1 * torch.randn(channels, generator=gen, device=device)).requires_grad_(True)
    bias = (0.1 * torch.randn(channels, generator=gen, device=device)).requires_grad_(True)
    residual = activation(True) if group.case.fused else None
    return _Inputs(x=activation(True), dy=activation(False), residual=residual, weight=weight, bias=bias)


def training_tensors(
    shape: tuple[int, ...], layout: str, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, running mean, running var, weight, bias, dy) of a training step on `shape` in `layout` ("NCHW" or
    "channels_last"): random x (requiring grad) and dy, weight 1, bias 0; for the scripts in benchmarks/."""
    fmt = torch.channels_last if layout == CHANNELS_LAST else torch.contiguous_format
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
    dy = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    C = shape[1]
    w = torch.ones(C, device=device, requires_grad=True)
    b = torch.zeros(C, device=device, requires_grad=True)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    return x, rm, rv, w, b, dy


def training_step(x, rm, rv, w, b, dy, _: object = None) -> object:
    """One training forward+backward of the Triton backend on `training_tensors`' tensors (the scripts in
    benchmarks/ time and profile it); the last argument lets a timer pass its own."""
    y = bnlab.functional.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, backend="triton", nonfinite="ignore")
    return torch.autograd.grad(y, (x, w, b), dy)


def compile_training_step(task: tuple) -> str:
    """`training_step` on (shape, layout, dtype name, device, knobs) with the kernels' knobs set so, for a
    worker process (`errors_in_processes`): Triton compiles its kernels into the shared on-disk cache, and
    the measuring process then loads them instead of compiling. The error, or ""."""
    shape, layout, dtype_name, device, knobs = task
    try:
        with knobs_set(kernels.load(), knobs):
            training_step(*training_tensors(shape, layout, getattr(torch, dtype_name), device))
    except Exception as exc:  # the measurement of the same setting reports it too
        return f"{shape} {layout} {knobs}: {type(exc).__name__}: {exc}"[:300]
    return ""


def compile_training_steps(
    runs: Iterable[tuple[tuple[int, ...], str, dict]], dtype: torch.dtype, jobs: int, device: str = "cuda"
) -> list[str]:
    """`compile_training_step` for every (shape, layout, knobs) in `jobs` processes at once (compiling is
    CPU work, one core each: one after another, a sweep's or profile's compiles took most of its minutes).
    The errors."""
    name = str(dtype).removeprefix("torch.")
    return errors_in_processes(compile_training_step, [(s, lay, name, device, k) for s, lay, k in runs], jobs)


def parse_knobs(texts: Sequence[str]) -> tuple[tuple[str, object], ...]:
    """NAME=VALUE settings of the Triton kernels' knobs (`bnlab.kernels.batchnorm`'s upper-case module
    constants; VALUE a Python literal: True, 0.25, {'planes': 2, 'rows': 4}), checked against the
    knobs' current values: ValueError naming the setting where the name is unknown or the type differs."""
    module = kernels.load()
    knobs = []
    for text in texts:
        name, sep, value_text = text.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"knob {text!r}: expected NAME=VALUE, e.g. TILE=8192")
        if not name.isupper() or not hasattr(module, name):
            known = ", ".join(sorted(n for n in vars(module) if n.isupper() and not n.startswith("_")))
            raise ValueError(f"knob {name!r}: not a knob of bnlab.kernels.batchnorm (knobs: {known})")
        try:
            value = ast.literal_eval(value_text.strip())
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"knob {name}: {value_text!r} is not a Python literal ({exc})") from None
        default = getattr(module, name)
        expected = (int, float) if isinstance(default, float) else type(default)
        if not isinstance(value, expected) or (isinstance(value, bool) and not isinstance(default, bool)):
            raise ValueError(f"knob {name}: {value!r} is a {type(value).__name__}, expected a "
                             f"{type(default).__name__} like its default {default!r}")  # fmt: skip
        if isinstance(default, dict) and set(value) != set(default):
            raise ValueError(f"knob {name}: keys {sorted(value)}, expected {sorted(default)}")
        knobs.append((name, value))
    return tuple(knobs)


def _knobs_of(settings: Settings) -> contextlib.AbstractContextManager:
    """`knobs_set` for a run's knobs (none: nothing to set, the kernels not even loaded)."""
    return knobs_set(kernels.load(), dict(settings.knobs)) if settings.knobs else contextlib.nullcontext()


@contextlib.contextmanager
def knobs_set(module: object, knobs: dict[str, object]) -> Iterator[None]:
    """Within the block, the module's attributes (the kernels' knobs) set to `knobs`; its own values again
    after it (mutates the module while it lasts): each measurement of a sweep starts from the defaults."""
    defaults = {name: getattr(module, name) for name in knobs}
    for name, value in knobs.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in defaults.items():
            setattr(module, name, value)


def _direction_fn(
    fn: BNFn, inp: _Inputs, stats: tuple[torch.Tensor, torch.Tensor], direction: str
) -> tuple[Callable[[object], object], Callable[[], object] | None]:
    """What to time and its untimed setup: forward (graph built), backward alone (after a fresh forward), both."""

    def forward(_: object = None) -> torch.Tensor:
        return fn(inp.x, *stats, inp.weight, inp.bias, inp.residual)

    wrt = inp.wrt()
    if direction == "forward":
        return forward, None
    if direction == "backward":
        return (lambda y: torch.autograd.grad(y, wrt, inp.dy)), forward
    if direction == "both":
        return (lambda _: torch.autograd.grad(forward(), wrt, inp.dy)), None
    raise ValueError(f"unknown direction {direction!r}; choose from {', '.join(DIRECTIONS)}")


def _outputs_once(fn: BNFn, inp: _Inputs, stats: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    """Output and activation gradients of one forward+backward (also the first call that compiles)."""
    y = fn(inp.x, *stats, inp.weight, inp.bias, inp.residual)
    grads = torch.autograd.grad(y, inp.wrt(), inp.dy)
    return [y.detach(), *grads[: 2 if inp.residual is not None else 1]]


def _max_abs_diff(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> tuple[float, int]:
    """The largest difference over the output and the activation gradients, and how many ReLU mask flips
    it left out (fused cases).

    Where relu's input is within rounding of zero, a fused kernel (which adds the residual in float32)
    and torch (which rounds bn's output to the dtype first) can disagree on the sign; each gradient is
    then right for its own forward, and the two differ there by the whole upstream gradient. Those
    elements are left out of the gradients' comparison (the output's comparison bounds how near zero
    they were).
    """
    y, ref_y = outputs[0].float(), reference[0].float()
    worst = float((y - ref_y).abs().max())
    agree = (y > 0) == (ref_y > 0) if len(outputs) == 3 else None  # fused: y, dx, dresidual
    for a, b in zip(outputs[1:], reference[1:], strict=True):
        gap = (a.float() - b.float()).abs()
        gap = gap if agree is None else gap[agree]
        worst = max(worst, float(gap.max()) if gap.numel() else 0.0)
    return worst, 0 if agree is None else int(agree.numel() - agree.sum())


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _row(
    group: Group, provider: str, direction: str, copy_gbps: float, seconds: float | None = None, **extra
) -> GpuRow:
    case = group.case
    nbytes = min_traffic_bytes(math.prod(case.shape), getattr(torch, group.dtype).itemsize, direction, case.fused)
    gbps = nbytes / seconds / 1e9 if seconds else None
    fields = {
        "case": case.name,
        "shape": _shape_str(case.shape),
        "dtype": group.dtype,
        "layout": group.layout,
        "direction": direction,
        "provider": provider,
        "median_us": seconds * 1e6 if seconds else None,
        "gbps": gbps,
        "frac_of_copy": gbps / copy_gbps if gbps and copy_gbps else None,
        "speedup_vs_eager": None,
        "speedup_vs_best_torch": None,
        "error": "",
        "layers": len(case.layers),
        "layer_names": ";".join(case.layers),
        "bytes": nbytes,
        "max_abs_diff": None,
        "note": "",
    }
    return GpuRow(**{**fields, **extra})


def _error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _measure_provider(
    provider: str,
    group: Group,
    inp: _Inputs,
    reference: Sequence[torch.Tensor],
    settings: Settings,
    timer: Timer,
    copy_gbps: float,
    graph_timer: Timer | None = None,
) -> list[GpuRow]:
    device = torch.device(settings.device)
    try:
        fn, note = make_provider(provider, settings.backend, settings.compile_backend)
        stats = inp.stats()
        start = time.perf_counter()
        diff, flips = _max_abs_diff(_outputs_once(fn, inp, stats), reference)
        _sync(device)
        if provider == COMPILE:
            note = f"compile time excluded (first call {time.perf_counter() - start:.1f} s)"
        elif provider == BNLAB and settings.backend == "triton":
            plans = kernels.load().describe_plans(inp.x)
            note = f"{note}; {plans}" if note else plans
        if flips:
            flipped = f"{flips} ReLU mask flips left out of max_abs_diff"
            note = f"{note}; {flipped}" if note else flipped
    except Exception as exc:
        return [_row(group, provider, d, copy_gbps, error=_error_text(exc)) for d in group.directions]
    rows = []
    for direction in group.directions:
        row_note = note
        try:
            call, setup = _direction_fn(fn, inp, stats, direction)
            stream_seconds = timer(call, setup)
            seconds, timing = stream_seconds, "stream"
            if graph_timer is not None and setup is None:
                try:
                    seconds, timing = graph_timer(call), "cuda-graph"
                except Exception as exc:  # keep the Python-timed number, and say why there is no other
                    row_note = f"{note}; no CUDA graph: {_error_text(exc)}"
            rows.append(
                _row(group, provider, direction, copy_gbps, seconds, max_abs_diff=diff, note=row_note,
                     timing=timing, stream_us=stream_seconds * 1e6)
            )  # fmt: skip
        except Exception as exc:
            rows.append(_row(group, provider, direction, copy_gbps, error=_error_text(exc), note=note))
    return rows


def same_bytes_copy_seconds(timer: Timer, nbytes: int, device: str, dtype: torch.dtype) -> float:
    """The time of an elementwise copy kernel that reads nbytes / 2 and writes nbytes / 2 (``torch.neg``
    into another tensor: a kernel, where ``copy_`` would become a memcpy node in a CUDA graph)."""
    src = torch.zeros(max(1, nbytes // 2 // dtype.itemsize), device=device, dtype=dtype)
    dst = torch.empty_like(src)
    return timer(lambda _: torch.neg(src, out=dst))


def measure_group(
    group: Group, settings: Settings, timer: Timer, copy_gbps: float, graph_timer: Timer | None = None
) -> list[GpuRow]:
    """Time every provider in every direction of `group` (also from a CUDA graph with `graph_timer`), and a
    copy of each direction's minimal traffic with the same timer; a failing provider or direction gives
    error rows."""
    inp = _make_inputs(group, settings.device)
    reference = _outputs_once(torch_bn, inp, inp.stats())
    rows: list[GpuRow] = []
    for provider in settings.providers:
        rows += _measure_provider(provider, group, inp, reference, settings, timer, copy_gbps, graph_timer)
    dtype = getattr(torch, group.dtype)
    copies = {}
    for direction, timing in sorted({(r.direction, r.timing) for r in rows if r.median_us}):
        nbytes = min_traffic_bytes(math.prod(group.case.shape), dtype.itemsize, direction, group.case.fused)
        copy_timer = graph_timer if timing == "cuda-graph" and graph_timer is not None else timer
        try:
            copies[direction, timing] = same_bytes_copy_seconds(copy_timer, nbytes, settings.device, dtype) * 1e6
        except Exception:  # (e.g. out of memory) a reference only: the providers' rows stand without it
            if torch.device(settings.device).type == "cuda":
                torch.cuda.empty_cache()
    return with_speedups([replace(r, size_copy_us=copies.get((r.direction, r.timing))) for r in rows])


def _ok(row: GpuRow | None) -> bool:
    return row is not None and not row.error and bool(row.median_us)


def with_speedups(rows: Sequence[GpuRow]) -> list[GpuRow]:
    """Fill the speedup columns: torch eager's time, and the faster of eager and compile, over each row's."""
    out = []
    for row in rows:
        same = {r.provider: r for r in rows if r.direction == row.direction and _ok(r)}
        eager = same[EAGER].median_us if EAGER in same else None
        best = min((same[p].median_us for p in (EAGER, COMPILE) if p in same), default=None)
        if _ok(row):
            row = replace(
                row,
                speedup_vs_eager=eager / row.median_us if eager else None,
                speedup_vs_best_torch=best / row.median_us if best else None,
            )
        out.append(row)
    return out


# ---- the run -------------------------------------------------------------------------------------------


def estimate_seconds(plan: Sequence[Group], settings: Settings) -> float:
    """A rough duration: the timing budget per measurement plus a guessed compile time per group."""
    per_timing = (settings.warmup_ms + settings.rep_ms) / 1e3 + TIMING_OVERHEAD_S
    per_group = [len(g.directions) + settings.graphs * sum(d != "backward" for d in g.directions) for g in plan]
    timings = sum(per_group) * len(settings.providers) + sum(len(g.directions) for g in plan)  # + same-size copies
    compiles = len(plan) if COMPILE in settings.providers else 0
    return timings * per_timing + compiles * COMPILE_S_GUESS


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _progress_line(index: int, total: int, elapsed: float, group: Group, rows: Sequence[GpuRow]) -> str:
    left = elapsed / index * (total - index)
    head = f"[{index:>3}/{total} {elapsed:4.0f}s, ~{left:4.0f}s left] {group.case.name} {_shape_str(group.case.shape)}"
    parts = []
    for direction in group.directions:
        cells = []
        for r in rows:
            if r.direction == direction:
                value = f"{r.median_us:.1f}us" if _ok(r) else "ERROR"
                frac = f" ({r.frac_of_copy:.2f} of copy)" if r.provider == BNLAB and r.frac_of_copy else ""
                cells.append(f"{r.provider} {value}{frac}")
        parts.append(f"{direction}: " + ", ".join(cells))
    errors = sorted({f"    {r.provider}: {r.error}" for r in rows if r.error})
    return "\n".join([f"{head} {group.dtype} {group.layout} | " + " | ".join(parts), *errors])


def _warm_group(task: tuple[Group, Settings]) -> str:
    """One forward+backward of each compiling provider on a group's inputs, in a worker process: the
    kernels land in the on-disk caches (Triton's, inductor's) that the timed loop then reads."""
    group, settings = task
    try:
        inp = _make_inputs(group, settings.device)
        for provider in settings.providers:
            if provider in (BNLAB, COMPILE):
                fn, _ = make_provider(provider, settings.backend, settings.compile_backend)
                with _knobs_of(settings):
                    _outputs_once(fn, inp, inp.stats())
        _sync(torch.device(settings.device))
    except Exception as exc:  # the timed loop meets the same failure and records it
        return f"{group.case.name} {_shape_str(group.case.shape)} {group.dtype} {group.layout}: {_error_text(exc)}"
    return ""


def warm_compile(plan: Sequence[Group], settings: Settings) -> list[str]:
    """Compile every group's kernels in `settings.warm_jobs` processes at once, before anything is timed.

    Compiling is CPU work, one core per compile: torch.compile takes seconds per group and the Triton JIT
    about one more, which, one after another, would spend most of a short run's budget. The workers fill
    the on-disk caches; the timed loop's own compile of each group then mostly loads from them. Returns
    the errors (the timed loop records them again, per row).
    """
    return errors_in_processes(_warm_group, [(group, settings) for group in plan], settings.warm_jobs)


def errors_in_processes(task: Callable[[T], str], items: Sequence[T], jobs: int) -> list[str]:
    """`task` on every item in `jobs` spawned processes (CUDA cannot be used in forked ones); the non-empty
    strings it returned (errors), in order. For compile warm-ups: the work lands in on-disk caches."""
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=spawn) as pool:
        return [error for error in pool.map(task, items) if error]


def run_gpu_bench(
    settings: Settings,
    out_dir: Path,
    plan: Sequence[Group] | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> tuple[list[GpuRow], Path]:
    """Run the plan (default `build_plan(settings)`); returns the rows and the CSV (rewritten as it goes)."""
    device = torch.device(settings.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # "cuda" alone (no index) is refused here and means the current GPU anyway
    plan = build_plan(settings) if plan is None else list(plan)
    timer = make_timer(settings.device, settings.warmup_ms, settings.rep_ms)
    graph_timer = (
        make_timer(settings.device, settings.warmup_ms, settings.rep_ms, graphs=True)
        if settings.graphs and device.type == "cuda"
        else None
    )
    copy_gbps = copy_bandwidth_gbps(timer, settings.device, settings.copy_bytes)
    record = {**provenance(), **gpu_provenance(device if device.type == "cuda" else None)}
    record.update(device=str(device), copy_gbps=round(copy_gbps, 1), profile=settings.profile)
    record["knobs"] = " ".join(f"{name}={value!r}" for name, value in settings.knobs)  # ("": the defaults)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = record["gpu"] if device.type == "cuda" else ""  # (provenance names a GPU that a CPU run did not use)
    path = Path(out_dir) / f"gpu-{_slug(str(name or device.type))}-{stamp}.csv"
    estimate = estimate_seconds(plan, settings)
    if settings.knobs:
        log(f"the Triton kernels' knobs set for this run: {record['knobs']}")
    log(
        f"bnlab bench --gpu ({settings.profile}) on {record['gpu'] or device}: device copy {copy_gbps:.0f} GB/s; "
        f"{len(plan)} groups, {len(settings.providers)} providers; rough estimate {estimate:.0f} s (torch.compile "
        f"~{COMPILE_S_GUESS} s per group is a guess; bnlab's Triton JIT comes on top; compile and JIT time are "
        f"excluded from every number); budget {settings.budget_s:.0f} s, then the rest is skipped; CSV: {path}"
    )
    if estimate > settings.budget_s:
        log(f"note: the estimate exceeds the budget; the last groups ({settings.dtypes[-1]} first) may be skipped")
    if BNLAB in settings.providers and settings.backend not in bnlab.available_backends():
        log(f"warning: bnlab has no backend {settings.backend!r} in this version: the {BNLAB} rows will be errors")
    if settings.warm_jobs > 0:
        warm_start = time.monotonic()
        errors = warm_compile(plan, settings)
        log(
            f"compiled every group's kernels in {time.monotonic() - warm_start:.0f} s with {settings.warm_jobs} "
            f"processes (not counted in the budget); {len(errors)} groups failed"
            + (f", e.g. {errors[0]}" if errors else "")
        )
    rows: list[GpuRow] = []
    start = written = time.monotonic()
    for index, group in enumerate(plan, 1):
        elapsed = time.monotonic() - start
        if elapsed > settings.budget_s:
            rows += [_row(group, p, d, copy_gbps, error=SKIPPED) for p in settings.providers for d in group.directions]
            continue
        try:
            with _knobs_of(settings):
                new = measure_group(group, settings, timer, copy_gbps, graph_timer)
        except Exception as exc:  # the inputs or the reference failed (e.g. out of memory): the whole group
            error = _error_text(exc)
            new = [_row(group, p, d, copy_gbps, error=error) for p in settings.providers for d in group.directions]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows += new
        if time.monotonic() - written > CSV_EVERY_S:  # a killed run keeps all but its last seconds
            write_csv(rows, path, record)
            written = time.monotonic()
        log(_progress_line(index, len(plan), time.monotonic() - start, group, new))
    if rows:
        write_csv(rows, path, record)
    skipped = sum(r.error == SKIPPED for r in rows)
    log(f"done in {time.monotonic() - start:.0f} s" + (f"; {skipped} rows skipped (time budget)" if skipped else ""))
    return rows, path


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(GpuRow)}
_REQUIRED_FIELDS = {f.name for f in dataclasses.fields(GpuRow) if f.default is dataclasses.MISSING}


def _parse(name: str, text: str) -> object:
    kind = _FIELD_TYPES[name]
    if kind == "str":
        return text
    if kind == "int":
        return int(text)
    return float(text) if text not in ("", "None") else None


def read_rows(path: Path) -> list[GpuRow]:
    """Rows of a CSV written by `run_gpu_bench` (extra provenance columns are ignored)."""
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        missing = _REQUIRED_FIELDS - columns
        if missing:
            raise ValueError(f"{path}: not a bnlab GPU bench CSV (missing columns {', '.join(sorted(missing))})")
        present = [name for name in _FIELD_TYPES if name in columns]  # older CSVs lack the optional ones
        return [GpuRow(**{name: _parse(name, line[name]) for name in present}) for line in reader]


# ---- per-iteration sums and the acceptance check --------------------------------------------------------


@dataclass(frozen=True)
class IterationSum:
    """A provider's time for all BN layers of one ResNet-50 iteration (complete only if no layer is missing)."""

    case: str
    batch: int
    dtype: str
    layout: str
    direction: str
    provider: str
    total_us: float
    layers: int  # layers with a time
    expected: int

    @property
    def complete(self) -> bool:
        return self.layers == self.expected


def per_iteration_sums(
    rows: Iterable[GpuRow], field: str = "median_us"
) -> dict[tuple[str, int, str, str, str, str], IterationSum]:
    """Sum multiplicity x median over the layer shapes, per case, batch, dtype, layout, direction, provider
    (`field`: the median as the bench times it, or `stream_us`: called from Python, where measured)."""
    totals: dict[tuple[str, int, str, str, str, str], list[float]] = {}
    for r in rows:
        if r.case not in CASE_LAYERS:
            continue
        key = (r.case, int(r.shape.split("x")[0]), r.dtype, r.layout, r.direction, r.provider)
        acc = totals.setdefault(key, [0.0, 0])
        if _ok(r) and getattr(r, field) is not None:
            acc[0] += r.layers * getattr(r, field)
            acc[1] += r.layers
    return {key: IterationSum(*key, total, int(n), CASE_LAYERS[key[0]]) for key, (total, n) in totals.items()}


def _unique(values: Iterable[object]) -> list:
    return list(dict.fromkeys(values))


def format_sums(rows: Sequence[GpuRow]) -> str:
    """The per-iteration BN time of ResNet-50 per provider (ms), with bnlab's speedups where complete."""
    sums = per_iteration_sums(rows)
    providers = _unique(r.provider for r in rows)
    lines = []
    for case, batch in _unique((k[0], k[1]) for k in sums):
        lines.append(
            f"{case}, batch {batch}: per-iteration sum over its {CASE_LAYERS[case]} BN layers, ms "
            f"(multiplicity x median; (k/n) = only k layers measured)"
        )
        head = f"  {'dtype':<9} {'layout':<14} {'direction':<9}" + "".join(f" {p:>14}" for p in providers)
        lines.append(head + (f" {'bnlab/eager':>12} {'bnlab/compile':>14}" if BNLAB in providers else ""))
        for dtype, layout, direction in _unique(k[2:5] for k in sums if k[:2] == (case, batch)):
            got = {p: sums.get((case, batch, dtype, layout, direction, p)) for p in providers}
            cells = [
                f"{s.total_us / 1e3:.3f}" if s and s.complete else (f"({s.layers}/{s.expected})" if s else "-")
                for s in got.values()
            ]
            line = f"  {dtype:<9} {layout:<14} {direction:<9}" + "".join(f" {c:>14}" for c in cells)
            mine = got.get(BNLAB)
            for other, width in ((EAGER, 12), (COMPILE, 14)):
                if mine is None:
                    break
                theirs = got.get(other)
                ok = mine.complete and theirs is not None and theirs.complete
                line += f" {f'{theirs.total_us / mine.total_us:.2f}x' if ok else '-':>{width}}"
            lines.append(line)
    return "\n".join(lines)


_MARKDOWN_COLUMNS = (("bfloat16", NCHW, "bf16 NCHW"), ("bfloat16", CHANNELS_LAST, "bf16 channels-last"),
                     ("float32", NCHW, "fp32 NCHW"), ("float32", CHANNELS_LAST, "fp32 channels-last"))  # fmt: skip


def format_markdown(rows: Sequence[GpuRow], batch: int = 256, direction: str = "both") -> str:
    """The README's two tables for ResNet-50 at `batch` (`direction`): the per-iteration sums (ms) with
    bnlab's speed-ups, and per layer shape bnlab's time, fraction of copy and speed-up over the faster of
    eager and torch.compile in the same run ("-" where a number is missing)."""
    sums = per_iteration_sums(rows)
    lines = ["| dtype | layout | bnlab triton | torch eager | torch.compile | vs eager | vs compile |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for dtype, layout, label in _MARKDOWN_COLUMNS:
        got = [sums.get((RESNET, batch, dtype, layout, direction, p)) for p in (BNLAB, EAGER, COMPILE)]
        if got[0] is None:
            continue
        ms = [f"{s.total_us / 1e3:.2f}" if s and s.complete else "-" for s in got]
        ratios = [
            f"{s.total_us / got[0].total_us:.2f}x" if s and s.complete and got[0].complete else "-" for s in got[1:]
        ]
        lines.append(f"| {label.split()[0]} | {label.split()[1]} | " + " | ".join(ms + ratios) + " |")
    timed = {
        (r.shape, r.dtype, r.layout, r.provider): r
        for r in rows
        if r.case == RESNET and r.direction == direction and _ok(r) and r.shape.startswith(f"{batch}x")
    }
    shapes = _unique(r.shape for r in rows if r.case == RESNET and r.shape.startswith(f"{batch}x"))
    lines += ["", "| layer shape | layers | " + " | ".join(c[2] for c in _MARKDOWN_COLUMNS) + " |",
              "| --- | --- |" + " --- |" * len(_MARKDOWN_COLUMNS)]  # fmt: skip
    for shape in shapes:
        cells = []
        for dtype, layout, _ in _MARKDOWN_COLUMNS:
            mine = timed.get((shape, dtype, layout, BNLAB))
            torch_us = [t.median_us for p in (EAGER, COMPILE) if (t := timed.get((shape, dtype, layout, p)))]
            if mine is None:
                cells.append("-")
                continue
            frac = f"{mine.frac_of_copy:.2f}" if mine.frac_of_copy is not None else "-"
            speedup = f"{min(torch_us) / mine.median_us:.2f}x" if torch_us else "-"
            cells.append(f"{mine.median_us:.0f} us, {frac}, {speedup}")
        layers = next((r.layers for r in rows if r.case == RESNET and r.shape == shape), 0)
        lines.append(f"| {shape} | {layers} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Verdict:
    """One acceptance criterion: passed or not, the numbers behind it, and what failed."""

    name: str
    passed: bool
    detail: str
    failures: tuple[str, ...] = ()


MIN_FRAC_OF_COPY = 0.55
MIN_SPEEDUP_VS_BEST = 0.95
MIN_SUM_SPEEDUP_VS_EAGER = 2.0
MIN_SUM_SPEEDUP_VS_COMPILE = 1.2
MIN_FUSED_SPEEDUP_VS_EAGER = 1.5
_ACCEPT_DTYPES = ("bfloat16", "float32")
_ACCEPT_LAYOUTS = (NCHW, CHANNELS_LAST)


def _label(r: GpuRow) -> str:
    return f"{r.case} {r.shape} {r.dtype} {r.layout} {r.direction}"


def _batches(rows: Sequence[GpuRow], case: str) -> list[int]:
    return sorted({int(r.shape.split("x")[0]) for r in rows if r.case == case}, reverse=True)


def _check_layers(rows: Sequence[GpuRow], provider: str) -> Verdict:
    name = (
        f"1. forward+backward on every ResNet-50 layer shape (bf16, fp32; NCHW, channels_last): {provider} "
        f">= {MIN_FRAC_OF_COPY} of copy bandwidth and time <= 1/{MIN_SPEEDUP_VS_BEST} x the faster torch"
    )
    index = {(r.shape, r.dtype, r.layout, r.provider): r for r in rows if r.case == RESNET and r.direction == "both"}
    mine = [r for r in index.values() if r.provider == provider and r.dtype in _ACCEPT_DTYPES]
    mine = [r for r in mine if r.layout in _ACCEPT_LAYOUTS]
    if not mine:
        return Verdict(name, False, "no data")
    failures, fracs, ratios = [], [], []
    for r in mine:
        best = min(
            (t.median_us for p in (EAGER, COMPILE) if _ok(t := index.get((r.shape, r.dtype, r.layout, p)))),
            default=None,
        )
        if not _ok(r) or best is None:
            failures.append(f"{_label(r)}: {r.error or 'no time'}" if not _ok(r) else f"{_label(r)}: no torch time")
            continue
        frac, ratio = r.frac_of_copy or 0.0, r.median_us / best
        fracs.append((frac, _label(r)))
        ratios.append((ratio, _label(r)))
        if frac < MIN_FRAC_OF_COPY or ratio > 1 / MIN_SPEEDUP_VS_BEST:
            # (what a copy of the same bytes reached under the same timer: the ceiling at this size)
            ceiling = f"; a same-size copy {frac * r.median_us / r.size_copy_us:.2f}" if r.size_copy_us else ""
            failures.append(f"{_label(r)}: {frac:.2f} of copy{ceiling}, {ratio:.3f}x the faster torch's time")
    passing = len(mine) - len(failures)
    for batch in _batches(rows, RESNET):  # every layer of every (dtype, layout) must have been measured
        for dtype in _ACCEPT_DTYPES:
            for layout in _ACCEPT_LAYOUTS:
                shapes = [r for r in mine if (r.dtype, r.layout) == (dtype, layout) and r.shape.startswith(f"{batch}x")]
                if sum(r.layers for r in shapes) != CASE_LAYERS[RESNET]:
                    got = sum(r.layers for r in shapes)
                    failures.append(f"batch {batch} {dtype} {layout}: {got}/{CASE_LAYERS[RESNET]} layers measured")
    detail = f"{passing}/{len(mine)} shapes pass"
    if fracs:
        (low, low_at), (high, high_at) = min(fracs), max(ratios)
        detail += f"; lowest {low:.2f} of copy ({low_at}); highest time over the faster torch {high:.3f} ({high_at})"
    return Verdict(name, not failures, detail, tuple(failures))


def _check_sums(rows: Sequence[GpuRow], provider: str) -> Verdict:
    name = (
        f"2. per-iteration sum over ResNet-50's 53 layers, bf16 forward+backward: {provider} >= "
        f"{MIN_SUM_SPEEDUP_VS_EAGER}x faster than eager and >= {MIN_SUM_SPEEDUP_VS_COMPILE}x than torch.compile"
    )
    sums = per_iteration_sums(rows)
    parts, failures = [], []
    for batch in _batches(rows, RESNET):
        for layout in _ACCEPT_LAYOUTS:
            got = {p: sums.get((RESNET, batch, "bfloat16", layout, "both", p)) for p in (provider, EAGER, COMPILE)}
            where = f"batch {batch} {layout}"
            incomplete = [f"{p} {s.layers if s else 0}/53" for p, s in got.items() if s is None or not s.complete]
            if incomplete:
                failures.append(f"{where}: incomplete ({', '.join(incomplete)} layers)")
                continue
            vs_eager = got[EAGER].total_us / got[provider].total_us
            vs_compile = got[COMPILE].total_us / got[provider].total_us
            total_ms = got[provider].total_us / 1e3
            parts.append(f"{where}: {total_ms:.2f} ms, {vs_eager:.2f}x vs eager, {vs_compile:.2f}x vs compile")
            if vs_eager < MIN_SUM_SPEEDUP_VS_EAGER or vs_compile < MIN_SUM_SPEEDUP_VS_COMPILE:
                failures.append(parts[-1])
    if not parts and not failures:
        return Verdict(name, False, "no data")
    return Verdict(name, not failures, "; ".join(parts) or "no complete sum", tuple(failures))


def _check_fused(rows: Sequence[GpuRow], provider: str) -> Verdict:
    name = (
        f"3. fused BN+add+ReLU forward+backward: {provider} >= {MIN_FUSED_SPEEDUP_VS_EAGER}x faster than "
        f"eager's unfused sequence"
    )
    index = {(r.shape, r.dtype, r.layout, r.provider): r for r in rows if r.case == FUSED and r.direction == "both"}
    mine = [r for key, r in index.items() if key[3] == provider]
    failures, speedups = [], []
    for r in mine:
        eager = index.get((r.shape, r.dtype, r.layout, EAGER))
        if not _ok(r) or not _ok(eager):
            failures.append(f"{_label(r)}: {r.error or (eager.error if eager else 'no eager row') or 'no time'}")
            continue
        speedup = eager.median_us / r.median_us
        speedups.append((speedup, _label(r)))
        if FALLBACK_NOTE in r.note:
            failures.append(f"{_label(r)}: not fused ({r.note})")
        elif speedup < MIN_FUSED_SPEEDUP_VS_EAGER:
            failures.append(f"{_label(r)}: {speedup:.2f}x")
    if not mine:
        return Verdict(name, False, "no data")
    detail = f"{len(mine) - len(failures)}/{len(mine)} cases pass"
    if speedups:
        low = min(speedups)
        detail += f"; lowest {low[0]:.2f}x ({low[1]}), median {statistics.median(s for s, _ in speedups):.2f}x"
    return Verdict(name, not failures, detail, tuple(failures))


def acceptance(rows: Sequence[GpuRow], provider: str = BNLAB) -> list[Verdict]:
    """The issue's three acceptance criteria, evaluated on measured (or reloaded) rows; missing data fails."""
    return [_check_layers(rows, provider), _check_sums(rows, provider), _check_fused(rows, provider)]


def format_acceptance(verdicts: Sequence[Verdict], max_failures: int = 8) -> str:
    lines = ["Acceptance check:"]
    for v in verdicts:
        lines.append(f"  [{'PASS' if v.passed else 'FAIL'}] {v.name}")
        lines.append(f"         {v.detail}")
        lines += [f"         - {f}" for f in v.failures[:max_failures]]
        if len(v.failures) > max_failures:
            lines.append(f"         ... and {len(v.failures) - max_failures} more")
    return "\n".join(lines)


def format_comparison(rows: Sequence[GpuRow], before: Sequence[GpuRow], provider: str = BNLAB) -> str:
    """`provider`'s times in `rows` against `before` (a previous run, on the same kind of GPU for the
    numbers to mean anything): per row found in both (same case, shape, dtype, layout, direction), then
    per complete per-iteration sum; new / old < 1 is faster now. A row whose note (the plans, mask flips)
    changed is marked *. The sums also called from Python (`stream_us`), where both runs have them all: a
    candidate's host cost (e.g. more launches a layer) shows there."""
    key = attrgetter("case", "shape", "dtype", "layout", "direction")
    old = {key(r): r for r in before if r.provider == provider and _ok(r)}
    pairs = [(r, old[key(r)]) for r in rows if r.provider == provider and _ok(r) and key(r) in old]
    lines = [f"{provider} against the earlier run ({len(pairs)} rows in both; new / old time, < 1: faster now)"]
    for new, was in pairs:
        mark = " *" if new.note != was.note else ""
        lines.append(f"  {_label(new):<66} {was.median_us:10.1f} -> {new.median_us:10.1f} us "
                     f"{new.median_us / was.median_us:6.3f}{mark}")  # fmt: skip
    for field, how in (("median_us", ""), ("stream_us", ", called from Python")):
        now, then = per_iteration_sums(rows, field), per_iteration_sums(before, field)
        for k, s in now.items():
            t = then.get(k)
            if k[-1] == provider and s.complete and t is not None and t.complete:
                case, batch, dtype, layout, direction, _ = k
                lines.append(f"  sum {case} batch {batch} {dtype} {layout} {direction}{how}: {t.total_us / 1e3:.3f}"
                             f" -> {s.total_us / 1e3:.3f} ms {s.total_us / t.total_us:6.3f}")  # fmt: skip
    return "\n".join(lines)


# ---- command line --------------------------------------------------------------------------------------


def _report(
    rows: Sequence[GpuRow], strict: bool, against: Sequence[GpuRow] | None = None, markdown: bool = False
) -> int:
    print(format_sums(rows))
    if markdown:
        print()
        print(format_markdown(rows))
    print()
    verdicts = acceptance(rows)
    print(format_acceptance(verdicts))
    if against is not None:
        print()
        print(format_comparison(rows, against))
    return 1 if strict and not all(v.passed for v in verdicts) else 0


def run_cli(args: argparse.Namespace) -> int:
    """``bnlab bench --gpu``: run (or, with --check, reload) the benchmark, print the sums and the check."""
    against = None
    if args.against:  # (read first: a run that ends in a bad comparison file would be lost to the reader)
        try:
            against = read_rows(Path(args.against))
        except (OSError, ValueError, KeyError) as exc:
            print(f"bnlab bench --gpu --against: {exc}", file=sys.stderr)
            return 2
    if args.check:
        if args.knob:
            print("bnlab bench --gpu: --knob sets the kernels for a run; --check only reads a CSV", file=sys.stderr)
            return 2
        try:
            rows = read_rows(Path(args.check))
        except (OSError, ValueError, KeyError) as exc:
            print(f"bnlab bench --gpu --check: {exc}", file=sys.stderr)
            return 2
        return _report(rows, args.strict, against, markdown=bool(args.markdown))
    device = args.device or "cuda"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print(
            f"bnlab bench --gpu: needs a CUDA device, and torch {torch.__version__} sees none "
            f"(use --check FILE.csv to check saved results)",
            file=sys.stderr,
        )
        return 2
    settings = replace(QUICK if args.quick else Settings(), device=device)
    if torch.device(device).type != "cuda":
        settings = replace(settings, copy_bytes=2**24)  # CPU runs are for tests: a small copy will do
    if args.providers:
        providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
        unknown = [p for p in providers if p not in PROVIDERS]
        if unknown or not providers:
            print(
                f"bnlab bench --gpu: --providers: unknown {unknown}; choose from {', '.join(PROVIDERS)}",
                file=sys.stderr,
            )
            return 2
        settings = replace(settings, providers=providers)
    if args.bnlab_backend:
        settings = replace(settings, backend=args.bnlab_backend)
    if args.budget_s is not None:
        settings = replace(settings, budget_s=args.budget_s)
    if args.knob:
        try:
            settings = replace(settings, knobs=parse_knobs(args.knob))
        except ValueError as exc:
            print(f"bnlab bench --gpu --knob: {exc}", file=sys.stderr)
            return 2
    if args.warm_jobs is not None:
        if args.warm_jobs < 0:
            print(f"bnlab bench --gpu: --warm-jobs must be 0 or more, got {args.warm_jobs}", file=sys.stderr)
            return 2
        settings = replace(settings, warm_jobs=args.warm_jobs)
    rows, path = run_gpu_bench(settings, Path(args.out or "benchmarks/results"), plan=build_plan(settings))
    code = _report(rows, args.strict, against, markdown=bool(args.markdown))
    print(f"\nCSV: {path}")
    return code
