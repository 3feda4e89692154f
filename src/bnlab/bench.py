"""``bnlab bench``: time bnlab's layers against ``torch.nn.BatchNorm*d`` (CPU for now).

Three kinds of case, each timed for every provider (torch, and bnlab with each backend):
- ``forward``: one training-mode forward pass (running statistics updated);
- ``backward``: the backward pass alone (gradients of input, weight and bias, graph kept between calls);
- ``mlp-step``: a full SGD training step of Ioffe & Szegedy's Figure-1 network (3 hidden layers of 100
  sigmoid units, BN on each, batch 60), the number that tells a user what bnlab costs in practice;
- ``ghost``: forward + backward of ghost batch norm (ghosts of `g` examples): bnlab's vectorized
  GhostBatchNorm2d against the usual loop of nn.BatchNorm2d over chunks (the "torch" row);
  ``ghost-cl`` the same on a channels-last input (the ghosts laid side by side without leaving it).

Providers are timed in interleaved rounds (each round runs every provider once, in turn), so slow drift of
a shared machine hits all of them alike; a ratio is the median over rounds of the per-round ratio to torch.
"""

from __future__ import annotations

import csv
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import bnlab
from bnlab.models import mlp
from bnlab.provenance import machine_summary, provenance

__all__ = ["BenchRow", "ChunkLoop", "run_bench", "time_interleaved", "write_csv"]

TORCH = "torch"
_BNLAB_CLASSES: dict[int, type[nn.Module]] = {
    2: bnlab.nn.BatchNorm1d,
    3: bnlab.nn.BatchNorm1d,
    4: bnlab.nn.BatchNorm2d,
    5: bnlab.nn.BatchNorm3d,
}
_TORCH_CLASSES: dict[int, type[nn.Module]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}


@dataclass(frozen=True)
class BenchRow:
    case: str
    shape: str
    dtype: str
    provider: str
    median_us: float
    ratio_vs_torch: float
    rounds: int


def _provider_name(backend: str) -> str:
    return f"bnlab-{backend}"


def _make_layer(provider: str, channels: int, ndim: int) -> nn.Module:
    if provider == TORCH:
        return _TORCH_CLASSES[ndim](channels)
    return _BNLAB_CLASSES[ndim](channels, backend=provider.removeprefix("bnlab-"))


def _layer_fn(provider: str, shape: Sequence[int], dtype: torch.dtype, kind: str) -> Callable[[], object]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=dtype, requires_grad=kind == "backward")
    layer = _make_layer(provider, shape[1], len(shape)).to(dtype).train()
    if kind == "forward":

        def forward() -> object:
            return layer(x)  # with grad mode on, as in training: the autograd graph is built too

        return forward
    y = layer(x)
    dy = torch.randn(y.shape, generator=gen, dtype=dtype)
    inputs = [x, *layer.parameters()]

    def backward() -> object:
        return torch.autograd.grad(y, inputs, dy, retain_graph=True)

    return backward


def _ghost_fn(provider: str, shape: Sequence[int], ghost: int, channels_last: bool = False) -> Callable[[], object]:
    """Forward + backward of ghost BN; torch's "provider" is the usual chunk loop over nn.BatchNorm2d."""
    gen = torch.Generator().manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(*shape, generator=gen).contiguous(memory_format=layout).requires_grad_(True)
    dy = torch.randn(*shape, generator=gen).contiguous(memory_format=layout)
    if provider == TORCH:
        layer = ChunkLoop(nn.BatchNorm2d(shape[1]), ghost)
    else:
        layer = bnlab.nn.GhostBatchNorm2d(shape[1], ghost_batch_size=ghost, backend=provider.removeprefix("bnlab-"))

    def step() -> object:
        return torch.autograd.grad(layer(x), x, dy)

    return step


class ChunkLoop(nn.Module):
    """Ghost BN as usually written: one BN layer over each chunk of `ghost` examples, concatenated (the
    "torch" row of the ghost cases; benchmarks/variants_step.py's too)."""

    def __init__(self, bn: nn.Module, ghost: int) -> None:
        super().__init__()
        self.bn, self.ghost = bn, ghost

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.bn(chunk) for chunk in x.split(self.ghost)])


def _mlp_step_fn(provider: str, batch: int = 60) -> Callable[[], object]:
    torch.manual_seed(0)
    norm = nn.BatchNorm1d if provider == TORCH else (lambda c: _make_layer(provider, c, 2))
    model = mlp(norm=norm)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 784, generator=gen)
    target = torch.randint(0, 10, (batch,), generator=gen)

    def step() -> object:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        return loss

    return step


def time_interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, min_block_s: float = 0.01
) -> dict[str, list[float]]:
    """Seconds per call of each function, one sample per round, providers interleaved within each round."""
    inner = {}
    for name, fn in fns.items():  # warm up, then pick a block size of at least min_block_s
        for _ in range(3):
            fn()
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        inner[name] = max(1, int(min_block_s / once))
        for _ in range(min(inner[name], 50)):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return samples


def _rows(case: str, shape: str, dtype: torch.dtype, samples: dict[str, list[float]]) -> list[BenchRow]:
    base = samples[TORCH]
    rows = []
    for provider, times in samples.items():
        ratio = statistics.median(t / b for t, b in zip(times, base, strict=True))
        rows.append(
            BenchRow(
                case=case,
                shape=shape,
                dtype=str(dtype).removeprefix("torch."),
                provider=provider,
                median_us=statistics.median(times) * 1e6,
                ratio_vs_torch=ratio,
                rounds=len(times),
            )
        )
    return rows


LAYER_SHAPES_QUICK: tuple[tuple[int, ...], ...] = ((60, 100), (16, 32, 28, 28))
LAYER_SHAPES_FULL: tuple[tuple[int, ...], ...] = ((60, 100), (512, 1024), (32, 64, 28, 28), (8, 16, 8, 16, 16))


def run_bench(
    quick: bool = False,
    backends: Sequence[str] = ("native", "reference"),
    rounds: int | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> list[BenchRow]:
    """Run every case for torch and each bnlab backend; returns one row per (case, provider)."""
    rounds = rounds or (15 if quick else 60)
    providers = [TORCH] + [_provider_name(b) for b in backends]
    shapes = LAYER_SHAPES_QUICK if quick else LAYER_SHAPES_FULL
    plan: list[tuple[str, str, dict[str, Callable[[], object]]]] = []
    for shape in shapes:
        for kind in ("forward", "backward"):
            fns = {p: _layer_fn(p, shape, torch.float32, kind) for p in providers}
            plan.append((kind, "x".join(map(str, shape)), fns))
    plan.append(("mlp-step", "60x784 -> 3x100 -> 10", {p: _mlp_step_fn(p) for p in providers}))
    ghost_shape, ghost = ((128, 16, 8, 8), 8) if quick else ((256, 32, 8, 8), 16)
    label = "x".join(map(str, ghost_shape)) + f" /{ghost}"
    plan.append(("ghost", label, {p: _ghost_fn(p, ghost_shape, ghost) for p in providers}))
    plan.append(("ghost-cl", label, {p: _ghost_fn(p, ghost_shape, ghost, channels_last=True) for p in providers}))
    rows: list[BenchRow] = []
    for i, (case, shape, fns) in enumerate(plan, 1):
        log(f"[{i}/{len(plan)}] {case} {shape} ...")
        rows += _rows(case, shape, torch.float32, time_interleaved(fns, rounds, min_block_s=0.01 if quick else 0.05))
    return rows


def format_table(rows: Sequence[BenchRow]) -> str:
    header = f"{'case':<10} {'shape':<22} {'provider':<16} {'median':>11} {'vs torch':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.case:<10} {r.shape:<22} {r.provider:<16} {r.median_us:>9.1f}us {r.ratio_vs_torch:>8.3f}x")
    return "\n".join(lines)


def write_csv(rows: Sequence[object], path: Path, record: dict[str, object] | None = None) -> Path:
    """Write dataclass rows with the machine and versions on every line; written to a temp file, then renamed.

    `record` defaults to `provenance()`; the GPU bench passes its own (GPU, driver, CUDA, copy bandwidth),
    collected once, because it rewrites its CSV as it goes and the git calls behind `provenance()` are not free.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    record = provenance() if record is None else record
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*asdict(rows[0]), *record])
        writer.writeheader()
        for row in rows:
            writer.writerow({**asdict(row), **record})
    tmp.replace(path)
    return path


def summary(rows: Sequence[BenchRow]) -> str:
    """The headline: bnlab.nn's overhead over torch.nn on the MLP training step, per backend."""
    parts = []
    for r in rows:
        if r.case == "mlp-step" and r.provider != TORCH:
            parts.append(f"{r.provider}: {100 * (r.ratio_vs_torch - 1):+.1f}%")
    return f"MLP training step (batch 60) vs torch.nn, on {machine_summary()}: " + ", ".join(parts)
