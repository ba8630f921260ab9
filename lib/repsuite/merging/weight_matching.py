"""Permutation search: weight matching (WM), activation matching (AM) and the straight-through
estimator (STE), after Ainsworth, Hayase and Srinivasa (Git Re-Basin, ICLR 2023), as analysed by
Ito, Yamada and Kumagai (ICLR 2025).

WM looks for the permutations `pi` that minimise ||theta_a - pi(theta_b)||^2, i.e. maximise the
inner product <theta_a, pi(theta_b)> (the norms do not depend on `pi`). With all permutations but
one, P_l, held fixed, the objective is linear in P_l: <C_l, P_l> with the cost matrix

    C_l[i, j] = sum over every array W touching P_l of  <W_a[unit i], W_b'[unit j]>,

where W_b' is model B's array with all the *other* permutations already applied (for an MLP: the
rows of W_l and b_l and the columns of W_{l+1}). Each such sub-problem is a linear assignment
problem, solved exactly by `scipy.optimize.linear_sum_assignment`; WM sweeps over the layers in
random order until no layer improves (coordinate descent; it terminates because the objective
strictly increases at every accepted step and there are finitely many permutations).
"""

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from repsuite.merging.permutation import (
    Params,
    Perms,
    PermutationSpec,
    apply_permutation,
    check_pair,
    check_perms,
    identity_perms,
    permute_param,
    view_param,
)
from repsuite.progress import bar


@dataclass
class MatchResult:
    """Permutations found for model B (for `apply_permutation`) and how the search went."""

    perms: Perms
    sweeps: int = 0
    objective: list[float] = field(default_factory=list)  # <theta_a, pi(theta_b)> after each sweep


def solve_lap(cost: np.ndarray) -> np.ndarray:
    """The permutation `col` maximising sum_i cost[i, col[i]], solved exactly."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"a permutation needs a square cost matrix, got shape {cost.shape}")
    if not np.all(np.isfinite(cost)):
        raise ValueError("the cost matrix contains NaN or infinite values")
    rows, cols = linear_sum_assignment(cost, maximize=True)
    out = np.empty(len(rows), dtype=np.int64)
    out[rows] = cols
    return out


def cost_matrix(spec: PermutationSpec, perms: Perms, p: str, params_a: Params, params_b: Params,
                include_bias: bool = True) -> torch.Tensor:
    """C_p[i, j]: inner product of unit i of A with unit j of B over every array touching `p`."""
    total = None
    for name, axis in spec.perm_to_axes[p]:
        if not include_bias and params_a[name].dim() == 1:
            continue
        w_a = view_param(spec, name, params_a[name])
        w_b = permute_param(spec, perms, name, params_b[name], except_axis=axis)
        n = w_a.shape[axis]
        w_a = torch.movedim(w_a, axis, 0).reshape(n, -1)
        w_b = torch.movedim(w_b, axis, 0).reshape(n, -1).to(w_a)
        term = (w_a @ w_b.T).double()
        total = term if total is None else total + term
    if total is None:
        raise ValueError(f"permutation {p} touches no weight array (include_bias=False leaves only "
                         "biases)")
    return total


def matching_objective(spec: PermutationSpec, perms: Perms, params_a: Params,
                       params_b: Params) -> float:
    """<theta_a, pi(theta_b)> summed over all parameter arrays."""
    permuted = apply_permutation(spec, perms, params_b)
    return float(sum(torch.vdot(params_a[k].double().ravel(), permuted[k].double().ravel())
                     for k in params_a))


def weight_matching(spec: PermutationSpec, params_a: Params, params_b: Params, *, seed: int = 0,
                    max_sweeps: int = 100, init: Perms | None = None,
                    include_bias: bool = True) -> MatchResult:
    """Permutations of model B's hidden units that bring its weights closest (L2) to model A's.

    `init` warm-starts the search (the STE projects with it); `include_bias=False` gives the
    bias-free objective of the paper's equations, the default is the general cost over every array.
    """
    check_pair(spec, params_a, params_b)
    if max_sweeps < 1:
        raise ValueError(f"max_sweeps must be >= 1, got {max_sweeps}")
    perms = {p: v.clone() for p, v in (init or identity_perms(spec, params_a)).items()}
    check_perms(spec, perms, params_a)
    rng = np.random.default_rng(seed)
    names = spec.perm_names
    result = MatchResult(perms)

    for sweep in range(max_sweeps):
        improved = False
        for k in rng.permutation(len(names)):
            p = names[k]
            n = len(perms[p])
            if n == 1:  # a width-1 layer has nothing to permute
                continue
            cost = cost_matrix(spec, perms, p, params_a, params_b, include_bias).cpu().numpy()
            new = solve_lap(cost)
            rows = np.arange(n)
            old_value = cost[rows, perms[p].numpy()].sum()
            new_value = cost[rows, new].sum()
            # Accept only a strict gain (relative to the scale of the cost): ties never cycle.
            if new_value > old_value + 1e-12 * max(1.0, np.abs(cost).sum()):
                perms[p] = torch.from_numpy(new)
                improved = True
        result.sweeps = sweep + 1
        result.objective.append(matching_objective(spec, perms, params_a, params_b))
        if not improved:
            break
    return result


def _standardise(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    z = z - z.mean(0)
    return z / (z.std(0) + 1e-12)


def activation_matching(spec: PermutationSpec, acts_a: dict[str, torch.Tensor],
                        acts_b: dict[str, torch.Tensor]) -> MatchResult:
    """AM: for each hidden layer, the assignment maximising the correlation of the two models'
    units.

    `acts_x[p]` holds the activations of the units that permutation `p` acts on, one row per
    example (conv features flattened to rows of channels). Layers are independent: a unit's
    activation does not depend on how the units of other layers are ordered.
    """
    perms = {}
    for p in spec.perm_names:
        if p not in acts_a or p not in acts_b:
            raise KeyError(f"activations for {p} are missing; given {sorted(acts_a)} and "
                           f"{sorted(acts_b)}")
        za, zb = acts_a[p], acts_b[p]
        if za.shape != zb.shape or za.dim() != 2:
            raise ValueError(f"{p}: activations must be two (examples x units) arrays of one "
                             f"shape, got {tuple(za.shape)} and {tuple(zb.shape)}")
        if len(za) < 2:
            raise ValueError(f"{p}: correlations need at least 2 examples, got {len(za)}")
        if not (torch.isfinite(za).all() and torch.isfinite(zb).all()):
            raise ValueError(f"{p}: activations contain NaN or infinite values")
        corr = _standardise(za).T @ _standardise(zb) / len(za)
        perms[p] = torch.from_numpy(solve_lap(corr.cpu().numpy()))
    return MatchResult(perms, sweeps=1)


def mlp_activations(model: nn.Module, params: Params, X: torch.Tensor) -> dict[str, torch.Tensor]:
    """Post-ReLU activations of an MLP's hidden layers, keyed by the permutation acting on them."""
    with torch.no_grad():
        hidden = _loaded(model, params).hidden(X)
    return {f"P_{i + 1}": h for i, h in enumerate(hidden)}


def _loaded(model: nn.Module, params: Params) -> nn.Module:
    clone = copy.deepcopy(model)
    clone.load_state_dict(params)
    return clone.eval()


def ste_matching(model: nn.Module, spec: PermutationSpec, params_a: Params, params_b: Params,
                 X: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float = 1e-3,
                 batch_size: int = 128, seed: int = 0, progress: bool = False) -> MatchResult:
    """STE: learn a proxy theta~ whose nearest permuted B minimises the loss at the path's midpoint.

    Each step projects the proxy onto the permutations of B by WM (warm-started from the last step),
    evaluates the cross-entropy of (theta_a + pi(theta_b)) / 2 on a batch, and passes the gradient
    with respect to pi(theta_b) straight through to the proxy (Ainsworth et al. 2023, Sec. 3.3).
    The proxy starts at theta_a, as in their code.
    """
    check_pair(spec, params_a, params_b)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if len(X) != len(y) or len(X) < batch_size:
        raise ValueError(f"STE needs at least batch_size={batch_size} labelled examples, got "
                         f"{len(X)} inputs and {len(y)} labels")
    proxy = {k: v.detach().clone().requires_grad_(True) for k, v in params_a.items()}
    opt = torch.optim.Adam(proxy.values(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    perms = identity_perms(spec, params_a)

    for step in bar(range(steps), enabled=progress, leave=False):
        detached = {k: v.detach() for k, v in proxy.items()}
        perms = weight_matching(spec, detached, params_b, init=perms, seed=seed + step,
                                max_sweeps=20).perms
        projected = apply_permutation(spec, perms, params_b)
        merged = {k: 0.5 * (params_a[k] + proxy[k] + (projected[k] - proxy[k]).detach())
                  for k in proxy}
        idx = torch.randint(len(X), (batch_size,), generator=g).to(X.device)
        loss = nn.functional.cross_entropy(torch.func.functional_call(model, merged, (X[idx],)),
                                           y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    detached = {k: v.detach() for k, v in proxy.items()}
    perms = weight_matching(spec, detached, params_b, init=perms, seed=seed + steps).perms
    return MatchResult(perms, sweeps=steps)
