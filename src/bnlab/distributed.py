"""Data-parallel runs under torchrun: the process group from the environment, and helpers for a world of ranks.

torchrun (``python -m torch.distributed.run``) starts one process per worker and gives each one RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. `init_from_env` turns those into the default process
group. Every other function here behaves as rank 0 of a world of one when there is no process group (or a
group of one), so code written for data-parallel runs runs unchanged, and with no collectives, in a plain
process.

File-system convention of bnlab's data-parallel runs: rank 0 writes every file, the others read what it
wrote, so the run folder must be on a file system that every rank sees (always true for one machine).
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DataParallelError",
    "active",
    "barrier",
    "check_agree",
    "exit_now",
    "init_from_env",
    "is_main",
    "mean_over_ranks",
    "on_main",
    "rank",
    "shutdown",
    "world_size",
]

T = TypeVar("T")

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_created_here = False  # whether `init_from_env` made the default group (so `shutdown` may destroy it)


class DataParallelError(ValueError):
    """A run that data-parallel training cannot do as asked (e.g. a batch that does not split evenly)."""


def init_from_env(timeout: datetime.timedelta | None = None) -> bool:
    """Join the data-parallel world torchrun describes in the environment; True if this process is in one.

    With RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set and WORLD_SIZE > 1, initialize the
    default process group (``env://``) and return True. Otherwise (a plain process, or a world of one)
    do nothing and return False. If a default group already exists, it is left as it is and the answer
    is whether it has more than one rank.

    Backend: gloo on a machine without CUDA. With CUDA, ``"cpu:gloo,cuda:nccl"``: collectives on CUDA
    tensors go to nccl and those on CPU tensors (bnlab's experiments train on CPU; object broadcasts and
    barriers are on CPU too) to gloo; plain ``"nccl"`` would reject every CPU tensor. Each rank then uses
    the GPU of its LOCAL_RANK. `timeout` bounds every collective (default: torch's, 30 minutes for gloo).
    """
    global _created_here
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return active()
    if any(key not in os.environ for key in _TORCHRUN_VARIABLES):
        return False
    try:
        world, this_rank, local_rank = (int(os.environ[key]) for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    except ValueError as exc:
        raise DataParallelError(f"torchrun's RANK, WORLD_SIZE and LOCAL_RANK must be integers: {exc}") from exc
    if world <= 1:
        return False
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        backend = "cpu:gloo,cuda:nccl"
        if local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, init_method="env://", rank=this_rank, world_size=world, **kwargs)
    _created_here = True
    return True


def active() -> bool:
    """True inside a process group of more than one rank (the only case where anything here communicates)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default group; 0 without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks in the default group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the rank that writes files and prints; True in a plain process."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here; returns at once without a group of more than one rank."""
    if active():
        dist.barrier()


def shutdown() -> bool:
    """Destroy the default group if `init_from_env` created it (a group made by someone else is theirs).

    Returns whether it destroyed one. A process that trained with DistributedDataParallel should then leave
    through `exit_now`: see there.
    """
    global _created_here
    destroyed = _created_here and dist.is_initialized()
    if destroyed:
        dist.destroy_process_group()
    _created_here = False
    return destroyed


def exit_now(code: int) -> NoReturn:
    """End this process with `code` at once, after flushing stdout and stderr, without interpreter finalization.

    Why: with torch 2.13 (CPU, gloo), once DistributedDataParallel has wrapped a model, the default group
    outlives `destroy_process_group` (its gloo worker threads keep running; DDP's C++ side still holds it,
    even after every Python object of it is gone). A worker thread that releases a finished collective's
    tensors while the interpreter finalizes cannot take the GIL, and the process aborts ("terminate called
    without an active exception", exit -6): about one 2-process run in ten on 2 cores, after every file was
    written. Skipping finalization removes the window. Call it only when nothing is left to do: atexit
    handlers do not run (bnlab registers none; its files are written atomically and synced).
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing more can reach it anyway
            pass
    os._exit(code)


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)`` on rank 0 only; every rank returns its return value or raises its exception.

    For work that only rank 0 may do (writing files) but that every rank must wait for, and whose failure
    must stop every rank, not only rank 0 while the others wait in their next collective until the group's
    timeout. The outcome travels by one object broadcast, so it must pickle; an exception that does not is
    re-raised elsewhere as a RuntimeError with its text. In a plain process, it is just ``fn(...)``.
    """
    if not active():
        return fn(*args, **kwargs)
    outcome: list[Any] = [None]
    if is_main():
        try:
            outcome[0] = ("value", fn(*args, **kwargs))
        except BaseException as exc:  # every rank must hear about it, KeyboardInterrupt included
            outcome[0] = ("error", exc)
        try:
            dist.broadcast_object_list(outcome, src=0)
        except Exception:  # an exception that does not pickle: send its text instead
            outcome = [("error", RuntimeError(f"rank 0: {outcome[0][1]!r}"))]
            dist.broadcast_object_list(outcome, src=0)
    else:
        try:
            dist.broadcast_object_list(outcome, src=0)
        except Exception as exc:  # e.g. rank 0's exception pickled but does not unpickle here
            name = getattr(fn, "__qualname__", repr(fn))
            raise RuntimeError(f"rank {rank()}: could not receive rank 0's outcome of {name}: {exc!r}") from exc
    kind, payload = outcome[0]
    if kind == "error":
        raise payload
    return payload


def check_agree(value: Any, what: str) -> None:
    """Raise on every rank unless every rank holds the same `value` (no-op in a plain process).

    Used where ranks look at files (does a result exist, which step does the checkpoint hold): ranks that
    disagreed would take different branches and wait in different collectives forever. It also
    synchronizes: every rank has computed its `value` when any rank returns.
    """
    if not active():
        return
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values[1:]):
        seen = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        raise DataParallelError(
            f"the ranks disagree on {what} ({seen}); the run folder must be on a file system that every rank "
            f"sees, and only one run may use it at a time"
        )


def mean_over_ranks(value: float) -> float:
    """The mean of a float over all ranks (an all-reduce in float64); the value itself in a plain process."""
    if not active():
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.item() / world_size()
