"""Clustering metrics: errors after matching clusters to classes, the adjusted Rand index and the
within-cluster sum of squares."""

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score


def _labels(labels, name: str, n: int | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be one label per point, got shape {labels.shape}")
    if len(labels) == 0:
        raise ValueError(f"{name} is empty")
    if n is not None and len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} points but labels_true has {n}")
    if labels.dtype.kind == "f" and np.isnan(labels).any():
        raise ValueError(f"{name} contains NaN")
    return labels


def _contingency(labels_true, labels_pred):
    labels_true = _labels(labels_true, "labels_true")
    labels_pred = _labels(labels_pred, "labels_pred", len(labels_true))
    classes, t = np.unique(labels_true, return_inverse=True)
    clusters, p = np.unique(labels_pred, return_inverse=True)
    table = np.zeros((len(clusters), len(classes)), dtype=np.int64)
    np.add.at(table, (p, t), 1)
    return table, classes, clusters, labels_pred


def match_labels(labels_true, labels_pred) -> np.ndarray:
    """The predicted labels renamed to the classes they are matched to, one to one, so as to agree
    with `labels_true` on as many points as possible (Hungarian algorithm). Clusters left without a
    class (more clusters than classes) keep a label that matches no class: -1, -2, ..."""
    table, classes, clusters, labels_pred = _contingency(labels_true, labels_pred)
    rows, cols = linear_sum_assignment(-table)
    rename = {clusters[r]: classes[c] for r, c in zip(rows, cols, strict=True)}
    extra = [c for c in clusters if c not in rename]
    rename.update({c: -(i + 1) for i, c in enumerate(extra)})
    return np.array([rename[c] for c in labels_pred], dtype=object if classes.dtype == object
                    else np.result_type(classes.dtype, np.int64))


def misclustering_error(labels_true, labels_pred) -> float:
    """1 - accuracy of the clustering after the best one-to-one matching of clusters to classes."""
    table, *_ = _contingency(labels_true, labels_pred)
    rows, cols = linear_sum_assignment(-table)
    return 1.0 - table[rows, cols].sum() / table.sum()


def adjusted_rand(labels_true, labels_pred) -> float:
    labels_true = _labels(labels_true, "labels_true")
    return float(adjusted_rand_score(labels_true, _labels(labels_pred, "labels_pred",
                                                          len(labels_true))))


def within_cluster_ss(X, labels) -> float:
    """Sum over clusters of the squared distances of the points to their cluster's mean."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be a matrix (points x features), got shape {X.shape}")
    if np.isnan(X).any():
        raise ValueError("X contains NaN")
    labels = _labels(labels, "labels", len(X))
    return float(sum(((X[labels == c] - X[labels == c].mean(0)) ** 2).sum()
                     for c in np.unique(labels)))
