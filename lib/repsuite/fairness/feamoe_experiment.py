"""The FEAMOE notebook's experiments: drifting streams built from real tables, offline comparisons
with logistic regression and an MLP, and the explanation study.

Every model outputs p(y = 1 | x). Fairness numbers come from `repsuite.fairness.metrics` on hard
predictions (threshold 0.5); the burden of a group is the mean distance to the decision boundary
of its members who get the unfavourable prediction, measured for every model the same way: a line
search along the gradient of the log-odds (exact for a linear model).
"""

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split
from torch import nn

from repsuite.fairness import feamoe as FM
from repsuite.fairness import metrics
from repsuite.fairness.stream import stream_order
from repsuite.stats import mean_ci
from repsuite.timing import best_of

STREAM_MODELS = ("static_lr", "static_mlp", "online_lr", "online_mlp", "fair_lr",
                 "feamoe_nofair", "feamoe")


# -------------------------------------------------------------------------------------------------
# Baselines


class Classifier(nn.Module):
    """Logistic regression (hidden=()) or an MLP with ReLU layers, returning p(y = 1 | x)."""

    def __init__(self, n_features: int, hidden=(), seed: int = 0, device=None):
        super().__init__()
        torch.manual_seed(seed)  # nn.Linear draws from the global generator
        sizes, layers = [n_features, *hidden], []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], 1)).to(device)

    def logit(self, x):
        return self.net(x).squeeze(1)

    def forward(self, x):
        return torch.sigmoid(self.logit(x))


def make_model(kind: str, n_features: int, *, seed: int, hidden: int, n_experts: int = 1,
               device=None) -> nn.Module:
    if kind.endswith("mlp"):
        return Classifier(n_features, (hidden, hidden), seed=seed, device=device)
    if kind.endswith("_lr") and kind != "fair_lr":
        return Classifier(n_features, (), seed=seed, device=device)
    if kind in ("fair_lr", "feamoe", "feamoe_nofair"):
        return FM.FEAMOE(n_features, 1 if kind == "fair_lr" else n_experts, seed=seed,
                         device=device)
    raise ValueError(f"unknown model {kind!r}; known: {STREAM_MODELS}")


# -------------------------------------------------------------------------------------------------
# Evaluation of one batch


def boundary_distance(model: nn.Module, X: torch.Tensor, *, max_distance: float = 10.0,
                      n_grid: int = 24, n_bisect: int = 12) -> torch.Tensor:
    """Distance from each row to the decision boundary along the logit's gradient direction.

    A line search: the first flip of the prediction on a geometric grid of step lengths up to
    `max_distance`, refined by bisection; rows that do not flip within `max_distance` (or whose
    gradient vanishes) get `max_distance`. Exact for a linear model up to the bisection's
    resolution; for other models an upper bound on the distance to the boundary.
    """
    x = X.detach().clone().requires_grad_(True)
    f = model.logit(x)
    (grad,) = torch.autograd.grad(f.sum(), x)
    f = f.detach()
    norm = grad.norm(dim=1, keepdim=True)
    u = -torch.sign(f)[:, None] * grad / norm.clamp_min(FM.EPS)
    side = f > 0

    @torch.no_grad()
    def flipped(t):  # t: (m, n) step lengths -> (m, n) True where the prediction has flipped
        pts = x.detach()[None] + t[..., None] * u[None]
        return (model.logit(pts.reshape(-1, x.shape[1])).reshape(t.shape) > 0) != side

    grid = torch.logspace(-3, np.log10(max_distance), n_grid, device=X.device)
    flips = flipped(grid[:, None].expand(-1, len(x)))
    found = flips.any(0) & (norm[:, 0] > FM.EPS)
    first = flips.float().argmax(0)
    hi = grid[first]
    lo = torch.where(first > 0, grid[(first - 1).clamp_min(0)], torch.zeros_like(hi))
    for _ in range(n_bisect):
        mid = (lo + hi) / 2
        f_mid = flipped(mid[None])[0]
        hi, lo = torch.where(f_mid, mid, hi), torch.where(f_mid, lo, mid)
    return torch.where(found, hi, torch.full_like(hi, max_distance))


def burden_gap(model: nn.Module, X: torch.Tensor, group: np.ndarray, favorable: int) -> float:
    """Largest minus smallest per-group mean distance to the boundary among the unfavourably
    predicted rows; NaN when fewer than two groups have such rows."""
    with torch.no_grad():
        rows = FM.unfavourable(model(X), favorable).cpu().numpy()
    groups = np.unique(group[rows])
    if len(groups) < 2:
        return float("nan")
    dist = boundary_distance(model, X[torch.as_tensor(rows, device=X.device)]).cpu().numpy()
    means = [dist[group[rows] == g].mean() for g in groups]
    return float(max(means) - min(means))


def batch_stats(model: nn.Module, X: torch.Tensor, y: np.ndarray, group: np.ndarray, *,
                favorable: int, burden: bool = True) -> dict:
    """Accuracy, DP / EO / burden gaps on hard predictions, and the standard errors that the
    drift detector uses (binomial, from the window's own rates)."""
    with torch.no_grad():
        p = model(X).cpu().numpy()
    pred = (p >= 0.5).astype(np.int64)
    acc = float((pred == y).mean())
    rates = metrics.selection_rates(pred, group)
    sizes = {g: int((group == g).sum()) for g in rates}
    try:
        eo = metrics.equalized_odds_difference(y, pred, group)
    except ValueError:  # a group without positives or negatives in this batch
        eo = float("nan")
    return {"acc": acc, "dp_gap": metrics.demographic_parity_difference(pred, group),
            "eo_gap": eo, "burden_gap": burden_gap(model, X, group, favorable) if burden
            else float("nan"),
            "se_acc": float(np.sqrt(max(acc * (1 - acc), 1e-4) / len(y))),
            "se_dp": float(np.sqrt(sum(max(r * (1 - r), 1e-4) / sizes[g]
                                       for g, r in rates.items()))),
            "positive_rate": float(pred.mean())}


# -------------------------------------------------------------------------------------------------
# Data


def binary_groups(X, y, group, keep=None):
    """Rows of the two groups in `keep` (codes; all rows when None), recoded 0 and 1."""
    group = metrics.check_groups(group, len(y))
    if keep is not None:
        if len(keep) != 2:
            raise ValueError(f"keep must name two group codes, got {keep}")
        rows = np.isin(group, keep)
        X, y, group = X[rows], y[rows], (group[rows] == keep[1]).astype(np.int64)
    if len(np.unique(group)) != 2:
        raise ValueError(f"FEAMOE's penalties here compare two groups; found codes "
                         f"{np.unique(group).tolist()}: pass keep=[a, b]")
    return X, y, group


@dataclass
class Stream:
    """A stream of windows: standardised features, labels and group codes in arrival order."""

    name: str
    X: torch.Tensor
    y: np.ndarray
    group: np.ndarray
    windows: list
    drift_window: int
    favorable: int

    def window(self, t: int):
        s = self.windows[t]
        return self.X[s], self.y[s], self.group[s]


def drifting_stream(name: str, X, y, group, *, key, n_windows: int, window_size: int,
                    drift_window: int, seed: int, favorable: int, device=None) -> Stream:
    """An abrupt drift along `key`: windows before `drift_window` hold rows from the low end of
    the key, the later ones rows from the high end (split in proportion to the window counts),
    each phase in a seeded random order. Windows shrink to fit a small table."""
    if not 0 < drift_window < n_windows:
        raise ValueError(f"drift_window must be in 1..{n_windows - 1}, got {drift_window}")
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    order = stream_order(len(y), seed, kind="sorted", key=key)
    cut = round(len(y) * drift_window / n_windows)
    size = min(window_size, cut // drift_window, (len(y) - cut) // (n_windows - drift_window))
    if size < 20:
        raise ValueError(f"{name}: {len(y)} rows give windows of {size} rows; need at least 20")
    rng = np.random.default_rng(seed)
    pre = rng.permutation(order[:cut])[: drift_window * size]
    post = rng.permutation(order[cut:])[: (n_windows - drift_window) * size]
    rows = np.concatenate([pre, post])
    # One fixed standardisation for the whole stream (a preprocessing step chosen in advance).
    mu, sd = X[rows].mean(0), X[rows].std(0)
    Xs = (X[rows] - mu) / np.where(sd > 0, sd, 1.0)
    return Stream(name, torch.as_tensor(Xs, dtype=torch.float32, device=device), y[rows],
                  group[rows], [slice(t * size, (t + 1) * size) for t in range(n_windows)],
                  drift_window, favorable)


# -------------------------------------------------------------------------------------------------
# A stream run: every model predicts a window before it learns from it


def run_stream(stream: Stream, *, models=STREAM_MODELS, seed: int, lam: float, notion: str = "dp",
               steps: int, lr: float, hidden: int, n_experts: int = 1, static_windows: int = 2,
               tol_acc: float = 0.02, tol_gap: float = 0.02, z: float = 2.0, n_new: int = 1,
               max_experts: int = 10, offset: float = 0.0, freeze_old: bool = True,
               init: str = "random", burden: bool = True):
    """Prequential run over the stream. Returns (one row per model and window, final models).

    Static models learn on the first `static_windows` windows and are then frozen; online models
    take `steps` Adam steps on every window; FEAMOE takes the same number of steps, spent on
    growing when the detector flags the window.
    """
    unknown = set(models) - set(STREAM_MODELS)
    if unknown:
        raise ValueError(f"unknown stream models {sorted(unknown)}; known: {STREAM_MODELS}")
    d = stream.X.shape[1]
    nets = {m: make_model(m, d, seed=seed, hidden=hidden, n_experts=n_experts,
                          device=stream.X.device) for m in models}
    detectors = {m: FM.DriftDetector(tol_acc, tol_gap, z) for m in models
                 if m.startswith("feamoe")}
    rows = []
    for t in range(len(stream.windows)):
        Xw, yw, gw = stream.window(t)
        for m, net in nets.items():
            fair = lam if m in ("fair_lr", "feamoe") else 0.0
            reason = ""
            if t > 0:
                stats = batch_stats(net, Xw, yw, gw, favorable=stream.favorable, burden=burden)
                if m in detectors:
                    gap, se = _detector_gap(stats, notion)
                    reason = detectors[m].check(stats["acc"], gap, stats["se_acc"], se)
                rows.append({"dataset": stream.name, "model": m, "seed": seed, "window": t,
                             "post_drift": t >= stream.drift_window, **stats,
                             "n_experts": getattr(net, "n_experts", 1), "drift": reason})
            if m.startswith("static") and t >= static_windows:
                continue
            common = dict(steps=steps, lr=lr, lam=fair, notion=notion, favorable=stream.favorable)
            if reason and net.n_experts + n_new <= max_experts:
                FM.grow(net, Xw, yw, gw, n_new=n_new, offset=offset, freeze_old=freeze_old,
                        init=init, seed=seed * 1000 + t, **common)
                rows[-1]["grew"] = True
            else:
                FM.train(net, Xw, yw, gw, **common)
    table = pd.DataFrame(rows)
    table["grew"] = table.get("grew", pd.Series(False, index=table.index)).eq(True)
    return table, nets


def _detector_gap(stats: dict, notion: str) -> tuple[float, float]:
    """The gap the detector watches and its standard error: the trained notion's gap (the DP
    standard error stands in for the EO and burden gaps, which have no simple binomial one)."""
    return stats[f"{notion}_gap"], stats["se_dp"]


def stream_summary(table: pd.DataFrame, first_after: int = 2) -> pd.DataFrame:
    """Per dataset, model and seed: mean accuracy and gaps before and after the drift, and the
    mean accuracy over the `first_after` windows that follow the drift window."""
    out = []
    for (ds, m, s), g in table.groupby(["dataset", "model", "seed"]):
        drift = int(g.loc[g.post_drift, "window"].min())
        pre, post = g[~g.post_drift], g[g.post_drift]
        early = g[(g.window > drift) & (g.window <= drift + first_after)]
        row = {"dataset": ds, "model": m, "seed": s, "experts": int(g.n_experts.iloc[-1]),
               "growths_pre": int(pre.grew.sum()), "growths_post": int(post.grew.sum()),
               "acc_early": early.acc.mean()}
        for col in ("acc", "dp_gap", "eo_gap", "burden_gap"):
            row[f"{col}_pre"], row[f"{col}_post"] = pre[col].mean(), post[col].mean()
        out.append(row)
    return pd.DataFrame(out)


# -------------------------------------------------------------------------------------------------
# Offline comparison: a train / test split of a table


def run_offline(name: str, X, y, group, *, seed: int, configs, val_size: float, test_size: float,
                max_rows: int, steps: int, lr: float, hidden: int, n_experts: int, favorable: int,
                device=None):
    """Train logistic regression, an MLP and FEAMOE under each (notion, lambda) in `configs` on
    one seeded stratified train / validation / test split of at most `max_rows` rows.

    Returns (one row per model and split with accuracy and the three gaps, the FEAMOE models by
    (notion, lambda), the standardised test and training features).
    """
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    idx = np.arange(len(y))
    if len(y) > max_rows:
        idx, _ = train_test_split(idx, train_size=max_rows, random_state=seed, stratify=y)
    rest, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=y[idx])
    tr, va = train_test_split(rest, test_size=val_size / (1 - test_size), random_state=seed,
                              stratify=y[rest])
    mu, sd = X[tr].mean(0), X[tr].std(0)
    sd = np.where(sd > 0, sd, 1.0)
    parts = {k: (torch.as_tensor((X[r] - mu) / sd, dtype=torch.float32, device=device), y[r],
                 group[r]) for k, r in (("train", tr), ("val", va), ("test", te))}
    runs = [("lr", "none", 0.0), ("mlp", "none", 0.0)] + [("feamoe", n, lam) for n, lam in configs]
    rows, models = [], {}
    for kind, notion, lam in runs:
        net = (FM.FEAMOE(X.shape[1], n_experts, seed=seed, device=device) if kind == "feamoe"
               else Classifier(X.shape[1], (hidden, hidden) if kind == "mlp" else (), seed=seed,
                               device=device))
        if kind == "feamoe":
            FM.train(net, *parts["train"], steps=steps, lr=lr, lam=lam, notion=notion,
                     favorable=favorable)
        else:
            train_early_stopped(net, parts["train"], parts["val"], steps=steps, lr=lr)
        if kind == "feamoe":
            models[(notion, lam)] = net
        for split in ("val", "test"):
            # Validation picks lambda by accuracy alone: no burden line search needed there.
            stats = batch_stats(net, *parts[split], favorable=favorable, burden=split == "test")
            rows.append({"dataset": name, "seed": seed, "model": kind, "notion": notion,
                         "lam": lam, "split": split,
                         **{k: stats[k] for k in ("acc", "dp_gap", "eo_gap", "burden_gap")}})
    return pd.DataFrame(rows), models, parts["test"][0], parts["train"][0]


def train_early_stopped(net: nn.Module, train, val, *, steps: int, lr: float,
                        every: int = 10) -> int:
    """Accuracy-only Adam training of a baseline that keeps the parameters with the best
    validation accuracy (checked every `every` steps), so an overfitting MLP is not handicapped.
    Returns the step that was kept."""
    (Xtr, ytr, _), (Xva, yva, _) = train, val
    ytr = torch.as_tensor(ytr, dtype=torch.float32, device=Xtr.device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    best, best_step, state = -1.0, 0, None
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        nn.functional.binary_cross_entropy_with_logits(net.logit(Xtr), ytr).backward()
        opt.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                acc = float(((net(Xva) >= 0.5).cpu().numpy() == yva).mean())
            if acc > best:
                best, best_step = acc, step
                state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    return best_step


def select_lambda(table: pd.DataFrame, notion: str, margin: float) -> float:
    """FEAMOE's operating point for one dataset, seed and notion, from validation numbers only:
    the largest lambda > 0 whose validation accuracy is within `margin` of the MLP's (the fairest
    model of comparable accuracy), else the smallest lambda > 0."""
    val = table[table.split == "val"]
    mlp_acc = val.loc[val.model == "mlp", "acc"].iloc[0]
    cand = val[(val.model == "feamoe") & (val.notion == notion) & (val.lam > 0)]
    if cand.empty:
        raise ValueError(f"no FEAMOE run with notion {notion!r} and lambda > 0 in the table")
    ok = cand[cand.acc >= mlp_acc - margin]
    return float(ok.lam.max() if len(ok) else cand.lam.min())


def operating_points(offline: pd.DataFrame, notions, margin: float) -> pd.DataFrame:
    """Per dataset, seed and notion: the lambda chosen on validation and the test numbers of
    FEAMOE at that lambda, of the MLP and of logistic regression side by side."""
    rows = []
    for (ds, seed), table in offline.groupby(["dataset", "seed"]):
        test = table[table.split == "test"]
        base = {m: test[test.model == m].iloc[0] for m in ("mlp", "lr")}
        for notion in notions:
            lam = select_lambda(table, notion, margin)
            fm = test[(test.model == "feamoe") & (test.notion == notion) & (test.lam == lam)]
            row = {"dataset": ds, "seed": seed, "notion": notion, "lam": lam}
            for name, r in (("feamoe", fm.iloc[0]), *base.items()):
                row[f"{name}_acc"] = r.acc
                row[f"{name}_gap"] = r[f"{notion}_gap"]
            rows.append(row)
    return pd.DataFrame(rows)


def finite_pairs(ours, baseline) -> tuple[np.ndarray, np.ndarray, str]:
    """The seeds where both values are defined (a gap is undefined when a group has no row of
    the kind it averages over), and a reason naming the seeds left out."""
    ours, baseline = np.asarray(ours, dtype=float), np.asarray(baseline, dtype=float)
    ok = np.isfinite(ours) & np.isfinite(baseline)
    if not ok.any():
        raise ValueError("no seed has both values defined: the gap cannot be compared")
    reason = "" if ok.all() else (f"{int((~ok).sum())} of {len(ok)} seeds left out: a group had "
                                  "no row to average over, so the gap is undefined there")
    return ours[ok], baseline[ok], reason


def mean_ci_frame(table: pd.DataFrame, by, cols) -> pd.DataFrame:
    """'mean [low, high]' strings (two-sided 95% t interval over the rows of each group)."""

    def fmt(v):
        v = v.dropna()
        if v.empty:
            return "n/a"
        s = mean_ci(v.to_numpy())
        return f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"

    return table.groupby(by)[list(cols)].agg(fmt)


# -------------------------------------------------------------------------------------------------
# Explanations: fast (gate-weighted linear) against exact enumeration


def shap_study(model: FM.FEAMOE, X: torch.Tensor, background: torch.Tensor, *, n_explain: int,
               seed: int, repeats: int = 3) -> dict:
    """Per explained row, the Pearson correlation and relative L2 error between the fast values
    and the exact Shapley values of (a) the gated log-odds with the gate varying with the
    features, (b) the predicted probability; the largest gate share of each explained row; and
    the time of one explanation by each route."""
    rng = np.random.default_rng(seed)
    pick = torch.as_tensor(rng.choice(len(X), size=min(n_explain, len(X)), replace=False),
                           device=X.device)
    Xe = X[pick]
    fast = FM.explain_fast(model, Xe, background)
    outputs = {"logodds": model.gated_log_odds, "prob": model}
    out = {}
    for name, f in outputs.items():
        exact = FM.shapley_exact(f, Xe, background)
        out[f"corr_{name}"] = _rowwise_corr(fast, exact)
        out[f"relerr_{name}"] = ((fast - exact).norm(dim=1) /
                                 exact.norm(dim=1).clamp_min(FM.EPS)).cpu().numpy()
        out[f"exact_{name}"] = exact.cpu().numpy()
    out["fast"] = fast.cpu().numpy()
    with torch.no_grad():  # how sharply the gate switches between experts on these rows
        out["gate_max"] = model.gate(Xe).max(1).values.cpu().numpy()
    one = Xe[:1]
    start = time.perf_counter()
    t_exact = best_of(lambda: FM.shapley_exact(model, one, background), repeats=repeats,
                      device=X.device)
    t_fast = best_of(lambda: FM.explain_fast(model, one, background), repeats=repeats * 10,
                     device=X.device)
    out.update(time_exact=t_exact, time_fast=t_fast, speedup=t_exact / t_fast,
               study_s=time.perf_counter() - start)
    return out


def _rowwise_corr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(FM.EPS)).cpu().numpy()
