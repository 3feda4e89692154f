"""`bnlab.kernels.launch`: direct launches of compiled Triton kernels (the DIRECT_LAUNCH knob), on CPU.

A launch needs a GPU; here the kernel and its compiled form are stand-ins that record what they are
called with, so the cache keys, the argument order and the fallbacks are checked without one. The kernels
themselves, launched directly on a GPU, are compared bit for bit with Triton's launches in test_triton.py.
"""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch

from bnlab.kernels import launch as L

pytest.importorskip("triton")

CUDA0 = torch.device("cuda", 0)  # (only its index is read: no GPU needed)


class _Hooks:
    """Triton's runtime knobs as far as launches read them: two hook chains."""

    def __init__(self, enter: list | None = None) -> None:
        self.launch_enter_hook = _Chain(enter or [])
        self.launch_exit_hook = _Chain([])


class _Chain:
    def __init__(self, calls: list) -> None:
        self.calls = calls


class _Compiled:
    """A compiled kernel's launch surface: `run(grid x, y, z, stream, function, metadata, launch metadata,
    enter hook, exit hook, *arguments)`."""

    def __init__(self, runs: list, refuse: bool = False) -> None:
        self.runs, self.refuse = runs, refuse
        self.function, self.packed_metadata = 1234, (4, 1, 0)

    def run(self, *call) -> None:
        if self.refuse:
            raise TypeError("function takes exactly 12 arguments (14 given)")
        self.runs.append(call)


def _body(x_ptr, y_ptr, n, eps, BLOCK=16, FLAG=False):  # (a kernel's signature: two constexprs with defaults)
    pass


class _Kernel:
    """A JIT function as launches use it: `kernel[grid](*args, **options)` compiles (here: records a slow
    launch) and returns the compiled kernel."""

    def __init__(self, refuse: bool = False) -> None:
        self.signature = inspect.signature(_body)
        self.fn = _body
        self.slow: list[tuple] = []
        self.runs: list[tuple] = []
        self.refuse = refuse

    def __getitem__(self, grid):
        def launch(*args, **options):
            self.slow.append((grid, args, options))
            return _Compiled(self.runs, self.refuse)

        return launch


@pytest.fixture
def hooks(monkeypatch):
    monkeypatch.setattr(L, "_COMPILED", {})
    monkeypatch.setattr(L, "_STATE", {"disabled": False, "runtime": _Hooks(), "stream": lambda index: 77 + index})
    return L._STATE["runtime"]


def test_a_second_launch_of_a_specialization_calls_the_compiled_launcher(hooks):
    kernel, x = _Kernel(), torch.zeros(64)
    L.launch(kernel, (3,), (x, x, 32, 1e-5), {"BLOCK": 32, "num_warps": 4}, CUDA0)
    assert len(kernel.slow) == 1 and not kernel.runs  # (the first goes through Triton, which compiles)
    L.launch(kernel, (5, 2), (x, x, 48, 1e-3), {"BLOCK": 32, "num_warps": 4}, CUDA0)
    assert len(kernel.slow) == 1
    # grid padded to 3 dimensions, the stream of the device, no launch metadata or hooks, then every
    # parameter in signature order: the constexprs from the options, the rest their defaults
    assert kernel.runs == [(5, 2, 1, 77, 1234, (4, 1, 0), None, None, None, x, x, 48, 1e-3, 32, False)]


def test_another_specialization_goes_through_triton_first(hooks):
    kernel, x = _Kernel(), torch.zeros(64)
    options = {"BLOCK": 32}
    calls = [
        (x, x, 48, 0.1),
        (x[1:], x, 48, 0.1),  # misaligned pointer
        (x, x, 1, 0.1),  # Triton makes an int of 1 a constant
        (x, x, 3, 0.1),  # not a multiple of 16
        (x, x, 2**40, 0.1),  # 64 bits
        (x.double(), x, 48, 0.1),  # another dtype
    ]
    for args in calls:
        L.launch(kernel, (1,), args, options, CUDA0)
    L.launch(kernel, (1,), calls[0], {"BLOCK": 64}, CUDA0)  # another constexpr
    L.launch(kernel, (1,), calls[0], options, torch.device("cuda", 1))  # another device
    assert len(kernel.slow) == len(calls) + 2 and not kernel.runs
    for args in calls:
        L.launch(kernel, (1,), args, options, CUDA0)
    assert len(kernel.slow) == len(calls) + 2 and len(kernel.runs) == len(calls)


def test_a_variant_stands_for_the_kernel_and_options_in_the_key(hooks):
    """With `variant` (a caller's token for one kernel and its options) the key holds it instead of the
    options: the same variant and specialization launch directly, another variant, a misaligned pointer or
    another device go through Triton first, and no variant's key meets a key made from options."""
    kernel, x = _Kernel(), torch.zeros(64)
    options, token, other = {"BLOCK": 32}, object(), object()
    L.launch(kernel, (1,), (x, x, 48, 0.1), options, CUDA0, variant=token)
    L.launch(kernel, (1,), (x, x, 64, 0.2), options, CUDA0, variant=token)
    assert len(kernel.slow) == 1 and len(kernel.runs) == 1
    for args, device, variant in (((x, x, 48, 0.1), CUDA0, other), ((x[1:], x, 48, 0.1), CUDA0, token),
                                  ((x, x, 48, 0.1), torch.device("cuda", 1), token),
                                  ((x, x, 48, 0.1), CUDA0, None)):  # fmt: skip
        L.launch(kernel, (1,), args, options, device, variant=variant)
    assert len(kernel.slow) == 5 and len(kernel.runs) == 1
    assert sum(key[0] is L._VARIANT for key in L._COMPILED) == 4 and len(L._COMPILED) == 5


def test_launch_hooks_in_use_send_every_launch_through_triton(hooks):
    kernel, x = _Kernel(), torch.zeros(64)
    hooks.launch_enter_hook.calls.append(print)  # (a profiler's hook: Triton must call it)
    for _ in range(3):
        L.launch(kernel, (1,), (x, x, 16, 0.1), {}, CUDA0)
    assert len(kernel.slow) == 3 and not kernel.runs and not L._COMPILED


def test_arguments_of_unknown_types_go_through_triton_and_nothing_is_kept(hooks):
    kernel, x = _Kernel(), torch.zeros(64)
    for _ in range(2):
        L.launch(kernel, (1,), (x, x, "16", 0.1), {}, CUDA0)
    assert len(kernel.slow) == 2 and not L._COMPILED


def test_stand_ins_without_a_compiled_kernel_are_not_kept(hooks):
    """The CPU interpreter's launches (and the benchmarks' stubs) return no compiled kernel."""

    class Interpreted(_Kernel):
        def __getitem__(self, grid):
            return lambda *args, **options: self.slow.append(args)

    kernel, x = Interpreted(), torch.zeros(64)
    for _ in range(2):
        L.launch(kernel, (1,), (x, x, 16, 0.1), {}, CUDA0)
    assert len(kernel.slow) == 2 and not L._COMPILED


def test_a_launcher_that_refuses_the_call_turns_direct_launches_off_with_a_warning(hooks):
    kernel, x = _Kernel(refuse=True), torch.zeros(64)
    L.launch(kernel, (1,), (x, x, 16, 0.1), {}, CUDA0)
    with pytest.warns(RuntimeWarning, match="refused a direct launch of _body"):
        L.launch(kernel, (1,), (x, x, 16, 0.1), {}, CUDA0)
    assert len(kernel.slow) == 2  # (the refused launch went through Triton instead)
    L.launch(kernel, (1,), (x, x, 16, 0.1), {}, CUDA0)
    assert len(kernel.slow) == 3 and L._STATE["disabled"] and not L._COMPILED


def test_without_triton_runtime_knobs_every_launch_goes_through_triton(monkeypatch):
    monkeypatch.setattr(L, "_COMPILED", {})
    monkeypatch.setattr(L, "_STATE", {"disabled": False, "runtime": None})
    kernel, x = _Kernel(), torch.zeros(64)
    for _ in range(2):
        L.launch(kernel, (1,), (x, x, 16, 0.1), {}, CUDA0)
    assert len(kernel.slow) == 2 and not L._COMPILED


def _samples() -> list[object]:
    """Runtime arguments of every kind bnlab passes, around each edge of Triton's specialization."""
    base = torch.zeros(64, dtype=torch.float32)
    tensors = [base[offset:] for offset in (0, 1, 2, 4, 8)]
    tensors += [base.to(dtype)[offset:] for dtype in (torch.bfloat16, torch.float16) for offset in (0, 3, 8)]
    tensors += [torch.nn.Parameter(torch.ones(8)), torch.zeros(4, dtype=torch.int32), torch.empty(0)]
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**32, -(2**31), -(2**31) - 16,
            2**40, 2**63 - 16, 2**63, 2**64 - 16]  # fmt: skip
    return [*tensors, *ints, 0.0, 1.0, 1e-5, True, False, None]


def test_the_cache_key_tells_apart_whatever_triton_specializes_on():
    """Two arguments that Triton compiles differently for must never share a key: else a kernel compiled for
    aligned pointers or a constant 1 would be launched on arguments that are not."""
    specialize = pytest.importorskip("triton.runtime.jit").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    samples = _samples()
    theirs = [specialize(BaseBackend, arg, False, True, True) for arg in samples]
    ours = L._specializations(samples)
    for i, j in itertools.combinations(range(len(samples)), 2):
        if ours[i] == ours[j]:
            assert theirs[i] == theirs[j], f"{samples[i]!r} and {samples[j]!r} share a key, Triton tells them apart"
    # (and a check that can fail: Triton does tell some of these apart)
    assert len(set(map(repr, theirs))) > 10
