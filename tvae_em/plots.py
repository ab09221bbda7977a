"""Figures for embeddings, poses, learning curves and rendered images, drawn with matplotlib's Agg canvas.

Figures are built on ``matplotlib.figure.Figure`` with an explicit Agg canvas instead of pyplot, so no GUI
backend or global figure registry is involved (safe on headless cluster nodes and inside long runs), and
every PNG is written through ``atomic_path`` so an interrupted run never leaves a truncated image.
"""

import math

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tvae_em.io.atomic import atomic_path
from tvae_em.io.columns import CONFIDENCE_COLUMN, ENTROPY_COLUMN, SYMMETRY_HINT_COLUMN, in_plane_pose_labels

# Scatter plots of millions of particles are slow to draw and no more informative than a sample.
MAX_SCATTER_POINTS = 50_000
MAX_MONTAGE_IMAGES = 256
_DPI = 120


def save_figure(fig: Figure, path) -> None:
    """Render ``fig`` with the Agg canvas into ``path`` (format from its suffix), atomically."""
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=_DPI, bbox_inches="tight")


def latent_view(z: np.ndarray):
    """A 2-D view of latents (n, Z) and the map that produced it.

    Z = 2 is shown as is; Z > 2 is projected on its first two principal axes (the Z x Z covariance is cheap
    for any n); Z = 1 is shown against a constant second axis. Returns (xy (n, 2), project, axis_labels),
    where ``project`` maps further points (e.g. cluster centres) into the same view.
    """
    z = np.asarray(z, dtype=np.float64)
    dims = z.shape[1]
    if dims == 1:
        return _pad_zero(z), _pad_zero, ("z1", "")
    if dims == 2:
        return z, lambda p: np.asarray(p, dtype=np.float64), ("z1", "z2")
    mean = z.mean(0)
    _, eigvec = np.linalg.eigh(np.cov(z - mean, rowvar=False))
    axes = eigvec[:, ::-1][:, :2]

    def project(points):
        return (np.asarray(points, dtype=np.float64) - mean) @ axes

    return project(z), project, ("PC1 of z", "PC2 of z")


def _pad_zero(points):
    points = np.asarray(points, dtype=np.float64)
    return np.column_stack([points[:, 0], np.zeros(len(points))])


def latent_figure(path, z, labels=None, centers=None, center_images=None, title="latent space", seed=0):
    """Scatter of the latent means coloured by cluster, with the decoded image of every cluster centre.

    ``labels`` are 1-based cluster numbers (or None), ``centers`` (k, Z) the cluster mean latents and
    ``center_images`` (k, N, N) what the generator draws at each centre with theta = 0, t = 0. At most
    ``MAX_SCATTER_POINTS`` particles (a seeded random sample) are drawn, and define the PCA view.
    """
    shown = _sample_rows(len(z), MAX_SCATTER_POINTS, seed)
    xy, project, (xlabel, ylabel) = latent_view(np.asarray(z)[shown])
    n_thumbs = 0 if center_images is None else len(center_images)
    fig = Figure(figsize=(7, 6 + (1.8 if n_thumbs else 0)), layout="constrained")
    grid = fig.add_gridspec(2 if n_thumbs else 1, max(n_thumbs, 1),
                            height_ratios=[4, 1] if n_thumbs else None)
    ax = fig.add_subplot(grid[0, :])
    size = float(np.clip(20_000 / len(shown), 1, 20)) if len(shown) else 1.0
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, alpha=0.5, linewidths=0)
    else:
        labels = np.asarray(labels)[shown]
        for k in np.unique(labels):
            ax.scatter(xy[labels == k, 0], xy[labels == k, 1], s=size, alpha=0.5, linewidths=0,
                       color=cluster_colour(k), label=str(k))
        ax.legend(title="cluster", fontsize="small", markerscale=max(1.0, 30 / size) ** 0.5, loc="best")
    if centers is not None:
        centre_xy = project(centers)
        ax.scatter(centre_xy[:, 0], centre_xy[:, 1], c="black", marker="x", s=40)
        for k, (x, y) in enumerate(centre_xy, start=1):
            ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{title} ({len(shown)} of {len(z)} particles)")
    for k in range(n_thumbs):
        _thumbnail(fig.add_subplot(grid[1, k]), center_images[k], f"cluster {k + 1}")
    save_figure(fig, path)


def cluster_colour(label):
    """Colour of 1-based cluster ``label``: tab20's ten strong colours, then its ten pale ones, cycled."""
    index = (int(label) - 1) % 20
    return colormaps["tab20"](2 * index if index < 10 else 2 * (index - 10) + 1)


def pose_figure(path, psi_deg, origin_x_angst, origin_y_angst, entropy_nats, local_mass, symmetry_hint):
    """Histograms of the inferred in-plane angle, shifts, posterior sharpness and symmetry hints (0: the
    particle was not located, no hint)."""
    fig = Figure(figsize=(12, 7), layout="constrained")
    axes = fig.subplots(2, 3)
    panels = [(psi_deg, "in-plane angle psi (deg)", np.linspace(-180, 180, 73)),
              (origin_x_angst, "origin x (Å)", 50), (origin_y_angst, "origin y (Å)", 50),
              (entropy_nats, "entropy of q(t, r | y) (nats)", 50),
              (local_mass, "q(t, r | y) within 1 px and 1 bin of the pose", np.linspace(0, 1, 51))]
    for ax, (values, label, bins) in zip(axes.flat, panels, strict=False):
        ax.hist(np.asarray(values), bins=bins, color="tab:blue")
        ax.set(xlabel=label, ylabel="particles")
    orders, counts = np.unique(np.asarray(symmetry_hint), return_counts=True)
    hint_ax = axes.flat[5]
    hint_ax.bar([str(o) for o in orders], counts, color="tab:orange")
    hint_ax.set(xlabel="symmetry hint (cyclic order)", ylabel="particles")
    fig.suptitle(f"inferred poses of {len(psi_deg)} particles")
    save_figure(fig, path)


def pose_columns_figure(path, columns):
    """``pose_figure`` of the STAR columns ``tvae-em pose`` writes (a dict of arrays by label)."""
    psi, origin_x, origin_y = (columns[name] for name in in_plane_pose_labels(columns))
    pose_figure(path, psi_deg=psi, origin_x_angst=origin_x, origin_y_angst=origin_y,
                entropy_nats=columns[ENTROPY_COLUMN], local_mass=columns[CONFIDENCE_COLUMN],
                symmetry_hint=columns[SYMMETRY_HINT_COLUMN])


def learning_curve_figure(history: list[dict], best_epoch: int, path) -> None:
    """A training run's learning curve: ELBO per particle (training and validation, from log.csv rows) above the
    learning rate, both against the epoch."""
    fig = Figure(figsize=(7, 5))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    epochs = [row["epoch"] for row in history]
    top.plot(epochs, [row["train_elbo"] for row in history], label="training")
    if not all(math.isnan(row["val_elbo"]) for row in history):
        top.plot(epochs, [row["val_elbo"] for row in history], label="validation")
    top.axvline(best_epoch, color="grey", linestyle=":", label=f"best (epoch {best_epoch})")
    top.set_ylabel("ELBO per particle (nats)")
    top.legend()
    bottom.semilogy(epochs, [row["lr"] for row in history], color="black")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("epoch")
    save_figure(fig, path)


def montage_figure(path, images, titles=None, columns=None, captions=None):
    """The first ``MAX_MONTAGE_IMAGES`` of ``images`` (k, N, N) in a grid, each scaled to its own range,
    optionally titled above and captioned below (a figure of thousands of panels would take minutes and show
    nothing)."""
    count = min(len(images), MAX_MONTAGE_IMAGES)
    columns = min(columns or int(np.ceil(np.sqrt(count))), count)
    rows = int(np.ceil(count / columns))
    fig = Figure(figsize=(1.5 * columns, (1.5 if captions is None else 1.8) * rows + 0.3), layout="constrained")
    for k in range(count):
        _thumbnail(fig.add_subplot(rows, columns, k + 1), images[k], None if titles is None else titles[k],
                   None if captions is None else captions[k])
    if count < len(images):
        fig.suptitle(f"first {count} of {len(images)} images")
    save_figure(fig, path)


def _thumbnail(ax, image, title, caption=None):
    ax.imshow(image, cmap="gray", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize="x-small")
    if caption:
        ax.set_xlabel(caption, fontsize="x-small")


def _sample_rows(n, limit, seed):
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
