"""precise_bn: Algorithm 2 over a model's BN inputs, in one pass, atomically, and without side effects."""

from __future__ import annotations

import datetime
import multiprocessing
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import bnlab.nn
from bnlab.reference import population_statistics
from bnlab.tools.precise import ESTIMATORS, PopulationAccumulator, default_forward, precise_bn

BN1D = (nn.BatchNorm1d, bnlab.nn.BatchNorm1d)
TIGHT = {"rtol": 1e-12, "atol": 1e-12}  # float64 end to end: only summation order differs


def _features(sizes, features, seed=0, scale=2.0, offset=3.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, features, generator=gen, dtype=torch.float64) * scale + offset).to(dtype) for n in sizes]


def _expected(inputs, estimator):
    """Algorithm 2 from the reference, or the unbiased variance of all values pooled into one sample."""
    arrays = [x.detach().double().numpy() for x in inputs]
    mean, var = population_statistics(arrays)
    if estimator == "total":
        channels_last = [np.moveaxis(a, 1, -1).reshape(-1, a.shape[1]) for a in arrays]
        var = np.concatenate(channels_last).var(axis=0, ddof=1)
    return mean, var


def _assert_stats(stats, expected, **tol):
    np.testing.assert_allclose(stats.mean.numpy(), expected[0], **(tol or TIGHT))
    np.testing.assert_allclose(stats.var.numpy(), expected[1], **(tol or TIGHT))


def _buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def _assert_same_buffers(model, before):
    after = _buffers(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def _assert_no_hooks(model):
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks, module


def _modes(model):
    return [m.training for m in model.modules()]


def _stale(bn, mean=50.0, var=1e-2):
    """Running statistics far from anything the data gives, so a layer that used them would show it."""
    with torch.no_grad():
        bn.running_mean.fill_(mean)
        bn.running_var.fill_(var)
        bn.num_batches_tracked.fill_(7)


# --- equals Algorithm 2 on the layers' inputs ---------------------------------------------------------


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("bn_cls", BN1D)
def test_single_bn_after_linear_equals_algorithm2(bn_cls, estimator):
    model = nn.Sequential(nn.Linear(5, 4), bn_cls(4)).double()
    _stale(model[1])
    batches = _features([10, 7, 13, 2], 5)  # uneven, with a short batch: weights are m_b
    with torch.no_grad():
        inputs = [model[0](x) for x in batches]

    report = precise_bn(model, batches, num_batches=4, estimator=estimator)

    assert set(report) == {"1"}
    assert (report["1"].batches, report["1"].values) == (4, 32)
    _assert_stats(report["1"], _expected(inputs, estimator))
    assert torch.equal(model[1].running_mean, report["1"].mean)
    assert torch.equal(model[1].running_var, report["1"].var)


def _conv_model(flavour):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    if flavour == "bnlab":
        model = bnlab.nn.convert(model)
    elif flavour == "sync":  # without torch.distributed a SyncBatchNorm normalizes like a BatchNorm
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


@pytest.mark.parametrize("flavour", ["torch", "bnlab", "sync"])
def test_conv_4d_float32_equals_algorithm2(flavour):
    model = _conv_model(flavour)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 3, 7, 6, generator=gen) + 1.0 for n in (4, 4, 3)]
    with torch.no_grad():
        inputs = [model[0](x) for x in batches]  # float32, the same bits the BN layer sees

    report = precise_bn(model, batches, num_batches=3)

    assert (report["1"].batches, report["1"].values) == (3, 11 * 5 * 4)  # batch size times spatial size
    _assert_stats(report["1"], _expected(inputs, "algorithm2"), rtol=1e-10, atol=1e-12)
    expected_mean, expected_var = (torch.from_numpy(v).float() for v in _expected(inputs, "algorithm2"))
    torch.testing.assert_close(model[1].running_mean, expected_mean)  # float32 buffers: one rounding
    torch.testing.assert_close(model[1].running_var, expected_var)


def test_bn3d_5d_input_equals_algorithm2():
    bn = bnlab.nn.BatchNorm3d(2).double()
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(n, 2, 3, 2, 4, generator=gen, dtype=torch.float64) for n in (2, 3)]

    report = precise_bn(bn, batches, num_batches=2)

    assert set(report) == {""}  # the model itself is the layer
    _assert_stats(report[""], _expected(batches, "algorithm2"))


def _two_bn_model(bn_cls):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), bn_cls(5), nn.ReLU(), nn.Linear(5, 3), bn_cls(3)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-1.0, 1.0)
    _stale(model[1])
    _stale(model[4])
    return model


@pytest.mark.parametrize("bn_cls", BN1D)
def test_two_bn_layers_in_one_pass_with_batch_statistics_upstream(bn_cls):
    """The chosen semantics: during the pass BN1 normalizes with each batch's statistics, as in training,
    so BN2's statistics are Algorithm 2 over the inputs it sees in training, whatever BN1's buffers hold."""
    model = _two_bn_model(bn_cls)
    bn1 = model[1]
    stale_mean, stale_var = bn1.running_mean.clone(), bn1.running_var.clone()
    batches = _features([8, 8, 5], 6, seed=4)
    with torch.no_grad():
        h1 = [model[0](x) for x in batches]
        h2_train = [model[3](F.relu(F.batch_norm(h, None, None, bn1.weight, bn1.bias, True, 0.0, bn1.eps))) for h in h1]
        h2_stale = [model[3](F.relu(F.batch_norm(h, stale_mean, stale_var, bn1.weight, bn1.bias, False))) for h in h1]

    report = precise_bn(model, batches, num_batches=3)

    assert set(report) == {"1", "4"}
    _assert_stats(report["1"], _expected(h1, "algorithm2"))
    _assert_stats(report["4"], _expected(h2_train, "algorithm2"))
    # Had BN1 run in eval mode with its stale statistics, BN2 would have seen very different inputs.
    assert not np.allclose(report["4"].mean.numpy(), _expected(h2_stale, "algorithm2")[0], rtol=1e-3)


def test_other_modules_run_in_eval_mode_so_dropout_is_off():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.9), bnlab.nn.BatchNorm1d(3)).double()
    model.train()
    batches = _features([6, 6], 4)
    with torch.no_grad():
        inputs = [model[0](x) for x in batches]  # what the BN layer sees at inference: no dropout

    report = precise_bn(model, batches, num_batches=2)

    _assert_stats(report["2"], _expected(inputs, "algorithm2"))
    assert all(_modes(model))


# --- how the data is split into batches ---------------------------------------------------------------

SPLITS = ([10] * 6, [15] * 4, [7, 23, 2, 28])


def _split(data, sizes):
    return list(torch.split(data, sizes))


def test_mean_and_total_variance_do_not_depend_on_the_split():
    data = torch.cat(_features([60], 4, seed=5, offset=-2.0))
    results = {}
    for sizes in SPLITS:
        bn = nn.BatchNorm1d(4).double()
        results[tuple(sizes)] = precise_bn(bn, _split(data, sizes), num_batches=len(sizes), estimator="total")[""]
    expected_mean, expected_var = data.mean(0), data.var(0, correction=1)
    for stats in results.values():
        assert stats.values == 60
        torch.testing.assert_close(stats.mean, expected_mean, **TIGHT)
        torch.testing.assert_close(stats.var, expected_var, **TIGHT)


def test_algorithm2_variance_depends_on_the_split_as_documented():
    """Algorithm 2's mean is the split-invariant mean of all values; its variance averages within-batch
    variances, so it depends on the split exactly by the spread of the batch means (law of total variance),
    and not on the order of the batches."""
    data = torch.cat(_features([60], 4, seed=5, offset=-2.0))
    variances = []
    for sizes in SPLITS:
        batches = _split(data, sizes)
        stats = precise_bn(nn.BatchNorm1d(4).double(), batches, num_batches=len(batches))[""]
        _assert_stats(stats, _expected(batches, "algorithm2"))
        torch.testing.assert_close(stats.mean, data.mean(0), **TIGHT)
        # (M - 1) Var_total = sum (m_b - 1) s_b^2 + sum m_b (mu_b - mean)^2
        within = sum((len(b) - 1) * b.var(0, correction=1) for b in batches)
        between = sum(len(b) * (b.mean(0) - data.mean(0)).square() for b in batches)
        torch.testing.assert_close(within + between, 59 * data.var(0, correction=1), **TIGHT)
        reversed_stats = precise_bn(nn.BatchNorm1d(4).double(), batches[::-1], num_batches=len(batches))[""]
        torch.testing.assert_close(reversed_stats.var, stats.var, **TIGHT)
        variances.append(stats.var)
    assert not torch.allclose(variances[0], variances[2], rtol=1e-6)


def test_accumulator_keeps_precision_with_a_large_offset():
    gen = torch.Generator().manual_seed(6)
    batches = [torch.randn(n, 3, 5, generator=gen, dtype=torch.float64) + 1e8 for n in (9, 4, 11)]
    acc = PopulationAccumulator(3)
    for b in batches:
        acc.update(b)
    _, var = acc.statistics("total")
    everything = torch.cat([b.transpose(0, 1).reshape(3, -1) for b in batches], 1)
    # float64 spacing at 1e8 is 1.5e-8, so the data itself is only that precise; E[x^2] - E[x]^2 would be
    # off by about 1e16 * 2^-52 = 2, i.e. by more than the variance.
    exact = (everything - everything.mean(1, keepdim=True)).square().sum(1) / 119
    torch.testing.assert_close(var, exact, rtol=1e-7, atol=0)
    mean, var = acc.statistics("algorithm2")
    _assert_stats(type("S", (), {"mean": mean, "var": var}), _expected(batches, "algorithm2"), rtol=1e-7, atol=0)


# --- failures leave the model untouched ---------------------------------------------------------------


def test_runs_out_of_data_raises_and_leaves_statistics_untouched():
    model = _two_bn_model(bnlab.nn.BatchNorm1d)
    model.eval()
    before, modes = _buffers(model), _modes(model)

    with pytest.raises(ValueError, match=r"num_batches=5 but the data ran out after 3 batches"):
        precise_bn(model, _features([4, 4, 4], 6), num_batches=5)

    _assert_same_buffers(model, before)
    assert _modes(model) == modes
    _assert_no_hooks(model)


def test_error_in_forward_restores_modes_buffers_and_hooks():
    model = _two_bn_model(nn.BatchNorm1d)
    model.train()
    model[4].eval()  # a mixed state, to check each module gets its own mode back
    before, modes = _buffers(model), _modes(model)
    calls = []

    def forward(model, batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return model(batch)

    with pytest.raises(RuntimeError, match="boom"):
        precise_bn(model, _features([4, 4, 4], 6), num_batches=3, forward=forward)

    _assert_same_buffers(model, before)
    assert _modes(model) == modes
    _assert_no_hooks(model)


def test_batch_with_one_value_per_channel_names_the_layer():
    model = _two_bn_model(bnlab.nn.BatchNorm1d)
    before = _buffers(model)
    with pytest.raises(ValueError, match=r"BatchNorm1d\(5\) '1'.*one value per channel"):
        precise_bn(model, _features([4, 1], 6), num_batches=2)
    _assert_same_buffers(model, before)
    _assert_no_hooks(model)


def test_nonfinite_input_raises_and_writes_nothing():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()
    batches = _features([4, 4], 3)
    batches[1][0, 0] = float("nan")
    before = _buffers(model)
    with pytest.raises(FloatingPointError, match=r"\['1'\]"):
        precise_bn(model, batches, num_batches=2)
    _assert_same_buffers(model, before)


# --- side effects on success --------------------------------------------------------------------------


def test_success_changes_only_the_running_statistics():
    model = _two_bn_model(bnlab.nn.BatchNorm1d)
    model.train()
    model[0].eval()
    params = {k: v.clone() for k, v in model.named_parameters()}
    modes = _modes(model)

    precise_bn(model, _features([5, 5], 6), num_batches=2, progress=True)

    assert _modes(model) == modes
    for key, value in model.named_parameters():
        assert torch.equal(value, params[key]) and value.grad is None
    # num_batches_tracked counts training steps; recomputing statistics is not one.
    assert model[1].num_batches_tracked.item() == 7 and model[4].num_batches_tracked.item() == 7
    _assert_no_hooks(model)


def test_takes_exactly_num_batches_from_an_iterator():
    pulled = []

    def stream():
        for i, x in enumerate(_features([4] * 10, 6)):
            pulled.append(i)
            yield x

    report = precise_bn(_two_bn_model(nn.BatchNorm1d), stream(), num_batches=4)
    assert pulled == [0, 1, 2, 3] and report["1"].batches == 4


def test_model_without_bn_returns_empty_report_without_reading_data():
    def stream():
        raise AssertionError("read")
        yield

    assert precise_bn(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)), stream()) == {}


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "3"])
def test_num_batches_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="num_batches"):
        precise_bn(nn.BatchNorm1d(2), [], num_batches=bad)


def test_unknown_estimator():
    with pytest.raises(ValueError, match="estimator='mean'"):
        precise_bn(nn.BatchNorm1d(2), [], estimator="mean")


def test_works_under_no_grad():
    batches = _features([5, 6], 6)
    expected = precise_bn(_two_bn_model(nn.BatchNorm1d), batches, num_batches=2)
    with torch.no_grad():
        got = precise_bn(_two_bn_model(nn.BatchNorm1d), batches, num_batches=2)
    for name in expected:
        torch.testing.assert_close(got[name].var, expected[name].var, **TIGHT)


def test_shared_layer_counts_each_call_as_a_batch():
    class TwoHalves(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3).double()

        def forward(self, x):
            return torch.cat([self.bn(half) for half in x.chunk(2)])

    batches = _features([6, 8], 3)
    report = precise_bn(TwoHalves(), batches, num_batches=2)
    assert report["bn"].batches == 4
    _assert_stats(report["bn"], _expected([h for x in batches for h in x.chunk(2)], "algorithm2"))


def test_unused_layer_warns_and_is_left_alone():
    model = nn.ModuleDict({"used": nn.BatchNorm1d(2), "unused": nn.BatchNorm1d(2)}).double()
    _stale(model["unused"])
    before = model["unused"].running_mean.clone()
    with pytest.warns(RuntimeWarning, match="unused"):
        report = precise_bn(model, _features([4, 4], 2), num_batches=2, forward=lambda m, b: m["used"](b))
    assert report["unused"].batches == 0 and report["unused"].mean is None
    assert torch.equal(model["unused"].running_mean, before)
    assert report["used"].batches == 2


# --- batches of other shapes: dicts, tuples -----------------------------------------------------------


def test_tuples_lists_and_dicts():
    inputs = _features([5, 7], 6)
    targets = [torch.zeros(len(x)) for x in inputs]
    expected = precise_bn(_two_bn_model(nn.BatchNorm1d), inputs, num_batches=2)["4"]

    pairs = precise_bn(_two_bn_model(nn.BatchNorm1d), list(zip(inputs, targets, strict=True)), num_batches=2)["4"]
    lists = precise_bn(
        _two_bn_model(nn.BatchNorm1d), [[x, t] for x, t in zip(inputs, targets, strict=True)], num_batches=2
    )["4"]
    dicts = [{"label": t, "image": x} for x, t in zip(inputs, targets, strict=True)]
    keyed = precise_bn(_two_bn_model(nn.BatchNorm1d), dicts, num_batches=2, forward=lambda m, b: m(b["image"]))["4"]

    for got in (pairs, lists, keyed):
        torch.testing.assert_close(got.mean, expected.mean, **TIGHT)
        torch.testing.assert_close(got.var, expected.var, **TIGHT)
    model = _two_bn_model(nn.BatchNorm1d)
    before = _buffers(model)
    with pytest.raises(TypeError, match=r"forward=lambda"):
        precise_bn(model, dicts, num_batches=2)
    _assert_same_buffers(model, before)
    _assert_no_hooks(model)


def test_default_forward():
    model = nn.Identity()
    x = torch.ones(2)
    assert default_forward(model, x) is x
    assert default_forward(model, (x, "target")) is x
    with pytest.raises(ValueError, match="empty"):
        default_forward(model, ())


# --- sanity: precise statistics fix a stale EMA -------------------------------------------------------


def _blobs(n, gen):
    labels = torch.randint(0, 2, (n,), generator=gen)
    centers = torch.tensor([[1.0] * 4 + [-1.0] * 4, [-1.0] * 4 + [1.0] * 4])
    return centers[labels] + 0.7 * torch.randn(n, 8, generator=gen) + 10.0, labels


def test_precise_statistics_fix_a_stale_ema():
    gen = torch.Generator().manual_seed(0)
    (x_train, y_train), (x_test, y_test) = _blobs(600, gen), _blobs(400, gen)
    torch.manual_seed(0)
    # momentum=0.001: the EMA barely leaves its initial (0, 1) while training sees inputs offset by ~10.
    model = nn.Sequential(
        nn.Linear(8, 16, bias=False), bnlab.nn.BatchNorm1d(16, momentum=0.001), nn.ReLU(), nn.Linear(16, 2)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(60):
        i = (step * 50) % 600
        optimizer.zero_grad()
        F.cross_entropy(model(x_train[i : i + 50]), y_train[i : i + 50]).backward()
        optimizer.step()

    def accuracy():
        model.eval()
        with torch.no_grad():
            return (model(x_test).argmax(1) == y_test).float().mean().item()

    stale, stale_mean = accuracy(), model[1].running_mean.clone()
    report = precise_bn(model, [(x_train[i : i + 50], y_train[i : i + 50]) for i in range(0, 600, 50)], num_batches=12)
    precise = accuracy()

    assert report["1"].values == 600
    assert (report["1"].mean.float() - stale_mean).abs().max() > 1.0  # the premise: the EMA was stale
    assert precise >= stale and precise >= 0.98, (stale, precise)  # here 0.94 -> 1.0


# --- torch.distributed: two gloo processes ------------------------------------------------------------


def _distributed_model():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3), bnlab.nn.BatchNorm1d(3))


def _distributed_batches():
    return _features([8, 5, 9, 4, 7, 6], 6, seed=8, dtype=torch.float32)


def _distributed_worker(rank, world_size, init_file, out_file):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=30),
    )  # fmt: skip
    try:
        mine = _distributed_batches()[rank::world_size]
        result = {}
        for estimator in ESTIMATORS:
            model = _distributed_model()
            report = precise_bn(model, mine, num_batches=len(mine), estimator=estimator)
            result[estimator] = {name: (s.batches, s.values, s.mean, s.var) for name, s in report.items()}
            result[estimator]["buffers"] = _buffers(model)
        model = _distributed_model()
        try:  # rank 1 runs out: every rank must raise, none may hang in a collective
            precise_bn(model, mine[: len(mine) - rank], num_batches=len(mine))
        except ValueError as error:
            result["ran_out"] = str(error)
        torch.save(result, out_file)
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_agree_and_equal_one_process_on_all_batches(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [ctx.Process(target=_distributed_worker, args=(r, 2, tmp_path / "store", outs[r])) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 90
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, "a rank did not finish in time"
    assert [p.exitcode for p in procs] == [0, 0]

    results = [torch.load(out, weights_only=False) for out in outs]
    for estimator in ESTIMATORS:
        expected = precise_bn(_distributed_model(), _distributed_batches(), num_batches=6, estimator=estimator)
        for result in results:
            got = result[estimator]
            for name, stats in expected.items():
                batches, values, mean, var = got[name]
                assert (batches, values) == (stats.batches, stats.values) == (6, 39)
                torch.testing.assert_close(mean, stats.mean, **TIGHT)
                torch.testing.assert_close(var, stats.var, **TIGHT)
        for key, value in results[0][estimator]["buffers"].items():
            assert torch.equal(results[1][estimator]["buffers"][key], value), key
    assert "ran out after 3 batches on this rank (2 on the rank with the fewest)" in results[0]["ran_out"]
    assert "ran out after 2 batches on this rank (2 on the rank with the fewest)" in results[1]["ran_out"]
