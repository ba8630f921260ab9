"""Flag Aggregator (FA): Byzantine-robust aggregation as a flag-median subspace problem.

Almasi, Mishra, Vamanan, Ravi, "Flag Aggregator: Scalable Distributed Training under Failures and
Augmented Losses using Convex Optimization", ICLR 2024, arXiv 2302.05865.

Each worker's update g_i is read as a direction x_i = g_i / ||g_i||. The server looks for an
m-dimensional subspace, given by an orthonormal basis Y (P x m), that reconstructs every direction
well: worker i's reconstruction ratio is ||Y^T x_i||^2 in [0, 1], its sine to the subspace is
sqrt(1 - ||Y^T x_i||^2). The objective (the flag median with the paper's pairwise regulariser) is

    F(Y) = sum_i sqrt(s_i + eps) + lambda / (p (p - 1)) * sum_{i != j} sqrt(s_ij + eps),

with s_i = 1 - ||Y^T x_i||^2 and s_ij the same quantity for the unit difference direction
(x_i - x_j) / ||x_i - x_j||, which favours subspaces that keep the length of the differences
between workers. It is minimised by iteratively reweighted least squares: bounding each square
root by its tangent at the current Y gives a weighted "flag mean" problem,
max_Y sum_k a_k ||Y^T z_k||^2 with a_k = c_k (s_k + eps)^(-1/2), whose solution is the top-m left
singular vectors of the matrix of columns sqrt(a_k) z_k. Because that is a majorise-minimise
step, F never increases (tests check it). The aggregate is (1/m) sum_i Y Y^T x_i: the projections
of the unit directions onto the subspace, so the raw gradient norms are discarded and the
learning rate sets the step length.

Every column z_k lies in the span of the p directions, so the whole iteration runs on the p x p
Gram matrix of the directions: the top singular vectors of the weighted matrix are obtained
exactly (not approximated) from a small eigenproblem, and the aggregate is a weighted sum
sum_i beta_i x_i. A batch of independent problems (B, p, P) is solved at once.

Differences from the released code, on purpose: the pairwise columns are scaled by
sqrt(lambda / (p (p - 1))) times the IRLS weight, so that lambda is the objective's weight (the
code multiplies by lambda / (p (p - 1)) itself, an objective weight of its square), and the
difference vectors are normalised, so each pairwise term is the sine of an angle, in line with
the paper's reconstruction ratios. Workers that send an exactly zero update carry no direction and
are left out of both sums (as a data column the code's zero vector adds nothing to the subspace;
in its pairwise term it would enter as the other worker's direction).
"""

from dataclasses import dataclass, field

import numpy as np
import torch

INITS = ("random", "uniform")


@dataclass
class FlagSolution:
    """The result of the flag-median IRLS on one problem (or a batch of them).

    `coef` (.., p, m) gives the basis as Y = X^T coef, with X the unit directions (rows);
    `beta` (.., p) the aggregate's weights on the unit directions; `ratios` (.., p) the
    reconstruction ratios ||Y^T x_i||^2 of the final subspace (0 for zero updates); `weights`
    (.., p) the last IRLS weights a_i (how much each worker counted); `objective` (.., T + 1)
    the objective at the start and after each iteration (NaN once a problem had stopped);
    `valid` (.., p) which workers sent a nonzero update.
    """

    aggregate: torch.Tensor
    beta: torch.Tensor
    coef: torch.Tensor
    ratios: torch.Tensor
    weights: torch.Tensor
    objective: torch.Tensor
    valid: torch.Tensor
    iterations: int
    directions: torch.Tensor = field(repr=False)

    def basis(self) -> torch.Tensor:
        """The orthonormal basis Y (.., P, m) of the subspace (zero columns past its rank)."""
        return self.directions.transpose(-1, -2) @ self.coef.to(self.directions.dtype)

    def monotone(self, tol: float = 1e-9) -> bool:
        """Whether the objective never went up by more than `tol` (relative) in any problem."""
        obj = self.objective
        if obj.shape[-1] < 2:
            return True
        prev, nxt = obj[..., :-1], obj[..., 1:]
        ok = torch.isnan(nxt) | (nxt <= prev + tol * prev.abs().clamp_min(1.0))
        return bool(ok.all())


def _as_stack(deltas) -> tuple[torch.Tensor, bool]:
    """(B, p, P) float tensor and whether the input had no batch dimension."""
    if not isinstance(deltas, torch.Tensor):
        deltas = torch.as_tensor(np.asarray(deltas))
    if not deltas.is_floating_point():
        deltas = deltas.double()
    if deltas.dim() == 2:
        return deltas.unsqueeze(0), True
    if deltas.dim() == 3:
        return deltas, False
    raise ValueError(
        f"deltas must be (workers, parameters) or (problems, workers, parameters), got shape "
        f"{tuple(deltas.shape)}"
    )


def check_inputs(deltas: torch.Tensor, m: int, lam: float, f: int | None) -> None:
    """Clear errors for what the Flag Aggregator cannot handle, in the caller's terms."""
    _, p, n_params = deltas.shape
    if p < 1 or n_params < 1:
        raise ValueError(f"need at least one worker and one parameter, got deltas of shape "
                         f"{tuple(deltas.shape)}")
    # A row sum is finite unless the row holds NaN or inf (or overflows; then look closer).
    bad = torch.zeros(deltas.shape[:2], dtype=torch.bool, device=deltas.device)
    if not torch.isfinite(deltas.sum(-1)).all():
        bad = ~torch.isfinite(deltas).all(dim=-1)
    if bad.any():
        workers = sorted({int(i) for i in torch.nonzero(bad)[:, -1]})
        raise ValueError(f"the updates of workers {workers} contain NaN or infinite values; "
                         "drop or repair them before aggregating")
    if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 1:
        raise ValueError(f"the subspace dimension m must be a positive int, got {m!r}")
    if m > p or m > n_params:
        raise ValueError(f"the subspace dimension m={m} exceeds the number of workers p={p} or "
                         f"of parameters P={n_params}")
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"the pairwise weight lambda must be finite and >= 0, got {lam}")
    if f is not None:
        if isinstance(f, bool) or not isinstance(f, int | np.integer) or f < 0:
            raise ValueError(f"the number of Byzantine workers f must be an int >= 0, got {f!r}")
        if 2 * f >= p:
            raise ValueError(
                f"the Flag Aggregator needs a majority of honest workers (2f < p): f={f} "
                f"Byzantine of p={p} workers"
            )


def _sines(R: torch.Tensor, pair_norm: torch.Tensor):
    """Squared sines of the directions and of the unit pairwise differences to the subspace.

    R (B, m, p) holds Y^T x_i; pair_norm (B, p, p) the lengths ||x_i - x_j|| (0 where a pair is
    left out).
    """
    s = (1.0 - (R * R).sum(dim=1)).clamp_min(0.0)
    D = R.unsqueeze(-1) - R.unsqueeze(-2)  # (B, m, p, p): Y^T (x_i - x_j)
    safe = torch.where(pair_norm > 0, pair_norm, torch.ones_like(pair_norm))
    s_pair = (1.0 - (D * D).sum(dim=1) / safe**2).clamp_min(0.0)
    return s, s_pair


def _objective(R, valid, pair_mask, pair_norm, c_pair, eps):
    s, s_pair = _sines(R, pair_norm)
    data = (torch.sqrt(s + eps) * valid).sum(-1)
    pairs = (torch.sqrt(s_pair + eps) * pair_mask).sum((-1, -2))
    return data + c_pair * pairs


def _irls_step(R, G_half, Q, inv_half, valid, pair_mask, pair_norm, c_pair, eps, m):
    """One IRLS step: weights from the current subspace, then the weighted flag mean.

    Returns the new coefficients C (the new basis is Y = X^T C) and the data weights a_i that
    produced it.
    """
    s, s_pair = _sines(R, pair_norm)
    a = valid / torch.sqrt(s + eps)
    a_pair = pair_mask * c_pair[:, None, None] / torch.sqrt(s_pair + eps)
    b = a_pair / torch.where(pair_norm > 0, pair_norm, torch.ones_like(pair_norm)) ** 2
    # S = sum_i a_i e_i e_i^T + sum_{i != j} b_ij (e_i - e_j)(e_i - e_j)^T, both orders counted.
    lap = torch.diag_embed(b.sum(-1) + b.sum(-2)) - b - b.transpose(-1, -2)
    S = torch.diag_embed(a) + lap
    # The weighted matrix W = X^T S^(1/2) has W W^T = X^T S X; on the orthonormal basis
    # U = X^T Q G^(-1/2) of the directions' span this is G^(1/2) Q^T S Q G^(1/2).
    M = G_half[..., :, None] * (Q.transpose(-1, -2) @ S @ Q) * G_half[..., None, :]
    M = 0.5 * (M + M.transpose(-1, -2))
    _, V = torch.linalg.eigh(M)
    V = V[..., -m:].flip(-1)  # top m, largest first
    C = Q @ (inv_half[..., :, None] * V)
    return C, a


def flag_median(deltas, *, m: int = 1, lam: float = 0.0, n_iter: int = 10, eps: float = 1e-7,
                tol: float = 1e-10, init: str = "random", generator: torch.Generator | None = None,
                f: int | None = None) -> FlagSolution:
    """Solve the regularised flag-median problem by IRLS and form the Flag Aggregator's update.

    deltas: (p, P) worker updates, or (B, p, P) for B independent problems solved together.
    m: subspace dimension (`r_col` in the paper's code, default 1 there).
    lam: weight of the pairwise regulariser (lambda; 0 in the paper's code by default).
    n_iter: maximum IRLS iterations (the released code runs one per training step); a problem
        stops early once its objective improves by less than `tol` (relative).
    eps: smoothing of the square roots (1e-7 as in the paper's code).
    init: "random" (a random orthonormal Y drawn with `generator`, as the paper's code) or
        "uniform" (first step with equal weights, i.e. the plain flag mean).
    f: the declared number of Byzantine workers, only checked (a majority must be honest).
    """
    X, single = _as_stack(deltas)
    check_inputs(X, m, lam, f)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int | np.integer) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive int, got {n_iter!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    B, p, _ = X.shape
    work = torch.float64

    # Double precision throughout: near the optimum the squared sines of the best-fitting
    # directions reach the size of eps, where single-precision rounding would decide the steps.
    Xw = X.to(work)
    norms = torch.linalg.vector_norm(Xw, dim=-1)
    valid = norms > 0
    Xn = Xw / torch.where(valid, norms, torch.ones_like(norms)).unsqueeze(-1)
    G = Xn @ Xn.transpose(-1, -2)
    G = 0.5 * (G + G.transpose(-1, -2))
    validf = valid.to(work)

    # Pairs of nonzero, distinct directions; both orders, as in the objective.
    sq = (torch.diagonal(G, dim1=-2, dim2=-1)[..., :, None]
          + torch.diagonal(G, dim1=-2, dim2=-1)[..., None, :] - 2 * G).clamp_min(0.0)
    pair_norm = torch.sqrt(sq)
    eye = torch.eye(p, dtype=torch.bool, device=X.device)
    pair_mask = (valid[..., :, None] & valid[..., None, :] & ~eye & (pair_norm > 1e-12)).to(work)
    pair_norm = pair_norm * pair_mask
    n_valid = validf.sum(-1)
    c_pair = torch.where(n_valid > 1, lam / (n_valid * (n_valid - 1)).clamp_min(1.0),
                         torch.zeros_like(n_valid))

    # The directions' span: G = Q diag(e) Q^T, with the null directions (identical or
    # dependent updates) dropped.
    evals, Q = torch.linalg.eigh(G)
    cut = evals.amax(-1, keepdim=True).clamp_min(0.0) * p * 10 * torch.finfo(work).eps
    keep = evals > cut
    G_half = torch.where(keep, evals.clamp_min(0.0).sqrt(), torch.zeros_like(evals))
    inv_half = torch.where(keep, 1.0 / torch.where(keep, G_half, torch.ones_like(G_half)),
                           torch.zeros_like(G_half))

    if init == "random":
        # A random orthonormal basis of the full space, as the released code starts from.
        Y0 = torch.rand(B, X.shape[-1], m, generator=generator, dtype=X.dtype,
                        device="cpu").to(X.device) - 0.5
        Y0 = torch.linalg.qr(Y0)[0]
        R = Y0.to(work).transpose(-1, -2) @ Xn.transpose(-1, -2)
    else:
        R = torch.zeros(B, m, p, dtype=work, device=X.device)

    args = (validf, pair_mask, pair_norm, c_pair)
    best = _objective(R, *args, eps)
    obj = [best]
    C = torch.zeros(B, p, m, dtype=work, device=X.device)
    a = validf.clone()
    active = torch.ones(B, dtype=torch.bool, device=X.device)
    done = 0
    for _ in range(n_iter):
        C_new, a_new = _irls_step(R, G_half, Q, inv_half, *args, eps, m)
        R_new = C_new.transpose(-1, -2) @ G
        f_new = _objective(R_new, *args, eps)
        # The trace keeps the raw values, so that the tests see whether the step ever went up.
        obj.append(torch.where(active, f_new, torch.full_like(f_new, float("nan"))))
        # A majorise-minimise step cannot go up; keep the previous subspace if rounding says so
        # (the released code does the same). The first step is always taken: the random start
        # is not a usable subspace.
        accept = active & ((f_new <= best) | (done == 0))
        sel = accept[:, None, None]
        C = torch.where(sel, C_new, C)
        R = torch.where(sel, R_new, R)
        a = torch.where(accept[:, None], a_new, a)
        gain = best - f_new
        best = torch.where(accept, f_new, best)
        active = accept & (gain > tol * best.abs().clamp_min(1.0))
        done += 1
        if not active.any():
            break

    # Aggregate (1/m) sum_i Y Y^T x_i = X^T beta with beta = C C^T G 1 / m.
    ones = validf.unsqueeze(-1)
    beta = (C @ (C.transpose(-1, -2) @ (G @ ones))).squeeze(-1) / m
    aggregate = (beta.unsqueeze(-2) @ Xn).squeeze(-2).to(X.dtype)
    ratios = ((R * R).sum(dim=1) * validf).clamp(0.0, 1.0)
    sol = FlagSolution(aggregate=aggregate, beta=beta, coef=C, ratios=ratios, weights=a,
                       objective=torch.stack(obj, dim=-1), valid=valid, iterations=done,
                       directions=Xn)
    if single:
        sol = FlagSolution(aggregate=aggregate[0], beta=beta[0], coef=C[0], ratios=ratios[0],
                           weights=a[0], objective=sol.objective[0], valid=valid[0],
                           iterations=done, directions=Xn[0])
    return sol


def flag_objective(deltas, Y, *, lam: float = 0.0, eps: float = 1e-7) -> torch.Tensor:
    """The objective F(Y) above for an explicit basis Y (P, m) or (B, P, m), computed directly
    in the parameter space (independent of the Gram-matrix route that the solver takes)."""
    X, single = _as_stack(deltas)
    Y = torch.as_tensor(Y, dtype=X.dtype, device=X.device)
    Y = Y.unsqueeze(0) if Y.dim() == 2 else Y
    p = X.shape[1]
    norms = torch.linalg.vector_norm(X, dim=-1, keepdim=True)
    valid = (norms > 0).squeeze(-1)
    Xn = X / torch.where(norms > 0, norms, torch.ones_like(norms))
    s = (1 - ((Xn @ Y) ** 2).sum(-1)).clamp_min(0) * valid
    total = (torch.sqrt(s + eps) * valid).sum(-1)
    if lam > 0:
        # Every ordered pair's unit difference, written out in the parameter space.
        n_valid = valid.sum(-1).to(X.dtype)
        D = Xn.unsqueeze(2) - Xn.unsqueeze(1)
        dn = torch.linalg.vector_norm(D, dim=-1)
        eye = torch.eye(p, dtype=torch.bool, device=X.device)
        use = valid[:, :, None] & valid[:, None, :] & (dn > 1e-12) & ~eye
        U = D / torch.where(use, dn, torch.ones_like(dn)).unsqueeze(-1)
        s_pair = (1 - ((U @ Y.unsqueeze(1)) ** 2).sum(-1)).clamp_min(0)
        c = lam / (n_valid * (n_valid - 1)).clamp_min(1)
        total = total + c * (use * torch.sqrt(s_pair + eps)).sum((-1, -2))
    return total[0] if single else total


def flag_aggregate(deltas, **kwargs) -> torch.Tensor:
    """The Flag Aggregator's update (1/m) sum_i Y Y^T x_i; keyword arguments as `flag_median`."""
    return flag_median(deltas, **kwargs).aggregate


class FlagRule:
    """The Flag Aggregator as a server aggregation rule, `(deltas, weights, round, info) -> delta`.

    Workers count by their direction only, so the sample-size `weights` are not used (the paper's
    parameter server gives every worker one vote). Each call draws its random start from a
    generator seeded once here, and, with `record`, keeps the objective traces, reconstruction
    ratios and IRLS weights for diagnostics in `history`.
    """

    def __init__(self, *, m: int = 1, lam: float = 0.0, n_iter: int = 10, eps: float = 1e-7,
                 init: str = "random", seed: int = 0, f: int | None = None, record: bool = True):
        self.kwargs = dict(m=m, lam=lam, n_iter=n_iter, eps=eps, init=init, f=f)
        self.generator = torch.Generator().manual_seed(seed)
        self.record = record
        self.history: list[dict] = []

    def __call__(self, deltas, weights=None, round=None, info=None) -> torch.Tensor:
        sol = flag_median(deltas, generator=self.generator, **self.kwargs)
        if self.record:
            self.history.append({"round": round, "objective": sol.objective.cpu(),
                                 "ratios": sol.ratios.cpu(), "weights": sol.weights.cpu(),
                                 "monotone": sol.monotone()})
        return sol.aggregate


def bulyan(deltas, f: int) -> torch.Tensor:
    """Bulyan (El Mhamdi, Guerraoui, Rouault 2018) for (n, P) or a batch (B, n, P) of updates.

    theta = n - 2f updates are picked one by one by Krum on the ones not yet picked (score: sum
    of squared distances to the max(n_left - f - 2, 1) nearest others); then, per coordinate,
    the beta = theta - 2f picked values closest to their median are averaged. Needs n >= 4f + 3.
    The same rule as `aggregators.bulyan`, for a whole batch of runs at once.
    """
    X, single = _as_stack(deltas)
    _, n, _ = X.shape
    if isinstance(f, bool) or not isinstance(f, int | np.integer) or f < 0:
        raise ValueError(f"the number of Byzantine workers f must be an int >= 0, got {f!r}")
    if n < 4 * f + 3:
        raise ValueError(f"Bulyan needs n >= 4f + 3 workers: n={n} workers with f={f} "
                         f"Byzantine ones (4f + 3 = {4 * f + 3})")
    if not torch.isfinite(X).all():
        raise ValueError("the updates contain NaN or infinite values")
    theta, beta = n - 2 * f, n - 4 * f
    sq = (X * X).sum(-1)
    D = (sq[..., :, None] + sq[..., None, :] - 2 * X @ X.transpose(-1, -2)).clamp_min(0.0)
    left = torch.ones(X.shape[:2], dtype=torch.bool, device=X.device)
    eye = torch.eye(n, dtype=torch.bool, device=X.device)
    picked = []
    for t in range(theta):
        k = min(max(n - t - f - 2, 1), n - t - 1)
        others = left[..., None, :] & ~eye
        Dm = torch.where(others, D, torch.full_like(D, float("inf")))
        score = torch.sort(Dm, dim=-1).values[..., :k].sum(-1)
        score = torch.where(left, score, torch.full_like(score, float("inf")))
        i = score.argmin(-1)
        picked.append(i)
        left = left.scatter(-1, i[:, None], False)
    idx = torch.stack(picked, -1)  # (B, theta)
    S = torch.gather(X, 1, idx[..., None].expand(-1, -1, X.shape[-1]))
    # The usual median (middle pair averaged when theta is even), as numpy's.
    srt = torch.sort(S, dim=1).values
    med = 0.5 * (srt[:, (theta - 1) // 2] + srt[:, theta // 2]).unsqueeze(1)
    close = torch.topk((S - med).abs(), beta, dim=1, largest=False).indices
    out = torch.gather(S, 1, close).mean(dim=1)
    return out[0] if single else out


def uniform_noise(deltas, idx, *, generator: torch.Generator, high: float = 1.0) -> torch.Tensor:
    """The paper's "random" Byzantine workers: each sends i.i.d. uniform [0, high) coordinates
    (torch.rand in the released code, so every such update points near the all-ones direction)."""
    X = torch.as_tensor(deltas).clone()
    idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
    if idx.numel() and (idx.min() < 0 or idx.max() >= X.shape[0]):
        raise ValueError(f"Byzantine worker indices {idx.tolist()} outside 0..{X.shape[0] - 1}")
    noise = torch.rand(idx.numel(), X.shape[1], generator=generator, dtype=X.dtype)
    X[idx] = high * noise.to(X.device)
    return X
