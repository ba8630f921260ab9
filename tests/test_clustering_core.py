"""K-means and Gaussian mixtures in PyTorch against scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

from repsuite.clustering import core


@pytest.fixture(scope="module")
def separated():
    X, y = make_blobs(400, n_features=3, centers=4, cluster_std=0.6, center_box=(-12, 12),
                      random_state=1)
    return X, y


@pytest.fixture(scope="module")
def overlapping():
    X, _ = make_blobs(300, n_features=2, centers=3, cluster_std=2.5, random_state=4)
    return X


def test_kmeans_finds_scikit_learns_partition_and_inertia(separated):
    X, y = separated
    ours = core.kmeans(X, 4, n_init=3, seed=0)
    ref = KMeans(4, n_init=3, random_state=0).fit(X)
    assert adjusted_rand_score(y, ours.labels.numpy()) == 1.0
    assert adjusted_rand_score(ref.labels_, ours.labels.numpy()) == 1.0
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-9)
    assert ours.converged and ours.labels.dtype == torch.int64
    assert ours.total_iter >= ours.n_iter + 2  # three starts, at least one update each


def test_lloyd_from_the_same_centers_follows_scikit_learn_on_overlapping_data(overlapping):
    X = overlapping
    start = X[[0, 1, 2]]
    ours = core.kmeans(X, 3, init=start, tol=0.0)
    ref = KMeans(3, init=start, n_init=1, algorithm="lloyd", tol=0.0).fit(X)
    assert np.array_equal(ours.labels.numpy(), ref.labels_)
    assert np.allclose(ours.centers.numpy(), ref.cluster_centers_, atol=1e-10)
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-10)


@pytest.mark.parametrize("covariance", core.COVARIANCES)
def test_gmm_matches_scikit_learn_log_likelihood_and_bic(separated, covariance):
    X, y = separated
    ours = core.gmm(X, 4, covariance=covariance, seed=0)
    ref = GaussianMixture(4, covariance_type=covariance, tol=1e-6, reg_covar=1e-6,
                          random_state=0).fit(X)
    assert adjusted_rand_score(y, ours.labels.numpy()) == 1.0
    assert ours.log_likelihood == pytest.approx(ref.score(X) * len(X), rel=1e-6)
    assert ours.bic == pytest.approx(ref.bic(X), rel=1e-6)
    assert ours.covariance == covariance
    assert torch.allclose(ours.responsibilities.sum(1), torch.ones(len(X), dtype=torch.float64))


def test_em_from_the_same_start_follows_scikit_learn_on_overlapping_data(overlapping):
    X = overlapping
    labels = KMeans(3, n_init=1, random_state=0).fit(X).labels_
    ours = core.gmm(X, 3, init=labels, tol=1e-9, max_iter=300)

    # scikit-learn starts from the same one-hot responsibilities through its initial parameters.
    resp = np.eye(3)[labels]
    nk = resp.sum(0)
    means = resp.T @ X / nk[:, None]
    covs = np.stack([(resp[:, j, None] * (X - means[j])).T @ (X - means[j]) / nk[j]
                     + 1e-6 * np.eye(2) for j in range(3)])
    ref = GaussianMixture(3, tol=1e-9, max_iter=300, weights_init=nk / len(X), means_init=means,
                          precisions_init=np.linalg.inv(covs)).fit(X)
    assert ours.log_likelihood == pytest.approx(ref.score(X) * len(X), rel=1e-8)
    assert np.allclose(np.sort(ours.weights.numpy()), np.sort(ref.weights_), atol=1e-6)


def test_parameter_count_is_scikit_learns():
    X = np.random.default_rng(0).normal(size=(50, 3))
    for covariance in core.COVARIANCES:
        ref = GaussianMixture(2, covariance_type=covariance, random_state=0).fit(X)
        assert core.n_parameters(2, 3, covariance) == ref._n_parameters()


def test_an_empty_kmeans_cluster_is_reseeded_at_the_farthest_point():
    X = np.array([[0.0], [1.0], [5.0], [20.0], [21.0]])
    result = core.kmeans(X, 3, init=[[1.0], [21.0], [100.0]])
    # The third center attracts nothing; the point 5 is farthest from its own center (1).
    assert result.n_reseeded == 1
    assert result.labels.tolist() == [0, 0, 2, 1, 1]
    assert result.centers[2].item() == 5.0 and result.inertia == pytest.approx(1.0)


def test_an_empty_mixture_component_is_reseeded(separated):
    X, y = separated
    start = np.minimum(y, 2)  # component 3 starts with no point
    result = core.gmm(X, 4, init=start)
    assert result.n_reseeded >= 1
    assert (result.weights > 0.05).all()
    assert torch.bincount(result.labels, minlength=4).min() > 0


def test_same_seed_same_numbers_and_seeds_agree_on_separated_data(separated):
    X, _ = separated
    a, b = core.gmm(X, 4, seed=3), core.gmm(X, 4, seed=3)
    assert torch.equal(a.labels, b.labels) and a.log_likelihood == b.log_likelihood
    labels = [core.kmeans(X, 4, n_init=5, seed=s).labels.numpy() for s in range(3)]
    assert all(adjusted_rand_score(labels[0], other) == 1.0 for other in labels[1:])


def test_duplicates_are_fine_while_enough_points_are_distinct():
    X = np.array([[0.0, 0.0]] * 5 + [[3.0, 3.0]] * 5)
    result = core.kmeans(X, 2, seed=0)
    assert result.inertia == 0.0 and sorted(torch.bincount(result.labels).tolist()) == [5, 5]
    fit = core.gmm(X, 2, seed=0, reg_covar=1e-3)
    assert adjusted_rand_score(result.labels.numpy(), fit.labels.numpy()) == 1.0


def test_tensors_in_keep_their_device_and_become_float64(separated):
    X = torch.as_tensor(separated[0], dtype=torch.float32)
    result = core.kmeans(X, 4, seed=0)
    assert result.centers.dtype == torch.float64 and result.centers.device == X.device
    single = core.gmm(X, 1)
    assert single.n_iter <= 2 and torch.allclose(single.means[0], X.double().mean(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_the_cpus_partition(separated):
    X, y = separated
    result = core.gmm(X, 4, seed=0, device="cuda")
    assert result.labels.is_cuda
    assert adjusted_rand_score(y, result.labels.cpu().numpy()) == 1.0


@pytest.mark.parametrize("call, message", [
    (lambda: core.kmeans(np.zeros((3, 2)) + np.arange(3)[:, None], 4), "only 3 points"),
    (lambda: core.kmeans([[0.0, np.nan], [1.0, 1.0]], 1), "NaN or infinite values in 1"),
    (lambda: core.gmm([[1.0, 1.0]] * 4 + [[2.0, 2.0]], 3), "only 2 distinct points"),
    (lambda: core.kmeans(np.arange(6.0), 2), "must be a matrix"),
    (lambda: core.kmeans(np.zeros((0, 2)), 1), "empty"),
    (lambda: core.kmeans(np.eye(3), 0), "positive int"),
    (lambda: core.kmeans(np.eye(3), 2, init="forgy"), "init must be one of"),
    (lambda: core.kmeans(np.eye(3), 2, init=np.eye(3)), r"shape \(2, 3\)"),
    (lambda: core.gmm(np.eye(3), 2, covariance="banded"), "covariance must be one of"),
    (lambda: core.gmm(np.eye(3), 2, init=[0, 1, 2]), r"labels must lie in 0..1"),
    (lambda: core.gmm(np.eye(3), 2, init=np.full((3, 2), 0.7)), "sum to 1"),
    (lambda: core.gmm(np.eye(3), 2, reg_covar=-1.0), "reg_covar"),
    (lambda: core.gmm(np.eye(3), 2, covariance="full", reg_covar=0.0, init=[0, 0, 1]),
     "not positive definite"),
])
def test_bad_input_names_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()
