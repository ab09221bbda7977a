"""Clustering of semantic latents z (paper section 4.3: Ward agglomerative clustering, ref. [32]; or k-means).

``cluster`` is the plain clustering the paper's tables score (``metrics``); ``cluster_latents`` is what ``tvae-em
embed --clusters`` writes: Ward on a subsample when a data set is too large for it, and clusters numbered 1..k by
decreasing size.
"""

import numpy as np
from sklearn.cluster import AgglomerativeClustering, KMeans

from tvae_em.errors import UsageError

# Ward clustering keeps an n x n distance structure in memory (~4 n^2 bytes); 20,000 points need ~1.6 GB.
WARD_MAX_POINTS = 20_000
CLUSTER_METHODS = ("ward", "kmeans")


def check_method(method) -> None:
    """UsageError unless ``method`` is one of ``CLUSTER_METHODS``."""
    if method not in CLUSTER_METHODS:
        raise UsageError(f"unknown clustering method {method!r}; expected 'ward' or 'kmeans'")


def cluster(z, k, method="ward", seed=0):
    """Cluster semantic latents z (n, d) into k groups; returns integer labels (n,).

    'ward' is the agglomerative clustering the paper uses (section 4.3); its memory grows with n^2, so
    larger sets must use 'kmeans' (k-means with 10 restarts, reproducible with ``seed``).
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"z must be (n, d); got shape {z.shape}")
    if not 1 <= k <= len(z):
        raise UsageError(f"cannot make {k} clusters from {len(z)} points")
    check_method(method)
    if method == "kmeans":
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z)
    if len(z) > WARD_MAX_POINTS:
        raise UsageError(
            f"Ward clustering of {len(z)} points needs about {4 * len(z) ** 2 / 1e9:.0f} GB of memory "
            f"(limit {WARD_MAX_POINTS} points); use k-means or a subset"
        )
    return AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(z)


def cluster_latents(z, k, method="ward", seed=0) -> np.ndarray:
    """Cluster labels 1..k, numbered by decreasing cluster size (equal sizes keep the clustering's order).

    Ward clustering needs memory quadratic in the number of points, so above ``WARD_MAX_POINTS`` it is fit
    on a seeded random subsample of that size; the subsample keeps its Ward labels and every other point
    joins the cluster with the nearest centroid (Euclidean, like Ward's variance criterion).
    """
    z = np.asarray(z, dtype=np.float64)
    if method == "ward" and len(z) > WARD_MAX_POINTS:
        sample = np.sort(np.random.default_rng(seed).choice(len(z), WARD_MAX_POINTS, replace=False))
        sample_labels = cluster(z[sample], k, method="ward", seed=seed)
        labels = nearest_centroid(z, cluster_means(z[sample], sample_labels, range(k)))
        labels[sample] = sample_labels
    else:
        labels = cluster(z, k, method=method, seed=seed)
    return _number_by_size(labels, k)


def cluster_means(z, labels, clusters) -> np.ndarray:
    """The mean of the points ``z`` (n, d) of each cluster in ``clusters``, (len(clusters), d)."""
    return np.stack([z[labels == c].mean(0) for c in clusters])


def nearest_centroid(points, centroids, chunk=65_536) -> np.ndarray:
    """Index of the closest centroid for every point, in chunks so that memory stays O(chunk * k)."""
    labels = np.empty(len(points), dtype=np.int64)
    for start in range(0, len(points), chunk):
        # |p - c|^2 = |p|^2 - 2 p.c + |c|^2, and |p|^2 does not change which centroid is nearest
        distances = (centroids ** 2).sum(1) - 2 * points[start:start + chunk] @ centroids.T
        labels[start:start + chunk] = distances.argmin(1)
    return labels


def _number_by_size(labels, k) -> np.ndarray:
    sizes = np.bincount(labels, minlength=k)
    order = np.argsort(-sizes, kind="stable")
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(1, k + 1)
    return rank[labels]
