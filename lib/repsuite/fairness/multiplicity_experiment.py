"""The experiments of the predictive-multiplicity notebook, on top of `multiplicity`.

- `audit`: one dataset over seeds (one stratified split each): baseline, viable prediction ranges
  of sampled training points over a grid of eps, ambiguity and discrepancy, the ranges that
  sampled competing models reach, and per-group summaries for the sensitive attributes.
- `data_characteristics`: the same measures on synthetic data whose label noise, class
  separation or majority-minority structure is set, at one absolute eps.
"""

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from repsuite import data
from repsuite.fairness import metrics
from repsuite.fairness import multiplicity as M
from repsuite.progress import bar
from repsuite.stats import mean_ci


@dataclass
class Dataset:
    name: str
    X: np.ndarray
    y: np.ndarray
    groups: dict = field(default_factory=dict)  # attr -> codes
    levels: dict = field(default_factory=dict)  # attr -> level names


def load_dataset(name: str) -> Dataset:
    """A fairness table with its sensitive attributes, or a plain dataset without any."""
    try:
        t = data.load_table(name)
    except ValueError:
        X, y = data.load(name)
        return Dataset(name, np.asarray(X, np.float64), np.asarray(y, np.int64))
    return Dataset(name, t.X, t.y, dict(t.groups), dict(t.levels))


def standardise(X_train, X_other):
    """Scale with the training split's mean and standard deviation (constant columns kept)."""
    mu, sd = X_train.mean(0), X_train.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return (X_train - mu) / sd, (X_other - mu) / sd


@dataclass
class Audit:
    summary: pd.DataFrame  # one row per (seed, eps)
    points: pd.DataFrame  # one row per (seed, eps, target point)
    sampled: pd.DataFrame  # one row per (seed, sampler)
    fairness: pd.DataFrame  # one row per (seed, attribute, group) at eps_main


def audit(ds: Dataset, *, seeds, eps_grid, eps_main: float, delta: float, C: float,
          test_size: float, n_points: int, points: str, samplers: dict, device,
          chunk: int = 4096, progress: bool = True) -> Audit:
    """Viable prediction ranges and the multiplicity measures of `ds`, one split per seed.

    `n_points` target points (0: all) are drawn from the training split (`points="train"`) or
    the test split; `samplers` maps "bootstrap", "sgd" and "perturbed" to their settings
    ({"n": models, ...}); sampled models are checked against the level set at `eps_main`.
    """
    if points not in {"train", "test"}:
        raise ValueError(f"points must be 'train' or 'test', got {points!r}")
    eps_grid = sorted({float(e) for e in eps_grid} | {float(eps_main)})
    summary, frames, sampled, fair = [], [], [], []
    for seed in bar(seeds, enabled=progress, desc=ds.name, leave=False):
        rows = np.arange(len(ds.y))
        train, test = train_test_split(rows, test_size=test_size, random_state=seed,
                                       stratify=ds.y)
        X_train, X_test = standardise(ds.X[train], ds.X[test])
        obj = M.make_objective(X_train, ds.y[train], l2=M.l2_from_C(C, len(train)),
                               device=device)
        w0 = M.fit(obj)[0]
        L0 = float(obj.loss(w0))
        pool, pool_X = (train, X_train) if points == "train" else (test, X_test)
        rng = np.random.default_rng(seed)
        pick = (np.sort(rng.choice(len(pool), n_points, replace=False))
                if 0 < n_points < len(pool) else np.arange(len(pool)))
        Zt = obj.rows(pool_X[pick])
        acc = {name: float(((M.model_probabilities(w0[None], obj.rows(Xs))[0] >= 0.5)
                            == ds.y[idx]).mean())
               for name, Xs, idx in (("train_acc", X_train, train), ("test_acc", X_test, test))}
        ranges, warm = {}, None
        for eps in eps_grid:
            r = M.viable_ranges(obj, w0, Zt, eps, warm=warm, L0=L0, chunk=chunk)
            ranges[eps], warm = r, r
            p0, lo, hi = r.probabilities()
            P = M.model_probabilities(r.models(), Zt)
            summary.append({
                "dataset": ds.name, "seed": seed, "eps": eps, "eps_relative": eps / L0,
                "baseline_loss": L0, **acc, "mean_width": float(np.mean(hi - lo)),
                "median_width": float(np.median(hi - lo)),
                f"frac_width_ge_{delta:g}": float(np.mean(hi - lo >= delta)),
                f"ambiguity_{delta:g}": M.ambiguity(p0, lo, hi, delta),
                f"discrepancy_{delta:g}": M.discrepancy(p0, P, delta),
                "max_constraint_gap": float((r.losses - L0 - eps).abs().max()),
                "iterations": r.iterations})
            frame = pd.DataFrame({"dataset": ds.name, "seed": seed, "eps": eps,
                                  "point": pool[pick], "y": ds.y[pool[pick]], "p0": p0,
                                  "p_min": lo, "p_max": hi})
            for attr, codes in ds.groups.items():
                frame[attr] = [ds.levels[attr][c] for c in codes[pool[pick]]]
            frames.append(frame)
        r = ranges[float(eps_main)]
        sampled += _sampled(ds.name, seed, obj, w0, L0, eps_main, delta, Zt, r, samplers)
        fair += _fairness(ds, seed, obj, w0, r, X_test, test, pool[pick], delta)
    return Audit(pd.DataFrame(summary), pd.concat(frames, ignore_index=True),
                 pd.DataFrame(sampled), pd.DataFrame(fair))


def _sampled(name, seed, obj, w0, L0, eps, delta, Zt, r, samplers) -> list[dict]:
    """Ranges reached by sampled competing models inside the level set, against the exact ones."""
    p0, lo, hi = r.probabilities()
    make = {
        "bootstrap": lambda s, **kw: M.bootstrap_models(obj, kw["n"], seed=s, w0=w0),
        "sgd": lambda s, **kw: M.sgd_models(obj, kw["n"], seed=s, epochs=kw["epochs"],
                                            lr=kw["lr"], batch_size=kw["batch_size"]),
        "perturbed": lambda s, **kw: M.perturbed_models(obj, w0, eps, kw["n"], seed=s),
    }
    unknown = set(samplers) - set(make)
    if unknown:
        raise ValueError(f"unknown samplers {sorted(unknown)}; choose from {sorted(make)}")
    kept, rows = {}, []
    for k, (kind, settings) in enumerate(samplers.items()):
        # Each sampler draws from its own stream, fixed by the split's seed.
        W = make[kind](1000 * seed + k, **settings)
        inside = M.in_level_set(obj, W, L0, eps)
        kept[kind] = W[inside]
        rows.append(_sampled_row(name, seed, kind, len(W), kept[kind], w0, Zt, p0, lo, hi, delta))
    practice = [k for k in ("bootstrap", "sgd") if k in kept]
    if practice:
        W = torch.cat([kept[k] for k in practice])
        rows.append(_sampled_row(name, seed, "+".join(practice), sum(r["drawn"] for r in rows
                                 if r["sampler"] in practice), W, w0, Zt, p0, lo, hi, delta))
    return rows


def _sampled_row(name, seed, kind, drawn, W, w0, Zt, p0, lo, hi, delta) -> dict:
    s_lo, s_hi = M.sampled_ranges(W, Zt, w0)
    width, exact = s_hi - s_lo, hi - lo
    inside = (s_lo >= lo - 1e-4) & (s_hi <= hi + 1e-4)
    return {"dataset": name, "seed": seed, "sampler": kind, "drawn": drawn, "kept": len(W),
            "mean_width": float(width.mean()), "exact_mean_width": float(exact.mean()),
            "width_ratio": float(width.mean() / exact.mean()) if exact.mean() > 0 else np.nan,
            f"ambiguity_{delta:g}": M.ambiguity(p0, s_lo, s_hi, delta),
            "containment": float(inside.mean())}


def _fairness(ds, seed, obj, w0, r, X_test, test, targets, delta) -> list[dict]:
    """Per group: the baseline's test report, and the ranges of its target points; plus the
    spread of the demographic-parity gap over the extreme models found for the ranges."""
    rows = []
    p0, lo, hi = r.probabilities()
    P_test = M.model_probabilities(torch.cat([w0[None], r.models()]), obj.rows(X_test))
    for attr, codes in ds.groups.items():
        g_test, g_pts = codes[test], codes[targets]
        report = metrics.group_report(ds.y[test], (P_test[0] >= 0.5).astype(float), g_test,
                                      scores=P_test[0], levels=ds.levels[attr])
        gaps = [metrics.demographic_parity_difference((p >= 0.5).astype(float), g_test)
                for p in P_test]
        for code, level in enumerate(ds.levels[attr]):
            mask = g_pts == code
            if not mask.any():
                continue
            rep = report.loc[level].to_dict()
            reach = np.maximum(hi[mask] - p0[mask], p0[mask] - lo[mask])
            rows.append({"dataset": ds.name, "seed": seed, "attribute": attr, "group": level,
                         "n_targets": int(mask.sum()), "mean_width": float(np.mean(
                             hi[mask] - lo[mask])), f"ambiguity_{delta:g}": float(np.mean(
                             reach >= delta - 1e-12)), "test_n": rep["n"],
                         "test_error": rep["error"], "test_selection_rate": rep["selection_rate"],
                         "dp_gap_baseline": gaps[0], "dp_gap_min": min(gaps),
                         "dp_gap_max": max(gaps)})
    return rows


def data_characteristics(conditions: dict, *, seeds, n: int, dim: int, eps: float,
                         delta: float, C: float, device, progress: bool = True) -> pd.DataFrame:
    """Mean width and ambiguity of every training point, per condition, seed and group.

    `conditions` maps a name to keyword arguments of `multiplicity.make_synthetic`; the same
    absolute eps is used everywhere, so that the budget itself does not vary with the loss."""
    rows = []
    for name, kw in bar(conditions.items(), enabled=progress, desc="synthetic", leave=False):
        for seed in seeds:
            X, y, group = M.make_synthetic(n, seed=seed, dim=dim, **kw)
            obj = M.make_objective(X, y, l2=M.l2_from_C(C, n), device=device)
            w0 = M.fit(obj)[0]
            r = M.viable_ranges(obj, w0, obj.rows(X), eps)
            p0, lo, hi = r.probabilities()
            reach = np.maximum(hi - p0, p0 - lo)
            for g in ["all"] + ([0, 1] if group.any() else []):
                mask = np.ones(n, bool) if g == "all" else group == g
                rows.append({"condition": name, "seed": seed,
                             "group": g if g == "all" else ("majority", "minority")[g],
                             "n": int(mask.sum()), "baseline_loss": float(obj.loss(w0)),
                             "mean_width": float(np.mean(hi[mask] - lo[mask])),
                             f"ambiguity_{delta:g}": float(np.mean(reach[mask] >= delta - 1e-12))})
    return pd.DataFrame(rows)


def paired(frame: pd.DataFrame, column: str, key: str, value_a, value_b, by: str = "seed"):
    """Per-seed values of `column` where `key == value_a` and `key == value_b`, aligned by seed."""
    a = frame[frame[key] == value_a].set_index(by)[column]
    b = frame[frame[key] == value_b].set_index(by)[column]
    common = a.index.intersection(b.index)
    if len(common) == 0:
        raise ValueError(f"no {by} has both {key} = {value_a!r} and {value_b!r}")
    return a.loc[common].to_numpy(), b.loc[common].to_numpy()


def mean_ci_table(frame: pd.DataFrame, by, columns, sort: bool = False) -> pd.DataFrame:
    """Mean and 95% t interval over seeds of each column, per group of `by`, as text."""
    def cell(values):
        s = mean_ci(values)
        lo, hi = s["ci95"]
        return f"{s['mean']:.3f} [{lo:.3f}, {hi:.3f}]"

    return frame.groupby(by, sort=sort)[list(columns)].agg(cell)
