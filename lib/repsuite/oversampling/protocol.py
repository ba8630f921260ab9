"""The paper's protocol: sampling sweeps traced in ROC space, with stratified k-fold CV.

Every training fold (never a test fold) is perturbed in each of these ways and a classifier learned:

- `raw`: the tree on the training fold as it is (the lower-left point of every tree curve, 5.2);
- `under`: plain random under-sampling of the majority at each amount U%;
- `smote`: SMOTE at N% plus the same under-sampling (same U, same majority subset);
- `replicate`: over-sampling by replication at N% plus the same under-sampling (Section 4.1);
- `loss_ratio`: the tree with majority weight LR and minority weight 1, LR from 0.9 down to 0.001
  (our analogue of Ripper's loss ratio: a leaf predicts the minority class when its minority share
  exceeds LR / (1 + LR), Lewis & Catlett's threshold);
- `nb_prior`: Gaussian Naive Bayes with the minority prior set to r times the majority prior, r
  from 1 to 50, after the point at the training fold's own priors.

%TP and %FP of each setting are averaged over the folds (Section 5, "averaged over 10-fold
cross-validation runs"). A curve is the raw point followed by one point per sweep step, so every
curve of a dataset has the same number of points and their convex hulls are comparable.

The tree is scikit-learn's CART with the entropy criterion and `min_samples_leaf` (2 by default,
C4.5's minimum of two cases per branch): a C4.5 analogue, without C4.5's pessimistic pruning.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.tree import DecisionTreeClassifier

from repsuite.oversampling import roc
from repsuite.oversampling.smote import check_xy, minority_majority, n_majority_kept, resample
from repsuite.progress import bar

TREE_FAMILIES = ("under", "smote", "replicate", "loss_ratio")
_CODES = {"under": 1, "smote": 2, "replicate": 3}


def effective_under_amounts(n_minority: int, n_majority: int, amounts) -> tuple[float, ...]:
    """The under-sampling amounts that remove majority samples at these counts (the paper drops
    levels that a dataset's proportions make void: at 10% Pima would keep more than it has)."""
    return tuple(float(a) for a in sorted(amounts)
                 if n_majority_kept(n_minority, n_majority, a) < n_majority)


@dataclass(frozen=True)
class SweepSpec:
    """What one dataset's sweep runs. `loss_ratios` and `prior_ratios` default to as many steps as
    there are under-sampling amounts, spread geometrically over the paper's ranges."""

    under_amounts: tuple
    smote_amounts: tuple = (100.0,)
    replication_amounts: tuple = ()
    loss_ratio_range: tuple = (0.9, 0.001)
    prior_ratio_range: tuple = (1.0, 50.0)
    k_neighbors: int = 5
    min_samples_leaf: int = 2
    standardize: bool = False
    loss_ratios: tuple = field(init=False)
    prior_ratios: tuple = field(init=False)

    def __post_init__(self):
        if len(self.under_amounts) == 0:
            raise ValueError("a sweep needs at least one under-sampling amount")
        for name in ("under_amounts", "smote_amounts", "replication_amounts"):
            values = getattr(self, name)
            if any(v <= 0 for v in values):
                raise ValueError(f"{name} must be positive percents, got {list(values)}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        n = len(self.under_amounts)
        object.__setattr__(self, "loss_ratios", tuple(np.geomspace(*self.loss_ratio_range, n)))
        object.__setattr__(self, "prior_ratios", tuple(np.geomspace(*self.prior_ratio_range, n)))


def cv_splits(y: np.ndarray, n_folds: int, seed: int) -> list:
    """The stratified folds of one CV repeat."""
    counts = np.bincount(y)
    if counts.min() < n_folds:
        raise ValueError(f"{n_folds}-fold CV needs at least {n_folds} samples per class; the "
                         f"minority class has {counts.min()}")
    folds = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    return list(folds.split(np.zeros(len(y)), y))


def _seed(*key) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


def _rates(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    pos = y == 1
    return float(pred[pos].mean()), float(pred[~pos].mean())


def fold_points(X_tr, y_tr, X_te, y_te, spec: SweepSpec, *, seed: int, fold: int, device="cpu",
                resampler=resample) -> list[dict]:
    """Every setting of the sweep learned on one training fold and scored on its test fold.

    Labels are 1 for the minority class and 0 for the majority class. `resampler` is called with the
    training fold only (a test checks this with a spy).
    """
    if spec.standardize:
        # Training-fold statistics only; trees and Gaussian NB are unaffected, SMOTE's k-NN moves.
        mu, sd = X_tr.mean(0), X_tr.std(0)
        sd[sd == 0] = 1.0
        X_tr, X_te = (X_tr - mu) / sd, (X_te - mu) / sd
    tree_seed = _seed(seed, fold)
    # The trees work in float32 anyway; converting once lets every fit skip its input checks.
    X_te32 = np.ascontiguousarray(X_te, dtype=np.float32)
    rows = []

    def score(family, amount, step, level, Xf, yf, weights=None):
        tree = DecisionTreeClassifier(criterion="entropy", min_samples_leaf=spec.min_samples_leaf,
                                      class_weight=weights, random_state=tree_seed)
        tree.fit(np.ascontiguousarray(Xf, dtype=np.float32), yf, check_input=False)
        tpr, fpr = _rates(tree.predict(X_te32, check_input=False), y_te)
        # Context only (not the paper's protocol): the AUC of thresholding the raw tree's leaf
        # frequencies, the usual ROC of a probabilistic classifier.
        score_auc = np.nan
        if family == "raw":
            score_auc = roc_auc_score(y_te, tree.predict_proba(X_te32, check_input=False)[:, 1])
        rows.append({"family": family, "amount": amount, "step": step, "level": level,
                     "tpr": tpr, "fpr": fpr, "leaves": tree.get_n_leaves(), "n_train": len(yf),
                     "score_auc": score_auc})

    score("raw", 0.0, 0, 0.0, X_tr, y_tr)
    over_settings = [("under", None, 0.0)] + [("smote", "smote", a) for a in spec.smote_amounts]
    over_settings += [("replicate", "replicate", a) for a in spec.replication_amounts]
    for family, over, amount in over_settings:
        for step, under in enumerate(spec.under_amounts, start=1):
            Xr, yr = resampler(X_tr, y_tr, over=over, amount=amount, under_amount=under,
                               k_neighbors=spec.k_neighbors, minority_label=1, device=device,
                               seed=_seed(seed, fold, _CODES[family], amount, step),
                               under_seed=_seed(seed, fold, 0, step))
            score(family, amount, step, under, Xr, yr)
    for step, ratio in enumerate(spec.loss_ratios, start=1):
        score("loss_ratio", 0.0, step, ratio, X_tr, y_tr, weights={0: ratio, 1: 1.0})

    # Naive Bayes: a prior changes only the decision, so one fit serves the whole prior sweep.
    nb = GaussianNB().fit(X_tr, y_tr)
    jll = nb.predict_joint_log_proba(X_te)
    log_lik_ratio = jll[:, 1] - jll[:, 0] - np.log(nb.class_prior_[1] / nb.class_prior_[0])
    own = nb.class_prior_[1] / nb.class_prior_[0]
    score_auc = roc_auc_score(y_te, log_lik_ratio)
    for step, ratio in enumerate((own, *spec.prior_ratios)):
        tpr, fpr = _rates(log_lik_ratio + np.log(ratio) > 0, y_te)
        rows.append({"family": "nb_prior", "amount": 0.0, "step": step, "level": float(ratio),
                     "tpr": tpr, "fpr": fpr, "leaves": 0, "n_train": len(y_tr),
                     "score_auc": score_auc if step == 0 else np.nan})
    return rows


def run_sweeps(X, y, spec: SweepSpec, *, seeds, n_folds: int = 10, device="cpu", n_jobs: int = 1,
               resampler=resample, minority_label=None, progress: str | None = None
               ) -> pd.DataFrame:
    """Per-fold ROC points of every setting, for each CV repeat (one repeat per seed).

    Returns one row per (seed, fold, family, amount, step). Tasks (seed, fold) run on `n_jobs`
    threads (tree fitting releases the GIL); each has its own seeds, so the result does not depend
    on `n_jobs`.
    """
    X, y = check_xy(X, y, what="run_sweeps")
    minority, _ = minority_majority(y, minority_label)
    y01 = (y == minority).astype(np.int64)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("run_sweeps needs at least one seed (one CV repeat per seed)")
    tasks = [(s, f, tr, te) for s in seeds for f, (tr, te) in enumerate(cv_splits(y01, n_folds, s))]

    def work(task):
        s, f, tr, te = task
        rows = fold_points(X[tr], y01[tr], X[te], y01[te], spec, seed=s, fold=f, device=device,
                           resampler=resampler)
        return [{"seed": s, "fold": f, **r} for r in rows]

    pbar = bar(total=len(tasks), desc=progress, enabled=progress is not None, leave=False)
    # The SMOTE tensors here are small: torch's own worker threads would only spin against the tree
    # fits for the same cores (measured: 3x slower on 2 cores), so its ops run single-threaded.
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=max(1, n_jobs)) as pool:
            results = []
            for rows in pool.map(work, tasks):
                results.extend(rows)
                pbar.update()
    finally:
        torch.set_num_threads(torch_threads)
        pbar.close()
    return pd.DataFrame(results)


def stratified_subsample(X, y, max_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_samples` rows with the class proportions kept (every row when it is 0)."""
    X, y = np.asarray(X), np.asarray(y)
    if max_samples < 0:
        raise ValueError(f"max_samples must be >= 0 (0 keeps every row), got {max_samples}")
    if max_samples == 0 or len(y) <= max_samples:
        return X, y
    keep, _ = train_test_split(np.arange(len(y)), train_size=max_samples, stratify=y,
                               random_state=seed)
    keep = np.sort(keep)
    return X[keep], y[keep]


def roc_points(per_fold: pd.DataFrame) -> pd.DataFrame:
    """%TP and %FP (as rates) of each setting averaged over the folds of each CV repeat."""
    keys = ["seed", "family", "amount", "step"]
    values = ["level", "tpr", "fpr", "leaves", "n_train", "score_auc"]
    return per_fold.groupby(keys, as_index=False)[values].mean()


def curve(points: pd.DataFrame, seed, family: str, amount: float = 0.0) -> np.ndarray:
    """(n, 2) array of (FP rate, TP rate) of one sweep in one repeat; tree sweeps start at the raw
    point.

    `seed=None` averages the rates over repeats (for figures).
    """
    sel = points if seed is None else points[points["seed"] == seed]
    sweep = sel[(sel["family"] == family) & (sel["amount"] == amount)]
    if sweep.empty:
        raise KeyError(f"no points for family={family!r}, amount={amount} (seed {seed})")
    if family in TREE_FAMILIES:
        sweep = pd.concat([sel[sel["family"] == "raw"], sweep])
    mean = sweep.groupby(["family", "step"], sort=False)[["fpr", "tpr"]].mean()
    return mean[["fpr", "tpr"]].to_numpy()


def curves_of(points: pd.DataFrame) -> list[tuple[str, float]]:
    """The (family, amount) pairs that form curves."""
    pairs = points.loc[points["family"] != "raw", ["family", "amount"]].drop_duplicates()
    return [(f, float(a)) for f, a in pairs.itertuples(index=False)]


def curve_areas(points: pd.DataFrame) -> pd.DataFrame:
    """AUCH and the paper's trapezoid AUC of every curve in every repeat."""
    rows = []
    for seed in sorted(points["seed"].unique()):
        for family, amount in curves_of(points):
            pts = curve(points, seed, family, amount)
            rows.append({"seed": seed, "family": family, "amount": amount, "n_points": len(pts),
                         "auch": roc.hull_area(pts), "auc": roc.trapezoid_auc(pts)})
    return pd.DataFrame(rows)


def seed_values(areas: pd.DataFrame, family: str, amounts=None, metric: str = "auch") -> np.ndarray:
    """Per-repeat values of a curve's metric (in seed order), averaged over `amounts` if given."""
    sel = areas[areas["family"] == family]
    if amounts is not None:
        sel = sel[sel["amount"].isin([float(a) for a in amounts])]
        if sel["amount"].nunique() != len(set(amounts)):
            raise KeyError(f"{family}: not every amount of {list(amounts)} was swept")
    if sel.empty:
        raise KeyError(f"no curve of family {family!r}")
    return sel.groupby("seed")[metric].mean().sort_index().to_numpy()


def pooled_hull_area(points: pd.DataFrame, family: str, amounts) -> np.ndarray:
    """Per-repeat AUCH of the hull over all the given amounts' points together (a hull over more
    points: context only, never a fair comparison with a single curve)."""
    out = []
    for seed in sorted(points["seed"].unique()):
        pts = np.vstack([curve(points, seed, family, a) for a in amounts])
        out.append(roc.hull_area(pts))
    return np.array(out)


def hull_shares(curves: dict) -> dict:
    """Points of each named curve that are vertices of the hull over all of them (the paper's count
    of potentially optimal classifiers). A point shared by several curves counts for each."""
    allpts = np.vstack(list(curves.values()))
    hull = roc.convex_hull(allpts)
    return {name: int(roc.on_hull(pts, hull).sum()) for name, pts in curves.items()}
