"""The federated simulator core: partitions, participation, vectorized local SGD, server loop,
aggregation rules and attacks, against hand-computed values, a per-client loop, centralized
gradient descent and (where it imports) the byzfl library."""

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from repsuite.federated import (
    BatchSampler,
    Clients,
    aggregators,
    attacks,
    bench_round,
    client_deltas,
    evaluate,
    flatten,
    flatten_stack,
    gradients,
    local_sgd,
    local_sgd_loop,
    params_of,
    participation,
    partition,
    run,
    unflatten,
)

# -- helpers ---------------------------------------------------------------------------------------


def labels(n=120, classes=4, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def toy_clients(sizes=(7, 12, 3, 9), d=5, classes=3, dtype=torch.float64, seed=0):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    X = rng.normal(size=(n, d))
    y = rng.integers(0, classes, n)
    parts = np.split(rng.permutation(n), np.cumsum(sizes)[:-1])
    return Clients.from_partition(X, y, parts, "cpu", dtype=dtype), X, y, parts


def mlp(d=5, classes=3, hidden=6, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(dtype)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def covers_once(parts, n):
    merged = np.concatenate(parts)
    return len(merged) == n and np.array_equal(np.sort(merged), np.arange(n))


# -- partitions ------------------------------------------------------------------------------------


def test_partitions_cover_every_sample_once_and_repeat_with_the_seed():
    y = labels()
    for split in (partition.iid(y, 7, seed=1), partition.dirichlet(y, 7, 0.3, seed=1),
                  partition.pathological(y, 7, 2, seed=1)):
        assert len(split) == 7 and covers_once(split, len(y))
    a, b = partition.dirichlet(y, 7, 0.3, seed=4), partition.dirichlet(y, 7, 0.3, seed=4)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    sizes = [len(p) for p in partition.iid(y, 7, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_pathological_gives_each_client_its_number_of_classes():
    y = np.repeat(np.arange(10), 30)
    parts = partition.pathological(y, 20, 2, seed=3)
    assert all(len(np.unique(y[p])) == 2 for p in parts)
    assert covers_once(parts, len(y))


def test_dirichlet_small_alpha_skews_labels_and_respects_min_size():
    y = np.repeat(np.arange(10), 50)
    parts = partition.dirichlet(y, 10, 0.05, seed=0, min_size=5)
    assert min(len(p) for p in parts) >= 5

    def dominant_share(split):
        return np.median([np.bincount(y[p], minlength=10).max() / len(p) for p in split])

    # Small alpha: most clients dominated by one class; large alpha: close to the iid 10%.
    assert dominant_share(parts) > 0.5
    assert dominant_share(partition.dirichlet(y, 10, 100.0, seed=0)) < 0.2


def test_partition_errors_name_the_problem():
    y = labels(20)
    with pytest.raises(ValueError, match="n_clients must be an int >= 1"):
        partition.iid(y, 0, seed=0)
    with pytest.raises(ValueError, match="30 clients cannot each get a sample"):
        partition.iid(y, 30, seed=0)
    with pytest.raises(ValueError, match="alpha must be a positive"):
        partition.dirichlet(y, 3, 0.0, seed=0)
    with pytest.raises(ValueError, match="need 60 samples; there are 20"):
        partition.dirichlet(y, 3, 1.0, seed=0, min_size=20)
    with pytest.raises(ValueError, match="left a client with"):
        partition.dirichlet(np.repeat(np.arange(2), 10), 10, 0.01, seed=0, min_size=2,
                            max_tries=5)
    with pytest.raises(ValueError, match="cannot cover the 4 classes"):
        partition.pathological(y, 1, 2, seed=0)


# -- participation ---------------------------------------------------------------------------------


def test_bernoulli_and_markov_frequencies_match_the_rates():
    rates = np.array([0.05, 0.2, 0.5, 0.9])
    mask = participation.bernoulli(rates, 20_000, seed=0)
    assert mask.shape == (20_000, 4) and mask.dtype == bool
    np.testing.assert_allclose(mask.mean(0), rates, atol=0.02)
    chain = participation.markov(rates, 20_000, seed=0, max_on_prob=0.5)
    np.testing.assert_allclose(chain.mean(0), rates, atol=0.05)
    # The Markov schedule is burstier: consecutive rounds agree more often than independent ones.
    same = (chain[1:] == chain[:-1]).mean(0)
    independent = rates**2 + (1 - rates) ** 2
    assert (same[1:3] > independent[1:3] + 0.05).all()


def test_uniform_cyclic_and_rates():
    mask = participation.uniform(10, 3, 50, seed=2)
    assert mask.shape == (50, 10) and (mask.sum(1) == 3).all()
    assert mask.any(0).all()
    cyc = participation.cyclic(6, 3, 7)
    assert cyc[0].tolist() == [True, True, False, False, False, False]
    assert cyc[4].tolist() == [False, False, True, True, False, False]
    assert (cyc.sum(1) == 2).all()
    rates = participation.heterogeneous_rates(1000, 0.02, 0.3, seed=0)
    assert rates.min() >= 0.02 and rates.max() <= 0.3 and abs(rates.mean() - 0.16) < 0.01
    logr = participation.heterogeneous_rates(1000, 0.01, 1.0, seed=0, kind="loguniform")
    assert np.median(logr) < 0.15


def test_participation_errors():
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]; clients \[1\]"):
        participation.bernoulli([0.2, 1.5], 3, seed=0)
    with pytest.raises(ValueError, match="all participation rates are zero"):
        participation.bernoulli([0.0, 0.0], 3, seed=0)
    with pytest.raises(ValueError, match="per_round=5 distinct clients a round, but there are"):
        participation.uniform(4, 5, 3, seed=0)
    with pytest.raises(ValueError, match="all participation rates zero"):
        participation.heterogeneous_rates(5, 0.0, 0.0, seed=0)
    with pytest.raises(ValueError, match="kind must be"):
        participation.heterogeneous_rates(5, 0.1, 0.2, seed=0, kind="beta")
    with pytest.raises(ValueError, match="strictly inside"):
        participation.markov([0.5, 1.0], 10, seed=0)
    with pytest.raises(ValueError, match="n_groups=5 groups need at least as many clients"):
        participation.cyclic(4, 5, 10)


# -- clients and parameters ------------------------------------------------------------------------


def test_clients_are_padded_and_masked():
    clients, X, y, parts = toy_clients()
    assert clients.X.shape == (4, 12, 5) and clients.y.shape == (4, 12)
    assert clients.sizes.tolist() == [7, 12, 3, 9]
    assert clients.mask.sum(1).tolist() == [7, 12, 3, 9]
    Xc, yc = clients.data(2)
    np.testing.assert_array_equal(Xc.numpy(), X[parts[2]])
    np.testing.assert_array_equal(yc.numpy(), y[parts[2]])
    assert clients.X.dtype == torch.float64 and clients.y.dtype == torch.int64
    np.testing.assert_allclose(clients.weights().sum().item(), 1.0)


def test_clients_errors():
    X, y = np.zeros((5, 2)), np.zeros(5, dtype=int)
    with pytest.raises(ValueError, match=r"clients \[1\] have no data"):
        Clients.from_partition(X, y, [np.arange(5), np.array([], dtype=int)])
    with pytest.raises(ValueError, match="outside"):
        Clients.from_partition(X, y, [np.array([0, 9])])
    with pytest.raises(ValueError, match="X has 5 rows and y has 4"):
        Clients.from_partition(X, y[:4], [np.arange(4)])
    with pytest.raises(ValueError, match="NaN"):
        Clients.from_partition(np.full((5, 2), np.nan), y, [np.arange(5)])


def test_flatten_and_unflatten_round_trip():
    model = mlp()
    p = params_of(model)
    vec = flatten(p)
    assert vec.shape == (sum(t.numel() for t in p.values()),)
    back = unflatten(vec, p)
    assert all(torch.equal(back[k], p[k]) for k in p)
    stacked = {k: torch.stack([v, 2 * v]) for k, v in p.items()}
    rows = flatten_stack(stacked)
    assert torch.equal(rows[1], 2 * vec)
    assert all(torch.equal(unflatten(rows, p)[k], stacked[k]) for k in p)
    with pytest.raises(ValueError, match="does not hold the"):
        unflatten(vec[:-1], p)


# -- local SGD -------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size,momentum,weight_decay", [(4, 0.0, 0.0), (5, 0.9, 1e-2),
                                                              (100, 0.5, 0.0)])
def test_vectorized_local_sgd_equals_a_per_client_loop(batch_size, momentum, weight_decay):
    clients, *_ = toy_clients()
    model = mlp()
    start = params_of(model)
    idx = [3, 0, 2]
    kw = dict(steps=7, lr=lambda s: 0.3 / (1 + s), batch_size=batch_size, momentum=momentum,
              weight_decay=weight_decay)
    fast, n_fast = local_sgd(model, start, clients, idx, generator=gen(5), **kw)
    slow, n_slow = local_sgd_loop(model, start, clients, idx, generator=gen(5), **kw)
    assert n_fast == n_slow
    for k in start:
        torch.testing.assert_close(fast[k], slow[k], atol=1e-12, rtol=0)
    moved = flatten_stack(fast) - flatten(start)
    assert (moved.norm(dim=1) > 1e-3).all()


def test_sample_gradients_are_counted_per_epoch():
    clients, *_ = toy_clients()  # sizes 7, 12, 3, 9
    # batch 4, 5 steps: client of 7 samples takes 4,3,4,3,4; of 3 samples takes 3 each step.
    _, n = local_sgd(mlp(), params_of(mlp()), clients, [0, 2], steps=5, lr=0.1, batch_size=4,
                     generator=gen())
    assert n == (4 + 3 + 4 + 3 + 4) + 5 * 3


def test_each_epoch_visits_every_sample_once():
    sampler = BatchSampler(torch.tensor([7, 12, 3]), 4, gen(1))
    seen = [[] for _ in range(3)]
    for step in range(6):  # 2 epochs of client 0, 2 of client 1 (3 batches), 6 of client 2
        rows, valid = sampler.draw(step)
        for c in range(3):
            seen[c].append(rows[c][valid[c]].tolist())
    assert sorted(sum(seen[0][:2], [])) == list(range(7))
    assert sorted(sum(seen[1][:3], [])) == list(range(12))
    assert all(sorted(s) == [0, 1, 2] for s in seen[2])


def test_padding_rows_count_zero():
    clients, *_ = toy_clients()
    model, start = mlp(), params_of(mlp())
    a, _ = local_sgd(model, start, clients, [0, 1, 2], steps=3, lr=0.2, batch_size=100,
                     generator=gen())
    clients.X[~clients.mask] = 1e6
    b, _ = local_sgd(model, start, clients, [0, 1, 2], steps=3, lr=0.2, batch_size=100,
                     generator=gen())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stacked_starts_and_per_client_steps():
    clients, *_ = toy_clients()
    model = mlp()
    base = params_of(model)
    other = {k: v + 0.1 for k, v in base.items()}
    stacked = {k: torch.stack([base[k], other[k]]) for k in base}
    both, _ = local_sgd(model, stacked, clients, [1, 3], steps=2, lr=0.1, batch_size=100,
                        generator=gen())
    alone, _ = local_sgd(model, other, clients, [3], steps=2, lr=0.1, batch_size=100,
                         generator=gen())
    for k in base:
        torch.testing.assert_close(both[k][1], alone[k][0], atol=1e-12, rtol=0)
    three, _ = local_sgd(model, base, clients, [0, 1], steps=3, lr=0.1, batch_size=4,
                         generator=gen(2))
    one, _ = local_sgd(model, base, clients, [0, 1], steps=1, lr=0.1, batch_size=4,
                       generator=gen(2))
    mixed, n = local_sgd(model, base, clients, [0, 1], steps=[1, 3], lr=0.1, batch_size=4,
                         generator=gen(2))
    for k in base:
        torch.testing.assert_close(mixed[k][0], one[k][0], atol=1e-12, rtol=0)
        torch.testing.assert_close(mixed[k][1], three[k][1], atol=1e-12, rtol=0)
    assert n == 4 + 3 * 4


def test_grad_transform_sees_gradients_and_can_recompute_them():
    clients, *_ = toy_clients()
    model = mlp()
    start = params_of(model)
    seen = []

    def sarah(grads, state):
        # SARAH-style recursion: direction += g(current) - g(previous) on the same batch.
        memory = state["memory"]
        if state["step"] > 0:
            previous = state["grad_at"](memory["previous"])
            grads = {k: memory["direction"][k] + grads[k] - previous[k] for k in grads}
        memory["direction"], memory["previous"] = grads, state["params"]
        seen.append(state["step"])
        return grads

    _, n = local_sgd(model, start, clients, [0, 1], steps=3, lr=0.1, batch_size=100,
                     generator=gen(), grad_transform=sarah)
    assert seen == [0, 1, 2]
    assert n == (7 + 12) * 5  # 3 gradients at the iterate + 2 at the previous one
    # Full batch: the recursion telescopes to the plain gradient, so the path is plain GD.
    plain, _ = local_sgd(model, start, clients, [0, 1], steps=3, lr=0.1, batch_size=100,
                         generator=gen())
    ours, _ = local_sgd(model, start, clients, [0, 1], steps=3, lr=0.1, batch_size=100,
                        generator=gen(), grad_transform=sarah)
    for k in start:
        torch.testing.assert_close(ours[k], plain[k], atol=1e-12, rtol=0)


def test_local_sgd_errors():
    clients, *_ = toy_clients()
    model = mlp()
    start = params_of(model)
    with pytest.raises(ValueError, match="no clients selected"):
        local_sgd(model, start, clients, [], steps=1, lr=0.1, batch_size=4, generator=gen())
    with pytest.raises(ValueError, match=r"client indices must lie in \[0, 4\)"):
        local_sgd(model, start, clients, [4], steps=1, lr=0.1, batch_size=4, generator=gen())
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        local_sgd(model, start, clients, [0], steps=1, lr=0.1, batch_size=0, generator=gen())
    bad = dict(start)
    bad["0.weight"] = bad["0.weight"][:, :2]
    with pytest.raises(ValueError, match=r"params\['0.weight'\] has shape"):
        local_sgd(model, bad, clients, [0], steps=1, lr=0.1, batch_size=4, generator=gen())
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        local_sgd(model, start, clients, [0], steps=1, lr=0.1, batch_size=4, generator=0)


def test_gradients_match_autograd_per_client():
    clients, *_ = toy_clients()
    model = mlp()
    start = params_of(model)
    grads, n = gradients(model, start, clients, [2, 0])
    assert n == 3 + 7
    for j, c in enumerate([2, 0]):
        model.zero_grad()
        Xc, yc = clients.data(c)
        nn.functional.cross_entropy(model(Xc), yc).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][j], p.grad, atol=1e-12, rtol=0)
    mini, n = gradients(model, start, clients, [1], batch_size=5, generator=gen(3))
    assert n == 5
    rows, _ = BatchSampler(clients.sizes[[1]], 5, gen(3)).draw(0)
    model.zero_grad()
    Xc, yc = clients.data(1)
    nn.functional.cross_entropy(model(Xc[rows[0]]), yc[rows[0]]).backward()
    torch.testing.assert_close(mini["2.bias"][0], model[2].bias.grad, atol=1e-12, rtol=0)


def test_models_with_batchnorm_and_dropout():
    clients, *_ = toy_clients(sizes=(8, 8, 8))
    torch.manual_seed(0)
    tracked = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double()
    with pytest.raises(ValueError, match="BatchNorm layer '1' updates running statistics"):
        local_sgd(tracked, params_of(tracked), clients, [0], steps=1, lr=0.1, batch_size=4,
                  generator=gen())
    # Without running statistics each client normalises with its own batch; every batch is
    # full here (4 divides 8), so the vectorized run equals the loop.
    free = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, track_running_stats=False),
                         nn.Linear(6, 3)).double()
    kw = dict(steps=3, lr=0.1, batch_size=4)
    fast, _ = local_sgd(free, params_of(free), clients, [0, 2], generator=gen(), **kw)
    slow, _ = local_sgd_loop(free, params_of(free), clients, [0, 2], generator=gen(), **kw)
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], atol=1e-12, rtol=0)
    dropout = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(local_sgd(dropout, params_of(dropout), clients, [0, 1], generator=gen(),
                              **kw)[0])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    cpu, *_ = toy_clients(dtype=torch.float32)
    X, y = cpu.X, cpu.y
    parts = [np.arange(int(s)) + 12 * c for c, s in enumerate(cpu.sizes)]
    flatX, flaty = X.reshape(-1, X.shape[-1]), y.reshape(-1)
    cuda = Clients.from_partition(flatX, flaty, parts, "cuda")
    model = mlp(dtype=torch.float32)
    kw = dict(steps=4, lr=0.2, batch_size=5, momentum=0.5)
    a, na = local_sgd(model, params_of(model), cpu, [0, 1, 3], generator=gen(), **kw)
    model_cuda = mlp(dtype=torch.float32).cuda()
    b, nb = local_sgd(model_cuda, params_of(model_cuda), cuda, [0, 1, 3], generator=gen(), **kw)
    assert na == nb
    for k in a:
        torch.testing.assert_close(b[k].cpu(), a[k], atol=1e-5, rtol=1e-4)
    h = run(model_cuda, cuda, rounds=2, participation=np.ones((2, 4), bool), local_steps=2,
            lr=0.1, batch_size=4, seed=0, eval_data=(flatX, flaty),
            aggregate=aggregators.as_rule(aggregators.trimmed_mean, beta=0.25))
    assert h.params["0.weight"].is_cuda and len(h.test_acc) == 3


def test_bench_round_runs():
    result = bench_round(4, 2, samples_per_client=6, n_features=8, hidden=4, device="cpu",
                         repeats=1)
    assert result["n_clients"] == 4 and result["vectorized_s"] > 0 and result["loop_s"] > 0


def test_evaluate_matches_the_module():
    clients, X, y, _ = toy_clients()
    model = mlp()
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    loss, acc = evaluate(model, params_of(model), X, y, batch_size=7)
    logits = model(X)
    expected = nn.functional.cross_entropy(logits, y).item()
    assert abs(loss - expected) < 1e-12
    assert acc == (logits.argmax(1) == y).double().mean().item()


# -- server ----------------------------------------------------------------------------------------


def test_fedavg_one_full_batch_step_equals_centralized_gradient_descent():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 6)), rng.integers(0, 3, 40)
    parts = partition.iid(y, 4, seed=0)  # 10 samples each
    clients = Clients.from_partition(X, y, parts, "cpu", dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(6, 3).double()
    history = run(model, clients, rounds=5, participation=np.ones((5, 4), bool), local_steps=1,
                  lr=0.5, batch_size=10, seed=0)

    reference = nn.Linear(6, 3).double()
    reference.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(reference(Xt), yt).backward()
        opt.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(history.params[name], p.detach(), atol=1e-10, rtol=0)
    assert not torch.equal(history.params["weight"], model.weight)  # the model is left as it was


def test_run_records_and_is_reproducible():
    clients, X, y, _ = toy_clients(sizes=(10, 10, 10, 10, 10))
    model = mlp()
    mask = participation.uniform(5, 2, 6, seed=0)
    mask[3] = False  # a round nobody joins
    seen = []
    kw = dict(rounds=6, participation=mask, local_steps=3, lr=0.2, batch_size=4, seed=7,
              eval_every=4, eval_data=(X, y))
    a = run(model, clients, on_round=lambda r, p, info: seen.append((r, flatten(p))), **kw)
    b = run(model, clients, **kw)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert a.eval_round == [0, 4, 6] and len(a.test_acc) == 3
    n_params = sum(p.numel() for p in a.params.values())
    assert a.floats_up == [2 * n_params] * 3 + [0] + [2 * n_params] * 2
    # 10 samples, batch 4: batches of 4, 4, 2 in each client's first epoch.
    assert a.sample_grads == [2 * 10] * 3 + [0] + [2 * 10] * 2
    assert [r for r, _ in seen] == list(range(6))
    assert torch.equal(seen[3][1], seen[2][1])  # the empty round changed nothing
    assert a.rounds_frame()["cum_sample_grads"].iloc[-1] == 5 * 20
    c = run(model, clients, **{**kw, "seed": 8})
    assert not torch.equal(flatten(a.params), flatten(c.params))


def test_run_passes_the_round_to_the_rule_and_checks_its_output():
    clients, *_ = toy_clients()
    model = mlp()
    calls = []

    def rule(deltas, weights, r, info):
        calls.append((r, info["participants"].tolist(), weights.tolist()))
        return aggregators.coordinate_median(deltas)

    mask = np.array([[True, False, True, True], [False, True, False, False]])
    run(model, clients, rounds=2, participation=mask, local_steps=1, lr=0.1, batch_size=4, seed=0,
        aggregate=rule)
    assert calls == [(0, [0, 2, 3], [7.0, 3.0, 9.0]), (1, [1], [12.0])]
    with pytest.raises(ValueError, match=r"aggregate returned shape"):
        run(model, clients, rounds=1, participation=mask[:1], local_steps=1, lr=0.1, batch_size=4,
            seed=0, aggregate=lambda d, w, r, i: d)
    with pytest.raises(ValueError, match=r"expected \(rounds, n_clients\) = \(3, 4\)"):
        run(model, clients, rounds=3, participation=mask, local_steps=1, lr=0.1, batch_size=4,
            seed=0)
    with pytest.raises(ValueError, match="all zero"):
        run(model, clients, rounds=1, participation=mask[:1], local_steps=1, lr=0.1, batch_size=4,
            seed=0, weights=np.zeros(4))


def test_client_deltas_and_init_params():
    clients, *_ = toy_clients()
    model = mlp()
    start = params_of(model)
    kw = dict(steps=2, lr=0.1, batch_size=100, generator=gen())
    deltas, _ = client_deltas(model, start, clients, [0, 1], **kw)
    backwards = dict(reversed(list(start.items())))
    again, _ = client_deltas(model, backwards, clients, [0, 1], **{**kw, "generator": gen()})
    assert torch.equal(deltas, again)
    trained, _ = local_sgd(model, start, clients, [0, 1], **{**kw, "generator": gen()})
    torch.testing.assert_close(deltas, flatten_stack(trained) - flatten(start))
    shifted = {k: v + 1.0 for k, v in start.items()}
    stacked = {k: torch.stack([start[k], shifted[k]]) for k in start}
    own, _ = client_deltas(model, stacked, clients, [0, 1], **{**kw, "generator": gen()})
    alone, _ = client_deltas(model, shifted, clients, [1], **{**kw, "generator": gen()})
    torch.testing.assert_close(own[1], alone[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(own[0], deltas[0], atol=1e-12, rtol=0)

    mask = np.ones((1, 4), bool)
    base = dict(rounds=1, participation=mask, local_steps=1, lr=0.1, batch_size=4, seed=0)
    h = run(model, clients, init_params=backwards, **base)
    torch.testing.assert_close(flatten(h.params), flatten(run(model, clients, **base).params))
    with pytest.raises(ValueError, match="init_params keys"):
        run(model, clients, init_params={"w": torch.zeros(1)}, **base)


def test_byzantine_run_with_a_robust_rule_still_learns():
    # Four honest clients of a separable task, one sign-flipping client scaled by 10.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(250, 2))
    y = (X[:, 0] > 0).astype(int)
    clients = Clients.from_partition(X, y, partition.iid(y, 5, seed=0), "cpu")
    torch.manual_seed(0)
    model = nn.Linear(2, 2)

    def attacked(rule):
        def aggregate(deltas, weights, r, info):
            bad = attacks.byzantine_rows(info["participants"], [4])
            return rule(attacks.sign_flip(deltas, bad, scale=10.0))
        return aggregate

    accs = {}
    for name, rule in (("mean", aggregators.mean), ("median", aggregators.coordinate_median)):
        h = run(model, clients, rounds=20, participation=np.ones((20, 5), bool), local_steps=2,
                lr=0.5, batch_size=50, seed=0, aggregate=attacked(rule), eval_data=(X, y),
                eval_every=20)
        accs[name] = h.test_acc[-1]
    assert accs["median"] > 0.95 and accs["mean"] < 0.6


# -- aggregators -----------------------------------------------------------------------------------


D = torch.tensor([[0.0, 10.0], [1.0, 0.0], [2.0, 1.0], [3.0, -1.0], [100.0, 5.0]])


def test_aggregators_on_hand_cases():
    torch.testing.assert_close(aggregators.fedavg(D[:2], torch.tensor([3.0, 1.0])),
                               torch.tensor([0.25, 7.5]))
    torch.testing.assert_close(aggregators.coordinate_median(D), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(aggregators.coordinate_median(D[:4]), torch.tensor([1.5, 0.5]))
    # Drop 1 at each end per coordinate: x from {1, 2, 3}, y from {0, 1, 5}.
    torch.testing.assert_close(aggregators.trimmed_mean(D, 0.2), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(aggregators.trimmed_mean(D, n_trim=1), torch.tensor([2.0, 2.0]))
    # Krum, f=0 on 5 rows: the 3 nearest neighbours. Squared distances: r0-r1 101, r0-r2 85,
    # r0-r3 130, r1-r2 2, r1-r3 5, r2-r3 5, and r4 is at least 9445 from everyone.
    scores = aggregators.krum_scores(D, 0)
    torch.testing.assert_close(scores, torch.tensor([316.0, 108.0, 92.0, 140.0, 28891.0]))
    torch.testing.assert_close(aggregators.krum(D, 0), D[2])
    torch.testing.assert_close(aggregators.multi_krum(D, 0, m=2), (D[1] + D[2]) / 2)
    torch.testing.assert_close(aggregators.geometric_median(torch.eye(3) * 6), torch.ones(3) * 2)


def test_bulyan_and_geometric_median_resist_outliers():
    rng = torch.Generator().manual_seed(0)
    honest = torch.randn(9, 4, generator=rng) * 0.1 + 1.0
    outliers = torch.full((2, 4), 50.0)
    deltas = torch.cat([honest, outliers])
    for result in (aggregators.bulyan(deltas, 2), aggregators.geometric_median(deltas),
                   aggregators.multi_krum(deltas, 2), aggregators.krum(deltas, 2)):
        assert (result - 1.0).abs().max() < 0.3
    assert (aggregators.mean(deltas) - 1.0).abs().min() > 5


def test_aggregators_refuse_what_they_cannot_tolerate():
    with pytest.raises(ValueError, match=r"n > 2f \+ 2; got n=5, f=2 \(needs n >= 7\)"):
        aggregators.krum(D, 2)
    with pytest.raises(ValueError, match=r"n > 2f \+ 2; got n=5, f=2"):
        aggregators.multi_krum(D, 2, 1)
    with pytest.raises(ValueError, match=r"needs 2 \* 3 < 5"):
        aggregators.trimmed_mean(D, n_trim=3)
    with pytest.raises(ValueError, match=r"beta must be a fraction in \[0, 0.5\)"):
        aggregators.trimmed_mean(D, 0.5)
    with pytest.raises(ValueError, match=r"n >= 4f \+ 3; got n=5, f=1"):
        aggregators.bulyan(D, 1)
    with pytest.raises(ValueError, match="all zero"):
        aggregators.fedavg(D, torch.zeros(5))
    with pytest.raises(ValueError, match="NaN or inf"):
        aggregators.fedavg(D, torch.tensor([1.0, float("nan"), 1, 1, 1]))
    nan_rows = D.clone()
    nan_rows[3, 1] = float("nan")
    for rule in (aggregators.mean, aggregators.coordinate_median,
                 lambda d: aggregators.krum(d, 1)):
        with pytest.raises(ValueError, match=r"rows \[3\] contain NaN or inf"):
            rule(nan_rows)
    with pytest.raises(ValueError, match="no rows"):
        aggregators.mean(torch.zeros(0, 3))


def _byzfl_aggregators():
    """byzfl's pure-torch aggregators, read by path: its package __init__ imports its benchmark,
    which needs torchvision."""
    spec = importlib.util.find_spec("byzfl")
    if spec is None:
        return None
    saved = {k: v for k, v in sys.modules.items() if k == "byzfl" or k.startswith("byzfl.")}
    stub = types.ModuleType("byzfl")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["byzfl"] = stub
    try:
        return importlib.import_module("byzfl.aggregators.aggregators")
    except ImportError:
        return None
    finally:
        for k in [k for k in sys.modules if k == "byzfl" or k.startswith("byzfl.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_aggregators_match_byzfl():
    byzfl = _byzfl_aggregators()
    if byzfl is None:
        pytest.skip("byzfl is not installed")
    g = torch.Generator().manual_seed(3)
    for n, f in ((7, 2), (10, 3), (15, 4)):
        deltas = torch.randn(n, 30, generator=g, dtype=torch.float64)
        deltas[:f] += 5 * torch.randn(f, 30, generator=g, dtype=torch.float64)
        ref = deltas.numpy()  # byzfl's numpy path keeps float64 (its torch path casts to float32)

        def same(ours, theirs, atol=1e-12):
            torch.testing.assert_close(ours, torch.as_tensor(np.asarray(theirs)), atol=atol,
                                       rtol=0)

        same(aggregators.coordinate_median(deltas), byzfl.Median()(ref))
        same(aggregators.trimmed_mean(deltas, n_trim=f), byzfl.TrMean(f=f)(ref))
        # byzfl scores Krum with the n - f - 1 nearest neighbours (averaged: same ranking).
        same(aggregators.krum(deltas, f, neighbours=n - f - 1), byzfl.Krum(f=f)(ref))
        same(aggregators.multi_krum(deltas, f, neighbours=n - f - 1), byzfl.MultiKrum(f=f)(ref))
        same(aggregators.geometric_median(deltas, iters=3000, eps=1e-6, tol=0.0),
             byzfl.GeometricMedian(nu=1e-6, T=3000)(ref), atol=1e-6)


# -- attacks ---------------------------------------------------------------------------------------


def test_simple_attacks_replace_only_their_rows():
    out = attacks.sign_flip(D, [1, 3], scale=4.0)
    torch.testing.assert_close(out[[1, 3]], -4 * D[[1, 3]])
    torch.testing.assert_close(out[[0, 2, 4]], D[[0, 2, 4]])
    assert (attacks.zero(D, [0])[0] == 0).all()
    a = attacks.gaussian(D, [2], 3.0, gen(1))
    b = attacks.gaussian(D, [2], 3.0, gen(1))
    assert torch.equal(a, b) and not torch.equal(a[2], D[2])
    torch.testing.assert_close(a[[0, 1, 3, 4]], D[[0, 1, 3, 4]])
    benign_mean = D[[0, 1, 2]].mean(0)
    torch.testing.assert_close(attacks.ipm(D, [3, 4], eps=0.5)[3], -0.5 * benign_mean)
    assert attacks.byzantine_rows([4, 7, 9, 12], [9, 4, 100]).tolist() == [0, 2]


def test_alie_is_mean_minus_z_std_of_the_benign_updates():
    out = attacks.alie(D, [3, 4], z=1.5)
    benign = D[:3]
    expected = benign.mean(0) - 1.5 * benign.std(0, unbiased=False)
    torch.testing.assert_close(out[3], expected)
    torch.testing.assert_close(out[4], expected)
    # Baruch et al.: n = 50, f = 12 gives s = 14 and z = Phi^-1(0.72), about 0.583.
    assert abs(attacks.alie_z(50, 12) - 0.5828) < 1e-3


def test_min_max_sits_on_the_benign_diameter():
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(8, 20, generator=g, dtype=torch.float64) + 1.0
    byz = [6, 7]
    out = attacks.min_max(deltas, byz)
    benign = deltas[:6]
    diameter = torch.cdist(benign, benign).max()
    reach = (out[6] - benign).norm(dim=1).max()
    assert reach <= diameter + 1e-9 and reach > diameter - 1e-4
    centre = benign.mean(0)
    direction = (centre - out[6]) / (centre - out[6]).norm()
    torch.testing.assert_close(direction, centre / centre.norm())


def test_attack_errors():
    with pytest.raises(ValueError, match="all 5 workers are Byzantine"):
        attacks.alie(D, range(5), z=1.0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
        attacks.zero(D, [5])
    with pytest.raises(ValueError, match="repeat"):
        attacks.sign_flip(D, [1, 1])
