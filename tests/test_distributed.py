"""Data-parallel runs: `bnlab.distributed`, and `bnlab run` under torchrun against a single-process run.

The end-to-end tests launch ``python -m torch.distributed.run --nproc_per_node 2 -m bnlab.cli run ...`` (2 gloo
processes on 127.0.0.1, a port the OS picked) in its own session, so that a timeout or a deliberate SIGKILL
takes the launcher and both workers down together. Every wait is bounded by `LAUNCH_TIMEOUT_S`, after which
the whole group is killed and the test fails with the launcher's output. This pytest process never joins a
process group itself: the in-process tests below check the single-process behaviour.

What differs between a 2-process --sync-bn run and a single-process one: the same examples in the same
order and the same global-batch statistics, but sums taken in another order (the shares' partial sums,
the float64 shifted sums of SyncBatchNorm, DDP's average of two gradients), so the histories agree to
rounding, which 60 smoke steps leave far below `TOL`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnlab import cli, distributed, runner
from bnlab.train import train_classifier

FIG1 = "ioffe2015-fig1"
LAUNCH_TIMEOUT_S = 120  # one torchrun of the smoke profile takes about 7 s on 2 cores
TOL = 1e-4  # on test loss, train loss and the sigmoid-input percentiles; rounding differences are ~1e-6


# ---- launching torchrun ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], log: Path) -> subprocess.Popen:
    """Start torchrun with 2 workers running `bnlab.cli args`, output into `log`, in a session of its own."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # 2 ranks share 2 cores
    if sys.platform in ("linux", "darwin"):  # gloo on the loopback interface, whatever the hostname resolves to
        env.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "--max_restarts",
        "0",
        "-m",
        "bnlab.cli",
        *args,
    ]
    with open(log, "wb") as out:
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent, start_new_session=True
        )


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its workers (one process group: the session `_launch` started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _torchrun(args: list[str], folder: Path) -> tuple[int, str]:
    """Run to the end (bounded); the exit status and the output. A second port if the first was taken."""
    for attempt in range(2):
        log = folder / f"torchrun-{time.monotonic_ns()}.log"
        proc = _launch(args, log)
        try:
            code = proc.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill(proc)
            pytest.fail(f"torchrun timed out after {LAUNCH_TIMEOUT_S} s:\n{log.read_text()[-5000:]}", pytrace=False)
        text = log.read_text(errors="replace")
        if code == 0 or "address already in use" not in text.lower() or attempt:
            return code, text
    raise AssertionError("unreachable")


def _result(run_dir: Path, arm: str, seed: int = 0) -> dict:
    return json.loads((run_dir / f"seed-{seed}" / arm / "result.json").read_text())


def _smoke_args(data: Path, out: Path, *extra: str) -> list[str]:
    options = ["--profile", "smoke", "--seeds", "1", "--no-progress", "--data-dir", str(data), "--out", str(out)]
    return ["run", FIG1, *options, *extra]


# ---- end to end ---------------------------------------------------------------------------------------------


def test_sync_bn_on_two_processes_matches_one_process(tmp_path, synthetic_data):
    out = tmp_path / "runs"
    code, log = _torchrun(_smoke_args(synthetic_data, out, "--sync-bn"), tmp_path)
    assert code == 0, log
    assert log.count(f"{FIG1} [smoke, 1 seed(s)]") == 1, "only rank 0 prints"
    assert cli.main(_smoke_args(synthetic_data, out, "--sync-bn")) == 0  # the same command, one process

    single, parallel = out / FIG1 / "smoke", out / FIG1 / "smoke-ddp2-syncbn"
    record_single, record_parallel = (json.loads((d / "config.json").read_text()) for d in (single, parallel))
    assert "data_parallel" not in record_single  # a single-process record is as it always was
    assert record_parallel.pop("data_parallel") == {"world_size": 2, "sync_bn": True}
    assert record_parallel == record_single
    assert not list(parallel.rglob("checkpoint.pt")) and (parallel / "fig1.png").exists()

    for arm in ("baseline", "bn"):
        a, b = _result(single, arm), _result(parallel, arm)
        assert "data_parallel" not in a
        assert b["data_parallel"] == {"world_size": 2, "sync_bn": True, "per_device_bn": []}  # every BN synced
        assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]] == [0, 20, 40, 60]
        for ha, hb in zip(a["history"], b["history"], strict=True):
            for key in ("train_loss", "test_loss", "p15", "p50", "p85"):
                if ha[key] is None:
                    assert hb[key] is None
                else:
                    assert abs(ha[key] - hb[key]) <= TOL, (arm, ha["step"], key, ha[key], hb[key])
            # Accuracy moves in steps of one test example (1/200): rounding may at most flip a near-tie.
            assert abs(ha["test_acc"] - hb["test_acc"]) <= 1 / 200 + 1e-12, (arm, ha["step"])


@pytest.mark.slow  # ~20 s of timing-dependent multi-process work; passed 24 runs in a row, kept out of CI
def test_killed_data_parallel_run_resumes_to_the_uninterrupted_result(tmp_path, synthetic_data):
    # Plain DDP (per-device BN statistics); long enough to be killed while training, checkpoints every 20 steps.
    extra = ("steps=600", "eval_every=20")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    code, log = _torchrun(_smoke_args(synthetic_data, straight, *extra), tmp_path)
    assert code == 0, log

    proc = _launch(_smoke_args(synthetic_data, killed, *extra), tmp_path / "killed.log")
    checkpoint, deadline = None, time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(killed.glob(f"{FIG1}/*/seed-0/*/checkpoint.pt"))
            try:
                if found and torch.load(found[0], weights_only=False)["step"] >= 100:
                    checkpoint = found[0]
                    break
            except (FileNotFoundError, EOFError, RuntimeError):  # replaced or unlinked while we looked
                pass
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    finally:
        _kill(proc)  # the launcher and both workers at once
    assert checkpoint is not None and not (checkpoint.parent / "result.json").exists()
    code, log = _torchrun(_smoke_args(synthetic_data, killed, *extra), tmp_path)
    assert code == 0, log

    run_a, run_b = (next(p.glob(f"{FIG1}/*")) for p in (straight, killed))
    assert run_a.name == run_b.name and run_a.name.endswith("-ddp2")
    for arm in ("baseline", "bn"):
        a, b = _result(run_a, arm), _result(run_b, arm)
        assert a["history"] == b["history"], arm  # bit for bit: same world size, same machine
        assert a["data_parallel"] == b["data_parallel"]
    assert _result(run_a, "bn")["data_parallel"]["per_device_bn"] == ["1", "4", "7"]  # no --sync-bn
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (run_a, run_b))
    assert ma["summary"] == mb["summary"] and ma["verdicts"] == mb["verdicts"]


def test_batch_not_divisible_by_the_world_size_is_a_clear_error(tmp_path, synthetic_data):
    code, log = _torchrun(_smoke_args(synthetic_data, tmp_path / "runs", "batch_size=61"), tmp_path)
    assert code != 0
    message = "is not divisible by the world size 2"
    # Each rank says it (torchrun stops the other as soon as one exits, so only one may get to say it).
    assert f"the global batch size 61 {message}" in log and log.count(message) <= 2, log
    assert "[rank0]: Traceback" not in log and "[rank1]: Traceback" not in log  # an error message, not a crash


# ---- in one process ---------------------------------------------------------------------------------------------


def _tiny(checkpoint: Path, **options) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 4, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    return train_classifier(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        x,
        y,
        steps=12,
        evaluate=lambda net: {"acc": (net(x).argmax(1) == y).double().mean().item()},
        checkpoint=checkpoint,
        eval_every=6,
        data_seed=3,
        **options,
    )


def test_indivisible_batch_fails_before_any_communication(tmp_path, monkeypatch):
    # As a world of 3 would see it; no process group exists, so any collective would fail differently.
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(distributed.DataParallelError, match=r"global batch size 8 is not divisible by .* size 3"):
        _tiny(tmp_path / "c.pt", batch_size=8)
    assert not (tmp_path / "c.pt").exists()


def test_sync_bn_changes_nothing_in_one_process(tmp_path):
    plain = _tiny(tmp_path / "a.pt", batch_size=8)
    synced = _tiny(tmp_path / "b.pt", batch_size=8, sync_bn=True)
    assert plain["history"] == synced["history"] and "data_parallel" not in synced
    a, b = (torch.load(tmp_path / name, weights_only=False)["model"] for name in ("a.pt", "b.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_helpers_are_no_ops_without_a_process_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.init_from_env() is False
    # A world of one, as `torchrun --nproc_per_node 1` describes it: nothing to join.
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    assert distributed.init_from_env() is False
    assert not torch.distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main(), distributed.active()) == (
        0,
        1,
        True,
        False,
    )
    assert distributed.barrier() is None and distributed.shutdown() is False
    assert distributed.on_main(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(KeyError, match="boom"):
        distributed.on_main(lambda: {}["boom"])
    assert distributed.check_agree(object(), "anything") is None
    assert distributed.mean_over_ranks(2.5) == 2.5


def test_run_folders_and_the_sync_bn_check():
    out = Path("runs")
    assert runner.run_dir_for(out, FIG1, "smoke", {}) == out / FIG1 / "smoke"
    assert runner.run_dir_for(out, FIG1, "smoke", {}, world_size=1, sync_bn=True) == out / FIG1 / "smoke"
    assert runner.run_dir_for(out, FIG1, "smoke", {}, world_size=4).name == "smoke-ddp4"
    named = runner.run_dir_for(out, FIG1, "quick", {"lr": "0.2"}, world_size=2, sync_bn=True).name
    assert named.startswith("quick-") and named.endswith("-ddp2-syncbn")
    with pytest.raises(runner.RunError, match="must call train_classifier"):
        runner._check_data_parallel(FIG1, {"history": []}, sync_bn=True)
    runner._check_data_parallel(FIG1, {"data_parallel": {"sync_bn": True}}, sync_bn=True)
