"""Process concerns: signals, the distributed process group and the data-reading worker processes.

Signals. SIGINT and SIGTERM stop any command within seconds and leave no partial output.

A cluster scheduler sends SIGTERM and kills the job 30-60 s later; Ctrl-C sends SIGINT. Inside
``stop_on_signals()`` both raise ``Stop`` at the next Python bytecode of the main thread, wherever it is, so
that the files being written are discarded on the way out (``io.atomic``). ``Stop`` derives from
BaseException, like KeyboardInterrupt, so that no ``except Exception`` in library code swallows it; the
command line turns it into exit code 130 and one line.

Code that must not be cut in half (renaming a command's outputs into place, saving a training epoch) runs
inside ``deferred_signals()``: a signal received there is raised when the block ends. Signals received while a
Stop is already on its way out are ignored, so that clean-up code runs to its end.
"""

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tvae_em.errors import TvaeError

if TYPE_CHECKING:  # torch is imported where it is used: the command line handles signals before it needs torch
    import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stop(BaseException):
    """SIGINT or SIGTERM arrived; ``name`` is the signal's name ('SIGTERM')."""

    def __init__(self, name: str):
        super().__init__(f"{name} received")
        self.name = name


class _State:
    """Signal handlers belong to the process, and so does this: whether ours are installed, how deep in
    ``deferred_signals`` blocks the main thread is, a signal waiting for the end of them, and whether a Stop has
    been raised."""

    installed = False
    deferring = 0
    pending: str | None = None
    stopping = False


_state = _State()


def _handle(signum, frame) -> None:
    name = signal.Signals(signum).name
    if _state.stopping:
        return
    if _state.deferring:
        _state.pending = _state.pending or name
        return
    _state.stopping = True
    raise Stop(name)


@contextlib.contextmanager
def stop_on_signals():
    """Raise Stop on SIGINT/SIGTERM inside the block; the previous handlers are restored after it.

    Nested blocks are allowed (the outermost one installs the handlers). Handlers can only be installed from
    the main thread; elsewhere signals keep their current behaviour.
    """
    if _state.installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.stopping, _state.pending = False, None
    previous = {sig: signal.signal(sig, _handle) for sig in STOP_SIGNALS}
    _state.installed = True
    try:
        yield
    finally:
        _state.installed = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def deferred_signals():
    """Hold back a Stop until the block has run: a signal received in it is raised when the outermost such block
    ends (if the block raises, its own exception goes on instead). Outside ``stop_on_signals`` (and in other
    threads) this changes nothing."""
    if threading.current_thread() is not threading.main_thread():  # handlers only ever run in the main thread
        yield
        return
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
    if not _state.deferring and _state.pending and not _state.stopping:
        name, _state.pending, _state.stopping = _state.pending, None, True
        raise Stop(name)


# --- the distributed group and the workers ----------------------------------------------------------------

class CarriedError:
    """A TvaeError raised while reading in a DataLoader worker, carried to the main process as data.

    DataLoader re-raises worker exceptions as ``type(message)``, which errors with other constructor
    arguments (InputError(path, problem)) do not survive: the user would get a RuntimeError and a traceback
    instead of the one-line message. The error is rebuilt without calling its constructor.
    """

    def __init__(self, error: TvaeError):
        self.cls, self.message, self.attributes = type(error), str(error), vars(error)

    def rebuild(self) -> TvaeError:
        error = self.cls.__new__(self.cls)
        Exception.__init__(error, self.message)
        error.__dict__.update(self.attributes)
        return error


@dataclass
class ProcessGroup:
    """This process's place in a torchrun job; a single process is rank 0 of 1 and never communicates."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @classmethod
    def start(cls, device: "torch.device") -> "ProcessGroup":
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), owns)

    def all_reduce(self, values: "torch.Tensor", op) -> "torch.Tensor":
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(values, op=op)
        return values

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which shuts them down cleanly."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def interruptible_backward():
    """Saved-tensor hooks that pass every tensor through unchanged and are only there to be Python code: the
    CPU autograd engine calls them on the main thread before each backward step that reads saved tensors, which
    lets a pending SIGINT/SIGTERM handler run there instead of after the whole backward pass."""
    import torch

    return torch.autograd.graph.saved_tensors_hooks(_unchanged, _unchanged)


def _unchanged(tensor: "torch.Tensor") -> "torch.Tensor":
    return tensor
