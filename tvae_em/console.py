"""What tvae-em tells the person running it: messages, details, progress, and the transcript of a run.

Everything goes to stderr (stdout is left to what a pipe wants, such as the demo's report). The command line sets
the verbosity once (``invoked``, then ``set_level`` for ``-q`` / ``-v``); a library caller gets ``NORMAL``:

    note(...)      a message for the person; hidden by -q
    detail(...)    what a person checking a run wants to see (device, configurations, inputs); shown by -v only
    progress(...)  the one progress display of every long loop

Warnings (``warnings.warn``) and errors are never hidden. Progress adapts to where stderr goes: a tqdm bar on a
terminal; a plain line at each tenth of the work in a file or a pipe (a scheduler's log), where a bar's carriage
returns would pile up; nothing with -q.

A transcript (``transcript()``, ``log_file()``) records every note, detail and warning of an invocation, whatever
the verbosity, so that ``train`` can keep them in its run folder's ``run.log``: lines from before the folder could
be written (it is created only once nothing can be refused) are kept in memory and written when it opens.
"""

import contextlib
import functools
import platform
import shlex
import sys
import time
import warnings
from importlib import metadata

from tqdm import tqdm

from tvae_em import __version__
from tvae_em.errors import OutputError, TvaeError

QUIET, NORMAL, VERBOSE = 0, 1, 2
_VERSIONED = ("torch", "escnn", "numpy")  # besides tvae-em and Python, in run.log and config.json


class _State:
    """The verbosity, the command line as the person typed it (None: this is no tvae-em command, the
    process's own ``sys.argv`` stands for it) and the transcript being recorded, if any."""

    level = NORMAL
    command: list[str] | None = None
    transcript: "_Transcript | None" = None


_state = _State()


@contextlib.contextmanager
def invoked(command: list[str]):
    """Inside the block the command line ``command`` (the program name first) runs, at the NORMAL level until
    ``set_level``; the previous level and command line are restored after it (a caller in the same process, such
    as a test, gets its own back)."""
    previous = _state.level, _state.command
    _state.level, _state.command = NORMAL, list(command)
    try:
        yield
    finally:
        _state.level, _state.command = previous


def set_level(level: int) -> None:
    _state.level = level


def level() -> int:
    return _state.level


@contextlib.contextmanager
def silenced(when: bool = True):
    """Nothing but warnings and errors inside the block when ``when`` (``TrainConfig.progress=False``, ranks
    other than 0); the transcript still records every line."""
    previous = _state.level
    if when:
        _state.level = QUIET
    try:
        yield
    finally:
        _state.level = previous


def note(message: str) -> None:
    """A message for the person, hidden by -q."""
    _tell(message, NORMAL)


def detail(message: str) -> None:
    """A detail shown with -v only."""
    _tell(message, VERBOSE)


def _tell(message: str, least_level: int) -> None:
    if _state.transcript is not None:
        _state.transcript.add(message)
    if _state.level >= least_level:
        tqdm.write(message, file=sys.stderr)  # through tqdm, so that a bar on the terminal is redrawn below it


# --- progress -------------------------------------------------------------------------------------------

def progress(total: int, desc: str, unit: str, enabled: bool = True, transient: bool = False):
    """The progress display of a loop over ``total`` ``unit``s (singular: 'particle'); call ``update(n)``.

    On a terminal a tqdm bar (``transient``: erased when done); elsewhere a line at each tenth of ``total``
    reached (``encoding: 30 % (3000/10000 particles, 12 s)``), or none at all for a ``transient`` bar, whose
    loop reports in its own lines (training's batches, summed up by the epoch's line); nothing with -q or
    ``enabled=False``.
    """
    shown = enabled and _state.level >= NORMAL
    if shown and _stderr_is_terminal():
        return tqdm(total=total, desc=desc, unit=unit, leave=not transient, file=sys.stderr)
    if shown and not transient:
        return _TenthLines(total, desc, unit)
    return tqdm(total=total, disable=True)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


class _TenthLines:
    """Progress as plain lines, one when each tenth of the total is first reached (several tenths passed in
    one update make one line)."""

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit = total, desc, unit
        self.done, self.tenths, self.start = 0, 0, time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        tenths = min(10, 10 * self.done // self.total) if self.total else 0
        if tenths > self.tenths:
            self.tenths = tenths
            seconds = time.monotonic() - self.start
            tqdm.write(f"{self.desc}: {10 * tenths} % ({self.done}/{self.total} {self.unit}s, {seconds:.0f} s)",
                       file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


# --- the invocation, and its transcript ---------------------------------------------------------------------

def command_line() -> str:
    """The command line of this invocation, quoted as a shell would need it."""
    return shlex.join(_state.command if _state.command is not None else sys.argv)


@functools.cache
def versions() -> dict:
    """Versions of tvae-em, Python and the libraries its results depend on."""
    found = {"tvae-em": __version__, "python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def invocation() -> dict:
    """What identifies this invocation in the files a run keeps: the time, the command line, versions and host."""
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": command_line(), "versions": versions(),
            "host": platform.node()}


class _Transcript:
    """The lines of an invocation, each with the time it was told: in memory until a log file is opened, then
    appended to it as they come."""

    def __init__(self):
        self.lines: list[str] = []
        self.file = None
        self.path = None

    def add(self, line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        if self.file is None:
            self.lines.append(stamped)
        else:
            self._write(stamped + "\n")

    def open(self, path, header: list[str]) -> None:
        self.path = path
        try:
            self.file = open(path, "a", encoding="utf-8")
        except OSError as err:
            raise OutputError(path, f"cannot write: {err.strerror}") from err
        self._write("".join(f"{line}\n" for line in [*header, *self.lines]))
        self.lines = []

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _write(self, text: str) -> None:
        try:
            self.file.write(text)
            self.file.flush()  # a log read while the run goes on, or after the process is killed
        except OSError as err:
            raise OutputError(self.path, f"cannot write: {err.strerror}") from err


@contextlib.contextmanager
def transcript():
    """Record every note, detail and warning told inside the block (an inner block adds to the outer one's
    record), for ``log_file``; also a decorator, ``@transcript()``."""
    if _state.transcript is not None:
        yield
        return
    _state.transcript = record = _Transcript()
    shown = warnings.showwarning

    def show_and_record(message, category, filename, lineno, file=None, line=None):
        shown(message, category, filename, lineno, file, line)
        record.add(f"warning: {message}")

    warnings.showwarning = show_and_record
    try:
        yield
    finally:
        warnings.showwarning = shown
        record.close()
        _state.transcript = None


@contextlib.contextmanager
def log_file(path, header: list[str]):
    """Inside a ``transcript``: append ``header``, the lines recorded so far and every line told in the block to
    ``path``, with the error that ends the block, if one does."""
    record = _state.transcript
    record.open(path, header)
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(OutputError):  # a full disk: the error that ended the block goes on
            record.add(f"error: {exc}" if isinstance(exc, TvaeError) else f"error: {type(exc).__name__}: {exc}")
        raise
    finally:
        record.close()
