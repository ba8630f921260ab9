"""Byzantine attacks: the updates of the workers in `idx` (rows of `deltas` (k, P)) are replaced.

Each attack returns a new tensor; the input is left as it is. Attacks that use the benign
updates (rows not in `idx`) need at least one of them.
"""

import math

import numpy as np
import torch


def _setup(deltas, idx, need_benign: bool = True):
    if not isinstance(deltas, torch.Tensor) or deltas.dim() != 2:
        raise ValueError("deltas must be a 2-D tensor (workers, parameters)")
    n = len(deltas)
    idx = torch.as_tensor(np.asarray(idx) if not isinstance(idx, torch.Tensor) else idx)
    idx = idx.reshape(-1).long().to(deltas.device)
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"Byzantine indices must lie in [0, {n}), got {idx.tolist()}")
    if len(torch.unique(idx)) != len(idx):
        raise ValueError(f"Byzantine indices repeat: {idx.tolist()}")
    byzantine = torch.zeros(n, dtype=torch.bool, device=deltas.device)
    byzantine[idx] = True
    if need_benign and len(idx) and byzantine.all():
        raise ValueError(f"all {n} workers are Byzantine: this attack needs benign updates")
    return deltas.clone(), idx, ~byzantine


def byzantine_rows(participants, byzantine) -> np.ndarray:
    """Positions, among this round's `participants` (client ids), of the Byzantine clients."""
    return np.flatnonzero(np.isin(np.asarray(participants), np.asarray(byzantine)))


def gaussian(deltas, idx, std: float, generator: torch.Generator, mean: float = 0.0):
    """Byzantine rows become Gaussian noise N(mean, std^2) in every coordinate."""
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    out, idx, _ = _setup(deltas, idx, need_benign=False)
    noise = torch.randn(len(idx), out.shape[1], generator=generator, device=generator.device,
                        dtype=out.dtype)
    out[idx] = mean + std * noise.to(out.device)
    return out


def sign_flip(deltas, idx, scale: float = 1.0):
    """Each Byzantine worker sends its own update multiplied by -scale."""
    out, idx, _ = _setup(deltas, idx, need_benign=False)
    out[idx] = -scale * out[idx]
    return out


def zero(deltas, idx):
    """Byzantine workers send zeros (a dropped update)."""
    out, idx, _ = _setup(deltas, idx, need_benign=False)
    out[idx] = 0
    return out


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z for n workers of which f are Byzantine: s = floor(n/2 + 1) - f
    supporters are needed, z = Phi^-1((n - s) / n)."""
    from scipy.stats import norm

    s = math.floor(n / 2 + 1) - f
    if not 0 < (n - s) / n < 1:
        raise ValueError(f"no ALIE z for n={n}, f={f}: (n - s) / n = {(n - s) / n} is not in "
                         "(0, 1)")
    return float(norm.ppf((n - s) / n))


def alie(deltas, idx, z: float | None = None):
    """"A little is enough": Byzantine rows become mean - z * std of the benign rows, per
    coordinate (z from `alie_z` when None)."""
    out, idx, benign = _setup(deltas, idx)
    if z is None:
        z = alie_z(len(deltas), len(idx))
    good = deltas[benign]
    std = good.std(0, unbiased=False) if len(good) > 1 else torch.zeros_like(good[0])
    out[idx] = good.mean(0) - z * std
    return out


def ipm(deltas, idx, eps: float = 0.1):
    """Inner-product manipulation (Xie et al.): Byzantine rows become -eps times the benign mean."""
    out, idx, benign = _setup(deltas, idx)
    out[idx] = -eps * deltas[benign].mean(0)
    return out


def min_max(deltas, idx, perturbation: str = "unit_vec", tol: float = 1e-5,
            max_iter: int = 200):
    """Shejwalkar and Houmansadr's AGR-agnostic Min-Max attack: Byzantine rows become
    mean - gamma * p, with gamma the largest value (found by bisection) for which the largest
    distance from the malicious update to a benign update stays within the largest distance
    between two benign updates. p: `unit_vec` (mean / ||mean||), `sign` (sign of the mean) or
    `std` (coordinate-wise std of the benign updates)."""
    out, idx, benign = _setup(deltas, idx)
    good = deltas[benign]
    centre = good.mean(0)
    if perturbation == "unit_vec":
        p = centre / centre.norm().clamp(min=1e-12)
    elif perturbation == "sign":
        p = centre.sign()
    elif perturbation == "std":
        p = good.std(0, unbiased=False)
    else:
        raise ValueError(f"perturbation must be unit_vec, sign or std, got {perturbation!r}")
    bound = torch.cdist(good, good).max()

    def fits(gamma: float) -> bool:
        return bool(((centre - gamma * p) - good).norm(dim=1).max() <= bound)

    # Distances are convex in gamma and gamma = 0 fits, so the feasible gammas form an interval.
    low, high = 0.0, 1.0
    while fits(high) and high < 1e12:
        low, high = high, 2 * high
    for _ in range(max_iter):
        if high - low <= tol * max(1.0, low):
            break
        mid = (low + high) / 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    out[idx] = centre - low * p
    return out
