"""Aranyani's experiment: fairness streams, the baselines of the official code, the
accuracy-fairness frontier and the cost of the fairness term.

Baselines (as in the official repository): a majority-class mixture (with probability q the
unconstrained forest's prediction, otherwise the majority label so far), a Hoeffding tree (river)
and an MLP whose demographic-parity regulariser is estimated on per-group reservoir buffers, which
costs a forward and backward pass over the buffers at every step. Aranyani's leaf-level variant
lives in `aranyani.train_online(constraint="leaf")`.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from repsuite import data
from repsuite.fairness import aranyani as A
from repsuite.fairness.metrics import demographic_parity_difference
from repsuite.fairness.stream import stream_order
from repsuite.progress import bar

# -------------------------------------------------------------------------------------------------
# Streams


@dataclass
class FairStream:
    """Standardised features, 0/1 labels, 0/1 group codes (1: `levels[1]`) and stream orders."""

    name: str
    X: np.ndarray
    y: np.ndarray
    group: np.ndarray
    levels: list[str]
    features: list[str]


def load_stream(name: str, attr: str, levels: list[str] | None = None, *,
                sensitive_feature: bool = True) -> FairStream:
    """A fairness table as a two-group stream. `levels` picks the two levels of `attr` kept (code 0
    then code 1; other rows dropped; default: the table's first two levels and every row when the
    attribute has two levels). With `sensitive_feature` the group code is also an input, as in
    the official code. Features are z-scored with the table's own means and deviations."""
    table = data.load_table(name)
    codes = table.group(attr)
    names = table.levels[attr]
    levels = list(levels) if levels is not None else names[:2]
    if len(levels) != 2 or any(lv not in names for lv in levels):
        raise ValueError(f"levels must be two of {names} for {name}.{attr}, got {levels}")
    if len(names) > 2 or levels != names[:2]:
        keep = np.isin(codes, [names.index(lv) for lv in levels])
    else:
        keep = np.ones(len(codes), dtype=bool)
    group = (codes[keep] == names.index(levels[1])).astype(np.int64)
    X, features = table.X[keep], list(table.features)
    if sensitive_feature:
        X, features = np.c_[X, group], features + [f"{attr}={levels[1]}"]
    std = X.std(0)
    X = (X - X.mean(0)) / np.where(std > 0, std, 1.0)
    return FairStream(f"{name}.{attr}", X, table.y[keep].astype(np.int64), group, levels,
                      features)


def stream_orders(n_rows: int, seeds, n_steps: int) -> np.ndarray:
    """One shuffled order per seed, cut to `n_steps` rows: (len(seeds), n_steps)."""
    if n_steps < 2 or n_steps > n_rows:
        raise ValueError(f"n_steps must be in 2..{n_rows} (rows available), got {n_steps}")
    return np.stack([stream_order(n_rows, int(s))[:n_steps] for s in seeds])


# -------------------------------------------------------------------------------------------------
# Baseline: an MLP with a reservoir-estimated demographic-parity regulariser


class ReservoirMLP:
    """R one-hidden-layer MLPs (sigmoid units, softmax output) in one flat (R, P) tensor laid out
    as [W1 (d, H), b1 (H), W2 (H, C), b2 (C)], with a hand-written backward pass."""

    def __init__(self, n_runs: int, n_features: int, hidden: int, n_classes: int = 2,
                 device=None, dtype=torch.float32):
        self.R, self.d, self.H, self.C = n_runs, n_features, hidden, n_classes
        self.shapes = {"W1": (n_features, hidden), "b1": (hidden,), "W2": (hidden, n_classes),
                       "b2": (n_classes,)}
        self.n_params = sum(int(np.prod(s)) for s in self.shapes.values())
        self.params = torch.zeros(n_runs, self.n_params, device=device, dtype=dtype)

    def init_(self, seeds) -> "ReservoirMLP":
        """Hidden layer like the forest's nodes (N(0, 1/d) weights, N(0, 1) biases); output
        layer Glorot-uniform with zero biases."""
        for r, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(int(seed))
            W1 = torch.randn(self.d, self.H, generator=g) / np.sqrt(self.d)
            b1 = torch.randn(self.H, generator=g)
            limit = np.sqrt(6 / (self.H + self.C))
            W2 = (torch.rand(self.H, self.C, generator=g) * 2 - 1) * limit
            self.params[r] = torch.cat([W1.reshape(-1), b1, W2.reshape(-1),
                                        torch.zeros(self.C)]).to(self.params)
        return self

    def unpack(self) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for name, shape in self.shapes.items():
            size = int(np.prod(shape))
            out[name] = self.params[:, start:start + size].reshape(self.R, *shape)
            start += size
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden units and class probabilities for x (R, m, d): (R, m, H), (R, m, C)."""
        w = self.unpack()
        h = torch.sigmoid(torch.baddbmm(w["b1"][:, None], x, w["W1"]))
        return h, A.softmax_last(torch.baddbmm(w["b2"][:, None], h, w["W2"]))

    def backward(self, x, h, p, upstream: torch.Tensor) -> torch.Tensor:
        """Gradient of sum_m upstream[:, m] . p[:, m] with respect to the parameters: (R, P)."""
        w = self.unpack()
        d_o = p * (upstream - (p * upstream).sum(-1, keepdim=True))
        d_pre = torch.bmm(d_o, w["W2"].transpose(1, 2)) * h * (1 - h)
        return torch.cat([torch.bmm(x.transpose(1, 2), d_pre).reshape(self.R, -1),
                          d_pre.sum(1), torch.bmm(h.transpose(1, 2), d_o).reshape(self.R, -1),
                          d_o.sum(1)], -1)


def train_reservoir_mlp(X, y, group, orders, lambdas, seeds, *, hidden: int = 15,
                        reservoir_size: int = 100, lr: float = 2e-3, device=None,
                        progress: bool = False) -> A.OnlineResult:
    """Online MLP with cross-entropy plus lambda |mean_1 p_1 - mean_0 p_1|, the group means taken
    over a reservoir sample of each group's past inputs (`reservoir_size` per group, uniform over
    the stream so far, the current input included); like the official reservoir baseline, the
    penalty starts once each buffer holds two inputs. Each step runs the network forward and
    backward over the current input and both buffers."""
    X, y, group, orders = A.check_stream(X, y, group, orders)
    R, n_steps = orders.shape
    lambdas = np.asarray(lambdas, dtype=np.float64)
    if lambdas.shape != (R,) or (lambdas < 0).any() or not np.isfinite(lambdas).all():
        raise ValueError(f"need one finite lambda >= 0 per run ({R}), got {lambdas.tolist()}")
    if reservoir_size < 2:
        raise ValueError(f"reservoir_size must be >= 2, got {reservoir_size}")
    dev, B = torch.device(device or "cpu"), reservoir_size
    net = ReservoirMLP(R, X.shape[1], hidden, device=dev).init_(seeds)
    opt = A.FlatAdam(net.params, lr=lr)
    Xt = torch.as_tensor(X, device=dev, dtype=torch.float32)
    yt, at = torch.as_tensor(y, device=dev), torch.as_tensor(group, device=dev)
    order_t = torch.as_tensor(orders, device=dev)
    lam = torch.as_tensor(lambdas, device=dev, dtype=torch.float32)
    # Reservoir draws come from each run's own seed, so a run does not depend on its batch.
    draws = torch.as_tensor(np.stack([np.random.default_rng([int(s), 1]).random(n_steps)
                                      for s in seeds]), device=dev)
    use_fairness = bool((lambdas > 0).any())
    m = 1 + 2 * B if use_fairness else 1
    # Row 0 of `inputs` is the current input; rows 1.. are group 0's buffer, then group 1's.
    inputs = torch.zeros(R, m, X.shape[1], device=dev)
    seen = torch.zeros(R, 2, device=dev, dtype=torch.long)
    slots = torch.arange(B, device=dev)
    side = torch.tensor([-1.0, 1.0], device=dev)  # d(mean_1 - mean_0) / d mean_a
    upstream = torch.zeros(R, m, 2, device=dev)
    rows = torch.arange(R, device=dev)
    proba = torch.zeros(R, n_steps, device=dev)
    pred = torch.zeros(R, n_steps, device=dev, dtype=torch.long)

    for t in bar(range(n_steps), enabled=progress, desc="reservoir MLP", mininterval=1.0):
        idx = order_t[:, t]
        x, label, a = Xt[idx], yt[idx], at[idx]
        inputs[:, 0] = x
        if use_fairness:
            seen[rows, a] += 1
            c = seen[rows, a]
            slot = torch.where(c <= B, c - 1, (draws[:, t] * c).long())
            keep = slot < B
            inputs[rows[keep], 1 + a[keep] * B + slot[keep]] = x[keep]
        h, p = net.forward(inputs)
        proba[:, t], pred[:, t] = p[:, 0, 1], p[:, 0].argmax(-1)

        # Cross-entropy on the current input: dL/dp_y = -1 / p_y.
        upstream.zero_()
        upstream[rows, 0, label] = -1.0 / p[rows, 0, label]
        if use_fairness:
            fill = seen.clamp(max=B)
            valid = (slots < fill[..., None]).float()  # (R, 2, B)
            means = (p[:, 1:, 1].reshape(R, 2, B) * valid).sum(-1) / fill.clamp(min=1)
            gap = means[:, 1] - means[:, 0]
            weight = lam * (fill >= 2).all(1).float() * torch.sign(gap)  # d|gap| = sign(gap)
            per_row = weight[:, None, None] * side[:, None] * valid / fill.clamp(min=1)[..., None]
            upstream[:, 1:, 1] = per_row.reshape(R, 2 * B)
        opt.step(net.backward(inputs, h, p, upstream))

    return A.OnlineResult(proba.cpu().numpy(), pred.cpu().numpy(), net, 2 * B * X.shape[1])


# -------------------------------------------------------------------------------------------------
# Baselines without training of their own


def hoeffding_tree(X, y, orders, *, progress: bool = False) -> np.ndarray:
    """Predict-then-learn with river's Hoeffding tree (default settings), one tree per order;
    before its first split the tree predicts class 0. Returns hard predictions (R, n_steps)."""
    from river import tree

    X, y, _, orders = A.check_stream(X, y, np.zeros(len(y), dtype=int), orders)
    names = [f"x{k}" for k in range(X.shape[1])]
    out = np.zeros(orders.shape, dtype=np.int64)
    for r, order in enumerate(bar(orders, enabled=progress, desc="Hoeffding tree")):
        model = tree.HoeffdingTreeClassifier()
        for t, row in enumerate(order):
            features = dict(zip(names, X[row].tolist(), strict=True))
            guess = model.predict_one(features)
            out[r, t] = 0 if guess is None else int(guess)
            model.learn_one(features, int(y[row]))
    return out


def running_majority(labels: np.ndarray) -> np.ndarray:
    """The majority label among those seen before each step (0 before any, ties to 0), per row
    of an (R, n_steps) array of labels in stream order."""
    labels = np.asarray(labels)
    ones = np.cumsum(labels, 1) - labels
    seen = np.arange(labels.shape[1])
    return (ones > seen - ones).astype(np.int64)


def majority_mixture(model_pred: np.ndarray, labels: np.ndarray, q: float, seeds) -> np.ndarray:
    """With probability q the model's prediction, otherwise the running majority label (each run
    draws its coins from its own seed)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    coins = np.stack([np.random.default_rng([int(s), 2]).random(model_pred.shape[1])
                      for s in seeds])
    return np.where(coins < q, model_pred, running_majority(labels))


# -------------------------------------------------------------------------------------------------
# Scores of a run, the frontier, the cost of the fairness term


def online_scores(pred, labels, groups) -> tuple[np.ndarray, np.ndarray]:
    """Online accuracy and demographic-parity gap of the hard predictions of each run (rows)."""
    pred, labels, groups = (np.atleast_2d(v) for v in (pred, labels, groups))
    acc = (pred == labels).mean(1)
    dp = np.array([demographic_parity_difference(p, g) for p, g in zip(pred, groups,
                                                                      strict=True)])
    return acc, dp


def frontier_area(dp, acc, dp_max: float, floor: float = 0.0) -> float:
    """Normalised area under the best-accuracy-at-gap-at-most-delta curve, delta in [0, dp_max]:
    (1 / dp_max) * integral of max{acc_j : dp_j <= delta} (`floor` where no point qualifies)."""
    dp, acc = np.asarray(dp, dtype=float), np.asarray(acc, dtype=float)
    if dp.shape != acc.shape or dp.ndim != 1 or len(dp) == 0:
        raise ValueError(f"dp and acc must be equal-length 1-D arrays, got {dp.shape}, {acc.shape}")
    if np.isnan(dp).any() or np.isnan(acc).any():
        raise ValueError("dp or acc contains NaN")
    if dp_max <= 0:
        raise ValueError(f"dp_max must be > 0, got {dp_max}")
    cuts = np.unique(np.clip(np.r_[0.0, dp, dp_max], 0, dp_max))
    area = 0.0
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        best = acc[dp <= lo]
        area += (hi - lo) * (best.max() if len(best) else floor)
    return float(area / dp_max)


# -------------------------------------------------------------------------------------------------
# One stream, every method


SENSITIVE = {  # the attribute of each table, and its two levels (code 0, code 1)
    "adult": ("sex", ["Male", "Female"]),
    "compas": ("race", ["Caucasian", "African-American"]),
}


@dataclass
class StreamRun:
    stream: FairStream
    orders: np.ndarray  # (n_seeds, n_steps) rows in arrival order
    points: pd.DataFrame  # one row per (method, knob, seed): online accuracy and DP gap
    forests: dict  # "aranyani" / "leaf": OnlineResult of the lambda grid (runs seed-major)
    preds: dict  # (method, knob) -> (n_seeds, n_steps) hard predictions


def run_stream(name: str, seeds, lambdas, *, n_steps: int, n_trees: int, depth: int, lr: float,
               huber_delta: float, hidden: int, reservoir_size: int, mixture_q,
               sensitive_feature: bool = True, device=None, progress: bool = False) -> StreamRun:
    """Every method on the same stream orders (one per seed): Aranyani (node constraint) and its
    leaf-level variant and the reservoir MLP over the lambda grid, the Hoeffding tree, and the
    majority mixture built on Aranyani's lambda = 0 predictions."""
    if name not in SENSITIVE:
        raise ValueError(f"no sensitive attribute set up for {name!r}; known: {sorted(SENSITIVE)}")
    attr, levels = SENSITIVE[name]
    stream = load_stream(name, attr, levels, sensitive_feature=sensitive_feature)
    seeds, lambdas = [int(s) for s in seeds], [float(v) for v in lambdas]
    if 0.0 not in lambdas:
        raise ValueError("the lambda grid needs 0 (the unconstrained model of the mixture)")
    orders = stream_orders(len(stream.X), seeds, n_steps)
    labels, groups = stream.y[orders], stream.group[orders]
    grid = np.repeat(orders, len(lambdas), 0)  # runs seed-major: seed k holds rows k*G..k*G+G-1
    lam = np.tile(lambdas, len(seeds))
    run_seeds = np.repeat(seeds, len(lambdas))
    common = dict(n_trees=n_trees, depth=depth, lr=lr, huber_delta=huber_delta, device=device,
                  progress=progress)
    forests = {
        "aranyani": A.train_online(stream.X, stream.y, stream.group, grid, lam, run_seeds,
                                   constraint="node", desc=f"Aranyani {name}", **common),
        "leaf": A.train_online(stream.X, stream.y, stream.group, grid, lam, run_seeds,
                               constraint="leaf", desc=f"leaf-level {name}", **common),
    }
    mlp = train_reservoir_mlp(stream.X, stream.y, stream.group, grid, lam, run_seeds,
                              hidden=hidden, reservoir_size=reservoir_size, lr=lr, device=device,
                              progress=progress)
    G = len(lambdas)
    preds = {}
    for method, result in [*forests.items(), ("reservoir_mlp", mlp)]:
        for k, v in enumerate(lambdas):
            preds[(method, v)] = result.pred[k::G]
    preds[("hoeffding_tree", 0.0)] = hoeffding_tree(stream.X, stream.y, orders,
                                                    progress=progress)
    base = preds[("aranyani", 0.0)]
    for q in mixture_q:
        preds[("majority", float(q))] = majority_mixture(base, labels, float(q), seeds)
    rows = []
    for (method, knob), pred in preds.items():
        acc, dp = online_scores(pred, labels, groups)
        rows += [{"dataset": name, "method": method, "knob": knob, "seed": s, "online_acc": a,
                  "dp": d} for s, a, d in zip(seeds, acc, dp, strict=True)]
    return StreamRun(stream, orders, pd.DataFrame(rows), forests, preds)


def constant_points(run: StreamRun) -> pd.DataFrame:
    """The running-majority predictor (a constant once the majority settles): its online accuracy
    and gap per seed."""
    labels, groups = run.stream.y[run.orders], run.stream.group[run.orders]
    acc, dp = online_scores(running_majority(labels), labels, groups)
    seeds = sorted(run.points.seed.unique())
    return pd.DataFrame({"seed": seeds, "online_acc": acc, "dp": dp})


def frontier_areas(points: pd.DataFrame, constant: pd.DataFrame, dp_max: float) -> pd.DataFrame:
    """Per (method, seed): the frontier area with the constant predictor counted as one of the
    method's points (`with_constant`) and from the method's own points only (`own_points`)."""
    const = constant.set_index("seed")
    rows = []
    for (method, seed), g in points.groupby(["method", "seed"]):
        c = const.loc[seed]
        rows.append({
            "method": method, "seed": seed,
            "with_constant": frontier_area(np.r_[g.dp, c.dp], np.r_[g.online_acc, c.online_acc],
                                           dp_max),
            "own_points": frontier_area(g.dp.to_numpy(), g.online_acc.to_numpy(), dp_max)})
    return pd.DataFrame(rows)


def lambda_spearman(points: pd.DataFrame, method: str = "aranyani") -> pd.Series:
    """Spearman correlation between lambda and the final DP gap over the grid, per seed; 0 (no
    control shown) when the gap is the same at every lambda."""
    from scipy.stats import spearmanr

    def rho(s):
        return 0.0 if s.dp.nunique() < 2 else float(spearmanr(s.knob, s.dp).statistic)

    g = points[points.method == method]
    return g.groupby("seed").apply(rho, include_groups=False)


def bound_check(run: StreamRun, lambdas, seeds) -> pd.DataFrame:
    """For every Aranyani run: the final forest's soft output gap over the rows of its stream and
    the bound implied by its node-level gaps (see `aranyani.dp_bound`)."""
    forest = run.forests["aranyani"].model
    rows = []
    G = len(lambdas)
    for k, seed in enumerate(seeds):
        seen = run.orders[k]
        b = A.dp_bound(forest, run.stream.X[seen], run.stream.group[seen])
        for j, lam in enumerate(lambdas):
            r = k * G + j
            rows.append({"seed": int(seed), "lambda": float(lam), "gap": b["gap"][r],
                         "bound": b["bound"][r], "node_gap_sum": b["node_gap_sum"][r]})
    out = pd.DataFrame(rows)
    out["slack"] = out.bound - out.gap
    return out


# -------------------------------------------------------------------------------------------------
# What the fairness term costs per step


class WorkCounter(TorchDispatchMode):
    """Counts the scalar work of the tensor operations run inside it: multiply-adds of matrix
    products, and elements written by every other operation (views are free). A count, not a
    timing: the same code on the same shapes gives the same number on any machine."""

    FREE = ("_unsafe_view", "alias", "detach", "lift_fresh", "_local_scalar_dense")

    def __init__(self):
        super().__init__()
        self.work = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mm", "bmm"):
            self.work += args[0].numel() * args[1].shape[-1]
        elif name in ("addmm", "baddbmm"):
            self.work += args[1].numel() * args[2].shape[-1]
        elif not func.is_view and name not in self.FREE:
            outs = out if isinstance(out, tuple | list) else (out,)
            self.work += sum(t.numel() for t in outs if isinstance(t, torch.Tensor))
        return out


def fairness_work(stream: FairStream, seeds, *, n_steps: int, lam: float, n_trees: int,
                  depth: int, hidden: int, reservoir_size: int) -> pd.DataFrame:
    """Scalar work per online step of one run with and without its fairness term (lambda = lam
    and 0), per seed and method, over the first `n_steps` steps of the seed's stream; the
    difference is what the fairness term costs. `state_floats` is the memory the fairness
    gradient keeps per run."""
    rows = []
    for seed in seeds:
        order = stream_orders(len(stream.X), [seed], n_steps)
        for method in ("aranyani", "leaf", "reservoir_mlp"):
            kw = dict(method=method, stream=stream, order=order, seed=int(seed), n_trees=n_trees,
                      depth=depth, hidden=hidden, reservoir_size=reservoir_size)
            work = {}
            for v in (0.0, lam):
                with WorkCounter() as counter:
                    result = _single_run(lam=v, **kw)
                work[v] = counter.work / n_steps
            rows.append({"method": method, "seed": int(seed), "n_steps": n_steps,
                         "work_plain": work[0.0], "work_fair": work[lam],
                         "work_extra": work[lam] - work[0.0],
                         "state_floats": result.state_floats})
    return pd.DataFrame(rows)


def _single_run(method, stream, order, seed, lam, n_trees, depth, hidden, reservoir_size):
    args = (stream.X, stream.y, stream.group, order, [lam], [seed])
    if method == "reservoir_mlp":
        return train_reservoir_mlp(*args, hidden=hidden, reservoir_size=reservoir_size)
    constraint = "node" if method == "aranyani" else "leaf"
    return A.train_online(*args, constraint=constraint, n_trees=n_trees, depth=depth)


def per_seed(frame: pd.DataFrame, column: str, seeds) -> np.ndarray:
    """`column` of `frame` (one row per seed) in the order of `seeds`, for paired comparisons."""
    values = frame.set_index("seed")[column]
    missing = sorted(set(int(s) for s in seeds) - set(values.index))
    if missing:
        raise ValueError(f"no {column!r} for seeds {missing}")
    return values.loc[list(seeds)].to_numpy(dtype=float)


def summary(points: pd.DataFrame, by=("dataset", "method", "knob")) -> pd.DataFrame:
    """Mean and 95% t half-width over seeds of online accuracy and DP gap."""
    from scipy.stats import t as student

    g = points.groupby(list(by))[["online_acc", "dp"]]
    mean, sd, n = g.mean(), g.std(ddof=1), g.count()
    half = sd * student.ppf(0.975, np.maximum(n - 1, 1)) / np.sqrt(n)
    out = pd.concat({"mean": mean, "ci95": half.fillna(0.0)}, axis=1).swaplevel(0, 1, axis=1)
    return out[[(c, k) for c in ("online_acc", "dp") for k in ("mean", "ci95")]]
