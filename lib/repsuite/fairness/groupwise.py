"""Groupwise regret by a reduction to external regret, with sleeping experts.

Acharya, Arunachaleswaran, Kannan, Roth & Ziani, "Oracle Efficient Algorithms for Groupwise
Regret", ICLR 2024 (arXiv 2310.04652).

An individual x_t arrives each round and belongs to several (intersecting) groups of a collection
G. The goal is low regret on every group's subsequence at once, against the best model of the
class in hindsight for that group. The reduction runs one copy A_g of an ordinary online learner
per group, fed only the rounds where g is active, and treats A_g as a *sleeping expert* that is
awake exactly on those rounds. AdaNormalHedge for sleeping experts (Luo & Schapire, 2015) plays a
distribution p_t over the awake experts; each expert's weight depends on its own regret against
the learner, counted only while it is awake:

    r_{t,g} = 1[g awake] * (<p_t, l_t> - l_{t,g}),   R_g = sum_t r_{t,g},   C_g = sum_t |r_{t,g}|
    w(R, C) = (Phi(R + 1, C + 1) - Phi(R - 1, C + 1)) / 2,   Phi(R, C) = exp([R]_+^2 / (3 C))
    p_{t,g} proportional to 1[g awake] * w(R_g, C_g)

The learner's loss in round t is <p_t, l_t> (it follows an expert drawn from p_t). On group g,
the learner's loss minus A_g's loss is AdaNormalHedge's sleeping regret to expert g, at most
sqrt(3 C_g (ln|G| + ln B + ln(1 + ln|G|))); add A_g's own external regret and the groupwise
regret follows. Run time is linear in |G|, and each A_g is called like an oracle.

Here A_g is online ridge regression (lambda = 1), predictions clipped to [0, 1], squared loss.
Since A_g sees only its own group's rounds, its predictions do not depend on the aggregator: they
are computed first, for all groups and all stream orders at once (`online_ridge_predictions`,
exact block updates), and the aggregator then runs round by round (`sleeping_experts`). The two
phases give the same numbers as interleaving them round by round (tested).
"""

import math
from dataclasses import dataclass

import torch
from torch.linalg import cholesky, solve_triangular

from repsuite.progress import bar

RULES = ("adanormalhedge", "hedge")

# -------------------------------------------------------------------------------------------------
# Input checks


def _as_tensor(values, name: str, device=None) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def as_streams(X, y, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (S, n, d) and labels (S, n) as float64 tensors: S streams of n rounds. A single
    stream may be given as (n, d) and (n,)."""
    X = _as_tensor(X, "X", device)
    y = _as_tensor(y, "y", X.device)
    if X.ndim == 2:
        X = X[None]
    if y.ndim == 1:
        y = y[None]
    if X.ndim != 3 or y.ndim != 2:
        raise ValueError(f"X must be (n, d) or (streams, n, d) and y (n,) or (streams, n); got "
                         f"X {tuple(X.shape)} and y {tuple(y.shape)}")
    if X.shape[:2] != y.shape:
        raise ValueError(f"X has {X.shape[0]} streams of {X.shape[1]} rounds but y has "
                         f"{y.shape[0]} of {y.shape[1]}: one label per round is needed")
    return X, y


def _check_lam(lam: float) -> None:
    if not lam > 0:
        raise ValueError(f"the ridge penalty lam must be > 0, got {lam}")


# -------------------------------------------------------------------------------------------------
# The oracle: online ridge regression


class OnlineRidge:
    """Online ridge regression on one stream, one round at a time (the external-regret oracle A_g).

    Before round t it predicts with theta_t = (lam I + sum_{s<t} x_s x_s^T)^{-1} sum_{s<t} y_s x_s,
    clipped to [lo, hi]; the inverse is kept up to date by Sherman-Morrison rank-one updates.
    """

    def __init__(self, d: int, lam: float = 1.0, clip=(0.0, 1.0), device=None):
        _check_lam(lam)
        if d < 1:
            raise ValueError(f"the feature dimension d must be >= 1, got {d}")
        self.d, self.lam, self.clip = d, lam, clip
        self.P = torch.eye(d, dtype=torch.float64, device=device) / lam  # (lam I + X^T X)^{-1}
        self.b = torch.zeros(d, dtype=torch.float64, device=device)  # X^T y
        self.t = 0

    @property
    def theta(self) -> torch.Tensor:
        return self.P @ self.b

    def _x(self, x) -> torch.Tensor:
        x = _as_tensor(x, "x", self.P.device).reshape(-1)
        if x.numel() != self.d:
            raise ValueError(f"x has {x.numel()} features, the learner was built for {self.d}")
        return x

    def predict(self, x, clip: bool = True) -> float:
        raw = float(self._x(x) @ self.theta)
        return min(max(raw, self.clip[0]), self.clip[1]) if clip and self.clip else raw

    def update(self, x, y: float) -> None:
        x = self._x(x)
        Px = self.P @ x
        self.P -= torch.outer(Px, Px) / (1.0 + x @ Px)
        self.b += float(y) * x
        self.t += 1


def online_ridge_predictions(X, y, *, lam: float = 1.0, block: int = 32) -> torch.Tensor:
    """Unclipped predictions x_t . theta_t of online ridge on every round of S streams at once.

    Exact block updates: ridge is the posterior mean of Bayesian linear regression with prior
    N(0, I / lam) and unit noise, so inside a block of b rounds the labels are jointly Gaussian
    with covariance Sigma = I + X_b P X_b^T around X_b theta. With Sigma = L L^T (Cholesky), the
    one-step-ahead prediction errors are diag(L) * L^{-1} (y_b - X_b theta), and the state after
    the block is theta + W^T z, P - W^T W with W = L^{-1} X_b P, z = L^{-1} (y_b - X_b theta).
    Rounds whose features are all zero change nothing (padding is exact).
    """
    X, y = as_streams(X, y)
    _check_lam(lam)
    if int(block) < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    S, n, d = X.shape
    P = (torch.eye(d, dtype=X.dtype, device=X.device) / lam).expand(S, d, d).clone()
    theta = torch.zeros(S, d, dtype=X.dtype, device=X.device)
    out = torch.empty(S, n, dtype=X.dtype, device=X.device)

    for start in range(0, n, int(block)):
        Xb, yb = X[:, start:start + block], y[:, start:start + block]
        U = Xb @ P
        Sigma = U @ Xb.mT
        Sigma.diagonal(dim1=-2, dim2=-1).add_(1.0)
        L = cholesky(Sigma)

        z = solve_triangular(L, (yb - (Xb @ theta[..., None])[..., 0])[..., None], upper=False)
        W = solve_triangular(L, U, upper=False)
        out[:, start:start + block] = yb - L.diagonal(dim1=-2, dim2=-1) * z[..., 0]

        theta = theta + (W.mT @ z)[..., 0]
        P = P - W.mT @ W
        P = 0.5 * (P + P.mT)  # round-off would otherwise slowly break the symmetry
    return out


def ridge_fit(X, y, lam: float = 1.0) -> torch.Tensor:
    """Batch ridge regression without intercept: (lam I + X^T X)^{-1} X^T y."""
    X, y = as_streams(X, y)
    _check_lam(lam)
    d = X.shape[-1]
    A = X.mT @ X + lam * torch.eye(d, dtype=X.dtype, device=X.device)
    return torch.linalg.solve(A, (X.mT @ y[..., None]))[..., 0].squeeze(0)


def best_linear_loss(X, y, ends) -> torch.Tensor:
    """The smallest squared loss of one linear model (no penalty) fitted in hindsight on the
    first n rounds of each stream, for every n in `ends`: shape (S, len(ends)).

    It is sum y^2 - b^T G^+ b with G = X^T X and b = X^T y over the prefix (b lies in the range of
    G, so the pseudo-inverse gives the least-squares fit even with collinear features).
    """
    X, y = as_streams(X, y)
    ends = [int(e) for e in ends]
    n = X.shape[1]
    if not ends or ends != sorted(set(ends)) or ends[0] < 1 or ends[-1] > n:
        raise ValueError(f"ends must be increasing prefix lengths in 1..{n}, got {ends}")
    G, b, yy, out, start = 0.0, 0.0, 0.0, [], 0
    for end in ends:
        Xs, ys = X[:, start:end], y[:, start:end]
        G = G + Xs.mT @ Xs
        b = b + (Xs.mT @ ys[..., None])[..., 0]
        yy = yy + (ys * ys).sum(-1)
        start = end
        vals, vecs = torch.linalg.eigh(G)
        keep = vals > vals[..., -1:].clamp_min(1e-300) * 1e-11
        proj = (vecs.mT @ b[..., None])[..., 0]
        fitted = torch.where(keep, proj * proj / torch.where(keep, vals, 1.0), 0.0).sum(-1)
        out.append((yy - fitted).clamp_min(0.0))
    return torch.stack(out, dim=-1)


# -------------------------------------------------------------------------------------------------
# The aggregator: sleeping experts


def anh_log_weights(R: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """log w(R, C) of AdaNormalHedge, computed without overflow; -inf where the weight is 0
    (R <= -1)."""
    scale = 3.0 * (C + 1.0)
    hi = torch.relu(R + 1.0).square() / scale
    lo = torch.relu(R - 1.0).square() / scale
    return math.log(0.5) + hi + torch.log(-torch.expm1(lo - hi))


@dataclass
class SleepingRun:
    """What the aggregator did on S streams of T rounds with N experts."""

    loss: torch.Tensor  # (T, S): the learner's loss <p_t, l_t>
    mixture: torch.Tensor | None  # (T, S): the weighted-average prediction sum_g p_{t,g} f_{t,g}
    R: torch.Tensor  # (S, N): final regret of the learner to each expert, over its awake rounds
    C: torch.Tensor  # (S, N): final sum of |instantaneous regret|
    weights: torch.Tensor | None  # (T, S, N): p_t, when asked for


def sleeping_experts(losses, awake, *, rule="adanormalhedge", eta: float | None = None,
                     predictions=None, keep_weights: bool = False,
                     progress: bool = False) -> SleepingRun:
    """Run a sleeping-experts learner over T rounds of S streams with N experts.

    `losses` (T, S, N) in [0, 1] and `awake` (T, S, N) bool; a sleeping expert's loss is ignored.
    `rule`: "adanormalhedge" (parameter-free, the paper's) or "hedge" (weights exp(eta R) with a
    fixed rate eta, the Blum-Lykouris-style ablation), or one rule per stream. With `predictions`
    (T, S, N) the weighted average prediction of the awake experts is returned too. Every round
    needs an awake expert.
    """
    awake = torch.as_tensor(awake, dtype=torch.bool)
    losses = _as_tensor(losses, "losses", awake.device)
    if losses.ndim != 3 or losses.shape != awake.shape:
        raise ValueError(f"losses and awake must both be (rounds, streams, experts); got "
                         f"{tuple(losses.shape)} and {tuple(awake.shape)}")
    rules = [rule] * losses.shape[1] if isinstance(rule, str) else list(rule)
    if len(rules) != losses.shape[1] or not set(rules) <= set(RULES):
        raise ValueError(f"rule must be one of {RULES}, or one of them per stream "
                         f"({losses.shape[1]}); got {rule!r}")
    if "hedge" in rules and not (eta is not None and eta > 0):
        raise ValueError(f"the hedge rule needs a learning rate eta > 0, got {eta}")
    nobody = ~awake.any(-1)
    if nobody.any():
        t, s = (int(i) for i in nobody.nonzero()[0])
        raise ValueError(f"round {t} of stream {s} has no awake expert: every individual must "
                         "belong to at least one group (add the always-on group)")
    losses = torch.where(awake, losses, 0.0)
    if losses.min() < 0 or losses.max() > 1:
        raise ValueError("losses must lie in [0, 1] (clip predictions and labels to [0, 1])")
    if predictions is not None:
        predictions = _as_tensor(predictions, "predictions", awake.device)
        if predictions.shape != awake.shape:
            raise ValueError(f"predictions must be {tuple(awake.shape)}, got "
                             f"{tuple(predictions.shape)}")
        predictions = torch.where(awake, predictions, 0.0)
    anh_rows = torch.tensor([r == "adanormalhedge" for r in rules], device=awake.device)[:, None]
    mixed = 0 < int(anh_rows.sum()) < len(rules)

    T, S, N = losses.shape
    R = torch.zeros(S, N, dtype=torch.float64, device=awake.device)
    C = torch.zeros_like(R)
    loss = torch.empty(T, S, dtype=torch.float64, device=awake.device)
    mixture = torch.empty_like(loss) if predictions is not None else None
    weights = torch.empty(T, S, N, dtype=torch.float64, device=awake.device) if keep_weights \
        else None
    minus_inf = torch.tensor(-math.inf, dtype=torch.float64, device=awake.device)

    for t in bar(range(T), enabled=progress, desc="rounds", leave=False, mininterval=1.0):
        a, lt = awake[t], losses[t]

        # weights of the awake experts; if all of them are 0, follow the awake ones uniformly
        if mixed:
            logw = torch.where(anh_rows, anh_log_weights(R, C), eta * R)
        else:
            logw = anh_log_weights(R, C) if rules[0] == "adanormalhedge" else eta * R
        logw = torch.where(a, logw, minus_inf)
        lost = torch.isinf(logw).all(-1, keepdim=True)
        p = torch.softmax(torch.where(lost & a, 0.0, logw), dim=-1)

        lhat = (p * lt).sum(-1)
        loss[t] = lhat
        if mixture is not None:
            mixture[t] = (p * predictions[t]).sum(-1)
        if weights is not None:
            weights[t] = p

        # only awake experts' regrets move
        r = (lhat[:, None] - lt) * a
        R += r
        C += r.abs()
    return SleepingRun(loss, mixture, R, C, weights)


def anh_regret_bound(C, n_experts: int) -> torch.Tensor:
    """AdaNormalHedge's bound on the regret to each expert (uniform prior, losses in [0, 1]):
    sqrt(3 C_g (ln N + ln B + ln(1 + ln N))), B = 1 + (3/2) mean_g (1 + ln(1 + C_g)), with C the
    final sums of |instantaneous regret| (S, N) (Luo & Schapire 2015, Theorem 1; for sleeping
    experts the sums run over the awake rounds)."""
    C = _as_tensor(C, "C")
    if n_experts < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")
    if (C < 0).any():
        raise ValueError("C is a sum of absolute values and cannot be negative")
    B = 1.0 + 1.5 * (1.0 + torch.log1p(C)).mean(-1, keepdim=True)
    log_n = math.log(n_experts)
    return torch.sqrt(3.0 * C * (log_n + torch.log(B) + math.log1p(log_n)))
