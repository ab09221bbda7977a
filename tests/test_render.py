"""render: latents from arrays, files, cluster centres and grids, drawn with a tiny random generator."""

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
from tiny_run import BOX, save_run

from tvae_em import checkpoint, render
from tvae_em.errors import InputError, UsageError
from tvae_em.io.columns import z_columns
from tvae_em.io.stack import open_particles
from tvae_em.io.star import new_relion31_star, numeric_column, read_star, write_star


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = save_run(tmp_path_factory.mktemp("render") / "run")
    return run_dir, checkpoint.load_model(run_dir)[0]


def decode(model, z, theta_rad=0.0, t_model=(0.0, 0.0)):
    z = torch.as_tensor(np.asarray(z), dtype=torch.float32)
    theta = torch.full((len(z),), float(theta_rad))
    t = torch.as_tensor(t_model, dtype=torch.float32).expand(len(z), 2)
    return model.decode(z, theta, t).numpy()


def rendered(out_dir):
    """(images, STAR table) read back through the project's own readers."""
    particles = open_particles(out_dir / render.STAR_NAME)
    return particles.read(np.arange(len(particles))), particles


def latents_of(star, block="particles", names=("tvaeZ01", "tvaeZ02")):
    return np.column_stack([numeric_column(star, block, name) for name in names])


def test_given_latents_are_drawn_with_the_requested_pose(run, tmp_path):
    run_dir, model = run
    z = np.array([[0.0, 0.0], [1.0, -1.0], [-0.5, 2.0]])
    star_path = render.render(run_dir, tmp_path / "shifted", z=z, shift_px=(2, -1), apix=1.25, device="cpu")
    images, particles = rendered(tmp_path / "shifted")
    assert images.shape == (3, BOX, BOX) and particles.pixel_size == 1.25
    centred = decode(model, z)
    # object centre moved to x = +2 px, y = -1 px: shifted[row, col] = centred[row + 1, col - 2]
    np.testing.assert_allclose(images[:, :-1, 2:], centred[:, 1:, :-2], atol=1e-5)
    star = read_star(star_path)
    np.testing.assert_allclose(latents_of(star), z)
    np.testing.assert_allclose(numeric_column(star, "particles", "rlnOriginXAngst"), -2 * 1.25)
    np.testing.assert_allclose(numeric_column(star, "particles", "rlnOriginYAngst"), 1 * 1.25)
    assert matplotlib.image.imread(tmp_path / "shifted" / render.MONTAGE_NAME).ndim == 3

    render.render(run_dir, tmp_path / "turned", z=z, theta_deg=90, device="cpu")
    turned, particles = rendered(tmp_path / "turned")
    assert particles.pixel_size == 1.0
    # I(x) = F(R(90 deg) x) = F(-y, x): turned[row, col] = centred[col, BOX - row]
    rows, cols = np.mgrid[1:BOX, 0:BOX]
    np.testing.assert_allclose(turned[:, 1:, :], centred[:, cols, BOX - rows], atol=1e-4)
    np.testing.assert_allclose(numeric_column(read_star(tmp_path / "turned" / render.STAR_NAME), "particles",
                                              "rlnAnglePsi"), 90.0)


def test_grid_spans_the_prior_or_the_given_points(run, tmp_path):
    run_dir, model = run
    star_path = render.render(run_dir, tmp_path / "prior", grid=3, device="cpu")
    images, _ = rendered(tmp_path / "prior")
    z = latents_of(read_star(star_path))
    np.testing.assert_allclose(z[:, 0], np.tile([-2, 0, 2], 3))
    np.testing.assert_allclose(z[:, 1], np.repeat([2, 0, -2], 3))
    np.testing.assert_allclose(images, decode(model, z), atol=1e-6)

    points = np.random.default_rng(0).normal(size=(500, 2)) * [1.0, 3.0] + [5.0, 0.0]
    csv = tmp_path / "points.csv"
    pd.DataFrame(points, columns=["z1", "z2"]).to_csv(csv, index=False)
    z = latents_of(read_star(render.render(run_dir, tmp_path / "points", z_file=csv, grid=4, device="cpu")))
    low, high = np.percentile(points, render.GRID_PERCENTILES, axis=0)
    np.testing.assert_allclose([z[:, 0].min(), z[:, 0].max(), z[:, 1].min(), z[:, 1].max()],
                               [low[0], high[0], low[1], high[1]])
    assert len(z) == 16


def test_grid_of_a_3d_latent_space_spans_an_embedded_star_and_captions_its_panels(tmp_path, monkeypatch):
    run_dir = save_run(tmp_path / "run3", z_dim=3)
    model = checkpoint.load_model(run_dir)[0]
    drawn = []  # what the montage is drawn with
    montage = render.plots.montage_figure

    def spy(path, images, titles=None, columns=None, captions=None):
        drawn.append((images, columns, captions))
        montage(path, images, titles, columns, captions)

    monkeypatch.setattr(render.plots, "montage_figure", spy)
    z_prior = latents_of(read_star(render.render(run_dir, tmp_path / "prior", grid=2, device="cpu")),
                         names=z_columns(3))
    np.testing.assert_allclose(z_prior, [[-2, 2, 0], [2, 2, 0], [-2, -2, 0], [2, -2, 0]])

    points = np.random.default_rng(2).normal(size=(300, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -3.0]
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [1.7]})
    particles = pd.DataFrame({"rlnImageName": [f"{i}@p.mrcs" for i in range(1, 301)], "rlnOpticsGroup": 1,
                              **dict(zip(z_columns(3), points.T, strict=True))})
    write_star(tmp_path / "embedded.star", new_relion31_star(optics, particles))
    star = read_star(render.render(run_dir, tmp_path / "data", grid=3, z_file=tmp_path / "embedded.star",
                                   device="cpu"))
    z = latents_of(star, names=z_columns(3))
    low, high = np.percentile(points[:, :2], render.GRID_PERCENTILES, axis=0)
    np.testing.assert_allclose(z[:, 0], np.tile(np.linspace(low[0], high[0], 3), 3))
    np.testing.assert_allclose(z[:, 1], np.repeat(np.linspace(high[1], low[1], 3), 3))
    np.testing.assert_allclose(z[:, 2], np.median(points[:, 2]))
    images, particles = rendered(tmp_path / "data")
    np.testing.assert_allclose(images, decode(model, z), atol=1e-6)
    assert particles.pixel_size == 1.7
    drawn_images, columns, captions = drawn[-1]
    np.testing.assert_array_equal(drawn_images, images)
    assert columns == 3 and captions == [f"z ({a:.2f}, {b:.2f}, {c:.2f})" for a, b, c in z]


def test_captions_show_the_first_three_coordinates():
    assert render.latent_captions(np.array([[0.5, -1.234]])) == ["z (0.50, -1.23)"]
    assert render.latent_captions(np.array([[1.0, 2.0, 3.0, 4.0]])) == ["z (1.00, 2.00, 3.00, ...)"]


def test_cluster_centres_of_an_embedded_star(run, tmp_path):
    run_dir, model = run
    rng = np.random.default_rng(1)
    labels = np.array([2, 1, 2, 3, 1, 2])
    z = rng.normal(size=(6, 2)).astype(np.float32)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g"], "rlnImagePixelSize": [2.5]})
    particles = pd.DataFrame({"rlnImageName": [f"{i}@x.mrcs" for i in range(1, 7)], "rlnOpticsGroup": 1,
                              "tvaeZ01": z[:, 0], "tvaeZ02": z[:, 1], "tvaeCluster": labels})
    embedded = tmp_path / "embedded.star"
    write_star(embedded, new_relion31_star(optics, particles))
    star = read_star(render.render(run_dir, tmp_path / "centres", centers_from=embedded, device="cpu"))
    expected = np.stack([z[labels == k].mean(0) for k in (1, 2, 3)])
    np.testing.assert_allclose(latents_of(star), expected, rtol=1e-6)
    assert numeric_column(star, "particles", "tvaeCluster").tolist() == [1, 2, 3]
    images, particles = rendered(tmp_path / "centres")
    assert particles.pixel_size == 2.5
    np.testing.assert_allclose(images, decode(model, expected), atol=1e-6)


def test_latent_files_of_every_format_agree(tmp_path):
    z = np.array([[0.5, -1.0], [2.0, 3.25]])
    np.save(tmp_path / "z.npy", z)
    np.savez(tmp_path / "embedding.npz", z_mu=z, rows=np.arange(2))
    (tmp_path / "plain.csv").write_text("0.5,-1.0\n2.0,3.25\n")
    (tmp_path / "header.csv").write_text("z1, z2\n0.5, -1.0\n2.0, 3.25\n")
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [3.0]})
    write_star(tmp_path / "z.star", new_relion31_star(
        optics, pd.DataFrame({"rlnImageName": ["1@a.mrcs", "2@a.mrcs"], "rlnOpticsGroup": 1,
                              "tvaeZ01": z[:, 0], "tvaeZ02": z[:, 1]})))
    for name in ("z.npy", "embedding.npz", "plain.csv", "header.csv", "z.star"):
        np.testing.assert_array_equal(render.load_latents(tmp_path / name, 2).z, z, err_msg=name)
    assert render.load_latents(tmp_path / "z.star", 2).apix == 3.0
    with pytest.raises(InputError, match=r"shaped \(k, 3\)"):
        render.load_latents(tmp_path / "z.npy", 3)
    with pytest.raises(InputError, match="latent columns _tvaeZ01"):
        render.load_latents(tmp_path / "z.star", 3)
    (tmp_path / "bad.csv").write_text("0.5,1\n1,x\n")
    with pytest.raises(InputError, match="not a numeric CSV"):
        render.load_latents(tmp_path / "bad.csv", 2)
    (tmp_path / "z.json").write_text("[[0.5, -1.0]]")
    with pytest.raises(InputError, match="unknown latent file type"):
        render.load_latents(tmp_path / "z.json", 2)


def test_refuses_impossible_requests(run, tmp_path):
    run_dir, _ = run
    with pytest.raises(UsageError, match="nothing to render"):
        render.render(run_dir, tmp_path / "a", device="cpu")
    with pytest.raises(UsageError, match="at most one"):
        render.render(run_dir, tmp_path / "b", z=[[0, 0]], centers_from=tmp_path / "x.star", device="cpu")
    with pytest.raises(UsageError, match="needs at least 2 latent dimensions; this model has 1"):
        render.render(save_run(tmp_path / "run1", z_dim=1), tmp_path / "c", grid=3, device="cpu")
    assert not any((tmp_path / d).exists() for d in "abc")
