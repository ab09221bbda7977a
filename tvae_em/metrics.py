"""Evaluation metrics of the paper's experiments (sections 4.2 and 4.3).

Pose inference is scored with the circular correlation of Jammalamadaka & Sengupta (paper ref. [31]) for
rotations and the Pearson correlation for translations; semantic representations are scored by clustering
z (``tvae_em.clustering``: Ward agglomerative clustering, ref. [32]) and matching clusters to known classes
one-to-one.
"""

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import normalized_mutual_info_score

from tvae_em.poses import rotate, rotation_matrix


def circular_mean(angle_rad):
    """Direction of the mean resultant vector, the circular analogue of the arithmetic mean."""
    angle_rad = np.asarray(angle_rad, dtype=np.float64)
    return np.arctan2(np.sin(angle_rad).sum(), np.cos(angle_rad).sum())


def circular_correlation(a_rad, b_rad):
    """Jammalamadaka-Sengupta circular correlation coefficient of two paired samples of angles.

    r = sum sin(a - mean_a) sin(b - mean_b) / sqrt(sum sin^2(a - mean_a) * sum sin^2(b - mean_b)),
    with circular means. It is 1 when b = a + constant (mod 2 pi), -1 when b = -a + constant, and is
    unaffected by wrapping either sample. NaN when either sample has no spread.
    """
    a_rad, b_rad = _paired_1d(a_rad, b_rad)
    sin_a = np.sin(a_rad - circular_mean(a_rad))
    sin_b = np.sin(b_rad - circular_mean(b_rad))
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.sum(sin_a * sin_b) / np.sqrt(np.sum(sin_a**2) * np.sum(sin_b**2)))


def rotation_correlation(true_rad, pred_transformed_rad, pred_canonical_rad):
    """Rotation score of section 4.2: circular correlation of the true rotation with the predicted change.

    An unsupervised model chooses its own reference orientation for every object, so its raw angle on a
    transformed image is compared after subtracting its angle on the untransformed, centred image of the
    same object; what remains should track the rotation that was applied.
    """
    pred_transformed_rad, pred_canonical_rad = _paired_1d(pred_transformed_rad, pred_canonical_rad)
    return circular_correlation(true_rad, pred_transformed_rad - pred_canonical_rad)


def relative_pose(theta_pred, t_pred, theta_canonical, t_canonical):
    """The pose that maps the canonical image onto the transformed one, from the model's two predictions.

    The model reports each pose relative to its own template, whose centre and orientation it chooses.
    With I(x) = F(R(theta)(x - t)) (``tvae_em.poses``), a canonical image predicted at (theta0, t0) and
    its transform by the true (theta*, t*) are predicted at theta = theta0 + theta* and
    t = t* + R(-theta*) t0; so theta* = theta - theta0 and t* = t - R(-theta*) t0. This extends the paper's
    rotation protocol (prediction on the transformed minus on the untransformed image) to translation.
    Arrays: angles (n,) rad, translations (n, 2). Returns (theta_rel (n,), t_rel (n, 2)).
    """
    theta_rel = np.asarray(theta_pred, np.float64) - np.asarray(theta_canonical, np.float64)
    rotated_t0 = rotate(np.asarray(t_canonical, np.float64).reshape(-1, 2), -theta_rel)
    return theta_rel, np.asarray(t_pred, np.float64).reshape(-1, 2) - rotated_t0


def pose_scores_per_object(theta_true, t_true, theta_pred, t_pred, labels):
    """Rotation and translation correlation when each object's canonical image is not available.

    The model's template of object k may be turned by theta0_k and offset by t0_k relative to the simulated
    object, so its predictions are theta0_k + theta* and t* + R(-theta*) t0_k (see ``relative_pose``).
    theta0_k is the circular mean of theta_pred - theta_true and t0_k the least-squares fit over the
    object's particles; the scores are then those of the paper's protocol. Returns
    (rotation circular correlation, (r_x, r_y)).
    """
    theta_true, theta_pred = np.asarray(theta_true, np.float64), np.asarray(theta_pred, np.float64)
    t_true, t_pred = np.asarray(t_true, np.float64), np.asarray(t_pred, np.float64)
    theta0, t0 = np.zeros_like(theta_true), np.zeros_like(t_true)
    for k in np.unique(labels):
        mine = np.asarray(labels) == k
        theta0[mine] = circular_mean(theta_pred[mine] - theta_true[mine])
        t0[mine] = _template_offset(theta_true[mine], t_pred[mine] - t_true[mine])
    theta_rel, t_rel = relative_pose(theta_pred, t_pred, theta0, t0)
    return circular_correlation(theta_true, theta_rel), translation_correlation(t_true, t_rel)


def _template_offset(theta, residual):
    """Least-squares t0 in residual = R(-theta) t0."""
    design = rotation_matrix(-theta).reshape(-1, 2)
    return np.linalg.lstsq(design, residual.reshape(-1), rcond=None)[0]


def translation_correlation(true_xy, pred_xy):
    """Pearson correlation of true and predicted translations, separately for x and y: returns (r_x, r_y)."""
    true_xy = np.asarray(true_xy, dtype=np.float64)
    pred_xy = np.asarray(pred_xy, dtype=np.float64)
    if true_xy.ndim != 2 or true_xy.shape[1] != 2 or true_xy.shape != pred_xy.shape:
        raise ValueError(f"translations must both be (n, 2); got {true_xy.shape} and {pred_xy.shape}")
    return tuple(pearson(true_xy[:, k], pred_xy[:, k]) for k in range(2))


def pearson(a, b):
    """Pearson correlation coefficient of two paired samples (NaN when either is constant)."""
    a, b = _paired_1d(a, b)
    da, db = a - a.mean(), b - b.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.sum(da * db) / np.sqrt(np.sum(da**2) * np.sum(db**2)))


def clustering_accuracy(labels_true, labels_pred):
    """Fraction of items whose cluster maps to their class under the best one-to-one assignment.

    Section 4.3's "highest accuracy assignment between clusters and digits", solved exactly with the
    Hungarian algorithm on the class x cluster contingency table. The numbers of clusters and classes may
    differ; items in a cluster or class left without a partner count as errors.
    """
    contingency = _contingency(labels_true, labels_pred)
    rows, cols = linear_sum_assignment(contingency, maximize=True)
    return float(contingency[rows, cols].sum() / contingency.sum())


def nmi(labels_true, labels_pred):
    """Normalised mutual information between classes and clusters (independent of label names)."""
    labels_true, labels_pred = _paired_1d(labels_true, labels_pred, dtype=None)
    return float(normalized_mutual_info_score(labels_true, labels_pred))


def _contingency(labels_true, labels_pred):
    labels_true, labels_pred = _paired_1d(labels_true, labels_pred, dtype=None)
    classes, class_idx = np.unique(labels_true, return_inverse=True)
    clusters, cluster_idx = np.unique(labels_pred, return_inverse=True)
    table = np.zeros((len(classes), len(clusters)), dtype=np.int64)
    np.add.at(table, (class_idx, cluster_idx), 1)
    return table


def _paired_1d(a, b, dtype=np.float64):
    a = np.asarray(a, dtype=dtype)
    b = np.asarray(b, dtype=dtype)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"expected two non-empty 1-D arrays of equal length; got {a.shape} and {b.shape}")
    return a, b
