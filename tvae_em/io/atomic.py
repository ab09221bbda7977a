"""Write outputs under a temporary name in the destination folder and rename them into place.

An interrupted run therefore never leaves a half-written file under the final name, and an existing
file is replaced only once its successor is complete.
"""

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from tvae_em.errors import OutputError, UsageError

# Write failures that are about the destination, not about what is being written: reported in one line.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on failure delete it.

    The temporary name keeps the final suffix so that writers which pick a format from it (matplotlib,
    starfile) behave the same.  A full disk, an exhausted quota or file-size limit while writing, and any
    failure to create or rename the file, raise OutputError naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{path.suffix}", dir=path.parent)
    except OSError as err:
        raise OutputError(path, f"cannot create: {err.strerror}") from err
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should be readable like any other file
    try:
        try:
            yield tmp
        except OSError as err:
            if err.errno in _NO_ROOM:
                raise OutputError(path, f"cannot write: {os.strerror(err.errno)}") from err
            raise
        try:
            os.replace(tmp, path)
        except OSError as err:
            raise OutputError(path, f"cannot replace: {err.strerror}") from err
    finally:
        tmp.unlink(missing_ok=True)


def refuse_overwriting(outputs, inputs) -> None:
    """UsageError if an output path names one of the inputs (by any spelling or symbolic link): an input is
    never replaced, not even by a complete output."""
    taken = {os.path.realpath(path) for path in inputs}
    for output in outputs:
        if os.path.realpath(output) in taken:
            raise UsageError(f"output {output} is also an input; choose another output location")
