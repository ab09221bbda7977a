import gzip

import numpy as np
import pytest

from tvae_em import simulate
from tvae_em.errors import InputError, UsageError
from tvae_em.io import mnist

# ------------------------------------------------------------------------------------------ render_pose


def _point_image(box, x_px, y_px):
    image = np.zeros((box, box), dtype=np.float32)
    image[box // 2 + y_px, box // 2 + x_px] = 1.0
    return image


def test_render_pose_identity_and_whole_pixel_shift_are_exact():
    canonical = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    same = simulate.render_pose(canonical, [0.0], [[0.0, 0.0]])[0]
    np.testing.assert_array_equal(same, canonical)
    # t = (3 px, -2 px) in model units of a 16 px box: the object moves right 3 and up 2
    moved = simulate.render_pose(canonical, [0.0], [[3 / 8, -2 / 8]])[0]
    np.testing.assert_allclose(moved[2:14, 3:16], canonical[4:16, 0:13], atol=1e-6)
    assert np.all(moved[:, :3] == 0)


def test_render_pose_rotation_follows_the_project_convention():
    # I(x) = F(R(theta) x): a point of F at (5, 0) appears at R(-theta) (5, 0) = (0, -5) for theta = pi/2
    box = 20
    rotated = simulate.render_pose(_point_image(box, 5, 0), [np.pi / 2], [[0.0, 0.0]])[0]
    np.testing.assert_allclose(rotated, _point_image(box, 0, -5), atol=1e-6)
    # with a translation t the rotated point lands at R(-theta) (5, 0) + t
    posed = simulate.render_pose(_point_image(box, 5, 0), [np.pi / 2], [[2 / 10, 3 / 10]])[0]
    np.testing.assert_allclose(posed, _point_image(box, 2, -2), atol=1e-6)


def test_render_pose_accepts_one_canonical_per_pose_and_checks_shapes():
    canonical = np.stack([_point_image(12, 1, 0), _point_image(12, 0, 2)])
    out = simulate.render_pose(canonical, [0.0, 0.0], np.zeros((2, 2)))
    np.testing.assert_array_equal(out, canonical)
    with pytest.raises(ValueError):
        simulate.render_pose(canonical, [0.0, 0.0, 0.0], np.zeros((3, 2)))


# ---------------------------------------------------------------------------------------------- MNIST


@pytest.fixture(scope="module")
def mnist_t10k(mnist_dir):
    return mnist.load_mnist(mnist_dir)


def test_load_mnist_reads_the_test_digits(mnist_t10k):
    images, labels = mnist_t10k
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,)
    assert sorted(np.unique(labels)) == list(range(10))
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first t10k labels


def _write_idx(path, array, compress):
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


def _fake_mnist(directory, subset, n, compress, first_label=0):
    images = np.random.default_rng(n).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) + first_label) % 10
    image_name, label_name = mnist.MNIST_FILES[subset]
    suffix = ".gz" if compress else ""
    _write_idx(directory / f"{image_name}{suffix}", images, compress)
    _write_idx(directory / f"{label_name}{suffix}", labels, compress)
    return images, labels


def test_load_mnist_reads_plain_idx_files(tmp_path):
    images, labels = _fake_mnist(tmp_path, "t10k", 7, compress=False)
    got_images, got_labels = mnist.load_mnist(tmp_path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_load_mnist_reports_missing_and_corrupt_files(tmp_path):
    with pytest.raises(InputError, match="t10k-images-idx3-ubyte"):
        mnist.load_mnist(tmp_path)
    _fake_mnist(tmp_path, "t10k", 7, compress=True)
    image_file = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(image_file, "rb") as f:
        raw = f.read()
    with gzip.open(image_file, "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(InputError, match="truncated"):
        mnist.load_mnist(tmp_path)
    image_file.write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match="t10k-images"):
        mnist.load_mnist(tmp_path)


def test_mnist_split_uses_held_out_test_digits_when_only_t10k_exists(tmp_path):
    images, labels = _fake_mnist(tmp_path, "t10k", 30, compress=True)
    train_images, train_labels = mnist.mnist_split(tmp_path, "train", n_holdout=10)
    test_images, test_labels = mnist.mnist_split(tmp_path, "test", n_holdout=10)
    np.testing.assert_array_equal(train_images, images[:20])
    np.testing.assert_array_equal(test_labels, labels[20:])
    with pytest.raises(UsageError):
        mnist.mnist_split(tmp_path, "test", n_holdout=30)


def test_mnist_split_uses_the_papers_split_when_the_training_file_exists(tmp_path):
    train_images, _ = _fake_mnist(tmp_path, "train", 12, compress=True)
    t10k_images, _ = _fake_mnist(tmp_path, "t10k", 5, compress=False, first_label=3)
    np.testing.assert_array_equal(mnist.mnist_split(tmp_path, "train")[0], train_images)
    np.testing.assert_array_equal(mnist.mnist_split(tmp_path, "test")[0], t10k_images)


@pytest.mark.parametrize("variant", ["N", "U"])
def test_mnist_variant_truth_reproduces_the_images(mnist_t10k, variant):
    images, labels = mnist_t10k
    data = simulate.make_mnist_variant(images[:50], labels[:50], variant, seed=1)
    assert data["images"].shape == data["canonical"].shape == (50, 50, 50)
    assert data["images"].dtype == np.float32
    assert data["images"].min() >= 0 and data["images"].max() <= 1
    # canonical = the digit, centred (its pixel 14 on canvas pixel 25) and unrotated
    np.testing.assert_allclose(data["canonical"][:, 11:39, 11:39] * 255, images[:50], atol=1e-3)
    assert data["canonical"].sum() == pytest.approx(data["canonical"][:, 11:39, 11:39].sum())
    rendered = simulate.render_pose(data["canonical"], data["theta"], data["t_model"])
    np.testing.assert_allclose(rendered, data["images"], atol=1e-6)
    np.testing.assert_array_equal(data["labels"], labels[:50])


def test_mnist_variants_have_the_papers_distributions(mnist_t10k):
    images, labels = mnist_t10k
    n = 2000
    normal = simulate.make_mnist_variant(images[:n], labels[:n], "N", seed=2)
    uniform = simulate.make_mnist_variant(images[:n], labels[:n], "U", seed=3)
    for data in (normal, uniform):
        shift_px = data["t_model"] * 25
        assert np.abs(shift_px.mean(axis=0)).max() < 0.4  # standard error 5 / sqrt(2000) = 0.11
        assert shift_px.std(axis=0) == pytest.approx([5.0, 5.0], rel=0.06)
    assert normal["theta"].std() == pytest.approx(np.pi / 4, rel=0.06)
    assert abs(normal["theta"].mean()) < 0.06
    assert uniform["theta"].min() >= 0 and uniform["theta"].max() < 2 * np.pi
    assert np.histogram(uniform["theta"], bins=4, range=(0, 2 * np.pi))[0] == pytest.approx([500] * 4, abs=80)


def test_mnist_variant_is_deterministic_with_a_seed(mnist_t10k):
    images, labels = mnist_t10k
    first = simulate.make_mnist_variant(images[:20], labels[:20], "U", seed=5)
    again = simulate.make_mnist_variant(images[:20], labels[:20], "U", seed=5)
    other = simulate.make_mnist_variant(images[:20], labels[:20], "U", seed=6)
    np.testing.assert_array_equal(first["images"], again["images"])
    np.testing.assert_array_equal(first["theta"], again["theta"])
    assert not np.allclose(first["theta"], other["theta"])


def test_mnist_variant_rejects_bad_requests(mnist_t10k):
    images, labels = mnist_t10k
    with pytest.raises(UsageError):
        simulate.make_mnist_variant(images[:2], labels[:2], "X")
    with pytest.raises(UsageError):
        simulate.make_mnist_variant(images[:2], labels[:2], "N", size=20)


# --------------------------------------------------------------------------------------------- shapes


def _relative_difference(a, b):
    return np.abs(a - b).sum() / np.abs(a).sum()


def test_shapes_have_no_two_fold_symmetry_and_are_centred():
    templates = simulate.shape_templates(40)
    assert templates.shape == (len(simulate.SHAPE_NAMES), 40, 40)
    x_px, y_px = simulate.pixel_grid_px(40)
    for template in templates:
        half_turn = simulate.render_pose(template, [np.pi], [[0.0, 0.0]])[0]
        assert _relative_difference(template, half_turn) > 0.5
        centre = (np.sum(template * x_px) / template.sum(), np.sum(template * y_px) / template.sum())
        assert np.abs(centre).max() < 0.15


def test_shapes_differ_from_each_other_at_every_rotation():
    templates = simulate.shape_templates(40)
    angles = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    for i, template in enumerate(templates):
        turned = simulate.render_pose(template, angles, np.zeros((72, 2)))
        for j, other in enumerate(templates):
            if i != j:
                assert min(_relative_difference(other, image) for image in turned) > 0.3


def test_make_shapes_truth_reproduces_images_and_is_deterministic():
    data = simulate.make_shapes(60, size=40, seed=4)
    rendered = simulate.render_pose(data["canonical"], data["theta"], data["t_model"])
    np.testing.assert_allclose(rendered, data["images"], atol=1e-6)
    np.testing.assert_array_equal(data["canonical"], simulate.shape_templates(40)[data["labels"]])
    assert set(data["labels"].tolist()) == set(range(len(simulate.SHAPE_NAMES)))
    again = simulate.make_shapes(60, size=40, seed=4)
    np.testing.assert_array_equal(data["images"], again["images"])


# ------------------------------------------------------------------------------------------ particles


def test_particles_truth_reproduces_clean_images_and_noise_has_the_stated_snr():
    data = simulate.simulate_particles(300, box=32, snr=0.5, seed=7)
    assert data["images"].shape == data["canonical"].shape == (300, 32, 32)
    rendered = simulate.render_pose(data["canonical"], data["theta"], data["t_model"])
    np.testing.assert_allclose(rendered, data["clean"], atol=1e-6)
    noise = data["images"] - data["clean"]
    assert data["clean"].var(axis=(1, 2)).mean() / noise.var() == pytest.approx(0.5, rel=0.03)
    assert set(data["labels"].tolist()) == {0, 1, 2}
    assert np.abs(data["tilt_deg"]).max() <= 30


def test_particle_objects_are_distinct_and_asymmetric():
    box = 48
    views = [simulate.project_object(blobs, 0.0, box) for blobs in simulate.PARTICLE_OBJECTS]
    angles = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    for i, view in enumerate(views):
        turned = simulate.render_pose(view, angles, np.zeros((72, 2)))
        assert _relative_difference(view, turned[36]) > 0.3  # no 2-fold axis
        for j, other in enumerate(views):
            if i != j:
                assert min(_relative_difference(other, image) for image in turned) > 0.3


def test_particle_projection_changes_with_tilt_but_stays_centred():
    x_px, y_px = simulate.pixel_grid_px(64)
    for blobs in simulate.PARTICLE_OBJECTS:
        flat = simulate.project_object(blobs, 0.0, 64)
        tilted = simulate.project_object(blobs, np.deg2rad(30), 64)
        assert _relative_difference(flat, tilted) > 0.1
        centre = (np.sum(tilted * x_px) / tilted.sum(), np.sum(tilted * y_px) / tilted.sum())
        assert np.abs(centre).max() < 0.05


def test_particles_are_deterministic_with_a_seed_and_reject_bad_requests():
    first = simulate.simulate_particles(10, box=24, seed=3)
    again = simulate.simulate_particles(10, box=24, seed=3)
    np.testing.assert_array_equal(first["images"], again["images"])
    with pytest.raises(UsageError):
        simulate.simulate_particles(10, n_objects=4)
    with pytest.raises(UsageError):
        simulate.simulate_particles(10, snr=0)


# -------------------------------------------------------------------------------------------- writing


def _read_back(star_path):
    from tvae_em.io.stack import open_particles
    from tvae_em.io.star import numeric_column

    with open_particles(star_path) as particles:
        images = particles.read(np.arange(len(particles)))
        columns = {
            label: numeric_column(particles.table, particles.block, label)
            for label in ("tvaeTruePsi", "tvaeTrueOriginXAngst", "tvaeTrueOriginYAngst", "tvaeTrueClass")
        }
        return images, columns, particles


def test_written_mnist_variant_reads_back_with_its_truth(tmp_path, mnist_dir):
    star = simulate.write_mnist_variant(mnist_dir, tmp_path, "U", n=12, seed=3, split="test", n_holdout=100)
    assert star == tmp_path / "mnist_U_test.star"
    images, truth, particles = _read_back(star)
    assert particles.box == 50 and particles.pixel_size == 1.0
    test_images, test_labels = mnist.load_mnist(mnist_dir)
    expected = simulate.make_mnist_variant(test_images[-100:][:12], test_labels[-100:][:12], "U", seed=[3, 1])
    np.testing.assert_allclose(images, expected["images"], atol=1e-6)
    np.testing.assert_array_equal(truth["tvaeTrueClass"], test_labels[-100:][:12])
    # RELION convention: psi = theta in degrees (wrapped), origin = -t * N/2 * apix
    np.testing.assert_allclose(np.deg2rad(truth["tvaeTruePsi"]) % (2 * np.pi), expected["theta"], atol=1e-9)
    np.testing.assert_allclose(truth["tvaeTrueOriginXAngst"], -expected["t_model"][:, 0] * 25, atol=1e-9)
    np.testing.assert_allclose(truth["tvaeTrueOriginYAngst"], -expected["t_model"][:, 1] * 25, atol=1e-9)

    canonical_images, canonical_truth, _ = _read_back(simulate.canonical_star_path(star))
    np.testing.assert_allclose(canonical_images, expected["canonical"], atol=1e-7)
    assert not np.any(canonical_truth["tvaeTruePsi"]) and not np.any(canonical_truth["tvaeTrueOriginXAngst"])
    np.testing.assert_array_equal(canonical_truth["tvaeTrueClass"], truth["tvaeTrueClass"])


def test_written_truth_recentres_the_particles_the_relion_way(tmp_path):
    from tvae_em.poses import align_image

    star = simulate.write_particles(tmp_path, 6, box=48, snr=1.0, seed=2, apix=1.5)
    images, truth, particles = _read_back(star)
    optics = particles.table["optics"].iloc[0]
    labels = ("rlnImagePixelSize", "rlnImageSize", "rlnVoltage", "rlnSphericalAberration",
              "rlnAmplitudeContrast")
    assert [float(optics[label]) for label in labels] == [1.5, 48, 300, 2.7, 0.1]
    assert "tvaeTrueTilt" in particles.table["particles"].columns
    canonical, _, _ = _read_back(simulate.canonical_star_path(star))
    clean = simulate.simulate_particles(6, box=48, snr=1.0, seed=2, apix=1.5)["clean"]
    psi = truth["tvaeTruePsi"]
    origin_x, origin_y = truth["tvaeTrueOriginXAngst"], truth["tvaeTrueOriginYAngst"]
    for i in range(6):
        # two bilinear resamplings blur a little (~4 %); a wrong sign of psi or origin costs ~50-150 %
        aligned = align_image(clean[i], psi[i], origin_x[i], origin_y[i], 1.5)
        assert _relative_difference(canonical[i], aligned) < 0.08
        wrong_psi = align_image(clean[i], -psi[i], origin_x[i], origin_y[i], 1.5)
        wrong_origin = align_image(clean[i], psi[i], -origin_x[i], -origin_y[i], 1.5)
        assert min(_relative_difference(canonical[i], wrong) for wrong in (wrong_psi, wrong_origin)) > 0.3
    assert np.abs(images - clean).std() > 0.05  # the stored particles carry the noise


def test_writers_reject_bad_counts(tmp_path, mnist_dir):
    with pytest.raises(UsageError):
        simulate.write_mnist_variant(mnist_dir, tmp_path, "N", n=20_000)
    with pytest.raises(UsageError):
        simulate.write_particles(tmp_path, 0)
    assert not list(tmp_path.iterdir())
