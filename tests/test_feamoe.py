"""FEAMOE's mixture, penalties, growth, drift detector and Shapley values, on hand-made inputs."""

import itertools
import math

import numpy as np
import pytest
import torch
from fairlearn.metrics import demographic_parity_difference

from repsuite.fairness import feamoe as FM
from repsuite.fairness import feamoe_experiment as FE
from repsuite.fairness import metrics


def _data(n=400, d=4, seed=0):
    """Features shifted by group, labels from a logistic teacher: group 1 has fewer positives."""
    rng = np.random.default_rng(seed)
    group = (rng.random(n) < 0.4).astype(np.int64)
    X = rng.normal(size=(n, d)) + 0.8 * group[:, None] * np.eye(d)[0]
    y = (rng.random(n) < 1 / (1 + np.exp(-(X @ np.linspace(1, -1, d) - group)))).astype(np.int64)
    return torch.tensor(X, dtype=torch.float32), y, group


# -------------------------------------------------------------------------------------------------
# The mixture


def test_one_expert_is_logistic_regression():
    X, _, _ = _data()
    model = FM.FEAMOE(4, 1, seed=3)
    W, b = model.experts()
    z = X @ W[0] + b[0]
    assert torch.allclose(model.gate(X), torch.ones(len(X), 1))
    assert torch.allclose(model(X), torch.sigmoid(z), atol=1e-6)
    assert torch.allclose(model.logit(X), z, atol=1e-4)


def test_logit_is_the_log_odds_of_the_mixture_and_does_not_saturate():
    X, _, _ = _data()
    model = FM.FEAMOE(4, 3, seed=1, init_scale=1.0)
    p = model(X).double()
    assert torch.allclose(model.logit(X).double(), torch.log(p / (1 - p)), atol=1e-3)
    with torch.no_grad():
        model.W[0].mul_(200.0)  # probabilities round to 0 or 1 in float32; log-odds stay finite
    assert torch.isfinite(model.logit(X)).all()


def test_adding_experts_moves_predictions_by_at_most_exp_minus_offset():
    X, _, _ = _data()
    model = FM.FEAMOE(4, 2, seed=0, init_scale=1.0)
    before = model(X).detach()
    for offset in (0.0, 2.0, 8.0):
        grown = FM.FEAMOE(4, 2, seed=0, init_scale=1.0)
        new_W = 3 * torch.ones(2, 4)  # experts far from the old ones
        grown.add_experts(new_W, torch.tensor([5.0, -5.0]), offset=offset)
        assert grown.n_experts == 4 and grown.n_generations == 2
        share = grown.gate(X)[:, 2:].sum(1)
        assert share.max() <= math.exp(-offset) + 1e-6
        assert (grown(X).detach() - before).abs().max() <= math.exp(-offset) + 1e-6
    assert (grown(X).detach() - before).abs().max() < 1e-3  # offset 8: continuous


def test_freezing_keeps_old_experts_and_trains_the_gate_and_the_new_expert():
    X, y, group = _data()
    model = FM.FEAMOE(4, 1, seed=0)
    FM.train(model, X, y, group, steps=20, lr=0.05)
    old = model.W[0].detach().clone()
    FM.grow(model, X[:200], y[:200], group[:200], steps=20, lr=0.05, n_new=2, offset=0.0)
    assert model.n_experts == 3
    assert torch.equal(model.W[0], old) and not model.W[0].requires_grad
    assert model.W[1].requires_grad and model.V[0].requires_grad
    FM.train(model, X, y, group, steps=5, lr=0.05)
    assert torch.equal(model.W[0], old)


def test_clone_init_starts_the_new_expert_from_the_mixture_used_on_the_window():
    X, y, group = _data()
    model = FM.FEAMOE(4, 1, seed=0)
    FM.train(model, X, y, group, steps=30, lr=0.05)
    W_old = model.W[0].detach().clone()
    FM.grow(model, X, y, group, steps=0, lr=0.05, init="clone", offset=0.0)
    assert torch.allclose(model.W[1], W_old)


# -------------------------------------------------------------------------------------------------
# Penalties


def test_group_gap_of_hard_predictions_matches_fairlearn():
    rng = np.random.default_rng(1)
    pred = (rng.random(300) < 0.4).astype(np.float32)
    group = rng.integers(0, 3, 300)
    gap = FM.group_gap(torch.tensor(pred), torch.tensor(group)).item()
    assert gap == pytest.approx(demographic_parity_difference(pred, pred, sensitive_features=group))
    assert gap == pytest.approx(metrics.demographic_parity_difference(pred, group))


def test_group_gap_is_zero_with_a_single_group_present():
    assert FM.group_gap(torch.ones(5), torch.zeros(5, dtype=torch.long)).item() == 0.0
    assert FM.group_gap(torch.ones(0), torch.zeros(0, dtype=torch.long)).item() == 0.0


def test_eo_penalty_on_hard_predictions_is_tpr_gap_plus_fpr_gap():
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    group = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([1, 1, 1, 0, 1, 0, 0, 0], dtype=np.float32)
    pen = FM.fairness_penalty("eo", None, None, torch.tensor(pred), torch.tensor(y),
                              torch.tensor(group)).item()
    tpr = metrics.true_positive_rates(y, pred, group)
    fpr = metrics.false_positive_rates(y, pred, group)
    assert pen == pytest.approx(abs(tpr[0] - tpr[1]) + abs(fpr[0] - fpr[1]))  # 0.5 + 0.5


def test_burden_penalty_of_one_expert_is_the_gap_in_distance_to_its_boundary():
    X, y, group = _data()
    model = FM.FEAMOE(4, 1, seed=0, init_scale=1.0)
    W, b = model.experts()
    z = (X @ W[0] + b[0]).detach()
    dist = z.abs() / W[0].norm().detach()
    rows = z < 0  # favourable outcome 1: the unfavourably predicted rows have z < 0
    g = torch.tensor(group)
    expected = abs(dist[rows & (g == 0)].mean() - dist[rows & (g == 1)].mean())
    pen = FM.fairness_penalty("burden", model, X, model(X), torch.tensor(y), g, favorable=1)
    assert pen.item() == pytest.approx(expected.item(), rel=1e-5)


def test_line_search_distance_is_exact_for_logistic_regression():
    X, _, group = _data(d=3)
    lr = FE.Classifier(3, (), seed=2)
    W, b = lr.net[0].weight[0].detach(), lr.net[0].bias.detach()
    exact = ((X @ W + b).abs() / W.norm()).clamp(max=10.0)
    assert torch.allclose(FE.boundary_distance(lr, X), exact, atol=1e-2)


def test_the_fairness_penalty_lowers_the_demographic_parity_gap():
    X, y, group = _data(n=600, seed=4)
    gaps = []
    for lam in (0.0, 5.0):
        model = FM.FEAMOE(4, 2, seed=0)
        FM.train(model, X, y, group, steps=150, lr=0.05, lam=lam, notion="dp")
        pred = (model(X) >= 0.5).float().numpy()
        gaps.append(metrics.demographic_parity_difference(pred, group))
    assert gaps[0] > 0.1 and gaps[1] < gaps[0] / 2


# -------------------------------------------------------------------------------------------------
# Drift detection and streams


def test_detector_flags_accuracy_drops_and_gap_rises_beyond_noise_and_then_restarts():
    det = FM.DriftDetector(tol_acc=0.02, tol_gap=0.02, z=2.0)
    assert det.check(0.90, 0.05, 0.01, 0.01) == ""     # first window: the reference
    assert det.check(0.88, 0.06, 0.01, 0.01) == ""     # within tolerance + 2 standard errors
    assert det.check(0.80, 0.05, 0.01, 0.01) == "accuracy"
    assert det.check(0.80, 0.05, 0.01, 0.01) == ""     # the reference restarted here
    assert det.check(0.80, 0.20, 0.01, 0.01) == "fairness"
    det.check(0.8, 0.05)
    assert det.check(0.5, 0.5) == "accuracy+fairness"


def test_drifting_stream_puts_the_low_end_of_the_key_before_the_drift():
    X, y, group = _data(n=600)
    key = X[:, 1].numpy()
    s = FE.drifting_stream("toy", X.numpy(), y, group, key=key, n_windows=6, window_size=80,
                           drift_window=3, seed=5, favorable=1)
    assert len(s.windows) == 6 and s.windows[0] == slice(0, 80)
    pre = s.X[: 3 * 80, 1]
    post = s.X[3 * 80:, 1]
    assert pre.max() <= post.min()
    again = FE.drifting_stream("toy", X.numpy(), y, group, key=key, n_windows=6, window_size=80,
                               drift_window=3, seed=5, favorable=1)
    assert torch.equal(s.X, again.X)


def test_stream_run_freezes_static_models_and_logs_every_window():
    X, y, group = _data(n=600)
    s = FE.drifting_stream("toy", X.numpy(), y, group, key=X[:, 0].numpy(), n_windows=5,
                           window_size=100, drift_window=3, seed=0, favorable=1)
    table, nets = FE.run_stream(s, models=("static_lr", "feamoe"), seed=0, lam=1.0, steps=5,
                                lr=0.05, hidden=8, static_windows=1, z=0.0, tol_acc=0.0,
                                tol_gap=0.0)
    assert len(table) == 2 * 4 and set(table.window) == {1, 2, 3, 4}
    static = table[table.model == "static_lr"]
    assert static.n_experts.eq(1).all()
    feamoe = table[table.model == "feamoe"]
    assert nets["feamoe"].n_experts == 1 + int(feamoe.grew.sum())


# -------------------------------------------------------------------------------------------------
# Shapley values


def _shapley_by_permutations(f, x, background):
    """Shapley values from their definition: the mean marginal contribution over all orders."""
    d = len(x)
    phi = np.zeros(d)
    orders = list(itertools.permutations(range(d)))
    for order in orders:
        current = background.copy()
        prev = f(current).mean()
        for j in order:
            current[:, j] = x[j]
            value = f(current).mean()
            phi[j] += value - prev
            prev = value
    return phi / len(orders)


def test_exact_enumeration_matches_the_permutation_definition_on_a_nonlinear_model():
    rng = np.random.default_rng(0)
    background = rng.normal(size=(7, 3))
    x = np.array([0.5, -1.0, 2.0])

    def f_np(a):
        return np.tanh(a[:, 0] * a[:, 1]) + a[:, 2] ** 2 * a[:, 0]

    def f_t(a):
        return torch.tanh(a[:, 0] * a[:, 1]) + a[:, 2] ** 2 * a[:, 0]

    phi = FM.shapley_exact(f_t, torch.tensor(x[None]), torch.tensor(background))[0].numpy()
    assert phi == pytest.approx(_shapley_by_permutations(f_np, x, background), abs=1e-5)
    assert phi.sum() == pytest.approx(f_np(x[None])[0] - f_np(background).mean(), abs=1e-5)


def test_fast_values_of_one_expert_are_linear_shap_and_exact_for_its_log_odds():
    X, _, _ = _data()
    model = FM.FEAMOE(4, 1, seed=0, init_scale=1.0)
    W, _ = model.experts()
    background = X[:50]
    fast = FM.explain_fast(model, X[:5], background)
    assert torch.allclose(fast, W[0].detach() * (X[:5] - background.mean(0)), atol=1e-6)
    exact = FM.shapley_exact(model.logit, X[:5], background)
    assert torch.allclose(fast, exact, atol=1e-4)


def test_fast_values_are_exact_when_the_gate_is_held_at_x_and_satisfy_efficiency():
    X, _, _ = _data()
    model = FM.FEAMOE(4, 3, seed=0, init_scale=1.0)
    background, x = X[:40], X[100:101]
    g = model.gate(x).detach()

    def frozen(a):
        return (g * model.expert_logits(a)).sum(1)

    fast = FM.explain_fast(model, x, background)
    assert torch.allclose(fast, FM.shapley_exact(frozen, x, background), atol=1e-4)
    assert fast.sum().item() == pytest.approx((frozen(x) - frozen(background).mean()).item(),
                                              abs=1e-4)
    # With the gate varying with the features the fast values are only an approximation.
    real = FM.shapley_exact(model.gated_log_odds, x, background)
    assert not torch.allclose(fast, real, atol=1e-3)


def test_shap_study_reports_agreement_and_speed():
    X, y, group = _data(d=5)
    model = FM.FEAMOE(5, 2, seed=0)
    FM.train(model, X, y, group, steps=20, lr=0.05)
    out = FE.shap_study(model, X, X[:30], n_explain=4, seed=0, repeats=1)
    assert out["corr_logodds"].shape == (4,) and np.all(out["corr_logodds"] <= 1 + 1e-6)
    assert out["speedup"] > 1


# -------------------------------------------------------------------------------------------------
# Clear errors


def test_bad_inputs_raise_clear_errors():
    X, y, group = _data(n=50)
    with pytest.raises(ValueError, match="one label per row"):
        FM.check_batch(X, y[:10], group)
    with pytest.raises(ValueError, match="0/1 labels"):
        FM.check_batch(X, y + 1, group)
    with pytest.raises(ValueError, match="NaN"):
        FM.check_batch(torch.full((3, 2), float("nan")))
    with pytest.raises(ValueError, match="integer codes"):
        FM.check_batch(X, y, group.astype(float))
    with pytest.raises(ValueError, match="fairness notion"):
        FM.train(FM.FEAMOE(4), X, y, group, steps=1, lr=0.1, lam=1.0, notion="parity")
    with pytest.raises(ValueError, match="needs the group codes"):
        FM.train(FM.FEAMOE(4), X, y, None, steps=1, lr=0.1, lam=1.0)
    with pytest.raises(ValueError, match="shape"):
        FM.FEAMOE(4).add_experts(torch.ones(1, 3), torch.ones(1))
    with pytest.raises(ValueError, match="2\\^d coalitions"):
        FM.shapley_exact(lambda a: a.sum(1), torch.ones(1, 20), torch.ones(2, 20))
    with pytest.raises(ValueError, match="features"):
        FM.explain_fast(FM.FEAMOE(4), torch.ones(1, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="linear experts"):
        FM.fairness_penalty("burden", FE.Classifier(4), X, torch.rand(50), torch.tensor(y),
                            torch.tensor(group))
    with pytest.raises(ValueError, match="two groups"):
        FE.binary_groups(X.numpy(), y, np.arange(50) % 3)
    with pytest.raises(ValueError, match="at least 20"):
        FE.drifting_stream("toy", X.numpy(), y, group, key=X[:, 0].numpy(), n_windows=10,
                           window_size=100, drift_window=5, seed=0, favorable=1)
    with pytest.raises(ValueError, match="unknown stream models"):
        FE.run_stream(None, models=("svm",), seed=0, lam=0.0, steps=1, lr=0.1, hidden=4)
