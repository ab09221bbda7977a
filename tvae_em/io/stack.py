"""Particle images referenced by a STAR file, a cryoSPARC .cs file or one plain MRCS stack, read lazily in index
order, and the particle sources training and inference read (``ParticleSource``: ``Particles`` from files,
``ArrayParticles`` from memory). What the STAR file's rows mean is parsed once, into ``io.particles.ParticleTable``;
this module holds only the images.

``open_particles`` finds the stacks (``--datadir``) and checks everything that can be checked cheaply before any
work starts (every stack exists, every index is within its stack, all boxes are square and equal) and raises
InputError naming the file, the row and the problem.  ``Particles.read`` then serves batches: requested rows are
sorted and read as contiguous runs (``mrc.read_sections``), so a shuffled batch costs one small read per image and
a sequential chunk one read per stack file, and memory holds the batch, never the stacks.
"""

import os
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
from mrcfile.dtypes import HEADER_DTYPE

from tvae_em.errors import InputError
from tvae_em.io.cryosparc import CSDAT_MAGIC, NUMPY_MAGIC, read_cryosparc
from tvae_em.io.files import regular_file
from tvae_em.io.indices import read_row_indices
from tvae_em.io.mrc import MrcHeader, looks_like_mrc, read_mrc_header, read_sections, warn_unstamped, write_stack
from tvae_em.io.particles import ParticleImages, ParticleTable, parse_image_names
from tvae_em.io.star import StarFile, image_name_texts, new_relion31_star, particles_block, read_star, starts_like_star

__all__ = ["ArrayParticles", "ParticleSource", "Particles", "image_names", "open_particles", "particle_file_kind",
           "relion_path", "write_stack"]
_OPEN_FILES = 64  # stacks kept open at once


class ParticleSource(Protocol):
    """What training, inference and averaging read particles from: ``Particles`` (files) or ``ArrayParticles``
    (memory). ``ctf``: (n, ctf.N_COLUMNS) parameters as ``ParticleTable.ctf`` gives them, or None; ``ctf_flipped``:
    whether the images were multiplied by the sign of their CTF."""

    @property
    def box(self) -> int: ...

    @property
    def ctf(self) -> np.ndarray | None: ...

    @property
    def ctf_flipped(self) -> bool: ...

    def __len__(self) -> int: ...

    def read(self, indices) -> np.ndarray:
        """Images of rows ``indices`` (0-based, any order, repeats allowed) as float32 (k, N, N)."""
        ...


class Particles:
    """N x N particle images with their RELION 3.1 table (``particle_table``, parsed once).

    ``table`` is the StarFile to write results back with (``block`` names its particles table),
    ``pixel_sizes`` the per-particle pixel size in Angstrom and ``pixel_size`` the same as one float when
    uniform; ``rows`` is None, or for a ``subset`` the 0-based rows of the file's table that these particles are.
    Picklable (for data-loader workers): open files are not carried across.
    """

    rows: np.ndarray | None = None

    def __init__(self, particle_table: ParticleTable, headers: list[MrcHeader], stack_id: np.ndarray):
        self._files: OrderedDict[int, object] = OrderedDict()  # first: __del__ closes them after any failure
        self.particle_table, self._headers, self._stack_id = particle_table, headers, stack_id
        self._slice = particle_table.images.numbers - 1
        self.box = headers[0].shape[1]
        self.pixel_sizes = particle_table.pixel_sizes
        uniform = np.all(self.pixel_sizes == self.pixel_sizes[0])
        self.pixel_size = float(self.pixel_sizes[0]) if uniform else self.pixel_sizes

    def __len__(self) -> int:
        return len(self._stack_id)

    def __getstate__(self):
        return {**self.__dict__, "_files": OrderedDict()}

    @property
    def table(self) -> StarFile:
        return self.particle_table.star

    @property
    def block(self) -> str:
        return self.particle_table.block

    @property
    def ctf(self) -> np.ndarray | None:
        """Every particle's CTF parameters and pixel size (``ParticleTable.ctf``); None without defocus values.
        InputError naming the STAR file when a parameter the CTF needs is missing or out of range."""
        return self.particle_table.ctf

    @property
    def ctf_flipped(self) -> bool:
        """Whether the images were multiplied by the sign of their CTF (``preprocess --phase-flip``)."""
        return self.particle_table.ctf_flipped

    def subset(self, rows) -> "Particles":
        """The particles of table rows ``rows`` (0-based, increasing) on their own: their table holds only those
        rows (the optics and any other block kept whole), and its ``rows`` say which rows of the file they are."""
        rows = np.asarray(rows, dtype=np.int64)
        chosen = Particles(self.particle_table.subset(rows), self._headers, self._stack_id[rows])
        chosen.rows = rows if self.rows is None else self.rows[rows]
        return chosen

    @property
    def stack_paths(self) -> list[Path]:
        return [header.path for header in self._headers]

    def read(self, indices) -> np.ndarray:
        """Images of table rows ``indices`` (0-based, any order, repeats allowed) as float32 (k, N, N)."""
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"particle index out of range 0..{len(self) - 1}")
        order = np.argsort(rows, kind="stable")
        stacks, slices = self._stack_id[rows[order]], self._slice[rows[order]]
        breaks = np.flatnonzero((np.diff(stacks) != 0) | (np.diff(slices) != 1)) + 1
        out = np.empty((rows.size, self.box, self.box), dtype=np.float32)
        runs = zip(np.r_[0, breaks], np.r_[breaks, rows.size], strict=True) if rows.size else ()
        for start, stop in runs:
            first, stack = int(slices[start]), int(stacks[start])
            run = read_sections(self._headers[stack], self._file(stack), first, stop - start)
            finite = np.isfinite(run).all(axis=(1, 2))
            if not finite.all():
                bad = first + int(np.flatnonzero(~finite)[0]) + 1
                raise InputError(self._headers[stack].path, f"image {bad} contains NaN or inf pixels")
            out[order[start:stop]] = run
        return out

    def _file(self, stack: int):
        if stack in self._files:
            self._files.move_to_end(stack)
        else:
            if len(self._files) >= _OPEN_FILES:
                self._files.popitem(last=False)[1].close()
            self._files[stack] = open(self._headers[stack].path, "rb", buffering=0)  # closed by close()
        return self._files[stack]

    def close(self) -> None:
        while self._files:
            self._files.popitem()[1].close()

    def __del__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArrayParticles:
    """The in-memory ``ParticleSource``: images (n, N, N) held as float32, served like ``Particles`` to training
    and inference, for tests, benchmarks and notebooks, without files. ``ctf``: (n, ctf.N_COLUMNS) parameters as
    ``ParticleTable.ctf`` gives them, or None."""

    def __init__(self, images, ctf: np.ndarray | None = None, ctf_flipped: bool = False):
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.box = self.images.shape[-1]
        self.ctf, self.ctf_flipped = ctf, ctf_flipped

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices) -> np.ndarray:
        return self.images[np.asarray(indices)]


def open_particles(path, datadir=None, pixel_size: float | None = None, indices_file=None) -> Particles:
    """Open a STAR file (RELION 3.0-5.0), a cryoSPARC .cs file (``cryosparc.read_cryosparc``) or a plain MRC/MRCS
    stack, validating all references; ``pixel_size`` (Angstrom) replaces the one of the STAR/.cs file or the stack
    headers (``ParticleTable.from_star``). A .cs file's image names become the paths of the stacks found.
    ``indices_file`` (cryoDRGN's ``--ind``, ``io.indices.read_row_indices``) keeps only the particles of the
    0-based rows it lists, in file order (``Particles.subset``); InputError naming it when it lists none or a row
    the file lacks."""
    particles = _open_all(Path(path), datadir, pixel_size)
    if indices_file is None:
        return particles
    rows = read_row_indices(indices_file, len(particles), path)
    if not rows.size:
        raise InputError(indices_file, "lists no row index: no particle to use")
    return particles.subset(rows)


def _open_all(path: Path, datadir, pixel_size: float | None) -> Particles:
    kind = particle_file_kind(path)
    if kind == "mrc":
        return _open_plain_stack(path, pixel_size)
    star = read_cryosparc(path) if kind == "cs" else read_star(path)
    block = particles_block(star)
    if star[block].empty:
        raise InputError(path, f"data_{block} lists no particles")
    images = parse_image_names(star, block)
    stack_id, unique_names = pd.factorize(images.stacks)
    hint = "give the cryoSPARC project directory with --datadir" if kind == "cs" else "see --datadir"
    resolver = _Resolver(path, Path(datadir) if datadir else None, hint)
    first_rows = np.unique(stack_id, return_index=True)[1]
    headers = [read_mrc_header(resolver.resolve(name, int(row)))
               for name, row in zip(unique_names, first_rows, strict=True)]
    _check_stacks(star, block, headers, list(unique_names), stack_id, images.numbers)
    warn_unstamped(headers)
    if kind == "cs":
        star, images = _named_by_found_stacks(star, block, images, stack_id, headers)
    table = ParticleTable.from_star(star, headers[0].shape[1], headers[0].pixel_size, pixel_size, images)
    return Particles(table, headers, stack_id.astype(np.int32))


def particle_file_kind(path) -> str:
    """'star', 'cs' (cryoSPARC) or 'mrc': by content where it tells (the NumPy magic of a .cs file, STAR text, an
    MRC header), else by suffix; InputError saying what is expected for anything else."""
    path = regular_file(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEADER_DTYPE.itemsize)
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror}") from None
    suffix = path.suffix.lower()
    if head.startswith((NUMPY_MAGIC, CSDAT_MAGIC)) or suffix == ".cs":
        return "cs"
    if suffix == ".star" or starts_like_star(head):
        return "star"
    if suffix in (".mrc", ".mrcs") or looks_like_mrc(head):
        return "mrc"
    raise InputError(path, "not a particle file: expected a RELION/Topaz STAR file, an MRC/MRCS stack or a "
                           f"cryoSPARC .cs file (it begins {head[:16]!r})")


def _named_by_found_stacks(star: StarFile, block: str, images: ParticleImages, stack_id: np.ndarray,
                           headers: list[MrcHeader]) -> tuple[StarFile, ParticleImages]:
    """``star`` with each rlnImageName naming the stack found for it (``relion_path``), so that the STAR files
    written from it are read without the cryoSPARC project directory, and the images it names so."""
    found = np.array([relion_path(header.path) for header in headers], dtype=object)
    named = ParticleImages(images.numbers, found[stack_id])
    return star.replace(block, star[block].assign(rlnImageName=image_name_texts(*named))), named


def _open_plain_stack(path: Path, pixel_size: float | None) -> Particles:
    header = read_mrc_header(path)
    warn_unstamped([header])
    count, rows, cols = header.shape
    if rows != cols:
        raise InputError(path, f"images are {cols}x{rows}, not square")
    images = ParticleImages(np.arange(1, count + 1), np.full(count, os.path.abspath(path), dtype=object))
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"]})
    particles = pd.DataFrame({"rlnImageName": image_name_texts(*images),
                              "rlnOpticsGroup": np.ones(count, dtype=np.int64)})
    star = new_relion31_star(optics, particles)
    star.path = path  # names the stack in messages about the table
    table = ParticleTable.from_star(star, cols, header.pixel_size, pixel_size, images)
    return Particles(table, [header], np.zeros(count, dtype=np.int32))


class _Resolver:
    """Find a stack named in a STAR (or .cs) file.

    With ``datadir``: datadir/name, then datadir/basename.  Without: relative to the STAR file's folder,
    then to each folder above it (RELION writes paths relative to the project folder, usually two levels
    above a job's STAR file), then to the working directory.  The folder that worked last is tried first.
    ``hint`` ends the message for a stack found nowhere.
    """

    def __init__(self, star_path: Path, datadir: Path | None, hint: str):
        self.star_path, self.datadir, self.hint = star_path, datadir, hint
        folder = star_path.parent.absolute()
        self.bases = list(dict.fromkeys([folder, *folder.parents, Path.cwd()]))

    def resolve(self, name: str, row: int) -> Path:
        if self.datadir is not None:
            candidates = [(self.datadir, name), (self.datadir, Path(name).name)]
        else:  # an absolute name ignores the base
            candidates = [(base, name) for base in self.bases]
        for base, relative in candidates:
            if (base / relative).is_file():
                if self.datadir is None:
                    self.bases.insert(0, self.bases.pop(self.bases.index(base)))
                return base / relative
        raise InputError(self.star_path, f"row {row + 1}: stack {name!r} not found{self._where_tried(name)} "
                                         f"({self.hint})")

    def _where_tried(self, name: str) -> str:
        if self.datadir is not None:
            return f" as {self.datadir / name} nor as {self.datadir / Path(name).name}"
        if Path(name).is_absolute():
            return ""
        return (f" relative to {self.star_path.parent.absolute()}, the folders above it or the working directory "
                f"{Path.cwd()}")


def _check_stacks(star: StarFile, block: str, headers: list[MrcHeader], names: list[str],
                  stack_id: np.ndarray, index: np.ndarray) -> None:
    box = headers[0].shape[1]
    for header, name in zip(headers, names, strict=True):
        count, rows, cols = header.shape
        if rows != cols:
            raise InputError(header.path, f"images are {cols}x{rows}, not square")
        if rows != box:
            raise InputError(star.path, f"stack {name!r} holds {cols}x{rows} images but {names[0]!r} holds "
                             f"{box}x{box}; all particles must share one box size")
    counts = np.array([header.shape[0] for header in headers])
    past_end = np.flatnonzero(index > counts[stack_id])
    if past_end.size:
        row = int(past_end[0])
        raise InputError(star.path, f"data_{block} row {row + 1}: image {index[row]} is past the end of "
                         f"{names[stack_id[row]]!r} ({counts[stack_id[row]]} images)")


def relion_path(path) -> str:
    """``path`` as RELION names files: relative to the working (project) folder if inside, else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def image_names(count: int, stack_path) -> list[str]:
    """The rlnImageName of each of the ``count`` images of a stack written at ``stack_path``, as RELION names them
    ('000001@' and the ``relion_path`` of the stack)."""
    return image_name_texts(np.arange(1, count + 1), relion_path(stack_path)).tolist()
