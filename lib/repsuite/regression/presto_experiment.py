"""PRESTO's experiments: the authors' synthetic generators (sparse and dense differences between
adjacent weight vectors), runs of PRESTO and its two baselines over replications, real ordinal
data with a rare last class, and the tables behind the figures.

Methods, by the names used in every table:
    presto   PRESTO, lambda chosen by 5-fold cross-validation on the Brier score (ordinalNet's
             grid of 20 values down to 0.01 lambda_max), refitted on all training rows
    po       proportional odds, maximum likelihood (MASS::polr in the authors' code)
    logit    logistic regression of the rare class against the rest, maximum likelihood

Simulation metric (the authors' `rare_prob_mse_gen`): the mean over the training rows of
(estimated - true P(y = K | x))^2. Real-data metric (`cal_osce_gen_data_app`): test rows sorted
by the estimated rare probability, cut into max(round(n_test / 100), 10) equal-frequency bins; the
squared difference between each row's estimate and its bin's observed rare frequency, averaged.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from repsuite.progress import bar
from repsuite.regression import ordinal
from repsuite.stats import mean_ci

METHODS = ("presto", "po", "logit")
KINDS = ("sparse", "dense", "po")

# -------------------------------------------------------------------------------------------------
# The authors' generators


@dataclass
class SimData:
    """One synthetic draw: features, labels, and the true boundaries it was drawn from."""

    X: np.ndarray  # (n, p) uniform on [-1, 1]
    y: np.ndarray  # (n,) classes 0..K-1, the last one rare
    alpha: np.ndarray  # (K-1,) true intercepts
    beta: np.ndarray  # (p, K-1) true weight vectors
    tries: int  # draws of the weights rejected before this one (crossing or a missing class)

    @property
    def rare_prob(self) -> np.ndarray:
        return ordinal.rare_probability(self.alpha, self.beta, self.X)


def _weights(kind: str, p: int, K: int, rng, *, beta: float, dev_size: float,
             dev_prob: float) -> np.ndarray:
    B = np.zeros((p, K - 1))
    if kind in {"sparse", "po"}:
        # First vector: each weight `beta` with probability dev_prob, else 0. Sparse kind: each
        # later difference is +-dev_size with probability dev_prob (random sign), else 0.
        B[:, 0] = beta * (rng.uniform(size=p) < dev_prob)
        on = rng.uniform(size=(p, K - 2)) < dev_prob
        sign = rng.choice([-1.0, 1.0], size=(p, K - 2))
        dev = dev_size * on * sign if kind == "sparse" else np.zeros((p, K - 2))
    else:
        # Dense kind: first vector and every difference uniform on [-dev_size, dev_size].
        B[:, 0] = rng.uniform(-dev_size, dev_size, size=p)
        dev = rng.uniform(-dev_size, dev_size, size=(p, K - 2))
    for k in range(1, K - 1):
        B[:, k] = B[:, k - 1] + dev[:, k - 1]
    return B


def simulate(kind: str, n: int, p: int, K: int, intercepts, rng, *, beta: float = 1.0,
             dev_size: float = 0.5, dev_prob: float = 1 / 3, max_tries: int = 100) -> SimData:
    """A draw of the authors' relaxed proportional odds model (`kind` "sparse": Section 4.1;
    "dense": Section 4.2; "po": the sparse first vector with no differences, a control).
    Features uniform on [-1, 1]^p; P(y <= k | x) = sigmoid(alpha_k + x . beta_k). As in their
    code, the weights are redrawn when a class probability is negative on a drawn row, and the
    rows are redrawn (up to 10 times, then the weights too) until every class occurs."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    alpha = np.asarray(intercepts, dtype=np.float64)
    if K < 3 or len(alpha) != K - 1 or (np.diff(alpha) < 0).any():
        raise ValueError(f"need K >= 3 and K - 1 = {K - 1} increasing intercepts, got {alpha}")
    if n < K or p < 1:
        raise ValueError(f"need n >= K rows and p >= 1 features, got n={n}, p={p}")
    for tries in range(max_tries):
        B = _weights(kind, p, K, rng, beta=beta, dev_size=dev_size, dev_prob=dev_prob)
        for _ in range(10):
            X = rng.uniform(-1.0, 1.0, size=(n, p))
            cum = 1.0 / (1.0 + np.exp(-(alpha[None] + X @ B)))
            if (np.diff(cum, axis=1) < 0).any():
                break
            y = (rng.uniform(size=n)[:, None] > cum).sum(1)
            if len(np.unique(y)) == K:
                return SimData(X, y, alpha, B, tries)
    raise RuntimeError(f"no valid draw in {max_tries} tries (kind={kind}, intercepts={alpha}): "
                       "the boundaries cross or a class never occurs")


def rare_fraction(kind: str, p: int, K: int, intercepts, *, n_mc: int = 200_000,
                  seed: int = 0, **weights) -> float:
    """Monte Carlo expectation of P(y = K | x) over x and the weights (a new weight draw every 1000
    rows; the generator's rejection of crossing draws is ignored)."""
    rng = np.random.default_rng(seed)
    total, m = 0.0, 0
    while m < n_mc:
        B = _weights(kind, p, K, rng, beta=weights.get("beta", 1.0),
                     dev_size=weights.get("dev_size", 0.5), dev_prob=weights.get("dev_prob", 1 / 3))
        X = rng.uniform(-1.0, 1.0, size=(1000, p))
        total += ordinal.rare_probability(intercepts, B, X).sum()
        m += 1000
    return total / m


# -------------------------------------------------------------------------------------------------
# Runs


def _replicate_rng(seed: int, setting: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(setting)])


def setting_code(kind: str, intercepts) -> int:
    """A number naming a setting (kind and rarest intercept), so that a setting draws the same
    data whichever other settings a profile runs."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return 1000 * KINDS.index(kind) + int(round(10 * float(intercepts[-1])))


def setting_tag(intercepts) -> str:
    """'a5_5' for intercepts (0, 3.5, 5.5): the rarest boundary's intercept."""
    return "a" + f"{float(intercepts[-1]):g}".replace(".", "_")


def fit_methods(datasets, seeds, *, n_lambda: int = 20, lambda_min_ratio: float = 0.01,
                n_folds: int = 5, device=None, **solver) -> dict:
    """PRESTO (cross-validated), proportional odds and rare-class logistic regression on each of
    several datasets [(X, y), ...] sharing K classes (the rare class last)."""
    K = max(int(np.max(y)) for _, y in datasets) + 1
    cv = ordinal.presto_cv(datasets, seeds, n_classes=K, n_lambda=n_lambda,
                           lambda_min_ratio=lambda_min_ratio, n_folds=n_folds, device=device,
                           **solver)
    po = ordinal.fit_many(datasets, "po", n_classes=K, device=device)
    rare = [(X, (np.asarray(y) == K - 1).astype(np.int64)) for X, y in datasets]
    logit = ordinal.fit_many(rare, "logistic", device=device)
    return {"presto": cv.fits, "po": po, "logit": logit, "cv": cv}


# Stopping as ordinalNet (threshOut = 1e-8); a float32 curvature model reused for 3 steps and
# short inner solves change the steps, not the minimiser.
SOLVER = {"tol": 1e-8, "inner_iter": 25, "inner_tol": 1e-7, "refresh": 3}


@dataclass
class SettingRun:
    """One simulation setting: a row per replication, and PRESTO's estimated differences."""

    table: pd.DataFrame
    diffs: pd.DataFrame  # seed, feature, boundary, true and estimated beta_k - beta_{k-1}


def run_setting(kind: str, intercepts, seeds, setting: int, *, n: int = 2500, p: int = 10,
                K: int = 4, beta: float = 1.0, dev_size: float = 0.5, dev_prob: float = 1 / 3,
                n_lambda: int = 20, lambda_min_ratio: float = 0.01, n_folds: int = 5,
                n_fresh: int = 2500, chunk: int = 10, device=None,
                progress: bool = False) -> SettingRun:
    """One simulation setting (`setting` numbers it, so that settings draw different data), one
    row per replication (seed): each method's rare-probability MSE on the training rows (the
    authors' metric) and on `n_fresh` new rows, the share of rare rows, the selected lambda, and
    how many of the true differences PRESTO finds non-zero (and how many it adds)."""
    rows, diffs = [], []
    chunks = [seeds[i:i + chunk] for i in range(0, len(seeds), chunk)]
    for part in bar(chunks, enabled=progress, desc=f"{kind} {tuple(intercepts)}", leave=False):
        draws = [simulate(kind, n, p, K, intercepts, _replicate_rng(s, setting), beta=beta,
                          dev_size=dev_size, dev_prob=dev_prob) for s in part]
        fits = fit_methods([(d.X, d.y) for d in draws], [int(s) for s in part], n_lambda=n_lambda,
                           lambda_min_ratio=lambda_min_ratio, n_folds=n_folds, device=device,
                           hessian_dtype=torch.float32, **SOLVER)
        for r, (s, d) in enumerate(zip(part, draws, strict=True)):
            fresh = _replicate_rng(s, 1000 + setting).uniform(-1.0, 1.0, size=(n_fresh, p))
            true_fresh = ordinal.rare_probability(d.alpha, d.beta, fresh)
            row = {"seed": int(s), "rare_frac": float(np.mean(d.y == K - 1)), "tries": d.tries}
            for m in METHODS:
                f = fits[m][r]
                row[f"mse_{m}"] = float(np.mean((f.rare_proba(d.X) - d.rare_prob) ** 2))
                row[f"mse_fresh_{m}"] = float(np.mean((f.rare_proba(fresh) - true_fresh) ** 2))
            presto, cv = fits["presto"][r], fits["cv"]
            row["lambda_index"] = int(cv.best[r])
            row["lambda"] = float(cv.lambdas[r, cv.best[r]])
            row["converged"] = bool(cv.converged[r])
            row["crossing_fresh"] = ordinal.crossing_fraction(presto.alpha, presto.beta, fresh)
            true, est = np.diff(d.beta, axis=1), np.diff(presto.beta, axis=1)
            row["diff_true_nonzero"] = int((true != 0).sum())
            row["diff_found"] = int(((true != 0) & (np.abs(est) > 1e-8)).sum())
            row["diff_added"] = int(((true == 0) & (np.abs(est) > 1e-8)).sum())
            rows.append(row)
            j, k = np.meshgrid(np.arange(p), np.arange(1, K - 1), indexing="ij")
            diffs.append(pd.DataFrame({"seed": int(s), "feature": j.ravel(), "boundary": k.ravel(),
                                       "true": true.ravel(), "presto": est.ravel()}))
    return SettingRun(pd.DataFrame(rows), pd.concat(diffs, ignore_index=True))


# -------------------------------------------------------------------------------------------------
# Real data


def osce(actual, predicted, n_bins: int | None = None) -> float:
    """The authors' equal-frequency calibration error of rare-class probabilities: rows sorted
    by `predicted`, cut into `n_bins` bins (default max(round(n / 100), 10); the first n mod
    n_bins bins one row larger), mean over rows of (prediction - its bin's rare frequency)^2."""
    actual, predicted = _check_binary(actual, predicted)
    order = np.argsort(predicted, kind="stable")
    bins = _bin_of_sorted(len(actual), n_bins)
    observed = np.bincount(bins, weights=actual[order]) / np.bincount(bins)
    return float(np.mean((predicted[order] - observed[bins]) ** 2))


def osce_as_coded(actual, predicted, n_bins: int | None = None) -> float:
    """The same quantity as the authors' script computes it: each bin's observed frequency is
    paired with the predictions at the bin's positions of the unsorted vector (their getOCE
    indexes `predicted[j]` where the sorted value was meant). Reported beside `osce`."""
    actual, predicted = _check_binary(actual, predicted)
    order = np.argsort(predicted, kind="stable")
    bins = _bin_of_sorted(len(actual), n_bins)
    observed = np.bincount(bins, weights=actual[order]) / np.bincount(bins)
    return float(np.mean((predicted - observed[bins]) ** 2))


def _check_binary(actual, predicted) -> tuple[np.ndarray, np.ndarray]:
    actual = np.asarray(actual, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    if actual.shape != predicted.shape or actual.ndim != 1 or len(actual) == 0:
        raise ValueError(f"need one prediction per outcome, got {actual.shape} outcomes and "
                         f"{predicted.shape} predictions")
    if not (np.isin(actual, (0.0, 1.0)).all() and np.isfinite(predicted).all()):
        raise ValueError("outcomes must be 0/1 and predictions finite")
    if (predicted < 0).any() or (predicted > 1).any():
        raise ValueError("predicted probabilities must lie in [0, 1]")
    return actual, predicted


def _bin_of_sorted(n: int, n_bins: int | None) -> np.ndarray:
    n_bins = max(round(n / 100), 10) if n_bins is None else int(n_bins)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    n_bins = min(n, n_bins)
    q, r = divmod(n, n_bins)
    sizes = np.full(n_bins, q)
    sizes[:r] += 1
    return np.repeat(np.arange(n_bins), sizes)


REAL = {  # the rare class of each bundled ordinal dataset, at the start of its order
    "reviews": {"rare": 0, "what": "clothing review rating (one star rare), TF-IDF SVD features"},
    "diamonds_cut": {"rare": 0, "what": "diamond cut grade (Fair rare), the other columns"},
}


def load_real(name: str, n_components: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A bundled ordinal dataset with its rare end class last; for `reviews`, the first
    `n_components` SVD components of the text (all 64 by default)."""
    from repsuite import data

    if name not in REAL:
        raise ValueError(f"no rare-class setup for {name!r}; known: {sorted(REAL)}")
    X, y = data.load(name)
    if name == "reviews" and n_components is not None:
        if not 1 <= n_components <= X.shape[1]:
            raise ValueError(f"n_components must be in 1..{X.shape[1]}, got {n_components}")
        X = X[:, :n_components]
    return X, rare_last(y, REAL[name]["rare"])


def rare_last(y, rare: int) -> np.ndarray:
    """Labels re-coded so that the rare end class `rare` (0 or K-1) comes last."""
    y = np.asarray(y, dtype=np.int64)
    K = int(y.max()) + 1
    if rare not in (0, K - 1):
        raise ValueError(f"the rare class must be an end of the order (0 or {K - 1}), got {rare}")
    return K - 1 - y if rare == 0 else y


def real_splits(X, y, n_train: int, n_test: int, seeds) -> list[tuple[np.ndarray, np.ndarray]]:
    """One (train rows, test rows) pair per seed: `n_train` rows drawn at random for training
    and `n_test` others for testing (0: all the others); redrawn until every class occurs in
    both (as the authors' splitter)."""
    n, K = len(y), int(np.max(y)) + 1
    n_test = n - n_train if n_test == 0 else n_test
    if n_train < 2 * K or n_test < 1 or n_train + n_test > n:
        raise ValueError(f"{n} rows cannot give {n_train} training and {n_test} test rows")
    out = []
    for s in seeds:
        rng = np.random.default_rng(int(s))
        for _ in range(100):
            perm = rng.permutation(n)
            train, test = perm[:n_train], perm[n_train:n_train + n_test]
            if len(np.unique(y[train])) == K and len(np.unique(y[test])) == K:
                out.append((np.sort(train), np.sort(test)))
                break
        else:
            raise RuntimeError(f"seed {s}: no split with every class on both sides in 100 draws")
    return out


def run_real(X, y, seeds, *, n_train: int, n_test: int, n_lambda: int = 20,
             lambda_min_ratio: float = 0.01, n_folds: int = 5, chunk: int = 10, device=None,
             progress: bool = False, name: str = "") -> pd.DataFrame:
    """PRESTO and the baselines on random training subsets of a real dataset (rare class last),
    one row per seed: the authors' calibration error (`osce`), the same as their script computes
    it, and two proper scores of the rare-class probability on the test rows (Brier, log loss)."""
    X, y, K = ordinal.check_ordinal(X, y)
    splits = real_splits(X, y, n_train, n_test, seeds)
    rows = []
    chunks = [list(range(i, min(i + chunk, len(seeds)))) for i in range(0, len(seeds), chunk)]
    for part in bar(chunks, enabled=progress, desc=name or "real data", leave=False):
        data = [(X[splits[i][0]], y[splits[i][0]]) for i in part]
        fits = fit_methods(data, [int(seeds[i]) for i in part], n_lambda=n_lambda,
                           lambda_min_ratio=lambda_min_ratio, n_folds=n_folds, device=device,
                           hessian_dtype=torch.float32, **SOLVER)
        for r, i in enumerate(part):
            test = splits[i][1]
            actual = (y[test] == K - 1).astype(np.float64)
            row = {"seed": int(seeds[i]), "rare_train": float(np.mean(data[r][1] == K - 1)),
                   "rare_test": float(actual.mean()),
                   "lambda_index": int(fits["cv"].best[r])}
            for m in METHODS:
                f = fits[m][r]
                prob = f.rare_proba(X[test])
                row[f"osce_{m}"] = osce(actual, prob)
                row[f"osce_coded_{m}"] = osce_as_coded(actual, prob)
                row[f"brier_{m}"] = float(np.mean((prob - actual) ** 2))
                clipped = np.clip(prob, 1e-12, 1 - 1e-12)
                row[f"logloss_{m}"] = float(-np.mean(actual * np.log(clipped)
                                                     + (1 - actual) * np.log1p(-clipped)))
            row["crossing_test"] = ordinal.crossing_fraction(fits["presto"][r].alpha,
                                                             fits["presto"][r].beta, X[test])
            rows.append(row)
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------------------------------
# Tables


def paired(table: pd.DataFrame, metric: str, method: str = "presto",
           baselines=("logit", "po")) -> pd.DataFrame:
    """Per baseline: mean metric of `method` and of the baseline, the paired difference and the
    paired log ratio (method / baseline) with 95% t intervals, and the share of seeds where
    `method` is lower."""
    out = {}
    ours = table[f"{metric}_{method}"].to_numpy()
    for b in baselines:
        base = table[f"{metric}_{b}"].to_numpy()
        diff, ratio = mean_ci(ours - base), mean_ci(np.log(ours / base))
        out[b] = {f"{method}": ours.mean(), "baseline": base.mean(), "diff": diff["mean"],
                  "diff lo": diff["ci95"][0], "diff hi": diff["ci95"][1],
                  "ratio": float(np.exp(ratio["mean"])),
                  "ratio lo": float(np.exp(ratio["ci95"][0])),
                  "ratio hi": float(np.exp(ratio["ci95"][1])),
                  "wins": float(np.mean(ours < base))}
    return pd.DataFrame(out).T


def log_ratio_check(ours, baseline) -> dict:
    """The paired test on log(ours / baseline) per seed (errors are skewed, so a ratio test is
    reported beside the test on raw differences): its interval and verdict for `less`."""
    from repsuite.stats import Criterion, judge

    ratio = np.log(np.asarray(ours, dtype=float) / np.asarray(baseline, dtype=float))
    verdict, interval = judge(Criterion("less", threshold=0.0), ratio)
    return {"log_ratio": interval, "log_ratio_verdict": verdict,
            "geometric_mean_ratio": float(np.exp(ratio.mean()))}


def summary(table: pd.DataFrame, metric: str) -> dict:
    """Mean with 95% interval and median of each method's metric, for the metrics file."""
    out = {}
    for m in METHODS:
        v = table[f"{metric}_{m}"].to_numpy()
        s = mean_ci(v)
        out[m] = {"mean": s["mean"], "ci95": s["ci95"], "median": float(np.median(v))}
    return out
