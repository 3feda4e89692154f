"""The GPU session's scripts run end to end here (the knob sweep, benchmarks/tune_triton.py, on tiny shapes
in Triton's interpreter with a stand-in timer; the host-time breakdown, benchmarks/host_gpu.py, on CPU
tensors): their first real run is on borrowed device time, where an error in a script itself would waste
the session."""

from __future__ import annotations

import os
import subprocess
import sys
import time
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
    # (every knob the sweep sets)
    knobs = (*tune_triton.KNOBS, "TILE_BYTES", "PROGRAMS_PER_SM", "COMBINE_VALUES", "APPLY_STAGES", "PLANES_MIN_RUN")
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU session runs the warm-up for real")
def test_the_compile_warm_up_runs_every_first_stage_setting_in_worker_processes(monkeypatch):
    monkeypatch.setattr(tune_triton, "KNOBS", {"TILE": (32,), "NUM_WARPS": (4,), "SINGLE_TILE_MAX": (0, 8192)})
    shapes = [((5, 3, 4, 3), "NCHW"), ((6, 5), "NC")]
    assert tune_triton.warm_compile_cache(K, shapes, torch.float32, jobs=2, device="cpu") == []
    # The workers really run the steps: one the backend refuses comes back as an error per setting.
    errors = tune_triton.warm_compile_cache(K, shapes[:1], torch.float64, jobs=2, device="cpu")
    assert len(errors) == 2 and all("float64 is not supported" in e for e in errors)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU session runs it for real")
def test_the_host_time_breakdown_runs_every_line():
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "host_gpu.py"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(script.parent.parent / "src")}
    argv = ["--device", "cpu", "--calls", "2", "--no-compile", "--dtype", "float32", "--shape", "4,3,5,5",
            "--chain-layers", "3", "--profile-chain"]  # fmt: skip
    done = subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows, profile = done.stdout.split("  split-plan triton chain of 3 layers")  # (the chain's profile last)
    lines = [line for line in rows.splitlines() if line.startswith("  ")]
    assert "host profile:" in profile and "bnlab's own Python:" in profile, profile
    assert len(lines) == 25 and all(float(line.split()[0]) > 0 for line in lines), done.stdout
    assert done.stdout.count("layers, 3 in a row: forward + backward, a layer") == 4
    assert done.stdout.count("autograd multithreading off") == 2
    assert done.stdout.count(", Triton's dispatch") == 4
    assert "Triton: one launch of _single_tile_forward_kernel over an empty grid" in done.stdout
    assert "bnlab: inference under no_grad" in done.stdout


def test_the_launch_overhead_comparison_runs_without_a_gpu():
    """benchmarks/launch_overhead.py: Triton's dispatch and the direct path's, with stand-ins for the driver
    and the compiled kernel (it exits 1 if the direct path kept no compiled kernel)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "launch_overhead.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(script.parent.parent / "src")
    done = subprocess.run([sys.executable, str(script), "--calls", "50"], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = dict(line.split(":") for line in done.stdout.splitlines() if line.startswith("  "))
    assert {key.strip() for key in rows} == {"Triton", "direct", "variant"}, done.stdout
    assert all(float(value.split()[0]) > 0 for value in rows.values()), done.stdout


@pytest.mark.parametrize("which", ["large", "small", "nchw", "cl"])
def test_the_kernel_profile_sets_name_real_knobs_and_restore_them(monkeypatch, which):
    """benchmarks/profile_kernels.py: every variant sets knobs the kernel module has, each shape is profiled
    under it, and the defaults are back afterwards (the profiling itself needs a GPU: stubbed here)."""
    import profile_kernels

    seen = []
    monkeypatch.setattr(profile_kernels, "copy_bandwidth_gbps", lambda timer, device: 1.0)
    monkeypatch.setattr(profile_kernels, "make_timer", lambda device, **options: None)
    monkeypatch.setattr(profile_kernels.torch.cuda, "get_device_name", lambda: "stub")
    monkeypatch.setattr(profile_kernels, "_changes", lambda *args: True)  # (plans for a GPU: tested below)
    monkeypatch.setattr(profile_kernels, "_was_cut", lambda *args: True)  # (launches on a GPU: tested below)
    monkeypatch.setattr(
        profile_kernels,
        "profile_shape",
        lambda shape, layout, dtype, copy, timer: seen.append((shape, K.TILE)),
    )
    names = {name for knobs in profile_kernels.SETS[which][2] for name in knobs}
    assert names and all(hasattr(K, name) for name in names)
    assert names <= set(profile_kernels.PRINTED_KNOBS)  # (each profiled line says which setting it timed)
    before = {name: getattr(K, name) for name in names}
    monkeypatch.setattr(sys, "argv", ["profile_kernels.py", "--set", which])
    assert profile_kernels.main() == 0
    shapes, variant_shapes, variants = profile_kernels.SETS[which]
    assert len(seen) == len(shapes) + len(variant_shapes) * len(variants)
    if which == "small":  # the variants were in force while their shapes were profiled
        assert sum(tile == 8192 for _, tile in seen) == 4 * sum(v.get("TILE") == 8192 for v in variants)
    assert {name: getattr(K, name) for name in names} == before


def test_the_kernel_profile_times_uncut_grids_only_where_a_launch_was_cut(monkeypatch):
    import profile_kernels

    x = torch.empty(8, 4, 14, 14)
    plan = K.make_plan(x, K.PLANES)
    monkeypatch.setattr(K, "_FITTED", {})
    assert not profile_kernels._was_cut(K, (8, 4, 14, 14), "NCHW", torch.float32, device="cpu")
    K._FITTED[(K._stats_kernel, plan)] = K.within(plan, 1)
    assert profile_kernels._was_cut(K, (8, 4, 14, 14), "NCHW", torch.float32, device="cpu")
    assert not profile_kernels._was_cut(K, (8, 4, 7, 7), "NCHW", torch.float32, device="cpu")


def test_the_kernel_profile_skips_settings_that_leave_the_plan_as_it_is():
    import profile_kernels

    def changes(shape, knobs):
        return profile_kernels._changes(K, shape, "NCHW", torch.bfloat16, knobs, device="cpu")

    assert changes((8, 4, 56, 56), {"PLANES_MIN_RUN": 64})  # 64 positions wide instead of 1024
    assert not changes((8, 4, 7, 7), {"PLANES_MIN_RUN": 64})  # grouped channels: no run width to choose
    assert changes((8, 4, 56, 56), {"LONG_LOOP_TILES": 1})  # the gradient sums' depth, same plan
    assert not changes((8, 4, 56, 56), {"LONG_LOOP_TILES": 10_000})
    assert changes((64, 1, 56, 56), {"COMBINE_VALUES": 1})  # the combine's step (split_block), same plan
    assert changes((256, 16, 7, 7), {"GATHER_GROUPED_SUMS": False})  # the reductions' constexprs, same plan
    assert not changes((8, 16, 56, 56), {"GATHER_GROUPED_SUMS": False})  # (not grouped: one compiled variant)
    channels_last = {"STATS_PREFETCH": {"planes": False, "rows": False}}  # (the statistics' PREFETCH constexpr)
    assert not changes((8, 16, 7, 7), channels_last)
    assert profile_kernels._changes(K, (8, 16, 7, 7), "channels_last", torch.bfloat16, channels_last, device="cpu")
    # a setting's other knobs (the eviction hint) do not make it count as a plan change
    assert profile_kernels._plan_knobs({"TILE": 8192, "SECOND_READ_EVICTION": "evict_first"}) == {"TILE": 8192}
    assert profile_kernels._plan_knobs({"SECOND_READ_EVICTION": "evict_first"}) == {}


@pytest.mark.slow  # torch.compile with inductor (C++ on a CPU)
def test_the_inductor_code_dump_prints_the_generated_modules():
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "inductor_code.py"
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent / "src")}
    argv = ["--device", "cpu", "--shape", "4,3,5,5", "--dtype", "float32"]
    done = subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "# ==== generated module 1 of 2 ====" in done.stdout  # the forward's and the backward's
    assert done.stdout.rstrip().endswith("4,3,5,5 float32 NCHW: 2 generated modules")


def test_the_gpu_session_script_parses_and_its_default_candidates_are_knobs():
    """benchmarks/gpu_session.sh is valid bash, and every knob of its default candidates (and of every
    profile set's settings) is a knob of the kernels with a value of the right type: a removed or renamed
    knob there would fail on borrowed device time."""
    import profile_kernels

    from bnlab import gpubench

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_session.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    settings = _default_candidates(script)
    assert len(settings) >= 2 and all(setting for setting in settings)
    for setting in settings:
        assert gpubench.parse_knobs(setting.split())
    spelled = [dict(gpubench.parse_knobs(setting.split())) for setting in settings]  # (one setting, two spellings)
    assert spelled == [profile_kernels.WIDE_ROWS, profile_kernels.WIDE_DEEP]
    with pytest.raises(ValueError, match="REDUCTION_ROWS_BLOCK_BYTES"):  # (a knob renamed in session 14)
        gpubench.parse_knobs(["REDUCTION_ROWS_BLOCK_BYTES=128"])
    for _, _, variants in profile_kernels.SETS.values():
        for knobs in variants:
            gpubench.parse_knobs([f"{name}={value!r}" for name, value in knobs.items()])


def test_the_two_read_gap_sums_layers_against_copy_speed_and_compile(tmp_path, capsys):
    """benchmarks/two_read_gap.py: per layer, bnlab's time against size_copy_us / 0.625 (a split plan's
    8 tensor passes at the speed of a copy of the 5 minimal ones), weighted by the layer count, and the
    sum 1.2x torch.compile needs; other cases, dtypes, directions and batches are left out."""
    import two_read_gap

    from bnlab.bench import write_csv
    from bnlab.gpubench import GpuRow

    def row(case, shape, dtype, direction, provider, us, layers, copy, frac=None):  # (as the bench writes it)
        return GpuRow(
            case=case, shape=shape, dtype=dtype, layout="NCHW", direction=direction, provider=provider,
            median_us=us, gbps=None, frac_of_copy=frac, speedup_vs_eager=None, speedup_vs_best_torch=None,
            error="", layers=layers, layer_names="", bytes=0, max_abs_diff=None, note="", size_copy_us=copy,
        )  # fmt: skip

    rows = [
        row("resnet50", "256x8x4x4", "bfloat16", "both", "bnlab-triton", 100.0, 3, 50.0, 0.48),  # ideal 80 us
        row("resnet50", "256x8x4x4", "bfloat16", "both", "torch-compile", 120.0, 3, None),
        row("resnet50", "256x8x2x2", "bfloat16", "both", "bnlab-triton", 40.0, 1, 20.0, 0.4),  # ideal 32 us
        row("resnet50", "256x8x2x2", "bfloat16", "both", "torch-compile", 60.0, 1, None),
        row("resnet50", "256x8x2x2", "float32", "both", "bnlab-triton", 1.0, 1, 1.0),
        row("resnet50", "256x8x2x2", "bfloat16", "forward", "bnlab-triton", 1.0, 1, 1.0),
        row("resnet50", "32x8x2x2", "bfloat16", "both", "bnlab-triton", 1.0, 1, 1.0),
        row("resnet50-bn-add-relu", "256x8x2x2", "bfloat16", "both", "bnlab-triton", 1.0, 1, 1.0),
    ]
    path = write_csv(rows, tmp_path / "run.csv", {"gpu": "stub"})
    assert two_read_gap.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "0.80   0.06" in out and "0.80   0.01" in out  # ideal / bnlab, (100 - 80) x 3 and (40 - 32) x 1
    # (fractions of copy: bnlab's, and the ideal's at the same bytes in 0.8 of the time: 0.6, 0.5)
    assert "0.06  0.48 0.60\n" in out and "0.01  0.40 0.50 < 0.55 even at the ideal" in out
    assert "below 0.55 of copy even at the two-read ideal: 1 of 2 layer shapes: 256x8x2x2 NCHW (0.50)" in out
    assert "sum: bnlab 0.34 ms, two-read ideal 0.27 (compile / ideal 1.54x), torch.compile 0.42;" in out
    assert "1.2x compile needs 0.35 ms" in out
    with pytest.raises(SystemExit):
        two_read_gap.main([str(path), "--dtype", "float16"])


def _default_candidates(script: Path) -> list[str]:
    """gpu_session.sh's DEFAULT_CANDIDATES as bash expands them (they name WIDE_ROWS and DEEP), one setting each."""
    names = "^(WIDE_ROWS|DEEP|DEFAULT_CANDIDATES)="
    expand = f'eval "$(grep -E "{names}" {script})"; printf %s "$DEFAULT_CANDIDATES"'
    return subprocess.run(["bash", "-c", expand], check=True, capture_output=True, text=True).stdout.split(";")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU session runs it under ncu")
def test_the_ncu_driver_runs_training_steps_and_names_the_plans():
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "ncu_step.py"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(script.parent.parent / "src")}
    argv = ["--device", "cpu", "--shape", "4,16,3,3", "--dtype", "float32", "--steps", "2"]
    done = subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("4,16,3,3 NCHW float32: forward ")


def test_the_network_step_times_every_provider_and_layout(tmp_path, capsys, monkeypatch):
    """benchmarks/network_step.py on CPU with the tiny model: each layout with torch's layers, bnlab's
    native ones and the Triton kernels (the interpreter; "triton-dispatch" with the DIRECT_LAUNCH knob off,
    for its steps only; "triton-fused" with BN+ReLU fused), the converted models holding bnlab's layers with
    that backend, a CSV row each; a provider it does not know is refused by name."""
    import csv

    import network_step

    import bnlab.nn

    for provider in ("triton", "triton-dispatch", "triton-fused"):
        converted = network_step.prepared(network_step.tiny_model(), provider, "channels_last", "cpu")
        layers = [m for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert layers and all(type(m) is bnlab.nn.BatchNorm2d and m.backend == "triton" for m in layers)
        assert converted.get_submodule("0").weight.is_contiguous(memory_format=torch.channels_last)
        assert getattr(converted, "fused_bn_relu", None) == (["1", "4"] if provider.endswith("fused") else None)
    args = ["--model", "tiny", "--device", "cpu", "--batch", "4", "--size", "8", "--steps", "2", "--warmup", "1"]
    knob_seen = []
    monkeypatch.setattr(network_step, "time_steps", _recording_knob(network_step.time_steps, knob_seen))
    assert network_step.main([*args, "--out", str(tmp_path)]) == 0
    assert knob_seen == [True, True, True, False, True, True] * 2 and network_step.kernels.load().DIRECT_LAUNCH
    (written,) = tmp_path.glob("network-step-*.csv")
    with written.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["layout"], r["provider"]) for r in rows] == [
        (layout, provider) for layout in ("nchw", "channels_last")
        for provider in ("torch", "native", "triton", "triton-dispatch", "triton-fused", "none")
    ]  # fmt: skip
    assert all(float(r["median_ms"]) > 0 and float(r["host_ms"]) > 0 for r in rows)
    out = capsys.readouterr().out
    assert "channels_last  triton" in out
    # (each layout's last line: a BN layer's host time over the network's without BN, for each other provider)
    per_layer = [line for line in out.splitlines() if "a BN layer's host time in this network" in line]
    assert len(per_layer) == 2 and all(line.count(" us") == 5 and "none:" not in line for line in per_layer), out
    with pytest.raises(SystemExit):
        network_step.main([*args, "--providers", "torch,cudnn"])
    assert (
        "--providers: cudnn not among torch, native, triton, triton-dispatch, triton-fused, none"
        in capsys.readouterr().err
    )
    assert all(r["graph_ms"] == "" and r["compile"] == "" for r in rows)  # (no --graphs, no --compile)
    with pytest.raises(SystemExit):
        network_step.main([*args, "--graphs"])
    assert "--graphs: CUDA graphs need --device cuda, not cpu" in capsys.readouterr().err


def test_the_network_steps_baseline_has_no_bn_layers_and_a_bn_layers_host_time_is_measured_against_it():
    """Provider "none" removes every BN layer (nn.Identity in its place, the rest shared); a BN layer's host
    time is (a provider's host time - none's) / the layers; without a "none" row there is no such line.
    The narrow ResNet-50 has ResNet-50's 53 BN layers and trains at 32x32."""
    import network_step as NS

    model = NS.narrow_resnet50()
    assert NS.bn_layers(model) == 53 and NS.bn_layers(NS.build("resnet50-narrow")) == 53
    bare = NS.prepared(model, "none", "nchw", "cpu")
    assert NS.bn_layers(bare) == 0 and NS.bn_layers(model) == 53  # (a copy: the model keeps its layers)
    assert sum(isinstance(m, torch.nn.Identity) for m in bare.modules()) == 53
    assert sum(isinstance(m, torch.nn.Conv2d) for m in bare.modules()) == 53
    NS.training_step(bare, "channels_last", 2, 32, "cpu")()
    assert NS.bn_host_lines({"torch": 10.0, "triton": 20.0, "none": 8.0}, 4) == ["torch: 500 us", "triton: 3000 us"]
    assert NS.bn_host_lines({"torch": 10.0}, 4) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="stubbed kernels on CPU tensors: a CPU machine's check")
def test_the_host_overhead_network_rows_put_a_bn_layer_in_a_network_beside_one_in_a_chain():
    """benchmarks/host_overhead.py --network (two steps each): a row for torch's and for triton's BN layers,
    each a layer's host time in the network (a difference of two steps' medians: its sign is noise at two
    steps on a loaded machine) and in a chain (positive)."""
    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{bench}{os.pathsep}{bench.parent / 'src'}"}
    code = "import host_overhead as H; H._print_network_rows(H.kernels.load(), steps=2)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = {line.split(":")[0].strip(): line.split(":")[1].split("/") for line in done.stdout.splitlines()
            if line.startswith(" ")}  # fmt: skip
    assert set(rows) == {"torch", "triton"} and all(len(row) == 2 for row in rows.values()), done.stdout
    assert all(float(network) == float(network) and float(chain) > 0 for network, chain in rows.values())
    assert "narrow ResNet-50 (53 BN layers;" in done.stdout


def test_a_network_step_is_timed_to_the_gpus_end_not_the_hosts(monkeypatch):
    """network_step.time_steps on a simulated GPU a step takes 4 units of and a host that issues one in 1:
    4 a step, not the host's 1 (a step's calls return long before the GPU has run it; run 24 timed the
    wall time between calls and reported the host's issue time for CUDA-graph steps); and, each step on
    an idle GPU, the host's 1."""
    import types

    import network_step

    clock = types.SimpleNamespace(host=0.0, gpu=0.0)

    def step() -> None:
        clock.host += 1.0
        clock.gpu = max(clock.gpu, clock.host) + 4.0  # (the step's work queued behind what is there)

    def synchronize(device: str) -> None:
        clock.host = max(clock.host, clock.gpu)

    monkeypatch.setattr(network_step, "training_step", lambda *args, **kwargs: step)
    monkeypatch.setattr(network_step, "_synchronize", synchronize)
    monkeypatch.setattr(network_step, "time", types.SimpleNamespace(perf_counter=lambda: clock.host))
    seconds, issued = network_step.time_steps(None, "nchw", 4, 8, steps=10, warmup=2, device="cuda")
    assert len(seconds) == 10 // network_step.WINDOW and len(issued) == 10
    # (a window's first step starts on an idle GPU: its host second before the GPU starts, over 5 steps)
    assert seconds == [pytest.approx(4.0 + 1.0 / network_step.WINDOW)] * 2
    assert issued == [1.0] * 10


def test_the_network_steps_gc_time_counts_collections_by_generation():
    """network_step.GcTime: the collections Python ran while it was entered (here two of generation 0 and one
    of 2, forced) and their time, a step; none after it is left."""
    import gc

    import network_step

    with network_step.GcTime() as timed:
        gc.collect(0)
        gc.collect(0)
        gc.collect(2)
    gc.collect(1)
    assert timed.counts == [2, 0, 1] and all(s >= 0 for s in timed.seconds) and sum(timed.seconds) > 0
    assert timed.line(4).endswith("(2/0/1 collections of generations 0/1/2, 4 steps)")
    assert timed.line(4).startswith(f"Python's gc {sum(timed.seconds) / 4 * 1e3:.2f} ms a step")


def test_the_network_step_compiles_each_providers_model_afresh_when_asked(tmp_path, capsys, monkeypatch):
    """network_step.py --compile MODE: each provider's model under torch.compile with that mode (a stand-in
    here: inductor's compiles take minutes on the CI's cores), dynamo reset before each, the mode in the
    header and in every CSV row (and --kernels' table after each provider's rows); too few warm-up steps
    for the compiles and a mode it does not know are refused."""
    import csv

    import network_step

    compiled, resets = [], []

    def compile_(model, mode):
        compiled.append((hasattr(model, "fused_bn_relu"), mode))
        return model

    monkeypatch.setattr(network_step.torch, "compile", compile_)
    monkeypatch.setattr(network_step.torch._dynamo, "reset", lambda: resets.append(len(compiled)))
    args = ["--model", "tiny", "--device", "cpu", "--batch", "4", "--size", "8", "--steps", "1",
            "--providers", "torch,triton-fused", "--layouts", "channels_last"]  # fmt: skip
    assert network_step.main([*args, "--compile", "reduce-overhead", "--kernels", "--out", str(tmp_path)]) == 0
    assert compiled == [(False, "reduce-overhead"), (True, "reduce-overhead")] and resets == [0, 1]  # (fused 2nd)
    (written,) = tmp_path.glob("network-step-*.csv")
    with written.open() as f:
        assert [r["compile"] for r in csv.DictReader(f)] == ["reduce-overhead"] * 2
    out = capsys.readouterr().out
    assert "torch.compile(mode='reduce-overhead')" in out and out.count("    kernels: ") == 2  # (--kernels)
    for bad, message in (
        (["--compile", "default", "--warmup", "2"], "--compile: at least 3 warm-up steps"),
        (["--compile", "fast"], "invalid choice: 'fast'"),
    ):
        with pytest.raises(SystemExit):
            network_step.main([*args, *bad])
        assert message in capsys.readouterr().err


def test_a_network_step_that_cannot_be_replayed_from_a_graph_says_why_and_leaves_the_others_rows():
    """network_step.py --graphs: each provider's line, its time against the first provider's; a capture
    that fails is reported on its line with no number (the rows of the providers after it still come), and
    a later provider's line then has no ratio against it."""
    import network_step

    def failing() -> float:
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    graphed: dict[str, float] = {}
    assert (
        network_step._graph_line(graphed, "torch", "torch", lambda: 20.0) == "    20.00 ms replayed from one CUDA graph"
    )
    line = network_step._graph_line(graphed, "triton", "torch", lambda: 15.0)
    assert line == "    15.00 ms replayed from one CUDA graph (0.750x torch's)"
    line = network_step._graph_line(graphed, "native", "torch", failing)
    assert (
        line
        == "not replayed from a CUDA graph: RuntimeError: CUDA error: operation not permitted when stream is capturing"
    )
    assert graphed == {"torch": 20.0, "triton": 15.0}
    assert network_step._graph_line({}, "triton", "torch", lambda: 15.0).endswith("CUDA graph")  # (no torch row)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("provider", ["torch", "triton", "triton-fused"])
def test_a_network_step_replayed_from_a_cuda_graph_trains_as_eager_steps_do(provider):
    """network_step.py --graphs: the whole step (forward, backward, SGD's step) captured in one CUDA graph;
    its warm-up steps and replays move the weights and running statistics as as many eager steps do, and
    count the batches (bnlab's layers inside a capture: their counters, the guard, no late reports)."""
    import network_step

    torch.manual_seed(0)
    base = network_step.tiny_model()
    eager, graphed = (network_step.prepared(base, provider, "channels_last", "cuda") for _ in range(2))
    start = {key: value.clone() for key, value in eager.state_dict().items()}
    step = network_step.training_step(eager, "channels_last", 8, 16, "cuda", graphable=True)
    for _ in range(2 + 3):
        step()
    replay = network_step.captured(network_step.training_step(graphed, "channels_last", 8, 16, "cuda", True), 2)
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    after = graphed.state_dict()
    for key, value in eager.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert int(after[key]) == int(value) == 5, key
            continue
        moved, expected = after[key] - start[key], value - start[key]
        assert expected.abs().max() > 0, key  # (every tensor compared here moves in training)
        torch.testing.assert_close(moved, expected, rtol=0.02, atol=0.02 * float(expected.abs().max()), msg=key)


def test_the_network_steps_host_profile_names_the_costliest_functions_and_bnlabs_share():
    """network_step.py --profile: per step, the functions with the most time of their own (a busy loop in
    the step among them), and the share in bnlab's files (here a bnlab layer's forward and backward), with
    autograd's multithreading off meanwhile (and on again after)."""
    import network_step

    import bnlab.nn

    layer, x = bnlab.nn.BatchNorm2d(3, backend="native"), torch.randn(4, 3, 2, 2, requires_grad=True)

    def busy() -> None:
        end = time.perf_counter() + 0.05
        while time.perf_counter() < end:
            pass

    threaded = []

    def step() -> None:
        layer(x).sum().backward()
        busy()
        threaded.append(torch.autograd.is_multithreading_enabled())

    lines = network_step.host_profile(step, steps=3, device="cpu", top=4)
    # (backward on the calling thread, where cProfile sees it: on a GPU autograd runs it on its own thread)
    assert threaded == [False] * 3 and torch.autograd.is_multithreading_enabled()
    assert lines[0].startswith("    host profile: ") and " ms a step under cProfile" in lines[0]
    assert len(lines) == 6 and any("(busy)" in line or "perf_counter" in line for line in lines[1:5]), lines
    share = float(lines[-1].split("bnlab's own Python: ")[1].split(" ms")[0])
    assert 0 < share < 20, lines


def test_the_network_steps_kernel_lines_rank_kernels_by_time_with_counts_and_bnlabs_share():
    """network_step.py --kernels: the GPU events of a step by name, most time first, with counts, a total and
    bnlab's Triton kernels' share; CPU events and (in CPU mode, the tests' stand-in) nested ones left out.
    Then the CUDA runtime's calls (host events) by time, cuDNN's ops not among them."""
    from types import SimpleNamespace

    import network_step

    def event(name, device, us, parent=None):
        kind = SimpleNamespace(name=device)
        return SimpleNamespace(name=name, device_type=kind, device_time=us, cpu_time=us, cpu_parent=parent)

    events = [event("_stats_kernel", "CUDA", 300.0), event("_apply_kernel", "CUDA", 200.0),
              event("_stats_kernel", "CUDA", 300.0), event("cudnn_conv", "CUDA", 1000.0),
              event("copy_kernel", "CUDA", 100.0), event("aten::batch_norm", "CPU", 5000.0)]  # fmt: skip
    assert network_step.kernel_lines(events, cuda=True, top=2) == [
        "    kernels: 5 a step, 1.90 ms of GPU time; the 2 with the most:",
        "         1.000 ms     1  cudnn_conv",
        "         0.600 ms     2  _stats_kernel",
        "      bnlab's kernels: 3 a step, 0.80 ms (42%)",
    ]
    cpu = [event("aten::mm", "CPU", 2000.0), event("aten::addmm", "CPU", 500.0, parent=object())]
    assert (
        network_step.kernel_lines(cpu, cuda=False)[0]
        == "    kernels: 1 a step, 2.00 ms of CPU time; the 1 with the most:"
    )
    runtime = [event("cudaLaunchKernel", "CPU", 5.0), event("cudaStreamSynchronize", "CPU", 9000.0),
               event("cudaLaunchKernel", "CPU", 7.0), event("cudnn_conv", "CPU", 50.0),
               event("cudaMalloc", "CUDA", 1.0)]  # fmt: skip
    assert network_step.runtime_lines(events + runtime, top=2) == [
        "    CUDA runtime calls: 3 a step, 9.01 ms of host time; by time: cudaStreamSynchronize 1x 9.00 ms, "
        "cudaLaunchKernel 2x 0.01 ms"
    ]


def test_the_network_steps_kernel_table_profiles_one_step():
    """kernel_table on CPU (its top-level ops stand in for kernels): a step of three matmuls and a layer's
    forward and backward, profiled once after one unprofiled step; every line a time, the counts right."""
    import network_step

    import bnlab.nn

    layer, x = bnlab.nn.BatchNorm2d(3, backend="native"), torch.randn(4, 3, 2, 2, requires_grad=True)
    big, calls = torch.randn(400, 400), []

    def step() -> None:
        calls.append(1)
        layer(x).sum().backward()
        for _ in range(3):
            big @ big

    lines = network_step.kernel_table(step, "cpu", top=10)
    assert len(calls) == 2 and lines[0].startswith("    kernels: ") and "ms of CPU time" in lines[0]
    times = [float(line.split()[0]) for line in lines[1:-1]]
    assert times == sorted(times, reverse=True) and 1 <= len(times) <= 10
    assert any(line.split()[2:] == ["3", "aten::matmul"] for line in lines[1:-1]), lines
    assert {"_stats_kernel", "_apply_kernel", "_guard_kernel"} <= network_step._bnlab_kernel_names()


def _recording_knob(time_steps, seen: list):
    """`time_steps`, recording the DIRECT_LAUNCH knob each call ran under."""
    from bnlab import kernels

    def recorded(*args, **kwargs):
        seen.append(kernels.load().DIRECT_LAUNCH)
        return time_steps(*args, **kwargs)

    return recorded


def test_a_profile_log_reads_as_whole_sums_and_the_fastest_setting_per_shape(capsys):
    """benchmarks/profile_sums.py on run 14's committed channels-last profile: every setting as a sum over
    ResNet-50's layers against the run's defaults, and per shape the fastest (bf16 256x512x7x7: reductions
    in blocks of 32 channels, 0.865 of the step); a layout the log lacks is an error."""
    import profile_sums

    log = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "h200-2026-11-27" / "profile-run14-cl.log"
    assert profile_sums.main([str(log)]) == 0
    out = capsys.readouterr().out
    assert "12 shapes   12.722 against   12.722 (1.000)  the defaults" in out
    assert "256x512x7x7      x5     51.3 ->    44.4 us (0.865)  {'REDUCTION_ROWS_BLOCK_CHANNELS': 32}" in out
    assert "the fastest per shape: 12.722 -> 12.649 ms (0.994)" in out
    assert profile_sums.main([str(log), "--layout", "NCHW"]) == 1


def test_a_profile_log_reads_as_each_kernels_excess_over_copy_speed(capsys):
    """profile_sums.py --kernels on run 14's channels-last profile: each kernel of the first setting against
    its tensor passes at the log's copy speed (4252 GB/s), and the excess summed over ResNet-50's layers:
    the two reductions hold most of it (session 27's reading); a layout the log lacks is an error."""
    import profile_sums

    log = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "h200-2026-11-27" / "profile-run14-cl.log"
    assert profile_sums.main([str(log), "--kernels"]) == 0
    out = capsys.readouterr().out
    # 256x256x14x14 bf16 is 25.69 MB a tensor: 6.04 us a pass at 4252 GB/s; the statistics kernel took 18.9
    assert "  256x256x14x14    x11       18.9 ( +12.9)         11.6 (  -0.5)         23.5 ( +11.4)" in out
    assert ("excess over ResNet-50's 53 layers of these shapes, ms: _stats_kernel +0.803, _apply_kernel +0.165, "
            "_grad_kernel +0.563, _input_grad_kernel +0.037") in out  # fmt: skip
    assert profile_sums.main([str(log), "--kernels", "--layout", "NCHW"]) == 1


def test_the_variants_step_times_each_variant_beside_its_earlier_path(tmp_path, monkeypatch):
    """benchmarks/variants_step.py on CPU (the interpreter, a tiny shape): a CSV row per (layout, row); each
    row's layer runs the path it names (ghosts in place or laid side by side, renorm's statistics from the
    kernel or from var_mean), and the patch for an earlier path is undone after its row."""
    import csv

    import variants_step

    import bnlab.functional as BF

    calls = {"side by side": 0, "var_mean": 0}
    side_by_side, var_mean = BF._ghosts_side_by_side, torch.var_mean

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(BF, "_ghosts_side_by_side", counted("side by side", side_by_side))
    monkeypatch.setattr(torch, "var_mean", counted("var_mean", var_mean))
    x = torch.randn(8, 4, 3, 3, requires_grad=True)
    dy = torch.randn(8, 4, 3, 3)
    for row in variants_step.ROWS:
        before = dict(calls)
        with variants_step.earlier_path(row):
            variants_step.step_fn(variants_step.layer_for(row, 4, 2), x, dy)(None)
        used = {name for name in calls if calls[name] > before[name]}
        assert used == ({"side by side"} if row == "ghost, side by side" else {"var_mean"} if row == "renorm, var_mean"
                        else set()), row  # fmt: skip
    args = ["--device", "cpu", "--shapes", "8x4x3x3", "--ghost", "2", "--layouts", "channels_last"]
    assert variants_step.main([*args, "--out", str(tmp_path)]) == 0
    (written,) = tmp_path.glob("variants-*.csv")
    with written.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["layout"], r["row"]) for r in rows] == [("channels_last", row) for row in variants_step.ROWS]
    assert all(float(r["us"]) > 0 for r in rows) and rows[0]["vs_bn"] == "1.0"
