"""The aggregate-responses experiments: Monte-Carlo runs of the interpolating estimator on the
paper's linear model with Gaussian features (optionally with the label-private release of the bag
means), the asymptotic risk on the same grid, real regression data with random bags and rho chosen
by cross-validation over bags, and the per-seed numbers behind the claims.

Every table is long: one row per seed, design (n, bag size k, SNR) and rho. `risk` is the excess
test risk ||theta_hat - theta*||^2 averaged over a seed's replications (for x ~ N(0, I) it is the
test mean squared error minus the noise variance). Its two parts are taken conditionally on the
features and bags, as in the theory: `bias2` = ||E[theta_hat | X] - theta*||^2, exact per
replication because E[theta_hat | X] is the same estimator fitted to the noise-free responses
X theta*, and `variance` = ||theta_hat - E[theta_hat | X]||^2, both averaged over replications
(risk = bias2 + variance up to a cross term of mean zero).
"""

import numpy as np
import pandas as pd
import torch

from repsuite.progress import bar
from repsuite.weak.aggregate import (
    asymptotic_risk,
    interpolating_estimator,
    laplace_noise,
    laplace_scale,
    private_noise_variance,
    solve_path,
)
from repsuite.weak.bags import bag_means, make_bags

ESTIMATORS = {"bag": 0.0, "instance": 1.0}


def child_seed(seed: int, *keys: int) -> int:
    """An independent seed for one part of a run (a sample size, a bag size, a fold...), so that
    adding a design to a grid leaves the draws of the others unchanged."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def _generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _check_grid(d: int, ns, bag_sizes, snrs, reps: int) -> None:
    if d < 1 or reps < 2:
        raise ValueError(f"need d >= 1 features and reps >= 2 replications per seed (for a "
                         f"variance), got d={d}, reps={reps}")
    for n in ns:
        bad = [k for k in bag_sizes if k < 1 or n % k]
        if bad:
            raise ValueError(f"bag sizes {bad} do not divide n={n} into equal bags")
        if n <= d:
            raise ValueError(f"n={n} must exceed d={d}: the instance-level fit needs n > d")
    if any(s <= 0 for s in snrs):
        raise ValueError(f"signal-to-noise ratios must be > 0, got {list(snrs)}")


# -------------------------------------------------------------------------------------------------
# The linear model: simulation and theory


def simulate_linear(d: int, ns, bag_sizes, snrs, rhos, seeds, reps: int, *, signal: float = 1.0,
                    epsilon: float | None = None, bound_sd: float = 2.0, device=None,
                    progress: bool = False) -> pd.DataFrame:
    """Monte-Carlo risk, bias^2 and variance of theta(rho) for every design and rho.

    Per seed, theta* is uniform on the sphere of squared radius `signal`; each replication draws
    X (n x d, standard Gaussian), noise and random bags of each size; all SNRs share X and the
    standardised noise (noise variance signal / SNR), all bag sizes of one n share X. With
    `epsilon`, labels are clipped to +-bound_sd times their standard deviation and each bag mean
    gets Laplace noise of scale 2 bound / (k epsilon) (`private_bag_means`, batched here).
    """
    ns, bag_sizes, snrs = list(ns), list(bag_sizes), list(snrs)
    _check_grid(d, ns, bag_sizes, snrs, reps)
    device = torch.device(device or "cpu")
    rho_t = torch.as_tensor(np.asarray(rhos, dtype=np.float64), device=device)
    sigma = torch.tensor([np.sqrt(signal / s) for s in snrs], dtype=torch.float64, device=device)
    bound = bound_sd * torch.sqrt(signal + sigma**2)
    zero = torch.zeros(1, dtype=torch.float64, device=device)
    clip = torch.cat([zero + torch.inf, bound])  # the noise-free column is never clipped
    private = torch.cat([zero, bound])  # nor released with noise
    rows = []
    for seed in bar(list(seeds), enabled=progress, desc="seeds"):
        g = _generator(child_seed(seed, 0, d), device)
        theta = torch.randn(d, generator=g, dtype=torch.float64, device=device)
        theta *= np.sqrt(signal) / theta.norm()
        for n in ns:
            g = _generator(child_seed(seed, 1, n), device)
            X = torch.randn(reps, n, d, generator=g, dtype=torch.float64, device=device)
            noise = torch.randn(reps, n, 1, generator=g, dtype=torch.float64, device=device)
            # Column 0 holds the noise-free responses: fitted, they give E[theta_hat | X].
            clean = (X @ theta)[..., None]
            y = torch.cat([clean, clean + noise * sigma], dim=2)  # (reps, n, 1 + S)
            if epsilon is not None:
                y = torch.maximum(torch.minimum(y, clip), -clip)
            gram = X.transpose(1, 2) @ X
            for k in bag_sizes:
                gk = _generator(child_seed(seed, 2, n, k), device)
                m = n // k
                order = torch.argsort(torch.rand(reps, n, generator=gk, dtype=torch.float64,
                                                 device=device), dim=1)
                xbar = torch.gather(X, 1, order[..., None].expand(-1, -1, d)).view(
                    reps, m, k, d).mean(2)
                ybar = torch.gather(y, 1, order[..., None].expand(-1, -1, y.shape[2])).view(
                    reps, m, k, y.shape[2]).mean(2)
                if epsilon is not None:
                    scale = float(laplace_scale(1.0, k, epsilon)) * private
                    ybar = ybar + scale * laplace_noise(ybar.shape, generator=gk, device=device)
                bag_gram = k * xbar.transpose(1, 2) @ xbar
                moment = k * xbar.transpose(1, 2) @ ybar
                theta_hat = solve_path(gram, bag_gram, moment, rho_t, n_bags=m)  # (reps, R, d, 1+S)
                rows += _summaries(theta_hat, theta, seed, n, k, m, snrs, rhos)
    return pd.DataFrame(rows)


def _summaries(theta_hat, theta, seed, n, k, m, snrs, rhos) -> list[dict]:
    reps = theta_hat.shape[0]
    mean_fit, fit = theta_hat[..., :1], theta_hat[..., 1:]
    risk = ((fit - theta[:, None]) ** 2).sum(2).mean(0)  # (R, S)
    bias2 = ((mean_fit - theta[:, None]) ** 2).sum(2).mean(0).expand_as(risk)
    variance = ((fit - mean_fit) ** 2).sum(2).mean(0)
    out = []
    for i, rho in enumerate(rhos):
        for j, snr in enumerate(snrs):
            out.append({"seed": seed, "n": n, "k": k, "m": m, "snr": snr, "rho": float(rho),
                        "risk": float(risk[i, j]), "bias2": float(bias2[i, j]),
                        "variance": float(variance[i, j]), "reps": reps})
    return out


def theory_frame(d: int, ns, bag_sizes, snrs, rhos, *, signal: float = 1.0,
                 epsilon: float | None = None, bound_sd: float = 2.0) -> pd.DataFrame:
    """`asymptotic_risk` on the simulation's grid (delta = n / d); with `epsilon`, the Laplace
    noise's variance is added to the label noise (clipping is not modelled)."""
    rows = []
    for n in ns:
        for k in bag_sizes:
            for snr in snrs:
                noise = signal / snr
                if epsilon is not None:
                    bound = bound_sd * np.sqrt(signal + noise)
                    noise += private_noise_variance(bound, k, epsilon)
                for rho in rhos:
                    a = asymptotic_risk(n / d, k, float(rho), signal=signal, noise=noise)
                    rows.append({"n": n, "k": k, "m": n // k, "snr": snr, "rho": float(rho),
                                 "risk": a.risk, "bias2": a.bias2, "variance": a.variance})
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------------------------------
# Per-seed numbers for the claims


def at_design(frame: pd.DataFrame, column: str = "risk", **where) -> pd.Series:
    """One value per seed of `column` at the design given by `where` (n, k, snr, rho)."""
    sel = frame
    for key, value in where.items():
        sel = sel[np.isclose(sel[key], value)] if key in ("snr", "rho") else sel[sel[key] == value]
    if sel.empty or sel.seed.duplicated().any():
        raise ValueError(f"no single row per seed at {where}")
    return sel.set_index("seed")[column].sort_index()


def bias_variance(frame: pd.DataFrame, *, n: int, k: int, snr: float) -> pd.DataFrame:
    """Per seed: bias^2 and variance of the bag-level and instance-level estimators at a design."""
    out = {}
    for name, rho in ESTIMATORS.items():
        for col in ("bias2", "variance", "risk"):
            out[f"{name}_{col}"] = at_design(frame, col, n=n, k=k, snr=snr, rho=rho)
    return pd.DataFrame(out)


def well_posed(frame: pd.DataFrame, d: int, min_bags_per_feature: float) -> pd.DataFrame:
    """Rows of designs with at least `min_bags_per_feature` d bags."""
    return frame[frame.m >= min_bags_per_feature * d]


def pick_interior_design(theory: pd.DataFrame, d: int, min_bags_per_feature: float) -> dict:
    """The design (k > 1, enough bags) where the theory predicts the largest relative gain of the
    best interior rho over the better of rho = 0 and rho = 1, with that rho."""
    best = None
    for (n, k, snr), t in well_posed(theory, d, min_bags_per_feature).groupby(["n", "k", "snr"]):
        if k == 1:
            continue
        ends = min(t[t.rho == 0].risk.iloc[0], t[t.rho == 1].risk.iloc[0])
        inner = t[(t.rho > 0) & (t.rho < 1)]
        i = inner.risk.idxmin()
        gain = ends / inner.risk[i] - 1
        if best is None or gain > best["predicted_gain"]:
            best = {"n": int(n), "k": int(k), "snr": float(snr), "rho": float(inner.rho[i]),
                    "predicted_gain": float(gain)}
    if best is None:
        raise ValueError("no design with k > 1 and enough bags in the grid")
    return best


def bag_size_increase(frame: pd.DataFrame, d: int, min_bags_per_feature: float,
                      rho: float) -> pd.Series:
    """Per seed, the smallest relative increase of the risk from one bag size to the next larger
    one, over all n and SNR, among designs with enough bags."""
    sel = well_posed(frame[np.isclose(frame.rho, rho)], d, min_bags_per_feature)
    parts = []
    for _, t in sel.groupby(["n", "snr"]):
        wide = t.pivot(index="seed", columns="k", values="risk").sort_index(axis=1)
        if wide.shape[1] > 1:
            parts.append((wide.iloc[:, 1:].to_numpy() / wide.iloc[:, :-1].to_numpy() - 1)
                         .min(1))
    if not parts:
        raise ValueError("fewer than two bag sizes with enough bags for any n")
    seeds = sorted(sel.seed.unique())
    return pd.Series(np.min(np.column_stack(parts), 1), index=seeds)


def snr_gap_increase(frame: pd.DataFrame, d: int, min_bags_per_feature: float) -> pd.Series:
    """Per seed, the smallest increase, from the lowest to the highest SNR, of the difference
    risk(instance) - risk(bag), over designs with k > 1 and enough bags."""
    snrs = sorted(frame.snr.unique())
    if len(snrs) < 2:
        raise ValueError("need at least two signal-to-noise ratios")
    sel = well_posed(frame[frame.k > 1], d, min_bags_per_feature)
    parts = []
    for n, k in sel[["n", "k"]].drop_duplicates().itertuples(index=False):
        gap = {s: at_design(frame, n=n, k=k, snr=s, rho=1.0)
               - at_design(frame, n=n, k=k, snr=s, rho=0.0) for s in (snrs[0], snrs[-1])}
        parts.append(gap[snrs[-1]] - gap[snrs[0]])
    if not parts:
        raise ValueError("no design with k > 1 and enough bags")
    return pd.concat(parts, axis=1).min(axis=1)


def theory_deviation(frame: pd.DataFrame, theory: pd.DataFrame, d: int,
                     min_bags_per_feature: float) -> tuple[pd.Series, pd.DataFrame]:
    """Per seed, the root mean square of risk_sim / risk_theory - 1 over every design and rho,
    leaving out the bag-level fit (rho = 0) with fewer than `min_bags_per_feature` d bags (near
    its peak, where finite-d effects dominate); and the table of mean deviations per design."""
    keys = ["n", "k", "snr", "rho"]
    t = theory.rename(columns={"risk": "theory"})[keys + ["theory"]]
    merged = frame.merge(t, on=keys, how="inner")
    merged = merged[(merged.rho > 0) | (merged.m >= min_bags_per_feature * d)]
    merged = merged[np.isfinite(merged.theory)]
    merged["deviation"] = merged.risk / merged.theory - 1
    rms = merged.groupby("seed").deviation.apply(lambda v: float(np.sqrt(np.mean(v**2))))
    table = merged.groupby(keys).agg(sim=("risk", "mean"), theory=("theory", "first"),
                                     deviation=("deviation", "mean")).reset_index()
    return rms, table


def private_optimum(theory: pd.DataFrame, rho: float) -> int:
    """The bag size with the smallest predicted risk of theta(rho) under the private release."""
    t = theory[np.isclose(theory.rho, rho)]
    return int(t.loc[t.risk.idxmin(), "k"])


def best_rho_per_design(theory: pd.DataFrame) -> pd.DataFrame:
    """The theory's best rho of the grid, and its risk, per design."""
    i = theory.groupby(["n", "k", "snr"]).risk.idxmin()
    return theory.loc[i, ["n", "k", "snr", "rho", "risk"]].reset_index(drop=True)


# -------------------------------------------------------------------------------------------------
# Real data


def prepare_regression(X, y, *, seed: int, test_size: float = 0.2,
                       winsor_percent: float = 1.0) -> dict:
    """Seeded train/test split; features winsorised at the training set's `winsor_percent` and
    100 - `winsor_percent` percentiles, then centred on the training median and divided by the
    interquartile range; an intercept column appended; y standardised by the training mean and
    standard deviation (test errors are then in units of the label variance)."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X must be (n, d) with one label per row, got {X.shape} and {y.shape}")
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise ValueError("X or y contains NaN or infinite values")
    if not 0 < test_size < 1 or not 0 <= winsor_percent < 50:
        raise ValueError(f"need 0 < test_size < 1 and 0 <= winsor_percent < 50, got "
                         f"{test_size}, {winsor_percent}")
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_size * len(y)))
    test, train = order[:n_test], order[n_test:]
    if len(train) < X.shape[1] + 2 or n_test < 2:
        raise ValueError(f"{len(y)} rows are too few for a split with {X.shape[1]} features")
    lo, hi = np.percentile(X[train], [winsor_percent, 100 - winsor_percent], axis=0)
    Z = np.clip(X, lo, hi)
    med = np.median(Z[train], axis=0)
    q75, q25 = np.percentile(Z[train], [75, 25], axis=0)
    spread = np.where(q75 > q25, q75 - q25, Z[train].std(0))
    Z = (Z - med) / np.where(spread > 0, spread, 1.0)
    Z = np.hstack([Z, np.ones((len(Z), 1))])
    mu, sd = y[train].mean(), y[train].std()
    t = (y - mu) / sd
    return {"X_train": Z[train], "y_train": t[train], "X_test": Z[test], "y_test": t[test]}


def _renumber(bags: np.ndarray) -> np.ndarray:
    return np.unique(bags, return_inverse=True)[1]


def cv_bag_loss(X, ybar, bags, rhos, *, folds: int, seed: int, device=None) -> np.ndarray:
    """Cross-validated bag-level loss of theta(rho) for each rho: bags split into `folds` groups;
    fitted without a group, scored on its bags by (1/n) sum_a k_a (ybar_a - fbar_a)^2. Only the
    released bag means are used; for random bags its expectation is proportional to the
    individual-level test error."""
    bags = np.asarray(bags)
    m = int(bags.max()) + 1
    if folds < 2 or m < 2 * folds:
        raise ValueError(f"{m} bags are too few for {folds}-fold cross-validation over bags")
    ybar = np.asarray(ybar, dtype=np.float64)
    fold = np.random.default_rng(seed).permutation(m) % folds
    total, n = np.zeros(len(rhos)), 0
    for f in range(folds):
        fit_rows, val_rows = fold[bags] != f, fold[bags] == f
        fit_ids = np.unique(bags[fit_rows])
        theta = interpolating_estimator(X[fit_rows], ybar[fit_ids], _renumber(bags[fit_rows]),
                                        rhos, device=device)
        val_ids = np.unique(bags[val_rows])
        val_bags = _renumber(bags[val_rows])
        pred = torch.as_tensor(X[val_rows], device=theta.device) @ theta.T  # (n_val, R)
        fbar = bag_means(pred, val_bags)
        sizes = torch.as_tensor(np.bincount(val_bags), dtype=pred.dtype, device=pred.device)
        target = torch.as_tensor(ybar[val_ids], device=pred.device)[:, None]
        total += (sizes[:, None] * (target - fbar) ** 2).sum(0).cpu().numpy()
        n += int(val_rows.sum())
    return total / n


def real_data_runs(X, y, *, bag_sizes, rhos, seeds, folds: int = 5, test_size: float = 0.2,
                   winsor_percent: float = 1.0, device=None, progress: bool = False,
                   desc: str = "seeds") -> pd.DataFrame:
    """Per seed and bag size: a fresh split, random bags of the training rows (the last bag may be
    smaller), theta(rho) for every rho fitted on the bag means, its test mean squared error on the
    individual labels, the cross-validated bag-level loss and the rho that cross-validation
    picks (`chosen`)."""
    rows = []
    for seed in bar(list(seeds), enabled=progress, desc=desc):
        s = prepare_regression(X, y, seed=seed, test_size=test_size,
                               winsor_percent=winsor_percent)
        for k in bag_sizes:
            bags = make_bags(len(s["y_train"]), k, child_seed(seed, 3, k))
            ybar = bag_means(s["y_train"], bags)
            theta = interpolating_estimator(s["X_train"], ybar, bags, rhos, device=device)
            pred = torch.as_tensor(s["X_test"], device=theta.device) @ theta.T
            target = torch.as_tensor(s["y_test"], device=theta.device)[:, None]
            mse = ((pred - target) ** 2).mean(0).cpu().numpy()
            cv = cv_bag_loss(s["X_train"], ybar, bags, rhos, folds=folds,
                             seed=child_seed(seed, 4, k), device=device)
            pick = int(np.argmin(cv))
            for i, rho in enumerate(rhos):
                rows.append({"seed": seed, "k": k, "m": int(bags.max()) + 1, "rho": float(rho),
                             "test_mse": float(mse[i]), "cv_loss": float(cv[i]),
                             "chosen": i == pick})
    return pd.DataFrame(rows)


def real_data_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per seed and bag size: test MSE of the bag-level (rho = 0), instance-level (rho = 1) and
    cross-validated interpolating estimators, the best rho in hindsight, and the chosen rho."""
    out = []
    for (seed, k), t in frame.groupby(["seed", "k"]):
        chosen = t[t.chosen].iloc[0]
        out.append({"seed": seed, "k": k, "m": int(t.m.iloc[0]),
                    "bag": float(t[t.rho == 0].test_mse.iloc[0]),
                    "instance": float(t[np.isclose(t.rho, 1)].test_mse.iloc[0]),
                    "interpolating": float(chosen.test_mse), "rho_cv": float(chosen.rho),
                    "oracle": float(t.test_mse.min())})
    return pd.DataFrame(out)
