"""The bench and the command line: they run, write their CSV with provenance, and refuse bad options."""

import csv
import subprocess
import sys

import pytest

from bnlab import bench, cli


def test_bench_rows_cover_every_case_and_provider():
    rows = bench.run_bench(quick=True, backends=("native",), rounds=1, log=lambda line: None)
    cases = {(r.case, r.shape) for r in rows}
    assert ("mlp-step", "60x784 -> 3x100 -> 10") in cases
    assert {r.provider for r in rows} == {"torch", "bnlab-native"}
    assert all(r.median_us > 0 for r in rows)
    assert all(r.ratio_vs_torch == 1.0 for r in rows if r.provider == "torch")
    assert "bnlab-native: " in bench.summary(rows)


def test_time_interleaved_measures_each_function():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1

        return fn

    samples = bench.time_interleaved({"a": make("a"), "b": make("b")}, rounds=3, min_block_s=1e-4)
    assert [len(v) for v in samples.values()] == [3, 3]
    assert calls["a"] > 3 and calls["b"] > 3


def test_cli_bench_writes_csv_with_machine_and_versions(tmp_path, capsys):
    path = tmp_path / "out" / "bench.csv"
    assert cli.main(["bench", "--quick", "--rounds", "1", "--backends", "native", "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert "mlp-step" in out and "MLP training step (batch 60) vs torch.nn" in out and str(path) in out
    rows = list(csv.DictReader(path.open()))
    assert rows and {"cpu", "torch", "bnlab", "git", "date", "median_us", "ratio_vs_torch"} <= rows[0].keys()
    assert not list(path.parent.glob("*.tmp")), "the CSV is written atomically"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--backends", "nope"], "--backends: unknown backend 'nope'"),
        (["bench", "--rounds", "0"], "--rounds must be at least 1"),
        (["bench", "--gpu", "--rounds", "3"], "--rounds and --csv are for the CPU bench"),
        (["bench", "--strict"], "--strict only with --gpu"),
    ],
)
def test_cli_refuses_bad_options(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "bnlab.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("bnlab ")
