"""Aggregation rules for client updates stacked as rows of `deltas` (k, P).

Each rule checks that it can tolerate the stated number of Byzantine workers and raises a
ValueError with the numbers otherwise; updates or weights that are NaN, infinite or all zero are
an error, never a NaN result. `as_rule` turns any of them into the server's aggregation
signature `(deltas, weights, round, info) -> delta`.
"""

import math
from collections.abc import Callable

import numpy as np
import torch


def _deltas(deltas) -> torch.Tensor:
    if not isinstance(deltas, torch.Tensor):
        deltas = torch.as_tensor(deltas)
    if deltas.dim() != 2:
        raise ValueError(f"deltas must be 2-D (workers, parameters), got shape "
                         f"{tuple(deltas.shape)}")
    if len(deltas) == 0:
        raise ValueError("deltas has no rows: there is no update to aggregate")
    if not deltas.is_floating_point():
        deltas = deltas.double()
    bad = (~torch.isfinite(deltas)).any(1).nonzero().reshape(-1)
    if len(bad):
        raise ValueError(f"updates of rows {bad[:10].tolist()} contain NaN or inf")
    return deltas


def _byzantine(f, n: int) -> int:
    if not isinstance(f, int | np.integer) or isinstance(f, bool) or f < 0:
        raise ValueError(f"f (number of Byzantine workers) must be an int >= 0, got {f!r}")
    return int(f)


def fedavg(deltas, weights=None) -> torch.Tensor:
    """Weighted mean of the rows; `weights` (k,) non-negative, not all zero (None: equal)."""
    deltas = _deltas(deltas)
    if weights is None:
        return deltas.mean(0)
    weights = torch.as_tensor(weights, device=deltas.device)
    if weights.shape != (len(deltas),):
        raise ValueError(f"weights has shape {tuple(weights.shape)}, expected ({len(deltas)},): "
                         "one per update")
    weights = weights.to(deltas.dtype)
    if not torch.isfinite(weights).all():
        raise ValueError("aggregation weights contain NaN or inf")
    if (weights < 0).any():
        raise ValueError(f"aggregation weights must be >= 0, got min {float(weights.min())}")
    total = weights.sum()
    if total <= 0:
        raise ValueError("aggregation weights are all zero: no update carries any weight")
    return (weights / total) @ deltas


def mean(deltas) -> torch.Tensor:
    """Plain average of the rows."""
    return fedavg(deltas)


def coordinate_median(deltas) -> torch.Tensor:
    """Coordinate-wise median (the mean of the two middle values when k is even)."""
    deltas = _deltas(deltas)
    n = len(deltas)
    ordered = deltas.sort(0).values
    if n % 2:
        return ordered[n // 2].clone()
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(deltas, beta: float | None = None, *, n_trim: int | None = None) -> torch.Tensor:
    """Coordinate-wise mean after removing the b largest and b smallest values, where
    b = floor(beta * k) for a fraction `beta` in [0, 0.5), or b = `n_trim`. Needs 2b < k."""
    deltas = _deltas(deltas)
    n = len(deltas)
    if (beta is None) == (n_trim is None):
        raise ValueError("give exactly one of beta (a fraction) and n_trim (a count)")
    if beta is not None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"beta must be a fraction in [0, 0.5), got {beta}")
        n_trim = math.floor(beta * n)
    elif not isinstance(n_trim, int | np.integer) or n_trim < 0:
        raise ValueError(f"n_trim must be an int >= 0, got {n_trim!r}")
    if 2 * n_trim >= n:
        raise ValueError(f"trimmed mean cannot drop {n_trim} values at each end of {n} updates: "
                         f"needs 2 * {n_trim} < {n}")
    return deltas.sort(0).values[n_trim:n - n_trim].mean(0)


def _squared_distances(deltas: torch.Tensor) -> torch.Tensor:
    return torch.cdist(deltas, deltas, compute_mode="donot_use_mm_for_euclid_dist").square()


def krum_scores(deltas, f: int, neighbours: int | None = None) -> torch.Tensor:
    """Krum score of each row: the sum of squared distances to its `neighbours` nearest other
    rows (Blanchard et al. 2017 use k - f - 2)."""
    deltas = _deltas(deltas)
    n = len(deltas)
    f = _byzantine(f, n)
    if n <= 2 * f + 2:
        raise ValueError(f"Krum tolerates f Byzantine workers only when n > 2f + 2; got n={n}, "
                         f"f={f} (needs n >= {2 * f + 3})")
    neighbours = n - f - 2 if neighbours is None else neighbours
    if not 1 <= neighbours <= n - 1:
        raise ValueError(f"neighbours must be in [1, {n - 1}], got {neighbours}")
    nearest = _squared_distances(deltas).sort(1).values[:, 1:neighbours + 1]
    return nearest.sum(1)


def krum(deltas, f: int, *, neighbours: int | None = None) -> torch.Tensor:
    """The row with the smallest Krum score."""
    deltas = _deltas(deltas)
    return deltas[krum_scores(deltas, f, neighbours).argmin()].clone()


def multi_krum(deltas, f: int, m: int | None = None, *,
               neighbours: int | None = None) -> torch.Tensor:
    """Mean of the m rows with the smallest Krum scores (m = k - f when None)."""
    deltas = _deltas(deltas)
    n = len(deltas)
    scores = krum_scores(deltas, f, neighbours)
    m = n - f if m is None else m
    if not isinstance(m, int | np.integer) or not 1 <= m <= n:
        raise ValueError(f"m must be an int in [1, {n}], got {m!r}")
    return deltas[scores.argsort()[:m]].mean(0)


def bulyan(deltas, f: int) -> torch.Tensor:
    """Bulyan (El Mhamdi et al. 2018): pick k - 2f rows by repeated Krum, then average, per
    coordinate, the k - 4f picked values closest to their median. Needs k >= 4f + 3."""
    deltas = _deltas(deltas)
    n = len(deltas)
    f = _byzantine(f, n)
    if n < 4 * f + 3:
        raise ValueError(f"Bulyan tolerates f Byzantine workers only when n >= 4f + 3; got n={n}, "
                         f"f={f} (needs n >= {4 * f + 3})")
    remaining = list(range(n))
    picked = []
    for _ in range(n - 2 * f):
        rows = deltas[remaining]
        # Krum on the rows left, with the neighbour count Krum uses for that many rows.
        neighbours = max(len(rows) - f - 2, 1)
        nearest = _squared_distances(rows).sort(1).values[:, 1:neighbours + 1]
        best = int(nearest.sum(1).argmin())
        picked.append(remaining.pop(best))
    chosen = deltas[picked]
    beta = len(chosen) - 2 * f
    median = coordinate_median(chosen)
    closest = (chosen - median).abs().argsort(0)[:beta]
    return chosen.gather(0, closest).mean(0)


def geometric_median(deltas, weights=None, *, iters: int = 100, eps: float = 1e-8,
                     tol: float = 1e-10) -> torch.Tensor:
    """Smoothed Weiszfeld iterations for the (weighted) geometric median, started at the mean
    (as in RFA, Pillutla et al.); distances below `eps` are raised to `eps`."""
    deltas = _deltas(deltas)
    z = fedavg(deltas, weights)
    w = (torch.ones(len(deltas), dtype=deltas.dtype, device=deltas.device) if weights is None
         else torch.as_tensor(weights, dtype=deltas.dtype, device=deltas.device))
    for _ in range(iters):
        beta = w / (deltas - z).norm(dim=1).clamp(min=eps)
        new = (beta / beta.sum()) @ deltas
        moved = float((new - z).norm())
        z = new
        if moved <= tol * max(1.0, float(z.norm())):
            break
    return z


def fedavg_aggregate(deltas, weights, round: int = 0, info: dict | None = None) -> torch.Tensor:
    """The server's default rule: mean of the updates weighted by `weights` (client sizes)."""
    return fedavg(deltas, weights)


def as_rule(rule: Callable, **kwargs) -> Callable:
    """`rule(deltas, **kwargs)` in the server's signature `(deltas, weights, round, info)`; the
    weights are ignored (robust rules treat workers equally)."""

    def aggregate(deltas, weights, round, info):
        return rule(deltas, **kwargs)

    aggregate.__name__ = getattr(rule, "__name__", "rule")
    return aggregate
