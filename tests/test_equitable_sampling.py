"""Adaptive sampling for equitable training sets: simulator, ridge from statistics, learning curves,
the greedy rule against brute force, budgets and the experiment driver, on small inputs."""

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares
from sklearn.metrics import r2_score as sk_r2

from repsuite.fairness import sampling as S
from repsuite.fairness import sampling_experiment as E

LAMBDAS = np.logspace(-1, 4, 16)


def _population(h2=(0.5, 0.3), M=40, seed=0):
    return E.simulate_population(n_snps=M, n_causal=8, fst=0.1, heritability=list(h2), rho=0.8,
                                 seed=seed)


def _explicit_ridge(X, y, groups, lam):
    """Ridge with a free intercept per group, written on the raw rows."""
    Xc, yc = X.copy(), y.copy()
    for g in np.unique(groups):
        Xc[groups == g] -= X[groups == g].mean(0)
        yc[groups == g] -= y[groups == g].mean()
    w = np.linalg.solve(Xc.T @ Xc + lam * np.eye(X.shape[1]), Xc.T @ yc)
    mu = {g: (y[groups == g] - X[groups == g] @ w).mean() for g in np.unique(groups)}
    return w, mu


# -------------------------------------------------------------------------------------------------
# The Balding-Nichols simulator


@pytest.mark.parametrize("fst,n_groups", [(0.1, 2), (0.05, 4), (0.2, 3)])
def test_balding_nichols_fst_is_close_to_the_target_on_10k_snps(fst, n_groups):
    rng = np.random.default_rng(1)
    p = rng.uniform(0.05, 0.95, 10_000)
    freqs = E.balding_nichols(p, n_groups, fst, rng)
    assert freqs.shape == (n_groups, 10_000)
    assert abs(E.fst_estimate(freqs, p) - fst) < 0.2 * fst


def test_balding_nichols_rejects_bad_inputs():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="fst must be in"):
        E.balding_nichols([0.5], 2, 1.5, rng)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        E.balding_nichols([0.0, 0.5], 2, 0.1, rng)
    with pytest.raises(ValueError, match="heritability must lie in"):
        _population(h2=(0.5, 1.0))
    with pytest.raises(ValueError, match="n_causal"):
        E.simulate_population(n_snps=5, n_causal=9, fst=0.1, heritability=[0.5], rho=0.5, seed=0)


def test_heritability_is_exact_and_the_true_effects_reach_it():
    pop = _population(h2=(0.6, 0.25))
    var = pop.moments()[1]
    np.testing.assert_allclose((var * pop.beta**2).sum(1), [0.6, 0.25], rtol=1e-12)
    # The true effects with the true group means explain exactly h2 in each group.
    mean = pop.moments()[0]
    w = torch.as_tensor(pop.beta, dtype=torch.float64)  # (G, M): one predictor per group
    mu = torch.zeros(2, 2, dtype=torch.float64)
    r2 = pop.r2(w, mu).numpy()
    assert r2[0, 0] == pytest.approx(0.6) and r2[1, 1] == pytest.approx(0.25)
    assert (mean * pop.beta).sum() != 0  # groups differ in mean: intercepts matter


def test_population_r2_matches_sklearn_on_a_large_sample():
    pop = _population()
    rng = np.random.default_rng(3)
    w = torch.as_tensor(pop.beta[0] * 0.7 + rng.normal(0, 0.05, pop.n_snps))
    mu = torch.tensor([0.1, -0.2], dtype=torch.float64)
    exact = pop.r2(w, mu).numpy()
    for g in range(2):
        X, y = pop.sample(g, 60_000, rng)
        assert sk_r2(y, mu[g].item() + X @ w.numpy()) == pytest.approx(exact[g], abs=0.015)


def test_r2_score_matches_sklearn_and_checks_inputs():
    rng = np.random.default_rng(0)
    y, p = rng.normal(size=50), rng.normal(size=50)
    assert S.r2_score(y, p) == pytest.approx(sk_r2(y, p), rel=1e-12)
    with pytest.raises(ValueError, match="equally long"):
        S.r2_score(y, p[:-1])
    with pytest.raises(ValueError, match="constant"):
        S.r2_score(np.ones(5), p[:5])


# -------------------------------------------------------------------------------------------------
# Statistics and ridge regression


@pytest.mark.parametrize("n,stride", [(0, 1), (7, 1), (20, 1), (33, 2), (60, 3), (60, 1)])
def test_stream_prefix_is_the_gram_of_the_first_rows(n, stride):
    rng = np.random.default_rng(n)
    X, y = rng.normal(size=(60, 6)), rng.normal(size=60)
    s = S.Stream(X, y, chunk=5, stride=stride)
    Z = np.column_stack([X, np.ones(60), y])[:n]
    np.testing.assert_allclose(s.prefix(n).numpy(), Z.T @ Z, atol=1e-10)


def test_stream_rejects_ragged_or_bad_data():
    X, y = np.zeros((10, 3)), np.zeros(10)
    with pytest.raises(ValueError, match="whole strides"):
        S.Stream(X, y, chunk=3)
    with pytest.raises(ValueError, match="one phenotype a row"):
        S.Stream(X, y[:9], chunk=5)
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        S.Stream(X, y, chunk=5)
    with pytest.raises(ValueError, match="asked for 11"):
        S.Stream(np.zeros((10, 3)), y, chunk=5).prefix(11)


def test_ridge_from_statistics_equals_ridge_on_the_rows_including_an_empty_group():
    rng = np.random.default_rng(2)
    X0, X1 = rng.normal(size=(30, 5)), rng.normal(1.0, 1.0, size=(20, 5))
    y0, y1 = X0 @ rng.normal(size=5) + 1.0, X1 @ rng.normal(size=5) - 2.0
    streams = [S.Stream(X0, y0, 10), S.Stream(X1, y1, 10), S.Stream(X1, y1, 10)]
    w, mu = S.ridge_solve(S.stats_of(streams, [30, 20, 0]), 3.0)
    X, y = np.vstack([X0, X1]), np.concatenate([y0, y1])
    w_ref, mu_ref = _explicit_ridge(X, y, np.repeat([0, 1], [30, 20]), 3.0)
    np.testing.assert_allclose(w.numpy(), w_ref, atol=1e-10)
    assert mu[0].item() == pytest.approx(mu_ref[0]) and mu[1].item() == pytest.approx(mu_ref[1])
    # A group without data falls back on the sample-weighted pooled intercept.
    assert mu[2].item() == pytest.approx((30 * mu_ref[0] + 20 * mu_ref[1]) / 50)
    # SSE from statistics equals the residual sum of squares on the rows.
    resid = y1 - mu[1].item() - X1 @ w.numpy()
    assert S.sse(streams[1].prefix(20), w, mu[1]).item() == pytest.approx((resid**2).sum())


def test_gcv_picks_the_penalty_a_brute_force_hat_matrix_picks():
    rng = np.random.default_rng(4)
    X, g = rng.normal(size=(40, 8)), np.repeat([0, 1], [25, 15])
    y = X @ rng.normal(size=8) + rng.normal(size=40) + 3 * g
    streams = [S.Stream(X[g == 0], y[g == 0], 5), S.Stream(X[g == 1], y[g == 1], 5)]
    lam, w, _ = S.ridge_gcv(S.stats_of(streams, [25, 15]), LAMBDAS)
    onehot = np.eye(2)[g]
    scores = []
    for lv in LAMBDAS:  # hat matrix of [X, one-hot] with the penalty on X only
        A = np.column_stack([X, onehot])
        pen = np.diag([lv] * 8 + [0, 0])
        H = A @ np.linalg.solve(A.T @ A + pen, A.T)
        rss = ((y - H @ y) ** 2).sum()
        scores.append(rss / 40 / (1 - np.trace(H) / 40) ** 2)
    assert lam == pytest.approx(LAMBDAS[int(np.argmin(scores))])
    w_ref, _ = _explicit_ridge(X, y, g, lam)
    np.testing.assert_allclose(w.numpy(), w_ref, atol=1e-9)


def test_ridge_needs_two_samples_and_a_positive_penalty():
    s = S.Stream(np.ones((5, 2)), np.arange(5.0), 1)
    with pytest.raises(ValueError, match="at least 2 training samples"):
        S.ridge_solve(S.stats_of([s], [1]), 1.0)
    with pytest.raises(ValueError, match="must be positive"):
        S.ridge_solve(S.stats_of([s], [5]), 0.0)


def test_cross_validated_points_equal_an_explicit_fold_loop():
    pop = _population(M=12)
    streams = E.draw_streams(pop, [60, 60], 4, np.random.default_rng(5))
    k, lam = np.array([2, 3]), 2.0
    pts = S.learning_curve_points(streams, k, n_folds=5, levels=(0.5,), lam=lam,
                                  rng=np.random.default_rng(0))
    Z = [s.Z.numpy()[:kk * 20] for s, kk in zip(streams, k, strict=True)]
    sse = np.zeros(2)
    for f in range(5):
        fold = [(np.arange(len(z)) // 4) % 5 for z in Z]
        X = np.vstack([z[fd != f, :12] for z, fd in zip(Z, fold, strict=True)])
        y = np.concatenate([z[fd != f, -1] for z, fd in zip(Z, fold, strict=True)])
        groups = np.concatenate([np.full((fd != f).sum(), g) for g, fd in enumerate(fold)])
        w, mu = _explicit_ridge(X, y, groups, lam)
        for g, (z, fd) in enumerate(zip(Z, fold, strict=True)):
            t = z[fd == f]
            sse[g] += ((t[:, -1] - mu[g] - t[:, :12] @ w) ** 2).sum()
    sst = np.array([((z[:, -1] - z[:, -1].mean()) ** 2).sum() for z in Z])
    np.testing.assert_allclose(pts[:, -1, 1], 1 - sse / sst, atol=1e-10)
    np.testing.assert_allclose(pts[:, -1, 0], [32, 48])  # training size: 4 of 5 folds
    np.testing.assert_allclose(pts[:, 0, 0], [16, 24])  # half of the out-of-fold chunks
    with pytest.raises(ValueError, match="do not fit"):
        S.learning_curve_points(streams, [2, 4], n_folds=5, levels=(0.5,), lam=lam,
                                rng=np.random.default_rng(0))


# -------------------------------------------------------------------------------------------------
# Learning curves


def test_learning_curve_recovers_exact_power_law_points():
    n = np.array([50, 100, 200, 400, 800.0])
    r2 = 1 - (3.0 * n**-0.5 + 0.55)
    a, b, c = S.fit_learning_curve(n, r2)
    assert b == pytest.approx(0.5, rel=0.03) and c == pytest.approx(0.55, abs=0.01)
    assert S.predict_learning_curve((a, b, c), 1600) == pytest.approx(1 - (3 * 1600**-0.5 + 0.55),
                                                                      abs=2e-3)


def test_learning_curve_fit_is_as_good_as_a_general_bounded_solver():
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = np.sort(rng.uniform(20, 1000, 4))
        r2 = 0.4 - 2 * n**-0.6 + rng.normal(0, 0.03, 4)
        err = 1 - r2
        params = S.fit_learning_curve(n, r2)
        ours = ((1 - S.predict_learning_curve(params, n) - err) ** 2).sum()
        ref = least_squares(lambda t, n=n, err=err: t[0] * (n / n.max()) ** -t[1] + t[2] - err,
                            [0.1, 0.5, 0.5], bounds=([0, 0.05, 0], [np.inf, 2.0, 1])).cost * 2
        assert ours <= ref + 1e-4
        assert params[0] >= 0 and 0 <= params[2] <= 1


def test_learning_curve_rejects_too_few_or_bad_points():
    with pytest.raises(ValueError, match=">= 2 points"):
        S.fit_learning_curve([10], [0.1])
    with pytest.raises(ValueError, match="positive"):
        S.fit_learning_curve([0, 10], [0.1, 0.2])
    with pytest.raises(ValueError, match="two different training sizes"):
        S.fit_learning_curve([10, 10], [0.1, 0.2])


# -------------------------------------------------------------------------------------------------
# Objectives, budgets and the greedy rule

CURVES = np.array([[2.0, 0.5, 0.5], [3.0, 0.5, 0.6], [1.5, 0.7, 0.55]])


def _brute_force(curves, budget, costs, batch, objective, pilot=1):
    best, arg = -np.inf, None
    top = [int(budget // (c * batch)) for c in costs]
    for k in itertools.product(*[range(pilot, t + 1) for t in top]):
        k = np.array(k)
        if (k * batch) @ costs > budget:
            continue
        r2 = [S.predict_learning_curve(c, n) for c, n in zip(curves, k * batch, strict=True)]
        v = float(S.objective_value(objective, torch.tensor(r2)))
        if v > best + 1e-12:
            best, arg = v, k * batch
    return best, arg


@pytest.mark.parametrize("objective", S.OBJECTIVES)
@pytest.mark.parametrize("G", [2, 3])
def test_greedy_on_known_curves_reaches_the_brute_force_optimum_at_equal_costs(objective, G):
    curves, costs = CURVES[:G], [1.0] * G
    counts = S.greedy_allocation(curves, budget=1200, costs=costs, objective=objective, batch=50)
    best, _ = _brute_force(curves, 1200, np.array(costs), 50, objective)
    r2 = [S.predict_learning_curve(c, n) for c, n in zip(curves, counts, strict=True)]
    assert float(S.objective_value(objective, torch.tensor(r2))) == pytest.approx(best, abs=1e-9)
    assert counts.sum() == 1200


def test_greedy_matches_the_kkt_optimum_of_a_weighted_sum_with_unequal_costs():
    # Same exponent b: maximising sum_g w_g (c_g' - a_g n_g^-b) under sum cost_g n_g = B gives
    # n_g proportional to (w_g a_g / cost_g)^(1 / (1 + b)).
    a, b = np.array([3.0, 5.0]), 0.6
    curves = np.column_stack([a, [b, b], [0.4, 0.5]])
    costs, budget, batch = np.array([1.0, 2.0]), 6000, 20
    ratio = (0.5 * a / costs) ** (1 / (1 + b))
    kkt = budget * ratio / (ratio @ costs)
    counts = S.greedy_allocation(curves, budget=budget, costs=costs, objective="sum", batch=batch)
    assert np.all(np.abs(counts - kkt) <= 2 * batch)
    S.check_budget(counts, costs, budget)


def test_greedy_shifts_samples_away_from_a_group_whose_cost_rises():
    for objective in ("sum", "nash"):
        cheap = S.greedy_allocation(CURVES[:2], budget=2000, costs=[1, 1], objective=objective,
                                    batch=20)
        dear = S.greedy_allocation(CURVES[:2], budget=2000, costs=[1, 2], objective=objective,
                                   batch=20)
        assert 0.2 < cheap[1] / cheap.sum() < 0.8  # an interior optimum, so a shift can show
        assert dear[1] / dear.sum() < cheap[1] / cheap.sum() - 0.05


def test_objectives_and_marginal_gains_by_hand():
    r2 = torch.tensor([0.2, 0.4], dtype=torch.float64)
    assert S.objective_value("maxmin", r2).item() == pytest.approx(0.2)
    assert S.objective_value("sum", r2, [0.25, 0.75]).item() == pytest.approx(0.35)
    assert S.objective_value("nash", r2).item() == pytest.approx(0.5 * np.log(0.08))
    # Below the floor the log continues along its tangent: increasing and concave throughout.
    low = S.objective_value("nash", torch.tensor([-0.1, 0.5], dtype=torch.float64)).item()
    floor = S.R2_FLOOR
    assert low == pytest.approx(0.5 * (np.log(floor) + (-0.1 - floor) / floor) + 0.5 * np.log(0.5))
    grid = torch.linspace(-0.5, 0.5, 201, dtype=torch.float64)
    u = S.objective_value("nash", torch.stack([grid, grid], -1))
    assert torch.all(torch.diff(u) > 0) and torch.all(torch.diff(u, 2) <= 1e-9)
    gains = S.marginal_gains("maxmin", r2, torch.tensor([0.3, 0.5], dtype=torch.float64))
    np.testing.assert_allclose(gains.numpy(), [0.1, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="objective must be one of"):
        S.objective_value("mean", r2)
    with pytest.raises(ValueError, match="3 weights for 2 groups"):
        S.objective_value("sum", r2, [0.2, 0.3, 0.5])


def test_ties_go_to_the_worst_group_and_unaffordable_groups_are_skipped():
    pick, _ = S.choose_next("maxmin", [0.3, 0.1, 0.2], [0.3, 0.1, 0.2], [1, 1, 1], [True] * 3)
    assert pick == 1
    pick, _ = S.choose_next("sum", [0.1, 0.1], [0.5, 0.2], [1, 1], [False, True])
    assert pick == 1
    with pytest.raises(ValueError, match="no group's batch fits"):
        S.choose_next("sum", [0.1], [0.2], [1], [False])


def test_fixed_allocations_and_the_grid_never_overspend():
    rng = np.random.default_rng(0)
    for _ in range(200):
        G = int(rng.integers(2, 5))
        costs, shares = rng.uniform(0.5, 3, G), rng.dirichlet(np.ones(G))
        budget = float(rng.uniform(10, 5000))
        for kind in S.FIXED:
            counts = S.fixed_allocation(kind, budget, costs, shares)
            assert counts @ costs <= budget + 1e-9 and np.all(counts >= 0)
        grid = S.budget_grid(budget, costs, 5)
        assert np.all(grid @ costs <= budget + 1e-9)
    assert S.fixed_allocation("equal", 1200, [1, 2], [0.9, 0.1]).tolist() == [400, 400]
    assert S.fixed_allocation("proportional", 1000, [1, 1], [0.9, 0.1]).tolist() == [900, 100]
    assert S.fixed_allocation("majority", 1000, [2, 1], [0.9, 0.1]).tolist() == [500, 0]
    assert len(S.budget_grid(100, [1, 1, 1], 4)) == 15  # compositions of 4 into 3 parts
    with pytest.raises(ValueError, match="spends 1300 > budget 1200"):
        S.check_budget([500, 400], [1, 2], 1200)
    with pytest.raises(ValueError, match="fixed allocation must be one of"):
        S.fixed_allocation("random", 100, [1, 1], [0.5, 0.5])
    with pytest.raises(ValueError, match="cost must be positive"):
        S.fixed_allocation("equal", 100, [1, 0], [0.5, 0.5])


# -------------------------------------------------------------------------------------------------
# The adaptive sampler and the experiment driver


def _small_run(objective="maxmin", costs=(1, 2), seed=0):
    pop = _population(M=10)
    streams = E.draw_streams(pop, [240, 240], 5, np.random.default_rng(1))
    return S.adaptive_sampling(streams, budget=240, costs=list(costs), objective=objective,
                               batch=20, pilot_batches=2, n_folds=4, lambdas=LAMBDAS, seed=seed)


def test_adaptive_run_keeps_to_the_budget_and_logs_every_round():
    run = _small_run()
    T = len(run.chosen)
    assert run.counts.shape == (T + 1, 2) and run.w.shape == (T + 1, 10)
    spent = run.counts @ np.array([1.0, 2.0])
    assert np.all(spent <= 240) and spent[-1] > 240 - 20  # stops only when no batch fits
    assert np.all(np.diff(run.counts.sum(1)) == 20)
    np.testing.assert_array_equal(np.diff(run.counts, axis=0).argmax(1), run.chosen)
    again = _small_run()
    np.testing.assert_array_equal(run.counts, again.counts)  # same seed, same path


def test_adaptive_sampler_checks_its_inputs():
    pop = _population(M=10)
    streams = E.draw_streams(pop, [100, 100], 5, np.random.default_rng(1))
    kwargs = dict(budget=100, costs=[1, 1], batch=20, n_folds=4, lambdas=LAMBDAS, seed=0)
    with pytest.raises(ValueError, match="objective must be one of"):
        S.adaptive_sampling(streams, objective="median", **kwargs)
    with pytest.raises(ValueError, match="chunks of batch / n_folds"):
        S.adaptive_sampling(streams, objective="sum", **{**kwargs, "n_folds": 5})
    with pytest.raises(ValueError, match="spends 120 > budget 100"):
        S.adaptive_sampling(streams, objective="sum", pilot_batches=3, **kwargs)
    with pytest.raises(ValueError, match="fewer than the budget could buy"):
        S.adaptive_sampling(streams, objective="sum", **{**kwargs, "budget": 200})


def test_a_seed_of_the_study_with_three_groups_is_complete_and_reproducible():
    design = E.Design(n_snps=12, n_causal=3, fst=0.1, heritability=(0.5, 0.4, 0.3), rho=0.8,
                      shares=(0.8, 0.1, 0.1), budget=240, batch=20, n_folds=4, lambdas=LAMBDAS)
    kwargs = dict(costs={"equal": [1, 1, 1], "unequal": [1, 2, 2]},
                  scenarios=[("maxmin", "equal"), ("sum", "unequal")],
                  objectives=["maxmin", "sum"], oracle_steps=3, oracle_replicates=2)
    a, b = E.run_seed(design, 3, **kwargs), E.run_seed(design, 3, **kwargs)
    assert a.table.equals(b.table)
    strategies = set(a.table.strategy)
    assert strategies == {"adaptive", "oracle", *S.FIXED}
    assert np.all(a.table.spent <= 240 + 1e-9)
    assert len(a.curve_check) == 3
    with pytest.raises(ValueError, match="scenario"):
        E.run_seed(design, 3, **{**kwargs, "scenarios": [("nash", "equal")]})
