"""The quantile-aggregation experiments: random train / calibration / test splits of a dataset, a
cross-fitted library of base models, every aggregator, and the tables behind the claims (WIS of
every method per split, crossing and the effect of sorting or isotonic regression, coverage of
the central intervals before and after conformal calibration).

Methods, by the names used in every table:
    linear, mlp, knn, qrf, gbm   the base models (see `quantile_aggregation`)
    best-base     per split, the base model with the lowest out-of-fold WIS (chosen without
                  looking at the test rows)
    mean, median  the library averaged (or its median taken) level by level
    global-coarse ... local-fine  the learned aggregators; a suffix `+sort` or `+isotonic`
                  marks one trained with that rearrangement inside its loss
    selected      per split, the learned aggregator with the lowest validation WIS
    oracle        the true conditional quantiles (synthetic data only)
Unless a column says otherwise, a method's quantiles are sorted before scoring (post-hoc
rearrangement, which the paper proves can only lower the WIS); `wis_raw` is before sorting.
"""

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from repsuite.regression import quantile as Q
from repsuite.regression import quantile_aggregation as QA

# -------------------------------------------------------------------------------------------------
# Data


def heteroscedastic(n: int, d: int = 5, *, seed: int = 0, shape: float = 2.0):
    """Synthetic data with known conditional quantiles: x uniform on [0, 1]^d (d >= 4),
    y = f(x) + sigma(x) eps, f(x) = 2 sin(pi x1) + 2 x2 x3, sigma(x) = 0.1 + x4^2 + 0.5 x1, and a
    right-skewed eps (a Gamma(shape) variable centred and scaled to unit variance).
    Returns X, y and `quantiles(X, taus)`, the true quantiles (rows, levels)."""
    if d < 4 or n < 1:
        raise ValueError(f"need d >= 4 features and n >= 1 rows, got d={d}, n={n}")
    rng = np.random.default_rng(seed)
    X = rng.uniform(size=(n, d))

    def location_scale(X):
        f = 2 * np.sin(np.pi * X[:, 0]) + 2 * X[:, 1] * X[:, 2]
        return f, 0.1 + X[:, 3] ** 2 + 0.5 * X[:, 0]

    def quantiles(X, taus):
        f, sigma = location_scale(np.asarray(X, dtype=np.float64))
        eps = (sps.gamma.ppf(np.asarray(taus), shape) - shape) / np.sqrt(shape)
        return f[:, None] + sigma[:, None] * eps[None, :]

    f, sigma = location_scale(X)
    y = f + sigma * (rng.gamma(shape, size=n) - shape) / np.sqrt(shape)
    return X, y, quantiles


def load(name: str, *, n_synthetic: int = 20000, dim: int = 5, seed: int = 0):
    """(X, y, oracle): a bundled dataset (`repsuite.data.load`, oracle None) or `synthetic`,
    the heteroscedastic problem with known quantiles (a pool of n_synthetic rows)."""
    if name == "synthetic":
        return heteroscedastic(n_synthetic, dim, seed=seed)
    from repsuite import data

    X, y = data.load(name)
    if not np.issubdtype(np.asarray(y).dtype, np.floating):
        raise ValueError(f"dataset {name!r} has a class label, not a continuous response")
    return X, y, None


def split_sizes(n_available: int, n_rows: int | None = None, cal_frac: float = 0.2,
                test_frac: float = 0.2) -> tuple[int, int, int]:
    """(training, calibration, test) rows of every split of `make_splits`."""
    n = n_available if not n_rows else min(int(n_rows), n_available)
    n_cal, n_test = int(round(cal_frac * n)), int(round(test_frac * n))
    return n - n_cal - n_test, n_cal, n_test


def make_splits(X, y, *, n_splits: int, seed: int = 0, n_rows: int | None = None,
                cal_frac: float = 0.2, test_frac: float = 0.2, val_frac: float = 0.2,
                n_folds: int = 2, oracle=None) -> list[dict]:
    """`n_splits` random splits, split s drawn with seed + s: a random subset of `n_rows` rows
    (all when None), cut into training, calibration and test parts. Features and response are
    standardised with the training part's mean and standard deviation (as the official code
    does), so scores are in units of the response's standard deviation. Every split also holds
    `folds` (cross-fitting fold of each training row) and `val` (training rows held out for the
    aggregators' early stopping), and `oracle_test` when `oracle(X, taus)` is given (as a
    function of the levels, on the standardised scale)."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64).reshape(-1)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X must be (rows, features) with one y per row; got {X.shape}, "
                         f"{y.shape}")
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise ValueError("X or y contains NaN or infinite values")
    if not (0 < cal_frac and 0 < test_frac and cal_frac + test_frac < 1 and 0 < val_frac < 1):
        raise ValueError("need 0 < cal_frac, test_frac, cal_frac + test_frac < 1 and "
                         f"0 < val_frac < 1; got {cal_frac}, {test_frac}, {val_frac}")
    n_train, n_cal, n_test = split_sizes(len(y), n_rows, cal_frac, test_frac)
    n = n_train + n_cal + n_test
    if n_train < 10 * n_folds or n_cal < 10 or n_test < 10:
        raise ValueError(f"{n} rows are too few: {n_train} training rows for {n_folds} folds, "
                         f"{n_cal} calibration and {n_test} test rows (need 10 per part)")
    splits = []
    for s in range(n_splits):
        rng = np.random.default_rng(seed + s)
        rows = rng.permutation(len(y))[:n]
        parts = {"train": rows[:n_train], "cal": rows[n_train:n_train + n_cal],
                 "test": rows[n_train + n_cal:]}
        mu, sd = X[parts["train"]].mean(0), X[parts["train"]].std(0)
        sd = np.where(sd > 0, sd, 1.0)
        y_mu, y_sd = y[parts["train"]].mean(), y[parts["train"]].std()
        if y_sd == 0:
            raise ValueError(f"split {s}: the training response is constant")
        split = {"seed": seed + s, "y_mean": y_mu, "y_sd": y_sd}
        for part, idx in parts.items():
            split[f"X_{part}"] = (X[idx] - mu) / sd
            split[f"y_{part}"] = (y[idx] - y_mu) / y_sd
        split["folds"] = rng.permutation(n_train) % n_folds
        split["val"] = rng.permutation(n_train) < int(round(val_frac * n_train))
        if oracle is not None:
            test_rows = X[parts["test"]]
            split["oracle_test"] = lambda taus, r=test_rows, m=y_mu, v=y_sd: (
                (oracle(r, taus) - m) / v)
        splits.append(split)
    return splits


# -------------------------------------------------------------------------------------------------
# One dataset: library, aggregators, predictions


@dataclass
class Config:
    """Everything a run of one dataset needs, in the paper's terms. Global and local aggregators
    get their own optimiser settings (`batch_size` None: full batch)."""

    taus: list
    base_models: list = field(default_factory=lambda: ["linear", "mlp", "knn", "qrf"])
    aggregators: list = field(default_factory=lambda: [
        "global-coarse", "global-medium", "global-fine", "local-medium", "local-medium+sort"])
    n_folds: int = 2
    model_settings: dict = field(default_factory=dict)
    global_train: dict = field(default_factory=lambda: dict(steps=200, lr=0.05, batch_size=None))
    local_train: dict = field(default_factory=lambda: dict(steps=400, lr=0.01, batch_size=256))
    weight_decay: float = 1e-7
    eval_every: int = 20
    patience: int = 150
    agg_hidden: tuple = (64, 64)
    agg_dropout: float = 0.0
    seed: int = 0


def parse_aggregator(name: str) -> tuple[str, str]:
    """`local-medium+sort` -> (`local-medium`, `sort`); no suffix means `none`."""
    base, _, how = name.partition("+")
    if base not in QA.AGGREGATORS or (how or "none") not in Q.MONOTONISERS:
        raise ValueError(f"unknown aggregator {name!r}: use one of {sorted(QA.AGGREGATORS)}, "
                         f"optionally with +sort or +isotonic")
    return base, how or "none"


@dataclass
class DatasetRun:
    """Predictions of every method on one dataset's splits (standardised scale)."""

    name: str
    taus: np.ndarray
    y_cal: np.ndarray  # (S, n_cal)
    y_test: np.ndarray  # (S, n_test)
    cal: dict  # method -> (S, n_cal, K) raw quantiles
    test: dict  # method -> (S, n_test, K) raw quantiles
    oof_wis: dict  # base model -> (S,) out-of-fold WIS
    val_wis: dict  # aggregator -> (S,) validation WIS
    choice: dict  # best-base / selected -> list of the chosen method per split
    seconds: dict  # stage -> seconds (shown, never stored in the metrics)
    y_sd: np.ndarray  # (S,) the response's training standard deviation


def run_dataset(name: str, splits: list[dict], config: Config, *, device="cpu",
                progress=None) -> DatasetRun:
    """Cross-fit the library on every split, fit every aggregator on the out-of-fold
    predictions (all splits at once), and predict the calibration and test rows."""
    taus = Q.as_levels(config.taus).numpy()
    for a in config.aggregators:
        parse_aggregator(a)
    seconds = {}
    start = time.perf_counter()
    lib = QA.cross_fit_library(splits, taus, config.base_models, n_folds=config.n_folds,
                               settings=config.model_settings, device=device, seed=config.seed,
                               progress=progress)
    seconds["library"] = time.perf_counter() - start

    y_train = np.stack([sp["y_train"] for sp in splits])
    y_cal = np.stack([sp["y_cal"] for sp in splits])
    y_test = np.stack([sp["y_test"] for sp in splits])
    names = list(config.base_models)
    cal = {m: lib["cal"][:, :, j] for j, m in enumerate(names)}
    test = {m: lib["test"][:, :, j] for j, m in enumerate(names)}
    oof_wis = {m: _wis_per_split(Q.sort_quantiles(torch.as_tensor(lib["oof"][:, :, j])).numpy(),
                                 y_train, taus) for j, m in enumerate(names)}
    for part, store in (("cal", cal), ("test", test)):
        store["mean"] = QA.mean_ensemble(lib[part])
        store["median"] = QA.median_ensemble(torch.as_tensor(lib[part])).numpy()

    start = time.perf_counter()
    f32 = dict(dtype=torch.float32, device=device)
    X = {p: torch.stack([torch.as_tensor(sp[f"X_{p}"], **f32) for sp in splits])
         for p in ("train", "cal", "test")}
    Z = {p: torch.as_tensor(lib[k], **f32) for p, k in (("train", "oof"), ("cal", "cal"),
                                                         ("test", "test"))}
    y = torch.as_tensor(y_train, **f32)
    val = torch.as_tensor(np.stack([sp["val"] for sp in splits]), device=device)
    val_wis = {}
    for i, agg in enumerate(config.aggregators):
        base, how = parse_aggregator(agg)
        train = config.local_train if QA.AGGREGATORS[base]["local"] else config.global_train
        model, record = QA.fit_aggregator(
            base, X["train"], Z["train"], y, val, taus, **train,
            weight_decay=config.weight_decay, eval_every=config.eval_every,
            patience=config.patience, hidden=config.agg_hidden, dropout=config.agg_dropout,
            train_monotone=how, seed=config.seed + 101 * (i + 1))
        val_wis[agg] = record["val_loss"].double().cpu().numpy()
        for part, store in (("cal", cal), ("test", test)):
            store[agg] = QA.aggregate(model, X[part], Z[part]).double().cpu().numpy()
        if progress:
            progress()
    seconds["aggregators"] = time.perf_counter() - start

    # Choices made on training data only: out-of-fold WIS for the base models, the held-out
    # validation rows for the aggregators.
    choice = {"best-base": _pick(oof_wis), "selected": _pick(val_wis)}
    for method, picks in choice.items():
        for store in (cal, test):
            store[method] = np.stack([store[m][s] for s, m in enumerate(picks)])
    if "oracle_test" in splits[0]:
        test["oracle"] = np.stack([sp["oracle_test"](taus) for sp in splits])
    return DatasetRun(name, taus, y_cal, y_test, cal, test, oof_wis, val_wis, choice, seconds,
                      np.array([sp["y_sd"] for sp in splits]))


def _wis_per_split(q: np.ndarray, y: np.ndarray, taus) -> np.ndarray:
    return np.array([float(Q.wis(q[s], y[s], taus)) for s in range(len(q))])


def _pick(scores: dict) -> list[str]:
    names = list(scores)
    table = np.stack([scores[m] for m in names])
    return [names[i] for i in table.argmin(0)]


# -------------------------------------------------------------------------------------------------
# Scores of every method


def evaluate(run: DatasetRun, *, tol: float = 1e-9) -> pd.DataFrame:
    """One row per (split, method): WIS before and after sorting and isotonic regression, the
    share of test rows whose quantiles cross, the largest per-point WIS increase caused by either
    rearrangement (the paper's theorem says <= 0), coverage and width of the central intervals
    before and after split-conformal calibration (fitted on the calibration rows of the sorted
    quantiles), and the WIS after calibration (re-sorted)."""
    taus = run.taus
    rows = []
    for method, q_all in run.test.items():
        for s in range(len(q_all)):
            y = torch.as_tensor(run.y_test[s])
            raw = torch.as_tensor(q_all[s])
            per_point = {how: Q.wis(Q.monotonise(raw, how), y, taus, reduction="none")
                         for how in ("none", "sort", "isotonic")}
            sorted_q = Q.sort_quantiles(raw)
            row = {"dataset": run.name, "split": s, "method": method,
                   "wis": float(per_point["sort"].mean()),
                   "wis_raw": float(per_point["none"].mean()),
                   "wis_isotonic": float(per_point["isotonic"].mean()),
                   "crossing_rate": Q.crossing_rate(raw),
                   "max_increase_sort": float((per_point["sort"] - per_point["none"]).max()),
                   "max_increase_isotonic": float(
                       (per_point["isotonic"] - per_point["none"]).max())}
            row.update({f"coverage_{_pct(k)}": v for k, v in Q.coverage(sorted_q, y,
                                                                         taus).items()})
            row.update({f"width_{_pct(k)}": v for k, v in Q.interval_width(sorted_q,
                                                                            taus).items()})
            if method in run.cal:
                margins = Q.conformal_margins(Q.sort_quantiles(torch.as_tensor(run.cal[method][s])),
                                              run.y_cal[s], taus)
                calibrated = Q.apply_conformal(sorted_q, margins, taus)
                row.update({f"cal_coverage_{_pct(k)}": v
                            for k, v in Q.coverage(calibrated, y, taus).items()})
                row.update({f"cal_width_{_pct(k)}": v
                            for k, v in Q.interval_width(calibrated, taus).items()})
                row["wis_calibrated"] = float(Q.wis(Q.sort_quantiles(calibrated), y, taus))
            rows.append(row)
    table = pd.DataFrame(rows)
    table["theorem_holds"] = ((table.max_increase_sort <= tol)
                              & (table.max_increase_isotonic <= tol))
    return table


def _pct(nominal: float) -> str:
    return f"{round(100 * nominal):d}"


def per_split(table: pd.DataFrame, column: str = "wis") -> pd.DataFrame:
    """(split x method) of one column for one dataset's table."""
    return table.pivot(index="split", columns="method", values=column)


def relative(table: pd.DataFrame, method: str, reference: str, column: str = "wis"):
    """Per split, method's score over the reference's, minus 1 (negative: method is better)."""
    wide = per_split(table, column)
    for m in (method, reference):
        if m not in wide:
            raise KeyError(f"no method {m!r} in the table; have {sorted(wide.columns)}")
    return (wide[method] / wide[reference] - 1).to_numpy()


def pooled_relative(tables: dict, method: str, reference: str) -> np.ndarray:
    """`relative` averaged over datasets split by split (split s of every dataset): one number
    per split, as the paper averages relative scores over its datasets."""
    return np.mean([relative(t, method, reference) for t in tables.values()], axis=0)


def summary(table: pd.DataFrame, methods=None) -> pd.DataFrame:
    """Mean and 95% t interval over splits of the main columns, one row per method."""
    methods = methods or list(dict.fromkeys(table.method))
    out = {}
    for m in methods:
        t = table[table.method == m]
        n = len(t)
        half = (sps.t.ppf(0.975, n - 1) * t.wis.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
        out[m] = {"wis_mean": t.wis.mean(), "wis_ci95": [t.wis.mean() - half, t.wis.mean() + half],
                  "wis_raw": t.wis_raw.mean(), "wis_isotonic": t.wis_isotonic.mean(),
                  "crossing_rate": t.crossing_rate.mean()}
        for col in t.columns:
            if col.startswith(("coverage_", "cal_coverage_", "width_", "cal_width_")):
                out[m][col] = t[col].mean()
        if "wis_calibrated" in t:
            out[m]["wis_calibrated"] = t.wis_calibrated.mean()
    return pd.DataFrame(out).T


def coverage_curve(table: pd.DataFrame, method: str) -> pd.DataFrame:
    """Mean coverage over splits of every central interval, before and after calibration."""
    t = table[table.method == method]
    cols = sorted({int(c.split("_")[-1]) for c in t.columns if c.startswith("coverage_")})
    return pd.DataFrame({"nominal": [c / 100 for c in cols],
                         "before": [t[f"coverage_{c}"].mean() for c in cols],
                         "after": [t[f"cal_coverage_{c}"].mean() for c in cols]})


# -------------------------------------------------------------------------------------------------
# Speed (for `make bench`; nothing here is stored in a metrics file)


def bench(repeats: int = 3) -> list[tuple]:
    """Rows (case, our seconds, reference seconds or None, note) for the suite's bench table:
    the vectorised isotonic regression against scikit-learn row by row, and ten splits' local
    aggregators trained as one batch against the same ten trained one after another."""
    from sklearn.isotonic import IsotonicRegression

    from repsuite.timing import best_of

    rng = np.random.default_rng(0)
    q = np.sort(rng.normal(size=(5000, 19)), 1) + 0.5 * rng.normal(size=(5000, 19))
    ours = best_of(lambda: Q.isotonic_quantiles(torch.as_tensor(q)), repeats)
    ref = best_of(lambda: [IsotonicRegression().fit_transform(np.arange(19), r) for r in q], 1)
    rows = [("isotonic rearrangement, 5,000 rows x 19 levels", ours, ref,
             "scikit-learn IsotonicRegression, row by row")]

    S, n, M, K = 10, 1200, 4, 11
    g = torch.Generator().manual_seed(0)
    X, Z = torch.randn(S, n, 8, generator=g), torch.randn(S, n, M, K, generator=g).sort(-1).values
    y, val = torch.randn(S, n, generator=g), torch.rand(S, n, generator=g) < 0.2
    taus = np.linspace(0.05, 0.95, K)
    kw = dict(steps=100, lr=0.01, batch_size=256, eval_every=20, patience=1000)

    def batched():
        QA.fit_aggregator("local-medium", X, Z, y, val, taus, **kw)

    def one_by_one():
        for s in range(S):
            QA.fit_aggregator("local-medium", X[s:s + 1], Z[s:s + 1], y[s:s + 1],
                              val[s:s + 1], taus, **kw)

    rows.append(("10 local-medium aggregators, 1,200 rows, 4 models x 11 levels, 100 steps",
                 best_of(batched, repeats), best_of(one_by_one, 1),
                 "the same, one split at a time"))
    return rows
