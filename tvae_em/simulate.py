"""Data sets with known rotation, translation and class, for tests, examples, benchmarks and `tvae-em demo`.

Every transformed image is made by one function, :func:`render_pose`, which applies the project's pose
model I(x) = F(R(theta) (x - t)) (the generator's coordinate transform of section 3.3.2) to a centred,
unrotated object F. The ground truth stored with each data set therefore means exactly what the model's
inferred pose means.

Three families:
- MNIST(N) and MNIST(U) of section 4.2: digits in a 50 x 50 canvas, shifted by N(0, 5^2) px and rotated by
  N(0, pi^2/16) or U(0, 2 pi).
- A few asymmetric letter-like shapes, a small exact target for pose-recovery tests.
- Cryo-EM-like particles: projections of 3-D Gaussian-blob objects in random views, rotated in plane,
  shifted and buried in white noise.

Each ``make_*``/``simulate_*`` function returns a dict with ``images`` (n, N, N) float32, ``canonical``
(n, N, N) float32 (the same object centred and unrotated), ``theta`` (n,) rad, ``t_model`` (n, 2) and
``labels`` (n,) int.
"""

from pathlib import Path

import numpy as np
import pandas as pd

from tvae_em.ctf import through_ctf
from tvae_em.errors import UsageError
from tvae_em.io.columns import TRUE_CLASS_COLUMN, TRUE_POSE, TRUE_TILT_COLUMN
from tvae_em.io.mnist import MNIST_DIGIT_PX, mnist_split
from tvae_em.io.relion import CTF_COLUMNS
from tvae_em.io.stack import write_stack
from tvae_em.io.star import image_name_texts, new_relion31_star, write_star
from tvae_em.poses import apply_pose, model_to_relion, rotate


def pixel_grid_px(box):
    """(x_px, y_px) of every pixel of a box x box image in the RELION frame: col - N//2, row - N//2."""
    centre = box // 2
    y_px, x_px = np.mgrid[0:box, 0:box].astype(np.float64) - centre
    return x_px, y_px


def render_pose(canonical, theta_rad, t_model):
    """Images I(x) = F(R(theta) (x - t)) of canonical objects F, one per pose: returns (n, N, N) float32.

    ``canonical`` is one (N, N) object shared by all poses or (n, N, N), one per pose; ``theta_rad`` is (n,)
    and ``t_model`` (n, 2) in model units (x_px / (N/2)). The resampling itself is the project's single
    implementation of the pose model, :func:`tvae_em.poses.apply_pose` (bilinear, zero outside the box).
    """
    canonical = np.asarray(canonical, dtype=np.float32)
    theta_rad = np.atleast_1d(np.asarray(theta_rad, dtype=np.float64))
    if canonical.ndim == 2:
        canonical = np.broadcast_to(canonical, (len(theta_rad), *canonical.shape))
    return apply_pose(canonical, theta_rad, t_model).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------- MNIST

def make_mnist_variant(images, labels, variant, size=50, seed=0, shift_std_px=5.0):
    """MNIST(N) or MNIST(U) of section 4.2 from 28 x 28 digits.

    Each digit is centred in a size x size canvas (its 28 x 28 centre on pixel size//2), then posed with
    theta ~ N(0, pi^2/16) ('N') or U(0, 2 pi) ('U') and a shift ~ N(0, shift_std_px^2) px per axis.
    Pixel values are scaled to [0, 1]. ``seed`` is anything numpy.random.default_rng accepts.
    """
    images = np.asarray(images)
    if variant not in ("N", "U"):
        raise UsageError(f"unknown MNIST variant {variant!r}; expected 'N' or 'U'")
    if size < MNIST_DIGIT_PX:
        raise UsageError(f"canvas of {size} px cannot hold {MNIST_DIGIT_PX} px digits")
    n = len(images)
    canonical = np.zeros((n, size, size), dtype=np.float32)
    digit = slice(size // 2 - MNIST_DIGIT_PX // 2, size // 2 + MNIST_DIGIT_PX // 2)
    canonical[:, digit, digit] = images / np.float32(255)
    rng = np.random.default_rng(seed)
    theta = rng.normal(0.0, np.pi / 4, n) if variant == "N" else rng.uniform(0.0, 2 * np.pi, n)
    t_model = rng.normal(0.0, shift_std_px, (n, 2)) / (size / 2)
    return {
        "images": render_pose(canonical, theta, t_model),
        "canonical": canonical,
        "theta": theta,
        "t_model": t_model,
        "labels": np.asarray(labels, dtype=np.int64),
    }


# --------------------------------------------------------------------------------------------- shapes

SHAPE_NAMES = ("F", "L", "P", "arrow")
_STROKE = 0.2  # stroke width in units of the letter height


def _rect(x, y, x0, x1, y0, y1):
    return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)


def _inside_shape(name, x, y):
    """Membership of points (x right, y down, letter height 1 centred on 0) in one of the letter shapes.

    None of them has a 2-fold rotation axis, so rotations over the full circle are identifiable.
    """
    s = _STROKE
    spine = _rect(x, y, -0.35, -0.35 + s, -0.5, 0.5)
    top = _rect(x, y, -0.35, 0.35, -0.5, -0.5 + s)
    middle = _rect(x, y, -0.35, 0.2, -s / 2, s / 2)
    if name == "F":
        return spine | top | middle
    if name == "L":
        return spine | _rect(x, y, -0.35, 0.35, 0.5 - s, 0.5)
    if name == "P":
        bowl = _rect(x, y, -0.35, 0.35, -s / 2, s / 2) | _rect(x, y, 0.35 - s, 0.35, -0.5, s / 2)
        return spine | top | bowl
    if name == "arrow":
        head = (y >= -0.5) & (y <= -0.1) & (np.abs(x) <= 0.35 * (y + 0.5) / 0.4)
        return head | _rect(x, y, -s / 2, s / 2, -0.1, 0.5)
    raise ValueError(f"unknown shape {name!r}")


def _rasterise(name, size, height_px, offset_px=(0.0, 0.0), supersample=4):
    """Antialiased image of a shape: each pixel holds the fraction of its area inside the shape."""
    x_px, y_px = pixel_grid_px(size)
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    coverage = np.zeros((size, size))
    for dy in sub:
        for dx in sub:
            x = (x_px + dx + offset_px[0]) / height_px
            y = (y_px + dy + offset_px[1]) / height_px
            coverage += _inside_shape(name, x, y)
    return coverage / supersample**2


def shape_templates(size=40, height_fraction=0.5):
    """The canonical shapes (len(SHAPE_NAMES), size, size) float32, letter height ``height_fraction`` of the
    box, each centred on its centre of mass so that its translation is the position of that centre."""
    height_px = size * height_fraction
    templates = []
    x_px, y_px = pixel_grid_px(size)
    for name in SHAPE_NAMES:
        first = _rasterise(name, size, height_px)
        centroid = (np.sum(first * x_px) / first.sum(), np.sum(first * y_px) / first.sum())
        templates.append(_rasterise(name, size, height_px, offset_px=centroid))
    return np.stack(templates).astype(np.float32)


def make_shapes(n, size=40, seed=0, shift_std_px=2.0, height_fraction=0.5):
    """n images of the letter shapes (class = index into SHAPE_NAMES), rotated by U(0, 2 pi) and shifted
    by N(0, shift_std_px^2) px per axis; noise-free, values in [0, 1]."""
    rng = np.random.default_rng(seed)
    templates = shape_templates(size, height_fraction)
    labels = rng.integers(0, len(SHAPE_NAMES), n)
    theta = rng.uniform(0.0, 2 * np.pi, n)
    t_model = rng.normal(0.0, shift_std_px, (n, 2)) / (size / 2)
    canonical = templates[labels]
    return {
        "images": render_pose(canonical, theta, t_model),
        "canonical": canonical,
        "theta": theta,
        "t_model": t_model,
        "labels": labels,
    }


# ------------------------------------------------------------------------------------------ particles

# Blobs (x, y, z, sigma, density) in model units (box/2); three different, asymmetric rigid objects.
PARTICLE_OBJECTS = (
    # bent chain of four blobs with a knob off one end
    np.array(
        [
            [-0.30, -0.20, 0.00, 0.09, 1.0],
            [0.00, -0.22, 0.10, 0.09, 1.0],
            [0.25, -0.05, 0.00, 0.09, 1.0],
            [0.30, 0.25, -0.10, 0.09, 1.0],
            [-0.25, 0.15, 0.15, 0.06, 0.8],
        ]
    ),
    # triangle of three blobs with a long tail and a side knob (large enough to break its 3-fold look)
    np.array(
        [
            [-0.20, -0.15, -0.10, 0.10, 1.0],
            [0.20, -0.15, 0.10, 0.10, 1.0],
            [0.00, 0.18, 0.00, 0.10, 1.0],
            [0.05, 0.45, 0.10, 0.08, 1.1],
            [0.35, -0.35, 0.00, 0.06, 1.0],
        ]
    ),
    # dumbbell of unequal halves with an off-axis knob
    np.array(
        [
            [-0.25, 0.00, 0.00, 0.14, 0.8],
            [0.25, 0.05, 0.10, 0.10, 1.0],
            [0.10, 0.32, -0.10, 0.05, 1.2],
        ]
    ),
)

def _swing(blobs, hinge_xy, angle_deg):
    """The blobs turned by ``angle_deg`` about the z axis through ``hinge_xy`` (a domain moving on a hinge)."""
    moved = blobs.copy()
    moved[:, :2] = rotate(blobs[:, :2] - hinge_xy, np.radians(angle_deg)) + hinge_xy
    return moved


# One asymmetric object in two conformations: a four-blob core with a two-blob arm that swings by 60 degrees
# about a hinge on the core, as a domain of a protein might; the core is the same in both.
_CORE = np.array(
    [
        [-0.28, -0.10, 0.00, 0.12, 1.0],
        [0.02, -0.24, 0.10, 0.11, 1.0],
        [0.20, 0.02, -0.05, 0.10, 1.0],
        [-0.08, 0.14, 0.00, 0.10, 1.0],
    ]
)
_ARM = np.array([[0.26, 0.32, 0.05, 0.08, 1.0], [0.30, 0.52, 0.00, 0.07, 0.9]])
_HINGE = np.array([0.20, 0.14])
CONFORMATIONS = (np.vstack([_CORE, _ARM]), np.vstack([_CORE, _swing(_ARM, _HINGE, 60.0)]))
OBJECT_SETS = {"shapes": PARTICLE_OBJECTS, "conformations": CONFORMATIONS}
_SIGMA_REF = 0.1  # a blob of this width projects to a peak equal to its density


def _centred_object(blobs):
    """Shift an object so that its centre of mass (blob mass ~ density * sigma^3) is at the origin; every
    projection then has its centre of mass at the box centre, which makes t the particle centre."""
    mass = blobs[:, 4] * blobs[:, 3] ** 3
    centred = blobs.copy()
    centred[:, :3] -= (mass[:, None] * blobs[:, :3]).sum(0) / mass.sum()
    return centred


def project_object(blobs, tilt_rad, box):
    """Projection along z of an object tilted by ``tilt_rad`` about the y axis, on a box x box grid.

    The line integral of a 3-D isotropic Gaussian of width sigma is a 2-D Gaussian of the same width at the
    projected centre with peak density * sqrt(2 pi) * sigma, so no voxel grid is needed (the constant
    factor sqrt(2 pi) * _SIGMA_REF is divided out).
    """
    x_px, y_px = pixel_grid_px(box)
    x, y = x_px / (box / 2), y_px / (box / 2)
    image = np.zeros((box, box))
    for bx, by, bz, sigma, density in _centred_object(blobs):
        cx = bx * np.cos(tilt_rad) + bz * np.sin(tilt_rad)
        image += density * sigma / _SIGMA_REF * np.exp(-((x - cx) ** 2 + (y - by) ** 2) / (2 * sigma**2))
    return image.astype(np.float32)


def simulate_particles(
    n, box=64, n_objects=3, snr=1.0, seed=0, apix=2.0, max_tilt_deg=30.0, shift_std_px=3.0, objects="shapes",
    defocus_um=None, astigmatism_angst=600.0
):
    """Cryo-EM-like particle images with known object, view, in-plane rotation and shift.

    Each particle is one of the first ``n_objects`` rigid Gaussian-blob objects of ``OBJECT_SETS[objects]``
    (three different objects, 'shapes', or one object in two conformations, 'conformations'), seen in a view
    tilted about the y axis by U(-max_tilt_deg, max_tilt_deg): a continuous family of related views per
    object, like a real particle, but narrow enough that a small model trained for minutes on a CPU can tell
    the objects apart. The projection is then posed with theta ~ U(0, 2 pi) and a shift ~ N(0, shift_std_px^2) px per
    axis, and white Gaussian noise is added at ``snr`` = variance of the clean images / noise variance.
    The default snr of 1 is far cleaner than real data (~0.01-0.1) so the demo learns quickly; lower it to
    test robustness. ``apix`` (Å/px) labels the data and sets the CTF's frequencies. Returns the usual dict plus
    ``tilt_deg`` and ``clean`` (the noise-free images); ``canonical`` is each particle's clean, unposed projection.

    With ``defocus_um`` = (low, high), every image is seen through a CTF (``tvae_em.ctf``) before the noise is
    added, as a micrograph records it: defocus U ~ U(low, high) um, V = U - U(0, ``astigmatism_angst``), the
    astigmatism's angle ~ U(0, 180) deg, at the optics of ``OPTICS``; the SNR is then that of the CTF-modulated
    images, and ``ctf`` holds each particle's parameters (in the order of ``io.particles.ParticleTable.ctf``).
    """
    if objects not in OBJECT_SETS:
        raise UsageError(f"unknown object set {objects!r}; expected one of {', '.join(OBJECT_SETS)}")
    blob_sets = OBJECT_SETS[objects]
    if not 1 <= n_objects <= len(blob_sets):
        raise UsageError(f"number of objects must be 1 to {len(blob_sets)}, not {n_objects}")
    if snr <= 0:
        raise UsageError(f"SNR must be positive, not {snr}")
    if n < 1:
        raise UsageError(f"number of particles must be positive, not {n}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_objects, n)
    tilt_deg = rng.uniform(-max_tilt_deg, max_tilt_deg, n)
    theta = rng.uniform(0.0, 2 * np.pi, n)
    t_model = rng.normal(0.0, shift_std_px, (n, 2)) / (box / 2)
    views = zip(labels, np.deg2rad(tilt_deg), strict=True)
    canonical = np.stack([project_object(blob_sets[k], tilt_rad, box) for k, tilt_rad in views])
    clean = render_pose(canonical, theta, t_model)
    extra = {}
    if defocus_um is not None:
        extra["ctf"] = _draw_ctf(rng, n, defocus_um, astigmatism_angst, apix)
        clean = through_ctf(clean, extra["ctf"])
    noise_std = np.sqrt(clean.var(axis=(1, 2)).mean() / snr)
    images = clean + rng.normal(0.0, noise_std, clean.shape).astype(np.float32)
    return {
        "images": images,
        "clean": clean,
        "canonical": canonical,
        "theta": theta,
        "t_model": t_model,
        "labels": labels,
        "tilt_deg": tilt_deg,
        "apix": apix,
        **extra,
    }


def _draw_ctf(rng, n, defocus_um, astigmatism_angst, apix):
    """CTF parameters of n particles (``io.relion.CTF_COLUMNS`` order, then the pixel size)."""
    low, high = defocus_um
    if not 0 < low <= high:
        raise UsageError(f"defocus range must be positive and increasing, not {defocus_um}")
    defocus_u = rng.uniform(low, high, n) * 1e4
    defocus_v = defocus_u - rng.uniform(0.0, astigmatism_angst, n)
    by_label = {"rlnDefocusU": defocus_u, "rlnDefocusV": defocus_v, "rlnDefocusAngle": rng.uniform(0, 180, n),
                **{label: np.full(n, value) for label, value in OPTICS.items()}}
    columns = [by_label.get(label, np.full(n, default)) for _, label, default in CTF_COLUMNS]
    return np.stack([*columns, np.full(n, float(apix))], axis=1)


# -------------------------------------------------------------------------------------------- writing

OPTICS = {  # a typical 300 kV microscope; without defocus_um the data carry no CTF (refine with CTF correction off)
    "rlnVoltage": 300.0,
    "rlnSphericalAberration": 2.7,
    "rlnAmplitudeContrast": 0.1,
}


def canonical_star_path(star_path):
    """Where :func:`write_simulated` puts the canonical (centred, unrotated) twin of a data set's STAR."""
    star_path = Path(star_path)
    return star_path.with_name(f"{star_path.stem}_canonical.star")


def truth_columns(data, apix):
    """Ground-truth STAR columns (labels without the leading '_') in RELION's convention, via poses.py:
    _tvaeTruePsi (deg), _tvaeTrueOriginX/YAngst, _tvaeTrueClass, and _tvaeTrueTilt (deg) when known."""
    box = data["images"].shape[-1]
    psi_deg, origin_x_angst, origin_y_angst = model_to_relion(data["theta"], data["t_model"], box, apix)
    # adding 0.0 turns -0.0 (from a zero shift) into 0.0 in the text
    columns = {label: values + 0.0 for label, values in zip(TRUE_POSE, (psi_deg, origin_x_angst, origin_y_angst),
                                                             strict=True)}
    columns[TRUE_CLASS_COLUMN] = np.asarray(data["labels"], dtype=np.int64)
    if "tilt_deg" in data:
        columns[TRUE_TILT_COLUMN] = data["tilt_deg"]
    return pd.DataFrame(columns)


def write_simulated(out_dir, stem, data, apix):
    """Write a simulated data set as RELION 3.1 files: <stem>.mrcs + <stem>.star with the truth columns, and
    the canonical images as <stem>_canonical.mrcs + .star (truth pose zero), which the rotation protocol
    of section 4.2 needs. Image names are relative to the STAR file's folder. Returns the STAR path."""
    star_path = Path(out_dir) / f"{stem}.star"
    n = len(data["labels"])
    unposed = {**data, "images": data["canonical"], "theta": np.zeros(n), "t_model": np.zeros((n, 2))}
    unposed.pop("ctf", None)  # the canonical projections are the objects themselves, seen through no CTF
    _write_relion(canonical_star_path(star_path), unposed, apix)
    _write_relion(star_path, data, apix)
    return star_path


def _write_relion(star_path, data, apix):
    stack_path = star_path.with_suffix(".mrcs")
    write_stack(stack_path, data["images"], apix)
    box, n = data["images"].shape[-1], len(data["images"])
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            **{label: [value] for label, value in OPTICS.items()},
            "rlnImagePixelSize": [float(apix)],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": image_name_texts(np.arange(1, n + 1), stack_path.name),
            "rlnOpticsGroup": np.ones(n, dtype=np.int64),
        }
    )
    if "ctf" in data:  # the particle-level CTF values, as CTFFIND / RELION write them
        for column, (_, label, _) in enumerate(CTF_COLUMNS[:3]):
            particles[label] = data["ctf"][:, column]
    particles = pd.concat([particles, truth_columns(data, apix)], axis=1)
    write_star(star_path, new_relion31_star(optics, particles))


def write_mnist_variant(mnist_dir, out_dir, variant, n=None, seed=0, split="train", n_holdout=1000):
    """Write MNIST(N) or MNIST(U) (section 4.2) of one split as out_dir/mnist_<variant>_<split>.star/.mrcs
    plus its canonical twin (see :func:`write_simulated`), pixel size 1 Å. Returns the STAR path.

    ``split`` follows :func:`mnist_split` (the paper's 60,000/10,000 split when train-* files exist, else
    the first 10,000 - ``n_holdout`` t10k digits for training and the last ``n_holdout`` for testing);
    ``n`` keeps the first n digits of the split. Train and test get independent poses for one ``seed``.
    """
    images, labels = mnist_split(mnist_dir, split, n_holdout)
    if n is not None:
        if not 1 <= n <= len(images):
            raise UsageError(f"asked for {n} digits but the {split} split has {len(images)}")
        images, labels = images[:n], labels[:n]
    data = make_mnist_variant(images, labels, variant, seed=[seed, ("train", "test").index(split)])
    return write_simulated(out_dir, f"mnist_{variant}_{split}", data, apix=1.0)


def write_particles(out_dir, n, stem="particles", **options):
    """Simulate n particles (``options`` as for :func:`simulate_particles`) and write them with
    :func:`write_simulated` as out_dir/<stem>.star/.mrcs, canonical projections beside.

    Returns the STAR path."""
    data = simulate_particles(n, **options)
    return write_simulated(out_dir, stem, data, data["apix"])
