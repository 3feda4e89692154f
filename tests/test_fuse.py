"""bnlab.tools.fuse_bn_relu: BN+ReLU and BN+add+ReLU fused on a model's torch.fx graph."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab.nn
from bnlab.tools import FuseError, fuse_bn_relu
from conftest import BACKENDS


class Bottleneck(nn.Module):
    """torchvision's block in miniature: a shared in-place ReLU module, ``out += identity``, a downsample."""

    def __init__(self, channels: int, downsample: bool = False) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
            if downsample
            else None
        )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), Bottleneck(4), Bottleneck(4, downsample=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip


def _step(model, x):
    """One SGD step; (output, input gradient, parameter gradients by name)."""
    x = x.detach().requires_grad_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    out = model(x)
    out.square().sum().backward()
    optimizer.step()
    return out, x.grad, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_fused_resnet_trains_and_evaluates_as_the_unfused_one(backend, layout):
    """Every BN followed by a ReLU, directly or through the residual add, is fused (the downsample's BN, the
    residual, is not); two training steps give the same outputs, gradients, parameters and running
    statistics as the unfused model, and so does evaluation; state_dict keys are unchanged and load both
    ways; the model given is left as it was."""
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = bnlab.nn.convert(_net(), backend=backend).to(memory_format=memory_format)
    before = copy.deepcopy(model.state_dict())
    fused = fuse_bn_relu(model)
    assert fused.fused_bn_relu == ["1", "3.bn1", "3.bn2", "4.bn1", "4.bn2"]
    assert "bn_relu" in fused.code and "relu(" not in fused.code.replace("bn_relu(", "")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert fused.get_submodule("1") is not model.get_submodule("1")  # (a copy)
    assert list(fused.state_dict()) == list(model.state_dict())  # (the forward calls them in definition order)
    x = torch.randn(4, 3, 5, 5).contiguous(memory_format=memory_format)
    tol = {"atol": 1e-5, "rtol": 1e-5}
    for _ in range(2):
        for got, want in zip(_step(fused, x), _step(model, x), strict=True):
            torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(fused.state_dict(), model.state_dict(), **tol)
    torch.testing.assert_close(fused.eval()(x), model.eval()(x), **tol)
    model.load_state_dict(fused.state_dict())
    fused.load_state_dict(before)
    with pytest.raises(TypeError, match=r"BatchNorm2d is not a bnlab BN layer.*from before fuse_bn_relu"):
        bnlab.nn.convert(fused, to="torch")(x)


class _Cases(nn.Module):
    """One BN per pattern: d, f and g are fusable, the others not."""

    def __init__(self) -> None:
        super().__init__()
        for name in "abdefg":
            setattr(self, name, bnlab.nn.BatchNorm2d(2, backend="native"))
        self.c = nn.BatchNorm2d(2)  # torch's own: convert it first
        self.h = bnlab.nn.GhostBatchNorm2d(2, ghost_batch_size=2, backend="native")  # no fused form

    def forward(self, x):
        a = self.a(x)
        shared = F.relu(a) + a  # (a's output has another user)
        alpha = F.relu(torch.add(self.b(x), x, alpha=2.0))  # (not a plain add)
        torch_bn = F.relu(self.c(x))
        scalar = F.relu(self.e(x) + 1.0)  # (a number is no residual)
        inplace = F.relu(self.d(x), inplace=True)
        method = (self.f(x) + x).relu()
        function = torch.relu(x + self.g(x))  # (the BN second in the add)
        ghost = F.relu(self.h(x))
        return shared, alpha, torch_bn, scalar, inplace, method, function, ghost


def test_only_single_use_plain_bn_layers_before_a_relu_are_fused():
    """Left alone: a BN output with another user, an add with alpha, torch's layer, a number added, ghost BN;
    fused: an in-place F.relu, Tensor.relu after ``bn + x``, torch.relu after ``x + bn``. The results match
    the unfused model's."""
    model = _Cases()
    fused = fuse_bn_relu(model)
    assert fused.fused_bn_relu == ["d", "f", "g"]
    x = torch.randn(4, 2, 3, 3)
    for got, want in zip(fused(x), model(x), strict=True):
        torch.testing.assert_close(got, want)


def test_an_untraceable_model_is_refused_with_the_way_out():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = bnlab.nn.BatchNorm2d(2)

        def forward(self, x):
            return F.relu(self.bn(x)) if x.sum() > 0 else x

    with pytest.raises(FuseError, match=r"could not trace Branchy .*symbolically traceable.*model.backbone"):
        fuse_bn_relu(Branchy())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_residual_of_another_dtype_is_added_as_torch_adds(backend):
    """``relu(bn(x) + residual)`` with a float32 residual and a bf16 input is float32, as in eager torch (the
    fused kernels would write bf16: the add then runs as torch's, promoting), gradients included."""
    from bnlab import functional as BF

    x = torch.randn(4, 3, 2, 2).to(torch.bfloat16).requires_grad_()
    residual = torch.randn(4, 3, 2, 2, requires_grad=True)
    got = BF.batch_norm(x, None, None, training=True, backend=backend, residual=residual, activation="relu")
    want = F.relu(F.batch_norm(x, None, None, training=True) + residual)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    got.sum().backward()
    assert residual.grad is not None and torch.equal(residual.grad, (got > 0).float())


def test_the_fused_calls_run_the_layers_hooks_so_precise_bn_works_on_a_fused_model():
    """The fused graph calls each layer through ``__call__``: forward pre-hooks see its input (precise_bn's
    do: the same population statistics as on the unfused model); a ReLU module with hooks is not fused."""
    from bnlab.tools import precise_bn

    model = bnlab.nn.convert(_net(), backend="native")
    fused = fuse_bn_relu(model)
    batches = [torch.randn(4, 3, 5, 5) for _ in range(3)]
    precise_bn(model, batches, num_batches=3)
    precise_bn(fused, batches, num_batches=3)
    torch.testing.assert_close(fused.state_dict(), model.state_dict())
    hooked = _net()
    hooked[2].register_forward_hook(lambda *args: None)
    assert fuse_bn_relu(bnlab.nn.convert(hooked)).fused_bn_relu == ["3.bn1", "3.bn2", "4.bn1", "4.bn2"]


def test_the_layer_takes_the_residual_and_relu_itself_and_variants_refuse_them():
    layer, x, residual = bnlab.nn.BatchNorm2d(3), torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(layer(x, residual=residual, activation="relu"), F.relu(layer(x) + residual))
    ghost = bnlab.nn.GhostBatchNorm2d(3, ghost_batch_size=2)
    with pytest.raises(ValueError, match=r"GhostBatchNorm2d\(3\): residual= and activation= are for plain"):
        ghost(x, activation="relu")
