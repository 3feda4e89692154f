"""The GPU session's knob sweep (benchmarks/tune_triton.py) runs end to end here, on tiny shapes in
Triton's interpreter with a stand-in timer: its first real run is on borrowed device time, where an error
in the script itself would waste the session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
from bnlab import kernels

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import tune_triton

K = kernels.load()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU session runs the sweep for real")
@pytest.mark.parametrize(
    ("shape", "layout"), [((5, 3, 4, 3), "NCHW"), ((3, 24, 2, 2), "channels_last"), ((6, 5), "NC")]
)
def test_the_knob_sweep_runs_every_stage_without_errors(monkeypatch, capsys, shape, layout):
    monkeypatch.setattr(tune_triton, "KNOBS", {"TILE": (32,), "NUM_WARPS": (4, 8), "SINGLE_TILE_MAX": (0, 8192)})
    # Persistent plans as on a GPU (the interpreter runs them in two phases) in rounds of 200 values: the
    # channels-last block (12 rows x 32 channels: 384 values) fits only narrowed to 16 channels (192).
    monkeypatch.setattr(K, "_persistent_limits", lambda device, itemsize, streams: (8, 200) if K.PERSISTENT else (0, 0))
    knobs = ("TILE", "NUM_WARPS", "SINGLE_TILE_MAX", "PERSISTENT", "PERSISTENT_MIN_CHANNELS", "L2_FRACTION")
    defaults = {name: getattr(K, name) for name in knobs}
    calls = []

    def timer(fn, setup=None):  # runs the step once (the kernels for real, in the interpreter)
        calls.append(fn(setup() if setup else None))
        return 1e-3

    rows = tune_triton.sweep_shape(K, timer, 1.0, shape, layout, torch.float32, device="cpu")
    assert rows and all(row["error"] == "" for row in rows), [row["error"] for row in rows if row["error"]]
    assert len(calls) == len(rows)
    assert f"BEST {shape} {layout}" in capsys.readouterr().out
    assert {name: getattr(K, name) for name in knobs} == defaults  # every measurement put the knobs back
    plans = {row["plan"] for row in rows}
    assert any("per_round=0" in p for p in plans) and any("per_round=0" not in p for p in plans)  # both kinds
    narrowed = [row for row in rows if row.get("PERSISTENT_MIN_CHANNELS")]
    assert bool(narrowed) == (layout == "channels_last")
    assert all("blocks=2x16" in row["plan"] for row in narrowed)  # tiles of 2 rows x 16 channels


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU session runs the warm-up for real")
def test_the_compile_warm_up_runs_every_first_stage_setting_in_worker_processes(monkeypatch):
    monkeypatch.setattr(tune_triton, "KNOBS", {"TILE": (32,), "NUM_WARPS": (4,), "SINGLE_TILE_MAX": (0, 8192)})
    shapes = [((5, 3, 4, 3), "NCHW"), ((6, 5), "NC")]
    assert tune_triton.warm_compile_cache(K, shapes, torch.float32, jobs=2, device="cpu") == []
    # The workers really run the steps: one the backend refuses comes back as an error per setting.
    errors = tune_triton.warm_compile_cache(K, shapes[:1], torch.float64, jobs=2, device="cpu")
    assert len(errors) == 2 and all("float64 is not supported" in e for e in errors)
