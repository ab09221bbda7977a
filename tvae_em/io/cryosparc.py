"""cryoSPARC particle datasets (``.cs`` files), converted to the RELION 3.1 particle table every command reads.

A ``.cs`` file is one NumPy structured array written by ``np.save`` (without the .npy suffix): one record per
particle, fields named ``group/name``. The particles' images are ``blob/path`` (relative to the cryoSPARC project
directory; a leading '>' is cryoSPARC's mark for a path inside the project and is dropped) and ``blob/idx``
(0-based); ``open_particles`` resolves the paths (against ``--datadir``, the project directory) and checks them as
it does a STAR file's.

The conversion follows pyem's csparc2star (``pyem/metadata/cryosparc2.py``, ``parse_cryosparc_2_cs`` and
``cryosparc_2_cs_model_parameters``; ``pyem/cli/csparc2star.py`` for the shifts' pixel size):

* ``blob/idx`` + 1 and ``blob/path`` -> ``rlnImageName``, RELION counting images from 1;
* one optics group per ``ctf/exp_group_id`` (split further should one exposure group hold particles of different
  optics), with ``rlnImagePixelSize`` from ``blob/psize_A``, ``rlnImageSize`` from ``blob/shape``, ``rlnVoltage``,
  ``rlnSphericalAberration`` and ``rlnAmplitudeContrast`` from ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast``;
* ``ctf/df1_A``, ``ctf/df2_A`` -> ``rlnDefocusU``, ``rlnDefocusV`` (both Angstrom); ``ctf/df_angle_rad`` and
  ``ctf/phase_shift_rad`` -> ``rlnDefocusAngle`` and ``rlnPhaseShift`` in degrees; ``ctf/bfactor`` ->
  ``rlnCtfBfactor``;
* a 2-D classification's ``alignments2D/class`` + 1 -> ``rlnClassNumber``; its in-plane angle
  ``alignments2D/pose`` (radians) -> ``rlnAnglePsi`` in degrees, same sign; its ``alignments2D/shift`` (pixels of
  ``alignments2D/psize_A``, the size the classification ran at) -> ``rlnOriginXAngst``, ``rlnOriginYAngst``, same
  sign, times that pixel size. pyem copies pose and shift unchanged, and its 3-D path agrees: its axis-angle to
  matrix conversion gives, for a rotation about z alone, RELION's matrix of psi = that angle. So cryoSPARC's
  pose and shift align a particle as RELION's psi and origin do (``tvae_em.poses``);
* ``uid`` -> ``_tvaeCryosparcUid``, to match results back to the cryoSPARC particles.

Other fields (higher-order aberrations, locations, 3-D alignments) are not converted. cryoSPARC jobs keep the
fields they did not change in a separate ``*_passthrough_*.cs``, which is not read: a 2-D classification's own
``.cs`` carries no ``ctf/`` fields, and its particles are read without CTF.
"""

import math
from tokenize import TokenError

import numpy as np
import pandas as pd

from tvae_em.errors import InputError
from tvae_em.io.columns import CRYOSPARC_UID_COLUMN
from tvae_em.io.files import regular_file
from tvae_em.io.star import StarFile, image_name_texts, new_relion31_star

NUMPY_MAGIC = b"\x93NUMPY"  # a .cs file as cryoSPARC writes it (np.save)
CSDAT_MAGIC = b"\x95CSDAT"  # cryosparc-tools' compressed stream format, not read here
_MAX_HEADER_BYTES = 1 << 26  # NumPy's default (10000 bytes) is too small for datasets of many fields
REQUIRED = ("blob/path", "blob/idx")

# Per-particle fields: (cryoSPARC field, RELION label, conversion to RELION's unit)
_PARTICLE_FIELDS = (
    ("ctf/df1_A", "rlnDefocusU", None),
    ("ctf/df2_A", "rlnDefocusV", None),
    ("ctf/df_angle_rad", "rlnDefocusAngle", np.degrees),
    ("ctf/phase_shift_rad", "rlnPhaseShift", np.degrees),
    ("ctf/bfactor", "rlnCtfBfactor", None),
    ("alignments2D/class", "rlnClassNumber", lambda classes: classes.astype(np.int64) + 1),
    ("alignments2D/pose", "rlnAnglePsi", np.degrees),
)
# Fields that go to the optics table: (cryoSPARC field, RELION label); rlnImageSize comes from blob/shape.
_OPTICS_FIELDS = (
    ("blob/psize_A", "rlnImagePixelSize"),
    ("ctf/accel_kv", "rlnVoltage"),
    ("ctf/cs_mm", "rlnSphericalAberration"),
    ("ctf/amp_contrast", "rlnAmplitudeContrast"),
)
EXPOSURE_GROUP = "ctf/exp_group_id"


def read_cryosparc(path) -> StarFile:
    """The particles of a cryoSPARC ``.cs`` file as a RELION 3.1 particle table (module docstring), with the
    image names as the file gives them ('000001@J42/extract/x_particles.mrc'); ``path`` names it in messages.
    InputError naming the file for anything that is not a readable particle dataset."""
    records = load_dataset(path)
    particles = {"rlnImageName": _image_names(records, path)}
    optics, particles["rlnOpticsGroup"] = _optics_groups(records, path)
    for field, label, convert in _PARTICLE_FIELDS:
        if field in records.dtype.names:
            values = _column(records, field, path)
            particles[label] = convert(values) if convert else values
    if "alignments2D/shift" in records.dtype.names:
        particles["rlnOriginXAngst"], particles["rlnOriginYAngst"] = _origins_angst(records, path)
    if "uid" in records.dtype.names:
        particles[CRYOSPARC_UID_COLUMN] = _column(records, "uid", path)
    star = new_relion31_star(optics, pd.DataFrame(particles))
    star.path = path
    return star


def load_dataset(path) -> np.ndarray:
    """The records of a ``.cs`` file, memory-mapped read-only; InputError for a file that is not a NumPy
    structured array, is truncated, holds Python objects (which only unpickling could read) or no particle."""
    path = regular_file(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
            if head.startswith(CSDAT_MAGIC):
                raise InputError(path, "a compressed cryoSPARC dataset (CSDAT), which is not read: save it in "
                                       "NumPy format (cryosparc-tools: Dataset.save(path, format=NUMPY_FORMAT))")
            if not head.startswith(NUMPY_MAGIC):
                raise InputError(path, f"not a cryoSPARC .cs file (a NumPy array file begins {NUMPY_MAGIC!r}; "
                                       f"this one begins {head!r})")
            handle.seek(0)
            shape, dtype, offset = _read_header(handle)
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror}") from None
    except (ValueError, SyntaxError, TokenError) as err:  # what NumPy's header parser raises for a bad header
        raise InputError(path, f"not a readable cryoSPARC .cs file (bad NumPy header: {str(err).splitlines()[0]})"
                         ) from None
    if dtype.names is None or len(shape) != 1:
        raise InputError(path, f"not a cryoSPARC particle dataset (a {len(shape)}-D array of {dtype}, not one "
                               "record per particle)")
    if dtype.hasobject:
        raise InputError(path, "holds Python objects, which are not unpickled for safety (cryoSPARC writes "
                               "fixed-width strings)")
    needed = math.prod(shape) * dtype.itemsize
    available = path.stat().st_size - offset
    if available < needed:
        raise InputError(path, f"truncated: its header says {shape[0]} records of {dtype.itemsize} bytes "
                               f"({needed} bytes) but {available} bytes follow the header")
    if shape[0] == 0:
        raise InputError(path, "lists no particles")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _read_header(handle) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from the header of a NumPy array file: format version 1.0, or 2.0 for headers
    over 64 KiB (3.0, for non-Latin-1 field names, never holds cryoSPARC's)."""
    version = np.lib.format.read_magic(handle)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"NumPy file format version {version[0]}.{version[1]} is not read")
    shape, _, dtype = readers[version](handle, max_header_size=_MAX_HEADER_BYTES)
    return shape, dtype, handle.tell()


def _column(records: np.ndarray, field: str, path, width: int | None = None) -> np.ndarray:
    """Field ``field`` as an in-memory array: one value per particle, or ``width`` values when given."""
    values = np.array(records[field])
    expected = (len(records),) if width is None else (len(records), width)
    if values.shape != expected:
        raise InputError(path, f"field {field} has shape {values.shape}, expected {expected} (one "
                               f"{'value' if width is None else f'{width}-vector'} per particle)")
    return values


def _image_names(records: np.ndarray, path) -> np.ndarray:
    """'000001@J42/extract/x.mrc' for each particle: blob/idx + 1 (RELION counts from 1) and blob/path without
    cryoSPARC's leading '>'."""
    missing = [field for field in REQUIRED if field not in records.dtype.names]
    if missing:
        raise InputError(path, f"no {' or '.join(missing)} field: not a particle dataset with images (a "
                               "cryoSPARC job's particles .cs has them; its passthrough .cs does not)")
    stacks = _column(records, "blob/path", path)
    if stacks.dtype.kind == "S":
        try:
            stacks = np.char.decode(stacks, "utf-8")
        except UnicodeDecodeError:
            raise InputError(path, "blob/path holds a path that is not UTF-8 text") from None
    elif stacks.dtype.kind != "U":
        raise InputError(path, f"blob/path holds {stacks.dtype}, not file paths")
    stacks = np.char.lstrip(stacks.astype(str), ">")
    if (stacks == "").any():
        raise InputError(path, f"record {int(np.flatnonzero(stacks == '')[0]) + 1}: blob/path is empty")
    index = _column(records, "blob/idx", path)
    if index.dtype.kind not in "iu":
        raise InputError(path, f"blob/idx holds {index.dtype} values, not image indices")
    if (index < 0).any():
        raise InputError(path, f"record {int(np.flatnonzero(index < 0)[0]) + 1}: blob/idx is negative")
    return image_name_texts(index.astype(np.int64) + 1, stacks)


def _origins_angst(records: np.ndarray, path) -> tuple[np.ndarray, np.ndarray]:
    """rlnOriginXAngst, rlnOriginYAngst from alignments2D/shift (x, y in pixels of alignments2D/psize_A, else of
    blob/psize_A)."""
    shift = _column(records, "alignments2D/shift", path, width=2).astype(np.float64)
    for field in ("alignments2D/psize_A", "blob/psize_A"):
        if field in records.dtype.names:
            pixel_size = _column(records, field, path).astype(np.float64)
            return (shift[:, 0] * pixel_size).astype(np.float32), (shift[:, 1] * pixel_size).astype(np.float32)
    raise InputError(path, "alignments2D/shift without alignments2D/psize_A or blob/psize_A: the shifts' pixel "
                           "size is unknown")


def _optics_groups(records: np.ndarray, path) -> tuple[pd.DataFrame, np.ndarray]:
    """(optics table, optics group of each particle): one group per exposure group and distinct optics values,
    numbered from 1 in the order of the exposure groups."""
    names = records.dtype.names
    exposure = _column(records, EXPOSURE_GROUP, path) if EXPOSURE_GROUP in names else np.ones(len(records), int)
    keys = {EXPOSURE_GROUP: exposure}
    keys.update({label: _column(records, field, path) for field, label in _OPTICS_FIELDS if field in names})
    if "blob/shape" in names:
        keys["rlnImageSize"] = _column(records, "blob/shape", path, width=2)[:, -1]
    keys = pd.DataFrame(keys)
    group = keys.groupby(list(keys.columns), sort=True, dropna=False).ngroup().to_numpy() + 1
    optics = keys.iloc[np.unique(group, return_index=True)[1]].copy()  # one row per group, in group order
    exposure_ids = optics.pop(EXPOSURE_GROUP).to_numpy()
    optics.insert(0, "rlnOpticsGroupName", [f"expGroup{g}" for g in exposure_ids])
    optics.insert(0, "rlnOpticsGroup", np.arange(1, len(optics) + 1))
    return optics.reset_index(drop=True), group
