"""RELION particle-table semantics on top of the text-preserving STAR reader.

Everything downstream works on the RELION 3.1+ layout: a ``data_optics`` table holding per-group optics
(pixel size, box size, ...) and a particles table whose ``_rlnOpticsGroup`` points into it.  A RELION 3.0
file (one block, optics repeated on every particle row, origins in pixels) is converted the way RELION
itself does it (StarConverter::convert_3p0_particlesTo_3p1):

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

import warnings

import numpy as np
import pandas as pd

from tvae_em.errors import InputError
from tvae_em.io.star import StarBlock, StarFile, numeric_column, particles_block

OPTICS_LABELS_30 = ("rlnAmplitudeContrast", "rlnBeamTiltX", "rlnBeamTiltY", "rlnSphericalAberration",
                    "rlnVoltage", "rlnDetectorPixelSize", "rlnMagnification", "rlnPixelSize")
PIXEL_TO_ANGST = {f"rlnOrigin{axis}{prior}": f"rlnOrigin{axis}{prior}Angst"
                  for axis in "XYZ" for prior in ("", "Prior")}
PIXEL_TO_ANGST["rlnHelicalTrackLength"] = "rlnHelicalTrackLengthAngst"
DEFAULT_PIXEL_SIZE = 1.0


def to_relion31(star: StarFile, box: int, header_pixel_size: float | None,
                pixel_size: float | None = None) -> StarFile:
    """The particles STAR in RELION 3.1 form with a complete, validated optics table.

    ``box`` is the image size found in the stacks; ``header_pixel_size`` the MRC header's pixel size
    (Angstrom; <= 0 or None when the header has none); ``pixel_size``, when given, the pixel size of every
    optics group instead of the STAR file's or the header's (a RELION 3.0 file's origins are converted with it).
    """
    block = particles_block(star)
    if "optics" in star:
        return _complete_optics(star, block, box, header_pixel_size, pixel_size)
    return _convert_30(star, block, box, header_pixel_size, pixel_size)


def _convert_30(star: StarFile, block: str, box: int, header_pixel_size: float | None,
                pixel_size: float | None) -> StarFile:
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
    converted = StarFile(blocks, star.path, star.version)
    return _origins_to_angst(_complete_optics(converted, "particles", box, header_pixel_size, pixel_size))


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


def _origins_to_angst(star: StarFile) -> StarFile:
    table = star["particles"]
    present = [label for label in PIXEL_TO_ANGST if label in table.columns]
    if not present:
        return star
    table = table.copy()
    apix = particle_pixel_sizes(star, "particles")
    for label in present:
        table[label] = [f"{value:.6f}" for value in numeric_column(star, "particles", label) * apix]
    renamed = table.rename(columns={label: PIXEL_TO_ANGST[label] for label in present})
    return star.replace("particles", renamed)


def _complete_optics(star: StarFile, block: str, box: int, header_pixel_size: float | None,
                     pixel_size: float | None) -> StarFile:
    """Fill what RELION 3.1 requires and we use (pixel size, image size, dimensionality); validate groups."""
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
        sizes = numeric_column(star, "optics", "rlnImageSize")
        if np.any(sizes != box):
            raise InputError(star.path, f"data_optics: _rlnImageSize {sizes[sizes != box][0]:g} but the "
                             f"stacks hold {box}x{box} images")
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
    pixel_sizes = numeric_column(star, "optics", "rlnImagePixelSize")
    unusable = np.flatnonzero(~(np.isfinite(pixel_sizes) & (pixel_sizes > 0)))
    if unusable.size:
        row = int(unusable[0])
        raise InputError(star.path, f"data_optics row {row + 1}: _rlnImagePixelSize "
                         f"{optics['rlnImagePixelSize'].iloc[row]!r} is not a positive finite number")
    optics_rows(star, block)
    return star


def _fallback_pixel_size(star: StarFile, header_pixel_size: float | None) -> float:
    if header_pixel_size is not None and header_pixel_size > 0:
        return float(header_pixel_size)
    warnings.warn(f"{star.path}: no pixel size in the STAR file nor in the MRC header; "
                  f"assuming {DEFAULT_PIXEL_SIZE} A", stacklevel=3)
    return DEFAULT_PIXEL_SIZE


def optics_rows(star: StarFile, block: str) -> np.ndarray:
    """For each particle, its row in ``data_optics``; InputError naming the first undefined group."""
    group_ids = numeric_column(star, "optics", "rlnOpticsGroup")
    if len(set(group_ids)) != len(group_ids):
        raise InputError(star.path, "data_optics defines an optics group twice")
    particle_groups = numeric_column(star, block, "rlnOpticsGroup")
    rows = pd.Index(group_ids).get_indexer(particle_groups)
    missing = np.flatnonzero(rows < 0)
    if missing.size:
        row = int(missing[0])
        raise InputError(star.path, f"data_{block} row {row + 1}: optics group "
                         f"{particle_groups[row]:g} not defined in data_optics")
    return rows


def particle_pixel_sizes(star: StarFile, block: str) -> np.ndarray:
    """Pixel size (Angstrom) of every particle, resolved through its optics group."""
    return numeric_column(star, "optics", "rlnImagePixelSize")[optics_rows(star, block)]


# The CTF parameters of a particle (tvae_em.ctf), in the column order of ``ctf_parameters``' array, with the STAR
# label each comes from and its value when the label is absent (None: required).
CTF_COLUMNS = (
    ("defocus_u", "rlnDefocusU", None),
    ("defocus_v", "rlnDefocusV", None),
    ("angle_deg", "rlnDefocusAngle", None),
    ("voltage_kv", "rlnVoltage", None),
    ("cs_mm", "rlnSphericalAberration", None),
    ("amplitude_contrast", "rlnAmplitudeContrast", None),
    ("phase_shift_deg", "rlnPhaseShift", 0.0),
    ("bfactor", "rlnCtfBfactor", 0.0),
    ("scale", "rlnCtfScalefactor", 1.0),
)
PHASE_FLIPPED = "rlnCtfDataArePhaseFlipped"  # RELION's optics flag for images multiplied by sign(CTF)


def has_ctf(star: StarFile, block: str) -> bool:
    """Whether the particles carry defocus values (the one column every CTF estimate writes)."""
    return "rlnDefocusU" in star[block].columns


def ctf_phase_flipped(star: StarFile, block: str) -> bool:
    """Whether the images were multiplied by the sign of their CTF (RELION's optics flag, set by ``preprocess
    --phase-flip``)."""
    if PHASE_FLIPPED not in star["optics"].columns:
        return False
    return bool(np.any(numeric_column(star, "optics", PHASE_FLIPPED)[optics_rows(star, block)] != 0))


def ctf_parameters(star: StarFile, block: str) -> np.ndarray:
    """(n, len(CTF_COLUMNS) + 1) float64: every particle's CTF parameters (``CTF_COLUMNS`` order, from its row or
    its optics group's) and its pixel size. InputError naming the STAR file and the missing column, or the first
    particle whose values are not finite or out of range."""
    rows = optics_rows(star, block)
    columns = []
    for _, label, default in CTF_COLUMNS:
        if label in star[block].columns:
            columns.append(numeric_column(star, block, label))
        elif label in star["optics"].columns:
            columns.append(numeric_column(star, "optics", label)[rows])
        elif default is not None:
            columns.append(np.full(len(rows), default))
        else:
            raise InputError(star.path, f"no _{label} column for the CTF of particles with defocus values "
                                        "(add it, or train with --ctf none)")
    params = np.stack([*columns, particle_pixel_sizes(star, block)], axis=1)
    _check(params, star.path)
    return params


def _check(params: np.ndarray, path) -> None:
    """Finite values, a positive voltage, Cs >= 0 and an amplitude contrast in [0, 1)."""
    bad = ~np.isfinite(params).all(1)
    bad |= (params[:, 3] <= 0) | (params[:, 4] < 0) | ~((params[:, 5] >= 0) & (params[:, 5] < 1))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        values = ", ".join(f"{label} {params[row, i]:g}" for i, (_, label, _) in enumerate(CTF_COLUMNS))
        raise InputError(path, f"particle row {row + 1}: CTF values out of range ({values})")


def one_optics_group(pixel_size: float, box: int) -> pd.DataFrame:
    """The optics table of images made here (rendered, averaged, extracted from picks): one group, with their
    pixel size (Angstrom) and box."""
    return pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                         "rlnImagePixelSize": [float(pixel_size)], "rlnImageSize": [int(box)],
                         "rlnImageDimensionality": [2]})
