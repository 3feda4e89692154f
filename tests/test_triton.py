"""The Triton kernels against the reference backend: every pass, layout, dtype, flag and the fused epilogue.

Without a GPU they run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1), on small shapes;
with one, on the GPU. The shared parity tests (test_backends, test_nn, test_properties, ...) also run the
"triton" backend; this file covers what only it has: tiles and slices (shrunk here so that small inputs
cross many of them), the fused residual + ReLU, its determinism and its compiled form for real GPUs.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnlab import functional as BF
from bnlab import kernels
from bnlab.backends import triton_backend as TB
from helpers import make_input

pytest.importorskip("triton")

K = kernels.load()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# What a fused training step gives (`_training_step`), in order.
STEP_RESULTS = ("output", "dx", "dweight", "dbias", "dresidual", "running mean", "running var")


# The `tiling` fixture's settings (tests that take a subset name them with `indirect`).
TILINGS = ("default", "two-pass", "many-slices", "packed")


@pytest.fixture(params=TILINGS)
def tiling(request, monkeypatch):
    """The default plans (single-pass kernels for small planes-layout inputs), the two-pass kernels with
    default tiles (planes with 16 channels: grouped tiles), tiny tiles and many programs (split
    reductions, combined by the last program of each channel block a few partials at a time), or 64-lane
    tiles (planes: several samples' short runs packed in each, several tiles and slices per channel)."""
    if request.param != "default":
        monkeypatch.setattr(K, "SINGLE_TILE_MAX", 0)
    if request.param in ("many-slices", "packed"):
        monkeypatch.setattr(K, "TILE", 64 if request.param == "packed" else 8)
        # (the elementwise passes in slices of other lengths than the reductions', as on a GPU)
        monkeypatch.setattr(
            K, "_target_programs", lambda device, layout, elementwise=False, small=False: 24 if elementwise else 64
        )
        monkeypatch.setattr(K, "COMBINE_VALUES", 4)
    return request.param


def _operands(shape, layout, dtype, seed=0, offset=0.5):
    x = make_input(shape, layout, seed=seed, offset=offset).to(DEVICE, dtype)
    z = make_input(shape, layout, seed=seed + 1, offset=-0.3).to(DEVICE, dtype)
    dy = make_input(shape, "contiguous", seed=seed + 2, offset=0.0).to(DEVICE, dtype)
    C = shape[1]
    w = torch.linspace(0.5, 1.5, C, device=DEVICE)
    b = torch.linspace(-0.2, 0.3, C, device=DEVICE)
    return x, z, dy, w, b


def _run(backend, x, z, dy, w, b, *, training, activation, rm=None, rv=None, with_residual=True):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, z)]
    xl, wl, bl, zl = leaves
    y = BF.batch_norm(
        xl, rm, rv, wl, bl, training, 0.1, 1e-5, backend=backend, nonfinite="ignore",
        residual=zl if with_residual else None, activation=activation,
    )  # fmt: skip
    wanted = leaves if with_residual else leaves[:3]
    grads = torch.autograd.grad(y, wanted, dy)
    return y, grads


def _training_step_matches_reference(x, z, dy, w, b, with_residual=True):
    """A float32 training step through the triton backend (ReLU, the residual if `with_residual`): output,
    every gradient and the running statistics within tolerance of the reference backend's."""
    results = {}
    for backend in ("triton", "reference"):
        rm, rv = torch.zeros(x.shape[1], device=DEVICE), torch.ones(x.shape[1], device=DEVICE)
        y, grads = _run(backend, x, z, dy, w, b, training=True, activation="relu", rm=rm, rv=rv,
                        with_residual=with_residual)  # fmt: skip
        results[backend] = (y, *grads, rm, rv)
    names = [name for name in STEP_RESULTS if with_residual or name != "dresidual"]
    for name, ours, ref in zip(names, results["triton"], results["reference"], strict=True):
        _close(ours, ref, torch.float32, name)


def _close(ours, ref, dtype, what):
    tol = TOL[dtype]
    scale = ref.double().abs().max().item() + 1.0
    err = (ours.double() - ref.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


FUSED_SHAPES = [(5, 3), (4, 3, 5), (21, 3, 7), (5, 16, 3), (3, 4, 5, 6), (2, 3, 3, 2, 5)]  # (5, 16, 3): grouped


@pytest.mark.parametrize("training", [True, False])
def test_every_split_launch_asks_for_a_power_of_two_of_warps(monkeypatch, training):
    """Triton refuses to compile for a GPU with a warp count that is not a power of two (the interpreter
    ignores it): inference's backward of a single-tile plan runs a split reduction over that plan, which has
    no reduction warps of its own (0 reached the GPU in session 11)."""
    asked = []
    launch = K._launch

    def recorded(kernel, plan, device, args_of, options_of, flags=()):
        asked.append((kernel.fn.__name__, options_of(plan, *flags)["num_warps"]))
        return launch(kernel, plan, device, args_of, options_of, flags)

    monkeypatch.setattr(K, "_launch", recorded)
    x, z, dy, w, b = _operands((6, 3, 5, 5), "contiguous", torch.float32)
    assert K.make_plan(x, K.layout_of(x)).single  # (the case that reached the GPU with 0 warps)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    _run("triton", x, z, dy, w, b, training=training, activation="relu", rm=rm, rv=rv)
    assert training or asked, "inference's backward launched no split pass"
    for name, warps in asked:
        assert warps >= 1 and warps & (warps - 1) == 0, f"{name}: num_warps={warps}"


@pytest.mark.parametrize(
    ("tiling", "shape", "layout", "activation", "with_residual"),
    [
        (tiling, s, layout, act, res)
        for tiling in TILINGS
        for s in FUSED_SHAPES
        for layout in (["contiguous", "channels_last"] if len(s) >= 4 else ["contiguous"])
        for act, res in [("relu", True), ("relu", False), (None, True)]
        # (many slices, the slowest in the interpreter, test the combines of many partials: the epilogue
        # with the residual and ReLU and the one without the residual cover both backward paths there;
        # the residual without ReLU adds nothing those do not)
        if tiling != "many-slices" or act == "relu"
    ],
    indirect=["tiling"],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None,
)
@pytest.mark.parametrize("training", [True, False])
def test_fused_epilogue_matches_the_composed_reference(tiling, shape, layout, activation, with_residual, training):
    x, z, dy, w, b = _operands(shape, layout, torch.float32)
    rm, rv = torch.linspace(-0.5, 0.5, shape[1], device=DEVICE), torch.linspace(0.5, 2.0, shape[1], device=DEVICE)
    stats = {}
    outs = {}
    for backend in ("triton", "reference"):
        stats[backend] = (rm.clone(), rv.clone())
        outs[backend] = _run(
            backend, x, z, dy, w, b, training=training, activation=activation,
            rm=stats[backend][0], rv=stats[backend][1], with_residual=with_residual,
        )  # fmt: skip
    (y_t, g_t), (y_r, g_r) = outs["triton"], outs["reference"]
    _close(y_t, y_r, torch.float32, "output")
    assert y_t.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
    for name, a, r in zip(("dx", "dweight", "dbias", "dresidual"), g_t, g_r, strict=False):
        _close(a, r, torch.float32, name)
    for a, r in zip(stats["triton"], stats["reference"], strict=True):
        _close(a, r, torch.float32, "running statistics")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_precision_inputs_keep_float32_statistics(tiling, dtype, layout):
    shape = (6, 5, 4, 3)
    x, z, dy, w, b = _operands(shape, layout, dtype, offset=3.0)
    rm, rv = torch.zeros(5, device=DEVICE), torch.ones(5, device=DEVICE)
    y, grads = _run("triton", x, z, dy, w, b, training=True, activation="relu", rm=rm, rv=rv)
    # The reference computes half inputs in float32: the same arithmetic, other rounding.
    rm_r, rv_r = torch.zeros(5, device=DEVICE), torch.ones(5, device=DEVICE)
    y_r, grads_r = _run("reference", x, z, dy, w, b, training=True, activation="relu", rm=rm_r, rv=rv_r)
    assert y.dtype == dtype and all(g.dtype == t.dtype for g, t in zip(grads, (x, w, b, z), strict=True))
    _close(y, y_r, dtype, "output")
    for name, a, r in zip(("dx", "dweight", "dbias", "dresidual"), grads, grads_r, strict=True):
        _close(a, r, dtype, name)
    assert rm.dtype == torch.float32
    _close(rm, rm_r, torch.float32, "running mean")  # statistics are float32 sums of the same half values
    _close(rv, rv_r, torch.float32, "running var")


def test_half_precision_parameters_and_running_statistics_are_accepted():
    x = make_input((8, 3, 4), seed=3).to(DEVICE, torch.bfloat16)
    w, b = torch.ones(3, device=DEVICE, dtype=torch.bfloat16), torch.zeros(3, device=DEVICE, dtype=torch.bfloat16)
    rm, rv = torch.zeros(3, device=DEVICE, dtype=torch.bfloat16), torch.ones(3, device=DEVICE, dtype=torch.bfloat16)
    y = BF.batch_norm(x, rm, rv, w, b, True, 0.5, 1e-5, backend="triton")
    mean = x.float().mean((0, 2))
    assert y.dtype == torch.bfloat16 and rm.dtype == torch.bfloat16
    torch.testing.assert_close(rm.float(), 0.5 * mean, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_split_reductions_are_deterministic(monkeypatch, layout):
    monkeypatch.setattr(K, "SINGLE_TILE_MAX", 0)
    monkeypatch.setattr(K, "TILE", 8)
    monkeypatch.setattr(K, "_target_programs", lambda device, layout, elementwise=False, small=False: 64)
    x, z, dy, w, b = _operands((7, 3, 5, 3), layout, torch.float32)
    first = _run("triton", x, z, dy, w, b, training=True, activation="relu")
    again = _run("triton", x, z, dy, w, b, training=True, activation="relu")
    assert torch.equal(first[0], again[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], again[1], strict=True))


def test_split_reductions_leave_their_counters_at_zero(monkeypatch):
    """The last program of each channel block zeroes its counters again, so that one buffer serves every
    launch on a stream (on a GPU the cached per-stream buffer; here a shared one put in its place): a
    counter left at k would make a later launch finalize too early, from partials not yet written."""
    monkeypatch.setattr(K, "SINGLE_TILE_MAX", 0)
    monkeypatch.setattr(K, "TILE", 8)
    monkeypatch.setattr(K, "_target_programs", lambda device, layout, elementwise=False, small=False: 64)
    shared = torch.zeros(1024, dtype=torch.int32, device=DEVICE)
    if DEVICE == "cpu":
        monkeypatch.setattr(K, "_semaphores", lambda device, count: shared)
    for layout in ("contiguous", "channels_last"):
        x, z, dy, w, b = _operands((7, 3, 5, 3), layout, torch.float32)
        assert K.make_plan(x, K.layout_of(x)).splits > 1
        expected = _run("reference", x, z, dy, w, b, training=True, activation="relu")
        for _ in range(2):  # the second run starts from the counters that the first one left
            y, grads = _run("triton", x, z, dy, w, b, training=True, activation="relu")
            _close(y, expected[0], torch.float32, "output")
            for name, a, r in zip(("dx", "dweight", "dbias", "dresidual"), grads, expected[1], strict=True):
                _close(a, r, torch.float32, name)
    buffers = [shared] if DEVICE == "cpu" else list(K._SEMAPHORES.values())
    assert buffers and all(int(buf.count_nonzero()) == 0 for buf in buffers)


def test_graph_counters_give_each_captured_reduction_zeroed_counters_of_its_own():
    """The reserve for captured graphs: slices that never overlap (a graph keeps the addresses it was
    captured with), all zero, 16-byte aligned like a buffer of their own (Triton compiles a variant per
    pointer alignment, and a capture cannot compile), topped up only when less than half a slab is left
    and never beyond its limit; then it gives nothing, and the capture zeroes counters of its own."""
    reserve = K.GraphCounters(slab=128, limit=256)
    cpu = torch.device("cpu")
    assert reserve.take(cpu, 1) is None and reserve.left(cpu) == 0  # nothing set aside before an eager call
    reserve.top_up(cpu)
    taken = [reserve.take(cpu, count) for count in (10, 20)]
    assert [t.numel() for t in taken] == [10, 20] and reserve.left(cpu) == 128 - 2 * 32
    reserve.top_up(cpu)  # half left: nothing allocated
    assert len(reserve._slabs) == 1
    taken.append(reserve.take(cpu, 30))
    spans = sorted((t.data_ptr(), t.data_ptr() + 4 * t.numel()) for t in taken)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    assert all(t.dtype == torch.int32 and int(t.count_nonzero()) == 0 for t in taken)
    assert all(t.data_ptr() % 16 == 0 for t in taken)
    assert reserve.take(cpu, 33) is None and reserve.left(cpu) == 32  # (what is left stays for smaller ones)
    reserve.top_up(cpu)  # less than half left: a second slab
    assert reserve.left(cpu) == 128 and len(reserve._slabs) == 2
    assert reserve.take(cpu, 100) is not None and reserve.left(cpu) == 0
    reserve.top_up(cpu)  # a third slab would pass the limit of 256
    assert len(reserve._slabs) == 2 and reserve.take(cpu, 1) is None


def test_counters_of_a_captured_reduction_come_from_the_reserve(monkeypatch):
    """Wiring, with stand-ins for the GPU: a reduction being captured takes its counters from the reserve
    (no fill kernel recorded in the graph); an eager one uses its stream's buffer and tops the reserve up."""
    gpu = torch.device("cuda", 0)
    reserve = K.GraphCounters(slab=100, limit=100)
    reserve._free[gpu] = stand_in = torch.zeros(100, dtype=torch.int32)
    monkeypatch.setattr(K, "_GRAPH_COUNTERS", reserve)
    monkeypatch.setattr(K, "_capturing", lambda device: True)
    first, second = K._semaphores(gpu, 30), K._semaphores(gpu, 30)
    assert first.data_ptr() == stand_in.data_ptr() and second.data_ptr() == stand_in[32:].data_ptr()
    topped = []
    monkeypatch.setattr(K, "_capturing", lambda device: False)
    monkeypatch.setattr(reserve, "top_up", topped.append)
    monkeypatch.setattr(K, "_raw_stream", lambda index: 7)
    monkeypatch.setitem(K._SEMAPHORES, (0, 7), stream_buffer := torch.zeros(1024, dtype=torch.int32))
    assert K._semaphores(gpu, 30) is stream_buffer and topped == [gpu]
    kept = []
    monkeypatch.setattr(K, "_kept_zeros", lambda count, device: kept.append((count, device)) or torch.zeros(count))
    monkeypatch.setattr(K, "_raw_stream", lambda index: 8)  # (a stream without counters yet: kept ones)
    assert K._semaphores(gpu, 30).numel() == 1024 and kept == [(1024, gpu)] and (0, 8) in K._SEMAPHORES
    K._SEMAPHORES.pop((0, 8))


def test_kept_counters_are_allocated_off_the_calling_thread(monkeypatch):
    """While inductor's CUDA-graph trees warm a graph up they route the calling thread's allocations into
    their private pool, which refuses blocks still alive after the call (a stream's counters were, on the
    H200): counters kept past the call are made on another thread, zeroed, and its errors reach the caller."""
    import threading

    threads, zeros = [], torch.zeros

    def recorded(*args, **kwargs):
        threads.append(threading.get_ident())
        return zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", recorded)
    kept = K._kept_zeros(5, torch.device("cpu"))
    assert threads and threading.get_ident() not in threads
    assert kept.dtype == torch.int32 and kept.tolist() == [0] * 5

    def failing(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (stand-in)")

    monkeypatch.setattr(torch, "zeros", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        K._kept_zeros(5, torch.device("cpu"))


def test_large_offset_statistics_do_not_cancel(tiling):
    _check_large_offset(channels=3)


@pytest.mark.parametrize("single_tile", [True, False], ids=["single-tile", "grouped"])
def test_large_offset_statistics_do_not_cancel_in_single_tile_and_grouped_plans(monkeypatch, single_tile):
    """16 channels: the single-pass kernel (its mean was 1.3 ulp off here before it was taken relative to
    the channel's first value), or grouped tiles (16 channels a program)."""
    if not single_tile:
        monkeypatch.setattr(K, "SINGLE_TILE_MAX", 0)
    _check_large_offset(channels=16)


@pytest.mark.parametrize("shape", [(20, 16, 3, 3), (9, 24, 5, 5)], ids=["16-channel-groups", "8-channel-groups"])
def test_grouped_sums_by_gather_match_the_reference(monkeypatch, shape):
    """GATHER_GROUPED_SUMS: the reductions of grouped planes sum their lanes per channel through a gather
    into [channels, W] rows instead of a segmented scan (on by default since session 17), and off. A
    training step (several tiles a slice, several slices) matches the reference every way, and the
    large-offset statistics keep their digits."""
    monkeypatch.setattr(K, "SINGLE_TILE_MAX", 0)
    monkeypatch.setattr(K, "TILE", 512)
    monkeypatch.setattr(K, "_target_programs", lambda device, layout, elementwise=False, small=False: 6)
    x, z, dy, w, b = _operands(shape, "contiguous", torch.float32)
    plan = K.make_plan(x, K.PLANES)
    assert plan.group == (16 if shape[1] == 16 else 8) and plan.splits > 1 and plan.per_split > 1
    for gather in (True, False):
        monkeypatch.setattr(K, "GATHER_GROUPED_SUMS", gather)
        assert K._block_args(plan, reduction=True)["GATHER_SUMS"] is gather
        _training_step_matches_reference(x, z, dy, w, b)
    rows = K.plan_for(K.ROWS, 8, 64, 9, target_programs=4)
    assert K._block_args(rows, reduction=True)["GATHER_SUMS"] is False
    _check_large_offset(channels=16)


def _combine_late(monkeypatch, on: bool = True) -> None:
    """LATE_COMBINE set for every layout and value size (the defaults: 2-byte planes only)."""
    for name in ("LATE_COMBINE", "LATE_COMBINE_FLOAT32"):
        monkeypatch.setattr(K, name, {K.PLANES: on, K.ROWS: on})


@pytest.mark.parametrize("case", ["nchw-one-group", "channels-last-groups"])
def test_late_combine_matches_the_reference(monkeypatch, case):
    """LATE_COMBINE: the reductions leave their last combine level to the elementwise passes, whose
    programs each combine their channels' partial rows and whose slice 0 stores the statistics (with the
    running ones) and the parameters' gradients. NCHW grouped planes whose slices are one group (the
    reductions combine nothing, use no counter), and channels-last reductions in blocks narrower than the
    elementwise passes' with several groups of slices (the groups' rows are combined late): a training
    step with a residual and ReLU matches the reference, bit for bit again when repeated, the counters
    are left at zero; a backward for the parameters alone (no elementwise pass) combines in the reduction."""
    monkeypatch.setattr(K, "SINGLE_TILE_MAX", 0)
    _combine_late(monkeypatch)
    targets = {"nchw-one-group": (6, 10), "channels-last-groups": (16, 7)}[case]
    monkeypatch.setattr(
        K, "_target_programs", lambda device, layout, elementwise=False, small=False: targets[elementwise]
    )
    if case == "nchw-one-group":
        monkeypatch.setattr(K, "TILE", 512)
        x, z, dy, w, b = _operands((9, 24, 5, 5), "contiguous", torch.float32)
    else:
        monkeypatch.setattr(K, "TILE", 32)
        monkeypatch.setattr(K, "ROWS_BLOCK_BYTES", 64)  # (float32: elementwise blocks of 16 channels)
        for knob in ("REDUCTION_ROWS_BLOCK_CHANNELS", "SMALL_REDUCTION_ROWS_BLOCK_CHANNELS"):  # (a GPU: small)
            monkeypatch.setattr(K, knob, 4)
        monkeypatch.setattr(K, "COMBINE_VALUES", 8)  # (groups of 2 slices)
        x, z, dy, w, b = _operands((7, 12, 5, 3), "channels_last", torch.float32)
    plan = K.make_plan(x, K.layout_of(x))
    first, rows = K._late_rows(plan, x.element_size())
    if case == "nchw-one-group":
        assert plan.group == 8 and plan.splits > 1 and (first, rows) == (0, plan.splits)
    else:
        assert (plan.block_b, plan.apply.block_b) == (4, 16) and (first, rows) == (plan.splits, -(-plan.splits // 2))
    assert "last combine in normalize" in K.describe_plans(x) and "last combine in dx" in K.describe_plans(x)
    shared = torch.zeros(1024, dtype=torch.int32, device=DEVICE)
    if DEVICE == "cpu":
        monkeypatch.setattr(K, "_semaphores", lambda device, count: shared)
    _training_step_matches_reference(x, z, dy, w, b)
    first_run = _run("triton", x, z, dy, w, b, training=True, activation="relu")
    again = _run("triton", x, z, dy, w, b, training=True, activation="relu")
    assert all(torch.equal(a, b) for a, b in zip((first_run[0], *first_run[1]), (again[0], *again[1]), strict=True))
    if DEVICE == "cpu":
        assert int(shared.count_nonzero()) == 0
    params = {}
    for backend in ("triton", "reference"):
        wl, bl = (t.detach().clone().requires_grad_(True) for t in (w, b))
        y = BF.batch_norm(x, None, None, wl, bl, True, 0.1, 1e-5, backend=backend, activation="relu")
        params[backend] = torch.autograd.grad(y, (wl, bl), dy)
    for name, ours, ref in zip(("dweight", "dbias"), params["triton"], params["reference"], strict=True):
        _close(ours, ref, torch.float32, f"{name} (parameters alone)")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_statistics_prefetched_in_registers_match_the_reference(monkeypatch, layout):
    """STATS_PREFETCH: the statistics' loop loads the next tile before the current tile's arithmetic (slices
    of 1 to several tiles here, the last tile of a slice prefetching nothing); the batch statistics (the
    output, the running ones) match the reference, and a large common offset keeps its digits."""
    monkeypatch.setattr(K, "SINGLE_TILE_MAX", 0)
    monkeypatch.setattr(K, "TILE", 16)
    for name in ("STATS_PREFETCH", "STATS_PREFETCH_FLOAT32"):
        monkeypatch.setattr(K, name, {K.PLANES: True, K.ROWS: True})
    monkeypatch.setattr(K, "_target_programs", lambda device, layout, elementwise=False, small=False: 6)
    x, *_ = _operands((7, 3, 5, 3), layout, torch.float32)
    plan = K.make_plan(x, K.layout_of(x))
    assert plan.per_split > 2 and plan.tiles % plan.per_split and K._stats_stages(plan, 4) == 1
    outputs = {}
    for backend in ("triton", "reference"):
        rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
        y = BF.batch_norm(x, rm, rv, None, None, True, 0.5, 1e-5, backend=backend)
        outputs[backend] = (y, rm, rv)
    for name, ours, ref in zip(("output", "running mean", "running var"), *outputs.values(), strict=True):
        _close(ours, ref, torch.float32, name)
    _check_large_offset(channels=3)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_second_reads_with_an_eviction_hint_match_the_reference(monkeypatch, layout):
    """SECOND_READ_EVICTION: normalize's and dx's loads of their inputs (x, the residual, dy) with an
    eviction policy; a training step with a residual and ReLU through the split kernels matches the
    reference (the interpreter ignores the hint: this checks that every load gets a policy it accepts and
    that the argument reaches the kernels; on a GPU the bits are compared with the hint off)."""
    monkeypatch.setattr(K, "SINGLE_TILE_MAX", 0)
    monkeypatch.setattr(K, "SECOND_READ_EVICTION", "evict_first")
    seen = []
    launch = K._launch
    monkeypatch.setattr(K, "_launch", lambda kernel, plan, device, args_of, options_of, flags=(): seen.append(
        options_of(plan, *flags).get("EVICT")) or launch(kernel, plan, device, args_of, options_of, flags))  # fmt: skip
    x, z, dy, w, b = _operands((6, 5, 4, 3), layout, torch.float32)
    _training_step_matches_reference(x, z, dy, w, b)
    assert seen == [None, "evict_first", None, "evict_first"]  # (statistics, normalize, gradient sums, dx)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_second_reads_with_an_eviction_hint_give_the_same_bits(monkeypatch, layout):
    """SECOND_READ_EVICTION changes where lines stay, not what is computed: bit for bit the same step."""
    x, z, dy, w, b = _operands((64, 256, 14, 14), layout, torch.bfloat16)
    step = _training_step(x, z, dy, w, b)
    want = step()
    monkeypatch.setattr(K, "SECOND_READ_EVICTION", "evict_first")
    for name, ours, ref in zip(STEP_RESULTS, step(), want, strict=True):
        assert torch.equal(ours, ref), name


def _check_large_offset(channels):
    # 1e4 + N(0, 1) in float32: E[x^2] - E[x]^2 would lose every digit of the variance; Chan's update keeps them.
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(64, channels, 17, generator=gen, dtype=torch.float64) + 1e4
    x = x64.float().to(DEVICE)
    rm, rv = torch.zeros(channels, device=DEVICE), torch.zeros(channels, device=DEVICE)
    y = BF.batch_norm(x, rm, rv, None, None, True, 1.0, 1e-5, backend="triton")
    x32 = x.double().cpu()  # the values the kernel saw
    true_mean, true_var = x32.mean((0, 2)), x32.var((0, 2))
    assert (rm.double().cpu() - true_mean).abs().max() < 1e-3  # within one float32 ulp at 1e4 (9.8e-4)
    assert ((rv.double().cpu() - true_var) / true_var).abs().max() < 1e-4
    expected = (x32 - x32.mean((0, 2), keepdim=True)) / (x32.var((0, 2), correction=0, keepdim=True) + 1e-5).sqrt()
    assert (y.double().cpu() - expected).abs().max() < 5e-3


def test_dy_in_another_layout_than_x_is_handled():
    x, z, dy, w, b = _operands((3, 4, 5, 2), "channels_last", torch.float32)
    assert dy.is_contiguous() and not x.is_contiguous()
    _, g_t = _run("triton", x, z, dy, w, b, training=True, activation="relu")
    _, g_r = _run("reference", x, z, dy, w, b, training=True, activation="relu")
    for a, r in zip(g_t, g_r, strict=True):
        _close(a, r, torch.float32, "grad")


def test_inference_without_grad_reads_the_running_statistics_directly():
    x = make_input((4, 3, 5)).to(DEVICE)
    rm, rv = torch.tensor([0.1, -0.2, 0.3], device=DEVICE), torch.tensor([0.5, 2.0, 1.0], device=DEVICE)
    y, mean, invstd = K.forward(
        x, None, None, rm, rv, training=False, momentum=0.0, eps=1e-5, save_stats=False
    )  # fmt: skip
    assert mean is None and invstd is None
    expected = (x - rm[:, None]) / (rv[:, None] + 1e-5).sqrt()
    torch.testing.assert_close(y, expected)


def test_only_the_requested_gradients_are_computed():
    x = make_input((6, 3)).to(DEVICE)
    w = torch.ones(3, device=DEVICE, requires_grad=True)
    y = BF.batch_norm(x, None, None, w, None, True, 0.1, 1e-5, backend="triton")
    (dw,) = torch.autograd.grad(y, [w], torch.ones_like(y))
    torch.testing.assert_close(dw, torch.zeros(3, device=DEVICE), atol=1e-5, rtol=0)  # sum of x_hat is 0


# (not many slices: the property is the two backward paths' arithmetic, not the combine; packed tiles
# cross several slices too, at a fifth of the interpreter's time)
@pytest.mark.parametrize("tiling", [t for t in TILINGS if t != "many-slices"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("training", [True, False])
def test_dx_is_the_same_bits_whether_or_not_the_residual_gradient_is_wanted(tiling, dtype, training):
    """With the residual's gradient wanted, the split backward's sums pass writes it (dz = g) and dx is
    computed from it; without, from dy, x and the residual through the recomputed mask: the same numbers
    (g is exact in dy's dtype), bit for bit."""
    x, z, dy, w, b = _operands((6, 16, 3, 5), "contiguous", dtype)
    dxs = []
    for want_dz in (True, False):
        xl, zl = x.clone().requires_grad_(True), z.clone().requires_grad_(want_dz)
        rm, rv = torch.zeros(16, device=DEVICE), torch.ones(16, device=DEVICE)
        y = BF.batch_norm(xl, rm, rv, w, b, training, 0.1, 1e-5, backend="triton", residual=zl, activation="relu")
        grads = torch.autograd.grad(y, [xl, zl] if want_dz else [xl], dy)
        dxs.append(grads[0])
        if want_dz:
            torch.testing.assert_close(grads[1], torch.where(y > 0, dy, 0.0), atol=0, rtol=0)
    assert torch.equal(dxs[0], dxs[1])


# A gradient penalty's second derivatives (create_graph=True): the kernels' backward is not differentiable,
# so the backend's gradients then come from torch ops; they must agree with torch's own batch norm.
SECOND_DERIVATIVE_CASES = {
    # name: (shape, layout, dtype, training, affine, residual + ReLU ("x": x itself), ghost batch size)
    "plain": ((6, 3), "contiguous", torch.float32, True, False, False, None),
    "affine-residual-relu": ((4, 3, 2, 5), "channels_last", torch.float32, True, True, True, None),
    "ghosts-in-place": ((8, 3, 5), "contiguous", torch.float32, True, True, False, 4),
    "inference": ((4, 3, 2, 2), "contiguous", torch.float32, False, True, True, None),
    "x-as-its-own-residual": ((5, 3, 4), "contiguous", torch.float32, True, True, "x", None),
    "bfloat16": ((6, 4, 3), "contiguous", torch.bfloat16, True, True, False, None),
}


def _penalty_gradients(backend, operands, training, affine, epilogue, ghost):
    """dx with create_graph=True, then the gradients of a loss holding dx (a gradient penalty)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in operands]
    x, w, b, z = leaves
    rm, rv = torch.zeros_like(w, dtype=torch.float32), torch.full_like(w, 1.5, dtype=torch.float32)
    kwargs = dict(weight=w if affine else None, bias=b if affine else None, training=training, backend=backend)
    if epilogue:
        kwargs.update(residual=x if epilogue == "x" else z, activation="relu")
    if ghost is not None:
        y = BF.ghost_batch_norm(x, rm, rv, ghost_batch_size=ghost, **kwargs)
    else:
        y = BF.batch_norm(x, rm, rv, **kwargs)
    # The penalty's incoming gradient (c1 + y) depends on x: dx must be differentiated again.
    c1, c2, c3 = (torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y).roll(i) for i in range(3))
    (dx,) = torch.autograd.grad((y.float() * (c1 + 0.5 * y.float())).sum(), x, create_graph=True)
    loss = (dx.float() * c2).sum() + (y.float() * c3).sum()
    used = [t for t, on in zip(leaves, (True, affine, affine, epilogue is True), strict=True) if on]
    return (dx, *torch.autograd.grad(loss, used))


@pytest.mark.parametrize("case", list(SECOND_DERIVATIVE_CASES))
def test_second_derivatives_match_torchs_batch_norm(case, monkeypatch):
    shape, layout, dtype, training, affine, epilogue, ghost = SECOND_DERIVATIVE_CASES[case]
    x, z, _, w, b = _operands(shape, layout, dtype)
    flags = (training, affine, epilogue, ghost)
    with monkeypatch.context() as patch:
        if ghost is not None:  # the kernels must read the ghosts in place (the copy path calls them with ghosts=1)
            patch.setattr(BF, "_ghosts_side_by_side", _refusing("ghosts laid side by side"))
        got = _penalty_gradients("triton", (x, w, b, z), *flags)
    want = _penalty_gradients("native", (x, w, b, z), *flags)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for g, ref in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), ref.float(), **tol)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_forwards_without_a_graph_skip_the_autograd_function(training, monkeypatch):
    """Evaluation, torch.no_grad and frozen inputs launch the kernels without Function.apply (its bookkeeping
    was ~20 us of a ~50 us stubbed call on the dev VM): the same output bits and running statistics as
    through the Function, and the Function still records a graph whenever an input requires grad."""
    x, z, _, w, b = _operands((5, 16, 3, 2), "channels_last", torch.bfloat16)
    kwargs = dict(training=training, backend="triton", residual=z, activation="relu")
    stats = [(torch.full((16,), 0.2, device=DEVICE), torch.full((16,), 1.5, device=DEVICE)) for _ in range(3)]
    recorded = BF.batch_norm(x, *stats[0], w.requires_grad_(True), b, **kwargs)
    assert recorded.grad_fn is not None
    with monkeypatch.context() as patch:
        patch.setattr(TB._FusedBatchNorm, "apply", _refusing("Function.apply called: nothing here needs a graph"))
        with torch.no_grad():
            direct = BF.batch_norm(x, *stats[1], w, b, **kwargs)
        frozen = BF.batch_norm(x, *stats[2], w.detach(), b, **kwargs)
    for out, (mean, var) in zip((direct, frozen), stats[1:], strict=True):
        assert torch.equal(out, recorded) and out.stride() == recorded.stride() and not out.requires_grad
        assert torch.equal(mean, stats[0][0]) and torch.equal(var, stats[0][1])


def test_errors_name_the_problem():
    x = make_input((4, 3)).to(DEVICE)
    with pytest.raises(TypeError, match=r"float64 is not supported.*reference"):
        BF.batch_norm(x.double(), None, None, training=True, backend="triton")
    with pytest.raises(ValueError, match="bn7: residual has shape"):
        BF.batch_norm(x, None, None, training=True, backend="triton", residual=x[:2], layer="bn7")
    with pytest.raises(ValueError, match="bn7: activation='gelu'"):
        BF.batch_norm(x, None, None, training=True, backend="triton", activation="gelu", layer="bn7")
    huge = torch.zeros(1, 2, device=DEVICE).expand(2**31, 2)  # a view: 2**31 values per channel, no memory
    with pytest.raises(ValueError, match=r"2147483648 values per channel.*backend='native'"):
        BF.batch_norm(huge, None, None, training=True, backend="triton", nonfinite="ignore")


def test_without_gpu_or_interpreter_the_backend_says_how_to_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = kernels.unavailable_reason("cpu")
    assert "CUDA tensors" in reason and "TRITON_INTERPRET=1" in reason
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="backend 'triton': the Triton kernels run on CUDA tensors"):
            BF.batch_norm(make_input((4, 3)), None, None, training=True, backend="triton")


def test_empty_batch_gives_an_empty_output():
    x = torch.empty(0, 3, 4, device=DEVICE)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    y = BF.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5, backend="triton", activation="relu")
    assert y.shape == x.shape
    assert torch.equal(rm, torch.zeros(3, device=DEVICE))


# ---- launch planning ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("S", "block"), [(49, 64), (196, 256), (784, 64), (3136, 64), (12544, 256), (1, 1), (7, 8), (100, 128)]
)
def test_spatial_block_keeps_padding_small(S, block):
    got = K._spatial_block(S, 4096)
    assert got == block


@pytest.mark.parametrize(
    ("S", "min_run", "block"), [(3136, 1024, 1024), (784, 128, 128), (784, 256, 1024), (49, 1024, 64), (3136, 8, 64)]
)
def test_spatial_block_takes_longer_runs_when_asked(S, min_run, block):
    assert K._spatial_block(S, 4096, min_run) == block
    plan = K.plan_for(K.PLANES, 256, 256, S, target_programs=528, min_run=min_run)
    assert plan.block_b == block or plan.group  # (7x7: grouped tiles, which take no run width)


@pytest.mark.parametrize(("S", "block"), [(3136, 4096), (12544, 1024), (784, 1024), (196, 256)])
def test_spatial_block_takes_whole_planes_up_to_the_longest_run(S, block):
    """PLANES_MAX_RUN 4096: a 56x56 plane in one 4096-lane row (as few idle lanes as 4 x 1024); 112x112
    keeps 1024 (13 blocks pad less than 4 of 4096)."""
    assert K._spatial_block(S, 4096, 1024, 4096) == block
    plan = K.plan_for(K.PLANES, 256, 64, 3136, target_programs=264, min_run=1024, max_run=4096)
    assert (plan.block_a, plan.block_b, plan.s_blocks) == (1, 4096, 1)


@pytest.mark.parametrize(
    "min_run, max_run, tiles",
    [(1024, 1024, (4, 1024, 4)), (64, 1024, (4, 64, 49)), (1024, 4096, (1, 4096, 1))],
    ids=["long-runs", "short-runs", "whole-planes"],
)
def test_long_run_tiles_with_idle_lanes_match_the_reference(monkeypatch, min_run, max_run, tiles):
    """PLANES_MIN_RUN 1024 (the default) at 56x56: each sample's run of 3136 values in four blocks of 1024
    lanes (the last one 64 busy); 64: 49 blocks of 64 with no idle lane; PLANES_MAX_RUN 4096: one block."""
    monkeypatch.setattr(K, "SINGLE_TILE_MAX", 0)
    monkeypatch.setattr(K, "PLANES_MIN_RUN", min_run)
    monkeypatch.setattr(K, "PLANES_MAX_RUN", max_run)
    monkeypatch.setattr(K, "TILE_BYTES", 4 * K.TILE)  # (float32 here: the tiles 16-bit data gets)
    x, z, dy, w, b = _operands((3, 2, 56, 56), "contiguous", torch.float32)
    plan = K.make_plan(x, K.PLANES)
    assert (plan.block_a, plan.block_b, plan.s_blocks) == tiles
    _training_step_matches_reference(x, z, dy, w, b)  # (and the running statistics too)


@pytest.mark.parametrize(
    ("layout", "N", "C", "S", "target"),
    [
        (K.ROWS, 65536, 1024, 1, 528),
        (K.ROWS, 100000, 32, 1, 528),
        (K.ROWS, 256, 64, 3136, 528),
        (K.PLANES, 256, 2048, 49, 528),
        (K.PLANES, 32, 64, 12544, 528),
        (K.PLANES, 1, 3, 5, 4),
        (K.PLANES, 256, 1024, 196, 528),
        (K.PLANES, 256, 512, 784, 528),  # 16-aligned runs: vector loads, not packed
        (K.ROWS, 3, 5, 1, 4),
    ],
)
def test_plans_cover_every_value_once(layout, N, C, S, target):
    """Every value in exactly one tile of one slice (planes: 7x7 and 14x14 get grouped tiles, 16 channels
    a program; 1x5 with 3 channels gets packed tiles)."""
    plan = K.plan_for(layout, N, C, S, target_programs=target)
    assert (plan.splits - 1) * plan.per_split < plan.tiles <= plan.splits * plan.per_split  # no empty slice
    if layout == K.ROWS:
        assert plan.tiles * plan.block_a >= N * S > (plan.tiles - 1) * plan.block_a
        assert plan.block_b >= min(C, 128)
    elif plan.group:  # a sample's runs of a group of channels: one span of lanes
        assert plan.group * S <= plan.block_b < 2 * plan.group * S and C % plan.group == 0
        assert plan.channel_programs == C // plan.group and plan.tiles == -(-N // plan.block_a)
    elif plan.packed:  # whole runs of S values side by side in one row of lanes
        assert plan.block_a == 1 and plan.block_b >= 2 * S and S % 16 != 0
        assert plan.tiles * plan.samples_per_tile >= N > (plan.tiles - 1) * plan.samples_per_tile
    else:
        assert plan.tiles == -(-N // plan.block_a) * -(-S // plan.block_b)
    assert plan.block_a * plan.block_b <= 4096
    # Enough programs to fill the target, unless there are not that many tiles.
    assert plan.channel_programs * plan.splits >= min(target, plan.channel_programs * plan.tiles) // 2


def test_gradient_sums_pipeline_deeper_over_long_loops():
    """NCHW 256x256x56x56 (66 tiles a program) takes GRAD_STAGES_LONG, 256x2048x7x7 (13) GRAD_STAGES; rows
    take 2 either way."""
    long = K.plan_for(K.PLANES, 256, 256, 3136, target_programs=528)
    short = K.plan_for(K.PLANES, 256, 2048, 49, target_programs=528)
    assert (long.per_split, short.per_split) == (66, 13)
    assert (K._grad_stages(long), K._grad_stages(short)) == (3, 2)
    assert K._grad_stages(K.plan_for(K.ROWS, 256, 256, 3136, target_programs=528)) == 2


def test_reductions_take_their_own_warps(monkeypatch):
    """REDUCTION_WARPS sets the split reductions' warps per program (statistics, gradient sums), per layout;
    the elementwise passes keep NUM_WARPS, and the plan is the same otherwise."""
    x = torch.empty(8, 16, 7, 7)
    monkeypatch.setattr(K, "SINGLE_TILE_MAX", 0)  # (a split plan; single-tile plans have no reductions)
    monkeypatch.setattr(K, "REDUCTION_WARPS", {K.PLANES: 8, K.ROWS: 2})
    plan = K.make_plan(x, K.PLANES)
    assert (K._block_args(plan, reduction=True)["num_warps"], K._block_args(plan)["num_warps"]) == (8, K.NUM_WARPS)
    assert K._block_args(K.make_plan(x.movedim(1, -1).contiguous(), K.ROWS), reduction=True)["num_warps"] == 2
    monkeypatch.setattr(K, "REDUCTION_WARPS", {K.PLANES: K.NUM_WARPS, K.ROWS: K.NUM_WARPS})
    assert K.make_plan(x, K.PLANES) == K.replace(plan, reduce_warps=K.NUM_WARPS)
    # (and make_plan plans with exactly the module's knobs: what kernel_sass.py plans with, without a GPU)
    target = K._target_programs(x.device, K.PLANES)
    knobs = K.knob_args(K.PLANES, x.element_size())
    assert K.make_plan(x, K.PLANES) == K.plan_for(K.PLANES, 8, 16, 49, target_programs=target, **knobs)


def test_resident_programs_follow_the_occupancy_arithmetic():
    # (sm_90 kernels read by kernel_sass.py under Triton 3.6: registers, shared memory, warps -> programs)
    assert K.resident_programs(153, 16384, 4) == 3  # NCHW 7x7 statistics: registers bound it
    assert K.resident_programs(96, 16384, 4) == 5
    assert K.resident_programs(32, 16384, 4) == 13  # shared memory does: 233472 // (16384 + 1024)
    assert K.resident_programs(32, 0, 4) == 16  # threads do: 2048 // 128
    assert K.resident_programs(90, 16384, 8) == 2  # 90 registers round up to 96 a thread
    assert K.resident_programs(255, 200_000, 4) == 1 and K.resident_programs(255, 240_000, 4) == 0


def test_plans_are_cut_to_one_wave_by_taking_fewer_slices():
    plan = K.plan_for(K.PLANES, 256, 256, 196, target_programs=264)  # grouped: 32 blocks x 9 slices
    assert plan.grid == (32, 9) and plan.tiles == 128
    assert K.within(plan, 288) == plan and K.within(plan, 10_000) == plan
    cut = K.within(plan, 264)  # 8 slices of 16 tiles: 256 programs
    assert cut.grid == (32, 8) and cut.per_split == 16 and cut.splits * cut.per_split >= cut.tiles
    assert K.within(plan, 20).grid == (32, 1)  # one slice a block is the least
    single = K.plan_for(K.PLANES, 32, 2048, 49, target_programs=528, single_tile_max=8192)
    assert K.within(single, 1) == single


def test_a_plans_derived_values_are_its_own_after_a_change_of_fields():
    """Grid, tiles and shape arguments are computed once per plan (cached): a plan made from another by
    changing fields (a cut to one wave, a layout's other tiles) has its own, not the first one's."""
    from dataclasses import replace

    plan = K.plan_for(K.ROWS, 64, 256, 196, target_programs=528)
    first = (plan.grid, plan.tiles, plan.s_blocks, plan.shape_args)  # (cached now)
    cut = K.within(plan, plan.channel_programs * 2)
    assert cut.splits == 2 and cut.grid == (plan.channel_programs, 2) and cut.shape_args[5] == cut.per_split
    narrower = replace(plan, block_b=plan.block_b // 2)
    assert narrower.channel_programs == 2 * plan.channel_programs and narrower.grid[0] == narrower.channel_programs
    taller = replace(plan, block_a=plan.block_a * 2)
    assert taller.tiles == -(-plan.tiles // 2) and taller.shape_args[4] == taller.tiles
    assert (plan.grid, plan.tiles, plan.s_blocks, plan.shape_args) == first and hash(cut) != hash(plan)
    assert plan == replace(plan) and plan.shape_args == (64, 256, 196, plan.s_blocks, plan.tiles, plan.per_split)


class _Recorder:
    """Stands in for a Triton kernel: records each launch's grid and arguments."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **options: self.launches.append((grid, args, options))


def test_a_launch_over_more_than_one_wave_runs_fewer_slices(monkeypatch):
    kernel = _Recorder()
    plan = K.plan_for(K.PLANES, 256, 256, 196, target_programs=264)
    monkeypatch.setattr(K, "_one_wave_on", lambda device: True)
    monkeypatch.setattr(K, "_gpu", lambda device: (2, 50 * 2**20, 2048, 233472))
    monkeypatch.setattr(K, "_resident", lambda kernel, args, options, device: 66)  # 132 programs at once
    monkeypatch.setattr(K, "_FITTED", {})
    K._launch(kernel, plan, torch.device("cpu"), lambda p: (p.per_split,), lambda p: {"SPLITS": p.splits})
    ((grid, args, options),) = kernel.launches
    assert grid == (32, 4) and args == (32,) and options == {"SPLITS": 4}  # 132 // 32 blocks = 4 slices
    assert K._FITTED == {(kernel, plan): K.replace(plan, per_split=32, splits=4)}
    # (uncut: the plan itself, nothing recorded; one slice a block has nothing left to cut)
    monkeypatch.setattr(K, "_resident", lambda kernel, args, options, device: 10**6)
    monkeypatch.setattr(K, "_FITTED", {})
    assert K._launch(kernel, plan, torch.device("cpu"), lambda p: (), lambda p: {}) is plan and K._FITTED == {}
    whole = K.replace(plan, per_split=plan.tiles, splits=1)
    assert K.within(whole, 1) is whole
    monkeypatch.setattr(K, "_one_wave_on", lambda device: False)
    K._launch(kernel, plan, torch.device("cpu"), lambda p: (p.per_split,), lambda p: {"SPLITS": p.splits})
    assert kernel.launches[-1][0] == plan.grid


def test_a_kernel_without_occupancy_attributes_is_launched_uncut_with_a_warning(monkeypatch):
    class Bare:  # a compiled kernel without n_regs / metadata (another Triton)
        fn = type("bare", (), {})

        def __getitem__(self, grid):
            return lambda *args, **options: object()

    monkeypatch.setattr(K, "_gpu", lambda device: (132, 50 * 2**20, 2048, 233472))
    monkeypatch.setattr(K, "_RESIDENT", {})
    with pytest.warns(RuntimeWarning, match="no occupancy for bare"):
        assert K._resident(Bare(), (torch.empty(1),), {}, torch.device("cpu")) == 32  # every slot


@pytest.mark.parametrize("with_residual", [False, True])
def test_plans_cut_to_one_wave_match_the_reference(monkeypatch, with_residual):
    """Every split pass cut to fewer slices than planned (the interpreter pretends to be a GPU of 2
    multiprocessors holding 2 programs each): the same results as the reference; the partial workspaces
    sized for the planned slices serve the cut ones; the bench's note says so."""
    monkeypatch.setattr(K, "SINGLE_TILE_MAX", 0)
    monkeypatch.setattr(K, "TILE", 64)
    monkeypatch.setattr(K, "COMBINE_VALUES", 4)
    monkeypatch.setattr(
        K, "_target_programs", lambda device, layout, elementwise=False, small=False: 24 if elementwise else 16
    )
    monkeypatch.setattr(K, "_one_wave_on", lambda device: True)
    monkeypatch.setattr(K, "_gpu", lambda device: (2, 50 * 2**20, 2048, 233472))
    monkeypatch.setattr(K, "_resident", lambda kernel, args, options, device: 2)
    monkeypatch.setattr(K, "_FITTED", {})
    shape = (12, 2, 4, 8)
    x, z, dy, w, b = _operands(shape, "contiguous", torch.float32)
    _training_step_matches_reference(x, z, dy, w, b, with_residual=with_residual)
    launched = [cut.grid for cut in K._FITTED.values()]
    assert len(launched) == 4 and all(math.prod(grid) <= 4 for grid in launched)  # all four passes were cut
    described = K.describe_plans(x.detach())
    assert described.count("(cut to one wave)") == 2


def test_reductions_over_tensors_within_l2_take_their_own_programs_per_sm(monkeypatch):
    """SMALL_PROGRAMS_PER_SM: a tensor of at most SMALL_TENSOR_L2 times L2 (50 MB here) plans its reductions
    for that many programs a multiprocessor, a larger one for PROGRAMS_PER_SM; the elementwise passes keep
    theirs; never in the interpreter (no L2)."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(K, "_gpu", lambda device: (132, 50 * 2**20, 2048, 233472))
    monkeypatch.setattr(K, "SMALL_PROGRAMS_PER_SM", {K.PLANES: 4, K.ROWS: 8})
    assert K._small(cuda, 256 * 512 * 196 * 2) and not K._small(cuda, 256 * 1024 * 196 * 2)  # 51.4, 102.8 MB
    assert not K._small(torch.device("cpu"), 1)
    assert K._target_programs(cuda, K.PLANES, small=True) == 4 * 132 and K._target_programs(cuda, K.PLANES) == 2 * 132
    assert K._target_programs(cuda, K.ROWS, small=True) == 8 * 132
    assert K._target_programs(cuda, K.PLANES, elementwise=True, small=True) == K.APPLY_PROGRAMS_PER_SM[K.PLANES] * 132
    monkeypatch.setattr(K, "SMALL_TENSOR_L2", 0.25)
    assert not K._small(cuda, 256 * 512 * 196 * 2)
    asked, targets = [], []  # make_plan asks with the tensor's bytes, and plans for what it answers
    monkeypatch.setattr(K, "_small", lambda device, nbytes: asked.append(nbytes) or nbytes < 5000)
    monkeypatch.setattr(
        K, "_target_programs", lambda device, layout, elementwise=False, small=False: targets.append(small) or 4
    )
    K.make_plan(torch.empty(2, 32, 4, 4), K.PLANES)
    K.make_plan(torch.empty(8, 32, 4, 4), K.PLANES)
    assert asked == [2 * 32 * 16 * 4, 8 * 32 * 16 * 4] and targets == [True, False]


def test_channels_last_split_plans_take_blocks_of_the_channels_asked_for(monkeypatch):
    """ROWS_BLOCK_BYTES: 256x512x7x7 channels-last in blocks of 128 channels in bf16 (4 blocks x 131 slices
    for 528 programs), 64 in float32 (the default's 256 bytes a row), or 32 (16 blocks x 33 slices: a
    quarter of the partials, loops 4x as long); REDUCTION_ROWS_BLOCK_CHANNELS for the reductions alone,
    SMALL_REDUCTION_ROWS_BLOCK_CHANNELS for those of a tensor within L2."""
    wide = K.plan_for(K.ROWS, 256, 512, 49, target_programs=528, **K.knob_args(K.ROWS, 2))
    narrow = K.plan_for(K.ROWS, 256, 512, 49, target_programs=528, **{**K.knob_args(K.ROWS, 2), "block_channels": 32})
    assert (wide.block_b, wide.block_a, wide.grid) == (128, 32, (4, 131))
    assert (narrow.block_b, narrow.block_a, narrow.grid) == (32, 128, (16, 33))
    assert K.knob_args(K.ROWS, 4)["block_channels"] == 64 and K.knob_args(K.ROWS, 2)["block_channels"] == 128
    monkeypatch.setattr(K, "ROWS_BLOCK_BYTES", 256)
    default = K.make_plan(torch.empty(8, 512, 7, 7, dtype=torch.bfloat16, device="meta"), K.ROWS)
    assert (default.block_b, default.apply.block_b) == (64, 128)  # (the defaults: reductions at 64 channels)
    assert K.make_plan(torch.empty(8, 512, 7, 7, device="meta"), K.ROWS).apply is None  # (float32: 64 for all)
    monkeypatch.setattr(K, "REDUCTION_ROWS_BLOCK_CHANNELS", 128)
    assert K.make_plan(torch.empty(8, 512, 7, 7, dtype=torch.bfloat16, device="meta"), K.ROWS).apply is None
    monkeypatch.setattr(K, "REDUCTION_ROWS_BLOCK_CHANNELS", 32)  # the reductions' blocks
    plan = K.make_plan(torch.empty(8, 512, 7, 7, dtype=torch.bfloat16, device="meta"), K.ROWS)
    assert (plan.block_b, plan.apply.block_b, plan.apply.apply) == (32, 128, None)
    assert K._elementwise_passes(plan, torch.device("cpu")).block_b == 128  # normalize and dx: 128 channels
    x = torch.empty(8, 512, 7, 7, dtype=torch.bfloat16, device="meta").contiguous(memory_format=torch.channels_last)
    assert K.describe_plans(x).endswith("(blocks of 32 channels, dx in blocks of 128)")
    assert K.make_plan(torch.empty(8, 32, dtype=torch.bfloat16), K.ROWS).apply is None  # (32 channels: one block)
    # SMALL_REDUCTION_ROWS_BLOCK_CHANNELS for a tensor within L2 (`_small`), the other knob for the rest
    monkeypatch.setattr(K, "REDUCTION_ROWS_BLOCK_CHANNELS", 64)
    monkeypatch.setattr(K, "SMALL_REDUCTION_ROWS_BLOCK_CHANNELS", 16)
    with monkeypatch.context() as patched:
        patched.setattr(K, "_small", lambda device, nbytes: nbytes < 10**6)
        small, large = (torch.empty(n, 512, 7, 7, dtype=torch.bfloat16, device="meta") for n in (8, 256))
        assert [(K.make_plan(t, K.ROWS).block_b, K.make_plan(t, K.ROWS).apply.block_b) for t in (small, large)] == [
            (16, 128), (64, 128)
        ]  # fmt: skip
    assert K.planned(K.ROWS, 256, 512, 49, 2, 528, small=True).grid[0] == 32  # (16 channels: 32 blocks)
    monkeypatch.setattr(K, "ROWS_BLOCK_BYTES", 128)  # (the interpreter: float32 blocks of 32 and 8 channels)
    for knob in ("REDUCTION_ROWS_BLOCK_CHANNELS", "SMALL_REDUCTION_ROWS_BLOCK_CHANNELS"):  # (a GPU: small)
        monkeypatch.setattr(K, knob, 8)
    x, z, dy, w, b = _operands((6, 48, 3, 3), "channels_last", torch.float32)
    plan = K.make_plan(x, K.ROWS)
    assert (plan.block_b, plan.channel_programs, plan.apply.block_b, plan.apply.channel_programs) == (8, 6, 32, 2)
    _training_step_matches_reference(x, z, dy, w, b)
    with pytest.raises(ValueError, match=r"ROWS_BLOCK_BYTES / itemsize\) must be a power of two, got 48"):
        K.plan_for(K.ROWS, 256, 512, 49, target_programs=528, block_channels=48)
    planes = K.plan_for(K.PLANES, 256, 64, 3136, target_programs=264)
    assert K.plan_for(K.PLANES, 256, 64, 3136, target_programs=264, block_channels=32) == planes  # (rows only)


def _reductions_wide(monkeypatch, deep: bool = False) -> None:
    """Session 27's candidates (benchmarks/profile_kernels.py's WIDE_ROWS, and with `deep` WIDE_DEEP): the
    rows layout's reductions in 16-warp programs of 4x the tiles, one a multiprocessor (the 2-byte
    statistics' loads 4 stages deep through shared memory)."""
    monkeypatch.setattr(K, "REDUCTION_ROWS_TILE_SCALE", 4)
    monkeypatch.setattr(K, "REDUCTION_WARPS", {K.PLANES: 4, K.ROWS: 16})
    monkeypatch.setattr(K, "PROGRAMS_PER_SM", {K.PLANES: 2, K.ROWS: 1})
    monkeypatch.setattr(K, "SMALL_PROGRAMS_PER_SM", {K.PLANES: 4, K.ROWS: 1})
    if deep:
        monkeypatch.setattr(K, "STATS_PREFETCH", {K.PLANES: False, K.ROWS: False})
        monkeypatch.setattr(K, "STATS_STAGES", {K.PLANES: 3, K.ROWS: 4})


def test_channels_last_reductions_may_take_wider_programs_over_fewer_slices(monkeypatch):
    """REDUCTION_ROWS_TILE_SCALE with REDUCTION_WARPS' rows as many times NUM_WARPS (session 27's
    candidate): bf16 256x256x14x14 channels-last's reductions at one 16-warp program an H200 multiprocessor
    take tiles of 256 x 64 values (a thread holds 32, as at the defaults' 64 x 64 over 4 warps) over 4 x 33
    programs, whose partials are one combine group (the step scaled by the warps: 128 rows, not 32),
    against 4 x 131 and 5 groups at the defaults; the elementwise passes keep their tiles. A training step
    in such plans (several slices, combine steps of several rows) matches the reference."""
    default = K.planned(K.ROWS, 256, 256, 196, 2, 4 * 132, small=True)
    assert (default.block_a, default.block_b, default.grid, K._split_block(default)) == (64, 64, (4, 131), 32)
    _reductions_wide(monkeypatch)
    wide = K.planned(K.ROWS, 256, 256, 196, 2, 1 * 132, small=True)
    assert (wide.block_a, wide.block_b, wide.grid, wide.reduce_warps) == (256, 64, (4, 33), 16)
    assert K._split_block(wide) == 64 and K._block_args(wide, reduction=True)["num_warps"] == 16
    assert (wide.apply.block_a, wide.apply.block_b, wide.apply.num_warps) == (default.apply.block_a, 128, 4)
    assert K._combine_block(wide.apply, 33) == 16  # (an elementwise combine: 4 warps)
    monkeypatch.setattr(K, "SINGLE_TILE_MAX", 0)
    monkeypatch.setattr(K, "TILE", 32)
    monkeypatch.setattr(K, "ROWS_BLOCK_BYTES", 64)  # (float32: elementwise blocks of 16 channels)
    for knob in ("REDUCTION_ROWS_BLOCK_CHANNELS", "SMALL_REDUCTION_ROWS_BLOCK_CHANNELS"):  # (a GPU: small)
        monkeypatch.setattr(K, knob, 4)
    monkeypatch.setattr(K, "COMBINE_VALUES", 8)  # (2 rows a step at 4 warps, 8 at 16)
    monkeypatch.setattr(K, "_target_programs", lambda device, layout, elementwise=False, small=False: 16)
    x, z, dy, w, b = _operands((7, 12, 9, 5), "channels_last", torch.float32)
    plan = K.make_plan(x, K.ROWS)
    assert (plan.block_a, plan.block_b, plan.reduce_warps, plan.apply.block_a, plan.apply.block_b) == (32, 4, 16, 2, 16)
    assert plan.splits > 1 and K._split_block(plan) == 8
    _training_step_matches_reference(x, z, dy, w, b)


def test_tiles_hold_at_most_tile_bytes_of_data(monkeypatch):
    """At TILE_BYTES of 8192 float32 tiles take half the values of 16-bit ones; TILE still caps both."""
    monkeypatch.setattr(K, "TILE", 4096)
    monkeypatch.setattr(K, "TILE_BYTES", 8192)
    assert (K.knob_args(K.PLANES, 2)["tile"], K.knob_args(K.PLANES, 4)["tile"]) == (4096, 2048)
    bf16, fp32 = (torch.empty(256, 256, 14, 14, dtype=dtype) for dtype in (torch.bfloat16, torch.float32))
    assert (K.make_plan(bf16, K.PLANES).block_a, K.make_plan(fp32, K.PLANES).block_a) == (2, 1)  # x 2048 lanes
    monkeypatch.setattr(K, "TILE", 64)
    assert K.knob_args(K.PLANES, 4)["tile"] == 64


def test_plans_are_described_for_benchmark_rows(monkeypatch):
    # the interpreter's count of programs, on a GPU too
    monkeypatch.setattr(K, "_target_programs", lambda device, layout, elementwise=False, small=False: 4)
    x = torch.empty(4, 3, 5, 5, device=DEVICE)
    assert K.describe_plans(x) == "forward single tile; backward single tile"
    monkeypatch.setattr(K, "SINGLE_TILE_MAX", 0)
    monkeypatch.setattr(K, "TILE", 8)
    assert K.describe_plans(x) == "forward split over 2 slices; backward split over 2 slices"  # 4 programs here
    monkeypatch.setattr(K, "TILE", 64)  # runs of 25 values: two samples' side by side in 64 lanes
    assert K.describe_plans(x).endswith("(packed tiles of 2 samples)")
    assert "gradient sums" not in K.describe_plans(x)
    monkeypatch.setattr(K, "LONG_LOOP_TILES", 1)  # every split plan's loops count as long
    assert K.describe_plans(x).endswith(" slices (gradient sums 3 deep) (packed tiles of 2 samples)")
    assert K.describe_plans(x).count("gradient sums") == 1  # the backward's, not the forward's
    monkeypatch.setattr(K, "TILE", 8)
    monkeypatch.setattr(
        K, "_target_programs", lambda device, layout, elementwise=False, small=False: 24 if elementwise else 3
    )
    assert K.describe_plans(x) == (
        "forward split over 1 slices (normalize over 8); "
        "backward split over 1 slices (dx over 8) (gradient sums 3 deep)"
    )


def test_elementwise_passes_regroup_the_same_tiles_into_more_slices():
    reduce = K.plan_for(K.PLANES, 256, 64, 3136, target_programs=264, min_run=1024)
    apply = K.elementwise_plan(reduce, 528)
    assert (reduce.splits, apply.splits) == (5, 9)
    assert (apply.block_a, apply.block_b, apply.tiles) == (reduce.block_a, reduce.block_b, reduce.tiles)
    assert (apply.splits - 1) * apply.per_split < apply.tiles <= apply.splits * apply.per_split  # no idle slice
    single = K.plan_for(K.PLANES, 32, 2048, 49, target_programs=264, single_tile_max=8192)
    assert single.single and K.elementwise_plan(single, 528) is single


def test_host_integer_helpers_match_tritons():
    import triton

    assert all(K._pow2(n) == triton.next_power_of_2(n) for n in range(1, 5000))
    assert all(K._cdiv(a, b) == triton.cdiv(a, b) for a in range(200) for b in range(1, 30))


def test_layouts_are_recognised():
    assert K.layout_of(torch.empty(4, 3)) == K.ROWS
    assert K.layout_of(torch.empty(4, 3, 5)) == K.PLANES
    assert K.layout_of(torch.empty(4, 3, 5, 2)) == K.PLANES
    assert K.layout_of(torch.empty(4, 3, 5, 2).contiguous(memory_format=torch.channels_last)) == K.ROWS
    assert K.layout_of(torch.empty(4, 3, 2, 5, 2).contiguous(memory_format=torch.channels_last_3d)) == K.ROWS
    assert K.layout_of(torch.empty(4, 5, 3).transpose(1, 2)) == K.ROWS  # (N, C, L) with C contiguous
    assert K.layout_of(torch.empty(4, 6, 5)[:, ::2]) is None

    # the channels-last test asked of the tensor (no view) agrees with the general one through a view, size-1
    # dimensions included
    def through_a_view(t: torch.Tensor) -> str | None:
        if t.is_contiguous():
            return K.ROWS if math.prod(t.shape[2:]) == 1 else K.PLANES
        return K.ROWS if t.movedim(1, -1).is_contiguous() else None

    for shape in [(4, 3, 5, 2), (1, 3, 5, 2), (4, 1, 5, 2), (4, 3, 1, 2), (4, 3, 5, 1), (1, 3, 1, 1), (2, 3, 1, 4, 1)]:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        for t in (torch.empty(shape).contiguous(memory_format=fmt), torch.empty(shape).transpose(2, 3)):
            assert K.layout_of(t) == through_a_view(t), (shape, t.stride())
    t = torch.empty(4, 3, 5, 2).contiguous(memory_format=torch.channels_last)
    assert K.to_layout(t, K.ROWS) is t  # (no view made for a tensor already laid out)
    assert K.layout_of(K.to_layout(t, K.PLANES)) == K.PLANES
    assert K.layout_of(K.to_layout(t.contiguous(), K.ROWS)) == K.ROWS


# ---- the kernels compile for real GPUs (ahead of time, no GPU needed) -----------------------------------


# sm_80 is a slow check (make test-all): with an empty Triton cache, as on a fresh CI machine, the two
# compiles took 178 s (sm_90) and 86 s (sm_80) on the 2-core development VM (session 5); sm_90 alone now
# ~190 s, the longest single test (marked heavy: it starts first, beside the others under xdist).
@pytest.mark.heavy
@pytest.mark.parametrize("arch", [90, pytest.param(80, marks=pytest.mark.slow)])
def test_every_kernel_compiles_for_nvidia_gpus(arch):
    """The interpreter runs Python semantics; Triton's real compiler must also take every kernel variant
    down to a cubin (sm_90: H100/H200, the GPUs the kernels are tuned on; sm_80: A100). It runs in a
    subprocess because kernels imported under TRITON_INTERPRET=1 are interpreter objects."""
    script = Path(__file__).with_name("triton_aot.py")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, str(script), str(arch)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "compiled" in done.stdout and " 0 failed" in done.stdout


@pytest.mark.heavy
def test_kernel_loops_stay_within_the_instruction_budget():
    """The main loops' instructions per value, read from the sm_90 machine code (benchmarks/kernel_sass.py,
    see benchmarks/NOTES.md): each bf16 split pass of the ResNet-50 shapes there within 0.8 of the count
    at which it would issue no faster than memory copies (the statistics pass of NCHW 7x7 was at 1.8 before
    packed tiles and hoisted offsets), and no kernel spills. A subprocess, as for the compile test."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_sass.py"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, str(script), "--check", "0.8"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every split pass within 0.8 of its budget" in done.stdout


def test_the_instruction_budget_check_flags_slow_loops_and_spills():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import kernel_sass

    def loop(kernel, per_busy_value, spills=0):
        return kernel_sass.Loop("NCHW 7x7", kernel, "1x4096", (1,), per_busy_value, per_busy_value, spills)

    budget = kernel_sass.budget("stats", 2)  # a bf16 statistics pass: 2 bytes of traffic per value
    assert budget == pytest.approx(128 * 2 / 16.5)
    assert kernel_sass.over_budget([loop("stats", 0.79 * budget)], 2, 0.8) == []
    failures = kernel_sass.over_budget([loop("stats", 0.81 * budget), loop("dx", 1.0, spills=8)], 2, 0.8)
    assert len(failures) == 2 and "spills 8" in failures[0] and "stats" in failures[1]


def test_small_planes_channels_get_the_single_pass_plan():
    small = K.plan_for(K.PLANES, 32, 2048, 49, target_programs=528, single_tile_max=8192)
    assert small.single and small.grid == (2048, 1) and small.block_a * small.block_b == 2048
    large = K.plan_for(K.PLANES, 256, 2048, 49, target_programs=528, single_tile_max=8192)
    assert not large.single  # 256 x 64 padded values: over the register budget, two passes
    assert not K.plan_for(K.ROWS, 32, 2048, 1, target_programs=528, single_tile_max=8192).single


# ---- on a GPU: real shapes, every plan, against the reference -------------------------------------------

# The plans on an H100 or H200 (fp32 / bf16): all but the single-tile ones are split plans.
GPU_SHAPES = [
    (32, 64, 56, 56),  # NCHW: tiles of 4 x 1024 positions; channels-last: one block of 64 channels
    (32, 2048, 7, 7),  # NCHW: single tile per channel; channels-last: blocks of 64 / 128 channels
    (256, 512, 7, 7),  # NCHW: grouped tiles, 16 channels a program
    (256, 64, 56, 56),  # NCHW: tiles of 4 x 1024 positions, more of them a program
    (8192, 256),  # BatchNorm1d, rows layout: blocks of 64 / 128 channels
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("plans", ["default", "small", "wide", "wide-deep"])
def test_real_shapes_on_the_gpu_match_the_reference(monkeypatch, shape, layout, dtype, plans):
    """`small`: the reductions of every tensor within L2 at a full wave (SMALL_PROGRAMS_PER_SM 8: ONE_WAVE
    cuts the grid to what fits), and the rows layout's reductions in blocks of 32 bf16 channels
    (REDUCTION_ROWS_BLOCK_CHANNELS 32). `wide` and `wide-deep` (session 27's candidates): the rows layout's
    reductions in 16-warp programs of 4x the tiles, one a multiprocessor (REDUCTION_ROWS_TILE_SCALE), the
    2-byte statistics' loads deeper through shared memory in the second."""
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("2-D input has one layout")
    if plans.startswith("wide") and layout == "contiguous" and len(shape) == 4:
        pytest.skip("the knobs change the rows layout's plans only")
    if plans == "small":
        monkeypatch.setattr(K, "REDUCTION_ROWS_BLOCK_CHANNELS", 32)
        monkeypatch.setattr(K, "SMALL_PROGRAMS_PER_SM", {K.PLANES: 8, K.ROWS: 8})
    if plans.startswith("wide"):
        _reductions_wide(monkeypatch, deep=plans == "wide-deep")
    gen = torch.Generator(device="cuda").manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.randn(shape, generator=gen, device="cuda") * 2 + 0.5).to(dtype).contiguous(memory_format=fmt)
    z = torch.randn(shape, generator=gen, device="cuda").to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    C = shape[1]
    w = 1 + 0.1 * torch.randn(C, generator=gen, device="cuda")
    b = 0.1 * torch.randn(C, generator=gen, device="cuda")
    results = {}
    for backend in ("triton", "reference", "again"):
        rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
        y, grads = _run(backend.replace("again", "triton"), x, z, dy, w, b, training=True, activation="relu",
                        rm=rm, rv=rv)  # fmt: skip
        results[backend] = (y, *grads, rm, rv)
    # Where relu's input is within rounding of zero, the kernels (residual added in float32) and the
    # reference (bn's output rounded to the dtype first) can disagree on the mask: each gradient is right
    # for its own forward, and they differ there by the whole dy. Millions of values hold a few such
    # elements (float32 too), so the reference's gradients are taken through the kernels' own mask: the
    # reference without relu, with dy zeroed where the kernels' output is.
    ours_y, ref_y = results["triton"][0], results["reference"][0]
    flipped = (ours_y > 0) != (ref_y > 0)
    # (bf16 rounds bn's output by up to ~0.004 near 1: about 0.1% of values land within that of zero)
    assert int(flipped.sum()) <= 8 + ours_y.numel() * (1e-2 if dtype != torch.float32 else 1e-5), "mask flips"
    masked_dy = torch.where(ours_y > 0, dy, torch.zeros_like(dy))
    _, through_our_mask = _run("reference", x, z, masked_dy, w, b, training=True, activation=None)
    results["reference"] = (ref_y, *through_our_mask, *results["reference"][-2:])
    names = STEP_RESULTS
    for name, ours, ref, again in zip(names, results["triton"], results["reference"], results["again"], strict=True):
        # Parameter gradients and statistics are float32 sums over many values: relative to their size.
        _close(ours, ref, dtype if ours.dtype == dtype else torch.float32, name)
        # Programs finish in a different order on every run; the combined result must not depend on it.
        assert torch.equal(ours, again), f"{name}: not bit for bit the same on a second run"


def _training_step(x, z, dy, w, b):
    """A function running one fused training step (residual, ReLU) of the triton backend on these operands
    from fresh running statistics: its output, gradients and running statistics."""

    def step() -> tuple[torch.Tensor, ...]:
        rm, rv = torch.zeros(x.shape[1], device=DEVICE), torch.ones(x.shape[1], device=DEVICE)
        y, grads = _run("triton", x, z, dy, w, b, training=True, activation="relu", rm=rm, rv=rv)
        return (y, *grads, rm, rv)

    return step


def _captured(step, graphs: int = 1) -> tuple[list[torch.cuda.CUDAGraph], list[tuple[torch.Tensor, ...]]]:
    """`graphs` CUDA graphs of `step`, captured as `gpubench` does (after a call on a side stream), and the
    results each replay writes (a replay zeroes the running statistics first: `_training_step`)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    captured = []
    for graph in (made := [torch.cuda.CUDAGraph() for _ in range(graphs)]):
        with torch.cuda.graph(graph):
            captured.append(step())
    return made, captured


def _check_eagerly_and_in_a_graph(step, want: tuple[torch.Tensor, ...], what: str) -> None:
    """`step()`'s results, called eagerly and replayed from a CUDA graph (as the bench times it), bit for
    bit `want`."""
    eager = step()
    (graph,), (captured,) = _captured(step)
    for _ in range(3):  # (later replays start on the counters the earlier ones left)
        graph.replay()
    torch.cuda.synchronize()
    for name, ref, a, g in zip(STEP_RESULTS, want, eager, captured, strict=True):
        assert torch.equal(a, ref), f"{name}: {what} differ from ordinary ones"
        assert torch.equal(g, ref), f"{name}: {what} replayed from a graph differ"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((256, 512, 7, 7), "contiguous"),  # split, grouped tiles
        ((64, 64, 56, 56), "contiguous"),  # split, tiles of whole runs
        ((64, 256, 14, 14), "channels_last"),  # rows
        ((32, 2048, 7, 7), "contiguous"),  # single tile
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v,
)
def test_direct_launches_give_the_same_bits_eagerly_and_in_a_graph(monkeypatch, shape, layout):
    """DIRECT_LAUNCH (`bnlab.kernels.launch`): after a specialization's first launch through Triton, the
    compiled kernel's launcher is called with the arguments in signature order, the constexprs after them;
    an argument out of place or a kernel of another specialization would change the results. Compared bit
    for bit with Triton's launches, eagerly and in a CUDA graph (the launches captured on the capture
    stream), and checked that the launches did go the direct way; then the guard kernel's, through a layer
    with nonfinite="skip"."""
    from bnlab import nn as bnn
    from bnlab.kernels import launch as L

    x, z, dy, w, b = _operands(shape, layout, torch.bfloat16)
    step = _training_step(x, z, dy, w, b)
    monkeypatch.setattr(K, "DIRECT_LAUNCH", False)  # (the default is on: the reference is Triton's dispatch)
    want = step()
    monkeypatch.setattr(K, "DIRECT_LAUNCH", True)
    direct = []
    stream = L._current_stream
    monkeypatch.setattr(L, "_current_stream", lambda index: direct.append(index) or stream(index))
    step()  # (each specialization's first launch: through Triton)
    _check_eagerly_and_in_a_graph(step, want, "direct launches")
    assert direct, "no launch went the direct way"
    torch.manual_seed(0)
    layers = [bnn.BatchNorm2d(shape[1], backend="triton").cuda() for _ in range(2)]
    for direct_launch, layer in zip((False, True), layers, strict=True):
        monkeypatch.setattr(K, "DIRECT_LAUNCH", direct_launch)
        for _ in range(3):
            layer(x)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(layers[0], name), getattr(layers[1], name)), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_a_layer_on_the_gpu_skips_a_nonfinite_batch_without_a_host_sync_and_warns_later(backend):
    """bnlab.nn.BatchNorm2d with the default nonfinite="skip" (the check in the guard kernel: the triton
    backend's kernels write the update to scratch, torch's native one updates a copy): a training call
    syncs with nothing (torch's sync debug mode would raise), a NaN batch leaves the running statistics and
    the counter as they were, and the warning comes once its flag has reached the host; a training step
    captured in a CUDA graph (where a sync would fail the capture) replays with the statistics updated."""
    import warnings

    from bnlab import nn as bnn

    layer = bnn.BatchNorm2d(8, backend=backend).cuda()
    good = torch.randn(4, 8, 5, 5, device="cuda")
    bad = good.clone()
    bad[0, 3, 0, 0] = float("nan")
    layer(good)  # (compiles, sets the counters' reserve aside, checks the verdict ring: a first call's syncs)
    torch.cuda.synchronize()
    # (the guard kernel writes its verdicts into pinned host memory, `bnlab.late_reports`: no copies)
    assert BF._LATE_REPORTS._rings.get(good.device) is not None, "the verdict ring's check failed on this GPU"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        BF._LATE_REPORTS.flush()  # (any other test's late reports out of the way)
    before = {key: value.clone() for key, value in layer.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # (torch warns once that the mode is a prototype: not ours to count; session 11's H200 run)
        warnings.filterwarnings("ignore", message="Synchronization debug mode is a prototype")
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer(bad)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        BF._LATE_REPORTS.poll()
    assert [w.category for w in caught] == [BF.NonFiniteStatisticsWarning], [str(w.message) for w in caught]
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    (graph,), _ = _captured(lambda: layer(good))
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    assert int(layer.num_batches_tracked) == int(before["num_batches_tracked"]) + 3  # (the side call, 2 replays)
    assert not torch.equal(layer.running_mean, before["running_mean"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["renorm", "renorm, ghost", "ghost", "ghost, cumulative", "cumulative"])
def test_variants_on_the_gpu_train_without_a_host_sync(kind):
    """BatchRenorm2d through its warm-up and ramp, with and without ghost batches (its limits from
    num_batches_tracked on the GPU; sessions 11, 12: it was int(num_batches_tracked) on every training
    call), GhostBatchNorm2d's closed-form update of its ghosts (session 12: it checked the statistics,
    read the counter of momentum=None and copied its weights to the GPU on every call) and BatchNorm2d's
    cumulative average (session 12: it read the counter), triton backend: a training call syncs with
    nothing (torch's sync debug mode would raise)."""
    import warnings

    from bnlab import nn as bnn

    if kind.startswith("renorm"):
        ghost = 2 if kind == "renorm, ghost" else None
        layer = bnn.BatchRenorm2d(8, backend="triton", warmup_steps=1, rmax_ramp_end=3, dmax_ramp_end=2,
                                  ghost_batch_size=ghost)  # fmt: skip
    elif kind == "cumulative":  # (plain batch norm, momentum=None: torch's reads the counter every call)
        layer = bnn.BatchNorm2d(8, momentum=None, backend="triton")
    else:
        momentum = None if kind == "ghost, cumulative" else 0.1
        layer = bnn.GhostBatchNorm2d(8, ghost_batch_size=2, momentum=momentum, backend="triton")
    layer = layer.cuda()
    x = torch.randn(4, 8, 5, 5, device="cuda")
    layer(x).sum().backward()  # (compiles, sets the counters' reserve aside: the syncs a first call may make)
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Synchronization debug mode is a prototype")
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(4):
                layer(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert int(layer.num_batches_tracked) == (5 if kind in ("renorm", "cumulative") else 10)  # (ghosts: one each)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_graphs_take_their_counters_from_the_reserve_and_replay_in_any_order(monkeypatch):
    """Two graphs of the same training step take disjoint counters from the reserve set aside by the eager
    calls (none zeroed inside the graphs); replayed in turn, each gives the eager bits every time, which
    counters shared between them or left non-zero by a replay would not."""
    monkeypatch.setattr(K, "_GRAPH_COUNTERS", K.GraphCounters(slab=1 << 16, limit=1 << 17))
    # (64x14x14 a channel: over SINGLE_TILE_MAX; 32x14x14 was a single-tile plan on the H200, session 11)
    x, z, dy, w, b = _operands((64, 64, 14, 14), "contiguous", torch.bfloat16)
    assert K.make_plan(x, K.layout_of(x)).splits > 1  # (a split plan: it has counters)
    step = _training_step(x, z, dy, w, b)
    want = step()
    left = K._GRAPH_COUNTERS.left(x.device)
    graphs, captured = _captured(step, graphs=2)
    taken = left - K._GRAPH_COUNTERS.left(x.device)
    assert taken > 0 and taken % 2 == 0, f"{taken} counters taken by two captures of one step"
    for _ in range(3):
        for graph in graphs:
            graph.replay()
    torch.cuda.synchronize()
    for results in captured:
        for name, ref, got in zip(STEP_RESULTS, want, results, strict=True):
            assert torch.equal(got, ref), f"{name}: replayed from a graph differs"
    slab = K._GRAPH_COUNTERS._slabs[0]
    assert int(slab.count_nonzero()) == 0, "counters left non-zero after the replays"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_launches_read_their_kernels_occupancy_and_fit_one_wave(monkeypatch):
    """On a GPU every split pass asks its compiled kernel how many programs a multiprocessor holds
    (`_resident`, from its registers, shared memory and warps) and launches no more than the GPU holds."""
    monkeypatch.setattr(K, "_RESIDENT", {})
    monkeypatch.setattr(K, "_FITTED", {})
    x, z, dy, w, b = _operands((256, 1024, 14, 14), "contiguous", torch.float32)
    _run("triton", x, z, dy, w, b, training=True, activation="relu")
    kernels_asked = {key[0] for key in K._RESIDENT}
    assert {K._stats_kernel, K._grad_kernel} <= kernels_asked and len(kernels_asked) == 4
    assert all(1 <= resident <= 32 for resident in K._RESIDENT.values())
    multiprocessors = torch.cuda.get_device_properties(0).multi_processor_count
    for (kernel, _), cut in K._FITTED.items():
        programs = math.prod(cut.grid)
        most = max(r for key, r in K._RESIDENT.items() if key[0] is kernel) * multiprocessors
        assert programs <= most, f"{kernel.fn.__name__}: {programs} programs, {most} at once"


@pytest.mark.parametrize("ghost", [None, 4])
def test_batch_renorm_and_ghost_renorm_run_on_the_kernels(ghost):
    # float32 twin of the float64 renorm tests in test_variants (which the kernels do not take).
    x = make_input((12, 3, 5), seed=4).to(DEVICE)
    dy = make_input((12, 3, 5), seed=5, offset=0.0).to(DEVICE)
    results = {}
    for backend in ("triton", "reference"):
        mean = torch.tensor([0.3, 0.2, 0.1], device=DEVICE)
        var = torch.tensor([2.0, 1.5, 9.0], device=DEVICE)
        xl = x.clone().requires_grad_(True)
        w = torch.tensor([0.5, 1.0, 2.0], device=DEVICE, requires_grad=True)
        b = torch.tensor([0.1, -0.2, 0.3], device=DEVICE, requires_grad=True)
        if ghost is None:
            y = BF.batch_renorm(xl, mean, var, w, b, True, 0.1, 1e-5, rmax=1.5, dmax=0.5, backend=backend)
        else:
            y = BF.ghost_batch_norm(
                xl, mean, var, w, b, True, 0.1, 1e-5, ghost_batch_size=ghost, rmax=1.5, dmax=0.5, backend=backend
            )
        results[backend] = (y, *torch.autograd.grad(y, (xl, w, b), dy), mean, var)
    for name, ours, ref in zip(("y", "dx", "dw", "db", "mean", "var"), *results.values(), strict=True):
        _close(ours, ref, torch.float32, name)


@pytest.mark.parametrize("tiling", ["default", "many-slices", "packed"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, layout", [((5, 16, 3), "contiguous"), ((21, 3, 7), "contiguous"),
                                           ((3, 4, 5, 6), "channels_last"), ((7, 5), "contiguous")])  # fmt: skip
def test_batch_statistics_come_from_one_statistics_pass(monkeypatch, tiling, dtype, shape, layout):
    """`statistics` (batch renorm's r and d on the triton backend): the batch mean and 1/sqrt(var + eps)
    of the values as given, from the statistics kernel alone, finalized in it (LATE_COMBINE is on for
    2-byte planes: a combine left to a normalize pass that never runs would leave them unwritten), also
    where a training forward would take the single-tile plan (which has no statistics pass of its own)."""
    x = make_input(shape, layout, seed=7, offset=3.0).to(DEVICE, dtype)
    launched = []
    launch = K._launch

    def recorded(kernel, *args, **kw):
        launched.append(kernel)
        return launch(kernel, *args, **kw)

    monkeypatch.setattr(K, "_launch", recorded)
    mean, invstd = K.statistics(x, 1e-3)
    assert launched == [K._stats_kernel]
    values = x.double().movedim(1, 0).reshape(shape[1], -1)
    var, want_mean = torch.var_mean(values, dim=1, correction=0)
    assert mean.dtype == invstd.dtype == torch.float32
    _close(mean, want_mean, torch.float32, "mean")
    _close(invstd, (var + 1e-3).rsqrt(), torch.float32, "invstd")


@pytest.mark.parametrize("ghost", [None, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_renorm_on_the_kernels_reads_its_batch_statistics_with_the_statistics_kernel(monkeypatch, dtype, ghost):
    """On the triton backend batch renorm's r and d take the batch statistics from the statistics kernel
    (one read of the input in its dtype; per ghost batch where they are, with ghosts), not from torch's
    var_mean over a float32 copy; the result is the reference backend's on the same (rounded) values,
    running statistics included."""
    x = make_input((16, 4, 3, 3), seed=11, offset=1.0).to(DEVICE, dtype)
    dy = make_input((16, 4, 3, 3), seed=12, offset=0.0).to(DEVICE, dtype)
    results = {}
    for backend in ("triton", "reference"):
        with monkeypatch.context() as patched:
            if backend == "triton":
                patched.setattr(torch, "var_mean", _refusing("torch.var_mean called: the kernels have their own"))
            mean = torch.tensor([0.3, 0.2, 0.1, 2.0], device=DEVICE)
            var = torch.tensor([2.0, 1.5, 9.0, 0.5], device=DEVICE)
            xl = (x if backend == "triton" else x.float()).clone().requires_grad_(True)
            w = torch.tensor([0.5, 1.0, 2.0, -1.0], device=DEVICE, requires_grad=True)
            b = torch.tensor([0.1, -0.2, 0.3, 0.0], device=DEVICE, requires_grad=True)
            if ghost is None:
                y = BF.batch_renorm(xl, mean, var, w, b, True, 0.1, 1e-5, rmax=1.5, dmax=0.5, backend=backend)
            else:
                y = BF.ghost_batch_norm(xl, mean, var, w, b, True, 0.1, 1e-5, ghost_batch_size=ghost, rmax=1.5,
                                        dmax=0.5, backend=backend)  # fmt: skip
            results[backend] = (y, *torch.autograd.grad(y, (xl, w, b), dy.to(y.dtype)), mean, var)
    for name, ours, ref in zip(("y", "dx", "dw", "db", "mean", "var"), *results.values(), strict=True):
        _close(ours, ref, dtype if name in ("y", "dx") else torch.float32, name)


@pytest.mark.parametrize("tiling", TILINGS, indirect=True)
@pytest.mark.parametrize(
    ("shape", "layout", "ghost"),
    [((16, 16, 3, 3), "contiguous", 4), ((12, 3, 5), "contiguous", 4), ((16, 5, 2, 3), "channels_last", 4),
     ((12, 6), "contiguous", 3), ((8, 3, 7, 1), "contiguous", 2)],
)  # fmt: skip
def test_ghost_batches_are_read_in_place_by_the_kernels(monkeypatch, tiling, shape, layout, ghost):
    """Ghost BN on the triton backend normalizes each ghost batch where it lies in the input (no copy into
    the side-by-side tensor and back): the kernels' channel blocks, groups (16 channels: grouped planes),
    packed tiles and slices each within one ghost; output, gradients and running statistics as the
    reference backend's (which lays the ghosts side by side), the output in the input's layout."""
    x = make_input(shape, layout, seed=21, offset=1.5).to(DEVICE)
    dy = make_input(shape, layout, seed=22, offset=0.0).to(DEVICE)
    C = shape[1]
    results = {}
    for backend in ("triton", "reference"):
        with monkeypatch.context() as patched:
            if backend == "triton":
                patched.setattr(BF, "_ghosts_side_by_side", _refusing("ghosts laid side by side"))
            mean, var = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
            xl = x.clone().requires_grad_(True)
            w = torch.linspace(0.5, 1.5, C, device=DEVICE, requires_grad=True)
            b = torch.linspace(-0.2, 0.3, C, device=DEVICE, requires_grad=True)
            y = BF.ghost_batch_norm(xl, mean, var, w, b, True, 0.1, 1e-5, ghost_batch_size=shape[0] // ghost,
                                    backend=backend, nonfinite="ignore")  # fmt: skip
            results[backend] = (y, *torch.autograd.grad(y, (xl, w, b), dy), mean, var)
    assert results["triton"][0].stride() == x.stride()
    for name, ours, ref in zip(("y", "dx", "dw", "db", "mean", "var"), *results.values(), strict=True):
        _close(ours, ref, torch.float32, name)


def _refusing(why: str):
    """A stand-in that fails the test with `why` if anything calls it."""

    def refuse(*args, **kwargs):
        raise AssertionError(why)

    return refuse


def test_float32_statistics_take_their_own_pipeline_depth(monkeypatch):
    """STATS_STAGES_FLOAT32 for 4-byte values, STATS_STAGES for 16-bit ones (session 13: channels-last
    statistics 2 deep won in float32 and lost in bf16 on an H200)."""
    monkeypatch.setattr(K, "STATS_STAGES", {K.PLANES: 3, K.ROWS: 1})
    monkeypatch.setattr(K, "STATS_STAGES_FLOAT32", {K.PLANES: 5, K.ROWS: 2})
    plan = K.make_plan(torch.empty(8, 64, 4, 4).to(memory_format=torch.channels_last), K.ROWS)
    assert (K._stats_stages(plan, 2), K._stats_stages(plan, 4)) == (1, 2)


# ---- torch.compile: the kernels as custom ops -------------------------------------------------------------


def _recording_backend(graphs: dict[str, list[str]]):
    """An aot_eager-like torch.compile backend that keeps the code of each forward and backward graph."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(kind: str):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm.code)
            return make_boxed_func(gm.forward)

        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))


@pytest.mark.parametrize(
    ("shape", "layout", "single"),
    [((6, 16, 5), "contiguous", False), ((4, 8, 3, 3), "channels_last", False), ((5, 3, 4), "contiguous", True)],
    ids=["planes-split", "channels-last-split", "planes-single"],
)
def test_torch_compile_runs_the_kernels_as_custom_ops_in_one_graph(monkeypatch, shape, layout, single):
    """A fused training step (residual, ReLU) under torch.compile(fullgraph=True): one graph whose forward
    and backward call the kernels' custom ops (no graph break: the launchers are not traced), and the same
    bits as the eager call: output, every gradient and the running statistics. Then inference, traced as
    torch ops (inductor fuses them with their neighbours): no op of ours, no copy of the running statistics,
    the eager kernels' output within float32 rounding."""
    if not single:
        monkeypatch.setattr(K, "SINGLE_TILE_MAX", 0)
    x, z, dy, w, b = _operands(shape, layout, torch.float32)

    def step(x, z, w, b, rm, rv, training):
        return BF.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, backend="triton", residual=z, activation="relu")

    graphs: dict[str, list[str]] = {"forward": [], "backward": []}
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=_recording_backend(graphs), fullgraph=True)
    results = {}
    for how, fn in (("eager", step), ("compiled", compiled)):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, z, w, b)]
        rm, rv = torch.zeros(shape[1], device=DEVICE), torch.ones(shape[1], device=DEVICE)
        y = fn(*leaves, rm, rv, True)
        results[how] = (y, *torch.autograd.grad(y, leaves, dy), rm, rv, fn(x, z, w, b, rm, rv, False))
    for name, ours, ref in zip(
        ("y", "dx", "dresidual", "dweight", "dbias", "running mean", "running var"),
        results["compiled"][:-1], results["eager"][:-1], strict=True,
    ):  # fmt: skip
        assert torch.equal(ours, ref), f"{name}: compiled differs from eager"
    torch.testing.assert_close(results["compiled"][-1], results["eager"][-1])
    assert len(graphs["forward"]) == 2 and graphs["backward"], graphs
    assert "bnlab.triton_forward" in graphs["forward"][0]
    assert "bnlab.triton_backward" in graphs["backward"][0]
    assert "bnlab" not in graphs["forward"][1] and "copy_" not in graphs["forward"][1]


def test_torch_compile_with_dynamic_shapes_trains_as_eager():
    """torch.compile(dynamic=True, fullgraph=True) over a conv and a bnlab layer: batches of other sizes and
    a channels-last one through the same graph (the fakes' strides from symbolic shapes), outputs, every
    gradient and the running statistics as eager's."""
    import copy

    import bnlab.nn

    torch.manual_seed(0)
    eager = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), bnlab.nn.BatchNorm2d(4, backend="triton"), torch.nn.ReLU()
    ).to(DEVICE)
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    graphs = []

    def counted(gm, example_inputs):  # (aot_eager, each graph dynamo hands it counted)
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    compiled = torch.compile(model, backend=counted, fullgraph=True, dynamic=True)
    made = []
    for seed, (n, layout) in enumerate([(2, "contiguous"), (5, "contiguous"), (3, "contiguous"), (3, "channels_last")]):
        x = make_input((n, 3, 5, 5), layout, seed=seed).to(DEVICE)
        y, expected = compiled(x), eager(x)
        y.sum().backward()
        expected.sum().backward()
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
        made.append(len(graphs))
    assert made[0] == made[1] == made[2], f"graphs made so far, a batch: {made}"  # (another layout may recompile)
    _trained_alike(model, eager)


@pytest.mark.slow
def test_inductor_hands_the_ops_the_layout_it_chose(monkeypatch):
    """Under inductor with its layout optimization (convolutions channels-last in an NCHW model: on CPU with
    mkldnn always, on a GPU by heuristics; forced here), the ops take the channels-last tensors as they
    come (tag flexible_layout) instead of copies into the NCHW strides traced from eager (run 24, H200,
    ResNet-50 NCHW under reduce-overhead: 27.8 ms a step with bnlab's fused layers, 20.3 with inductor's
    BN); the residual, here the model's NCHW input, is laid out as x. The same outputs, gradients and
    running statistics as eager."""
    import copy

    import bnlab.nn

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn = bnlab.nn.BatchNorm2d(4, backend="triton")
            self.conv2 = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False)
            self.bn2 = bnlab.nn.BatchNorm2d(6, backend="triton")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.bn(self.conv(x), residual=x, activation="relu")
            return self.bn2(self.conv2(h)).relu().mean((2, 3))

    seen = []
    for name in ("forward", "backward"):
        launch = getattr(K, name)

        def recorded(*args, _launch=launch, _name=name, **kwargs):
            seen.append((_name, kwargs["layout"]))
            return _launch(*args, **kwargs)

        monkeypatch.setattr(K, name, recorded)
    torch.manual_seed(0)
    eager = Block().to(DEVICE)
    model = copy.deepcopy(eager)
    x = make_input((3, 4, 5, 5), seed=4).to(DEVICE)
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_layout_optimization=True, force_disable_caches=True):
        compiled = torch.compile(model, backend="inductor", fullgraph=True)
        y = compiled(x)
        y.square().sum().backward()
    assert seen == [("forward", K.ROWS)] * 2 + [("backward", K.ROWS)] * 2, seen
    expected = eager(x)
    expected.square().sum().backward()
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    _trained_alike(model, eager, atol=1e-5, rtol=1e-5)


def _trained_alike(model: torch.nn.Module, eager: torch.nn.Module, **state_tolerance: float) -> None:
    """`model`'s gradients as `eager`'s (to 1e-4), and its state (running statistics included) as `eager`'s
    (`state_tolerance`: assert_close's, its defaults without)."""
    for (name, theirs), ours in zip(eager.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-4, rtol=1e-4, msg=name)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key, **state_tolerance)


def test_the_kernels_custom_ops_pass_torchs_op_checks():
    """torch.library.opcheck: schema (the running statistics are the only mutated inputs), the
    fake (meta) implementations' shapes, strides and dtypes against the kernels' outputs, and AOT dispatch."""
    from bnlab.backends import triton_backend  # noqa: F401  (registers the ops)

    x, z, dy, w, b = _operands((4, 8, 3, 3), "channels_last", torch.bfloat16)
    rm, rv = torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE)
    forward, backward = torch.ops.bnlab.triton_forward, torch.ops.bnlab.triton_backward
    torch.library.opcheck(forward, (x, w, b, z, rm, rv, True, 0.1, 1e-5, True, True))
    _, mean, invstd = forward(x, w, b, z, rm, rv, True, 0.1, 1e-5, True, True)
    dyl = dy.contiguous(memory_format=torch.channels_last)
    for needs in ((True, True, True), (False, True, False), (True, False, False)):
        torch.library.opcheck(backward, (dyl, x, w, b, z, mean, invstd, True, True, *needs))
    # (inductor may lay the tensors out otherwise than eager: the ops take any layout) x in NCHW and its
    # residual channels-last, dy in NCHW for a channels-last x, an input the kernels cannot address in place
    xp, zp = x.contiguous(), z.contiguous()
    torch.library.opcheck(forward, (xp, w, b, z, rm, rv, True, 0.1, 1e-5, True, True))
    torch.library.opcheck(backward, (dy, x, w, b, zp, mean, invstd, True, True, True, True, True))
    xs = x.transpose(2, 3)
    assert kernels.layout.layout_of(xs) is None
    torch.library.opcheck(forward, (xs, w, b, None, rm, rv, True, 0.1, 1e-5, False, True))


def test_inference_saves_no_statistics_without_grad_mode(monkeypatch):
    """Under no_grad no backward can come, though autograd still says a weight that requires grad needs
    one: inference then normalizes from the running statistics directly (save_stats off: no copies of
    them, no invstd computed first), with grad mode on it keeps what its backward needs."""
    from bnlab.backends import triton_backend

    asked = []
    launch = triton_backend._forward_kernels

    def recorded(*args):
        asked.append(args[10])  # (save_stats)
        return launch(*args)

    monkeypatch.setattr(triton_backend, "_forward_kernels", recorded)
    x, _, _, w, b = _operands((4, 3, 5), "contiguous", torch.float32)
    w.requires_grad_(True)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    with torch.no_grad():
        quiet = BF.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, backend="triton")
    loud = BF.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, backend="triton")
    assert asked == [False, True]
    # (equal within rounding, not bit for bit: on a GPU the two variants compile their arithmetic differently)
    torch.testing.assert_close(quiet, loud.detach())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_layers_compiled_with_cuda_graphs_train_as_eager_ones(layout):
    """A small conv net with bnlab's layers (triton backend; the second one fused with a residual and ReLU by
    the functional) under torch.compile(mode="reduce-overhead"): inductor around the kernels' custom ops,
    replayed from CUDA graphs (none skipped), trains as the same net called eagerly for a few steps."""
    import copy

    from torch._dynamo.utils import counters

    import bnlab.nn

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 32, 3, padding=1, bias=False)
            self.bn1 = bnlab.nn.BatchNorm2d(32, backend="triton")
            self.bn2 = bnlab.nn.BatchNorm2d(32, backend="triton")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.bn1(self.conv(x)))
            return BF.batch_norm(
                h, self.bn2.running_mean, self.bn2.running_var, self.bn2.weight, self.bn2.bias, True, 0.1, 1e-5,
                backend="triton", residual=h, activation="relu",
            )  # fmt: skip

    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    eager = Block().cuda().to(memory_format=fmt)
    compiled_net = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(compiled_net, mode="reduce-overhead", fullgraph=True)
    for net in (eager, compiled_net):
        net.optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(6):
        x = torch.randn(64, 8, 28, 28, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        x = x.contiguous(memory_format=fmt)
        for net, fn in ((eager, eager), (compiled_net, compiled)):
            net.optimizer.zero_grad()
            fn(x).square().mean().backward()
            net.optimizer.step()
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    for (name, ours), ref in zip(compiled_net.state_dict().items(), eager.state_dict().values(), strict=True):
        _close(ours.float(), ref.float(), torch.float32, name)


@pytest.mark.parametrize("plan", ["single-tile", "split", "late"])
def test_the_update_guard_runs_in_the_kernels(monkeypatch, plan):
    """Policy "skip" where it checks without a host sync (a GPU; the CPU stands in): the triton backend
    writes the updated running statistics to scratch (the statistics kernel, the single-tile one, or the
    normalize pass that combines late: LATE_COMBINE) and commits them in one kernel of its own if all
    are finite (no copy of the old ones, no ~15 small torch ops). A good batch gives the unguarded
    update bit for bit and counts; a NaN batch leaves statistics and counter alone and warns."""
    import bnlab.nn
    from bnlab.functional import NonFiniteStatisticsWarning

    monkeypatch.setattr(BF, "DEFERRED_CHECK_DEVICES", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(K, "DIRECT_LAUNCH", False)  # (launches counted through Triton's kernel[grid])
    shape = (6, 5, 3, 3)
    if plan != "single-tile":
        monkeypatch.setattr(K, "SINGLE_TILE_MAX", 0)
    if plan == "late":  # (as test_late_combine_matches_the_reference's NCHW case)
        _combine_late(monkeypatch)
        monkeypatch.setattr(K, "TILE", 512)
        monkeypatch.setattr(
            K, "_target_programs", lambda device, layout, elementwise=False, small=False: 10 if elementwise else 6
        )
        shape = (9, 24, 5, 5)
    x = make_input(shape, seed=3).to(DEVICE)
    # (the ring's one-time check launches the guard kernel: not counted. Keyed by x.device, "cuda:0": a
    # ring checked for torch.device("cuda") would be checked again on the first call, session 23's GPU run)
    BF._LATE_REPORTS._ring(x.device)
    guards = []
    kernel = K._guard_kernel

    class Counted:
        def __getitem__(self, grid):
            guards.append(grid)
            return kernel[grid]

    monkeypatch.setattr(K, "_guard_kernel", Counted())
    guarded = bnlab.nn.BatchNorm2d(shape[1], backend="triton").to(DEVICE)
    unguarded = bnlab.nn.BatchNorm2d(shape[1], backend="triton", nonfinite="ignore").to(DEVICE)
    made = K.make_plan(x, K.PLANES)
    assert made.single == (plan == "single-tile")
    assert (K._late_rows(made, x.element_size()) is not None) == (plan == "late")
    guarded(x), unguarded(x)
    assert len(guards) == 1
    for key, value in unguarded.state_dict().items():
        assert torch.equal(guarded.state_dict()[key], value), key
    before = {key: value.clone() for key, value in guarded.state_dict().items()}
    x[4, 2, 1, 1] = float("nan")
    with pytest.warns(NonFiniteStatisticsWarning, match="non-finite batch statistics"):
        guarded(x)
        # (on a GPU the warning comes once the verdict has arrived, which the call itself may not see: the
        #  late plan's guard waits behind one more kernel, and run 24 (H200) found it not there yet)
        BF._LATE_REPORTS.poll(wait=True)
    assert len(guards) == 2
    for key, value in guarded.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_launches_make_their_tensors_device_current(monkeypatch):
    """Triton launches on the current CUDA device: the launchers make their tensors' device current where
    it is not (a layer on cuda:1 while cuda:0 is current, in one process), and change nothing where it is."""
    import contextlib

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(K, "_several_gpus", lambda: True)
    assert isinstance(K._made_current(torch.device("cuda", 1)), torch.cuda.device)
    for device in (torch.device("cuda", 0), torch.device("cpu")):
        assert isinstance(K._made_current(device), contextlib.nullcontext)
    # (a process that sees one GPU does not ask which is current: it is that one)
    monkeypatch.setattr(K, "_several_gpus", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("asked for the current device"))
    assert isinstance(K._made_current(torch.device("cuda", 0)), contextlib.nullcontext)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    entered = []
    monkeypatch.setattr(K, "_made_current", lambda device: entered.append(device) or contextlib.nullcontext())
    x = make_input((4, 3, 5)).to(DEVICE)
    K.forward(x, None, None, None, None, training=True, momentum=0.1, eps=1e-5)
    assert entered == [x.device]


def test_later_steps_reuse_plans_and_launch_decisions_until_a_knob_is_set(monkeypatch):
    """Plans and each split launch's options and one-wave cut are decided once per layer shape (`_PLANS`,
    `_PASSES`, `_DECIDED`): a second training step decides nothing anew and launches as the first did;
    setting an attribute of the kernels' module (a knob) forgets them all, and the next step runs with it."""
    monkeypatch.setattr(K, "SINGLE_TILE_MAX", 0)  # (split plans: four decided launches a step)
    decided = []
    decide = K._decide
    monkeypatch.setattr(K, "_decide", lambda *args: decided.append(args[0].fn.__name__) or decide(*args))
    x = make_input((6, 5, 4, 3), "channels_last").to(DEVICE).requires_grad_()
    w = torch.ones(5, device=DEVICE, requires_grad=True)
    b = torch.zeros(5, device=DEVICE, requires_grad=True)
    dy = make_input((6, 5, 4, 3), "channels_last", seed=1).to(DEVICE)
    rm, rv = torch.zeros(5, device=DEVICE), torch.ones(5, device=DEVICE)

    def step() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(BF.batch_norm(x, rm, rv, w, b, True, backend="triton"), (x, w, b), dy)

    first = step()
    assert sorted(decided) == ["_apply_kernel", "_grad_kernel", "_input_grad_kernel", "_stats_kernel"]
    plans, decisions = dict(K._PLANS), dict(K._DECIDED)
    second = step()
    assert len(decided) == 4 and K._PLANS == plans and all(K._DECIDED[k] is v for k, v in decisions.items())
    for a, c in zip(first, second, strict=True):
        torch.testing.assert_close(a, c)
    monkeypatch.setattr(K, "SECOND_READ_EVICTION", "evict_first")
    assert K._PLANS == {} and K._PASSES == {} and K._DECIDED == {}
    step()
    assert len(decided) == 8
    evict = {key[0].fn.__name__: options.get("EVICT") for key, (_, options, _) in K._DECIDED.items()}
    assert evict == {"_stats_kernel": None, "_apply_kernel": "evict_first", "_grad_kernel": None,
                     "_input_grad_kernel": "evict_first"}  # fmt: skip


def test_the_plan_and_launch_memos_start_afresh_when_full(monkeypatch):
    """A memo holds at most MEMO_LIMIT entries (a BatchNorm1d over a varying number of rows would otherwise
    grow it every call): when full it is emptied, then fills again."""
    monkeypatch.setattr(K, "MEMO_LIMIT", 3)
    sizes = []
    for rows in range(2, 12):
        K.make_plan(torch.empty(rows, 4, 3), K.PLANES)
        sizes.append(len(K._PLANS))
    assert max(sizes) == 3 and sizes[:4] == [1, 2, 3, 1]


@pytest.mark.parametrize("transformed", [False, True])
def test_a_training_step_plans_its_launches_once_unless_transformed(monkeypatch, transformed):
    """The backward takes the launch plan its forward made (kept on the autograd context): one planning a
    step through the plain autograd.Function; the one for torch.func's transforms plans each direction."""
    calls = []
    planned = K.make_plan
    monkeypatch.setattr(K, "make_plan", lambda *args, **kwargs: calls.append(args[1]) or planned(*args, **kwargs))
    monkeypatch.setattr(TB, "_transformed", lambda: transformed)  # (which Function the call takes)
    # (on the device: session 24 wrote it on CPU tensors, which the triton backend refuses on a GPU machine)
    x = make_input((4, 3, 5, 5), "channels_last").to(DEVICE).requires_grad_()
    w = torch.ones(3, device=DEVICE, requires_grad=True)
    b = torch.zeros(3, device=DEVICE, requires_grad=True)
    dy = make_input((4, 3, 5, 5), "channels_last", seed=1).to(DEVICE)

    def stats() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)

    y = BF.batch_norm(x, *stats(), w, b, True, backend="triton")
    grads = torch.autograd.grad(y, (x, w, b), dy)
    assert calls == [K.ROWS] * (2 if transformed else 1)
    y = BF.batch_norm(x, *stats(), w, b, True, backend="native")
    for got, expected in zip(grads, torch.autograd.grad(y, (x, w, b), dy), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
