"""The laboratory: typed configs, the resumable training loop, the runner, the report and the CLI."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from bnlab import cli, experiments, runner
from bnlab.config import ConfigError, parse_overrides, resolve_config
from bnlab.report import build_report
from bnlab.train import BatchOrder, train_classifier

FIG1 = "ioffe2015-fig1"


# ---- configs ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Cfg:
    steps: int = 10
    lr: float = 0.1
    name: str = "a"
    flag: bool = False
    widths: tuple[int, ...] = (4, 4)
    maybe: float | None = None


def test_resolve_config_layers_defaults_profile_and_overrides():
    cfg = resolve_config(
        _Cfg, {"steps": 20, "lr": 0.5}, {"lr": "0.25", "flag": "yes", "widths": "8,16,32", "maybe": "none"}
    )
    assert cfg == _Cfg(steps=20, lr=0.25, flag=True, widths=(8, 16, 32), maybe=None)
    assert resolve_config(_Cfg, {}, {"maybe": "2"}).maybe == 2.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"step": "3"}, r"unknown config key 'step' \(did you mean 'steps'\?\); valid keys: steps, lr"),
        ({"steps": "many"}, r"config key 'steps': expected int, got 'many'"),
        ({"flag": "maybe"}, r"config key 'flag': expected bool"),
        ({"widths": "4,x"}, r"config key 'widths': expected int, got 'x'"),
    ],
)
def test_bad_overrides_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(_Cfg, {}, overrides)


def test_parse_overrides_needs_key_value():
    assert parse_overrides(["a=1", "b = x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["steps"])


def test_experiment_config_validates_values():
    exp = experiments.get(FIG1)
    with pytest.raises(ConfigError, match="steps must be at least 1"):
        resolve_config(exp.Config, exp.profiles["smoke"], {"steps": "0"})
    with pytest.raises(ConfigError, match="tracked_unit must be in"):
        resolve_config(exp.Config, exp.profiles["smoke"], {"tracked_unit": "99"})


# ---- training loop ---------------------------------------------------------------------------------------


def test_batch_order_is_a_deterministic_permutation_per_epoch():
    order = BatchOrder(10, 3, seed=5)
    first_epoch = torch.cat([order.indices(s) for s in range(3)])
    assert len(set(first_epoch.tolist())) == 9  # 3 batches of 3 without replacement; the last example dropped
    again = BatchOrder(10, 3, seed=5)
    assert torch.equal(again.indices(4), order.indices(4)) and not torch.equal(order.indices(0), order.indices(3))
    with pytest.raises(ValueError, match="batch_size must be in"):
        BatchOrder(10, 11, seed=0)


class _Stop(Exception):
    pass


def _tiny_training(checkpoint, stop_at=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 4, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    seen = [0]

    def on_steps(n):
        seen[0] += n
        if stop_at is not None and seen[0] >= stop_at:
            raise _Stop

    def evaluate(net):
        torch.rand(1)  # evaluation that draws random numbers must not break exact resumption
        return {"acc": (net(x).argmax(1) == y).double().mean().item(), "w": net[0].weight.sum().item()}

    return train_classifier(
        model,
        opt,
        x,
        y,
        steps=50,
        batch_size=8,
        data_seed=3,
        eval_every=10,
        evaluate=evaluate,
        checkpoint=checkpoint,
        on_steps=on_steps,
    )


def test_interrupted_training_resumes_to_identical_results(tmp_path):
    straight = _tiny_training(tmp_path / "a.pt")
    with pytest.raises(_Stop):
        _tiny_training(tmp_path / "b.pt", stop_at=27)  # killed between checkpoints (taken every 10 steps)
    assert torch.load(tmp_path / "b.pt", weights_only=False)["step"] == 20
    resumed = _tiny_training(tmp_path / "b.pt")
    assert resumed["history"] == straight["history"]
    assert [h["step"] for h in straight["history"]] == [0, 10, 20, 30, 40, 50]


# ---- runner, report, CLI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, synthetic_data):
    out = tmp_path_factory.mktemp("runs")
    run_dir = runner.run_experiment(FIG1, "smoke", seeds=2, out=out, data_dir=synthetic_data, progress=False)
    return out, run_dir


def test_run_writes_config_metrics_figures_and_provenance(smoke_run):
    out, run_dir = smoke_run
    assert run_dir == out / FIG1 / "smoke"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["steps"] == 60 and config["profile"] == "smoke"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["seeds"] == [0, 1] and len(metrics["verdicts"]) == 2
    assert {v["verdict"] for v in metrics["verdicts"]} <= {"reproduced", "partly", "not reproduced"}
    assert metrics["summary"]["steps"] == [0, 20, 40, 60]
    for arm in ("baseline", "bn"):
        acc = metrics["summary"]["arms"][arm]["test_acc_mean"]
        assert len(acc) == 4 and all(0.0 <= a <= 1.0 for a in acc)
        assert (run_dir / "seed-1" / arm / "result.json").exists()
        assert not (run_dir / "seed-1" / arm / "checkpoint.pt").exists()
    assert (run_dir / "fig1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert {"torch", "bnlab", "git", "cpu"} <= prov.keys()


def test_rerun_reuses_finished_units_and_more_seeds_add_units(smoke_run, monkeypatch, synthetic_data):
    out, _ = smoke_run
    exp_cls = type(experiments.get(FIG1))
    calls = []
    original = exp_cls.run_unit
    monkeypatch.setattr(exp_cls, "run_unit", lambda self, *a: calls.append(a[1:3]) or original(self, *a))
    runner.run_experiment(FIG1, "smoke", seeds=2, out=out, data_dir=synthetic_data, progress=False)
    assert calls == []
    runner.run_experiment(FIG1, "smoke", seeds=3, out=out, data_dir=synthetic_data, progress=False)
    assert calls == [(2, "baseline"), (2, "bn")]


def test_a_folder_never_mixes_two_configs(smoke_run, synthetic_data):
    out, run_dir = smoke_run
    config_path = run_dir / "config.json"
    record = json.loads(config_path.read_text())
    record["config"]["lr"] = 0.123
    other = out / "other" / FIG1 / "smoke"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps(record))
    with pytest.raises(runner.RunError, match=r"different config \(keys differ: lr\)"):
        runner.run_experiment(FIG1, "smoke", seeds=1, out=out / "other", data_dir=synthetic_data, progress=False)
    # overrides get their own folder instead
    run = runner.run_experiment(
        FIG1, "smoke", seeds=1, out=out, overrides=["lr=0.2"], data_dir=synthetic_data, progress=False
    )
    assert run.name.startswith("smoke-") and run != run_dir


def test_unknown_experiment_and_profile():
    with pytest.raises(KeyError, match="unknown experiment 'ioffe2015-fig2' \\(did you mean 'ioffe2015-fig1'\\?\\)"):
        experiments.get("ioffe2015-fig2")
    with pytest.raises(runner.RunError, match="unknown profile 'huge'"):
        runner.run_experiment(FIG1, "huge")


def test_report_shows_every_run_with_verdicts_and_figures(smoke_run, tmp_path):
    out, _ = smoke_run
    html_path, md_path = build_report(out, out=tmp_path, profile="smoke")
    text = html_path.read_text()
    assert "Figure 1" in text and "data:image/png;base64," in text
    assert text.count("class='badge'") >= 2 and "Machine:" in text
    md = md_path.read_text()
    assert "| claim | paper | ours | verdict |" in md and "fig1.png" in md
    with pytest.raises(FileNotFoundError, match="no finished runs of profile 'full'"):
        build_report(out, out=tmp_path, profile="full")


def test_cli_run_list_and_errors(tmp_path, synthetic_data, capsys):
    assert cli.main(["list"]) == 0
    assert FIG1 in capsys.readouterr().out
    argv = [
        "run",
        FIG1,
        "--profile",
        "smoke",
        "--seeds",
        "1",
        "--out",
        str(tmp_path),
        "--data-dir",
        str(synthetic_data),
    ]
    assert cli.main([*argv, "--no-progress"]) == 0
    assert f"{FIG1} [smoke, 1 seed(s)]" in capsys.readouterr().out
    assert cli.main([*argv, "stepz=3"]) == 2
    assert "unknown config key 'stepz' (did you mean 'steps'?)" in capsys.readouterr().err
    assert cli.main(["run", "nope"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "missing")]) == 2


def _cli(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "bnlab.cli", *args], env=env, **kw)


def test_sigkill_midway_then_resume_ends_identical_to_uninterrupted(tmp_path, synthetic_data):
    args = ["run", FIG1, "--profile", "smoke", "--seeds", "1", "--data-dir", str(synthetic_data), "--no-progress"]
    # Long enough to be killed while training, with checkpoints every 20 steps.
    args += ["steps=600", "hidden=64,64,64", "eval_every=20"]
    straight = tmp_path / "straight"
    assert _cli([*args, "--out", str(straight)]).wait(timeout=300) == 0

    killed = tmp_path / "killed"
    proc = _cli([*args, "--out", str(killed)])
    deadline = time.monotonic() + 120
    checkpoint = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(killed.glob(f"{FIG1}/*/seed-0/*/checkpoint.pt"))
        if found and torch.load(found[0], weights_only=False)["step"] >= 200:
            checkpoint = found[0]
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert checkpoint is not None and not (checkpoint.parent / "result.json").exists()
    assert _cli([*args, "--out", str(killed)]).wait(timeout=300) == 0

    run_a, run_b = (next(p.glob(f"{FIG1}/*")) for p in (straight, killed))
    for arm in ("baseline", "bn"):
        a = json.loads((run_a / "seed-0" / arm / "result.json").read_text())
        b = json.loads((run_b / "seed-0" / arm / "result.json").read_text())
        assert a["history"] == b["history"], arm
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (run_a, run_b))
    assert ma["summary"] == mb["summary"] and ma["verdicts"] == mb["verdicts"]


def test_atomic_write_leaves_no_partial_file_and_normal_permissions(tmp_path):
    from bnlab.fileio import atomic_write

    target = tmp_path / "out.json"
    atomic_write(target, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("name", experiments.names())
def test_every_experiment_runs_its_smoke_profile(name, tmp_path, synthetic_data):
    exp = experiments.get(name)
    assert "Claim" in exp.description(), "the module docstring states the claim being tested"
    run_dir = runner.run_experiment(name, "smoke", seeds=2, out=tmp_path, data_dir=synthetic_data, progress=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["verdicts"] and all(
        v["verdict"] in ("reproduced", "partly", "not reproduced") for v in metrics["verdicts"]
    )
    assert all(v["paper"] and v["ours"] and v["reason"] for v in metrics["verdicts"])
    for figure in metrics["figures"]:
        assert (run_dir / figure).stat().st_size > 1000
    for table in metrics["tables"]:
        assert all(len(row) == len(table["columns"]) for row in table["rows"])
    html, _ = build_report(tmp_path, out=tmp_path)
    assert metrics["title"] in html.read_text().replace("&#x27;", "'")
