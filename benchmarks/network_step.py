"""A whole network's training step with each BN implementation: what a practitioner's loop would see.

Usage (on a GPU machine): PYTHONPATH=src python3 benchmarks/network_step.py [--model resnet50]
    [--batch 128] [--size 224] [--layouts nchw,channels_last] [--providers torch,native,triton]
    [--steps 20] [--out DIR]
(`--model tiny --device cpu --batch 4 --size 16 --steps 2` runs every line on CPU, for the tests;
`--model resnet50-narrow` is ResNet-50's layers at a sixteenth of the width, without torchvision.)
`--profile`: after each provider's rows, where the host's time to issue a step goes (cProfile over
`--steps` more steps, each started on an idle GPU, backward on the calling thread: `host_profile`): the
functions with the most time of their own, per step, and the share of the step in bnlab's own Python files.
`--graphs` (CUDA): each provider's whole step (forward, backward, the optimizer's step) also captured in
one CUDA graph and replayed (`graph_ms`, median of `--steps` replays, CUDA events): the step with no host
in it, i.e. what the layers' GPU time is worth inside the network, as a training loop with CUDA graphs
(or torch.compile's mode="reduce-overhead") sees it.
`--kernels`: after each provider's rows, the kernels one eager step runs on the GPU (torch.profiler), the
ones with the most GPU time by name, and bnlab's kernels' share: where a step's GPU time goes, e.g. a copy
of every gradient into its layer's layout.
`--compile MODE`: each provider's model under torch.compile(mode=MODE) (the optimizer's step eager), its
first compiles in the warm-up steps (at least 3 there): bnlab's layers run as opaque custom ops among
inductor's fused kernels, torch's BN is inductor's own; with "reduce-overhead" inductor replays CUDA graphs.
Each compile of ResNet-50 takes tens of seconds: ask for one layout and the providers that matter.

Why: the bench (`bnlab bench --gpu`) times BN layers alone, replayed from CUDA graphs; `auto` keeps the
native backend because a Python-called bnlab layer costs more host time than torch's (benchmarks/NOTES.md,
session 17's host rows). Whether the kernels' GPU time wins inside a real step, where the host's launches
overlap the convolutions' GPU time, is what this measures: torchvision's model (bf16 autocast, SGD with
momentum, random data and labels) with torch's BatchNorm2d ("torch"), or converted to bnlab's layers with
backend "native" or "triton" ("triton-dispatch": the DIRECT_LAUNCH knob off, every launch through Triton's
dispatch, the default before session 23; "triton-fused": each BN+ReLU and BN+add+ReLU then one fused call,
`bnlab.tools.fuse_bn_relu`), or with no BN layers at all ("none": each replaced by nn.Identity, the
baseline that a BN layer's own host time in the network is measured against: each layout's last line); the
same weights for each. Steps are timed wall-clock in windows of WINDOW run back to back, the GPU synchronized at each
window's ends (a host-bound loop shows as a longer step, as it would in training): the median over the
windows of a window's time a step, after a warm-up that compiles the kernels; and
the host's time to issue one step on an idle GPU (`host_ms`: a step about that long is host-bound, where
the layers' host time, e.g. Triton's launches, decides; a step of more kernels than the driver queues,
about a thousand, waits for the GPU within it too).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import csv
import datetime
import functools
import gc
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bnlab.nn
from bnlab import kernels
from bnlab.gpubench import knobs_set
from bnlab.nn._swap import replace_modules
from bnlab.tools import fuse_bn_relu

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# (-dispatch: the kernels' DIRECT_LAUNCH off; -fused: then bnlab.tools.fuse_bn_relu, BN+ReLU and BN+add+ReLU
# as one call each; none: the BN layers removed, the baseline of a BN layer's own share of the host's time)
PROVIDERS = ("torch", "native", "triton", "triton-dispatch", "triton-fused", "none")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
# Steps timed together, the GPU synchronized before and after (`time_steps`). Not one step alone: the host
# runs ahead of the GPU, by up to ~1000 queued kernels or many replayed graphs, so the wall time between
# two steps' calls is the host's time to issue one until that queue is full (run 24's reduce-overhead
# rows, timed so, said 6 ms a step: the host's). A window's first step starts on an idle GPU: the window's
# time is its steps' GPU time plus one step's head start, which five steps make a fifth of.
WINDOW = 5


def tiny_model(num_classes: int = 10) -> nn.Module:
    """A small conv net with BN layers, a residual and a head: the tests' stand-in for torchvision's."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )  # fmt: skip


class _Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck block (v1.5: the stride on the 3x3 convolution), `width` channels
    inside, 4 * `width` out."""

    def __init__(self, inputs: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inputs, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(inputs, 4 * width, 1, stride, bias=False), nn.BatchNorm2d(4 * width))
            if stride != 1 or inputs != 4 * width
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def narrow_resnet50(divisor: int = 16, num_classes: int = 10) -> nn.Module:
    """ResNet-50's layers (torchvision's order: 53 BN layers, each after its convolution, BN+add+ReLU at each
    block's end) with every width divided by `divisor`, without torchvision: the host's work of a ResNet-50
    step at a size a CPU runs quickly (`host_overhead.py --network`)."""
    stem = 64 // divisor
    layers: list[nn.Module] = [
        nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
    ]  # fmt: skip
    inputs = stem
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for block in range(blocks):
            layers.append(_Bottleneck(inputs, width // divisor, 2 if block == 0 and stage > 0 else 1))
            inputs = 4 * (width // divisor)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inputs, num_classes))


def build(name: str) -> nn.Module:
    """torchvision's `name` (random weights), `tiny_model` for "tiny", `narrow_resnet50` for
    "resnet50-narrow"."""
    if name == "tiny":
        return tiny_model()
    if name == "resnet50-narrow":
        return narrow_resnet50()
    try:
        import torchvision
    except ImportError as exc:
        raise SystemExit(f"network_step: --model {name} needs torchvision ({exc}); --model tiny needs nothing") from exc
    return torchvision.models.get_model(name, weights=None)


def prepared(model: nn.Module, provider: str, layout: str, device: str) -> nn.Module:
    """A copy of `model` with the provider's BN layers (none for "none"), on `device` in `layout`."""
    model = copy.deepcopy(model)
    if provider == "none":
        model = without_bn(model)
    elif provider != "torch":
        model = bnlab.nn.convert(model, backend=provider.split("-")[0])
    if provider.endswith("-fused"):
        model = fuse_bn_relu(model)
    return model.to(device=device, memory_format=LAYOUTS[layout])


def bn_layers(model: nn.Module) -> int:
    """How many BN layers `model` has (torch's or bnlab's)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def without_bn(model: nn.Module) -> nn.Module:
    """`model` with each BN layer replaced by nn.Identity (in place): the same step with no normalization."""
    return replace_modules(
        model, lambda _, m: nn.Identity() if isinstance(m, nn.modules.batchnorm._BatchNorm) else None, inplace=True
    )


def bn_host_lines(host_ms: dict[str, float], layers: int) -> list[str]:
    """Each provider's host time a BN layer in the network: its step's issue time over the step's without
    BN layers ("none"), over `layers`; [] without a "none" row. Not a chain of BN layers alone (host_gpu.py's
    rows): within a network the same Python runs between convolutions and costs more (session 26, dev VM)."""
    if "none" not in host_ms or layers == 0:
        return []
    return [f"{provider}: {(ms - host_ms['none']) / layers * 1e3:.0f} us" for provider, ms in host_ms.items()
            if provider != "none"]  # fmt: skip


def training_step(
    model: nn.Module, layout: str, batch: int, size: int, device: str, graphable: bool = False
) -> Callable[[], None]:
    """One training step of `model` (bf16 autocast, SGD with momentum) on fixed random data in `layout`;
    `graphable`: with autocast's cast cache off, as CUDA-graph capture needs (torch.cuda.graph's docs)."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device, generator=gen).contiguous(memory_format=LAYOUTS[layout])
    labels = torch.randint(0, 10, (batch,), device=device, generator=gen)  # (every model has 10 classes or more)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, cache_enabled=not graphable)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()

    return step


def time_steps(
    model: nn.Module, layout: str, batch: int, size: int, steps: int, warmup: int, device: str,
    gc_time: GcTime | None = None,
) -> tuple[list[float], list[float]]:  # fmt: skip
    """Seconds a training step takes after `warmup` (see the module doc), the input in `layout`: one number
    a window of WINDOW steps run back to back, the GPU synchronized at the window's ends (`steps` // WINDOW
    windows); then, for `steps` more, the seconds the host takes to issue one step that starts on an idle GPU
    (the call alone, the GPU synchronized before it: where a step takes about that long, it is host-bound).
    `gc_time`: entered over the timed steps (not the warm-up's, whose first calls make objects once)."""
    step = training_step(model, layout, batch, size, device)
    for _ in range(warmup):
        step()
    with gc_time if gc_time is not None else contextlib.nullcontext():
        return _timed_steps(step, steps, device)


def _windows(steps: int) -> tuple[int, int]:
    """(windows, steps a window) that `_timed_steps` times for `steps` steps."""
    per_window = min(WINDOW, steps)
    return max(1, steps // per_window), per_window


def _timed_steps(step: Callable[[], None], steps: int, device: str) -> tuple[list[float], list[float]]:
    """`time_steps`' two timings of an already warm `step`."""
    (windows, per_window), seconds = _windows(steps), []
    for _ in range(windows):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(per_window):
            step()
        _synchronize(device)
        seconds.append((time.perf_counter() - start) / per_window)
    issued = []
    for _ in range(steps):
        _synchronize(device)
        start = time.perf_counter()
        step()
        issued.append(time.perf_counter() - start)
    _synchronize(device)
    return seconds, issued


def captured(step: Callable[[], None], warmup: int) -> Callable[[], None]:
    """`step` captured whole in one CUDA graph, as a replay function (which keeps the graph alive). The
    `warmup` steps (at least one) run first on a side stream, as torch.cuda.graph's docs ask: every lazy
    first-call cost (Triton compiles and loads, the optimizer's momentum buffers, bnlab's counter slabs)
    outside the capture. Each replay is one more training step of the model."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def time_replays(replay: Callable[[], None], steps: int) -> list[float]:
    """Seconds of each of `steps` calls of `replay` on the GPU (CUDA events around each), after one."""
    replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for begin, end in events:
        begin.record()
        replay()
        end.record()
    torch.cuda.synchronize()
    return [begin.elapsed_time(end) / 1e3 for begin, end in events]


def kernel_table(step: Callable[[], None], device: str, top: int = 15) -> list[str]:
    """The kernels one `step` runs on the GPU (torch.profiler's CUDA activity, after one step unprofiled),
    as `kernel_lines` says them. On CPU (the tests) the CPU's top-level ops stand in for kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    step()
    _synchronize(device)
    # (CPU activity too on a GPU: the CUDA runtime's calls are host events, `runtime_lines`)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        step()
        _synchronize(device)
    events = prof.events()
    return kernel_lines(events, cuda, top) + (runtime_lines(events) if cuda else [])


def runtime_lines(events: Iterable, top: int = 6) -> list[str]:
    """The CUDA runtime and driver calls among `events` (host events named cuda*/cu*) by host time: where
    a step's host waits on the GPU (a synchronize, a blocking copy, an allocation) rather than runs."""
    per_name: dict[str, list[float]] = {}
    for event in events:
        if event.device_type.name == "CPU" and event.name.startswith("cu") and not event.name.startswith("cudnn"):
            entry = per_name.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.cpu_time / 1e3  # (ms)
    ranked = sorted(per_name.items(), key=lambda item: item[1][1], reverse=True)[:top]
    calls, total = sum(n for n, _ in per_name.values()), sum(t for _, t in per_name.values())
    return [f"    CUDA runtime calls: {calls} a step, {total:.2f} ms of host time; by time: "
            + ", ".join(f"{name} {count}x {ms:.2f} ms" for name, (count, ms) in ranked)]  # fmt: skip


def kernel_lines(events: Iterable, cuda: bool, top: int = 15) -> list[str]:
    """How many kernels `events` (torch.profiler's) hold and their time, the `top` names by time with their
    count and time, then bnlab's Triton kernels' share: GPU events (`cuda`), else top-level CPU events."""
    kind = "CUDA" if cuda else "CPU"
    per_name: dict[str, list[float]] = {}
    for event in events:
        if event.device_type.name != kind or (not cuda and event.cpu_parent is not None):
            continue
        entry = per_name.setdefault(event.name, [0, 0.0])
        entry[0] += 1
        entry[1] += (event.device_time if cuda else event.cpu_time) / 1e3  # (ms)
    launches, total = sum(n for n, _ in per_name.values()), sum(t for _, t in per_name.values())
    ranked = sorted(per_name.items(), key=lambda item: item[1][1], reverse=True)[:top]
    unit = "GPU" if cuda else "CPU"
    lines = [f"    kernels: {launches} a step, {total:.2f} ms of {unit} time; the {len(ranked)} with the most:"]
    lines += [f"      {ms:8.3f} ms {count:5d}  {name[:100]}" for name, (count, ms) in ranked]
    names = _bnlab_kernel_names()
    ours = {name: entry for name, entry in per_name.items() if name in names}
    mine_ms, mine_n = sum(t for _, t in ours.values()), sum(n for n, _ in ours.values())
    lines.append(f"      bnlab's kernels: {mine_n} a step, {mine_ms:.2f} ms ({mine_ms / total if total else 0:.0%})")
    return lines


def _bnlab_kernel_names() -> set[str]:
    """The names bnlab's Triton kernels run under on a GPU (their functions' names)."""
    return {name for name in dir(kernels.load()) if name.endswith("_kernel")}


def host_profile(step: Callable[[], None], steps: int, device: str, top: int = 12) -> list[str]:
    """Where the host's time to issue `step` goes (cProfile over `steps` calls, each on an idle GPU): the
    `top` functions by time of their own, in us and calls a step, then bnlab's share of the step.

    Autograd's multithreading is off meanwhile: on a GPU its engine runs backward on a thread of its own
    (one a device), which cProfile, a profiler of the calling thread, would not see, and bnlab's backward
    is Python (an autograd.Function) that runs there. Off, backward runs on the calling thread: seen,
    without the hand-off between the two threads (host_gpu.py's "autograd multithreading off" rows say
    what that hand-off costs)."""
    profile = cProfile.Profile()
    with torch.autograd.set_multithreading_enabled(False):
        for _ in range(steps):
            _synchronize(device)
            profile.enable()
            step()
            profile.disable()
        _synchronize(device)
    stats = pstats.Stats(profile).stats  # {(file, line, name): (primitive calls, calls, own s, cumulative s, ...)}
    total = sum(entry[2] for entry in stats.values())
    ranked = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    lines = [
        f"    host profile: {total / steps * 1e3:.2f} ms a step under cProfile (backward on the calling thread); "
        f"most time of their own:"
    ]
    for (path, line, name), (_, calls, own, *_rest) in ranked:
        where = f"{Path(path).name}:{line}({name})" if line else name
        lines.append(f"      {own / steps * 1e6:9.1f} us {calls / steps:7.1f} calls  {where}")
    ours = sum(entry[2] for (path, _, _), entry in stats.items() if "/bnlab/" in path.replace("\\", "/"))
    lines.append(f"      bnlab's own Python: {ours / steps * 1e3:.2f} ms a step ({ours / total:.0%})")
    return lines


def _graph_ms(model: nn.Module, layout: str, args: argparse.Namespace, knobs: dict) -> float:
    """The median ms of `model`'s whole training step replayed from one CUDA graph (`captured`)."""
    with knobs_set(kernels.load(), knobs):
        step = training_step(model, layout, args.batch, args.size, args.device, graphable=True)
        replay = captured(step, args.warmup)
        try:
            return statistics.median(time_replays(replay, args.steps)) * 1e3
        finally:
            del replay, step
            torch.cuda.empty_cache()  # (the graph's memory pool, before the next provider's)


def _graph_line(graphed: dict[str, float], provider: str, first: str, measure: Callable[[], float]) -> str:
    """`measure()` into `graphed[provider]`, as the line that reports it (against `first`'s); a failure
    (a capture that fails in one provider's layers) is reported on the line and leaves no number, so that
    the other providers' rows still come."""
    try:
        graphed[provider] = measure()
    except RuntimeError as error:
        return f"not replayed from a CUDA graph: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    versus = f" ({graphed[provider] / graphed[first]:.3f}x {first}'s)" if provider != first and first in graphed else ""
    return f"{graphed[provider]:9.2f} ms replayed from one CUDA graph{versus}"


class GcTime:
    """Python's garbage collections while it is entered, by generation, and the time they took (gc's
    callbacks): a host that runs more Python objects through a step (bnlab's layers: autograd contexts,
    plans, tuples) may pay for collections the step's own profile does not name."""

    def __init__(self) -> None:
        self.seconds, self.counts, self._start = [0.0] * 3, [0] * 3, 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._start
            self.counts[info["generation"]] += 1

    def __enter__(self) -> GcTime:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def ms(self, steps: int) -> float:
        """The collections' time a step, over `steps` steps (ms)."""
        return sum(self.seconds) / max(1, steps) * 1e3

    def line(self, steps: int) -> str:
        """The collections and their time a step, over `steps` steps."""
        counts = "/".join(str(n) for n in self.counts)
        return f"Python's gc {self.ms(steps):.2f} ms a step ({counts} collections of generations 0/1/2, {steps} steps)"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a torchvision model name, or 'tiny' (default resnet50)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224, help="image height and width")
    parser.add_argument("--layouts", default="nchw,channels_last")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="a folder for the CSV (network-step-<date>.csv)")
    parser.add_argument("--profile", action="store_true", help="also profile the host's time to issue a step")
    parser.add_argument("--graphs", action="store_true", help="also time each step replayed from a CUDA graph")
    parser.add_argument("--kernels", action="store_true", help="also list the kernels of one step by GPU time")
    parser.add_argument("--compile", default=None, choices=COMPILE_MODES, help="each model under torch.compile")
    args = parser.parse_args(argv)
    layouts, providers = args.layouts.split(","), args.providers.split(",")
    for option, values, known in (("--layouts", layouts, LAYOUTS), ("--providers", providers, PROVIDERS)):
        if unknown := [v for v in values if v not in known]:
            parser.error(f"{option}: {', '.join(unknown)} not among {', '.join(known)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (--device cpu runs the tiny model)")
    if args.graphs and args.device != "cuda":
        parser.error(f"--graphs: CUDA graphs need --device cuda, not {args.device}")
    if args.graphs and args.compile:
        parser.error("--graphs and --compile: one at a time (a compiled step is not captured here)")
    if args.compile and args.warmup < 3:
        parser.error(
            f"--compile: at least 3 warm-up steps (the compiles, CUDA-graph trees' recording), not {args.warmup}"
        )
    torch.manual_seed(0)
    base = build(args.model)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    windows, per_window = _windows(args.steps)
    compiled = f", torch.compile(mode={args.compile!r})" if args.compile else ""
    print(f"{name}; torch {torch.__version__}; {args.model} batch {args.batch} at {args.size}x{args.size}, bf16 "
          f"autocast, SGD{compiled}; ms a training step (median of {windows} windows of {per_window} steps after "
          f"{args.warmup} warm-up steps)",
          flush=True)  # fmt: skip
    rows, layers = [], bn_layers(base)
    for layout in layouts:
        medians, graphed, hosts = {}, {}, {}
        for provider in providers:
            model = prepared(base, provider, layout, args.device)
            if args.compile:
                torch._dynamo.reset()  # (each provider compiled afresh: no cache entry of another model's)
                model = torch.compile(model, mode=args.compile)
            dispatch = {"DIRECT_LAUNCH": False} if provider.endswith("-dispatch") else {}
            gc_time = GcTime()
            with knobs_set(kernels.load(), dispatch):
                seconds, issued = time_steps(
                    model, layout, args.batch, args.size, args.steps, args.warmup, args.device, gc_time
                )
            medians[provider] = statistics.median(seconds) * 1e3
            host_ms = hosts[provider] = statistics.median(issued) * 1e3
            stepped = windows * per_window + len(issued)  # (the steps GcTime saw)
            first = providers[0]
            against = f"  ({medians[provider] / medians[first]:.3f}x {first})" if provider != first else ""
            print(f"  {layout:14s} {provider:13s} {medians[provider]:9.2f} ms{against}; the host issues one in "
                  f"{host_ms:.2f} ms; {gc_time.line(stepped)}", flush=True)  # fmt: skip
            if args.graphs:
                measure = functools.partial(_graph_ms, model, layout, args, dispatch)
                print(f"  {'':29s}{_graph_line(graphed, provider, first, measure)}", flush=True)
            rows.append({"model": args.model, "batch": args.batch, "size": args.size, "layout": layout,
                         "provider": provider, "median_ms": round(medians[provider], 3),
                         "min_ms": round(min(seconds) * 1e3, 3), "host_ms": round(host_ms, 3),
                         "gc_ms": round(gc_time.ms(stepped), 3),
                         "graph_ms": round(graphed[provider], 3) if provider in graphed else "",
                         "compile": args.compile or "", "device": name,
                         "torch": torch.__version__,
                         "triton": _triton_version(), "date": f"{datetime.date.today()}"})  # fmt: skip
            if args.profile or args.kernels:
                with knobs_set(kernels.load(), dispatch):
                    step = training_step(model, layout, args.batch, args.size, args.device)
                    if args.profile:
                        print("\n".join(host_profile(step, args.steps, args.device)), flush=True)
                    if args.kernels:
                        print("\n".join(kernel_table(step, args.device)), flush=True)
            del model
        if per_layer := bn_host_lines(hosts, layers):
            print(f"  {layout}: a BN layer's host time in this network (issue time over the network's without its "
                  f"{layers} BN layers, per layer): {', '.join(per_layer)}", flush=True)  # fmt: skip
    if args.out:
        out = Path(args.out) / f"network-step-{datetime.datetime.now():%Y%m%d-%H%M%S}.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"CSV: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
