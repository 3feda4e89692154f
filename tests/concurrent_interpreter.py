"""Run every program of an interpreted Triton launch in its own thread, all at once, as on a GPU.

Triton's CPU interpreter runs a grid's programs one after another. The persistent kernels' programs
spin-wait on each other (bnlab.kernels.device), which can only end when they all run at once: so the
launchers run them in the interpreter as two launches (PHASE 1, PHASE 2) and the GPU's single launch
(PHASE 0, with its spin-waits and pipelined rounds) would otherwise run nowhere but on a GPU.
`concurrent_programs()` makes the interpreter start one thread per program instead, so that PHASE 0
runs here: its protocol (arrival counters, ready flags, departures, rounds) is then tested on every
interleaving the thread switches produce (Python's threads interleave at any bytecode, so stores,
loads and atomics of different programs interleave too; every access is sequentially consistent, so
this checks the protocol, not the GPU's memory model).

How: the interpreter's grid loop (triton.runtime.interpreter.GridExecutor) calls the kernel's Python
function once per program after `interpreter_builder.set_grid_idx`. During `concurrent_programs()`,
that call starts a thread that runs the function with its program id in thread-local storage (read by
a patched `create_get_program_id`), and the call for the last program waits for every thread before the
loop ends (the interpreter then copies results back as usual). A program still running after
`timeout_s` is a deadlock: the patched loads and atomics then raise in every thread, and the launch fails
with `ProgramsDeadlocked`. Written against Triton 3.9's interpreter (the version the tests pin).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from collections.abc import Iterator

from triton.runtime import interpreter as _interp


class ProgramsDeadlocked(RuntimeError):
    """Some programs of a launch were still running (spinning) when the time was up."""


class _Launch:
    """The threads of one launch: started as the interpreter's loop reaches each program, joined at the last."""

    def __init__(self, fn, timeout_s: float, abort: threading.Event, local: threading.local) -> None:
        self.fn, self.timeout_s, self.abort, self.local = fn, timeout_s, abort, local
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def program(self, grid_idx: tuple[int, int, int], kwargs: dict) -> None:
        def run() -> None:
            self.local.grid_idx = grid_idx
            try:
                self.fn(**kwargs)
            except BaseException as exc:
                self.errors.append(exc)
                self.abort.set()  # the others may be waiting on this one: stop them too

        thread = threading.Thread(target=run, name=f"triton-program-{grid_idx}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(self.timeout_s)
            if thread.is_alive():
                break
        stuck = [t.name for t in self.threads if t.is_alive()]
        if stuck:
            self.abort.set()
            for thread in self.threads:
                thread.join(5.0)
            raise ProgramsDeadlocked(
                f"{len(stuck)} of {len(self.threads)} programs of {self.fn.__name__} still running after "
                f"{self.timeout_s} s (a spin-wait that never ends): {', '.join(stuck[:8])}"
            )
        errors = [e for e in self.errors if not isinstance(e, _Aborted)]
        if errors:
            raise errors[0]


class _EachProgram:
    """Stands in for the kernel's function in the interpreter's grid loop: each call starts that program's
    thread; the call for the loop's last program waits for them all. It has the function's signature and
    globals, which the interpreter reads (to bind arguments, to find the `tl` module it patches)."""

    def __init__(self, fn, launch: _Launch, builder) -> None:
        self.fn, self.launch, self.builder = fn, launch, builder
        self.__signature__ = inspect.signature(fn)
        self.__name__ = fn.__name__
        self.__globals__ = fn.__globals__

    def __call__(self, **kwargs) -> None:
        grid_idx, grid_dim = self.builder.grid_idx, self.builder.grid_dim
        self.launch.program(grid_idx, kwargs)
        if grid_idx == tuple(d - 1 for d in grid_dim):
            self.launch.join()


class _Aborted(RuntimeError):
    """Raised inside a program's thread to stop it after another program failed or time ran out."""


@contextlib.contextmanager
def concurrent_programs(timeout_s: float = 60.0, switch_interval_s: float = 1e-4) -> Iterator[None]:
    """Within the block, interpreted launches run all their programs at once (one thread each).

    `switch_interval_s` shortens Python's thread switch interval (default 5 ms) so that programs
    interleave finely and a spinning program gives the others their turn quickly.
    """
    builder = _interp.interpreter_builder
    local = threading.local()
    abort = threading.Event()
    originals = {
        "create_get_program_id": builder.create_get_program_id,
        "create_masked_load": builder.create_masked_load,
        "create_atomic_rmw": builder.create_atomic_rmw,
        "create_atomic_cas": builder.create_atomic_cas,
    }
    original_call = _interp.GridExecutor.__call__

    def program_id(axis):
        grid_idx = getattr(local, "grid_idx", None) or builder.grid_idx
        return _interp.TensorHandle(_interp.np.array([grid_idx[axis]], dtype=_interp.np.int32), _interp.tl.int32)

    def checked(name):
        original = originals[name]

        def op(*args, **kwargs):
            if abort.is_set() and getattr(local, "grid_idx", None) is not None:
                raise _Aborted("stopped: another program failed or the launch timed out")
            return original(*args, **kwargs)

        return op

    def threaded_call(self, *args, **kwargs):
        fn = self.fn
        self.fn = _EachProgram(fn, _Launch(fn, timeout_s, abort, local), builder)
        try:
            return original_call(self, *args, **kwargs)
        finally:
            self.fn = fn

    interval = sys.getswitchinterval()
    builder.create_get_program_id = program_id
    for name in ("create_masked_load", "create_atomic_rmw", "create_atomic_cas"):
        setattr(builder, name, checked(name))
    _interp.GridExecutor.__call__ = threaded_call
    sys.setswitchinterval(switch_interval_s)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
        _interp.GridExecutor.__call__ = original_call
        for name in originals:
            delattr(builder, name)  # back to the class's methods
        abort.set()  # any thread left over from a failed launch stops at its next memory access
