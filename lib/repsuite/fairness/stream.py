"""Online learning on a data stream: stream orders, windows, prequential (predict-then-update)
bookkeeping, and running per-group means that never store the stream."""

import numpy as np
import pandas as pd
import torch

from repsuite.fairness.metrics import check_groups, check_labels, check_scores


def stream_order(n: int, seed: int, *, kind: str = "shuffle", key=None) -> np.ndarray:
    """The order in which `n` rows arrive: a seeded shuffle, or sorted by `key` (ties broken by the
    seeded shuffle) for an ordered stream whose distribution drifts along the key."""
    if n < 1:
        raise ValueError(f"a stream needs at least one row, got n={n}")
    order = np.random.default_rng(seed).permutation(n)
    if kind == "shuffle":
        return order
    if kind != "sorted":
        raise ValueError(f"kind must be 'shuffle' or 'sorted', got {kind!r}")
    if key is None:
        raise ValueError("kind='sorted' needs a key (one value per row)")
    key = np.asarray(key)
    if key.shape != (n,):
        raise ValueError(f"key must have one value per row ({n}), got shape {key.shape}")
    return order[np.argsort(key[order], kind="stable")]


def windows(n: int, size: int) -> list[slice]:
    """Consecutive windows of `size` rows; the last one holds the remainder."""
    if size < 1 or n < 1:
        raise ValueError(f"need n >= 1 and size >= 1, got n={n}, size={size}")
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def prequential(y_true, y_pred, group) -> pd.DataFrame:
    """Running online accuracy and demographic-parity gap after each step of a stream.

    Row t holds the accuracy of the predictions made at steps 0..t (each made before its label was
    used) and the gap between the highest and lowest per-group mean prediction so far; the gap is
    NaN while some group has not yet appeared.
    """
    y_pred = check_scores(y_pred)
    y_true = check_labels(y_true, "y_true", len(y_pred))
    group = check_groups(group, len(y_pred))
    steps = np.arange(1, len(y_pred) + 1)
    correct = 1.0 - np.abs(y_true - y_pred)
    means = []
    for g in np.unique(group):
        member = group == g
        count = np.cumsum(member)
        with np.errstate(invalid="ignore", divide="ignore"):
            means.append(np.where(count > 0, np.cumsum(y_pred * member) / count, np.nan))
    means = np.vstack(means)
    seen_all = ~np.isnan(means).any(axis=0)
    gap = np.full(len(y_pred), np.nan)
    gap[seen_all] = means[:, seen_all].max(axis=0) - means[:, seen_all].min(axis=0)
    return pd.DataFrame({"step": steps, "online_accuracy": np.cumsum(correct) / steps,
                         "dp_gap": gap})


class RunningGroupMeans:
    """Per-group running means of a tensor-valued statistic, updated without storing the stream.

    With `momentum=None` the mean is the plain average of everything seen; with a momentum m in
    (0, 1) it is an exponential moving average, mean <- m * mean + (1 - m) * new (started at the
    first value seen). Only the means and counts are kept.

    One stream: `update(values (b, *shape), groups (b,))` folds in a batch. Several streams at
    once (`runs=R`, e.g. one per stream order or per fairness weight, each with its own group
    sequence): `update(values (R, *shape), groups (R,))` folds in one row per stream, and means,
    counts and gaps gain a leading run axis.
    """

    def __init__(self, n_groups: int, shape=(), momentum: float | None = None,
                 runs: int | None = None, device=None, dtype=torch.float32):
        if n_groups < 2:
            raise ValueError(f"need at least two groups, got {n_groups}")
        if momentum is not None and not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum must be in (0, 1) or None, got {momentum}")
        if runs is not None and runs < 1:
            raise ValueError(f"runs must be at least 1 (or None for one stream), got {runs}")
        self.n_groups, self.momentum, self.runs = n_groups, momentum, runs
        self.shape = tuple(shape) if not isinstance(shape, int) else (shape,)
        lead = () if runs is None else (runs,)
        self.means = torch.zeros((*lead, n_groups, *self.shape), device=device, dtype=dtype)
        self.counts = torch.zeros((*lead, n_groups), device=device, dtype=torch.long)

    def _check(self, values: torch.Tensor, groups: torch.Tensor) -> None:
        rows = "runs" if self.runs is not None else "batch"
        if values.shape != (len(groups), *self.shape):
            raise ValueError(f"values must have shape ({rows}, *{self.shape}) with one group code "
                             f"a row ({len(groups)} given), got {tuple(values.shape)}")
        if self.runs is not None and len(groups) != self.runs:
            raise ValueError(f"one row per run is needed: {self.runs} runs, {len(groups)} rows")
        if torch.isnan(values).any():
            raise ValueError("values contain NaN")
        if len(groups) and (groups.min() < 0 or groups.max() >= self.n_groups):
            raise ValueError(f"group codes must be in 0..{self.n_groups - 1}, got "
                             f"{groups.min().item()}..{groups.max().item()}")

    def update(self, values: torch.Tensor, groups) -> None:
        values = values.detach().to(self.means)
        groups = torch.as_tensor(groups, device=self.means.device).long().reshape(-1)
        self._check(values, groups)
        if self.runs is not None:
            self._update_runs(values, groups)
            return
        batch_counts = torch.bincount(groups, minlength=self.n_groups)
        sums = torch.zeros_like(self.means).index_add_(0, groups, values)
        present = batch_counts > 0
        shape = (-1,) + (1,) * len(self.shape)
        batch_means = sums[present] / batch_counts[present].reshape(shape).to(sums)
        if self.momentum is None:
            total = (self.counts[present] + batch_counts[present]).reshape(shape).to(sums)
            old = self.counts[present].reshape(shape).to(sums)
            self.means[present] = (self.means[present] * old + sums[present]) / total
        else:
            first = (self.counts[present] == 0).reshape(shape)
            ema = self.momentum * self.means[present] + (1 - self.momentum) * batch_means
            self.means[present] = torch.where(first, batch_means, ema)
        self.counts += batch_counts

    def _update_runs(self, values: torch.Tensor, groups: torch.Tensor) -> None:
        # Dense over (run, group): mean += w * (value - mean), with w = 1 / count for the plain
        # average and 1 - momentum (1 at a group's first row) for the moving average.
        onehot = torch.nn.functional.one_hot(groups, self.n_groups)
        self.counts += onehot
        hit = onehot.to(self.means)
        if self.momentum is None:
            w = hit / self.counts.clamp(min=1).to(self.means)
        else:
            w = torch.where(self.counts == 1, hit, hit * (1 - self.momentum))
        w = w.reshape(*w.shape, *(1,) * len(self.shape))
        self.means += w * (values[:, None] - self.means)

    def count(self, g: int):
        """Rows of group g seen so far (per run with `runs`)."""
        return int(self.counts[g]) if self.runs is None else self.counts[:, g]

    def seen(self, *groups: int):
        """Whether every given group has appeared (per run with `runs`)."""
        return (self.counts[..., list(groups)] > 0).all(-1)

    def mean(self, g: int) -> torch.Tensor:
        """Group g's running mean. With one stream, an unseen group is an error; with `runs`, the
        rows of runs that have not seen it yet are zero (mask them with `seen`)."""
        if not 0 <= g < self.n_groups:
            raise ValueError(f"group code must be in 0..{self.n_groups - 1}, got {g}")
        if self.runs is not None:
            return self.means[:, g]
        if self.counts[g] == 0:
            raise ValueError(f"group {g} has not appeared in the stream yet; its mean is undefined")
        return self.means[g]

    def gap(self, a: int = 1, b: int = 0) -> torch.Tensor:
        return self.mean(a) - self.mean(b)
