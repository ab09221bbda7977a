"""RELION's particle-table vocabulary and the lookups that read a RELION 3.1 STAR file as it stands.

The labels of the CTF parameters (``CTF_COLUMNS``) and of the phase-flip flag, the pixel size assumed when no
file gives one, the optics table of images made here (``one_optics_group``), and each particle's optics group and
pixel size in a RELION 3.1 file (``optics_rows``, ``particle_pixel_sizes``). Opening particles parses a STAR file
once, into ``io.particles.ParticleTable``.
"""

import numpy as np
import pandas as pd

from tvae_em.errors import InputError
from tvae_em.io.star import StarFile, numeric_column

DEFAULT_PIXEL_SIZE = 1.0
# The CTF parameters of a particle (tvae_em.ctf), in the column order of ``ParticleTable.ctf``, with the STAR label
# each comes from and its value when the label is absent (None: required).
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


def one_optics_group(pixel_size: float, box: int) -> pd.DataFrame:
    """The optics table of images made here (rendered, averaged, extracted from picks): one group, with their
    pixel size (Angstrom) and box."""
    return pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                         "rlnImagePixelSize": [float(pixel_size)], "rlnImageSize": [int(box)],
                         "rlnImageDimensionality": [2]})
