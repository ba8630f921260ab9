"""What the paper measures on a pair of models: the linear path, barriers, distances, and the
singular value decomposition of every layer before and after permutation.

Notation: theta_a and theta_b are two trained models, pi a permutation of B's hidden units (so
pi(theta_b) computes the same function as theta_b), and theta(lam) = (1 - lam) theta_a + lam
pi(theta_b).
"""

import math

import numpy as np
import torch
from torch import nn

from repsuite.merging.permutation import (
    Params,
    Perms,
    PermutationSpec,
    apply_permutation,
    random_perms,
    view_param,
)

# The linear path and its barriers

def interpolate(params_a: Params, params_b: Params, lam: float) -> Params:
    """(1 - lam) theta_a + lam theta_b, array by array."""
    if set(params_a) != set(params_b):
        raise ValueError("cannot interpolate models with different parameter names")
    return {k: torch.lerp(params_a[k], params_b[k].to(params_a[k]), float(lam)) for k in params_a}


def average(params_list: list[Params]) -> Params:
    """The uniform average of several models (the merged model when they are already aligned)."""
    if not params_list:
        raise ValueError("average needs at least one model")
    return {k: torch.stack([p[k] for p in params_list]).mean(0) for k in params_list[0]}


@torch.no_grad()
def evaluate_params(model: nn.Module, params: Params, X: torch.Tensor, y: torch.Tensor,
                    batch_size: int = 4096) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model`'s architecture with the weights `params`."""
    if len(X) == 0 or len(X) != len(y):
        raise ValueError(f"need as many labels as inputs (at least one), got {len(X)} and {len(y)}")
    loss, correct = 0.0, 0
    for start in range(0, len(X), batch_size):
        logits = torch.func.functional_call(model, params, (X[start:start + batch_size],))
        target = y[start:start + batch_size]
        loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    return loss / len(X), correct / len(X)


def interpolation_path(model: nn.Module, params_a: Params, params_b: Params, X: torch.Tensor,
                       y: torch.Tensor, lambdas) -> dict[str, np.ndarray]:
    """Loss and accuracy of theta(lam) for every lam in `lambdas` (which must include 0 and 1)."""
    lambdas = np.asarray(lambdas, dtype=float)
    _check_lambdas(lambdas)
    out = np.array([evaluate_params(model, interpolate(params_a, params_b, lam), X, y)
                    for lam in lambdas])
    return {"lambda": lambdas, "loss": out[:, 0], "acc": out[:, 1]}


def _check_lambdas(lambdas: np.ndarray) -> None:
    if lambdas.ndim != 1 or len(lambdas) < 2 or not np.all(np.diff(lambdas) > 0):
        raise ValueError("lambdas must be an increasing sequence of at least 2 values")
    if not math.isclose(lambdas[0], 0.0) or not math.isclose(lambdas[-1], 1.0):
        raise ValueError(f"lambdas must run from 0 to 1, got {lambdas[0]} to {lambdas[-1]}")


def barrier(values, lambdas, higher_is_better: bool = False) -> float:
    """max over lam of the gap between the path and the straight line joining its two ends.

    Loss barrier: max_lam L(theta(lam)) - [(1 - lam) L(theta_a) + lam L(theta_b)] (Entezari et al.
    2022, as used by Ainsworth et al. and this paper); for accuracy the sign is flipped. Never
    negative here: lam = 0 gives 0.
    """
    values, lambdas = np.asarray(values, dtype=float), np.asarray(lambdas, dtype=float)
    _check_lambdas(lambdas)
    if values.shape != lambdas.shape or not np.all(np.isfinite(values)):
        raise ValueError("values must be finite, one per lambda")
    line = (1 - lambdas) * values[0] + lambdas * values[-1]
    gap = line - values if higher_is_better else values - line
    return float(gap.max())


# Distances

def l2_distance(params_a: Params, params_b: Params) -> float:
    """||theta_a - theta_b||_2 over all parameters."""
    if set(params_a) != set(params_b):
        raise ValueError("cannot compare models with different parameter names")
    return math.sqrt(sum(float(((params_a[k].double() - params_b[k].double()) ** 2).sum())
                         for k in params_a))


def random_perm_distance(spec: PermutationSpec, params_a: Params, params_b: Params, n_draws: int,
                         generator: torch.Generator) -> float:
    """Mean ||theta_a - pi(theta_b)|| over uniformly random permutations pi (chance level)."""
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    return float(np.mean([
        l2_distance(params_a, apply_permutation(spec, random_perms(spec, params_b, generator),
                                                params_b))
        for _ in range(n_draws)]))


# Singular value decomposition of the layers

def layer_matrices(spec: PermutationSpec, params: Params) -> dict[str, torch.Tensor]:
    """Every weight array as a matrix: output units x everything else (what the layer reads).

    For a conv kernel the columns are (input channel, kernel position); permuting input channels
    then permutes columns, so singular values stay invariant and the analysis is the same as for a
    linear layer.
    """
    out = {}
    for name, axes in spec.axes_to_perm.items():
        if len(axes) < 2:
            continue  # biases
        w = view_param(spec, name, params[name])
        out[name] = w.reshape(w.shape[0], -1).detach().double().cpu()
    return out


def permuted_sides(spec: PermutationSpec) -> dict[str, tuple[bool, bool]]:
    """For each weight matrix: (are its rows permuted?, are its columns permuted?)."""
    return {name: (axes[0] is not None, any(a is not None for a in axes[1:]))
            for name, axes in spec.axes_to_perm.items() if len(axes) >= 2}


def singular_values(W: torch.Tensor) -> np.ndarray:
    return torch.linalg.svdvals(W.float()).double().numpy()


# One layer's SVD, W = U diag(S) V^T with U, V holding the singular vectors as columns.
LayerSVD = tuple[np.ndarray, np.ndarray, np.ndarray]


def layer_svds(spec: PermutationSpec, params: Params) -> dict[str, LayerSVD]:
    """The thin SVD of every weight matrix, largest singular value first.

    Computed in float32 (LAPACK's float64 path is an order of magnitude slower here and the
    inner products below need no more than float32 accuracy), returned as float64 arrays.
    """
    out = {}
    for name, W in layer_matrices(spec, params).items():
        if not torch.isfinite(W).all():
            raise ValueError(f"parameter {name!r} contains NaN or infinite values")
        U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
        out[name] = (U.double().numpy(), S.double().numpy(), Vh.T.double().numpy())
    return out


def _index_maps(spec: PermutationSpec, perms: Perms, name: str,
                shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices that permute the matrix form of parameter `name`."""
    axes = spec.axes_to_perm[name]
    rows = perms[axes[0]] if axes[0] is not None else torch.arange(shape[0])
    cols = torch.arange(math.prod(shape[1:])).reshape(shape[1:])
    for axis, p in enumerate(axes[1:]):
        if p is not None:
            cols = torch.index_select(cols, axis, perms[p])
    return rows, cols.reshape(-1)


def permute_svds(spec: PermutationSpec, perms: Perms, svds: dict[str, LayerSVD],
                 params: Params) -> dict[str, LayerSVD]:
    """The SVDs of pi(theta) from those of theta (`params` gives the shapes).

    A permutation only reorders the entries of the singular vectors, P W Q^T = (P U) S (Q V)^T,
    which is why it leaves the singular values alone.
    """
    out = {}
    for name, (U, S, V) in svds.items():
        shape = tuple(view_param(spec, name, params[name]).shape)
        rows, cols = _index_maps(spec, perms, name, shape)
        out[name] = (U[rows.numpy()], S, V[cols.numpy()])
    return out


def _kept(S: np.ndarray, gamma: float) -> np.ndarray:
    """Indices of the singular values at least `gamma` times the largest (all for gamma = 0)."""
    return np.flatnonzero(S >= gamma * S[0]) if S[0] > 0 else np.arange(0)


def r_alignment(svds_a: dict[str, LayerSVD], svds_b: dict[str, LayerSVD],
                gamma: float = 0.0) -> dict:
    """The paper's R(theta_a, theta_b): how well the two models' singular vectors agree.

    R = sum_l sum_{i,j} (u_{l,i}^a . u_{l,j}^b)(v_{l,i}^a . v_{l,j}^b) / sum_l n_l, over the
    singular vectors whose singular value is at least `gamma` times the layer's largest (i from A,
    j from B), with n_l the number kept (the smaller of the two counts). Give the SVDs of
    pi(theta_b) (`permute_svds`) to measure after permutation. Flipping the sign of both u_j and
    v_j leaves every term unchanged, as it leaves W. R = 1 when the kept vectors coincide pairwise,
    about 0 for unrelated bases. With gamma = 0 and full rank, the layer's sum equals
    <U_a V_a^T, U_b V_b^T>_F, the inner product of the orthogonal polar factors. The relative
    threshold (gamma times the largest) is our reading of the paper's gamma.
    """
    if set(svds_a) != set(svds_b):
        raise ValueError("the two models have different layers")
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    per_layer, num, den = {}, 0.0, 0
    for name, (Ua, Sa, Va) in svds_a.items():
        Ub, Sb, Vb = svds_b[name]
        if Ua.shape != Ub.shape or Va.shape != Vb.shape:
            raise ValueError(f"layer {name!r} has different shapes in the two models")
        ia, ib = _kept(Sa, gamma), _kept(Sb, gamma)
        n = min(len(ia), len(ib))
        if n == 0:
            continue
        s = float(((Ua[:, ia].T @ Ub[:, ib]) * (Va[:, ia].T @ Vb[:, ib])).sum())
        per_layer[name] = s / n
        num, den = num + s, den + n
    return {"R": num / den if den else float("nan"), "per_layer": per_layer}


def alignment_profile(svd_a: LayerSVD, svd_b: LayerSVD, rows: bool, cols: bool) -> np.ndarray:
    """For each singular vector i of A (largest singular value first): how well B has a counterpart.

    Measured only on the sides a permutation acts on (`rows`: the left singular vectors, `cols`:
    the right ones), as the best-match |cosine| max_j |x_i^a . x_j^b|, averaged over the measured
    sides. A side no permutation touches (network inputs, class logits) is shared by construction
    and would only dilute the effect. Sign-free, and tolerant of two nearly equal singular values
    swapping order.
    """
    (Ua, _, Va), (Ub, _, Vb) = svd_a, svd_b
    if Ua.shape != Ub.shape or Va.shape != Vb.shape:
        raise ValueError(f"singular vectors of different shapes: {Ua.shape}, {Va.shape} and "
                         f"{Ub.shape}, {Vb.shape}")
    if not (rows or cols):
        raise ValueError("at least one side of the matrix must be permuted to measure alignment")
    sides = []
    if rows:
        sides.append(np.abs(Ua.T @ Ub).max(1))
    if cols:
        sides.append(np.abs(Va.T @ Vb).max(1))
    return np.mean(sides, axis=0)


def group_alignment(spec: PermutationSpec, svds_a: dict[str, LayerSVD],
                    svds_b: dict[str, LayerSVD], frac: float) -> dict:
    """Mean alignment profile over the top and bottom `frac` of each layer's singular vectors.

    The groups are the ceil(frac * rank) largest and as many smallest singular values of each
    layer; the two group means are then averaged over the layers (each layer counts once).
    """
    if not 0 < frac <= 0.5:
        raise ValueError(f"frac must be in (0, 0.5], got {frac}")
    top, bottom, profiles = [], [], {}
    for name, (rows, cols) in permuted_sides(spec).items():
        if not (rows or cols):
            continue
        prof = alignment_profile(svds_a[name], svds_b[name], rows, cols)
        k = max(1, math.ceil(frac * len(prof)))
        top.append(prof[:k].mean())
        bottom.append(prof[-k:].mean())
        profiles[name] = prof
    return {"top": float(np.mean(top)), "bottom": float(np.mean(bottom)), "profiles": profiles}


# Rank truncation

def energy_rank(S: np.ndarray, frac: float) -> int:
    """The smallest r whose r largest singular values hold `frac` of the squared spectrum."""
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    energy = np.cumsum(np.asarray(S, dtype=float) ** 2)
    return int(min(np.searchsorted(energy, frac * energy[-1] * (1 - 1e-12)) + 1, len(S)))


def truncate(W: torch.Tensor, r: int, keep: str = "top") -> torch.Tensor:
    """W rebuilt from its r largest (`keep="top"`) or r smallest (`"bottom"`) components."""
    return _rebuild(torch.linalg.svd(W.float(), full_matrices=False), r, keep, W)


def _rebuild(svd, r: int, keep: str, like: torch.Tensor) -> torch.Tensor:
    U, S, Vh = svd
    if keep not in {"top", "bottom"}:
        raise ValueError(f"keep must be 'top' or 'bottom', got {keep!r}")
    if not 0 <= r <= len(S):
        raise ValueError(f"rank {r} is outside 0..{len(S)} for a matrix with {len(S)} singular "
                         "values")
    idx = slice(0, r) if keep == "top" else slice(len(S) - r, len(S))
    return ((U[:, idx] * S[idx]) @ Vh[idx]).to(like)


def truncated_params(spec: PermutationSpec, params: Params, frac: float,
                     keep: str = "top") -> tuple[Params, dict[str, int]]:
    """Every weight matrix cut to the rank r holding `frac` of its squared spectrum (biases kept).

    `keep="bottom"` keeps the r *smallest* components instead: the same number of directions, the
    least energetic ones. Returns the new parameters and each layer's r.
    """
    out, ranks = dict(params), {}
    for name, W in layer_matrices(spec, params).items():
        svd = torch.linalg.svd(W.float(), full_matrices=False)
        r = energy_rank(svd[1].double().numpy(), frac)
        ranks[name] = r
        out[name] = _rebuild(svd, r, keep, W).reshape(params[name].shape).to(params[name])
    return out, ranks


def truncation_curve(model: nn.Module, spec: PermutationSpec, params: Params, fracs,
                     X: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """Accuracy with every layer cut to its r largest (`top`) or r smallest (`bottom`) components.

    r holds each fraction in `fracs` of the layer's squared spectrum; one SVD per layer serves all.
    """
    svds = {name: torch.linalg.svd(W.float(), full_matrices=False)
            for name, W in layer_matrices(spec, params).items()}
    out = {"frac": np.asarray(fracs, dtype=float), "top": [], "bottom": [], "rank": []}
    for frac in out["frac"]:
        ranks = {name: energy_rank(s[1].double().numpy(), frac) for name, s in svds.items()}
        for keep in ("top", "bottom"):
            cut = dict(params)
            for name, svd in svds.items():
                W = _rebuild(svd, ranks[name], keep, params[name])
                cut[name] = W.reshape(params[name].shape)
            out[keep].append(evaluate_params(model, cut, X, y)[1])
        out["rank"].append(ranks)
    out["top"], out["bottom"] = np.array(out["top"]), np.array(out["bottom"])
    return out


def pair_report(model: nn.Module, spec: PermutationSpec, params_a: Params, params_b: Params,
                perms: dict[str, Perms], splits: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
                lambdas, gammas, frac: float) -> dict:
    """Everything the paper measures on one pair, for each permutation of B in `perms`.

    `perms` maps a method name ("none", "WM", "AM", ...) to the permutations of B it found;
    `splits` maps a split name to (X, y). Per method: the L2 distance to A, the loss and accuracy
    paths and barriers on every split, R at every gamma, and the top/bottom singular-vector
    alignment (`group_alignment` with `frac`).
    """
    svds_a, svds_b = layer_svds(spec, params_a), layer_svds(spec, params_b)
    out = {}
    for method, pi in perms.items():
        permuted = apply_permutation(spec, pi, params_b)
        svds_pi = permute_svds(spec, pi, svds_b, params_b)
        row = {"l2": l2_distance(params_a, permuted), "paths": {}}
        for split, (X, y) in splits.items():
            path = interpolation_path(model, params_a, permuted, X, y, lambdas)
            row["paths"][split] = path
            row[f"loss_barrier_{split}"] = barrier(path["loss"], lambdas)
            row[f"acc_barrier_{split}"] = barrier(path["acc"], lambdas, higher_is_better=True)
        for gamma in gammas:
            row[f"R_{gamma:g}"] = r_alignment(svds_a, svds_pi, gamma)["R"]
        groups = group_alignment(spec, svds_a, svds_pi, frac)
        row.update(align_top=groups["top"], align_bottom=groups["bottom"],
                   profiles=groups["profiles"])
        out[method] = row
    return out
