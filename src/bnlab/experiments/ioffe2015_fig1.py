"""Ioffe & Szegedy (2015), Figure 1: BN makes a sigmoid MLP train faster and keeps its inputs stable.

Claim (a): a network with BN on every hidden layer reaches higher test accuracy, and sooner, than the same
network without BN. Claim (b, c): without BN, the distribution of the input to a typical sigmoid of the
last hidden layer (its 15th, 50th and 85th percentiles) drifts in mean and spread over training; with BN
it stays stable. The paper's numbers: none; the figure is a plot (MNIST, 3 hidden layers of 100 sigmoid
units, batches of 60, 50,000 steps).

Our setup: the same network and batch size; Fashion-MNIST by default (MNIST with `dataset=mnist`), pixels
scaled to [0, 1]. Choices the paper leaves open, stated here and in the config: plain SGD with learning
rate `lr`, weights from N(0, init_std^2), zero biases, BN's eps 1e-5 and momentum 0.1; hidden layers of the
BN network have no bias (BN's shift replaces it). Both arms see the same batches in the same order.
Accuracy is measured in inference mode (running statistics) on the test set. The tracked sigmoid input
is measured on a fixed set of test images with batch statistics, as the sigmoid sees it in training.
Drift is summarized by the range of the median and the ratio of the largest to the smallest 15-85
spread, over the evaluations after step 0.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

import bnlab
from bnlab.experiments import register
from bnlab.experiments.base import Experiment, UnitContext, Verdict
from bnlab.experiments.common import grade, load_data, mean_std
from bnlab.models import mlp

ARMS = ("baseline", "bn")
PERCENTILES = (0.15, 0.50, 0.85)


@dataclass(frozen=True)
class Fig1Config:
    dataset: str = "fashion-mnist"
    steps: int = 50_000
    batch_size: int = 60
    hidden: tuple[int, ...] = (100, 100, 100)
    lr: float = 0.1
    init_std: float = 0.05
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    eval_every: int = 500
    tracked_examples: int = 1000
    tracked_unit: int = 0
    data_seed_offset: int = 10_000  # batch order seed = seed + this, the same for both arms

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "eval_every", "tracked_examples"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden must list positive layer widths, got {self.hidden}")
        if not 0 <= self.tracked_unit < self.hidden[-1]:
            raise ValueError(f"tracked_unit must be in [0, {self.hidden[-1]}), got {self.tracked_unit}")
        if self.lr <= 0 or self.init_std <= 0:
            raise ValueError(f"lr and init_std must be > 0, got {self.lr} and {self.init_std}")


def build_model(config: Fig1Config, arm: str, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)

    def norm(width: int) -> nn.Module:
        return bnlab.nn.BatchNorm1d(width, eps=config.bn_eps, momentum=config.bn_momentum)

    model = mlp(784, config.hidden, 10, norm=norm if arm == "bn" else None, activation="sigmoid")
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return bnlab.nn.name_layers(model)


@register
class Ioffe2015Fig1(Experiment):
    name = "ioffe2015-fig1"
    title = "Figure 1: BN speeds up training and stabilizes a sigmoid's input (MLP)"
    paper = "Ioffe & Szegedy, Batch Normalization, ICML 2015, Figure 1"
    Config = Fig1Config
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"steps": 60, "eval_every": 20, "tracked_examples": 50, "hidden": (16, 16, 16)},
        "quick": {"steps": 8_000, "eval_every": 250},
        "full": {},
    }

    def arms(self, config: Fig1Config) -> list[str]:
        return list(ARMS)

    def unit_steps(self, config: Fig1Config) -> int:
        return config.steps

    def run_unit(self, config: Fig1Config, seed: int, arm: str, ctx: UnitContext) -> dict[str, Any]:
        data = load_data(ctx, config.dataset, flatten=True)
        model = build_model(config, arm, seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
        test_x, test_y = data.test_x, data.test_y
        tracked_x = test_x[: config.tracked_examples]
        to_last_sigmoid = slice(0, len(model) - 2)  # everything before the last sigmoid and the output layer

        def evaluate(net: nn.Module) -> dict[str, Any]:
            logits = net(test_x)
            # Batch statistics, as the sigmoid sees them in training; a copy keeps the real buffers untouched.
            probe = copy.deepcopy(net).train()
            tracked = probe[to_last_sigmoid](tracked_x)[:, config.tracked_unit]
            q = torch.quantile(tracked.double(), torch.tensor(PERCENTILES, dtype=torch.float64)).tolist()
            return {
                "test_acc": (logits.argmax(1) == test_y).double().mean().item(),
                "test_loss": nn.functional.cross_entropy(logits, test_y).item(),
                "p15": q[0],
                "p50": q[1],
                "p85": q[2],
            }

        result = ctx.train(
            model,
            optimizer,
            data.train_x,
            data.train_y,
            steps=config.steps,
            batch_size=config.batch_size,
            data_seed=seed + config.data_seed_offset,
            eval_every=config.eval_every,
            evaluate=evaluate,
        )
        return {"seed": seed, "arm": arm, "data": data.files, **result}

    def summarize(self, config: Fig1Config, results: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
        seeds = sorted(results)
        steps = [h["step"] for h in results[seeds[0]][ARMS[0]]["history"]]
        summary: dict[str, Any] = {"steps": steps, "arms": {}}
        for arm in ARMS:
            table = {k: np.array([[h[k] for h in results[s][arm]["history"]] for s in seeds]) for k in _KEYS}
            spread = table["p85"] - table["p15"]
            later = slice(1, None)  # drift over training: the evaluations after step 0
            median_range = table["p50"][:, later].max(1) - table["p50"][:, later].min(1)
            spread_ratio = spread[:, later].max(1) / np.maximum(spread[:, later].min(1), 1e-12)
            summary["arms"][arm] = {
                "test_acc_mean": table["test_acc"].mean(0).tolist(),
                "test_acc_std": table["test_acc"].std(0).tolist(),
                **{f"{k}_mean": table[k].mean(0).tolist() for k in ("p15", "p50", "p85")},
                "final_acc": mean_std(table["test_acc"][:, -1]),
                "median_range": mean_std(median_range),
                "spread_ratio": mean_std(spread_ratio),
            }
        base_final = summary["arms"]["baseline"]["final_acc"]["mean"]
        bn_curve = summary["arms"]["bn"]["test_acc_mean"]
        reached = next((s for s, a in zip(steps, bn_curve, strict=True) if a >= base_final), None)
        summary["bn_steps_to_baseline_final"] = reached
        summary["speedup"] = steps[-1] / reached if reached else None
        return summary

    def verdicts(self, config: Fig1Config, summary: dict[str, Any]) -> list[Verdict]:
        base, bn = summary["arms"]["baseline"], summary["arms"]["bn"]
        gap = bn["final_acc"]["mean"] - base["final_acc"]["mean"]
        noise = max(bn["final_acc"]["std"], base["final_acc"]["std"])
        higher = gap > noise and gap > 0
        speedup = summary["speedup"]
        faster = speedup is not None and speedup >= 2
        reached = summary["bn_steps_to_baseline_final"]
        if speedup is None:
            reach = "BN never reaches the baseline's final accuracy"
        elif reached == summary["steps"][1]:  # already at the first evaluation: only a bound is known
            reach = (
                f"BN passes the baseline's final accuracy by step {reached:,}, the first evaluation "
                f"(>= {speedup:.0f}x fewer steps)"
            )
        else:
            reach = f"BN reaches the baseline's final accuracy at step {reached:,} ({speedup:.1f}x fewer steps)"
        acc = Verdict(
            claim="Fig. 1(a): with BN the network trains faster and reaches higher test accuracy",
            paper="plotted only (MNIST, 50k steps): BN's curve is above the baseline's throughout",
            ours=(
                f"test accuracy after {summary['steps'][-1]:,} steps: BN {_pct(bn['final_acc'])}, "
                f"no BN {_pct(base['final_acc'])}; {reach}"
            ),
            verdict=grade(higher and faster, higher or faster),
            reason=(
                f"higher: {'yes' if higher else 'no'} (gap {100 * gap:+.2f} points vs seed std {100 * noise:.2f}); "
                f"at least 2x faster to the baseline's final accuracy: {'yes' if faster else 'no'}"
            ),
        )
        stable_mean = bn["median_range"]["mean"] < base["median_range"]["mean"]
        stable_spread = bn["spread_ratio"]["mean"] < base["spread_ratio"]["mean"]
        drift = Verdict(
            claim="Fig. 1(b, c): without BN a sigmoid's input drifts in mean and spread; with BN it is stable",
            paper="plotted only: 15/50/85th percentiles drift without BN, stay stable with BN",
            ours=(
                f"range of the median over training: no BN {_num(base['median_range'])}, "
                f"BN {_num(bn['median_range'])}; "
                f"max/min of the 15-85 spread: no BN {_num(base['spread_ratio'])}, BN {_num(bn['spread_ratio'])}"
            ),
            verdict=grade(stable_mean and stable_spread, stable_mean or stable_spread),
            reason=(
                f"median moves less with BN: {'yes' if stable_mean else 'no'}; "
                f"spread varies less with BN: {'yes' if stable_spread else 'no'}"
            ),
        )
        return [acc, drift]

    def figures(self, config: Fig1Config, summary: dict[str, Any]) -> dict[str, Any]:
        from matplotlib import pyplot as plt

        steps = np.array(summary["steps"])
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        for arm, label, color in (("baseline", "Without BN", "tab:gray"), ("bn", "With BN", "tab:blue")):
            a = summary["arms"][arm]
            mean, std = np.array(a["test_acc_mean"]), np.array(a["test_acc_std"])
            axes[0].plot(steps, mean, label=label, color=color)
            axes[0].fill_between(steps, mean - std, mean + std, color=color, alpha=0.25)
        axes[0].set(title="(a) test accuracy", xlabel="training step", ylabel="accuracy")
        axes[0].legend(loc="lower right")
        for ax, arm, title in ((axes[1], "baseline", "(b) without BN"), (axes[2], "bn", "(c) with BN")):
            a = summary["arms"][arm]
            for key, style in (("p15", "--"), ("p50", "-"), ("p85", "--")):
                ax.plot(steps, a[f"{key}_mean"], style, color="tab:red" if key == "p50" else "tab:orange")
            ax.set(title=f"{title}: sigmoid input, 15/50/85th pct", xlabel="training step")
        low = min(min(summary["arms"][a]["p15_mean"]) for a in ARMS)
        high = max(max(summary["arms"][a]["p85_mean"]) for a in ARMS)
        pad = 0.05 * (high - low + 1e-9)
        for ax in axes[1:]:
            ax.set_ylim(low - pad, high + pad)
        fig.suptitle(
            f"{config.dataset}, {len(config.hidden)}x{config.hidden[0]} sigmoid MLP, batch {config.batch_size}"
        )
        fig.tight_layout()
        return {"fig1": fig}


_KEYS = ("test_acc", "p15", "p50", "p85")


def _pct(stat: dict[str, float]) -> str:
    return f"{100 * stat['mean']:.2f}% ± {100 * stat['std']:.2f}"


def _num(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.3g} ± {stat['std']:.2g}" if math.isfinite(stat["mean"]) else "n/a"
