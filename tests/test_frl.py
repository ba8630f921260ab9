"""FRL: the vote, the score reset, the supermask and its straight-through gradient, the attacks on
rankings, the communication formula, and bad input."""

import math

import numpy as np
import pytest
import torch

from repsuite.federated import Clients, frl, partition
from repsuite.federated import frl_experiment as fx


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# The vote


def test_vote_on_a_hand_example():
    # Rankings list edge ids from the lowest score to the highest.
    rankings = torch.tensor([[3, 0, 2, 1],   # positions: e0=1, e1=3, e2=2, e3=0
                             [0, 3, 1, 2],   # positions: e0=0, e1=2, e2=3, e3=1
                             [2, 3, 0, 1]])  # positions: e0=2, e1=3, e2=0, e3=1
    assert frl.positions(rankings).tolist() == [[1, 3, 2, 0], [0, 2, 3, 1], [2, 3, 0, 1]]
    global_ranking, sums = frl.vote(rankings)
    assert sums.tolist() == [3, 8, 5, 2]
    assert global_ranking.tolist() == [3, 0, 2, 1]


def test_vote_breaks_ties_by_edge_id_and_a_single_voter_is_obeyed():
    global_ranking, sums = frl.vote(torch.tensor([[0, 1, 2], [2, 1, 0]]))
    assert sums.tolist() == [2, 2, 2]
    assert global_ranking.tolist() == [0, 1, 2]
    alone = torch.randperm(50, generator=gen())
    assert torch.equal(frl.vote(alone[None])[0], alone)


def test_reset_keeps_the_initial_values_in_the_voted_order():
    initial = frl.init_scores([6, 5], gen())[0]
    sorted_initial = initial.flatten().sort().values
    global_ranking = torch.randperm(30, generator=gen(1))
    scores = frl.reset_scores(global_ranking, sorted_initial, initial.shape)
    assert scores.shape == initial.shape
    assert torch.equal(scores.flatten().sort().values, sorted_initial)
    assert torch.equal(frl.ranking(scores), global_ranking)
    # The vote's winners (the end of the ranking) carry the largest scores, so the mask keeps them.
    kept = frl.supermask(scores, 0.5).flatten().bool()
    assert set(torch.nonzero(kept).flatten().tolist()) == set(global_ranking[15:].tolist())


def test_ranking_of_stacked_scores_is_per_client():
    scores = torch.randn(3, 4, 5, generator=gen())
    stacked = frl.ranking(scores)
    for c in range(3):
        assert torch.equal(stacked[c], frl.ranking(scores[c]))
        assert torch.equal(scores[c].flatten()[stacked[c]], scores[c].flatten().sort().values)


# Supermask network


def test_supermask_forward_at_full_density_is_the_dense_forward():
    sizes = [7, 9, 8, 3]
    g = gen()
    weights = [w.double() for w in frl.signed_constant(sizes, g)]
    scores = [s.double() for s in frl.init_scores(sizes, g)]
    x = torch.randn(11, 7, generator=g, dtype=torch.float64)
    assert torch.allclose(frl.forward(weights, scores, x, 1.0), frl.dense_forward(weights, x),
                          atol=1e-14, rtol=0)
    dense = frl.DenseMLP(sizes).double()
    with torch.no_grad():
        for layer, w in zip([m for m in dense if isinstance(m, torch.nn.Linear)], weights,
                            strict=True):
            layer.weight.copy_(w)
    assert torch.allclose(dense(x), frl.dense_forward(weights, x), atol=1e-14, rtol=0)


def test_signed_constant_weights_are_plus_minus_kaiming_std():
    weights = frl.signed_constant([20, 10, 4], gen())
    for w, fan_in in zip(weights, [20, 10], strict=True):
        assert torch.allclose(w.abs(), torch.full_like(w, math.sqrt(2 / fan_in)))
        assert 0 < (w > 0).float().mean() < 1


@pytest.mark.parametrize(("shape", "density"), [((6, 5), 0.5), ((7, 3), 0.5), ((4, 9), 0.3),
                                                 ((5, 5), 1.0)])
def test_supermask_keeps_the_top_share_of_each_layer(shape, density):
    scores = torch.randn(4, *shape, generator=gen())
    mask = frl.supermask(scores, density)
    n = shape[0] * shape[1]
    keep = n - int((1 - density) * n)
    for c in range(4):
        flat, m = scores[c].flatten(), mask[c].flatten().bool()
        assert int(m.sum()) == keep
        if keep < n:
            assert flat[m].min() > flat[~m].max()


def test_supermask_with_tied_scores_still_keeps_exactly_its_share():
    scores = torch.zeros(2, 3, 4)
    scores[1, 0, 0] = 1.0
    mask = frl.supermask(scores, 0.5)
    assert mask.sum(dim=(1, 2)).tolist() == [6.0, 6.0]
    assert mask[1, 0, 0] == 1


def test_straight_through_gradient_is_the_masked_weight_gradient_times_the_weight():
    sizes = [5, 6, 3]
    g = gen()
    weights = [w.double() for w in frl.signed_constant(sizes, g)]
    scores = [s.double().requires_grad_() for s in frl.init_scores(sizes, g)]
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    loss = torch.nn.functional.cross_entropy(frl.forward(weights, scores, x, 0.5), y)
    grads = torch.autograd.grad(loss, scores)

    # Reference: the effective weights W * mask as leaves of the dense network.
    effective = [(w * frl.supermask(s, 0.5)).requires_grad_() for w, s in zip(weights, scores,
                                                                               strict=True)]
    ref = torch.autograd.grad(
        torch.nn.functional.cross_entropy(frl.dense_forward(effective, x), y), effective)
    for got, g_eff, w in zip(grads, ref, weights, strict=True):
        assert torch.allclose(got, g_eff * w, atol=1e-14, rtol=0)
    # Dropped edges get a gradient too: that is how they can come back.
    assert bool((grads[0] != 0).any() and ((grads[0] != 0) & (frl.supermask(scores[0], .5) == 0))
                .any())


def test_one_vectorized_full_batch_step_equals_each_client_alone():
    sizes = [4, 6, 3]
    g = gen()
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    parts = [np.arange(0, 7), np.arange(7, 19), np.arange(19, 30)]
    clients = Clients.from_partition(X, y, parts, dtype=torch.float64)
    weights = [w.double() for w in frl.signed_constant(sizes, g)]
    scores = [s.double() for s in frl.init_scores(sizes, g)]
    lr = 0.3
    trained, count = frl.train_scores(weights, scores, clients, [2, 0], steps=1, lr=lr,
                                      batch_size=100, density=0.5, generator=gen(1), momentum=0.0,
                                      weight_decay=0.0)
    assert count == 11 + 7
    for row, c in enumerate([2, 0]):
        leaves = [s.clone().requires_grad_() for s in scores]
        Xc, yc = clients.data(c)
        loss = torch.nn.functional.cross_entropy(frl.forward(weights, leaves, Xc, 0.5), yc)
        for s, grad, out in zip(scores, torch.autograd.grad(loss, leaves), trained, strict=True):
            assert torch.allclose(out[row], s - lr * grad, atol=1e-13, rtol=0)


# Attacks on rankings


def test_rank_reversal_reverses_the_attackers_aggregate():
    reference = torch.tensor([[3, 0, 2, 1], [0, 3, 1, 2], [2, 3, 0, 1]])
    assert frl.rank_reversal(reference).tolist() == [1, 2, 0, 3]


def test_boundary_flip_moves_the_cut_where_a_reversal_cannot():
    n, density = 8, 0.5
    benign = torch.arange(n).expand(3, n)  # three voters agree: edges 4..7 are kept
    assert frl.boundary_flip(benign[:1], density).tolist() == [4, 5, 6, 7, 0, 1, 2, 3]

    def kept(votes):
        return set(frl.vote(votes)[0][n // 2:].tolist())

    reversal = frl.rank_reversal(benign).expand(2, n)
    flip = frl.boundary_flip(benign, density).expand(2, n)
    assert kept(benign) == {4, 5, 6, 7}
    # Reversal: sums 3q + 2(7 - q) keep the order; the flip's rotation swaps the edges by the cut.
    assert kept(torch.cat([benign, reversal])) == {4, 5, 6, 7}
    assert kept(torch.cat([benign, flip])) == {2, 3, 6, 7}


def test_kept_share_counts_agreed_edges_that_survive():
    benign = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [1, 0, 2, 3]])
    assert frl.kept_share(benign, torch.tensor([0, 1, 2, 3]), 0.5) == 1.0
    assert frl.kept_share(benign, torch.tensor([0, 3, 1, 2]), 0.5) == 0.5


def test_agr_tailored_update_on_a_hand_case():
    benign = torch.tensor([[0.0, 1.0], [1.0, 3.0], [2.0, 5.0]])
    mean, std = benign.mean(0), benign.std(0)
    crafted = fx.agr_tailored(benign, 2, lambda d: d.mean(0))
    lam = float((mean - crafted)[0] / std[0])
    assert torch.allclose(crafted, mean - lam * std)
    # Against the mean the damage only grows with lambda: the search runs to its cap near 2 * 5.
    assert 9.9 < lam < 10.0
    # Against the median of 5 rows, 2 copies can only pull it to the nearest benign value.
    median = fx.agr_tailored(benign, 2, lambda d: d.median(0).values)
    assert torch.all(median <= benign.min(0).values)


# Communication


def test_communication_bits_formula():
    assert frl.ranking_bits(12) == 12 * 4
    assert frl.ranking_bits(1024) == 1024 * 10
    assert frl.ranking_bits(1) == 1
    bits = frl.communication_bits([4, 3, 2])  # layers of 12 and 6 edges
    assert bits == {"n_edges": 18, "frl_upload": 12 * 4 + 6 * 3, "frl_download": 66,
                    "fedavg_upload": 32 * 18, "fedavg_download": 32 * 18}
    big = frl.communication_bits([196, 64, 64, 10])
    assert big["frl_upload"] == 12544 * 14 + 4096 * 12 + 640 * 10


# Participation and the server loops


def test_sample_rounds_keeps_malicious_clients_below_half():
    part = frl.sample_rounds(20, 6, 200, 8, seed=0)
    assert part.shape == (200, 20) and (part.sum(1) == 6).all()
    assert (part[:, :8].sum(1) <= 2).all()
    assert part[:, :8].any()
    assert np.array_equal(part, frl.sample_rounds(20, 6, 200, 8, seed=0))


def small_problem(seed=0):
    g = gen(seed)
    X = torch.randn(120, 6, generator=g)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    parts = partition.dirichlet(y.numpy(), 8, 1.0, seed=seed, min_size=3)
    return Clients.from_partition(X[:96], y[:96], [p[p < 96] for p in parts]), X[96:], y[96:]


def test_run_frl_is_reproducible_and_keeps_the_initial_scores():
    clients, Xte, yte = small_problem()
    sizes = [6, 16, 3]
    part = frl.sample_rounds(8, 4, 5, 2, seed=0)
    kwargs = dict(participation=part, eval_data=(Xte, yte), malicious=[0, 1], local_steps=2,
                  lr=0.5, batch_size=8, seed=3)
    a = frl.run_frl(sizes, clients, attack="boundary", **kwargs)
    b = frl.run_frl(sizes, clients, attack="boundary", **kwargs)
    assert a.acc == b.acc and len(a.acc) == 5
    g = gen(3)
    frl.signed_constant(sizes, g)
    for final, initial in zip(a.scores, frl.init_scores(sizes, g), strict=True):
        assert torch.equal(final.flatten().sort().values, initial.flatten().sort().values)
    assert a.upload_bits == frl.communication_bits(sizes)["frl_upload"]
    clean = frl.run_frl(sizes, clients, attack="none", **kwargs)
    assert clean.n_malicious == [0] * 5 and sum(a.n_malicious) == int(part[:, :2].sum())


def test_run_baseline_attacks_only_malicious_rows():
    clients, Xte, yte = small_problem()
    part = frl.sample_rounds(8, 4, 3, 2, seed=0)
    kwargs = dict(participation=part, eval_data=(Xte, yte), local_steps=2, lr=0.1, batch_size=8,
                  seed=0)
    clean = fx.run_baseline("trmean", [6, 8, 3], clients, **kwargs)
    honest = fx.run_baseline("fedavg", [6, 8, 3], clients, malicious=[0, 1], attack="none",
                              **kwargs)
    assert clean.test_acc == honest.test_acc  # no malicious client: trims nothing
    hit = fx.run_baseline("fedavg", [6, 8, 3], clients, malicious=[0, 1], attack="tailored",
                           **kwargs)
    assert hit.test_acc[0] == clean.test_acc[0] and hit.test_acc != clean.test_acc


def test_final_accuracy_averages_the_tail():
    assert fx.final_accuracy([0.1, 0.5, 0.7], 2) == pytest.approx(0.6)


# Bad input


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="exactly once"):
        frl.vote(torch.tensor([[0, 1, 2], [0, 0, 2]]))
    with pytest.raises(ValueError, match="ids in"):
        frl.vote(torch.tensor([[0, 1, 3]]))
    with pytest.raises(ValueError, match="integers"):
        frl.vote(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="voters, edges"):
        frl.vote(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="density"):
        frl.supermask(torch.randn(3, 3), 0.0)
    with pytest.raises(ValueError, match="density"):
        frl.supermask(torch.randn(3, 3), 1.5)
    with pytest.raises(ValueError, match="layer widths"):
        frl.signed_constant([4, 0, 2], gen())
    with pytest.raises(ValueError, match="input and an output"):
        frl.layer_shapes([4])
    weights = frl.signed_constant([4, 3], gen())
    with pytest.raises(ValueError, match="expects 4 input features"):
        frl.forward(weights, frl.init_scores([4, 3], gen()), torch.randn(2, 5), 0.5)
    with pytest.raises(ValueError, match="do not end with"):
        frl.forward(weights, [torch.randn(4, 3)], torch.randn(2, 4), 0.5)
    with pytest.raises(ValueError, match="initial scores"):
        frl.reset_scores(torch.arange(4), torch.zeros(5), (2, 2))
    with pytest.raises(ValueError, match="one of"):
        frl.malicious_ranking("scale", torch.arange(4)[None], 0.5)
    with pytest.raises(ValueError, match="at least one edge"):
        frl.ranking_bits(0)
    with pytest.raises(ValueError, match="k >= 2"):
        fx.agr_tailored(torch.zeros(1, 3), 1, lambda d: d.mean(0))
    with pytest.raises(ValueError, match="NaN"):
        fx.agr_tailored(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 1, lambda d: d.mean(0))
    with pytest.raises(ValueError, match="below half"):
        frl.sample_rounds(10, 6, 3, 8, seed=0)
    with pytest.raises(ValueError, match="tail"):
        fx.final_accuracy([0.5], 2)


def test_bad_runs_are_named():
    clients, Xte, yte = small_problem()
    part = np.zeros((2, 8), dtype=bool)
    part[:, :2] = True
    kwargs = dict(eval_data=(Xte, yte), local_steps=1, lr=0.1, batch_size=8, seed=0)
    with pytest.raises(ValueError, match="only malicious"):
        frl.run_frl([6, 4, 3], clients, participation=part, malicious=[0, 1], attack="reversal",
                    **kwargs)
    with pytest.raises(ValueError, match="attack must be one of"):
        frl.run_frl([6, 4, 3], clients, participation=part, attack="scale", **kwargs)
    with pytest.raises(ValueError, match=r"\(rounds, 8 clients\)"):
        frl.run_frl([6, 4, 3], clients, participation=part[:, :5], **kwargs)
    with pytest.raises(ValueError, match="takes 5 features"):
        frl.run_frl([5, 4, 3], clients, participation=part, **kwargs)
    with pytest.raises(ValueError, match="baseline must be one of"):
        fx.baseline_rule("krum")


def test_make_problem_splits_every_row_once_and_marks_the_lowest_ids_malicious():
    g = np.random.default_rng(0)
    X = g.integers(0, 256, (300, 16)).astype(np.uint8)
    y = np.repeat(np.arange(3), 100)
    p = fx.make_problem(X, y, n_clients=6, alpha=1.0, per_round=4, rounds=5, mal_frac=0.2,
                         seed=0, device="cpu", pool=2, test_size=0.2, val_size=0.1)
    assert p.n_features == 4 and p.n_classes == 3
    assert int(p.clients.sizes.sum()) + len(p.y_val) + len(p.y_test) == 300
    assert len(p.y_test) == 60 and len(p.y_val) == 30
    assert p.malicious.tolist() == [0] and p.participation.shape == (5, 6)
    assert float(p.X_test.max()) <= 1.0
    row = fx.run_method(p, "median", "tailored", hidden=[5], lr=0.1, local_steps=1,
                         batch_size=4, density=0.5, momentum=0.9, weight_decay=0.0, tail=2)
    assert len(row["acc_curve"]) == 5 and row["upload_bits"] == 32 * (4 * 5 + 5 * 3)
    with pytest.raises(ValueError, match="mal_frac"):
        fx.make_problem(X, y, n_clients=6, alpha=1.0, per_round=4, rounds=5, mal_frac=0.5,
                         seed=0, device="cpu")
    with pytest.raises(ValueError, match="square images"):
        fx.make_problem(X[:, :15], y, n_clients=6, alpha=1.0, per_round=4, rounds=5,
                         mal_frac=0.0, seed=0, device="cpu", pool=2)
    with pytest.raises(ValueError, match="method must be one of"):
        fx.run_method(p, "krum", "none", hidden=[5], lr=0.1, local_steps=1, batch_size=4,
                       density=0.5, momentum=0.9, weight_decay=0.0, tail=2)
