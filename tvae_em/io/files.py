"""Inputs are read only from regular files: a FIFO, socket or device named by mistake gets a one-line error
instead of a read that waits forever for a writer."""

import stat
from pathlib import Path

from tvae_em.errors import InputError


def regular_file(path) -> Path:
    """``path`` as a Path if it names a regular file (through any symbolic links); InputError otherwise."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror}") from None
    if stat.S_ISDIR(mode):
        raise InputError(path, "is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise InputError(path, "not a regular file (a FIFO, socket or device); give the file itself")
    return path
