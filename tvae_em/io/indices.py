"""0-based row indices of particles, from the files cryoDRGN and people write: a text file (integers separated by
whitespace or commas, '#' comments), a .npy array or a .pkl of an array or list (cryoDRGN's ``--ind`` files,
unpickled without running code). Read by ``tvae-em subset --ind`` and by the ``--ind`` of ``train``, ``embed`` and
``pose`` (``io.stack.open_particles``).
"""

import pickle
import re
from pathlib import Path

import numpy as np

from tvae_em.errors import InputError
from tvae_em.io.files import regular_file

_INTEGER_RE = re.compile(r"[+-]?\d+")


def read_row_indices(path, n_rows: int, star_path) -> np.ndarray:
    """Sorted, distinct 0-based row indices from a text file (integers separated by whitespace or commas, '#'
    comments), a .npy array or a .pkl of an array or list (cryoDRGN's ``--ind`` files); InputError naming the
    file for anything that is not an integer or lies outside the ``n_rows`` rows of ``star_path``."""
    path = regular_file(path)
    suffix = path.suffix.lower()
    values = _load_npy(path) if suffix == ".npy" else _load_pickle(path) if suffix == ".pkl" else _load_text(path)
    values = np.asarray(values)
    integral = values.dtype.kind in "iu" or (values.dtype.kind == "f" and np.all(values == np.round(values)))
    if values.ndim != 1 or values.dtype.kind not in "iuf" or not integral:
        raise InputError(path, f"not a list of row indices (a 1-D array of integers; found {values.ndim}-D "
                               f"{values.dtype})")
    outside = np.flatnonzero((values < 0) | (values >= n_rows))
    if outside.size:
        raise InputError(path, f"row index {values[outside[0]]:g} is out of range: {star_path} has {n_rows} "
                               f"particles (0-based indices 0 to {n_rows - 1})")
    return np.unique(values.astype(np.int64))


def _load_text(path: Path) -> np.ndarray:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(path, "not a text file of row indices (.npy and .pkl files are read as arrays)") from None
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror}") from None
    values = []
    for number, line in enumerate(lines, start=1):
        for token in line.split("#", 1)[0].replace(",", " ").split():
            if not _INTEGER_RE.fullmatch(token):
                raise InputError(path, f"line {number}: {token[:40]!r} is not a row index (0-based integers)")
            values.append(int(token))
    huge = any(abs(value) >= 2 ** 62 for value in values)  # out of range anyway; float64 holds it for the message
    return np.asarray(values, dtype=np.float64 if huge else np.int64)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(path, f"not a readable .npy array ({err})") from None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists and numbers only: a pickle can run any code it names, and an index file
    needs none."""

    _ALLOWED = {(f"numpy.{core}.{module}", name) for core in ("core", "_core")  # numpy 1 and 2 spell it so
                for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                                     ("numeric", "_frombuffer"))} | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no array of indices needs")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as handle:
            return np.asarray(_ArrayUnpickler(handle).load())
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror}") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
            ValueError) as err:
        raise InputError(path, f"not a pickled array of row indices ({err})") from None
