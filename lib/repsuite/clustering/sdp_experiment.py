"""Experiments of the iLA-SDP replication: heterogeneous Gaussian mixtures, real data sets, the
methods compared (K-means, SDP K-means, EM, spectral clustering, iLA-SDP), sensitivity to the
initial partition, and the dimension sweep.

Every function takes a seed and gives the same numbers for the same arguments on the CPU.
"""

import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.cluster import SpectralClustering
from sklearn.decomposition import PCA

from repsuite.clustering import core, sdp
from repsuite.clustering.metrics import adjusted_rand, misclustering_error

METHODS = ("kmeans", "sdp", "em", "em10", "spectral", "ila", "ila_hard")
LABELS = {"kmeans": "K-means", "sdp": "SDP K-means", "em": "EM", "em10": "EM best of 10",
          "spectral": "spectral", "ila": "iLA-SDP", "ila_hard": "iLA-SDP, hard covariance step",
          "oracle": "Bayes rule (true parameters)"}

# -------------------------------------------------------------------------------------------------
# Data


@dataclass
class Mixture:
    X: np.ndarray  # (n, p)
    y: np.ndarray  # (n,) true component
    means: np.ndarray  # (K, p)
    covariances: np.ndarray  # (K, p, p)
    weights: np.ndarray  # (K,)


LAYOUTS = ("random", "collinear")


def mixture_parameters(p: int, K: int, separation: float, condition: float = 20.0, *,
                       layout: str = "random", seed: int = 0):
    """Means and covariances of the heterogeneous designs (our reading of the paper's setting).

    The K means lie on the first axis, `separation` apart. Components alternate between spherical
    (identity) and elongated: variance `condition` along one direction u and 1 across it
    (condition number `condition`).

    - "random": u is drawn uniformly on the sphere (with `seed`), a generic heterogeneous mixture.
    - "collinear": u is the second axis, perpendicular to the line of means: the elongated
      components are wide across the line, so cutting one of them in two lowers the within-cluster
      sum of squares more than separating neighbouring means, the configuration in which K-means
      merges clusters.
    """
    if p < 2:
        raise ValueError(f"the design needs p >= 2 dimensions, got p = {p}")
    if K < 2:
        raise ValueError(f"the design needs K >= 2 components, got K = {K}")
    if not separation > 0 or not condition >= 1:
        raise ValueError(f"separation must be > 0 and condition >= 1, got {separation}, "
                         f"{condition}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    means = np.zeros((K, p))
    means[:, 0] = (np.arange(K) - (K - 1) / 2) * separation
    covariances = np.tile(np.eye(p), (K, 1, 1))
    rng = np.random.default_rng([seed, 1])
    for k in range(1, K, 2):
        u = np.eye(p)[1] if layout == "collinear" else rng.standard_normal(p)
        u /= np.linalg.norm(u)
        covariances[k] += (condition - 1) * np.outer(u, u)
    return means, covariances


def heterogeneous_mixture(n: int, p: int, K: int, separation: float, *,
                          condition: float = 20.0, layout: str = "random",
                          seed: int = 0) -> Mixture:
    """n points, as equal as possible per component, of `mixture_parameters`."""
    if n < 2 * K:
        raise ValueError(f"n = {n} points is too few for K = {K} components (need >= 2 K)")
    means, covariances = mixture_parameters(p, K, separation, condition, layout=layout,
                                            seed=seed)
    rng = np.random.default_rng(seed)
    y = np.sort(np.arange(n) % K)
    X = np.empty((n, p))
    for k in range(K):
        rows = y == k
        X[rows] = rng.multivariate_normal(means[k], covariances[k], size=int(rows.sum()))
    weights = np.bincount(y, minlength=K) / n
    return Mixture(X, y, means, covariances, weights)


def bayes_labels(mix: Mixture) -> np.ndarray:
    """The Bayes rule with the true parameters: the floor any clustering method is measured
    against (it still errs where the components overlap)."""
    X = torch.as_tensor(mix.X)
    log_density = core.component_log_density(X, torch.as_tensor(mix.means),
                                             torch.as_tensor(mix.covariances))
    return (log_density + torch.log(torch.as_tensor(mix.weights))).argmax(1).numpy()


def real_dataset(name: str, *, per_class: int = 0, n_components: int = 0, seed: int = 0):
    """A labelled data set of `repsuite.data`, standardised, optionally projected on its first
    `n_components` principal components and subsampled to `per_class` points of every class
    (0 keeps all; the subsample is drawn with `seed`)."""
    from repsuite import data

    X, y = data.load(name)
    X = np.asarray(X, dtype=np.float64)
    _, y = np.unique(y, return_inverse=True)
    if per_class:
        rng = np.random.default_rng(seed)
        small = np.bincount(y).min()
        if per_class > small:
            raise ValueError(f"{name}: per_class = {per_class} but its smallest class has "
                             f"{small} points")
        rows = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), per_class,
                                                  replace=False) for c in np.unique(y)]))
        X, y = X[rows], y[rows]
    X = (X - X.mean(0)) / X.std(0).clip(min=1e-12)
    if n_components:
        X = PCA(n_components, random_state=seed).fit_transform(X)
    return X, y


# -------------------------------------------------------------------------------------------------
# Methods


@dataclass
class Settings:
    """What every method run shares (the notebook's parameters)."""

    kmeans_inits: int = 10  # K-means: best of this many k-means++ starts
    em_inits: int = 10  # "em10": EM best of this many k-means starts by likelihood
    reg_covar: float = 1e-6  # added to every covariance, EM and iLA-SDP alike
    max_outer: int = 10  # iLA-SDP: at most this many SDPs
    admm_tol: float = 1e-5  # relative residuals at which ADMM stops
    admm_max_iter: int = 5000
    n_neighbors: int = 10  # spectral clustering's k-nearest-neighbour graph


def _spectral(X, K, seed, settings):
    model = SpectralClustering(K, affinity="nearest_neighbors", random_state=seed,
                               n_neighbors=min(settings.n_neighbors, len(X) - 1))
    with warnings.catch_warnings():
        # A disconnected neighbour graph is the method's own behaviour on well separated data.
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        return model.fit_predict(X)


def run_methods(X, y, K: int, *, seed: int = 0, methods=METHODS[:-1], settings: Settings = None,
                device=None) -> list[dict]:
    """Every method of `methods`, and SDP K-means (iLA-SDP starts from its partition), on one
    data set: one row per method with its misclustering error, adjusted Rand index, iLA-SDP's
    number of SDPs, the seconds it took (shown, never stored) and the labels. "ila_hard" is the
    ablation with the covariance step on the rounded partition."""
    settings = settings or Settings()
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    Xt = sdp.as_points(X, device=device)
    labels, extra, seconds = {}, {}, {}

    def timed(name, fn):
        start = time.perf_counter()
        labels[name] = fn()
        seconds[name] = time.perf_counter() - start

    if "kmeans" in methods:
        timed("kmeans", lambda: core.kmeans(Xt, K, n_init=settings.kmeans_inits, seed=seed)
              .labels.cpu().numpy())
    if "em" in methods:
        timed("em", lambda: _em(Xt, K, 1, seed, settings))
    if "em10" in methods:
        timed("em10", lambda: _em(Xt, K, settings.em_inits, seed, settings))
    if "spectral" in methods:
        timed("spectral", lambda: _spectral(np.asarray(X), K, seed, settings))
    timed("sdp", lambda: sdp.kmeans_sdp(Xt, K, tol=settings.admm_tol,
                                        max_iter=settings.admm_max_iter, seed=seed).labels)
    for name in ("ila", "ila_hard"):
        if name not in methods:
            continue
        start = time.perf_counter()
        res = sdp.ila_sdp(Xt, K, init_labels=labels["sdp"], max_outer=settings.max_outer,
                          reg_covar=settings.reg_covar, tol=settings.admm_tol,
                          max_iter=settings.admm_max_iter, seed=seed,
                          update="soft" if name == "ila" else "hard")
        labels[name] = res.labels
        seconds[name] = time.perf_counter() - start + seconds["sdp"]
        extra[name] = {"n_outer": res.n_outer, "converged": res.converged}

    rows = []
    for name in [m for m in METHODS if m in methods or m == "sdp"]:
        rows.append({"method": name, "error": misclustering_error(y, labels[name]),
                     "ari": adjusted_rand(y, labels[name]), "seconds": seconds[name],
                     **extra.get(name, {}), "labels": np.asarray(labels[name])})
    return rows


def _em(X, K, n_init, seed, settings) -> np.ndarray:
    return core.gmm(X, K, n_init=n_init, reg_covar=settings.reg_covar, seed=seed,
                    init="kmeans").labels.cpu().numpy()


def random_partitions(X, K: int, n_inits: int, seed: int = 0) -> list[np.ndarray]:
    """`n_inits` random starting partitions: each point to the nearest of K centers drawn by
    k-means++ seeding (no Lloyd step), the usual random start of EM."""
    Xt = sdp.as_points(X)
    g = torch.Generator().manual_seed(seed)
    starts = []
    while len(starts) < n_inits:
        centers = core.kmeans_plusplus(Xt, K, g)
        labels = core.sq_distances(Xt, centers).argmin(1).numpy()
        if np.bincount(labels, minlength=K).min() >= 2:
            starts.append(labels)
    return starts


def init_sensitivity(X, y, K: int, starts, *, seed: int = 0, settings: Settings = None,
                     device=None) -> list[dict]:
    """EM and iLA-SDP from the same starting partitions: one row per start and method."""
    settings = settings or Settings()
    Xt = sdp.as_points(X, device=device)
    rows = []
    for i, start in enumerate(starts):
        em = core.gmm(Xt, K, reg_covar=settings.reg_covar, init=start).labels.cpu().numpy()
        ila = sdp.ila_sdp(Xt, K, init_labels=start, max_outer=settings.max_outer,
                          reg_covar=settings.reg_covar, tol=settings.admm_tol,
                          max_iter=settings.admm_max_iter, seed=seed)
        for name, lab in [("em", em), ("ila", ila.labels)]:
            rows.append({"start": i, "method": name, "error": misclustering_error(y, lab),
                         "start_error": misclustering_error(y, start)})
    return rows


def simulate(cells, seeds, *, n: int, condition: float = 20.0, methods=METHODS[:-1],
             settings: Settings = None, device=None, progress: bool = True) -> pd.DataFrame:
    """Every method on the simulated data set of every cell (a (layout, K, p, separation) tuple)
    and seed, plus the Bayes rule: one row per cell, seed and method."""
    from repsuite.progress import bar

    rows = []
    tasks = [(cell, seed) for cell in cells for seed in seeds]
    for (layout, K, p, separation), seed in bar(tasks, enabled=progress, desc="simulations"):
        mix = heterogeneous_mixture(n, p, K, separation, condition=condition, layout=layout,
                                    seed=seed)
        found = run_methods(mix.X, mix.y, K, seed=seed, methods=methods, settings=settings,
                            device=device)
        found.append({"method": "oracle", "error": misclustering_error(mix.y, bayes_labels(mix)),
                      "ari": adjusted_rand(mix.y, bayes_labels(mix))})
        cell = {"layout": layout, "K": K, "p": p, "separation": separation, "seed": seed}
        rows += [{**cell, **r} for r in found]
    return pd.DataFrame(rows)


def design_cells(layouts, n_clusters, separations, p_sweep, separation):
    """The simulation cells, (layout, K, p, separation) tuples: those of C1 (every design at
    p = 2 and every separation) and those of the dimension sweep (the first design at
    `separation`, every p of `p_sweep`). Run `list(dict.fromkeys(c1 + sweep))`: shared cells
    once."""
    if len(layouts) != len(n_clusters):
        raise ValueError(f"one number of clusters per layout is needed: {len(layouts)} layouts, "
                         f"{len(n_clusters)} numbers")
    c1 = [(lay, k, 2, sep) for lay, k in zip(layouts, n_clusters, strict=True)
          for sep in separations]
    sweep = [(layouts[0], n_clusters[0], p, separation) for p in p_sweep]
    return c1, sweep


def select(table: pd.DataFrame, cells) -> pd.DataFrame:
    """The rows of `simulate`'s table that belong to `cells`."""
    keys = list(zip(table.layout, table.K, table.p, table.separation, strict=True))
    wanted = set(cells)
    return table[[k in wanted for k in keys]]


def starts_study(layout: str, K: int, p: int, separation: float, seeds, *, n: int, n_starts: int,
                 condition: float = 20.0, settings: Settings = None, device=None,
                 progress: bool = True) -> pd.DataFrame:
    """EM and iLA-SDP from the same `n_starts` random partitions, on one simulated data set per
    seed: one row per seed, start and method."""
    from repsuite.progress import bar

    rows = []
    for seed in bar(seeds, enabled=progress, desc="random starts"):
        mix = heterogeneous_mixture(n, p, K, separation, condition=condition, layout=layout,
                                    seed=seed)
        starts = random_partitions(mix.X, K, n_starts, seed=seed)
        found = init_sensitivity(mix.X, mix.y, K, starts, seed=seed, settings=settings,
                                 device=device)
        rows += [{"seed": seed, **r} for r in found]
    return pd.DataFrame(rows)


def real_study(names, seeds, *, per_class: int, n_components: dict, methods=METHODS[:-1],
               settings: Settings = None, device=None, progress: bool = True) -> pd.DataFrame:
    """Every method on a class-balanced subsample (drawn with the seed) of each real data set:
    one row per data set, seed and method."""
    from repsuite.progress import bar

    rows = []
    tasks = [(name, seed) for name in names for seed in seeds]
    for name, seed in bar(tasks, enabled=progress, desc="real data"):
        X, y = real_dataset(name, per_class=per_class, n_components=n_components.get(name, 0),
                            seed=seed)
        found = run_methods(X, y, len(np.unique(y)), seed=seed, methods=methods,
                            settings=settings, device=device)
        rows += [{"dataset": name, "seed": seed, "n": len(y), "p": X.shape[1], **r}
                 for r in found]
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------------------------------
# Summaries


def per_seed(table: pd.DataFrame, method: str, value: str = "error") -> np.ndarray:
    """The mean of `value` over the table's cells for each seed (ordered by seed)."""
    return table[table.method == method].groupby("seed")[value].mean().sort_index().to_numpy()


def summary(table: pd.DataFrame, by: list[str], value: str = "error") -> pd.DataFrame:
    """Mean and 95% t half-width over seeds of `value` for every group of `by` and method."""
    from repsuite.stats import mean_ci

    rows = []
    for key, g in table.groupby(by + ["method"], sort=False):
        ci = mean_ci(g[value].to_numpy())
        rows.append({**dict(zip(by + ["method"], key, strict=True)), "mean": ci["mean"],
                     "half": (ci["ci95"][1] - ci["ci95"][0]) / 2, "n": ci["n"]})
    return pd.DataFrame(rows)


def best_baseline(table: pd.DataFrame, baselines=("kmeans", "sdp", "em")) -> np.ndarray:
    """Per seed, the lowest mean error of the `baselines` (the strictest comparison for "lower
    error than each of them")."""
    return np.min([per_seed(table, b) for b in baselines], axis=0)


def start_spread(table: pd.DataFrame, method: str) -> np.ndarray:
    """Per seed, the standard deviation over the random starts of `method`'s error."""
    t = table[table.method == method]
    return t.groupby("seed").error.std(ddof=0).sort_index().to_numpy()


def dimension_gap(sims: pd.DataFrame, sweep) -> np.ndarray:
    """Per seed, how much more EM's error exceeds iLA-SDP's at the largest p of the `sweep` cells
    than at the smallest: (EM - iLA)(p_max) - (EM - iLA)(p_min)."""
    ends = [min(sweep, key=lambda c: c[2]), max(sweep, key=lambda c: c[2])]
    if ends[0][2] == ends[1][2]:
        raise ValueError("the dimension sweep needs at least two values of p")
    gap = [per_seed(select(sims, [c]), "em") - per_seed(select(sims, [c]), "ila") for c in ends]
    return gap[1] - gap[0]
