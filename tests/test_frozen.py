"""Frozen BN: layers that stay frozen across .train() and requires_grad_(True), and freeze_bn/unfreeze_bn."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import bnlab
from bnlab.nn.frozen import (
    FrozenAffineBatchNorm1d,
    FrozenAffineBatchNorm2d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
)
from bnlab.tools.freeze import freeze_bn, unfreeze_bn
from conftest import BACKENDS
from helpers import make_input

SHAPES = {1: (6, 4), 2: (3, 4, 3, 5), 3: (2, 4, 2, 3, 3)}
FROZEN = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
BNLAB_BN = {1: bnlab.nn.BatchNorm1d, 2: bnlab.nn.BatchNorm2d, 3: bnlab.nn.BatchNorm3d}


def _trained_bn(cls, channels=4, dims=2, steps=3, **kw):
    """A BN layer with non-trivial statistics and affine parameters, left in train mode."""
    bn = cls(channels, **kw)
    shape = (SHAPES[dims][0], channels, *SHAPES[dims][2:])
    for s in range(steps):
        bn(make_input(shape, seed=100 + s))
    if bn.affine:
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 2.0, channels))
            if bn.bias is not None:
                bn.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    return bn


def _algorithm2(x, bn):
    """The inference map of Algorithm 2 in float64: weight / sqrt(running_var + eps) * (x - running_mean) + bias."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    mean, var = bn.running_mean.double().view(view), bn.running_var.double().view(view)
    y = (x.double() - mean) / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        y = y * bn.weight.double().view(view)
    if bn.bias is not None:
        y = y + bn.bias.double().view(view)
    return y


def _model(bn_classes=(nn.BatchNorm1d, bnlab.nn.BatchNorm1d)):
    """Linear -> BN -> ReLU -> Linear -> BN -> Linear, with BN statistics already trained."""
    torch.manual_seed(0)
    first, second = bn_classes
    model = nn.Sequential(nn.Linear(5, 4), first(4), nn.ReLU(), nn.Linear(4, 3), second(3), nn.Linear(3, 2))
    for s in range(3):
        model(make_input((8, 5), seed=200 + s))
    return model


def _bn_state(model):
    """Copies of the state of every BN layer of a model (statistics and affine), by state_dict key."""
    bn_names = {name for name, m in model.named_modules() if not isinstance(m, (nn.Linear, nn.ReLU, nn.Sequential))}
    return {key: value.clone() for key, value in model.state_dict().items() if key.rsplit(".", 1)[0] in bn_names}


def _train(model, steps, optimizer=None, lr=0.01, seed=300):
    """SGD steps in train mode; the optimizer is over model.parameters() unless one is given."""
    model.train()
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.1)
    for s in range(steps):
        optimizer.zero_grad(set_to_none=False)  # zeros, not None: the setting that lets stale state leak
        model(make_input((8, 5), seed=seed + s)).square().sum().backward()
        optimizer.step()
    return optimizer


# ---- the layer ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("library", ["torch", "bnlab"])
@pytest.mark.parametrize("affine_trainable", [False, True])
def test_frozen_layer_stays_frozen_in_train_mode(backend, dims, library, affine_trainable):
    bn = _trained_bn((TORCH_BN if library == "torch" else BNLAB_BN)[dims], dims=dims)
    reference = copy.deepcopy(bn).eval()
    frozen = FROZEN[dims].from_bn(copy.deepcopy(bn), affine_trainable=affine_trainable)
    frozen.backend = backend
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen.train()
    for s in range(3):
        x = make_input(SHAPES[dims], seed=s, scale=3.0, offset=1.0).requires_grad_(True)
        y = frozen(x)
        y.square().sum().backward()  # a training step's forward and backward, in train mode
        torch.testing.assert_close(y, reference(x))
        torch.testing.assert_close(y.double(), _algorithm2(x, reference), atol=1e-5, rtol=1e-5)
    assert frozen.training
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, before[key]), key  # bit-identical, num_batches_tracked included


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine_trainable", [False, True])
def test_gradients_reach_the_input_and_only_trainable_affine(backend, affine_trainable):
    bn = _trained_bn(nn.BatchNorm2d)
    frozen = FrozenBatchNorm2d.from_bn(bn, affine_trainable=affine_trainable)
    frozen.backend = backend
    x = make_input(SHAPES[2], seed=1).requires_grad_(True)
    dy = make_input(SHAPES[2], seed=2)
    frozen.train()(x).backward(dy)
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().view(1, -1, 1, 1)
    torch.testing.assert_close(x.grad, dy * scale)  # the running statistics are constants: dx is just scaled dy
    if affine_trainable:
        x_hat = (x.detach() - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var + bn.eps).view(1, -1, 1, 1)
        torch.testing.assert_close(frozen.weight.grad, (dy * x_hat).sum((0, 2, 3)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(frozen.bias.grad, dy.sum((0, 2, 3)), atol=1e-5, rtol=1e-5)
    else:
        assert frozen.weight.grad is None and not frozen.weight.requires_grad


def test_requires_grad_true_cannot_unfreeze_a_frozen_affine():
    frozen = FrozenBatchNorm2d.from_bn(_trained_bn(nn.BatchNorm2d))
    frozen.requires_grad_(True)  # what `model.requires_grad_(True)` does to every layer
    assert list(frozen.parameters()) == []  # weight and bias are buffers: nothing for it (or an optimizer) to reach
    assert not frozen.weight.requires_grad and not frozen.bias.requires_grad
    assert not frozen.affine_trainable
    trainable = FrozenBatchNorm2d.from_bn(_trained_bn(nn.BatchNorm2d), affine_trainable=True)
    assert [name for name, _ in trainable.named_parameters()] == ["weight", "bias"]


def test_from_bn_shares_tensors_and_does_not_mutate_its_source():
    bn = _trained_bn(bnlab.nn.BatchNorm2d, name="block.bn", backend="reference")
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    frozen = FrozenBatchNorm2d.from_bn(bn)
    trainable = FrozenBatchNorm2d.from_bn(bn, affine_trainable=True)
    assert frozen.running_mean is bn.running_mean and frozen.num_batches_tracked is bn.num_batches_tracked
    assert frozen.weight.data_ptr() == bn.weight.data_ptr() and frozen.weight is not bn.weight
    assert trainable.weight is bn.weight and trainable.bias is bn.bias
    assert frozen.name == "block.bn" and frozen.backend == "reference" and frozen.training == bn.training
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())
    assert bn.weight.requires_grad and type(bn) is bnlab.nn.BatchNorm2d


def test_from_bn_refuses_what_it_cannot_freeze():
    with pytest.raises(TypeError, match=r"FrozenBatchNorm2d.from_bn: expected a BatchNorm2d .* got BatchNorm1d"):
        FrozenBatchNorm2d.from_bn(nn.BatchNorm1d(4))
    with pytest.raises(TypeError, match="SyncBatchNorm accepts any input rank"):
        FrozenBatchNorm2d.from_bn(nn.SyncBatchNorm(4))
    with pytest.raises(ValueError, match="no running statistics"):
        FrozenBatchNorm2d.from_bn(nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(TypeError):
        FrozenBatchNorm2d(4, 1e-5, 0.1)  # torch's positional momentum: refused, not read as `affine`
    with pytest.raises(ValueError, match="eps must be"):
        FrozenBatchNorm2d(4, eps=0.0)


def test_non_affine_and_bias_free_layers():
    frozen = FrozenBatchNorm1d.from_bn(_trained_bn(nn.BatchNorm1d, dims=1, affine=False))
    assert frozen.weight is None and frozen.bias is None
    assert list(frozen.state_dict()) == ["running_mean", "running_var", "num_batches_tracked"]
    bn = _trained_bn(nn.BatchNorm1d, dims=1, bias=False)
    x = make_input(SHAPES[1], seed=4)
    frozen = FrozenBatchNorm1d.from_bn(bn)
    assert frozen.bias is None and "bias=False" in repr(frozen)
    torch.testing.assert_close(frozen(x), copy.deepcopy(bn).eval()(x))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_wrong_input_rank_or_channels_names_the_layer(dims):
    frozen = FROZEN[dims](4, name="head.bn")
    bad = {1: (2, 4, 3, 3), 2: (2, 4, 3), 3: (2, 4, 3, 3)}[dims]
    hint = {1: r"\(N, 4\) or \(N, 4, L\)", 2: r"\(N, 4, H, W\)", 3: r"\(N, 4, D, H, W\)"}[dims]
    message = rf"FrozenBatchNorm{dims}d\(4\) 'head.bn': expected input of shape {hint}, got {len(bad)}-D input"
    with pytest.raises(ValueError, match=message):
        frozen(torch.randn(bad))
    with pytest.raises(ValueError, match=r"FrozenBatchNorm.* 'head.bn': input has 5 channels"):
        frozen(torch.randn(2, 5, *SHAPES[dims][2:]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_input(backend, dims):
    frozen = FROZEN[dims].from_bn(_trained_bn(TORCH_BN[dims], dims=dims))
    frozen.backend = backend
    x = make_input(SHAPES[dims], seed=5)
    y = frozen(make_input(SHAPES[dims], layout="channels_last", seed=5))
    torch.testing.assert_close(y, frozen(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(backend, dtype):
    bn = _trained_bn(nn.BatchNorm2d)
    frozen = FrozenBatchNorm2d.from_bn(bn, affine_trainable=True)
    frozen.backend = backend
    x = make_input(SHAPES[2], seed=6, dtype=dtype).requires_grad_(True)
    y = frozen.train()(x)  # float32 statistics and affine, half input: the mixed case autocast produces
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), _algorithm2(x.detach(), bn), atol=3e-2, rtol=3e-2)
    y.float().sum().backward()
    assert x.grad.dtype == dtype and frozen.weight.grad.dtype == torch.float32
    half = copy.deepcopy(frozen).to(dtype)  # everything in half precision
    torch.testing.assert_close(half(x.detach()).double(), _algorithm2(x.detach(), bn), atol=5e-2, rtol=5e-2)
    assert half.running_mean.dtype == dtype


# ---- checkpoints -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine_trainable", [False, True])
def test_checkpoints_load_both_ways(affine_trainable):
    theirs = _trained_bn(nn.BatchNorm2d)
    frozen = FrozenBatchNorm2d(4, affine_trainable=affine_trainable)
    frozen.load_state_dict(theirs.state_dict())  # strict
    assert frozen.state_dict().keys() == theirs.state_dict().keys()
    assert frozen.state_dict()._metadata[""]["version"] == theirs.state_dict()._metadata[""]["version"]
    for key, value in theirs.state_dict().items():
        assert torch.equal(frozen.state_dict()[key], value), key
    back = nn.BatchNorm2d(4)
    back.load_state_dict(frozen.state_dict())
    for key, value in frozen.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    # Through a file, and a checkpoint without num_batches_tracked (torch < 1.0, torchvision's FrozenBatchNorm2d).
    buffer = io.BytesIO()
    torch.save(frozen.state_dict(), buffer)
    buffer.seek(0)
    FrozenBatchNorm2d(4).load_state_dict(torch.load(buffer))
    old = {k: v for k, v in theirs.state_dict().items() if k != "num_batches_tracked"}
    FrozenBatchNorm2d(4).load_state_dict(old)


def test_frozen_affine_layer_checkpoints_and_trains_statistics_like_torch():
    theirs = _trained_bn(nn.BatchNorm2d)
    ours = FrozenAffineBatchNorm2d.from_bn(copy.deepcopy(theirs))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert list(ours.parameters()) == []
    for s in range(3):
        x = make_input(SHAPES[2], seed=10 + s)
        torch.testing.assert_close(ours(x), theirs(x))
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)
    fresh = nn.BatchNorm2d(4)
    fresh.load_state_dict(ours.state_dict())
    FrozenAffineBatchNorm1d(4).load_state_dict(nn.BatchNorm1d(4).state_dict())


# ---- freeze_bn / unfreeze_bn ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stats", "affine"), [(True, True), (True, False), (False, True)])
def test_freeze_bn_freezes_what_was_asked_through_training(stats, affine):
    model = _model()
    optimizer = _train(model, 1)  # momentum buffers and (zeroed) grads exist before freezing
    reference_eval = copy.deepcopy(model).eval()
    freeze_bn(model, stats=stats, affine=affine)
    frozen_before = _bn_state(model)
    _train(model, 3, optimizer)  # the optimizer built before freezing
    model.requires_grad_(True)
    _train(model, 3)  # and one built after, over model.parameters(), after requires_grad_(True)
    frozen_after = _bn_state(model)
    for name, value in frozen_before.items():
        is_stat = name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
        should_stay = stats if is_stat else affine
        assert torch.equal(frozen_after[name], value) == should_stay, name
    if stats and affine:
        # Still normalizes exactly as the original did in eval mode when it was frozen.
        h = model[0](make_input((8, 5), seed=7))
        assert torch.isfinite(h).all()
        torch.testing.assert_close(model.train()[1](h), reference_eval[1](h))


def test_freeze_bn_statistics_only_matches_eval_mode_and_keeps_affine_parameters():
    model = _model()
    eval_copy = copy.deepcopy(model).eval()
    freeze_bn(model, affine=False)
    assert [type(m) for m in model if not isinstance(m, (nn.Linear, nn.ReLU))] == [FrozenBatchNorm1d] * 2
    assert {name for name, _ in model.named_parameters()} >= {"1.weight", "1.bias", "4.weight", "4.bias"}
    x = make_input((8, 5), seed=8)
    torch.testing.assert_close(model.train()(x), eval_copy(x))


def _snapshot(model):
    return {
        "classes": [(name, type(m)) for name, m in model.named_modules()],
        "params": [(name, id(p), p.requires_grad) for name, p in model.named_parameters()],
        "training": [(name, m.training) for name, m in model.named_modules()],
        "names": [getattr(m, "name", None) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)],
        "state": [(k, v.clone()) for k, v in model.state_dict().items()],
    }


def _assert_same(a, b):
    for key in ("classes", "params", "training", "names"):
        assert a[key] == b[key], key
    assert [k for k, _ in a["state"]] == [k for k, _ in b["state"]]
    for (key, va), (_, vb) in zip(a["state"], b["state"], strict=True):
        assert va.dtype == vb.dtype and torch.equal(va, vb), key


def _mixed_model():
    """Torch and bnlab layers of each rank, a non-affine one, a frozen-by-the-user weight, mixed train/eval flags."""
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), bnlab.nn.BatchNorm2d(4, name="custom")),
        nn.Sequential(nn.Flatten(2), nn.BatchNorm1d(4, affine=False), bnlab.nn.BatchNorm1d(4)),
        nn.Unflatten(2, (1, 2, 8)),
        nn.BatchNorm3d(4),
    )
    for s in range(2):
        model(make_input((2, 3, 2, 8), seed=20 + s))
    model[0][1].weight.requires_grad_(False)  # the user's own choice: must survive the round trip
    model[1].eval()
    return model


@pytest.mark.parametrize(("stats", "affine"), [(True, True), (True, False), (False, True), (False, False)])
def test_round_trip_restores_everything(stats, affine):
    model = _mixed_model()
    before = _snapshot(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    frozen = freeze_bn(model, stats=stats, affine=affine)
    assert frozen is model  # inplace by default
    if stats:
        assert type(model[0][1]) is FrozenBatchNorm2d and type(model[3]) is FrozenBatchNorm3d
        assert model[0][2].name == "custom" and model[0][1].name == "0.1"
    restored = unfreeze_bn(model)
    assert restored is model
    _assert_same(_snapshot(model), before)
    # The optimizer built before freezing trains the restored BN layers again.
    model.train()
    model(make_input((2, 3, 2, 8), seed=30)).square().sum().backward()
    weight = model[3].weight.clone()
    optimizer.step()
    assert not torch.equal(model[3].weight, weight)


def test_round_trip_carries_changes_made_while_frozen():
    model = _mixed_model()
    bn = model[3]
    weight, running_mean = bn.weight, bn.running_mean
    freeze_bn(model)
    model.eval()
    model.to(torch.float64)  # replaces the frozen layer's buffers with new tensors
    loaded = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(loaded)
    unfreeze_bn(model)
    assert model[3] is bn and bn.weight is weight and bn.weight.dtype == torch.float64  # same object, new values
    assert not bn.training and all(not m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded[key]), key
    assert running_mean.dtype == torch.float32  # the old buffer object is simply no longer used


def test_inplace_false_leaves_the_input_untouched():
    model = _mixed_model()
    before = _snapshot(model)
    frozen = freeze_bn(model, inplace=False)
    _assert_same(_snapshot(model), before)
    assert frozen is not model and type(frozen[3]) is FrozenBatchNorm3d
    assert not {id(p) for p in frozen.parameters()} & {id(p) for p in model.parameters()}
    frozen_before = _snapshot(frozen)
    restored = unfreeze_bn(frozen, inplace=False)
    _assert_same(_snapshot(frozen), frozen_before)
    restored_snapshot, original = _snapshot(restored), before
    assert restored_snapshot["classes"] == original["classes"] and restored_snapshot["training"] == original["training"]
    for (key, va), (_, vb) in zip(restored_snapshot["state"], original["state"], strict=True):
        assert torch.equal(va, vb), key


def test_frozen_model_survives_deepcopy_and_pickle_then_unfreezes():
    model = freeze_bn(_mixed_model(), affine=False)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        restored = unfreeze_bn(clone)
        assert type(restored[3]) is nn.BatchNorm3d and type(restored[0][2]) is bnlab.nn.BatchNorm2d
        assert not {id(p) for p in restored.parameters()} & {id(p) for p in model.parameters()}
        for key, value in unfreeze_bn(model, inplace=False).state_dict().items():
            assert torch.equal(restored.state_dict()[key], value), key


def test_freeze_bn_sets_state_and_is_idempotent():
    model = _mixed_model()
    before = _snapshot(model)
    freeze_bn(model)
    layer = model[3]
    freeze_bn(model)  # same state: the same frozen layer
    assert model[3] is layer
    freeze_bn(model, stats=False, affine=True)  # another state: re-frozen from the original, not stacked
    assert type(model[3]).__name__ == "FrozenAffineBatchNorm3d"
    assert model[1][1].__class__ is nn.BatchNorm1d  # non-affine, stats not frozen: nothing to freeze
    freeze_bn(model, stats=False, affine=False)  # nothing frozen: the originals
    _assert_same(_snapshot(model), before)


def test_freeze_bn_on_a_single_layer_and_shared_layers():
    bn = _trained_bn(nn.BatchNorm2d)
    frozen = freeze_bn(bn)
    assert type(frozen) is FrozenBatchNorm2d and frozen.name == "BatchNorm2d"
    assert unfreeze_bn(frozen) is bn
    shared = nn.BatchNorm1d(4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    freeze_bn(model)
    assert model[0] is model[2] and type(model[0]) is FrozenBatchNorm1d
    unfreeze_bn(model)
    assert model[0] is shared and model[2] is shared


def test_hand_built_frozen_layers_are_left_alone():
    layer, affine_layer = FrozenBatchNorm1d(4), FrozenAffineBatchNorm1d(4)
    model = nn.Sequential(layer, affine_layer)
    for fn in (freeze_bn, unfreeze_bn):
        fn(model)
        assert model[0] is layer and model[1] is affine_layer


def test_freeze_bn_refuses_before_changing_anything():
    cases = [
        (nn.SyncBatchNorm(4), TypeError, "SyncBatchNorm, which freeze_bn does not handle"),
        (type("MyBN", (nn.BatchNorm2d,), {})(4), TypeError, "subclass of a BatchNorm class"),
        (nn.LazyBatchNorm1d(), ValueError, "not initialized yet"),
        (nn.BatchNorm1d(4, track_running_stats=False), ValueError, "has no running statistics"),
    ]
    for bad, error, message in cases:
        model = nn.Sequential(nn.BatchNorm1d(4), bad)
        with pytest.raises(error, match=message):
            freeze_bn(model)
        assert type(model[0]) is nn.BatchNorm1d  # the good layer before it was not swapped
    # Without running statistics, the affine parameters alone can still be frozen.
    model = freeze_bn(nn.Sequential(nn.BatchNorm1d(4, track_running_stats=False)), stats=False)
    assert type(model[0]) is FrozenAffineBatchNorm1d and list(model.parameters()) == []


# ---- torch.compile ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_matches_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layers = [
        nn.Linear(5, 4),
        nn.BatchNorm1d(4),
        nn.Linear(4, 4),
        nn.BatchNorm1d(4),
        nn.Linear(4, 3),
        nn.BatchNorm1d(3),
    ]
    eager = bnlab.nn.convert(nn.Sequential(*layers), backend=backend)
    eager(make_input((8, 5), seed=39))  # statistics worth freezing
    eager[1] = freeze_bn(eager[1], affine=False)  # statistics frozen, affine trainable
    eager[3] = freeze_bn(eager[3])  # both frozen
    eager[5] = freeze_bn(eager[5], stats=False)  # affine frozen, statistics train
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    eager.train()
    compiled_model.train()
    for s in range(3):
        x = make_input((8, 5), seed=40 + s)
        # (a random projection as the loss: through a last layer that normalizes, y.square().sum() is a
        # constant of the batch, and its gradients are float32 rounding noise of ~1e-5)
        probe = make_input((8, 3), seed=60 + s)
        ye, yc = eager(x), compiled(x)
        (ye * probe).sum().backward()
        (yc * probe).sum().backward()
        torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5)
    for (name, pe), pc in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(pc.grad, pe.grad, atol=1e-5, rtol=1e-5, msg=name)
    assert eager[1].weight.grad is not None and eager[3].weight.grad is None and eager[5].weight.grad is None
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_model.state_dict()[key], value, atol=1e-6, rtol=1e-6, msg=key)
    assert int(compiled_model[5].num_batches_tracked) == 4 and int(compiled_model[3].num_batches_tracked) == 1
