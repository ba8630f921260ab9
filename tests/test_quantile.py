"""Quantile scoring, rearrangement, conformal calibration, the base-model library and the
aggregators, against references written independently here (scikit-learn, numpy, loops)."""

import math

import numpy as np
import pytest
import torch
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import QuantileRegressor
from sklearn.metrics import mean_pinball_loss
from sklearn.neighbors import NearestNeighbors

from repsuite.regression import quantile as Q
from repsuite.regression import quantile_aggregation as QA
from repsuite.regression import quantile_experiment as QE

TAUS = [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95]


def _random_quantiles(n=300, k=7, seed=0, scale=1.0):
    """Rows of noisy, often crossing, quantile predictions and their responses."""
    rng = np.random.default_rng(seed)
    q = np.sort(rng.normal(size=(n, k)), 1) + scale * rng.normal(size=(n, k))
    return q, rng.normal(size=n)


# -------------------------------------------------------------------------------------------------
# Scores


def test_pinball_loss_by_hand():
    # y = 1, q = 3 at tau = 0.25: over-prediction by 2 costs (1 - 0.25) * 2 = 1.5;
    # at tau = 0.75 an under-prediction by 2 (q = -1) costs 0.75 * 2 = 1.5.
    q = np.array([[3.0, -1.0]])
    assert Q.pinball_loss(q, [1.0], [0.25, 0.75], reduction="level").tolist() == [1.5, 1.5]
    assert float(Q.wis(q, [1.0], [0.25, 0.75])) == pytest.approx(3.0)


def test_pinball_loss_matches_scikit_learn_per_level():
    q, y = _random_quantiles()
    ours = Q.pinball_loss(q, y, TAUS, reduction="level").numpy()
    ref = [mean_pinball_loss(y, q[:, k], alpha=t) for k, t in enumerate(TAUS)]
    assert ours == pytest.approx(ref, rel=1e-12)


def test_pinball_gradient_is_exact():
    q = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, dtype=torch.float64, requires_grad=True)
    taus = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, y: Q.pinball(q, y, taus), (q, y))


def test_interval_score_identity_with_two_pinball_losses():
    rng = np.random.default_rng(1)
    lo, y = rng.normal(size=500), rng.normal(size=500)
    hi = lo + rng.exponential(size=500)
    for alpha in (0.1, 0.2, 0.5):
        lhs = alpha / 2 * Q.interval_score(lo, hi, y, alpha)
        rhs = Q.pinball_loss(np.stack([lo, hi], 1), y, [alpha / 2, 1 - alpha / 2],
                             reduction="none") * 2
        assert lhs.numpy() == pytest.approx(rhs.numpy(), abs=1e-12)


def test_wis_equals_bracher_form_on_symmetric_levels():
    q, y = _random_quantiles(seed=2)
    q = np.sort(q, 1)
    pairs = Q.central_pairs(TAUS)
    terms = 0.5 * np.abs(y - q[:, 3])
    for i, j, nominal in pairs:
        alpha = 1 - nominal
        terms = terms + alpha / 2 * Q.interval_score(q[:, i], q[:, j], y, alpha).numpy()
    bracher = terms / (len(pairs) + 0.5)
    assert Q.wis(q, y, TAUS, reduction="none").numpy() == pytest.approx(bracher, abs=1e-12)


def test_coverage_width_and_crossing_by_hand():
    q = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [2.0, 1.0, 3.0]])
    y = np.array([1.5, 5.0, 2.5])
    taus = [0.1, 0.5, 0.9]
    assert Q.coverage(q, y, taus) == {0.8: pytest.approx(2 / 3)}
    assert Q.interval_width(q, taus) == {0.8: pytest.approx(5 / 3)}
    assert Q.crossing_rate(q) == pytest.approx(1 / 3)
    assert Q.central_pairs([0.1, 0.3, 0.5, 0.9]) == [(0, 3, pytest.approx(0.8))]


# -------------------------------------------------------------------------------------------------
# Monotone rearrangement (the paper's theorem: neither can increase any point's WIS)


@pytest.mark.parametrize("seed", range(5))
def test_sorting_and_isotonic_never_increase_any_points_wis(seed):
    q, y = _random_quantiles(n=400, seed=seed, scale=[0.3, 1.0, 3.0][seed % 3])
    raw = Q.wis(q, y, TAUS, reduction="none")
    for how in ("sort", "isotonic"):
        fixed = Q.monotonise(torch.as_tensor(q), how)
        assert (fixed.diff(dim=1) >= -1e-12).all()
        assert (Q.wis(fixed, y, TAUS, reduction="none") - raw).max() <= 1e-12


def test_isotonic_equals_scikit_learn_row_by_row():
    q, _ = _random_quantiles(n=200, k=19, seed=3)
    ours = Q.isotonic_quantiles(torch.as_tensor(q), chunk=37).numpy()
    ref = np.stack([IsotonicRegression().fit_transform(np.arange(19), row) for row in q])
    assert ours == pytest.approx(ref, abs=1e-12)
    assert Q.isotonic_quantiles(torch.as_tensor(np.sort(q, 1))).numpy() == pytest.approx(
        np.sort(q, 1))


def test_isotonic_gradient_is_that_of_the_pooled_means():
    # [3, 1, 1.5] pools into one block (mean 11/6): every output has gradient 1/3 per input.
    q = torch.tensor([[3.0, 1.0, 1.5]], dtype=torch.float64, requires_grad=True)
    Q.isotonic_quantiles(q)[0, 0].backward()
    assert q.grad.tolist() == [[pytest.approx(1 / 3)] * 3]
    r = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Q.isotonic_quantiles, (r,))


def test_monotonise_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="must be one of"):
        Q.monotonise(torch.zeros(2, 3), "clip")


# -------------------------------------------------------------------------------------------------
# Conformal calibration


def test_conformal_margin_is_the_right_order_statistic():
    # 9 calibration points, 80% interval: the ceil(0.8 * 10) = 8th smallest score.
    y = np.arange(9.0)
    q = np.stack([y - 1, y, y + 1], 1)  # every score is -1 ...
    q[:, 0] += np.arange(9.0)  # ... except the lower end, raised by 0 .. 8: scores -1 .. 7
    margins = Q.conformal_margins(q, y, [0.1, 0.5, 0.9])
    assert margins.tolist() == [6.0]
    out = Q.apply_conformal(q, margins, [0.1, 0.5, 0.9]).numpy()
    assert out[:, 0] == pytest.approx(q[:, 0] - 6) and out[:, 2] == pytest.approx(q[:, 2] + 6)
    assert out[:, 1] == pytest.approx(q[:, 1])


def test_conformal_margin_is_infinite_with_too_few_points():
    margins = Q.conformal_margins(np.zeros((5, 3)), np.ones(5), [0.05, 0.5, 0.95])
    assert math.isinf(margins.item())


def test_conformal_calibration_covers_on_exchangeable_data():
    # A badly miscalibrated constant model: after calibration the average coverage of the 80%
    # interval over many independent draws is at least 0.8 and at most 0.8 + 1 / (n_cal + 1),
    # up to Monte Carlo error (sd about 0.0025 here).
    rng = np.random.default_rng(0)
    taus, n_cal, n_test, reps = [0.1, 0.5, 0.9], 99, 200, 300
    q_const = np.array([[-0.2, 0.0, 0.2]])
    cover = []
    for _ in range(reps):
        y_cal, y_test = rng.standard_t(3, n_cal), rng.standard_t(3, n_test)
        m = Q.conformal_margins(np.repeat(q_const, n_cal, 0), y_cal, taus)
        out = Q.apply_conformal(np.repeat(q_const, n_test, 0), m, taus)
        cover.append(Q.coverage(out, y_test, taus)[0.8])
    assert 0.8 - 0.008 <= np.mean(cover) <= 0.8 + 1 / (n_cal + 1) + 0.008


def test_conformal_needs_mirrored_levels_and_matching_margins():
    with pytest.raises(ValueError, match="tau and 1 - tau"):
        Q.conformal_margins(np.zeros((5, 2)), np.zeros(5), [0.2, 0.5])
    with pytest.raises(ValueError, match="2 margins for 1 central"):
        Q.apply_conformal(np.zeros((5, 3)), [0.1, 0.2], [0.1, 0.5, 0.9])


# -------------------------------------------------------------------------------------------------
# Input checks


@pytest.mark.parametrize("taus, message", [([0.5, 0.2], "strictly increasing"),
                                           ([0.0, 0.5], "strictly between 0 and 1"),
                                           ([], "no quantile levels")])
def test_bad_levels_are_refused(taus, message):
    with pytest.raises(ValueError, match=message):
        Q.as_levels(taus)


def test_bad_predictions_are_refused():
    with pytest.raises(ValueError, match="contains NaN"):
        Q.wis([[np.nan, 1.0]], [0.0], [0.2, 0.8])
    with pytest.raises(ValueError, match="y has 2 values but the predictions have 1 rows"):
        Q.wis([[0.0, 1.0]], [0.0, 1.0], [0.2, 0.8])
    with pytest.raises(ValueError, match="3 quantile levels but the predictions have 2"):
        Q.wis([[0.0, 1.0]], [0.0], [0.2, 0.5, 0.8])
    with pytest.raises(ValueError, match=r"shape \(n, K\)"):
        Q.crossing_rate(np.zeros(4))


# -------------------------------------------------------------------------------------------------
# Base models


def test_linear_quantile_fit_reaches_the_lp_optimum():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 3))
    y = X @ [1.0, -0.5, 0.2] + (1 + 0.5 * np.abs(X[:, 0])) * rng.standard_t(4, size=300)
    taus = [0.1, 0.5, 0.9]
    Xt, yt = torch.tensor(X[None], dtype=torch.float32), torch.tensor(y[None],
                                                                       dtype=torch.float32)
    model = QA.torch_quantile_fits(Xt, yt, torch.ones_like(yt, dtype=torch.bool), taus,
                                   steps=150, lr=0.01)
    with torch.no_grad():
        ours = model(Xt)[0].double().numpy()
    ref = np.stack([QuantileRegressor(quantile=t, alpha=0, solver="highs").fit(X, y).predict(X)
                    for t in taus], 1)
    # The LP solution is optimal: ours may not beat it, and should come within 0.5%.
    assert float(Q.wis(ref, y, taus)) <= float(Q.wis(ours, y, taus)) + 1e-6
    assert float(Q.wis(ours, y, taus)) <= 1.005 * float(Q.wis(ref, y, taus))


def test_batched_fits_equal_separate_fits():
    rng = np.random.default_rng(1)
    X = torch.tensor(rng.normal(size=(2, 80, 3)), dtype=torch.float32)
    y = torch.tensor(rng.normal(size=(2, 80)), dtype=torch.float32)
    allowed = torch.tensor(rng.random((2, 80)) < 0.7)
    both = QA.torch_quantile_fits(X, y, allowed, TAUS, steps=40, lr=0.02)
    for f in range(2):
        alone = QA.torch_quantile_fits(X[f:f + 1], y[f:f + 1], allowed[f:f + 1], TAUS, steps=40,
                                       lr=0.02)
        with torch.no_grad():
            assert both(X)[f].numpy() == pytest.approx(alone(X[f:f + 1])[0].numpy(), abs=1e-5)


def test_knn_quantiles_are_numpys_quantiles_of_the_neighbours():
    rng = np.random.default_rng(2)
    X, y, Xe = rng.normal(size=(100, 2)), rng.normal(size=100), rng.normal(size=(7, 2))
    ours = QA.knn_quantiles(X, y, Xe, TAUS, k=15)
    _, nbr = NearestNeighbors(n_neighbors=15).fit(X).kneighbors(Xe)
    assert ours == pytest.approx(np.quantile(y[nbr], TAUS, axis=1).T, abs=1e-12)


def test_quantile_forest_weights_by_shared_leaves():
    from sklearn.ensemble import RandomForestRegressor

    rng = np.random.default_rng(3)
    X, Xe = rng.normal(size=(120, 3)), rng.normal(size=(5, 3))
    y = X[:, 0] + rng.normal(size=120)
    ours = QA.qrf_quantiles(X, y, Xe, TAUS, n_estimators=7, min_samples_leaf=4, seed=5)
    forest = RandomForestRegressor(n_estimators=7, min_samples_leaf=4, max_features=0.5,
                                   random_state=5, n_jobs=1).fit(X, y)
    lt, le = forest.apply(X), forest.apply(Xe)
    for i in range(len(Xe)):
        w = np.zeros(len(X))
        for t in range(7):
            same = lt[:, t] == le[i, t]
            w[same] += 1 / (7 * same.sum())
        order = np.argsort(y)
        cum = np.cumsum(w[order])
        ref = [y[order][np.searchsorted(cum, tau - 1e-12)] for tau in TAUS]
        assert ours[i] == pytest.approx(ref)


def _toy_splits(n_splits=2, n_rows=160, seed=0):
    X, y, oracle = QE.heteroscedastic(2000, seed=seed)
    return QE.make_splits(X, y, n_splits=n_splits, seed=seed, n_rows=n_rows, oracle=oracle)


def test_out_of_fold_predictions_never_see_their_own_row():
    # 1-nearest-neighbour in-sample predicts each row's own response; out of fold it cannot.
    splits = _toy_splits()
    lib = QA.cross_fit_library(splits, [0.5], ["knn"], settings={"knn": {"k": 1}})
    for s, sp in enumerate(splits):
        assert not np.isclose(lib["oof"][s, :, 0, 0], sp["y_train"]).any()
        assert lib["test"].shape == (2, len(sp["y_test"]), 1, 1)


def test_library_rejects_unknown_models_and_unequal_splits():
    splits = _toy_splits()
    with pytest.raises(ValueError, match="base models must be among"):
        QA.cross_fit_library(splits, TAUS, ["lightgbm"])
    splits[1] = {**splits[1], "y_test": splits[1]["y_test"][:-1]}
    with pytest.raises(ValueError, match="split 1 has other sizes"):
        QA.cross_fit_library(splits, TAUS, ["knn"])


# -------------------------------------------------------------------------------------------------
# Aggregators


def _library(S=2, n=30, M=3, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, n, 2, generator=g), torch.randn(S, n, M, K, generator=g)


def test_one_hot_global_weights_reproduce_a_base_model():
    X, Z = _library()
    for g in QA.GRANULARITIES:
        agg = QA.Aggregator(2, 3, 4, granularity=g)
        with torch.no_grad():
            agg.logits.fill_(-math.inf)
            if g == "fine":  # model 1 at the output's own level
                for k in range(4):
                    agg.logits[:, 0, 1 * 4 + k, k] = 0.0
            else:
                agg.logits[:, 0, 1] = 0.0
        assert agg(X, Z).detach().numpy() == pytest.approx(Z[:, :, 1].numpy(), abs=1e-6)


def test_local_weights_are_convex_for_every_row_and_level():
    X, Z = _library()
    for g in QA.GRANULARITIES:
        agg = QA.Aggregator(2, 3, 4, granularity=g, local=True, n_features=2, hidden=(8,),
                            generator=torch.Generator().manual_seed(0))
        w = agg.weights(X)
        assert (w >= 0).all()
        assert w.sum(2).detach().numpy() == pytest.approx(np.ones(w.sum(2).shape), abs=1e-6)
        lo, hi = Z.min(2).values, Z.max(2).values
        if g != "fine":  # a convex combination of the models stays inside their range
            out = agg(X, Z)
            assert ((out >= lo - 1e-6) & (out <= hi + 1e-6)).all()


def test_coarse_inside_medium_inside_fine():
    X, Z = _library()
    logits = torch.randn(2, 1, 3, 1)
    coarse = QA.Aggregator(2, 3, 4, granularity="coarse")
    medium = QA.Aggregator(2, 3, 4, granularity="medium")
    fine = QA.Aggregator(2, 3, 4, granularity="fine")
    with torch.no_grad():
        coarse.logits.copy_(logits)
        medium.logits.copy_(logits.expand(2, 1, 3, 4) + torch.randn(2, 1, 1, 4))
        # Fine weights vanishing off the block diagonal l = k give back the medium aggregate.
        fine.logits.fill_(-math.inf)
        for j in range(3):
            for k in range(4):
                fine.logits[:, 0, j * 4 + k, k] = medium.logits[:, 0, j, k]
    with torch.no_grad():
        assert medium(X, Z).numpy() == pytest.approx(coarse(X, Z).numpy(), abs=1e-6)
        assert fine(X, Z).numpy() == pytest.approx(medium(X, Z).numpy(), abs=1e-6)


def test_aggregator_keeps_its_best_validation_parameters():
    X, Z = _library(n=60)
    y = Z[:, :, 0].mean(-1) + 0.1 * torch.randn(2, 60, generator=torch.Generator().manual_seed(1))
    val = torch.zeros(2, 60, dtype=torch.bool)
    val[:, :20] = True
    taus = [0.2, 0.4, 0.6, 0.8]
    model, record = QA.fit_aggregator("local-medium", X, Z, y, val, taus, steps=60, lr=0.05,
                                      batch_size=16, eval_every=5, patience=20, hidden=(8,))
    pred = Q.sort_quantiles(QA.aggregate(model, X, Z))
    again = [float(Q.wis(pred[s][val[s]], y[s][val[s]], taus)) for s in range(2)]
    assert record["val_loss"].tolist() == pytest.approx(again, rel=1e-5)
    assert (record["best_step"] <= record["steps"]).all()


def test_aggregator_input_errors():
    X, Z = _library()
    y = torch.zeros(2, 30)
    with pytest.raises(ValueError, match="aggregator must be one of"):
        QA.fit_aggregator("local-huge", X, Z, y, torch.zeros(2, 30, dtype=torch.bool), TAUS[:4])
    with pytest.raises(ValueError, match="some training and some validation rows"):
        QA.fit_aggregator("global-coarse", X, Z, y, torch.zeros(2, 30, dtype=torch.bool),
                          TAUS[:4])
    with pytest.raises(ValueError, match="needs n_features"):
        QA.Aggregator(2, 3, 4, granularity="medium", local=True)
    with pytest.raises(ValueError, match="unknown aggregator"):
        QE.parse_aggregator("global-medium+clip")


# -------------------------------------------------------------------------------------------------
# Experiment


def test_oracle_quantiles_score_best_on_synthetic_data():
    X, y, oracle = QE.heteroscedastic(6000, seed=4)
    taus = [0.1, 0.5, 0.9]
    Xtr, ytr, Xte, yte = X[:4000], y[:4000], X[4000:], y[4000:]
    best = float(Q.wis(oracle(Xte, taus), yte, taus))
    for pred in (QA.knn_quantiles(Xtr, ytr, Xte, taus, k=50),
                 np.quantile(ytr, taus)[None].repeat(len(yte), 0)):
        assert best < float(Q.wis(pred, yte, taus))
    # The oracle's levels are calibrated: each is exceeded at about its rate.
    assert (yte[:, None] <= oracle(Xte, taus)).mean(0) == pytest.approx(taus, abs=0.03)


def test_splits_are_standardised_and_checked():
    splits = _toy_splits(n_rows=200)
    sp = splits[0]
    assert sp["X_train"].mean(0) == pytest.approx(np.zeros(5), abs=1e-12)
    assert sp["y_train"].std() == pytest.approx(1.0)
    assert len(sp["y_train"]) + len(sp["y_cal"]) + len(sp["y_test"]) == 200
    assert sp["oracle_test"]([0.5]).shape == (len(sp["y_test"]), 1)
    with pytest.raises(ValueError, match="too few"):
        QE.make_splits(np.zeros((30, 2)), np.zeros(30), n_splits=1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        QE.make_splits(np.full((300, 2), np.nan), np.zeros(300), n_splits=1)


def test_run_dataset_is_reproducible_and_complete():
    splits = _toy_splits(n_rows=150)
    config = QE.Config(taus=[0.1, 0.5, 0.9], base_models=["linear", "knn"],
                       aggregators=["global-medium", "local-coarse+sort"],
                       model_settings={"linear": {"steps": 20}},
                       global_train=dict(steps=20, lr=0.1, batch_size=None),
                       local_train=dict(steps=20, lr=0.01, batch_size=32), agg_hidden=(8,))
    tables = [QE.evaluate(QE.run_dataset("toy", splits, config)) for _ in range(2)]
    assert tables[0].equals(tables[1])
    methods = set(tables[0].method)
    assert methods == {"linear", "knn", "mean", "median", "global-medium", "local-coarse+sort",
                       "best-base", "selected", "oracle"}
    assert tables[0].theorem_holds.all()
    assert QE.relative(tables[0], "selected", "best-base").shape == (2,)
