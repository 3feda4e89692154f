"""Launching a compiled Triton kernel without Triton's per-call dispatch (the `DIRECT_LAUNCH` knob).

Why: ``kernel[grid](*args, **constexprs)`` runs Triton's JIT dispatch in Python on every call: the
arguments bound to the signature and each one specialized (a tensor's dtype and 16-byte alignment, an
integer's width and whether it is 1 or divisible by 16), a cache key built from them, the device and its
stream looked up, and launch metadata built for the launch hooks, which the launcher then calls (Triton 3.6
always installs a hook chain, empty or not). On session 17's H200 host that came to 33.9 us a launch over an
empty grid (benchmarks/host_gpu.py), and bnlab's forward+backward makes 2-5 launches. Without a GPU,
`python benchmarks/launch_overhead.py` times that dispatch against this module's with stand-ins for the
driver and the compiled kernel (development VM, session 18, Triton 3.6, the apply kernel: 23.5-29.3
against 12.5-13.1 us a launch over four runs; most of the direct path's time is its cache key).

What the direct path does: the first launch of each specialization goes through Triton, which compiles
(or loads) the kernel, launches it and returns the compiled kernel; that is kept, keyed by the kernel, the
device, the constexprs and options, and the arguments' `_specializations` (at least as fine as Triton's:
tests/test_launch.py checks it against Triton's own). A later launch with the same key calls the compiled
kernel's launcher itself, as Triton's ``CompiledKernel.__getitem__`` does, with no hooks. Anything else
goes through Triton: an argument of a type the key does not know, a launch hook installed (a profiler
such as proton relies on them), a Triton whose launcher refuses the call (it then stays off, with a
warning). Not seen by the direct path: a change of Triton's debug or instrumentation settings after a
kernel's first launch, and of a global value a kernel reads (bnlab's kernels read constants only).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

# (kernel, device index, constexprs and options, argument specializations) -> (launcher, function,
# packed metadata, the values of the parameters after the positional arguments, in signature order)
_COMPILED: dict[tuple, tuple] = {}
_STATE: dict[str, object] = {"disabled": False}  # (and, once looked up: "runtime", Triton's runtime knobs;
# "stream", its driver's current-stream function)
_VARIANT = object()  # (heads a key made from a caller's variant: never equal to one made from a kernel)
_WIDE = 0x8000000000000000  # Triton passes integers from 2**63 up as u64, below that i64 or (31 bits) i32


def _specializations(args: Sequence) -> list:
    """What Triton specializes each runtime argument on, or finer: a tensor's dtype and whether its address
    is a multiple of 16 (a Parameter is a tensor too); an int's being 1, a multiple of 16, and its width
    class; else the type (a float, a bool, None). Raises AttributeError for another type (the caller then
    leaves the launch to Triton). One comprehension, no call per argument: it runs on every launch."""
    return [
        (a.dtype, not a.data_ptr() & 15) if isinstance(a, torch.Tensor)
        else (int, a == 1, not a & 15, -0x80000000 <= a < 0x80000000, a < _WIDE) if a.__class__ is int
        else a.__class__ if a is None or a.__class__ is float or a.__class__ is bool
        else a.data_ptr()  # (not a tensor: raises AttributeError, or the object is no argument bnlab passes)
        for a in args
    ]  # fmt: skip


def _hooks_idle(runtime: object) -> bool:
    """Whether Triton's launch hooks would do nothing: unset, or an empty hook chain."""
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    return (enter is None or getattr(enter, "calls", None) == []) and (
        exit_ is None or getattr(exit_, "calls", None) == []
    )


def _runtime_knobs() -> object | None:
    """Triton's runtime knobs (launch hooks), or None on a Triton without them (no direct path there)."""
    if "runtime" not in _STATE:
        try:
            from triton import knobs
        except ImportError:
            knobs = None
        _STATE["runtime"] = getattr(knobs, "runtime", None)
    return _STATE["runtime"]


def _entry(kernel, args: Sequence, options: dict, compiled) -> tuple | None:
    """What a direct launch of `compiled` needs, or None where it cannot be kept (a stand-in, the CPU
    interpreter, a parameter with neither a value nor a default)."""
    # (`run` first: on a kernel whose handles are not loaded yet, asking for it loads them, `function` too)
    run, function = getattr(compiled, "run", None), getattr(compiled, "function", None)
    packed = getattr(compiled, "packed_metadata", None)
    if run is None or function is None or packed is None or getattr(kernel, "pre_run_hooks", None):
        return None
    tail = []
    for name, param in list(kernel.signature.parameters.items())[len(args) :]:
        if name in options:
            tail.append(options[name])
        elif param.default is not param.empty:
            tail.append(param.default)
        else:
            return None
    return run, function, packed, tuple(tail)


def launch(
    kernel, grid: tuple[int, ...], args: Sequence, options: dict, device: torch.device, variant: object = None
) -> None:
    """``kernel[grid](*args, **options)`` on the current CUDA device (`device`), directly when this
    specialization was launched before (module doc). `args`: the runtime arguments, positionally, in the
    signature's order; `options`: the constexprs and Triton's options, by name. `variant`: where given, a
    hashable that stands for (kernel, options) in this process, i.e. equal variants always come with the
    same kernel and options (`bnlab.kernels.batchnorm` gives each of its (kernel, options) a token object):
    the key then holds it instead of the options' items (~0.6 us of a direct launch's ~5.9 on the dev VM,
    `benchmarks/launch_overhead.py`)."""
    runtime = _runtime_knobs()
    key = None
    if runtime is not None and not _STATE["disabled"] and _hooks_idle(runtime):
        try:
            key = (
                (_VARIANT, variant, device.index, *_specializations(args))
                if variant is not None
                else (kernel, device.index, *options.items(), *_specializations(args))
            )
        except (AttributeError, TypeError):  # (an argument of another type; unhashable option values)
            key = None
    entry = _COMPILED.get(key) if key is not None else None
    if entry is None:
        compiled = kernel[grid](*args, **options)
        if key is not None and (made := _entry(kernel, args, options, compiled)) is not None:
            _COMPILED[key] = made
        return
    run, function, packed, tail = entry
    grid_x, grid_y, grid_z = (*grid, 1, 1)[:3]
    try:
        run(grid_x, grid_y, grid_z, _current_stream(device.index), function, packed, None, None, None, *args, *tail)
    except TypeError as exc:  # (the launcher parses its arguments before launching: nothing ran)
        _STATE["disabled"] = True
        _COMPILED.clear()
        warnings.warn(f"bnlab: Triton's launcher refused a direct launch of {kernel.fn.__name__} ({exc}); "
                      f"launches go through Triton from now on", RuntimeWarning, stacklevel=2)  # fmt: skip
        kernel[grid](*args, **options)


def _current_stream(index: int) -> int:
    """The current CUDA stream's handle on device `index`, as Triton's driver gives it."""
    stream = _STATE.get("stream")
    if stream is None:
        from triton.runtime import driver

        stream = _STATE["stream"] = driver.active.get_current_stream
    return stream(index)
