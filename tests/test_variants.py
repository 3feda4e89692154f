"""Batch renorm and ghost batch norm: the special cases that must equal BN, their own math, and bad input."""

import copy

import pytest
import torch
from torch import nn

import bnlab
from bnlab import functional as BF
from bnlab.functional import NonFiniteStatisticsWarning
from conftest import BACKENDS, FLOAT64_BACKENDS
from helpers import NoHostReads, make_input, train_steps

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _same_params(*layers):
    for layer in layers:
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, layer.num_features))
            layer.bias.copy_(torch.linspace(-0.2, 0.3, layer.num_features))
    return layers


def _assert_runs_equal(a, b, inputs, grads):
    out_a, grad_a = train_steps(a, inputs, grads)
    out_b, grad_b = train_steps(b, inputs, grads)
    for x, y in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(x, y, **TOL)
    for ga, gb in zip(grad_a, grad_b, strict=True):
        for x, y in zip(ga, gb, strict=True):
            torch.testing.assert_close(x, y, **TOL)
    for key, value in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[key], value, **TOL)


def _assert_deferred_runs_equal(monkeypatch, host, device, inputs, grads):
    """`device` trained where statistics are checked without a host sync (DEFERRED_CHECK_DEVICES: CUDA;
    the CPU stands in), reading nothing on the host, gives `host`'s outputs, gradients and state (trained
    as a CPU trains) bit for bit."""
    want = train_steps(host, inputs, grads)
    monkeypatch.setattr(BF, "DEFERRED_CHECK_DEVICES", frozenset({"cpu"}))
    with NoHostReads():
        got = train_steps(device, inputs, grads)
    for ours, ref in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want), strict=True):
        assert torch.equal(ours, ref)
    for key, value in host.state_dict().items():
        assert torch.equal(device.state_dict()[key], value), key


# ---- batch renorm ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5, 5)])
def test_renorm_with_rmax_1_dmax_0_is_batch_norm(backend, shape):
    cls = bnlab.nn.BatchRenorm1d if len(shape) == 2 else bnlab.nn.BatchRenorm2d
    plain_cls = bnlab.nn.BatchNorm1d if len(shape) == 2 else bnlab.nn.BatchNorm2d
    renorm, plain = _same_params(
        cls(3, momentum=0.1, rmax=1.0, dmax=0.0, warmup_steps=0, rmax_ramp_end=0, dmax_ramp_end=0, backend=backend),
        plain_cls(3, backend=backend),
    )
    inputs = [make_input(shape, seed=s) for s in range(3)]
    grads = [make_input(shape, seed=10 + s, offset=0.0) for s in range(3)]
    _assert_runs_equal(renorm, plain, inputs, grads)


def test_renorm_warmup_is_batch_norm_and_the_schedule_follows_the_paper():
    layer = bnlab.nn.BatchRenorm1d(3)
    assert layer.momentum == 0.01 and layer.current_limits() == (1.0, 0.0)
    for step, expected in [
        (4_999, (1.0, 0.0)),
        (5_000, (1.0, 0.0)),
        (15_000, (1 + 2 * 10 / 35, 2.5)),
        (40_000, (3.0, 5.0)),
    ]:
        layer.num_batches_tracked.fill_(step)
        rmax, dmax = layer.current_limits()
        assert rmax == pytest.approx(expected[0]) and dmax == pytest.approx(expected[1])
    layer.num_batches_tracked.fill_(10**6)
    assert layer.current_limits() == (3.0, 5.0)


@pytest.mark.parametrize(
    "schedule",
    [{}, {"warmup_steps": 0, "rmax_ramp_end": 0, "dmax_ramp_end": 0}, {"warmup_steps": 10, "rmax_ramp_end": 5}],
)
def test_renorm_limits_computed_on_the_device_are_the_hosts(schedule):
    """On a GPU the schedule's limits are computed from num_batches_tracked where it lives (no host read):
    the same values, bit for bit, at every step (before, at and after the warm-up and the ramps' ends)."""
    layer = bnlab.nn.BatchRenorm1d(3, **schedule)
    for step in (0, 1, 9, 10, 11, 4_999, 5_000, 5_001, 15_000, 24_999, 25_000, 39_999, 40_000, 10**7):
        layer.num_batches_tracked.fill_(step)
        on_device = tuple(float(t) for t in layer._limits_on_device())
        assert on_device == layer.current_limits(), f"step {step}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ghost", [None, 2], ids=["batch", "ghost"])
def test_renorm_on_a_deferred_device_never_reads_its_counter_on_the_host(monkeypatch, backend, ghost):
    """Where statistics are checked without a host sync (DEFERRED_CHECK_DEVICES: CUDA; here the CPU stands
    in), BatchRenorm (with ghost batches too) passes its limits as device tensors, never calls
    `current_limits` (an int() of the counter) and reads nothing else on the host; through the warm-up
    (r = 1, d = 0 on the renorm path instead of plain batch norm) and the ramp it gives the host path's
    outputs, gradients and state bit for bit."""
    schedule = {"warmup_steps": 2, "rmax_ramp_end": 4, "dmax_ramp_end": 3, "momentum": 0.1, "backend": backend}
    schedule["ghost_batch_size"] = ghost
    host, device = _same_params(bnlab.nn.BatchRenorm2d(3, **schedule), bnlab.nn.BatchRenorm2d(3, **schedule))
    inputs = [make_input((4, 3, 5, 5), seed=s, offset=0.3 * s) for s in range(6)]
    grads = [make_input((4, 3, 5, 5), seed=10 + s, offset=0.0) for s in range(6)]

    def read_on_host():
        raise AssertionError("the counter was read on the host")

    monkeypatch.setattr(device, "current_limits", read_on_host)
    _assert_deferred_runs_equal(monkeypatch, host, device, inputs, grads)


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_unclipped_renorm_normalizes_with_the_running_statistics(backend):
    # r = sigma_B / sigma and d = (mu_B - mu) / sigma turn (x - mu_B) / sigma_B into (x - mu) / sigma.
    x = make_input((16, 4), dtype=torch.float64)
    mean, var = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    y = BF.batch_renorm(x, mean.clone(), var.clone(), None, None, True, 0.1, 1e-5, rmax=1e6, dmax=1e6, backend=backend)
    torch.testing.assert_close(y, (x - mean) / torch.sqrt(var + 1e-5))


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_renorm_gradients_treat_r_and_d_as_constants(backend):
    x = make_input((12, 3), dtype=torch.float64).requires_grad_(True)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)
    mean, var = torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64), torch.tensor([2.0, 1.5, 9.0], dtype=torch.float64)
    dy = make_input((12, 3), dtype=torch.float64, seed=5)
    y = BF.batch_renorm(x, mean.clone(), var.clone(), w, b, True, 0.0, 1e-5, rmax=2.0, dmax=0.5, backend=backend)
    got = torch.autograd.grad(y, (x, w, b), dy)
    with torch.no_grad():  # the same r and d, computed by hand and held fixed
        batch_var, batch_mean = torch.var_mean(x, 0, correction=0)
        sigma = torch.sqrt(var + 1e-5)
        r = (torch.sqrt(batch_var + 1e-5) / sigma).clamp(0.5, 2.0)
        d = ((batch_mean - mean) / sigma).clamp(-0.5, 0.5)
    y_ref = torch.nn.functional.batch_norm(x, None, None, w * r, w * d + b, True, 0.0, 1e-5)
    torch.testing.assert_close(y, y_ref)
    for g, e in zip(got, torch.autograd.grad(y_ref, (x, w, b), dy), strict=True):
        torch.testing.assert_close(g, e)


def test_renorm_gradcheck_where_r_and_d_are_clipped():
    # With running statistics far from the batch's, r = rmax and d = +-dmax are locally constant, so the
    # stop-gradient and the true derivative agree and gradcheck/gradgradcheck apply.
    x = make_input((6, 3), dtype=torch.float64).requires_grad_(True)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        mean = torch.tensor([50.0, -50.0, 50.0], dtype=torch.float64)
        var = torch.full((3,), 1e-3, dtype=torch.float64)
        return BF.batch_renorm(x, mean, var, w, b, True, 0.0, 1e-5, rmax=3.0, dmax=5.0, backend="reference")

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_renorm_half_precision_and_state_dict():
    layer = bnlab.nn.BatchRenorm2d(3, warmup_steps=0, rmax_ramp_end=0, dmax_ramp_end=0)
    layer.load_state_dict(nn.BatchNorm2d(3).state_dict())
    x = make_input((4, 3, 5, 5), dtype=torch.bfloat16, offset=2.0)
    for _ in range(3):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert layer.running_var.dtype == torch.float32
    assert layer.state_dict().keys() == nn.BatchNorm2d(3).state_dict().keys()


def test_renorm_bad_arguments():
    with pytest.raises(ValueError, match="needs track_running_stats=True"):
        bnlab.nn.BatchRenorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="rmax >= 1"):
        bnlab.nn.BatchRenorm2d(3, rmax=0.5)
    with pytest.raises(ValueError, match="rmax >= 1"):
        BF.batch_renorm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, dmax=-1.0)


# ---- ghost batch norm --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shape", "layout"), [((12, 3), "contiguous"), ((8, 3, 4, 5), "channels_last")])
def test_ghost_of_the_whole_batch_is_batch_norm(backend, shape, layout):
    cls = bnlab.nn.GhostBatchNorm1d if len(shape) == 2 else bnlab.nn.GhostBatchNorm2d
    plain_cls = bnlab.nn.BatchNorm1d if len(shape) == 2 else bnlab.nn.BatchNorm2d
    ghost, plain = _same_params(cls(3, ghost_batch_size=shape[0], backend=backend), plain_cls(3, backend=backend))
    inputs = [make_input(shape, layout, seed=s) for s in range(3)]
    grads = [make_input(shape, layout, seed=10 + s, offset=0.0) for s in range(3)]
    _assert_runs_equal(ghost, plain, inputs, grads)


class _ChunkLoop(nn.Module):
    """The reference for ghost BN: one plain BN layer called on each chunk in turn."""

    def __init__(self, bn, ghost):
        super().__init__()
        self.bn, self.ghost = bn, ghost
        self.weight, self.bias = bn.weight, bn.bias

    def forward(self, x):
        return torch.cat([self.bn(chunk) for chunk in x.split(self.ghost)])

    def state_dict(self, *args, **kwargs):
        return self.bn.state_dict(*args, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(
    ("shape", "layout"), [((12, 3), "contiguous"), ((12, 3, 2, 3), "channels_last"), ((8, 2, 3, 2, 2), "contiguous")]
)
def test_k_ghosts_equal_k_separate_batch_norm_calls(backend, momentum, shape, layout):
    ndim = len(shape)
    cls = {2: bnlab.nn.GhostBatchNorm1d, 4: bnlab.nn.GhostBatchNorm2d, 5: bnlab.nn.GhostBatchNorm3d}[ndim]
    plain_cls = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]
    ghost_size = shape[0] // 4 if shape[0] % 4 == 0 else shape[0] // 3
    ghost, plain = _same_params(
        cls(shape[1], momentum=momentum, ghost_batch_size=ghost_size, backend=backend),
        plain_cls(shape[1], momentum=momentum),
    )
    inputs = [make_input(shape, layout, seed=s) for s in range(3)]
    grads = [make_input(shape, layout, seed=10 + s, offset=0.0) for s in range(3)]
    _assert_runs_equal(ghost, _ChunkLoop(plain, ghost_size), inputs, grads)
    with torch.no_grad():
        x = make_input(shape, layout, seed=42)
        torch.testing.assert_close(ghost.eval()(x), plain.eval()(x), **TOL)


def test_ghost_refuses_uneven_batches_and_bad_sizes():
    layer = bnlab.nn.GhostBatchNorm2d(3, ghost_batch_size=4, name="stem.bn")
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(
        ValueError,
        match=r"GhostBatchNorm2d\(3\) 'stem.bn': a batch of 10 examples does not split into ghost batches of 4",
    ):
        layer(torch.randn(10, 3, 2, 2))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key])
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="ghost_batch_size must be a positive integer"):
            bnlab.nn.GhostBatchNorm1d(3, ghost_batch_size=bad)
    with pytest.raises(ValueError, match=r"more than one value per channel.*\(ghost batches of 1\)"):
        bnlab.nn.GhostBatchNorm1d(3, ghost_batch_size=1)(torch.randn(4, 3))
    assert "ghost_batch_size=4" in repr(layer)
    x, stats = torch.randn(8, 3), (torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match=r"stem: need rmax >= 1 and dmax >= 0, got rmax=0.5, dmax=0"):
        BF.ghost_batch_norm(x, *stats, training=True, ghost_batch_size=4, rmax=0.5, dmax=0, layer="stem")
    assert torch.equal(stats[0], torch.zeros(3)) and torch.equal(stats[1], torch.ones(3))


@pytest.mark.parametrize(
    ("shape", "layout"),
    [((12, 3, 2, 3), "channels_last"), ((8, 2, 3, 2, 2), "channels_last"), ((12, 5, 4), "channels_innermost"),
     ((12, 3, 2, 3), "contiguous"), ((12, 3), "contiguous")],
)  # fmt: skip
def test_ghosts_lie_side_by_side_in_the_inputs_own_layout_and_come_back_in_it(shape, layout):
    """Ghost j's channel c is channel j*C + c of the side-by-side tensor, whose channels stay innermost
    where the input's are (one copy each way, none to restore channels-last afterwards: the normalizing
    call reads it in place); laid back, a result has the input's values and strides."""
    if layout == "channels_innermost":  # (N, C, L) with C contiguous: BatchNorm1d after a transpose
        x = torch.randn(shape[0], shape[2], shape[1]).transpose(1, 2)
    else:
        x = make_input(shape, layout)
    k, (n, channels) = 4, shape[:2]
    wide, laid_back = BF._ghosts_side_by_side(x, k)
    assert wide.shape == (n // k, k * channels, *shape[2:])
    for j in range(k):
        torch.testing.assert_close(wide[:, j * channels : (j + 1) * channels], x[j * (n // k) : (j + 1) * (n // k)])
    innermost = not x.is_contiguous() and x.movedim(1, -1).is_contiguous()
    assert wide.movedim(1, -1).is_contiguous() == innermost or x.dim() == 2
    back = laid_back(wide * 2.0)
    torch.testing.assert_close(back, x * 2.0)
    assert back.stride() == x.stride()


def test_ghost_nonfinite_statistics_leave_running_statistics_alone():
    layer = bnlab.nn.GhostBatchNorm1d(3, ghost_batch_size=4)
    layer(make_input((8, 3)))
    before = copy.deepcopy(layer.state_dict())
    x = make_input((8, 3))
    x[5, 1] = float("nan")
    with pytest.warns(NonFiniteStatisticsWarning, match="GhostBatchNorm1d"):
        layer(x)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("check", ["guard kernel", "torch ops"])
def test_ghost_on_a_deferred_device_updates_without_reading_anything_on_the_host(monkeypatch, backend, momentum, check):
    """Where statistics are checked without a host sync (DEFERRED_CHECK_DEVICES: CUDA; the CPU stands in),
    ghost batch norm's closed-form update of k ghosts reads nothing on the host (the finite check, the
    counter of momentum=None, the ghosts' weights all stay on the device) and gives the host path's
    outputs, gradients and state bit for bit; a NaN batch is dropped (state as it was, counter included)
    and reported by the late warning. The check and commit: the guard kernel, one launch a call, counting
    the k ghosts (where Triton runs: here its interpreter), or torch ops (selects) without it."""
    import bnlab.functional

    monkeypatch.setattr(bnlab.functional, "GUARD_KERNEL", check == "guard kernel")
    launches = []
    guard = bnlab.functional._guard_update
    monkeypatch.setattr(bnlab.functional, "_guard_update", lambda *args: launches.append(args[-1]) or guard(*args))
    ghost = {"ghost_batch_size": 3, "momentum": momentum, "backend": backend}
    host, device = _same_params(bnlab.nn.GhostBatchNorm2d(2, **ghost), bnlab.nn.GhostBatchNorm2d(2, **ghost))
    inputs = [make_input((12, 2, 3, 2), seed=s, offset=0.2 * s) for s in range(3)]
    grads = [make_input((12, 2, 3, 2), seed=10 + s, offset=0.0) for s in range(3)]
    _assert_deferred_runs_equal(monkeypatch, host, device, inputs, grads)
    assert int(device.num_batches_tracked) == 3 * 4
    before = copy.deepcopy(device.state_dict())
    bad = make_input((12, 2, 3, 2), seed=7)
    bad[4, 1, 0, 0] = float("nan")  # (ghost 1)
    with pytest.warns(NonFiniteStatisticsWarning, match="GhostBatchNorm2d"):
        with NoHostReads():
            device(bad)
    for key, value in before.items():
        assert torch.equal(device.state_dict()[key], value), key
    assert launches == ([4] * 4 if check == "guard kernel" else [])  # (3 good calls and the bad one; k = 4)


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_ghost_renorm_reduces_to_ghost_bn_and_to_running_statistics(backend):
    limits = {"warmup_steps": 0, "rmax_ramp_end": 0, "dmax_ramp_end": 0}
    plain_ghost = bnlab.nn.GhostBatchNorm1d(3, momentum=0.1, ghost_batch_size=4, backend=backend)
    as_bn = bnlab.nn.BatchRenorm1d(3, momentum=0.1, rmax=1.0, dmax=0.0, ghost_batch_size=4, backend=backend, **limits)
    _same_params(plain_ghost, as_bn)
    inputs = [make_input((12, 3), seed=s) for s in range(3)]
    grads = [make_input((12, 3), seed=10 + s, offset=0.0) for s in range(3)]
    _assert_runs_equal(as_bn, plain_ghost, inputs, grads)
    # Unclipped, every ghost is normalized with the running statistics of the start of the step.
    x = make_input((12, 3), dtype=torch.float64)
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    y = BF.ghost_batch_norm(
        x,
        mean.clone(),
        var.clone(),
        None,
        None,
        True,
        0.1,
        1e-5,
        ghost_batch_size=4,
        rmax=1e6,
        dmax=1e6,
        backend=backend,
    )
    torch.testing.assert_close(y, (x - mean) / torch.sqrt(var + 1e-5))
    assert "ghost_batch_size=4" in repr(as_bn)


VARIANTS_UNDER_COMPILE = {
    "ghost": lambda backend: bnlab.nn.GhostBatchNorm2d(2, ghost_batch_size=4, backend=backend),
    "ghost-cumulative": lambda backend: bnlab.nn.GhostBatchNorm2d(
        2, ghost_batch_size=4, momentum=None, backend=backend
    ),
    "renorm": lambda backend: bnlab.nn.BatchRenorm2d(
        2, backend=backend, warmup_steps=1, rmax_ramp_end=3, dmax_ramp_end=3
    ),
    "ghost-renorm": lambda backend: bnlab.nn.BatchRenorm2d(
        2, ghost_batch_size=4, backend=backend, warmup_steps=1, rmax_ramp_end=9, dmax_ramp_end=9
    ),
}


@pytest.mark.parametrize("kind", list(VARIANTS_UNDER_COMPILE))
@pytest.mark.parametrize("backend", BACKENDS)
def test_variants_compile_to_one_graph_and_train_as_eager(backend, kind):
    """torch.compile(fullgraph=True): no graph break (the ghosts' update and the renorm schedule stay on the
    device, the check of the statistics is a select), the same training as eager; a NaN ghost leaves the
    state alone, without a warning (a graph cannot report)."""
    torch._dynamo.reset()
    eager = VARIANTS_UNDER_COMPILE[kind](backend)
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    inputs = [make_input((12, 2, 3, 2), seed=s) for s in range(4)]
    grads = [make_input((12, 2, 3, 2), seed=10 + s, offset=0.0) for s in range(4)]
    want = train_steps(eager, inputs, grads)
    got = train_steps(_CompiledView(compiled, compiled_layer), inputs, grads)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_layer.state_dict()[key], value, atol=1e-5, rtol=1e-5, msg=key)
    before = copy.deepcopy(compiled_layer.state_dict())
    bad = make_input((12, 2, 3, 2), seed=7)
    bad[4, 1, 0, 0] = float("nan")  # (ghost 1)
    compiled(bad)
    for key, value in compiled_layer.state_dict().items():
        assert torch.equal(value, before[key]), key


class _CompiledView:
    """A compiled module as `train_steps` takes a layer: called through the compiled wrapper, with the
    layer's own parameters."""

    def __init__(self, compiled, layer) -> None:
        self.compiled, self.weight, self.bias = compiled, layer.weight, layer.bias

    def __call__(self, x):
        return self.compiled(x)
