"""Flag Aggregator (repsuite.federated.flag): the IRLS against a direct parameter-space solve,
its objective never going up, hand-made robust cases, Bulyan, and bad input."""

import numpy as np
import pytest
import torch

from repsuite.federated.aggregators import bulyan as core_bulyan
from repsuite.federated.flag import (
    FlagRule,
    bulyan,
    flag_aggregate,
    flag_median,
    flag_objective,
    uniform_noise,
)
from repsuite.federated.flag_experiment import (
    RunSpec,
    RunsResult,
    aggregate_batch,
    apply_attack,
    best_rates,
    coordinate_median_batch,
    make_specs,
    make_workers,
    multi_krum_batch,
    noisy_copy,
    per_seed,
    pool_images,
    train_runs,
    trimmed_mean_batch,
)


def unit(X):
    return X / X.norm(dim=-1, keepdim=True)


def projector(Y):
    return Y @ Y.T


def reference_irls(X, m, lam, n_iter, eps=1e-7):
    """The IRLS written out in the parameter space: weighted columns, then an SVD (uniform
    start), with the pairwise columns of every ordered pair of distinct directions."""
    p = X.shape[0]
    Xn = unit(X)
    Y = None
    for _ in range(n_iter):
        cols = []
        for i in range(p):
            s = 1.0 if Y is None else float((1 - (Y.T @ Xn[i]).pow(2).sum()).clamp_min(0))
            cols.append(Xn[i] * (s + eps) ** -0.25)
        for i in range(p):
            for j in range(p):
                if i == j or lam == 0:
                    continue
                u = unit(Xn[i] - Xn[j])
                s = 1.0 if Y is None else float((1 - (Y.T @ u).pow(2).sum()).clamp_min(0))
                cols.append(u * np.sqrt(lam / (p * (p - 1))) * (s + eps) ** -0.25)
        Y = torch.linalg.svd(torch.stack(cols, 1), full_matrices=False)[0][:, :m]
    return Y


def test_one_flag_mean_step_is_the_top_singular_subspace():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(9, 50, generator=g, dtype=torch.float64) * torch.rand(9, 1, generator=g)
    for m in (1, 3):
        sol = flag_median(X, m=m, n_iter=1, init="uniform")
        U = np.linalg.svd(unit(X).numpy().T, full_matrices=False)[0][:, :m]
        assert np.allclose(projector(sol.basis()).numpy(), U @ U.T, atol=1e-10)


@pytest.mark.parametrize("m,lam", [(1, 0.0), (2, 0.0), (1, 4.0), (3, 16.0)])
def test_gram_route_equals_parameter_space_irls(m, lam):
    g = torch.Generator().manual_seed(m)
    X = torch.randn(7, 40, generator=g, dtype=torch.float64)
    for n_iter in (1, 3):
        sol = flag_median(X, m=m, lam=lam, n_iter=n_iter, init="uniform", tol=0.0)
        Y_ref = reference_irls(X, m, lam, n_iter)
        Y = sol.basis()
        assert torch.allclose(projector(Y), projector(Y_ref), atol=1e-9)
        assert torch.allclose(Y.T @ Y, torch.eye(m, dtype=Y.dtype), atol=1e-10)
        expected = projector(Y_ref) @ unit(X).sum(0) / m
        assert torch.allclose(sol.aggregate, expected, atol=1e-9)
        # The reported objective is the one computed directly in the parameter space.
        assert float(sol.objective[-1]) == pytest.approx(
            float(flag_objective(X, Y_ref, lam=lam)), rel=1e-10)


def test_irls_never_increases_the_objective_on_random_inputs():
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        p = int(torch.randint(3, 16, (1,), generator=g))
        m = int(torch.randint(1, min(p, 4) + 1, (1,), generator=g))
        lam = [0.0, 1.0, 8.0, 64.0][seed % 4]
        X = torch.randn(p, 30, generator=g, dtype=torch.float64)
        X[: p // 3] += 3 * torch.randn(1, 30, generator=g, dtype=torch.float64)  # a cluster
        sol = flag_median(X, m=m, lam=lam, n_iter=30, tol=0.0, generator=g)
        obj = sol.objective[~torch.isnan(sol.objective)]
        assert len(obj) >= 2
        rise = (obj[1:] - obj[:-1]).max()
        assert rise <= 1e-9 * obj.abs().max(), (seed, obj)
        assert sol.monotone()
        assert float(obj[-1]) == pytest.approx(
            float(flag_objective(X, sol.basis(), lam=lam)), rel=1e-9, abs=1e-8)


def test_identical_gradients_give_that_gradient():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(200, generator=g, dtype=torch.float64)
    scales = torch.tensor([0.1, 1.0, 3.0, 7.0, 0.5, 2.0], dtype=torch.float64)
    X = scales[:, None] * v
    for m in (1, 2):
        agg = flag_aggregate(X, m=m, lam=1.0, generator=g)
        cos = torch.dot(agg, v) / (agg.norm() * v.norm())
        assert cos > 1 - 1e-12
        # (1/m) sum_i Y Y^T x_i with every x_i the same unit vector: length p / m.
        assert float(agg.norm()) == pytest.approx(len(scales) / m, rel=1e-9)


def test_outliers_are_down_weighted():
    g = torch.Generator().manual_seed(2)
    P = 60
    e1, e2 = torch.zeros(P, dtype=torch.float64), torch.zeros(P, dtype=torch.float64)
    e1[0], e2[1] = 1.0, 1.0
    honest = e1 + 0.1 * torch.randn(12, P, generator=g, dtype=torch.float64)
    byz = 100 * e2 + 0.01 * torch.randn(3, P, generator=g, dtype=torch.float64)
    X = torch.cat([honest, byz])
    sol = flag_median(X, m=1, n_iter=20, generator=g, f=3)
    cos_fa = torch.dot(sol.aggregate, e1) / sol.aggregate.norm()
    mean = X.mean(0)
    assert cos_fa > 0.95
    assert torch.dot(mean, e1) / mean.norm() < 0.5
    assert sol.weights[12:].max() < sol.weights[:12].min()
    assert sol.ratios[12:].max() < 0.1 < 0.5 < sol.ratios[:12].min()


def test_aggregate_ignores_gradient_norms_and_subspace_sign():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(8, 30, generator=g, dtype=torch.float64) + 2.0
    a = flag_median(X, n_iter=100, tol=1e-14, generator=torch.Generator().manual_seed(0))
    b = flag_median(X * torch.rand(8, 1, generator=g, dtype=torch.float64) * 50, n_iter=100,
                    tol=1e-14, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(a.aggregate, b.aggregate, atol=1e-6)


def test_batch_equals_one_problem_at_a_time():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(5, 6, 25, generator=g, dtype=torch.float64)
    batch = flag_median(X, m=2, lam=2.0, n_iter=4, init="uniform")
    for b in range(5):
        one = flag_median(X[b], m=2, lam=2.0, n_iter=4, init="uniform")
        assert torch.allclose(batch.aggregate[b], one.aggregate, atol=1e-10)
        assert torch.allclose(batch.ratios[b], one.ratios, atol=1e-10)


def test_float32_in_float32_out():
    X = torch.randn(6, 100, generator=torch.Generator().manual_seed(5))
    agg = flag_aggregate(X, generator=torch.Generator().manual_seed(0))
    assert agg.dtype == torch.float32 and agg.shape == (100,)
    assert torch.isfinite(agg).all()


def test_zero_updates_are_left_out_never_nan():
    g = torch.Generator().manual_seed(6)
    X = torch.randn(6, 20, generator=g, dtype=torch.float64)
    with_zero = torch.cat([X, torch.zeros(3, 20, dtype=torch.float64)])
    for lam in (0.0, 5.0):
        a = flag_median(X, lam=lam, n_iter=5, init="uniform")
        b = flag_median(with_zero, lam=lam, n_iter=5, init="uniform")
        assert torch.allclose(a.aggregate, b.aggregate, atol=1e-10)
        assert b.valid.tolist() == [True] * 6 + [False] * 3
        assert (b.ratios[6:] == 0).all() and (b.weights[6:] == 0).all()
    zero = flag_median(torch.zeros(5, 20), generator=g)
    assert torch.equal(zero.aggregate, torch.zeros(20))
    # A zero update among identical ones, and a subspace larger than the data's rank.
    rank_one = torch.cat([torch.ones(4, 20), torch.zeros(1, 20)])
    out = flag_aggregate(rank_one, m=3, generator=g)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, torch.full((20,), 4 / 3 / 20**0.5), atol=1e-6)


def test_bad_input_gets_clear_errors():
    X = torch.randn(15, 10)
    with pytest.raises(ValueError, match=r"majority of honest workers \(2f < p\): f=8 .* p=15"):
        flag_aggregate(X, f=8)
    bad = X.clone()
    bad[4, 2] = float("nan")
    with pytest.raises(ValueError, match=r"workers \[4\] contain NaN"):
        flag_aggregate(bad)
    bad[4, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        flag_aggregate(bad)
    with pytest.raises(ValueError, match="m=16 exceeds the number of workers p=15"):
        flag_aggregate(X, m=16)
    with pytest.raises(ValueError, match="positive int"):
        flag_aggregate(X, m=0)
    with pytest.raises(ValueError, match="lambda must be finite and >= 0"):
        flag_aggregate(X, lam=-1.0)
    with pytest.raises(ValueError, match="n_iter must be a positive int"):
        flag_aggregate(X, n_iter=0)
    with pytest.raises(ValueError, match="init must be one of"):
        flag_aggregate(X, init="data")
    with pytest.raises(ValueError, match=r"\(workers, parameters\)"):
        flag_aggregate(torch.randn(10))
    with pytest.raises(ValueError, match="at least one worker"):
        flag_aggregate(torch.zeros(0, 5))


def reference_bulyan(X, f):
    n = len(X)
    left = list(range(n))
    picked = []
    for _ in range(n - 2 * f):
        k = min(max(len(left) - f - 2, 1), len(left) - 1)
        scores = []
        for i in left:
            d = sorted(float(((X[i] - X[j]) ** 2).sum()) for j in left if j != i)
            scores.append(sum(d[:k]))
        best = left[int(np.argmin(scores))]
        picked.append(best)
        left.remove(best)
    S = X[picked].numpy()
    beta = len(picked) - 2 * f
    med = np.median(S, axis=0)
    order = np.argsort(np.abs(S - med), axis=0, kind="stable")[:beta]
    return np.take_along_axis(S, order, axis=0).mean(0)


def test_bulyan_against_a_plain_loop_and_hand_cases():
    g = torch.Generator().manual_seed(8)
    for f in (1, 2, 3):
        n = 4 * f + 3 + f
        X = torch.randn(n, 12, generator=g, dtype=torch.float64)
        assert np.allclose(bulyan(X, f).numpy(), reference_bulyan(X, f), atol=1e-12)
    X = torch.randn(7, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(bulyan(X, 0), X.mean(0))
    for f in (0, 1, 3):
        X = torch.randn(15, 20, generator=g, dtype=torch.float64)
        assert torch.allclose(bulyan(X, f), core_bulyan(X, f), atol=1e-12)
    honest = 1.0 + 0.01 * torch.randn(12, 4, generator=g, dtype=torch.float64)
    attacked = torch.cat([honest, torch.full((3, 4), 1e6, dtype=torch.float64)])
    out = bulyan(attacked, 3)
    assert (out - 1).abs().max() < 0.05
    batch = torch.stack([attacked, attacked.flip(0)])
    assert torch.allclose(bulyan(batch, 3), torch.stack([out, out]), atol=1e-12)


def test_bulyan_bad_input():
    with pytest.raises(ValueError, match=r"n >= 4f \+ 3 workers: n=15 workers with f=4"):
        bulyan(torch.randn(15, 3), 4)
    X = torch.randn(7, 3)
    X[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        bulyan(X, 1)
    with pytest.raises(ValueError, match="int >= 0"):
        bulyan(torch.randn(7, 3), -1)


def test_flag_rule_follows_the_server_signature_and_is_seeded():
    X = torch.randn(10, 30, generator=torch.Generator().manual_seed(9))
    r1, r2 = FlagRule(seed=3, n_iter=1), FlagRule(seed=3, n_iter=1)
    a = r1(X, torch.ones(10), 0, {})
    b = r2(X, torch.ones(10), 0, {})
    assert torch.equal(a, b)
    assert len(r1.history) == 1 and r1.history[0]["monotone"]
    assert r1.history[0]["ratios"].shape == (10,)


def test_uniform_noise_attack():
    X = torch.zeros(5, 1000)
    out = uniform_noise(X, [1, 3], generator=torch.Generator().manual_seed(0))
    assert (out[[0, 2, 4]] == 0).all()
    assert (out[[1, 3]] >= 0).all() and (out[[1, 3]] < 1).all()
    assert float(out[1].mean()) == pytest.approx(0.5, abs=0.05)
    assert (X == 0).all()
    with pytest.raises(ValueError, match="outside 0..4"):
        uniform_noise(X, [5], generator=torch.Generator())


def test_batched_baselines_equal_the_core_rules():
    from repsuite.federated import aggregators

    g = torch.Generator().manual_seed(10)
    for p in (15, 16):
        X = torch.randn(4, p, 30, generator=g, dtype=torch.float64)
        X[:, :3] *= 50  # a few outlying rows
        med = coordinate_median_batch(X)
        tm = trimmed_mean_batch(X, 3)
        mk = multi_krum_batch(X, 3)
        for b in range(4):
            assert torch.allclose(med[b], aggregators.coordinate_median(X[b]), atol=1e-12)
            assert torch.allclose(tm[b], aggregators.trimmed_mean(X[b], n_trim=3), atol=1e-12)
            assert torch.allclose(mk[b], aggregators.multi_krum(X[b], 3), atol=1e-10)
    with pytest.raises(ValueError, match=r"needs 2 \* 8 < 15"):
        trimmed_mean_batch(torch.randn(1, 15, 3), 8)
    with pytest.raises(ValueError, match="n > 2f \\+ 2; got n=15, f=7"):
        multi_krum_batch(torch.randn(1, 15, 3), 7)


# ---- the parameter-server experiment helpers ----

def tiny_workers(p=5, seeds=(0, 1), byzantine=(0,)):
    from torch import nn

    g = np.random.default_rng(0)
    X = g.random((120, 16)).astype(np.float32)
    y = np.repeat(np.arange(3), 40)

    def make_model(s):
        torch.manual_seed(s)
        return nn.Sequential(nn.Linear(16, 3))

    workers = make_workers(X, y, seeds=list(seeds), p=p, byzantine=list(byzantine),
                           aug_sigma=1.0, test_size=0.25, make_model=make_model, device="cpu")
    return workers, make_model(0)


def test_train_runs_mean_step_is_gradient_descent_on_the_workers_batches():
    from torch.func import functional_call

    workers, model = tiny_workers()
    specs = make_specs(workers, rules=["mean"], scenarios=["none"], lrs={"mean": 0.5})
    res = train_runs(model, workers.clients, specs[:1], group_init=workers.inits,
                     eval_sets=workers.tests, byzantine=[0], f=1, steps=1, batch_size=1000,
                     momentum=0.0, eval_every=1)
    # Full-batch gradients of the 5 workers of group 0, averaged, one step of size 0.5.
    params = {n: v.clone().requires_grad_(True) for n, v in workers.inits[0].items()}
    grads = []
    for c in workers.clean[0]:
        Xc, yc = workers.clients.data(c)
        loss = torch.nn.functional.cross_entropy(functional_call(model, params, (Xc,)), yc)
        grads.append(torch.autograd.grad(loss, list(params.values())))
    stepped = {n: v.detach() - 0.5 * torch.stack([g[i] for g in grads]).mean(0)
               for i, (n, v) in enumerate(params.items())}
    Xt, yt = workers.tests[0]
    expected = (functional_call(model, stepped, (Xt,)).argmax(1) == yt).double().mean()
    assert res.acc[0, -1] == pytest.approx(float(expected))
    assert res.eval_steps == [0, 1]


def test_train_runs_is_seeded_and_survives_a_diverging_run():
    workers, model = tiny_workers()
    specs = make_specs(workers, rules=["mean", "flag", "bulyan", "multi_krum"],
                       scenarios=["none", "sign_flip", "augmented"],
                       lrs={"mean": 0.3, "flag": 0.1, "bulyan": 0.3, "multi_krum": 1e39})
    kw = dict(group_init=workers.inits, eval_sets=workers.tests, byzantine=[0], f=1, steps=4,
              batch_size=8, eval_every=2, seed=3)
    with pytest.raises(ValueError, match="Bulyan needs n >= 4f \\+ 3"):
        train_runs(model, workers.clients, specs, **kw)
    specs = [s for s in specs if s.rule != "bulyan"]
    a = train_runs(model, workers.clients, specs, **kw)
    b = train_runs(model, workers.clients, specs, **kw)
    assert np.array_equal(a.acc, b.acc)
    frame = a.frame()
    assert frame[frame.rule == "multi_krum"].diverged.all()
    assert not frame[frame.rule != "multi_krum"].diverged.any()
    assert np.isfinite(a.acc).all() and a.monotone.all()
    fa = frame[(frame.rule == "flag") & (frame.scenario == "sign_flip")].run.to_numpy()
    assert np.isfinite(a.ratio_byz[fa, 1:]).all()
    assert per_seed(a, "none", "flag", 0.1).shape == (2,)
    with pytest.raises(KeyError, match="no runs"):
        per_seed(a, "alie", "flag", 0.1)


def test_augmented_workers_train_on_noisy_copies():
    workers, _ = tiny_workers(byzantine=(0, 2))
    for g in range(2):
        clean, aug = workers.clean[g], workers.augmented[g]
        assert [a == c for a, c in zip(aug, clean, strict=True)] == [False, True, False, True,
                                                                        True]
        Xc, yc = workers.clients.data(clean[2])
        Xa, ya = workers.clients.data(aug[2])
        assert torch.equal(yc, ya) and not torch.allclose(Xc, Xa)
        assert float((Xa - Xc).std()) == pytest.approx(1.0, rel=0.2)


def test_experiment_helpers_reject_bad_input():
    workers, model = tiny_workers()
    with pytest.raises(ValueError, match="unknown scenario 'ipm'"):
        make_specs(workers, rules=["mean"], scenarios=["ipm"], lrs={"mean": 0.1})
    with pytest.raises(ValueError, match="unknown rule 'krum'"):
        make_specs(workers, rules=["krum"], scenarios=["none"], lrs={"krum": 0.1})
    with pytest.raises(ValueError, match="unknown attack"):
        apply_attack(torch.zeros(3, 2), "ipm", [0], torch.Generator())
    with pytest.raises(ValueError, match="unknown rule"):
        aggregate_batch("krum", torch.zeros(1, 3, 2), f=0)
    with pytest.raises(ValueError, match="no runs"):
        train_runs(model, workers.clients, [], group_init=workers.inits,
                   eval_sets=workers.tests, byzantine=[0], f=1, steps=1, batch_size=4)
    with pytest.raises(ValueError, match="rows of 28x28 images"):
        pool_images(np.zeros((2, 10)))
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        noisy_copy(torch.zeros(2), -1.0, torch.Generator())
    with pytest.raises(ValueError, match=r"Byzantine rows \[7\] must lie in 0..4"):
        tiny_workers(byzantine=(7,))


def test_pool_images_averages_blocks():
    X = np.arange(2 * 784, dtype=np.float32).reshape(2, 784)
    out = pool_images(X, factor=2)
    assert out.shape == (2, 196)
    assert out[0, 0] == pytest.approx(np.mean([0, 1, 28, 29]))
    assert np.array_equal(pool_images(X, factor=1), X)


def test_best_rates_takes_the_best_mean_accuracy():
    specs = [RunSpec(group=g, clients=(0,), rule=r, lr=lr) for r in ("mean", "flag")
             for lr in (0.1, 1.0) for g in (0, 1)]
    acc = np.array([[0.5], [0.6], [0.7], [0.7], [0.9], [0.9], [0.2], [0.1]])
    res = RunsResult(specs=specs, eval_steps=[1], acc=acc, loss=acc, ratio_byz=acc,
                     ratio_honest=acc, monotone=np.ones(8, bool), diverged=np.zeros(8, bool),
                     seconds=0.0)
    assert best_rates(res) == {"flag": 0.1, "mean": 1.0}


def test_flag_rule_runs_in_the_core_server_loop():
    from repsuite.federated import run

    workers, model = tiny_workers()
    rule = FlagRule(n_iter=3, seed=0)
    part = np.zeros((3, workers.clients.n_clients), dtype=bool)
    part[:, list(workers.clean[0])] = True
    hist = run(model, workers.clients, rounds=3, participation=part, local_steps=1, lr=1.0,
               batch_size=8, seed=0, aggregate=rule, server_lr=0.1,
               eval_data=workers.tests[0])
    assert len(rule.history) == 3 and all(h["monotone"] for h in rule.history)
    assert len(hist.test_acc) == 4 and np.isfinite(hist.test_loss).all()
