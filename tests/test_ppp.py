"""PPP: the split-and-validate recursion, its acceptance rule, and the experiment's helpers."""

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, silhouette_score
from sklearn.mixture import GaussianMixture

from repsuite.clustering import core
from repsuite.clustering import ppp as P
from repsuite.clustering import ppp_experiment as PE


@pytest.fixture(scope="module")
def two_gaussians():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 150)
    X = rng.normal(size=(300, 2)) + np.array([[0.0, 0.0], [12.0, 0.0]])[y]
    return X, y


@pytest.fixture(scope="module")
def four_blobs():
    return PE.blobs(4, 40, 2, separation=9.0, seed=2)


def test_two_far_gaussians_are_split_once_and_exactly(two_gaussians):
    X, y = two_gaussians
    result = P.ppp(X, seed=0)
    assert result.nodes[0].status == "accepted"
    assert result.k == 2 and adjusted_rand_score(y, result.labels) == 1.0
    assert all(n.status in ("bic", "agreement") for n in result.nodes[1:])
    assert result.core().mean() > 0.99


def test_one_gaussian_is_not_split():
    X = np.random.default_rng(1).normal(size=(200, 2))
    result = P.ppp(X, seed=0)
    assert result.k == 1 and result.nodes[0].status == "bic" and result.nodes[0].delta_bic < 0
    assert np.all(result.labels == 0) and np.all(result.posterior == 1.0)


def test_delta_bic_is_the_difference_of_scikit_learns_bics(two_gaussians):
    X, _ = two_gaussians
    split = core.kmeans(X, 2, n_init=3, seed=0).labels
    delta_bic, agreement, two, side0, _ = P.validate_split(torch.as_tensor(X), split)
    one = GaussianMixture(1, reg_covar=1e-6).fit(X)
    ref_two = GaussianMixture(2, reg_covar=1e-6, tol=1e-6, random_state=0).fit(X)
    assert delta_bic == pytest.approx(one.bic(X) - ref_two.bic(X), rel=1e-6)
    assert agreement == 1.0 and side0 == int(two.labels[split == 0][0])


def test_the_rule_respects_delta_and_tau():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 200)
    X = rng.normal(size=(400, 2)) + np.array([[0.0, 0.0], [3.2, 0.0]])[y]  # overlapping
    root = P.ppp(X, seed=0, tau=0.0, max_depth=1).nodes[0]
    assert root.status == "accepted" and 0 < root.agreement < 1 and root.delta_bic > 0

    def status(**rule):
        return P.ppp(X, seed=0, max_depth=1, **rule).nodes[0].status

    assert status(tau=0.0, delta=root.delta_bic + 1.0) == "bic"
    assert status(tau=0.0, delta=root.delta_bic - 1.0) == "accepted"
    assert status(tau=root.agreement + 1e-9) == "agreement"
    assert status(tau=root.agreement - 1e-9) == "accepted"


def test_leaves_partition_the_points_and_the_recursion_stops(four_blobs):
    result = P.ppp(four_blobs.X, seed=0)
    assert result.k == 4 and adjusted_rand_score(four_blobs.y, result.labels) == 1.0
    leaves = [n for n in result.nodes if n.children is None]
    assert sorted(n.leaf for n in leaves) == list(range(result.k))
    assert np.bincount(result.labels).tolist() == [n.size for n in sorted(leaves,
                                                                           key=lambda n: n.leaf)]
    for node in result.nodes:
        if node.children:
            assert sum(result.nodes[c].size for c in node.children) == node.size
            assert node.status == "accepted"
    shallow = P.ppp(four_blobs.X, seed=0, max_depth=1)
    assert shallow.k == 2 and {n.status for n in shallow.nodes[1:]} == {"depth"}
    assert P.ppp(four_blobs.X, seed=0, n_min=1000).k == 1


def test_same_seed_same_result_and_seeds_agree_on_separated_data(four_blobs):
    a, b = P.ppp(four_blobs.X, seed=5), P.ppp(four_blobs.X, seed=5)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.posterior, b.posterior)
    assert a.work == b.work > 0
    others = [P.ppp(four_blobs.X, seed=s).labels for s in (1, 2)]
    assert all(adjusted_rand_score(a.labels, o) == 1.0 for o in others)


def test_a_subsampled_validation_finds_the_same_split(two_gaussians):
    X, y = two_gaussians
    result = P.ppp(X, seed=0, gmm_max_points=80)
    assert result.k == 2 and adjusted_rand_score(y, result.labels) == 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(tau=1.5), "tau <= 1"),
    (dict(n_min=1), "n_min >= 2"),
    (dict(core_level=1.0), "core_level"),
    (dict(gmm_max_points=3), "too few points to validate"),
    (dict(covariance="banded"), "covariance must be one of"),
])
def test_bad_settings_name_the_problem(two_gaussians, kwargs, message):
    with pytest.raises(ValueError, match=message):
        P.ppp(two_gaussians[0], **kwargs)


def test_bad_data_names_the_problem():
    with pytest.raises(ValueError, match="NaN"):
        P.ppp([[0.0, 1.0], [np.nan, 2.0]])
    with pytest.raises(ValueError, match="separation > 0"):
        PE.blobs(3, 10, 2, separation=0.0, seed=0)


def test_fast_ari_and_silhouette_match_scikit_learn():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(120, 3))
    a, b = rng.integers(0, 4, 120), rng.integers(0, 2, 120)
    b[:3] = 5  # a small cluster
    assert P.ari(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-12)
    assert P.ari(np.zeros(9), np.zeros(9)) == 1.0
    assert P.ari([0, 0, 1, 1], [0, 1, 2, 3]) == pytest.approx(0.0)
    sil = PE.SilhouetteCache(X)
    assert sil(b) == pytest.approx(silhouette_score(X, b), abs=1e-9)
    mask = a > 0
    assert sil(b, mask) == pytest.approx(silhouette_score(X[mask], b[mask]), abs=1e-9)
    assert np.isnan(sil(np.zeros(120)))


def test_experiment_helpers():
    assert PE.seed_pairs(range(5)) == [(0, 1), (2, 3)]
    assert PE.pair_ari([0, 0, 0], [0, 0, 0], degenerate_zero=True) == 0.0
    assert PE.pair_ari([0, 0, 0], [0, 0, 0]) == 1.0
    ds = PE.blobs(5, 4, 2, separation=7.0, seed=1)
    assert ds.X.shape == (20, 2) and ds.n_classes == 5
    X = np.array([[0.0], [2.0], [10.0], [12.0]])
    assert PE.r2(X, [0, 0, 1, 1]) == pytest.approx(1 - 4 / 104)
    table = pd.DataFrame({"seed": [0] * 3, "n": [10, 100, 1000], "work": [30, 300, 3000]})
    assert PE.loglog_slopes(table)[0] == pytest.approx(1.0)


def test_tree_layout_places_children_below_their_parent(four_blobs):
    result = P.ppp(four_blobs.X, seed=0)
    pos = PE.tree_layout(result)
    assert len(pos) == len(result.nodes)
    for node in result.nodes:
        for c in node.children or ():
            assert pos[c][1] == pos[node.id][1] - 1
