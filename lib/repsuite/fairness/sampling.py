"""Adaptive sampling to build equitable training sets (Cai et al., arXiv 2202.01327).

A model builder spends a budget `B` on training samples from `G` groups, a sample of group `g`
costing `c_g`. Group `g`'s performance (here the R^2 of a polygenic score) grows with the data
along a learning curve; the builder wants the counts `n_g` that maximise a function of the
group performances (max-min, a weighted sum, or a Nash product) under `sum_g c_g n_g <= B`. When
data arrive in batches, the curves can be learned on the way: after a pilot batch per group,
every round fits each group's learning curve on subsamples of the data in hand and buys the next
batch for the group with the largest estimated gain in the objective per unit cost.

This module holds the method: ridge regression from sufficient statistics (so that many refits
on subsets are cheap), the objectives, fixed allocations, power-law learning curves and the
greedy adaptive sampler. `sampling_experiment` holds the Balding-Nichols genotype simulator and
runs the strategies against each other.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

OBJECTIVES = ("maxmin", "sum", "nash")
FIXED = ("equal", "proportional", "majority")
# The Nash objective's log(R^2) continues as its tangent line below this floor, so that it stays
# increasing and concave where R^2 <= 0 (early, small-sample estimates often are).
R2_FLOOR = 0.01


def as_vector(values, name: str, length: int | None = None) -> np.ndarray:
    """A non-empty finite float vector (of `length` entries when given), or a clear error."""
    arr = np.asarray(values, dtype=float).ravel()
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be a non-empty list of finite numbers, got {values!r}")
    if length is not None and arr.size != length:
        raise ValueError(f"{name} needs one value per group ({length}), got {arr.size}")
    return arr


# -------------------------------------------------------------------------------------------------
# Sufficient statistics: every fit below needs only Z'Z of Z = [x, 1, y]


class Stream:
    """One group's samples in arrival order, with the statistics of every chunk of `chunk` rows.

    The statistics of any prefix, or of any set of chunks, are sums of (D, D) matrices with
    D = M + 2, so refitting on a subset costs no pass over the data. Prefix sums are kept every
    `stride` chunks.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, chunk: int, device="cpu", stride: int = 1):
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"X must be (n, M) with one phenotype a row; got {X.shape}, {len(y)}")
        if chunk < 1 or stride < 1 or len(X) % (chunk * stride):
            raise ValueError(f"the stream's {len(X)} rows are not whole strides of {stride} "
                             f"chunks of {chunk}")
        if not (np.all(np.isfinite(X)) and np.all(np.isfinite(y))):
            raise ValueError("genotypes and phenotypes must be finite")
        self.chunk, self.stride = chunk, stride
        self.Z = torch.as_tensor(np.column_stack([X, np.ones(len(X)), y]), dtype=torch.float64,
                                 device=device)
        D = self.Z.shape[1]
        blocks = self.Z.reshape(-1, chunk, D)
        self.stats = blocks.transpose(1, 2) @ blocks  # (n_chunks, D, D)
        steps = self.stats.reshape(-1, stride, D, D).sum(1)
        self.cum = torch.cat([torch.zeros_like(steps[:1]), steps.cumsum(0)])

    def __len__(self) -> int:
        return len(self.Z)

    def prefix(self, n: int) -> torch.Tensor:
        """Statistics of the first `n` samples."""
        if not 0 <= n <= len(self):
            raise ValueError(f"asked for {n} samples of a stream of {len(self)}")
        steps, rest = divmod(n, self.chunk * self.stride)
        chunks, rows = divmod(rest, self.chunk)
        first = steps * self.stride
        out = self.cum[steps] + self.stats[first:first + chunks].sum(0)
        if rows:
            tail = self.Z[(first + chunks) * self.chunk:n]
            out = out + tail.T @ tail
        return out


def stats_of(streams: list[Stream], counts) -> torch.Tensor:
    """(G, D, D) statistics of the first `counts[g]` samples of every group."""
    return torch.stack([s.prefix(int(n)) for s, n in zip(streams, counts, strict=True)])


# -------------------------------------------------------------------------------------------------
# Ridge regression with a free intercept per group, from statistics


def _centred(stats: torch.Tensor, summed: bool = True):
    """Within-group centred Gram (..., M, M), cross-products (..., M) and sums of squares of y,
    summed over the group axis unless `summed` is False."""
    M = stats.shape[-1] - 2
    n = stats[..., M, M]
    safe = n.clamp(min=1).unsqueeze(-1)
    sx, sy = stats[..., :M, M], stats[..., M, M + 1]
    gram = stats[..., :M, :M] - sx.unsqueeze(-1) * sx.unsqueeze(-2) / safe.unsqueeze(-1)
    cross = stats[..., :M, M + 1] - sx * (sy.unsqueeze(-1) / safe)
    yy = stats[..., M + 1, M + 1] - sy**2 / safe.squeeze(-1)
    if summed:
        return gram.sum(-3), cross.sum(-2), yy.sum(-1), n
    return gram, cross, yy, n


def _intercepts(stats: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """mu_g = mean(y - x . w) in every group; a group without data gets the pooled intercept."""
    M = stats.shape[-1] - 2
    n, sx, sy = stats[..., M, M], stats[..., :M, M], stats[..., M, M + 1]
    resid = sy - (sx * w.unsqueeze(-2)).sum(-1)
    pooled = resid.sum(-1, keepdim=True) / n.sum(-1, keepdim=True)
    return torch.where(n > 0, resid / n.clamp(min=1), pooled)


def _solve(gram: torch.Tensor, cross: torch.Tensor, lam) -> torch.Tensor:
    lam = torch.as_tensor(lam, dtype=gram.dtype, device=gram.device)
    if torch.any(lam <= 0):
        raise ValueError("the ridge penalty lam must be positive")
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    factor = torch.linalg.cholesky(gram + lam[..., None, None] * eye)
    return torch.cholesky_solve(cross.unsqueeze(-1), factor).squeeze(-1)


def ridge_solve(stats: torch.Tensor, lam) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise sum (y - mu_g - x.w)^2 + lam |w|^2 over w and the per-group intercepts mu.

    `stats` is (..., G, D, D); `lam` a number or a (...) tensor. Returns w (..., M), mu (..., G).
    """
    _check_stats(stats)
    gram, cross, _, _ = _centred(stats)
    w = _solve(gram, cross, lam)
    return w, _intercepts(stats, w)


def ridge_gcv(stats: torch.Tensor, lambdas) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Ridge with the penalty picked by generalised cross-validation over `lambdas`.

    GCV(lam) = (RSS / n) / (1 - df / n)^2 with df the effective number of parameters (the ridge
    hat matrix's trace plus one intercept per group with data): one eigendecomposition serves
    every penalty. Returns (lam, w, mu).
    """
    _check_stats(stats)
    lambdas = torch.as_tensor(as_vector(lambdas, "lambdas"), dtype=stats.dtype, device=stats.device)
    if torch.any(lambdas <= 0):
        raise ValueError("ridge penalties must be positive")
    gram, cross, yy, n = _centred(stats)
    d, V = torch.linalg.eigh(gram)
    d = d.clamp(min=0)
    q = V.T @ cross
    shrink = d[:, None] + lambdas  # (M, L)
    rss = yy - (q[:, None] ** 2 * (d[:, None] + 2 * lambdas) / shrink**2).sum(0)
    total = n.sum()
    df = (d[:, None] / shrink).sum(0) + (n > 0).sum()
    gcv = rss / total / (1 - df / total).clamp(min=1e-6) ** 2
    best = int(torch.argmin(gcv))
    w = V @ (q / shrink[:, best])
    return float(lambdas[best]), w, _intercepts(stats, w)


def _check_stats(stats: torch.Tensor) -> None:
    if stats.ndim < 3 or stats.shape[-1] != stats.shape[-2] or stats.shape[-1] < 3:
        raise ValueError("statistics must be (..., G, D, D) with D = M + 2, got "
                         f"{tuple(stats.shape)}")
    n = stats[..., -2, -2]
    if torch.any(n.sum(-1) < 2):
        raise ValueError("a ridge fit needs at least 2 training samples")


def sse(stats: torch.Tensor, w: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors of `mu + x.w` on the samples summarised by `stats` (..., D, D)."""
    v = torch.cat([-w, -mu.unsqueeze(-1), torch.ones_like(mu).unsqueeze(-1)], -1)
    return (v.unsqueeze(-2) @ stats @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1)


def total_ss(stats: torch.Tensor) -> torch.Tensor:
    """Sum of squares of y around its own mean, from (..., D, D) statistics."""
    n, sy, syy = stats[..., -2, -2], stats[..., -2, -1], stats[..., -1, -1]
    return syy - sy**2 / n.clamp(min=1)


def r2_score(y_true, y_pred) -> float:
    """1 - SSE / SST, the convention of `sklearn.metrics.r2_score`."""
    y_true, y_pred = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    if y_true.shape != y_pred.shape or y_true.size < 2:
        raise ValueError(f"need two equally long vectors of >= 2 values, got {y_true.shape} and "
                         f"{y_pred.shape}")
    sst = ((y_true - y_true.mean()) ** 2).sum()
    if sst == 0:
        raise ValueError("R^2 is undefined when y_true is constant")
    return float(1 - ((y_true - y_pred) ** 2).sum() / sst)


# -------------------------------------------------------------------------------------------------
# Objectives, budgets and fixed allocations


def objective_value(name: str, r2, weights=None):
    """The stakeholder objective of group R^2 values (last axis = groups); the weights of the sum
    and the Nash product are normalised to sum to one (equal when None)."""
    r2 = torch.as_tensor(r2, dtype=torch.float64) if not torch.is_tensor(r2) else r2
    G = r2.shape[-1]
    weights = as_vector(np.ones(G) if weights is None else weights, "weights")
    if weights.size != G:
        raise ValueError(f"{weights.size} weights for {G} groups")
    if np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"objective weights must be >= 0 with a positive sum: {weights.tolist()}")
    weights = torch.as_tensor(weights / weights.sum(), dtype=r2.dtype, device=r2.device)
    if name == "maxmin":
        return r2.min(-1).values
    if name == "sum":
        return (weights * r2).sum(-1)
    if name == "nash":
        below = math.log(R2_FLOOR) + (r2 - R2_FLOOR) / R2_FLOOR
        return (weights * torch.where(r2 > R2_FLOOR, torch.log(r2.clamp(min=R2_FLOOR)), below)
                ).sum(-1)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")


def marginal_gains(name: str, r2_now, r2_next, weights=None) -> torch.Tensor:
    """Change of the objective when group g alone moves from `r2_now[g]` to `r2_next[g]`."""
    r2_now, r2_next = torch.as_tensor(r2_now), torch.as_tensor(r2_next)
    G = r2_now.shape[-1]
    moved = r2_now.expand(G, G).clone()
    moved[range(G), range(G)] = r2_next
    return objective_value(name, moved, weights) - objective_value(name, r2_now, weights)


def check_budget(counts, costs, budget: float) -> None:
    """Raise when the counts are negative or spend more than the budget."""
    counts, costs = np.asarray(counts, dtype=float), np.asarray(costs, dtype=float)
    if np.any(counts < 0):
        raise ValueError(f"sample counts must be >= 0, got {counts.tolist()}")
    spent = float(counts @ costs)
    if spent > budget * (1 + 1e-12):
        raise ValueError(f"the allocation {counts.tolist()} spends {spent:g} > budget {budget:g}")


def _costs(costs, G: int | None = None) -> np.ndarray:
    costs = as_vector(costs, "costs", G)
    if np.any(costs <= 0):
        raise ValueError(f"every sample cost must be positive, got {costs.tolist()}")
    return costs


def fixed_allocation(kind: str, budget: float, costs, shares) -> np.ndarray:
    """Sample counts of a fixed heuristic that spends the budget at once.

    `equal`: the same count for every group; `proportional`: counts in the population shares;
    `majority`: everything on the group with the largest share.
    """
    shares = as_vector(shares, "shares")
    costs = _costs(costs, shares.size)
    if np.any(shares < 0) or shares.sum() <= 0:
        raise ValueError(f"population shares must be >= 0 with a positive sum: {shares.tolist()}")
    if kind == "equal":
        mix = np.ones_like(shares)
    elif kind == "proportional":
        mix = shares / shares.sum()
    elif kind == "majority":
        mix = np.eye(shares.size)[int(np.argmax(shares))]
    else:
        raise ValueError(f"fixed allocation must be one of {FIXED}, got {kind!r}")
    counts = np.floor(budget * mix / (mix @ costs) + 1e-9).astype(int)
    check_budget(counts, costs, budget)
    return counts


def budget_grid(budget: float, costs, steps: int) -> np.ndarray:
    """Every allocation that splits the budget's spend in multiples of 1/steps: (P, G) counts."""
    costs = _costs(costs)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    parts = [np.array([steps])]
    for _ in range(costs.size - 1):  # compositions of `steps` into G parts
        parts = [np.append(p[:-1], [k, p[-1] - k]) for p in parts for k in range(p[-1] + 1)]
    spend = np.array(parts, dtype=float) * budget / steps
    return np.floor(spend / costs + 1e-9).astype(int)


# -------------------------------------------------------------------------------------------------
# Learning curves: err(n) = 1 - R^2(n) = a n^-b + c


def _fit_fixed_exponent(u: np.ndarray, err: np.ndarray):
    """Least squares of err ~ a u + c with a >= 0 and 0 <= c <= 1, for a batch of designs u
    (B, P): the optimum is the free solution when feasible, else on an edge of the box."""
    um, em = u.mean(1, keepdims=True), err.mean(1, keepdims=True)
    var = ((u - um) ** 2).sum(1, keepdims=True)
    a_free = ((u - um) * (err - em)).sum(1, keepdims=True) / var
    cands = [(a_free, em - a_free * um)]
    cands.append((np.zeros_like(em), np.clip(em, 0, 1)))
    for c_edge in (0.0, 1.0):
        a = np.maximum(((err - c_edge) * u).sum(1, keepdims=True) / (u**2).sum(1, keepdims=True), 0)
        cands.append((a, np.full_like(em, c_edge)))
    best = np.full(em.shape, np.inf)
    a_best, c_best = np.zeros_like(em), np.zeros_like(em)
    for a, c in cands:
        ok = (a >= 0) & (c >= 0) & (c <= 1)
        loss = np.where(ok, ((a * u + c - err) ** 2).sum(1, keepdims=True), np.inf)
        better = loss < best
        best, a_best, c_best = np.where(better, loss, best), np.where(better, a, a_best), \
            np.where(better, c, c_best)
    return a_best[:, 0], c_best[:, 0], best[:, 0]


def fit_learning_curve(n, r2, b_bounds=(0.05, 2.0), n_grid: int = 96) -> np.ndarray:
    """Least-squares power law through (n, R^2) points; returns (a, b, c) with a, c >= 0.

    For a fixed exponent b the fit is linear in (a, c); b is searched on a fine log grid within
    `b_bounds`. With a >= 0 and b > 0 the fitted R^2 rises with n with diminishing returns, the
    condition under which buying the largest estimated gain one batch at a time is optimal.
    """
    n, err = as_vector(n, "n"), 1 - as_vector(r2, "r2")
    if n.size != err.size or n.size < 2:
        raise ValueError(f"a learning curve needs >= 2 points with one R^2 each; got {n.size} "
                         f"sizes and {err.size} values")
    if np.any(n <= 0):
        raise ValueError("training sizes must be positive")
    if np.ptp(n) == 0:
        raise ValueError("a learning curve needs at least two different training sizes")
    bs = np.geomspace(*b_bounds, n_grid)
    scale = n.max()  # a is fitted for n / scale, which keeps n^-b well conditioned
    a, c, loss = _fit_fixed_exponent((n / scale)[None, :] ** -bs[:, None], err[None, :])
    i = int(np.argmin(loss))
    return np.array([a[i] * scale ** bs[i], bs[i], c[i]])


def predict_learning_curve(params, n):
    """R^2 at training size(s) `n` under the fitted curve."""
    a, b, c = params
    return 1 - (a * np.asarray(n, dtype=float) ** -b + c)


def choose_next(objective: str, r2_now, r2_next, costs, affordable, weights=None):
    """The group whose next batch promises the largest objective gain per unit cost.

    Ties (a max-min objective gains nothing from its non-worst groups) go to the group with the
    lowest current R^2. Returns (group, gains per unit cost).
    """
    costs, affordable = np.asarray(costs, dtype=float), np.asarray(affordable, dtype=bool)
    if not affordable.any():
        raise ValueError("no group's batch fits in the remaining budget")
    gain = marginal_gains(objective, torch.as_tensor(np.asarray(r2_now, dtype=float)),
                          torch.as_tensor(np.asarray(r2_next, dtype=float)), weights).numpy()
    gain = gain / costs
    order = np.lexsort((np.asarray(r2_now), -np.where(affordable, gain, -np.inf)))
    return int(order[0]), gain


def greedy_allocation(curves, *, budget: float, costs, objective: str, batch: int,
                      pilot_batches: int = 1, weights=None) -> np.ndarray:
    """The adaptive sampler's decision rule run on known learning curves: the counts it ends with.

    `curves` holds one (a, b, c) per group. With equal costs and concave curves this greedy rule
    is optimal for the weighted sum, the Nash product and max-min.
    """
    curves = np.asarray(curves, dtype=float)
    costs = _costs(costs, len(curves))
    k = np.full(len(curves), pilot_batches)
    check_budget(k * batch, costs, budget)
    while True:
        affordable = costs * batch <= budget - (k * batch) @ costs + 1e-9
        if not affordable.any():
            return k * batch
        now = [predict_learning_curve(c, n) for c, n in zip(curves, k * batch, strict=True)]
        nxt = [predict_learning_curve(c, n + batch) for c, n in zip(curves, k * batch, strict=True)]
        pick, _ = choose_next(objective, now, nxt, costs, affordable, weights)
        k[pick] += 1


# -------------------------------------------------------------------------------------------------
# The adaptive sampler


@dataclass
class AdaptiveRun:
    """What the sampler saw and did. Row t of the per-state arrays is the state before round t;
    the last row is the final state."""

    counts: np.ndarray  # (T + 1, G) samples held
    chosen: np.ndarray  # (T,) the group that received round t's batch
    r2_now: np.ndarray  # (T, G) fitted-curve R^2 at the counts held
    r2_next: np.ndarray  # (T, G) fitted-curve R^2 after one more batch of that group
    gains: np.ndarray  # (T, G) estimated objective gain per unit cost
    curves: np.ndarray  # (T, G, 3) learning-curve parameters (a, b, c)
    points: np.ndarray  # (T, G, L, 2) cross-validated (training size, R^2) behind each curve
    lam: np.ndarray  # (T + 1,) ridge penalty chosen by GCV
    w: torch.Tensor  # (T + 1, M) the model fitted on the data held
    mu: torch.Tensor  # (T + 1, G)

    @property
    def final_counts(self) -> np.ndarray:
        return self.counts[-1]


def _fold_stats(stream: Stream, n_batches: int, n_folds: int) -> torch.Tensor:
    """(F, D, D) statistics of the held batches, by fold (chunk i of a batch is in fold i)."""
    D = stream.stats.shape[-1]
    held = stream.stats[:n_batches * n_folds].reshape(n_batches, n_folds, D, D)
    return held.sum(0)


def learning_curve_points(streams: list[Stream], n_batches, *, n_folds: int, levels, lam: float,
                          rng: np.random.Generator) -> np.ndarray:
    """Cross-validated R^2 of every group when its own training data are subsampled.

    For group g and fraction l, each fold's model is trained on all other groups' out-of-fold
    data plus a random l-share of g's out-of-fold chunks, and scored on g's in-fold data. The last
    point of every group is the full data (l = 1), shared by all groups. Returns (G, L + 1, 2):
    (mean training size of g, R^2 of g).
    """
    if len(n_batches) != len(streams):
        raise ValueError(f"{len(n_batches)} batch counts for {len(streams)} groups")
    for g, (s, k) in enumerate(zip(streams, n_batches, strict=True)):
        if not 1 <= k * n_folds <= len(s.stats):
            raise ValueError(f"group {g} holds {len(s)} samples: {k} batches of {n_folds} chunks "
                             f"of {s.chunk} do not fit (or are none)")
    P = torch.stack([_fold_stats(s, int(k), n_folds) for s, k in zip(streams, n_batches,
                                                                      strict=True)])
    return _curve_points(streams, P, n_batches, levels=levels, lam=lam, rng=rng)


def _curve_points(streams, P: torch.Tensor, n_batches, *, levels, lam, rng) -> np.ndarray:
    G, F = P.shape[:2]
    chunk = streams[0].chunk
    held = P.sum(1)  # (G, D, D)
    train = held.unsqueeze(0) - P.transpose(0, 1)  # (F, G, D, D): out-of-fold data of every fold
    sst = total_ss(held)
    out = np.zeros((G, len(levels) + 1, 2))

    # Centred statistics add up over groups, so each group's share is computed once.
    gram, cross, _, _ = _centred(train, summed=False)  # (F, G, M, M), (F, G, M)
    w = _solve(gram.sum(1), cross.sum(1), lam)  # full data: one model per fold serves all groups
    mu = _intercepts(train, w)
    full = torch.stack([sse(P[g], w, mu[:, g]).sum() for g in range(G)])
    out[:, -1, 0] = np.asarray(n_batches) * (F - 1) * chunk
    out[:, -1, 1] = (1 - full / sst).cpu().numpy()

    for g in range(G):
        n_chunks = int(n_batches[g]) * F
        fold_of = np.arange(n_chunks) % F
        select = np.zeros((len(levels), F, n_chunks))
        for i, level in enumerate(levels):
            for f in range(F):
                pool = np.flatnonzero(fold_of != f)
                take = rng.choice(pool, size=max(1, round(level * pool.size)), replace=False)
                select[i, f, take] = 1.0
        sel = torch.as_tensor(select, dtype=held.dtype, device=held.device)
        sub = torch.einsum("lfc,cde->lfde", sel, streams[g].stats[:n_chunks])  # (L, F, D, D)
        gram_g, cross_g, _, _ = _centred(sub.unsqueeze(-3))
        w = _solve(gram.sum(1) - gram[:, g] + gram_g, cross.sum(1) - cross[:, g] + cross_g, lam)
        mu_g = _intercepts(sub.unsqueeze(-3), w)[..., 0]
        err = sse(P[g], w, mu_g).sum(-1)
        out[g, :-1, 0] = select.sum(2).mean(1) * chunk
        out[g, :-1, 1] = (1 - err / sst[g]).cpu().numpy()
    return out


def adaptive_sampling(streams: list[Stream], *, budget: float, costs, objective: str,
                      weights=None, batch: int, pilot_batches: int = 1, n_folds: int = 5,
                      levels=(0.25, 0.5, 0.75), lambdas, seed: int) -> AdaptiveRun:
    """Greedy adaptive collection: `pilot_batches` batches per group, then each round one batch
    for the group whose fitted learning curve promises the largest objective gain per unit cost.

    The sampler sees only the data it bought; group R^2 values are estimated by cross-validation
    on them. It stops when no group's batch fits in the remaining budget.
    """
    G = len(streams)
    costs = _costs(costs, G)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if batch % n_folds or any(s.chunk != batch // n_folds for s in streams):
        raise ValueError(f"streams must come in chunks of batch / n_folds = {batch / n_folds:g}")
    if n_folds < 2:
        raise ValueError(f"cross-validation needs n_folds >= 2, got {n_folds}")
    if not all(0 < lv < 1 for lv in levels):
        raise ValueError(f"subsampling levels must lie in (0, 1), got {list(levels)}")
    pilot = np.full(G, pilot_batches)
    check_budget(pilot * batch, costs, budget)
    for g, s in enumerate(streams):
        if len(s) < budget // costs[g] // batch * batch:
            raise ValueError(f"group {g}'s stream holds {len(s)} samples, fewer than the budget "
                             f"could buy ({int(budget // costs[g])})")
    rng = np.random.default_rng(seed)
    weights = None if weights is None else as_vector(weights, "weights", G)

    k, log = pilot.copy(), {key: [] for key in AdaptiveRun.__dataclass_fields__}
    # Statistics of the data held, by group and fold, grow by one batch a round.
    P = torch.stack([_fold_stats(s, int(n), n_folds) for s, n in zip(streams, k, strict=True)])
    while True:
        lam, w, mu = ridge_gcv(P.sum(1), lambdas)
        log["counts"].append(k * batch)
        log["lam"].append(lam)
        log["w"].append(w)
        log["mu"].append(mu)
        left = budget - (k * batch) @ costs
        affordable = (costs * batch <= left + 1e-9) & ((k + 1) * batch <= [len(s) for s in streams])
        if not affordable.any():
            break

        points = _curve_points(streams, P, k, levels=levels, lam=lam, rng=rng)
        curves = np.stack([fit_learning_curve(p[:, 0], p[:, 1]) for p in points])
        now = np.array([predict_learning_curve(curves[g], k[g] * batch) for g in range(G)])
        nxt = np.array([predict_learning_curve(curves[g], (k[g] + 1) * batch) for g in range(G)])
        pick, gain = choose_next(objective, now, nxt, costs, affordable, weights)
        for key, value in (("chosen", pick), ("r2_now", now), ("r2_next", nxt), ("gains", gain),
                           ("curves", curves), ("points", points)):
            log[key].append(value)
        P[pick] += streams[pick].stats[k[pick] * n_folds:(k[pick] + 1) * n_folds]
        k[pick] += 1

    check_budget(k * batch, costs, budget)
    arrays = {key: np.array(v) for key, v in log.items() if key not in ("w", "mu")}
    return AdaptiveRun(**arrays, w=torch.stack(log["w"]), mu=torch.stack(log["mu"]))
