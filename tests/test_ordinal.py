"""Cumulative-logit models and PRESTO against independent references (statsmodels'
OrderedModel, scikit-learn's logistic regression, torch autograd, optimality conditions), the
authors' generators, the calibration metric, and the input checks."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from repsuite.regression import ordinal as O
from repsuite.regression import presto_experiment as E


def _ordinal_data(n=300, seed=0, K=4, scale=(1.0, 2.0, 0.5), cross=False):
    """Rows from a proportional odds model (features on different scales, offset from 0)."""
    rng = np.random.default_rng(seed)
    p = len(scale)
    X = rng.normal(size=(n, p)) * np.asarray(scale) + 1.0
    beta = np.linspace(1.0, -0.5, p)[:, None] * np.ones((1, K - 1))
    if cross:
        beta[0] += np.linspace(0, 0.6, K - 1)
    alpha = np.linspace(-1.5, 2.0, K - 1)
    cum = 1 / (1 + np.exp(-(alpha[None] + X @ beta)))
    cum = np.maximum.accumulate(cum, axis=1)
    y = (rng.uniform(size=n)[:, None] > cum).sum(1)
    return X, y


# -------------------------------------------------------------------------------------------------
# Maximum likelihood against references


def _statsmodels_po(X, y):
    from statsmodels.miscmodels.ordinal_model import OrderedModel

    model = OrderedModel(y, X, distr="logit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = model.fit(method="bfgs", disp=False, maxiter=5000, gtol=1e-9)
    thresholds = model.transform_threshold_params(res.params)[1:-1]
    # statsmodels: P(y <= k) = F(threshold_k - x . b); ours: sigmoid(alpha_k + x . beta).
    return thresholds, -np.asarray(res.params[:X.shape[1]])


def test_proportional_odds_matches_statsmodels():
    X, y = _ordinal_data()
    fit = O.fit_po(X, y)
    alpha, beta = _statsmodels_po(X, y)
    assert fit.converged
    assert fit.alpha == pytest.approx(alpha, abs=1e-4)
    for k in range(3):
        assert fit.beta[:, k] == pytest.approx(beta, abs=1e-4)


def test_presto_with_a_free_first_vector_and_huge_lambda_is_proportional_odds():
    X, y = _ordinal_data(seed=1)
    fit = O.fit_presto(X, y, 1e3, penalize_first=False)
    alpha, beta = _statsmodels_po(X, y)
    assert np.abs(fit.psi[:, 1:]).max() == 0.0
    assert fit.alpha == pytest.approx(alpha, abs=1e-3)
    assert fit.beta[:, 0] == pytest.approx(beta, abs=1e-3)


def test_two_classes_without_penalty_is_logistic_regression():
    X, y = _ordinal_data(n=400, seed=2, K=2)
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(X, y)
    for fit in (O.fit_logistic(X, y), O.fit_presto(X, y, 0.0)):
        # P(y = 1) = 1 - sigmoid(alpha + x . beta): the signs flip against scikit-learn's.
        assert fit.alpha == pytest.approx(-ref.intercept_, abs=1e-6)
        assert fit.beta[:, 0] == pytest.approx(-ref.coef_[0], abs=1e-6)
        assert fit.rare_proba(X) == pytest.approx(ref.predict_proba(X)[:, 1], abs=1e-8)


def test_fits_do_not_depend_on_the_feature_scale():
    X, y = _ordinal_data(seed=3)
    a, b = O.fit_presto(X, y, 0.01), O.fit_presto(X * 10.0 - 3.0, y, 0.01)
    assert b.beta == pytest.approx(a.beta / 10.0, abs=1e-7)
    assert b.predict_proba(X * 10.0 - 3.0) == pytest.approx(a.predict_proba(X), abs=1e-7)


# -------------------------------------------------------------------------------------------------
# Derivatives and optimality


def _problems(K=4, n=40, B=2, seed=0):
    rng = np.random.default_rng(seed)
    X = torch.tensor(rng.normal(size=(B, n, 3)))
    y = torch.tensor(rng.integers(0, K, size=(B, n)))
    w = torch.tensor(rng.uniform(0.5, 2.0, size=(B, n)))
    P = O.Problems(X, y, w, K)
    theta = P.intercept_only() + 0.05 * torch.tensor(rng.normal(size=(B, 4, K - 1)))
    return P, theta


@pytest.mark.parametrize("K", [2, 3, 5])
def test_gradient_and_hessian_match_autograd(K):
    P, theta = _problems(K)
    grad, H = P.grad(theta), P.hessian(theta)
    for b in range(P.batch):
        def f(v, b=b):
            full = torch.cat([v.reshape(1, *theta.shape[1:]) if i == b else theta[i:i + 1]
                              for i in range(P.batch)])
            return P.nll(full)[b]
        v = theta[b].reshape(-1).clone().requires_grad_(True)
        auto_g = torch.autograd.grad(f(v), v)[0]
        auto_H = torch.autograd.functional.hessian(f, theta[b].reshape(-1))
        assert grad[b].reshape(-1) == pytest.approx(auto_g, abs=1e-12)
        assert H[b] == pytest.approx(auto_H, abs=1e-12)


def test_fisher_information_is_the_expected_hessian():
    P, theta = _problems(K=4, n=15, B=1)
    prob = P.probabilities(theta)[0]  # (n, K)
    X = (P.Xt[0, :, 1:] * P.scale[0] + P.mean[0]).repeat(4, 1)  # every row once per class
    y = torch.arange(4).repeat_interleave(15)
    w = P.w[0].repeat(4) * prob.T.reshape(-1)
    Q = O.Problems(X[None], y[None], w[None], 4)
    assert Q.hessian(theta, "observed") == pytest.approx(P.hessian(theta, "fisher"), abs=1e-10)


def test_soft_threshold_closed_form():
    z = torch.tensor([-3.0, -0.5, 0.0, 0.2, 2.5])
    assert O.soft_threshold(z, 1.0).tolist() == [-2.0, 0.0, 0.0, 0.0, 1.5]
    t = torch.tensor([0.1, 1.0, 0.0, 0.3, 3.0])
    assert O.soft_threshold(z, t).tolist() == pytest.approx([-2.9, 0.0, 0.0, 0.0, 0.0])


def test_objective_never_increases_and_the_solution_is_optimal():
    X, y = _ordinal_data(n=400, seed=4, cross=True)
    P = O._single(X, y, None, None)
    lam = 0.3 * float(P.lambda_max()[0])
    history = []
    theta, _, ok = O.prox_newton(P, P.intercept_only(), lam, tol=1e-13, history=history)
    trace = np.array([float(h[0]) for h in history])
    assert ok[0] and len(trace) > 2 and (np.diff(trace) <= 1e-15).all()

    # Optimality of the lasso in psi: |gradient| <= lambda where psi = 0, = -lambda sign(psi)
    # elsewhere (intercepts: gradient 0).
    g, th = P.grad(theta)[0], theta[0]
    assert g[0].abs().max() < 1e-7
    zero = th[1:] == 0
    assert zero.any() and (~zero).any()
    assert (g[1:][zero].abs() <= lam + 1e-7).all()
    assert g[1:][~zero] == pytest.approx((-lam * torch.sign(th[1:][~zero])).tolist(), abs=1e-6)


def test_lambda_max_is_where_every_weight_enters():
    X, y = _ordinal_data(seed=5)
    fits = O.presto_path(X, y, n_lambda=4, lambda_min_ratio=0.5)
    assert np.abs(fits[0].beta).max() == 0.0
    assert np.abs(fits[1].beta).max() > 0.0
    assert [f.lam for f in fits] == pytest.approx(fits[0].lam * 0.5 ** (np.arange(4) / 3))


# -------------------------------------------------------------------------------------------------
# Batches, cross-validation, probabilities


def test_cross_validated_fit_equals_a_single_fit_at_the_chosen_lambda():
    data = [_ordinal_data(n=250, seed=s, cross=True) for s in (6, 7)]
    cv = O.presto_cv(data, seeds=[0, 1], n_lambda=6, n_folds=3)
    again = O.presto_cv(data, seeds=[0, 1], n_lambda=6, n_folds=3)
    for r, (X, y) in enumerate(data):
        single = O.fit_presto(X, y, float(cv.lambdas[r, cv.best[r]]))
        assert cv.fits[r].beta == pytest.approx(single.beta, abs=1e-5)
        assert cv.cv_brier[r, cv.best[r]] == cv.cv_brier[r].min()
        assert cv.fits[r].beta == pytest.approx(again.fits[r].beta, abs=0)
    # The folds: a permutation dealt out in turn, as ordinalNet does.
    folds = O.fold_ids(10, 3, 0)
    assert sorted(np.bincount(folds).tolist()) == [3, 3, 4]


def test_held_out_brier_score_by_hand():
    X, y = _ordinal_data(n=120, seed=8)
    cv = O.presto_cv([(X, y)], seeds=[3], n_lambda=3, n_folds=2)
    folds = O.fold_ids(len(y), 2, 3)
    scores = []
    for f in range(2):
        train, test = folds != f, folds == f
        fit = O.fit_presto(X[train], y[train], float(cv.lambdas[0, 1]))
        prob = fit.predict_proba(X[test])
        scores.append(np.mean(((np.eye(4)[y[test]] - prob) ** 2).sum(1)))
    assert cv.cv_brier[0, 1] == pytest.approx(np.mean(scores), abs=1e-6)


def test_a_class_missing_from_a_training_fold_is_handled():
    X, y = _ordinal_data(n=80, seed=0)
    y = np.where(y == 3, 2, y)
    y[0] = 3  # one row of the top class: the fold that holds it out trains without the class
    cv = O.presto_cv([(X, y)], seeds=[0], n_lambda=4, n_folds=3)
    assert np.isfinite(cv.cv_brier).all() and cv.converged.all()
    assert np.isfinite(cv.fits[0].alpha).all() and (np.diff(cv.fits[0].alpha) > 0).all()


def test_probabilities_sum_to_one_and_crossing_is_counted():
    X, y = _ordinal_data(seed=9)
    fit = O.fit_po(X, y)
    prob = fit.predict_proba(X)
    assert prob.sum(1) == pytest.approx(np.ones(len(X))) and (prob >= 0).all()
    assert O.crossing_fraction(fit.alpha, fit.beta, X) == 0.0
    alpha, beta = np.array([0.0, 0.5]), np.array([[1.0, -1.0]])
    x = np.array([[-1.0], [0.0], [1.0]])  # boundaries cross at x = 0.25
    assert O.crossing_fraction(alpha, beta, x) == pytest.approx(1 / 3)
    want = 1 - 1 / (1 + np.exp(-(0.5 - x[:, 0])))
    assert O.rare_probability(alpha, beta, x) == pytest.approx(want)


# -------------------------------------------------------------------------------------------------
# The authors' generators


@pytest.mark.parametrize("kind", ["sparse", "dense", "po"])
def test_generator_weights_and_class_frequencies(kind):
    d = E.simulate(kind, 20_000, 10, 4, (0.0, 2.5, 4.5), np.random.default_rng(0))
    diffs = np.diff(d.beta, axis=1)
    if kind == "dense":
        assert np.abs(d.beta[:, 0]).max() <= 0.5 and np.abs(diffs).max() <= 0.5
        assert (diffs != 0).all()
    else:
        assert set(np.unique(d.beta[:, 0])) <= {0.0, 1.0}
        assert set(np.unique(np.abs(diffs))) <= ({0.0, 0.5} if kind == "sparse" else {0.0})
    assert ((d.X >= -1) & (d.X <= 1)).all()
    expected = O.class_probabilities(d.alpha, d.beta, d.X).mean(0)
    observed = np.bincount(d.y, minlength=4) / len(d.y)
    se = np.sqrt(expected * (1 - expected) / len(d.y))
    assert np.abs(observed - expected).max() < 4 * se.max()
    assert d.rare_prob == pytest.approx(O.class_probabilities(d.alpha, d.beta, d.X)[:, -1])


def test_sparse_generator_shares_match_the_authors_probabilities():
    rng = np.random.default_rng(1)
    draws = [E.simulate("sparse", 50, 10, 4, (0.0, 3.0, 5.0), rng) for _ in range(300)]
    first = np.concatenate([d.beta[:, 0] for d in draws])
    diffs = np.concatenate([np.diff(d.beta, axis=1).ravel() for d in draws])
    assert np.mean(first == 1.0) == pytest.approx(1 / 3, abs=0.03)
    assert np.mean(diffs != 0) == pytest.approx(1 / 3, abs=0.03)
    assert np.mean(diffs > 0) == pytest.approx(np.mean(diffs < 0), abs=0.03)


def test_generator_rejects_bad_settings():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="kind must be"):
        E.simulate("wide", 100, 3, 4, (0, 1, 2), rng)
    with pytest.raises(ValueError, match="increasing intercepts"):
        E.simulate("sparse", 100, 3, 4, (0, 2, 1), rng)
    with pytest.raises(ValueError, match="increasing intercepts"):
        E.simulate("sparse", 100, 3, 4, (0, 2), rng)
    with pytest.raises(RuntimeError, match="no valid draw"):
        E.simulate("sparse", 5, 3, 4, (0, 9, 30), rng, max_tries=3)


# -------------------------------------------------------------------------------------------------
# The calibration metric and the real-data splits


def test_osce_by_hand():
    predicted = np.array([0.1, 0.9, 0.2, 0.8])
    actual = np.array([0.0, 1.0, 1.0, 1.0])
    # Sorted: 0.1 (0), 0.2 (1) | 0.8 (1), 0.9 (1): bins observe 0.5 and 1.0.
    want = np.mean([(0.1 - 0.5) ** 2, (0.2 - 0.5) ** 2, (0.8 - 1) ** 2, (0.9 - 1) ** 2])
    assert E.osce(actual, predicted, n_bins=2) == pytest.approx(want)
    # The script's pairing: the unsorted predictions against the sorted bins' frequencies.
    coded = np.mean([(0.1 - 0.5) ** 2, (0.9 - 0.5) ** 2, (0.2 - 1) ** 2, (0.8 - 1) ** 2])
    assert E.osce_as_coded(actual, predicted, n_bins=2) == pytest.approx(coded)
    order = np.argsort(predicted)
    assert E.osce_as_coded(actual[order], predicted[order], 2) == pytest.approx(want)
    # Default bins: max(round(n / 100), 10); the first n mod bins bins one row larger.
    assert np.bincount(E._bin_of_sorted(1234, None)).tolist() == [103] * 10 + [102] * 2
    assert np.bincount(E._bin_of_sorted(23, 10)).tolist() == [3, 3, 3] + [2] * 7


def test_osce_rejects_bad_input():
    with pytest.raises(ValueError, match="one prediction per outcome"):
        E.osce([0, 1], [0.5])
    with pytest.raises(ValueError, match="0/1"):
        E.osce([0, 2], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        E.osce([0, 1], [0.5, 1.5])


def test_real_splits_and_rare_last():
    y = np.repeat([0, 1, 2], [5, 50, 45])
    assert E.rare_last(y, 0).tolist() == (2 - y).tolist()
    with pytest.raises(ValueError, match="end of the order"):
        E.rare_last(y, 1)
    splits = E.real_splits(np.zeros((100, 1)), y, 40, 30, seeds=[0, 1])
    for train, test in splits:
        assert len(train) == 40 and len(test) == 30 and not set(train) & set(test)
        assert set(y[train]) == set(y[test]) == {0, 1, 2}
    with pytest.raises(ValueError, match="cannot give"):
        E.real_splits(np.zeros((100, 1)), y, 90, 30, seeds=[0])


# -------------------------------------------------------------------------------------------------
# Input checks


def test_clear_errors_for_bad_input():
    X, y = _ordinal_data(n=50)
    with pytest.raises(ValueError, match="NaN"):
        O.fit_po(np.where(np.eye(50, 3) > 0, np.nan, X), y)
    with pytest.raises(ValueError, match="one label per row"):
        O.fit_po(X, y[:-1])
    with pytest.raises(ValueError, match="integer class labels"):
        O.fit_po(X, y + 0.5)
    with pytest.raises(ValueError, match=r"class\(es\) \[2\] have no rows"):
        O.fit_po(X, np.where(y == 2, 1, y))
    with pytest.raises(ValueError, match="lam must be >= 0"):
        O.fit_presto(X, y, -1.0)
    with pytest.raises(ValueError, match="labels go up to"):
        O.fit_po(X, y, n_classes=2)
    with pytest.raises(ValueError, match="one seed each"):
        O.presto_cv([(X, y)], seeds=[0, 1])
    with pytest.raises(ValueError, match="same features"):
        O.fit_many([(X, y), (X[:, :2], y)], "po")
    with pytest.raises(ValueError, match="n_folds"):
        O.fold_ids(5, 6, 0)
