"""Write outputs under a temporary name in the destination folder and rename them into place.

An interrupted run therefore never leaves a half-written file under the final name, and an existing
file is replaced only once its successor is complete. A command that writes several files (a stack and its
STAR, a STAR and its figures) writes them all through ``atomic_paths``, so that they appear together or not at
all. ``refuse_overwriting`` keeps every output off the command's inputs, and ``locked_folder`` keeps two
processes from writing one folder at once.
"""

import contextlib
import errno
import fcntl
import os
import tempfile
from pathlib import Path

from tvae_em.errors import OutputError, UsageError
from tvae_em.runtime import deferred_signals

# Write failures that are about the destination, not about what is being written: reported in one line.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary_beside(path: Path) -> Path:
    """A new empty file in ``path``'s folder (created if missing), named after it, readable like any output.

    The temporary name keeps the final suffix so that writers which pick a format from it (matplotlib,
    starfile, numpy) behave the same.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{path.suffix}", dir=path.parent)
    except OSError as err:
        raise OutputError(path, f"cannot create: {err.strerror}") from err
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should be readable like any other file
    return Path(tmp)


@contextlib.contextmanager
def atomic_paths(*paths):
    """Yield a list of temporary paths, one beside each of ``paths``; when the block succeeds, rename every
    one into place, otherwise delete them all.

    Everything but the block itself runs with SIGINT/SIGTERM deferred (``runtime.deferred_signals``): an
    interruption leaves all of the outputs or none, and no temporary. A full disk, an exhausted quota or
    file-size limit while writing, and any failure to create or rename a file, raise OutputError naming the
    final path (a writer that writes through ``atomic_path`` onto one of the temporaries has its error renamed;
    a write that fails in the block itself is reported for the folder, or for the path when there is one).
    """
    paths = [Path(path) for path in paths]
    temporaries = []
    try:
        with deferred_signals():
            for path in paths:
                temporaries.append(_temporary_beside(path))
        final_name = {str(tmp): path for tmp, path in zip(temporaries, paths, strict=True)}
        try:
            yield temporaries
        except OutputError as err:
            if err.path in final_name:
                raise OutputError(final_name[err.path], err.problem) from err
            raise
        except OSError as err:
            if err.errno in _NO_ROOM:
                where = paths[0] if len(paths) == 1 else paths[0].parent
                raise OutputError(where, f"cannot write: {os.strerror(err.errno)}") from err
            raise
        with deferred_signals():
            for tmp, path in zip(temporaries, paths, strict=True):
                try:
                    os.replace(tmp, path)
                except OSError as err:
                    raise OutputError(path, f"cannot replace: {err.strerror}") from err
    finally:
        with deferred_signals():
            for tmp in temporaries:
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on failure delete it.

    Errors as for ``atomic_paths``, naming ``path``.
    """
    with atomic_paths(path) as (tmp,):
        yield tmp


def refuse_overwriting(outputs, inputs) -> None:
    """UsageError if an output is one of the inputs: the same path by any spelling or symbolic link, or the
    same file under another name (a hard link). An input is never replaced, not even by a complete output."""
    inputs = list(inputs)
    by_path = {os.path.realpath(path): path for path in inputs}
    by_identity = {_identity(path): path for path in inputs}
    by_identity.pop(None, None)
    for output in outputs:
        taken = by_path.get(os.path.realpath(output)) or by_identity.get(_identity(output))
        if taken is not None:
            also = "" if str(taken) == str(output) else f" ({taken})"
            raise UsageError(f"output {output} is also an input{also}; choose another output location")


def _identity(path) -> tuple[int, int] | None:
    """(device, inode) of an existing file, which hard links share; None for a path that does not exist."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


@contextlib.contextmanager
def locked_folder(folder, lock_name: str, purpose: str):
    """Hold an exclusive lock on ``folder`` (created if missing) for the block, through the file ``lock_name``
    in it; UsageError at once if another process holds it.

    ``flock`` locks are released by the kernel when their process ends, however it ends, so a killed run
    never leaves the folder locked. The lock file stays: deleting it would let a third process lock a new
    file while a second still waits on the old one.
    """
    folder = Path(folder)
    lock_path = folder / lock_name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a")  # closed by the with block below
    except OSError as err:
        raise OutputError(lock_path, f"cannot create: {err.strerror}") from err
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{folder} is in use by another process ({purpose}); wait for it to end or "
                             "choose another folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
