"""Groupwise regret: online ridge, AdaNormalHedge for sleeping experts, the reduction and its
tables, against references written independently here (plain Python loops, scikit-learn, numpy)."""

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import Ridge

from repsuite.fairness import groupwise as GW
from repsuite.fairness import groupwise_experiment as GE
from repsuite.fairness.stream import stream_order

ATTRS = {"sex": {"m": 0.5, "f": 0.5}, "race": {"a": 0.6, "b": 0.3, "c": 0.1}}


def _rows(n=60, d=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(size=(n, d))
    y = np.clip(X @ rng.uniform(size=d) / d + 0.1 * rng.normal(size=n), 0, 1)
    return X, y


# -------------------------------------------------------------------------------------------------
# Online ridge


def test_sherman_morrison_ridge_equals_batch_refit_at_every_step():
    X, y = _rows(40, 5)
    learner = GW.OnlineRidge(5, lam=1.0)
    for t in range(len(y)):
        theta = np.linalg.solve(np.eye(5) + X[:t].T @ X[:t], X[:t].T @ y[:t])
        assert learner.predict(X[t], clip=False) == pytest.approx(X[t] @ theta, abs=1e-10)
        assert learner.theta.numpy() == pytest.approx(theta, abs=1e-10)
        learner.update(X[t], y[t])


def test_ridge_prediction_is_clipped_to_the_label_range():
    learner = GW.OnlineRidge(1)
    learner.update([1.0], 1.0)
    learner.update([1.0], 1.0)
    assert learner.predict([10.0], clip=False) > 1 and learner.predict([10.0]) == 1.0
    assert learner.predict([-10.0]) == 0.0


@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_block_predictions_equal_sherman_morrison(block):
    X, y = _rows(50, 4)
    learner, ref = GW.OnlineRidge(4, lam=0.5), []
    for x, target in zip(X, y, strict=True):
        ref.append(learner.predict(x, clip=False))
        learner.update(x, target)
    out = GW.online_ridge_predictions(X, y, lam=0.5, block=block)
    assert out.shape == (1, 50)
    assert out[0].numpy() == pytest.approx(np.array(ref), abs=1e-10)


def test_block_predictions_run_streams_side_by_side_and_zero_rows_change_nothing():
    X1, y1 = _rows(30, 3, seed=1)
    X2, y2 = _rows(30, 3, seed=2)
    both = GW.online_ridge_predictions(np.stack([X1, X2]), np.stack([y1, y2]), block=8)
    assert both[1].numpy() == pytest.approx(GW.online_ridge_predictions(X2, y2)[0].numpy())
    # a zero row in the middle: the rows after it see the same state as without it
    Xp, yp = np.insert(X1, 10, 0.0, axis=0), np.insert(y1, 10, 0.0)
    padded = GW.online_ridge_predictions(Xp, yp, block=4)[0].numpy()
    assert np.delete(padded, 10) == pytest.approx(both[0].numpy(), abs=1e-12)


def test_ridge_fit_matches_scikit_learn_without_intercept():
    X, y = _rows(30, 4)
    ours = GW.ridge_fit(X, y, lam=2.0).numpy()
    ref = Ridge(alpha=2.0, fit_intercept=False).fit(X, y).coef_
    assert ours == pytest.approx(ref, abs=1e-10)


def test_best_linear_loss_equals_least_squares_on_prefixes_even_with_collinear_features():
    X, y = _rows(40, 3)
    X = np.concatenate([X, X[:, :1] * 2.0], axis=1)  # a copy of a column: X^T X is singular
    ends = [5, 12, 40]
    got = GW.best_linear_loss(X, y, ends)[0].numpy()
    for j, n in enumerate(ends):
        theta = np.linalg.lstsq(X[:n], y[:n], rcond=None)[0]
        assert got[j] == pytest.approx(np.sum((X[:n] @ theta - y[:n]) ** 2), abs=1e-9)


def test_ridge_inputs_are_checked():
    X, y = _rows(10, 2)
    with pytest.raises(ValueError, match="NaN"):
        GW.online_ridge_predictions(np.where(X > 0.9, np.nan, X), y)
    with pytest.raises(ValueError, match="one label per round"):
        GW.online_ridge_predictions(X, y[:-1])
    with pytest.raises(ValueError, match="lam must be > 0"):
        GW.online_ridge_predictions(X, y, lam=0.0)
    with pytest.raises(ValueError, match="block must be >= 1"):
        GW.online_ridge_predictions(X, y, block=0)
    with pytest.raises(ValueError, match="learner was built for 2"):
        GW.OnlineRidge(2).predict([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="increasing prefix lengths"):
        GW.best_linear_loss(X, y, [5, 3])


# -------------------------------------------------------------------------------------------------
# AdaNormalHedge for sleeping experts


def _anh_weight(R, C):
    return 0.5 * (math.exp(max(R + 1, 0) ** 2 / (3 * (C + 1)))
                  - math.exp(max(R - 1, 0) ** 2 / (3 * (C + 1))))


def _reference_sleeping(losses, awake, weight):
    """Plain loops: one stream, weights from each expert's own awake-round regret."""
    T, N = losses.shape
    R, C, out = [0.0] * N, [0.0] * N, []
    for t in range(T):
        w = [weight(R[i], C[i]) if awake[t, i] else 0.0 for i in range(N)]
        if sum(w) == 0:
            w = [1.0 if awake[t, i] else 0.0 for i in range(N)]
        p = [wi / sum(w) for wi in w]
        lhat = sum(p[i] * losses[t, i] for i in range(N))
        for i in range(N):
            if awake[t, i]:
                r = lhat - losses[t, i]
                R[i] += r
                C[i] += abs(r)
        out.append(lhat)
    return np.array(out), np.array(R), np.array(C)


def _random_sleeping(T=80, N=4, seed=0):
    rng = np.random.default_rng(seed)
    awake = rng.uniform(size=(T, N)) < 0.5
    awake[:, -1] = True
    return rng.uniform(size=(T, N)) * awake, awake


def test_log_weights_equal_the_direct_formula_and_do_not_overflow():
    R = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.7, 2.0, 9.0], dtype=torch.float64)
    C = torch.tensor([4.0, 2.0, 1.0, 0.0, 3.0, 5.0, 20.0], dtype=torch.float64)
    got = GW.anh_log_weights(R, C).exp().numpy()
    assert got == pytest.approx([_anh_weight(r, c) for r, c in zip(R.tolist(), C.tolist(),
                                                                    strict=True)], rel=1e-12)
    assert got[0] == 0 and got[1] == 0  # R <= -1: weight 0
    huge = GW.anh_log_weights(torch.tensor([5000.0], dtype=torch.float64),
                              torch.tensor([5000.0], dtype=torch.float64))
    assert torch.isfinite(huge).all() and huge.item() > 700  # exp would overflow


@pytest.mark.parametrize("rule", ["adanormalhedge", "hedge"])
def test_sleeping_experts_match_a_plain_loop(rule):
    losses, awake = _random_sleeping()
    weight = _anh_weight if rule == "adanormalhedge" else (lambda R, C: math.exp(0.3 * R))
    ref_loss, ref_R, ref_C = _reference_sleeping(losses, awake, weight)
    run = GW.sleeping_experts(losses[:, None], awake[:, None], rule=rule, eta=0.3)
    assert run.loss[:, 0].numpy() == pytest.approx(ref_loss, abs=1e-12)
    assert run.R[0].numpy() == pytest.approx(ref_R, abs=1e-10)
    assert run.C[0].numpy() == pytest.approx(ref_C, abs=1e-10)


def test_rules_side_by_side_equal_separate_runs():
    losses, awake = _random_sleeping(T=50)
    L, A = np.stack([losses, losses], 1), np.stack([awake, awake], 1)
    both = GW.sleeping_experts(L, A, rule=["hedge", "adanormalhedge"], eta=0.5)
    anh = GW.sleeping_experts(losses[:, None], awake[:, None])
    hedge = GW.sleeping_experts(losses[:, None], awake[:, None], rule="hedge", eta=0.5)
    assert both.loss[:, 1].numpy() == pytest.approx(anh.loss[:, 0].numpy(), abs=1e-14)
    assert both.loss[:, 0].numpy() == pytest.approx(hedge.loss[:, 0].numpy(), abs=1e-14)
    assert not np.allclose(both.loss[:, 0].numpy(), both.loss[:, 1].numpy())
    with pytest.raises(ValueError, match="one of them per stream"):
        GW.sleeping_experts(L, A, rule=["hedge"], eta=0.5)


def test_sleeping_experts_keep_their_state_and_get_no_weight():
    losses, awake = _random_sleeping(T=40)
    run = GW.sleeping_experts(losses[:, None], awake[:, None], keep_weights=True)
    p = run.weights[:, 0].numpy()
    assert np.all(p[~awake] == 0) and p.sum(1) == pytest.approx(np.ones(40))
    # the state after t rounds only depends on the rounds in which each expert was awake: adding
    # rounds where expert 0 sleeps leaves its regret unchanged if its loss column is altered there
    changed = losses.copy()
    changed[~awake] = 0.77
    again = GW.sleeping_experts(changed[:, None], awake[:, None])
    assert again.R.numpy() == pytest.approx(run.R.numpy()) and again.C.numpy() == \
        pytest.approx(run.C.numpy())


def test_one_expert_alone_is_followed_exactly():
    losses = np.random.default_rng(3).uniform(size=(30, 1, 1))
    run = GW.sleeping_experts(losses, np.ones_like(losses, dtype=bool))
    assert run.loss[:, 0].numpy() == pytest.approx(losses[:, 0, 0])
    assert run.R.abs().max() == 0


@pytest.mark.parametrize("seed", range(4))
def test_anh_regret_to_every_expert_stays_under_its_bound(seed):
    rng = np.random.default_rng(seed)
    T, N = 400, 6
    awake = rng.uniform(size=(T, N)) < rng.uniform(0.2, 1.0, size=N)
    awake[:, 0] = True
    # adversarial flavour: the expert the learner trusts most tends to lose
    losses = rng.uniform(size=(T, N)) ** rng.uniform(0.3, 3.0, size=N)
    run = GW.sleeping_experts(losses[:, None] * awake[:, None], awake[:, None])
    bound = GW.anh_regret_bound(run.C, N)
    assert (run.R <= bound + 1e-9).all()


def test_sleeping_experts_inputs_are_checked():
    losses, awake = _random_sleeping(T=10)
    with pytest.raises(ValueError, match="round 2 of stream 0 has no awake expert"):
        bad = awake.copy()
        bad[2] = False
        GW.sleeping_experts(losses[:, None], bad[:, None])
    with pytest.raises(ValueError, match=r"losses must lie in \[0, 1\]"):
        GW.sleeping_experts(losses[:, None] + 2 * awake[:, None], awake[:, None])
    with pytest.raises(ValueError, match="rule must be one of"):
        GW.sleeping_experts(losses[:, None], awake[:, None], rule="normalhedge")
    with pytest.raises(ValueError, match="needs a learning rate eta"):
        GW.sleeping_experts(losses[:, None], awake[:, None], rule="hedge")
    with pytest.raises(ValueError, match="rounds, streams, experts"):
        GW.sleeping_experts(losses, awake)


# -------------------------------------------------------------------------------------------------
# The reduction


def _interleaved(X, y, member, order):
    """The algorithm as the paper states it, round by round: predict with the awake learners,
    mix with AdaNormalHedge, then update the awake learners with the revealed label."""
    G = member.shape[1]
    learners = [GW.OnlineRidge(X.shape[1]) for _ in range(G)]
    R, C, out = [0.0] * G, [0.0] * G, []
    for i in order:
        awake = np.flatnonzero(member[i])
        loss = {g: (learners[g].predict(X[i]) - y[i]) ** 2 for g in awake}
        w = {g: _anh_weight(R[g], C[g]) for g in awake}
        total = sum(w.values())
        p = {g: (w[g] / total if total > 0 else 1 / len(awake)) for g in awake}
        lhat = sum(p[g] * loss[g] for g in awake)
        for g in awake:
            R[g] += lhat - loss[g]
            C[g] += abs(lhat - loss[g])
            learners[g].update(X[i], y[i])
        out.append(lhat)
    return np.array(out)


def test_two_phase_run_equals_the_interleaved_algorithm():
    data = GE.synthetic_groups(120, 3, ATTRS, aggregates=("mean", "dperm"), seed=4)
    run = GE.run_groupwise(data.X, data.labels, data.member, [7, 8], names=data.names, block=16)
    for s, (label, seed) in enumerate(run.streams):
        assert (run.orders[s] == stream_order(120, seed)).all()
        ref = _interleaved(data.X, data.labels[label], data.member, run.orders[s])
        assert run.losses["anh"][s].numpy() == pytest.approx(ref, abs=1e-10)
    assert run.streams == [("mean", 7), ("mean", 8), ("dperm", 7), ("dperm", 8)]


def test_with_only_the_always_on_group_the_algorithm_is_the_single_ridge():
    X, y = _rows(50, 3)
    run = GE.run_groupwise(X, y, np.ones((50, 1), dtype=bool), [0], rules=("adanormalhedge",))
    assert run.losses["anh"].numpy() == pytest.approx(run.losses["ridge"].numpy(), abs=1e-15)


def test_ridge_baseline_without_an_always_on_group_is_computed_on_all_rounds():
    X, y = _rows(40, 3)
    member = np.zeros((40, 2), dtype=bool)
    member[:20, 0], member[20:, 1] = True, True
    run = GE.run_groupwise(X, y, member, [5], rules=())
    ref = GW.online_ridge_predictions(X[run.orders[0]], y[run.orders[0]])[0].clamp(0, 1)
    assert run.losses["ridge"][0].numpy() == pytest.approx(
        ((ref.numpy() - y[run.orders[0]]) ** 2), abs=1e-12)


def test_specific_baseline_follows_the_smallest_awake_group():
    X, y = _rows(30, 2)
    member = np.ones((30, 3), dtype=bool)
    member[10:, 1] = False  # group 1: 10 rows, the most specific where awake
    member[:25, 2] = True
    run = GE.run_groupwise(X, y, member, [1], rules=())
    want = torch.where(run.member[..., 1], run.expert_loss[..., 1], run.expert_loss[..., 0])
    assert run.losses["specific"].numpy() == pytest.approx(want.numpy())


def test_run_inputs_are_checked():
    X, y = _rows(20, 2)
    member = np.ones((20, 2), dtype=bool)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        GE.run_groupwise(X, y * 3, member, [0])
    lonely = member.copy()
    lonely[4] = False
    with pytest.raises(ValueError, match=r"rows \[4\] belong to no group"):
        GE.run_groupwise(X, y, lonely, [0])
    with pytest.raises(ValueError, match=r"groups \[1\] have no rows"):
        GE.run_groupwise(X, y, np.stack([member[:, 0], ~member[:, 1]], 1), [0])
    with pytest.raises(ValueError, match="same n"):
        GE.run_groupwise(X, y[:-1], member, [0])
    with pytest.raises(ValueError, match="NaN"):
        GE.run_groupwise(np.where(X > 0.5, np.nan, X), y, member, [0])
    with pytest.raises(ValueError, match="at least one seed"):
        GE.run_groupwise(X, y, member, [])
    with pytest.raises(ValueError, match="rules must be a tuple"):
        GE.run_groupwise(X, y, member, [0], rules=("normalhedge",))


# -------------------------------------------------------------------------------------------------
# Data and tables


def test_synthetic_groups_follow_the_generator():
    data = GE.synthetic_groups(500, 3, ATTRS, seed=1)
    assert data.names == ["sex=m", "sex=f", "race=a", "race=b", "race=c", "always_on"]
    assert data.X.shape == (500, 3 + 5) and data.member.shape == (500, 6)
    # one level per attribute, and the indicator features are the memberships
    assert (data.member[:, :2].sum(1) == 1).all() and (data.member[:, 2:5].sum(1) == 1).all()
    assert (data.X[:, 3:] == data.member[:, :5]).all() and data.member[:, -1].all()
    for y in data.labels.values():
        assert y.min() == 0 and y.max() == 1
    again = GE.synthetic_groups(500, 3, ATTRS, seed=1)
    assert all((again.labels[k] == v).all() for k, v in data.labels.items())
    with pytest.raises(ValueError, match="sum to 1"):
        GE.synthetic_groups(10, 2, {"sex": {"m": 0.5, "f": 0.6}})
    with pytest.raises(ValueError, match="aggregates must be among"):
        GE.synthetic_groups(10, 2, ATTRS, aggregates=("median",))


def test_adult_groups_follow_the_paper_definitions():
    table = SimpleNamespace(
        X=np.array([[30, 9, 5.0, 1], [40, 13, 0.0, 0], [60, 10, 10.0, 1]], dtype=float),
        y=np.array([0, 1, 1]), features=["age", "education_num", "capital_gain", "flag"],
        groups={"sex": np.array([0, 1, 0]), "race": np.array([1, 0, 0])},
        levels={"sex": ["Male", "Female"], "race": ["White", "Black"]})
    table.group = table.groups.__getitem__
    data = GE.adult_groups(table)
    assert data.names == ["young", "middle", "old", "HighSchool&less", "College&more", "Male",
                          "Female", "White", "Black", "always_on"]
    assert data.member.astype(int).tolist() == [[1, 0, 0, 1, 0, 1, 0, 0, 1, 1],
                                                [0, 1, 0, 0, 1, 0, 1, 1, 0, 1],
                                                [0, 0, 1, 0, 1, 1, 0, 1, 0, 1]]
    assert data.X[:, 0].tolist() == [0.0, 1 / 3, 1.0]  # numeric columns min-max scaled
    assert data.X[:, 3].tolist() == [1, 0, 1]  # binary columns kept
    assert data.X.shape == (3, 4 + 9)


def _table(changes):
    """A loss table with baseline loss 1 on every group and the given relative changes."""
    rows = []
    for seed, per_group in enumerate(changes):
        for g, c in enumerate(per_group):
            rows += [{"label": "y", "seed": seed, "group": f"g{g}", "T_g": 10, "method": "ridge",
                      "loss": 1.0},
                     {"label": "y", "seed": seed, "group": f"g{g}", "T_g": 10, "method": "anh",
                      "loss": 1.0 + c}]
    return pd.DataFrame(rows)


def test_worst_group_change_and_compare_on_a_hand_made_table():
    table = _table([[-0.5, -0.1], [-0.2, 0.3], [-0.4, -0.2]])
    assert GE.worst_group_change(table) == pytest.approx([-0.1, 0.3, -0.2])
    out = GE.compare(table)
    assert out.loc["g0", "change"] == pytest.approx(-11 / 30)
    assert out.loc["g1", "ci low"] < 0 < out.loc["g1", "ci high"]
    with pytest.raises(ValueError, match="select one label column"):
        GE.compare(pd.concat([table, table.assign(label="z")]))


def test_loglog_slope_of_a_square_root_curve_is_one_half():
    n = np.array([10, 40, 160, 640])
    curves = pd.DataFrame({"label": "y", "seed": 0, "group": "g", "method": "anh", "n": n,
                           "regret": 3.0 * np.sqrt(n)})
    assert GE.loglog_slopes(curves).slope.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="floor must be > 0"):
        GE.loglog_slopes(curves, floor=0.0)


def test_regret_curves_end_at_the_whole_group_and_bound_ratio_is_below_one():
    data = GE.synthetic_groups(300, 3, ATTRS, aggregates=("mean",), seed=2)
    run = GE.run_groupwise(data.X, data.labels, data.member, [0], names=data.names)
    curves = GE.regret_curves(run, n_points=5, n_min=5)
    last = curves[curves.n == curves.T_g]
    losses = GE.group_losses(run)
    for (g, m), c in last.groupby(["group", "method"]):
        total = losses[(losses.group == g) & (losses.method == m)].loss.item()
        assert c.loss.item() == pytest.approx(total)
    assert (GE.bound_ratio(run) <= 1).all()


def test_adanormalhedge_bookkeeping_on_a_hand_computed_sequence():
    # Round 0: both awake, uniform weights, losses (0.2, 0.6): learner 0.4, R = (0.2, -0.2).
    # Round 1: expert 1 asleep: the learner follows expert 0 and nothing moves.
    # Round 2: w = (e^0.4 - 1, e^(0.8^2 / 3.6) - 1) / 2 by AdaNormalHedge's potential with C = 0.2,
    # so p_0 = 0.71657; losses (0, 1): learner 0.28343.
    losses = torch.tensor([[[0.2, 0.6]], [[0.5, 0.9]], [[0.0, 1.0]]], dtype=torch.float64)
    awake = torch.tensor([[[True, True]], [[True, False]], [[True, True]]])
    run = GW.sleeping_experts(losses, awake, keep_weights=True)
    w = np.array([np.exp(0.4) - 1, np.exp(0.64 / 3.6) - 1])
    p0 = w[0] / w.sum()
    np.testing.assert_allclose(run.weights[:, 0].numpy(), [[0.5, 0.5], [1.0, 0.0], [p0, 1 - p0]])
    np.testing.assert_allclose(run.loss[:, 0].numpy(), [0.4, 0.5, 1 - p0])
    np.testing.assert_allclose(run.R[0].numpy(), [0.2 + (1 - p0), -0.2 - p0])
    np.testing.assert_allclose(run.C[0].numpy(), [0.2 + (1 - p0), 0.2 + p0])
