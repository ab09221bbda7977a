"""Draw images with the trained spatial generator (paper section 3.3.2) at chosen latents and poses.

Latents come from an array, a file (npy, npz, csv or an embedded STAR with ``_tvaeZ`` columns), the cluster
means of an embedded STAR, or a regular n x n traversal of the first two latent dimensions: over the range of the
particles' latents when they are given (an embedded STAR), else over the prior's. Every image is drawn with the
same pose: the generator evaluated at x' = R(theta) (x - t), so the object appears rotated by -theta with its
centre at ``shift_px``; the written STAR records that pose in RELION's convention (``tvae_em.poses``) and each
image's latent, which also captions its panel of the montage.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tvae_em import plots
from tvae_em.checkpoint import load_model, run_files
from tvae_em.device import resolve_device
from tvae_em.errors import InputError, UsageError
from tvae_em.io.atomic import atomic_paths, refuse_overwriting
from tvae_em.io.columns import CLUSTER_COLUMN, RELION_POSE, latent_block, read_latents, z_columns
from tvae_em.io.files import regular_file
from tvae_em.io.relion import DEFAULT_PIXEL_SIZE, one_optics_group, particle_pixel_sizes
from tvae_em.io.stack import relion_path, write_stack
from tvae_em.io.star import image_name_texts, new_relion31_star, numeric_column, read_star, write_star
from tvae_em.memory import FLOAT_BYTES, check_fits
from tvae_em.poses import model_to_relion

# A traversal without given points spans +-2 prior standard deviations of p(z) = N(0, I), the others at 0.
PRIOR_SPAN_STD = 2.0
# A traversal over given points spans these percentiles, so that a few outliers do not stretch it; the dimensions
# it does not traverse stay at the points' median.
GRID_PERCENTILES = (1.0, 99.0)
CAPTION_DIMS = 3  # a montage panel's caption shows the first latent coordinates, up to this many
STACK_NAME, STAR_NAME, MONTAGE_NAME = "rendered.mrcs", "rendered.star", "montage.png"


def decode_at(model, z, theta_rad=None, t_model=None, batch_size=256) -> np.ndarray:
    """Generator images (k, N, N) at latents z (k, Z) with pose (theta, t), default centred and unrotated."""
    device = next(model.parameters()).device
    model.eval()
    k, size = len(z), model.config.image_size
    theta_rad = np.broadcast_to(0.0 if theta_rad is None else theta_rad, (k,))
    t_model = np.broadcast_to(np.zeros(2) if t_model is None else t_model, (k, 2))

    def batch(values, start):
        return torch.as_tensor(np.asarray(values[start:start + batch_size], np.float32), device=device)

    images = np.empty((k, size, size), np.float32)
    for start in range(0, k, batch_size):
        drawn = model.decode(batch(z, start), batch(theta_rad, start), batch(t_model, start))
        images[start:start + batch_size] = drawn.float().cpu().numpy()
    return images


@dataclass
class Latents:
    """What to draw: latents (k, Z), their cluster numbers when they are cluster centres, and the pixel size
    of the particles they came from (when a STAR file tells it)."""

    z: np.ndarray
    clusters: np.ndarray | None = None
    apix: float | None = None


def render(run_dir, out_dir, z=None, z_file=None, grid=None, theta_deg=0.0, shift_px=(0.0, 0.0),
           centers_from=None, device="auto", apix=None, batch_size=256) -> Path:
    """Decode latents into ``out_dir/rendered.mrcs``, ``rendered.star`` (one row per image with its
    ``_tvaeZ..`` columns and pose) and ``montage.png``; returns the STAR path.

    Latents: ``z`` (k, Z), ``z_file``, or ``centers_from`` (each ``_tvaeCluster``'s mean latent, ordered by
    cluster number). ``grid`` = n draws an n x n traversal of z1 and z2 (``traversal``) over the 1st-99th
    percentile range of the points of ``z`` or ``z_file`` (an embedded STAR: the particles' latents), or +-2 std
    of the prior without them; it is laid out row-major with z2 decreasing downwards, as in a plot. Each panel of
    the montage is captioned with its latent. ``apix`` (Å/px) labels the images; by default the (uniform) pixel
    size of a given STAR file, else 1. The three outputs appear together or not at all.
    """
    out_dir = Path(out_dir)
    outputs = [out_dir / STACK_NAME, out_dir / STAR_NAME, out_dir / MONTAGE_NAME]
    refuse_overwriting(outputs, [*run_files(run_dir), *(path for path in (z_file, centers_from) if path)])
    theta_rad, shift_px = np.radians(float(theta_deg)), np.asarray(shift_px, dtype=np.float64)
    if not (np.isfinite(theta_rad) and np.isfinite(shift_px).all()):
        raise UsageError(f"the pose must be finite numbers, got theta {theta_deg} and shift {tuple(shift_px)}")
    model, _ = load_model(run_dir, map_location=resolve_device(device))
    size = model.config.image_size
    if grid is not None:
        _check_images_fit(grid ** 2, size)
    source = choose_latents(model.config.z_dim, z, z_file, grid, centers_from)
    _check_images_fit(len(source.z), size)
    apix = float(apix or source.apix or DEFAULT_PIXEL_SIZE)
    t_model = shift_px / (size / 2)
    images = decode_at(model, source.z, theta_rad, t_model, batch_size)
    titles = None if source.clusters is None else [f"cluster {c}" for c in source.clusters]
    with atomic_paths(*outputs) as (stack_tmp, star_tmp, montage_tmp):
        write_stack(stack_tmp, images, apix)
        write_star(star_tmp, rendered_star(source, theta_rad, t_model, size, apix, relion_path(outputs[0])))
        plots.montage_figure(montage_tmp, images, titles, columns=grid, captions=latent_captions(source.z))
    return outputs[1]


def latent_captions(z) -> list[str]:
    """'z (0.52, -1.30)': each latent's first ``CAPTION_DIMS`` coordinates (all are in rendered.star)."""
    more = ", ..." if z.shape[1] > CAPTION_DIMS else ""
    return [f"z ({', '.join(f'{v:.2f}' for v in point[:CAPTION_DIMS])}{more})" for point in z]


def _check_images_fit(count: int, size: int) -> None:
    """The rendered images are held in memory (for the stack and the montage): refuse a count that cannot be."""
    check_fits(count * size ** 2 * FLOAT_BYTES, torch.device("cpu"), f"rendering {count:,} images of {size} px",
               "render fewer latents or a smaller --grid")


def choose_latents(z_dim, z=None, z_file=None, grid=None, centers_from=None) -> Latents:
    """The latents to draw, from exactly one source (``grid`` may use ``z`` or ``z_file`` for its range)."""
    if sum(source is not None for source in (z, z_file, centers_from)) > 1:
        raise UsageError("give at most one of z, a latent file and an embedded STAR for cluster centres")
    if centers_from is not None:
        if grid is not None:
            raise UsageError("a grid traversal cannot be combined with cluster centres")
        return cluster_centres(centers_from, z_dim)
    points = load_latents(z_file, z_dim) if z_file is not None else None
    if z is not None:
        points = Latents(_checked_latents(z, z_dim, "z"))
    if grid is not None:
        return Latents(traversal(None if points is None else points.z, grid, z_dim),
                       apix=None if points is None else points.apix)
    if points is None:
        raise UsageError("nothing to render: give latents, a latent file, cluster centres or a grid")
    return points


def traversal(points, n, z_dim) -> np.ndarray:
    """n x n latents on a regular grid over z1 and z2, row-major, z2 decreasing along rows: over the
    ``GRID_PERCENTILES`` range of ``points`` (k, Z) with every other dimension at their median, or without points
    over +-``PRIOR_SPAN_STD`` with the others at 0 (the prior's median)."""
    if z_dim < 2:
        raise UsageError(f"a grid traversal needs at least 2 latent dimensions; this model has {z_dim} (render "
                         "chosen latents with --z or --z-file instead)")
    if n < 1:
        raise UsageError(f"grid size must be at least 1, got {n}")
    if points is None:
        low, high, centre = np.full(2, -PRIOR_SPAN_STD), np.full(2, PRIOR_SPAN_STD), np.zeros(z_dim)
    else:
        low, high = np.percentile(points[:, :2], GRID_PERCENTILES, axis=0)
        centre = np.median(points, axis=0)
    z1 = np.linspace(low[0], high[0], n)
    z2 = np.linspace(high[1], low[1], n)
    rows, cols = np.meshgrid(z2, z1, indexing="ij")
    grid = np.tile(centre, (n * n, 1))
    grid[:, 0], grid[:, 1] = cols.ravel(), rows.ravel()
    return grid


def load_latents(path, z_dim) -> Latents:
    """Latents (k, Z) from .npy, .npz (array 'z_mu' or 'z', or its only array), .csv (optionally with a
    header line) or a STAR file with ``_tvaeZ01..`` columns."""
    path = regular_file(path)
    suffix = path.suffix.lower()
    if suffix == ".star":
        star, block = _latent_table(path, z_dim)
        return Latents(_star_latents(star, block, z_dim), apix=_uniform_pixel_size(star, block))
    if suffix in (".npy", ".npz"):
        return Latents(_checked_latents(_load_numpy(path), z_dim, path))
    if suffix in (".csv", ".txt"):
        return Latents(_checked_latents(_load_csv(path), z_dim, path))
    raise InputError(path, "unknown latent file type; use .npy, .npz, .csv or .star")


def cluster_centres(star_path, z_dim) -> Latents:
    """Mean ``_tvaeZ`` latent of each ``_tvaeCluster`` of an embedded STAR, in cluster order."""
    star, block = _latent_table(star_path, z_dim)
    z = _star_latents(star, block, z_dim)
    labels = numeric_column(star, block, CLUSTER_COLUMN).astype(np.int64)
    clusters = np.unique(labels)
    centres = np.stack([z[labels == c].mean(0) for c in clusters])
    return Latents(centres, clusters, _uniform_pixel_size(star, block))


def _latent_table(path, z_dim):
    star = read_star(path)
    return star, latent_block(star, z_dim)


def _star_latents(star, block, z_dim) -> np.ndarray:
    return _checked_latents(read_latents(star, block, z_dim), z_dim, star.path)


def _uniform_pixel_size(star, block) -> float | None:
    """The particles' pixel size if the STAR file has optics and all particles share one, else None."""
    if "optics" not in star or "rlnImagePixelSize" not in star["optics"].columns:
        return None
    sizes = np.unique(particle_pixel_sizes(star, block))
    return float(sizes[0]) if len(sizes) == 1 else None


def _load_numpy(path) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(path, f"cannot read: {err}") from None
    if isinstance(data, np.ndarray):
        return data
    with data:
        names = [k for k in ("z_mu", "z") if k in data.files] or (data.files if len(data.files) == 1 else [])
        if not names:
            raise InputError(path, f"no array 'z_mu' or 'z' among {', '.join(data.files) or 'none'}")
        return data[names[0]]


def _load_csv(path) -> np.ndarray:
    try:
        table = pd.read_csv(path, header=None, comment="#", skipinitialspace=True)
        if not table.empty and pd.to_numeric(table.iloc[0], errors="coerce").isna().any():
            table = pd.read_csv(path, header=0, comment="#", skipinitialspace=True)
        return table.apply(pd.to_numeric, errors="raise").to_numpy(dtype=np.float64)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(path, f"not a numeric CSV table: {err}") from None


def _checked_latents(values, z_dim, origin) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1 and len(values) == z_dim:
        values = values[None]
    if values.ndim != 2 or values.shape[1] != z_dim or not len(values):
        raise InputError(origin, f"need latents shaped (k, {z_dim}) for this model, got {values.shape}")
    if not np.isfinite(values).all():
        raise InputError(origin, "latents contain NaN or infinity")
    return values


def rendered_star(source: Latents, theta_rad, t_model, box, apix, stack_name):
    """RELION 3.1 table for the rendered stack: one optics group, one row per image with pose and latents.
    ``stack_name`` is the stack as RELION should find it (relative to the project folder, or absolute)."""
    k = len(source.z)
    psi_deg, origin_x, origin_y = model_to_relion(np.full(k, theta_rad), np.tile(t_model, (k, 1)), box, apix)
    particles = pd.DataFrame({"rlnImageName": image_name_texts(np.arange(1, k + 1), stack_name),
                              "rlnOpticsGroup": np.ones(k, np.int64),
                              **dict(zip(RELION_POSE, (psi_deg, origin_x, origin_y), strict=True))})
    for name, values in zip(z_columns(source.z.shape[1]), source.z.T, strict=True):
        particles[name] = values
    if source.clusters is not None:
        particles[CLUSTER_COLUMN] = np.asarray(source.clusters, np.int64)
    return new_relion31_star(one_optics_group(apix, box), particles)
