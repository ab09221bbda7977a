"""tvae-em averages: class averages of simulated particles aligned by their true poses, with and without a CTF."""

import shutil

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from test_subset import run

from tvae_em import averages
from tvae_em.ctf import through_ctf
from tvae_em.io.columns import RELION_POSE, TVAE_POSE
from tvae_em.io.stack import ArrayParticles, open_particles
from tvae_em.io.star import numeric_column, read_star, write_star
from tvae_em.poses import model_to_relion
from tvae_em.simulate import render_pose, simulate_particles, write_simulated

BOX, APIX, N = 32, 2.0, 240
TRUE_POSE = ("tvaeTruePsi", "tvaeTrueOriginXAngst", "tvaeTrueOriginYAngst")


def simulated(folder, **options):
    """Two objects seen face-on (no tilt, so each class has one canonical image), posed and noisy; written as
    <folder>/particles.star with the truth columns."""
    data = simulate_particles(N, box=BOX, n_objects=2, snr=1.0, seed=3, apix=APIX, max_tilt_deg=0.0,
                              shift_std_px=2.0, **options)
    folder.mkdir(parents=True, exist_ok=True)
    return data, write_simulated(folder, "particles", data, APIX)


def posed_star(sim_star, name, pose_labels=RELION_POSE, class_label="rlnClassNumber", extra=None):
    """The simulated STAR with its true poses in ``pose_labels`` and its true classes (1-based) in
    ``class_label``, as 'embed --clusters' and 'pose' would write them for a perfect model; written beside it as
    ``name``."""
    star = read_star(sim_star)
    table = star["particles"]
    columns = {label: table[truth] for label, truth in zip(pose_labels, TRUE_POSE, strict=True)}
    if class_label:
        columns[class_label] = numeric_column(star, "particles", "tvaeTrueClass").astype(int) + 1
    path = sim_star.with_name(name)
    write_star(path, star, pd.DataFrame({**columns, **(extra or {})}))
    return path



def correlation(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def read_averages(out_dir):
    """The written averages, read back through their STAR as RELION would: (table, images (K, N, N))."""
    particles = open_particles(out_dir / "averages.star")
    return particles.table["particles"], particles.read(np.arange(len(particles)))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("averages")
    data, sim_star = simulated(folder)
    return {"folder": folder, "data": data, "sim_star": sim_star,
            "posed": posed_star(sim_star, "posed.star")}


def test_class_averages_match_the_canonical_projections(plain, tmp_path, capsys):
    code, lines = run(["averages", str(plain["posed"]), "-o", str(tmp_path / "out")], capsys)
    assert code == 0, lines
    assert any("averaged 240 particles in 2 classes of _rlnClassNumber" in line for line in lines)
    table, images = read_averages(tmp_path / "out")
    data = plain["data"]
    counts = np.bincount(data["labels"], minlength=2)
    assert table["rlnClassNumber"].tolist() == ["1", "2"]
    assert table["tvaeParticleCount"].astype(int).tolist() == counts.tolist()
    np.testing.assert_allclose(table["rlnClassDistribution"].astype(float), counts / N)
    assert table["rlnImageName"].str.endswith("@" + str(tmp_path / "out" / "averages.mrcs")).all()
    assert read_star(tmp_path / "out" / "averages.star")["optics"]["rlnImagePixelSize"].tolist() == [str(APIX)]
    assert matplotlib.image.imread(tmp_path / "out" / "averages.png").ndim == 3
    for k in (0, 1):
        canonical = data["canonical"][data["labels"] == k][0]
        other = data["canonical"][data["labels"] == 1 - k][0]
        unaligned = data["images"][data["labels"] == k].mean(0)
        aligned = correlation(images[k], canonical)
        assert aligned > 0.95
        assert aligned > correlation(unaligned, canonical) + 0.2
        assert aligned > correlation(images[k], other) + 0.1


def test_the_in_plane_pose_beside_a_refinement_is_used_and_any_class_column_chosen(plain, tmp_path, capsys):
    """_tvaeAnglePsi.. win over a 3-D refinement's rlnAnglePsi (here nonsense); --class-column picks the column."""
    rng = np.random.default_rng(0)
    star = posed_star(plain["sim_star"], "refined.star", pose_labels=TVAE_POSE, class_label="tvaeMyClass",
                      extra={"rlnAngleRot": rng.uniform(-180, 180, N), "rlnAngleTilt": rng.uniform(0, 180, N),
                             "rlnAnglePsi": rng.uniform(-180, 180, N)})
    code, lines = run(["averages", str(star), "-o", str(tmp_path / "out")], capsys)
    assert code == 3 and lines == [f"error: {star}: data_particles has no _rlnClassNumber or _tvaeCluster column "
                                   "(classes: cluster the particles with 'tvae-em embed --clusters K' first)"]
    code, lines = run(["averages", str(star), "-o", str(tmp_path / "out"), "--class-column", "_tvaeMyClass"], capsys)
    assert code == 0, lines
    assert any("of _tvaeMyClass, aligned by _tvaeAnglePsi" in line for line in lines)
    _, images = read_averages(tmp_path / "out")
    data = plain["data"]
    for k in (0, 1):
        assert correlation(images[k], data["canonical"][data["labels"] == k][0]) > 0.95


def test_without_poses_or_classes_one_line_names_the_file_and_the_column(plain, tmp_path, capsys):
    unposed = posed_star(plain["sim_star"], "unposed.star", pose_labels=("a", "b", "c"))
    code, lines = run(["averages", str(unposed), "-o", str(tmp_path / "out")], capsys)
    assert code == 3 and lines == [f"error: {unposed}: data_particles has no _rlnAnglePsi column (in-plane poses: "
                                   "run 'tvae-em pose' first)"]
    code, lines = run(["averages", str(plain["posed"]), "-o", str(tmp_path / "out"), "--class-column", "rlnGroup"],
                      capsys)
    assert code == 3 and lines == [f"error: {plain['posed']}: data_particles has no _rlnGroup column"]
    assert not (tmp_path / "out").exists()
    # an output that is the input is refused before anything is read
    (tmp_path / "same").mkdir()
    shutil.copy(plain["posed"], tmp_path / "same" / "averages.star")
    code, lines = run(["averages", str(tmp_path / "same" / "averages.star"), "-o", str(tmp_path / "same")], capsys)
    assert code == 2 and "is also an input" in lines[0]


def test_the_wiener_average_undoes_the_ctf_better_than_the_aligned_mean(tmp_path, capsys):
    data, sim_star = simulated(tmp_path / "sim", defocus_um=(1.0, 2.5), astigmatism_angst=2000.0)
    posed = posed_star(sim_star, "posed.star")
    assert run(["averages", str(posed), "-o", str(tmp_path / "wiener")], capsys)[0] == 0
    assert run(["averages", str(posed), "-o", str(tmp_path / "plain"), "--ctf", "none"], capsys)[0] == 0
    _, wiener = read_averages(tmp_path / "wiener")
    _, plain_mean = read_averages(tmp_path / "plain")
    for k in (0, 1):
        canonical = data["canonical"][data["labels"] == k][0]
        assert correlation(wiener[k], canonical) > 0.9
        assert correlation(wiener[k], canonical) > correlation(plain_mean[k], canonical) + 0.1


def test_the_ctf_turns_with_the_aligned_image(monkeypatch):
    """Particles of one micrograph (one strongly astigmatic CTF, fixed in the micrograph) at every in-plane angle:
    the Wiener average recovers the object only if each CTF is turned with its aligned image."""
    rng = np.random.default_rng(1)
    canonical = simulate_particles(1, box=BOX, n_objects=1, seed=0, apix=APIX, max_tilt_deg=0.0)["canonical"][0]
    n = 60
    theta, t_model = rng.uniform(0, 2 * np.pi, n), rng.normal(0, 1.5, (n, 2)) / (BOX / 2)
    params = np.tile([20000.0, 14000.0, 30.0, 300.0, 2.7, 0.1, 0.0, 0.0, 1.0, APIX], (n, 1))
    images = through_ctf(render_pose(canonical, theta, t_model), params)
    psi, origin_x, origin_y = model_to_relion(theta, t_model, BOX, APIX)
    origins = np.column_stack([origin_x, origin_y])

    def average():
        result = averages.average_classes(ArrayParticles(images), np.ones(n), psi, origins, APIX, params,
                                          wiener_constant=0.01, batch_size=16)
        return correlation(result.images[0], canonical)

    turned = average()
    monkeypatch.setattr(averages, "in_aligned_frame", lambda params, psi_deg: params)
    assert turned > 0.95
    assert turned > average() + 0.05
