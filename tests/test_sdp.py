"""SDP K-means, the likelihood adjusted SDP and iLA-SDP (repsuite.clustering.sdp), and the pieces
of the replication's experiments (repsuite.clustering.sdp_experiment)."""

import numpy as np
import pytest
import torch

from repsuite.clustering import sdp
from repsuite.clustering import sdp_experiment as E
from repsuite.clustering.metrics import misclustering_error


def blobs(n_per, centers, scales, seed=0):
    rng = np.random.default_rng(seed)
    X = np.vstack([rng.normal(c, s, size=(n_per, len(c))) for c, s in zip(centers, scales,
                                                                           strict=True)])
    return X, np.repeat(np.arange(len(centers)), n_per)


def random_symmetric(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(*shape, generator=g, dtype=torch.float64)
    return (M + M.transpose(-1, -2)) / 2


# -------------------------------------------------------------------------------------------------
# Projections and the ADMM solver


def test_affine_projection_is_feasible_and_orthogonal():
    G = random_symmetric((3, 9, 9))
    trace = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    B = sdp.project_affine(G, trace)
    assert torch.allclose(torch.diagonal(B, dim1=-2, dim2=-1).sum(-1), trace)
    assert torch.allclose(B.sum(-1).sum(0), torch.ones(9, dtype=torch.float64))
    assert torch.allclose(B, B.transpose(-1, -2))

    # Nearest point: G - B is orthogonal to every symmetric direction that keeps the constraints
    # (a projection of a random direction onto the homogeneous constraints).
    D = random_symmetric((3, 9, 9), seed=1)
    D = sdp.project_affine(D, trace) - sdp.project_affine(torch.zeros_like(D), trace)
    assert abs(float(((G - B) * D).sum())) < 1e-10


def test_psd_projection_matches_eigen_clipping():
    M = random_symmetric((2, 7, 7))
    P = sdp.project_psd(M)
    assert torch.linalg.eigvalsh(P).min() > -1e-12
    assert torch.allclose(sdp.project_psd(P), P, atol=1e-12)
    w, V = np.linalg.eigh(M[0].numpy())
    assert np.allclose(P[0].numpy(), (V * w.clip(0)) @ V.T, atol=1e-12)


def _cvxpy_membership_sdp(C, trace):
    cp = pytest.importorskip("cvxpy")
    m, n, _ = C.shape
    B = [cp.Variable((n, n), symmetric=True) for _ in range(m)]
    cons = [sum(b @ np.ones(n) for b in B) == np.ones(n)]
    for b, t in zip(B, trace, strict=True):
        cons += [b >> 0, b >= 0, cp.trace(b) == t]
    problem = cp.Problem(cp.Minimize(sum(cp.trace(C[k] @ B[k]) for k in range(m))), cons)
    problem.solve(solver="CLARABEL")
    return problem.value, np.stack([b.value for b in B])


def test_admm_matches_cvxpy_on_peng_wei_and_la_sdp():
    X, _ = blobs(6, [(0, 0), (3, 0)], [1.0, 0.6])
    Xt = torch.as_tensor(X)
    cases = [((sdp.squared_distances(Xt) / 2)[None], [2.0]),
             (sdp.likelihood_costs(Xt, torch.stack([torch.eye(2), torch.diag(
                 torch.tensor([4.0, 0.25]))]).double()), [1.0, 1.0])]
    for C, trace in cases:
        ours = sdp.solve_membership_sdp(C, trace, tol=1e-7, max_iter=20000)
        value, B = _cvxpy_membership_sdp(C.numpy(), trace)
        assert ours.converged
        assert ours.objective == pytest.approx(value, rel=1e-5)
        assert np.abs(ours.B.numpy() - B).max() < 1e-3


def test_la_sdp_with_identity_covariances_is_peng_wei():
    # With Sigma_k = I every block has the same cost D / 2, and Z = sum_k B_k ranges over
    # Peng-Wei's feasible set: the two optima coincide.
    X, _ = blobs(8, [(0, 0), (2.0, 0), (1.0, 2.0)], [1.0, 1.0, 1.0], seed=3)
    Xt = torch.as_tensor(X)
    eye = torch.eye(2, dtype=torch.float64).expand(3, 2, 2)
    la = sdp.solve_membership_sdp(sdp.likelihood_costs(Xt, eye), [1.0] * 3, tol=1e-7,
                                  max_iter=20000)
    pw = sdp.solve_membership_sdp((sdp.squared_distances(Xt) / 2)[None], [3.0], tol=1e-7,
                                  max_iter=20000)
    assert la.objective == pytest.approx(pw.objective, rel=1e-5)


def test_partitions_are_feasible_and_no_better_than_the_relaxation():
    X, y = blobs(7, [(0, 0), (2.5, 0)], [1.0, 0.5], seed=2)
    Xt = torch.as_tensor(X)
    covariances = torch.stack([torch.eye(2), torch.diag(torch.tensor([2.0, 0.3]))]).double()
    C = sdp.likelihood_costs(Xt, covariances)
    optimum = sdp.solve_membership_sdp(C, [1.0, 1.0], tol=1e-7, max_iter=20000).objective
    rng = np.random.default_rng(0)
    for labels in [y] + [rng.permutation(y) for _ in range(10)]:
        B = sdp.membership_matrices(labels, 2)
        assert torch.allclose(B.sum(-1).sum(0), torch.ones(len(y), dtype=torch.float64))
        assert torch.allclose(torch.diagonal(B, dim1=-2, dim2=-1).sum(-1),
                               torch.ones(2, dtype=torch.float64))
        assert torch.linalg.eigvalsh(B).min() > -1e-12 and B.min() >= 0
        assert sdp.lifted_objective(C, B) >= optimum - 1e-6


def test_solver_rejects_bad_input():
    C = random_symmetric((2, 5, 5))
    with pytest.raises(ValueError, match="one trace per block"):
        sdp.solve_membership_sdp(C, [1.0])
    with pytest.raises(ValueError, match="sum to at most n"):
        sdp.solve_membership_sdp(C, [3.0, 3.0])
    with pytest.raises(ValueError, match=r"\(blocks, n, n\)"):
        sdp.solve_membership_sdp(C[0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        sdp.solve_membership_sdp(C * float("nan"), [1.0, 1.0])


# -------------------------------------------------------------------------------------------------
# The likelihood adjustment


def test_profiled_likelihood_identity():
    # The lifted form (costs C_k against partition matrices) equals the direct sum of
    # within-cluster Mahalanobis forms and log-determinants.
    rng = np.random.default_rng(1)
    X = rng.normal(size=(23, 3))
    labels = rng.integers(0, 3, size=23)
    A = rng.normal(size=(3, 3, 3))
    covariances = torch.as_tensor(A @ A.transpose(0, 2, 1) + 0.5 * np.eye(3))
    B = sdp.membership_matrices(labels, 3)
    Xt = torch.as_tensor(X)
    direct = sdp.profile_neg_loglik(X, labels, covariances)
    assert sdp.lifted_objective(sdp.likelihood_costs(Xt, covariances), B) == pytest.approx(
        direct, abs=1e-8)
    assert sdp.partition_neg_loglik(Xt, B, covariances) == pytest.approx(direct, abs=1e-8)


def test_covariances_of_a_partition_are_the_cluster_mles():
    X, y = blobs(10, [(0, 0, 0), (4, 1, 0)], [1.0, 2.0], seed=4)
    S = sdp.covariances_from_memberships(torch.as_tensor(X), sdp.membership_matrices(y, 2), 0.0)
    for k in range(2):
        assert np.allclose(S[k].numpy(), np.cov(X[y == k].T, bias=True), atol=1e-12)
    with pytest.raises(ValueError, match="reg_covar"):
        sdp.covariances_from_memberships(torch.as_tensor(X), sdp.membership_matrices(y, 2), -1)


def test_spectral_rounding_recovers_shared_blocks():
    # Two clusters split evenly over two blocks (what the LA-SDP returns when they share a
    # covariance): the largest membership is a tie, the spectral coordinates are not.
    y = np.repeat([0, 1, 2], [5, 6, 7])
    P = sdp.membership_matrices(y, 3)
    shared = torch.stack([(P[0] + P[2]) / 2, P[1], (P[0] + P[2]) / 2])
    assert misclustering_error(y, sdp.spectral_round(shared, 3)) == 0
    assert misclustering_error(y, sdp.spectral_round(P.sum(0), 3)) == 0


def test_kmeans_sdp_and_ila_sdp_recover_separated_clusters():
    X, y = blobs(12, [(0, 0), (8, 0), (0, 8)], [1.0, 0.3, 2.0], seed=5)
    km = sdp.kmeans_sdp(X, 3, tol=1e-5)
    assert misclustering_error(y, km.labels) == 0
    res = sdp.ila_sdp(X, 3, tol=1e-5)
    assert misclustering_error(y, res.labels) == 0 and res.converged
    assert np.allclose(res.memberships.sum(1), 1, atol=1e-3)
    again = sdp.ila_sdp(X, 3, tol=1e-5)
    assert np.array_equal(res.labels, again.labels)


def test_ila_sdp_improves_a_poor_start_on_heterogeneous_data():
    # An elongated cluster beside a round one; starting from a partition that cuts the long one,
    # the likelihood of the partition never gets worse over the outer iterations.
    mix = E.heterogeneous_mixture(40, 2, 2, 6.0, layout="collinear", seed=1)
    start = (mix.X[:, 1] > 0).astype(int)
    res = sdp.ila_sdp(mix.X, 2, init_labels=start, tol=1e-5, update="hard")
    lls = [h["neg_loglik"] for h in res.history]
    assert all(b <= a + 1e-6 for a, b in zip(lls, lls[1:], strict=False))
    assert misclustering_error(mix.y, res.labels) < misclustering_error(mix.y, start)


def test_soft_iteration_never_increases_the_relaxed_likelihood():
    # Block coordinate descent: the covariance step minimises F over Sigma exactly, the LA-SDP
    # over B (to ADMM's accuracy), so the SDP objectives do not increase.
    mix = E.heterogeneous_mixture(36, 2, 3, 4.0, layout="collinear", seed=2)
    start = np.argsort(np.argsort(mix.X[:, 1])) * 3 // 36
    res = sdp.ila_sdp(mix.X, 3, init_labels=start, tol=1e-5, max_outer=4, update="soft")
    objectives = [h["sdp_objective"] for h in res.history]
    assert len(objectives) >= 2
    assert all(b <= a + 1e-4 * abs(a) for a, b in zip(objectives, objectives[1:], strict=False))


def test_ila_sdp_keeps_the_last_partition_when_a_cluster_collapses():
    X, y = blobs(10, [(0, 0), (6, 0)], [1.0, 1.0], seed=6)
    start = np.r_[1, np.zeros(19, int)]  # a singleton: its covariance is reg_covar I
    res = sdp.ila_sdp(X, 2, init_labels=start, tol=1e-4, min_cluster_size=5)
    assert res.n_outer >= 1 and np.bincount(res.labels, minlength=2).min() >= 1
    assert "stopped" in res.history[-1] or res.converged


def test_ila_sdp_rejects_bad_input():
    X, y = blobs(5, [(0, 0), (5, 5)], [1.0, 1.0])
    with pytest.raises(ValueError, match="only n = 10 points"):
        sdp.ila_sdp(X, 11)
    with pytest.raises(ValueError, match="NaN"):
        sdp.ila_sdp(np.where(X > 4, np.nan, X), 2)
    with pytest.raises(ValueError, match="one per point"):
        sdp.ila_sdp(X, 2, init_labels=y[:-1])
    with pytest.raises(ValueError, match="integers in 0 .. 1"):
        sdp.ila_sdp(X, 2, init_labels=y + 1)
    with pytest.raises(ValueError, match="at least one point"):
        sdp.ila_sdp(X, 2, init_labels=np.zeros(10, int))
    with pytest.raises(ValueError, match="update must be"):
        sdp.ila_sdp(X, 2, init_labels=y, update="median")
    with pytest.raises(ValueError, match="matrix"):
        sdp.kmeans_sdp(X[:, 0], 2)


# -------------------------------------------------------------------------------------------------
# Experiment pieces


def test_heterogeneous_mixture_design():
    mix = E.heterogeneous_mixture(31, 4, 3, 5.0, condition=20.0, layout="collinear", seed=0)
    assert mix.X.shape == (31, 4) and np.bincount(mix.y).tolist() == [11, 10, 10]
    assert np.allclose(mix.means[:, 0], [-5, 0, 5]) and np.allclose(mix.means[:, 1:], 0)
    eig = np.linalg.eigvalsh(mix.covariances)
    assert np.allclose(eig[0], 1) and np.allclose(eig[1].max() / eig[1].min(), 20)
    assert np.allclose(mix.covariances[1][1, 1], 20)
    again = E.heterogeneous_mixture(31, 4, 3, 5.0, layout="collinear", seed=0)
    assert np.array_equal(mix.X, again.X)
    with pytest.raises(ValueError, match="p >= 2"):
        E.heterogeneous_mixture(30, 1, 2, 3.0)
    with pytest.raises(ValueError, match="layout"):
        E.heterogeneous_mixture(30, 2, 2, 3.0, layout="grid")
    with pytest.raises(ValueError, match="too few"):
        E.heterogeneous_mixture(5, 2, 3, 3.0)


def test_bayes_rule_and_random_starts():
    mix = E.heterogeneous_mixture(200, 2, 2, 8.0, seed=2)
    assert misclustering_error(mix.y, E.bayes_labels(mix)) < 0.02
    starts = E.random_partitions(mix.X, 2, 3, seed=0)
    assert len(starts) == 3 and all(np.bincount(s, minlength=2).min() >= 2 for s in starts)
    assert not np.array_equal(starts[0], starts[1])
    assert all(np.array_equal(a, b) for a, b in zip(starts, E.random_partitions(mix.X, 2, 3),
                                                    strict=True))


def test_run_methods_rows_and_errors():
    mix = E.heterogeneous_mixture(30, 2, 2, 10.0, seed=0)
    rows = E.run_methods(mix.X, mix.y, 2, methods=("kmeans", "em", "ila"))
    assert [r["method"] for r in rows] == ["kmeans", "sdp", "em", "ila"]
    assert all(0 <= r["error"] <= 0.5 for r in rows)
    with pytest.raises(ValueError, match="unknown methods"):
        E.run_methods(mix.X, mix.y, 2, methods=("dbscan",))


def test_real_dataset_subsample():
    X, y = E.real_dataset("iris", per_class=10, seed=0)
    assert X.shape == (30, 4) and np.bincount(y).tolist() == [10, 10, 10]
    assert np.allclose(X.mean(0), 0) and np.allclose(X.std(0), 1)
    X, _ = E.real_dataset("wine", n_components=5)
    assert X.shape == (178, 5)
    with pytest.raises(ValueError, match="smallest class"):
        E.real_dataset("iris", per_class=51)
