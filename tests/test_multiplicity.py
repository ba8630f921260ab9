"""Viable prediction ranges against references (CVXPY, a scalar root find, scikit-learn), the
properties that hold by construction (monotone in eps, sampled models inside the ranges), and
clear errors on bad input."""

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from repsuite.fairness import multiplicity as M
from repsuite.fairness import multiplicity_experiment as E


def _problem(n=40, d=2, seed=0, flip=0.15):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = (X @ np.arange(1, d + 1) + 0.5 * rng.normal(size=n) > 0).astype(int)
    y[rng.random(n) < flip] ^= 1
    return X, y


def _baseline(X, y, l2=0.01, intercept=True):
    obj = M.make_objective(X, y, l2=l2, intercept=intercept)
    w0 = M.fit(obj)[0]
    return obj, w0, float(obj.loss(w0))


def test_ranges_match_cvxpy_exponential_cone():
    cp = pytest.importorskip("cvxpy")
    X, y = _problem()
    obj, w0, L0 = _baseline(X, y)
    eps = 0.02
    Zt = obj.rows(X[:6])
    r = M.viable_ranges(obj, w0, Zt, eps)
    Z, n = obj.Z.numpy(), len(y)
    w = cp.Variable(3)
    loss = (cp.sum(cp.logistic(Z @ w)) - y @ Z @ w) / n + 0.005 * cp.sum_squares(w[:2])
    for i, z in enumerate(Zt.numpy()):
        for sense, ours in ((cp.Minimize, r.lower[i]), (cp.Maximize, r.upper[i])):
            cp.Problem(sense(z @ w), [loss <= L0 + eps]).solve(solver="CLARABEL")
            assert float(z @ w.value) == pytest.approx(float(ours), abs=1e-4)


def test_one_dimensional_level_set_is_the_root_interval():
    X, y = _problem(n=60, d=1)
    obj, w0, L0 = _baseline(X, y, l2=0.0, intercept=False)
    eps = 0.05

    def gap(w):
        return float(obj.loss(torch.tensor([w], dtype=torch.float64))) - L0 - eps

    w_lo = brentq(gap, float(w0) - 50, float(w0), xtol=1e-13)
    w_hi = brentq(gap, float(w0), float(w0) + 50, xtol=1e-13)
    x = np.array([[1.7], [-0.4]])
    r = M.viable_ranges(obj, w0, obj.rows(x), eps)
    np.testing.assert_allclose(r.lower.numpy(), np.minimum(x[:, 0] * w_lo, x[:, 0] * w_hi),
                               atol=1e-7)
    np.testing.assert_allclose(r.upper.numpy(), np.maximum(x[:, 0] * w_lo, x[:, 0] * w_hi),
                               atol=1e-7)


def test_solution_is_feasible_and_the_constraint_active():
    X, y = _problem(n=200, d=5, seed=1)
    obj, w0, L0 = _baseline(X, y, l2=1 / 200)
    for eps in (1e-4, 0.01, 0.2):
        r = M.viable_ranges(obj, w0, obj.rows(X[:30]), eps)
        assert (r.losses <= L0 + eps + 1e-6).all()
        assert torch.allclose(r.losses, torch.full_like(r.losses, L0 + eps), atol=1e-8)
        assert (r.lower <= r.baseline + 1e-12).all() and (r.upper >= r.baseline - 1e-12).all()


def test_zero_budget_gives_zero_width_and_a_small_one_a_small_width():
    X, y = _problem(n=100, d=3, seed=2)
    obj, w0, _ = _baseline(X, y, l2=1e-3)
    assert np.abs(M.viable_ranges(obj, w0, obj.rows(X[:10]), 0.0).widths()).max() < 1e-5
    assert M.viable_ranges(obj, w0, obj.rows(X[:10]), 1e-8).widths().max() < 1e-2


def test_quadratic_limit_matches_the_ellipsoid_formula():
    # For a small eps the level set is the ellipsoid 1/2 d'H0 d <= eps, so the logit moves by
    # +- sqrt(2 eps z'H0^-1 z).
    X, y = _problem(n=300, d=3, seed=3)
    obj, w0, _ = _baseline(X, y, l2=1e-3)
    Zt = obj.rows(X[:8])
    eps = 1e-7
    half = torch.sqrt(2 * eps * (Zt * torch.linalg.solve(M.hessian(obj, w0), Zt.T).T).sum(1))
    r = M.viable_ranges(obj, w0, Zt, eps)
    np.testing.assert_allclose(((r.upper - r.lower) / 2).numpy(), half.numpy(), rtol=1e-3)


def test_ranges_and_ambiguity_grow_with_eps_and_warm_start_changes_nothing():
    X, y = _problem(n=150, d=4, seed=4)
    obj, w0, L0 = _baseline(X, y, l2=1 / 150)
    Zt = obj.rows(X[:40])
    previous, warm, amb = None, None, []
    for eps in (0.001, 0.005, 0.01, 0.02, 0.05):
        r = M.viable_ranges(obj, w0, Zt, eps, warm=warm)
        cold = M.viable_ranges(obj, w0, Zt, eps)
        np.testing.assert_allclose(r.lower.numpy(), cold.lower.numpy(), atol=1e-6)
        if previous is not None:
            assert (r.lower <= previous.lower + 1e-9).all()
            assert (r.upper >= previous.upper - 1e-9).all()
        p0, lo, hi = r.probabilities()
        amb.append(M.ambiguity(p0, lo, hi, 0.05))
        previous = warm = r
    assert amb == sorted(amb) and amb[-1] > amb[0]


def test_sampled_models_in_the_level_set_stay_inside_the_exact_ranges():
    X, y = _problem(n=120, d=3, seed=5)
    obj, w0, L0 = _baseline(X, y, l2=1 / 120)
    eps = 0.01
    Zt = obj.rows(X[:50])
    r = M.viable_ranges(obj, w0, Zt, eps)
    _, lo, hi = r.probabilities()
    W = torch.cat([M.bootstrap_models(obj, 30, seed=0, w0=w0),
                   M.perturbed_models(obj, w0, eps, 200, seed=1),
                   M.sgd_models(obj, 10, seed=2, epochs=5)])
    inside = M.in_level_set(obj, W, L0, eps)
    assert inside.sum() > 50
    s_lo, s_hi = M.sampled_ranges(W[inside], Zt, w0)
    assert (s_lo >= lo - 1e-6).all() and (s_hi <= hi + 1e-6).all()
    assert (s_hi - s_lo).mean() < (hi - lo).mean()


def test_baseline_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    X, y = _problem(n=200, d=4, seed=6)
    C = 0.7
    obj = M.make_objective(X, y, l2=M.l2_from_C(C, len(y)))
    w0 = M.fit(obj)[0].numpy()
    ref = LogisticRegression(C=C, tol=1e-12, max_iter=10_000).fit(X, y)
    np.testing.assert_allclose(w0[:-1], ref.coef_[0], atol=1e-5)
    np.testing.assert_allclose(w0[-1], ref.intercept_[0], atol=1e-5)


def test_weighted_fit_with_equal_weights_is_the_plain_fit():
    X, y = _problem(n=80, d=3, seed=7)
    obj, w0, _ = _baseline(X, y)
    W = M.fit(obj, weights=torch.full((2, 80), 1 / 80, dtype=torch.float64))
    np.testing.assert_allclose(W.numpy(), np.stack([w0.numpy()] * 2), atol=1e-9)


def test_ambiguity_and_discrepancy_by_hand():
    p0 = np.array([0.5, 0.2, 0.9, 0.4])
    lo = np.array([0.3, 0.15, 0.85, 0.4])
    hi = np.array([0.55, 0.35, 0.95, 0.41])
    assert M.ambiguity(p0, lo, hi, 0.1) == 0.5  # points 0 (down 0.2) and 1 (up 0.15)
    P = np.array([[0.3, 0.2, 0.9, 0.4], [0.5, 0.35, 0.8, 0.4], [0.5, 0.2, 0.9, 0.4]])
    assert M.discrepancy(p0, P, 0.1) == 0.5  # the second model moves points 1 and 2
    assert M.discrepancy(p0, P[:0], 0.1) == 0.0


def test_discrepancy_never_exceeds_ambiguity():
    X, y = _problem(n=150, d=3, seed=8)
    obj, w0, _ = _baseline(X, y, l2=1 / 150)
    Zt = obj.rows(X[:60])
    r = M.viable_ranges(obj, w0, Zt, 0.02)
    p0, lo, hi = r.probabilities()
    for delta in (0.02, 0.05, 0.1):
        amb = M.ambiguity(p0, lo, hi, delta)
        assert M.discrepancy(p0, M.model_probabilities(r.models(), Zt), delta) <= amb


def test_bad_inputs_give_clear_errors():
    X, y = _problem()
    with pytest.raises(ValueError, match="NaN"):
        M.make_objective(np.where(X > 2, np.nan, X), y, l2=0.1)
    with pytest.raises(ValueError, match="0/1 labels"):
        M.make_objective(X, y + 1, l2=0.1)
    with pytest.raises(ValueError, match="single class"):
        M.make_objective(X, np.zeros(len(y), int), l2=0.1)
    with pytest.raises(ValueError, match="one label per row"):
        M.make_objective(X, y[:-1], l2=0.1)
    with pytest.raises(ValueError, match="unbounded"):
        M.make_objective(X[:4], y[:4], l2=0.0)
    obj, w0, _ = _baseline(X, y)
    with pytest.raises(ValueError, match="eps"):
        M.viable_ranges(obj, w0, obj.rows(X[:2]), -0.1)
    with pytest.raises(ValueError, match="columns"):
        M.viable_ranges(obj, w0, X[:2], 0.1)
    with pytest.raises(ValueError, match="features"):
        obj.rows(X[:, :1])
    with pytest.raises(ValueError, match="delta"):
        M.ambiguity([0.5], [0.4], [0.6], 0.0)
    with pytest.raises(ValueError, match="does not contain"):
        M.ambiguity([0.5], [0.6], [0.7], 0.1)
    with pytest.raises(ValueError, match="shape"):
        M.ambiguity([0.5, 0.5], [0.4], [0.6], 0.1)
    with pytest.raises(ValueError, match="probabilities"):
        M.discrepancy([0.5], [[1.5]], 0.1)
    with pytest.raises(ValueError, match="C must be"):
        M.l2_from_C(0.0, 10)


def test_synthetic_generator_controls_its_characteristics():
    X, y, g = M.make_synthetic(400, seed=0, dim=3, minority=0.1, minority_offset=3.0)
    assert X.shape == (400, 3) and (g == 1).sum() == 40
    assert X[g == 1, 1].mean() > 2 and abs(X[g == 0, 1].mean()) < 0.5
    _, y_clean, _ = M.make_synthetic(400, seed=1)
    _, y_noisy, _ = M.make_synthetic(400, seed=1, flip=0.1)
    assert (y_clean != y_noisy).sum() == 40
    with pytest.raises(ValueError, match="shares"):
        M.make_synthetic(100, seed=0, flip=0.6)


def test_audit_runs_on_a_small_dataset_and_checks_its_inputs():
    X, y, g = M.make_synthetic(120, seed=0, minority=0.2)
    ds = E.Dataset("toy", X, y, {"grp": g}, {"grp": ["a", "b"]})
    samplers = {"bootstrap": {"n": 5}, "sgd": {"n": 3, "epochs": 2, "lr": 0.5, "batch_size": 16}}
    a = E.audit(ds, seeds=[0, 1], eps_grid=[0.005], eps_main=0.01, delta=0.1, C=1.0,
                test_size=0.25, n_points=20, points="train", samplers=samplers, device="cpu",
                progress=False)
    assert len(a.summary) == 4 and set(a.summary.eps) == {0.005, 0.01}
    assert (a.summary.max_constraint_gap < 1e-8).all()
    assert (a.sampled.containment == 1).all()
    assert set(a.sampled.sampler) == {"bootstrap", "sgd", "bootstrap+sgd"}
    assert set(a.fairness.group) == {"a", "b"}
    with pytest.raises(ValueError, match="points"):
        E.audit(ds, seeds=[0], eps_grid=[], eps_main=0.01, delta=0.1, C=1.0, test_size=0.25,
                n_points=20, points="all", samplers={}, device="cpu")
    with pytest.raises(ValueError, match="unknown samplers"):
        E.audit(ds, seeds=[0], eps_grid=[], eps_main=0.01, delta=0.1, C=1.0, test_size=0.25,
                n_points=20, points="train", samplers={"dropout": {}}, device="cpu")
