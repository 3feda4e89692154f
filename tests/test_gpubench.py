"""`bnlab bench --gpu` on CPU: shapes, bytes, plan, timing loops, the whole pipeline, the acceptance check, the CLI.

The GPU itself is not here: the pipeline runs on CPU with toy shapes and the reference/native backends, and
the CUDA-event loop runs against fake events, so what only a GPU can tell (speed) is all that is left out.
"""

import csv
import functools
import math
import re
import time
from collections import Counter
from dataclasses import replace

import pytest
import torch

import bnlab.kernels
from bnlab import bench, cli
from bnlab import gpubench as g

# A ResNet-50 with the same 53 layers, 12 distinct shapes and multiplicities, at toy sizes.
TOY_RESNET = functools.partial(g.resnet50_bn_shapes, widths=(1, 2, 3, 5), resolutions=(8, 4, 2, 1))
CPU = g.Settings(
    device="cpu",
    providers=(g.BNLAB, g.EAGER),
    backend="reference",
    batches=(2,),
    dtypes=("float32", "bfloat16"),
    bn1d_shapes=((64, 8),),
    copy_bytes=2**20,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Toy tensors gain nothing from threads, and on a 2-core machine torch's OpenMP threads can stall for
    milliseconds per op while Dynamo (imported by the compile tests) finishes starting up in the background."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def QUIET(line):
    """Progress lines are not checked here."""


# ---- shapes, bytes, plan -------------------------------------------------------------------------------


def test_resnet50_has_53_bn_layers_with_torchvision_names_and_channels():
    layers = g.resnet50_bn_shapes(256)
    assert len(layers) == 53 and len({name for name, _ in layers}) == 53
    assert Counter(shape[1] for _, shape in layers) == {64: 7, 128: 8, 256: 16, 512: 11, 1024: 7, 2048: 4}
    assert sum(shape[1] for _, shape in layers) == 26560  # torchvision resnet50: 53,120 BN weights + biases
    shapes = dict(layers)
    assert shapes["bn1"] == (256, 64, 112, 112)
    assert shapes["layer1.0.bn1"] == (256, 64, 56, 56)
    assert shapes["layer2.0.bn1"] == (256, 128, 56, 56)  # stride on the 3x3 conv: bn1 at the old resolution
    assert shapes["layer2.0.bn2"] == (256, 128, 28, 28)
    assert shapes["layer3.0.downsample.1"] == (256, 1024, 14, 14)
    assert layers[-1] == ("layer4.2.bn3", (256, 2048, 7, 7))
    assert all(shape[0] == 32 for _, shape in g.resnet50_bn_shapes(32))


def test_distinct_shapes_carry_the_multiplicities():
    distinct = dict(g.distinct_shapes(g.resnet50_bn_shapes(32)))
    assert len(distinct) == 12
    assert sum(len(names) for names in distinct.values()) == 53
    assert distinct[(32, 256, 14, 14)] == tuple(
        ["layer3.0.bn2"] + [f"layer3.{b}.bn{i}" for b in range(1, 6) for i in (1, 2)]
    )
    assert len(distinct[(32, 64, 56, 56)]) == 6 and len(distinct[(32, 2048, 7, 7)]) == 4
    # The toy network has the same structure: 12 distinct shapes for 53 layers.
    assert [len(n) for _, n in g.distinct_shapes(TOY_RESNET(2))] == [len(n) for n in distinct.values()]


@pytest.mark.parametrize(
    ("direction", "fused", "tensors"),
    [("forward", False, 2), ("backward", False, 3), ("both", False, 5), ("forward", True, 3), ("both", True, 8)],
)
def test_min_traffic_bytes(direction, fused, tensors):
    assert g.min_traffic_bytes(1000, 2, direction, fused) == tensors * 2000


def test_min_traffic_bytes_refuses_unknown_direction():
    with pytest.raises(ValueError, match="unknown direction 'sideways'"):
        g.min_traffic_bytes(10, 4, "sideways")


def test_default_plan_is_the_issue_and_runs_the_important_groups_first():
    plan = g.build_plan(g.Settings())
    kinds = Counter(group.case.name for group in plan)
    assert kinds == {g.RESNET: 12 * 2 * 3 * 2, g.FUSED: 4 * 2 * 3 * 2, g.BN1D: 3 * 3}
    assert plan[0] == g.Group(g.Case(g.RESNET, (256, 64, 112, 112), ("bn1",)), "bfloat16", g.NCHW, g.DIRECTIONS)
    dtypes = [group.dtype for group in plan]
    assert dtypes.index("float32") > len(dtypes) - 1 - dtypes[::-1].index("bfloat16")  # all bf16 first
    assert dtypes[-1] == "float16"
    per_setup = Counter()
    for group in plan:
        if group.case.name != g.BN1D:
            per_setup[(group.case.name, group.case.shape[0], group.dtype, group.layout)] += len(group.case.layers)
    assert set(per_setup.values()) == {53, 16} and len(per_setup) == 2 * 2 * 3 * 2
    fused = [group for group in plan if group.case.fused]
    assert all(name.endswith(".bn3") for group in fused for name in group.case.layers)
    assert all(group.directions == ("both",) for group in fused)
    assert {group.layout for group in plan if group.case.name == g.BN1D} == {g.NC}


def test_quick_plan_is_batch_256_bf16_fp32_forward_and_forward_backward_only():
    plan = g.build_plan(g.QUICK)
    assert len(plan) == 12 * 2 * 2 + 4 * 2 * 2 + 3 * 2
    assert {group.dtype for group in plan} == {"bfloat16", "float32"}
    assert {group.directions for group in plan if group.case.name != g.FUSED} == {("forward", "both")}
    assert {group.directions for group in plan if group.case.name == g.FUSED} == {("both",)}
    assert {group.case.shape[0] for group in plan if group.case.name != g.BN1D} == {256}


def test_estimate_counts_timings_and_compiles():
    plan = g.build_plan(g.QUICK)[:2]
    per_timing = (g.QUICK.warmup_ms + g.QUICK.rep_ms) / 1e3 + g.TIMING_OVERHEAD_S
    # 2 groups x 2 directions (forward, both), each timed from Python and from a CUDA graph, x 3 providers,
    # and a same-size copy per group and direction
    expected = (2 * 2 * 2 * 3 + 2 * 2) * per_timing + 2 * g.COMPILE_S_GUESS
    assert g.estimate_seconds(plan, g.QUICK) == pytest.approx(expected)
    no_compile = replace(g.QUICK, providers=(g.BNLAB, g.EAGER), graphs=False)
    assert g.estimate_seconds(plan, no_compile) == pytest.approx((2 * 2 * 2 + 2 * 2) * per_timing)


# ---- providers and timing ------------------------------------------------------------------------------


def test_compile_provider_is_static_shape_and_excludes_compile_time(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.update(kw, fn=fn) or fn)
    compiled, note = g.make_provider(g.COMPILE, compile_backend="inductor")
    assert seen == {"dynamic": False, "backend": "inductor", "fn": g.torch_bn} and compiled is g.torch_bn
    assert "compile time excluded" in note
    with pytest.raises(ValueError, match="unknown provider 'cudnn'"):
        g.make_provider("cudnn")


def test_compiled_provider_runs_every_direction_through_aot_autograd():
    # aot_eager traces forward and backward as inductor does (minus code generation): it catches what the
    # compiled backward refuses, such as retain_graph=True with donated buffers.
    settings = replace(CPU, providers=(g.EAGER, g.COMPILE), compile_backend="aot_eager")
    timer = g.make_timer("cpu")
    for group in (
        g.Group(g.Case(g.RESNET, (4, 3, 5, 5), ("a", "b")), "float32", g.CHANNELS_LAST, g.DIRECTIONS),
        g.Group(g.Case(g.FUSED, (4, 3, 5, 5), ("a",)), "float32", g.NCHW, ("both",)),
    ):
        rows = g.measure_group(group, settings, timer, copy_gbps=1.0)
        assert [(r.provider, r.direction) for r in rows] == [
            (p, d) for p in settings.providers for d in group.directions
        ]
        assert all(not r.error and r.median_us > 0 for r in rows), [r.error for r in rows]
        compiled = [r for r in rows if r.provider == g.COMPILE]
        assert all("compile time excluded (first call" in r.note and r.max_abs_diff < 1e-5 for r in compiled)


def test_bnlab_fused_provider_computes_relu_of_bn_plus_residual():
    fn, note = g.make_provider(g.BNLAB, backend="reference")
    gen = torch.Generator().manual_seed(1)
    x, z = torch.randn(6, 3, 4, 4, generator=gen), torch.randn(6, 3, 4, 4, generator=gen)
    w, b = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    stats = [(torch.zeros(3), torch.ones(3)) for _ in range(2)]
    got = fn(x, *stats[0], w, b, z)
    want = g.torch_bn(x, *stats[1], w, b, z)
    assert (want == 0).any() and torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(stats[0][0], stats[1][0], atol=1e-6)  # running statistics updated alike
    assert note == "" or g.FALLBACK_NOTE in note


class _FakeEvent:
    log: list

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.log.append("record")
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


class _FakeFlush:
    def __init__(self, log):
        self.log = log

    def zero_(self):
        self.log.append("flush")


def _busy(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_cuda_event_loop_flushes_before_each_call_and_leaves_setup_untimed(monkeypatch):
    log = []
    monkeypatch.setattr(_FakeEvent, "log", log, raising=False)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    setup = lambda: log.append("setup") or _busy(0.01) or "graph"  # noqa: E731
    seen = []
    fn = lambda arg: seen.append(arg) or log.append("fn") or _busy(0.001)  # noqa: E731
    seconds = g._event_median(fn, setup, _FakeFlush(log), warmup_ms=1.0, rep_ms=5.0)
    assert 0.001 <= seconds < 0.008  # the 10 ms setup is not in it
    assert log[-5:] == ["setup", "flush", "record", "fn", "record"]
    assert set(seen) == {"graph"} and log.count("fn") >= 1 + 5 + 1 + 3


def test_cpu_timer_leaves_setup_untimed():
    seconds = g.make_timer("cpu")(lambda arg: _busy(0.001) if arg == "ready" else None, lambda: _busy(0.01) or "ready")
    assert 0.001 <= seconds < 0.008


# ---- the whole pipeline on CPU -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    plan = g.build_plan(CPU, TOY_RESNET)
    rows, path = g.run_gpu_bench(CPU, tmp_path_factory.mktemp("gpubench"), plan=plan, log=QUIET)
    return plan, rows, path


def test_pipeline_times_every_group_provider_and_direction(cpu_run):
    plan, rows, _ = cpu_run
    assert len(rows) == sum(len(group.directions) for group in plan) * len(CPU.providers)
    assert not [r.error for r in rows if r.error]
    assert all(r.median_us > 0 and r.gbps > 0 and r.frac_of_copy > 0 for r in rows)
    for r in rows:
        numel = math.prod(int(n) for n in r.shape.split("x"))
        itemsize = 4 if r.dtype == "float32" else 2
        assert r.bytes == g.min_traffic_bytes(numel, itemsize, r.direction, r.case == g.FUSED)
        assert r.gbps == pytest.approx(r.bytes / r.median_us / 1e3)
        assert r.speedup_vs_eager == pytest.approx(1.0 if r.provider == g.EAGER else r.speedup_vs_best_torch)
    copy = [r.gbps / r.frac_of_copy for r in rows]
    assert max(copy) == pytest.approx(min(copy), rel=1e-9)  # one copy bandwidth for the whole run
    # one same-size copy per group and direction, shared by its providers' rows
    assert all(r.size_copy_us > 0 for r in rows)
    per_direction = {}
    for r in rows:
        per_direction.setdefault((r.case, r.shape, r.dtype, r.layout, r.direction), set()).add(r.size_copy_us)
    assert all(len(times) == 1 for times in per_direction.values())


def test_pipeline_bnlab_matches_torch_eager_on_outputs_and_gradients(cpu_run):
    _, rows, _ = cpu_run
    bnlab_rows = [r for r in rows if r.provider == g.BNLAB]
    assert {r.case for r in bnlab_rows} == {g.RESNET, g.FUSED, g.BN1D}
    # float32: torch's own rounding (the reference backend works in float64); 2 values per channel in places
    assert max(r.max_abs_diff for r in bnlab_rows if r.dtype == "float32") < 1e-3
    assert max(r.max_abs_diff for r in bnlab_rows) < 0.1  # bf16: a few units in the last place


def test_pipeline_csv_round_trips_with_provenance(cpu_run):
    _, rows, path = cpu_run
    assert path.name.startswith("gpu-cpu-") and path.suffix == ".csv"
    assert g.read_rows(path) == rows
    first = next(csv.DictReader(path.open()))
    assert {"gpu", "gpu_driver", "cuda", "triton", "torch", "git", "date", "copy_gbps"} <= first.keys()
    assert first["device"] == "cpu" and first["profile"] == "default"
    assert float(first["copy_gbps"]) == pytest.approx(rows[0].gbps / rows[0].frac_of_copy, rel=0.01, abs=0.1)


def test_pipeline_sums_cover_all_53_layers(cpu_run):
    _, rows, _ = cpu_run
    sums = g.per_iteration_sums(rows)
    assert len(sums) == 2 * 2 * 2 * 3 + 2 * 2 * 2  # dtype x layout x provider x direction, + fused (both only)
    assert all(s.complete for s in sums.values())
    key = (g.RESNET, 2, "float32", g.NCHW, "both", g.EAGER)
    want = sum(
        r.median_us * r.layers
        for r in rows
        if (r.case, r.dtype, r.layout, r.direction, r.provider) == (g.RESNET, *key[2:])
    )
    assert sums[key].total_us == pytest.approx(want) and sums[key].layers == 53
    text = g.format_sums(rows)
    assert "resnet50, batch 2: per-iteration sum over its 53 BN layers" in text
    assert "resnet50-bn-add-relu, batch 2" in text


def test_failing_provider_gives_error_rows_and_the_run_goes_on(tmp_path):
    settings = replace(CPU, backend="no-such-backend")
    plan = g.build_plan(settings, TOY_RESNET)[:2]
    rows, path = g.run_gpu_bench(settings, tmp_path, plan=plan, log=QUIET)
    assert len(rows) == 2 * 3 * 2
    assert all("unknown backend 'no-such-backend'" in r.error for r in rows if r.provider == g.BNLAB)
    assert all(not r.error and r.median_us > 0 for r in rows if r.provider == g.EAGER)
    assert all(r.speedup_vs_eager is None for r in rows if r.provider == g.BNLAB)
    assert g.read_rows(path) == rows


def test_a_failing_same_size_copy_leaves_the_providers_rows(tmp_path, monkeypatch):
    def no_memory(*args):
        raise torch.OutOfMemoryError("no room for the copy")

    monkeypatch.setattr(g, "same_bytes_copy_seconds", no_memory)
    plan = g.build_plan(CPU, TOY_RESNET)[:1]
    rows, _ = g.run_gpu_bench(CPU, tmp_path, plan=plan, log=QUIET)
    assert rows and all(not r.error and r.median_us > 0 and r.size_copy_us is None for r in rows)


@pytest.mark.skipif(
    not (bnlab.kernels.triton_installed() and bnlab.kernels.interpreting()),
    reason="the CPU pipeline runs the kernels in Triton's interpreter (TRITON_INTERPRET=1)",
)
def test_triton_rows_name_the_kernels_behind_them(tmp_path):
    settings = replace(CPU, backend="triton", dtypes=("float32",))
    plan = g.build_plan(settings, TOY_RESNET)[:1]
    rows, _ = g.run_gpu_bench(settings, tmp_path, plan=plan, log=QUIET)
    mine = [r for r in rows if r.provider == g.BNLAB]
    assert mine and all(not r.error for r in mine)
    assert all(r.note.startswith("forward ") and "; backward " in r.note for r in mine), mine[0].note
    assert all(r.note == "" for r in rows if r.provider == g.EAGER)


def test_warm_up_compiles_every_group_in_worker_processes_first(tmp_path):
    """--warm-jobs: the compiling providers run once per group in worker processes before the timed loop
    (filling the on-disk caches); a group that fails there is reported, and the timed loop still runs."""
    plan = g.build_plan(replace(CPU, dtypes=("float32",), bn1d_shapes=()), TOY_RESNET)[:2]
    settings = replace(CPU, providers=(g.BNLAB, g.EAGER), warm_jobs=2)
    assert g.warm_compile(plan, settings) == []
    bad = [replace(group, dtype="float64") for group in plan]  # the triton backend refuses float64
    errors = g.warm_compile(bad, replace(settings, backend="triton"))
    # (CPU tensors: in the interpreter the dtype is refused; on a GPU machine, the CPU device first)
    refusal = "float64 is not supported" if bnlab.kernels.interpreting() else "run on CUDA tensors"
    assert len(errors) == 2 and all(refusal in e for e in errors), errors
    lines = []
    rows, _ = g.run_gpu_bench(settings, tmp_path, plan=plan, log=lines.append)
    assert any(line.startswith("compiled every group's kernels in ") for line in lines)
    assert rows and not [r.error for r in rows if r.error]


def test_time_budget_records_the_rest_as_skipped(tmp_path):
    settings = replace(CPU, budget_s=-1.0)
    plan = g.build_plan(settings, TOY_RESNET)[:3]
    rows, path = g.run_gpu_bench(settings, tmp_path, plan=plan, log=QUIET)
    assert len(rows) == 3 * 3 * 2 and all(r.error == g.SKIPPED and r.median_us is None for r in rows)
    assert len(g.read_rows(path)) == len(rows)


# ---- the acceptance check on hand-made rows ------------------------------------------------------------


def _row(case, shape, names, dtype, layout, provider, us, frac=0.8, error="", note=""):
    return g.GpuRow(
        case=case, shape="x".join(map(str, shape)), dtype=dtype, layout=layout, direction="both",
        provider=provider, median_us=None if error else us, gbps=None, frac_of_copy=frac, speedup_vs_eager=None,
        speedup_vs_best_torch=None, error=error, layers=len(names), layer_names=";".join(names), bytes=0,
        max_abs_diff=0.0, note=note,
    )  # fmt: skip


def _results(bnlab=100.0, eager=300.0, compiled=150.0, fused_eager=200.0, batch=256):
    """Rows for both dtypes and layouts in which bnlab passes every criterion with the default numbers."""
    rows = []
    for dtype in ("bfloat16", "float32"):
        for layout in (g.NCHW, g.CHANNELS_LAST):
            for shape, names in g.distinct_shapes(g.resnet50_bn_shapes(batch)):
                for provider, us in ((g.BNLAB, bnlab), (g.EAGER, eager), (g.COMPILE, compiled)):
                    rows.append(_row(g.RESNET, shape, names, dtype, layout, provider, us))
            bn3 = [(n, s) for n, s in g.resnet50_bn_shapes(batch) if n.endswith("bn3")]
            for shape, names in g.distinct_shapes(bn3):
                for provider, us in ((g.BNLAB, 100.0), (g.EAGER, fused_eager)):
                    rows.append(_row(g.FUSED, shape, names, dtype, layout, provider, us))
    return rows


def _passed(rows):
    return [v.passed for v in g.acceptance(rows)]


def test_acceptance_passes_with_the_numbers():
    verdicts = g.acceptance(_results())
    assert [v.passed for v in verdicts] == [True, True, True]
    assert verdicts[0].detail.startswith("48/48 shapes pass; lowest 0.80 of copy")
    assert "batch 256 NCHW: 5.30 ms, 3.00x vs eager, 1.50x vs compile" in verdicts[1].detail
    assert verdicts[2].detail.startswith("16/16 cases pass; lowest 2.00x")
    assert "[PASS] 1." in g.format_acceptance(verdicts)


def _replace_first(rows, match, **changes):
    i = next(i for i, r in enumerate(rows) if match(r))
    return [*rows[:i], replace(rows[i], **changes), *rows[i + 1 :]]


def _is_bnlab_stem(r):
    return r.provider == g.BNLAB and r.layer_names == "bn1" and r.dtype == "float32"


def test_acceptance_1_fails_below_055_of_copy_bandwidth():
    rows = _replace_first(_results(), _is_bnlab_stem, frac_of_copy=0.54)
    assert _passed(rows) == [False, True, True]
    assert any("0.54 of copy," in f for f in g.acceptance(rows)[0].failures)
    # with a same-size copy on record the failure says what it reached (0.54 * 100 us / 60 us)
    rows = _replace_first(_results(), _is_bnlab_stem, frac_of_copy=0.54, size_copy_us=60.0)
    assert _passed(rows) == [False, True, True]
    assert any("0.54 of copy; a same-size copy 0.90," in f for f in g.acceptance(rows)[0].failures)
    assert _passed(_replace_first(_results(), _is_bnlab_stem, frac_of_copy=0.55)) == [True, True, True]


def test_acceptance_1_fails_when_more_than_5_percent_slower_than_the_faster_torch():
    rows = _replace_first(_results(), _is_bnlab_stem, median_us=150.0 / 0.94)  # compile is the faster torch
    assert _passed(rows) == [False, True, True]
    assert any("1.064x the faster torch" in f for f in g.acceptance(rows)[0].failures)
    assert _passed(_replace_first(_results(), _is_bnlab_stem, median_us=150.0 / 0.96)) == [True, True, True]


def test_acceptance_1_fails_on_an_error_or_a_missing_layer():
    failed = _replace_first(_results(), _is_bnlab_stem, error="RuntimeError: boom", median_us=None)
    assert _passed(failed)[0] is False
    assert any("RuntimeError: boom" in f for f in g.acceptance(failed)[0].failures)
    rows = _results()
    rows.remove(next(r for r in rows if r.provider == g.BNLAB and r.layers == 11 and r.dtype == "bfloat16"))
    assert _passed(rows) == [False, False, True]
    assert any("42/53 layers measured" in f for f in g.acceptance(rows)[0].failures)
    assert any("incomplete (bnlab-triton 42/53" in f for f in g.acceptance(rows)[1].failures)


@pytest.mark.parametrize(
    ("eager", "compiled", "passed"), [(190.0, 150.0, False), (300.0, 115.0, False), (200.0, 120.0, True)]
)
def test_acceptance_2_needs_2x_eager_and_1_2x_compile_on_the_bf16_sum(eager, compiled, passed):
    assert _passed(_results(eager=eager, compiled=compiled)) == [True, passed, True]


def test_acceptance_3_needs_1_5x_over_eager_and_a_real_fusion():
    assert _passed(_results(fused_eager=149.0)) == [True, True, False]
    assert _passed(_results(fused_eager=150.0)) == [True, True, True]
    rows = _replace_first(_results(), lambda r: r.case == g.FUSED and r.provider == g.BNLAB, note=g.FALLBACK_NOTE)
    assert _passed(rows) == [True, True, False]
    assert any("not fused" in f for f in g.acceptance(rows)[2].failures)


def test_acceptance_without_data_fails_every_criterion():
    verdicts = g.acceptance([])
    assert [(v.passed, v.detail) for v in verdicts] == [(False, "no data")] * 3


def test_speedups_use_eager_and_the_faster_of_eager_and_compile():
    group = g.Group(g.Case(g.RESNET, (2, 3, 4, 4), ("bn1",)), "float32", g.NCHW, ("both",))
    rows = [g._row(group, p, "both", 100.0, s) for p, s in ((g.BNLAB, 1e-4), (g.EAGER, 3e-4), (g.COMPILE, 2e-4))]
    got = {r.provider: (r.speedup_vs_eager, r.speedup_vs_best_torch) for r in g.with_speedups(rows)}
    want = {g.BNLAB: (3.0, 2.0), g.EAGER: (1.0, 2 / 3), g.COMPILE: (1.5, 1.0)}
    assert {p: pytest.approx(v) for p, v in want.items()} == got
    rows[2] = g._row(group, g.COMPILE, "both", 100.0, error="boom")
    got = {r.provider: (r.speedup_vs_eager, r.speedup_vs_best_torch) for r in g.with_speedups(rows)}
    assert got[g.BNLAB] == pytest.approx((3.0, 3.0)) and got[g.COMPILE] == (None, None)


# ---- command line --------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["bench", "--gpu"], ["bench", "--gpu", "--quick"]])
def test_cli_without_cuda_says_so_in_one_line(argv, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.fixture
def toy_plan(monkeypatch):
    build = g.build_plan

    def small(settings):
        return build(replace(settings, batches=(2,), dtypes=("float32",), bn1d_shapes=((16, 4),)), TOY_RESNET)

    monkeypatch.setattr(g, "build_plan", small)


def test_cli_runs_on_cpu_and_checks_its_csv(toy_plan, tmp_path, capsys):
    argv = ["bench", "--gpu", "--device", "cpu", "--providers", "bnlab-triton,torch-eager"]
    assert cli.main([*argv, "--bnlab-backend", "native", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (path,) = tmp_path.glob("gpu-cpu-*.csv")
    assert "resnet50, batch 2: per-iteration sum over its 53 BN layers" in out and "Acceptance check:" in out
    assert f"CSV: {path}" in out
    assert {r.provider for r in g.read_rows(path)} == {g.BNLAB, g.EAGER}
    assert cli.main(["bench", "--gpu", "--check", str(path)]) == 0
    assert "[FAIL] 2." in capsys.readouterr().out  # no torch.compile rows: no complete comparison
    assert cli.main(["bench", "--gpu", "--check", str(path), "--strict"]) == 1


def test_cli_check_strict_passes_on_passing_rows(tmp_path, capsys):
    path = bench.write_csv(_results(), tmp_path / "good.csv", record={"gpu": "test"})
    assert cli.main(["bench", "--gpu", "--check", str(path), "--strict"]) == 0
    assert capsys.readouterr().out.count("[PASS]") == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--gpu", "--check", "no-such.csv"], "No such file"),
        (["bench", "--gpu", "--device", "cpu", "--providers", "cudnn"], "--providers: unknown ['cudnn']"),
        (["bench", "--gpu", "--device", "cpu", "--warm-jobs", "-1"], "--warm-jobs must be 0 or more, got -1"),
    ],
)
def test_cli_gpu_refuses_bad_input(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_knobs_are_parsed_and_checked_against_the_kernels_defaults():
    texts = ["DIRECT_LAUNCH=True", "SMALL_TENSOR_L2=0.25", "TILE_BYTES = 16384"]
    texts.append("PROGRAMS_PER_SM={'planes': 4, 'rows': 4}")
    assert g.parse_knobs(texts) == (
        ("DIRECT_LAUNCH", True), ("SMALL_TENSOR_L2", 0.25), ("TILE_BYTES", 16384),
        ("PROGRAMS_PER_SM", {"planes": 4, "rows": 4}),
    )  # fmt: skip
    assert g.parse_knobs(["SMALL_TENSOR_L2=1"]) == (("SMALL_TENSOR_L2", 1),)  # (an int where a float goes)
    for text, message in [
        ("DIRECT_LAUNCH", "expected NAME=VALUE"),
        ("NO_SUCH=1", "not a knob of bnlab.kernels.batchnorm"),
        ("plan_for=1", "not a knob"),
        ("DIRECT_LAUNCH=maybe", "not a Python literal"),
        ("DIRECT_LAUNCH=1", "is a int, expected a bool"),
        ("TILE=True", "is a bool, expected a int"),
        ("SMALL_TENSOR_L2='a'", "is a str, expected a float"),
        ("PROGRAMS_PER_SM={'planes': 4}", "keys ['planes'], expected ['planes', 'rows']"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            g.parse_knobs([text])


def test_a_run_with_knobs_sets_them_records_them_and_restores_the_defaults(toy_plan, tmp_path, capsys, monkeypatch):
    K = bnlab.kernels.load()
    seen = []
    measure = g.measure_group
    monkeypatch.setattr(g, "measure_group", lambda *args: seen.append(K.TILE) or measure(*args))
    argv = ["bench", "--gpu", "--device", "cpu", "--providers", "bnlab-triton", "--bnlab-backend", "native"]
    assert cli.main([*argv, "--out", str(tmp_path), "--knob", "TILE=64", "--knob", "DIRECT_LAUNCH=False"]) == 0
    assert set(seen) == {64} and K.TILE == 4096 and K.DIRECT_LAUNCH is True
    (path,) = tmp_path.glob("gpu-cpu-*.csv")
    with path.open(newline="") as f:
        assert {line["knobs"] for line in csv.DictReader(f)} == {"TILE=64 DIRECT_LAUNCH=False"}
    assert "knobs set for this run: TILE=64 DIRECT_LAUNCH=False" in capsys.readouterr().err
    assert cli.main([*argv, "--knob", "TILE=big"]) == 2 and "--knob: knob TILE" in capsys.readouterr().err
    assert cli.main(["bench", "--gpu", "--check", str(path), "--knob", "DIRECT_LAUNCH=True"]) == 2
    assert cli.main(["bench", "--knob", "TILE=8192"]) == 2 and "--knob only with --gpu" in capsys.readouterr().err


def test_markdown_tables_give_the_sums_and_each_layer_beside_the_faster_torch(tmp_path, capsys):
    """--markdown: the README's tables, the sums (ms, speed-ups) and per layer bnlab's time, fraction of
    copy and speed-up over the faster torch; a layer bnlab has no time for shows "-", and so do its sums."""
    rows = _results()
    table = g.format_markdown(rows).splitlines()
    assert table[2] == "| bf16 | NCHW | 5.30 | 15.90 | 7.95 | 3.00x | 1.50x |"
    assert table[5] == "| fp32 | channels-last | 5.30 | 15.90 | 7.95 | 3.00x | 1.50x |"
    assert table[9] == "| 256x64x112x112 | 1 | " + " | ".join(["100 us, 0.80, 1.50x"] * 4) + " |"
    assert len(table) == 9 + 12
    broken = _replace_first(rows, lambda r: r.provider == g.BNLAB and r.dtype == "float32", error="boom")
    table = g.format_markdown(broken).splitlines()
    assert table[4] == "| fp32 | NCHW | - | 15.90 | 7.95 | - | - |"
    assert table[9].endswith("| 100 us, 0.80, 1.50x | - | 100 us, 0.80, 1.50x |")
    path = bench.write_csv(rows, tmp_path / "run.csv", record={"gpu": "test"})
    assert cli.main(["bench", "--gpu", "--check", str(path), "--markdown"]) == 0
    assert "| bf16 | channels-last | 5.30 | 15.90 | 7.95 | 3.00x | 1.50x |" in capsys.readouterr().out
    assert cli.main(["bench", "--markdown"]) == 2


def test_check_compares_bnlab_with_an_earlier_run(tmp_path, capsys):
    """--against: bnlab's rows and sums beside an earlier CSV's; a row whose plan note changed is marked."""
    before = bench.write_csv(_results(bnlab=100.0), tmp_path / "before.csv", record={"gpu": "test"})
    rows = _replace_first(_results(bnlab=80.0), lambda r: r.provider == g.BNLAB, note="other plans")
    after = bench.write_csv(rows, tmp_path / "after.csv", record={"gpu": "test"})
    assert cli.main(["bench", "--gpu", "--check", str(after), "--against", str(before)]) == 0
    out = capsys.readouterr().out
    comparison = out[out.index("bnlab-triton against the earlier run") :].splitlines()
    assert "(64 rows in both" in comparison[0]  # 48 layer rows and 16 fused ones
    assert comparison[1].endswith("100.0 ->       80.0 us  0.800 *")  # the first row: its note changed
    assert comparison[2].endswith("0.800") and "sum resnet50 batch 256 bfloat16 NCHW both: 5.300 -> 4.240 ms" in out
    assert "called from Python" not in out  # (these rows were not timed from Python)
    timed = [replace(r, stream_us=2 * r.median_us) for r in rows]
    timed = _replace_first(timed, lambda r: r.provider == g.BNLAB, stream_us=None)  # one missing: no sum
    early = [replace(r, stream_us=3 * r.median_us) for r in _results(bnlab=100.0)]
    text = g.format_comparison(timed, early)
    assert "sum resnet50 batch 256 bfloat16 channels_last both, called from Python: 15.900 -> 8.480 ms  0.533" in text
    assert "sum resnet50 batch 256 bfloat16 NCHW both, called from" not in text  # (a row short: no sum)
    assert text.count("called from Python") == 7  # (the 8 sums timed in graphs, but that one)
    assert cli.main(["bench", "--gpu", "--check", str(after), "--against", str(tmp_path / "none.csv")]) == 2
    assert "--against: [Errno 2] No such file" in capsys.readouterr().err
    assert cli.main(["bench", "--against", str(before)]) == 2  # (GPU bench only)


def test_check_refuses_a_csv_that_is_not_a_gpu_bench(tmp_path, capsys):
    path = tmp_path / "cpu.csv"
    path.write_text("case,shape,provider,median_us\nforward,60x100,torch,1.0\n")
    assert cli.main(["bench", "--gpu", "--check", str(path)]) == 2
    assert "not a bnlab GPU bench CSV (missing columns" in capsys.readouterr().err


def test_gpu_provenance_has_every_key_without_a_gpu(monkeypatch):
    from bnlab.provenance import gpu_provenance

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    record = gpu_provenance()
    assert set(record) == {"gpu", "gpu_capability", "gpu_memory_gib", "gpu_driver", "cuda", "cudnn", "triton"}
    assert record["gpu"] == record["gpu_driver"] == ""
    triton = pytest.importorskip("triton")
    assert record["triton"] == triton.__version__


# ---- on a GPU (not in CI): the CUDA paths, with every provider, on two small groups ---------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_pipeline_on_small_groups(tmp_path):
    settings = g.Settings(copy_bytes=2**28)  # every provider, bnlab on its triton backend, inductor
    names = ("layer4.1.bn3", "layer4.2.bn3")
    plan = [
        g.Group(g.Case(g.RESNET, (32, 2048, 7, 7), names), "bfloat16", g.CHANNELS_LAST, g.DIRECTIONS),
        g.Group(g.Case(g.FUSED, (32, 2048, 7, 7), names), "float32", g.NCHW, ("both",)),
    ]
    rows, path = g.run_gpu_bench(settings, tmp_path, plan=plan, log=print)
    assert not [(r.provider, r.direction, r.error) for r in rows if r.error]
    assert all(r.median_us > 0 and r.frac_of_copy > 0 and r.stream_us > 0 and r.size_copy_us > 0 for r in rows)
    # every provider's forward and forward+backward replay from a CUDA graph (backward alone cannot)
    assert {(r.direction, r.timing) for r in rows} == {("forward", "cuda-graph"), ("both", "cuda-graph"),
                                                      ("backward", "stream")}  # fmt: skip
    assert all(r.max_abs_diff < (0.1 if r.dtype == "bfloat16" else 1e-3) for r in rows)
    first = next(csv.DictReader(path.open()))
    assert first["gpu"] and first["cuda"] and first["device"].startswith("cuda")


def test_max_abs_diff_leaves_relu_mask_flips_out_of_the_gradients():
    """Fused cases (output, dx, dresidual): where relu's input is within rounding of zero the two sides may
    disagree on the mask; those elements are left out of the gradients' comparison, and counted."""
    y, ref_y = torch.tensor([0.0, 1e-3, 2.0]), torch.tensor([1e-3, 0.0, 2.0])
    dx, ref_dx = torch.tensor([0.0, 5.0, 1.0]), torch.tensor([5.0, 0.0, 1.25])
    assert g._max_abs_diff([y, dx, dx], [ref_y, ref_dx, ref_dx]) == (pytest.approx(0.25), 2)
    assert g._max_abs_diff([y, dx], [ref_y, ref_dx]) == (5.0, 0)  # plain BN: every element counts


def test_csvs_from_before_the_graph_timing_still_load(tmp_path):
    """Columns added later (timing, stream_us, size_copy_us) are optional when reading: the first H200 run's CSV lacks
    them; a column without a default is still required."""
    path = bench.write_csv(_results(), tmp_path / "new.csv", record={"gpu": "test"})
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, name in enumerate(header) if name not in ("timing", "stream_us", "size_copy_us")]
    old = tmp_path / "old.csv"
    old.write_text("\n".join(",".join(line.split(",")[i] for i in keep) for line in lines) + "\n")
    rows = g.read_rows(old)
    assert len(rows) == len(_results())
    assert all(r.timing == "" and r.stream_us is None and r.size_copy_us is None for r in rows)
    dropped = [i for i, name in enumerate(header) if name != "median_us"]
    (tmp_path / "bad.csv").write_text("\n".join(",".join(line.split(",")[i] for i in dropped) for line in lines))
    with pytest.raises(ValueError, match="missing columns median_us"):
        g.read_rows(tmp_path / "bad.csv")
