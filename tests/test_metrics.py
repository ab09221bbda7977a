import numpy as np
import pytest

from tvae_em.clustering import cluster
from tvae_em.errors import UsageError
from tvae_em.metrics import (
    circular_correlation,
    circular_mean,
    clustering_accuracy,
    nmi,
    pearson,
    pose_scores_per_object,
    relative_pose,
    rotation_correlation,
    translation_correlation,
)


def test_circular_mean_handles_wraparound():
    assert circular_mean([np.deg2rad(350), np.deg2rad(10)]) == pytest.approx(0.0, abs=1e-12)


def test_circular_correlation_of_offset_angles_is_one_even_when_wrapped():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 2 * np.pi, 500)
    b = np.mod(a + 2.0, 2 * np.pi)  # constant offset, wrapped into [0, 2 pi)
    assert circular_correlation(a, b) == pytest.approx(1.0, abs=1e-12)
    assert circular_correlation(a, -a + 0.3) == pytest.approx(-1.0, abs=1e-12)


def test_circular_correlation_of_independent_angles_is_near_zero():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 2 * np.pi, 20_000)
    b = rng.uniform(0, 2 * np.pi, 20_000)
    assert abs(circular_correlation(a, b)) < 0.05


def test_circular_correlation_hand_computed():
    # a = (0, pi/2, pi): sum sin 1, sum cos 0 -> mean pi/2, sin(a - mean) = (-1, 0, 1), sum of squares 2.
    # b = (0, pi/2, pi/2): sum sin 2, sum cos 1 -> mean m with sin m = 2/sqrt5, cos m = 1/sqrt5,
    # sin(b - m) = (-2, 1, 1)/sqrt5, sum of squares 6/5. r = (3/sqrt5) / sqrt(2 * 6/5) = sqrt(3)/2.
    a = np.array([0.0, np.pi / 2, np.pi])
    b = np.array([0.0, np.pi / 2, np.pi / 2])
    assert circular_correlation(a, b) == pytest.approx(np.sqrt(3) / 2, abs=1e-12)


def test_rotation_correlation_removes_the_models_own_reference_angle():
    rng = np.random.default_rng(2)
    true = rng.uniform(0, 2 * np.pi, 300)
    reference = rng.uniform(0, 2 * np.pi, 300)  # arbitrary per-object orientation chosen by the model
    pred_transformed = reference + true + rng.normal(0, 0.05, 300)
    assert rotation_correlation(true, pred_transformed, reference) > 0.99
    assert abs(circular_correlation(true, pred_transformed)) < 0.2


def test_pearson_hand_computed():
    # deviations (-1, 0, 1) and (-1, 1, 0): sum of products 1, norms sqrt(2) each -> 0.5
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)


def test_translation_correlation_per_axis():
    true = np.array([[1.0, 1.0], [2.0, 3.0], [3.0, 2.0]])
    pred = np.array([[1.0, 1.0], [3.0, 2.0], [2.0, 3.0]])
    r_x, r_y = translation_correlation(true, pred)
    assert r_x == pytest.approx(0.5)
    assert r_y == pytest.approx(0.5)
    r_x, r_y = translation_correlation(true, np.column_stack([2 * true[:, 0] + 1, -true[:, 1]]))
    assert (r_x, r_y) == pytest.approx((1.0, -1.0))
    with pytest.raises(ValueError):
        translation_correlation(true, pred[:2])


def test_permuted_clustering_has_accuracy_and_nmi_one():
    labels = np.repeat(np.arange(4), 5)
    permuted = np.array([2, 0, 3, 1])[labels] + 10
    assert clustering_accuracy(labels, permuted) == pytest.approx(1.0)
    assert nmi(labels, permuted) == pytest.approx(1.0)


def test_clustering_accuracy_hand_computed():
    # class x cluster table: class 0 -> {cluster 1: 2, cluster 0: 1}; class 1 -> {cluster 0: 2};
    # class 2 -> {cluster 2: 1}. Best one-to-one map 0->1, 1->0, 2->2 gets 5 of 6.
    true = [0, 0, 0, 1, 1, 2]
    pred = [1, 1, 0, 0, 0, 2]
    assert clustering_accuracy(true, pred) == pytest.approx(5 / 6)


def test_clustering_accuracy_with_fewer_or_more_clusters_than_classes():
    true = ["a", "a", "b", "b", "c", "c"]
    assert clustering_accuracy(true, [0, 0, 0, 0, 1, 1]) == pytest.approx(4 / 6)  # 'b' has no cluster
    assert clustering_accuracy(true, [0, 1, 2, 2, 3, 3]) == pytest.approx(5 / 6)  # one cluster unmatched


def test_nmi_of_independent_labels_is_small():
    rng = np.random.default_rng(3)
    assert nmi(rng.integers(0, 3, 3000), rng.integers(0, 3, 3000)) < 0.01


@pytest.mark.parametrize("method", ["ward", "kmeans"])
def test_cluster_recovers_separated_groups(method):
    rng = np.random.default_rng(4)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = np.repeat(np.arange(3), 40)
    z = centres[labels] + rng.normal(0, 0.5, (120, 2))
    found = cluster(z, 3, method=method, seed=0)
    assert found.shape == (120,)
    assert clustering_accuracy(labels, found) == pytest.approx(1.0)


def test_cluster_kmeans_is_deterministic_with_seed():
    z = np.random.default_rng(5).normal(size=(200, 3))
    np.testing.assert_array_equal(cluster(z, 4, "kmeans", seed=7), cluster(z, 4, "kmeans", seed=7))


def test_cluster_refuses_bad_requests(monkeypatch):
    z = np.zeros((10, 2))
    with pytest.raises(UsageError):
        cluster(z, 3, method="spectral")
    with pytest.raises(UsageError):
        cluster(z, 11)
    monkeypatch.setattr("tvae_em.clustering.WARD_MAX_POINTS", 5)
    with pytest.raises(UsageError, match="k-means"):
        cluster(z, 2, method="ward")


def test_relative_pose_recovers_the_applied_transform_despite_a_template_offset():
    """A model whose template is offset and turned predicts (theta0 + theta*, t* + R(-theta*) t0)."""
    rng = np.random.default_rng(3)
    n = 50
    theta_true, t_true = rng.uniform(0, 2 * np.pi, n), rng.normal(0, 0.2, (n, 2))
    theta0, t0 = np.full(n, 0.9), np.tile([0.15, -0.1], (n, 1))
    c, s = np.cos(-theta_true), np.sin(-theta_true)
    t_pred = t_true + np.stack([c * t0[:, 0] - s * t0[:, 1], s * t0[:, 0] + c * t0[:, 1]], 1)
    theta_rel, t_rel = relative_pose(theta0 + theta_true, t_pred, theta0, t0)
    np.testing.assert_allclose(np.mod(theta_rel - theta_true, 2 * np.pi), 0, atol=1e-12)
    np.testing.assert_allclose(t_rel, t_true, atol=1e-12)
    assert translation_correlation(t_true, t_pred)[0] < 0.95  # the raw translation is confounded


def test_pose_scores_per_object_remove_each_objects_template_frame():
    rng = np.random.default_rng(4)
    n = 400
    labels = rng.integers(0, 2, n)
    theta_true, t_true = rng.uniform(0, 2 * np.pi, n), rng.normal(0, 0.2, (n, 2))
    theta0 = np.where(labels == 0, 0.5, 2.0)
    t0 = np.where(labels[:, None] == 0, [0.1, 0.0], [-0.05, 0.2])
    c, s = np.cos(-theta_true), np.sin(-theta_true)
    t_pred = t_true + np.stack([c * t0[:, 0] - s * t0[:, 1], s * t0[:, 0] + c * t0[:, 1]], 1)
    t_pred += rng.normal(0, 0.01, (n, 2))
    rotation, (r_x, r_y) = pose_scores_per_object(theta_true, t_true, theta_true + theta0, t_pred, labels)
    assert rotation == pytest.approx(1.0, abs=1e-9)
    assert r_x > 0.99 and r_y > 0.99
    assert circular_correlation(theta_true, theta_true + theta0) < 0.9  # raw scores are confounded
