"""Predictive multiplicity of probabilistic classifiers (Watson-Daniels, Parkes and Ustun).

The setting is convex empirical risk minimisation: penalised logistic regression,

    F(w) = (1/n) sum_i [log(1 + exp(z_i.w)) - y_i z_i.w] + (l2/2) |w_pen|^2,

with z_i the features plus an intercept column (the intercept is not penalised). The baseline w0
minimises F, with L* = F(w0). The epsilon-level set is every w with F(w) <= L* + eps (eps in nats
of the mean loss). For a point z its viable prediction range is

    [min sigma(z.w), max sigma(z.w)] over the level set,

and as the sigmoid is monotone each end is the sigmoid of an extreme logit: a linear objective
under one smooth convex constraint. We solve it through the Lagrangian: for a multiplier t >= 0,

    w(t) = argmin F(w) + t s z.w        (s = +1 for the lower end, -1 for the upper end)

and F(w(t)) grows with t from L* at t = 0, so the optimum is w(t*) with F(w(t*)) = L* + eps.
The root is found by Newton's method on sqrt(F(w(t)) - L*) = sqrt(eps) (nearly linear in t:
exactly linear for a quadratic F), taken jointly with the Newton step on w and kept inside a
bracket of t; all points and both directions are solved together as one batch.

Measures (the paper's Definitions 2-4, our wording): the width of each range; ambiguity(delta),
the share of points for which some model of the level set moves the risk by at least delta from
the baseline; discrepancy(delta), the largest share of points that one single model of the level
set moves by at least delta (computed here over the extreme models found for the ranges, which
gives a lower bound of the exact maximum).

Competing models can also be sampled, as practice does: bootstrap refits, SGD from random
starts, or random draws inside the quadratic approximation of the level set; any sampled model
outside the level set is dropped.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

DTYPE = torch.float64


# ---------------------------------------------------------------------------------------------
# The objective


@dataclass
class LogisticObjective:
    """F(w) on one training set; `Z` carries the intercept column last when `intercept`."""

    Z: torch.Tensor  # (n, p) float64
    y: torch.Tensor  # (n,) float64 in {0, 1}
    l2: float
    penalised: torch.Tensor  # (p,) 1.0 for penalised coefficients, 0.0 for the intercept

    @property
    def n(self) -> int:
        return self.Z.shape[0]

    @property
    def p(self) -> int:
        return self.Z.shape[1]

    @property
    def device(self) -> torch.device:
        return self.Z.device

    def rows(self, X) -> torch.Tensor:
        """Feature rows as the objective sees them (intercept column appended when it has one)."""
        X = _as_matrix(X, "X", self.device)
        has_intercept = bool(self.penalised[-1] == 0)
        if X.shape[1] + int(has_intercept) != self.p:
            raise ValueError(f"points have {X.shape[1]} features, the objective was built on "
                             f"{self.p - int(has_intercept)}")
        if has_intercept:
            X = torch.cat([X, torch.ones(len(X), 1, dtype=DTYPE, device=self.device)], 1)
        return X

    def loss(self, W, weights=None) -> torch.Tensor:
        """F at each row of W ((B, p) or (p,)); `weights` (n,) or (B, n) replace the 1/n."""
        W = torch.as_tensor(W, dtype=DTYPE, device=self.device)
        single = W.dim() == 1
        out = self._stats(W.reshape(-1, self.p), weights, hessian=False)[0]
        return out[0] if single else out

    def _stats(self, W, weights=None, hessian=True):
        """Loss, gradient and (optionally) Hessian of F at each row of W (B, p)."""
        M = W @ self.Z.T
        P = torch.sigmoid(M)
        pen = self.penalised
        penalty = 0.5 * self.l2 * (W * W * pen).sum(1)
        if weights is None:  # the plain mean, without a weight matrix to multiply
            loss = F.softplus(M).mean(1) - M @ self.y / self.n + penalty
            grad = (P - self.y) @ self.Z / self.n + self.l2 * pen * W
            wts = 1.0 / self.n
        else:
            wts = self._weights(weights, len(W))
            loss = ((F.softplus(M) - self.y * M) * wts).sum(1) + penalty
            grad = ((P - self.y) * wts) @ self.Z + self.l2 * pen * W
        if not hessian:
            return loss, grad, None
        # The Hessians of all rows in one product with the precomputed upper-triangle products
        # z_i z_j of every training point: far cheaper than a batched Z' D Z.
        pairs, upper = self._pairs()
        flat = (P * (1 - P) * wts) @ pairs
        H = torch.zeros(len(W), self.p, self.p, dtype=DTYPE, device=self.device)
        H[:, upper[0], upper[1]] = flat
        H[:, upper[1], upper[0]] = flat
        return loss, grad, H + torch.diag(self.l2 * pen)

    def _pairs(self):
        if getattr(self, "_pair_cache", None) is None:
            upper = torch.triu_indices(self.p, self.p, device=self.device)
            self._pair_cache = (self.Z[:, upper[0]] * self.Z[:, upper[1]], upper)
        return self._pair_cache

    def _weights(self, weights, B):
        w = torch.as_tensor(weights, dtype=DTYPE, device=self.device)
        return w.reshape(-1, self.n).expand(B, self.n)


def _as_matrix(X, name: str, device) -> torch.Tensor:
    X = torch.as_tensor(np.asarray(X) if not torch.is_tensor(X) else X, dtype=DTYPE,
                        device=device)
    if X.dim() == 1:
        X = X[None, :]
    if X.dim() != 2:
        raise ValueError(f"{name} must be a matrix of points x features, got shape "
                         f"{tuple(X.shape)}")
    if not torch.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return X


def make_objective(X, y, *, l2: float, intercept: bool = True,
                   device="cpu") -> LogisticObjective:
    """The penalised logistic objective of training features X (n, d) and 0/1 labels y."""
    X = _as_matrix(X, "X", device)
    y = np.asarray(y.cpu() if torch.is_tensor(y) else y)
    if y.ndim != 1 or len(y) != len(X):
        raise ValueError(f"y must hold one label per row of X: X has {len(X)} rows, "
                         f"y has shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y must be 0/1 labels; found {np.unique(y)[:5].tolist()}")
    if len(np.unique(y)) < 2:
        raise ValueError("y holds a single class: logistic regression needs both labels")
    if not l2 >= 0 or not math.isfinite(l2):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}")
    if len(X) < 2 * (X.shape[1] + 1) and l2 == 0:
        raise ValueError(f"{len(X)} points for {X.shape[1]} features without a penalty: the "
                         "level set is unbounded; give l2 > 0 or more points")
    pen = torch.ones(X.shape[1] + int(intercept), dtype=DTYPE, device=device)
    if intercept:
        X = torch.cat([X, torch.ones(len(X), 1, dtype=DTYPE, device=device)], 1)
        pen[-1] = 0.0
    return LogisticObjective(X, torch.as_tensor(y, dtype=DTYPE, device=device), float(l2), pen)


def l2_from_C(C: float, n: int) -> float:
    """scikit-learn's C (penalty 1/2 |w|^2 + C sum of losses) as our l2 on the mean loss."""
    if not C > 0:
        raise ValueError(f"C must be > 0, got {C}")
    return 1.0 / (C * n)


# ---------------------------------------------------------------------------------------------
# Batched damped Newton


def _newton_step(obj, W, linear, weights):
    """Newton direction of F + linear.w at each row; returns loss, grad, step, decrement, chol."""
    loss, grad, H = obj._stats(W, weights)
    if linear is not None:
        grad = grad + linear
    chol, info = torch.linalg.cholesky_ex(H)
    if (info > 0).any():
        raise RuntimeError("the Hessian of the logistic loss is singular: a feature is constant "
                           "or duplicated and l2 = 0; give l2 > 0")
    step = -torch.cholesky_solve(grad[..., None], chol)[..., 0]
    decrement = -(grad * step).sum(1)
    return loss, grad, step, decrement, chol


def _backtrack(obj, W, step, decrement, linear, weights, loss, active):
    """Armijo step sizes (1, 1/2, ...) for the rows in `active`; others get 0."""
    alpha = torch.zeros(len(W), dtype=DTYPE, device=W.device)
    todo = active.clone()
    base = loss + ((linear * W).sum(1) if linear is not None else 0.0)
    size = 1.0
    for _ in range(40):
        if not todo.any():
            break
        idx = todo.nonzero()[:, 0]
        trial = W[idx] + size * step[idx]
        value = obj.loss(trial, None if weights is None else weights[idx])
        if linear is not None:
            value = value + (linear[idx] * trial).sum(1)
        # Round-off makes tiny steps fail Armijo near the optimum: accept them outright.
        ok = (value <= base[idx] - 1e-4 * size * decrement[idx]) | (decrement[idx] < 1e-14)
        alpha[idx[ok]] = size
        todo[idx[ok]] = False
        size /= 2
    return alpha


def fit(obj: LogisticObjective, *, weights=None, W0=None, n_models: int = 1, tol: float = 1e-15,
        max_iter: int = 100) -> torch.Tensor:
    """Minimisers of F (one per row of `weights` (B, n), or one) by damped Newton: (B, p).

    Stops when the Newton decrement of every model is below `tol` (1e-15 is about the round-off
    floor of float64 here)."""
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=DTYPE, device=obj.device)
        if weights.shape[-1] != obj.n or (weights < 0).any():
            raise ValueError(f"weights must be non-negative, {obj.n} per model")
        n_models = 1 if weights.dim() == 1 else len(weights)
        weights = weights.reshape(-1, obj.n).expand(n_models, obj.n)
    W = (torch.zeros(n_models, obj.p, dtype=DTYPE, device=obj.device) if W0 is None
         else torch.as_tensor(W0, dtype=DTYPE, device=obj.device).reshape(-1, obj.p)
         .expand(n_models, obj.p).clone())
    active = torch.arange(n_models, device=obj.device)
    for _ in range(max_iter):
        wa = None if weights is None else weights[active]
        loss, _, step, dec, _ = _newton_step(obj, W[active], None, wa)
        todo = dec > tol
        active, step, dec, loss = active[todo], step[todo], dec[todo], loss[todo]
        if len(active) == 0:
            return W
        wa = None if weights is None else weights[active]
        alpha = _backtrack(obj, W[active], step, dec, None, wa, loss,
                           torch.ones(len(active), dtype=torch.bool, device=obj.device))
        W[active] = W[active] + alpha[:, None] * step
    raise RuntimeError(f"Newton did not converge in {max_iter} steps (largest decrement "
                       f"{dec.max().item():.2e}); is the data separable with l2 = 0?")


def hessian(obj: LogisticObjective, w) -> torch.Tensor:
    """Hessian of F at w (p, p)."""
    return obj._stats(torch.as_tensor(w, dtype=DTYPE, device=obj.device).reshape(1, -1))[2][0]


# ---------------------------------------------------------------------------------------------
# Viable prediction ranges


@dataclass
class Ranges:
    """Extreme logits of each target point over the level set, and the models attaining them."""

    eps: float
    baseline: torch.Tensor  # (m,) logit of the baseline
    lower: torch.Tensor  # (m,) min logit
    upper: torch.Tensor  # (m,) max logit
    W_lower: torch.Tensor  # (m, p) model attaining the min
    W_upper: torch.Tensor  # (m, p)
    losses: torch.Tensor  # (2m,) F of those models (lower ends first)
    multipliers: torch.Tensor  # (2m,) t at the solution
    iterations: int

    def probabilities(self):
        """(p0, p_min, p_max) as numpy arrays."""
        sig = torch.sigmoid
        return tuple(sig(v).cpu().numpy() for v in (self.baseline, self.lower, self.upper))

    def widths(self) -> np.ndarray:
        _, lo, hi = self.probabilities()
        return hi - lo

    def models(self) -> torch.Tensor:
        return torch.cat([self.W_lower, self.W_upper])


def viable_ranges(obj: LogisticObjective, w0, points, eps, *, tol: float = 1e-9,
                  max_iter: int = 1000, chunk: int = 4096, warm: "Ranges | None" = None,
                  L0: float | None = None) -> Ranges:
    """Exact min and max logit of each row of `points` (m, p) over {F(w) <= F(w0) + eps}.

    `points` are rows as the objective sees them (use `obj.rows(X)`); `w0` must minimise F.
    `warm` (the ranges at a smaller eps on the same points) starts the solver closer. Most
    problems take 5 to 30 iterations; points whose logit the data barely constrain (a rare
    category) take hundreds, as their loss saturates, but they leave the batch alone.
    """
    if not eps >= 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number of nats >= 0, got {eps}")
    w0 = torch.as_tensor(w0, dtype=DTYPE, device=obj.device).reshape(-1)
    Zt = _as_matrix(points, "points", obj.device)
    if Zt.shape[1] != obj.p or len(w0) != obj.p:
        raise ValueError(f"points have {Zt.shape[1]} columns and w0 {len(w0)}; the objective "
                         f"has {obj.p} (use obj.rows(X) to append the intercept)")
    if len(Zt) == 0:
        raise ValueError("no target points given")
    L0 = float(obj.loss(w0)) if L0 is None else L0
    m = len(Zt)
    zs = torch.cat([Zt, Zt])
    sign = torch.cat([torch.ones(m), -torch.ones(m)]).to(DTYPE).to(obj.device)
    if warm is not None:
        W_start, t_start = warm.models(), warm.multipliers * math.sqrt(eps / max(warm.eps, 1e-300))
    else:
        # The quadratic model of F around w0 gives t = sqrt(2 eps / z'H0^-1 z). The first move
        # from w0 is a damped Newton step: on ill-conditioned data (rare categories, tiny l2)
        # the quadratic model's own minimiser can land far outside the level set.
        Hz = torch.linalg.solve(hessian(obj, w0), zs.T).T
        t_start = torch.sqrt(2 * eps / (zs * Hz).sum(1).clamp_min(1e-300))
        W_start = w0.expand(2 * m, -1).clone()
    W, t, its = [], [], 0
    for s in range(0, 2 * m, chunk):
        sl = slice(s, s + chunk)
        Wc, tc, it = _solve_path(obj, W_start[sl].clone(), t_start[sl].clone(), zs[sl], sign[sl],
                                 L0, eps, tol, max_iter)
        W.append(Wc)
        t.append(tc)
        its = max(its, it)
    W, t = torch.cat(W), torch.cat(t)
    logits = (W * zs).sum(1)
    return Ranges(eps=float(eps), baseline=Zt @ w0, lower=logits[:m], upper=logits[m:],
                  W_lower=W[:m], W_upper=W[m:], losses=obj.loss(W), multipliers=t,
                  iterations=its)


def _solve_path(obj, W, t, zs, sign, L0, eps, tol, max_iter):
    """Joint Newton iteration on (w, t) for grad F(w) + t s z = 0 and sqrt(F(w) - L*) = sqrt(eps).

    Near the path (small Newton decrement) one linearised step moves w and t together; t stays
    inside a bracket built from points on the path, with bisection (or doubling) when the Newton
    value leaves it. Far from the path, damped Newton steps on w alone at fixed t. A problem whose
    joint steps do not settle returns to the path at fixed t first, which tightens its bracket.
    Solved problems leave the batch."""
    B = len(W)
    state = {"W": W, "t": t, "zs": zs, "sign": sign,
             "lo": torch.zeros(B, dtype=DTYPE, device=W.device),
             "hi": torch.full((B,), math.inf, dtype=DTYPE, device=W.device),
             "run": torch.zeros(B, dtype=torch.long, device=W.device),
             "gap": torch.full((B,), math.inf, dtype=DTYPE, device=W.device)}
    active = torch.arange(B, device=W.device)
    for it in range(1, max_iter + 1):
        rows = {k: v[active] for k, v in state.items()}
        done, gap = _path_step(obj, rows, L0, eps, tol)
        for k in ("W", "t", "lo", "hi", "run", "gap"):
            state[k][active] = rows[k]
        active = active[~done]
        if len(active) == 0:
            return state["W"], state["t"], it
    raise RuntimeError(f"viable ranges did not converge in {max_iter} iterations for "
                       f"{len(active)} of {B} problems (largest constraint gap "
                       f"{gap.abs().max().item():.2e}); is l2 > 0?")


def _path_step(obj, r, L0, eps, tol):
    """One iteration of `_solve_path` on the rows in `r` (updated in place); returns which rows
    were already solved and their constraint gaps F - L* - eps."""
    W, t, zs, sign, lo, hi = r["W"], r["t"], r["zs"], r["sign"], r["lo"], r["hi"]
    linear = (t * sign)[:, None] * zs
    loss, grad, step, dec, chol = _newton_step(obj, W, linear, None)
    grad_F = grad - linear
    # F is first order in the remaining Newton correction (its gradient is -t s z), so a small
    # decrement alone does not make F - L* - eps reliable: its sign counts for the bracket once
    # the change the correction would make is well below it, and the problem is solved once both
    # together are below `tol`.
    phi = loss - (L0 + eps)
    settled = dec < 1e-12
    unsure = (grad_F * step).sum(1).abs()
    on_path = settled & ((unsure < 0.5 * phi.abs()) | (unsure < 0.01 * tol))
    done = settled & (phi.abs() + unsure <= tol)
    lo = r["lo"] = torch.where(on_path & (phi < 0), t, lo)
    hi = r["hi"] = torch.where(on_path & (phi > 0), t, hi)
    # Joint steps run while they shrink the constraint gap, six in a row at most; a step that
    # widens it sends the problem back to the path at fixed t, where its bracket tightens (on
    # ill-conditioned data the linearisation can overshoot into a cycle otherwise).
    run = torch.where(on_path, 0, torch.where(phi.abs() > r["gap"], 6, r["run"]))
    joint = (dec < 1e-10) & ~done & (run < 6)
    r["run"] = run + joint.long()
    r["gap"] = torch.where(joint, phi.abs(), math.inf)
    Hz = torch.cholesky_solve(zs[..., None], chol)[..., 0]
    psi = (loss - L0).clamp_min(0).sqrt()
    # Linearised sqrt(F) = sqrt(eps) with w moving by step - s dt H^-1 z; on the path the step is
    # round-off, and leaving it out keeps the update exact for the bracket.
    denom = sign * (grad_F * Hz).sum(1)
    along = torch.where(on_path, 0.0, (grad_F * step).sum(1))
    t_newton = t + (along - 2 * psi * (math.sqrt(eps) - psi)) / denom
    inside = (t_newton > lo) & (t_newton < hi) & torch.isfinite(t_newton) & (denom < 0)
    bisect = torch.where(torch.isfinite(hi), (lo + hi) / 2, 2 * t.clamp_min(1e-12))
    clipped = torch.minimum(torch.maximum(torch.nan_to_num(t_newton, nan=0.0), lo), hi)
    fallback = torch.where(on_path | (denom >= 0), bisect, clipped)
    t_new = torch.where(joint, torch.where(inside, t_newton, fallback), t)
    W = torch.where(joint[:, None], W + step - ((t_new - t) * sign)[:, None] * Hz, W)
    far = ~joint & ~done
    if far.any():
        alpha = _backtrack(obj, W, step, dec, linear, None, loss, far)
        W = W + (alpha * far)[:, None] * step
    r["W"], r["t"] = W, t_new
    return done, phi


# ---------------------------------------------------------------------------------------------
# Measures


def _probs(p, name):
    p = np.asarray(p, dtype=np.float64)
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"{name} must hold probabilities in [0, 1]")
    return p


def _check_delta(delta):
    if not 0 < delta <= 1:
        raise ValueError(f"delta must be in (0, 1], got {delta}")


def ambiguity(p0, p_min, p_max, delta: float) -> float:
    """Share of points whose viable range reaches at least `delta` away from the baseline risk."""
    _check_delta(delta)
    p0, p_min, p_max = (_probs(a, n) for a, n in ((p0, "p0"), (p_min, "p_min"), (p_max, "p_max")))
    if not p0.shape == p_min.shape == p_max.shape:
        raise ValueError(f"p0, p_min and p_max differ in shape: {p0.shape}, {p_min.shape}, "
                         f"{p_max.shape}")
    if (p_min > p0 + 1e-9).any() or (p_max < p0 - 1e-9).any():
        raise ValueError("a viable range does not contain the baseline's risk")
    reach = np.maximum(p_max - p0, p0 - p_min)
    return float(np.mean(reach >= delta - 1e-12))


def discrepancy(p0, P, delta: float) -> float:
    """Largest share of points that one model (a row of P, (K, m)) moves by at least `delta`."""
    _check_delta(delta)
    p0, P = _probs(p0, "p0"), _probs(P, "P")
    if P.ndim != 2 or P.shape[1] != len(p0):
        raise ValueError(f"P must be (models, points) with {len(p0)} points, got {P.shape}")
    if len(P) == 0:
        return 0.0
    return float(np.max(np.mean(np.abs(P - p0) >= delta - 1e-12, axis=1)))


def model_probabilities(W, points) -> np.ndarray:
    """Risk of each point under each model: (K, m)."""
    return torch.sigmoid(torch.as_tensor(W) @ torch.as_tensor(points).T).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Sampled competing models (the practice the optimisation is compared with)


def bootstrap_models(obj: LogisticObjective, n_models: int, *, seed: int, w0=None) -> torch.Tensor:
    """Refits on bootstrap resamples of the training set: (n_models, p)."""
    if n_models <= 0:
        return torch.zeros(0, obj.p, dtype=DTYPE, device=obj.device)
    g = torch.Generator().manual_seed(seed)
    counts = torch.stack([torch.bincount(torch.randint(obj.n, (obj.n,), generator=g),
                                         minlength=obj.n) for _ in range(n_models)])
    return fit(obj, weights=counts.to(DTYPE).to(obj.device) / obj.n, W0=w0)


def sgd_models(obj: LogisticObjective, n_models: int, *, seed: int, epochs: int = 20,
               lr: float = 0.1, batch_size: int = 32, init_scale: float = 1.0) -> torch.Tensor:
    """Minibatch SGD on F from random starts, one shuffling stream per model: (n_models, p).

    The step size decays as lr / sqrt(1 + epoch), a common practice; runs are vectorised."""
    if n_models <= 0:
        return torch.zeros(0, obj.p, dtype=DTYPE, device=obj.device)
    if batch_size < 1 or epochs < 1 or not lr > 0:
        raise ValueError("SGD needs batch_size >= 1, epochs >= 1 and lr > 0")
    g = torch.Generator().manual_seed(seed)
    W = init_scale * torch.randn(n_models, obj.p, generator=g, dtype=DTYPE).to(obj.device)
    b = min(batch_size, obj.n)
    for epoch in range(epochs):
        order = torch.stack([torch.randperm(obj.n, generator=g) for _ in range(n_models)])
        order = order.to(obj.device)
        rate = lr / math.sqrt(1 + epoch)
        for s in range(0, obj.n - b + 1, b):
            idx = order[:, s:s + b]
            Zb, yb = obj.Z[idx], obj.y[idx]
            P = torch.sigmoid((Zb * W[:, None, :]).sum(2))
            grad = ((P - yb)[..., None] * Zb).mean(1) + obj.l2 * obj.penalised * W
            W = W - rate * grad
    return W


def perturbed_models(obj: LogisticObjective, w0, eps: float, n_models: int, *,
                     seed: int) -> torch.Tensor:
    """Uniform draws inside the ellipsoid 1/2 d'H0 d <= eps (the quadratic model of the level
    set around w0): a sampler that knows the level set's shape but not the target points."""
    if n_models <= 0:
        return torch.zeros(0, obj.p, dtype=DTYPE, device=obj.device)
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n_models, obj.p, generator=g, dtype=DTYPE)
    u = u / u.norm(dim=1, keepdim=True)
    radius = torch.rand(n_models, 1, generator=g, dtype=DTYPE) ** (1.0 / obj.p)
    chol = torch.linalg.cholesky(hessian(obj, w0)).cpu()
    d = torch.linalg.solve_triangular(chol.T, (math.sqrt(2 * eps) * radius * u).T, upper=True).T
    return (torch.as_tensor(w0, dtype=DTYPE).cpu() + d).to(obj.device)


def in_level_set(obj: LogisticObjective, W, L0: float, eps: float) -> torch.Tensor:
    """Which rows of W lie in the eps-level set."""
    W = torch.as_tensor(W, dtype=DTYPE, device=obj.device).reshape(-1, obj.p)
    if len(W) == 0:
        return torch.zeros(0, dtype=torch.bool, device=obj.device)
    return obj.loss(W) <= L0 + eps


def sampled_ranges(W, points, w0) -> tuple[np.ndarray, np.ndarray]:
    """Min and max risk of each point over the sampled models and the baseline."""
    models = torch.cat([torch.as_tensor(w0, dtype=DTYPE).reshape(1, -1).to(points.device),
                        torch.as_tensor(W, dtype=DTYPE).reshape(-1, points.shape[1])
                        .to(points.device)])
    P = model_probabilities(models, points)
    return P.min(0), P.max(0)


# ---------------------------------------------------------------------------------------------
# Synthetic data with controlled characteristics


def make_synthetic(n: int, *, seed: int, dim: int = 2, separation: float = 2.0,
                   flip: float = 0.0, minority: float = 0.0, minority_angle: float = 90.0,
                   minority_offset: float = 0.0):
    """Two Gaussian classes (unit covariance, means +-separation/2 along the first axis).

    `flip` flips the labels of that share of points chosen at random (label-noise outliers).
    `minority` puts that share of points in a second group whose classes separate along a
    direction turned by `minority_angle` degrees and whose centre is moved by `minority_offset`
    along the second axis. Returns X (n, dim), y (n,) and the group code (0 majority, 1 minority).
    """
    if n < 4 or dim < 2:
        raise ValueError(f"need n >= 4 and dim >= 2, got n={n}, dim={dim}")
    if not (0 <= flip < 0.5 and 0 <= minority < 0.5 and separation >= 0):
        raise ValueError("flip and minority must be shares in [0, 0.5), separation >= 0")
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    group = np.zeros(n, dtype=np.int64)
    group[rng.permutation(n)[:round(minority * n)]] = 1
    angle = np.deg2rad(minority_angle)
    axis = np.zeros((2, dim))
    axis[0, 0] = 1.0
    axis[1, :2] = np.cos(angle), np.sin(angle)
    X = rng.normal(size=(n, dim)) + (2 * y - 1)[:, None] * (separation / 2) * axis[group]
    X[group == 1, 1] += minority_offset
    flipped = rng.permutation(n)[:round(flip * n)]
    y[flipped] = 1 - y[flipped]
    return X, y.astype(np.int64), group
