"""Scoring and post-processing of predicted conditional quantiles.

A prediction is an array `q` of shape (n, K): row i holds the predicted quantiles of y_i at the
levels `taus` (K increasing numbers in (0, 1)). Everything here is PyTorch and works on any device;
numpy input is accepted and turned into a tensor.

- the pinball (check) loss rho_tau(u) = max(tau u, (tau - 1) u), u = y - q;
- the weighted interval score, WIS = 2 x the mean pinball loss over the levels. On levels that are
  symmetric around 1/2 and include the median this is Bracher et al.'s WIS,
  (1 / (L + 1/2)) (|y - m| / 2 + sum_l (alpha_l / 2) IS_alpha_l), because
  (alpha / 2) IS_alpha(l, u; y) = rho_{alpha/2}(y - l) + rho_{1 - alpha/2}(y - u);
- coverage and width of the central intervals (tau, 1 - tau), and how often quantiles cross;
- two ways to make a row non-decreasing in tau: sorting, and isotonic regression (the min-max
  form of the pool-adjacent-violators solution, differentiable almost everywhere). The paper
  proves that neither can increase the WIS of any single point;
- split-conformal calibration of every central interval (conformalized quantile regression).
"""

import math

import numpy as np
import torch

# -------------------------------------------------------------------------------------------------
# Checks


def as_levels(taus, device=None, dtype=torch.float64) -> torch.Tensor:
    """Quantile levels as a 1-D tensor, checked: strictly increasing, inside (0, 1)."""
    t = torch.as_tensor(np.asarray(taus, dtype=np.float64) if not torch.is_tensor(taus) else taus,
                        dtype=dtype, device=device).reshape(-1)
    if t.numel() == 0:
        raise ValueError("no quantile levels given")
    if torch.isnan(t).any() or (t <= 0).any() or (t >= 1).any():
        raise ValueError(f"quantile levels must lie strictly between 0 and 1, got {t.tolist()}")
    if t.numel() > 1 and (t[1:] <= t[:-1]).any():
        raise ValueError(f"quantile levels must be strictly increasing, got {t.tolist()}")
    return t


def _tensor(x, name: str, dtype=None, device=None) -> torch.Tensor:
    t = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
    if dtype is None and not t.is_floating_point():
        dtype = torch.float64
    t = t.to(device=device if device is not None else t.device, dtype=dtype or t.dtype)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN")
    return t


def check_prediction(q, y=None, taus=None):
    """`q` as an (n, K) tensor, `y` as (n,) on the same device and dtype, `taus` as (K,)."""
    q = _tensor(q, "the predicted quantiles")
    if q.dim() != 2:
        raise ValueError(f"predicted quantiles must have shape (n, K), got {tuple(q.shape)}")
    if y is not None:
        y = _tensor(y, "y", dtype=q.dtype, device=q.device).reshape(-1)
        if len(y) != len(q):
            raise ValueError(f"y has {len(y)} values but the predictions have {len(q)} rows")
    if taus is not None:
        taus = as_levels(taus, device=q.device, dtype=q.dtype)
        if len(taus) != q.shape[1]:
            raise ValueError(f"{len(taus)} quantile levels but the predictions have "
                             f"{q.shape[1]} columns")
    return q, y, taus


# -------------------------------------------------------------------------------------------------
# Scores


class _Pinball(torch.autograd.Function):
    """rho_tau(y - q) with a one-step backward: d rho / d q = 1[y < q] - tau (autograd through
    max or relu spends most of a training step on masks)."""

    @staticmethod
    def forward(ctx, q, y, taus):
        u = y.unsqueeze(-1) - q
        below = u < 0
        ctx.save_for_backward(below, taus)
        ctx.y_shape = y.shape
        return taus * u - u * below

    @staticmethod
    def backward(ctx, grad):
        below, taus = ctx.saved_tensors
        grad_q = grad * (below.to(grad.dtype) - taus)
        grad_y = -grad_q.sum(-1) if ctx.needs_input_grad[1] else None
        return grad_q if ctx.needs_input_grad[0] else None, grad_y, None


def pinball(q: torch.Tensor, y: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """rho_tau(y - q) = max(tau u, (tau - 1) u), u = y - q, elementwise, broadcasting y over the
    trailing level axis: (..., K). No checks: the training loops call it at every step."""
    if q.requires_grad or y.requires_grad:
        return _Pinball.apply(q, y, taus)
    u = y.unsqueeze(-1) - q
    return taus * u - u * (u < 0)


def pinball_loss(q, y, taus, *, reduction: str = "mean"):
    """The pinball loss of each point averaged over the levels (`none`: shape (n,)), or its mean
    over points (`mean`), or per level averaged over points (`level`: shape (K,))."""
    q, y, taus = check_prediction(q, y, taus)
    loss = pinball(q, y, taus)
    if reduction == "none":
        return loss.mean(1)
    if reduction == "level":
        return loss.mean(0)
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be none, level or mean; got {reduction!r}")


def wis(q, y, taus, *, reduction: str = "mean"):
    """Weighted interval score: twice the mean pinball loss over the levels (see the module)."""
    if reduction == "level":
        raise ValueError("the WIS is defined over all levels; use pinball_loss for one level")
    return 2 * pinball_loss(q, y, taus, reduction=reduction)


def interval_score(lower, upper, y, alpha: float):
    """Gneiting and Raftery's interval score of the central (1 - alpha) interval, per point."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    lower = _tensor(lower, "lower").reshape(-1)
    upper = _tensor(upper, "upper", dtype=lower.dtype, device=lower.device).reshape(-1)
    y = _tensor(y, "y", dtype=lower.dtype, device=lower.device).reshape(-1)
    if not len(lower) == len(upper) == len(y):
        raise ValueError(f"lower, upper and y have {len(lower)}, {len(upper)} and {len(y)} rows")
    return ((upper - lower) + 2 / alpha * (lower - y).clamp(min=0)
            + 2 / alpha * (y - upper).clamp(min=0))


def central_pairs(taus, tol: float = 1e-9) -> list[tuple[int, int, float]]:
    """(index of tau, index of 1 - tau, nominal coverage 1 - 2 tau) for every tau < 1/2 whose
    mirror level is also in the grid, widest interval first."""
    t = as_levels(taus).tolist()
    pairs = []
    for i, lo in enumerate(t):
        if lo >= 0.5 - tol:
            break
        j = next((j for j, hi in enumerate(t) if abs(hi - (1 - lo)) < tol), None)
        if j is not None:
            pairs.append((i, j, 1 - 2 * lo))
    return pairs


def coverage(q, y, taus) -> dict[float, float]:
    """Share of points inside each central interval [q_tau, q_{1 - tau}], by nominal level."""
    q, y, taus = check_prediction(q, y, taus)
    out = {}
    for i, j, nominal in central_pairs(taus):
        inside = (q[:, i] <= y) & (y <= q[:, j])
        out[round(nominal, 6)] = float(inside.double().mean())
    return out


def interval_width(q, taus) -> dict[float, float]:
    """Mean width q_{1 - tau} - q_tau of each central interval, by nominal level."""
    q, _, taus = check_prediction(q, None, taus)
    return {round(nominal, 6): float((q[:, j] - q[:, i]).double().mean())
            for i, j, nominal in central_pairs(taus)}


def crossing_rate(q) -> float:
    """Share of rows whose predicted quantiles decrease somewhere along the levels."""
    q, _, _ = check_prediction(q)
    if q.shape[1] < 2:
        return 0.0
    return float((q.diff(dim=1) < 0).any(1).double().mean())


# -------------------------------------------------------------------------------------------------
# Monotone rearrangement


def sort_quantiles(q):
    """Each row sorted increasingly (Chernozhukov et al.'s rearrangement for a grid of levels).
    Works on any (..., K) tensor; gradients flow through the permutation."""
    q = q if torch.is_tensor(q) else torch.as_tensor(np.asarray(q, dtype=np.float64))
    return torch.sort(q, dim=-1).values


def isotonic_quantiles(q, *, chunk: int = 4096):
    """The least-squares non-decreasing fit of each row (equal weights on the levels).

    Uses the min-max form of the pool-adjacent-violators solution,
        q_iso[j] = max_{i <= j} min_{k >= j} mean(q[i..k]),
    computed for all rows at once from cumulative sums in O(K^2) memory per row (rows are taken
    `chunk` at a time). Differentiable almost everywhere: the gradient is that of the pooled
    block means. Works on any (..., K) tensor.
    """
    q = q if torch.is_tensor(q) else torch.as_tensor(np.asarray(q, dtype=np.float64))
    shape, K = q.shape, q.shape[-1]
    if K < 2:
        return q.clone()
    flat = q.reshape(-1, K)
    idx = torch.arange(K, device=q.device)
    # mean[i, k] over q[i..k] for i <= k; +inf below the diagonal so it never wins the min.
    length = (idx[None, :] - idx[:, None] + 1).to(q.dtype)
    below = idx[None, :] < idx[:, None]
    out = []
    for start in range(0, len(flat), chunk):
        rows = flat[start:start + chunk]
        csum = torch.cat([torch.zeros_like(rows[:, :1]), rows.cumsum(1)], 1)
        means = (csum[:, None, 1:] - csum[:, :-1, None]) / length.clamp(min=1)
        means = means.masked_fill(below, math.inf)
        # min over k >= j of mean[i, k]: a reversed running minimum along k.
        upper = means.flip(-1).cummin(-1).values.flip(-1)
        # max over i <= j; entries with i > j are +inf and must not count.
        upper = upper.masked_fill(below, -math.inf)
        out.append(upper.max(1).values)
    return torch.cat(out).reshape(shape)


MONOTONISERS = {"none": lambda q: q, "sort": sort_quantiles, "isotonic": isotonic_quantiles}


def monotonise(q, how: str):
    """`none`, `sort` or `isotonic`, applied along the last axis."""
    if how not in MONOTONISERS:
        raise ValueError(f"monotonisation must be one of {sorted(MONOTONISERS)}, got {how!r}")
    return MONOTONISERS[how](q)


# -------------------------------------------------------------------------------------------------
# Conformal calibration


def conformal_margins(q_cal, y_cal, taus) -> torch.Tensor:
    """Split-conformal margin of every central interval (conformalized quantile regression).

    For the pair (tau, 1 - tau) with miscoverage alpha = 2 tau, the conformity score of a
    calibration point is E = max(q_tau - y, y - q_{1 - tau}), and the margin is the
    ceil((1 - alpha)(n + 1))-th smallest score (+inf when that exceeds n): widening the interval
    by it on both sides covers a new exchangeable point with probability at least 1 - alpha.
    Returns one margin per pair, in the order of `central_pairs(taus)`.
    """
    q, y, taus = check_prediction(q_cal, y_cal, taus)
    pairs = central_pairs(taus)
    if not pairs:
        raise ValueError("conformal calibration needs levels tau and 1 - tau in the grid")
    n = len(y)
    margins = []
    for i, j, nominal in pairs:
        scores = torch.maximum(q[:, i] - y, y - q[:, j])
        k = math.ceil(nominal * (n + 1) - 1e-9)
        margins.append(torch.sort(scores).values[k - 1] if k <= n
                       else torch.tensor(math.inf, dtype=q.dtype, device=q.device))
    return torch.stack(margins)


def apply_conformal(q, margins, taus):
    """Move every central interval's ends out (or in, for a negative margin) by its margin;
    levels without a mirror (the median) are unchanged. The result can cross: sort it if
    monotone quantiles are needed (coverage of each interval is that of the unsorted pair)."""
    q, _, taus = check_prediction(q, None, taus)
    pairs = central_pairs(taus)
    margins = _tensor(margins, "margins", dtype=q.dtype, device=q.device).reshape(-1)
    if len(margins) != len(pairs):
        raise ValueError(f"{len(margins)} margins for {len(pairs)} central intervals")
    out = q.clone()
    for (i, j, _), m in zip(pairs, margins, strict=True):
        out[:, i] = q[:, i] - m
        out[:, j] = q[:, j] + m
    return out
