"""Speed of the suite, measured in one run and printed side by side (`make bench`).

- our SMOTE against imbalanced-learn's on the same data at several sizes;
- one AdamP and one SGDP step against the authors' `adamp` package on the same parameters;
- weight matching of two MLPs at several widths;
- one federated round, vectorized over clients, against a plain per-client loop;
- the runner's fixed cost per notebook (kernel start, the usual imports, the render);
- a no-op `dvc repro` of the whole suite (run `make repro` first, or it measures real work).

Each figure is the best of several repeats (the minimum is the least disturbed by other load).
Nothing here asserts a time: these are measurements, read by people.
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from repsuite import paths
from repsuite.timing import best_of


def bench_smote(sizes=(1_000, 10_000, 50_000), n_features: int = 20) -> list[tuple]:
    from imblearn.over_sampling import SMOTE as ReferenceSMOTE

    from repsuite.oversampling.smote import SMOTE

    rows = []
    for n in sizes:
        rng = np.random.default_rng(0)
        X = rng.normal(size=(n, n_features))
        y = (rng.random(n) < 0.1).astype(int)
        ours = best_of(lambda X=X, y=y: SMOTE(sampling_ratio=1.0, seed=0).fit_resample(X, y), 3)
        ref = best_of(lambda X=X, y=y: ReferenceSMOTE(sampling_strategy=1.0, random_state=0)
                      .fit_resample(X, y), 3)
        rows.append((f"SMOTE, n={n:,} x {n_features}, 10% minority, to 1:1", ours, ref,
                     "imbalanced-learn 0.14"))
    return rows


def _optimizer_step_time(make, params, grads) -> float:
    opt = make(params)

    def step():
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()

    return best_of(step, 50)


def bench_adamp() -> list[tuple]:
    import adamp

    from repsuite.optim.adamp import SGDP, AdamP

    g = torch.Generator().manual_seed(0)
    shapes = [(256, 784), (256,), (256, 256), (256,), (10, 256), (10,), (64, 32, 3, 3)]
    weights = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    # Gradients orthogonal to each output channel's weights, as behind BatchNorm: every matrix then
    # passes the scale-invariance test and takes the projection path.
    orthogonal = []
    for w, grad in zip(weights, grads, strict=True):
        if w.dim() > 1:
            w2, g2 = w.reshape(len(w), -1), grad.reshape(len(w), -1)
            g2 = g2 - (g2 * w2).sum(1, keepdim=True) / w2.square().sum(1, keepdim=True) * w2
            grad = g2.reshape(w.shape)
        orthogonal.append(grad)

    def fresh():
        return [w.clone().requires_grad_() for w in weights]

    label = "7 tensors, 270k weights"
    rows = []
    for name, ours_cls, ref_cls, kw in (
        ("AdamP", AdamP, adamp.AdamP, dict(lr=1e-3, weight_decay=1e-2)),
        ("SGDP", SGDP, adamp.SGDP, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-5)),
    ):
        for case, gs in (("random grads", grads), ("grads orthogonal to w: projected", orthogonal)):
            ours = _optimizer_step_time(lambda p, c=ours_cls, kw=kw: c(p, **kw), fresh(), gs)
            ref = _optimizer_step_time(lambda p, c=ref_cls, kw=kw: c(p, **kw), fresh(), gs)
            rows.append((f"{name} step, {label}, {case}", ours, ref, "adamp 0.3.0 (authors)"))
    return rows


def bench_weight_matching(widths=(128, 512, 1024)) -> list[tuple]:
    from repsuite.merging.models import MLP
    from repsuite.merging.permutation import spec_for
    from repsuite.merging.weight_matching import weight_matching

    rows = []
    for width in widths:
        torch.manual_seed(0)
        a, b = MLP(784, [width] * 3, 10), MLP(784, [width] * 3, 10)
        spec = spec_for(a)
        pa, pb = dict(a.state_dict()), dict(b.state_dict())
        ours = best_of(lambda pa=pa, pb=pb, spec=spec: weight_matching(spec, pa, pb, seed=0), 3)
        rows.append((f"weight matching, MLP 784-{width}x3-10", ours, None, ""))
    return rows


def bench_federated_round(n_clients: int = 100, local_steps: int = 5) -> list[tuple]:
    from repsuite.federated.clients import bench_round

    t = bench_round(n_clients=n_clients, local_steps=local_steps)
    return [(f"federated round: {n_clients} clients x {local_steps} local steps, MLP 784-64-10, "
             "vectorized", t["vectorized_s"], t["loop_s"], "per-client loop, torch.optim.SGD")]


def bench_fairness_metrics(n: int = 1_000_000) -> list[tuple]:
    from fairlearn import metrics as fl

    from repsuite.fairness import metrics

    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 2, n), rng.integers(0, 2, n)
    group = rng.integers(0, 4, n)
    ours = best_of(lambda: metrics.equalized_odds_difference(y_true, y_pred, group), 3)
    ref = best_of(lambda: fl.equalized_odds_difference(y_true, y_pred, sensitive_features=group), 3)
    return [(f"equalized-odds gap, {n:,} rows, 4 groups", ours, ref, "fairlearn")]


def bench_feamoe_shapley(n_features: int = 11, n_rows: int = 20, n_background: int = 50):
    """FEAMOE's closed-form attributions against exact enumeration of all 2^d coalitions."""
    from repsuite.fairness import feamoe

    gen = torch.Generator().manual_seed(0)
    model = feamoe.FEAMOE(n_features, 3, seed=0)
    X = torch.randn(n_rows, n_features, generator=gen)
    background = torch.randn(n_background, n_features, generator=gen)
    fast = best_of(lambda: feamoe.explain_fast(model, X, background), 5)
    exact = best_of(lambda: feamoe.shapley_exact(model.gated_log_odds, X, background), 1)
    return [(f"FEAMOE Shapley values, {n_rows} rows x {n_features} features, 3 experts", fast,
             exact, "exact enumeration")]


def bench_viable_ranges(n: int = 200, d: int = 5, m: int = 5) -> list[tuple]:
    """The viable prediction range of m points (2m convex programmes) against CVXPY's solves.
    (Clarabel's exponential-cone solve of this problem fails from a few hundred rows on.)"""
    import cvxpy as cp

    from repsuite.fairness import multiplicity

    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, d))
    y = (X @ rng.normal(size=d) + rng.logistic(size=n) > 0).astype(int)
    l2, eps = 1e-3, 0.01
    obj = multiplicity.make_objective(X, y, l2=l2)
    w0 = multiplicity.fit(obj)[0]
    L0 = float(obj.loss(w0))
    points = obj.rows(X[:m])
    ours = best_of(lambda: multiplicity.viable_ranges(obj, w0, points, eps, L0=L0), 3)
    Z = obj.Z.numpy()
    w = cp.Variable(d + 1)
    loss = (cp.sum(cp.logistic(Z @ w)) - y @ Z @ w) / n + l2 / 2 * cp.sum_squares(w[:d])

    def reference():
        for z in points.numpy():
            for sense in (cp.Minimize, cp.Maximize):
                cp.Problem(sense(z @ w), [loss <= L0 + eps]).solve(solver="CLARABEL")

    return [(f"viable prediction ranges, {m} points, logistic regression {n} x {d}", ours,
             best_of(reference, 1), "CVXPY + Clarabel, one solve per point and direction")]


def bench_clustering() -> list[tuple]:
    from repsuite.clustering.ppp_experiment import bench_rows

    return bench_rows()


def bench_quantile() -> list[tuple]:
    from repsuite.regression.quantile_experiment import bench

    return bench()


def bench_runner() -> list[tuple]:
    """A notebook that only imports what every paper imports, through the runner and the render."""
    import nbformat

    from repsuite import run
    from repsuite.report import render_html

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nb = nbformat.v4.new_notebook()
        cell = nbformat.v4.new_code_cell('profile = "cpu"  # the runner sets it')
        cell.metadata["tags"] = ["parameters"]
        nb.cells = [cell, nbformat.v4.new_code_cell(
            "%matplotlib inline\nimport matplotlib.pyplot as plt\nimport torch, sklearn, pandas\n"
            "from repsuite.claims import Ledger")]
        source = tmp / "empty.ipynb"
        nbformat.write(nb, source)

        def once():
            executed = run.execute("empty", source, {"profile": "cpu"}, tmp, paths.repo_root())
            render_html(executed, tmp / "empty.html")

        return [("runner fixed cost: empty notebook (kernel, imports, render)", best_of(once, 3),
                 None, "aim: <= 8 s")]


def bench_dvc_noop() -> list[tuple]:
    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    root = paths.repo_root()
    status = subprocess.run([dvc, "status", "-q"], cwd=root, capture_output=True)
    note = "aim: <= 3 s" if status.returncode == 0 else "pipeline NOT up to date: run make repro"

    def repro():
        subprocess.run([dvc, "repro", "-q"], cwd=root, check=True, capture_output=True)

    return [("no-op dvc repro of the whole suite", best_of(repro, 3), None, note)]


def main() -> int:
    rows = []
    parts = (bench_smote, bench_adamp, bench_weight_matching, bench_federated_round,
             bench_fairness_metrics, bench_feamoe_shapley, bench_viable_ranges, bench_clustering,
             bench_quantile, bench_runner, bench_dvc_noop)
    for part in parts:
        print(f"measuring {part.__name__.removeprefix('bench_')} ...", file=sys.stderr, flush=True)
        rows += part()
    width = max(len(r[0]) for r in rows)
    print(f"{'case':<{width}}  {'ours s':>9}  {'reference s':>11}  {'ours/ref':>8}  reference")
    for case, ours, ref, note in rows:
        ref_s = f"{ref:11.4f}" if ref is not None else " " * 11
        ratio = f"{ours / ref:8.2f}" if ref else " " * 8
        print(f"{case:<{width}}  {ours:9.4f}  {ref_s}  {ratio}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
