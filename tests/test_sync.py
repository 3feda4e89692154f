"""bnlab.nn.SyncBatchNorm across 2 and 3 gloo processes, its fallbacks, conversion and checkpoints.

The distributed checks spawn one world per size (2 and 3 processes on 127.0.0.1, gloo, CPU) that runs every
scenario in turn and saves what each rank saw; the tests then compare those records, in this process, with
one `bnlab.nn.BatchNorm*d` on the concatenated batch. Every wait is bounded: the collectives by the process
group's timeout, the world by `WORLD_TIMEOUT_S`, after which its processes are killed and the tests fail
with each rank's traceback. This process never initializes torch.distributed itself, so the fallback tests
here run without it.

Gradient convention checked here: each rank's weight and bias gradients are its own batch's share (not
all-reduced), so their SUM over ranks equals the single-process gradient on the concatenated batch, and
DDP's averaging all-reduce yields that sum / world size on every rank, as for every other parameter.
"""

from __future__ import annotations

import copy
import datetime
import multiprocessing
import os
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bnlab
from bnlab.functional import NonFiniteStatisticsWarning
from bnlab.nn.sync import SyncBatchNorm, from_sync, to_sync
from helpers import make_input, train_steps

WORLD_SIZES = (2, 3)
WORLD_TIMEOUT_S = 90.0  # start-up, every scenario and shutdown of one world; a healthy world takes a few seconds
COLLECTIVE_TIMEOUT_S = 30  # a rank stuck in a collective gives up after this
TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32
TOLERANCES = {torch.float32: TOL, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}


# ---- cases: one global batch per step, split over the ranks --------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    reference: type[nn.Module]  # the single-process bnlab layer to compare with
    features: tuple[int, ...]  # (C, *spatial)
    sizes: dict[int, tuple[int, ...]]  # world size -> each rank's batch size
    options: dict[str, object] = field(default_factory=dict)
    steps: int = 3
    dtype: torch.dtype = torch.float32


CASES = [
    Case("equal_4d", bnlab.nn.BatchNorm2d, (3, 4, 3), {2: (3, 3), 3: (2, 2, 2)}),
    Case("uneven_2d", bnlab.nn.BatchNorm1d, (4,), {2: (2, 7), 3: (5, 1, 3)}),
    Case("empty_rank_4d", bnlab.nn.BatchNorm2d, (3, 2, 3), {2: (4, 0), 3: (0, 3, 2)}),
    Case("empty_rank_2d_cumulative", bnlab.nn.BatchNorm1d, (5,), {2: (0, 6), 3: (4, 3, 0)}, {"momentum": None}),
    Case(
        "uneven_3d_untracked_no_affine",
        bnlab.nn.BatchNorm1d,
        (3, 5),
        {2: (1, 4), 3: (2, 1, 3)},
        {"affine": False, "track_running_stats": False},
    ),
    Case("uneven_5d_no_bias", bnlab.nn.BatchNorm3d, (2, 2, 3, 2), {2: (3, 1), 3: (1, 2, 2)}, {"bias": False}),
    Case(
        "uneven_4d_float64",
        bnlab.nn.BatchNorm2d,
        (2, 3, 3),
        {2: (2, 3), 3: (3, 1, 2)},
        {"dtype": torch.float64},
        dtype=torch.float64,
    ),
]
CASE_BY_NAME = {case.name: case for case in CASES}


def _global_batches(case: Case, world: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, dy) of the concatenated batch for every step."""
    total = sum(case.sizes[world])
    shape = (total, *case.features)
    return [
        (
            make_input(shape, seed=seed + 2 * s, dtype=case.dtype),
            make_input(shape, seed=seed + 2 * s + 1, scale=1.0, offset=0.0, dtype=case.dtype),
        )
        for s in range(case.steps)
    ]


def _rank_batches(case: Case, world: int, rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    xs, dys = [], []
    for x, dy in _global_batches(case, world):
        xs.append(x.split(case.sizes[world])[rank])
        dys.append(dy.split(case.sizes[world])[rank])
    return xs, dys


def _build(cls: type[nn.Module], channels: int, seed: int = 7, **options: object) -> nn.Module:
    """A layer with non-trivial parameters and running statistics, the same for every `cls` and rank."""
    layer = cls(channels, **options)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # drawn in float64 and copied: the same values for any dtype of the layer
        if layer.weight is not None:
            layer.weight.copy_(1 + 0.3 * torch.randn(channels, generator=gen, dtype=torch.float64))
        if layer.bias is not None:
            layer.bias.copy_(0.2 * torch.randn(channels, generator=gen, dtype=torch.float64))
        if layer.running_mean is not None:
            layer.running_mean.copy_(0.5 + 0.1 * torch.randn(channels, generator=gen, dtype=torch.float64))
            layer.running_var.copy_(1.5 + 0.2 * torch.rand(channels, generator=gen, dtype=torch.float64))
    return layer


def _running(layer: nn.Module) -> dict[str, torch.Tensor] | None:
    if layer.running_mean is None:
        return None
    return {
        "mean": layer.running_mean.clone(),
        "var": layer.running_var.clone(),
        "tracked": layer.num_batches_tracked.clone(),
    }


# ---- what each rank runs --------------------------------------------------------------------------------------


class _AllReduceCounter:
    """Counts the Python-level `torch.distributed.all_reduce` calls (the ones bnlab.nn.sync makes).

    Replaces `torch.distributed.all_reduce` for the rest of the process: meant for the spawned ranks only.
    """

    def __init__(self) -> None:
        self.calls = 0
        self._original = dist.all_reduce

        def counting(*args, **kwargs):
            self.calls += 1
            return self._original(*args, **kwargs)

        dist.all_reduce = counting


def _scenario_case(case: Case) -> Callable[[int, int, _AllReduceCounter], dict]:
    def run(rank: int, world: int, counter: _AllReduceCounter) -> dict:
        layer = _build(SyncBatchNorm, case.features[0], **case.options)
        xs, dys = _rank_batches(case, world, rank)
        outputs, grads = train_steps(layer, xs, dys)
        return {"outputs": outputs, "grads": grads, "running": _running(layer), "all_reduces": counter.calls}

    return run


LARGE_OFFSET_SIZES = {2: (40, 24), 3: (30, 20, 14)}


def _large_offset_batches(world: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    total = sum(LARGE_OFFSET_SIZES[world])
    return [(1e4 + torch.randn(total, 4, generator=gen, dtype=torch.float64)).float() for _ in range(2)]


def _scenario_large_offset(rank: int, world: int, counter: _AllReduceCounter) -> dict:
    # momentum=1: the running statistics after a step ARE the global statistics (unbiased variance). The first
    # step runs with the shift K = 0 (fresh running mean), the second with K = the running mean, about 1e4.
    layer = SyncBatchNorm(4, momentum=1.0)
    record: dict[str, list] = {"outputs": [], "running": []}
    for x in _large_offset_batches(world):
        record["outputs"].append(layer(x.split(LARGE_OFFSET_SIZES[world])[rank]).detach())
        record["running"].append(_running(layer))
    return record


def _scenario_eval(rank: int, world: int, counter: _AllReduceCounter) -> dict:
    layer = _build(SyncBatchNorm, 3).eval()
    x = make_input((2 + rank, 3, 2, 2), seed=rank)
    return {"output": layer(x).detach(), "input": x, "all_reduces": counter.calls}


def _scenario_small_batch(rank: int, world: int, counter: _AllReduceCounter) -> dict:
    # One value per channel in the whole group: rank 0 holds a single sample, every other rank none.
    x = make_input((1 if rank == 0 else 0, 3), seed=5)
    record = {"input": x}
    try:
        SyncBatchNorm(3, name="head.bn")(x)
        record["error"] = None
    except ValueError as error:
        record["error"] = str(error)
    layer = _build(SyncBatchNorm, 3, small_batch="use_running_stats")
    record["output"] = layer(x).detach()
    record["running"] = _running(layer)
    return record


def _scenario_nonfinite(rank: int, world: int, counter: _AllReduceCounter) -> dict:
    # Only the last rank sees a NaN; every rank must skip (or raise) alike.
    x = make_input((3, 3), seed=rank)
    if rank == world - 1:
        x[1, 2] = float("nan")
    record: dict[str, object] = {}
    layer = _build(SyncBatchNorm, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(x.requires_grad_(True))
    record["warned"] = any(issubclass(w.category, NonFiniteStatisticsWarning) for w in caught)
    y.sum().backward()  # backward still runs (a GradScaler would skip the step), and joins its all-reduce
    record["running_after_skip"] = _running(layer)
    layer(make_input((3, 3), seed=10 + rank))  # a finite batch afterwards is tracked again
    record["running_after_finite"] = _running(layer)
    try:
        _build(SyncBatchNorm, 3, nonfinite="error")(x.detach())
        record["error"] = None
    except FloatingPointError as error:
        record["error"] = str(error)
    return record


SUBGROUP_CASE = Case("subgroup", bnlab.nn.BatchNorm2d, (3, 2, 2), {2: (3, 2), 3: (3, 4, 2)}, steps=2)


def _scenario_subgroup(rank: int, world: int, counter: _AllReduceCounter) -> dict:
    # Every rank but the last synchronizes in one group (for 2 ranks, a group of one: no synchronization);
    # the last is alone in its group and must not synchronize either.
    first, last = dist.new_group(list(range(world - 1))), dist.new_group([world - 1])  # all ranks, same order
    layer = _build(SyncBatchNorm, 3, process_group=first if rank < world - 1 else last)
    xs, dys = _rank_batches(SUBGROUP_CASE, world, rank)
    outputs, grads = train_steps(layer, xs, dys)
    return {"outputs": outputs, "grads": grads, "running": _running(layer), "all_reduces": counter.calls}


def _scenario_bad_input(rank: int, world: int, counter: _AllReduceCounter) -> dict:
    # Checked before any collective: a rank that raises here does not leave the others waiting (when they all
    # get the same bad input, as here).
    layer = SyncBatchNorm(3, name="bn")
    errors = []
    for bad in (torch.zeros(4, 2, 5), torch.zeros(4)):
        try:
            layer(bad)
            errors.append(None)
        except ValueError as error:
            errors.append(str(error))
    return {"errors": errors, "all_reduces": counter.calls}


CONVERT_SIZES = {2: (3, 5), 3: (2, 4, 3)}


def _convert_model() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))


def _convert_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    total = sum(CONVERT_SIZES[world])
    return make_input((total, 5), seed=21), make_input((total, 2), seed=22, scale=1.0, offset=0.0)


def _scenario_convert_and_ddp(rank: int, world: int, counter: _AllReduceCounter) -> dict:
    group = dist.new_group(list(range(world)))
    synced = to_sync(_convert_model(), process_group=group)  # a deep copy: the memo must share the group
    back = from_sync(synced)  # deep-copies a model that holds a process group
    ddp = nn.parallel.DistributedDataParallel(synced)
    x, dy = (t.split(CONVERT_SIZES[world])[rank] for t in _convert_batch(world))
    y = ddp(x)
    y.backward(dy)
    return {
        "types": [type(m).__name__ for m in synced] + [type(m).__name__ for m in back],
        "output": y.detach(),
        "grads": {name: p.grad.clone() for name, p in synced.named_parameters()},
        "running": _running(synced[1]),
    }


# Run in this order by every rank of every world (the collectives of consecutive scenarios must line up).
SCENARIOS: dict[str, Callable[[int, int, _AllReduceCounter], dict]] = {
    **{f"case:{case.name}": _scenario_case(case) for case in CASES},
    "large_offset": _scenario_large_offset,
    "eval": _scenario_eval,
    "small_batch": _scenario_small_batch,
    "nonfinite": _scenario_nonfinite,
    "subgroup": _scenario_subgroup,
    "bad_input": _scenario_bad_input,
    "convert_and_ddp": _scenario_convert_and_ddp,
}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank: run every scenario for this world size and save the records (or the traceback)."""
    out = Path(out_dir)
    try:
        torch.set_num_threads(1)  # 3 ranks share 2 cores
        if sys.platform in ("linux", "darwin"):  # gloo on the loopback interface, whatever the hostname resolves to
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        counter = _AllReduceCounter()
        records = {}
        for name, scenario in SCENARIOS.items():
            counter.calls = 0
            records[name] = scenario(rank, world, counter)
        dist.destroy_process_group()
        torch.save(records, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        sys.exit(1)


# ---- running a world ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_world(world: int, out: Path) -> list[dict]:
    """Spawn `world` ranks, wait for all of them (bounded), and return each rank's records in rank order.

    Tries a second free port if the first was taken between choosing it and binding it.
    """
    for attempt in range(2):
        folder = out / f"attempt{attempt}"
        folder.mkdir()
        codes, timed_out = _spawn_and_wait(world, folder)
        if codes == [0] * world:
            return [torch.load(folder / f"rank{r}.pt") for r in range(world)]
        errors = "\n".join(f.read_text() for f in sorted(folder.glob("rank*.err")))
        if "address already in use" not in errors.lower():
            break
    reason = f"timed out after {WORLD_TIMEOUT_S:.0f} s" if timed_out else f"failed, exit codes {codes}"
    pytest.fail(f"{world}-process world {reason}:\n{errors or '(no traceback written)'}", pytrace=False)


def _spawn_and_wait(world: int, out: Path) -> tuple[list[int | None], bool]:
    """Run one world to its end, or kill it at the deadline; the exit codes, and whether it timed out."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    # daemon: should this process die, its ranks die with it.
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(out)), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + WORLD_TIMEOUT_S
    timed_out = True
    try:
        while time.monotonic() < deadline:
            codes = [p.exitcode for p in procs]
            if all(code == 0 for code in codes) or any(code not in (None, 0) for code in codes):
                timed_out = False  # all done, or one failed: the others would only wait for their collective
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    return [p.exitcode for p in procs], timed_out


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"{n}ranks")
def world(request, tmp_path_factory) -> list[dict]:
    return _run_world(request.param, tmp_path_factory.mktemp(f"world{request.param}"))


# ---- distributed: the same as one layer on the concatenated batch ---------------------------------------------


def _assert_running_identical_across_ranks(runnings: list[dict | None]) -> None:
    for other in runnings[1:]:
        if runnings[0] is None:
            assert other is None
            continue
        for key in ("mean", "var", "tracked"):
            assert torch.equal(other[key], runnings[0][key]), f"running {key} differs between ranks"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_one_layer_on_the_concatenated_batch(world, case):
    size, tol = len(world), TOLERANCES[case.dtype]
    records = [r[f"case:{case.name}"] for r in world]
    reference = _build(case.reference, case.features[0], **case.options)
    batches = _global_batches(case, size)
    ref_outputs, ref_grads = train_steps(reference, [x for x, _ in batches], [dy for _, dy in batches])
    for step in range(case.steps):
        output = torch.cat([r["outputs"][step] for r in records])
        torch.testing.assert_close(output, ref_outputs[step], **tol)
        input_grad = torch.cat([r["grads"][step][0] for r in records])
        torch.testing.assert_close(input_grad, ref_grads[step][0], **tol)
        # Parameter gradients: each rank's share; their sum is the concatenated batch's gradient.
        for k in range(1, len(ref_grads[step])):
            summed = torch.stack([r["grads"][step][k] for r in records]).sum(0)
            torch.testing.assert_close(summed, ref_grads[step][k], **tol)
    runnings = [r["running"] for r in records]
    _assert_running_identical_across_ranks(runnings)
    if reference.running_mean is not None:
        torch.testing.assert_close(runnings[0]["mean"], reference.running_mean, **tol)
        torch.testing.assert_close(runnings[0]["var"], reference.running_var, **tol)
        assert runnings[0]["tracked"].item() == reference.num_batches_tracked.item() == case.steps
    else:
        assert all(r is None for r in runnings)
    # One all-reduce in forward and one in backward per step, on every rank, empty batch or not.
    assert [r["all_reduces"] for r in records] == [2 * case.steps] * size


def test_an_empty_rank_returns_an_empty_output_with_zero_parameter_gradients(world):
    case = CASE_BY_NAME["empty_rank_4d"]
    empty = case.sizes[len(world)].index(0)
    record = world[empty][f"case:{case.name}"]
    for output, (input_grad, weight_grad, bias_grad) in zip(record["outputs"], record["grads"], strict=True):
        assert output.shape == (0, *case.features) and input_grad.shape == output.shape
        assert torch.equal(weight_grad, torch.zeros(3)) and torch.equal(bias_grad, torch.zeros(3))


def test_large_offset_statistics_are_exact_across_ranks(world):
    size = len(world)
    records = [r["large_offset"] for r in world]
    for step, x in enumerate(_large_offset_batches(size)):
        x64 = x.double()  # the float32 values, exactly
        mean, var = x64.mean(0), x64.var(0, unbiased=False)
        running = records[0]["running"][step]
        _assert_running_identical_across_ranks([r["running"][step] for r in records])
        # The float32 running mean can only be as close as its spacing at 1e4 (9.8e-4) allows.
        torch.testing.assert_close(running["mean"].double(), mean, rtol=0, atol=5e-4)
        torch.testing.assert_close(running["var"].double(), x64.var(0), rtol=1e-5, atol=0)
        expected = (x64 - mean) / torch.sqrt(var + 1e-5)
        output = torch.cat([r["outputs"][step] for r in records]).double()
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)


def test_eval_mode_does_not_synchronize(world):
    for record in (r["eval"] for r in world):
        expected = _build(bnlab.nn.BatchNorm2d, 3).eval()(record["input"])
        assert torch.equal(record["output"], expected)
        assert record["all_reduces"] == 0


def test_one_value_per_channel_in_the_whole_group_follows_small_batch(world):
    reference = _build(bnlab.nn.BatchNorm1d, 3).eval()
    for rank, record in enumerate(r["small_batch"] for r in world):
        # Every rank raises (none is left waiting in a collective), and the message says why.
        assert record["error"] is not None and "SyncBatchNorm(3) 'head.bn'" in record["error"]
        assert f"synchronized over {len(world)} processes" in record["error"]
        torch.testing.assert_close(record["output"], reference(record["input"]))
        assert record["output"].shape[0] == (1 if rank == 0 else 0)
        untouched = _running(_build(bnlab.nn.BatchNorm1d, 3))
        for key in ("mean", "var", "tracked"):
            assert torch.equal(record["running"][key], untouched[key])


def test_nonfinite_statistics_are_skipped_on_every_rank(world):
    records = [r["nonfinite"] for r in world]
    untouched = _running(_build(bnlab.nn.BatchNorm1d, 3))
    for record in records:
        assert record["warned"], "every rank warns, not only the one with the NaN"
        for key in ("mean", "var", "tracked"):
            assert torch.equal(record["running_after_skip"][key], untouched[key])
        assert record["running_after_finite"]["tracked"].item() == 1
        assert record["error"] is not None and "left unchanged on every rank" in record["error"]
    _assert_running_identical_across_ranks([r["running_after_finite"] for r in records])


def test_a_process_group_synchronizes_only_its_members(world):
    size = len(world)
    records = [r["subgroup"] for r in world]
    members = sum(SUBGROUP_CASE.sizes[size][:-1])  # the samples of every rank but the last
    batches = _global_batches(SUBGROUP_CASE, size)
    group = _build(bnlab.nn.BatchNorm2d, 3)
    group_outputs, group_grads = train_steps(
        group, [x[:members] for x, _ in batches], [dy[:members] for _, dy in batches]
    )
    alone = _build(bnlab.nn.BatchNorm2d, 3)
    alone_outputs, alone_grads = train_steps(
        alone, [x[members:] for x, _ in batches], [dy[members:] for _, dy in batches]
    )
    for step in range(SUBGROUP_CASE.steps):
        torch.testing.assert_close(torch.cat([r["outputs"][step] for r in records[:-1]]), group_outputs[step], **TOL)
        torch.testing.assert_close(records[-1]["outputs"][step], alone_outputs[step], **TOL)
        torch.testing.assert_close(torch.cat([r["grads"][step][0] for r in records[:-1]]), group_grads[step][0], **TOL)
        for k in (1, 2):
            summed = torch.stack([r["grads"][step][k] for r in records[:-1]]).sum(0)
            torch.testing.assert_close(summed, group_grads[step][k], **TOL)
        for k in range(3):
            torch.testing.assert_close(records[-1]["grads"][step][k], alone_grads[step][k], **TOL)
    _assert_running_identical_across_ranks([r["running"] for r in records[:-1]])
    torch.testing.assert_close(records[0]["running"]["mean"], group.running_mean, **TOL)
    torch.testing.assert_close(records[-1]["running"]["mean"], alone.running_mean, **TOL)
    # A group of one process (the last rank, and for 2 ranks the first too) never calls a collective.
    expected = [2 * SUBGROUP_CASE.steps if size > 2 else 0] * (size - 1) + [0]
    assert [r["all_reduces"] for r in records] == expected


def test_bad_input_is_refused_before_any_collective(world):
    for record in (r["bad_input"] for r in world):
        channels, rank_one = record["errors"]
        assert channels == "SyncBatchNorm(3) 'bn': expected input of shape (N, 3, *), got (4, 2, 5) (2 channels)"
        assert rank_one.startswith("SyncBatchNorm(3) 'bn': expected input of shape (N, 3, *) with at least 2 dims")
        assert record["all_reduces"] == 0


def test_converted_model_under_ddp_gets_the_averaged_gradient(world):
    size = len(world)
    reference = bnlab.nn.convert(_convert_model())
    x, dy = _convert_batch(size)
    y = reference(x)
    y.backward(dy)
    output = torch.cat([r["convert_and_ddp"]["output"] for r in world])
    torch.testing.assert_close(output, y.detach(), **TOL)
    for record in (r["convert_and_ddp"] for r in world):
        synced, back = record["types"][:4], record["types"][4:]
        assert synced == ["Linear", "SyncBatchNorm", "Tanh", "Linear"] and back[1] == "BatchNorm1d"
        # DDP averages the ranks' shares: the concatenated batch's gradient / world size, for BN and Linear alike.
        for name, param in reference.named_parameters():
            torch.testing.assert_close(record["grads"][name], param.grad / size, **TOL)
        torch.testing.assert_close(record["running"]["mean"], reference[1].running_mean, **TOL)
        torch.testing.assert_close(record["running"]["var"], reference[1].running_var, **TOL)


# ---- without torch.distributed: plain bnlab batch norm ---------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "shape"),
    [(bnlab.nn.BatchNorm1d, (6, 4)), (bnlab.nn.BatchNorm1d, (3, 4, 5)), (bnlab.nn.BatchNorm2d, (3, 4, 2, 3))],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_distributed_it_is_bnlab_batch_norm(cls, shape, momentum):
    assert not dist.is_initialized()
    ours, theirs = _build(SyncBatchNorm, 4, momentum=momentum), _build(cls, 4, momentum=momentum)
    inputs = [make_input(shape, seed=s) for s in range(3)]
    grads = [make_input(shape, seed=10 + s) for s in range(3)]
    for got, expected in zip(train_steps(ours, inputs, grads), train_steps(theirs, inputs, grads), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    ours.eval(), theirs.eval()
    assert torch.equal(ours(inputs[0]), theirs(inputs[0]))


def test_any_input_of_two_or_more_dims_and_errors_that_name_the_layer():
    layer = SyncBatchNorm(2, name="trunk.bn", small_batch="use_running_stats")
    for shape in [(3, 2), (3, 2, 4), (2, 2, 3, 3), (2, 2, 1, 2, 3), (1, 2, 2, 1, 1, 2)]:
        assert layer(torch.randn(shape)).shape == shape
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(2\) 'trunk\.bn': expected input of shape \(N, 2, \*\)"):
        layer(torch.randn(4))
    with pytest.raises(ValueError, match="input has 3 channels"):
        layer(torch.randn(4, 3))
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        SyncBatchNorm(2, eps=0.0)
    with pytest.raises(ValueError, match="nonfinite='x' is not one of"):
        SyncBatchNorm(2, nonfinite="x")


def test_same_constructor_repr_and_checkpoints_as_torch_sync_batch_norm():
    ours = SyncBatchNorm(4, 1e-3, None, True, True, None, "cpu", torch.float64)
    theirs = nn.SyncBatchNorm(4, 1e-3, None, True, True, None, "cpu", torch.float64)
    assert repr(ours) == repr(theirs) and isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert not isinstance(ours, nn.SyncBatchNorm), "DDP refuses CPU models with torch SyncBatchNorm layers"
    assert ours.weight.dtype == torch.float64 and ours.process_group is None and ours.momentum is None
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert ours.state_dict()._metadata[""]["version"] == theirs.state_dict()._metadata[""]["version"]
    # Train each (both fall back to plain batch norm without distributed), then swap checkpoints.
    ours, theirs = SyncBatchNorm(4), nn.SyncBatchNorm(4)
    for s in range(2):
        ours(make_input((5, 4, 3), seed=s))
        theirs(make_input((5, 4, 3), seed=10 + s))
    for source, target in ((ours, nn.SyncBatchNorm(4)), (theirs, SyncBatchNorm(4)), (ours, bnlab.nn.BatchNorm1d(4))):
        target.load_state_dict(source.state_dict())
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), key


# ---- conversion ---------------------------------------------------------------------------------------------


def _mixed_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),
        bnlab.nn.BatchNorm2d(4, nonfinite="error", name="stem.bn"),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
        nn.BatchNorm1d(5, momentum=None),
    )


def test_to_sync_and_from_sync_in_place_share_tensors_and_keep_outputs():
    model, reference = _mixed_model(), _mixed_model()
    layers = [model[1], model[5]]
    tensors = [[layer.weight, layer.bias, layer.running_mean, layer.running_var] for layer in layers]
    assert to_sync(model, inplace=True) is model
    assert [type(model[i]) for i in (1, 5)] == [SyncBatchNorm, SyncBatchNorm]
    assert model[1].original_class is bnlab.nn.BatchNorm2d and model[5].original_class is nn.BatchNorm1d
    assert model[1].nonfinite == "error" and model[1].name == "stem.bn" and model[5].name == "5"
    for i, expected in zip((1, 5), tensors, strict=True):
        assert all(
            a is b
            for a, b in zip(
                [model[i].weight, model[i].bias, model[i].running_mean, model[i].running_var], expected, strict=True
            )
        )
    x = make_input((6, 2, 5, 5))
    for _ in range(2):
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert model[5].num_batches_tracked.item() == 2
    assert from_sync(model, inplace=True) is model
    assert [type(model[i]) for i in (1, 5)] == [bnlab.nn.BatchNorm2d, bnlab.nn.BatchNorm1d]
    assert model[1].nonfinite == "error" and model[1].name == "stem.bn"
    for i, expected in zip((1, 5), tensors, strict=True):
        assert all(
            a is b
            for a, b in zip(
                [model[i].weight, model[i].bias, model[i].running_mean, model[i].running_var], expected, strict=True
            )
        )
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_conversion_returns_a_copy_by_default():
    model = _mixed_model()
    synced = to_sync(model)
    assert type(model[1]) is bnlab.nn.BatchNorm2d and type(synced[1]) is SyncBatchNorm
    assert synced[1].weight is not model[1].weight and torch.equal(synced[1].weight, model[1].weight)
    back = from_sync(synced)
    assert type(synced[1]) is SyncBatchNorm and type(back[1]) is bnlab.nn.BatchNorm2d
    assert back.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_conversion_of_a_bare_layer_keeps_its_mode():
    synced = to_sync(nn.BatchNorm3d(2).eval())
    assert type(synced) is SyncBatchNorm and not synced.training and synced.original_class is nn.BatchNorm3d
    back = from_sync(synced)
    assert type(back) is bnlab.nn.BatchNorm3d and not back.training


def test_from_sync_needs_dims_for_layers_that_do_not_remember_their_class():
    model = nn.Sequential(nn.SyncBatchNorm(4), SyncBatchNorm(3), to_sync(nn.BatchNorm2d(2)))
    with pytest.raises(ValueError, match=r"cannot tell whether '0', '1' should become"):
        from_sync(model, inplace=True)
    assert type(model[0]) is nn.SyncBatchNorm, "nothing changes when a layer is unknown"
    back = from_sync(model, dims=1)
    assert [type(m) for m in back] == [bnlab.nn.BatchNorm1d, bnlab.nn.BatchNorm1d, bnlab.nn.BatchNorm2d]
    back = from_sync(model, dims={"0": 3, "1": 2})
    assert [type(m) for m in back] == [bnlab.nn.BatchNorm3d, bnlab.nn.BatchNorm2d, bnlab.nn.BatchNorm2d]
    with pytest.raises(ValueError, match="dims must be 1, 2 or 3"):
        from_sync(model, dims=4)
    with pytest.raises(ValueError, match=r"dims names \['2x'\], which are not SyncBatchNorm layers"):
        from_sync(model, dims={"0": 3, "1": 2, "2x": 1})


def test_to_sync_leaves_other_layers_alone():
    class MyBatchNorm(nn.BatchNorm2d):
        pass

    model = nn.Sequential(MyBatchNorm(2), nn.LayerNorm(2), nn.SyncBatchNorm(2))
    synced = to_sync(model)
    assert [type(m) for m in synced] == [MyBatchNorm, nn.LayerNorm, nn.SyncBatchNorm]
    shared = bnlab.nn.BatchNorm1d(3)
    twice = to_sync(nn.Sequential(shared, shared))
    assert type(twice[0]) is SyncBatchNorm and twice[1] is twice[0], "a layer used twice stays one layer"
    assert from_sync(twice)[1] is not None and type(from_sync(twice)[1]) is bnlab.nn.BatchNorm1d
    assert copy.deepcopy(twice)[0].original_class is bnlab.nn.BatchNorm1d
