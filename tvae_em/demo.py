"""``tvae-em demo``: the whole pipeline on simulated particles with known truth, in minutes on a CPU.

Simulates particles of three objects seen through a CTF, as real particles are (``simulate.simulate_particles``:
defocus 1.0-2.5 um with astigmatism, written as RELION columns), then runs preprocess, train (which models the
CTF, ``--ctf auto``), embed, pose and render exactly as a user would, and scores the results against the truth:
rotation and translation correlation (each object's template frame removed, ``metrics.pose_scores_per_object``)
and the clustering accuracy of ``_tvaeCluster`` against the simulated object.
"""

from pathlib import Path

import numpy as np

from tvae_em import infer, metrics, poses, preprocess, render, simulate, train
from tvae_em.io.columns import CLUSTER_COLUMN, RELION_POSE, TRUE_CLASS_COLUMN, TRUE_POSE
from tvae_em.io.stack import open_particles
from tvae_em.io.star import numeric_column, particles_block, read_star

N_OBJECTS = 3
SIM_BOX = 64
SIM_APIX = 4.0  # Å per pixel: particles of ~150 Å; trained at 8 Å per pixel, as 2-D classification often is
TRAIN_BOX = 32
DEFOCUS_UM = (1.0, 2.5)
# A model small enough to learn in a few CPU minutes; the paper's sizes are the CLI defaults.
DEMO_MODEL = {"rotations": 8, "z_dim": 2, "encoder_fields": 16, "generator_width": 128, "generator_depth": 3,
              "fourier_features": 64, "fourier_scale": 0.0625, "likelihood": "gaussian",
              "translation_prior_std": 3.0}


def run_demo(out_dir, n_particles=1500, epochs=20, snr=1.0, seed=0, device="auto") -> str:
    """Run the pipeline into ``out_dir`` and return a short report of the scores."""
    out = Path(out_dir)
    sim_star = simulate.write_particles(out / "sim", n_particles, n_objects=N_OBJECTS, snr=snr, seed=seed,
                                        box=SIM_BOX, apix=SIM_APIX, defocus_um=DEFOCUS_UM)
    prep_star = preprocess.preprocess_star(sim_star, out / "prep", box=TRAIN_BOX)
    train_config = train.TrainConfig(epochs=epochs, seed=seed, device=device)  # the default recipe
    train.train_from_star(prep_star, out / "run", train_config, DEMO_MODEL)
    embedded = infer.embed(out / "run", prep_star, out / "embedded.star", clusters=N_OBJECTS, device=device)
    posed = infer.pose(out / "run", prep_star, out / "posed.star", device=device)
    render.render(out / "run", out / "render", grid=6, z_file=embedded, device=device)  # over the data
    render.render(out / "run", out / "centres", centers_from=embedded, device=device)
    return report(embedded, posed, out)


def report(embedded_star, posed_star, out) -> str:
    """Scores of the embedded and posed STAR files against the simulated truth they carry."""
    scores = truth_scores(embedded_star, posed_star)
    return "\n".join([
        f"tvae-em demo: {scores['particles']} simulated particles of {N_OBJECTS} objects seen through a CTF "
        f"(defocus {DEFOCUS_UM[0]}-{DEFOCUS_UM[1]} um), results in {out}/",
        f"  rotation circular correlation      {scores['rotation']:.3f}",
        f"  translation Pearson correlation x  {scores['translation_x']:.3f}, y {scores['translation_y']:.3f}",
        f"  clustering accuracy (Ward, k={N_OBJECTS})   {100 * scores['accuracy']:.1f} %",
        f"  (chance {100 * scores['chance']:.1f} %; poses are scored in each object's own frame)",
    ])


def truth_scores(embedded_star, posed_star) -> dict:
    """Rotation and translation correlation of the written poses with the simulated truth columns (each
    object's template frame removed, ``metrics.pose_scores_per_object``) and the accuracy of _tvaeCluster
    against _tvaeTrueClass, with the accuracy of always guessing the largest class ('chance')."""
    posed = read_star(posed_star)
    block = particles_block(posed)
    column = lambda star, label: numeric_column(star, block, label)  # noqa: E731
    particles = open_particles(posed_star)
    box, apix = particles.box, particles.pixel_sizes
    theta_true, t_true = poses.relion_to_model(*(column(posed, label) for label in TRUE_POSE), box, apix)
    theta_pred, t_pred = poses.relion_to_model(*(column(posed, label) for label in RELION_POSE), box, apix)
    labels = column(posed, TRUE_CLASS_COLUMN).astype(int)
    rotation, (r_x, r_y) = metrics.pose_scores_per_object(theta_true, t_true, theta_pred, t_pred, labels)
    embedded = read_star(embedded_star)
    clusters = numeric_column(embedded, particles_block(embedded), CLUSTER_COLUMN).astype(int)
    return {"particles": len(labels), "rotation": rotation, "translation_x": r_x, "translation_y": r_y,
            "accuracy": metrics.clustering_accuracy(labels, clusters),
            "chance": np.bincount(labels).max() / len(labels)}
