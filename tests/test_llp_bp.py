"""LLP-BP: the potentials, loopy BP against exact enumeration, the batched MLP trainer against
single-model training, the baselines' losses, and the experiment's bags and label hygiene."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from repsuite.weak import llp_bp as L
from repsuite.weak import llp_experiment as E
from repsuite.weak import llp_training as T
from repsuite.weak.bags import make_bags, proportion_loss


def _all_states(n):
    return torch.tensor(list(itertools.product([0, 1], repeat=n)), dtype=torch.float64)


def _mrf(n=12, bag_size=4, k=3, sim_lambda=0.5, bag_lambda=0.5, scaling="none", seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = (X[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(int)
    bags = make_bags(n, bag_size, seed)
    edges, w, _ = L.knn_graph(X, k)
    return L.gibbs_mrf(bags, L.bag_counts(y, bags), edges, w, sim_lambda=sim_lambda,
                       bag_lambda=bag_lambda, scaling=scaling), bags, y


# -------------------------------------------------------------------------------------------------
# Potentials


@pytest.mark.parametrize("scaling", ["none", "size"])
def test_bag_terms_equal_the_squared_count_penalty_on_every_assignment(scaling):
    bags = np.array([0, 0, 0, 1, 1, 1])
    counts = np.array([2, 0])
    h, J_bag = L.bag_terms(bags, counts, 1.5, scaling=scaling)
    beta = 1.5 / 3 if scaling == "size" else 1.5
    Y = _all_states(6).numpy()
    expanded = Y @ h + sum(J_bag[bags[i]] * Y[:, i] * Y[:, j]
                           for i in range(6) for j in range(i + 1, 6) if bags[i] == bags[j])
    penalty = -beta * sum((Y[:, bags == b].sum(1) - counts[b]) ** 2 for b in range(2))
    const = -beta * (counts ** 2).sum()  # the expansion drops -beta k_b^2
    np.testing.assert_allclose(expanded + const, penalty, atol=1e-12)


def test_similarity_terms_equal_the_disagreement_penalty_on_every_assignment():
    edges = np.array([[0, 1], [1, 2], [0, 3], [2, 5], [4, 5]])
    w = np.array([0.3, 1.0, 0.7, 0.2, 0.9])
    h, J = L.similarity_terms(6, edges, w, 2.0)
    Y = _all_states(6).numpy()
    expanded = Y @ h + (Y[:, edges[:, 0]] * Y[:, edges[:, 1]]) @ J
    penalty = -2.0 * ((Y[:, edges[:, 0]] - Y[:, edges[:, 1]]) ** 2) @ w
    np.testing.assert_allclose(expanded, penalty, atol=1e-12)


def test_gibbs_mrf_log_potential_is_the_sum_of_both_penalties():
    mrf, bags, y = _mrf(n=8, bag_size=4)
    counts = L.bag_counts(y, bags)
    Y = _all_states(8)
    # Rebuild the penalties from the MRF's own edges plus the within-bag kNN pairs it merged.
    X = np.random.default_rng(0).normal(size=(8, 3))
    edges, w, _ = L.knn_graph(X, 3)
    sim = -0.5 * ((Y[:, edges[:, 0]] - Y[:, edges[:, 1]]) ** 2) @ torch.as_tensor(w)
    bag = -0.5 * sum((Y[:, torch.as_tensor(bags == b)].sum(1) - counts[b]) ** 2
                     for b in range(2))
    diff = mrf.log_potential(Y) - (sim + bag)
    assert torch.allclose(diff, diff[0].expand_as(diff), atol=1e-10)  # equal up to a constant


def test_knn_graph_matches_scikit_learn_and_uses_the_median_length_scale():
    X = np.random.default_rng(1).normal(size=(40, 5))
    edges, w, scale = L.knn_graph(X, 4)
    _, idx = NearestNeighbors(n_neighbors=4, metric="cosine").fit(X).kneighbors()
    ref = {tuple(sorted((i, j))) for i in range(40) for j in idx[i]}
    assert set(map(tuple, edges.tolist())) == ref
    dist = np.linalg.norm(X[edges[:, 0]] - X[edges[:, 1]], axis=1)
    assert scale == pytest.approx(np.median(dist))
    np.testing.assert_allclose(w, np.exp(-dist / scale))


# -------------------------------------------------------------------------------------------------
# Belief propagation


def test_bp_on_a_chain_equals_exact_marginals():
    # A chain of 6 nodes whose bags are adjacent pairs on the chain: the MRF is a tree.
    edges = np.array([[1, 2], [3, 4]])
    bags = np.array([0, 0, 1, 1, 2, 2])
    mrf = L.gibbs_mrf(bags, np.array([1, 2, 0]), edges, np.array([0.8, 0.4]),
                      sim_lambda=0.7, bag_lambda=0.9)
    bp = L.loopy_bp(mrf, n_iter=50, damping=0.0, tol=1e-14)
    assert bp.converged
    assert torch.allclose(bp.marginals, L.exact_marginals(mrf), atol=1e-8)


def test_bp_on_a_loopy_graph_is_close_to_exact_marginals():
    mrf, _, _ = _mrf(n=12, bag_size=4, k=3)
    bp = L.loopy_bp(mrf, n_iter=500, tol=1e-10)
    assert bp.converged
    exact = L.exact_marginals(mrf)
    assert (bp.marginals - exact).abs().max() < 0.02
    assert np.corrcoef(bp.marginals, exact)[0, 1] > 0.99


def test_bp_in_float32_agrees_with_float64():
    mrf, _, _ = _mrf(n=16, bag_size=8, k=3)
    single = L.PairwiseMRF(mrf.h.float(), mrf.edges, mrf.J.float(), mrf.members,
                           mrf.clique.float())
    a = L.loopy_bp(mrf, n_iter=200, tol=1e-9).marginals
    b = L.loopy_bp(single, n_iter=200, tol=1e-6).marginals
    assert (a - b.double()).abs().max() < 1e-4


def test_dense_cliques_give_the_same_bp_as_a_plain_edge_list():
    mrf, _, _ = _mrf(n=12, bag_size=6, k=3)
    iu = np.triu_indices(6, 1)
    pairs = torch.stack([mrf.members[:, iu[0]].reshape(-1), mrf.members[:, iu[1]].reshape(-1)], 1)
    flat = L.PairwiseMRF(mrf.h, torch.cat([mrf.edges, pairs]),
                         torch.cat([mrf.J, mrf.clique[:, iu[0], iu[1]].reshape(-1)]),
                         torch.zeros(0, 0, dtype=torch.int64), torch.zeros(0, 0, 0).double())
    a = L.loopy_bp(mrf, n_iter=60, tol=0.0).marginals
    b = L.loopy_bp(flat, n_iter=60, tol=0.0).marginals
    assert torch.allclose(a, b, atol=1e-12)


def test_without_similarity_every_member_of_a_bag_gets_the_same_marginal():
    # alpha = 0: members of a bag are exchangeable, so their marginals are equal (k/n when the
    # bag penalty is strong): the alpha = 0 ablation is the bag-proportion labelling.
    bags = np.zeros(6, dtype=int)
    mrf = L.gibbs_mrf(bags, np.array([2]), np.zeros((0, 2)), np.zeros(0), sim_lambda=0.0,
                      bag_lambda=20.0)
    assert torch.allclose(L.exact_marginals(mrf), torch.full((6,), 2 / 6, dtype=torch.float64))
    bp = L.loopy_bp(mrf, n_iter=300, tol=1e-12).marginals
    assert torch.allclose(bp, bp[0].expand(6), atol=1e-12)
    mrf, bags, _ = _mrf(n=12, bag_size=4, sim_lambda=0.0)
    p = L.loopy_bp(mrf, n_iter=300).marginals.numpy()
    for b in range(3):
        assert np.ptp(p[bags == b]) < 1e-9


def test_without_bag_potential_the_marginals_are_one_half():
    # beta = 0: the similarity term is symmetric under flipping every label, so the exact
    # marginals are 1/2 and carry no information (the beta = 0 ablation).
    half = torch.full((12,), 0.5, dtype=torch.float64)
    for sim_lambda in (0.5, 2.0):
        mrf, _, _ = _mrf(n=12, bag_size=4, bag_lambda=0.0, sim_lambda=sim_lambda)
        assert torch.allclose(L.exact_marginals(mrf), half)
    # BP keeps the symmetric fixed point for weak smoothing; for strong smoothing it falls into a
    # symmetry-broken one (the collapse of beliefs seen with large couplings).
    weak, _, _ = _mrf(n=12, bag_size=4, bag_lambda=0.0, sim_lambda=0.5)
    assert torch.allclose(L.loopy_bp(weak, tol=1e-12).marginals, half)
    strong = L.loopy_bp(mrf, n_iter=300, tol=1e-12)
    assert strong.converged and (strong.marginals - 0.5).abs().max() > 0.1


def test_messages_stay_finite_for_huge_negative_couplings():
    # e^J below the machine epsilon: the message must stop at J instead of reaching log(0).
    bags = np.zeros(4, dtype=int)
    mrf = L.gibbs_mrf(bags, np.array([2]), np.zeros((0, 2)), np.zeros(0), sim_lambda=0.0,
                      bag_lambda=1000.0)
    for dtype in (torch.float32, torch.float64):
        single = L.PairwiseMRF(mrf.h.to(dtype), mrf.edges, mrf.J.to(dtype), mrf.members,
                               mrf.clique.to(dtype))
        p = L.loopy_bp(single, n_iter=20).marginals
        assert torch.isfinite(p).all()


def test_bp_records_history_and_reports_non_convergence():
    mrf, _, _ = _mrf(n=12, bag_size=4)
    bp = L.loopy_bp(mrf, n_iter=6, tol=0.0, record_every=2)
    assert len(bp.history) == 3 and not bp.converged and bp.n_iter == 6


def test_heldout_bag_loss_uses_only_counts_and_is_log2_without_similarity():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 3))
    y = (X[:, 0] > 0).astype(int)
    bags = make_bags(64, 4, 0)
    edges, w, _ = L.knn_graph(X, 3)
    kw = dict(bag_lambda=2.0, holdout=0.25, seed=1, dtype=torch.float64)
    # alpha = 0: hidden bags get only the base rate of the kept bags.
    counts = L.bag_counts(y, bags)
    t = counts / 4
    held = np.random.default_rng(1).permutation(16)[:4]
    rate = np.delete(counts, held).sum() / 48
    half = -(t[held] * np.log(rate) + (1 - t[held]) * np.log(1 - rate)).mean()
    assert L.heldout_bag_loss(bags, L.bag_counts(y, bags), edges, w, sim_lambda=0.0,
                              **kw) == pytest.approx(half, abs=1e-9)
    a = L.heldout_bag_loss(bags, L.bag_counts(y, bags), edges, w, sim_lambda=0.5, **kw)
    y2 = y.copy()
    for b in range(16):  # same counts, other instance labels
        idx = np.flatnonzero(bags == b)
        y2[idx] = np.roll(y[idx], 1)
    b = L.heldout_bag_loss(bags, L.bag_counts(y2, bags), edges, w, sim_lambda=0.5, **kw)
    assert a == b and a < half  # smoothing carries bag information to the hidden bags here
    with pytest.raises(ValueError, match="leaves no bag to hide"):
        L.heldout_bag_loss(bags, L.bag_counts(y, bags), edges, w, sim_lambda=0.5, bag_lambda=1.0,
                           holdout=0.01)


def test_selection_picks_the_weight_with_the_least_heldout_loss():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(128, 3))
    y = (X[:, 0] > 0).astype(int)
    bags = make_bags(128, 8, 0)
    cfg = E.Config(bag_sizes=[8], sim_grid=(0.0, 0.3, 0.6))
    table = E.select_sim_lambda(X, bags, L.bag_counts(y, bags), cfg, seed=0)
    assert table.chosen.sum() == 1
    assert table.heldout_loss[table.chosen].iloc[0] == table.heldout_loss.min()
    assert table.sim_lambda[table.chosen].iloc[0] > 0.0


# -------------------------------------------------------------------------------------------------
# Batched MLPs and the LLP losses


def test_models_trained_together_equal_models_trained_alone():
    rng = np.random.default_rng(0)
    X = torch.as_tensor(rng.normal(size=(64, 5)), dtype=torch.float64)
    bags = make_bags(64, 8, 0)
    props = rng.uniform(size=8)
    objs = [T.Objective("labels", rng.uniform(size=64)),
            T.Objective("dllp", bags=bags, proportions=props),
            T.Objective("easyllp", bags=bags, proportions=props),
            T.Objective("labels", rng.uniform(size=64), bags, props, agg_lambda=0.5)]
    kw = dict(groups=bags, hidden=(6, 4), epochs=3, batch_size=16, seed=7)
    together = T.train_models(X, objs, **kw).predict(X)[0]
    for k, o in enumerate(objs):
        alone = T.train_models(X, [o], model_seeds=[7 + k], **kw).predict(X)[0][0]
        assert torch.allclose(alone, together[k], atol=1e-12)
    moved = T.train_models(X, objs[:1], model_seeds=[8], **kw).predict(X)[0][0]
    assert not torch.allclose(moved, together[0])  # the seed does set the start


def test_multimlp_forward_equals_separate_linear_layers():
    model = T.MultiMLP(3, 4, (5, 3), seeds=[1, 2, 3]).double()
    X = torch.randn(7, 4, dtype=torch.float64)
    logits, embed = model(X)
    for k in range(3):
        a = X
        for i in range(3):
            W, c = model.layers[2 * i][k], model.layers[2 * i + 1][k, 0]
            a = a @ W + c
            if i == 0:
                assert torch.allclose(torch.relu(a), embed[k])
            if i < 2:
                a = torch.relu(a)
        assert torch.allclose(a.squeeze(-1), logits[k])


def test_dllp_loss_equals_the_shared_proportion_loss_and_a_hand_value():
    p = torch.tensor([0.2, 0.6, 0.9, 0.1], dtype=torch.float64)
    loss = proportion_loss(p, np.array([0, 0, 1, 1]), np.array([0.5, 1.0]))
    hand = -(0.5 * np.log(0.4) + 0.5 * np.log(0.6) + np.log(0.5)) / 2
    assert loss.item() == pytest.approx(hand, rel=1e-12)
    # The training loop's batched form: a batch holding bags 1 and 3 of 5, any order.
    rng = np.random.default_rng(0)
    bags = np.array([3, 1, 3, 1, 1, 3])
    props = torch.as_tensor(rng.uniform(size=5))
    q = torch.as_tensor(rng.uniform(size=6))
    fast = T.dllp_loss(q, torch.as_tensor(bags), props)
    _, local = np.unique(bags, return_inverse=True)
    ref = proportion_loss(q, local, props[[1, 3]].numpy())
    assert fast.item() == pytest.approx(ref.item(), rel=1e-12)


def test_easyllp_soft_labels_are_unbiased_for_random_bags():
    # E[|b| (alpha_b - p) + p | x_i] = y_i for bags drawn from an infinite population; drawn
    # without replacement from n instances (S positives), the other |b| - 1 members have mean
    # (S - y_i) / (n - 1), which leaves a bias of (|b| - 1) ((S - y_i) / (n - 1) - S / n).
    y = np.array([1, 0, 0, 1, 0, 0, 0, 1])
    bags = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    o = T.Objective("easyllp", bags=bags, proportions=np.array([0.5, 0.25]))
    np.testing.assert_allclose(o.soft_labels(), [4 * (0.5 - 0.375) + 0.375] * 4
                               + [4 * (0.25 - 0.375) + 0.375] * 4)
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=64) < 0.3).astype(int)
    soft = np.zeros(64)
    for s in range(400):
        b = make_bags(64, 8, s)
        soft += T.Objective("easyllp", bags=b, proportions=E.bag_proportions(y, b)).soft_labels()
    S = y.sum()
    expected = y + 7 * ((S - y) / 63 - S / 64)
    for label in (0, 1):  # class means over 400 draws: standard error below 0.015
        assert abs(soft[y == label].mean() / 400 - expected[y == label][0]) < 0.04


def test_auc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 200).astype(float)
    y = rng.integers(0, 2, 200)
    assert L.auc(s, y) == pytest.approx(roc_auc_score(y, s))
    assert L.auc(np.ones(10), np.r_[np.zeros(5), np.ones(5)]) == 0.5


# -------------------------------------------------------------------------------------------------
# The experiment: bags, label hygiene, slopes


def test_nested_bags_lie_inside_the_larger_ones():
    small, large = E.nested_bags(64, [4, 16], seed=3)
    for b in range(16):
        assert len(np.unique(large[small == b])) == 1
    assert L.nested_groups([small, large]) is large
    with pytest.raises(ValueError, match="must divide the next"):
        E.nested_bags(60, [4, 6], seed=0)


def test_training_sees_labels_only_through_bag_counts():
    # Permuting the labels inside every bag keeps the counts: every LLP result must be identical.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(96, 4))
    y = (X[:, 0] + rng.normal(size=96) > 0).astype(int)
    cfg = E.Config(bag_sizes=[8, 32], epochs=2, bp_iter=5, threshold=None, hidden=(8, 4),
                   supervised=False, sim_grid=(0.2, 0.5))
    bags = E.nested_bags(96, [8, 32], seed=1)[0]  # the finest bags: every count is kept
    y_spy = y.copy()
    for b in range(bags.max() + 1):
        idx = np.flatnonzero(bags == b)
        y_spy[idx] = rng.permutation(y[idx])
    assert (y_spy != y).any()
    Xte, yte = rng.normal(size=(30, 4)), rng.integers(0, 2, 30)
    a = E.run_seed(E.Split("x", X, y, Xte, yte), cfg, seed=1)
    b = E.run_seed(E.Split("x", X, y_spy, Xte, yte), cfg, seed=1)
    pd_a, pd_b = a["auc"], b["auc"]
    np.testing.assert_array_equal(pd_a.auc.to_numpy(), pd_b.auc.to_numpy())


def test_bag_size_slopes_are_per_seed_least_squares_slopes():
    import pandas as pd

    rows = [{"dataset": "d", "method": "m", "seed": s, "bag_size": b,
             "auc": 0.9 - 0.02 * (s + 1) * np.log2(b)} for s in range(3) for b in (8, 32, 128)]
    np.testing.assert_allclose(E.bag_size_slopes(pd.DataFrame(rows), "d", "m"),
                               [-0.02, -0.04, -0.06])


# -------------------------------------------------------------------------------------------------
# Clear errors


@pytest.mark.parametrize("call, message", [
    (lambda: L.bag_terms([0, 0, 1], [3, 0], 1.0), "bag 0 has 2 instances but a count of 3"),
    (lambda: L.bag_terms([0, 0, 1], [1, 0], 1.0, scaling="sqrt"), "scaling must be one of"),
    (lambda: L.similarity_terms(3, [[0, 0]], [1.0], 1.0), "two different instances"),
    (lambda: L.knn_graph(np.ones((5, 2)), 5), "n_neighbors must be in 1..4"),
    (lambda: L.knn_graph([[0.0, np.nan], [1.0, 2.0]], 1), "NaN"),
    (lambda: L.loopy_bp(_mrf()[0], damping=1.0), "damping must be in"),
    (lambda: L.exact_marginals(_mrf(n=24, bag_size=4)[0]), "n = 24 > 20"),
    (lambda: T.Objective("ranking").checked(4), "objective kind must be one of"),
    (lambda: T.Objective("dllp").checked(4), "needs bags and proportions"),
    (lambda: T.Objective("labels", np.array([0.0, 2.0])).checked(2), "targets must be 2 values"),
    (lambda: T.Objective("dllp", bags=np.array([0, 0, -1]), proportions=[0.5]).checked(3),
     "every instance in a bag"),
    (lambda: T.train_models(torch.zeros(4, 2), [T.Objective("dllp", bags=np.array([0, 0, 1, 1]),
                                                            proportions=[0.5, 0.5])],
                            groups=np.array([0, 1, 1, 1])), "a bag spans two batching groups"),
    (lambda: L.auc([0.1, 0.2], [1, 1]), "both positive and negative"),
    (lambda: T.MultiMLP(2, 3, (4,)), "at least two positive layer widths"),
    (lambda: E.binary_task("cifar"), "dataset must be one of"),
    (lambda: L.fit_llp_bp(np.zeros((4, 2)), [np.array([0, 0, 1, -1])], [np.array([1, 0])]),
     "every training instance must be in a bag"),
    (lambda: T.MultiMLP(2, 3, (4, 2), seeds=[0]), "1 seeds for 2 models"),
])
def test_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_bce_with_logits_loss_is_linear_in_out_of_range_labels():
    # EasyLLP's labels leave [0, 1]; the loss must stay t * l(f, 1) + (1 - t) * l(f, 0).
    x, t = torch.tensor([0.3, -1.2]), torch.tensor([1.7, -0.4])
    ref = t * F.softplus(-x) + (1 - t) * F.softplus(x)
    assert torch.allclose(F.binary_cross_entropy_with_logits(x, t, reduction="none"), ref)
