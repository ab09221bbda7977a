"""Class averages (``tvae-em averages``): every particle aligned by its in-plane pose and averaged within its class,
CTF-corrected by a Wiener filter where the particles carry defocus values, as RELION's 2-D classification shows
its classes.

Alignment is RELION's (``poses.align_image``: shift by +origin, then rotate by +psi), which brings each particle to
its class's canonical view. For a class of n particles with images y_i, the average is

    without CTF:  A = 1/n sum_i align_i(y_i)
    Wiener:       A^(u) = [sum_i align_i(c_i * y_i)]^(u) / (sum_i c'_i(u)^2 + n k)

where c_i * y_i is the image multiplied in Fourier space by its CTF c_i (``tvae_em.ctf``; by |c_i| for images
phase flipped already, so that both give c_i^2 times the particle), in the particle's own frame, where its
astigmatism is fixed to the micrograph, before it is aligned; c'_i is that CTF as it is seen once the image is
aligned (``ctf.in_aligned_frame``: turned with the image, computed exactly). k, the Wiener constant, is the
inverse signal-to-noise ratio assumed per particle: it keeps frequencies where every CTF of the class is near zero
from being amplified into noise.

Poses come from ``_rlnAnglePsi``, ``_rlnOriginXAngst`` and ``_rlnOriginYAngst`` (``tvae-em pose``), or from the
``_tvaeAnglePsi`` columns when present (the in-plane pose ``pose`` writes beside a 3-D refinement's angles); a
missing origin counts as 0, as in RELION. Classes come from ``io.columns.class_column``.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tvae_em import console, plots
from tvae_em.ctf import in_aligned_frame, rfft_values, through_ctf
from tvae_em.errors import InputError, UsageError
from tvae_em.io.atomic import atomic_paths, refuse_overwriting
from tvae_em.io.columns import (
    CLASS_COLUMN,
    COUNT_COLUMN,
    RELION_POSE,
    class_column,
    class_numbers,
    in_plane_pose_labels,
)
from tvae_em.io.relion import one_optics_group
from tvae_em.io.stack import image_names, open_particles, write_stack
from tvae_em.io.star import StarFile, new_relion31_star, numeric_column, write_star
from tvae_em.poses import align_image

STACK_NAME, STAR_NAME, GALLERY_NAME = "averages.mrcs", "averages.star", "averages.png"
WIENER_CONSTANT = 0.1
CTF_MODES = ("auto", "none")
PROGRESS_MIN = 2000  # fewer particles are averaged in a moment: no progress bar


@dataclass
class ClassAverages:
    """One average per class: ``classes`` (K,) the class numbers in increasing order, ``counts`` (K,) their
    particles, ``images`` (K, N, N) float32."""

    classes: np.ndarray
    counts: np.ndarray
    images: np.ndarray


def average_classes(particles, classes, psi_deg, origin_angst, apix, ctf_params=None, ctf_flipped=False,
                    wiener_constant=WIENER_CONSTANT, batch_size=256, progress=False) -> ClassAverages:
    """Average ``particles`` (``Particles`` or ``ArrayParticles``: ``box`` and ``read(rows)``) within each class,
    aligned by their RELION poses (module docstring).

    ``classes`` (n,) class numbers; ``psi_deg`` (n,); ``origin_angst`` (n, 2) x, y; ``apix`` (n,) Å per pixel;
    ``ctf_params`` (n, ctf.N_COLUMNS) as ``ParticleTable.ctf`` gives them, for a Wiener average (None: the
    plain aligned mean); ``ctf_flipped`` for images multiplied by the sign of their CTF already. Images are read
    ``batch_size`` at a time, so memory holds one batch and the sums.
    """
    classes = np.asarray(classes, dtype=np.int64)
    numbers, slot = np.unique(classes, return_inverse=True)
    n, box = len(classes), particles.box
    counts = np.bincount(slot, minlength=len(numbers))
    origin_angst = np.asarray(origin_angst, dtype=np.float64).reshape(n, 2)
    apix = np.broadcast_to(np.asarray(apix, dtype=np.float64), (n,))
    sums = np.zeros((len(numbers), box, box))
    ctf_squared = None if ctf_params is None else np.zeros((len(numbers), box, box // 2 + 1))
    with console.progress(n, "averaging", "particle", enabled=progress) as bar:
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(start + batch_size, n))
            images = particles.read(rows)
            if ctf_params is not None:
                images = through_ctf(images, ctf_params[rows], flipped=ctf_flipped)
                aligned_ctf = rfft_values(in_aligned_frame(ctf_params[rows], psi_deg[rows]), box)
                np.add.at(ctf_squared, slot[rows], aligned_ctf ** 2)
            aligned = [align_image(image, psi_deg[row], *origin_angst[row], apix[row])
                       for row, image in zip(rows, images, strict=True)]
            np.add.at(sums, slot[rows], np.stack(aligned))
            bar.update(len(rows))
    if ctf_squared is None:
        averages = sums / counts[:, None, None]
    else:
        spectra = np.fft.rfft2(sums) / (ctf_squared + wiener_constant * counts[:, None, None])
        averages = np.fft.irfft2(spectra, s=(box, box))
    return ClassAverages(numbers, counts, averages.astype(np.float32))


def in_plane_poses(star: StarFile, block: str) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """(labels, psi_deg (n,), origin_angst (n, 2)) of the particles: the ``_tvaeAnglePsi`` columns when present,
    else ``_rlnAnglePsi`` and its origins; InputError naming the file when there is no angle."""
    columns = star[block].columns
    labels = in_plane_pose_labels(columns)
    if labels[0] not in columns:
        raise InputError(star.path, f"data_{block} has no _{RELION_POSE[0]} column (in-plane poses: run "
                                    "'tvae-em pose' first)")
    origins = [numeric_column(star, block, label) if label in columns else np.zeros(len(star[block]))
               for label in labels[1:]]
    return labels, numeric_column(star, block, labels[0]), np.column_stack(origins)


def class_averages(star_path, out_dir, class_column_label=None, ctf="auto", wiener_constant=WIENER_CONSTANT,
                   datadir=None, batch_size=256) -> Path:
    """Average the particles of ``star_path`` per class, aligned by their in-plane poses, into ``out_dir``:
    ``averages.mrcs`` (one image per class, in increasing class number), ``averages.star`` (one row per class:
    rlnImageName, rlnClassNumber, rlnClassDistribution and ``_tvaeParticleCount``) and ``averages.png`` (a gallery
    with each class's number and count), all three or none. Returns the STAR path.

    ``ctf``: 'auto' Wiener-filters with the particles' CTFs when the STAR has defocus values, 'none' never.
    """
    if ctf not in CTF_MODES:
        raise UsageError(f"ctf must be one of {', '.join(CTF_MODES)}, not {ctf!r}")
    if not (np.isfinite(wiener_constant) and wiener_constant > 0):
        raise UsageError(f"the Wiener constant must be a positive number, not {wiener_constant}")
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    out_dir = Path(out_dir)
    outputs = [out_dir / STACK_NAME, out_dir / STAR_NAME, out_dir / GALLERY_NAME]
    refuse_overwriting(outputs, [star_path])
    particles = open_particles(star_path, datadir=datadir)
    refuse_overwriting(outputs, particles.stack_paths)
    table, block = particles.table, particles.block
    label = class_column(table, block, class_column_label)
    classes = class_numbers(table, block, label)
    pose_labels, psi_deg, origin_angst = in_plane_poses(table, block)
    ctf_params = particles.ctf if ctf == "auto" else None
    result = average_classes(particles, classes, psi_deg, origin_angst, particles.pixel_sizes, ctf_params,
                             ctf_params is not None and particles.ctf_flipped, wiener_constant, batch_size,
                             progress=len(particles) >= PROGRESS_MIN)
    apix = _output_pixel_size(particles.pixel_sizes, table.path)
    captions = [f"class {k}\n{count} particles" for k, count in zip(result.classes, result.counts, strict=True)]
    with atomic_paths(*outputs) as (stack_tmp, star_tmp, gallery_tmp):
        write_stack(stack_tmp, result.images, apix)
        write_star(star_tmp, averages_star(result, apix, image_names(len(result.classes), outputs[0])))
        plots.montage_figure(gallery_tmp, result.images, captions=captions)
    how = "Wiener-filtered with their CTFs" if ctf_params is not None else "without CTF correction"
    console.note(f"averaged {len(classes)} particles in {len(result.classes)} classes of _{label}, aligned by "
                 f"_{pose_labels[0]} and its origins, {how}")
    return outputs[1]


def averages_star(result: ClassAverages, apix: float, names: list[str]) -> StarFile:
    """The RELION 3.1 table of the averages: one row per class, its image ``names``."""
    rows = pd.DataFrame({"rlnImageName": names, "rlnOpticsGroup": np.ones(len(names), np.int64),
                         CLASS_COLUMN: result.classes, "rlnClassDistribution": result.counts / result.counts.sum(),
                         COUNT_COLUMN: result.counts})
    return new_relion31_star(one_optics_group(apix, result.images.shape[-1]), rows)


def _output_pixel_size(pixel_sizes: np.ndarray, star_path) -> float:
    """The particles' pixel size; with several, the median (the averages are made in pixels), with a warning."""
    if np.all(pixel_sizes == pixel_sizes[0]):
        return float(pixel_sizes[0])
    apix = float(np.median(pixel_sizes))
    warnings.warn(f"{star_path}: the particles have pixel sizes from {pixel_sizes.min():g} to {pixel_sizes.max():g} "
                  f"A; the averages are made in pixels and labelled {apix:g} A", stacklevel=2)
    return apix
