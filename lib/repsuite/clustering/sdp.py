"""SDP relaxed K-means and the iterative likelihood adjusted SDP (iLA-SDP) for Gaussian mixtures
with cluster-specific covariances.

Zhuang, Chen & Yang, "Likelihood Adjusted Semidefinite Programs for Clustering Heterogeneous
Data", ICML 2023 (arXiv 2209.15097).

The cluster labels are parameters of the model: x_i ~ N(mu_k, Sigma_k) for i in G_k. Profiling
the means out (mu_k = mean of G_k), minus twice the log-likelihood is, up to n p log(2 pi),

    sum_k [ sum_{i in G_k} (x_i - xbar_k)^T Sigma_k^{-1} (x_i - xbar_k) + n_k log|Sigma_k| ].

Lift the partition to one membership matrix per cluster, B_k = 1_{G_k} 1_{G_k}^T / n_k. With
D_k the squared Mahalanobis distances under Sigma_k, D_k[i, j] = (x_i - x_j)^T Sigma_k^{-1}
(x_i - x_j), the within-cluster form is <D_k / 2, B_k> and n_k = <11^T, B_k>, so for fixed
covariances the likelihood is *linear* in (B_1, ..., B_K):

    -2 loglik = sum_k <C_k, B_k>,   C_k = D_k / 2 + log|Sigma_k| 11^T.

No centroid appears. The partition matrices satisfy B_k >= 0 entrywise, B_k PSD, tr(B_k) = 1 and
sum_k B_k 1 = 1 (every point's memberships sum to one); dropping integrality gives the
likelihood adjusted SDP (LA-SDP)

    minimise sum_k <C_k, B_k>  s.t.  B_k PSD,  B_k >= 0,  tr(B_k) = 1,  sum_k B_k 1 = 1.

With one common covariance the log-det terms and the diagonal part of D_k add up to constants and
Z = sum_k B_k ranges over Peng & Wei's SDP relaxation of K-means (Z PSD, Z >= 0, tr Z = K, Z1 = 1),
so LA-SDP generalises SDP K-means (tested).

iLA-SDP estimates the covariances and the memberships in turn. Since <D_k / 2, B_k> =
tr(Sigma_k^{-1} X^T (diag(B_k 1) - B_k) X), the relaxed objective

    F(B, Sigma) = sum_k <D_k(Sigma_k) / 2 + log|Sigma_k| 11^T, B_k>

is minimised over Sigma_k, for fixed B_k, by Sigma_k = X^T (diag(B_k 1) - B_k) X / (1^T B_k 1),
a weighted within-cluster scatter with no centroid in it (the maximum likelihood covariance when
B_k is a partition matrix); and over B, for fixed covariances, by the LA-SDP. Alternating the two
(`update="soft"`) never increases F, which equals -2 loglik on partitions. It starts from the
partition of SDP K-means and stops when the rounded partition no longer changes.

Our reading, where the paper's text was not available to us: the constraints above (the natural
lifting, which reduces to Peng-Wei); the covariance step from the relaxed memberships (the
alternative, `update="hard"`, re-estimates them from the rounded partition at every step); and
the rounding, K-means on the spectral coordinates of all K blocks side by side
(`spectral_round`; SDP K-means likewise on Z). Rounding each point to its largest membership
(B_k 1)_i fails: when two clusters have (nearly) the same covariance the LA-SDP cannot tell their
blocks apart and splits both evenly between them. `reg_covar I` is added to every covariance.

Both SDPs are solved by one ADMM in PyTorch (`solve_membership_sdp`): copies X = Y = W of the
blocks, X on the affine constraints (a closed-form projection), Y on the PSD cone (one batched
eigendecomposition per iteration), W on the nonnegative orthant, with residual balancing of the
penalty. A unit test checks it against cvxpy's interior point solver.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import torch

# -------------------------------------------------------------------------------------------------
# Input checks


def as_points(X, name: str = "X", device=None) -> torch.Tensor:
    """Points (n, p) as a float64 tensor, or a clear error."""
    t = torch.as_tensor(np.asarray(X, dtype=np.float64) if not torch.is_tensor(X) else X,
                        dtype=torch.float64, device=device)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a matrix (points x features), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def _check_k(K: int, n: int) -> None:
    if not isinstance(K, int | np.integer) or isinstance(K, bool) or K < 1:
        raise ValueError(f"the number of clusters K must be a positive int, got {K!r}")
    if K > n:
        raise ValueError(f"K = {K} clusters asked for but there are only n = {n} points")


def _check_labels(labels, n: int, K: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"the labels must be one per point ({n}), got shape {labels.shape}")
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= K:
        raise ValueError(f"the labels must be integers in 0 .. {K - 1}")
    return labels.astype(np.int64)


# -------------------------------------------------------------------------------------------------
# The ADMM solver for membership SDPs


def project_affine(G: torch.Tensor, trace: torch.Tensor) -> torch.Tensor:
    """The nearest (Frobenius) blocks B_1..B_m to symmetric G_1..G_m, shape (m, n, n), with
    tr(B_k) = trace[k] and sum_k B_k 1 = 1.

    The minimiser is B_k = G_k + a_k I + (mu 1^T + 1 mu^T) / 2 for multipliers a (one per
    trace) and mu (one per row sum); the two constraints give them in closed form.
    """
    m, n, _ = G.shape
    row = G.sum(-1).sum(0)
    tr = torch.diagonal(G, dim1=-2, dim2=-1).sum(-1)

    # s = 1^T mu, from the total of the row sums and the total of the traces.
    s = (n - row.sum() - trace.sum() + tr.sum()) / (m * (n - 1))
    a = (trace - tr - s) / n
    mu = 2.0 / (m * n) * (1.0 - row - a.sum()) - s / n

    B = G + (mu[:, None] + mu[None, :]) / 2
    return B + a[:, None, None] * torch.eye(n, dtype=G.dtype, device=G.device)


def project_psd(M: torch.Tensor) -> torch.Tensor:
    """The nearest PSD matrices to symmetric M (batched): negative eigenvalues set to 0."""
    w, V = torch.linalg.eigh(M)
    P = (V * w.clamp(min=0).unsqueeze(-2)) @ V.transpose(-1, -2)
    return (P + P.transpose(-1, -2)) / 2


@dataclass
class SDPResult:
    B: torch.Tensor  # (m, n, n) nonnegative blocks (the solution)
    objective: float  # sum_k <C_k, B_k> in the caller's units
    n_iter: int
    converged: bool
    residual: float  # relative distance between the affine, PSD and nonnegative copies
    state: tuple = field(repr=False, default=())  # warm start for a related problem


def solve_membership_sdp(C, trace, *, tol: float = 1e-5, max_iter: int = 5000,
                         rho: float = 5.0, alpha: float = 1.6, warm=()) -> SDPResult:
    """Minimise sum_k <C_k, B_k> over B_k PSD, B_k >= 0, tr(B_k) = trace[k], sum_k B_k 1 = 1.

    C: (m, n, n) symmetric costs; trace: (m,) positive, summing to at most n (m = 1 and
    trace = [K] is Peng-Wei's SDP K-means). ADMM on three copies of the blocks (affine, PSD,
    nonnegative); it stops when both the primal residual (disagreement between the copies) and
    the dual residual are below `tol` relative to their scales, checked every 10 iterations.
    `alpha` is the over-relaxation of the affine copy (1 is plain ADMM; 1.5 to 1.8 usually
    converge faster).
    `warm` is the `state` of an earlier result on a problem of the same shape (iLA-SDP's outer
    iterations), or a (m, n, n) tensor to start all three copies from (a partition's blocks).
    """
    C = torch.as_tensor(C)
    if C.ndim != 3 or C.shape[1] != C.shape[2]:
        raise ValueError(f"C must be (blocks, n, n), got shape {tuple(C.shape)}")
    m, n, _ = C.shape
    if n < 2:
        raise ValueError(f"a membership SDP needs at least 2 points, got n = {n}")
    if not torch.isfinite(C).all():
        raise ValueError("the cost matrices C contain NaN or infinite values")
    trace = torch.as_tensor(trace, dtype=C.dtype, device=C.device).reshape(-1)
    if trace.numel() != m:
        raise ValueError(f"one trace per block is needed: {m} blocks, {trace.numel()} traces")
    if (trace <= 0).any() or trace.sum() > n:
        raise ValueError(f"the traces must be positive and sum to at most n = {n}, got "
                         f"{trace.tolist()}")
    if not (tol > 0 and max_iter >= 1 and rho > 0 and 0 < alpha < 2):
        raise ValueError("tol and rho must be > 0, alpha in (0, 2) and max_iter >= 1")

    # Scaled to a unit mean absolute deviation, so that rho means the same on every problem (the
    # largest entry is a poor scale: one thin cluster makes its Mahalanobis distances huge). A
    # constant added to every entry changes no minimiser: sum_k <11^T, B_k> = n is fixed.
    Cs = (C + C.transpose(-1, -2)) / 2
    scale = float((Cs - Cs.mean()).abs().mean()) or 1.0
    Cs = Cs / scale
    if isinstance(warm, tuple) and warm:
        # The scaled duals are in units of the costs: carry them over to the new scale.
        X, Y, W, U, V, rho, old_scale = warm
        U, V = U * (old_scale / scale), V * (old_scale / scale)
    else:
        X = warm if torch.is_tensor(warm) else (trace / n)[:, None, None] * torch.ones_like(Cs)
        X = project_affine(X.to(Cs), trace)
        Y, W, U, V = X.clone(), X.clone(), torch.zeros_like(Cs), torch.zeros_like(Cs)

    converged, residual, it = False, float("inf"), 0
    for it in range(1, max_iter + 1):
        X = project_affine((Y - U + W - V) / 2 - Cs / (2 * rho), trace)
        X_y, X_w = alpha * X + (1 - alpha) * Y, alpha * X + (1 - alpha) * W
        Y_old, W_old = Y, W
        Y = project_psd(X_y + U)
        W = (X_w + V).clamp(min=0)
        U = U + X_y - Y
        V = V + X_w - W
        if it % 10:
            continue

        # Relative primal and dual residuals; the penalty follows the larger one.
        size = max(float(X.norm()), float(Y.norm()), float(W.norm()))
        r = math.sqrt(float(((X - Y) ** 2).sum() + ((X - W) ** 2).sum())) / size
        dual = float(torch.sqrt((U ** 2).sum() + (V ** 2).sum())) or 1.0
        s = float((Y - Y_old + W - W_old).norm()) / dual
        residual = r
        if r <= tol and s <= tol:
            converged = True
            break
        if r > 10 * s:
            rho, U, V = rho * 2, U / 2, V / 2
        elif s > 10 * r:
            rho, U, V = rho / 2, U * 2, V * 2

    objective = float((C * W).sum())
    return SDPResult(W, objective, it, converged, residual, (X, Y, W, U, V, rho, scale))


# -------------------------------------------------------------------------------------------------
# Peng-Wei SDP K-means


@dataclass
class KMeansSDPResult:
    labels: np.ndarray
    Z: torch.Tensor  # (n, n) the relaxed partition matrix
    objective: float  # <D / 2, Z>: the within-cluster sum of squares when Z is a partition
    n_iter: int
    converged: bool


def squared_distances(X: torch.Tensor, precision: torch.Tensor | None = None) -> torch.Tensor:
    """D[i, j] = (x_i - x_j)^T P (x_i - x_j), P the identity or a precision matrix."""
    Y = X if precision is None else X @ torch.linalg.cholesky(precision)
    sq = (Y ** 2).sum(1)
    D = sq[:, None] + sq[None, :] - 2 * Y @ Y.T
    return D.clamp(min=0).fill_diagonal_(0)


def spectral_round(B: torch.Tensor, K: int, *, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """Labels from relaxed membership blocks B (m, n, n) (m = 1: Peng-Wei's Z): K-means on the
    points' spectral coordinates, the top-K eigenvectors of every block scaled by the square roots
    of their eigenvalues, side by side (n x m K).

    For exact partition blocks two points of one cluster have the same coordinates and points of
    different clusters do not. Looking at all blocks together also separates clusters that share
    one block: when two clusters have the same covariance the LA-SDP cannot tell which block is
    whose, and its optimum splits both clusters evenly between the two blocks.
    """
    from repsuite.clustering.core import kmeans

    if B.ndim == 2:
        B = B[None]
    w, V = torch.linalg.eigh((B + B.transpose(-1, -2)) / 2)
    emb = V[..., -K:] * w[..., None, -K:].clamp(min=0).sqrt()
    emb = emb.transpose(0, 1).reshape(B.shape[1], -1)
    return kmeans(emb, K, n_init=n_init, seed=seed).labels.cpu().numpy()


def kmeans_sdp(X, K: int, *, tol: float = 1e-5, max_iter: int = 5000, seed: int = 0,
               device=None) -> KMeansSDPResult:
    """Peng & Wei's SDP relaxation of K-means: minimise <D / 2, Z> (equivalently maximise
    <X X^T, Z>) over Z PSD, Z >= 0, tr(Z) = K, Z 1 = 1; rounded by `spectral_round`."""
    X = as_points(X, device=device)
    _check_k(K, len(X))
    D = squared_distances(X)
    sol = solve_membership_sdp((D / 2)[None], [float(K)], tol=tol, max_iter=max_iter)
    Z = sol.B[0]
    return KMeansSDPResult(spectral_round(Z, K, seed=seed), Z, sol.objective, sol.n_iter,
                           sol.converged)


# -------------------------------------------------------------------------------------------------
# The likelihood adjustment


def membership_matrices(labels, K: int, device=None) -> torch.Tensor:
    """B_k = 1_{G_k} 1_{G_k}^T / n_k, shape (K, n, n); an empty cluster has B_k = 0."""
    labels = torch.as_tensor(np.asarray(labels), device=device)
    onehot = torch.nn.functional.one_hot(labels.long(), K).T.to(torch.float64)
    sizes = onehot.sum(1).clamp(min=1)
    return onehot[:, :, None] * onehot[:, None, :] / sizes[:, None, None]


def scatter_matrices(X: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """X^T (diag(B_k 1) - B_k) X, shape (K, p, p): half the B_k-weighted sum of the outer
    products (x_i - x_j)(x_i - x_j)^T, the within-cluster scatter when B_k is a partition
    matrix."""
    rows = B.sum(-1)
    return torch.einsum("ip,ki,iq->kpq", X, rows, X) - torch.einsum("ip,kij,jq->kpq", X, B, X)


def covariances_from_memberships(X: torch.Tensor, B: torch.Tensor,
                                 reg_covar: float = 1e-6) -> torch.Tensor:
    """Sigma_k = X^T (diag(B_k 1) - B_k) X / (1^T B_k 1) + reg_covar I, shape (K, p, p).

    For a partition matrix this is the within-cluster (maximum likelihood) covariance; for
    nonnegative relaxed blocks it stays PSD (diag(B_k 1) - B_k is a graph Laplacian)."""
    if reg_covar < 0:
        raise ValueError(f"reg_covar must be >= 0, got {reg_covar}")
    mass = B.sum((-1, -2)).clamp(min=torch.finfo(B.dtype).tiny)
    S = scatter_matrices(X, B) / mass[:, None, None]
    S = (S + S.transpose(-1, -2)) / 2
    return S + reg_covar * torch.eye(X.shape[1], dtype=X.dtype, device=X.device)


def likelihood_costs(X: torch.Tensor, covariances: torch.Tensor) -> torch.Tensor:
    """C_k = D_k / 2 + log|Sigma_k| 11^T, shape (K, n, n): sum_k <C_k, B_k> is minus twice the
    profiled log-likelihood (without n p log 2 pi) when the B_k form a partition."""
    precision = torch.linalg.inv(covariances)
    precision = (precision + precision.transpose(-1, -2)) / 2
    logdet = torch.linalg.slogdet(covariances)[1]
    D = torch.stack([squared_distances(X, P) for P in precision])
    return D / 2 + logdet[:, None, None]


def profile_neg_loglik(X, labels, covariances) -> float:
    """sum_k sum_{i in G_k} (x_i - xbar_k)^T Sigma_k^{-1} (x_i - xbar_k) + n_k log|Sigma_k|,
    computed directly from the centred points (the reference for the lifted form)."""
    X = as_points(X)
    covariances = torch.as_tensor(covariances, dtype=torch.float64)
    labels = _check_labels(labels, len(X), len(covariances))
    total = 0.0
    for k, S in enumerate(covariances):
        Xk = X[torch.as_tensor(labels == k)]
        if len(Xk) == 0:
            continue
        R = Xk - Xk.mean(0)
        total += float((R @ torch.linalg.inv(S) * R).sum()) + len(Xk) * float(
            torch.linalg.slogdet(S)[1])
    return total


def lifted_objective(C: torch.Tensor, B: torch.Tensor) -> float:
    """sum_k <C_k, B_k>."""
    return float((C * B).sum())


def partition_neg_loglik(X: torch.Tensor, B: torch.Tensor, covariances: torch.Tensor) -> float:
    """sum_k tr(Sigma_k^{-1} X^T (diag(B_k 1) - B_k) X) + (1^T B_k 1) log|Sigma_k|: the lifted
    objective without forming the n x n distance matrices (equal to `lifted_objective`)."""
    quad = torch.linalg.solve(covariances, scatter_matrices(X, B)).diagonal(dim1=-2, dim2=-1)
    return float((quad.sum(-1) + B.sum((-1, -2)) * torch.linalg.slogdet(covariances)[1]).sum())


@dataclass
class ILASDPResult:
    labels: np.ndarray
    memberships: np.ndarray  # (n, K): (B_k 1)_i, each row sums to one
    B: torch.Tensor  # (K, n, n) the last SDP solution
    covariances: torch.Tensor  # (K, p, p) the covariances the last SDP used
    n_outer: int
    converged: bool  # the partition stopped changing before max_outer
    history: list  # one dict per outer iteration


def ila_sdp(X, K: int, *, init_labels=None, max_outer: int = 10, reg_covar: float = 1e-6,
            min_cluster_size: int | None = None, tol: float = 1e-5, max_iter: int = 5000,
            seed: int = 0, update: str = "soft", device=None) -> ILASDPResult:
    """The iterative likelihood adjusted SDP.

    Starts from `init_labels` (by default the partition of Peng-Wei SDP K-means) and repeats: the
    covariances from the memberships (`update="soft"`: from the last SDP's blocks, the minimiser
    of the relaxed likelihood; `"hard"`: from the rounded partition), the LA-SDP given those
    covariances, labels by `spectral_round`. It stops when the partition no longer changes or
    after `max_outer` SDPs. New labels are renamed to match the previous ones, and each SDP
    warm-starts from the last.

    The likelihood with labels as parameters is unbounded when a cluster shrinks to a few points
    (its covariance becomes singular): if a rounded cluster has fewer than `min_cluster_size`
    points (default p + 1) the iteration stops and keeps the previous partition.

    `history` has one entry per SDP: `neg_loglik`, -2 log-likelihood of the partition it started
    from (with that partition's maximum likelihood covariances), the SDP's objective, its ADMM
    iterations, and how many labels changed.
    """
    from repsuite.clustering.metrics import match_labels

    X = as_points(X, device=device)
    n, p = X.shape
    _check_k(K, n)
    if max_outer < 1:
        raise ValueError(f"max_outer must be >= 1, got {max_outer}")
    if update not in ("soft", "hard"):
        raise ValueError(f"update must be 'soft' or 'hard', got {update!r}")
    min_size = p + 1 if min_cluster_size is None else min_cluster_size
    if init_labels is None:
        init_labels = kmeans_sdp(X, K, tol=tol, max_iter=max_iter, seed=seed).labels
    labels = _check_labels(init_labels, n, K)
    if np.bincount(labels, minlength=K).min() == 0:
        raise ValueError("every cluster of init_labels must have at least one point")

    B = membership_matrices(labels, K, device=X.device)
    history, warm, converged, covariances = [], B, False, None
    trace = torch.ones(K, dtype=torch.float64, device=X.device)
    for outer in range(1, max_outer + 1):
        partition = membership_matrices(labels, K, device=X.device)
        fitted = covariances_from_memberships(X, partition, reg_covar)
        sigma = fitted if update == "hard" or outer == 1 else covariances_from_memberships(
            X, B, reg_covar)
        C = likelihood_costs(X, sigma)
        sol = solve_membership_sdp(C, trace, tol=tol, max_iter=max_iter, warm=warm)
        new = match_labels(labels, spectral_round(sol.B, K, seed=seed)).astype(np.int64)
        sizes = np.bincount(new.clip(min=0), minlength=K)
        history.append({"outer": outer, "neg_loglik": partition_neg_loglik(X, partition, fitted),
                        "sdp_objective": sol.objective, "admm_iters": sol.n_iter,
                        "admm_converged": sol.converged, "changed": int((new != labels).sum()),
                        "smallest_cluster": int(sizes.min())})
        if sizes.min() < min_size:
            history[-1]["stopped"] = "cluster below min_cluster_size; previous partition kept"
            break
        B, warm, covariances = sol.B, sol.state, sigma
        if (new == labels).all():
            converged = True
            break
        labels = new

    return ILASDPResult(labels, B.sum(-1).T.cpu().numpy(), B, covariances, len(history),
                        converged, history)
