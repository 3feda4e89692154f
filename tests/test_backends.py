"""Every backend against torch.nn.BatchNorm*d: outputs, gradients and running statistics, over odd shapes."""

import copy
import itertools

import pytest
import torch
from torch import nn

import bnlab
from bnlab import functional as BF
from bnlab.backends import reference as ref_backend
from conftest import BACKENDS
from helpers import make_input, train_steps

TORCH_CLASSES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
BNLAB_CLASSES = {2: bnlab.nn.BatchNorm1d, 3: bnlab.nn.BatchNorm1d, 4: bnlab.nn.BatchNorm2d, 5: bnlab.nn.BatchNorm3d}

# Odd shapes: primes, size-1 spatial dims, batch of 2, powers of two plus one.
SHAPES = [(2, 3), (7, 5), (17, 1), (5, 3, 1), (3, 5, 7), (3, 5, 7, 11), (2, 3, 1, 1), (4, 2, 9, 3), (2, 4, 3, 5, 7)]
FLAGS = [  # (affine, track_running_stats, momentum)
    (True, True, 0.1),
    (False, True, 0.1),
    (True, False, 0.1),
    (True, True, None),
    (True, True, 1.0),
    (False, True, 0.0),
]
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _layouts(shape):
    out = ["contiguous", "non_contiguous"]
    if len(shape) in (4, 5):
        out.append("channels_last")
    return out


def _pair(shape, affine, track, momentum, backend):
    kw = {"affine": affine, "track_running_stats": track, "momentum": momentum}
    theirs = TORCH_CLASSES[len(shape)](shape[1], **kw)
    ours = BNLAB_CLASSES[len(shape)](shape[1], backend=backend, **kw)
    if affine:  # non-trivial parameters so that weight/bias gradients and scaling are exercised
        with torch.no_grad():
            for layer in (theirs, ours):
                layer.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
                layer.bias.copy_(torch.linspace(-0.2, 0.3, shape[1]))
    return theirs, ours


CASES = [(b, s, layout, *f) for b, s, f in itertools.product(BACKENDS, SHAPES, FLAGS) for layout in _layouts(s)]


def assert_matches_torch(ours, theirs, truth, atol=1e-5, rtol=1e-5):
    """|ours - torch| within atol + rtol*|torch|, plus torch's own float32 error against float64 torch.

    torch's float32 CPU kernels are not exact: in ill-conditioned cases (a batch of 2 with nearly equal
    values, where dx is a difference of nearly equal terms) they are off by more than 1e-5 themselves.
    A backend may then differ from torch by as much as torch differs from the truth, and no more.
    """
    ours, theirs = ours.double(), theirs.double()
    allowed = atol + rtol * theirs.abs() + (theirs - truth.double()).abs()
    excess = (ours - theirs).abs() - allowed
    assert excess.max() <= 0, f"max |ours - torch| exceeds the bound by {excess.max().item():.3g}"


@pytest.mark.parametrize(("backend", "shape", "layout", "affine", "track", "momentum"), CASES)
def test_matches_torch_over_training_and_eval(backend, shape, layout, affine, track, momentum):
    theirs, ours = _pair(shape, affine, track, momentum, backend)
    truth = copy.deepcopy(theirs).double()
    inputs = [make_input(shape, layout, seed=s) for s in range(3)]
    grads = [make_input(shape, layout, seed=10 + s, offset=0.0) for s in range(3)]
    out_t, grad_t = train_steps(theirs.train(), inputs, grads)
    out_o, grad_o = train_steps(ours.train(), inputs, grads)
    out_64, grad_64 = train_steps(truth.train(), [x.double() for x in inputs], [g.double() for g in grads])
    for a, b, c in zip(out_o, out_t, out_64, strict=True):
        assert_matches_torch(a, b, c)
        assert a.dtype == b.dtype
        assert a.is_contiguous(memory_format=torch.channels_last) == b.is_contiguous(memory_format=torch.channels_last)
    for ga, gb, gc in zip(grad_o, grad_t, grad_64, strict=True):
        for a, b, c in zip(ga, gb, gc, strict=True):
            assert_matches_torch(a, b, c)
    for key, value in theirs.state_dict().items():
        if value.is_floating_point():
            assert_matches_torch(ours.state_dict()[key], value, truth.state_dict()[key])
        else:
            assert torch.equal(ours.state_dict()[key], value), key
    # Inference uses the running statistics (or batch statistics when none are tracked) and leaves buffers alone.
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = make_input(shape, layout, seed=99)
    with torch.no_grad():
        assert_matches_torch(ours.eval()(x), theirs.eval()(x), truth.eval()(x.double()))
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_matches_torch_functional(backend):
    x = make_input((6, 4, 5))
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    rm1, rv1 = torch.randn(4), torch.rand(4) + 0.5
    rm2, rv2 = rm1.clone(), rv1.clone()
    y1 = BF.batch_norm(x, rm1, rv1, w, b, True, 0.3, 1e-3, backend=backend)
    y2 = torch.nn.functional.batch_norm(x, rm2, rv2, w, b, True, 0.3, 1e-3)
    torch.testing.assert_close(y1, y2, **TOL)
    torch.testing.assert_close(rm1, rm2, **TOL)
    torch.testing.assert_close(rv1, rv2, **TOL)
    torch.testing.assert_close(
        BF.batch_norm(x, rm1, rv1, w, b, False, backend=backend), torch.nn.functional.batch_norm(x, rm2, rv2, w, b)
    )


def test_running_statistics_follow_the_ema_closed_form():
    x = make_input((8, 3, 4), dtype=torch.float64)
    layer = bnlab.nn.BatchNorm1d(3, momentum=0.25, backend="reference").double()
    layer(x)
    dims = (0, 2)
    n = x.numel() // 3
    torch.testing.assert_close(layer.running_mean, 0.25 * x.mean(dims))
    torch.testing.assert_close(layer.running_var, 0.75 + 0.25 * x.var(dims, unbiased=False) * n / (n - 1))
    assert layer.num_batches_tracked.item() == 1


@pytest.mark.parametrize("shape", [(3, 2), (4, 3, 5), (2, 2, 3, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_reference_gradcheck_and_gradgradcheck(shape, affine):
    x = make_input(shape, dtype=torch.float64).requires_grad_(True)
    w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_(True) if affine else None
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True) if affine else None
    args = [t for t in (x, w, b) if t is not None]

    def train_fn(*a):
        xx, ww, bb = (a[0], a[1], a[2]) if affine else (a[0], None, None)
        return ref_backend.batch_norm(xx, None, None, ww, bb, True, 0.0, 1e-3)

    # (forward mode: the hand-written jvp against finite differences; batched: the vmap rule)
    assert torch.autograd.gradcheck(train_fn, args, check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(train_fn, args)
    rm, rv = torch.randn(shape[1], dtype=torch.float64), torch.rand(shape[1], dtype=torch.float64) + 0.5

    def eval_fn(*a):
        xx, ww, bb = (a[0], a[1], a[2]) if affine else (a[0], None, None)
        return ref_backend.batch_norm(xx, rm, rv, ww, bb, False, 0.0, 1e-3)

    assert torch.autograd.gradcheck(eval_fn, args)
    assert torch.autograd.gradgradcheck(eval_fn, args)


def test_reference_backward_is_the_hand_written_one():
    """The training backward goes through the autograd.Function, not autograd's own derivation."""
    x = make_input((4, 3), dtype=torch.float64).requires_grad_(True)
    y = ref_backend.batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
    assert issubclass(type(y.grad_fn)._forward_cls, ref_backend._TrainingBatchNorm)


# ---- choosing a backend ----------------------------------------------------------------------------------


def _spy(monkeypatch):
    calls = []
    for name in BACKENDS:
        original = bnlab.backends._BACKENDS[name]

        def spy(*args, _name=name, _orig=original):
            calls.append(_name)
            return _orig(*args)

        monkeypatch.setitem(bnlab.backends._BACKENDS, name, spy)
    return calls


def test_backend_selection_order(monkeypatch):
    calls = _spy(monkeypatch)
    x = make_input((4, 3))
    assert bnlab.get_backend() == "auto"
    BF.batch_norm(x, None, None, training=True)
    assert calls[-1] == "native"  # auto on CPU
    monkeypatch.setenv("BNLAB_BACKEND", "reference")
    assert bnlab.get_backend() == "reference"
    BF.batch_norm(x, None, None, training=True)
    assert calls[-1] == "reference"
    bnlab.set_backend("native")  # code beats the environment
    BF.batch_norm(x, None, None, training=True)
    assert calls[-1] == "native"
    with bnlab.use_backend("reference") as chosen:
        assert chosen == "reference"
        BF.batch_norm(x, None, None, training=True)
        assert calls[-1] == "reference"
        BF.batch_norm(x, None, None, training=True, backend="native")  # the argument beats everything
        assert calls[-1] == "native"
    assert bnlab.get_backend() == "native"
    layer = bnlab.nn.BatchNorm1d(3, backend="reference")
    layer(x)
    assert calls[-1] == "reference"


def test_use_backend_restores_on_error():
    bnlab.set_backend("reference")
    with pytest.raises(RuntimeError), bnlab.use_backend("native"):
        raise RuntimeError("boom")
    assert bnlab.get_backend() == "reference"


def test_unknown_backends_are_named(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'; choose one of auto, reference, native"):
        bnlab.set_backend("cuda")
    with pytest.raises(ValueError, match="backend="):
        BF.batch_norm(make_input((4, 3)), None, None, training=True, backend="fast")
    monkeypatch.setenv("BNLAB_BACKEND", "nope")
    with pytest.raises(ValueError, match="environment variable BNLAB_BACKEND: unknown backend 'nope'"):
        BF.batch_norm(make_input((4, 3)), None, None, training=True)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\): backend=: unknown backend"):
        bnlab.nn.BatchNorm2d(3, backend="fast")
    assert bnlab.available_backends() == ("auto", "reference", "native", "triton")
