"""The cryo-EM pipeline end to end through the command line, on simulated particles seen through a CTF, with
known truth: preprocess -> train (the default recipe, which models the CTF, and a small model) -> embed / pose ->
render. Training must find the poses and the classes (so that CI catches a recipe that stops learning), and the
written poses must align the particles."""

import numpy as np
import pytest
import torch

from tvae_em import ctf, demo, simulate
from tvae_em.checkpoint import load_model
from tvae_em.cli import main
from tvae_em.io.columns import CONFIDENCE_COLUMN
from tvae_em.io.mrc import read_mrc_header
from tvae_em.io.relion import particle_pixel_sizes
from tvae_em.io.stack import open_particles
from tvae_em.io.star import numeric_column, particles_block, read_star
from tvae_em.pose_quality import CONFIDENT_MASS
from tvae_em.poses import align_image, model_to_relion
from tvae_em.preprocess import background_mask

pytestmark = pytest.mark.slow  # one training of about half a minute on 2 cores, shared by the module

BOX = 32
SMALL_MODEL = ["--rotations", "8", "--z-dim", "2", "--encoder-fields", "12", "--generator-width", "96",
               "--generator-depth", "2", "--fourier-features", "64", "--fourier-scale", "0.0625",
               "--translation-prior-std", "2", "--device", "cpu"]


def tvae(*args):
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in args])
    assert done.value.code == 0, args


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One object in two conformations (as in the demo) at SNR 2, defocus 1-2.5 um, through every command;
    training takes the defaults apart from the model size."""
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("pipeline")
    sim = simulate.write_particles(out / "sim", 500, n_objects=2, objects="conformations", snr=2.0, seed=1,
                                   box=BOX, shift_std_px=2.0, apix=8.0, defocus_um=(1.0, 2.5))
    tvae("preprocess", sim, "-o", out / "prep")
    prep = out / "prep" / "particles.star"
    tvae("train", prep, "-o", out / "run", *SMALL_MODEL)
    tvae("embed", out / "run", prep, "-o", out / "embedded.star", "--clusters", 2, "--device", "cpu")
    tvae("pose", out / "run", prep, "-o", out / "posed.star", "--device", "cpu")
    tvae("render", out / "run", "-o", out / "render", "--grid", 3, "--device", "cpu")
    return out, sim, prep


def test_default_recipe_finds_the_poses_and_the_classes(pipeline):
    out, _, _ = pipeline
    assert load_model(out / "run")[1].ctf == "full"  # --ctf auto: the STAR has defocus values
    scores = demo.truth_scores(out / "embedded.star", out / "posed.star")
    assert scores["rotation"] >= 0.85, scores
    assert min(scores["translation_x"], scores["translation_y"]) >= 0.9, scores
    assert scores["accuracy"] >= 0.9, scores
    posed = read_star(out / "posed.star")
    confidence = numeric_column(posed, particles_block(posed), CONFIDENCE_COLUMN)
    assert np.mean(confidence < CONFIDENT_MASS) < 0.1  # a trained model is sure of most poses


def test_every_output_exists_parses_and_keeps_the_input_columns(pipeline):
    out, _, prep = pipeline
    source = read_star(prep)
    block = particles_block(source)
    for name, added in (("embedded.star", ["tvaeZ01", "tvaeZ02", "tvaeZStd01", "tvaeCluster"]),
                        ("posed.star", ["rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "tvaePoseEntropy"])):
        written = read_star(out / name)
        rows = written[particles_block(written)]
        for column in source[block].columns:
            if column not in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
                assert rows[column].tolist() == source[block][column].tolist(), (name, column)
        assert set(added) <= set(rows.columns), name
        assert len(rows) == len(source[block])
    clusters = numeric_column(read_star(out / "embedded.star"), block, "tvaeCluster")
    assert sorted(set(clusters)) == [1, 2]
    for path in ("run/log.csv", "run/learning_curve.png", "embedded_latent.png", "posed_poses.png",
                 "render/montage.png"):
        assert (out / path).stat().st_size > 0, path
    assert read_mrc_header(out / "render" / "rendered.mrcs").shape[0] == 9


def test_written_poses_align_the_particles(pipeline):
    """RELION's alignment with the written psi/origin brings each particle into the model's frame: it then
    matches its object's canonical projection (seen through the particle's CTF and the same model) better than
    the raw particle."""
    out, sim, prep = pipeline
    particles = open_particles(prep)
    canonical = open_particles(simulate.canonical_star_path(sim))
    raw = open_particles(sim)
    index = np.arange(len(particles))
    images, noisy = particles.read(index), raw.read(index)
    clean = ctf.through_ctf(canonical.read(index), particles.ctf)
    # the canonical projections, scaled as preprocess scaled their noisy twins, posed by the model
    outside = background_mask(BOX)
    mean = noisy[:, outside].mean(1)[:, None, None]
    std = noisy[:, outside].std(1)[:, None, None]
    model, _ = load_model(out / "run")
    estimate = model.encode(torch.from_numpy((clean - mean) / std).float())
    apix = particle_pixel_sizes(read_star(prep), particles_block(read_star(prep)))
    psi0, x0, y0 = model_to_relion(estimate.theta.numpy(), estimate.t.numpy(), BOX, apix)
    posed = read_star(out / "posed.star")
    block = particles_block(posed)
    psi, x, y = (numeric_column(posed, block, c) for c in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"))
    better = 0
    for i in index:
        template = align_image(clean[i], psi0[i], x0[i], y0[i], apix[i])
        aligned = align_image(images[i], psi[i], x[i], y[i], apix[i])
        better += _correlation(aligned, template) > _correlation(images[i], clean[i])
    assert better > 0.6 * len(index), better


def _correlation(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
