"""SMOTE and SMOTE-NC (Chawla et al., 2002), random under-sampling and over-sampling by replication.

The paper's terms: the minority class has `T` samples; SMOTE at `N`% creates `N/100 * T` synthetic
samples, each on the segment between a minority sample and one of its `k` nearest minority
neighbours,

    x_new = x_i + gap * (x_nn - x_i),    gap ~ U(0, 1), one gap per synthetic sample.

When `N` is a multiple of 100 every minority sample seeds `N/100` synthetic samples; otherwise (and
for `N < 100`, the paper's case) the remainder is seeded by a random subset of the minority samples.
Under-sampling at `U`% keeps `100/U` majority samples per minority sample (Section 4.3: at 200%, 50
minority samples keep 25 majority ones).

The generation runs in PyTorch on the caller's device; `fit_resample` takes and returns numpy arrays
like imbalanced-learn. The samplers are two-class as in the paper: a target with more than two
classes is refused with an error that says how to make it two-class (one class against the rest).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from repsuite import seeding

# Rows of the distance matrix computed at once, so memory stays bounded on large minority classes.
_BLOCK = 2048
# Candidates kept beyond k before the exact (distance, index) ordering of the neighbours.
_SPARE = 8


# --------------------------------------------------------------------------------------------------
# Input checks


def check_xy(X, y, *, what: str = "SMOTE") -> tuple[np.ndarray, np.ndarray]:
    """`X` as a finite 2-D float array and `y` as 1-D labels of two classes, or a clear error."""
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2:
        raise ValueError(f"{what}: X must be 2-D (samples x features), got shape {X.shape}")
    if y.ndim != 1:
        raise ValueError(f"{what}: y must be 1-D (one label per sample), got shape {y.shape}")
    if len(X) != len(y):
        raise ValueError(f"{what}: X has {len(X)} rows but y has {len(y)} labels")
    if X.shape[1] == 0:
        raise ValueError(f"{what}: X has no features")
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise ValueError(f"{what}: X must be numeric, got dtype {X.dtype}; encode nominal values "
                         "as integer codes first")
    X = X.astype(np.float64, copy=False)
    if not np.all(np.isfinite(X)):
        bad = np.argwhere(~np.isfinite(X))[0]
        raise ValueError(f"{what}: X contains NaN or infinite values (first at row {bad[0]}, "
                         f"column {bad[1]}); impute or drop them before resampling")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        raise ValueError(f"{what}: y contains NaN labels")
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(f"{what}: y holds a single class ({classes.tolist()}); resampling needs a "
                         "minority and a majority class")
    if len(classes) > 2:
        raise ValueError(f"{what}: y holds {len(classes)} classes {classes.tolist()}; this "
                         "implementation is two-class as in the paper: make a one-vs-rest target "
                         "(the class to over-sample against all others)")
    return X, y


def minority_majority(y: np.ndarray, minority_label=None) -> tuple:
    """(minority label, majority label): the rarer class, or `minority_label` when given."""
    classes, counts = np.unique(y, return_counts=True)
    if minority_label is not None:
        if minority_label not in classes:
            raise ValueError(f"minority_label={minority_label!r} is not among the classes "
                             f"{classes.tolist()}")
        other = classes[classes != minority_label][0]
        return minority_label, other
    if counts[0] == counts[1]:
        raise ValueError(f"both classes have {counts[0]} samples: pass minority_label to say which "
                         "one to over-sample")
    order = np.argsort(counts)
    return classes[order[0]], classes[order[1]]


def _check_amount(amount, name: str = "amount") -> float:
    if isinstance(amount, bool) or not isinstance(amount, int | float) or not math.isfinite(amount):
        raise ValueError(f"{name} must be a finite number of percent (N% in the paper), got "
                         f"{amount!r}")
    if amount < 0:
        raise ValueError(f"{name} must be >= 0 percent, got {amount}")
    return float(amount)


def _check_k(k_neighbors, n_minority: int) -> int:
    if isinstance(k_neighbors, bool) or not isinstance(k_neighbors, int) or k_neighbors < 1:
        raise ValueError(f"k_neighbors must be a positive int, got {k_neighbors!r}")
    if n_minority < 2:
        raise ValueError(f"SMOTE needs at least 2 minority samples to interpolate between; got "
                         f"{n_minority}")
    if k_neighbors >= n_minority:
        raise ValueError(f"k_neighbors={k_neighbors} needs at least {k_neighbors + 1} minority "
                         f"samples (each sample's neighbours exclude itself); got {n_minority}: "
                         f"lower k_neighbors to at most {n_minority - 1}")
    return k_neighbors


def count_from_amount(n_minority: int, amount: float) -> int:
    """Synthetic samples for SMOTE at `amount`% of `n_minority` samples (truncated like the paper's
    T)."""
    # The small tolerance keeps e.g. 3 * 100 / 100 from landing just below an integer.
    return int(math.floor(n_minority * amount / 100 + 1e-9))


def count_from_ratio(n_minority: int, n_majority: int, sampling_ratio: float) -> int:
    """Synthetic samples so that minority / majority = `sampling_ratio` after resampling.

    The count is `int(sampling_ratio * n_majority - n_minority)`, the rule imbalanced-learn uses for
    a float `sampling_strategy`, so both libraries produce the same class counts.
    """
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int | float):
        raise ValueError(f"sampling_ratio must be a number in (0, 1], got {sampling_ratio!r}")
    if not 0 < sampling_ratio <= 1:
        raise ValueError(f"sampling_ratio must be in (0, 1] (minority count after resampling over "
                         f"the majority count), got {sampling_ratio}")
    n_new = int(sampling_ratio * n_majority - n_minority)
    if n_new < 0:
        raise ValueError(f"sampling_ratio={sampling_ratio} asks for "
                         f"{sampling_ratio * n_majority:.1f} minority samples but there are "
                         f"already {n_minority}: over-sampling cannot remove samples")
    return n_new


# --------------------------------------------------------------------------------------------------
# Nearest neighbours and the synthetic draw (tensors, any device)


def knn_indices(X: torch.Tensor, k: int, penalty=None) -> torch.Tensor:
    """Indices (n, k) of each row's k nearest other rows, by Euclidean distance.

    `penalty(start, stop)` may return squared distances to add for rows start:stop against all rows
    (the nominal-mismatch term of SMOTE-NC). Ties go to the lower index; a row is never its own
    neighbour, even when it has exact duplicates.
    """
    n = X.shape[0]
    out = torch.empty((n, k), dtype=torch.long, device=X.device)
    n_cand = min(n, k + _SPARE)
    X32 = X.to(torch.float32)
    sq = X32.square().sum(1)
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        rows = torch.arange(stop - start, device=X.device)
        # Candidates from fast single-precision matrix-product distances, then their exact
        # distances in the direct form, which matches a k-d tree's neighbours and is 0 for
        # identical points. The spare candidates absorb the rounding of the fast form near the cut.
        block = X32[start:stop]
        d = torch.addmm(sq[start:stop, None] + sq[None, :], block, X32.T, alpha=-2)
        extra = penalty(start, stop) if penalty is not None else None
        if extra is not None:
            d += extra.to(d.dtype)
        d[rows, rows + start] = math.inf
        idx = torch.topk(d, n_cand, dim=1, largest=False, sorted=False).indices
        dist = (X[start:stop, None, :] - X[idx]).square_().sum(-1)
        if extra is not None:
            dist += extra.gather(1, idx)
        dist[idx == (rows + start)[:, None]] = math.inf
        # Ordered by (distance, index): the same neighbours as a full stable sort unless more than
        # `_SPARE` points tie at the cut.
        by_index = torch.argsort(idx, dim=1)
        dist, idx = dist.gather(1, by_index), idx.gather(1, by_index)
        by_dist = torch.sort(dist, dim=1, stable=True).indices
        out[start:stop] = idx.gather(1, by_dist)[:, :k]
    return out


def allocate_base(n_minority: int, n_synthetic: int, generator: torch.Generator) -> torch.Tensor:
    """Which minority sample seeds each synthetic sample.

    Every sample seeds `n_synthetic // n_minority` of them (the paper's integral N/100) and a random
    subset without repeats seeds the remainder (the paper's N < 100 case, generalised).
    """
    device = generator.device
    per, rest = divmod(n_synthetic, n_minority)
    base = torch.arange(n_minority, device=device).repeat_interleave(per)
    if rest:
        extra = torch.randperm(n_minority, generator=generator, device=device)[:rest]
        base = torch.cat([base, extra])
    return base


@dataclass
class SyntheticDraw:
    """Synthetic samples and how each was made: its base sample, the neighbour, and the gap."""

    samples: torch.Tensor  # (n_synthetic, n_features)
    base: torch.Tensor  # (n_synthetic,) index of x_i among the minority samples
    neighbor: torch.Tensor  # (n_synthetic,) index of x_nn among the minority samples
    gap: torch.Tensor  # (n_synthetic,) the interpolation factor u


def smote_samples(X_min: torch.Tensor, n_synthetic: int, k_neighbors: int,
                  generator: torch.Generator, neighbors: torch.Tensor | None = None
                  ) -> SyntheticDraw:
    """The paper's Algorithm SMOTE(T, N, k) on minority samples `X_min`, for `n_synthetic` samples.

    `neighbors` (T, k) may be given (SMOTE-NC passes its own); otherwise they are the Euclidean
    ones.
    """
    if X_min.ndim != 2:
        raise ValueError(f"X_min must be 2-D, got shape {tuple(X_min.shape)}")
    n_minority = X_min.shape[0]
    _check_k(k_neighbors, n_minority)
    if n_synthetic < 0:
        raise ValueError(f"n_synthetic must be >= 0, got {n_synthetic}")
    if neighbors is None:
        neighbors = knn_indices(X_min, k_neighbors)

    base = allocate_base(n_minority, n_synthetic, generator)
    slot = torch.randint(0, k_neighbors, (len(base),), generator=generator, device=generator.device)
    neighbor = neighbors[base, slot]
    gap = torch.rand(len(base), generator=generator, device=generator.device, dtype=X_min.dtype)
    x_i = X_min[base]
    samples = x_i + gap[:, None] * (X_min[neighbor] - x_i)
    return SyntheticDraw(samples, base, neighbor, gap)


# --------------------------------------------------------------------------------------------------
# Samplers with a fit_resample interface


class _Sampler:
    def __init__(self, amount=None, *, sampling_ratio=None, seed: int = 0, device="cpu",
                 minority_label=None):
        if amount is not None and sampling_ratio is not None:
            raise ValueError("give either amount (N% of the minority class) or sampling_ratio "
                             "(minority / majority after resampling), not both")
        if amount is None and sampling_ratio is None:
            amount = 100
        self.amount = None if amount is None else _check_amount(amount)
        self.sampling_ratio = sampling_ratio
        self.seed = int(seed)
        self.device = seeding.pick_device(device) if isinstance(device, str) else device
        self.minority_label = minority_label

    def _n_synthetic(self, n_minority: int, n_majority: int) -> int:
        if self.amount is not None:
            return count_from_amount(n_minority, self.amount)
        return count_from_ratio(n_minority, n_majority, self.sampling_ratio)

    def _split(self, X, y):
        X, y = check_xy(X, y, what=type(self).__name__)
        minority, majority = minority_majority(y, self.minority_label)
        is_min = y == minority
        return X, y, minority, is_min

    def _stack(self, X, y, X_new: np.ndarray, minority):
        y_new = np.full(len(X_new), minority, dtype=y.dtype)
        return np.vstack([X, X_new.astype(X.dtype, copy=False)]), np.concatenate([y, y_new])


class SMOTE(_Sampler):
    """SMOTE over-sampling of the minority class of a two-class problem.

    `amount` is the paper's N (percent of the minority class to synthesise; 0 to anything, N < 100
    seeds a random subset); `sampling_ratio` instead asks for minority / majority after resampling,
    as imbalanced-learn's float `sampling_strategy`. The original rows come first in the output, the
    synthetic ones after them. `last_draw` keeps how the synthetic rows were made.
    """

    def __init__(self, amount=None, *, sampling_ratio=None, k_neighbors: int = 5, seed: int = 0,
                 device="cpu", minority_label=None):
        super().__init__(amount, sampling_ratio=sampling_ratio, seed=seed, device=device,
                         minority_label=minority_label)
        self.k_neighbors = k_neighbors
        self.last_draw: SyntheticDraw | None = None

    def fit_resample(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        X, y, minority, is_min = self._split(X, y)
        n_min = int(is_min.sum())
        _check_k(self.k_neighbors, n_min)
        n_new = self._n_synthetic(n_min, len(y) - n_min)
        X_min = torch.as_tensor(X[is_min], device=self.device)
        gen = seeding.generator(self.seed, self.device)
        self.last_draw = smote_samples(X_min, n_new, self.k_neighbors, gen)
        return self._stack(X, y, self.last_draw.samples.cpu().numpy(), minority)


class RandomOverSampler(_Sampler):
    """Over-sampling by replication (sampling with replacement, Section 4.1), at the same amounts as
    SMOTE: each minority sample is copied `N // 100` times and a random subset once more."""

    def fit_resample(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        X, y, minority, is_min = self._split(X, y)
        n_min = int(is_min.sum())
        n_new = self._n_synthetic(n_min, len(y) - n_min)
        gen = seeding.generator(self.seed, self.device)
        base = allocate_base(n_min, n_new, gen).cpu().numpy()
        return self._stack(X, y, X[is_min][base], minority)


# --------------------------------------------------------------------------------------------------
# SMOTE-NC: nominal and continuous features (Section 6.1)


def median_std(X_cont: torch.Tensor) -> torch.Tensor:
    """Median over the continuous features of their (population) standard deviations."""
    # torch.median returns the lower middle value for an even count; the quantile averages the two
    # middle values like the usual median.
    return torch.quantile(X_cont.std(dim=0, unbiased=False), 0.5)


def nominal_codes(X_nom: np.ndarray) -> np.ndarray:
    """Nominal columns as integer codes 0..C-1 per column (only equality matters to SMOTE-NC)."""
    return np.stack([np.unique(col, return_inverse=True)[1] for col in X_nom.T], axis=1)


def smotenc_neighbors(X_cont: torch.Tensor, codes: torch.Tensor, k: int,
                      med: torch.Tensor) -> torch.Tensor:
    """k nearest minority neighbours, `med**2` added to the squared distance per nominal
    mismatch."""
    n_nominal = codes.shape[1]
    onehot = torch.cat([torch.nn.functional.one_hot(codes[:, j]).to(X_cont.dtype)
                        for j in range(n_nominal)], dim=1)

    def penalty(start, stop):
        # Matching values give a 1 in the product of one-hot rows; the rest are mismatches.
        matches = onehot[start:stop] @ onehot.T
        return (n_nominal - matches) * med.square()

    return knn_indices(X_cont, k, penalty)


def smotenc_distances(X_cont, codes, med) -> torch.Tensor:
    """Full matrix of SMOTE-NC distances (for checks and small examples)."""
    d2 = torch.cdist(X_cont, X_cont, compute_mode="donot_use_mm_for_euclid_dist").square()
    mismatches = (codes[:, None, :] != codes[None, :, :]).sum(-1).to(X_cont.dtype)
    return (d2 + mismatches * med.square()).sqrt()


def nominal_vote(neighbor_codes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Most frequent value per (sample, nominal feature) among the k neighbours; random among ties.

    `neighbor_codes` is (n, k, F); each value's count is the number of neighbours holding it.
    """
    same = neighbor_codes[:, :, None, :] == neighbor_codes[:, None, :, :]  # (n, k, k, F)
    counts = same.sum(dim=2).to(torch.float64)  # (n, k, F): how often neighbour j's value occurs
    # A noise below 1 never reorders different counts; between equal counts every tied value has
    # the same number of draws, so each wins with equal chance.
    noise = torch.rand(counts.shape, generator=generator, device=generator.device,
                       dtype=torch.float64)
    winner = (counts + 0.5 * noise).argmax(dim=1)  # (n, F): which neighbour's value wins
    return torch.gather(neighbor_codes, 1, winner[:, None, :]).squeeze(1)


class SMOTENC(SMOTE):
    """SMOTE-NC: continuous features interpolated, each nominal feature set to its most frequent
    value among the k neighbours, and neighbours found with the median of the minority class's
    continuous standard deviations added per nominal mismatch (squared, inside the Euclidean
    distance).

    `categorical_features` lists the nominal column indices (or a boolean mask). Nominal columns
    hold numeric codes; any values work, only equality is used.
    """

    def __init__(self, categorical_features, amount=None, *, sampling_ratio=None,
                 k_neighbors: int = 5, seed: int = 0, device="cpu", minority_label=None):
        super().__init__(amount, sampling_ratio=sampling_ratio, k_neighbors=k_neighbors, seed=seed,
                         device=device, minority_label=minority_label)
        self.categorical_features = categorical_features
        self.median_std_: float | None = None

    def _columns(self, n_features: int) -> tuple[np.ndarray, np.ndarray]:
        cat = np.asarray(self.categorical_features)
        if cat.dtype == bool:
            if cat.shape != (n_features,):
                raise ValueError(f"categorical_features mask has {cat.size} entries for "
                                 f"{n_features} features")
            cat = np.flatnonzero(cat)
        cat = np.unique(cat.astype(int))
        if cat.size and (cat.min() < 0 or cat.max() >= n_features):
            raise ValueError(f"categorical_features {cat.tolist()} out of range for {n_features} "
                             "features")
        if cat.size == 0:
            raise ValueError("SMOTENC needs at least one nominal feature; use SMOTE otherwise")
        if cat.size == n_features:
            raise ValueError("SMOTENC needs at least one continuous feature (all features are "
                             "nominal; the paper's SMOTE-N would be needed)")
        return np.setdiff1d(np.arange(n_features), cat), cat

    def fit_resample(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        X, y, minority, is_min = self._split(X, y)
        cont, nom = self._columns(X.shape[1])
        n_min = int(is_min.sum())
        _check_k(self.k_neighbors, n_min)
        n_new = self._n_synthetic(n_min, len(y) - n_min)

        X_min = X[is_min]
        values = [np.unique(col) for col in X_min[:, nom].T]
        codes = torch.as_tensor(nominal_codes(X_min[:, nom]), device=self.device)
        X_cont = torch.as_tensor(X_min[:, cont], device=self.device)
        med = median_std(X_cont)
        self.median_std_ = float(med)

        gen = seeding.generator(self.seed, self.device)
        neighbors = smotenc_neighbors(X_cont, codes, self.k_neighbors, med)
        draw = smote_samples(X_cont, n_new, self.k_neighbors, gen, neighbors)
        voted = nominal_vote(codes[neighbors[draw.base]], gen).cpu().numpy()
        self.last_draw = draw

        X_new = np.empty((n_new, X.shape[1]))
        X_new[:, cont] = draw.samples.cpu().numpy()
        for j, col in enumerate(nom):
            X_new[:, col] = values[j][voted[:, j]]
        return self._stack(X, y, X_new, minority)


# --------------------------------------------------------------------------------------------------
# Random under-sampling and the paper's combination


def n_majority_kept(n_minority: int, n_majority: int, under_amount: float) -> int:
    """Majority samples kept when under-sampling at `under_amount`%: the minority becomes that
    percent of the majority (200% keeps half as many majority as minority samples), never more
    than there are."""
    under_amount = _check_amount(under_amount, "under_amount")
    if under_amount == 0:
        raise ValueError("under_amount must be > 0 percent (0 would keep infinitely many majority "
                         "samples); use None for no under-sampling")
    return min(n_majority, max(1, int(round(n_minority * 100 / under_amount))))


class RandomUnderSampler:
    """Random under-sampling of the majority class at the paper's `U`% (Section 4.3).

    `n_minority` fixes the minority count the percentage refers to; by default the count in `y`. The
    paper's SMOTE+under curves under-sample relative to the original minority count, so that each
    point has as many majority samples as the plain under-sampling point at the same `U`.
    """

    def __init__(self, under_amount: float, *, n_minority: int | None = None, seed: int = 0,
                 minority_label=None):
        self.under_amount = _check_amount(under_amount, "under_amount")
        self.n_minority = n_minority
        self.seed = int(seed)
        self.minority_label = minority_label

    def fit_resample(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        X, y = check_xy(X, y, what="RandomUnderSampler")
        minority, _ = minority_majority(y, self.minority_label)
        maj_idx = np.flatnonzero(y != minority)
        n_min = int((y == minority).sum()) if self.n_minority is None else int(self.n_minority)
        keep = n_majority_kept(n_min, len(maj_idx), self.under_amount)
        gen = seeding.generator(self.seed)
        chosen = maj_idx[torch.randperm(len(maj_idx), generator=gen)[:keep].numpy()]
        rows = np.sort(np.concatenate([np.flatnonzero(y == minority), chosen]))
        return X[rows], y[rows]


def resample(X, y, *, over: str | None = "smote", amount: float = 0, under_amount=None,
             k_neighbors: int = 5, seed: int = 0, under_seed: int | None = None, device="cpu",
             minority_label=None) -> tuple[np.ndarray, np.ndarray]:
    """The paper's training-set perturbation: over-sample the minority at `amount`% (SMOTE or
    replication), and under-sample the majority at `under_amount`% of the original minority count.

    `under_seed` (default `seed`) lets several over-sampling settings share one majority subset.
    """
    if over not in {None, "smote", "replicate"}:
        raise ValueError(f"over must be 'smote', 'replicate' or None, got {over!r}")
    X, y = check_xy(X, y, what="resample")
    minority, _ = minority_majority(y, minority_label)
    n_min = int((y == minority).sum())
    if under_amount is not None:
        sampler = RandomUnderSampler(under_amount, n_minority=n_min,
                                     seed=seed if under_seed is None else under_seed,
                                     minority_label=minority)
        X, y = sampler.fit_resample(X, y)
    if over is None or amount == 0:
        return X, y
    if over == "smote":
        return SMOTE(amount, k_neighbors=k_neighbors, seed=seed, device=device,
                     minority_label=minority).fit_resample(X, y)
    return RandomOverSampler(amount, seed=seed, device=device,
                             minority_label=minority).fit_resample(X, y)
