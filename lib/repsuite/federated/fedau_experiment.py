"""FedAU experiments: federations over seeds, participation patterns, the runs of each stage and
their results, as the notebook uses them.
"""

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from repsuite.federated.clients import (
    Clients,
    local_sgd,
    params_of,
    unflatten,
)
from repsuite.federated.fedau import (
    OnlineWeights,
    _as_participation,
    check_rates,
    cyclic_rates,
    expected_weight,
    label_correlated_rates,
    make_rule,
    markov,
)
from repsuite.federated.fedau_runs import (
    Lockstep,
    Run,
    correct,
    objective,
    optimum,
    softmax_regression_sgd,
    train_lockstep,
)

# -------------------------------------------------------------------------------------------------
# Building the experiment: federations over seeds, participation patterns, runs, results


def downsample(X: np.ndarray, side: int, pool: int) -> np.ndarray:
    """Square images stored as rows (n, side*side) averaged over pool x pool blocks."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != side * side:
        raise ValueError(f"expected rows of {side}x{side} images, got shape {X.shape}")
    if pool < 1 or side % pool:
        raise ValueError(f"pool must divide the image side {side}, got {pool}")
    s = side // pool
    return X.reshape(-1, s, pool, s, pool).mean((2, 4)).reshape(len(X), s * s)


def label_skew_partition(y, n_clients: int, alpha: float, seed: int, *, min_size: int = 1,
                         max_tries: int = 100) -> list[np.ndarray]:
    """The paper's non-IID split: client n draws a label distribution q_n ~ Dirichlet(alpha) and
    each class's samples are cut among the clients in proportion to their q_nc.

    Unlike a split that draws, per class, shares over the clients, every client ends up with
    about len(y) / n_clients samples, mostly of one or two classes. A draw that leaves a client
    with fewer than `min_size` samples is redrawn, at most `max_tries` times.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be a 1-D array of labels, got shape {y.shape}")
    if isinstance(n_clients, bool) or not isinstance(n_clients, int | np.integer) \
            or not 1 <= n_clients <= len(y):
        raise ValueError(f"n_clients must be an int in [1, {len(y)}], got {n_clients!r}")
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    smallest = 0
    for _ in range(max_tries):
        q = rng.dirichlet(alpha * np.ones(len(classes)), size=n_clients)
        parts = [[] for _ in range(n_clients)]
        for j, c in enumerate(classes):
            members = rng.permutation(np.flatnonzero(y == c))
            ends = np.round(np.cumsum(q[:, j]) / q[:, j].sum() * len(members)).astype(int)
            for n, chunk in enumerate(np.split(members, ends[:-1])):
                parts[n].append(chunk)
        parts = [np.sort(np.concatenate(p)) for p in parts]
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            return parts
    raise ValueError(f"label-skew split with alpha={alpha} left a client with {smallest} samples "
                     f"(min_size={min_size}) in each of {max_tries} draws: use fewer clients or a "
                     "larger alpha")


@dataclass
class Federation:
    """One seed's federation inside the shared `Clients`: rows offset..offset+n_clients-1."""

    seed: int
    offset: int
    n_clients: int
    rates: np.ndarray  # true participation probabilities, unknown to the server
    label_counts: np.ndarray  # (n_clients, classes)
    X_test: torch.Tensor
    y_test: torch.Tensor
    rare_classes: np.ndarray  # the classes whose samples sit at the least-participating clients


def build_federations(X: np.ndarray, y: np.ndarray, seeds: Sequence[int], *, n_clients: int,
                      data_alpha: float, participation_alpha: float, mean_rate: float,
                      min_rate: float, test_size: float, scale: float, n_rare_classes: int,
                      device, min_size: int = 1) -> tuple[Clients, list[Federation]]:
    """A stratified train/test split, the paper's label-skew partition and label-correlated
    participation rates for every seed, all clients stacked in one `Clients`."""
    from repsuite.training import split_tensors

    if not seeds:
        raise ValueError("no seeds given")
    n_classes = int(np.max(y)) + 1
    if not 1 <= n_rare_classes < n_classes:
        raise ValueError(f"n_rare_classes must be in [1, {n_classes - 1}], got {n_rare_classes}")
    X_parts, y_parts, parts, federations = [], [], [], []
    offset_rows = 0
    for i, seed in enumerate(seeds):
        split_seed, part_seed, rate_seed = (int(v) for v in
                                            np.random.SeedSequence(seed).generate_state(3))
        Xtr, Xte, ytr, yte = split_tensors(X, y, test_size=test_size, seed=split_seed % 2**31,
                                           device="cpu", scale=scale)
        idx = label_skew_partition(ytr.numpy(), n_clients, data_alpha, seed=part_seed,
                                   min_size=min_size)
        counts = np.stack([np.bincount(ytr.numpy()[p], minlength=n_classes) for p in idx])
        rates = label_correlated_rates(counts, mean_rate=mean_rate, min_rate=min_rate,
                                       alpha=participation_alpha, seed=rate_seed)

        # A class is "rare" when its samples sit, on average, at rarely participating clients.
        class_rate = (counts * rates[:, None]).sum(0) / np.maximum(counts.sum(0), 1)
        rare = np.sort(np.argsort(class_rate)[:n_rare_classes])
        federations.append(Federation(seed, i * n_clients, n_clients, rates, counts,
                                      Xte.to(device), yte.to(device), rare))
        X_parts.append(Xtr)
        y_parts.append(ytr)
        parts += [p + offset_rows for p in idx]
        offset_rows += len(ytr)
    clients = Clients.from_partition(torch.cat(X_parts), torch.cat(y_parts), parts, device)
    return clients, federations


PATTERNS = ("bernoulli", "markov", "cyclic")


def participation_pattern(kind: str, rates, n_rounds: int, seed: int, *,
                          max_to_active: float = 0.05, cycle: int = 100) -> np.ndarray:
    """(n_rounds, N) participation of one of the paper's patterns: bernoulli, markov, cyclic."""
    from repsuite.federated import participation

    if kind == "bernoulli":
        return participation.bernoulli(check_rates(rates), n_rounds, seed)
    if kind == "markov":
        return markov(rates, n_rounds, seed, max_to_active)
    if kind == "cyclic":
        return cyclic_rates(rates, n_rounds, seed, cycle)
    raise ValueError(f"unknown participation pattern {kind!r}; choose one of {PATTERNS}")


def long_run_rates(kind: str, rates, *, cycle: int = 100) -> np.ndarray:
    """The long-run participation frequency of each client under a pattern: p itself, except for
    cyclic participation, whose active block is rounded to whole rounds."""
    p = check_rates(rates)
    if kind in ("bernoulli", "markov"):
        return p
    if kind == "cyclic":
        active = np.maximum(1, np.round(cycle * p))
        return active / (active + np.maximum(1, cycle - active))
    raise ValueError(f"unknown participation pattern {kind!r}; choose one of {PATTERNS}")


def weight_errors(participation, long_run, *, K: int | None = None, rare_fraction: float = 0.25
                  ) -> dict:
    """How far FedAU's final weights are from their targets, for the rarest clients.

    Returns `bias`: the mean over the rarest `rare_fraction` of clients of omega_n * p_n - 1 (the
    signed relative error against the optimal weight 1/p_n), and `spread`: their mean squared
    relative error around the estimate's own Bernoulli limit E[min(G, K)] (its variance part).
    """
    q = _as_participation(participation)
    p = check_rates(long_run, q.shape[1])
    if not 0 < rare_fraction <= 1:
        raise ValueError(f"rare_fraction must be in (0, 1], got {rare_fraction}")
    est = OnlineWeights(q.shape[1], K)
    for row in q:
        est.update(row)
    omega = est.weights()
    rare = np.argsort(p)[:max(1, int(round(rare_fraction * p.size)))]
    limit = expected_weight(p[rare], K)
    return {"bias": float(np.mean(omega[rare] * p[rare] - 1)),
            "spread": float(np.mean((omega[rare] / limit - 1) ** 2)),
            "omega": omega, "rare": rare}


def seed_streams(seed: int, n: int) -> list[int]:
    """`n` independent integer seeds derived from one (for init, participation, batches...)."""
    return [int(v) % 2**31 for v in np.random.SeedSequence(seed).generate_state(n)]


def evaluate_runs(model: nn.Module, out: Lockstep, runs: Sequence[Run], clients: Clients,
                  federations: Sequence[Federation], *, weight_decay: float, late_from: int):
    """Results of a lockstep call as two tables (pandas): `curves`, one row per run and snapshot
    (original objective, test accuracy, accuracy on the rare classes), and `table`, one row per
    run with their means over the snapshots at round >= `late_from` and the objective of the
    iterate average. Diverged runs get NaN (a claim refuses NaN, so none is used silently)."""
    import pandas as pd

    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError("run names must be unique to label the results")
    by_offset = {f.offset: f for f in federations}
    rounds = sorted(out.snapshots)
    if not rounds:
        raise ValueError("the lockstep call kept no snapshots (snapshot_every=0)")
    curves, table = [], []
    for offset in sorted({r.offset for r in runs}):
        fed = by_offset[offset]
        rows = [i for i, r in enumerate(runs) if r.offset == offset and not out.diverged[i]]
        if not rows:
            continue
        rare = torch.as_tensor(np.isin(fed.y_test.cpu().numpy(), fed.rare_classes),
                               device=fed.y_test.device)
        for t in rounds:
            flat = out.snapshots[t][rows]
            f = objective(model, flat, clients, offset, fed.n_clients,
                          weight_decay=weight_decay).cpu().numpy()
            hit = correct(model, flat, fed.X_test, fed.y_test)
            acc, rare_acc = hit.mean(1).cpu().numpy(), hit[:, rare].mean(1).cpu().numpy()
            for j, i in enumerate(rows):
                curves.append({**runs[i].meta, "run": runs[i].name, "round": t,
                               "objective": f[j], "test_acc": acc[j], "rare_acc": rare_acc[j]})
        f_avg = objective(model, out.averaged[rows], clients, offset, fed.n_clients,
                          weight_decay=weight_decay).cpu().numpy()
        for j, i in enumerate(rows):
            table.append({"run": runs[i].name, "objective_avg_iterate": f_avg[j]})
    columns = ["objective", "test_acc", "rare_acc"]
    curves = pd.DataFrame(curves, columns=["run", "round", *columns, *runs[0].meta])
    late = curves[curves["round"] >= late_from].groupby("run")[columns].mean()
    table = pd.DataFrame(table, columns=["run", "objective_avg_iterate"]).set_index("run")
    # Diverged runs keep a row (NaN results) with their labels.
    meta = pd.DataFrame([r.meta for r in runs], index=pd.Index(names, name="run"))
    meta["diverged"] = out.diverged
    return curves, meta.join(table.join(late)).reset_index()


def reweighted_gaps(model: nn.Module, out: Lockstep, runs: Sequence[Run], clients: Clients,
                    federations: Sequence[Federation], *, weight_decay: float):
    """For each run's iterate average: its gap to the optimum of the original objective and its
    gap to the optimum of the participation-weighted objective sum_n p_n F_n / sum p (the one
    that averaging only the participants converges to). A table (pandas), one row per run."""
    import pandas as pd

    rows = []
    for fed in federations:
        mine = [i for i, r in enumerate(runs) if r.offset == fed.offset and not out.diverged[i]]
        if not mine:
            continue
        averaged = out.averaged[mine]
        gaps, x_star = {}, None
        for label, a in (("gap", None), ("gap_weighted", fed.rates)):
            x_star = optimum(model, clients, fed.offset, fed.n_clients, init=x_star,
                             weight_decay=weight_decay, client_weights=a).to(averaged)
            both = objective(model, torch.cat([averaged, x_star[None]]), clients, fed.offset,
                             fed.n_clients, weight_decay=weight_decay, client_weights=a)
            gaps[label] = (both[:-1] - both[-1]).cpu().numpy()
        for j, i in enumerate(mine):
            rows.append({**runs[i].meta, "run": runs[i].name,
                         **{k: float(v[j]) for k, v in gaps.items()}})
    return pd.DataFrame(rows)


def weight_study(federations: Sequence[Federation], patterns: Sequence[str], n_rounds: int, *,
                 cutoffs: Sequence, rare_fraction: float, max_to_active: float, cycle: int,
                 seed_offset: int = 0):
    """FedAU's weight estimate after `n_rounds` rounds of each participation pattern, for every
    federation and cutoff (None: no cutoff). Returns (table, final weights): the table (pandas)
    has one row per (pattern, seed, K) with the rarest clients' signed bias and spread (see
    `weight_errors`); the weights map (pattern, seed, K) to (omega, long-run rates)."""
    import pandas as pd

    rows, finals = [], {}
    for kind in patterns:
        for fed in federations:
            q = participation_pattern(kind, fed.rates, n_rounds,
                                      seed_streams(fed.seed + seed_offset, 3)[2],
                                      max_to_active=max_to_active, cycle=cycle)
            target = long_run_rates(kind, fed.rates, cycle=cycle)
            for K in cutoffs:
                e = weight_errors(q, target, K=K, rare_fraction=rare_fraction)
                rows.append({"pattern": kind, "seed": fed.seed, "K": "inf" if K is None else K,
                             "bias": e["bias"], "spread": e["spread"],
                             "rarest_rate": float(target[e["rare"]].max())})
                finals[(kind, fed.seed, K)] = (e["omega"], target)
    return pd.DataFrame(rows), finals


def make_model(kind: str, n_features: int, n_classes: int, *, hidden: int = 32,
               seed: int = 0) -> nn.Module:
    """`linear`: softmax regression (convex); `mlp`: one hidden ReLU layer. The init is seeded
    by `seed` without touching the global random state."""
    if kind not in ("linear", "mlp"):
        raise ValueError(f"unknown model {kind!r}; choose linear or mlp")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "linear":
            return nn.Linear(n_features, n_classes)
        return nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(),
                             nn.Linear(hidden, n_classes))


def make_runs(federations: Sequence[Federation], participation: dict, starts: dict,
              configs: Sequence[tuple[str, float]], *, K: int | None, tag: dict) -> list[Run]:
    """One run per federation and (method, global rate) in `configs`. Methods are those of
    `METHODS` plus `fedau_K`, FedAU with the finite cutoff `K` (plain `fedau` has none).
    `participation` and `starts` map a federation's seed to its record and start vector. A run's
    minibatch stream is seeded from its name (see `train_lockstep`)."""
    runs = []
    for fed in federations:
        for method, global_lr in configs:
            base, cutoff = ("fedau", K) if method == "fedau_K" else (method, None)
            rule = make_rule(base, fed.n_clients, rates=fed.rates, K=cutoff)
            label = "|".join(str(v) for v in tag.values())
            name = f"{label}|{method}|{global_lr:g}|{fed.seed}"
            runs.append(Run(name, rule, participation[fed.seed], fed.offset, starts[fed.seed],
                            global_lr, meta={**tag, "method": method, "global_lr": global_lr,
                                             "seed": fed.seed},
                            batch_seed=zlib.crc32(name.encode())))
    return runs


def best_global_rates(table, *, metric: str = "objective") -> dict:
    """method -> the global rate with the lowest `metric` among its non-diverged runs; a method
    whose runs all diverged is an error."""
    ok = table[~table["diverged"].astype(bool)].dropna(subset=[metric])
    missing = sorted(set(table["method"]) - set(ok["method"]))
    if missing:
        raise ValueError(f"every global rate diverged for {missing}: widen the grid downwards")
    best = ok.loc[ok.groupby("method")[metric].idxmin()]
    return dict(zip(best["method"], best["global_lr"].astype(float), strict=True))


@dataclass
class Stage:
    """One lockstep call and its results: the model, the runs, what training returned, and the
    `curves` and `table` of `evaluate_runs`."""

    model: nn.Module
    runs: list
    out: Lockstep
    curves: object
    table: object


def run_stage(model_kind: str, federations: Sequence[Federation], clients: Clients, *,
              patterns: Sequence[str], configs: dict, participation: dict, starts: dict,
              K: int | None, n_features: int, n_classes: int, hidden: int, rounds: int,
              local_steps: int, lr: float, batch_size: int, seed: int, weight_decay: float,
              eval_every: int, late_from: int, progress: bool = True) -> Stage:
    """Train every (pattern, method, global rate) of `configs[pattern]` on every federation in
    one lockstep call and evaluate the runs. `participation` maps (pattern, seed) to a record,
    `starts` maps (model_kind, seed) to a start vector."""
    model = make_model(model_kind, n_features, n_classes, hidden=hidden).to(clients.device)
    runs = []
    for kind in patterns:
        runs += make_runs(federations, {f.seed: participation[(kind, f.seed)] for f in federations},
                          {f.seed: starts[(model_kind, f.seed)] for f in federations},
                          configs[kind], K=K, tag={"model": model_kind, "pattern": kind})
    out = train_lockstep(model, clients, runs, rounds=rounds, local_steps=local_steps, lr=lr,
                         batch_size=batch_size, seed=seed, weight_decay=weight_decay,
                         snapshot_every=eval_every, progress=progress)
    curves, table = evaluate_runs(model, out, runs, clients, federations,
                                  weight_decay=weight_decay, late_from=late_from)
    return Stage(model, runs, out, curves, table)


def per_seed(frame, method: str, column: str) -> np.ndarray:
    """`column` of `method`'s runs in seed order, or a clear error if one of them diverged."""
    rows = frame[frame["method"] == method].sort_values("seed")
    if rows.empty:
        raise ValueError(f"no runs of {method!r} in this table")
    bad = rows["diverged"].astype(bool)
    if bad.any():
        raise ValueError(f"{method} diverged on seeds {rows['seed'][bad].tolist()}: lower its "
                         "global rate or widen the grid")
    return rows[column].to_numpy(dtype=float)


def mean_ci_table(frame, columns: Sequence[str], *, by: str = "method"):
    """One row per `by` group: 'mean [95% CI]' over its rows (seeds) of each column."""
    import pandas as pd

    from repsuite.stats import mean_ci

    out = {}
    for key, g in frame.groupby(by):
        out[key] = {c: "{mean:.4g} [{ci95[0]:.4g}, {ci95[1]:.4g}]".format(**mean_ci(g[c]))
                    for c in columns if c in g and g[c].notna().all()}
    return pd.DataFrame(out).T


def bench_local_linear(n_clients: int = 250, local_steps: int = 5, *, samples_per_client: int = 20,
                       batch_size: int = 16, n_features: int = 196, n_classes: int = 10,
                       device="auto", repeats: int = 3) -> dict:
    """Seconds for one round of local SGD of a softmax regression on every client: the
    closed-form `softmax_regression_sgd` against the core's autograd `local_sgd`; best of
    `repeats` after one warm-up call each."""

    from repsuite.seeding import pick_device
    from repsuite.timing import best_of

    device = pick_device(device)
    g = torch.Generator().manual_seed(0)
    n = n_clients * samples_per_client
    X = torch.randn(n, n_features, generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    clients = Clients.from_partition(X, y, np.array_split(np.arange(n), n_clients), device)
    model = nn.Linear(n_features, n_classes).to(device)
    like = params_of(model)
    starts = torch.zeros(n_clients, n_features * n_classes + n_classes, device=device)
    idx = np.arange(n_clients)

    def closed_form():
        softmax_regression_sgd(starts, clients, idx, n_classes=n_classes, steps=local_steps,
                               lr=0.1, batch_size=batch_size,
                               generator=torch.Generator().manual_seed(1))

    def autograd():
        local_sgd(model, unflatten(starts, like), clients, idx, steps=local_steps, lr=0.1,
                  batch_size=batch_size, generator=torch.Generator().manual_seed(1))

    fast, core = best_of(closed_form, repeats, device), best_of(autograd, repeats, device)
    return {"device": str(device), "n_clients": n_clients, "local_steps": local_steps,
            "closed_form_s": fast, "autograd_s": core, "speedup": core / fast}
