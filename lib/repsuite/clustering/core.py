"""K-means and Gaussian mixtures in PyTorch, shared by the clustering papers.

`kmeans` is Lloyd's algorithm from k-means++ (or uniformly random) seeds, best of `n_init` runs by
inertia, the within-cluster sum of squared distances. `gmm` fits a mixture of k Gaussians by EM,
from a k-means partition (or k-means++ means, or random responsibilities), best of `n_init` runs by
log-likelihood, and reports the Bayesian information criterion

    BIC = -2 log L + p log n,   p = (k - 1) + k d + (covariance parameters)

with the same parameter count as scikit-learn (full: k d (d + 1) / 2, tied: d (d + 1) / 2,
diag: k d, spherical: k), so the two agree on the same fit.

Both work in float64 on the device of X (a torch tensor) or on `device`, the CPU by default, and
return tensors on that device (call `.cpu().numpy()` for scikit-learn's metrics). Every random
draw comes from a generator seeded by `seed`, so the same call gives the same numbers.

Empty clusters. When a k-means cluster loses all its points, it is re-seeded at the point farthest
from its own center, taken from a cluster of two or more points (the next farthest for a second
empty cluster), as scikit-learn does. When a mixture component's total responsibility falls to
(numerically) zero, it is re-seeded at the point of lowest density under the mixture, with the
covariance of the whole data and weight 1 / n. Both are counted in `n_reseeded`.
"""

import math
from dataclasses import dataclass

import torch

from repsuite.seeding import generator, pick_device

INITS_KMEANS = ("k-means++", "random")
INITS_GMM = ("kmeans", "k-means++", "random")
COVARIANCES = ("full", "tied", "diag", "spherical")

# Responsibility mass below which a component counts as empty (scikit-learn adds 10 eps to it).
_EMPTY = 10 * torch.finfo(torch.float64).eps


@dataclass
class KMeansResult:
    labels: torch.Tensor  # (n,) int64, cluster of each point
    centers: torch.Tensor  # (k, d)
    inertia: float  # sum of squared distances of the points to their cluster's center
    n_iter: int  # Lloyd updates of the best run
    converged: bool = True
    n_reseeded: int = 0  # empty clusters re-seeded during the best run
    total_iter: int = 0  # Lloyd updates summed over all n_init starts (the work done)


@dataclass
class GMMResult:
    labels: torch.Tensor  # (n,) int64, the component of largest responsibility
    weights: torch.Tensor  # (k,)
    means: torch.Tensor  # (k, d)
    covariances: torch.Tensor  # full (k, d, d), tied (d, d), diag (k, d), spherical (k,)
    log_likelihood: float  # total over the n points (scikit-learn's score() is this / n)
    bic: float
    n_iter: int  # EM iterations of the best run
    responsibilities: torch.Tensor  # (n, k), posterior probability of each component
    converged: bool = True
    n_reseeded: int = 0
    covariance: str = "full"


# -------------------------------------------------------------------------------------------------
# Input checks


def _device(X, device) -> torch.device:
    if device is None:
        return X.device if isinstance(X, torch.Tensor) else torch.device("cpu")
    if isinstance(device, str) and device in {"auto", "cpu", "cuda"}:
        return pick_device(device)
    return torch.device(device)


def as_points(X, device=None) -> torch.Tensor:
    """X as an (n, d) float64 tensor on `device`, or a clear error."""
    if isinstance(X, torch.Tensor):
        X = X.detach()
    X = torch.as_tensor(X, dtype=torch.float64, device=_device(X, device))
    if X.ndim != 2:
        raise ValueError(f"X must be a matrix (points x features), got shape {tuple(X.shape)}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X is empty: shape {tuple(X.shape)}")
    if not torch.isfinite(X).all():
        bad = int((~torch.isfinite(X)).any(1).sum())
        raise ValueError(f"X contains NaN or infinite values in {bad} of its {X.shape[0]} rows")
    return X


def n_distinct(X: torch.Tensor) -> int:
    """Number of distinct rows of X. A random projection separates distinct rows (almost surely);
    only when it finds collisions are the rows compared exactly."""
    g = generator(12345, X.device)
    r = torch.randn(X.shape[1], dtype=X.dtype, device=X.device, generator=g)
    projected = torch.unique(X @ r).numel()
    return projected if projected == X.shape[0] else torch.unique(X, dim=0).shape[0]


def _check_common(X: torch.Tensor, k: int, n_init: int, max_iter: int, tol: float) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    n = X.shape[0]
    if k > n:
        raise ValueError(f"k = {k} clusters asked for but X has only {n} points")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be >= 1, got {n_init} and {max_iter}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if k > 1:
        m = n_distinct(X)
        if m < k:
            raise ValueError(f"X has only {m} distinct points (the other rows are duplicates), "
                             f"fewer than the k = {k} clusters asked for")


def _fixed_start(init, X: torch.Tensor, k: int, shape: tuple, name: str) -> torch.Tensor:
    start = torch.as_tensor(init, device=X.device)
    if tuple(start.shape) != shape:
        raise ValueError(f"{name} given as an array must have shape {shape}, got "
                         f"{tuple(start.shape)}")
    if start.is_floating_point() and not torch.isfinite(start).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return start


# -------------------------------------------------------------------------------------------------
# K-means


def sq_distances(X: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(n, k) squared Euclidean distances, by the expansion |x|^2 - 2 x.c + |c|^2 (clamped at 0)."""
    d2 = (X * X).sum(1, keepdim=True) - 2 * X @ centers.T + (centers * centers).sum(1)
    return d2.clamp_min_(0)


def kmeans_plusplus(X: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeds (Arthur & Vassilvitskii, 2007): each new center is the best, by the
    resulting potential, of 2 + ln k candidates drawn with probability proportional to the squared
    distance to the nearest center chosen so far."""
    n = X.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=g, device=X.device))
    centers = [X[first]]
    closest = sq_distances(X, X[first:first + 1])[:, 0]
    for _ in range(1, k):
        potential = closest.sum()
        u = torch.rand(trials, dtype=X.dtype, device=X.device, generator=g) * potential
        candidates = torch.searchsorted(torch.cumsum(closest, 0), u).clamp_max_(n - 1)
        with_candidate = torch.minimum(closest[:, None], sq_distances(X, X[candidates]))
        best = int(with_candidate.sum(0).argmin())
        centers.append(X[candidates[best]])
        closest = with_candidate[:, best]
    return torch.stack(centers)


def _reseed_empty(X, labels, d2_own, centers) -> int:
    """Move the farthest points (from their own center, in clusters of two or more) into the empty
    clusters, in place. Returns how many clusters were empty."""
    k = centers.shape[0]
    counts = torch.bincount(labels, minlength=k)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if not empty:
        return 0
    far = torch.argsort(d2_own, descending=True, stable=True).tolist()
    for j in empty:
        while counts[labels[far[0]]] < 2:
            far.pop(0)
        p = far.pop(0)
        counts[labels[p]] -= 1
        counts[j] = 1
        labels[p] = j
        d2_own[p] = 0.0
        centers[j] = X[p]
    return len(empty)


def _assign(X, centers):
    d2 = sq_distances(X, centers)
    d2_own, labels = d2.min(1)
    return labels, d2_own


def _cluster_means(X, labels, k) -> torch.Tensor:
    sums = torch.zeros(k, X.shape[1], dtype=X.dtype, device=X.device).index_add_(0, labels, X)
    counts = torch.bincount(labels, minlength=k).to(X.dtype)
    return sums / counts[:, None]


def _lloyd(X, centers, max_iter, tol_abs) -> KMeansResult:
    k = centers.shape[0]
    centers = centers.clone()
    labels, d2_own = _assign(X, centers)
    reseeded = _reseed_empty(X, labels, d2_own, centers)
    converged, n_iter = False, 0

    while n_iter < max_iter:
        n_iter += 1
        new_centers = _cluster_means(X, labels, k)
        shift = float(((new_centers - centers) ** 2).sum())
        centers = new_centers
        new_labels, d2_own = _assign(X, centers)
        moved = _reseed_empty(X, new_labels, d2_own, centers)
        reseeded += moved
        unchanged = bool(torch.equal(new_labels, labels))
        labels = new_labels
        # A re-seeded center is not the mean of its cluster yet: keep iterating.
        if not moved and (unchanged or shift <= tol_abs):
            converged = True
            break

    inertia = float(((X - centers[labels]) ** 2).sum())
    return KMeansResult(labels, centers, inertia, n_iter, converged, reseeded, n_iter)


def kmeans(X, k: int, *, n_init: int = 1, max_iter: int = 300, tol: float = 1e-6, seed: int = 0,
           init="k-means++", device=None) -> KMeansResult:
    """Lloyd's k-means, best of `n_init` starts by inertia.

    init: "k-means++" (greedy, as scikit-learn), "random" (k distinct rows drawn uniformly), or a
    (k, d) array of starting centers (then one run). Stops when no label changes or when the
    centers move by at most `tol` times the mean per-feature variance of X (squared, summed), as
    scikit-learn's tolerance.
    """
    X = as_points(X, device)
    _check_common(X, k, n_init, max_iter, tol)
    tol_abs = tol * float(X.var(0, unbiased=False).mean())

    if not isinstance(init, str):
        start = _fixed_start(init, X, k, (k, X.shape[1]), "init").to(X.dtype)
        return _lloyd(X, start, max_iter, tol_abs)
    if init not in INITS_KMEANS:
        raise ValueError(f"init must be one of {INITS_KMEANS} or a (k, d) array, got {init!r}")

    g = generator(seed, X.device)
    best, total = None, 0
    for _ in range(n_init):
        if init == "k-means++":
            start = kmeans_plusplus(X, k, g)
        else:
            start = _random_distinct_rows(X, k, g)
        run = _lloyd(X, start, max_iter, tol_abs)
        total += run.n_iter
        if best is None or run.inertia < best.inertia:
            best = run
    best.total_iter = total
    return best


def _random_distinct_rows(X, k, g) -> torch.Tensor:
    """k rows of X drawn uniformly without replacement among distinct values."""
    order = torch.randperm(X.shape[0], generator=g, device=X.device)
    chosen = []
    for i in order.tolist():
        if all(not torch.equal(X[i], c) for c in chosen):
            chosen.append(X[i])
            if len(chosen) == k:
                break
    return torch.stack(chosen)


# -------------------------------------------------------------------------------------------------
# Gaussian mixtures


def n_parameters(k: int, d: int, covariance: str = "full") -> int:
    """Free parameters of a k-component mixture in d dimensions (weights, means, covariances)."""
    cov = {"full": k * d * (d + 1) // 2, "tied": d * (d + 1) // 2, "diag": k * d,
           "spherical": k}[covariance]
    return (k - 1) + k * d + cov


def _full_covariances(covariances: torch.Tensor, covariance: str, k: int, d: int) -> torch.Tensor:
    if covariance == "full":
        return covariances
    if covariance == "tied":
        return covariances.expand(k, d, d)
    if covariance == "diag":
        return torch.diag_embed(covariances)
    return covariances[:, None, None] * torch.eye(d, dtype=covariances.dtype,
                                                  device=covariances.device)


def component_log_density(X: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor,
                          covariance: str = "full") -> torch.Tensor:
    """(n, k) log N(x_i | mu_j, Sigma_j), through the Cholesky factor of each Sigma_j."""
    k, d = means.shape
    if covariance in ("diag", "spherical"):
        var = covariances if covariance == "diag" else covariances[:, None].expand(k, d)
        if (var <= 0).any():
            raise ValueError("a component's variance is not positive: increase reg_covar")
        precision = 1.0 / var
        quad = ((X * X) @ precision.T - 2 * X @ (means * precision).T
                + (means * means * precision).sum(1)).clamp_min_(0)
        log_det = torch.log(var).sum(1)
    else:
        full = _full_covariances(covariances, covariance, k, d)
        L, info = torch.linalg.cholesky_ex(full)
        if (info != 0).any():
            j = int(torch.nonzero(info).flatten()[0])
            raise ValueError(f"the covariance of component {j} is not positive definite "
                             "(duplicated or collinear points?): increase reg_covar or reduce k")
        diff = (X[None] - means[:, None]).transpose(1, 2)  # (k, d, n)
        z = torch.linalg.solve_triangular(L, diff, upper=False)
        quad = (z * z).sum(1).T
        log_det = 2 * torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(1)
    return -0.5 * (d * math.log(2 * math.pi) + log_det + quad)


def _m_step(X, resp, covariance, reg_covar):
    n, d = X.shape
    nk = resp.sum(0) + _EMPTY
    means = resp.T @ X / nk[:, None]
    if covariance == "full":
        diff = X[None] - means[:, None]  # (k, n, d)
        cov = torch.einsum("nk,kni,knj->kij", resp, diff, diff) / nk[:, None, None]
        cov = cov + reg_covar * torch.eye(d, dtype=X.dtype, device=X.device)
    elif covariance == "tied":
        cov = (X.T @ X - (nk[:, None] * means).T @ means) / nk.sum()
        cov = cov + reg_covar * torch.eye(d, dtype=X.dtype, device=X.device)
    else:
        var = (resp.T @ (X * X) - 2 * means * (resp.T @ X) + nk[:, None] * means ** 2)
        var = var / nk[:, None] + reg_covar
        cov = var if covariance == "diag" else var.mean(1)
    return nk / n, means, cov


def _e_step(X, weights, means, cov, covariance):
    """Per-point log-likelihood (n,) and log-responsibilities (n, k)."""
    weighted = component_log_density(X, means, cov, covariance) + torch.log(weights)
    log_px = torch.logsumexp(weighted, 1)
    return log_px, weighted - log_px[:, None]


def _reseed_components(X, resp, log_px, covariance, reg_covar, params) -> int:
    """Re-seed components with no responsibility at the points of lowest density, in place."""
    weights, means, cov = params
    empty = torch.nonzero(resp.sum(0) < _EMPTY).flatten().tolist()
    if not empty:
        return 0
    n, d = X.shape
    lowest = torch.argsort(log_px, stable=True).tolist()
    pooled = torch.cov(X.T, correction=0).reshape(d, d) + reg_covar * torch.eye(
        d, dtype=X.dtype, device=X.device)
    for j, p in zip(empty, lowest, strict=False):
        means[j] = X[p]
        weights[j] = 1.0 / n
        if covariance == "full":
            cov[j] = pooled
        elif covariance == "diag":
            cov[j] = torch.diagonal(pooled)
        elif covariance == "spherical":
            cov[j] = torch.diagonal(pooled).mean()
    weights /= weights.sum()
    return len(empty)


def _em(X, resp, covariance, max_iter, tol, reg_covar) -> GMMResult:
    n, d = X.shape
    k = resp.shape[1]
    weights, means, cov = _m_step(X, resp, covariance, reg_covar)
    mean_ll, converged, reseeded, n_iter = -math.inf, False, 0, 0

    while n_iter < max_iter:
        n_iter += 1
        log_px, log_resp = _e_step(X, weights, means, cov, covariance)
        new_ll = float(log_px.mean())
        resp = log_resp.exp()
        weights, means, cov = _m_step(X, resp, covariance, reg_covar)
        moved = _reseed_components(X, resp, log_px, covariance, reg_covar, (weights, means, cov))
        reseeded += moved
        # Stop on the change of the mean log-likelihood per point, as scikit-learn does.
        if not moved and abs(new_ll - mean_ll) < tol:
            converged = True
            break
        mean_ll = new_ll

    log_px, log_resp = _e_step(X, weights, means, cov, covariance)
    log_l = float(log_px.sum())
    bic = -2 * log_l + n_parameters(k, d, covariance) * math.log(n)
    resp = log_resp.exp()
    return GMMResult(resp.argmax(1), weights, means, cov, log_l, bic, n_iter, resp, converged,
                     reseeded, covariance)


def _start_responsibilities(X, k, init, g) -> torch.Tensor:
    n = X.shape[0]
    if init == "random":
        resp = torch.rand(n, k, dtype=X.dtype, device=X.device, generator=g)
        return resp / resp.sum(1, keepdim=True)
    if init == "kmeans":
        sub_seed = int(torch.randint(2**31 - 1, (1,), generator=g, device=X.device))
        labels = kmeans(X, k, n_init=1, seed=sub_seed).labels
    else:
        labels = _assign(X, kmeans_plusplus(X, k, g))[0]
    return torch.nn.functional.one_hot(labels, k).to(X.dtype)


def gmm(X, k: int, *, covariance: str = "full", n_init: int = 1, max_iter: int = 200,
        tol: float = 1e-6, reg_covar: float = 1e-6, seed: int = 0, init="kmeans",
        device=None) -> GMMResult:
    """A k-component Gaussian mixture fitted by EM, best of `n_init` starts by log-likelihood.

    covariance: "full", "tied", "diag" or "spherical" (as scikit-learn). init: "kmeans" (the
    responsibilities are the one-hot labels of one k-means++ run), "k-means++" (the points' nearest
    k-means++ seed), "random" (uniform random responsibilities), or an array: (n,) labels in
    0..k-1 or (n, k) responsibilities (then one run). EM stops when the mean log-likelihood per
    point changes by less than `tol`; `reg_covar` is added to every variance.
    """
    X = as_points(X, device)
    _check_common(X, k, n_init, max_iter, tol)
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    if reg_covar < 0:
        raise ValueError(f"reg_covar must be >= 0, got {reg_covar}")
    n = X.shape[0]

    if not isinstance(init, str):
        start = torch.as_tensor(init, device=X.device)
        if start.ndim == 1:
            labels = _fixed_start(start, X, k, (n,), "init labels").long()
            if labels.min() < 0 or labels.max() >= k:
                raise ValueError(f"init labels must lie in 0..{k - 1}")
            start = torch.nn.functional.one_hot(labels, k).to(X.dtype)
        else:
            start = _fixed_start(start, X, k, (n, k), "init responsibilities").to(X.dtype)
            if (start < 0).any() or not torch.allclose(start.sum(1), torch.ones_like(start[:, 0])):
                raise ValueError("init responsibilities must be >= 0 and sum to 1 in every row")
        return _em(X, start, covariance, max_iter, tol, reg_covar)
    if init not in INITS_GMM:
        raise ValueError(f"init must be one of {INITS_GMM} or an array of labels or "
                         f"responsibilities, got {init!r}")

    g = generator(seed, X.device)
    best = None
    for _ in range(n_init):
        run = _em(X, _start_responsibilities(X, k, init, g), covariance, max_iter, tol, reg_covar)
        if best is None or run.log_likelihood > best.log_likelihood:
            best = run
    return best
