"""The groupwise-regret experiments: the paper's synthetic data, Adult with intersecting groups,
runs of the reduction and its baselines over several stream orders, and the tables behind the
figures (groupwise losses, regret curves against the best linear model in hindsight, run time
against the number of groups).

Methods, by the names used in every table:
    anh       the paper's algorithm: one online ridge per group, AdaNormalHedge over the awake
              ones; its loss is <p_t, l_t>, that of following an expert drawn from p_t
    anh_mix   the same weights, predicting their weighted average instead (loss <= <p_t, l_t>
              for the convex squared loss)
    hedge     ablation: sleeping experts with fixed-rate weights exp(eta R), eta = sqrt(ln|G|/T)
    ridge     the paper's baseline: one online ridge on every round, blind to the groups
    specific  the learner of the smallest awake group alone
"""

import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from repsuite.fairness.groupwise import (
    anh_regret_bound,
    as_streams,
    best_linear_loss,
    online_ridge_predictions,
    sleeping_experts,
)
from repsuite.fairness.stream import stream_order
from repsuite.stats import mean_ci

AGGREGATES = ("mean", "min", "max", "dperm")
METHODS = ("anh", "anh_mix", "hedge", "ridge", "specific")
ALWAYS_ON = "always_on"

# -------------------------------------------------------------------------------------------------
# Data with groups


@dataclass
class GroupData:
    """Rows with their features, one or more label columns in [0, 1], and group memberships."""

    X: np.ndarray  # (n, d) features
    labels: dict[str, np.ndarray]  # label name -> (n,) values in [0, 1]
    member: np.ndarray  # (n, G) bool: row i belongs to group g
    names: list[str]  # group names, the always-on group last
    features: list[str] = field(default_factory=list)

    @property
    def sizes(self) -> dict[str, int]:
        return dict(zip(self.names, self.member.sum(0).tolist(), strict=True))


def _one_hot(codes: np.ndarray, k: int) -> np.ndarray:
    return codes[:, None] == np.arange(k)[None, :]


def _minmax(v: np.ndarray) -> np.ndarray:
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else np.zeros_like(v)


def synthetic_groups(n: int, dim: int, attributes: dict, *, noise: float = 0.16,
                     aggregates=AGGREGATES, indicator_features: bool = True,
                     seed: int = 0) -> GroupData:
    """The paper's synthetic generator: features uniform on [0, 1]^dim; each attribute assigns
    every row one level with the given probabilities ({attr: {level: prob}}), one group per level;
    every group g has a linear model y_g = x . w_g + N(0, noise^2), w_g uniform on [0, 1]^dim;
    a row's label aggregates the models of its groups (mean, min, max, or `dperm`: the first of
    its groups in a random dominance order), min-max scaled to [0, 1]. The group indicators are
    appended to the features unless `indicator_features` is False."""
    if n < 2 or dim < 1:
        raise ValueError(f"need n >= 2 rows and dim >= 1 features, got n={n}, dim={dim}")
    unknown = set(aggregates) - set(AGGREGATES)
    if unknown or not aggregates:
        raise ValueError(f"aggregates must be among {AGGREGATES}, got {list(aggregates)}")
    if not attributes:
        raise ValueError("at least one attribute with its level probabilities is needed")
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, dim))

    blocks, names = [], []
    for attr, levels in attributes.items():
        probs = np.asarray(list(levels.values()), dtype=float)
        if len(probs) < 1 or (probs < 0).any() or not math.isclose(probs.sum(), 1.0, abs_tol=1e-6):
            raise ValueError(f"attribute {attr!r}: level probabilities must be >= 0 and sum to "
                             f"1, got {levels}")
        codes = rng.choice(len(probs), size=n, p=probs / probs.sum())
        blocks.append(_one_hot(codes, len(probs)))
        names += [f"{attr}={level}" for level in levels]
    member = np.concatenate(blocks, axis=1)

    w = rng.uniform(size=(dim, member.shape[1]))
    y_groups = np.where(member, x @ w + rng.normal(scale=noise, size=member.shape), np.nan)
    dominance = rng.permutation(member.shape[1])
    first = np.argmax(member[:, dominance], axis=1)
    build = {"mean": lambda: np.nanmean(y_groups, axis=1),
             "min": lambda: np.nanmin(y_groups, axis=1),
             "max": lambda: np.nanmax(y_groups, axis=1),
             "dperm": lambda: y_groups[np.arange(n), dominance[first]]}
    labels = {a: _minmax(build[a]()) for a in aggregates}

    features = [f"x{i}" for i in range(dim)]
    X = np.concatenate([x, member.astype(float)], axis=1) if indicator_features else x
    if indicator_features:
        features += [f"is {g}" for g in names]
    member = np.concatenate([member, np.ones((n, 1), dtype=bool)], axis=1)
    return GroupData(X, labels, member, names + [ALWAYS_ON], features)


def adult_groups(table, *, n_rows: int | None = None, seed: int = 0, age_edges=(35, 50),
                 education_split: int = 9) -> GroupData:
    """Adult with the paper's intersecting groups: age (young <= 35 < middle <= 50 < old),
    education (high school or less: education_num <= 9; college or more), sex, race, and the
    always-on group. Features: the table's features with numeric columns min-max scaled to
    [0, 1], plus the group indicators (the paper keeps them). Label: income > 50K (0/1), learnt
    with the squared loss. `n_rows` draws a fixed random subset of rows."""
    for col in ("age", "education_num"):
        if col not in table.features:
            raise ValueError(f"the table has no {col!r} feature, needed for the paper's groups")
    n = len(table.y)
    rows = np.arange(n)
    if n_rows is not None:
        if not 2 <= n_rows <= n:
            raise ValueError(f"n_rows must be in 2..{n}, got {n_rows}")
        rows = np.sort(np.random.default_rng(seed).choice(n, size=n_rows, replace=False))
    X = np.asarray(table.X, dtype=float)[rows]
    age = X[:, table.features.index("age")]
    edu = X[:, table.features.index("education_num")]

    cols = {"young": age <= age_edges[0], "middle": (age > age_edges[0]) & (age <= age_edges[1]),
            "old": age > age_edges[1], "HighSchool&less": edu <= education_split,
            "College&more": edu > education_split}
    for attr in ("sex", "race"):
        codes = table.group(attr)[rows]
        cols.update({lvl: codes == k for k, lvl in enumerate(table.levels[attr])})
    member = np.stack(list(cols.values()), axis=1)

    binary = np.all((X == 0) | (X == 1), axis=0)
    X = np.where(binary, X, np.apply_along_axis(_minmax, 0, X))
    X = np.concatenate([X, member.astype(float)], axis=1)
    member = np.concatenate([member, np.ones((len(rows), 1), dtype=bool)], axis=1)
    names = list(cols) + [ALWAYS_ON]
    features = list(table.features) + [f"is {g}" for g in cols]
    return GroupData(X, {"income": np.asarray(table.y, dtype=float)[rows]}, member, names,
                     features)


# -------------------------------------------------------------------------------------------------
# Runs


@dataclass
class GroupwiseRun:
    """Every method on S streams: each label column under each seed's order of the same T rows.
    Stream tensors are (S, T, ...) in arrival order."""

    names: list[str]
    streams: list[tuple[str, int]]  # (label, seed) of each stream
    orders: np.ndarray  # (S, T): row index arriving in round t
    X: torch.Tensor  # (T, d) rows in data order
    Y: torch.Tensor  # (labels, T) label columns in data order
    label_of: torch.Tensor  # (S,) label column of each stream
    member: torch.Tensor  # (S, T, G) bool
    y_stream: torch.Tensor  # (S, T)
    expert_pred: torch.Tensor  # (S, T, G): A_g's clipped prediction (0 while asleep)
    expert_loss: torch.Tensor  # (S, T, G)
    losses: dict[str, torch.Tensor]  # method -> (S, T) loss in each round
    anh_C: torch.Tensor  # (S, G): AdaNormalHedge's sums of |instantaneous regret|
    seconds: dict[str, float]

    @property
    def sizes(self) -> np.ndarray:
        return self.member[0].sum(0).cpu().numpy()

    def group_positions(self, g: int) -> torch.Tensor:
        """(S, T_g): the rounds of each stream in which group g is active."""
        return self.member[..., g].nonzero()[:, 1].reshape(len(self.streams), -1)

    def group_rows(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (S, T_g, d) and labels (S, T_g) of group g's subsequence in each stream."""
        order = torch.as_tensor(self.orders, device=self.X.device)
        rows = order.gather(1, self.group_positions(g))
        return self.X[rows], self.Y[self.label_of[:, None], rows]


def _check_rows(X, Y, member) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X, Y, member = np.asarray(X, dtype=float), np.asarray(Y, dtype=float), np.asarray(member)
    if X.ndim != 2 or Y.ndim != 2 or Y.shape[1] != len(X) or member.ndim != 2 \
            or len(member) != len(X):
        raise ValueError(f"need X (n, d), labels (n,) and member (n, groups) with the same n; "
                         f"got X {X.shape}, labels {Y.shape[::-1]}, member {member.shape}")
    if member.dtype != bool:
        if not np.isin(member, (0, 1)).all():
            raise ValueError("member must hold booleans or 0/1 values")
        member = member.astype(bool)
    if not (np.isfinite(X).all() and np.isfinite(Y).all()):
        raise ValueError("X or the labels contain NaN or infinite values")
    if Y.min() < 0 or Y.max() > 1:
        raise ValueError(f"labels must lie in [0, 1] for the bounded squared loss; got "
                         f"{Y.min():.3g}..{Y.max():.3g} (scale them first)")
    empty = np.flatnonzero(member.sum(0) == 0)
    if len(empty):
        raise ValueError(f"groups {empty.tolist()} have no rows")
    alone = np.flatnonzero(member.sum(1) == 0)
    if len(alone):
        raise ValueError(f"rows {alone[:5].tolist()} belong to no group: add the always-on group")
    return X, Y, member


def run_groupwise(X, labels, member, seeds, *, names=None, lam: float = 1.0, block: int = 32,
                  eta: float | None = None, rules=("adanormalhedge", "hedge"),
                  device=None, progress: bool = False) -> GroupwiseRun:
    """Run the reduction and its baselines on one shuffled stream of the rows per seed, for every
    label column (`labels`: one array, or {name: array}); all streams run side by side."""
    if not isinstance(labels, dict):
        labels = {"y": labels}
    X, Y, member = _check_rows(X, np.stack([np.asarray(v, dtype=float).reshape(-1)
                                            for v in labels.values()]), member)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("at least one seed (stream order) is needed")
    if isinstance(rules, str) or set(rules) - {"adanormalhedge", "hedge"}:
        raise ValueError(f"rules must be a tuple of adanormalhedge and/or hedge, got {rules!r}")
    rules = [r for r in ("adanormalhedge", "hedge") if r in rules]
    T, G = member.shape
    names = list(names) if names is not None else [f"g{g}" for g in range(G)]
    if len(names) != G:
        raise ValueError(f"{len(names)} names for {G} groups")
    streams = [(lab, s) for lab in labels for s in seeds]
    orders = np.stack([stream_order(T, s) for s in seeds] * len(labels))
    Xt = as_streams(X, Y[0], device)[0][0]
    Yt = torch.as_tensor(Y, dtype=torch.float64, device=Xt.device)
    label_of = torch.arange(len(labels), device=Xt.device).repeat_interleave(len(seeds))
    order_t = torch.as_tensor(orders, device=Xt.device)
    member_s = torch.as_tensor(member, device=Xt.device)[order_t]
    y_stream = Yt[label_of[:, None], order_t]
    S, seconds = len(streams), {}

    # phase 1: each group's learner A_g on its own subsequence, all streams at once
    start = time.perf_counter()
    expert_pred = torch.zeros(member_s.shape, dtype=torch.float64, device=Xt.device)
    for g in range(G):
        rows = order_t[member_s[..., g]].reshape(S, -1)
        raw = online_ridge_predictions(Xt[rows], Yt[label_of[:, None], rows], lam=lam,
                                       block=block)
        expert_pred[..., g][member_s[..., g]] = raw.clamp(0.0, 1.0).reshape(-1)
    expert_loss = (expert_pred - y_stream[..., None]).square() * member_s
    seconds["experts"] = time.perf_counter() - start

    # phase 2: sleeping experts over the awake learners, round by round; the rules run side by
    # side as extra streams, since a round's cost is mostly fixed overhead
    losses, anh_C = {}, torch.zeros(S, G, dtype=torch.float64, device=Xt.device)
    if rules:
        start = time.perf_counter()
        k = len(rules)
        stacked = sleeping_experts(
            expert_loss.repeat(k, 1, 1).transpose(0, 1).contiguous(),
            member_s.repeat(k, 1, 1).transpose(0, 1).contiguous(),
            rule=[r for r in rules for _ in range(S)],
            eta=eta if eta is not None else math.sqrt(math.log(max(G, 2)) / T),
            predictions=expert_pred.repeat(k, 1, 1).transpose(0, 1).contiguous(),
            progress=progress)
        seconds["aggregators"] = time.perf_counter() - start
        for j, r in enumerate(rules):
            part = slice(j * S, (j + 1) * S)
            if r == "adanormalhedge":
                losses["anh"] = stacked.loss[:, part].T
                losses["anh_mix"] = (stacked.mixture[:, part].T - y_stream).square()
                anh_C = stacked.C[part]
            else:
                losses["hedge"] = stacked.loss[:, part].T

    # baselines: one ridge for everybody (the always-on learner when there is one) and the
    # learner of the most specific (smallest) awake group
    everyone = np.flatnonzero(member.all(0))
    if len(everyone):
        losses["ridge"] = expert_loss[..., everyone[0]]
    else:
        raw = online_ridge_predictions(Xt[order_t], y_stream, lam=lam, block=block)
        losses["ridge"] = (raw.clamp(0.0, 1.0) - y_stream).square()
    sizes = member_s[0].sum(0).to(torch.float64)
    smallest = torch.where(member_s, sizes, math.inf).argmin(-1, keepdim=True)
    losses["specific"] = expert_loss.gather(-1, smallest)[..., 0]
    return GroupwiseRun(names, streams, orders, Xt, Yt, label_of, member_s, y_stream,
                        expert_pred, expert_loss, losses, anh_C, seconds)


# -------------------------------------------------------------------------------------------------
# Tables


def group_losses(run: GroupwiseRun) -> pd.DataFrame:
    """Cumulative loss of every method on every group's subsequence, one row per stream (label and
    seed), group and method; `own` is the group's own learner A_g."""
    member = run.member.to(torch.float64)
    per = {m: torch.einsum("st,stg->sg", v, member) for m, v in run.losses.items()}
    per["own"] = run.expert_loss.sum(1)
    sizes = run.sizes
    rows = []
    for m, v in per.items():
        v = v.cpu().numpy()
        for s, (label, seed) in enumerate(run.streams):
            for g, name in enumerate(run.names):
                rows.append({"label": label, "seed": seed, "group": name, "T_g": int(sizes[g]),
                             "method": m, "loss": float(v[s, g]),
                             "mse": float(v[s, g] / sizes[g])})
    return pd.DataFrame(rows)


def _one_label(losses: pd.DataFrame) -> pd.DataFrame:
    if losses.label.nunique() != 1:
        raise ValueError(f"select one label column first; the table has {losses.label.unique()}")
    return losses


def compare(losses: pd.DataFrame, method: str = "anh", baseline: str = "ridge") -> pd.DataFrame:
    """Per group (one label column): mean squared error of both methods over seeds and the
    relative change of the cumulative loss (method / baseline - 1) with its 95% interval."""
    wide = _one_label(losses).pivot_table(index=["group", "seed"], columns="method",
                                          values="loss")
    for m in (method, baseline):
        if m not in wide:
            raise KeyError(f"no method {m!r} in the table; methods: {list(wide.columns)}")
    change = (wide[method] / wide[baseline] - 1.0).rename("change")
    sizes = losses.groupby("group").T_g.first()
    rows = []
    for g, v in change.groupby(level="group", sort=False):
        ci = mean_ci(v.to_numpy())
        rows.append({"group": g, "T_g": int(sizes[g]),
                     f"mse {baseline}": wide[baseline].xs(g).mean() / sizes[g],
                     f"mse {method}": wide[method].xs(g).mean() / sizes[g],
                     "change": ci["mean"], "ci low": ci["ci95"][0], "ci high": ci["ci95"][1]})
    return pd.DataFrame(rows).set_index("group").loc[list(dict.fromkeys(losses.group))]


def worst_group_change(losses: pd.DataFrame, method: str = "anh",
                       baseline: str = "ridge") -> np.ndarray:
    """Per seed (one label column), the largest relative change of the cumulative loss over all
    groups: below 0 means the method beats the baseline on every group of that stream."""
    wide = _one_label(losses).pivot_table(index=["seed", "group"], columns="method",
                                          values="loss")
    change = wide[method] / wide[baseline] - 1.0
    return change.groupby(level="seed").max().to_numpy()


def _log_points(lo: int, hi: int, k: int) -> list[int]:
    lo = max(1, min(lo, hi))
    return sorted(set(np.round(np.geomspace(lo, hi, k)).astype(int).tolist()))


def regret_curves(run: GroupwiseRun, *, n_points: int = 16, n_min: int = 1,
                  methods=("anh", "ridge")) -> pd.DataFrame:
    """Regret on each group's subsequence after its first n rounds, for log-spaced n from n_min to
    T_g: a method's cumulative loss there minus the smallest loss of one linear model fitted in
    hindsight on those n rounds. `own` is the group's own learner A_g."""
    if n_points < 2:
        raise ValueError(f"a curve needs n_points >= 2, got {n_points}")
    rows = []
    for g, name in enumerate(run.names):
        pos = run.group_positions(g)
        T_g = pos.shape[1]
        ends = _log_points(n_min, T_g, n_points)
        best = best_linear_loss(*run.group_rows(g), ends).cpu().numpy()
        idx = torch.as_tensor(ends, device=pos.device) - 1
        curves = {m: run.losses[m].gather(1, pos).cumsum(1)[:, idx] for m in methods}
        curves["own"] = run.expert_loss[..., g].gather(1, pos).cumsum(1)[:, idx]
        for m, cum in curves.items():
            cum = cum.cpu().numpy()
            for s, (label, seed) in enumerate(run.streams):
                for j, n in enumerate(ends):
                    rows.append({"label": label, "seed": seed, "group": name, "T_g": T_g,
                                 "n": n, "method": m, "loss": cum[s, j], "best": best[s, j],
                                 "regret": cum[s, j] - best[s, j]})
    return pd.DataFrame(rows)


def loglog_slopes(curves: pd.DataFrame, *, floor: float = 1e-3) -> pd.DataFrame:
    """Slope of log(regret) against log(n) for every stream, group and method (least squares).
    Regret below `floor` counts as `floor`: growth like n^a with a < 1 is sublinear."""
    if floor <= 0:
        raise ValueError(f"floor must be > 0, got {floor}")
    rows = []
    for (label, seed, group, m), c in curves.groupby(["label", "seed", "group", "method"],
                                                     sort=False):
        if c.n.nunique() < 2:
            raise ValueError(f"group {group!r} has fewer than two points on its regret curve")
        slope = np.polyfit(np.log(c.n), np.log(np.maximum(c.regret, floor)), 1)[0]
        rows.append({"label": label, "seed": seed, "group": group, "method": m, "slope": slope,
                     "nonpositive": int((c.regret <= 0).sum())})
    return pd.DataFrame(rows)


def bound_ratio(run: GroupwiseRun) -> np.ndarray:
    """(S, G): the learner's loss on each group minus that of the group's own learner, divided by
    AdaNormalHedge's bound on that difference (at most 1 by the theorem)."""
    member = run.member.to(torch.float64)
    gap = torch.einsum("st,stg->sg", run.losses["anh"], member) - run.expert_loss.sum(1)
    return (gap / anh_regret_bound(run.anh_C, len(run.names))).cpu().numpy()


def bound_ratio_per_seed(run: GroupwiseRun) -> np.ndarray:
    """Per seed, the largest `bound_ratio` over the run's label columns and groups."""
    seeds = list(dict.fromkeys(seed for _, seed in run.streams))
    ratio = bound_ratio(run).reshape(-1, len(seeds), len(run.names))
    return ratio.max(axis=(0, 2))


def final_rows(losses: pd.DataFrame, curves: pd.DataFrame, methods=("anh", "ridge")) -> list:
    """One record per stream and group: T_g, and each method's mean squared error and final
    regret against the best linear model in hindsight (the metrics file's rows)."""
    last = curves[curves.n == curves.T_g].pivot_table(
        index=["label", "seed", "group"], columns="method", values="regret")
    mse = losses.pivot_table(index=["label", "seed", "group"], columns="method", values="mse")
    sizes = losses.groupby("group").T_g.first()
    rows = []
    for (label, seed, group), r in last.iterrows():
        row = {"label": label, "seed": int(seed), "group": group, "T_g": int(sizes[group])}
        for m in methods:
            row[f"mse_{m}"] = round(float(mse.loc[(label, seed, group), m]), 6)
            row[f"regret_{m}"] = round(float(r[m]), 4)
        rows.append(row)
    return rows


def runtime_study(group_counts, *, n: int, dim: int, seed: int = 0, lam: float = 1.0,
                  block: int = 32, repeats: int = 1, device=None) -> pd.DataFrame:
    """Wall time of the reduction (learners and AdaNormalHedge) for |G| = k marginal groups of k/2
    balanced binary attributes plus the always-on group, on n rounds of dim features."""
    rows = []
    for k in group_counts:
        if k < 2 or k % 2:
            raise ValueError(f"group counts must be even and >= 2 (binary attributes), got {k}")
        attrs = {f"a{i}": {"0": 0.5, "1": 0.5} for i in range(k // 2)}
        data = synthetic_groups(n, dim, attrs, aggregates=("mean",), indicator_features=False,
                                seed=seed)
        times = []
        for _ in range(repeats):
            run = run_groupwise(data.X, data.labels, data.member, [seed], lam=lam,
                                block=block, rules=("adanormalhedge",), device=device)
            times.append(run.seconds)
        best = min(times, key=lambda t: t["experts"] + t["aggregators"])
        rows.append({"groups": k + 1, "experts_s": best["experts"], "anh_s": best["aggregators"],
                     "total_s": best["experts"] + best["aggregators"]})
    return pd.DataFrame(rows)
