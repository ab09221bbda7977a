"""MRC/MRCS images: lazy reading and streaming float32 writing.

Stacks of hundreds of thousands of particles are never loaded whole: the header is parsed (permissively,
since RELION and other programs often write no 'MAP ' stamp or machine stamp), then particle stacks are read
section by section with ``os.pread`` (``read_sections``) and micrographs, of which a few boxes are cut, are
mapped with numpy.memmap (``map_data``) so that only the pages holding those boxes are touched.
"""

import contextlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
from mrcfile.dtypes import HEADER_DTYPE

from tvae_em.errors import InputError
from tvae_em.io.atomic import atomic_path
from tvae_em.io.files import regular_file

# MRC2014 modes RELION reads and we accept (4-bit mode 101 and complex modes are not particle images).
MODE_DTYPES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}
MRC2014_MODES = {0, 1, 2, 3, 4, 6, 12, 101}


@dataclass(frozen=True)
class MrcHeader:
    """What is needed to map an MRC file: (sections, rows, cols), on-disk dtype, data offset, pixel size."""

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    offset: int
    pixel_size: float  # Angstrom; 0.0 when the header carries none
    stamped: bool  # False when the 'MAP ' stamp or machine stamp was missing


def read_mrc_header(path) -> MrcHeader:
    """Parse and check the header; InputError for a missing, non-MRC, unsupported or truncated file."""
    path = regular_file(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                header = mrc.header.copy()
        except (ValueError, OSError) as err:
            raise InputError(path, f"not a readable MRC file ({err})") from None
    mode = int(header.mode)
    if mode not in MRC2014_MODES and bytes(header.map) != b"MAP ":
        raise InputError(path, f"not an MRC file (no MRC mode and no 'MAP ' stamp in its header, which begins "
                               f"{_first_bytes(path)!r})")
    if mode not in MODE_DTYPES:
        raise InputError(path, f"unsupported MRC mode {mode} (supported: 0, 1, 2, 6, 12)")
    shape = (int(header.nz), int(header.ny), int(header.nx))
    if min(shape) < 1:
        raise InputError(path, f"MRC header gives no images (nx, ny, nz = {shape[2]}, {shape[1]}, "
                         f"{shape[0]})")
    dtype = np.dtype(MODE_DTYPES[mode]).newbyteorder(header.mode.dtype.byteorder)
    offset = HEADER_DTYPE.itemsize + int(header.nsymbt)
    needed = offset + math.prod(shape) * dtype.itemsize  # Python ints: a lying header cannot overflow this
    size = path.stat().st_size
    if size < needed:
        raise InputError(path, f"truncated: header says {shape[0]} images of {shape[2]}x{shape[1]} "
                         f"(mode {mode}, {needed} bytes) but the file holds {size} bytes")
    stamped = not any("stamp" in str(w.message) or "Map ID" in str(w.message) for w in caught)
    return MrcHeader(path, shape, dtype, offset, _pixel_size(header), stamped)


def looks_like_mrc(head: bytes) -> bool:
    """Whether ``head``, the first bytes of a file, can be an MRC header as ``read_mrc_header`` reads one: the 'MAP '
    stamp, or positive sizes and a known mode in either byte order (files without the stamp are common)."""
    if len(head) < HEADER_DTYPE.itemsize:
        return False
    if head[208:212] == b"MAP ":
        return True
    for order in ("little", "big"):
        nx, ny, nz, mode = (int.from_bytes(head[i:i + 4], order, signed=True) for i in range(0, 16, 4))
        if min(nx, ny, nz) > 0 and mode in MRC2014_MODES:
            return True
    return False


def _first_bytes(path: Path, count: int = 16) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(count)


def _pixel_size(header) -> float:
    """cella.x / mx in Angstrom, as RELION reads it; 0.0 when the header leaves it unset or invalid."""
    size = float(header.cella.x) / int(header.mx) if int(header.mx) > 0 else 0.0
    return size if np.isfinite(size) and size > 0 else 0.0


def map_data(header: MrcHeader) -> np.memmap:
    """Read-only (sections, rows, cols) view of the data; no pixel is read until it is indexed."""
    return np.memmap(header.path, dtype=header.dtype, mode="r", offset=header.offset, shape=header.shape)


def read_sections(header: MrcHeader, handle, first: int, count: int) -> np.ndarray:
    """Sections ``first`` .. ``first + count - 1`` (0-based) as a read-only (count, rows, cols) array.

    ``os.pread`` needs no file position, so threads may share ``handle``; and unlike a memory map it leaves
    no page of the file resident in this process (the page cache keeps it), so streaming a million particles
    costs one batch of RSS, not the size of the stacks, which cluster schedulers would count as the job's.
    """
    section_bytes = math.prod(header.shape[1:]) * header.dtype.itemsize
    offset, size = header.offset + first * section_bytes, count * section_bytes
    parts = []
    while size > 0:
        part = os.pread(handle.fileno(), min(size, 1 << 30), offset)
        if not part:
            raise InputError(header.path, f"truncated while reading (sections {first + 1}-{first + count} "
                                          "gone; was the file replaced?)")
        parts.append(part)
        offset, size = offset + len(part), size - len(part)
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    return np.frombuffer(data, dtype=header.dtype).reshape(count, *header.shape[1:])


def warn_unstamped(headers) -> None:
    """One warning for all files that lacked the 'MAP ' or machine stamp (common in RELION output)."""
    unstamped = [h.path for h in headers if not h.stamped]
    if unstamped:
        warnings.warn(f"{len(unstamped)} MRC file(s) lack the 'MAP ' or machine stamp (e.g. {unstamped[0]}); "
                      "read as little-endian MRC2014", stacklevel=3)


class StackWriter:
    """Write a float32 MRC stack chunk by chunk, atomically, without knowing the image count in advance.

    The data are streamed after a placeholder header; on a clean exit the real header (count, pixel size,
    statistics) is written and the file renamed into place.  On an exception nothing is left behind.
    """

    def __init__(self, path, pixel_size: float):
        self.path, self.pixel_size = Path(path), float(pixel_size)
        self.count, self.box = 0, None
        self._sum = self._sum_sq = 0.0
        self._min, self._max = np.inf, -np.inf

    def __enter__(self):
        with contextlib.ExitStack() as files:
            self._file = files.enter_context(open(files.enter_context(atomic_path(self.path)), "wb"))
            self._file.write(bytes(HEADER_DTYPE.itemsize))
            self._files = files.pop_all()
        return self

    def write(self, images: np.ndarray) -> None:
        images = np.asarray(images, dtype="<f4")
        if images.ndim != 3 or images.shape[1] != images.shape[2]:
            raise ValueError(f"expected a stack of square images, got shape {images.shape}")
        if self.box is None:
            self.box = images.shape[1]
        if images.shape[1] != self.box:
            raise ValueError(f"image size {images.shape[1]} after {self.box}")
        self._file.write(np.ascontiguousarray(images).data)  # file.write: a full disk raises OSError(ENOSPC)
        if images.size:
            self.count += len(images)
            self._sum += float(images.sum(dtype=np.float64))
            self._sum_sq += float(np.square(images, dtype=np.float64).sum())
            self._min, self._max = min(self._min, float(images.min())), max(self._max, float(images.max()))

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is not None:
            return self._files.__exit__(exc_type, exc, traceback)
        with self._files:  # a failing header write or final flush (disk full) deletes the temporary too
            self._file.seek(0)
            self._file.write(self._header().tobytes())
        return False

    def _header(self) -> np.ndarray:
        header = np.zeros((), dtype=HEADER_DTYPE.newbyteorder("<")).view(np.recarray)
        box = self.box or 0
        header.nx = header.ny = header.mx = header.my = box
        header.nz, header.mz, header.mode, header.ispg = self.count, 1, 2, 0
        header.cella = (box * self.pixel_size, box * self.pixel_size, self.pixel_size)
        header.cellb = (90.0, 90.0, 90.0)
        header.mapc, header.mapr, header.maps = 1, 2, 3
        header.map, header.machst, header.nversion = b"MAP ", (0x44, 0x44, 0, 0), 20141
        header.nlabl, header.label[0] = 1, b"tvae-em"
        n_values = self.count * box * box
        if n_values:
            mean = self._sum / n_values
            header.dmin, header.dmax, header.dmean = self._min, self._max, mean
            header.rms = np.sqrt(max(self._sum_sq / n_values - mean * mean, 0.0))
        else:  # MRC2014 convention for unknown statistics
            header.dmin, header.dmax, header.dmean, header.rms = 0.0, -1.0, -2.0, -1.0
        return header


def write_stack(path, images_or_chunks, pixel_size: float) -> int:
    """Write an (n, N, N) array, or an iterable of (k, N, N) chunks, as one float32 stack; returns n."""
    chunks = [images_or_chunks] if isinstance(images_or_chunks, np.ndarray) else images_or_chunks
    with StackWriter(path, pixel_size) as writer:
        for chunk in chunks:
            writer.write(chunk)
    return writer.count
