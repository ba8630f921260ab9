"""The PPP experiments: datasets, runs of PPP and its baselines over seeds, and the tables behind
the claims and figures (repeatability, number of clusters on a blob grid, compactness, the
separable set, cost against the number of points, sensitivity to the acceptance rule).

Methods, by the names used in every table:
    ppp          PPP (our reading of the paper, `repsuite.clustering.ppp`)
    kmeans       k-means from ONE uniformly random start (Forgy), the initial-condition-sensitive
                 algorithm the paper sets out to fix
    kmeans++x10  k-means, best of 10 k-means++ starts (scikit-learn's old default), for reference
    gmm          a full-covariance Gaussian mixture from one random start (random
                 responsibilities)
The baselines run at a number of clusters given to them (PPP finds its own).
"""

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from repsuite import data
from repsuite.clustering import core
from repsuite.clustering.metrics import within_cluster_ss
from repsuite.clustering.ppp import PPPResult, ari, ppp
from repsuite.progress import bar

BASELINES = ("kmeans", "kmeans++x10", "gmm")
DIAMONDS_NUMERIC = [0, 4, 5, 6, 7, 8]  # carat, depth, table, x, y, z

# -------------------------------------------------------------------------------------------------
# Data


@dataclass
class Dataset:
    name: str
    X: np.ndarray  # standardised features (and PCA scores where asked)
    y: np.ndarray | None  # classes, None where the data has none
    note: str = ""

    @property
    def n_classes(self) -> int | None:
        return None if self.y is None else len(np.unique(self.y))


def load_dataset(name: str, *, pca: int | None = None, max_rows: int | None = None,
                 seed: int = 0) -> Dataset:
    """A bundled dataset, standardised per feature; `pca` keeps that many principal components;
    `max_rows` draws a seeded subsample. `diamonds` keeps its six continuous columns and has no
    classes (its price is no clustering label)."""
    X, y = data.load(name)
    note = f"{len(X)} x {X.shape[1]}"
    if name == "diamonds":
        X, y = X[:, DIAMONDS_NUMERIC], None
        note += ", the 6 continuous columns"
    if max_rows is not None and len(X) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(len(X), max_rows, replace=False))
        X, y = X[rows], None if y is None else y[rows]
        note += f", {max_rows} rows drawn"
    X = StandardScaler().fit_transform(np.asarray(X, dtype=np.float64))
    if pca is not None and pca < X.shape[1]:
        X = PCA(pca, svd_solver="full").fit_transform(X)
        note += f", PCA to {pca}"
    return Dataset(name, X, None if y is None else np.asarray(y).astype(int), note)


def blobs(k: int, n_per: int, d: int, separation: float, seed: int) -> Dataset:
    """k spherical unit-variance Gaussian clusters of n_per points in d dimensions, their centers
    drawn uniformly in a box, at least `separation` standard deviations apart (rejection)."""
    if k < 1 or n_per < 2 or d < 1 or separation <= 0:
        raise ValueError(f"need k >= 1, n_per >= 2, d >= 1, separation > 0; got k={k}, "
                         f"n_per={n_per}, d={d}, separation={separation}")
    rng = np.random.default_rng(seed)
    half = 1.5 * separation * k ** (1 / d)  # wide enough for k centers at that separation
    centers = []
    for _ in range(100_000):
        c = rng.uniform(-half, half, d)
        if all(np.linalg.norm(c - o) >= separation for o in centers):
            centers.append(c)
            if len(centers) == k:
                break
    if len(centers) < k:
        raise RuntimeError(f"could not place {k} centers {separation} apart in {d} dimensions")
    y = np.repeat(np.arange(k), n_per)
    X = np.asarray(centers)[y] + rng.normal(size=(k * n_per, d))
    return Dataset(f"blobs k={k} sep={separation:g}", X, y, f"{k} x {n_per} points, d={d}")


# -------------------------------------------------------------------------------------------------
# Scores


def r2(X: np.ndarray, labels) -> float:
    """Share of the total sum of squares explained by the clusters, 1 - WCSS / TSS (0 for one
    cluster, larger is more compact)."""
    if len(np.unique(np.asarray(labels))) < 2:
        return 0.0
    tss = float(((X - X.mean(0)) ** 2).sum())
    return 1.0 - within_cluster_ss(X, labels) / tss


def silhouette(D: torch.Tensor, labels) -> float:
    """Mean silhouette width from a matrix D of pairwise distances (as scikit-learn's
    silhouette_score with metric="precomputed": a point alone in its cluster scores 0)."""
    labels = torch.as_tensor(np.unique(np.asarray(labels), return_inverse=True)[1],
                             device=D.device)
    k = int(labels.max()) + 1
    if not 2 <= k <= len(labels) - 1:
        raise ValueError(f"the silhouette needs 2 to n - 1 clusters, got {k} for {len(labels)}")
    onehot = torch.nn.functional.one_hot(labels, k).to(D.dtype)
    sizes = onehot.sum(0)
    mean_to = D @ onehot / sizes  # (n, k) mean distance of each point to each cluster
    own = sizes[labels]
    a = (D @ onehot).gather(1, labels[:, None])[:, 0] / (own - 1).clamp_min(1)
    b = mean_to.scatter(1, labels[:, None], math.inf).min(1).values
    s = torch.where(own > 1, (b - a) / torch.maximum(a, b), torch.zeros_like(a))
    return float(s.mean())


class SilhouetteCache:
    """Silhouettes of partitions of one X, from its distance matrix computed once; seeds often
    repeat a partition exactly, so each distinct one is computed once. NaN for fewer than 2
    clusters. Above `max_points` points, a fixed seeded subsample of that many stands in for X
    (as scikit-learn's `sample_size`)."""

    def __init__(self, X: np.ndarray, max_points: int = 4000, seed: int = 0):
        n = len(X)
        self.sample = (np.arange(n) if n <= max_points else
                       np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False)))
        Xt = torch.as_tensor(X[self.sample], dtype=torch.float64)
        self.D, self.cache = torch.cdist(Xt, Xt), {}

    def __call__(self, labels, mask=None) -> float:
        labels = np.asarray(labels)[self.sample]
        keep = np.ones(len(labels), bool) if mask is None else np.asarray(mask)[self.sample]
        rows = np.flatnonzero(keep)
        key = (labels[rows].tobytes(), rows.tobytes())
        if key not in self.cache:
            lab = labels[rows]
            ok = 2 <= len(np.unique(lab)) <= len(rows) - 1
            D = self.D
            if len(rows) < len(labels):
                idx = torch.as_tensor(rows)
                D = D[idx][:, idx]
            self.cache[key] = silhouette(D, lab) if ok else math.nan
        return self.cache[key]


def seed_pairs(seeds) -> list[tuple[int, int]]:
    """Disjoint pairs (s0, s1), (s2, s3), ...: independent replicates of a seed-to-seed ARI."""
    seeds = list(seeds)
    if len(seeds) < 2:
        raise ValueError(f"repeatability needs at least 2 seeds, got {len(seeds)}")
    return list(zip(seeds[0::2], seeds[1::2], strict=False))


def pair_ari(a, b, *, degenerate_zero: bool = False) -> float:
    """ARI between two clusterings; with `degenerate_zero`, 0 when either is a single cluster
    (one cluster is perfectly repeatable and says nothing)."""
    if degenerate_zero and (len(np.unique(a)) < 2 or len(np.unique(b)) < 2):
        return 0.0
    return ari(a, b)


# -------------------------------------------------------------------------------------------------
# Runs on one dataset


@dataclass
class DatasetRuns:
    data: Dataset
    seeds: list[int]
    ppp: dict[int, PPPResult]
    labels: dict[str, dict[int, np.ndarray]]  # method -> seed -> labels
    k_ref: int  # clusters given to the baselines in the repeatability study
    per_seed: pd.DataFrame  # one row per (method, seed)
    pairs: pd.DataFrame  # one row per (method, seed pair)


def baseline_labels(method: str, X, k: int, seed: int, device=None) -> np.ndarray:
    if method == "kmeans":
        fit = core.kmeans(X, k, n_init=1, init="random", seed=seed, device=device)
    elif method == "kmeans++x10":
        fit = core.kmeans(X, k, n_init=10, seed=seed, device=device)
    elif method == "gmm":
        fit = core.gmm(X, k, init="random", seed=seed, reg_covar=1e-4, tol=1e-4, device=device)
    else:
        raise ValueError(f"unknown baseline {method!r}; choose from {BASELINES}")
    return fit.labels.cpu().numpy()


def run_dataset(ds: Dataset, seeds, rule: dict, *, device=None, progress: bool = False
                ) -> DatasetRuns:
    """PPP under every seed; the baselines under the same seeds, (a) at k_ref = PPP's most frequent
    number of clusters (at least 2) for repeatability, (b) at each seed's own PPP k (at least 2)
    for compactness."""
    seeds = [int(s) for s in seeds]
    results = {s: ppp(ds.X, seed=s, device=device, **rule)
               for s in bar(seeds, enabled=progress, desc=f"PPP {ds.name}", leave=False)}
    ks = [results[s].k for s in seeds]
    k_ref = max(2, max(set(ks), key=lambda k: (ks.count(k), -k)))
    labels = {"ppp": {s: results[s].labels for s in seeds}}
    same_k = {}
    for m in BASELINES:
        labels[m] = {s: baseline_labels(m, ds.X, k_ref, s, device) for s in seeds}
    for s in seeds:
        k = max(2, results[s].k)
        same_k[s] = labels["kmeans"][s] if k == k_ref else baseline_labels(
            "kmeans", ds.X, k, s, device)

    sil = SilhouetteCache(ds.X)
    rows = []
    for s in seeds:
        res = results[s]
        core_mask = res.core()
        rows.append(dict(method="ppp", seed=s, k=res.k, r2=r2(ds.X, res.labels),
                         wcss_per_point=within_cluster_ss(ds.X, res.labels) / len(ds.X),
                         silhouette=sil(res.labels), ari_labels=_ari_y(ds, res.labels),
                         core_fraction=float(core_mask.mean()),
                         core_silhouette=sil(res.labels, core_mask),
                         core_ari_labels=_ari_y(ds, res.labels, core_mask),
                         kmeans_same_k_r2=r2(ds.X, same_k[s]),
                         kmeans_same_k_silhouette=sil(same_k[s]), work=res.work))
        for m in BASELINES:
            rows.append(dict(method=m, seed=s, k=k_ref, r2=r2(ds.X, labels[m][s]),
                             wcss_per_point=within_cluster_ss(ds.X, labels[m][s]) / len(ds.X),
                             silhouette=sil(labels[m][s]), ari_labels=_ari_y(ds, labels[m][s])))
    pairs = [dict(method=m, seeds=f"{a},{b}",
                  ari=pair_ari(labels[m][a], labels[m][b], degenerate_zero=m == "ppp"))
             for m in labels for a, b in seed_pairs(seeds)]
    return DatasetRuns(ds, seeds, results, labels, k_ref, pd.DataFrame(rows), pd.DataFrame(pairs))


def _ari_y(ds: Dataset, labels, mask=None) -> float:
    if ds.y is None:
        return math.nan
    mask = np.ones(len(labels), bool) if mask is None else mask
    return ari(ds.y[mask], np.asarray(labels)[mask]) if mask.sum() else math.nan


def all_pairs_ari(labelings: list, *, degenerate_zero: bool = False) -> np.ndarray:
    """ARI of every pair of seeds (for the figure; the claims use disjoint pairs)."""
    return np.array([pair_ari(a, b, degenerate_zero=degenerate_zero)
                     for a, b in itertools.combinations(labelings, 2)])


def summary(runs: DatasetRuns) -> dict:
    """The dataset's numbers for the metrics file, per method."""
    out = {}
    for m, t in runs.per_seed.groupby("method", sort=False):
        ks = t.k.tolist()
        pairs = runs.pairs[runs.pairs.method == m].ari
        out[m] = {"k_found_mode": max(set(ks), key=ks.count), "k_found_dist":
                  {int(k): ks.count(k) for k in sorted(set(ks))},
                  "ari_vs_labels": _mean(t.ari_labels), "silhouette": _mean(t.silhouette),
                  "r2": _mean(t.r2), "wcss_per_point": _mean(t.wcss_per_point),
                  "seed_ari_mean": _mean(pairs),
                  "seed_ari_all_pairs": _mean(all_pairs_ari(list(runs.labels[m].values())))}
        if m == "ppp":
            out[m].update(core_fraction=_mean(t.core_fraction),
                          core_silhouette=_mean(t.core_silhouette),
                          core_ari_vs_labels=_mean(t.core_ari_labels))
    return out


def _mean(values) -> float | None:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return round(float(v.mean()), 6) if len(v) else None


def separable_set(runs: dict, grid: pd.DataFrame, separation: float) -> pd.DataFrame:
    """Silhouette of the separable set (points of path posterior above the core level) and of all
    points, per dataset: the real datasets' seeds and the blob mixtures' replicates at
    `separation`, counting only runs with at least 2 clusters in the separable set."""
    rows = []
    frames = [(name, r.per_seed[r.per_seed.method == "ppp"]) for name, r in runs.items()]
    blob = grid[(grid.method == "ppp") & (grid.separation == separation)]
    frames += [(f"blobs k={k} sep={separation:g}", t) for k, t in blob.groupby("k_true")]
    for name, t in frames:
        ok = t[np.isfinite(t.core_silhouette.astype(float))]
        rows.append(dict(dataset=name, runs=len(t), runs_with_core=len(ok),
                         core_fraction=_mean(ok.core_fraction), silhouette_all=_mean(ok.silhouette),
                         silhouette_core=_mean(ok.core_silhouette)))
    return pd.DataFrame(rows).set_index("dataset")


# -------------------------------------------------------------------------------------------------
# Number of clusters on a grid of blob mixtures


def k_by_bic(X, ks, seed: int, device=None) -> int:
    """The number of components of least BIC (full covariances, one k-means start each)."""
    bic = [core.gmm(X, k, seed=seed, reg_covar=1e-4, device=device).bic for k in ks]
    return int(ks[int(np.argmin(bic))])


def k_by_silhouette(X, ks, seed: int, n_init: int = 10, device=None) -> int:
    """The number of k-means clusters (best of n_init k-means++ starts) of largest silhouette."""
    ks = [k for k in ks if k >= 2]
    sil = SilhouetteCache(X)
    score = [sil(core.kmeans(X, k, n_init=n_init, seed=seed, device=device).labels.cpu().numpy())
             for k in ks]
    return int(ks[int(np.argmax(score))])


def blob_grid(k_values, separations, replicates: int, *, n_per: int, d: int, k_max: int,
              rule: dict, seed: int = 0, device=None, progress: bool = False) -> pd.DataFrame:
    """PPP, GMM + BIC over k = 1..k_max and silhouette-chosen k-means on every blob mixture of the
    grid, `replicates` datasets (and PPP seeds) per cell."""
    rows, ks = [], list(range(1, k_max + 1))
    cells = list(itertools.product(k_values, separations, range(replicates)))
    for k, sep, r in bar(cells, enabled=progress, desc="blob grid", leave=False):
        s = seed + r
        ds = blobs(k, n_per, d, sep, seed=s * 1000 + k)
        res = ppp(ds.X, seed=s, device=device, **rule)
        found = {"ppp": res.k, "gmm+bic": k_by_bic(ds.X, ks, s, device),
                 "kmeans+silhouette": k_by_silhouette(ds.X, ks, s, device=device)}
        sil = SilhouetteCache(ds.X)
        for m, kf in found.items():
            extra = dict(ari=ari(ds.y, res.labels), core_fraction=float(res.core().mean()),
                         silhouette=sil(res.labels), core_silhouette=sil(res.labels, res.core())
                         ) if m == "ppp" else {}
            rows.append(dict(k_true=k, separation=sep, replicate=r, method=m, k_found=kf,
                             correct=int(kf == k), **extra))
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------------------------------
# Cost against the number of points, and sensitivity to the rule


def scaling(sizes, seeds, *, k: int, d: int, separation: float, rule: dict,
            device=None, progress: bool = False) -> pd.DataFrame:
    """PPP's work (point-iterations of k-means and EM, a machine-independent cost) on blob
    mixtures of growing size; the log-log slope of work against n, per seed."""
    rows = []
    for s in bar(list(seeds), enabled=progress, desc="scaling", leave=False):
        for n in sizes:
            ds = blobs(k, max(2, n // k), d, separation, seed=10_000 + s)
            res = ppp(ds.X, seed=s, device=device, **rule)
            rows.append(dict(seed=s, n=len(ds.X), work=res.work, k=res.k,
                             ari=ari(ds.y, res.labels)))
    return pd.DataFrame(rows)


def loglog_slopes(table: pd.DataFrame) -> pd.Series:
    """Least-squares slope of log(work) on log(n), per seed."""
    return table.groupby("seed").apply(
        lambda t: float(np.polyfit(np.log(t.n), np.log(t.work), 1)[0]), include_groups=False)


def sensitivity(ds: Dataset, taus, deltas, seeds, rule: dict, device=None) -> pd.DataFrame:
    """Clusters found and seed-to-seed ARI (one cluster scoring 0) for each (tau, delta)."""
    rows = []
    for tau, delta in itertools.product(taus, deltas):
        res = [ppp(ds.X, seed=s, device=device, **{**rule, "tau": tau, "delta": delta})
               for s in seeds]
        pairs = [pair_ari(a.labels, b.labels, degenerate_zero=True)
                 for a, b in itertools.combinations(res, 2)]
        rows.append(dict(dataset=ds.name, tau=tau, delta=delta,
                         k_mean=float(np.mean([r.k for r in res])),
                         k_values=" ".join(str(r.k) for r in res),
                         seed_ari=float(np.mean(pairs)) if pairs else math.nan,
                         ari_labels=_mean([_ari_y(ds, r.labels) for r in res])))
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------------------------------
# The split tree, for the figure


def tree_layout(result: PPPResult) -> dict[int, tuple[float, float]]:
    """(x, y) of every node: leaves evenly spaced in depth-first order, parents centred above
    their children, depth downwards."""
    pos, next_x = {}, [0.0]

    def place(i):
        node = result.nodes[i]
        if node.children is None:
            pos[i] = (next_x[0], -node.depth)
            next_x[0] += 1.0
        else:
            for c in node.children:
                place(c)
            pos[i] = (np.mean([pos[c][0] for c in node.children]), -node.depth)

    place(0)
    return pos


def plot_tree(ax, result: PPPResult, title: str = "") -> None:
    """The split tree: accepted splits in green, rejected nodes labelled with the reason, each
    node with its size and (where validated) delta_BIC and agreement."""
    pos = tree_layout(result)
    for node in result.nodes:
        x, y = pos[node.id]
        for c in node.children or ():
            ax.plot([x, pos[c][0]], [y, pos[c][1]], color="0.6", lw=1, zorder=1)
        color = "tab:green" if node.status == "accepted" else "tab:red"
        text = f"n={node.size}"
        if math.isfinite(node.delta_bic):
            text += f"\ndBIC={node.delta_bic:.0f}\nARI={node.agreement:.2f}"
        if node.status != "accepted":
            text += f"\n[{node.status}]"
        ax.scatter([x], [y], s=60, color=color, zorder=2)
        ax.annotate(text, (x, y), xytext=(0, -8), textcoords="offset points", ha="center",
                    va="top", fontsize=6)
    ax.set(title=title, xticks=[], yticks=[])
    ax.set_ylim(min(p[1] for p in pos.values()) - 1, 0.5)
    for side in ax.spines.values():
        side.set_visible(False)


# -------------------------------------------------------------------------------------------------
# Benchmark (wall-clock; run by `make bench`, never stored in the metrics)


def bench_rows(sizes=(10_000, 100_000), d: int = 10) -> list[tuple]:
    """Seconds of one k-means (k = 8) and one full-covariance mixture (k = 4) against
    scikit-learn's, and of one PPP run, on blob mixtures of several sizes."""
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    from repsuite.timing import best_of

    rows = []
    for n in sizes:
        X = blobs(8, n // 8, d, 6.0, seed=0).X
        rows.append((f"k-means k=8, n={n:,} x {d}, 1 k-means++ start",
                     best_of(lambda X=X: core.kmeans(X, 8, seed=0), 3),
                     best_of(lambda X=X: KMeans(8, n_init=1, random_state=0).fit(X), 3),
                     "scikit-learn KMeans"))
        rows.append((f"GMM full k=4, n={n:,} x {d}",
                     best_of(lambda X=X: core.gmm(X, 4, seed=0), 3),
                     best_of(lambda X=X: GaussianMixture(4, tol=1e-6, random_state=0).fit(X), 3),
                     "scikit-learn GaussianMixture"))
        rows.append((f"PPP, 8 blobs, n={n:,} x {d}",
                     best_of(lambda X=X: ppp(X, seed=0), 2), None, ""))
    return rows
