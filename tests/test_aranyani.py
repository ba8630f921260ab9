"""Aranyani's oblique forest, its running fairness statistics, the DP bound and the baselines,
checked against autograd, torch's Adam, brute-force recomputation and hand-made values."""

import numpy as np
import pytest
import torch
from fairlearn.metrics import demographic_parity_difference as fairlearn_dp
from scipy.special import expit

from repsuite.fairness import aranyani as A
from repsuite.fairness import aranyani_experiment as E
from repsuite.fairness.stream import RunningGroupMeans

F64 = torch.float64


def forest_and_inputs(R=2, m=5, d=4, n_trees=2, depth=3, seed=0):
    forest = A.ObliqueForest(R, d, n_trees=n_trees, depth=depth).init_(range(seed, seed + R))
    x = torch.randn(R, m, d, dtype=F64, generator=torch.Generator().manual_seed(seed + 100))
    return forest, x


def biased_stream(n=600, d=3, seed=0):
    """Labels that follow the group and a feature: any accurate model has a large DP gap."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 2, n)
    X = np.c_[rng.normal(size=(n, d - 1)) + group[:, None], group]
    y = (X[:, 0] + 1.5 * group + 0.3 * rng.normal(size=n) > 1.0).astype(int)
    return X, y, group


# -------------------------------------------------------------------------------------------------
# The soft oblique tree


def test_tree_paths_of_depth_two():
    path, left = A.tree_paths(2)
    assert path.tolist() == [[0, 1], [0, 1], [0, 2], [0, 2]]
    assert left.tolist() == [[True, True], [True, False], [False, True], [False, False]]


def test_leaf_probabilities_sum_to_one_and_output_is_a_distribution():
    forest, x = forest_and_inputs(depth=4)
    c = forest.forward(x)
    assert torch.allclose(c.P.sum(-1), torch.ones_like(c.P[..., 0]), atol=1e-12)
    assert torch.allclose(c.p.sum(-1), torch.ones_like(c.p[..., 0]), atol=1e-12)


def test_depth_one_tree_is_a_logistic_mixture_of_its_two_leaves():
    forest, x = forest_and_inputs(R=1, m=3, d=2, n_trees=1, depth=1)
    w, b = forest.W[0, 0, 0].numpy(), forest.b[0, 0, 0].item()
    theta = forest.theta[0, 0].numpy()
    leaf = np.exp(theta) / np.exp(theta).sum(-1, keepdims=True)
    go_left = expit(x[0].numpy() @ w + b)[:, None]
    by_hand = go_left * leaf[0] + (1 - go_left) * leaf[1]
    assert np.allclose(forest.forward(x).p[0].numpy(), by_hand, atol=1e-12)


def test_hand_written_backward_equals_autograd():
    forest, x = forest_and_inputs(R=3, m=4, d=5, n_trees=2, depth=3)
    upstream = torch.randn(3, 4, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(7))
    ours = forest.backward(forest.forward(x), upstream)
    start = forest.params.clone()
    for i in range(4):
        for k in range(2):
            params = start.clone().requires_grad_(True)
            forest.params = params
            target = (forest.forward(x).p[:, i] * upstream[:, i, k]).sum()
            ref, = torch.autograd.grad(target, params)
            assert torch.allclose(ours[:, i, k], ref, atol=1e-12)


def test_bad_shapes_and_sizes_are_refused():
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        A.tree_paths(0)
    with pytest.raises(ValueError, match="n_features must be an int >= 1"):
        A.ObliqueForest(2, 0)
    forest, _ = forest_and_inputs()
    with pytest.raises(ValueError, match="x must have shape"):
        forest.forward(torch.zeros(2, 1, 7, dtype=F64))
    with pytest.raises(ValueError, match="one seed per run"):
        forest.init_([0])


# -------------------------------------------------------------------------------------------------
# Fairness statistics and the online update


def test_huber_derivative_is_linear_inside_the_band_and_a_sign_outside():
    F = torch.tensor([-0.5, -0.01, -0.004, 0.0, 0.002, 0.01, 3.0])
    assert A.huber_grad(F, 0.01).tolist() == pytest.approx([-1, -1, -0.4, 0, 0.2, 1, 1])
    with pytest.raises(ValueError, match="delta must be > 0"):
        A.huber_grad(F, 0.0)


def test_running_node_statistics_give_the_exact_gradient_of_the_node_level_penalty():
    # Parameters held fixed over 50 examples: the running group means of d n_i / d(w_i, b_i) must
    # reproduce the gradient of sum_i h(E_1[n_i] - E_0[n_i]) recomputed from all 50 examples.
    d, n, delta = 3, 50, 0.05
    forest, _ = forest_and_inputs(R=1, d=d, n_trees=2, depth=2, seed=3)
    rng = np.random.default_rng(0)
    X = torch.as_tensor(rng.normal(size=(n, d)))
    group = torch.as_tensor(rng.integers(0, 2, n))
    T, N = forest.T, forest.N
    node_mean = RunningGroupMeans(2, (T, N), runs=1, dtype=F64)
    grad_mean = RunningGroupMeans(2, (T, N, d + 1), runs=1, dtype=F64)
    shared = RunningGroupMeans(2, (T, N), dtype=F64)
    for t in range(n):
        cache = forest.forward(X[None, t:t + 1])
        fair = A.node_fairness_gradient(cache, group[t:t + 1], node_mean, grad_mean, delta)
        shared.update(cache.n[:, 0], group[t:t + 1])

    params = forest.params.clone().requires_grad_(True)
    forest.params = params
    nodes = forest.forward(X[None]).n[0]  # (n, T, N)
    F = nodes[group == 1].mean(0) - nodes[group == 0].mean(0)
    huber = torch.where(F.abs() <= delta, F**2 / (2 * delta), F.abs() - delta / 2)
    ref, = torch.autograd.grad(huber.sum(), params)
    assert torch.allclose(fair[0], ref[0, :forest.n_node_params], atol=1e-6)
    assert torch.allclose(node_mean.gap()[0], shared.gap(1, 0), atol=1e-12)
    assert torch.allclose(ref[0, forest.n_node_params:], torch.zeros(1, dtype=F64))


def test_flat_adam_matches_torch_adam():
    p = torch.randn(2, 6, dtype=F64)
    ref = p.clone().requires_grad_(True)
    ours = A.FlatAdam(p, lr=0.01, eps=1e-7)
    opt = torch.optim.Adam([ref], lr=0.01, eps=1e-7)
    for k in range(5):
        g = torch.sin(torch.arange(12, dtype=F64).reshape(2, 6) + k)
        ours.step(g)
        ref.grad = g.clone()
        opt.step()
    assert torch.allclose(p, ref.detach(), atol=1e-12)


def test_lambda_zero_is_plain_online_adam_on_the_cross_entropy():
    X, y, group = biased_stream(n=40, d=3)
    orders = np.stack([np.arange(40), np.arange(40)[::-1]])
    result = A.train_online(X, y, group, orders, [0.0, 0.0], [5, 6], depth=2, n_trees=2, lr=0.01,
                            dtype=F64)
    for r, seed in enumerate([5, 6]):
        ref = A.ObliqueForest(1, 3, n_trees=2, depth=2).init_([seed])
        params = ref.params.clone().requires_grad_(True)
        ref.params = params
        opt = torch.optim.Adam([params], lr=0.01, eps=1e-7)
        for t, row in enumerate(orders[r]):
            p = ref.forward(torch.as_tensor(X[row])[None, None]).p[0, 0]
            assert p[1].item() == pytest.approx(result.proba[r, t], abs=1e-10)
            opt.zero_grad()
            (-torch.log(p[y[row]])).backward()
            opt.step()
        assert torch.allclose(result.model.params[r], params.detach(), atol=1e-10)


def test_the_fairness_gradient_lowers_the_gap_on_a_biased_stream():
    X, y, group = biased_stream(n=800)
    orders = np.tile(np.arange(800), (4, 1))
    lam = [0.0, 1.0, 0.0, 1.0]
    node = A.train_online(X, y, group, orders, lam, [0] * 4, depth=2, lr=0.01)
    leaf = A.train_online(X, y, group, orders, lam, [0] * 4, depth=2, lr=0.01, constraint="leaf")
    dp = E.online_scores(node.pred, y[orders], group[orders])[1]
    assert dp[0] > 0.4 and dp[1] < dp[0] / 2
    assert np.array_equal(node.pred[0], leaf.pred[0])  # lambda 0: both are the same learner
    assert E.online_scores(leaf.pred, y[orders], group[orders])[1][1] < 0.75 * dp[0]


def test_bad_streams_are_refused_with_the_reason():
    X, y, group = biased_stream(n=20)
    order = np.arange(20)[None]
    with pytest.raises(ValueError, match="X contains NaN"):
        A.train_online(np.where(X > 2, np.nan, X), y, group, order, [0.0], [0])
    with pytest.raises(ValueError, match="group must hold 0/1 codes"):
        A.train_online(X, y, group + 1, order, [0.0], [0])
    with pytest.raises(ValueError, match="y needs one value per row"):
        A.train_online(X, y[:5], group, order, [0.0], [0])
    with pytest.raises(ValueError, match="orders index rows 0..19"):
        A.train_online(X, y, group, order + 5, [0.0], [0])
    with pytest.raises(ValueError, match="one finite lambda >= 0 per run"):
        A.train_online(X, y, group, order, [-1.0], [0])
    with pytest.raises(ValueError, match="constraint must be"):
        A.train_online(X, y, group, order, [0.0], [0], constraint="tree")


# -------------------------------------------------------------------------------------------------
# From node-level gaps to the output gap


def test_bound_holds_when_node_outputs_are_independent_and_is_tight_at_depth_one():
    rng = np.random.default_rng(1)
    for depth in (1, 2, 3, 4):
        for _ in range(200):
            q0, q1 = rng.random((2, 2**depth - 1))
            if rng.random() < 0.5:  # nearly fair nodes, the regime the penalty aims at
                q1 = np.clip(q0 + 0.02 * rng.normal(size=q0.shape), 0, 1)
            s = rng.random(2**depth)
            exact = A.exact_gap_independent(q0, q1, s)
            bound = A.bound_from_node_means(*(torch.as_tensor(v)[None] for v in (q0, q1, s)))
            assert exact <= bound.item() + 1e-12
            if depth == 1:
                assert exact == pytest.approx(bound.item(), abs=1e-12)


def test_dp_bound_reports_the_forest_output_gap():
    forest, _ = forest_and_inputs(R=2, d=3, depth=3)
    X, _, group = biased_stream(n=300, d=3)
    out = A.dp_bound(forest, X, group)
    p1 = forest.predict_proba(torch.as_tensor(X)).numpy()
    direct = np.abs(p1[:, group == 1].mean(1) - p1[:, group == 0].mean(1))
    assert np.allclose(out["gap"], direct, atol=1e-12)
    assert (out["bound"] >= 0).all()
    with pytest.raises(ValueError, match="both groups 0 and 1"):
        A.dp_bound(forest, X, np.zeros(300, dtype=int))


# -------------------------------------------------------------------------------------------------
# Baselines and scores


def test_mlp_backward_equals_autograd():
    net = E.ReservoirMLP(2, 4, 3, device="cpu", dtype=F64).init_([0, 1])
    x = torch.randn(2, 6, 4, dtype=F64)
    upstream = torch.randn(2, 6, 2, dtype=F64)
    h, p = net.forward(x)
    ours = net.backward(x, h, p, upstream)
    params = net.params.clone().requires_grad_(True)
    net.params = params
    ref, = torch.autograd.grad((net.forward(x)[1] * upstream).sum(), params)
    assert torch.allclose(ours, ref, atol=1e-12)


def test_reservoir_regulariser_lowers_the_gap_and_its_memory_is_the_buffers():
    X, y, group = biased_stream(n=800)
    orders = np.tile(np.arange(800), (2, 1))
    res = E.train_reservoir_mlp(X, y, group, orders, [0.0, 3.0], [0, 0], reservoir_size=20,
                                lr=0.01)
    dp = E.online_scores(res.pred, y[orders], group[orders])[1]
    assert dp[1] < dp[0] / 2
    assert res.state_floats == 2 * 20 * 3
    with pytest.raises(ValueError, match="reservoir_size must be >= 2"):
        E.train_reservoir_mlp(X, y, group, orders, [0.0, 1.0], [0, 0], reservoir_size=1)


def test_hoeffding_tree_learns_a_separable_stream():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 2))
    y = (X[:, 0] > 0).astype(int)
    pred = E.hoeffding_tree(X, y, np.arange(600)[None])
    assert pred.shape == (1, 600) and pred[0, 0] == 0
    assert (pred[0, 300:] == y[300:]).mean() > 0.9


def test_running_majority_and_the_majority_mixture():
    labels = np.array([[1, 1, 0, 0, 0, 1]])
    assert E.running_majority(labels).tolist() == [[0, 1, 1, 1, 0, 0]]
    model = np.array([[1, 0, 1, 0, 1, 0]])
    assert np.array_equal(E.majority_mixture(model, labels, 1.0, [0]), model)
    assert np.array_equal(E.majority_mixture(model, labels, 0.0, [0]), E.running_majority(labels))
    with pytest.raises(ValueError, match="q must be in"):
        E.majority_mixture(model, labels, 1.5, [0])


def test_online_gap_equals_fairlearn():
    rng = np.random.default_rng(2)
    pred, labels, group = rng.integers(0, 2, (3, 3, 200))
    _, dp = E.online_scores(pred, labels, group)
    ref = [fairlearn_dp(labels[k], pred[k], sensitive_features=group[k]) for k in range(3)]
    assert dp == pytest.approx(ref, abs=1e-12)


def test_frontier_area_by_hand():
    # Best accuracy at gap <= delta: 0.6 on [0, 0.1), 0.8 on [0.1, 0.2]: area 0.7 after normalising.
    assert E.frontier_area([0.1, 0.0], [0.8, 0.6], 0.2) == pytest.approx(0.7)
    # Without a point at gap 0 the stretch below the smallest gap counts as the floor.
    assert E.frontier_area([0.1], [0.8], 0.2) == pytest.approx(0.4)
    assert E.frontier_area([0.1], [0.8], 0.2, floor=0.5) == pytest.approx(0.65)
    assert E.frontier_area([0.5], [0.9], 0.2) == 0.0  # too unfair to count
    with pytest.raises(ValueError, match="equal-length"):
        E.frontier_area([0.1, 0.2], [0.8], 0.2)
    with pytest.raises(ValueError, match="NaN"):
        E.frontier_area([np.nan], [0.8], 0.2)


def test_compas_stream_keeps_two_races_and_adds_the_group_as_a_feature():
    s = E.load_stream("compas", "race", ["Caucasian", "African-American"])
    assert set(np.unique(s.group)) == {0, 1} and len(s.X) < 6172
    assert s.features[-1] == "race=African-American"
    assert np.allclose(s.X.mean(0), 0, atol=1e-9) and np.allclose(s.X.std(0), 1, atol=1e-9)
    assert np.array_equal(s.X[:, -1] > 0, s.group == 1)
    with pytest.raises(ValueError, match="levels must be two of"):
        E.load_stream("compas", "race", ["Caucasian", "Martian"])
    with pytest.raises(ValueError, match="n_steps must be in"):
        E.stream_orders(10, [0], 11)


def test_work_counter_counts_multiply_adds_and_written_elements():
    a, b = torch.ones(2, 3, 4), torch.ones(2, 4, 5)
    with E.WorkCounter() as counter:
        c = a @ b  # 2 * 3 * 4 * 5 multiply-adds
        d = c.reshape(6, 5)  # a view: free
        (d + 1).sum()  # 30 elements, then 1
    assert counter.work == 120 + 30 + 1


def test_fairness_work_per_step_does_not_grow_with_the_stream():
    s = E.load_stream("compas", "race", ["Caucasian", "African-American"])
    kw = dict(lam=1.0, n_trees=2, depth=2, hidden=4, reservoir_size=5)
    short, long = (E.fairness_work(s, [0], n_steps=n, **kw).set_index("method") for n in (4, 12))
    assert short.work_extra.loc["aranyani"] == pytest.approx(long.work_extra.loc["aranyani"])
    assert short.work_extra.loc["aranyani"] < short.work_extra.loc["reservoir_mlp"]
    assert short.state_floats.loc["aranyani"] == 2 * (2 * 3 + 2 * 3 * (7 + 1))  # 7 inputs
