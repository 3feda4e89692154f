"""`bnlab doctor`: what is wrong with the BN layers of a model, the likely cause, and the fix.

The most common BN complaint is "my model works in train() and fails in eval()". The usual causes are
visible from outside: running statistics that do not match the data the model now sees (a stale EMA
after fine-tuning or weight averaging, a data shift, too few updates), layers whose statistics were never
updated, tiny effective batches, a momentum written in another framework's convention, and layers frozen
or left in the wrong mode. `doctor` reads the model, passes a few batches through a copy of it, and
reports per layer. It never changes the model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlab.tools.precise import precise_bn

__all__ = ["DoctorReport", "Finding", "LayerDiagnosis", "doctor"]

# Thresholds, stated once: a mean off by half a standard deviation, or a variance off by a factor of 2,
# changes a layer's output enough to show in accuracy; fewer than 16 values per channel make batch
# statistics noisy (the GroupNorm paper's table degrades from per-GPU batch 8 down).
MEAN_SHIFT_LIMIT = 0.5
VAR_RATIO_LIMIT = 2.0
SMALL_EFFECTIVE_BATCH = 16

SEVERITIES = ("problem", "warning", "info")


@dataclass(frozen=True)
class Finding:
    layer: str
    severity: str  # problem | warning | info
    what: str
    cause: str
    fix: str


@dataclass
class LayerDiagnosis:
    name: str
    kind: str
    training: bool
    momentum: float | None
    num_batches_tracked: int | None
    values_per_channel: float | None = None  # the effective batch: batch size x spatial size, per batch
    mean_shift: float | None = None  # max over channels of |E_data[x] - running_mean| / running_std
    var_ratio: float | None = None  # the channel's data variance / running variance farthest from 1
    findings: list[Finding] = field(default_factory=list)


@dataclass
class DoctorReport:
    layers: list[LayerDiagnosis]

    @property
    def findings(self) -> list[Finding]:
        order = {s: i for i, s in enumerate(SEVERITIES)}
        return sorted((f for layer in self.layers for f in layer.findings), key=lambda f: order[f.severity])

    def format(self) -> str:
        """A table of the layers, then the findings with cause and fix."""
        lines = [
            f"{'layer':<28} {'kind':<18} {'mode':<5} {'momentum':>8} {'updates':>8} {'batch':>7} "
            f"{'mean shift':>10} {'var ratio':>9}"
        ]
        for d in self.layers:
            lines.append(
                f"{d.name:<28} {d.kind:<18} {'train' if d.training else 'eval':<5} {_fmt(d.momentum):>8} "
                f"{_fmt(d.num_batches_tracked):>8} {_fmt(d.values_per_channel):>7} {_fmt(d.mean_shift):>10} "
                f"{_fmt(d.var_ratio):>9}"
            )
        found = self.findings
        lines.append("")
        lines.append(f"{len(found)} finding(s)" + (":" if found else ": the BN layers look healthy."))
        for f in found:
            lines += [f"[{f.severity}] {f.layer}: {f.what}", f"    likely cause: {f.cause}", f"    fix: {f.fix}"]
        return "\n".join(lines)


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}"


def _static_findings(name: str, bn: _BatchNorm, model_training: bool) -> list[Finding]:
    out = []
    if bn.track_running_stats and bn.running_mean is not None:
        if not (torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()):
            out.append(
                Finding(
                    name,
                    "problem",
                    "running statistics contain NaN or inf",
                    "a non-finite batch (NaN/inf input, overflow in half precision) was averaged in",
                    "recompute them with bnlab.tools.precise_bn; use bnlab layers (nonfinite='skip')",
                )
            )
        updates = int(bn.num_batches_tracked) if bn.num_batches_tracked is not None else None
        untouched = bool((bn.running_mean == 0).all() and (bn.running_var == 1).all())
        if updates == 0 or untouched:
            out.append(
                Finding(
                    name,
                    "problem",
                    "running statistics were never updated (still mean 0, var 1)",
                    "the layer was never run in train mode, or its buffers were not loaded",
                    "train it, run bnlab.tools.precise_bn, or check the checkpoint's keys",
                )
            )
    else:
        out.append(
            Finding(
                name,
                "warning",
                "track_running_stats=False: inference uses the batch's statistics",
                "outputs in eval() depend on the other examples in the batch",
                "keep running statistics, or use GroupNorm/LayerNorm if that is intended",
            )
        )
    if bn.momentum is not None and bn.momentum > 0.5:
        out.append(
            Finding(
                name,
                "warning",
                f"momentum={bn.momentum}: each batch outweighs the whole history",
                "a Keras/Flax momentum (weight of the OLD average, e.g. 0.99) used as PyTorch's",
                f"use {1 - bn.momentum:.3g} (bnlab.tools.conventions.convert_momentum)",
            )
        )
    if bn.momentum == 0:
        out.append(
            Finding(
                name,
                "info",
                "momentum=0: the running statistics never move",
                "set on purpose?",
                "use momentum > 0, or freeze the layer explicitly (bnlab.tools.freeze_bn)",
            )
        )
    if model_training and not bn.training:
        out.append(
            Finding(
                name,
                "info",
                "in eval mode while the model trains: its statistics are frozen",
                "model.train() after freezing, or a deliberate freeze",
                "nothing, if intended",
            )
        )
    params = [p for p in (bn.weight, bn.bias) if p is not None]
    if params and not any(p.requires_grad for p in params) and bn.training:
        out.append(
            Finding(
                name,
                "info",
                "affine parameters frozen but statistics still updating in train mode",
                "requires_grad=False does not freeze BN's running statistics",
                "bnlab.tools.freeze_bn(model) to freeze both",
            )
        )
    return out


def doctor(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    num_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> DoctorReport:
    """Diagnose every BN layer of `model`; with `batches`, also compare its statistics with the data's.

    Does not modify `model`: the data pass runs on a deep copy (BN layers normalizing with batch
    statistics, as in training; see `bnlab.tools.precise_bn`). `num_batches=None` uses every batch given;
    a number takes that many and fails if there are fewer. `forward(model, batch)` drives models whose
    batches are not plain tensors (default: a tuple/list batch runs as model(batch[0])).
    """
    layers = {name or type(model).__name__: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    data_stats = {}
    if batches is not None and layers:
        if num_batches is None:
            batches = list(batches)
            num_batches = len(batches)
        probe = copy.deepcopy(model)
        stats = precise_bn(probe, batches, num_batches=num_batches, forward=forward, estimator="total")
        data_stats = {(name or type(model).__name__): s for name, s in stats.items()}
    report = []
    for name, bn in layers.items():
        diag = LayerDiagnosis(
            name=name,
            kind=type(bn).__name__,
            training=bn.training,
            momentum=bn.momentum,
            num_batches_tracked=int(bn.num_batches_tracked) if bn.num_batches_tracked is not None else None,
            findings=_static_findings(name, bn, model.training),
        )
        seen = data_stats.get(name)
        if seen is not None and seen.mean is not None:
            diag.values_per_channel = seen.values / max(seen.batches, 1)
            if bn.running_mean is not None and bn.running_var is not None:
                run_mean, run_var = bn.running_mean.double().cpu(), bn.running_var.double().cpu()
                shift = ((seen.mean.cpu() - run_mean).abs() / torch.sqrt(run_var + bn.eps)).max().item()
                ratios = (seen.var.cpu() + bn.eps) / (run_var + bn.eps)
                ratio = ratios[(ratios.log()).abs().argmax()].item()
                diag.mean_shift, diag.var_ratio = shift, ratio
                if shift > MEAN_SHIFT_LIMIT or not (1 / VAR_RATIO_LIMIT <= ratio <= VAR_RATIO_LIMIT):
                    diag.findings.append(
                        Finding(
                            name,
                            "problem",
                            f"running statistics do not match the data (mean off by {shift:.2g} std, "
                            f"variance ratio {ratio:.2g}): train() and eval() outputs will differ",
                            "a stale EMA (weights changed after the last updates: fine-tuning, weight averaging, "
                            "a high learning rate at the end), a shift between training and this data, or too "
                            "few updates",
                            "bnlab.tools.precise_bn(model, batches) recomputes them with the current weights",
                        )
                    )
            if diag.values_per_channel < 2:
                diag.findings.append(
                    Finding(
                        name,
                        "problem",
                        "one value per channel per batch: no batch variance",
                        "batch size 1 on a layer with a 1x1 (or no) spatial map",
                        "larger batches, small_batch='use_running_stats', or GroupNorm",
                    )
                )
            elif diag.values_per_channel < SMALL_EFFECTIVE_BATCH:
                diag.findings.append(
                    Finding(
                        name,
                        "warning",
                        f"tiny effective batch: {diag.values_per_channel:.3g} values per channel",
                        "small batches or small spatial maps make batch statistics noisy",
                        "BatchRenorm, SyncBatchNorm across devices, a larger batch, or GroupNorm",
                    )
                )
        elif batches is not None:
            diag.findings.append(
                Finding(
                    name,
                    "info",
                    "got no input during the data pass",
                    "an unused layer, or a branch the data did not take",
                    "nothing, if intended",
                )
            )
        report.append(diag)
    return DoctorReport(report)
