"""Choose particles: by class, by a list of row indices, or by a region of the latent space, and write the chosen
rows as a RELION 3.1 particle STAR (``tvae-em subset``), as RELION's subset selection and cryoDRGN's ``--ind``
files do.

Every criterion given narrows the selection (they combine as 'and'); the rows keep their input order and every
cell its text, and the optics table and any other block are kept whole. A RELION 3.0 file (no optics table) is
converted as ``io.particles.ParticleTable`` does, which needs its stacks for the box size; a 3.1 file needs only
itself.

Which column holds the classes (``io.columns.class_column``) is shared with ``tvae-em averages``, so that the
class numbers of the averages are the ones a subset selects: by default ``_tvaeCluster`` (the clusters of ``tvae-em
embed --clusters``) when the table has it, else RELION's ``_rlnClassNumber``.
"""

import re
from pathlib import Path

import numpy as np

from tvae_em.errors import InputError, UsageError
from tvae_em.io.atomic import refuse_overwriting
from tvae_em.io.columns import LATENT_PREFIX, class_column, class_numbers, latent_labels
from tvae_em.io.indices import read_row_indices
from tvae_em.io.stack import open_particles, particle_file_kind
from tvae_em.io.star import StarFile, numeric_column, particles_block, read_star, write_star

_INTEGER_RE = re.compile(r"[+-]?\d+")


# --- classes ------------------------------------------------------------------------------------------------

def parse_classes(text: str) -> list[int]:
    """'1,3,5-7' -> [1, 3, 5, 6, 7]; UsageError for anything else."""
    classes = []
    for part in text.split(","):
        bounds = part.strip().split("-")
        if not 1 <= len(bounds) <= 2 or not all(_INTEGER_RE.fullmatch(bound.strip()) for bound in bounds):
            raise UsageError(f"--classes {text!r}: expected class numbers like 1,3 or 2-4")
        first, last = int(bounds[0]), int(bounds[-1])
        if last < first:
            raise UsageError(f"--classes {text!r}: the range {part.strip()} runs backwards")
        classes.extend(range(first, last + 1))
    return sorted(set(classes))


# --- latent region ------------------------------------------------------------------------------------------

def parse_z_range(text: str) -> tuple[int, float, float]:
    """'DIM:LOW:HIGH' (DIM 1-based, as in _tvaeZ01; LOW or HIGH may be left empty for no bound) ->
    (dim, low, high); UsageError for anything else."""
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        dim = int(parts[0])
        low = float(parts[1]) if parts[1].strip() else -np.inf
        high = float(parts[2]) if parts[2].strip() else np.inf
    except ValueError:
        raise UsageError(f"--z-range {text!r}: expected DIM:LOW:HIGH, e.g. 1:-0.5:0.5 (an empty bound is "
                         "open)") from None
    if dim < 1 or np.isnan(low) or np.isnan(high) or low > high:
        raise UsageError(f"--z-range {text!r}: need a dimension from 1 and LOW <= HIGH")
    return dim, low, high


def in_latent_range(star: StarFile, block: str, dim: int, low: float, high: float) -> np.ndarray:
    """Whether each particle's latent coordinate ``dim`` (1-based, column _tvaeZ<dim>) lies in [low, high]."""
    labels = latent_labels(star[block].columns)
    if dim not in labels:
        raise InputError(star.path, f"data_{block} has no _{LATENT_PREFIX}{dim:02d} column (it has {len(labels)} "
                                    "latent dimensions; 'tvae-em embed' writes them)")
    z = numeric_column(star, block, labels[dim])
    return (z >= low) & (z <= high)


# --- the command --------------------------------------------------------------------------------------------

def subset_star(star_path, out_star, classes=None, indices_file=None, z_ranges=(), class_column_label=None,
                datadir=None) -> tuple[Path, int, int]:
    """Write the particles of ``star_path`` chosen by every criterion given to ``out_star``: ``classes`` (class
    numbers, in ``class_column``), ``indices_file`` (``read_row_indices``) and ``z_ranges`` ((dim, low, high)
    each, ``parse_z_range``). Returns (out_star, particles chosen, particles in the input).

    UsageError without a criterion, for an output that is an input, for a class that no particle has and when
    nothing is chosen; InputError for a bad index file or a missing column."""
    if classes is None and indices_file is None and not z_ranges:
        raise UsageError("choose particles with --classes, --indices or --z-range")
    out_star = Path(out_star)
    refuse_overwriting([out_star], [path for path in (star_path, indices_file) if path is not None])
    star = _relion31_table(star_path, datadir)
    block = particles_block(star)
    n_rows = len(star[block])
    chosen = np.ones(n_rows, dtype=bool)
    if classes is not None:
        label = class_column(star, block, class_column_label)
        numbers = class_numbers(star, block, label)
        absent = sorted(set(classes) - set(numbers.tolist()))
        if absent:
            raise UsageError(f"--classes: no particle of {star.path} is in class {absent[0]} of _{label} "
                             f"(its classes: {_listing(np.unique(numbers))})")
        chosen &= np.isin(numbers, classes)
    if indices_file is not None:
        listed = np.zeros(n_rows, dtype=bool)
        listed[read_row_indices(indices_file, n_rows, star.path)] = True
        chosen &= listed
    for dim, low, high in z_ranges:
        chosen &= in_latent_range(star, block, dim, low, high)
    if not chosen.any():
        raise UsageError(f"no particle of {star.path} meets every criterion given; nothing written")
    rows = np.flatnonzero(chosen)
    write_star(out_star, star.replace(block, star[block].iloc[rows].reset_index(drop=True)))
    return out_star, len(rows), n_rows


def _relion31_table(star_path, datadir) -> StarFile:
    """The STAR file as it is when it has an optics table; a RELION 3.0 file or a cryoSPARC .cs file converted
    (which reads its stacks' headers for the box size)."""
    if particle_file_kind(star_path) == "star":
        star = read_star(star_path)
        if "optics" in star:
            return star
    return open_particles(star_path, datadir=datadir).table


def _listing(numbers, shown: int = 10) -> str:
    text = ", ".join(str(n) for n in numbers[:shown])
    return text if len(numbers) <= shown else f"{text}, ... ({len(numbers)} in all)"
