"""Learning from aggregate responses: the loss identity, the closed-form interpolating estimator
against dense-matrix algebra, least squares and gradient descent, the asymptotic risk against its
known special cases and a small simulation, the Laplace release, and the experiment functions."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from repsuite.weak import aggregate as AG
from repsuite.weak import aggregate_experiment as AE
from repsuite.weak.bags import bag_means, bag_operator, make_bags


def _problem(n=60, d=5, k=4, seed=0, noise=0.5):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    theta = rng.normal(size=d)
    y = X @ theta + noise * rng.normal(size=n)
    bags = make_bags(n, k, seed)
    return X, y, theta, bags


# -------------------------------------------------------------------------------------------------
# Losses


@pytest.mark.parametrize("n,k", [(24, 4), (23, 4), (30, 1)])
def test_instance_loss_is_bag_loss_plus_spread_penalty(n, k):
    X, y, _, bags = _problem(n=n, k=k)
    ybar = AG.aggregate_responses(y, bags)
    for s in range(3):
        pred = torch.as_tensor(X @ np.random.default_rng(s).normal(size=X.shape[1]))
        inst = AG.instance_level_loss(pred, ybar, bags)
        both = AG.bag_level_loss(pred, ybar, bags) + AG.spread_penalty(pred, bags)
        assert float(inst) == pytest.approx(float(both), abs=1e-10)
        assert float(AG.interpolating_loss(pred, ybar, bags, 1.0)) == pytest.approx(float(inst))


def test_bag_level_loss_is_the_papers_mean_over_equal_bags():
    X, y, theta, bags = _problem(n=40, k=5)
    ybar = bag_means(y, bags)
    pred = X @ theta
    fbar = bag_means(pred, bags)
    expected = np.mean((ybar - fbar) ** 2)
    assert float(AG.bag_level_loss(torch.as_tensor(pred), ybar, bags)) == pytest.approx(expected)


def test_losses_reject_bad_input():
    _, y, _, bags = _problem(n=20, k=4)
    pred = torch.zeros(20, dtype=torch.float64)
    with pytest.raises(ValueError, match="bag responses for"):
        AG.bag_level_loss(pred, np.zeros(3), bags)
    with pytest.raises(ValueError, match="NaN"):
        AG.instance_level_loss(pred * float("nan"), np.zeros(5), bags)
    with pytest.raises(ValueError, match="rho must be"):
        AG.interpolating_loss(pred, np.zeros(5), bags, -0.1)
    with pytest.raises(ValueError, match="1-D torch tensor"):
        AG.spread_penalty(np.zeros(20), bags)
    with pytest.raises(ValueError, match="NaN"):
        AG.aggregate_responses(np.r_[y[:-1], np.nan], bags)


# -------------------------------------------------------------------------------------------------
# Closed form


def test_bag_statistics_match_the_dense_averaging_operator():
    X, y, _, bags = _problem(n=23, k=4)
    P = bag_operator(bags, dense=True).numpy()
    assert np.allclose(P @ P, P) and np.allclose(P, P.T)
    assert np.allclose(bag_means((np.eye(23) - P) @ X, bags), 0)
    s = AG.bag_statistics(X, bag_means(y, bags), bags)
    assert s.gram.numpy() == pytest.approx(X.T @ X)
    assert s.bag_gram.numpy() == pytest.approx(X.T @ P @ X)
    assert s.moment.numpy() == pytest.approx(X.T @ P @ y)
    assert (s.n, s.n_bags) == (23, 6)


def test_interpolating_estimator_solves_its_normal_equations():
    X, y, _, bags = _problem(n=50, k=5)
    P = bag_operator(bags, dense=True).numpy()
    rhos = [0.0, 0.3, 1.0, 2.5]
    theta = AG.interpolating_estimator(X, bag_means(y, bags), bags, rhos).numpy()
    for rho, t in zip(rhos, theta, strict=True):
        M = X.T @ P @ X + rho * X.T @ (np.eye(50) - P) @ X
        assert t == pytest.approx(np.linalg.solve(M, X.T @ P @ y), abs=1e-10)
    # rho = 1 is least squares of the bag responses copied to every member, Py on X.
    assert theta[2] == pytest.approx(np.linalg.lstsq(X, P @ y, rcond=None)[0], abs=1e-10)


def test_with_bags_of_one_every_rho_gives_ordinary_least_squares():
    X, y, _, bags = _problem(n=30, k=1)
    theta = AG.interpolating_estimator(X, bag_means(y, bags), bags, [0.0, 0.5, 1.0]).numpy()
    ols = np.linalg.lstsq(X, y, rcond=None)[0]
    for t in theta:
        assert t == pytest.approx(ols, abs=1e-10)


def test_closed_form_minimises_the_interpolating_loss():
    X, y, _, bags = _problem(n=24, d=3, k=4)
    ybar = bag_means(y, bags)
    Xt = torch.as_tensor(X)

    def loss(theta):
        return AG.interpolating_loss(Xt @ theta, ybar, bags, 0.3)

    closed = AG.interpolating_estimator(X, ybar, bags, 0.3)[0]
    at = closed.clone().requires_grad_(True)
    loss(at).backward()
    assert at.grad.abs().max() < 1e-10

    # The loss is quadratic: one Newton step from zero, by autograd, reaches the minimiser.
    zero = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(zero), zero, create_graph=True)
    hess = torch.stack([torch.autograd.grad(g, zero, retain_graph=True)[0] for g in grad])
    assert torch.linalg.eigvalsh(hess).min() > 0
    newton = -torch.linalg.solve(hess, grad.detach())
    assert newton.numpy() == pytest.approx(closed.numpy(), abs=1e-6)


def test_bag_level_fit_is_unbiased_given_the_features_with_more_bags_than_features():
    X, _, theta, bags = _problem(n=120, d=6, k=10)  # 12 bags > 6 features
    fit = AG.interpolating_estimator(X, bag_means(X @ theta, bags), bags, [0.0, 1.0]).numpy()
    assert fit[0] == pytest.approx(theta, abs=1e-10)
    assert np.linalg.norm(fit[1] - theta) > 0.1  # the instance-level fit shrinks


def test_bag_level_fit_with_too_few_bags_is_minimum_norm_least_squares():
    X, y, _, bags = _problem(n=40, d=8, k=10)  # 4 bags, 8 features
    ybar = bag_means(y, bags)
    fit = AG.interpolating_estimator(X, ybar, bags, [0.0]).numpy()[0]
    xbar = bag_means(X, bags)
    assert fit == pytest.approx(np.linalg.lstsq(xbar, ybar, rcond=None)[0], abs=1e-9)


def test_solve_path_checks_its_arguments():
    W = torch.eye(3, dtype=torch.float64)
    b = torch.ones(3, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="rho must be"):
        AG.solve_path(W, W, b, [-1.0], n_bags=5)
    with pytest.raises(ValueError, match="same square"):
        AG.solve_path(W, torch.eye(2, dtype=torch.float64), b, [0.5], n_bags=5)
    with pytest.raises(ValueError, match="ridge"):
        AG.solve_path(W, W, b, [0.5], n_bags=5, ridge=-1)
    with pytest.raises(ValueError, match="X must be"):
        AG.bag_statistics(np.zeros(5), np.zeros(1), np.zeros(5, dtype=int))


# -------------------------------------------------------------------------------------------------
# Asymptotic risk


def test_asymptotic_risk_special_cases():
    # Bag-level: least squares on m = n/k bags, noise / (m/d - 1); below one bag per feature the
    # minimum-norm limit; bags of one: ordinary least squares at any rho.
    assert AG.asymptotic_risk(8, 2, 0.0, noise=0.5).risk == pytest.approx(0.5 / 3)
    a = AG.asymptotic_risk(4, 8, 0.0, signal=2.0, noise=1.0)
    assert (a.bias2, a.variance) == pytest.approx((2 * 0.5, 1.0))
    assert AG.asymptotic_risk(2, 2, 0.0).risk == math.inf
    for rho in [0.0, 0.4, 1.0]:
        assert AG.asymptotic_risk(5, 1, rho).risk == pytest.approx(0.25)
    # Instance-level with n >> d: theta_hat -> theta* / k, so bias^2 -> (1 - 1/k)^2 signal.
    big = AG.asymptotic_risk(1e6, 4, 1.0, signal=3.0)
    assert big.bias2 == pytest.approx(3 * 0.75**2, rel=1e-4) and big.variance < 1e-5


def test_asymptotic_risk_is_continuous_at_rho_zero():
    near = AG.asymptotic_risk(8, 4, 1e-7, noise=0.7)
    at = AG.asymptotic_risk(8, 4, 0.0, noise=0.7)
    assert near.risk == pytest.approx(at.risk, rel=1e-4)


def test_asymptotic_risk_matches_a_small_simulation():
    d, n, k, rho, snr = 40, 320, 4, 0.3, 2.0
    sim = AE.simulate_linear(d, [n], [k], [snr], [rho], seeds=[0, 1], reps=40)
    theory = AG.asymptotic_risk(n / d, k, rho, noise=1 / snr)
    assert sim.risk.mean() == pytest.approx(theory.risk, rel=0.06)
    assert sim.bias2.mean() == pytest.approx(theory.bias2, rel=0.06)
    assert sim.variance.mean() == pytest.approx(theory.variance, rel=0.12)


def test_asymptotic_risk_rejects_impossible_designs():
    with pytest.raises(ValueError, match="n > d"):
        AG.asymptotic_risk(0.8, 2, 0.5)
    with pytest.raises(ValueError, match="integer bag size"):
        AG.asymptotic_risk(4, 2.5, 0.5)
    with pytest.raises(ValueError, match=">= 0"):
        AG.asymptotic_risk(4, 2, -0.5)


# -------------------------------------------------------------------------------------------------
# Label privacy


def test_laplace_noise_has_the_laplace_spread():
    z = AG.laplace_noise((200_000,), generator=torch.Generator().manual_seed(0))
    assert float(z.mean()) == pytest.approx(0, abs=0.01)
    assert float(z.std()) == pytest.approx(math.sqrt(2), rel=0.01)
    assert float(z.abs().mean()) == pytest.approx(1.0, rel=0.01)


def test_private_bag_means_clip_then_add_noise_of_the_right_scale():
    y = np.array([10.0, -10.0, 0.5, 0.5, 3.0, 1.0])
    bags = np.array([0, 0, 1, 1, 2, 2])
    quiet = AG.private_bag_means(y, bags, bound=2.0, epsilon=1e12)
    assert quiet.numpy() == pytest.approx([0.0, 0.5, 1.5], abs=1e-9)
    assert AG.laplace_scale(2.0, 4, 0.5) == pytest.approx(2.0)
    assert AG.private_noise_variance(2.0, 4, 0.5) == pytest.approx(8 * 4 / (4 * 0.25))
    many = np.zeros(40_000)
    g = torch.Generator().manual_seed(1)
    noisy = AG.private_bag_means(many, np.arange(40_000) // 2, bound=1.0, epsilon=2.0, generator=g)
    assert float(noisy.std()) == pytest.approx(math.sqrt(2) * 0.5, rel=0.02)
    with pytest.raises(ValueError, match="bound and epsilon"):
        AG.private_bag_means(y, bags, bound=0.0, epsilon=1.0)


# -------------------------------------------------------------------------------------------------
# Experiment functions


def test_simulation_is_reproducible_and_its_parts_add_up():
    args = (20, [80, 160], [1, 4], [1.0, 4.0], [0.0, 0.3, 1.0], [0, 1], 6)
    a, b = AE.simulate_linear(*args), AE.simulate_linear(*args)
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 2 * 2 * 2 * 2 * 3
    well = a[(a.rho == 0) & (a.m > 20)]
    assert (well.bias2.abs() < 1e-20).all()
    assert np.allclose(a.risk, a.bias2 + a.variance, rtol=0.5)
    with pytest.raises(ValueError, match="do not divide"):
        AE.simulate_linear(20, [81], [2], [1.0], [0.0], [0], 4)
    with pytest.raises(ValueError, match="must exceed"):
        AE.simulate_linear(20, [20], [1], [1.0], [0.0], [0], 4)


def test_private_simulation_and_its_theory_agree_roughly():
    kw = {"epsilon": 1.0, "bound_sd": 3.0}
    sim = AE.simulate_linear(10, [1000], [1, 5], [1.0], [1.0], [0, 1], 10, **kw)
    th = AE.theory_frame(10, [1000], [1, 5], [1.0], [1.0], **kw)
    assert sim.groupby("k").risk.mean().to_numpy() == pytest.approx(th.risk.to_numpy(), rel=0.2)


def test_claim_functions_on_a_theory_grid():
    th = AE.theory_frame(100, [400, 800], [1, 2, 4], [1.0, 4.0], [0.0, 0.1, 0.2, 0.5, 1.0])
    th["seed"] = 0
    pick = AE.pick_interior_design(th, 100, 2.0)
    assert pick["k"] > 1 and pick["n"] / pick["k"] >= 200 and 0 < pick["rho"] < 1
    assert pick["predicted_gain"] > 0
    assert float(AE.bag_size_increase(th, 100, 2.0, 0.0).iloc[0]) > 0
    assert float(AE.snr_gap_increase(th, 100, 2.0).iloc[0]) > 0
    rms, table = AE.theory_deviation(th, th.drop(columns="seed"), 100, 2.0)
    assert float(rms.iloc[0]) == pytest.approx(0.0) and (table.deviation == 0).all()
    with pytest.raises(ValueError, match="no single row"):
        AE.at_design(th, n=400, k=3, snr=1.0, rho=0.0)


def test_prepare_regression_uses_the_training_split_only():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 3)) * [1, 10, 100]
    X[0] = 1e6
    y = X[:, 0] + rng.normal(size=200)
    s = AE.prepare_regression(X, y, seed=0, test_size=0.25, winsor_percent=1.0)
    assert s["X_train"].shape == (150, 4) and (s["X_train"][:, -1] == 1).all()
    assert np.median(s["X_train"][:, :3], 0) == pytest.approx(0, abs=1e-12)
    assert s["y_train"].mean() == pytest.approx(0) and s["y_train"].std() == pytest.approx(1)
    assert np.abs(np.r_[s["X_train"], s["X_test"]][:, :3]).max() < 10  # the outlier winsorised
    with pytest.raises(ValueError, match="NaN"):
        AE.prepare_regression(np.r_[X[:-1], [[np.nan] * 3]], y, seed=0)
    with pytest.raises(ValueError, match="one label per row"):
        AE.prepare_regression(X, y[:-1], seed=0)


def test_real_data_runs_choose_one_rho_per_seed_and_bag_size():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 4))
    y = X @ [1.0, -1.0, 0.5, 0.0] + 0.5 * rng.normal(size=300)
    runs = AE.real_data_runs(X, y, bag_sizes=[1, 5], rhos=[0.0, 0.1, 1.0], seeds=[0, 1])
    assert (runs.groupby(["seed", "k"]).chosen.sum() == 1).all()
    summary = AE.real_data_summary(runs)
    assert len(summary) == 4
    ones = summary[summary.k == 1]
    assert np.allclose(ones.bag, ones.instance) and np.allclose(ones.bag, ones.interpolating)
    with pytest.raises(ValueError, match="too few"):
        AE.cv_bag_loss(X, np.zeros(3), np.repeat(np.arange(3), 100), [0.0], folds=5, seed=0)
