"""FedAMD: the anchor/miner split, the miners' variance-reduced local steps against hand
computations, the anchors' bullseye cache, the cost accounting, the baselines, and bad input."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from repsuite.federated.clients import (
    BatchSampler,
    Clients,
    flatten,
    local_sgd,
    params_of,
    unflatten,
)
from repsuite.federated.fedamd import (
    AnchorSampling,
    CostedHistory,
    bullseye_age,
    global_objective,
    local_gradients,
    miner_update,
    rounds_to_target,
    run_baseline,
    run_fedamd,
    sarah_transform,
    value_at_cost,
)


class Center(nn.Module):
    """f_i(theta) = mean_j 0.5 ||theta - a_j||^2 over the client's points a_j (the targets):
    every client has Hessian I, so a SARAH difference is exactly theta_k - theta_{k-1}."""

    def __init__(self, d=3, start=None):
        super().__init__()
        init = torch.zeros(d, dtype=torch.float64) if start is None else start.clone()
        self.theta = nn.Parameter(init)

    def forward(self, x):
        return self.theta.expand(x.shape[0], -1)


def sq_loss(out, y):
    return 0.5 * ((out - y) ** 2).sum(-1)


def quad_clients(seed=0, sizes=(5, 3, 6, 4), d=3):
    """Heterogeneous clients: client i's points scatter around a centre 3 * i."""
    g = torch.Generator().manual_seed(seed)
    points = [torch.randn(n, d, generator=g, dtype=torch.float64) + 3 * i
              for i, n in enumerate(sizes)]
    parts = np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1])
    y = torch.cat(points)
    X = torch.zeros(len(y), 1, dtype=torch.float64)
    clients = Clients.from_partition(X, y, parts, dtype=torch.float64)
    means = torch.stack([p.mean(0) for p in points])
    return clients, means, (X, y)


def softmax_clients(seed=0, sizes=(7, 5, 9), d=4, classes=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(sum(sizes), d, generator=g, dtype=torch.float64)
    y = torch.randint(classes, (sum(sizes),), generator=g)
    parts = np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1])
    return Clients.from_partition(X, y, parts, dtype=torch.float64), (X, y)


def mlp(seed=0, d=4, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, classes)).double()


def everyone(rounds, n):
    return np.ones((rounds, n), dtype=bool)


def only(rows, n):
    mask = np.zeros((len(rows), n), dtype=bool)
    for t, ids in enumerate(rows):
        mask[t, ids] = True
    return mask


# --- the split -------------------------------------------------------------------------------

def test_sequential_split_is_all_or_nothing():
    s = AnchorSampling(period=3)
    g = torch.Generator().manual_seed(0)
    for t in range(7):
        anchors, miners = s.split([4, 1, 7], t, g)
        if t % 3 == 0:
            assert anchors.tolist() == [4, 1, 7] and miners.size == 0
        else:
            assert anchors.size == 0 and miners.tolist() == [4, 1, 7]


def test_constant_split_partitions_participants_and_respects_p():
    s = AnchorSampling(prob=0.3)
    g = torch.Generator().manual_seed(1)
    n_anchor, n_total = 0, 0
    part = np.array([0, 3, 5, 8, 9])
    for t in range(2000):
        anchors, miners = s.split(part, t, g)
        assert sorted(anchors.tolist() + miners.tolist()) == part.tolist()
        n_anchor, n_total = n_anchor + len(anchors), n_total + len(part)
    # Binomial(10000, 0.3): sd 0.0046, so 5 sd either side.
    assert abs(n_anchor / n_total - 0.3) < 0.023
    none, _ = AnchorSampling(prob=0.0).split(np.arange(50), 0, g)
    assert none.size == 0


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"),
    ({"prob": 0.2, "period": 3}, "exactly one"),
    ({"prob": 1.0}, r"\[0, 1\)"),
    ({"prob": -0.1}, r"\[0, 1\)"),
    ({"period": 1}, "period 1"),
    ({"period": 2.5}, "int >= 2"),
])
def test_bad_sampling(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnchorSampling(**kwargs)


# --- the miner's local steps -------------------------------------------------------------------

def test_first_local_step_moves_exactly_along_the_global_direction():
    clients, _, _ = quad_clients()
    theta0 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    v = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    finals, n_grads = miner_update(Center(), {"theta": theta0}, v, clients, [0, 1, 2, 3],
                                   steps=1, lr=0.1, batch_size=2,
                                   generator=torch.Generator().manual_seed(0), loss_fn=sq_loss)
    assert n_grads == 0
    torch.testing.assert_close(finals["theta"], (theta0 - 0.1 * v).expand(4, 3),
                               rtol=0, atol=1e-15)


def test_sarah_estimate_on_identity_hessian_clients_matches_closed_form():
    # v_k = v + (theta_k - theta_0), so d_k = theta_k - theta_0 obeys d_{k+1} = (1-lr) d_k - lr v
    # and theta_K = theta_0 - v (1 - (1 - lr)^K), whatever the client and its minibatches.
    clients, _, _ = quad_clients()
    theta0 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    v = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    lr, K, b = 0.3, 7, 2
    finals, n_grads = miner_update(Center(), {"theta": theta0}, v, clients, [0, 1, 2, 3],
                                   steps=K, lr=lr, batch_size=b,
                                   generator=torch.Generator().manual_seed(0), loss_fn=sq_loss)
    expected = theta0 - v * (1 - (1 - lr) ** K)
    torch.testing.assert_close(finals["theta"], expected.expand(4, 3), rtol=0, atol=1e-12)
    # Two gradients on each later step; the last batch of an epoch may be smaller.
    sampler = BatchSampler(clients.sizes, b, torch.Generator().manual_seed(0))
    per_step = [int(sampler.draw(s)[1].sum()) for s in range(K)]
    assert n_grads == 2 * sum(per_step[1:])


def test_sarah_steps_match_a_per_client_autograd_loop():
    clients, _ = softmax_clients()
    model = mlp()
    params = params_of(model)
    v = torch.randn(flatten(params).numel(), generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    lr, K, b, ids = 0.2, 5, 3, [2, 0]
    finals, _ = miner_update(model, params, v, clients, ids, steps=K, lr=lr, batch_size=b,
                             generator=torch.Generator().manual_seed(7))
    sampler = BatchSampler(clients.sizes[ids], b, torch.Generator().manual_seed(7))
    draws = [sampler.draw(s) for s in range(K)]

    def grad_at(vec, xb, yb):
        m = mlp()
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(vec, m.parameters())
        nn.functional.cross_entropy(m(xb), yb).backward()
        return torch.cat([p.grad.reshape(-1) for p in m.parameters()])

    for j, c in enumerate(ids):
        Xc, yc = clients.data(c)
        y_prev, y_k, v_k = None, flatten(params).clone(), v.clone()
        for s, (rows, valid) in enumerate(draws):
            batch = rows[j][valid[j]]
            if s > 0:
                v_k = v_k + grad_at(y_k, Xc[batch], yc[batch]) - grad_at(y_prev, Xc[batch],
                                                                         yc[batch])
            y_prev, y_k = y_k, y_k - lr * v_k
        got = torch.cat([p[j].reshape(-1) for p in finals.values()])
        torch.testing.assert_close(got, y_k, rtol=0, atol=1e-12)


def test_sarah_on_the_simulators_gradient_hook_agrees_with_the_miner_engine():
    clients, _ = softmax_clients()
    model = mlp()
    params = params_of(model)
    v = torch.randn(flatten(params).numel(), generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    kw = dict(steps=6, lr=0.15, batch_size=4)
    fast, n_fast = miner_update(model, params, v, clients, [1, 2], **kw,
                                generator=torch.Generator().manual_seed(9))
    hooked, n_hooked = local_sgd(model, params, clients, [1, 2], **kw,
                                 generator=torch.Generator().manual_seed(9),
                                 grad_transform=sarah_transform(unflatten(v, params)))
    for name in fast:
        torch.testing.assert_close(fast[name], hooked[name], rtol=0, atol=1e-12)
    # The hook also computes (and discards) the step-0 gradient: one batch per client.
    assert n_hooked - n_fast == 4 + 4


def test_without_the_correction_a_miner_is_the_simulators_local_sgd():
    clients, _ = softmax_clients()
    model = mlp()
    params = params_of(model)
    kw = dict(steps=4, lr=0.1, batch_size=3)
    plain, n_plain = miner_update(model, params, None, clients, [0, 2], **kw,
                                  generator=torch.Generator().manual_seed(5),
                                  variance_reduction=False)
    ref, n_ref = local_sgd(model, params, clients, [0, 2], **kw,
                           generator=torch.Generator().manual_seed(5))
    for name in ref:
        assert torch.equal(plain[name], ref[name])
    assert n_plain == n_ref


# --- the server ------------------------------------------------------------------------------

def test_one_miner_with_exact_bullseyes_follows_global_gradient_descent():
    # Partial participation (one client), exact bullseyes: the miner's path is gradient descent
    # on the global objective, not on its own. FedAvg's single client drifts to its own data.
    clients, means, test = quad_clients()
    lr, K = 0.25, 6
    optimum = means.mean(0)
    gd = optimum + (1 - lr) ** K * (0 - optimum)
    kw = dict(rounds=1, participation=only([[2]], 4), local_steps=K, lr=lr, batch_size=2,
              seed=0, eval_data=test, loss_fn=sq_loss)
    h = run_fedamd(Center(), clients, sampling=AnchorSampling(prob=0.0), **kw)
    torch.testing.assert_close(h.params["theta"], gd, rtol=0, atol=1e-12)
    assert h.miners[0].tolist() == [2] and h.anchors[0].size == 0

    avg = run_baseline("fedavg", Center(), clients, **{**kw, "batch_size": 10})
    own = means[2] + (1 - lr) ** K * (0 - means[2])
    torch.testing.assert_close(avg.params["theta"], own, rtol=0, atol=1e-12)
    assert (avg.params["theta"] - gd).norm() > 1.0


def test_stale_bullseyes_are_refreshed_at_the_current_model():
    # period 2: rounds 0 and 2 are anchor rounds, 1 and 3 miner rounds. Bullseye i at model z is
    # z - mean_i, and K miner steps along v end at x - v (1 - (1 - lr)^K) (identity Hessians).
    clients, means, test = quad_clients()
    lr, K = 0.2, 4
    shrink = 1 - (1 - lr) ** K
    x0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    rows = [[0, 1, 2, 3], [1, 3], [0, 1], [2, 3]]
    h = run_fedamd(Center(start=x0), clients, rounds=4, participation=only(rows, 4),
                   local_steps=K, lr=lr, batch_size=2, seed=0, eval_data=test,
                   sampling=AnchorSampling(period=2), loss_fn=sq_loss)
    x1 = x0 - shrink * (x0 - means.mean(0))          # every bullseye from the initial pass
    # Round 2 refreshes clients 0 and 1 at x1; clients 2 and 3 keep bullseyes taken at x0.
    v3 = (2 * x1 + 2 * x0) / 4 - means.mean(0)
    x3 = x1 - shrink * v3
    torch.testing.assert_close(h.params["theta"], x3, rtol=0, atol=1e-12)
    assert [a.tolist() for a in h.anchors] == [[0, 1, 2, 3], [], [0, 1], []]
    assert [m.tolist() for m in h.miners] == [[], [1, 3], [], [2, 3]]
    # Anchor rounds leave the model where it was.
    assert h.test_loss[0] == h.test_loss[1] and h.test_loss[2] == h.test_loss[3]


def test_cost_accounting_matches_a_hand_count_over_two_rounds():
    clients, _, test = quad_clients(sizes=(5, 3, 6, 4))
    P, K, b = 3, 3, 2
    h = run_fedamd(Center(P), clients, rounds=2, participation=only([[0, 2], [1, 3]], 4),
                   local_steps=K, lr=0.1, batch_size=b, seed=0, eval_data=test,
                   sampling=AnchorSampling(period=2), loss_fn=sq_loss)
    frame = h.frame()
    init = 5 + 3 + 6 + 4                      # every client, whole local data
    anchors = 5 + 6                           # round 0 (t % 2 == 0): clients 0 and 2
    # Round 1: clients 1 (3 samples) and 3 (4 samples), batches of 2 walking through epochs:
    # client 1 gets 2, 1, 2 rows and client 3 gets 2, 2, 2; steps 1 and 2 need two gradients.
    miners = 2 * (1 + 2) + 2 * (2 + 2)
    assert frame["sample_grads"].tolist() == [init, init + anchors, init + anchors + miners]
    f_init, f_anchor, f_miner = 4 * 2 * P, 2 * 2 * P, 2 * (2 * P + P)
    assert frame["floats"].tolist() == [f_init, f_init + f_anchor, f_init + f_anchor + f_miner]
    assert frame["round"].tolist() == [0, 1, 2]


def test_baseline_costs():
    clients, _, test = quad_clients(sizes=(5, 3, 6, 4))
    P, K, b = 3, 3, 2
    kw = dict(rounds=2, participation=only([[0, 2], [1, 3]], 4), local_steps=K, lr=0.1,
              batch_size=b, seed=0, eval_data=test, loss_fn=sq_loss)
    # Round 0: clients 0 and 2 (5 and 6 rows) take 2 + 2 + 1 and 2 + 2 + 2 rows; round 1:
    # clients 1 and 3 take 2 + 1 + 2 and 2 + 2 + 2.
    avg = run_baseline("fedavg", Center(P), clients, **kw).frame()
    assert avg["sample_grads"].tolist() == [0, 11, 22]
    assert avg["floats"].tolist() == [0, 2 * 2 * P, 4 * 2 * P]
    mifa = run_baseline("mifa", Center(P), clients, **kw).frame()
    assert mifa["sample_grads"].tolist() == [0, 11, 22]
    sc = run_baseline("scaffold", Center(P), clients, **kw).frame()
    assert sc["sample_grads"].tolist() == [18, 29, 40]
    assert sc["floats"].tolist() == [8 * P, 8 * P + 2 * 4 * P, 8 * P + 4 * 4 * P]


def test_scaffold_matches_a_hand_loop():
    clients, means, test = quad_clients()
    lr, K, rows = 0.2, 3, [[1], [1, 3], [0]]
    x = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    h = run_baseline("scaffold", Center(start=x), clients, rounds=3,
                     participation=only(rows, 4), local_steps=K, lr=lr, batch_size=10, seed=0,
                     eval_data=test, loss_fn=sq_loss)
    controls = x - means                       # full local gradients at the initial model
    for ids in rows:
        c = controls.mean(0)
        finals, used = [], {}
        for i in ids:
            y, grads = x.clone(), []
            for _ in range(K):
                g = y - means[i]
                grads.append(g)
                y = y - lr * (g - controls[i] + c)
            finals.append(y)
            used[i] = torch.stack(grads).mean(0)
        for i in ids:
            controls[i] = used[i]
        x = torch.stack(finals).mean(0)
    torch.testing.assert_close(h.params["theta"], x, rtol=0, atol=1e-12)


def test_mifa_averages_stored_updates_over_all_clients():
    clients, means, test = quad_clients()
    h1 = run_baseline("mifa", Center(), clients, rounds=1, participation=only([[2]], 4),
                      local_steps=1, lr=0.5, batch_size=10, seed=0, eval_data=test,
                      loss_fn=sq_loss)
    d2 = 0.5 * means[2]                       # one full-batch step from 0
    torch.testing.assert_close(h1.params["theta"], d2 / 4, rtol=0, atol=1e-12)
    h2 = run_baseline("mifa", Center(), clients, rounds=2, participation=only([[2], [0]], 4),
                      local_steps=1, lr=0.5, batch_size=10, seed=0, eval_data=test,
                      loss_fn=sq_loss)
    x1 = d2 / 4
    d0 = -0.5 * (x1 - means[0])
    torch.testing.assert_close(h2.params["theta"], x1 + (d0 + d2) / 4, rtol=0, atol=1e-12)


def test_objective_and_exact_bullseyes():
    clients, means, _ = quad_clients()
    theta = torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64)
    expected = np.mean([float(sq_loss(theta.expand(n, 3), clients.data(i)[1]).mean())
                        for i, n in enumerate(clients.sizes.tolist())])
    got = global_objective(Center(), {"theta": theta}, clients, loss_fn=sq_loss)
    assert got == pytest.approx(expected, rel=1e-12)
    g, n = local_gradients(Center(), {"theta": theta}, clients, [3, 1], loss_fn=sq_loss)
    torch.testing.assert_close(g, theta - means[[3, 1]], rtol=0, atol=1e-12)
    assert n == 4 + 3
    g, n = local_gradients(Center(), {"theta": theta}, clients, [0, 2], batch=4,
                           generator=torch.Generator().manual_seed(0), loss_fn=sq_loss)
    assert n == 8 and g.shape == (2, 3)


def test_bullseye_age_counts_rounds_since_each_refresh():
    h = CostedHistory(anchors=[np.array([0, 1]), np.array([], dtype=int), np.array([2]),
                               np.array([0]), np.array([], dtype=int)])
    # Round t starts with ages t - (round each cached bullseye was computed, 0 initially):
    # client 2 is refreshed in round 2 and client 0 in round 3.
    assert bullseye_age(h, 3).tolist() == pytest.approx([0, 1, 2, 7 / 3, 7 / 3])


def test_target_and_budget_readouts():
    frame = pd.DataFrame({"round": [0, 1, 2, 3], "acc": [0.1, 0.5, 0.8, 0.9],
                          "sample_grads": [100, 200, 300, 400]})
    assert rounds_to_target(frame, "acc", 0.8) == 2
    assert rounds_to_target(frame, "acc", 0.8, cost="sample_grads") == 300
    assert rounds_to_target(frame, "acc", 0.95) == float("inf")
    assert rounds_to_target(frame, "acc", 0.3, higher=False) == 0
    assert value_at_cost(frame, "acc", 350) == 0.8
    assert np.isnan(value_at_cost(frame, "acc", 50))


# --- bad input -------------------------------------------------------------------------------

def test_bad_input_is_reported_in_the_callers_terms():
    clients, test = softmax_clients()
    model = mlp()
    params = params_of(model)
    P = flatten(params).numel()
    kw = dict(steps=2, lr=0.1, batch_size=2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="NaN or infinite"):
        miner_update(model, params, torch.full((P,), float("nan")), clients, [0], **kw)
    with pytest.raises(ValueError, match="global direction has shape"):
        miner_update(model, params, torch.zeros(P + 1), clients, [0], **kw)
    with pytest.raises(ValueError, match="learning rate"):
        miner_update(model, params, torch.zeros(P), clients, [0], **{**kw, "lr": 0.0})
    with pytest.raises(ValueError, match="local steps"):
        miner_update(model, params, torch.zeros(P), clients, [0], **{**kw, "steps": 0})
    with pytest.raises(ValueError, match=r"client indices must lie in \[0, 3\)"):
        miner_update(model, params, torch.zeros(P), clients, [0, 3], **kw)
    with pytest.raises(ValueError, match="repeat a client"):
        miner_update(model, params, torch.zeros(P), clients, [1, 1], **kw)
    empty = Clients(clients.X, clients.y, clients.mask, torch.tensor([7, 0, 9]))
    with pytest.raises(ValueError, match=r"clients \[1\] hold no data"):
        miner_update(model, params, torch.zeros(P), empty, [0], **kw)

    run_kw = dict(rounds=2, participation=everyone(2, 3), local_steps=2, lr=0.1, batch_size=2,
                  seed=0, eval_data=test)
    with pytest.raises(ValueError, match="anchor batch"):
        run_fedamd(model, clients, sampling=AnchorSampling(prob=0.2), anchor_batch=0, **run_kw)
    with pytest.raises(TypeError, match="AnchorSampling"):
        run_fedamd(model, clients, sampling=0.2, **run_kw)
    with pytest.raises(ValueError, match=r"shape \(rounds, clients\) = \(2, 3\)"):
        run_fedamd(model, clients, sampling=AnchorSampling(prob=0.2),
                   **{**run_kw, "participation": everyone(2, 4)})
    with pytest.raises(ValueError, match="method must be one of"):
        run_baseline("fedprox", model, clients, **run_kw)


def test_a_diverging_run_is_an_error_not_nan():
    clients, _, test = quad_clients()
    huge = torch.full((3,), 1e300, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        run_fedamd(Center(start=huge), clients, rounds=1, participation=everyone(1, 4),
                   local_steps=3, lr=1e10, batch_size=2, seed=0, eval_data=test,
                   sampling=AnchorSampling(prob=0.0), loss_fn=sq_loss)
