"""FedAU's online weight estimate, its aggregation rule and the baselines, on hand-made inputs."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from repsuite.federated import fedau as F
from repsuite.federated import fedau_experiment as FE
from repsuite.federated import fedau_runs as FR
from repsuite.federated.clients import Clients, flatten, flatten_stack, params_of

# -------------------------------------------------------------------------------------------------
# The online weight estimate


def test_weights_of_a_hand_made_sequence_without_cutoff():
    # Pattern 0,0,1,0,1,1: recorded intervals 3, 2, 1. The weight of a round uses the intervals
    # recorded before it, and 1 before the first one.
    q = np.array([[0], [0], [1], [0], [1], [1]])
    assert F.online_weights(q)[:, 0].tolist() == [1, 1, 1, 3, 3, 2.5]
    est = F.OnlineWeights(1)
    for row in q:
        est.update(row)
    assert est.weights().tolist() == [2.0]


def test_weights_of_a_hand_made_sequence_with_cutoff_two():
    # With K = 2 the two silent rounds are recorded as one interval of 2 at round 1; then the
    # intervals 1, 2, 1 follow: weights 1, 1, 2, (2+1)/2, 1.5, (2+1+2)/3, final (2+1+2+1)/4.
    q = np.array([[0], [0], [1], [0], [1], [1]])
    assert F.online_weights(q, K=2)[:, 0] == pytest.approx([1, 1, 2, 1.5, 1.5, 5 / 3])
    est = F.OnlineWeights(1, K=2)
    for row in q:
        est.update(row)
    assert est.weights()[0] == pytest.approx(1.5)


def test_long_silence_is_cut_into_several_intervals_of_length_K():
    # 7 silent rounds then a participation, K = 3: intervals 3, 3, then 2 at the participation.
    q = np.array([[0]] * 7 + [[1]])
    est = F.OnlineWeights(1, K=3)
    for row in q:
        est.update(row)
    assert est.S.tolist() == [3]
    assert est.weights()[0] == pytest.approx(8 / 3)


def _reference_weights(q: np.ndarray, K: float) -> np.ndarray:
    """A plain per-client loop with a list of intervals, written independently of the module."""
    T, N = q.shape
    out = np.ones((T, N))
    for n in range(N):
        intervals, silent = [], 0
        for t in range(T):
            out[t, n] = np.mean(intervals) if intervals else 1.0
            if q[t, n]:
                intervals.append(silent + 1)
                silent = 0
            else:
                silent += 1
                if silent >= K:
                    intervals.append(silent)
                    silent = 0
    return out


@pytest.mark.parametrize("K", [None, 1, 2, 5, 17])
def test_vectorised_estimate_matches_a_per_client_loop(K):
    rng = np.random.default_rng(3)
    q = rng.random((300, 12)) < rng.uniform(0.02, 0.9, 12)
    ref = _reference_weights(q, np.inf if K is None else K)
    np.testing.assert_allclose(F.online_weights(q, K), ref, rtol=0, atol=1e-12)


def test_cutoff_one_gives_weight_one_always():
    q = np.random.default_rng(0).random((50, 6)) < 0.3
    assert np.all(F.online_weights(q, K=1) == 1.0)


def test_a_client_that_never_participates_keeps_a_finite_weight():
    q = np.zeros((40, 2), dtype=bool)
    q[3::4, 1] = True
    w = F.online_weights(q)
    assert np.all(w[:, 0] == 1.0)  # nothing recorded: the initial weight
    assert w[-1, 1] == pytest.approx(4.0)
    # With a cutoff, its silence is recorded in intervals of K.
    assert F.online_weights(q, K=5)[-1, 0] == pytest.approx(5.0)


@pytest.mark.parametrize("K", [None, 10])
def test_estimate_converges_to_its_bernoulli_limit(K):
    p = np.array([0.03, 0.1, 0.3, 0.8])
    q = np.random.default_rng(1).random((30_000, p.size)) < p
    np.testing.assert_allclose(F.online_weights(q, K)[-1], F.expected_weight(p, K), rtol=0.06)


def test_expected_weight_formula():
    assert F.expected_weight([0.5], None)[0] == pytest.approx(2.0)
    # E[min(G, 2)] for G ~ Geometric(1/2) = 1 * 1/2 + 2 * 1/2.
    assert F.expected_weight([0.5], 2)[0] == pytest.approx(1.5)
    assert np.all(F.expected_weight([0.02, 0.2], 50) < 1 / np.array([0.02, 0.2]))


def test_markov_and_cyclic_participation_keep_the_rates_and_the_estimate_unbiased():
    p = np.array([0.05, 0.2, 0.5])
    for q in (F.markov(p, 20_000, seed=0), F.cyclic_rates(p, 20_000, seed=0, cycle=100)):
        np.testing.assert_allclose(q.mean(0), p, rtol=0.1)
        est = F.OnlineWeights(p.size)
        for row in q:
            est.update(row)
        np.testing.assert_allclose(est.weights(), 1 / p, rtol=0.1)


@pytest.mark.parametrize("bad, match", [
    (np.array([0, 1, 1]), "rounds, clients"),
    (np.array([[0, 2]]), "only 0 and 1"),
    (np.array([[0.0, np.nan]]), "NaN"),
    (np.array([["a", "b"]]), "0/1 or booleans"),
    (np.zeros((0, 3)), "at least one round"),
])
def test_bad_participation_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        F.online_weights(bad)


@pytest.mark.parametrize("K", [0, -3, 2.5, True, "50"])
def test_bad_cutoff_is_refused(K):
    with pytest.raises(ValueError, match="cutoff K"):
        F.OnlineWeights(3, K)


def test_update_with_the_wrong_number_of_clients_is_refused():
    with pytest.raises(ValueError, match="one entry per client"):
        F.OnlineWeights(3).update([True, False])
    with pytest.raises(ValueError, match="n_clients"):
        F.OnlineWeights(0)


# -------------------------------------------------------------------------------------------------
# Aggregation rules


def _deltas():
    return torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]], dtype=torch.float64)


def test_fedau_divides_by_all_clients_and_uses_the_previous_weights():
    rule = F.FedAU(4)
    # Round 0: no interval yet, every weight is 1.
    q0 = [True, False, True, True]
    assert torch.allclose(rule(_deltas(), q0), _deltas().sum(0) / 4)
    # Round 1: clients 0, 2, 3 recorded an interval of 1; client 1 has none (weight 1).
    q1 = [False, True, True, False]
    d = _deltas()[:2]
    assert torch.allclose(rule(d, q1), d.sum(0) / 4)
    # Round 2: client 0 was silent once since its interval (not recorded yet): weight 1; client 1
    # recorded 2; client 2 recorded 1 and 1.
    q2 = [True, True, True, False]
    w = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    assert torch.allclose(rule(_deltas(), q2), (w @ _deltas()) / 4)


def test_known_probability_weights_and_unbiasedness():
    rates = np.array([0.2, 0.5, 0.9])
    rule = F.KnownProb(rates)
    got = rule(_deltas(), [True, True, True])
    assert torch.allclose(got, (torch.tensor(1 / rates) @ _deltas()) / 3)

    # The expected update over all 2^3 participation patterns is the full-participation average.
    expected = torch.zeros(2, dtype=torch.float64)
    for pattern in range(8):
        q = np.array([(pattern >> n) & 1 for n in range(3)], dtype=bool)
        prob = np.prod(np.where(q, rates, 1 - rates))
        expected += prob * rule(_deltas()[q], q)
    assert torch.allclose(expected, _deltas().mean(0), rtol=0, atol=1e-12)


def test_simple_averages():
    q = [True, False, True, True]
    assert torch.allclose(F.AverageParticipating(4)(_deltas(), q), _deltas().mean(0))
    assert torch.allclose(F.AverageAll(4)(_deltas(), q), _deltas().sum(0) / 4)


def test_fedau_equals_average_all_when_everyone_always_participates():
    fedau, avg_all = F.FedAU(3), F.AverageAll(3)
    for _ in range(5):
        assert torch.equal(fedau(_deltas(), [True] * 3), avg_all(_deltas(), [True] * 3))


def test_mifa_averages_the_latest_update_of_every_client():
    rule = F.MIFA(3)
    assert torch.allclose(rule(_deltas()[:1], [True, False, False]), _deltas()[0] / 3)
    got = rule(_deltas()[1:], [False, True, True])
    assert torch.allclose(got, _deltas().mean(0))
    new = torch.tensor([[9.0, 9.0]], dtype=torch.float64)
    got = rule(new, [True, False, False])
    assert torch.allclose(got, (new[0] + _deltas()[1] + _deltas()[2]) / 3)
    assert rule.memory_scalars(1000) == 3000


def test_fedvarp_hand_case():
    rule = F.FedVARP(3)
    # Round 0: the table is zero, so the update is the participants' mean.
    assert torch.allclose(rule(_deltas()[:2], [True, True, False]), _deltas()[:2].mean(0))
    # Round 1: client 1 sends u; update = (u - y_1) + mean(y) with y = (d0, d1, 0).
    u = torch.tensor([[5.0, -1.0]], dtype=torch.float64)
    expected = (u[0] - _deltas()[1]) + (_deltas()[0] + _deltas()[1]) / 3
    assert torch.allclose(rule(u, [False, True, False]), expected)
    # A round without participants moves along the stored mean.
    stored = (_deltas()[0] + u[0]) / 3
    assert torch.allclose(rule(u[:0], [False, False, False]), stored)


@pytest.mark.parametrize("method", F.METHODS)
def test_a_round_without_participants_never_gives_nan(method):
    rule = F.make_rule(method, 3, rates=[0.5, 0.5, 0.5])
    out = rule(torch.zeros(0, 4), [False, False, False])
    assert out.shape == (4,)
    assert torch.isfinite(out).all()


def test_memory_of_fedau_does_not_grow_with_the_model():
    assert F.FedAU(250).memory_scalars(10) == F.FedAU(250).memory_scalars(10**7) == 750
    assert F.FedVARP(250).memory_scalars(10**6) == 251 * 10**6


def test_rules_refuse_bad_rounds():
    with pytest.raises(ValueError, match="deltas must be"):
        F.FedAU(3)(_deltas()[:2], [True, True, True])
    with pytest.raises(ValueError, match="NaN"):
        F.AverageAll(3)(torch.full((1, 2), float("nan")), [True, False, False])
    with pytest.raises(ValueError, match="one entry per client"):
        F.MIFA(3)(_deltas(), [True, True, True, False])
    with pytest.raises(ValueError, match="unknown aggregation method"):
        F.make_rule("fedprox", 3)
    with pytest.raises(ValueError, match="needs the true participation rates"):
        F.make_rule("known_prob", 3)


@pytest.mark.parametrize("rates, match", [
    ([0.5, 0.0, 0.2], "rate 0"),
    ([0.5, 1.2], r"\[0, 1\]"),
    ([0.5, np.nan], "NaN"),
    ([], "non-empty"),
])
def test_bad_rates_are_refused(rates, match):
    with pytest.raises(ValueError, match=match):
        F.KnownProb(rates)


# -------------------------------------------------------------------------------------------------
# The paper's participation setup


def test_label_correlated_rates():
    counts = np.array([[10, 0, 0], [0, 10, 0], [0, 0, 10], [5, 5, 0]])
    p = F.label_correlated_rates(counts, mean_rate=0.2, min_rate=0.05, alpha=0.1, seed=4)
    assert p.shape == (4,)
    assert np.all((p >= 0.05) & (p <= 1))
    # Client 3 holds half of classes 0 and 1: its rate is the mean of clients 0 and 1's, unless
    # the floor lifted one of them.
    raw = 3 * 0.2 * np.random.default_rng(4).dirichlet(0.1 * np.ones(3))
    assert p[3] == pytest.approx(max(0.05, (raw[0] + raw[1]) / 2))
    with pytest.raises(ValueError, match="hold no samples"):
        F.label_correlated_rates([[1, 2], [0, 0]])
    with pytest.raises(ValueError, match="mean_rate"):
        F.label_correlated_rates(counts, mean_rate=0.0)


# -------------------------------------------------------------------------------------------------
# The lockstep driver and the objective


def _toy_clients(n_clients=4, per_client=6, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_clients * per_client, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n_clients * per_client,), generator=g)
    parts = np.split(np.arange(n_clients * per_client), n_clients)
    return Clients.from_partition(X, y, parts, dtype=torch.float64)


def test_full_batch_single_step_is_gradient_descent_on_the_objective():
    clients = _toy_clients()
    torch.manual_seed(0)
    model = nn.Linear(3, 3).double()
    x0 = flatten(params_of(model))
    q = np.ones((3, 4), dtype=bool)
    runs = [FR.Run("all", F.AverageAll(4), q, 0, x0, global_lr=1.0)]
    out = FR.train_lockstep(model, clients, runs, rounds=3, local_steps=1, lr=0.3, batch_size=100,
                           seed=0, weight_decay=0.01, progress=False)

    x = x0.clone()
    for _ in range(3):
        x = x.detach().requires_grad_(True)
        Xr, yr, w = FR._pooled_rows(clients, 0, 4)
        W, b = x[:9].reshape(3, 3), x[9:]
        loss = (nn.functional.cross_entropy(Xr @ W.T + b, yr, reduction="none") * w).sum()
        loss = loss + 0.005 * (x ** 2).sum()
        (g,) = torch.autograd.grad(loss, x)
        x = x - 0.3 * g
    torch.testing.assert_close(out.final[0], x.detach(), rtol=0, atol=1e-12)


class _Exploding(F.Rule):
    """A rule whose update overflows, standing in for a run at too large a rate."""

    def aggregate(self, deltas, idx):
        return torch.full((deltas.shape[1],), float("inf"), dtype=deltas.dtype)


def test_lockstep_runs_are_independent_and_a_diverging_run_is_frozen():
    clients = _toy_clients()
    torch.manual_seed(1)
    model = nn.Linear(3, 3).double()
    x0 = flatten(params_of(model))
    q = np.random.default_rng(0).random((20, 4)) < 0.5
    runs = [FR.Run("fedau", F.FedAU(4), q, 0, x0), FR.Run("all", F.AverageAll(4), q, 0, x0),
            FR.Run("blows up", _Exploding(4), q, 0, x0)]
    out = FR.train_lockstep(model, clients, runs, rounds=20, local_steps=2, lr=0.1, batch_size=100,
                           seed=0, progress=False, snapshot_every=5)
    assert out.diverged.tolist() == [False, False, True]
    assert sorted(out.snapshots) == [0, 5, 10, 15, 20]

    # Full batch: a run alone gives the same numbers as inside the lockstep.
    alone = FR.train_lockstep(model, clients, [FR.Run("fedau", F.FedAU(4), q, 0, x0)], rounds=20,
                             local_steps=2, lr=0.1, batch_size=100, seed=5,
                             progress=False)
    torch.testing.assert_close(alone.final[0], out.final[0], rtol=0, atol=1e-12)


def test_uniform_objective_weights_clients_equally_and_the_optimum_is_stationary():
    # Two clients of different sizes: the objective is the mean of their mean losses.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(9, 2, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0, 1])
    clients = Clients.from_partition(X, y, [np.arange(2), np.arange(2, 9)], dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(2, 2).double()
    x = flatten(params_of(model))
    out = model(X)
    per = nn.functional.cross_entropy(out, y, reduction="none").detach()
    expected = (per[:2].mean() + per[2:].mean()) / 2
    got = FR.objective(model, x, clients, 0, 2)
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(float(expected), rel=1e-12)

    only_first = FR.objective(model, x, clients, 0, 2, client_weights=[3.0, 0.0])
    assert float(only_first[0]) == pytest.approx(float(per[:2].mean()), rel=1e-12)
    with pytest.raises(ValueError, match="client_weights"):
        FR.objective(model, x, clients, 0, 2, client_weights=[0.0, 0.0])

    x_star = FR.optimum(model, clients, 0, 2, weight_decay=0.1)
    f_star = FR.objective(model, x_star, clients, 0, 2, weight_decay=0.1)
    bumps = torch.randn(20, x_star.numel(), generator=g, dtype=torch.float64) * 1e-3
    f_near = FR.objective(model, x_star + bumps, clients, 0, 2, weight_decay=0.1)
    assert torch.all(f_near > f_star)
    with pytest.raises(ValueError, match="weight_decay > 0"):
        FR.optimum(model, clients, 0, 2, weight_decay=0.0)
    with pytest.raises(ValueError, match="do not exist"):
        FR.objective(model, x, clients, 1, 2)
    with pytest.raises(ValueError, match="NaN"):
        FR.objective(model, torch.full_like(x, float("nan")), clients, 0, 2)


def test_lockstep_refuses_bad_runs():
    clients = _toy_clients()
    model = nn.Linear(3, 3).double()
    x0 = flatten(params_of(model))
    q = np.ones((5, 4), dtype=bool)
    with pytest.raises(ValueError, match="covers 5 rounds"):
        FR.train_lockstep(model, clients, [FR.Run("r", F.FedAU(4), q, 0, x0)], rounds=6,
                         local_steps=1, lr=0.1, batch_size=4, seed=0, progress=False)
    with pytest.raises(ValueError, match="do not exist"):
        FR.train_lockstep(model, clients, [FR.Run("r", F.FedAU(4), q, 2, x0)], rounds=5,
                         local_steps=1, lr=0.1, batch_size=4, seed=0, progress=False)
    with pytest.raises(ValueError, match="participation has 4 clients"):
        FR.Run("r", F.FedAU(3), q, 0, x0)
    with pytest.raises(ValueError, match="global_lr"):
        FR.Run("r", F.FedAU(4), q, 0, x0, global_lr=0.0)


def test_closed_form_softmax_regression_steps_equal_the_core_local_sgd():
    from repsuite.federated.clients import local_sgd, unflatten

    g = torch.Generator().manual_seed(2)
    X = torch.randn(50, 2, 3, generator=g, dtype=torch.float64)  # features of any shape
    y = torch.randint(0, 4, (50,), generator=g)
    parts = [np.arange(0, 7), np.arange(7, 30), np.arange(30, 50)]
    clients = Clients.from_partition(X, y, parts, dtype=torch.float64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4)).double()
    idx = np.array([2, 0, 1, 0])  # a client may appear twice (two runs)
    starts = torch.randn(4, 28, generator=g, dtype=torch.float64)
    like = {"1.weight": torch.zeros(4, 6), "1.bias": torch.zeros(4)}
    core, n_core = local_sgd(model, unflatten(starts, like), clients, idx, steps=7, lr=0.3,
                             batch_size=5, generator=torch.Generator().manual_seed(9),
                             weight_decay=0.01)
    fast, n_fast = FR.softmax_regression_sgd(starts, clients, idx, n_classes=4, steps=7, lr=0.3,
                                            batch_size=5,
                                            generator=torch.Generator().manual_seed(9),
                                            weight_decay=0.01)
    assert n_fast == n_core
    torch.testing.assert_close(fast, flatten_stack(core), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="starts must be"):
        FR.softmax_regression_sgd(starts[:, :-1], clients, idx, n_classes=4, steps=1, lr=0.1,
                                 batch_size=5, generator=torch.Generator())


@pytest.mark.parametrize("fast_linear", [True, False])
def test_a_single_lockstep_run_reproduces_the_core_server_loop(fast_linear):
    from repsuite.federated import server
    from repsuite.federated.clients import unflatten

    clients = _toy_clients(n_clients=5, per_client=9)
    torch.manual_seed(3)
    model = nn.Linear(3, 3).double()
    x0 = flatten(params_of(model))
    rates = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    q = np.random.default_rng(1).random((15, 5)) < rates
    q[[4, 9, 10]] = False
    assert not q.any(1).all()  # some rounds have no participant: FedAU must still count them
    # The fast path draws from the run's own stream (batch_seed), the core path from `seed`.
    run = FR.Run("fedau", F.FedAU(5, K=3), q, 0, x0, batch_seed=11 if fast_linear else None)
    out = FR.train_lockstep(model, clients, [run], rounds=15, local_steps=3, lr=0.2, batch_size=4,
                           seed=99 if fast_linear else 11, weight_decay=0.01,
                           fast_linear=fast_linear, progress=False)
    history = server.run(model, clients, rounds=15, participation=q, local_steps=3, lr=0.2,
                         batch_size=4, seed=11, weight_decay=0.01,
                         aggregate=FR.as_server_aggregate(F.FedAU(5, K=3)))
    expected = flatten(history.params)
    torch.testing.assert_close(out.final[0], expected, rtol=0, atol=1e-12)
    assert unflatten(expected, params_of(model)).keys() == params_of(model).keys()


def test_run_sampler_draws_like_the_core_sampler_and_keeps_runs_independent():
    from repsuite.federated.clients import BatchSampler

    sizes = torch.tensor([3, 40, 16, 7, 25, 1])

    def draws(sampler, steps=12):
        return [sampler.draw(t) for t in range(steps)]

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    # One run: exactly the core sampler's draws.
    alone = draws(BatchSampler(sizes[:3], 5, gen(1)))
    mine = draws(FR.RunBatchSampler(sizes[:3], 5, [gen(1)], [3]))
    for (r1, v1), (r2, v2) in zip(alone, mine, strict=True):
        assert torch.equal(v1, v2)
        assert torch.equal(r1[v1], r2[v2])

    # Three runs: the second run's batches are those it would draw alone.
    together = draws(FR.RunBatchSampler(sizes, 5, [gen(1), gen(2), gen(3)], [3, 2, 1]))
    second = draws(BatchSampler(sizes[3:5], 5, gen(2)))
    for (r1, v1), (r2, v2) in zip(second, together, strict=True):
        assert torch.equal(v1, v2[3:5, :v1.shape[1]])
        assert torch.equal(r1[v1], r2[3:5][v2[3:5]])
    with pytest.raises(ValueError, match="one generator a run"):
        FR.RunBatchSampler(sizes, 5, [gen(1)], [3, 3])


# -------------------------------------------------------------------------------------------------
# Experiment helpers


def test_long_run_rates_and_patterns():
    p = np.array([0.02, 0.023, 0.5])
    np.testing.assert_allclose(FE.long_run_rates("bernoulli", p), p)
    # Cyclic participation keeps whole active rounds: round(100 p) of 100.
    np.testing.assert_allclose(FE.long_run_rates("cyclic", p, cycle=100), [0.02, 0.02, 0.5])
    for kind in FE.PATTERNS:
        q = FE.participation_pattern(kind, p, 50, seed=0)
        assert q.shape == (50, 3) and q.dtype == bool
    with pytest.raises(ValueError, match="unknown participation pattern"):
        FE.participation_pattern("poisson", p, 50, seed=0)
    with pytest.raises(ValueError, match="cycle"):
        F.cyclic_rates(p, 50, seed=0, cycle=1)


def test_weight_errors_on_a_regular_pattern():
    # Client 0 takes part every 4th round, client 1 every round: weights 4 and 1 exactly.
    q = np.zeros((400, 2), dtype=bool)
    q[3::4, 0] = True
    q[:, 1] = True
    e = FE.weight_errors(q, [0.25, 1.0], rare_fraction=0.5)
    assert e["rare"].tolist() == [0]
    assert e["bias"] == pytest.approx(0.0)
    assert e["omega"].tolist() == [4.0, 1.0]
    # A cutoff of 2 records each silence of 3 as 2 + 1: mean interval 2, bias -1/2.
    assert FE.weight_errors(q, [0.25, 1.0], K=2, rare_fraction=0.5)["bias"] == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="rare_fraction"):
        FE.weight_errors(q, [0.25, 1.0], rare_fraction=0.0)
    with pytest.raises(ValueError, match="2 participation rates given for 3 clients"):
        FE.weight_errors(np.ones((5, 3), dtype=bool), [0.5, 0.5])


def test_as_server_aggregate_refuses_a_mismatched_server():
    agg = FR.as_server_aggregate(F.FedAU(3))
    with pytest.raises(ValueError, match="the server has 4 clients"):
        agg(_deltas()[:1], None, 0, {"n_clients": 4, "participants": [0]})


def test_best_global_rates_and_per_seed():
    import pandas as pd

    table = pd.DataFrame({
        "method": ["a", "a", "a", "b", "b"], "global_lr": [1.0, 2.0, 4.0, 1.0, 2.0],
        "objective": [0.5, 0.3, np.nan, 0.2, 0.1], "diverged": [False, False, True, False, True],
        "seed": [0, 0, 0, 0, 0]})
    assert FE.best_global_rates(table) == {"a": 2.0, "b": 1.0}
    with pytest.raises(ValueError, match=r"every global rate diverged for \['c'\]"):
        FE.best_global_rates(pd.concat([table, pd.DataFrame(
            {"method": ["c"], "global_lr": [1.0], "objective": [np.nan], "diverged": [True],
             "seed": [0]})]))
    with pytest.raises(ValueError, match="b diverged on seeds"):
        FE.per_seed(table[table.global_lr == 2.0], "b", "objective")
    with pytest.raises(ValueError, match="no runs of 'z'"):
        FE.per_seed(table, "z", "objective")


def test_downsample_and_build_federations():
    X = np.arange(2 * 16, dtype=float).reshape(2, 16)
    pooled = FE.downsample(X, 4, 2)
    assert pooled[0].tolist() == [2.5, 4.5, 10.5, 12.5]
    with pytest.raises(ValueError, match="pool must divide"):
        FE.downsample(X, 4, 3)

    rng = np.random.default_rng(0)
    Xd, yd = rng.random((300, 4)), np.repeat(np.arange(3), 100)
    clients, feds = FE.build_federations(
        Xd, yd, [0, 1], n_clients=5, data_alpha=0.5, participation_alpha=0.5, mean_rate=0.2,
        min_rate=0.05, test_size=0.2, scale=1.0, n_rare_classes=1, device="cpu")
    assert clients.n_clients == 10 and int(clients.sizes.sum()) == 2 * 240
    assert [f.offset for f in feds] == [0, 5]
    for f in feds:
        assert f.label_counts.sum() == 240 and len(f.y_test) == 60
        assert np.all(f.rates >= 0.05) and f.rare_classes.shape == (1,)
    with pytest.raises(ValueError, match="n_rare_classes"):
        FE.build_federations(Xd, yd, [0], n_clients=5, data_alpha=0.5, participation_alpha=0.5,
                            mean_rate=0.2, min_rate=0.05, test_size=0.2, scale=1.0,
                            n_rare_classes=3, device="cpu")


def test_a_stage_trains_evaluates_and_labels_every_run():
    rng = np.random.default_rng(1)
    Xd, yd = rng.random((200, 4)), np.repeat(np.arange(2), 100)
    clients, feds = FE.build_federations(
        Xd, yd, [0, 1], n_clients=4, data_alpha=1.0, participation_alpha=1.0, mean_rate=0.3,
        min_rate=0.1, test_size=0.25, scale=1.0, n_rare_classes=1, device="cpu")
    part = {("bernoulli", f.seed): FE.participation_pattern("bernoulli", f.rates, 12, f.seed)
            for f in feds}
    starts = {("linear", f.seed): torch.zeros(10) for f in feds}
    configs = {"bernoulli": [("fedau", 1.0), ("fedau_K", 1.0), ("mifa", 2.0)]}
    stage = FE.run_stage("linear", feds, clients, patterns=["bernoulli"], configs=configs,
                        participation=part, starts=starts, K=3, n_features=4, n_classes=2,
                        hidden=8, rounds=12, local_steps=2, lr=0.1, batch_size=4, seed=0,
                        weight_decay=0.01, eval_every=4, late_from=8, progress=False)
    t = stage.table
    assert len(t) == 6 and set(t.method) == {"fedau", "fedau_K", "mifa"}
    assert t.objective.notna().all() and not t.diverged.any()
    assert sorted(stage.curves["round"].unique()) == [0, 4, 8, 12]
    # From the zero model every client's loss, hence the objective, is log 2.
    start = stage.curves[stage.curves["round"] == 0].objective
    np.testing.assert_allclose(start, np.log(2), rtol=1e-6)
    # The K of fedau_K reached its rule; plain fedau has no cutoff.
    cutoffs = {r.meta["method"]: r.rule.estimator.K for r in stage.runs if "fedau" in r.name}
    assert cutoffs == {"fedau": math.inf, "fedau_K": 3.0}


def test_label_skew_partition_covers_every_sample_once_with_similar_sizes():
    y = np.repeat(np.arange(10), 200)
    parts = FE.label_skew_partition(y, 40, 0.1, seed=0)
    allidx = np.concatenate(parts)
    assert np.array_equal(np.sort(allidx), np.arange(len(y)))
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 1 and sizes.max() < 4 * len(y) / 40
    # Strong label skew: most clients hold one class for at least half of their data.
    top = [np.bincount(y[p], minlength=10).max() / len(p) for p in parts]
    assert np.median(top) > 0.5
    with pytest.raises(ValueError, match="n_clients"):
        FE.label_skew_partition(y, 0, 0.1, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        FE.label_skew_partition(y, 4, 0.0, seed=0)
    with pytest.raises(ValueError, match="left a client with"):
        FE.label_skew_partition(np.array([0, 1, 0]), 3, 0.1, seed=0, min_size=2)
