"""Folding eval-mode BN into the layer before it: the tensor core against float64 by hand, the model walker against
the unfolded model on every supported layer, and the cases it must leave alone or refuse."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import bnlab
from bnlab.tools.fold import FoldError, fold_bn, fold_weights

BN_CLASSES = {
    "torch": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    "bnlab": (bnlab.nn.BatchNorm1d, bnlab.nn.BatchNorm2d, bnlab.nn.BatchNorm3d),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: on a busy 2-core machine, torch's thread pool turns 1 ms convolutions into 20 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_bn(bn: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial running statistics and affine parameters (the defaults 0, 1, 1, 0 would hide most bugs)."""
    gen = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.copy_(torch.randn(c, generator=gen))
            bn.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(c, generator=gen))
        if bn.bias is not None:
            bn.bias.copy_(torch.randn(c, generator=gen))
    return bn


def assert_matches(folded_out: torch.Tensor, original_out: torch.Tensor, atol: float = 1e-5) -> None:
    """fold_bn's rule: max |difference| <= atol * max(1, max |original|)."""
    scale = max(1.0, original_out.abs().max().item())
    difference = (folded_out - original_out).abs().max().item()
    assert difference <= atol * scale, f"max difference {difference:.3g} > {atol:g} * {scale:.3g}"


# -- the tensor core against a float64 computation by hand ------------------------------------------------------


def hand_fold(weight, bias, mean, var, eps, gamma, beta, *, transpose=False, groups=1):
    """W' and b' with explicit loops over every output channel, in float64 NumPy."""
    w = weight.double().numpy().copy()
    channels = w.shape[1] * groups if transpose else w.shape[0]
    gamma = np.ones(channels) if gamma is None else gamma.double().numpy()
    beta = np.zeros(channels) if beta is None else beta.double().numpy()
    b = np.zeros(channels) if bias is None else bias.double().numpy()
    mean, var = mean.double().numpy(), var.double().numpy()
    new_b = np.empty(channels)
    for c in range(channels):
        s = gamma[c] / np.sqrt(var[c] + eps)
        if transpose:
            # Output channel c = g * (C_out / groups) + j is fed by input channels i of group g, at weight[i, j].
            per_group_out, per_group_in = w.shape[1], w.shape[0] // groups
            g, j = divmod(c, per_group_out)
            for i in range(g * per_group_in, (g + 1) * per_group_in):
                w[i, j] *= s
        else:
            w[c] *= s
        new_b[c] = (b[c] - mean[c]) * s + beta[c]
    return torch.from_numpy(w), torch.from_numpy(new_b)


@pytest.mark.parametrize(
    ("weight_shape", "transpose", "groups"),
    [
        ((6, 4, 3, 3), False, 1),  # Conv2d
        ((6, 2, 3), False, 2),  # grouped Conv1d: groups do not matter on dim 0
        ((5, 7), False, 1),  # Linear
        ((4, 3, 2, 2), True, 1),  # ConvTranspose2d
        ((6, 2, 3), True, 3),  # grouped ConvTranspose1d: 6 outputs, 2 per group
        ((4, 1, 2, 2, 2), True, 4),  # depthwise ConvTranspose3d
    ],
)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_weights_matches_float64_hand_computation(weight_shape, transpose, groups, with_bias, affine):
    gen = torch.Generator().manual_seed(0)
    channels = weight_shape[1] * groups if transpose else weight_shape[0]
    weight = torch.randn(weight_shape, generator=gen, dtype=torch.float64)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64) if with_bias else None
    mean = torch.randn(channels, generator=gen, dtype=torch.float64)
    var = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.1
    gamma = torch.randn(channels, generator=gen, dtype=torch.float64) if affine else None
    beta = torch.randn(channels, generator=gen, dtype=torch.float64) if affine else None

    new_w, new_b = fold_weights(
        weight, bias, mean, var, 1e-3, gamma, beta, out_channel_dim=1 if transpose else 0, groups=groups
    )
    want_w, want_b = hand_fold(weight, bias, mean, var, 1e-3, gamma, beta, transpose=transpose, groups=groups)
    torch.testing.assert_close(new_w, want_w, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(new_b, want_b, rtol=1e-14, atol=1e-14)
    assert new_w.shape == weight.shape and new_b.shape == (channels,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fold_weights_computes_in_float64_and_casts_back(dtype):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 3, 3, generator=gen).to(dtype)
    bias = torch.randn(8, generator=gen).to(dtype)
    stats = [torch.randn(8, generator=gen), torch.rand(8, generator=gen) + 1e-3, torch.randn(8, generator=gen)]
    mean, var, gamma = (t.to(dtype) for t in stats)
    new_w, new_b = fold_weights(weight, bias, mean, var, 1e-5, gamma, None)
    want_w, want_b = fold_weights(
        weight.double(), bias.double(), mean.double(), var.double(), 1e-5, gamma.double(), None
    )
    assert new_w.dtype == dtype and new_b.dtype == dtype
    # One rounding, at the end: exactly the float64 result cast down.
    assert torch.equal(new_w, want_w.to(dtype)) and torch.equal(new_b, want_b.to(dtype))


def test_fold_weights_without_bias_returns_a_bias_and_mutates_nothing():
    weight = torch.randn(4, 2)
    mean, var = torch.randn(4), torch.rand(4) + 0.5
    before = [t.clone() for t in (weight, mean, var)]
    new_w, new_b = fold_weights(weight, None, mean, var, 1e-5, None, None)
    torch.testing.assert_close(new_b, -mean / torch.sqrt(var + 1e-5))
    torch.testing.assert_close(new_w, weight / torch.sqrt(var + 1e-5)[:, None])
    assert all(torch.equal(a, b) for a, b in zip(before, (weight, mean, var), strict=True))


def test_fold_weights_is_differentiable():
    weight = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(3, dtype=torch.float64, requires_grad=True)
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda w, g: fold_weights(w, None, mean, var, 1e-5, g, None), (weight, gamma))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bn_mean": torch.zeros(5)}, r"bn_mean has shape \(5,\), expected \(4,\)"),
        ({"bias": torch.zeros(2)}, r"bias has shape \(2,\), expected \(4,\)"),
        ({"bn_var": torch.tensor([1.0, -2.0, 1.0, 1.0])}, "bn_var \\+ bn_eps must be > 0"),
        ({"bn_mean": torch.tensor([0.0, float("nan"), 0, 0])}, "NaN or inf"),
        ({"out_channel_dim": 2}, "out_channel_dim must be 0"),
        ({"out_channel_dim": 1, "groups": 3}, "groups=3 does not divide"),
    ],
)
def test_fold_weights_rejects_bad_input_with_the_reason(kwargs, message):
    args = {
        "weight": torch.randn(4, 4, 3),
        "bias": None,
        "bn_mean": torch.zeros(4),
        "bn_var": torch.ones(4),
        "bn_eps": 1e-5,
        "bn_weight": None,
        "bn_bias": None,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        fold_weights(**args)


# -- the model walker on every supported layer ------------------------------------------------------------------

# name: (layer builder taking `bias`, BN dims, input shape)
LAYERS = {
    "conv1d": (lambda bias: nn.Conv1d(4, 6, 3, padding=1, bias=bias), 1, (2, 4, 11)),
    "conv2d": (lambda bias: nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias), 2, (2, 4, 9, 7)),
    "conv3d": (lambda bias: nn.Conv3d(4, 6, (2, 3, 3), bias=bias), 3, (2, 4, 4, 6, 5)),
    "conv2d-groups-dilation": (lambda bias: nn.Conv2d(6, 9, 3, groups=3, dilation=2, bias=bias), 2, (2, 6, 8, 8)),
    "conv1d-depthwise": (lambda bias: nn.Conv1d(6, 6, 5, groups=6, padding=2, bias=bias), 1, (3, 6, 10)),
    "conv2d-depthwise-x2": (lambda bias: nn.Conv2d(4, 8, 3, groups=4, bias=bias), 2, (2, 4, 6, 6)),
    "convT1d-groups-output_padding": (
        lambda bias: nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1, groups=2, bias=bias),
        1,
        (2, 4, 7),
    ),
    "convT2d": (lambda bias: nn.ConvTranspose2d(4, 6, 3, bias=bias), 2, (2, 4, 5, 5)),
    "convT2d-groups-output_padding": (
        lambda bias: nn.ConvTranspose2d(6, 9, 3, stride=2, padding=1, output_padding=1, groups=3, bias=bias),
        2,
        (2, 6, 5, 4),
    ),
    "convT3d-groups-output_padding": (
        lambda bias: nn.ConvTranspose3d(4, 6, 2, stride=2, output_padding=(1, 0, 1), groups=2, bias=bias),
        3,
        (2, 4, 3, 3, 2),
    ),
    "convT2d-depthwise": (lambda bias: nn.ConvTranspose2d(5, 5, 3, groups=5, bias=bias), 2, (2, 5, 4, 4)),
    "linear": (lambda bias: nn.Linear(5, 7, bias=bias), 1, (3, 5)),
}


@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("library", ["torch", "bnlab"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_folded_model_matches_the_eval_model(layer_name, library, bias, affine):
    build, dims, input_shape = LAYERS[layer_name]
    layer = build(bias)
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    bn = randomize_bn(BN_CLASSES[library][dims - 1](channels, affine=affine))
    model = nn.Sequential(layer, bn, nn.ReLU()).eval()
    x = torch.randn(input_shape)

    folded, report = fold_bn(model, x, return_report=True)

    assert [(p.layer, p.bn, p.shape_checked) for p in report.folded] == [("0", "1", True)]
    assert report.skipped == [] and report.max_relative_error <= 1e-5
    assert type(folded[0]) is type(layer) and type(folded[1]) is nn.Identity
    assert folded[0].bias is not None and folded[0].weight.shape == layer.weight.shape
    with torch.no_grad():
        assert_matches(folded(x), model(x))
        assert_matches(fold_bn(model)(x), model(x))  # the same folding without an example input


def test_bn_with_weight_but_no_bias_folds():
    # torch 2.13's BatchNorm*d(bias=False): a scale without a shift.
    for library in BN_CLASSES:
        bn = randomize_bn(BN_CLASSES[library][1](6, bias=False))
        model = nn.Sequential(nn.Conv2d(3, 6, 3), bn).eval()
        x = torch.randn(2, 3, 6, 6)
        folded = fold_bn(model, x)
        assert isinstance(folded[1], nn.Identity)
        with torch.no_grad():
            assert_matches(folded(x), model(x))


def test_trained_network_folds_every_pair():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        bnlab.nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8, padding=1),  # depthwise
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
        bnlab.nn.BatchNorm1d(10),
    )
    for _ in range(5):  # a few steps: running statistics and affine parameters move away from their defaults
        model.zero_grad()
        model(torch.randn(8, 3, 4, 4) * 3 + 1).square().mean().backward()
        with torch.no_grad():  # plain SGD by hand: torch.optim's first use imports torch._dynamo (seconds)
            for parameter in model.parameters():
                parameter -= 0.1 * parameter.grad
    model.eval()
    x = torch.randn(4, 3, 4, 4) * 3 + 1

    folded, report = fold_bn(model, x, return_report=True)

    assert [(p.layer, p.bn) for p in report.folded] == [("0", "1"), ("3", "4"), ("6", "7"), ("9", "10")]
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules()) == 0
    with torch.no_grad():
        assert_matches(folded(x), model(x))


def test_float64_model_folds_to_float64():
    model = nn.Sequential(nn.Conv1d(3, 5, 3), randomize_bn(nn.BatchNorm1d(5))).double().eval()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    folded = fold_bn(model, x)
    assert folded[0].weight.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-12)


# -- Linear -> BatchNorm1d on (N, C) and (N, C, L) ---------------------------------------------------------------


def test_linear_then_batchnorm1d_on_2d_input_folds_and_says_whether_the_rank_was_checked():
    model = nn.Sequential(nn.Linear(6, 4), randomize_bn(nn.BatchNorm1d(4))).eval()
    x = torch.randn(5, 6)
    _, with_input = fold_bn(model, x, return_report=True)
    blind, without_input = fold_bn(model, return_report=True)
    assert [p.shape_checked for p in with_input.folded] == [True]
    # Without an input the rank is an assumption (a 2-D batch, the MLP case), and the report says so.
    assert [p.shape_checked for p in without_input.folded] == [False]
    assert without_input.max_relative_error is None
    with torch.no_grad():
        assert_matches(blind(x), model(x))


def test_linear_then_batchnorm1d_on_3d_input_is_not_folded():
    # Linear maps the last dim: (N, C, L) -> (N, C, out). BatchNorm1d(C) normalizes dim 1, which is not Linear's
    # feature axis, so its per-channel scale cannot move into Linear's rows.
    model = nn.Sequential(nn.Linear(5, 7), randomize_bn(nn.BatchNorm1d(3))).eval()
    x = torch.randn(4, 3, 5)
    folded, report = fold_bn(model, x, return_report=True)
    assert report.folded == [] and "shape mismatch" in report.skipped[0].reason
    with torch.no_grad():
        assert_matches(folded(x), model(x))

    # The trap: C == out_features, so sizes alone cannot tell. The example input's rank can.
    model = nn.Sequential(nn.Linear(6, 6), randomize_bn(nn.BatchNorm1d(6))).eval()
    x = torch.randn(4, 6, 6)
    folded, report = fold_bn(model, x, return_report=True)
    assert report.folded == []
    assert "3-D output" in report.skipped[0].reason and "last dim" in report.skipped[0].reason
    with torch.no_grad():
        assert_matches(folded(x), model(x))


# -- what the graph says must be left alone -----------------------------------------------------------------------


class ResidualAndFanOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = randomize_bn(nn.BatchNorm2d(4))  # registered right after conv1, but reads conv1(x) + x
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = randomize_bn(bnlab.nn.BatchNorm2d(4), seed=2)  # reads conv2, whose output also feeds the sum

    def forward(self, x):
        y = self.bn1(self.conv1(x) + x)
        z = self.conv2(y)
        return self.bn2(z) + z


class RegisteredBeforeButAppliedFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = randomize_bn(nn.BatchNorm2d(4))  # follows conv in registration order only

    def forward(self, x):
        return self.conv(self.bn(x))


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = randomize_bn(nn.BatchNorm2d(4))

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)  # one module, two calls: new weights would change both


@pytest.mark.parametrize(
    ("model_class", "reasons"),
    [
        (ResidualAndFanOut, {"bn1": "call_function 'add'", "bn2": "is also used by call_function 'add'"}),
        (RegisteredBeforeButAppliedFirst, {"bn": "the model's input 'x'"}),
        (SharedConv, {"bn": "called 2 times"}),
    ],
)
def test_bn_not_directly_after_a_single_use_layer_is_left_alone(model_class, reasons):
    model = model_class().eval()
    x = torch.randn(2, 4, 5, 5)
    folded, report = fold_bn(model, x, return_report=True)
    assert report.folded == []
    assert {s.bn: s.reason for s in report.skipped}.keys() == reasons.keys()
    for skipped in report.skipped:
        assert reasons[skipped.bn] in skipped.reason
    assert all(isinstance(getattr(folded, name), nn.BatchNorm2d) for name in reasons)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)


def test_tied_weights_are_untied_rather_than_corrupted():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 3)
            self.b.weight = self.a.weight
            self.bn = randomize_bn(nn.BatchNorm2d(3))

        def forward(self, x):
            return self.bn(self.a(x)), self.b(x)

    model = Tied().eval()
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold_bn(model, x, return_report=True)
    assert len(report.folded) == 1
    with torch.no_grad():
        for got, want in zip(folded(x), model(x), strict=True):
            assert_matches(got, want)


def test_bn_registered_under_two_names_is_replaced_under_both():
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv1d(2, 3, 1), randomize_bn(nn.BatchNorm1d(3))
            self.alias = self.bn

        def forward(self, x):
            return self.alias(self.conv(x))

    folded = fold_bn(Aliased().eval(), torch.randn(2, 2, 4))
    assert isinstance(folded.bn, nn.Identity) and folded.alias is folded.bn


# -- refusals ------------------------------------------------------------------------------------------------------


def named_block(bn: nn.Module) -> nn.Module:
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(3, bn.num_features, 3), bn=bn))


@pytest.mark.parametrize("library", ["torch", "bnlab"])
def test_training_mode_is_refused_naming_the_layer(library):
    model = nn.Sequential(OrderedDict(block=named_block(BN_CLASSES[library][1](4)))).train()
    with pytest.raises(FoldError, match=r"BatchNorm2d 'block\.bn' is in training mode.*model\.eval\(\)"):
        fold_bn(model, torch.randn(2, 3, 5, 5))


def test_bn_without_running_statistics_is_left_with_the_reason_or_refused_when_strict():
    model = named_block(nn.BatchNorm2d(4, track_running_stats=False)).eval()
    x = torch.randn(2, 3, 5, 5)
    folded, report = fold_bn(model, x, return_report=True)
    assert report.folded == [] and "track_running_stats=False" in report.skipped[0].reason
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))
    with pytest.raises(FoldError, match=r"strict=True.*'bn'.*track_running_stats=False"):
        fold_bn(model, x, strict=True)


def test_channel_mismatch_is_left_with_the_reason():
    # A Conv1d fed an unbatched (C, L) input returns (C_out, L), and BatchNorm1d(L) normalizes dim 1: a model that
    # runs, but whose BN channels are not the conv's.
    model = nn.Sequential(nn.Conv1d(2, 3, 1), randomize_bn(nn.BatchNorm1d(7))).eval()
    x = torch.randn(2, 7)
    folded, report = fold_bn(model, x, return_report=True)
    assert report.folded == [] and "shape mismatch" in report.skipped[0].reason
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


def test_untraceable_model_is_refused_with_what_to_do():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:
                x = -x
            return self.bn(self.conv(x))

    with pytest.raises(FoldError, match=r"torch\.fx could not trace DataDependent.*fold_bn\(model\.backbone\)"):
        fold_bn(DataDependent().eval())


def test_uninitialized_lazy_layer_is_refused():
    with pytest.raises(FoldError, match="not initialized"):
        fold_bn(nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4)).eval())


class DoublingBN(nn.BatchNorm2d):
    """A subclass whose eval forward is not BN's: folding it is wrong, and the check must say so."""

    def forward(self, x):
        return 2 * super().forward(x)


class TwoHeads(nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), bn

    def forward(self, x):
        return {"input": x, "features": self.bn(self.conv(x))}


def test_check_names_the_first_output_that_differs():
    model = TwoHeads(randomize_bn(DoublingBN(4))).eval()
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(FoldError, match=r"output\['features'\].*atol \* scale = 1e-05"):
        fold_bn(model, x)
    folded, report = fold_bn(model, x, check=False, return_report=True)  # the user may insist
    assert isinstance(folded.bn, nn.Identity) and report.max_relative_error is None


def test_check_passes_on_nested_outputs_and_records_the_error():
    model = TwoHeads(randomize_bn(bnlab.nn.BatchNorm2d(4))).eval()
    _, report = fold_bn(model, torch.randn(2, 3, 5, 5), return_report=True)
    assert len(report.folded) == 1 and 0 <= report.max_relative_error <= 1e-5
    assert "folded BatchNorm2d 'bn' into Conv2d 'conv'" in str(report)


# -- the input model is left untouched ------------------------------------------------------------------------------


def test_input_model_is_unchanged():
    model = nn.Sequential(
        named_block(randomize_bn(bnlab.nn.BatchNorm2d(4))),
        nn.Dropout(0.5),  # left in training mode: the check must still compare like with like
        nn.Flatten(),
        nn.Linear(36, 5, bias=False),
        randomize_bn(nn.BatchNorm1d(5), seed=3),
    ).eval()
    model[1].train()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    classes = [(name, type(module)) for name, module in model.named_modules()]
    modes = [module.training for module in model.modules()]

    folded, report = fold_bn(model, torch.randn(3, 3, 5, 5), return_report=True)

    assert len(report.folded) == 2
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
    assert [(name, type(module)) for name, module in model.named_modules()] == classes
    assert [module.training for module in model.modules()] == modes
    assert model[3].bias is None
    assert folded[3].weight is not model[3].weight and isinstance(folded[3].bias, nn.Parameter)
    assert "0.bn.running_mean" not in folded.state_dict() and "3.bias" in folded.state_dict()


def test_folded_model_carries_nothing_from_the_tracer():
    class WithConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv1d(2, 2, 1), randomize_bn(nn.BatchNorm1d(2))

        def forward(self, x):
            return self.bn(self.conv(x)) + torch.tensor([1.0, 2.0]).view(1, 2, 1)  # fx stores this on the root

    model = WithConstant().eval()
    folded = fold_bn(model, torch.randn(2, 2, 3))
    assert isinstance(folded.bn, nn.Identity) and set(vars(folded)) == set(vars(model))


class ReadsTheWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), randomize_bn(nn.BatchNorm2d(4))

    def forward(self, x):
        return self.bn(self.conv(x)), self.conv.weight.square().sum()  # e.g. a penalty: folding would change it


class StandardizedConv(nn.Conv2d):
    """Not W x + b: the weight is standardized on every call, so a folded scale would be standardized away.

    fx traces through it (it is not a stock layer), so BN's input is the ``conv2d`` call inside it.
    """

    def forward(self, x):
        w = self.weight
        return self._conv_forward(x, (w - w.mean()) / w.std(), self.bias)


def with_hook(model):
    model[1].register_forward_hook(lambda module, args, output: None)
    return model


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (ReadsTheWeight, "forward also reads the parameters"),
        (lambda: nn.Sequential(StandardizedConv(3, 4, 3), randomize_bn(nn.BatchNorm2d(4))), "not the output of a Conv"),
        (lambda: with_hook(nn.Sequential(nn.Conv2d(3, 4, 3), randomize_bn(nn.BatchNorm2d(4)))), "forward hooks"),
    ],
)
def test_layers_whose_weights_matter_elsewhere_are_left_alone(build, reason):
    model = build().eval()
    x = torch.randn(2, 3, 5, 5)
    folded, report = fold_bn(model, x, return_report=True)
    assert report.folded == [] and reason in report.skipped[0].reason
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)
