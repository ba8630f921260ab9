"""Quantile aggregation: a library of conditional-quantile models, cross-fitted, and the learned
weighted ensembles of Fakoor, Kim, Mueller, Smola and Tibshirani, "Flexible Model Aggregation for
Quantile Regression", JMLR 24 (2023) (arXiv 2103.00083).

Shapes used throughout: S independent random splits of a dataset are handled at once (every
trainable piece is a batch of S independent models, each seeing only its own split), n rows,
d features, M base models, K quantile levels. A library's predictions are Z of shape
(S, n, M, K) and an aggregate is (S, n, K).

Base models (`BASE_MODELS`), all predicting every level:
    linear  linear quantile regression, one linear map to all K levels, fitted by full-batch
            Adam on the pinball loss (the LP solution up to optimisation error)
    mlp     a joint quantile network (ELU MLP with K outputs) trained on the summed pinball loss
    knn     empirical quantiles of the responses of the k nearest training rows
    qrf     Meinshausen's quantile regression forest: weighted quantiles of the training
            responses, each weighted by how often it shares a leaf with the query
    gbm     gradient boosting with the quantile loss, one model per level (scikit-learn's
            HistGradientBoostingRegressor; slow: K fits per base fit)

Aggregators: the aggregate at level tau_k is a convex combination of the library's predictions,
softmax-normalised weights, with three granularities and two kinds of weights:
    coarse  one weight per model, shared by all levels:  sum_j w_j q_j(x; tau_k)
    medium  one weight per model and level:              sum_j w_jk q_j(x; tau_k)
    fine    every output level mixes every model at every level: sum_{j,l} w_jlk q_j(x; tau_l)
    global  the weights are free parameters
    local   the weights are the output of an MLP of x (deep quantile aggregation, DQA)
A coarse model is a medium one with level-constant weights, and a medium one is a fine one whose
weights vanish off the diagonal l = k (tested).

Training, as in the official code where our scale allows: Adam (AMSGrad) on the mean pinball loss
of mini-batches, the validation loss every `eval_every` steps on held-out rows, stop after
`patience` steps without improvement, keep the best parameters. The aggregators learn on the
library's out-of-fold predictions (cross-fitting), never on in-sample ones.
"""

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from repsuite.regression.quantile import as_levels, monotonise, pinball

BASE_MODELS = ("linear", "mlp", "knn", "qrf", "gbm")
GRANULARITIES = ("coarse", "medium", "fine")

# -------------------------------------------------------------------------------------------------
# A batch of independent MLPs


class BatchedMLP(nn.Module):
    """F independent MLPs evaluated together: input (F, B, n_in) -> (F, B, n_out).

    Layers as in the official aggregator network: Linear, ELU, then (Dropout, Linear, ELU) for
    every further hidden layer, then a linear output. `hidden=[]` is a batch of linear maps.
    Initialised like `nn.Linear` from `generator`.
    """

    def __init__(self, n_fits: int, n_in: int, hidden, n_out: int, *, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if n_fits < 1 or n_in < 1 or n_out < 1:
            raise ValueError(f"need n_fits, n_in, n_out >= 1, got {n_fits}, {n_in}, {n_out}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        sizes = [n_in, *[int(h) for h in hidden], n_out]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            bound = 1 / math.sqrt(a)
            w = (torch.rand(n_fits, a, b, generator=generator) * 2 - 1) * bound
            c = (torch.rand(n_fits, 1, b, generator=generator) * 2 - 1) * bound
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(c))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if 0 < i < last:
                x = self.dropout(x)
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = nn.functional.elu(x)
        return x


# -------------------------------------------------------------------------------------------------
# Training loop shared by the base networks and the aggregators


class RowSampler:
    """Mini-batches drawn, independently for every fit, from that fit's allowed rows.

    `allowed` is (F, n) bool. With `batch_size=None` (or not smaller than a fit's row count)
    every step is full-batch: all n rows with weight 1 where allowed, 0 elsewhere. Otherwise
    each fit draws `batch_size` of its rows uniformly with replacement, from `generator`.
    """

    def __init__(self, allowed: torch.Tensor, batch_size: int | None,
                 generator: torch.Generator):
        self.allowed = allowed
        counts = allowed.sum(1)
        if (counts == 0).any():
            raise ValueError(f"fits {torch.nonzero(counts == 0).flatten().tolist()} have no rows")
        self.full = batch_size is None or batch_size >= int(counts.min())
        self.batch_size, self.generator = batch_size, generator
        # Each fit's allowed row indices first (a stable sort keeps their order).
        self.rows = torch.sort((~allowed).to(torch.int8), dim=1, stable=True).indices
        self.counts = counts

    def __call__(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(row indices (F, B), or None for all rows; row weights (F, B) or (F, n))."""
        if self.full:
            return None, self.allowed.float()
        u = torch.rand(len(self.allowed), self.batch_size, generator=self.generator)
        u = u.to(self.allowed.device)
        pick = (u * self.counts[:, None]).long().clamp(max=self.allowed.shape[1] - 1)
        idx = torch.gather(self.rows, 1, pick)
        return idx, torch.ones(idx.shape, device=idx.device)


def gather_rows(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """t[f, idx[f, b], ...] for every fit f: (F, n, ...) and (F, B) -> (F, B, ...); all of t
    when idx is None (a full batch)."""
    if idx is None:
        return t
    view = idx.reshape(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:])
    return torch.gather(t, 1, view)


def fit_batched(model: nn.Module, loss_fn: Callable, sampler: RowSampler, *, steps: int,
                lr: float, weight_decay: float = 0.0, eval_fn: Callable | None = None,
                eval_every: int = 10, patience: int | None = None) -> dict:
    """Adam (AMSGrad) on the sum over fits of `loss_fn(idx, weight)` (one loss per fit, shape
    (F,)); every parameter's first axis indexes the fit, so the fits train independently.

    With `eval_fn` (returns one validation loss per fit), each fit keeps its parameters of the
    best validation loss, and training stops once no fit has improved for `patience` steps.
    Returns the per-fit best validation losses and best steps (or the final training loss).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, amsgrad=True)
    params = list(model.parameters())
    best = best_step = keep = None
    step = 0
    for step in range(1, steps + 1):
        model.train()
        idx, weight = sampler()
        loss = loss_fn(idx, weight)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()

        if eval_fn is None or (step % eval_every and step != steps):
            continue
        model.eval()
        with torch.no_grad():
            val = eval_fn()
        if best is None:
            best, best_step = val.clone(), torch.full_like(val, step, dtype=torch.long)
            keep = [p.detach().clone() for p in params]
            continue
        better = val < best
        best = torch.where(better, val, best)
        best_step = torch.where(better, torch.full_like(best_step, step), best_step)
        for p, k in zip(params, keep, strict=True):
            k[better] = p.detach()[better]
        if patience is not None and step - int(best_step.max()) >= patience:
            break

    model.eval()
    if eval_fn is None:
        return {"steps": step, "train_loss": loss.detach()}
    with torch.no_grad():
        for p, k in zip(params, keep, strict=True):
            p.copy_(k)
    return {"steps": step, "val_loss": best, "best_step": best_step}


# -------------------------------------------------------------------------------------------------
# Base models


def _initial_output(model: BatchedMLP, X: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor,
                    taus: torch.Tensor) -> None:
    """Start every fit at a sensible point: the marginal quantiles of its own training responses
    for a network; for a linear map, least squares plus each level's quantile of the residuals
    (a location-shift model, which the pinball loss then refines level by level)."""
    with torch.no_grad():
        for f in range(len(y)):
            rows = allowed[f]
            target = y[f][rows]
            if len(model.weights) == 1:
                design = torch.cat([X[f][rows], torch.ones_like(target)[:, None]], 1)
                coef = torch.linalg.lstsq(design.double(), target.double()[:, None]).solution
                coef = coef.to(y.dtype)
                model.weights[0][f] = coef[:-1].expand(-1, len(taus))
                target = target - (design @ coef)[:, 0] + coef[-1]
            model.biases[-1][f, 0] = torch.quantile(target, taus.to(y.dtype))


def torch_quantile_fits(X: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor, taus, *,
                        hidden=(), steps: int = 500, lr: float = 0.01, batch_size=None,
                        weight_decay: float = 0.0, dropout: float = 0.0,
                        seed: int = 0) -> BatchedMLP:
    """F quantile networks (or linear maps with `hidden=()`) fitted at once on the mean pinball
    loss over all levels: X (F, n, d), y (F, n), `allowed` (F, n) marks each fit's rows."""
    if X.dim() != 3 or y.shape != X.shape[:2] or allowed.shape != y.shape:
        raise ValueError(f"need X (F, n, d), y and allowed (F, n); got {tuple(X.shape)}, "
                         f"{tuple(y.shape)}, {tuple(allowed.shape)}")
    taus = as_levels(taus, device=X.device, dtype=X.dtype)
    gen = torch.Generator().manual_seed(seed)
    model = BatchedMLP(len(X), X.shape[2], hidden, len(taus), dropout=dropout,
                       generator=gen).to(X.device)
    _initial_output(model, X, y, allowed, taus)
    sampler = RowSampler(allowed, batch_size, gen)

    def loss_fn(idx, weight):
        pred = model(gather_rows(X, idx))
        loss = pinball(pred, gather_rows(y, idx), taus).mean(2)
        return (loss * weight).sum(1) / weight.sum(1)

    fit_batched(model, loss_fn, sampler, steps=steps, lr=lr, weight_decay=weight_decay)
    return model


def knn_quantiles(X_train, y_train, X_eval, taus, *, k: int = 30, n_jobs: int = 1) -> np.ndarray:
    """Empirical quantiles (numpy's default interpolation) of the k nearest rows' responses."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(X_train))
    _, nbr = NearestNeighbors(n_neighbors=k, n_jobs=n_jobs).fit(X_train).kneighbors(X_eval)
    # numpy's default (linear) interpolation between the sorted neighbours' responses.
    ys = np.sort(np.asarray(y_train)[nbr], axis=1)
    pos = np.asarray(taus) * (k - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, k - 1)
    return ys[:, lo] + (pos - lo) * (ys[:, hi] - ys[:, lo])


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, taus) -> np.ndarray:
    """For each row of `weights` (m, n) (non-negative, summing to 1), the smallest value whose
    cumulative weight reaches tau: (m, K). This is the quantile of Meinshausen's forest."""
    order = np.argsort(values, kind="stable")
    cum = torch.as_tensor(np.cumsum(weights[:, order], axis=1))
    taus = torch.as_tensor(np.asarray(taus, dtype=np.float64) - 1e-12, dtype=cum.dtype)
    pos = torch.searchsorted(cum.contiguous(), taus.expand(len(cum), -1).contiguous()).numpy()
    # Rounding can leave the last cumulative weight just under 1: never index past the end.
    return values[order][np.minimum(pos, len(values) - 1)]


def qrf_quantiles(X_train, y_train, X_eval, taus, *, n_estimators: int = 50,
                  min_samples_leaf: int = 5, max_features: float = 0.5, n_jobs: int = 1,
                  chunk: int = 1024, seed: int = 0) -> np.ndarray:
    """Quantile regression forest (Meinshausen 2006) on scikit-learn's random forest: a query's
    weight on training row i is the mean over trees of 1/|leaf| when they share a leaf. The
    dense (queries x training rows) weights are formed `chunk` queries at a time."""
    from scipy import sparse
    from sklearn.ensemble import RandomForestRegressor

    forest = RandomForestRegressor(n_estimators=n_estimators, min_samples_leaf=min_samples_leaf,
                                   max_features=max_features, random_state=seed, n_jobs=n_jobs)
    forest.fit(X_train, y_train)
    leaf_train, leaf_eval = forest.apply(X_train), forest.apply(X_eval)
    n, m, T = len(X_train), len(X_eval), n_estimators
    # Leaf ids made unique across trees, then one sparse matrix per side.
    offsets = np.concatenate([[0], np.cumsum(leaf_train.max(0) + 1)[:-1]])
    lt, le = leaf_train + offsets, leaf_eval + offsets
    n_leaves = int(max(lt.max(), le.max())) + 1
    size = np.bincount(lt.ravel(), minlength=n_leaves)
    A = sparse.csr_matrix((1 / (T * size[lt.ravel()]), (lt.ravel(), np.repeat(np.arange(n), T))),
                          shape=(n_leaves, n))
    B = sparse.csr_matrix((np.ones(m * T), (np.repeat(np.arange(m), T), le.ravel())),
                          shape=(m, n_leaves))
    y_train = np.asarray(y_train, dtype=np.float64)
    return np.concatenate([weighted_quantiles(y_train, (B[i:i + chunk] @ A).toarray(), taus)
                           for i in range(0, m, chunk)])


def gbm_quantiles(X_train, y_train, X_eval, taus, *, max_iter: int = 100,
                  learning_rate: float = 0.1, max_leaf_nodes: int = 31,
                  seed: int = 0) -> np.ndarray:
    """One gradient-boosting model with the quantile loss per level (no early stopping)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    out = []
    for tau in np.asarray(taus):
        model = HistGradientBoostingRegressor(loss="quantile", quantile=float(tau),
                                              max_iter=max_iter, learning_rate=learning_rate,
                                              max_leaf_nodes=max_leaf_nodes,
                                              early_stopping=False, random_state=seed)
        out.append(model.fit(X_train, y_train).predict(X_eval))
    return np.stack(out, 1)


SKLEARN_MODELS = {"knn": knn_quantiles, "qrf": qrf_quantiles, "gbm": gbm_quantiles}


def cross_fit_library(splits, taus, models, *, n_folds: int = 2, settings: dict | None = None,
                      device="cpu", seed: int = 0, progress: Callable | None = None) -> dict:
    """Out-of-fold and refitted predictions of every base model on every split.

    `splits` is a list of S dicts with arrays X_train, y_train, X_cal, y_cal, X_test, y_test
    (same sizes in every split) and `folds` (fold id of each training row, 0 .. n_folds - 1).
    Each model is fitted n_folds times on all folds but one, predicting the left-out fold (the
    out-of-fold rows the aggregators learn from), and once on the whole training part,
    predicting the calibration and test rows. `settings[name]` holds keyword arguments for a
    model. Returns {"oof": (S, n, M, K), "cal": ..., "test": ...} as float64 numpy arrays.
    """
    unknown = [m for m in models if m not in BASE_MODELS]
    if unknown or not models:
        raise ValueError(f"base models must be among {BASE_MODELS}, got {list(models)}")
    settings = settings or {}
    taus = as_levels(taus).numpy()
    S, K = len(splits), len(taus)
    n, n_cal = len(splits[0]["y_train"]), len(splits[0]["y_cal"])
    n_test = len(splits[0]["y_test"])
    for s, sp in enumerate(splits):
        if (len(sp["y_train"]), len(sp["y_cal"]), len(sp["y_test"])) != (n, n_cal, n_test):
            raise ValueError(f"split {s} has other sizes than split 0: batched fits need equal "
                             "train, calibration and test sizes")
        if sorted(np.unique(sp["folds"]).tolist()) != list(range(n_folds)):
            raise ValueError(f"split {s}: folds must take every value 0 .. {n_folds - 1}")
    out = {part: np.zeros((S, rows, len(models), K))
           for part, rows in (("oof", n), ("cal", n_cal), ("test", n_test))}

    for j, name in enumerate(models):
        if name in SKLEARN_MODELS:
            fn, kw = SKLEARN_MODELS[name], dict(settings.get(name, {}))
            for s, sp in enumerate(splits):
                extra = {"seed": seed + 1000 * s} if name != "knn" else {}
                for k in range(n_folds):
                    hold = sp["folds"] == k
                    out["oof"][s, hold, j] = fn(sp["X_train"][~hold], sp["y_train"][~hold],
                                                sp["X_train"][hold], taus, **kw, **extra)
                both = np.concatenate([sp["X_cal"], sp["X_test"]])
                pred = fn(sp["X_train"], sp["y_train"], both, taus, **kw, **extra)
                out["cal"][s, :, j], out["test"][s, :, j] = pred[:n_cal], pred[n_cal:]
                if progress:
                    progress()
        else:
            _torch_cross_fit(out, j, name, splits, taus, n_folds, settings.get(name, {}),
                             device, seed)
            if progress:
                progress(S)
    return out


def _torch_cross_fit(out, j, name, splits, taus, n_folds, kw, device, seed) -> None:
    """All S x (n_folds + 1) fits of a torch base model trained together."""
    S = len(splits)
    f32 = dict(dtype=torch.float32, device=device)
    X = torch.stack([torch.as_tensor(sp["X_train"], **f32) for sp in splits])
    y = torch.stack([torch.as_tensor(sp["y_train"], **f32) for sp in splits])
    folds = torch.stack([torch.as_tensor(sp["folds"], device=device) for sp in splits])
    # Fit (s, k): split s without fold k for k < n_folds; the whole training part for k = n_folds.
    allowed = torch.cat([folds[:, None, :] != torch.arange(n_folds, device=device)[None, :, None],
                         torch.ones_like(folds[:, None, :], dtype=torch.bool)], 1)
    F = S * (n_folds + 1)
    Xf = X[:, None].expand(S, n_folds + 1, *X.shape[1:]).reshape(F, *X.shape[1:])
    yf = y[:, None].expand(S, n_folds + 1, y.shape[1]).reshape(F, -1)
    defaults = {"linear": dict(hidden=(), steps=500, lr=0.01, batch_size=None),
                "mlp": dict(hidden=(64, 64), steps=500, lr=0.003, batch_size=128)}[name]
    model = torch_quantile_fits(Xf, yf, allowed.reshape(F, -1), taus,
                                **{**defaults, **kw}, seed=seed + 17 * (j + 1))
    with torch.no_grad():
        train_pred = model(Xf).reshape(S, n_folds + 1, *yf.shape[1:], -1).double().cpu().numpy()
        both = torch.stack([torch.as_tensor(np.concatenate([sp["X_cal"], sp["X_test"]]), **f32)
                            for sp in splits])
        both = both[:, None].expand(S, n_folds + 1, *both.shape[1:]).reshape(F, *both.shape[1:])
        full = model(both).reshape(S, n_folds + 1, both.shape[1], -1)[:, n_folds]
        full = full.double().cpu().numpy()
    n_cal = len(splits[0]["y_cal"])
    for s, sp in enumerate(splits):
        for k in range(n_folds):
            hold = sp["folds"] == k
            out["oof"][s, hold, j] = train_pred[s, k][hold]
        out["cal"][s, :, j], out["test"][s, :, j] = full[s, :n_cal], full[s, n_cal:]


# -------------------------------------------------------------------------------------------------
# Aggregators


def mean_ensemble(Z):
    """The plain average of the library at every level: (..., M, K) -> (..., K)."""
    return Z.mean(-2)


def median_ensemble(Z):
    """The median of the library at every level (mean of the two middle ones for even M)."""
    Z = Z if torch.is_tensor(Z) else torch.as_tensor(Z)
    return Z.quantile(0.5, dim=-2) if Z.is_floating_point() else Z.double().quantile(0.5, dim=-2)


class Aggregator(nn.Module):
    """S independent aggregators (one per split) of M models at K levels.

    `granularity` in coarse | medium | fine, `local` False (global weights, free parameters,
    starting uniform as in the official code) or True (weights from a BatchedMLP of x with
    `hidden` layers). `forward(X, Z)`: X (S, B, d) (unused when global), Z (S, B, M, K) ->
    (S, B, K).
    """

    def __init__(self, n_splits: int, n_models: int, n_levels: int, *, granularity: str,
                 local: bool = False, n_features: int | None = None, hidden=(64, 64),
                 dropout: float = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if n_models < 1 or n_levels < 1:
            raise ValueError(f"need at least one model and one level, got {n_models}, {n_levels}")
        self.S, self.M, self.K = n_splits, n_models, n_levels
        self.granularity, self.local = granularity, local
        rows = n_models * n_levels if granularity == "fine" else n_models
        cols = 1 if granularity == "coarse" else n_levels
        self.shape = (rows, cols)
        if local:
            if not n_features:
                raise ValueError("a local aggregator needs n_features (the width of x)")
            self.net = BatchedMLP(n_splits, n_features, hidden, rows * cols, dropout=dropout,
                                  generator=generator)
        else:
            self.logits = nn.Parameter(torch.zeros(n_splits, 1, rows, cols))

    def weights(self, X: torch.Tensor | None = None) -> torch.Tensor:
        """Convex weights, softmax over models (coarse, medium) or over (model, level) pairs
        (fine): (S, B, rows, cols), B = len of X's rows for local weights, else 1."""
        if self.local:
            logits = self.net(X).reshape(X.shape[0], X.shape[1], *self.shape)
        else:
            logits = self.logits
        return logits.softmax(2)

    def forward(self, X: torch.Tensor | None, Z: torch.Tensor) -> torch.Tensor:
        if Z.dim() != 4 or Z.shape[2:] != (self.M, self.K):
            raise ValueError(f"Z must be (S, B, {self.M}, {self.K}), got {tuple(Z.shape)}")
        w = self.weights(X)
        if self.granularity != "fine":
            return (Z * w).sum(2)
        flat = Z.reshape(*Z.shape[:2], -1)
        if self.local:
            return torch.einsum("sbr,sbrk->sbk", flat, w)
        return torch.bmm(flat, w[:, 0])


AGGREGATORS = {f"{kind}-{g}": dict(local=kind == "local", granularity=g)
               for kind in ("global", "local") for g in GRANULARITIES}


def fit_aggregator(name: str, X, Z, y, val, taus, *, steps: int = 1000, lr: float = 1e-3,
                   batch_size: int | None = 128, weight_decay: float = 1e-7,
                   eval_every: int = 10, patience: int = 500, hidden=(64, 64),
                   dropout: float = 0.0, train_monotone: str = "none",
                   seed: int = 0) -> tuple[Aggregator, dict]:
    """Fit S aggregators of kind `name` (`AGGREGATORS`, e.g. `local-medium`) on out-of-fold
    predictions: X (S, n, d), Z (S, n, M, K), y (S, n) torch tensors, `val` (S, n) bool marks
    the held-out rows for early stopping (scored after sorting, the post-hoc rearrangement every
    prediction gets). `train_monotone` (none | sort | isotonic) applies that
    rearrangement to the aggregate inside the loss (non-crossing by training).
    Returns the aggregators with their best parameters and the training record."""
    if name not in AGGREGATORS:
        raise ValueError(f"aggregator must be one of {sorted(AGGREGATORS)}, got {name!r}")
    if Z.dim() != 4 or X.shape[:2] != Z.shape[:2] or y.shape != Z.shape[:2]:
        raise ValueError(f"need X (S, n, d), Z (S, n, M, K) and y (S, n); got {tuple(X.shape)},"
                         f" {tuple(Z.shape)}, {tuple(y.shape)}")
    if val.shape != y.shape or val.all(1).any() or not val.any(1).all():
        raise ValueError("val must be (S, n) and leave some training and some validation rows "
                         "in every split")
    taus = as_levels(taus, device=Z.device, dtype=Z.dtype)
    if len(taus) != Z.shape[3]:
        raise ValueError(f"{len(taus)} levels but Z has {Z.shape[3]}")
    gen = torch.Generator().manual_seed(seed)
    S, n, M, K = Z.shape
    model = Aggregator(S, M, K, n_features=X.shape[2], hidden=hidden, dropout=dropout,
                       generator=gen, **AGGREGATORS[name]).to(Z.device)
    sampler = RowSampler(~val, batch_size, gen)

    def loss_fn(idx, weight):
        pred = monotonise(model(gather_rows(X, idx), gather_rows(Z, idx)), train_monotone)
        loss = pinball(pred, gather_rows(y, idx), taus).mean(2)
        return (loss * weight).sum(1) / weight.sum(1)

    def eval_fn():
        # Scored as it will be used: rearranged by sorting after any training rearrangement.
        total = torch.zeros(S, dtype=Z.dtype, device=Z.device)
        for rows in _row_chunks(model, n):
            pred = monotonise(monotonise(model(X[:, rows], Z[:, rows]), train_monotone), "sort")
            total += (pinball(pred, y[:, rows], taus).mean(2) * val[:, rows]).sum(1)
        return 2 * total / val.sum(1)

    record = fit_batched(model, loss_fn, sampler, steps=steps, lr=lr, weight_decay=weight_decay,
                         eval_fn=eval_fn, eval_every=eval_every, patience=patience)
    model.train_monotone = train_monotone
    return model, record


def _row_chunks(model: Aggregator, n: int, budget: int = 2 ** 24):
    """Row slices small enough that the weights of one slice hold about `budget` numbers."""
    per_row = model.S * model.shape[0] * model.shape[1] * (1 if model.local else 0) + 1
    step = max(1, min(n, budget // per_row))
    return [slice(i, i + step) for i in range(0, n, step)]


def aggregate(model: Aggregator, X, Z) -> torch.Tensor:
    """The aggregate of a fitted model (with its training rearrangement, if any), no gradients;
    rows are taken in slices, so that local fine weights fit in memory."""
    model.eval()
    how = getattr(model, "train_monotone", "none")
    with torch.no_grad():
        return torch.cat([monotonise(model(X[:, rows], Z[:, rows]), how)
                          for rows in _row_chunks(model, Z.shape[1])], 1)
