import numpy as np
import pytest

from tvae_em.poses import align_image, apply_pose, model_to_relion, relion_to_model, wrap_degrees

BOX = 64


def blob(box, col, row, sigma=2.5):
    rows, cols = np.mgrid[:box, :box]
    return np.exp(-((cols - col) ** 2 + (rows - row) ** 2) / (2 * sigma**2))


def canonical_object(box=BOX):
    """An asymmetric, smooth object centred on the RELION centre (a big blob, two unequal arms)."""
    c = box // 2
    return (blob(box, c, c, 5.0) + 0.8 * blob(box, c + 9, c) + 0.5 * blob(box, c, c - 12)
            + 0.3 * blob(box, c - 6, c + 5)).astype(np.float32)


def correlation_inside(a, b, radius):
    offsets = np.arange(a.shape[0]) - a.shape[0] // 2
    inside = np.hypot(offsets[:, None], offsets[None, :]) < radius
    return np.corrcoef(a[inside], b[inside])[0, 1]


@pytest.mark.parametrize("theta_deg, t_model", [(0.0, (0.0, 0.0)), (37.0, (0.1, -0.15)),
                                                (-120.0, (-0.2, 0.05)), (179.0, (0.0, 0.2))])
def test_relion_alignment_undoes_the_forward_model(theta_deg, t_model):
    canonical = canonical_object()
    theta = np.radians(theta_deg)
    image = apply_pose(canonical, theta, np.array(t_model))
    psi, origin_x, origin_y = model_to_relion(np.array([theta]), np.array([t_model]), BOX, 1.7)
    aligned = align_image(image, psi[0], origin_x[0], origin_y[0], 1.7)
    assert correlation_inside(aligned, canonical, BOX / 2 - 10) > 0.99
    if 10 < abs(theta_deg) < 170:  # the opposite rotation sense does not align: the test can fail
        wrong = align_image(image, -psi[0], origin_x[0], origin_y[0], 1.7)
        assert correlation_inside(wrong, canonical, BOX / 2 - 10) < 0.9


def test_particle_centre_is_box_centre_minus_origin():
    apix = 2.0
    image = apply_pose(blob(BOX, BOX // 2, BOX // 2), 0.7, np.array([0.25, -0.125]))
    _, origin_x, origin_y = model_to_relion(np.array([0.7]), np.array([[0.25, -0.125]]), BOX, apix)
    row, col = np.unravel_index(np.argmax(image), image.shape)
    assert (col, row) == (BOX // 2 - origin_x[0] / apix, BOX // 2 - origin_y[0] / apix) == (40, 28)


def test_rotation_sense_object_appears_rotated_by_minus_theta():
    # I(x) = F(R(theta) x): a feature at x = (+10, 0) px shows up at R(-90 deg)(10, 0) = (0, -10) px.
    feature = blob(BOX, BOX // 2 + 10, BOX // 2, 1.5)
    image = apply_pose(feature, np.pi / 2, np.zeros(2))
    row, col = np.unravel_index(np.argmax(image), image.shape)
    assert (col - BOX // 2, row - BOX // 2) == (0, -10)


def test_poses_round_trip_through_relion():
    rng = np.random.default_rng(0)
    theta = rng.uniform(-np.pi, np.pi, 50)
    t_model = rng.uniform(-0.5, 0.5, (50, 2))
    apix = rng.uniform(0.8, 3.0, 50)
    psi, origin_x, origin_y = model_to_relion(theta, t_model, 128, apix)
    np.testing.assert_allclose(psi, np.degrees(theta), atol=1e-9)
    np.testing.assert_allclose(origin_x, -t_model[:, 0] * 64 * apix)
    theta_back, t_back = relion_to_model(psi, origin_x, origin_y, 128, apix)
    np.testing.assert_allclose(theta_back, theta, atol=1e-12)
    np.testing.assert_allclose(t_back, t_model, atol=1e-12)


def test_angles_wrap_to_relion_range():
    np.testing.assert_allclose(wrap_degrees([180.0, -180.0, 540.0, 190.0, -190.0, 0.0]),
                               [180.0, 180.0, 180.0, -170.0, 170.0, 0.0])
    theta_back, _ = relion_to_model([270.0], [0.0], [0.0], 64, 1.0)
    np.testing.assert_allclose(theta_back, [-np.pi / 2])


def test_apply_pose_on_a_stack_matches_single_images():
    canonical = np.stack([canonical_object(), canonical_object()[::-1]])
    theta, t_model = np.array([0.3, -1.2]), np.array([[0.1, 0.0], [-0.05, 0.2]])
    stacked = apply_pose(canonical, theta, t_model)
    for i in range(2):
        np.testing.assert_array_equal(stacked[i], apply_pose(canonical[i], theta[i], t_model[i]))
