"""Group fairness metrics on stored predictions.

Every function takes plain arrays: `y_true` (0/1), `y_pred` (hard 0/1 predictions, or scores in
[0, 1] where a rate is a mean) and `group` (one integer code or label per row). Differences follow
fairlearn's conventions: the largest minus the smallest per-group value, and for equalized odds the
larger of the true-positive-rate and false-positive-rate gaps. Errors name the group at fault.
"""

import numpy as np
import pandas as pd


def _vector(values, name: str, n: int | None = None) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if n is not None and len(array) != n:
        raise ValueError(f"{name} has {len(array)} rows but the predictions have {n}")
    if array.dtype.kind in "fc" and np.isnan(array).any():
        rows = np.flatnonzero(np.isnan(array))[:5].tolist()
        raise ValueError(f"{name} contains NaN (first rows: {rows})")
    return array


def check_groups(group, n: int | None = None, name: str = "group") -> np.ndarray:
    """The group column as a 1-D array, checked: right length, no NaN, at least two groups."""
    group = _vector(group, name, n)
    if len(group) == 0:
        raise ValueError(f"{name} is empty")
    if len(np.unique(group)) < 2:
        raise ValueError(f"{name} has a single group ({group[0]!r}); a gap needs at least two")
    return group


def check_labels(y, name: str, n: int | None = None) -> np.ndarray:
    y = _vector(y, name, n)
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise ValueError(f"{name} must be 0/1 labels; found {np.unique(y[bad])[:5].tolist()}")
    return y.astype(np.int64)


def check_scores(y_pred, n: int | None = None) -> np.ndarray:
    y_pred = _vector(y_pred, "y_pred", n).astype(np.float64)
    if (y_pred < 0).any() or (y_pred > 1).any():
        raise ValueError("y_pred must be 0/1 predictions or scores in [0, 1]")
    return y_pred


def selection_rates(y_pred, group) -> dict:
    """Mean prediction of each group: the share predicted positive, or the mean score."""
    y_pred = check_scores(y_pred)
    group = check_groups(group, len(y_pred))
    return {g.item(): float(y_pred[group == g].mean()) for g in np.unique(group)}


def demographic_parity_difference(y_pred, group) -> float:
    rates = selection_rates(y_pred, group).values()
    return max(rates) - min(rates)


def demographic_parity_ratio(y_pred, group) -> float:
    rates = selection_rates(y_pred, group).values()
    return min(rates) / max(rates) if max(rates) > 0 else 1.0


def _conditional_rates(y_true, y_pred, group, label: int) -> dict:
    y_pred = check_scores(y_pred)
    y_true = check_labels(y_true, "y_true", len(y_pred))
    group = check_groups(group, len(y_pred))
    rates = {}
    for g in np.unique(group):
        rows = (group == g) & (y_true == label)
        if not rows.any():
            kind = "positives" if label == 1 else "negatives"
            raise ValueError(f"group {g.item()!r} has no {kind} (y_true == {label}), so its "
                             f"{'true' if label == 1 else 'false'}-positive rate is undefined")
        rates[g.item()] = float(y_pred[rows].mean())
    return rates


def true_positive_rates(y_true, y_pred, group) -> dict:
    return _conditional_rates(y_true, y_pred, group, 1)


def false_positive_rates(y_true, y_pred, group) -> dict:
    return _conditional_rates(y_true, y_pred, group, 0)


def _gap(rates: dict) -> float:
    return max(rates.values()) - min(rates.values())


def equal_opportunity_difference(y_true, y_pred, group) -> float:
    return _gap(true_positive_rates(y_true, y_pred, group))


def equalized_odds_difference(y_true, y_pred, group) -> float:
    return max(_gap(true_positive_rates(y_true, y_pred, group)),
               _gap(false_positive_rates(y_true, y_pred, group)))


def expected_calibration_error(y_true, scores, n_bins: int = 10) -> float:
    """Mean |observed positive rate - mean score| over equal-width score bins, weighted by size."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    scores = check_scores(scores)
    y_true = check_labels(y_true, "y_true", len(scores))
    if len(scores) == 0:
        raise ValueError("no rows to calibrate")
    bins = np.minimum((scores * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        rows = bins == b
        total += rows.sum() * abs(y_true[rows].mean() - scores[rows].mean())
    return float(total / len(scores))


def group_report(y_true, y_pred, group, scores=None, levels=None, n_bins: int = 10) -> pd.DataFrame:
    """Per group: size, base rate, selection rate, TPR, FPR, error rate (and ECE given scores).

    A rate that a group cannot have (no positives for the TPR) is NaN here, not an error, so that a
    report of a small window still shows the rest; the gap functions above raise instead.
    """
    y_pred = check_scores(y_pred)
    y_true = check_labels(y_true, "y_true", len(y_pred))
    group = check_groups(group, len(y_pred))
    if scores is not None:
        scores = check_scores(scores, len(y_pred))
    rows = []
    for g in np.unique(group):
        m = group == g
        yt, yp = y_true[m], y_pred[m]
        row = {"group": levels[g] if levels is not None else g.item(), "n": int(m.sum()),
               "base_rate": yt.mean(), "selection_rate": yp.mean(),
               "tpr": yp[yt == 1].mean() if (yt == 1).any() else np.nan,
               "fpr": yp[yt == 0].mean() if (yt == 0).any() else np.nan,
               "error": np.abs(yt - yp).mean()}
        if scores is not None:
            row["ece"] = expected_calibration_error(yt, scores[m], n_bins)
        rows.append(row)
    return pd.DataFrame(rows).set_index("group")
