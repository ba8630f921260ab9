"""Gradient-inversion conversion of stale updates and the staleness baselines, on small problems."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from repsuite.federated import Clients, client_deltas, fedavg, params_of, run, unflatten
from repsuite.federated.staleness import (
    GIConfig,
    ParamLayout,
    Reconstruction,
    convert_stale_update,
    first_order_compensation,
    invert_update,
    relative_l1,
    simulate_update,
    staleness_weight,
)
from repsuite.federated.staleness_runs import (
    StaleHistory,
    best_baseline,
    final_value,
    intertwined_systems,
    per_seed,
    rounds_to_target,
    rows_of,
    run_stale,
    summarize,
)

D, C = 8, 3  # inputs and classes of the softmax-regression toy


def _toy(seed=1, n=1):
    """Softmax regression, a stale and a current global model far apart, one client's data."""
    torch.manual_seed(0)
    model = nn.Linear(D, C).double()
    g = torch.Generator().manual_seed(seed)
    P = ParamLayout(model).n_params
    theta_stale = 0.5 * torch.randn(P, generator=g, dtype=torch.float64)
    theta_now = theta_stale + 0.5 * torch.randn(P, generator=g, dtype=torch.float64)
    X = torch.rand(n, D, generator=g, dtype=torch.float64)
    T = nn.functional.one_hot(torch.randint(0, C, (n,), generator=g), C).double()
    return model, theta_stale, theta_now, X, T


def _reference_update(model, theta, X, T, steps, lr):
    """The same local training written the plain way: an nn.Module and torch's SGD."""
    net = nn.Linear(D, C).double()
    layout = ParamLayout(net)
    with torch.no_grad():
        for p, v in zip(net.parameters(), layout.unflatten(theta).values(), strict=True):
            p.copy_(v)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(X), T.argmax(1)).backward()
        opt.step()
    return layout.flatten(net) - theta


# -- the simulated local training ------------------------------------------------------------------


def test_simulated_local_training_equals_plain_sgd_loop():
    model, theta, _, X, T = _toy(n=5)
    got = simulate_update(model, theta, X, T, steps=3, lr=0.7)
    want = _reference_update(model, theta, X, T, steps=3, lr=0.7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_batched_simulation_equals_one_client_at_a_time():
    model, theta, theta2, X, T = _toy(n=4)
    X2, T2 = X.flip(0) * 0.5, T.roll(1, dims=1)
    both = simulate_update(model, torch.stack([theta, theta2]), torch.stack([X, X2]),
                           torch.stack([T, T2]), steps=2, lr=0.3)
    torch.testing.assert_close(both[0], simulate_update(model, theta, X, T, steps=2, lr=0.3))
    torch.testing.assert_close(both[1], simulate_update(model, theta2, X2, T2, steps=2, lr=0.3))


def test_simulated_update_is_differentiable_in_the_synthetic_data():
    model, theta, _, _, _ = _toy()
    g = torch.Generator().manual_seed(3)
    X = torch.rand(2, D, generator=g, dtype=torch.float64, requires_grad=True)
    T = torch.rand(2, C, generator=g, dtype=torch.float64).softmax(1).requires_grad_(True)
    w = torch.randn(ParamLayout(model).n_params, generator=g, dtype=torch.float64)

    def f(X, T):
        return (w * simulate_update(model, theta, X, T, steps=2, lr=0.5)).sum()

    assert torch.autograd.gradcheck(f, (X, T))


# -- inversion and conversion ----------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3])
def test_conversion_recovers_the_fresh_update_when_the_data_are_identifiable(steps):
    # One sample, one synthetic point: the update W-part is the rank-one outer product
    # -lr * (p - y) x^T and the bias part -lr * (p - y), so D_rec is determined and the fresh
    # update from the current model is known exactly.
    model, theta_stale, theta_now, X, T = _toy(n=1)
    delta_stale = simulate_update(model, theta_stale, X, T, steps=steps, lr=0.5)
    delta_fresh = simulate_update(model, theta_now, X, T, steps=steps, lr=0.5)
    fresh, rec = convert_stale_update(
        model, theta_now, theta_stale, delta_stale, steps=steps, lr=0.5, n_classes=C,
        input_shape=(D,), config=GIConfig(n_rec=1, iterations=300),
        generator=torch.Generator().manual_seed(0))
    assert rec.residual.item() < 1e-2
    assert relative_l1(fresh, delta_fresh).item() < 2e-2
    assert relative_l1(delta_stale, delta_fresh).item() > 0.2  # the staleness error it removed


def test_conversion_is_closer_to_the_fresh_update_than_the_stale_one():
    model, theta_stale, theta_now, X, T = _toy(n=4, seed=5)
    delta_stale = simulate_update(model, theta_stale, X, T, steps=1, lr=0.5)
    delta_fresh = simulate_update(model, theta_now, X, T, steps=1, lr=0.5)
    fresh, _ = convert_stale_update(
        model, theta_now, theta_stale, delta_stale, steps=1, lr=0.5, n_classes=C,
        input_shape=(D,), config=GIConfig(n_rec=8, iterations=600),
        generator=torch.Generator().manual_seed(0))
    assert relative_l1(fresh, delta_fresh) < 0.75 * relative_l1(delta_stale, delta_fresh)


def test_without_staleness_the_conversion_reproduces_the_uploaded_update():
    model, theta, _, X, T = _toy(n=6, seed=2)
    delta = simulate_update(model, theta, X, T, steps=2, lr=0.5)
    fresh, rec = convert_stale_update(
        model, theta, theta, delta, steps=2, lr=0.5, n_classes=C, input_shape=(D,),
        config=GIConfig(n_rec=6, iterations=200), generator=torch.Generator().manual_seed(0))
    assert nn.functional.cosine_similarity(fresh, delta, dim=0) > 0.99
    torch.testing.assert_close(relative_l1(fresh, delta), rec.residual)


def test_real_data_as_d_rec_gives_the_true_fresh_update_exactly():
    model, _, theta_now, X, T = _toy(n=5)
    rec = Reconstruction(X[None], (T[None] * 1e3), torch.zeros(1))  # softmax(1e3 * one-hot)
    got = simulate_update(model, theta_now, rec.X[0], rec.targets[0], steps=3, lr=0.4)
    want = _reference_update(model, theta_now, X, T, steps=3, lr=0.4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_several_clients_are_inverted_at_once_as_if_one_by_one():
    model, theta_stale, _, X, T = _toy(n=3)
    d1 = simulate_update(model, theta_stale, X, T, steps=1, lr=0.5)
    d2 = simulate_update(model, theta_stale, X * 0.5, T.roll(1, 1), steps=1, lr=0.5)
    cfg = GIConfig(n_rec=3, iterations=50, lr_decay=False)
    both = invert_update(model, torch.stack([theta_stale] * 2), torch.stack([d1, d2]), steps=1,
                         lr=0.5, n_classes=C, input_shape=(D,), config=cfg,
                         generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    X0 = torch.rand((2, 3, D), generator=g, dtype=torch.float64)
    L0 = torch.randn((2, 3, C), generator=g, dtype=torch.float64)
    for i, d in enumerate((d1, d2)):
        one = invert_update(model, theta_stale, d, steps=1, lr=0.5, n_classes=C, input_shape=(D,),
                            config=replace(cfg, warm_iterations=50),
                            init=Reconstruction(X0[i:i + 1], L0[i:i + 1], torch.zeros(1)))
        torch.testing.assert_close(one.X[0], both.X[i])
        torch.testing.assert_close(one.label_logits[0], both.label_logits[i])


def test_sparsified_matching_ignores_the_small_entries():
    model, theta_stale, _, X, T = _toy(n=3)
    delta = simulate_update(model, theta_stale, X, T, steps=1, lr=0.5)
    cfg = GIConfig(n_rec=3, iterations=30, keep_frac=0.3)
    small = delta.abs() < delta.abs().quantile(0.5)
    perturbed = torch.where(small, delta * 0.1, delta)  # stays below the kept entries
    a, b = (invert_update(model, theta_stale, d, steps=1, lr=0.5, n_classes=C, input_shape=(D,),
                          config=cfg, generator=torch.Generator().manual_seed(4))
            for d in (delta, perturbed))
    torch.testing.assert_close(a.X, b.X)
    full = invert_update(model, theta_stale, perturbed, steps=1, lr=0.5, n_classes=C,
                         input_shape=(D,), config=GIConfig(n_rec=3, iterations=30),
                         generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(full.X, b.X)


def test_inputs_stay_in_the_box_and_the_same_seed_repeats():
    model, theta_stale, _, X, T = _toy(n=3)
    delta = simulate_update(model, theta_stale, X, T, steps=1, lr=0.5)
    cfg = GIConfig(n_rec=4, iterations=40, box=(0.2, 0.6))
    runs = [invert_update(model, theta_stale, delta, steps=1, lr=0.5, n_classes=C,
                          input_shape=(D,), config=cfg, generator=torch.Generator().manual_seed(9))
            for _ in range(2)]
    assert runs[0].X.min() >= 0.2 and runs[0].X.max() <= 0.6
    torch.testing.assert_close(runs[0].X, runs[1].X, rtol=0, atol=0)


def test_warm_start_continues_from_the_previous_reconstruction():
    model, theta_stale, _, X, T = _toy(n=1)
    delta = simulate_update(model, theta_stale, X, T, steps=1, lr=0.5)
    kw = dict(steps=1, lr=0.5, n_classes=C, input_shape=(D,))
    cfg = GIConfig(n_rec=1, iterations=600, warm_iterations=20)
    cold = invert_update(model, theta_stale, delta, config=cfg,
                         generator=torch.Generator().manual_seed(0), **kw)
    warm = invert_update(model, theta_stale, delta, config=cfg, init=cold, **kw)
    short = invert_update(model, theta_stale, delta, config=GIConfig(n_rec=1, iterations=20),
                          generator=torch.Generator().manual_seed(0), **kw)
    assert warm.residual.item() < 0.1 * short.residual.item()


# -- baselines -------------------------------------------------------------------------------------


def test_staleness_weights_by_hand():
    np.testing.assert_allclose(staleness_weight([0, 20, 40], "exp", a=20), [1.0, 0.5, 0.25])
    np.testing.assert_allclose(staleness_weight([0, 3, 15], "poly", a=0.5), [1.0, 0.5, 0.25])


def test_first_order_compensation_by_hand():
    delta = torch.tensor([0.5, -1.0, 2.0])
    now, stale = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 4.0, 3.0])
    # delta - lam * delta^2 * (now - stale), lam = 2: [0.5 - 2*.25*1, -1 - 2*1*(-2), 2 - 0]
    torch.testing.assert_close(first_order_compensation(delta, now, stale, 2.0),
                               torch.tensor([0.0, 3.0, 2.0]))
    torch.testing.assert_close(first_order_compensation(delta, now, stale, 0.0), delta)


# -- federated training with slow clients ----------------------------------------------------------


def _fl_toy(n_systems, sizes=(6, 9, 5, 7), seed=0):
    """n_systems copies of one 4-client problem (clients 1 and 3 slow), as one Clients object."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    X = rng.uniform(size=(n, D))
    y = rng.integers(0, C, n)
    parts = np.split(np.arange(n), np.cumsum(sizes)[:-1])
    clients = Clients.from_partition(np.tile(X, (n_systems, 1)), np.tile(y, n_systems),
                                     [p + s * n for s in range(n_systems) for p in parts],
                                     dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(D, C).double()
    theta0 = ParamLayout(model).flatten(model)
    slow = np.tile([False, True, False, True], n_systems)
    system_of = np.repeat(np.arange(n_systems), len(sizes))
    Xt = torch.as_tensor(X[None].repeat(n_systems, 0))
    yt = torch.as_tensor(y[None].repeat(n_systems, 0))
    return model, clients, system_of, slow, theta0, Xt, yt


def _run(methods, taus, rounds=4, **kw):
    model, clients, system_of, slow, theta0, Xt, yt = _fl_toy(len(methods))
    return run_stale(model, clients, system_of=system_of, slow=slow, methods=methods, taus=taus,
                     theta0=theta0.repeat(len(methods), 1), rounds=rounds, local_steps=2, lr=0.5,
                     eval_X=Xt, eval_y=yt, n_classes=C, input_shape=(D,), **kw)


def _reference(method, tau, rounds=4, lam=4.0):
    """One system written out plainly: per-round starts from the model history and each rule."""
    model, clients, _, slow, theta0, _, _ = _fl_toy(1)
    like = params_of(model)
    local = dict(steps=2, lr=0.5, batch_size=100, generator=torch.Generator())
    history = [theta0]
    for r in range(rounds):
        updates, weights = [], []
        for c in range(4):
            s = min(r, tau) if slow[c] and method != "fresh" else 0
            start = history[r - s]
            delta = client_deltas(model, unflatten(start, like), clients, [c], **local)[0][0]
            w = float(clients.sizes[c])
            if s > 0 and method == "weighted":
                delta = delta * 2.0 ** (-s / 20.0)
            if s > 0 and method == "drop":
                w = 0.0
            if s > 0 and method == "dc":
                delta = first_order_compensation(delta, history[r], start, lam)
            updates.append(delta)
            weights.append(w)
        history.append(history[r] + fedavg(torch.stack(updates), torch.tensor(weights)))
    return history[-1]


@pytest.mark.parametrize("method", ["fresh", "stale", "weighted", "drop", "dc"])
def test_each_rule_matches_a_plain_per_client_loop(method):
    got = _run([method], [2]).theta[0]
    torch.testing.assert_close(got, _reference(method, 2), rtol=0, atol=1e-12)


def test_stale_updates_change_the_outcome_and_systems_do_not_interact():
    together = _run(["fresh", "stale", "weighted", "drop", "dc"], [0, 2, 2, 2, 2])
    for i, method in enumerate(["fresh", "stale", "weighted", "drop", "dc"]):
        alone = _run([method], [0 if method == "fresh" else 2]).theta[0]
        torch.testing.assert_close(together.theta[i], alone, rtol=0, atol=1e-12)
    assert not torch.allclose(together.theta[0], together.theta[1])


def test_without_staleness_every_method_is_fedavg_of_the_core_loop():
    methods = ["fresh", "stale", "weighted", "drop", "dc", "gi"]
    h = _run(methods, [0] * 6, gi=GIConfig(n_rec=2, iterations=2))
    model, clients, _, _, theta0, Xt, yt = _fl_toy(1)
    core = run(model, clients, rounds=4, participation=np.ones((4, 4), bool), local_steps=2,
               lr=0.5, batch_size=100, seed=0)
    want = torch.cat([p.reshape(-1) for p in core.params.values()])
    for i in range(len(methods)):
        torch.testing.assert_close(h.theta[i], want, rtol=0, atol=1e-12)
    assert len(h.conversions["round"]) == 0  # nothing was stale, so nothing was converted
    assert h.test_acc.shape == (6, 5) and np.allclose(h.test_acc, h.test_acc[:1])


def test_gradient_inversion_inside_training_is_recorded_and_seeded_per_system():
    gi = GIConfig(n_rec=3, iterations=30, warm_iterations=5)
    both = _run(["gi", "gi"], [2, 3], gi=gi, system_seeds=[7, 8])
    alone = _run(["gi"], [3], gi=gi, system_seeds=[8])
    torch.testing.assert_close(both.theta[1], alone.theta[0], rtol=0, atol=1e-10)
    conv = both.conversions
    # Rounds 1-3 of system 0 and 1-3 of system 1, two slow clients each.
    assert len(conv["round"]) == 12 and set(conv["client"]) == {1, 3, 5, 7}
    assert np.all(conv["staleness"] == np.minimum(conv["round"], np.where(conv["system"], 3, 2)))
    assert np.all(np.isfinite(conv["err_converted"])) and both.gi_seconds > 0
    assert not torch.allclose(both.theta[0], _run(["stale"], [2]).theta[0])


def test_real_client_data_as_d_rec_reproduce_the_core_local_training():
    model, clients, _, _, theta0, _, _ = _fl_toy(1)
    Xc, yc = clients.data(1)
    want = client_deltas(model, unflatten(theta0, params_of(model)), clients, [1], steps=3,
                         lr=0.4, batch_size=100, generator=torch.Generator())[0][0]
    got = simulate_update(model, theta0, Xc, nn.functional.one_hot(yc, C).double(), steps=3,
                          lr=0.4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_intertwined_systems_make_the_slow_clients_hold_the_affected_classes():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 24)
    X = rng.uniform(size=(len(y), 4))
    sy = intertwined_systems(X, y, seeds=[0, 1], methods=["fresh", "stale", "gi"], taus=[2, 5],
                             n_clients=5, classes_per_client=2, slow_classes=[3], test_size=0.25,
                             make_model=lambda: nn.Linear(4, 5))
    assert sy.methods == ["fresh", "stale", "stale", "gi", "gi"] * 2
    assert sy.taus == [0, 2, 5, 2, 5] * 2 and sy.seeds == [0] * 5 + [1] * 5
    assert sy.clients.n_clients == 50 and sy.theta0.shape == (10, 4 * 5 + 5)
    for i, seed in enumerate(sy.seeds):
        members = np.flatnonzero(sy.system_of == i)
        held = [set(sy.clients.y[c, :int(sy.clients.sizes[c])].tolist()) for c in members]
        slow = sy.slow[members]
        assert slow.tolist() == [3 in h for h in held]
        fast_classes = set().union(*[h for h, s in zip(held, slow, strict=True) if not s])
        assert 3 in sy.affected_classes[seed]
        assert not set(sy.affected_classes[seed]) & fast_classes
        torch.testing.assert_close(sy.theta0[i], sy.theta0[5 * (i // 5)])
    assert not torch.allclose(sy.theta0[0], sy.theta0[5])


def test_final_value_and_rounds_to_target_by_hand():
    acc = np.array([[0.1, 0.5, 0.7, 0.9], [0.2, 0.3, 0.4, 0.5]])
    np.testing.assert_allclose(final_value(acc, 2), [0.8, 0.45])
    # Evaluated at rounds 0, 5, 10, 15: row 0 reaches 0.6 at round 10, row 1 never (15 + 5).
    np.testing.assert_allclose(rounds_to_target(acc, [0, 5, 10, 15], 0.6), [10, 20])
    np.testing.assert_allclose(rounds_to_target(acc, [0, 5, 10, 15], [0.5, 0.25]), [5, 5])


def test_summaries_pair_systems_by_seed_and_target_the_fresh_run():
    class FakeSystems:
        methods = ["fresh", "gi", "stale", "fresh", "gi", "stale"]
        taus = [0, 4, 4, 0, 4, 4]
        seeds = [1, 1, 1, 0, 0, 0]

        def table(self):
            import pandas as pd

            return pd.DataFrame({"method": self.methods, "tau": self.taus, "seed": self.seeds})

    acc = np.array([[0.1, 0.8, 0.8], [0.1, 0.7, 0.9], [0.1, 0.3, 0.5],
                    [0.1, 0.6, 0.6], [0.1, 0.6, 0.7], [0.1, 0.2, 0.4]])
    h = StaleHistory(eval_round=np.array([0, 1, 2]), test_loss=acc, test_acc=acc,
                     group_acc={"affected": acc[:, ::-1]}, conversions={}, gi_seconds=0.0,
                     theta=torch.zeros(6, 1))
    frame = summarize(h, FakeSystems(), final_window=1, target_frac=0.75)
    np.testing.assert_allclose(per_seed(frame, "final_acc", "gi", 4), [0.7, 0.9])
    np.testing.assert_allclose(per_seed(frame, "final_acc", "fresh", 4), [0.6, 0.8])
    np.testing.assert_allclose(per_seed(frame, "affected_acc", "stale", 4), [0.1, 0.1])
    # Targets 0.45 (seed 0) and 0.6 (seed 1): gi reaches them at round 1; stale never in seed 1.
    np.testing.assert_allclose(per_seed(frame, "rounds_to_target", "gi", 4), [1, 1])
    np.testing.assert_allclose(per_seed(frame, "rounds_to_target", "stale", 4), [3, 3])
    assert best_baseline(frame, "final_acc", ["gi", "stale"], 4) == "gi"
    assert best_baseline(frame, "rounds_to_target", ["gi", "stale"], 4, larger=False) == "gi"
    assert rows_of(FakeSystems(), "gi", 4).tolist() == [4, 1]
    with pytest.raises(KeyError, match="no system"):
        per_seed(frame, "final_acc", "dc", 4)


# -- bad input -------------------------------------------------------------------------------------


def test_bad_inputs_get_clear_errors():
    model, theta, _, X, T = _toy(n=2)
    delta = simulate_update(model, theta, X, T, steps=1, lr=0.5)
    kw = dict(steps=1, lr=0.5, n_classes=C, input_shape=(D,))
    with pytest.raises(ValueError, match="NaN"):
        invert_update(model, theta, delta * float("nan"), **kw)
    with pytest.raises(ValueError, match="P = 27"):
        invert_update(model, theta[:-1], delta[:-1], **kw)
    with pytest.raises(ValueError, match="same clients"):
        convert_stale_update(model, torch.stack([theta] * 2), theta, delta, **kw)
    with pytest.raises(ValueError, match="warm start"):
        invert_update(model, theta, delta, init=Reconstruction(X[None], T[None], torch.zeros(1)),
                      **{**kw, "config": GIConfig(n_rec=5)})
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        simulate_update(model, theta, X, T, steps=0, lr=0.5)
    with pytest.raises(ValueError, match="same n"):
        simulate_update(model, theta, X, T[:1], steps=1, lr=0.5)
    with pytest.raises(ValueError, match="keep_frac"):
        GIConfig(keep_frac=0.0)
    with pytest.raises(ValueError, match="cost must be one of"):
        GIConfig(cost="l3")
    with pytest.raises(ValueError, match="staleness must be finite and >= 0"):
        staleness_weight([-1])
    with pytest.raises(ValueError, match="weighting must be one of"):
        staleness_weight([1], kind="linear")
    with pytest.raises(ValueError, match="lam must be"):
        first_order_compensation(delta, theta, theta, -1.0)
    with pytest.raises(ValueError, match="one shape"):
        first_order_compensation(delta, theta[:3], theta, 1.0)
    with pytest.raises(ValueError, match="unknown methods"):
        _run(["async"], [1])
    with pytest.raises(ValueError, match="one per system"):
        _run(["stale"], [1, 2])
    with pytest.raises(ValueError, match="ints >= 0"):
        _run(["stale"], [-1])
    with pytest.raises(ValueError, match="participation must be a bool array"):
        _run(["stale"], [1], participation=np.ones((3, 4), bool))
    with pytest.raises(ValueError, match="all carry zero weight"):
        model, clients, system_of, _, theta0, Xt, yt = _fl_toy(1)
        run_stale(model, clients, system_of=system_of, slow=np.ones(4, bool), methods=["drop"],
                  taus=[1], theta0=theta0[None], rounds=3, local_steps=1, lr=0.1, eval_X=Xt,
                  eval_y=yt, n_classes=C, input_shape=(D,))
    with pytest.raises(ValueError, match="window"):
        final_value(np.zeros((2, 3)), 4)
    with pytest.raises(ValueError, match="slow_classes must be classes present"):
        intertwined_systems(np.zeros((20, 2)), np.repeat([0, 1], 10), seeds=[0], methods=["gi"],
                            taus=[1], n_clients=2, classes_per_client=1, slow_classes=[7],
                            test_size=0.5, make_model=lambda: nn.Linear(2, 2))
