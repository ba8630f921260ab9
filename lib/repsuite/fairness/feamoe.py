"""FEAMOE: a fair, explainable and adaptive mixture of logistic-regression experts.

Sharma, Henderson and Ghosh, "FEAMOE: Fair, Explainable and Adaptive Mixture of Experts",
IJCAI 2023 (arXiv 2210.04995).

The model is p(y=1 | x) = sum_k g_k(x) sigma(z_k(x)), with linear experts z_k(x) = w_k.x + b_k and
a softmax gate g(x) = softmax(V x + c). It learns window by window on a stream, minimising the
mixture's log-loss plus lambda times a differentiable fairness gap between the groups of a
sensitive attribute (which is never an input):

- `dp`: demographic parity, the spread of the groups' mean predicted probability;
- `eo`: equalized odds, the same spread among the positives plus the spread among the negatives;
- `burden`: the spread of the groups' mean distance to the decision boundary among the rows that
  get the unfavourable prediction (the recourse gap). With linear experts the distance to expert
  k's boundary is |z_k(x)| / ||w_k||, in closed form; the mixture's is their gate-weighted mean.

Adaptivity: a `DriftDetector` compares each new window's accuracy and fairness gap, measured
before the model sees its labels, with the windows since the last change. On drift, `grow` adds
experts: each new expert is first fitted alone on the recent window, then joins the mixture with
the gate row of an average old expert, its bias lowered by `offset` (a gate share of at most
e^-offset: a large offset keeps predictions continuous, 0 lets the new expert take over within a
few steps); the older experts are frozen and only the newest experts and the gate keep learning.

Explanations: the interventional Shapley value of feature j for expert k's log-odds is
w_kj (x_j - E x_j). `explain_fast` combines them with the gate at x, phi_j(x) = sum_k g_k(x) w_kj
(x_j - E x_j): exact for the gated log-odds sum_k g_k z_k when the gate is held at g(x), and an
approximation of the Shapley values of the model's real outputs, which `shapley_exact` computes by
enumerating every coalition of features.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NOTIONS = ("dp", "eo", "burden")
EPS = 1e-6


# -------------------------------------------------------------------------------------------------
# Input checks, in the caller's terms


def as_features(X, device=None, name: str = "X") -> torch.Tensor:
    """A finite 2-D float32 tensor with at least one row."""
    X = torch.as_tensor(np.asarray(X) if not torch.is_tensor(X) else X, dtype=torch.float32,
                        device=device)
    if X.ndim != 2 or len(X) == 0:
        raise ValueError(f"{name} must be a non-empty (rows, features) matrix, got shape "
                         f"{tuple(X.shape)}")
    if not torch.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return X


def check_batch(X: torch.Tensor, y=None, group=None):
    """Features, 0/1 labels and integer group codes of one batch, checked against each other."""
    X = as_features(X)
    n = len(X)
    if y is not None:
        y = torch.as_tensor(y, device=X.device)
        if y.shape != (n,):
            raise ValueError(f"y must hold one label per row of X ({n}), got shape "
                             f"{tuple(y.shape)}")
        if not ((y == 0) | (y == 1)).all():
            raise ValueError("y must hold 0/1 labels")
        y = y.float()
    if group is not None:
        group = torch.as_tensor(group, device=X.device)
        if group.shape != (n,):
            raise ValueError(f"group must hold one code per row of X ({n}), got shape "
                             f"{tuple(group.shape)}")
        if group.is_floating_point() or (group < 0).any():
            raise ValueError("group must hold non-negative integer codes")
        group = group.long()
    return X, y, group


def _check_notion(notion: str) -> None:
    if notion not in NOTIONS:
        raise ValueError(f"fairness notion must be one of {NOTIONS}, got {notion!r}")


# -------------------------------------------------------------------------------------------------
# The model


class FEAMOE(nn.Module):
    """A mixture of logistic-regression experts under a linear softmax gate, grown by generations.

    Parameters are kept in blocks, one per generation of experts, so that older generations can
    be frozen while the newest one and the gate learn.
    """

    def __init__(self, n_features: int, n_experts: int = 1, *, init_scale: float = 0.1,
                 seed: int = 0, device=None):
        super().__init__()
        if n_features < 1 or n_experts < 1:
            raise ValueError(f"need n_features >= 1 and n_experts >= 1, got {n_features} and "
                             f"{n_experts}")
        self.n_features = n_features
        self.W, self.b = nn.ParameterList(), nn.ParameterList()
        self.V, self.c = nn.ParameterList(), nn.ParameterList()
        gen = torch.Generator().manual_seed(seed)
        # Random gate rows break the symmetry between the first experts; a single expert is plain
        # logistic regression whatever its gate.
        self._append(init_scale * torch.randn(n_experts, n_features, generator=gen),
                     init_scale * torch.randn(n_experts, generator=gen),
                     init_scale * torch.randn(n_experts, n_features, generator=gen),
                     torch.zeros(n_experts))
        self.to(device)

    def _append(self, W, b, V, c) -> None:
        device = self.W[0].device if len(self.W) else None
        for plist, value in zip((self.W, self.b, self.V, self.c), (W, b, V, c), strict=True):
            plist.append(nn.Parameter(value.detach().clone().float().to(device)))

    @property
    def n_experts(self) -> int:
        return sum(len(b) for b in self.b)

    @property
    def n_generations(self) -> int:
        return len(self.b)

    def experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts' weights (K, d) and biases (K,)."""
        return torch.cat(list(self.W)), torch.cat(list(self.b))

    def expert_logits(self, x: torch.Tensor) -> torch.Tensor:
        W, b = self.experts()
        return x @ W.T + b

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        return x @ torch.cat(list(self.V)).T + torch.cat(list(self.c))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.gate_logits(x), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """p(y = 1 | x), one value per row."""
        return (self.gate(x) * torch.sigmoid(self.expert_logits(x))).sum(1)

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        """log p - log(1 - p), computed from log-probabilities so that it never saturates."""
        log_g = torch.log_softmax(self.gate_logits(x), dim=1)
        z = self.expert_logits(x)
        return (torch.logsumexp(log_g + F.logsigmoid(z), dim=1)
                - torch.logsumexp(log_g + F.logsigmoid(-z), dim=1))

    def gated_log_odds(self, x: torch.Tensor) -> torch.Tensor:
        """sum_k g_k(x) z_k(x): the experts' log-odds averaged by the gate."""
        return (self.gate(x) * self.expert_logits(x)).sum(1)

    def boundary_distance(self, x: torch.Tensor) -> torch.Tensor:
        """Gate-weighted distance |z_k(x)| / ||w_k|| to the experts' decision boundaries."""
        W, b = self.experts()
        dist = (x @ W.T + b).abs() / W.norm(dim=1).clamp_min(EPS)
        return (self.gate(x) * dist).sum(1)

    @torch.no_grad()
    def add_experts(self, W: torch.Tensor, b: torch.Tensor, *, offset: float = 4.0) -> None:
        """Append a generation of experts with weights `W` (m, d) and biases `b` (m,).

        Their gate rows are the mean of the existing rows with the bias lowered by `offset` +
        log m, so each new logit is at most the largest old one minus that: together the new
        experts get a gate share of at most e^-offset at every x, and p(x) moves by at most that.
        """
        W, b = torch.as_tensor(W).float(), torch.as_tensor(b).float()
        if W.ndim != 2 or W.shape[1] != self.n_features or b.shape != (len(W),):
            raise ValueError(f"new experts need W of shape (m, {self.n_features}) and b of shape "
                             f"(m,), got {tuple(W.shape)} and {tuple(b.shape)}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        m = len(W)
        V_old, c_old = torch.cat(list(self.V)), torch.cat(list(self.c))
        V_new = V_old.mean(0, keepdim=True).expand(m, -1)
        c_new = (c_old.mean() - offset - math.log(m)).expand(m)
        self._append(W, b, V_new, c_new)

    def freeze_old_experts(self) -> None:
        """Only the newest generation of experts (and the whole gate) keeps learning."""
        for i in range(self.n_generations):
            trainable = i == self.n_generations - 1
            self.W[i].requires_grad_(trainable)
            self.b[i].requires_grad_(trainable)


# -------------------------------------------------------------------------------------------------
# The objective: log-loss plus lambda times a differentiable group gap


def group_gap(values: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Largest minus smallest per-group mean of `values` over the groups present (0 if < 2)."""
    if len(values) == 0:
        return values.new_zeros(())
    n_groups = int(group.max()) + 1
    counts = torch.bincount(group, minlength=n_groups)
    sums = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add(
        0, group, values)
    present = counts > 0
    if present.sum() < 2:
        return values.new_zeros(())
    means = sums[present] / counts[present].to(values.dtype)
    return means.max() - means.min()


def unfavourable(p: torch.Tensor, favorable: int) -> torch.Tensor:
    """Rows whose hard prediction is the unfavourable outcome."""
    if favorable not in (0, 1):
        raise ValueError(f"favorable must be the label 0 or 1, got {favorable!r}")
    return (p < 0.5) if favorable == 1 else (p >= 0.5)


def fairness_penalty(notion: str, model: nn.Module, x, p, y, group, favorable: int = 1):
    """The differentiable gap that FEAMOE's loss adds, for predictions `p = model(x)`."""
    _check_notion(notion)
    if notion == "dp":
        return group_gap(p, group)
    if notion == "eo":
        pos, neg = y == 1, y == 0
        return group_gap(p[pos], group[pos]) + group_gap(p[neg], group[neg])
    if not isinstance(model, FEAMOE):
        raise ValueError("the burden penalty needs linear experts (a FEAMOE model)")
    rows = unfavourable(p.detach(), favorable)
    return group_gap(model.boundary_distance(x[rows]), group[rows])


def objective(model: nn.Module, x, y, group, *, lam: float = 0.0, notion: str = "dp",
              favorable: int = 1):
    """(loss, log-loss, penalty) on one batch; the penalty is skipped when lam is 0.

    `model` is any module with a `logit(x)` method (log-odds of y = 1, one value per row).
    """
    logit = model.logit(x)
    p = torch.sigmoid(logit)
    nll = F.binary_cross_entropy_with_logits(logit, y)
    if lam == 0:
        return nll, nll.detach(), p.new_zeros(())
    pen = fairness_penalty(notion, model, x, p, y, group, favorable)
    return nll + lam * pen, nll.detach(), pen.detach()


def train(model: nn.Module, X, y, group=None, *, steps: int, lr: float, lam: float = 0.0,
          notion: str = "dp", favorable: int = 1, params=None) -> float:
    """`steps` full-batch Adam steps on the batch; returns the final loss.

    Only parameters that require gradients are updated (`params` narrows them further). A fresh
    optimiser each call: a window's few steps start from the model, not from stale moments.
    """
    X, y, group = check_batch(X, y, group)
    if lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    if lam > 0 and group is None:
        raise ValueError("a fairness penalty (lambda > 0) needs the group codes")
    _check_notion(notion)
    params = [q for q in (params if params is not None else model.parameters())
              if q.requires_grad]
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not params or steps == 0:
        return float("nan")
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss, _, _ = objective(model, X, y, group, lam=lam, notion=notion, favorable=favorable)
        loss.backward()
        opt.step()
    return float(loss.detach())


def grow(model: FEAMOE, X, y, group, *, steps: int, lr: float, lam: float = 0.0,
         notion: str = "dp", favorable: int = 1, n_new: int = 1, offset: float = 0.0,
         freeze_old: bool = True, init: str = "random", seed: int = 0) -> None:
    """Add `n_new` experts for the window (X, y, group), using `steps` optimiser steps in all.

    Half the steps fit the new experts alone (a fair mixture of `n_new` experts) on the window;
    they then join `model` with a small gate share, and the other half trains the gate and the
    new experts (the old ones frozen when `freeze_old`) on the mixture's objective.
    """
    if n_new < 1:
        raise ValueError(f"n_new must be >= 1, got {n_new}")
    X, y, group = check_batch(X, y, group)
    if init not in ("random", "clone"):
        raise ValueError(f"init must be 'random' or 'clone', got {init!r}")
    solo = FEAMOE(model.n_features, n_new, seed=seed, device=X.device)
    if init == "clone":
        # Start from the expert the mixture uses on this window (gate-weighted mean of experts).
        with torch.no_grad():
            share = model.gate(X).mean(0)
            W, b = model.experts()
            solo.W[0].copy_((share @ W).expand(n_new, -1))
            solo.b[0].copy_((share @ b).expand(n_new))
    train(solo, X, y, group, steps=steps // 2, lr=lr, lam=lam, notion=notion,
          favorable=favorable)
    W, b = solo.experts()
    model.add_experts(W, b, offset=offset)
    if freeze_old:
        model.freeze_old_experts()
    train(model, X, y, group, steps=steps - steps // 2, lr=lr, lam=lam, notion=notion,
          favorable=favorable)


# -------------------------------------------------------------------------------------------------
# Drift detection


class DriftDetector:
    """Flags a window whose accuracy falls, or whose fairness gap rises, beyond the reference.

    The reference is the mean over the windows since the start or the last flag. A window
    drifts when accuracy falls by more than `tol_acc` + z * its standard error, or the gap rises
    by more than `tol_gap` + z * its standard error: a change larger than the window's sampling
    noise plus a tolerance. After a flag the reference starts again from the next window.
    """

    def __init__(self, tol_acc: float = 0.02, tol_gap: float = 0.02, z: float = 2.0):
        if min(tol_acc, tol_gap, z) < 0:
            raise ValueError("detector tolerances and z must be >= 0")
        self.tol_acc, self.tol_gap, self.z = tol_acc, tol_gap, z
        self.accs: list[float] = []
        self.gaps: list[float] = []

    def check(self, acc: float, gap: float, se_acc: float = 0.0, se_gap: float = 0.0) -> str:
        """'' when the window looks like the reference, else the reason (accuracy or fairness)."""
        if not (math.isfinite(acc) and math.isfinite(se_acc) and math.isfinite(se_gap)):
            raise ValueError(f"window statistics must be finite, got acc={acc}, "
                             f"se_acc={se_acc}, se_gap={se_gap}")
        if not self.accs:
            self.accs.append(acc)
            self.gaps.append(gap)
            return ""
        reasons = []
        if float(np.mean(self.accs)) - acc > self.tol_acc + self.z * se_acc:
            reasons.append("accuracy")
        gaps = [g for g in self.gaps if math.isfinite(g)]
        if gaps and math.isfinite(gap) and gap - float(np.mean(gaps)) > self.tol_gap + \
                self.z * se_gap:
            reasons.append("fairness")
        if reasons:
            self.accs, self.gaps = [], []
            return "+".join(reasons)
        self.accs.append(acc)
        self.gaps.append(gap)
        return ""


# -------------------------------------------------------------------------------------------------
# Explanations


@torch.no_grad()
def explain_fast(model: FEAMOE, X, background) -> torch.Tensor:
    """phi_j(x) = sum_k g_k(x) w_kj (x_j - mean_j), one row of d values per row of X."""
    X, background = as_features(X), as_features(background, X.device, "background")
    if X.shape[1] != model.n_features or background.shape[1] != model.n_features:
        raise ValueError(f"the model has {model.n_features} features; X has {X.shape[1]} and "
                         f"the background {background.shape[1]}")
    W, _ = model.experts()
    return (model.gate(X) @ W) * (X - background.mean(0))


def shapley_weights(d: int) -> np.ndarray:
    """|S|! (d - |S| - 1)! / d! for coalition sizes 0..d-1."""
    return np.array([math.factorial(s) * math.factorial(d - s - 1) / math.factorial(d)
                     for s in range(d)])


@torch.no_grad()
def shapley_exact(f, X, background, *, max_features: int = 16) -> torch.Tensor:
    """Exact interventional Shapley values of `f` by enumerating all 2^d coalitions.

    The value of a coalition S at x is the mean of f over the background rows with the features
    in S set to x's values; each feature's Shapley value is the weighted mean of its marginal
    contributions over the coalitions without it.
    """
    X = as_features(X)
    background = as_features(background, X.device, "background")
    d = X.shape[1]
    if background.shape[1] != d:
        raise ValueError(f"X has {d} features and the background {background.shape[1]}")
    if d > max_features:
        raise ValueError(f"exact enumeration needs 2^d coalitions: d = {d} is above "
                         f"max_features = {max_features}")
    codes = torch.arange(2 ** d, device=X.device)
    bits = 2 ** torch.arange(d, device=X.device)
    masks = (codes[:, None] & bits) > 0                      # (2^d, d): feature j in coalition S
    size = masks.sum(1)
    weight = torch.as_tensor(shapley_weights(d), dtype=torch.float32, device=X.device)
    phi = torch.empty_like(X)
    for i, x in enumerate(X):
        inputs = torch.where(masks[:, None, :], x, background[None])    # (2^d, nb, d)
        v = f(inputs.reshape(-1, d)).reshape(2 ** d, -1).mean(1)
        for j in range(d):
            without = codes[~masks[:, j]]
            phi[i, j] = (weight[size[without]] * (v[without | bits[j]] - v[without])).sum()
    return phi
