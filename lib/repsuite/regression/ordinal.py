"""Cumulative-logit ordinal regression: proportional odds, and PRESTO's relaxation of it.

Faletto & Bien, "Predicting Rare Events by Shrinking Towards Proportional Odds", ICML 2023
(arXiv 2305.18700).

Classes are 0 < 1 < ... < K-1, the rare class last. Each boundary k = 0..K-2 between classes k and
k+1 has its own intercept and weight vector:

    P(y <= k | x) = sigmoid(alpha_k + x . beta_k),     P(y = k) = P(y <= k) - P(y <= k-1).

The proportional odds (PO) model ties the weights, beta_0 = ... = beta_{K-2}. PRESTO keeps one
vector per boundary and shrinks adjacent ones together with an L1 penalty on their differences:

    minimise  -(1/n) sum_i log P(y_i | x_i)
              + lambda * sum_j ( |beta_0j| + sum_{k >= 1} |beta_kj - beta_{k-1,j}| )

on standardised features (each column centred and scaled to unit variance on the fit's own rows,
as ordinalNet's `standardize=TRUE` that the authors' code modifies). With psi_0 = beta_0 and
psi_k = beta_k - beta_{k-1} it is a lasso in psi; the first vector is penalised too, as in the
authors' final implementation (`penalize_first=False` leaves it free, the earlier variant).

Solver: proximal Newton, the outer loop of ordinalNet. Each step builds the quadratic model of
the likelihood (the observed Hessian by default, or ordinalNet's Fisher information), minimises
model plus penalty by FISTA with a diagonal preconditioner, and backtracks along the step until
the penalised objective decreases enough (Armijo); a problem stops when a step lowers its
objective by at most `tol` relative (ordinalNet: 1e-8). Parameters live in the cumulated
coordinates theta, a (p + 1) x (K - 1) matrix: row 0 holds the intercept increments, rows 1..p
hold psi; a cumsum over its columns gives (alpha, beta). Many problems (datasets, folds) are
solved as one batch, each with its own lambda; rows of weight 0 stay out of a fit (held-out
folds, padding).

The rare class's probability 1 - sigmoid(alpha_{K-2} + x . beta_{K-2}) always lies in [0, 1];
the middle classes' probabilities can turn negative where separate boundaries cross, for x away
from the training rows (the fit itself keeps every training row's probabilities >= 0).
`crossing_fraction` counts such rows.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from repsuite.progress import bar

P_MIN = 1e-8  # floor on probabilities inside the Fisher information (ordinalNet's pMin)
INTERCEPT_CAP = 100.0  # intercept-only starts are capped like ordinalNet's (+-100)

# -------------------------------------------------------------------------------------------------
# Input checks


def check_ordinal(X, y, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Features (n, p) float64 and labels (n,) int64 in 0..K-1, checked; returns (X, y, K)."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D array (n rows, p features), got shape {X.shape}")
    if y.ndim != 1 or len(y) != len(X):
        raise ValueError(f"y must hold one label per row of X: X has {len(X)} rows, y has shape "
                         f"{y.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            raise ValueError("y must hold integer class labels 0..K-1 (NaN or fractions found)")
    elif y.dtype.kind not in "iub":
        raise ValueError(f"y must hold integer class labels 0..K-1, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if len(y) < 2:
        raise ValueError(f"need at least 2 rows to fit, got {len(y)}")
    if y.min() < 0:
        raise ValueError(f"class labels must be 0..K-1, found {y.min()}")
    K = int(y.max()) + 1 if n_classes is None else int(n_classes)
    if y.max() >= K:
        raise ValueError(f"labels go up to {y.max()} but n_classes = {K}")
    if K < 2:
        raise ValueError(f"an ordinal model needs at least 2 classes, got {K}")
    return X, y, K


def soft_threshold(z: torch.Tensor, t) -> torch.Tensor:
    """The proximal operator of t * |z| (elementwise): sign(z) * max(|z| - t, 0)."""
    return torch.sign(z) * torch.clamp(z.abs() - t, min=0.0)


# -------------------------------------------------------------------------------------------------
# A batch of cumulative-logit problems


class Problems:
    """B ordinal problems with n rows each (padding rows have weight 0), solved together.

    X (B, n, p) raw features, y (B, n) labels in 0..K-1, w (B, n) row weights >= 0 (0: the row
    is not part of the fit). Each problem standardises X with its own weighted mean and standard
    deviation. `fixed` (p + 1, K - 1) marks coordinates of theta held at 0 (proportional odds:
    every difference psi_k, k >= 1); `pen` (p + 1, K - 1) holds the penalty factors (0 on the
    intercept row).
    """

    def __init__(self, X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, K: int, *,
                 structure: str = "presto", penalize_first: bool = True):
        if structure not in {"presto", "po"}:
            raise ValueError(f"structure must be 'presto' or 'po', got {structure!r}")
        if (w.sum(1) <= 0).any():
            raise ValueError("every problem needs rows of positive weight")
        B, n, p = X.shape
        self.K, self.p, self.device = K, p, X.device
        self.w = w / w.sum(1, keepdim=True)
        self.mean = (self.w[..., None] * X).sum(1)
        sd = ((self.w[..., None] * (X - self.mean[:, None]) ** 2).sum(1)).sqrt()
        self.scale = torch.where(sd > 0, sd, torch.ones_like(sd))
        ones = torch.ones(B, n, 1, dtype=X.dtype, device=X.device)
        self.Xt = torch.cat([ones, (X - self.mean[:, None]) / self.scale[:, None]], dim=2)
        self.y = y
        self.used = self.w > 0
        c = y[..., None]
        self._top, self._bottom = c == K - 1, c == 0
        self._hi_idx, self._lo_idx = c.clamp(max=K - 2), (c - 1).clamp(min=0)

        self.fixed = torch.zeros(p + 1, K - 1, dtype=torch.bool, device=X.device)
        self.pen = torch.ones(p + 1, K - 1, dtype=X.dtype, device=X.device)
        self.pen[0] = 0.0
        if structure == "po":
            self.fixed[1:, 1:] = True
            self.pen[:, 0] = 0.0
        elif not penalize_first:
            self.pen[1:, 0] = 0.0
        self.pen[self.fixed] = 0.0

    @property
    def batch(self) -> int:
        return self.Xt.shape[0]

    # ---- model (every function of theta also takes its eta, when the caller has it)

    def eta(self, theta: torch.Tensor) -> torch.Tensor:
        """Linear predictors (B, n, K-1) of the cumulative logits."""
        return self.Xt @ torch.cumsum(theta, dim=2)

    def _rows(self, rows: torch.Tensor | None):
        """The per-row tensors of all problems, or of the problems indexed by `rows`."""
        parts = (self.w, self.used, self._top, self._bottom, self._hi_idx, self._lo_idx)
        return parts if rows is None else tuple(t[rows] for t in parts)

    def _bounds(self, eta: torch.Tensor, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's upper and lower boundary predictors (B, n, 1): eta_c and eta_{c-1} for
        class c, +inf above the last boundary and -inf below the first."""
        _, _, top, bottom, hi, lo = self._rows(rows)
        upper = eta.gather(2, hi).masked_fill(top, math.inf)
        lower = eta.gather(2, lo).masked_fill(bottom, -math.inf)
        return upper, lower

    def nll(self, theta: torch.Tensor, eta: torch.Tensor | None = None,
            rows: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted mean negative log-likelihood (B,); +inf where a used row gets a negative
        class probability (boundaries that cross on the training rows). With `rows`, theta and
        eta belong to those problems only."""
        eta = self.eta(theta) if eta is None else eta
        w, used = self._rows(rows)[:2]
        upper, lower = self._bounds(eta, rows)
        gap = (lower - upper).clamp(max=0.0)  # the clamp only guards log() on infeasible rows
        logp = (torch.nn.functional.logsigmoid(upper) + torch.nn.functional.logsigmoid(-lower)
                + torch.log(-torch.expm1(gap)))[..., 0]
        out = -(w * torch.where(used, logp, torch.zeros_like(logp))).sum(1)
        crossed = ((eta[..., 1:] < eta[..., :-1]) & used[..., None]).flatten(1).any(1)
        bad = crossed | ~torch.isfinite(out)
        return torch.where(bad, torch.full_like(out, math.inf), out)

    def penalty(self, theta: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return lam * (self.pen * theta.abs()).sum((1, 2))

    def objective(self, theta: torch.Tensor, lam: torch.Tensor,
                  eta: torch.Tensor | None = None, rows: torch.Tensor | None = None):
        return self.nll(theta, eta, rows) + self.penalty(theta, lam)

    def grad(self, theta: torch.Tensor, eta: torch.Tensor | None = None,
             curvature: bool = False):
        """Gradient of `nll` with respect to theta (B, p + 1, K - 1); with `curvature`, also the
        per-row observed second derivatives of `curvature()` (they share most of the work)."""
        eta = self.eta(theta) if eta is None else eta
        upper, lower = self._bounds(eta)
        r = 1.0 / torch.expm1(upper - lower)
        sig_up, sig_lo = torch.sigmoid(-upper), torch.sigmoid(lower)
        g = torch.zeros_like(eta)
        g.scatter_add_(2, self._hi_idx, (-(sig_up + r)).masked_fill(self._top, 0))
        g.scatter_add_(2, self._lo_idx, (sig_lo + r).masked_fill(self._bottom, 0))
        g_beta = self.Xt.transpose(1, 2) @ (self.w[..., None] * g)
        g_theta = torch.flip(torch.cumsum(torch.flip(g_beta, [2]), 2), [2])
        if not curvature:
            return g_theta
        # Row of class c: -log(sigmoid(u) - sigmoid(l)), u = eta_c, l = eta_{c-1}; with
        # r = 1 / expm1(u - l) its Hessian is [[s(l) + r(1+r), -r(1+r)], [., s(u) + r(1+r)]],
        # s(z) = sigmoid(z) sigmoid(-z).
        rr = r * (1 + r)
        diag = torch.zeros_like(eta)
        diag.scatter_add_(2, self._hi_idx, (sig_up * (1 - sig_up) + rr).masked_fill(self._top, 0))
        diag.scatter_add_(2, self._lo_idx,
                          (sig_lo * (1 - sig_lo) + rr).masked_fill(self._bottom, 0))
        off = torch.zeros_like(eta)
        off.scatter_add_(2, self._lo_idx, (-rr).masked_fill(self._top | self._bottom, 0))
        return g_theta, (diag, off[..., :-1])

    def curvature(self, theta: torch.Tensor, kind: str = "observed",
                  eta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row second derivatives of the row's negative log-likelihood in eta: the diagonal
        (B, n, K-1) and the (k, k+1) entries (B, n, K-2). `kind` "observed" (the Hessian) or
        "fisher" (its expectation over y, ordinalNet's choice; probabilities floored)."""
        eta = self.eta(theta) if eta is None else eta
        if kind == "observed":
            return self.grad(theta, eta, curvature=True)[1]
        if kind != "fisher":
            raise ValueError(f"kind must be 'observed' or 'fisher', got {kind!r}")
        F = torch.sigmoid(eta)
        f = F * (1 - F)
        zero, one = torch.zeros_like(F[..., :1]), torch.ones_like(F[..., :1])
        prob = torch.diff(torch.cat([zero, F, one], dim=2), dim=2).clamp(min=P_MIN)
        diag = f ** 2 * (1 / prob[..., :-1] + 1 / prob[..., 1:])
        off = -f[..., :-1] * f[..., 1:] / prob[..., 1:-1]
        return diag, off

    def _outer(self, dtype) -> torch.Tensor:
        """Upper triangles of the rows' outer products x~ x~' (B, n, q(q+1)/2), cached: the
        features do not change along a fit, so the curvature model is one product per step."""
        if getattr(self, "_outer_cache", None) is None or self._outer_cache.dtype != dtype:
            q = self.Xt.shape[2]
            i, j = torch.triu_indices(q, q, device=self.device)
            Xt = self.Xt.to(dtype)
            self._outer_cache = Xt[..., i] * Xt[..., j]
            self._assemble = _assembly(q, self.K - 1, i, j, self.Xt.dtype, self.device)
        return self._outer_cache

    def hessian(self, theta: torch.Tensor, kind: str = "observed",
                eta: torch.Tensor | None = None, dtype=None, curv=None) -> torch.Tensor:
        """Second derivatives of `nll` in theta, (B, m, m) with m = (p + 1)(K - 1) in the order
        of theta.reshape(B, m); the sums over rows run in `dtype` (default: the data's). `curv`:
        the rows' second derivatives, when already computed."""
        B, _, q = self.Xt.shape
        m = q * (self.K - 1)
        diag, off = self.curvature(theta, kind, eta) if curv is None else curv
        Z = self._outer(dtype or self.Xt.dtype)
        weights = (self.w[..., None] * torch.cat([diag, off], dim=2)).to(Z.dtype)  # (B,n,2K-3)
        sums = (weights.transpose(1, 2) @ Z).to(self.Xt.dtype)  # (B, 2K-3, q(q+1)/2)
        return torch.sparse.mm(self._assemble, sums.flatten(1).T).T.reshape(B, m, m)

    def probabilities(self, theta: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, n, K) on every row (crossing boundaries give negatives)."""
        F = torch.sigmoid(self.eta(theta))
        zero, one = torch.zeros_like(F[..., :1]), torch.ones_like(F[..., :1])
        return torch.diff(torch.cat([zero, F, one], dim=2), dim=2)

    # ---- starting point and lambda grid

    def intercept_only(self) -> torch.Tensor:
        """theta of the intercept-only maximum likelihood fit (all psi = 0)."""
        onehot = torch.nn.functional.one_hot(self.y, self.K).to(self.w.dtype)
        freq = (self.w[..., None] * onehot).sum(1)
        cum = torch.cumsum(freq, dim=1)[:, :-1].clamp(0.0, 1.0)
        alpha = torch.logit(cum).clamp(-INTERCEPT_CAP, INTERCEPT_CAP)
        alpha = torch.cummax(alpha, dim=1).values
        theta = torch.zeros(self.batch, self.p + 1, self.K - 1, dtype=self.w.dtype,
                            device=self.device)
        theta[:, 0] = torch.diff(alpha, dim=1, prepend=torch.zeros_like(alpha[:, :1]))
        return theta

    def lambda_max(self, theta0: torch.Tensor | None = None) -> torch.Tensor:
        """The smallest lambda at which every penalised coefficient is 0 (B,)."""
        theta0 = self.intercept_only() if theta0 is None else theta0
        g = self.grad(theta0).abs()
        ratio = torch.where(self.pen > 0, g / self.pen.clamp(min=1e-300), torch.zeros_like(g))
        return ratio.flatten(1).max(1).values

    # ---- back to the original feature scale

    def coefficients(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha (B, K-1), beta (B, p, K-1)) on the original feature scale."""
        full = torch.cumsum(theta, dim=2)
        beta = full[:, 1:] / self.scale[..., None]
        alpha = full[:, 0] - (self.mean[..., None] * beta).sum(1)
        return alpha, beta


def _assembly(q: int, K1: int, i: torch.Tensor, j: torch.Tensor, dtype, device) -> torch.Tensor:
    """The fixed linear map from the row sums of weighted outer products (upper triangles, one
    per block of the Hessian in (alpha, beta): (k, k) for each boundary, then (k, k+1)) to the
    Hessian in theta, flattened: a sparse (m * m, blocks * triangle) matrix. Column l of theta
    enters the boundaries k >= l, so theta's entry ((a, l), (b, l')) adds up the blocks (k, k')
    with k >= l and k' >= l'."""
    pairs = [(k, k) for k in range(K1)] + [(k, k + 1) for k in range(K1 - 1)]
    m, T = q * K1, len(i)
    rows, cols = [], []
    for blk, (k, k2) in enumerate(pairs):
        for t, (a, b) in enumerate(zip(i.tolist(), j.tolist(), strict=True)):
            # The entries of the symmetric Hessian in (alpha, beta) that equal this sum.
            entries = {((a, k), (b, k2)), ((b, k), (a, k2)), ((b, k2), (a, k)), ((a, k2), (b, k))}
            for (r, kr), (c, kc) in entries:
                for lr in range(kr + 1):
                    for lc in range(kc + 1):
                        rows.append((r * K1 + lr) * m + c * K1 + lc)
                        cols.append(blk * T + t)
    index = torch.tensor([rows, cols])
    values = torch.ones(len(rows), dtype=dtype)
    M = torch.sparse_coo_tensor(index, values, (m * m, len(pairs) * T),
                                check_invariants=True).coalesce()
    return M.to(device)


# -------------------------------------------------------------------------------------------------
# Proximal Newton


def _model_step(H: torch.Tensor, g: torch.Tensor, theta: torch.Tensor, thr: torch.Tensor,
                free: torch.Tensor, *, max_iter: int, tol: float) -> torch.Tensor:
    """Minimise g.d + d'Hd/2 + sum thr |theta + d| over d (flattened (B, m)), d = 0 on fixed
    coordinates: FISTA in the metric diag(H) (a Jacobi preconditioner), with each problem's
    momentum restarted when it points uphill."""
    D = torch.diagonal(H, dim1=1, dim2=2).clamp(min=1e-12)
    s = torch.sqrt(D)
    L = torch.linalg.eigvalsh(H / (s[:, :, None] * s[:, None, :]))[:, -1:].clamp(min=1e-12)
    step = torch.where(free, 1.0 / (L * D), torch.zeros_like(D))  # fixed: never moves
    cut = thr * step
    c = g - (H * theta[:, None, :]).sum(2)  # the model's gradient at z is c + H z
    z, y = theta, theta
    t = torch.ones_like(L)
    for it in range(max_iter):
        grad = c + (H * y[:, None, :]).sum(2)  # faster than bmm for many small matrices
        u = y - step * grad
        z_new = u - torch.clamp(u, min=-cut, max=cut)  # soft-thresholding at `cut`
        dz = z_new - z
        restart = (grad * dz).sum(1, keepdim=True) > 0
        t_new = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        y = z_new + torch.where(restart, 0.0, (t - 1) / t_new) * dz
        t = torch.where(restart, 1.0, t_new)
        z = z_new
        if it % 10 == 9 and dz.abs().max() <= tol * (1 + z.abs().max()):
            break
    return z - theta


def prox_newton(P: Problems, theta: torch.Tensor, lam, *, max_iter: int = 100,
                tol: float = 1e-10, inner_iter: int = 400, inner_tol: float = 1e-9,
                hessian: str = "observed", hessian_dtype=None, refresh: int = 1,
                history: list | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise P.objective(., lam) from a feasible `theta`; `lam` is one value or one per
    problem. Stops a problem when a step lowers its objective by at most tol * (1 + |objective|).
    Returns (theta, outer steps per problem, converged per problem); with `history` (a list),
    every problem's objective after each step is appended to it. `hessian_dtype` (e.g.
    torch.float32) computes the curvature model in a cheaper precision: only the steps change,
    not the minimiser, which the gradient and the line search (in the data's precision) fix;
    so does `refresh` > 1, which reuses each curvature model for that many steps."""
    B, q, K1 = theta.shape
    lam = torch.as_tensor(lam, dtype=theta.dtype, device=theta.device).expand(B).clone()
    if (lam < 0).any() or not torch.isfinite(lam).all():
        raise ValueError(f"lambda must be finite and >= 0, got {lam.min().item()}")
    free = ~P.fixed.reshape(-1)
    thr = (lam[:, None, None] * P.pen).reshape(B, -1)
    exact = bool((thr == 0).all())  # no penalty: the model's minimiser is a linear solve

    theta = theta.clone()
    eta = P.eta(theta)
    f = P.objective(theta, lam, eta)
    if not torch.isfinite(f).all():
        raise ValueError("the starting point gives a negative class probability on the data")
    active = torch.ones(B, dtype=torch.bool, device=theta.device)
    iters = torch.zeros(B, dtype=torch.long, device=theta.device)
    for it in range(max_iter):
        if it % refresh == 0:
            if hessian == "observed":
                g, curv = P.grad(theta, eta, curvature=True)
            else:
                g, curv = P.grad(theta, eta), P.curvature(theta, hessian, eta)
            H = P.hessian(theta, hessian, eta, hessian_dtype, curv)
        else:
            g = P.grad(theta, eta)
        g = g.reshape(B, -1)
        th = theta.reshape(B, -1)
        if exact:
            eye = torch.eye(H.shape[1], dtype=H.dtype, device=H.device)
            Hf = torch.where(free[:, None] & free[None, :], H, eye * (~free)[:, None])
            jitter = 1e-12 * torch.diagonal(Hf, dim1=1, dim2=2).mean(1)[:, None, None]
            d = -torch.linalg.solve(Hf + jitter * eye, torch.where(free, g, 0 * g))
        else:
            d = _model_step(H, g, th, thr, free, max_iter=inner_iter, tol=inner_tol)
        d = d.reshape(B, q, K1)
        drop = (g * d.reshape(B, -1)).sum(1) + P.penalty(theta + d, lam) - P.penalty(theta, lam)

        # Backtracking (Armijo) on the penalised objective, each problem with its own step; eta
        # is linear in theta, so trial points cost no pass over the features.
        eta_d = P.eta(d)
        step = torch.ones(B, dtype=theta.dtype, device=theta.device)
        todo = active & (drop < 0)
        f_new = f.clone()
        for _ in range(40):
            idx = todo.nonzero()[:, 0]
            if len(idx) == 0:
                break
            t = step[idx, None, None]
            cand, cand_eta = theta[idx] + t * d[idx], eta[idx] + t * eta_d[idx]
            trial = P.objective(cand, lam[idx], cand_eta, rows=idx)
            ok = torch.isfinite(trial) & (trial <= f[idx] + 1e-4 * step[idx] * drop[idx])
            acc = idx[ok]
            f_new[acc], theta[acc], eta[acc] = trial[ok], cand[ok], cand_eta[ok]
            todo[acc] = False
            step[idx[~ok]] /= 2
        moved = active & (f_new < f)
        iters += active.long()
        done = ~moved | ((f - f_new) <= tol * (1 + f.abs()))
        f = torch.where(moved, f_new, f)
        active = active & ~done
        if history is not None:
            history.append(f.detach().cpu().clone())
        if not active.any():
            break
    return theta, iters, ~active


# -------------------------------------------------------------------------------------------------
# Single fits (numpy in, numpy out)


@dataclass
class CumulativeFit:
    """A fitted cumulative-logit model on the original feature scale."""

    alpha: np.ndarray  # (K-1,) intercepts of the boundaries
    beta: np.ndarray  # (p, K-1) weight vector of each boundary
    lam: float = 0.0
    objective: float = float("nan")
    n_iter: int = 0
    converged: bool = True

    @property
    def psi(self) -> np.ndarray:
        """beta_0 and the differences beta_k - beta_{k-1} (p, K-1)."""
        return np.diff(self.beta, axis=1, prepend=0.0)

    def predict_proba(self, X) -> np.ndarray:
        return class_probabilities(self.alpha, self.beta, X)

    def rare_proba(self, X) -> np.ndarray:
        return rare_probability(self.alpha, self.beta, X)


def class_probabilities(alpha, beta, X) -> np.ndarray:
    """P(y = k | x) (n, K) under boundaries (alpha, beta); negative where boundaries cross."""
    X = np.asarray(X, dtype=np.float64)
    cum = 1.0 / (1.0 + np.exp(-(np.asarray(alpha)[None] + X @ np.asarray(beta))))
    n = len(X)
    return np.diff(np.concatenate([np.zeros((n, 1)), cum, np.ones((n, 1))], axis=1), axis=1)


def rare_probability(alpha, beta, X) -> np.ndarray:
    """P(y = K-1 | x) = 1 - sigmoid(alpha_{K-2} + x . beta_{K-2}), in [0, 1]."""
    X = np.asarray(X, dtype=np.float64)
    z = np.asarray(alpha)[-1] + X @ np.asarray(beta)[:, -1]
    return 1.0 / (1.0 + np.exp(z))


def crossing_fraction(alpha, beta, X) -> float:
    """Share of rows of X where some class probability is negative (crossing boundaries)."""
    return float((class_probabilities(alpha, beta, X) < 0).any(axis=1).mean())


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def _single(X, y, n_classes, device, weights=None, **structure) -> Problems:
    """One checked dataset as a batch of one problem (row weights optional)."""
    X, y, K = check_ordinal(X, y, n_classes)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != y.shape or not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"weights must be {len(y)} finite values >= 0")
    present = np.bincount(y[w > 0], minlength=K)
    if (present == 0).any():
        raise ValueError(f"class(es) {np.flatnonzero(present == 0).tolist()} have no rows: every "
                         f"class 0..{K - 1} must occur to fit the model")
    dev = _device(device)
    return Problems(torch.as_tensor(X, device=dev)[None], torch.as_tensor(y, device=dev)[None],
                    torch.as_tensor(w, device=dev)[None], K, **structure)


def fit_presto(X, y, lam: float, *, penalize_first: bool = True, weights=None, device=None,
               n_classes: int | None = None, **solver) -> CumulativeFit:
    """PRESTO at one penalty `lam` (>= 0), started from the intercept-only fit."""
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    P = _single(X, y, n_classes, device, weights, penalize_first=penalize_first)
    return _fits(P, *prox_newton(P, P.intercept_only(), lam, **solver), lam=lam)[0]


def fit_po(X, y, *, weights=None, device=None, n_classes: int | None = None,
           **solver) -> CumulativeFit:
    """The proportional odds model by maximum likelihood (one weight vector for all
    boundaries)."""
    P = _single(X, y, n_classes, device, weights, structure="po")
    return _fits(P, *prox_newton(P, P.intercept_only(), 0.0, **solver))[0]


def fit_logistic(X, y, *, weights=None, device=None, **solver) -> CumulativeFit:
    """Unpenalised logistic regression of a 0/1 label, as the K = 2 cumulative model:
    P(y = 1 | x) = 1 - sigmoid(alpha + x . beta)."""
    P = _single(X, y, 2, device, weights)
    return _fits(P, *prox_newton(P, P.intercept_only(), 0.0, **solver))[0]


def lambda_grid(lam_max: torch.Tensor, n_lambda: int, min_ratio: float) -> torch.Tensor:
    """ordinalNet's grid: `n_lambda` values log-spaced from lam_max down to min_ratio * lam_max,
    one row per problem (B, n_lambda)."""
    if n_lambda < 1 or not 0 < min_ratio < 1:
        raise ValueError(f"need n_lambda >= 1 and 0 < min_ratio < 1, got {n_lambda}, {min_ratio}")
    steps = torch.linspace(0.0, math.log(min_ratio), n_lambda, dtype=lam_max.dtype,
                           device=lam_max.device)
    return lam_max[:, None] * torch.exp(steps)[None]


def presto_path(X, y, *, n_lambda: int = 20, lambda_min_ratio: float = 0.01,
                penalize_first: bool = True, device=None, **solver) -> list[CumulativeFit]:
    """PRESTO along ordinalNet's lambda grid, each fit warm-started from the previous one."""
    P = _single(X, y, None, device, penalize_first=penalize_first)
    theta = P.intercept_only()
    fits = []
    for lam in lambda_grid(P.lambda_max(theta), n_lambda, lambda_min_ratio)[0]:
        theta, iters, ok = prox_newton(P, theta, lam, **solver)
        fits += _fits(P, theta, iters, ok, lam=float(lam))
    return fits


# -------------------------------------------------------------------------------------------------
# Many datasets at once: maximum likelihood baselines and PRESTO tuned by cross-validation


def _stack(datasets, n_classes: int | None, device):
    """Datasets [(X, y), ...] checked and padded to a common row count: X (R, n, p), y (R, n),
    valid (R, n) bool, and K."""
    if not datasets:
        raise ValueError("no datasets given")
    checked = [check_ordinal(X, y, n_classes) for X, y in datasets]
    K = max(k for _, _, k in checked) if n_classes is None else int(n_classes)
    p = {X.shape[1] for X, _, _ in checked}
    if len(p) != 1:
        raise ValueError(f"all datasets must have the same features; got widths {sorted(p)}")
    n = max(len(y) for _, y, _ in checked)
    R, p = len(checked), p.pop()
    X = np.zeros((R, n, p))
    y = np.zeros((R, n), dtype=np.int64)
    valid = np.zeros((R, n), dtype=bool)
    for r, (Xr, yr, _) in enumerate(checked):
        present = np.bincount(yr, minlength=K)
        if (present == 0).any():
            raise ValueError(f"dataset {r}: class(es) {np.flatnonzero(present == 0).tolist()} "
                             f"have no rows; every class 0..{K - 1} must occur")
        X[r, :len(yr)], y[r, :len(yr)], valid[r, :len(yr)] = Xr, yr, True
    dev = _device(device)
    return (torch.as_tensor(X, device=dev), torch.as_tensor(y, device=dev),
            torch.as_tensor(valid, device=dev), K)


def _fits(P: Problems, theta, iters, ok, lam=0.0) -> list[CumulativeFit]:
    """The fitted problems on the original feature scale."""
    alpha, beta = P.coefficients(theta)
    lam = torch.as_tensor(lam, dtype=theta.dtype, device=theta.device).expand(P.batch)
    obj = P.objective(theta, lam)
    return [CumulativeFit(alpha[b].cpu().numpy(), beta[b].cpu().numpy(), float(lam[b]),
                          float(obj[b]), int(iters[b]), bool(ok[b])) for b in range(P.batch)]


def fit_many(datasets, kind: str, *, n_classes: int | None = None, device=None,
             **solver) -> list[CumulativeFit]:
    """Unpenalised fits of several datasets at once: `kind` "po" (proportional odds) or
    "logistic" (labels must be 0/1)."""
    if kind not in {"po", "logistic"}:
        raise ValueError(f"kind must be 'po' or 'logistic', got {kind!r}")
    X, y, valid, K = _stack(datasets, 2 if kind == "logistic" else n_classes, device)
    P = Problems(X, y, valid.to(X.dtype), K, structure="po" if kind == "po" else "presto")
    return _fits(P, *prox_newton(P, P.intercept_only(), 0.0, **solver))


def fold_ids(n: int, n_folds: int, seed: int) -> np.ndarray:
    """ordinalNet's folds: a random permutation of the rows dealt out to folds in turn."""
    if not 2 <= n_folds <= n:
        raise ValueError(f"need 2 <= n_folds <= n rows, got n_folds={n_folds}, n={n}")
    folds = np.empty(n, dtype=np.int64)
    folds[np.random.default_rng(seed).permutation(n)] = np.arange(n) % n_folds
    return folds


@dataclass
class PrestoCV:
    """PRESTO tuned by K-fold cross-validation on the Brier score, for R datasets."""

    fits: list[CumulativeFit]  # full-data fit at the selected lambda (n_iter: steps on the path)
    lambdas: np.ndarray  # (R, L) the grid of each dataset (from its full-data lambda_max)
    cv_brier: np.ndarray  # (R, L) held-out Brier score, mean over folds
    best: np.ndarray  # (R,) index of the selected lambda
    path_beta: np.ndarray  # (R, L, p, K-1) full-data weight vectors along the grid
    converged: np.ndarray  # (R,) every fit of the dataset (full data and folds) converged


def presto_cv(datasets, seeds, *, n_classes: int | None = None, n_lambda: int = 20,
              lambda_min_ratio: float = 0.01, n_folds: int = 5, penalize_first: bool = True,
              device=None, progress: bool = False, **solver) -> PrestoCV:
    """PRESTO as the authors run it: ordinalNet's grid of `n_lambda` values from the full data's
    lambda_max down to `lambda_min_ratio` times it, the path fitted on the full data and on each
    of `n_folds` training folds (warm starts), lambda chosen as the largest one with the lowest
    mean held-out Brier score, and the full-data fit at that lambda returned. All datasets and
    folds are solved as one batch; `seeds` (one per dataset) draw the folds."""
    if len(seeds) != len(datasets):
        raise ValueError(f"{len(datasets)} datasets but {len(seeds)} seeds: one seed each")
    X, y, valid, K = _stack(datasets, n_classes, device)
    R, n, _ = X.shape
    F = n_folds
    folds = torch.full((R, n), -1, dtype=torch.long, device=X.device)
    for r, seed in enumerate(seeds):
        n_r = int(valid[r].sum())
        folds[r, :n_r] = torch.as_tensor(fold_ids(n_r, F, int(seed)), device=X.device)

    # Problem r * (F + 1) is dataset r's full data; the next F leave out one fold each.
    test = folds[:, None, :] == torch.arange(F, device=X.device)[None, :, None]  # (R, F, n)
    keep = torch.cat([valid[:, None], valid[:, None] & ~test], dim=1)  # (R, F + 1, n)
    P = Problems(X.repeat_interleave(F + 1, 0), y.repeat_interleave(F + 1, 0),
                 keep.reshape(R * (F + 1), n).to(X.dtype), K, penalize_first=penalize_first)

    theta = P.intercept_only()
    full = torch.arange(R, device=X.device) * (F + 1)
    lams = lambda_grid(P.lambda_max(theta)[full], n_lambda, lambda_min_ratio)  # (R, L)
    onehot = torch.nn.functional.one_hot(y, K).to(X.dtype)
    brier = torch.zeros(R, F, n_lambda, dtype=X.dtype, device=X.device)
    path = torch.zeros(R, n_lambda, *theta.shape[1:], dtype=X.dtype, device=X.device)
    ok = torch.ones(R * (F + 1), dtype=torch.bool, device=X.device)
    steps = torch.zeros(R * (F + 1), dtype=torch.long, device=X.device)
    for i in bar(range(n_lambda), enabled=progress, desc="lambda path", leave=False):
        theta, iters, conv = prox_newton(P, theta, lams[:, i].repeat_interleave(F + 1), **solver)
        ok &= conv
        steps += iters
        prob = P.probabilities(theta).reshape(R, F + 1, n, K)[:, 1:]
        err = ((onehot[:, None] - prob) ** 2).sum(3)
        brier[:, :, i] = (err * test).sum(2) / test.sum(2)
        path[:, i] = theta[full]

    mean_brier = brier.mean(1).cpu().numpy()
    best = np.argmin(mean_brier, axis=1)  # the first minimiser: lambdas decrease, so the largest
    chosen = path[torch.arange(R), torch.as_tensor(best, device=X.device)]
    Pfull = Problems(X, y, valid.to(X.dtype), K, penalize_first=penalize_first)
    lam_best = lams[torch.arange(R), torch.as_tensor(best, device=X.device)]
    fits = _fits(Pfull, chosen, steps[full], ok[full], lam=lam_best)
    path_beta = torch.stack([Pfull.coefficients(path[:, i])[1] for i in range(n_lambda)], 1)
    return PrestoCV(fits, lams.cpu().numpy(), mean_brier, best, path_beta.cpu().numpy(),
                    ok.reshape(R, F + 1).all(1).cpu().numpy())
