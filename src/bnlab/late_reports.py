"""Warnings for training batches found non-finite on a GPU, issued once the host learns of it.

Policy "skip" on a GPU checks a batch's statistics on the device and keeps or restores the running
statistics there, without a host sync (`bnlab.functional`); the warning waits until the verdict has
reached the host. Two ways it gets there:

- the guard kernel (`bnlab.kernels`' `_guard_kernel`, where Triton runs) writes its verdict word straight
  into a slot of a ring in pinned host memory, one per device (`_Ring`): the host reads the slot, and a
  nonzero word is the whole verdict. No copy, no event, no allocation a call. A ring is checked once when
  first made (a guard launch on one channel, waited for); where that fails (a GPU that cannot write host
  memory, a Triton that refuses the pointer) the device goes the second way;
- otherwise the verdicts (a device tensor) are copied into pinned memory without waiting, an event
  recorded behind the copy, and the host asks the event.

Either way `poll` warns, oldest first, for the checks that have arrived; at most `limit` wait (then the
oldest is waited for), and the rest at exit (`flush`). Checks queued during CUDA-graph capture are dropped
(a graph's replays cannot report; the statistics are still kept or restored).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable

import torch

from bnlab import kernels

_COPY, _SLOT = 0, 1  # the two kinds of pending check


class _Ring:
    """Verdict slots in host memory (pinned on a GPU) that the guard kernel writes: slot i is
    `codes[i, 0]`, 16 bytes apart (each slot's address aligned as the kernel's compiled variant wants)."""

    def __init__(self, device: torch.device, size: int) -> None:
        self.device = device
        on_gpu = device.type == "cuda"
        with torch.cuda.device(device) if on_gpu else contextlib.nullcontext():  # (pinned in its context)
            self.codes = torch.zeros((size, 4), dtype=torch.int32, pin_memory=on_gpu)
        self.words = self.codes.numpy()[:, 0]  # (the host's view: reading it is a plain memory read)
        self.slots = list(self.codes[:, :1].unbind(0))  # (one view a slot, made once)
        self.busy = [False] * size  # (a slot whose check is queued and not yet reported)
        self.next = 0


class LateReports:
    """The pending checks and their warnings (module doc). `report(policy, name, already_bad, stacklevel,
    late)` issues one warning."""

    def __init__(self, report: Callable[..., None], limit: int = 4096, ring_size: int = 1024) -> None:
        self.limit, self.ring_size = limit, ring_size
        self._report = report
        self._pending: collections.deque = collections.deque()  # (kind, a, b, name)
        self._rings: dict[torch.device, _Ring | None] = {}

    # ---- the guard kernel's verdicts --------------------------------------------------------------------

    def verdict(self, device: torch.device) -> tuple[torch.Tensor, tuple[_Ring, int] | None]:
        """Where the guard kernel should write its verdict word for a check on `device`, and the ring slot
        that is (None: a device tensor, which `queue` copies; also while a CUDA graph is captured)."""
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        ring = None if capturing else self._ring(device)
        if ring is None:
            return torch.empty(1, dtype=torch.int32, device=device), None
        while ring.busy[ring.next]:  # (the GPU a whole ring behind: wait until that slot's check is reported)
            self._pop(wait=True)
        slot = ring.next
        ring.next = (slot + 1) % len(ring.slots)
        ring.words[slot] = 0  # (free: its last verdict was read; nonzero again once the kernel has written)
        return ring.slots[slot], (ring, slot)

    def queue(self, verdict: torch.Tensor, slot: tuple[_Ring, int] | None, name: str) -> None:
        """Queue the check of layer `name` whose guard kernel writes `verdict` (`verdict` and `slot` as the
        method `verdict` gave them)."""
        if slot is not None:
            slot[0].busy[slot[1]] = True
            self._push((_SLOT, *slot, name))
        elif not (verdict.is_cuda and torch.cuda.is_current_stream_capturing()):
            self._push(_copied(verdict, name))

    def _ring(self, device: torch.device) -> _Ring | None:
        if device not in self._rings:
            self._rings[device] = _checked_ring(device, self.ring_size)
        return self._rings[device]

    # ---- checks made with torch ops -----------------------------------------------------------------------

    def add(self, finite: torch.Tensor, before: torch.Tensor, name: str) -> None:
        """Queue the check of one batch: `finite` (0-dim bool, whether its statistics were finite) and
        `before` (the running statistics before it, for the report's wording), both on the device."""
        if finite.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # (a graph's replays cannot report: the statistics are still kept or restored)
        # (Both verdicts travel in one word, one copy: reading `before` on the host later would be a sync.)
        word = (
            kernels.VERDICT_ARRIVED
            + kernels.VERDICT_KEPT * finite.to(torch.int32)
            + kernels.VERDICT_WERE_FINITE * torch.isfinite(before).all().to(torch.int32)
        )
        self._push(_copied(word.reshape(1), name))

    # ---- reporting -------------------------------------------------------------------------------------------

    def _push(self, check: tuple) -> None:
        self._pending.append(check)
        if len(self._pending) > self.limit:
            self._pop(wait=True)
        self.poll()

    def poll(self, wait: bool = False) -> None:
        """Warn for the checks that have arrived, oldest first (`wait`: for all of them)."""
        while self._pending and self._pop(wait):
            pass

    def _pop(self, wait: bool) -> bool:
        """Report the oldest check if it has arrived (`wait`: once it has); whether it had."""
        kind, a, b, name = self._pending[0]
        if kind == _SLOT:  # (a: the ring, b: the slot)
            word = int(a.words[b])
            if not word and wait and a.device.type == "cuda":
                torch.cuda.synchronize(a.device)
                word = int(a.words[b])
            if not word and not wait:
                return False
            a.busy[b] = False
            # (a word still 0 after the wait was never written: nothing to report; no check is queued
            #  before its launch returned, so this is a defence against a loop, not a case that occurs)
            word = word or kernels.VERDICT_KEPT
        else:  # (a: the event, None on CPU; b: the copied word)
            if a is not None and not (wait or a.query()):
                return False
            if a is not None and wait:
                a.synchronize()
            word = b.tolist()[0]  # (the copied word: the host reads it once it is there)
        self._pending.popleft()
        if not word & kernels.VERDICT_KEPT:
            # (the frame of the layer's caller, as the sync path's report names it: 4 frames deeper here)
            already_bad = not word & kernels.VERDICT_WERE_FINITE
            self._report("skip", name, already_bad, stacklevel=9, late=kind == _SLOT or a is not None)
        return True

    def flush(self) -> None:
        """Wait for every pending check and report it (at exit; best effort once CUDA is shutting down)."""
        try:
            self.poll(wait=True)
        except RuntimeError:
            pass


def _copied(verdict: torch.Tensor, name: str) -> tuple:
    """A pending check of a verdict word on the device: copied into pinned memory without a wait, an event
    behind the copy (on CPU the word itself, no event)."""
    if not verdict.is_cuda:
        return (_COPY, None, verdict, name)
    word, event = torch.empty(1, dtype=verdict.dtype, pin_memory=True), torch.cuda.Event()
    word.copy_(verdict, non_blocking=True)  # (into pinned memory: no wait for the GPU)
    event.record()
    return (_COPY, event, word, name)


def _checked_ring(device: torch.device, size: int) -> _Ring | None:
    """A ring for `device` whose slots the guard kernel has been seen to write (one launch on one channel,
    waited for: once per device), or None (no Triton there, or the write did not arrive)."""
    if kernels.unavailable_reason(device.type) is not None:
        return None
    try:
        ring = _Ring(device, size)
        one = torch.ones(1, device=device)
        kernels.load().guard_update((one.clone(), one.clone()), (one, one), ring.slots[0], None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        arrived = int(ring.words[0]) == kernels.VERDICT_ARRIVED | kernels.VERDICT_KEPT | kernels.VERDICT_WERE_FINITE
    except Exception:  # (an optional shortcut: the copies work wherever the guard kernel does)
        return None
    return ring if arrived else None
