"""The LLP-BP experiments: binary tasks with random bags of several sizes, LLP-BP against the LLP
baselines under one budget, and the tables behind the figures and verdicts.

Methods, by the names used in every table:
    llp_bp      the paper's method (`fit_llp_bp`): BP pseudo-labels, embedding refinement, the
                last round's MLP is the classifier (`round` 1, 2, ... in the tables)
    dllp        DLLP: an MLP trained with the bag proportion loss
    easyllp     EasyLLP: an MLP trained on debiased per-instance soft labels
    proportion  every instance labelled with its bag's positive fraction (the trivial baseline)
    supervised  an MLP trained on the true instance labels: a reference ceiling, not LLP

Every method uses the same MLP, optimiser, epochs and batches (whole bags of the largest size).
The bag sizes of one seed partition the same random order of the training instances, so smaller
bags nest inside larger ones and all methods of a seed see the same instances and bags.
"""

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA

from repsuite import data
from repsuite.progress import bar
from repsuite.weak.bags import bag_proportions, make_bags
from repsuite.weak.llp_bp import auc, bag_counts, fit_llp_bp, heldout_bag_loss, knn_graph
from repsuite.weak.llp_training import Objective, train_models

DATASETS = ("adult", "mnist")
BASELINES = ("dllp", "easyllp", "proportion")


@dataclass
class Split:
    """Standardised features and 0/1 labels of one train/test split."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


def binary_task(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and 0/1 labels: Adult (income > 50K, 44 features, 24 % positive) or MNIST-5k
    (digit >= 5 against digit < 5, pixels scaled to [0, 1])."""
    if name == "adult":
        X, y = data.load("adult")
        return X.astype(np.float64), y.astype(np.int64)
    if name == "mnist":
        X, y = data.load("mnist5k")
        return X.astype(np.float64) / 255.0, (y >= 5).astype(np.int64)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def make_split(name: str, n_train: int, n_test: int, seed: int, *, pca_dim: int = 0) -> Split:
    """A random split of `n_train` training rows and at most `n_test` test rows (0: all the
    other rows),
    standardised column by column with the training rows' statistics. `pca_dim` > 0 instead
    projects on that many principal components of the training rows (no labels involved) and
    divides by one overall scale, so that distances keep the geometry of the pixels."""
    X, y = binary_task(name)
    if n_train < 2 or n_train >= len(X):
        raise ValueError(f"{name}: n_train must be in 2..{len(X) - 1}, got {n_train}")
    if n_test < 0:
        raise ValueError(f"{name}: n_test must be >= 0, got {n_test}")
    order = np.random.default_rng(seed).permutation(len(X))
    train, test = order[:n_train], order[n_train:n_train + n_test if n_test else None]
    Xtr, Xte = X[train], X[test]
    if pca_dim:
        pca = PCA(pca_dim, svd_solver="randomized", random_state=seed).fit(Xtr)
        Xtr, Xte = pca.transform(Xtr), pca.transform(Xte)
        scale = Xtr.std()
        return Split(name, Xtr / scale, y[train], Xte / scale, y[test])
    mu, sd = Xtr.mean(0), Xtr.std(0)
    sd[sd == 0] = 1.0  # a constant column (a one-hot level absent from the sample) stays zero
    return Split(name, (Xtr - mu) / sd, y[train], (Xte - mu) / sd, y[test])


def nested_bags(n: int, bag_sizes, seed: int) -> list[np.ndarray]:
    """Random bags of each size from one random order of the n instances, so that each bag of a
    size lies inside one bag of every larger size (each size must divide the next)."""
    sizes = sorted(bag_sizes)
    if any(b % a for a, b in zip(sizes[:-1], sizes[1:], strict=True)):
        raise ValueError(f"each bag size must divide the next for nested bags, got {sizes}")
    return [make_bags(n, b, seed) for b in bag_sizes]


@dataclass
class Config:
    """Hyperparameters of one experiment (the notebook's parameters)."""

    bag_sizes: list
    n_neighbors: int = 5
    metric: str = "cosine"
    sim_grid: tuple = (1.0,)  # with several weights, one is chosen by `select_sim_lambda`
    holdout: float = 0.25
    bag_lambda: float = 4.0
    bag_scaling: str = "size"
    bp_iter: int = 100
    damping: float = 0.5
    bp_tol: float = 1e-4
    threshold: float | None = 0.5
    agg_lambda: float = 0.1
    rounds: int = 2
    hidden: tuple = (64, 32)
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    baselines: tuple = BASELINES
    supervised: bool = True
    record_every: int = 0
    extra: dict = field(default_factory=dict)


def baseline_objectives(bag_list, count_list, baselines) -> list[tuple[str, int, Objective]]:
    """(method, bag size, objective) of each baseline at each bag partition; only bag counts."""
    out = []
    for bags, counts in zip(bag_list, count_list, strict=True):
        sizes = np.bincount(bags)
        props = counts / sizes
        size = int(sizes.max())
        for method in baselines:
            if method == "dllp":
                out.append((method, size, Objective("dllp", bags=bags, proportions=props)))
            elif method == "easyllp":
                out.append((method, size, Objective("easyllp", bags=bags, proportions=props)))
            elif method == "proportion":
                out.append((method, size, Objective("labels", props[bags], bags, props)))
            else:
                raise ValueError(f"baselines must be among {BASELINES}, got {method!r}")
    return out


def select_sim_lambda(X, bags, counts, cfg: Config, seed: int, device=None) -> pd.DataFrame:
    """Held-out bag loss (`heldout_bag_loss`, bag counts only) of every similarity weight of
    `cfg.sim_grid` on the round-1 kNN graph; the chosen weight is the row with the least loss
    (the first, the smallest weight, on ties)."""
    edges, w, _ = knn_graph(X, cfg.n_neighbors, metric=cfg.metric, device=device)
    rows = [{"sim_lambda": a,
             "heldout_loss": heldout_bag_loss(bags, counts, edges, w, sim_lambda=a,
                                              bag_lambda=cfg.bag_lambda, scaling=cfg.bag_scaling,
                                              holdout=cfg.holdout, seed=seed, n_iter=cfg.bp_iter,
                                              damping=cfg.damping, tol=cfg.bp_tol, device=device)}
            for a in cfg.sim_grid]
    table = pd.DataFrame(rows)
    table["chosen"] = np.arange(len(table)) == int(table.heldout_loss.to_numpy().argmin())
    return table


def run_seed(split: Split, cfg: Config, seed: int, device=None) -> dict:
    """All methods at every bag size on one split, for one seed (bags, initialisation, batches).

    Training sees the instance labels only through the bag counts (and the supervised reference,
    which is kept apart). Returns tables: `auc` (test AUC of every method, bag size and round),
    `pseudo` (AUC of BP marginals and of bag proportions on the training instances), `bp` (BP
    diagnostics) and `history` (pseudo-label AUC over BP iterations, when recorded).
    """
    bag_list = nested_bags(len(split.X_train), cfg.bag_sizes, seed)
    count_list = [bag_counts(split.y_train, b) for b in bag_list]
    key = {"dataset": split.name, "seed": seed}
    sim_lambda, selection = float(cfg.sim_grid[0]), pd.DataFrame()
    if len(cfg.sim_grid) > 1:
        finest = int(np.argmin(cfg.bag_sizes))
        selection = select_sim_lambda(split.X_train, bag_list[finest], count_list[finest], cfg,
                                      seed, device=device)
        sim_lambda = float(selection.sim_lambda[selection.chosen].iloc[0])
        selection = selection.assign(**key)
    res = fit_llp_bp(split.X_train, bag_list, count_list, rounds=cfg.rounds,
                     n_neighbors=cfg.n_neighbors, metric=cfg.metric, sim_lambda=sim_lambda,
                     bag_lambda=cfg.bag_lambda, bag_scaling=cfg.bag_scaling, bp_iter=cfg.bp_iter,
                     damping=cfg.damping, bp_tol=cfg.bp_tol, threshold=cfg.threshold,
                     agg_lambda=cfg.agg_lambda, hidden=cfg.hidden, epochs=cfg.epochs,
                     batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                     X_eval=split.X_test, record_every=cfg.record_every, seed=seed,
                     device=device)
    auc_rows, pseudo_rows, bp_rows, hist_rows = [], [], [], []
    for c, size in enumerate(cfg.bag_sizes):
        prop = bag_proportions(split.y_train, bag_list[c])[bag_list[c]]
        for r in range(cfg.rounds):
            auc_rows.append({**key, "bag_size": size, "method": "llp_bp", "round": r + 1,
                             "auc": auc(res.eval_probs[c][r], split.y_test)})
            pseudo_rows.append({**key, "bag_size": size, "round": r + 1,
                                "bp": auc(res.marginals[c][r], split.y_train),
                                "proportion": auc(prop, split.y_train),
                                "mean_marginal": float(res.marginals[c][r].mean())})
            bp_rows.append({**key, "bag_size": size, "round": r + 1, "sim_lambda": sim_lambda,
                            **res.bp[c][r]})
            if res.history[c][r] is not None:
                for t, p in enumerate(res.history[c][r]):
                    hist_rows.append({**key, "bag_size": size, "round": r + 1,
                                      "iteration": (t + 1) * cfg.record_every,
                                      "auc": auc(p, split.y_train)})

    # The baselines (and the supervised reference) share one training: same network and batches.
    X = torch.as_tensor(split.X_train, dtype=torch.float32, device=device)
    named = baseline_objectives(bag_list, count_list, cfg.baselines)
    if cfg.supervised:
        named.append(("supervised", 1, Objective("labels", split.y_train.astype(np.float64))))
    if named:
        coarsest = bag_list[int(np.argmax(cfg.bag_sizes))]
        model = train_models(X, [o for _, _, o in named], groups=coarsest, hidden=cfg.hidden,
                             epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                             weight_decay=cfg.weight_decay, seed=seed + 1000 * cfg.rounds)
        probs = model.predict(torch.as_tensor(split.X_test, dtype=torch.float32,
                                              device=device))[0].cpu().numpy()
        for k, (method, size, _) in enumerate(named):
            auc_rows.append({**key, "bag_size": size, "method": method, "round": 0,
                             "auc": auc(probs[k], split.y_test)})
    return {"auc": pd.DataFrame(auc_rows), "pseudo": pd.DataFrame(pseudo_rows),
            "bp": pd.DataFrame(bp_rows), "history": pd.DataFrame(hist_rows),
            "selection": selection, "seconds": res.seconds}


def run_all(splits: dict, cfg: Config, seeds, device=None, progress: bool = True) -> dict:
    """`run_seed` over datasets and seeds; the tables stacked, plus the seconds spent."""
    parts = []
    jobs = [(name, s) for name in splits for s in seeds]
    for name, s in bar(jobs, enabled=progress, desc="datasets x seeds"):
        parts.append(run_seed(splits[name](s), cfg, s, device=device))
    out = {k: pd.concat([p[k] for p in parts], ignore_index=True)
           for k in ("auc", "pseudo", "bp", "history", "selection")}
    out["seconds"] = {k: sum(p["seconds"][k] for p in parts) for k in parts[0]["seconds"]}
    return out


# -------------------------------------------------------------------------------------------------
# Tables behind the figures and the verdicts


def final_auc(table: pd.DataFrame, rounds: int) -> pd.DataFrame:
    """Test AUC with LLP-BP's last round as `llp_bp`: one row per dataset, seed, size, method."""
    keep = (table.method != "llp_bp") | (table["round"] == rounds)
    return table[keep].drop(columns="round")


def per_seed(table: pd.DataFrame, dataset: str, bag_size: int, method: str,
             value: str = "auc", **where) -> np.ndarray:
    """Per-seed values (sorted by seed) of one dataset, bag size and method."""
    rows = table[(table.dataset == dataset) & (table.bag_size == bag_size)
                 & (table.method == method)]
    for k, v in where.items():
        rows = rows[rows[k] == v]
    if rows.empty:
        raise KeyError(f"no rows for {dataset}, bag size {bag_size}, {method}, {where}")
    return rows.sort_values("seed")[value].to_numpy()


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean test AUC and 95 % t-interval half-width over seeds, per dataset, method and size."""
    from repsuite.stats import mean_ci

    rows = []
    for (d, m, b), g in table.groupby(["dataset", "method", "bag_size"]):
        ci = mean_ci(g.sort_values("seed").auc.to_numpy())
        rows.append({"dataset": d, "method": m, "bag_size": b, "mean": ci["mean"],
                     "half": (ci["ci95"][1] - ci["ci95"][0]) / 2, "n": ci["n"]})
    return pd.DataFrame(rows)


def bag_size_slopes(table: pd.DataFrame, dataset: str, method: str) -> np.ndarray:
    """Per seed: least-squares slope of test AUC against log2(bag size) over the sizes run."""
    rows = table[(table.dataset == dataset) & (table.method == method)]
    sizes = np.sort(rows.bag_size.unique())
    if len(sizes) < 2:
        raise ValueError(f"a slope needs at least two bag sizes, {dataset} has {sizes.tolist()}")
    out = []
    for _, g in rows.groupby("seed"):
        g = g.sort_values("bag_size")
        out.append(np.polyfit(np.log2(g.bag_size.to_numpy()), g.auc.to_numpy(), 1)[0])
    return np.array(out)


def pseudo_per_seed(pseudo: pd.DataFrame, dataset: str, bag_size: int, round_: int = 1):
    """Per seed: AUC of the BP marginals of `round_` and of the bag proportions, on the training
    instances."""
    rows = pseudo[(pseudo.dataset == dataset) & (pseudo.bag_size == bag_size)
                  & (pseudo["round"] == round_)].sort_values("seed")
    if rows.empty:
        raise KeyError(f"no pseudo-label rows for {dataset}, bag size {bag_size}, round {round_}")
    return rows.bp.to_numpy(), rows.proportion.to_numpy()


def refinement_per_seed(table: pd.DataFrame, dataset: str, rounds: int):
    """Per seed: LLP-BP's test AUC after the last round and after round 1, each averaged over
    the bag sizes run."""
    rows = table[(table.dataset == dataset) & (table.method == "llp_bp")]
    by = rows.pivot_table(index="seed", columns="round", values="auc", aggfunc="mean")
    return by[rounds].to_numpy(), by[1].to_numpy()


def history_curves(history: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds of the pseudo-label AUC at each recorded BP iteration, per dataset, bag
    size and round; a run that stopped early keeps its last value."""
    if history.empty:
        return history
    wide = history.pivot_table(index=["dataset", "bag_size", "round", "seed"],
                               columns="iteration", values="auc")
    wide = wide.ffill(axis=1)
    return wide.groupby(level=["dataset", "bag_size", "round"]).mean()


def metrics_tables(out: dict, cfg: Config) -> dict:
    """The numbers behind the figures, for the metrics file: per-seed test AUC of every method,
    pseudo-label AUC, BP convergence and the couplings used (no run times)."""
    table = out["auc"]
    auc_tab: dict = {}
    for (d, b, m, r), g in table.groupby(["dataset", "bag_size", "method", "round"]):
        name = m if m != "llp_bp" or r == cfg.rounds else f"llp_bp_round{r}"
        auc_tab.setdefault(d, {}).setdefault(int(b), {})[name] = (
            g.sort_values("seed").auc.round(5).tolist())
    pseudo: dict = {}
    for (d, b, r), g in out["pseudo"].groupby(["dataset", "bag_size", "round"]):
        slot = pseudo.setdefault(d, {}).setdefault(int(b), {})
        g = g.sort_values("seed")
        slot[f"bp_round{r}"] = g.bp.round(5).tolist()
        slot["proportion"] = g.proportion.round(5).tolist()
    bp: dict = {}
    for (d, b, r), g in out["bp"].groupby(["dataset", "bag_size", "round"]):
        bp.setdefault(d, {}).setdefault(int(b), {})[f"round{r}"] = {
            "converged_share": float(g.converged.mean()),
            "mean_iterations": float(g.n_iter.mean()),
            "max_residual": float(g.residual.max())}
    beta = {int(b): cfg.bag_lambda / b if cfg.bag_scaling == "size" else cfg.bag_lambda
            for b in cfg.bag_sizes}
    chosen: dict = {}
    sel = out.get("selection", pd.DataFrame())
    if len(sel):
        for (d, s), g in sel.groupby(["dataset", "seed"]):
            chosen.setdefault(d, {})[int(s)] = {
                "sim_lambda": float(g.sim_lambda[g.chosen].iloc[0]),
                "heldout_loss": dict(zip(g.sim_lambda.astype(str), g.heldout_loss.round(6),
                                         strict=True))}
    return {"auc": auc_tab, "pseudo_label_auc": pseudo, "bp": bp, "selection": chosen,
            "couplings": {"sim_grid": list(cfg.sim_grid), "bag_lambda": cfg.bag_lambda,
                          "bag_scaling": cfg.bag_scaling, "beta_per_bag_size": beta,
                          "n_neighbors": cfg.n_neighbors, "damping": cfg.damping}}


def coupling_grid(split: Split, cfg: Config, bag_size: int, bag_lambdas, seed: int,
                  device=None) -> pd.DataFrame:
    """Round-1 BP over a grid of couplings (every alpha of `cfg.sim_grid` x `bag_lambdas`) on one
    split and bag size: the AUC of the marginals on the training instances (this uses instance
    labels, so it only describes the model and never selects anything) and whether BP
    converged."""
    from repsuite.weak.llp_bp import gibbs_mrf, loopy_bp

    bags = nested_bags(len(split.X_train), [bag_size], seed)[0]
    counts = bag_counts(split.y_train, bags)
    edges, w, _ = knn_graph(split.X_train, cfg.n_neighbors, metric=cfg.metric, device=device)
    rows = []
    for bl in bag_lambdas:
        for a in cfg.sim_grid:
            mrf = gibbs_mrf(bags, counts, edges, w, sim_lambda=a, bag_lambda=bl,
                            scaling=cfg.bag_scaling, device=device, dtype=torch.float32)
            res = loopy_bp(mrf, n_iter=cfg.bp_iter, damping=cfg.damping, tol=cfg.bp_tol)
            rows.append({"dataset": split.name, "bag_lambda": bl, "sim_lambda": a,
                         "auc": auc(res.marginals.double().cpu().numpy(), split.y_train),
                         "converged": res.converged, "n_iter": res.n_iter})
    return pd.DataFrame(rows)
