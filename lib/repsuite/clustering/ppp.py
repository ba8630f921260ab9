"""Probabilistic Partitive Partitioning (PPP): k-means splits, validated by Gaussian mixtures.

M. Sultan, "Probabilistic Partitive Partitioning (PPP)", arXiv 2003.04372 (2020).

The paper combines a combinatorial method (k-means, cheap on large data) that proposes partitions
with a probabilistic one (a Gaussian mixture) that validates them, so that the clusters do not
depend on the initial conditions and their number need not be fixed in advance. Its method
section could not be read for this replication; the rule below is OUR READING of the abstract, a
top-down (partitive) bisection:

    start with one node holding all points; for every node S, in breadth-first order:
      1. propose: split S in two by k-means (k-means++ starts, best of `n_init`);
      2. validate: fit Gaussian mixtures with one and with two components on S, the second one
         started from the k-means split; the gain is
             delta_BIC = BIC(1 component) - BIC(2 components)
         and the agreement is the adjusted Rand index between the k-means split and the
         mixture's most probable components;
      3. accept the split when delta_BIC > `delta` and agreement >= `tau` (and both halves hold
         at least `min_child` points); the two k-means halves become nodes;
    stop when no node is accepted, or a node has fewer than `n_min` points or reaches
    `max_depth`. The clusters are the leaves; their number is found, not given.

Every point also gets a posterior: the product, over the accepted splits on its path, of the
mixture's responsibility for the side the point went to. Points whose posterior exceeds
`core_level` form the "separable set" (the abstract's most separable subset of the data).

For large nodes the validation may use a seeded subsample of at most `gmm_max_points` points
(the mixture is then evaluated on all of the node's points for the posterior); by default it
uses all of them.
"""

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from repsuite.clustering import core


@dataclass
class Node:
    """One node of the split tree."""

    id: int
    parent: int | None
    depth: int
    size: int
    status: str  # "accepted", or why not: bic, agreement, small child, n_min, depth, duplicates
    delta_bic: float = math.nan  # BIC(1) - BIC(2), > 0 when two components are preferred
    agreement: float = math.nan  # ARI between the k-means split and the mixture's split
    children: tuple[int, int] | None = None
    leaf: int | None = None  # cluster label of a leaf


@dataclass
class PPPResult:
    labels: np.ndarray  # (n,) cluster (leaf) of every point, 0..k-1
    k: int  # number of clusters found
    posterior: np.ndarray  # (n,) probability of the point's own leaf along its path
    nodes: list[Node]
    work: int  # point-iterations of k-means and EM (a machine-independent cost)
    params: dict = field(default_factory=dict)

    def core(self, level: float | None = None) -> np.ndarray:
        """Mask of the separable set: points whose path posterior exceeds `level`."""
        return self.posterior > (self.params["core_level"] if level is None else level)

    @property
    def accepted(self) -> list[Node]:
        return [n for n in self.nodes if n.status == "accepted"]


def ari(a, b) -> float:
    """Adjusted Rand index from the contingency table (scikit-learn's formula, without its
    input checks: a hot loop here)."""
    a = np.unique(np.asarray(a), return_inverse=True)[1]
    b = np.unique(np.asarray(b), return_inverse=True)[1]
    if len(a) != len(b):
        raise ValueError(f"the two clusterings label {len(a)} and {len(b)} points")
    table = np.bincount(a * (b.max() + 1) + b, minlength=(a.max() + 1) * (b.max() + 1))
    n = len(a)
    pairs = (table * (table - 1)).sum() / 2
    rows = np.bincount(a)
    cols = np.bincount(b)
    sum_a, sum_b = (rows * (rows - 1)).sum() / 2, (cols * (cols - 1)).sum() / 2
    expected = sum_a * sum_b / (n * (n - 1) / 2) if n > 1 else 0.0
    top = (sum_a + sum_b) / 2
    if top == expected:  # both trivial (one cluster, or all singletons): identical partitions
        return 1.0
    return float((pairs - expected) / (top - expected))


def node_seed(seed: int, node: int) -> int:
    """An independent seed for each node, so a node's draws do not depend on the visiting order."""
    return int(np.random.SeedSequence([seed, node]).generate_state(1)[0])


def responsibilities(X: torch.Tensor, fit: core.GMMResult) -> torch.Tensor:
    """(n, k) posterior of each component of a fitted mixture at the points X."""
    log_dens = core.component_log_density(X, fit.means, fit.covariances, fit.covariance)
    return torch.softmax(log_dens + torch.log(fit.weights), dim=1)


def validate_split(X: torch.Tensor, split: torch.Tensor, *, covariance: str = "full",
                   reg_covar: float = 1e-6, max_iter: int = 200, tol: float = 1e-6):
    """Compare one and two Gaussian components on the points X of a node, the second mixture
    started from the k-means `split` (0/1 labels). Returns delta_BIC = BIC(1) - BIC(2), the
    agreement (adjusted Rand index of the split and the mixture's hard assignment), the two-
    component fit, and the mixture component that matches k-means side 0."""
    one = core.gmm(X, 1, covariance=covariance, reg_covar=reg_covar, max_iter=max_iter, tol=tol)
    two = core.gmm(X, 2, covariance=covariance, reg_covar=reg_covar, max_iter=max_iter, tol=tol,
                   init=split)
    delta_bic = one.bic - two.bic
    hard = two.labels.cpu().numpy()
    agreement = ari(split.cpu().numpy(), hard)
    side0 = int(np.bincount(hard[split.cpu().numpy() == 0], minlength=2).argmax())
    return delta_bic, agreement, two, side0, one.n_iter + two.n_iter


@dataclass(frozen=True)
class Rule:
    """The acceptance rule and the split's settings (see `ppp`)."""

    delta: float = 10.0
    tau: float = 0.9
    n_min: int = 10
    min_child: int | None = None
    max_depth: int = 12
    n_init: int = 5
    covariance: str = "full"
    reg_covar: float = 1e-6
    tol: float = 1e-4
    gmm_max_points: int | None = None
    core_level: float = 0.95
    seed: int = 0

    def check(self, d: int) -> "Rule":
        """The rule with `min_child` filled in for d features, or a clear error."""
        min_child = d + 1 if self.min_child is None else self.min_child
        if not (self.tau <= 1 and self.n_min >= 2 and min_child >= 1 and self.max_depth >= 0
                and self.n_init >= 1 and 0 < self.core_level < 1):
            raise ValueError(f"need tau <= 1, n_min >= 2, min_child >= 1, max_depth >= 0, "
                             f"n_init >= 1 and 0 < core_level < 1; got {self}")
        if self.gmm_max_points is not None and self.gmm_max_points < 2 * min_child:
            raise ValueError(f"gmm_max_points={self.gmm_max_points} leaves too few points to "
                             f"validate halves of at least {min_child}")
        return Rule(**{**self.__dict__, "min_child": min_child})


def ppp(X, *, delta: float = 10.0, tau: float = 0.9, n_min: int = 10, min_child: int | None = None,
        max_depth: int = 12, n_init: int = 5, covariance: str = "full", reg_covar: float = 1e-6,
        tol: float = 1e-4, gmm_max_points: int | None = None, core_level: float = 0.95,
        seed: int = 0, device=None) -> PPPResult:
    """Cluster X by PPP (our reading, see the module docstring).

    delta: margin by which the two-component BIC must beat the one-component BIC; tau: least
    agreement between the k-means split and the mixture; n_min: smallest node that is split;
    min_child: smallest accepted half (default d + 1, the least that gives a full covariance of
    rank d); max_depth: deepest node that is split; n_init: k-means++ starts per split;
    covariance, reg_covar, tol: the mixtures' covariance type, regularisation and EM tolerance;
    gmm_max_points: subsample cap of the validation; core_level: posterior of the separable set;
    seed: seeds every node's k-means (and subsample).
    """
    X = core.as_points(X, device)
    n, d = X.shape
    rule = Rule(delta, tau, n_min, min_child, max_depth, n_init, covariance, reg_covar, tol,
                gmm_max_points, core_level, seed).check(d)

    posterior = torch.ones(n, dtype=X.dtype, device=X.device)
    labels = torch.empty(n, dtype=torch.long, device=X.device)
    nodes = [Node(0, None, 0, n, status="pending")]
    members = {0: torch.arange(n, device=X.device)}
    queue, work, k = deque([0]), 0, 0

    while queue:
        node = nodes[queue.popleft()]
        idx = members.pop(node.id)
        if node.size < rule.n_min:
            node.status = "n_min"
        elif node.depth >= rule.max_depth:
            node.status = "depth"
        else:
            children, w = _try_split(X, idx, node, rule, posterior)
            work += w
            for part in children:
                child = Node(len(nodes), node.id, node.depth + 1, len(part), status="pending")
                nodes.append(child)
                members[child.id] = part
                queue.append(child.id)
            if children:
                node.children = (nodes[-2].id, nodes[-1].id)
        if node.status != "accepted":
            node.leaf, labels[idx] = k, k
            k += 1

    return PPPResult(labels.cpu().numpy(), k, posterior.cpu().numpy(), nodes, work,
                     dict(rule.__dict__))


def _try_split(X, idx, node, rule, posterior):
    """Propose, validate and (maybe) accept the split of one node, setting its status; returns
    the two halves' point indices (none if rejected) and the work done."""
    Xs = X[idx]
    if core.n_distinct(Xs) < 2:
        node.status = "duplicates"
        return (), 0

    # 1. Propose: k-means in two, best of n_init k-means++ starts.
    km = core.kmeans(Xs, 2, n_init=rule.n_init, seed=node_seed(rule.seed, node.id))
    split = km.labels
    sizes = torch.bincount(split, minlength=2)
    work = node.size * km.total_iter
    if int(sizes.min()) < rule.min_child:
        node.status = "small child"
        return (), work

    # 2. Validate on the node (or on a seeded subsample of it, for very large nodes).
    sub = torch.arange(node.size, device=X.device)
    if rule.gmm_max_points is not None and node.size > rule.gmm_max_points:
        g = torch.Generator(device=X.device).manual_seed(node_seed(rule.seed + 1, node.id))
        sub = torch.randperm(node.size, generator=g, device=X.device)[:rule.gmm_max_points]
        if int(torch.bincount(split[sub], minlength=2).min()) < rule.min_child:
            node.status = "small child"
            return (), work
    delta_bic, agreement, two, side0, em_iter = validate_split(
        Xs[sub], split[sub], covariance=rule.covariance, reg_covar=rule.reg_covar, tol=rule.tol)
    node.delta_bic, node.agreement = float(delta_bic), float(agreement)
    work += len(sub) * em_iter

    # 3. Accept when both the BIC gain and the agreement pass.
    if not delta_bic > rule.delta:
        node.status = "bic"
        return (), work
    if agreement < rule.tau:
        node.status = "agreement"
        return (), work
    node.status = "accepted"
    resp = responsibilities(Xs, two)
    posterior[idx] *= torch.where(split == 0, resp[:, side0], resp[:, 1 - side0])
    return (idx[split == 0], idx[split == 1]), work
