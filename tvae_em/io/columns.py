"""The STAR columns tvae-em writes and the RELION columns it reads beside them (labels without the leading '_'),
and the readers that find them in a table.

What each command adds to a particle table:

- ``embed``: the latents ``_tvaeZ01..`` (posterior means of z at the MAP cell, paper section 3.2) and
  ``_tvaeZStd01..``, with clusters ``_tvaeCluster`` (section 4.3), copied to RELION's ``_rlnClassNumber``;
- ``pose``: the in-plane pose in RELION's ``_rlnAnglePsi``, ``_rlnOriginX/YAngst`` (``_tvaeAnglePsi``,
  ``_tvaeOriginX/YAngst`` beside a 3-D refinement's angles) and what q(t, r | y) says about it
  (``_tvaePoseEntropy``, ``_tvaePoseMaxProb``, ``_tvaePoseLocalMass``, ``_tvaeSymmetryHint``,
  ``_tvaeRotationMassTop``);
- ``averages``: ``_tvaeParticleCount`` per class;
- ``preprocess``: the image name a particle had before, ``_tvaeSourceImageName``; a particle read from a
  cryoSPARC .cs file keeps its ``_tvaeCryosparcUid``;
- the simulator (``tvae_em.simulate``): the truth ``_tvaeTruePsi``, ``_tvaeTrueOriginX/YAngst``,
  ``_tvaeTrueClass`` and ``_tvaeTrueTilt``.
"""

import re

import numpy as np

from tvae_em.errors import InputError
from tvae_em.io.star import StarFile, numeric_column

LATENT_PREFIX = "tvaeZ"  # _tvaeZ01..: posterior means of z
LATENT_STD_PREFIX = "tvaeZStd"  # _tvaeZStd01..: posterior standard deviations of z
CLUSTER_COLUMN = "tvaeCluster"
CLASS_COLUMN = "rlnClassNumber"  # RELION's class of a particle, which its subset selection and 3-D jobs read
RELION_POSE = ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")
TVAE_POSE = ("tvaeAnglePsi", "tvaeOriginXAngst", "tvaeOriginYAngst")  # beside a 3-D refinement's own angles
REFINEMENT_ANGLES = ("rlnAngleRot", "rlnAngleTilt")
ENTROPY_COLUMN = "tvaePoseEntropy"
MAX_PROB_COLUMN = "tvaePoseMaxProb"
CONFIDENCE_COLUMN = "tvaePoseLocalMass"
SYMMETRY_HINT_COLUMN = "tvaeSymmetryHint"
ROTATION_MASS_TOP_COLUMN = "tvaeRotationMassTop"
COUNT_COLUMN = "tvaeParticleCount"
TRUE_POSE = ("tvaeTruePsi", "tvaeTrueOriginXAngst", "tvaeTrueOriginYAngst")
TRUE_CLASS_COLUMN = "tvaeTrueClass"
TRUE_TILT_COLUMN = "tvaeTrueTilt"
SOURCE_IMAGE_COLUMN = "tvaeSourceImageName"  # preprocess: the rlnImageName a particle had before
CRYOSPARC_UID_COLUMN = "tvaeCryosparcUid"  # a particle read from a cryoSPARC .cs file: its uid

_LATENT_RE = re.compile(rf"{LATENT_PREFIX}(\d+)")


# --- latents ------------------------------------------------------------------------------------------------

def z_columns(z_dim: int, prefix: str = LATENT_PREFIX) -> list[str]:
    """STAR labels of the latent dimensions: tvaeZ01, tvaeZ02, ... (wider numbers for >= 100 dims)."""
    width = max(2, len(str(z_dim)))
    return [f"{prefix}{k:0{width}d}" for k in range(1, z_dim + 1)]


def latent_labels(columns) -> dict[int, str]:
    """The latent columns among ``columns`` by their 1-based dimension (the first label of each dimension)."""
    labels = {}
    for label in columns:
        if found := _LATENT_RE.fullmatch(label):
            labels.setdefault(int(found[1]), label)
    return labels


def latent_block(star: StarFile, z_dim: int) -> str:
    """The first table of ``star`` with all ``z_dim`` latent columns; InputError when there is none."""
    wanted = set(z_columns(z_dim))
    for name, block in star.blocks.items():
        if block.loop and wanted <= set(block.data.columns):
            return name
    raise InputError(star.path, f"no table with the {z_dim} latent columns _{z_columns(z_dim)[0]}.. of "
                                f"this model (embed the particles with it first)")


def read_latents(star: StarFile, block: str, z_dim: int) -> np.ndarray:
    """The latents (n, z_dim) of the particles of ``block``."""
    return np.column_stack([numeric_column(star, block, name) for name in z_columns(z_dim)])


# --- poses --------------------------------------------------------------------------------------------------

def in_plane_pose_labels(columns) -> tuple[str, ...]:
    """The in-plane pose labels of a table: ``TVAE_POSE`` when it has them, else ``RELION_POSE``."""
    return TVAE_POSE if TVAE_POSE[0] in columns else RELION_POSE


# --- classes ------------------------------------------------------------------------------------------------

def class_column(star: StarFile, block: str, requested: str | None = None) -> str:
    """The label (without '_') of the column that holds the particles' classes: ``requested`` (with or without
    its leading underscore), else ``_tvaeCluster`` when present, else ``_rlnClassNumber``; InputError naming the
    file and the column when it is missing."""
    columns = star[block].columns
    if requested is not None:
        label = requested.lstrip("_")
        if label not in columns:
            raise InputError(star.path, f"data_{block} has no _{label} column")
        return label
    for label in (CLUSTER_COLUMN, CLASS_COLUMN):
        if label in columns:
            return label
    raise InputError(star.path, f"data_{block} has no _{CLASS_COLUMN} or _{CLUSTER_COLUMN} column (classes: "
                                "cluster the particles with 'tvae-em embed --clusters K' first)")


def class_numbers(star: StarFile, block: str, label: str) -> np.ndarray:
    """Column ``label`` as int64 class numbers; InputError naming the first row that holds no integer."""
    values = numeric_column(star, block, label)
    bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
    if bad.size:
        row = int(bad[0])
        raise InputError(star.path, f"data_{block} row {row + 1}: _{label} {star[block][label].iloc[row]!r} is "
                                    "not a class number (an integer)")
    return values.astype(np.int64)
