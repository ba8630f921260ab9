"""Learning from aggregate responses (Javanmard, Chen, Mirrokni, Badanidiyuru and Fu, ICLR 2024):
the bag-level and instance-level losses, the interpolating estimator between them, its closed form
for linear models, its asymptotic risk under Gaussian features, and a label-private release of the
bag means.

The training set is split into bags; of bag `a` (size k_a) only the mean response ybar_a is seen.
For predictions f_i, with fbar_a the mean prediction over bag a and n the number of instances in
bags, the three losses are

    bag-level       L_bag  = (1/n) sum_a k_a (ybar_a - fbar_a)^2
    instance-level  L_inst = (1/n) sum_i (ybar_a(i) - f_i)^2
    spread penalty  R      = (1/n) sum_i (f_i - fbar_a(i))^2

and L_inst = L_bag + R exactly (expand the square inside each bag: the cross term sums to zero).
With equal bags (k_a = k, n = m k) L_bag is the paper's (1/m) sum_a (ybar_a - fbar_a)^2; weighting
each bag by its size is what keeps the identity exact when the last bag is smaller. The
instance-level loss is therefore the bag-level loss plus a penalty on the spread of the
predictions inside each bag, and the interpolating estimator minimises L_bag + rho R: rho = 0 is
the bag-level estimator, rho = 1 the instance-level one (the paper's "event-level" loss).

For a linear model f = X theta, with P the bag-averaging matrix, the interpolating estimator solves

    (X'PX + rho X'(I - P)X) theta = X'P y,

which needs only W = X'X, W1 = X'PX = sum_a k_a xbar_a xbar_a' and b = X'Py = sum_a k_a xbar_a
ybar_a (`bag_statistics`). With rho = 0 and no more bags than features, W1 is singular and the
minimum-norm least-squares solution is returned (the bag-level estimator's risk peaks there).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import brentq

from repsuite.weak.bags import bag_means, check_bags

# -------------------------------------------------------------------------------------------------
# Input checks


def _as_tensor(values, name: str, device=None, dtype=torch.float64) -> torch.Tensor:
    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    t = t.to(device=device if device is not None else t.device, dtype=dtype)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def _check_rhos(rhos) -> torch.Tensor:
    r = torch.as_tensor(np.atleast_1d(np.asarray(rhos, dtype=np.float64)))
    if r.ndim != 1 or not torch.isfinite(r).all() or (r < 0).any():
        raise ValueError(f"rho must be finite and >= 0 (0 = bag-level, 1 = instance-level), "
                         f"got {np.asarray(rhos).tolist()}")
    return r


def _bag_index(bags, n: int, device) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Checked bag ids, the kept rows (bag id >= 0) and their bag ids as torch tensors."""
    bags = check_bags(bags, n)
    keep = np.flatnonzero(bags >= 0)
    return bags, torch.as_tensor(keep, device=device), torch.as_tensor(bags[keep], device=device)


def _check_responses(ybar, n_bags: int, device) -> torch.Tensor:
    ybar = _as_tensor(ybar, "ybar (the bag responses)", device)
    if ybar.shape[0] != n_bags:
        raise ValueError(f"{ybar.shape[0]} bag responses for {n_bags} bags")
    return ybar


# -------------------------------------------------------------------------------------------------
# The losses (differentiable; any model's predictions)


def aggregate_responses(y, bags):
    """The released data: each bag's mean response (numpy in, numpy out; torch in, torch out)."""
    if isinstance(y, torch.Tensor):
        if not torch.isfinite(y).all():
            raise ValueError("y contains NaN or infinite values")
    elif not np.isfinite(np.asarray(y, dtype=np.float64)).all():
        raise ValueError("y contains NaN or infinite values")
    return bag_means(y, bags)


def _pieces(pred: torch.Tensor, ybar, bags):
    if not isinstance(pred, torch.Tensor) or pred.ndim != 1:
        raise ValueError("pred must be a 1-D torch tensor of per-instance predictions")
    if torch.isnan(pred).any():
        raise ValueError("pred contains NaN")
    _, keep, idx = _bag_index(bags, len(pred), pred.device)
    p = pred[keep]
    fbar = bag_means(pred, bags)
    sizes = torch.bincount(idx, minlength=len(fbar)).to(pred.dtype)
    target = None
    if ybar is not None:
        target = _check_responses(ybar, len(fbar), pred.device).to(pred.dtype)
    return p, idx, fbar, sizes, target


def bag_level_loss(pred: torch.Tensor, ybar, bags) -> torch.Tensor:
    """(1/n) sum_a k_a (ybar_a - fbar_a)^2: squared error between each bag's response and its mean
    prediction, bags weighted by size (the paper's (1/m) sum_a for equal bags)."""
    p, _, fbar, sizes, target = _pieces(pred, ybar, bags)
    return (sizes * (target - fbar) ** 2).sum() / len(p)


def instance_level_loss(pred: torch.Tensor, ybar, bags) -> torch.Tensor:
    """(1/n) sum_i (ybar_a(i) - f_i)^2: every instance fitted to its bag's response."""
    p, idx, _, _, target = _pieces(pred, ybar, bags)
    return ((target[idx] - p) ** 2).mean()


def spread_penalty(pred: torch.Tensor, bags) -> torch.Tensor:
    """(1/n) sum_i (f_i - fbar_a(i))^2: spread of the predictions inside each bag."""
    p, idx, fbar, _, _ = _pieces(pred, None, bags)
    return ((p - fbar[idx]) ** 2).mean()


def interpolating_loss(pred: torch.Tensor, ybar, bags, rho: float) -> torch.Tensor:
    """L_bag + rho R: rho = 0 is the bag-level loss, rho = 1 equals the instance-level loss."""
    _check_rhos(rho)
    return bag_level_loss(pred, ybar, bags) + rho * spread_penalty(pred, bags)


# -------------------------------------------------------------------------------------------------
# Linear models: sufficient statistics and the closed form along a path of rho


@dataclass
class BagStatistics:
    """What the linear estimators need: W = X'X, W1 = X'PX and b = X'Py over the bagged rows."""

    gram: torch.Tensor  # (d, d)
    bag_gram: torch.Tensor  # (d, d)
    moment: torch.Tensor  # (d,) or (d, c) for c response columns
    n: int  # instances in bags
    n_bags: int


def bag_statistics(X, ybar, bags, device=None) -> BagStatistics:
    """W, W1 and b of features X (n, d), bag responses ybar (m,) or (m, c) and bag ids (n,)."""
    X = _as_tensor(X, "X", device)
    if X.ndim != 2:
        raise ValueError(f"X must be (n, d), got shape {tuple(X.shape)}")
    _, keep, idx = _bag_index(bags, X.shape[0], X.device)
    Xk = X[keep]
    xbar = bag_means(X, bags)
    ybar = _check_responses(ybar, len(xbar), X.device)
    sizes = torch.bincount(idx, minlength=len(xbar)).to(X.dtype)
    weighted = xbar * sizes[:, None]
    return BagStatistics(gram=Xk.T @ Xk, bag_gram=weighted.T @ xbar, moment=weighted.T @ ybar,
                         n=len(Xk), n_bags=len(xbar))


def solve_path(gram: torch.Tensor, bag_gram: torch.Tensor, moment: torch.Tensor, rhos, *,
               n_bags: int, ridge: float = 0.0) -> torch.Tensor:
    """theta(rho) = (W1 + rho (W - W1) + ridge s I)^{-1} b for every rho, batched.

    gram and bag_gram are (..., d, d), moment (..., d, c); the result is (..., len(rhos), d, c).
    `ridge` is relative to s = trace(W) / d. With rho = 0, no ridge and n_bags <= d, W1 is singular
    and the minimum-norm least-squares solution pinv(W1) b is used.
    """
    rhos = _check_rhos(rhos).to(gram.device, gram.dtype)
    if ridge < 0 or not math.isfinite(ridge):
        raise ValueError(f"ridge must be finite and >= 0, got {ridge}")
    if gram.shape != bag_gram.shape or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram {tuple(gram.shape)} and bag_gram {tuple(bag_gram.shape)} must be "
                         "the same square matrices")
    if moment.shape[:-1] != gram.shape[:-1]:
        raise ValueError(f"moment {tuple(moment.shape)} does not match gram {tuple(gram.shape)}")
    d = gram.shape[-1]

    W1 = bag_gram.unsqueeze(-3)
    M = W1 + rhos[:, None, None] * (gram - bag_gram).unsqueeze(-3)
    if ridge:
        scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None, None]
        M = M + ridge * scale * torch.eye(d, dtype=M.dtype, device=M.device)
    b = moment.unsqueeze(-3).expand(*M.shape[:-1], moment.shape[-1])
    singular = (rhos == 0) & (n_bags <= d) & (ridge == 0)
    if not singular.any():
        return torch.linalg.solve(M, b)

    # The ill-posed bag-level fit (no more bags than features): minimum-norm least squares.
    out = torch.empty_like(b)
    if (~singular).any():
        out[..., ~singular, :, :] = torch.linalg.solve(M[..., ~singular, :, :],
                                                       b[..., ~singular, :, :])
    out[..., singular, :, :] = (torch.linalg.pinv(bag_gram) @ moment).unsqueeze(-3)
    return out


def interpolating_estimator(X, ybar, bags, rhos, *, ridge: float = 0.0,
                            device=None) -> torch.Tensor:
    """theta(rho) of the linear model for each rho: (len(rhos), d), or (len(rhos), d, c) for
    several response columns."""
    s = bag_statistics(X, ybar, bags, device)
    column = s.moment.ndim == 1
    moment = s.moment[:, None] if column else s.moment
    theta = solve_path(s.gram, s.bag_gram, moment, rhos, n_bags=s.n_bags, ridge=ridge)
    return theta[..., 0] if column else theta


# -------------------------------------------------------------------------------------------------
# Asymptotic risk for Gaussian features (our derivation; see the notebook)


@dataclass(frozen=True)
class AsymptoticRisk:
    """Limits of E||theta_hat - theta*||^2 (the excess test risk) and its two parts."""

    bias2: float
    variance: float

    @property
    def risk(self) -> float:
        return self.bias2 + self.variance


def asymptotic_risk(delta: float, bag_size: int, rho: float, *, signal: float = 1.0,
                    noise: float = 1.0) -> AsymptoticRisk:
    """Excess risk of the interpolating estimator as n, d grow with n / d -> delta.

    Model: x ~ N(0, I_d), y = x'theta* + noise with variance `noise`, ||theta*||^2 = `signal`,
    random bags of size k = `bag_size`. Rotating each bag by an orthogonal matrix whose first row
    is 1/sqrt(k) turns X'PX into A'A and X'(I - P)X into B'B, with A (m x d) and B (m(k-1) x d)
    independent standard Gaussian, and X'Py into A'(A theta* + e), e ~ N(0, noise I_m). Hence

        theta_hat - theta* = -rho M^{-1} B'B theta* + M^{-1} A'e,   M = A'A + rho B'B.

    Conditionally on A, B'B acts on M^{-1} like the scalar c = d gamma with gamma = delta_2 rho /
    (1 + rho T), where T = tr (A'A + c)^{-1} solves T = 1 / (gamma + delta_1 / (1 + T)),
    delta_1 = delta / k (bags per feature) and delta_2 = delta (k - 1) / k. With
    s = dT/dgamma = -T^2 / (1 - delta_1 T^2 / (1 + T)^2) and
    w = 1 / (1 + delta_2 rho^2 s / (1 + rho T)^2) (the derivative of the subordination map):

        variance = noise  * w (T + gamma s)
        bias^2   = signal * (w (1 - 2 gamma T - gamma^2 s) - 1 + 2 gamma T).

    rho = 0 gives the bag-level least squares on m bags: noise / (delta_1 - 1) when delta_1 > 1;
    below one bag per feature the minimum-norm solution, signal (1 - delta_1) +
    noise delta_1 / (1 - delta_1); at delta_1 = 1 the risk is infinite.
    """
    if delta <= 0 or bag_size < 1 or int(bag_size) != bag_size:
        raise ValueError(f"need delta = n/d > 0 and an integer bag size >= 1, got delta={delta}, "
                         f"bag_size={bag_size}")
    if rho < 0 or signal < 0 or noise < 0:
        raise ValueError(f"rho, signal and noise must be >= 0, got {rho}, {signal}, {noise}")
    k = int(bag_size)
    d1, d2 = delta / k, delta * (k - 1) / k
    if rho == 0 or k == 1:
        if d1 > 1:
            return AsymptoticRisk(0.0, noise / (d1 - 1))
        if d1 == 1:
            return AsymptoticRisk(math.inf, math.inf)
        if k == 1:
            raise ValueError(f"least squares needs n > d (delta > 1), got delta={delta}")
        return AsymptoticRisk(signal * (1 - d1), noise * d1 / (1 - d1))
    if delta <= 1:
        raise ValueError(f"with rho > 0 the estimator needs n > d (delta > 1), got delta={delta}")

    def gamma(T):
        return d2 * rho / (1 + rho * T)

    def equation(T):
        return T * (gamma(T) + d1 / (1 + T)) - 1

    upper = 1.0
    while equation(upper) < 0:
        upper *= 2
    T = brentq(equation, 1e-15, upper, xtol=1e-15, rtol=1e-13)
    g = gamma(T)
    s = -T**2 / (1 - d1 * T**2 / (1 + T) ** 2)
    w = 1 / (1 + d2 * rho**2 * s / (1 + rho * T) ** 2)
    return AsymptoticRisk(bias2=signal * (w * (1 - 2 * g * T - g * g * s) - 1 + 2 * g * T),
                          variance=noise * w * (T + g * s))


def best_rho(delta: float, bag_size: int, rhos, *, signal: float = 1.0,
             noise: float = 1.0) -> float:
    """The rho of the grid with the smallest asymptotic risk."""
    rhos = _check_rhos(rhos).tolist()
    risks = [asymptotic_risk(delta, bag_size, r, signal=signal, noise=noise).risk for r in rhos]
    return float(rhos[int(np.argmin(risks))])


# -------------------------------------------------------------------------------------------------
# Label-private release of the bag means


def laplace_scale(bound: float, bag_size, epsilon: float):
    """Laplace scale for an epsilon-label-private bag mean of labels clipped to [-bound, bound].

    Changing one person's label moves its bag's mean by at most 2 bound / k; every person is in
    one bag only, so noise of scale 2 bound / (k epsilon) on each mean makes the whole release
    epsilon-label-DP (parallel composition)."""
    if bound <= 0 or epsilon <= 0:
        raise ValueError(f"bound and epsilon must be > 0, got bound={bound}, epsilon={epsilon}")
    k = np.asarray(bag_size, dtype=np.float64)
    if (k < 1).any():
        raise ValueError("bag sizes must be >= 1")
    return 2 * bound / (k * epsilon)


def private_bag_means(y, bags, *, bound: float, epsilon: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Labels clipped to [-bound, bound] (centre them on a public value first), averaged per bag,
    plus Laplace noise of `laplace_scale`; a torch tensor of the m noisy means."""
    y = _as_tensor(y, "y")
    bags = check_bags(bags, len(y))
    means = bag_means(y.clamp(-bound, bound), bags)
    sizes = np.bincount(bags[bags >= 0])
    scale = torch.as_tensor(laplace_scale(bound, sizes, epsilon), dtype=y.dtype, device=y.device)
    return means + scale * laplace_noise(means.shape, generator=generator, device=y.device)


def laplace_noise(shape, *, generator: torch.Generator | None = None, device=None,
                  dtype=torch.float64) -> torch.Tensor:
    """Standard Laplace draws (scale 1, variance 2): the difference of two unit exponentials."""
    e = torch.empty((2, *shape), device=device, dtype=dtype).exponential_(generator=generator)
    return e[0] - e[1]


def private_noise_variance(bound: float, bag_size: int, epsilon: float) -> float:
    """Extra noise variance, per instance of a bag, that the Laplace release adds to the linear
    model's responses: k 2 scale^2 = 8 bound^2 / (k epsilon^2) (to add to `noise` in
    `asymptotic_risk`, which sees each bag mean's noise multiplied by k)."""
    return float(bag_size * 2 * laplace_scale(bound, bag_size, epsilon) ** 2)
