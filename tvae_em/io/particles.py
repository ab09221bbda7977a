"""The particle table: what a particle STAR file means in RELION's terms, parsed once.

``ParticleTable.from_star`` takes a particle StarFile (RELION 3.0 to 5.0, or the RELION 3.1 table made of a
cryoSPARC .cs file or of a plain stack), brings it to the RELION 3.1 layout every command reads and parses, each
column at most once, what the particles' rows say: their images (stack name and 1-based number, from
_rlnImageName), their optics group's row in ``data_optics``, their pixel size, and, on first use, their CTF
parameters and whether the images are phase flipped. The text-keeping StarFile stays in ``ParticleTable.star``, to
write results back with (``write_star(path, table.star, columns, block=table.block)``).

The RELION 3.1 layout: a ``data_optics`` table holding per-group optics (pixel size, box size, ...) and a particles
table whose ``_rlnOpticsGroup`` points into it. A RELION 3.0 file (one block, optics repeated on every particle
row, origins in pixels) is converted the way RELION itself does it (StarConverter::convert_3p0_particlesTo_3p1):

* particles are grouped by their values of the optics labels (amplitude contrast, beam tilt, Cs, voltage,
  detector pixel size, magnification), groups numbered 1, 2, ... in order of first appearance;
* those labels move to the optics table (with rlnOpticsGroupName 'opticsGroup<g>'), and
  rlnDetectorPixelSize, rlnMagnification become rlnImagePixelSize = 10000 * dstep / mag;
  a 3.0-era rlnPixelSize column is taken as rlnImagePixelSize directly;
* rlnImageSize comes from the stack headers, rlnImageDimensionality is 2;
* pixel origins (rlnOriginX/Y/Z, their priors, rlnHelicalTrackLength) become rlnOrigin*Angst (and
  rlnHelicalTrackLengthAngst) = pixels * pixel size, written '%.6f' as RELION does, in the position of
  the pixel column.

Every other column and value is kept as it was.  The pixel size comes from the STAR file first and from the
MRC header (``header_pixel_size``) only when the STAR file has none, unless the user gives one, which replaces
both (``pixel_size``: a wrong or missing one from an older job).
"""

import dataclasses
import functools
import warnings
from typing import NamedTuple

import numpy as np
import pandas as pd

from tvae_em.errors import InputError
from tvae_em.io.relion import CTF_COLUMNS, DEFAULT_PIXEL_SIZE, PHASE_FLIPPED, optics_rows
from tvae_em.io.star import StarBlock, StarFile, numeric_column, particles_block

OPTICS_LABELS_30 = ("rlnAmplitudeContrast", "rlnBeamTiltX", "rlnBeamTiltY", "rlnSphericalAberration",
                    "rlnVoltage", "rlnDetectorPixelSize", "rlnMagnification", "rlnPixelSize")
PIXEL_TO_ANGST = {f"rlnOrigin{axis}{prior}": f"rlnOrigin{axis}{prior}Angst"
                  for axis in "XYZ" for prior in ("", "Prior")}
PIXEL_TO_ANGST["rlnHelicalTrackLength"] = "rlnHelicalTrackLengthAngst"
_INDEX_DIGITS = 18  # image indices have at most this many digits (int64 holds every 18-digit number)


class ParticleImages(NamedTuple):
    """Where each particle's image is, as its _rlnImageName says: image ``numbers`` (1-based, int64) of the stacks
    named ``stacks`` (an object array of names as written)."""

    numbers: np.ndarray
    stacks: np.ndarray

    def subset(self, rows: np.ndarray) -> "ParticleImages":
        return ParticleImages(self.numbers[rows], self.stacks[rows])


@dataclasses.dataclass(eq=False)
class ParticleTable:
    """A particle STAR file in RELION 3.1 form and what its rows mean (module docstring), each parsed once.

    ``star`` keeps every cell's text and ``block`` names its particles table; ``optics_rows`` is each particle's
    row in data_optics, ``optics_pixel_sizes`` each optics group's pixel size and ``pixel_sizes`` each particle's
    (Angstrom); ``images`` where each particle's image is. ``ctf`` and ``ctf_flipped`` are parsed on first use.
    """

    star: StarFile
    block: str
    optics_rows: np.ndarray
    optics_pixel_sizes: np.ndarray
    pixel_sizes: np.ndarray
    images: ParticleImages

    @classmethod
    def from_star(cls, star: StarFile, box: int, header_pixel_size: float | None, pixel_size: float | None = None,
                  images: ParticleImages | None = None) -> "ParticleTable":
        """The particles of ``star`` with a complete, validated optics table; InputError naming the file otherwise.

        ``box`` is the image size found in the stacks; ``header_pixel_size`` the MRC header's pixel size (Angstrom;
        <= 0 or None when the header has none); ``pixel_size``, when given, the pixel size of every optics group
        instead of the STAR file's or the header's (a RELION 3.0 file's origins are converted with it). ``images``:
        the particles' images when they are known already, else parsed from ``star`` (``parse_image_names``).
        """
        block = particles_block(star)
        if images is None:
            images = parse_image_names(star, block)
        relion30 = "optics" not in star
        if relion30:
            star, block = _split_optics_30(star, block), "particles"
        star, rows, optics_apix = _complete_optics(star, block, box, header_pixel_size, pixel_size)
        pixel_sizes = optics_apix[rows]
        if relion30:
            star = _origins_to_angst(star, pixel_sizes)
        return cls(star, block, rows, optics_apix, pixel_sizes, images)

    def subset(self, rows) -> "ParticleTable":
        """The particles of rows ``rows`` (0-based) on their own: data_<block> holds only those rows, the optics and
        any other block are kept whole; their CTF is parsed from their rows when first asked for."""
        rows = np.asarray(rows, dtype=np.int64)
        star = self.star.replace(self.block, self.star[self.block].iloc[rows].reset_index(drop=True))
        return ParticleTable(star, self.block, self.optics_rows[rows], self.optics_pixel_sizes,
                             self.pixel_sizes[rows], self.images.subset(rows))

    @functools.cached_property
    def ctf(self) -> np.ndarray | None:
        """(n, len(CTF_COLUMNS) + 1) float64: every particle's CTF parameters (``CTF_COLUMNS`` order, from its row or
        its optics group's) and its pixel size; None without defocus values (_rlnDefocusU, the one column every CTF
        estimate writes). InputError naming the STAR file and the missing column, or the first particle whose values
        are not finite or out of range."""
        if "rlnDefocusU" not in self.star[self.block].columns:
            return None
        columns = [self._ctf_column(label, default) for _, label, default in CTF_COLUMNS]
        params = np.stack([*columns, self.pixel_sizes], axis=1)
        _check_ctf(params, self.star.path)
        return params

    @functools.cached_property
    def ctf_flipped(self) -> bool:
        """Whether the images were multiplied by the sign of their CTF (RELION's optics flag, set by ``preprocess
        --phase-flip``)."""
        if PHASE_FLIPPED not in self.star["optics"].columns:
            return False
        return bool(np.any(numeric_column(self.star, "optics", PHASE_FLIPPED)[self.optics_rows] != 0))

    def _ctf_column(self, label: str, default: float | None) -> np.ndarray:
        if label in self.star[self.block].columns:
            return numeric_column(self.star, self.block, label)
        if label in self.star["optics"].columns:
            return numeric_column(self.star, "optics", label)[self.optics_rows]
        if default is not None:
            return np.full(len(self.optics_rows), default)
        raise InputError(self.star.path, f"no _{label} column for the CTF of particles with defocus values "
                                         "(add it, or train with --ctf none)")


def parse_image_names(star: StarFile, block: str) -> ParticleImages:
    """The images _rlnImageName names: '000012@Extract/x.mrcs' -> image 12 of 'Extract/x.mrcs'; a name without '@'
    is image 1 of that file. InputError naming the file and the first row whose name is not one."""
    names = star[block]["rlnImageName"]
    parts = names.str.partition("@")
    has_at = (parts[1] == "@").to_numpy()
    index_text = parts[0].where(has_at, "1")
    stack_names = parts[2].where(has_at, parts[0]).to_numpy(dtype=object)
    not_digits = np.flatnonzero(~index_text.str.fullmatch(r"\d+").to_numpy(dtype=bool) | (stack_names == ""))
    if not_digits.size:
        row = int(not_digits[0])
        raise InputError(star.path, f"data_{block} row {row + 1}: bad _rlnImageName {names.iloc[row]!r} "
                         "(expected index@stack)")
    too_large = np.flatnonzero(index_text.str.lstrip("0").str.len().to_numpy() > _INDEX_DIGITS)
    if too_large.size:
        row = int(too_large[0])
        raise InputError(star.path, f"data_{block} row {row + 1}: image index in {names.iloc[row]!r} is "
                         "beyond any stack")
    index = index_text.astype(np.int64).to_numpy()
    zero = np.flatnonzero(index < 1)
    if zero.size:
        row = int(zero[0])
        raise InputError(star.path, f"data_{block} row {row + 1}: image index 0 in {names.iloc[row]!r} "
                         "(RELION counts images from 1)")
    return ParticleImages(index, stack_names)


def _split_optics_30(star: StarFile, block: str) -> StarFile:
    """A RELION 3.0 file with its particles table ``block`` split as RELION 3.1 splits it (module docstring):
    data_optics and data_particles in its place, origins still in pixels."""
    table = star[block]
    labels = [label for label in OPTICS_LABELS_30 if label in table.columns]
    if labels:
        keys = pd.DataFrame({label: numeric_column(star, block, label) for label in labels})
        group = keys.groupby(labels, sort=False, dropna=False).ngroup().to_numpy()
    else:
        group = np.zeros(len(table), dtype=np.int64)
    optics = _optics_table(table.iloc[np.unique(group, return_index=True)[1]][labels])
    particles = table.drop(columns=labels).assign(rlnOpticsGroup=(group + 1).astype(str))
    blocks = {}
    for name, item in star.blocks.items():
        if name == block:
            blocks["optics"] = StarBlock("optics", optics)
            blocks["particles"] = StarBlock("particles", particles)
        else:
            blocks[name] = item
    return StarFile(blocks, star.path, star.version)


def _optics_table(first_rows: pd.DataFrame) -> pd.DataFrame:
    """Optics table from the first particle row of each group (text kept), pixel size unified."""
    optics = first_rows.reset_index(drop=True)
    ids = np.arange(1, len(optics) + 1)
    optics.insert(0, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in ids])
    optics.insert(0, "rlnOpticsGroup", ids.astype(str))
    labels_mag = ["rlnDetectorPixelSize", "rlnMagnification"]
    if all(label in optics for label in labels_mag):
        dstep_um, magnification = (optics[label].astype(float) for label in labels_mag)
        optics = optics.drop(columns=[*labels_mag, "rlnPixelSize"], errors="ignore")
        optics["rlnImagePixelSize"] = [f"{value:.6f}" for value in 10000.0 * dstep_um / magnification]
    elif "rlnPixelSize" in optics:
        optics = optics.rename(columns={"rlnPixelSize": "rlnImagePixelSize"})
    return optics


def _origins_to_angst(star: StarFile, pixel_sizes: np.ndarray) -> StarFile:
    """A converted RELION 3.0 file with its pixel origins in Angstrom (``pixel_sizes``: each particle's)."""
    table = star["particles"]
    present = [label for label in PIXEL_TO_ANGST if label in table.columns]
    if not present:
        return star
    table = table.copy()
    for label in present:
        table[label] = [f"{value:.6f}" for value in numeric_column(star, "particles", label) * pixel_sizes]
    renamed = table.rename(columns={label: PIXEL_TO_ANGST[label] for label in present})
    return star.replace("particles", renamed)


def _complete_optics(star: StarFile, block: str, box: int, header_pixel_size: float | None,
                     pixel_size: float | None) -> tuple[StarFile, np.ndarray, np.ndarray]:
    """Fill what RELION 3.1 requires and we use (pixel size, image size, dimensionality) and validate the groups:
    (the completed file, each particle's row in data_optics, each optics group's pixel size)."""
    optics = star["optics"].copy()
    if "rlnOpticsGroup" not in optics:
        raise InputError(star.path, "data_optics has no _rlnOpticsGroup column")
    if pixel_size is not None:
        optics["rlnImagePixelSize"] = str(float(pixel_size))
    elif "rlnImagePixelSize" not in optics:
        if "rlnPixelSize" in optics:
            optics["rlnImagePixelSize"] = optics["rlnPixelSize"]
        else:
            optics["rlnImagePixelSize"] = f"{_fallback_pixel_size(star, header_pixel_size):.6f}"
    if "rlnImageSize" in optics:
        _check_image_size(star, box)
    else:
        optics["rlnImageSize"] = str(box)
    if "rlnImageDimensionality" not in optics:
        optics["rlnImageDimensionality"] = "2"
    star = star.replace("optics", optics)
    if "rlnOpticsGroup" not in star[block]:
        if len(optics) != 1:
            raise InputError(star.path, f"data_{block} has no _rlnOpticsGroup column but data_optics defines "
                             f"{len(optics)} groups")
        star = star.replace(block, star[block].assign(rlnOpticsGroup=optics["rlnOpticsGroup"].iloc[0]))
    pixel_sizes = _optics_pixel_sizes(star)
    return star, optics_rows(star, block), pixel_sizes


def _check_image_size(star: StarFile, box: int) -> None:
    sizes = numeric_column(star, "optics", "rlnImageSize")
    if np.any(sizes != box):
        raise InputError(star.path, f"data_optics: _rlnImageSize {sizes[sizes != box][0]:g} but the "
                         f"stacks hold {box}x{box} images")


def _optics_pixel_sizes(star: StarFile) -> np.ndarray:
    """Each optics group's _rlnImagePixelSize; InputError naming the first that is not a positive finite number."""
    pixel_sizes = numeric_column(star, "optics", "rlnImagePixelSize")
    unusable = np.flatnonzero(~(np.isfinite(pixel_sizes) & (pixel_sizes > 0)))
    if unusable.size:
        row = int(unusable[0])
        raise InputError(star.path, f"data_optics row {row + 1}: _rlnImagePixelSize "
                         f"{star['optics']['rlnImagePixelSize'].iloc[row]!r} is not a positive finite number")
    return pixel_sizes


def _fallback_pixel_size(star: StarFile, header_pixel_size: float | None) -> float:
    if header_pixel_size is not None and header_pixel_size > 0:
        return float(header_pixel_size)
    warnings.warn(f"{star.path}: no pixel size in the STAR file nor in the MRC header; "
                  f"assuming {DEFAULT_PIXEL_SIZE} A", stacklevel=3)
    return DEFAULT_PIXEL_SIZE


def _check_ctf(params: np.ndarray, path) -> None:
    """Finite values, a positive voltage, Cs >= 0 and an amplitude contrast in [0, 1)."""
    bad = ~np.isfinite(params).all(1)
    bad |= (params[:, 3] <= 0) | (params[:, 4] < 0) | ~((params[:, 5] >= 0) & (params[:, 5] < 1))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        values = ", ".join(f"{label} {params[row, i]:g}" for i, (_, label, _) in enumerate(CTF_COLUMNS))
        raise InputError(path, f"particle row {row + 1}: CTF values out of range ({values})")
