"""Learning from label proportions by belief propagation (LLP-BP; Havaldar et al., ICLR 2024,
arXiv 2310.08056).

Only the number of positives `k_b` of each bag `b` is known for the training instances. LLP-BP
alternates two steps:

1. *Pseudo-labelling.* A Gibbs distribution over the binary labels y in {0, 1}^n,

       log p(y) = - sim_lambda * sum_{(i,j) in kNN} s_ij (y_i - y_j)^2
                  - sum_b beta_b (sum_{i in b} y_i - k_b)^2 + const,

   rewards equal labels on a k-nearest-neighbour graph of the covariates (edge similarity s_ij)
   and penalises bags whose label count misses the known one. Both terms expand into unary fields
   and pairwise couplings, so the distribution is a binary pairwise MRF (an Ising model);
   damped loopy belief propagation gives its marginals, the soft pseudo-labels.
2. *Embedding refinement.* An MLP is fitted to the (thresholded) pseudo-labels, plus a bag-level
   loss on the mean embedding of each bag ("aggregate embedding"); an intermediate layer gives new
   covariates, the kNN graph is rebuilt on them and step 1 runs again. The MLP of the last round
   is the classifier.

This module holds the model: the potentials, the kNN graph, loopy BP (dense per-bag cliques plus a
sparse edge list, vectorised over all directed messages), exact marginals by enumeration (for the
tests) and `fit_llp_bp`, which runs the rounds for several bag partitions of the same instances
at once; the networks are trained by `repsuite.weak.llp_training`.
"""

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import rankdata

from repsuite.weak.bags import bag_proportions, check_bags
from repsuite.weak.llp_training import Objective, train_models

BAG_SCALINGS = ("none", "size")
MAX_EXACT = 20  # exact marginals enumerate 2^n states


def _finite_matrix(X, name: str = "X") -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) < 2:
        raise ValueError(f"{name} must be an (n, d) array with n >= 2 rows, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return X


def bag_counts(y, bags) -> np.ndarray:
    """Number of positive labels in each bag: the only supervision LLP-BP receives."""
    bags = check_bags(bags, len(np.asarray(y)))
    props = bag_proportions(y, bags)
    return np.rint(props * np.bincount(bags[bags >= 0])).astype(np.int64)


def auc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted one half); 0.5 when every score ties."""
    scores, labels = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel()
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# -------------------------------------------------------------------------------------------------
# The Gibbs distribution as a binary pairwise MRF


@dataclass
class PairwiseMRF:
    """log p(y) = sum_i h_i y_i + sum_e J_e y_u y_v + sum_b sum_{i<j in b} C_b[i, j] y_i y_j + c.

    `members` (m, s) lists each bag's instances, padded with -1 to the largest bag; `clique`
    (m, s, s) holds the symmetric couplings between members of a bag (zero diagonal and padding).
    `edges` (E, 2) are the remaining pairs, none of them inside a bag.
    """

    h: torch.Tensor
    edges: torch.Tensor
    J: torch.Tensor
    members: torch.Tensor
    clique: torch.Tensor

    @property
    def n(self) -> int:
        return len(self.h)

    def log_potential(self, y: torch.Tensor) -> torch.Tensor:
        """Unnormalised log-probability of label vectors `y` (..., n) with 0/1 entries."""
        y = y.to(self.h.dtype)
        out = y @ self.h
        if len(self.edges):
            out = out + (y[..., self.edges[:, 0]] * y[..., self.edges[:, 1]]) @ self.J
        if len(self.members):
            ym = y[..., self.members.clamp(min=0)] * (self.members >= 0)
            out = out + 0.5 * torch.einsum("...ms,mst,...mt->...", ym, self.clique, ym)
        return out


def bag_terms(bags, counts, bag_lambda, *, scaling: str = "none"):
    """Unary fields and per-bag couplings of the bag potential -beta_b (sum_{i in b} y_i - k_b)^2.

    Expanding the square with y_i^2 = y_i: -beta_b (sum y)^2 + 2 beta_b k_b sum y - beta_b k_b^2
    = sum_i beta_b (2 k_b - 1) y_i - 2 beta_b sum_{i<j} y_i y_j + const. Returns (h (n,), J_bag
    (m,)). `scaling="size"` uses beta_b = bag_lambda / |b| (the field a bag puts on one instance
    then stays of the same order at every bag size); "none" uses beta_b = bag_lambda.
    """
    bags = check_bags(bags)
    sizes = np.bincount(bags[bags >= 0])
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != sizes.shape:
        raise ValueError(f"{len(counts)} bag counts for {len(sizes)} bags")
    if (counts < 0).any() or (counts > sizes).any():
        bad = int(np.flatnonzero((counts < 0) | (counts > sizes))[0])
        raise ValueError(f"bag {bad} has {sizes[bad]} instances but a count of {counts[bad]:g}")
    if scaling not in BAG_SCALINGS:
        raise ValueError(f"scaling must be one of {BAG_SCALINGS}, got {scaling!r}")
    if bag_lambda < 0:
        raise ValueError(f"bag_lambda must be >= 0, got {bag_lambda}")
    beta = bag_lambda / sizes if scaling == "size" else np.full(len(sizes), float(bag_lambda))
    h = np.zeros(len(bags))
    inside = bags >= 0
    h[inside] = (beta * (2 * counts - 1))[bags[inside]]
    return h, -2 * beta


def similarity_terms(n: int, edges, weights, sim_lambda):
    """Unary fields and couplings of -sim_lambda sum_e s_e (y_u - y_v)^2: for 0/1 labels
    (y_u - y_v)^2 = y_u + y_v - 2 y_u y_v, so each endpoint gets -sim_lambda s_e and the pair
    +2 sim_lambda s_e. Returns (h (n,), J (E,))."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) != len(edges):
        raise ValueError(f"{len(weights)} similarities for {len(edges)} edges")
    if len(edges) and (edges.min() < 0 or edges.max() >= n or (edges[:, 0] == edges[:, 1]).any()):
        raise ValueError(f"edges must join two different instances among 0..{n - 1}")
    if sim_lambda < 0:
        raise ValueError(f"sim_lambda must be >= 0, got {sim_lambda}")
    h = np.zeros(n)
    np.add.at(h, edges[:, 0], -sim_lambda * weights)
    np.add.at(h, edges[:, 1], -sim_lambda * weights)
    return h, 2 * sim_lambda * weights


def nearest_neighbors(Z: torch.Tensor, n_neighbors: int, metric: str = "cosine",
                      chunk: int = 2048) -> torch.Tensor:
    """Indices (n, n_neighbors) of each row's nearest other rows by cosine or Euclidean distance,
    computed in row chunks (ties go to the lower index)."""
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be cosine or euclidean, got {metric!r}")
    if metric == "cosine":
        norms = Z.norm(dim=1, keepdim=True)
        Z = Z / torch.where(norms > 0, norms, torch.ones_like(norms))
    sq = (Z * Z).sum(1)
    out = []
    for start in range(0, len(Z), chunk):
        rows = torch.arange(start, min(start + chunk, len(Z)), device=Z.device)
        if metric == "cosine":
            score = Z[rows] @ Z.T  # larger is nearer
        else:
            score = 2 * Z[rows] @ Z.T - sq[None, :]  # -||a - b||^2 up to a per-row constant
        score[torch.arange(len(rows)), rows] = -torch.inf  # not its own neighbour
        out.append(torch.topk(score, n_neighbors, dim=1, sorted=True).indices)
    return torch.cat(out)


def knn_graph(Z, n_neighbors: int, *, metric: str = "cosine", length_scale: float | None = None,
              device=None):
    """The undirected k-nearest-neighbour graph of the rows of `Z`, with similarities.

    Neighbours are found with `metric` (the official code uses the cosine distance); an edge's
    similarity is the Matern-1/2 kernel exp(-||z_u - z_v|| / length_scale) of the Euclidean
    distance. With `length_scale=None` it is the median edge length, which makes the similarities
    independent of the scale of the embedding. The neighbour search runs on `device`. Returns
    (edges (E, 2) with u < v, each pair once; similarities (E,); the length scale used).
    """
    Z = _finite_matrix(Z, "Z")
    if not 1 <= n_neighbors < len(Z):
        raise ValueError(f"n_neighbors must be in 1..{len(Z) - 1}, got {n_neighbors}")
    idx = nearest_neighbors(torch.as_tensor(Z, device=device), n_neighbors, metric).cpu().numpy()
    u = np.repeat(np.arange(len(Z)), n_neighbors)
    pairs = np.unique(np.sort(np.stack([u, idx.ravel()], 1), axis=1), axis=0)
    dist = np.linalg.norm(Z[pairs[:, 0]] - Z[pairs[:, 1]], axis=1)
    if length_scale is None:
        positive = dist[dist > 0]
        length_scale = float(np.median(positive)) if len(positive) else 1.0
    if length_scale <= 0:
        raise ValueError(f"length_scale must be > 0, got {length_scale}")
    return pairs, np.exp(-dist / length_scale), length_scale


def gibbs_mrf(bags, counts, edges, weights, *, sim_lambda: float, bag_lambda: float,
              scaling: str = "none", device=None, dtype=torch.float64) -> PairwiseMRF:
    """The LLP-BP Gibbs distribution as a `PairwiseMRF`.

    A kNN edge between two members of the same bag is merged into that bag's clique coupling:
    loopy BP must see one factor per pair (two parallel factors would form a two-node loop).
    Instances outside every bag (id -1) get only the similarity terms.
    """
    bags = check_bags(bags)
    n = len(bags)
    h_bag, J_bag = bag_terms(bags, counts, bag_lambda, scaling=scaling)
    h_sim, J_sim = similarity_terms(n, edges, weights, sim_lambda)
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)

    # Members of each bag, padded; `slot` is an instance's position within its bag.
    inside = np.flatnonzero(bags >= 0)
    order = inside[np.argsort(bags[inside], kind="stable")]
    sizes = np.bincount(bags[inside])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    slot = np.full(n, -1)
    slot[order] = np.arange(len(order)) - np.repeat(starts, sizes)
    members = np.full((len(sizes), sizes.max()), -1)
    members[bags[order], slot[order]] = order

    clique = np.broadcast_to(J_bag[:, None, None], members.shape + (members.shape[1],)).copy()
    valid = members >= 0
    clique *= valid[:, :, None] & valid[:, None, :]
    clique[:, np.arange(members.shape[1]), np.arange(members.shape[1])] = 0.0

    same = (bags[edges[:, 0]] == bags[edges[:, 1]]) & (bags[edges[:, 0]] >= 0)
    if same.any():
        b, u, v = bags[edges[same, 0]], slot[edges[same, 0]], slot[edges[same, 1]]
        np.add.at(clique, (b, u, v), J_sim[same])
        np.add.at(clique, (b, v, u), J_sim[same])

    def t(a, dt=dtype):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=device)

    return PairwiseMRF(h=t(h_bag + h_sim), edges=t(edges[~same], torch.int64), J=t(J_sim[~same]),
                       members=t(members, torch.int64), clique=t(clique))


# -------------------------------------------------------------------------------------------------
# Loopy belief propagation and exact marginals


@dataclass
class BPResult:
    marginals: torch.Tensor  # (n,) P(y_i = 1) under BP's beliefs
    n_iter: int
    residual: float  # largest change of a message (log-odds) in the last iteration
    converged: bool
    history: list = field(default_factory=list)  # marginals after each recorded iteration


def _message_factor(J: torch.Tensor):
    """Constants of the message of a pairwise factor exp(J y_u y_v): expm1(J), and the bound the
    message cannot pass (J when J < 0), kept only where e^J is below the machine epsilon (then
    expm1(J) rounds to -1 and the message formula can reach log(0))."""
    floor = J.clamp(max=0)
    rounds_off = math.log(torch.finfo(J.dtype).eps) + 1.0
    return torch.expm1(J), floor if J.numel() and floor.min().item() < rounds_off else None


def _message(cavity: torch.Tensor, factor) -> torch.Tensor:
    """Log-odds message of a pairwise factor exp(J y_u y_v) given the sender's cavity log-odds c:
    log[(1 + e^(c + J)) / (1 + e^c)] = log(1 + sigmoid(c) (e^J - 1)), zero where J = 0; lies
    between J and 0. Overwrites `cavity`."""
    expm1_J, floor = factor
    out = torch.sigmoid_(cavity).mul_(expm1_J).log1p_()
    if floor is None:
        return out
    return torch.maximum(out, floor)  # log1p(-1) = -inf where sigmoid(c) rounds to 1 and J << 0


def loopy_bp(mrf: PairwiseMRF, *, n_iter: int = 100, damping: float = 0.5, tol: float = 1e-6,
             record_every: int = 0) -> BPResult:
    """Sum-product loopy BP on a binary pairwise MRF, all messages updated in parallel.

    Messages are log-odds: the message u_{j->i} of coupling J is f(H_j - u_{i->j}, J) with H_j the
    total field at j (its unary field plus all incoming messages). New messages are mixed with the
    old ones, u <- damping u_old + (1 - damping) u_new; iterations stop once no message moves by
    more than `tol`. Bag cliques are dense (m, s, s) blocks, so a bag of size s costs s^2 per
    iteration, as in the pairwise expansion of the paper's implementation. `record_every` > 0
    keeps the marginals every that many iterations (for plots). Exact on trees.
    """
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    if not 0 <= damping < 1:
        raise ValueError(f"damping must be in [0, 1), got {damping}")
    h = mrf.h
    E = len(mrf.edges)
    src = torch.cat([mrf.edges[:, 0], mrf.edges[:, 1]])
    dst = torch.cat([mrf.edges[:, 1], mrf.edges[:, 0]])
    edge_factor = _message_factor(torch.cat([mrf.J, mrf.J]))
    reverse = torch.cat([torch.arange(E, 2 * E), torch.arange(E)]).to(h.device)
    u_edge = torch.zeros(2 * E, dtype=h.dtype, device=h.device)

    valid = mrf.members >= 0
    gather = mrf.members.clamp(min=0)
    flat_members, flat_valid = gather.reshape(-1), valid.reshape(-1)
    clique_factor = _message_factor(mrf.clique)
    u_clique = torch.zeros_like(mrf.clique)  # [b, j, i]: message from member j to member i

    def fields():
        H = h.clone()
        if E:
            H.index_add_(0, dst, u_edge)
        if len(mrf.members):
            incoming = u_clique.sum(1).reshape(-1)
            H.index_add_(0, flat_members[flat_valid], incoming[flat_valid])
        return H

    def update(u, cavity, factor):
        """Damped update of messages u in place; returns the largest change of a message."""
        step = _message(cavity, factor).sub_(u)
        u.add_(step, alpha=1 - damping)
        return step.abs_().max().item()

    history, residual, it = [], math.inf, 0
    for it in range(1, n_iter + 1):
        H = fields()
        residual = 0.0
        if E:
            residual = update(u_edge, H[src] - u_edge[reverse], edge_factor)
        if len(mrf.members):
            Hm = H[gather] * valid
            cavity = Hm[:, :, None] - u_clique.transpose(1, 2)
            residual = max(residual, update(u_clique, cavity, clique_factor))
        if record_every and it % record_every == 0:
            history.append(torch.sigmoid(fields()).float().cpu())
        if residual < tol:
            break
    return BPResult(torch.sigmoid(fields()), it, residual, residual < tol, history)


def exact_marginals(mrf: PairwiseMRF) -> torch.Tensor:
    """P(y_i = 1) by enumerating all 2^n label vectors (n <= 20): the reference for BP."""
    n = mrf.n
    if n > MAX_EXACT:
        raise ValueError(f"exact marginals enumerate 2^n states; n = {n} > {MAX_EXACT}")
    states = torch.arange(2 ** n, device=mrf.h.device)
    y = ((states[:, None] >> torch.arange(n, device=mrf.h.device)) & 1).to(mrf.h.dtype)
    logp = mrf.log_potential(y)
    w = torch.softmax(logp, 0)
    return w @ y


def heldout_bag_loss(bags, counts, edges, weights, *, sim_lambda: float, bag_lambda: float,
                     scaling: str = "size", holdout: float = 0.25, seed: int = 0,
                     n_iter: int = 100, damping: float = 0.5, tol: float = 1e-4,
                     dtype=torch.float32, device=None) -> float:
    """Label-free validation of the couplings: hide the counts of a random `holdout` share of the
    bags, run BP, and score how well the mean marginal of each hidden bag predicts its positive
    fraction (binary cross-entropy, as DLLP's loss). Only bag counts are used.

    Hidden instances keep a unary field at the known overall positive fraction p (the kept bags'
    counts over their sizes), so that without smoothing every hidden bag is predicted at p: the
    score then rewards only what the similarity graph adds to the base rate.
    """
    bags = check_bags(bags)
    m = bags.max() + 1
    n_held = int(round(holdout * m))
    if not 1 <= n_held < m:
        raise ValueError(f"holdout {holdout} of {m} bags leaves no bag to hide or none to keep")
    held = np.random.default_rng(seed).permutation(m)[:n_held]
    kept = np.setdiff1d(np.arange(m), held)
    new_id = np.full(m, -1)
    new_id[kept] = np.arange(len(kept))
    partial = np.where(bags >= 0, new_id[np.maximum(bags, 0)], -1)
    counts = np.asarray(counts)
    mrf = gibbs_mrf(partial, counts[kept], edges, weights, sim_lambda=sim_lambda,
                    bag_lambda=bag_lambda, scaling=scaling, device=device, dtype=dtype)
    sizes = np.bincount(bags[bags >= 0])
    rate = np.clip(counts[kept].sum() / sizes[kept].sum(), 1e-3, 1 - 1e-3)
    hidden = torch.as_tensor(np.isin(bags, held), device=mrf.h.device)
    mrf.h[hidden] += math.log(rate / (1 - rate))
    p = loopy_bp(mrf, n_iter=n_iter, damping=damping, tol=tol).marginals.double().cpu().numpy()
    sums = np.bincount(bags[bags >= 0], weights=p[bags >= 0], minlength=m)
    pred = np.clip(sums[held] / sizes[held], 1e-7, 1 - 1e-7)
    target = counts[held] / sizes[held]
    return float(-(target * np.log(pred) + (1 - target) * np.log(1 - pred)).mean())


# -------------------------------------------------------------------------------------------------
# The LLP-BP rounds


@dataclass
class LLPBPResult:
    """Per bag partition (first index) and round (second): BP marginals on the training
    instances, BP diagnostics, and the round's classifier probabilities on `X_eval`."""

    marginals: list  # [config][round] -> (n,) numpy
    bp: list  # [config][round] -> dict(n_iter, residual, converged, length_scale, n_edges)
    eval_probs: list  # [config][round] -> (n_eval,) numpy, or None without X_eval
    history: list  # [config][round] -> (T, n) numpy of recorded BP marginals, or None
    seconds: dict  # time spent in graph building, BP and MLP training (not a result)


def fit_llp_bp(X, bag_list, count_list, *, rounds: int = 2, n_neighbors: int = 5,
               metric: str = "cosine", sim_lambda: float = 1.0, bag_lambda: float = 4.0,
               bag_scaling: str = "size", bp_iter: int = 100, damping: float = 0.5,
               bp_tol: float = 1e-4, threshold: float | None = 0.5, agg_lambda: float = 0.1,
               hidden=(64, 32), epochs: int = 20, batch_size: int = 256, lr: float = 1e-3,
               weight_decay: float = 0.0, X_eval=None, record_every: int = 0, seed: int = 0,
               bp_dtype=torch.float32, device=None) -> LLPBPResult:
    """Run LLP-BP for several bag partitions of the same training instances X at once.

    Round r: kNN graph on the current covariates (X, then each partition's own embedding), BP
    marginals of the Gibbs distribution, pseudo-labels (marginal >= `threshold`, or the soft
    marginals with `threshold=None`), then one MLP per partition trained on X with BCE to the
    pseudo-labels plus `agg_lambda` times the aggregate embedding loss. The MLPs of one round are
    trained together (`train_models`); batches are whole bags of the coarsest partition when
    partitions are nested, whole bags of each partition otherwise (then one training per
    partition). The last round's MLP is the classifier. BP runs in `bp_dtype` (float32 halves
    its cost; the tests check it against float64).
    """
    X = _finite_matrix(X)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if len(bag_list) != len(count_list) or not bag_list:
        raise ValueError(f"{len(bag_list)} bag partitions for {len(count_list)} count vectors")
    bag_list = [check_bags(b, len(X)) for b in bag_list]
    if any((b < 0).any() for b in bag_list):
        raise ValueError("every training instance must be in a bag (bag id -1 found)")
    device = torch.device(device or "cpu")
    Xt = torch.as_tensor(X, dtype=torch.float32, device=device)
    Xe = None if X_eval is None else torch.as_tensor(_finite_matrix(X_eval, "X_eval"),
                                                      dtype=torch.float32, device=device)
    proportions = [np.asarray(c) / np.bincount(b[b >= 0]) for b, c in zip(bag_list, count_list,
                                                                          strict=True)]
    groups = nested_groups(bag_list)
    C = len(bag_list)
    out = LLPBPResult([[] for _ in range(C)], [[] for _ in range(C)], [[] for _ in range(C)],
                      [[] for _ in range(C)], {"graph": 0.0, "bp": 0.0, "mlp": 0.0})
    covariates = [X] * C
    shared_graph = None

    for r in range(rounds):
        labels = []
        for c in range(C):
            start = time.perf_counter()
            if r == 0 and shared_graph is not None:
                edges, w, scale = shared_graph
            else:
                edges, w, scale = knn_graph(covariates[c], n_neighbors, metric=metric,
                                            device=device)
                if r == 0:
                    shared_graph = (edges, w, scale)  # round 1 uses X for every partition
            out.seconds["graph"] += time.perf_counter() - start

            start = time.perf_counter()
            mrf = gibbs_mrf(bag_list[c], count_list[c], edges, w, sim_lambda=sim_lambda,
                            bag_lambda=bag_lambda, scaling=bag_scaling, device=device,
                            dtype=bp_dtype)
            res = loopy_bp(mrf, n_iter=bp_iter, damping=damping, tol=bp_tol,
                           record_every=record_every)
            out.seconds["bp"] += time.perf_counter() - start
            p = res.marginals.double().cpu().numpy()
            out.marginals[c].append(p)
            out.bp[c].append({"n_iter": res.n_iter, "residual": res.residual,
                              "converged": res.converged, "length_scale": scale,
                              "n_edges": len(edges)})
            out.history[c].append(torch.stack(res.history).numpy() if res.history else None)
            labels.append(p if threshold is None else (p >= threshold).astype(np.float64))

        start = time.perf_counter()
        objectives = [Objective("labels", labels[c], bag_list[c], proportions[c], agg_lambda)
                      for c in range(C)]
        models = _train_grouped(Xt, objectives, groups, hidden=hidden, epochs=epochs,
                                batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                seed=seed + 1000 * r)
        out.seconds["mlp"] += time.perf_counter() - start
        for c, (model, k) in enumerate(models):
            _, embed = model.predict(Xt)
            covariates[c] = embed[k].double().cpu().numpy()
            if Xe is not None:
                out.eval_probs[c].append(model.predict(Xe)[0][k].cpu().numpy())
            else:
                out.eval_probs[c].append(None)
    return out


def nested_groups(bag_list) -> np.ndarray | None:
    """The coarsest partition when every partition's bags lie inside its bags, else None."""
    coarsest = max(bag_list, key=lambda b: np.bincount(b[b >= 0]).max())
    if (coarsest < 0).any():
        return None
    for bags in bag_list:
        if (bags < 0).any():
            return None
        first = np.full(bags.max() + 1, -1)
        first[bags] = coarsest
        if (first[bags] != coarsest).any():
            return None
    return coarsest


def _train_grouped(X, objectives, groups, **kw):
    """Train the objectives together when their bags nest in `groups`; otherwise one training per
    objective batched by its own bags. Returns (model, index of the objective in it) each."""
    if groups is not None:
        model = train_models(X, objectives, groups=groups, **kw)
        return [(model, k) for k in range(len(objectives))]
    return [(train_models(X, [o], groups=o.bags, **kw), 0) for o in objectives]


def bench_bp(n: int = 4096, bag_size: int = 256, n_neighbors: int = 5, n_iter: int = 30,
             seed: int = 0) -> dict:
    """Seconds for `n_iter` BP iterations on random data: the dense per-bag clique form used here
    against the same model with every bag pair as an entry of the sparse edge list."""
    from repsuite.timing import best_of
    from repsuite.weak.bags import make_bags

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 8))
    y = (X[:, 0] + rng.normal(size=n) > 0).astype(int)
    bags = make_bags(n, bag_size, seed)
    edges, w, _ = knn_graph(X, n_neighbors)
    mrf = gibbs_mrf(bags, bag_counts(y, bags), edges, w, sim_lambda=1.0, bag_lambda=1.0,
                    scaling="size")
    # The same distribution with no cliques: all within-bag pairs as plain edges.
    iu = np.triu_indices(mrf.members.shape[1], 1)
    pairs = torch.stack([mrf.members[:, iu[0]].reshape(-1), mrf.members[:, iu[1]].reshape(-1)], 1)
    flat = PairwiseMRF(mrf.h, torch.cat([mrf.edges, pairs]),
                       torch.cat([mrf.J, mrf.clique[:, iu[0], iu[1]].reshape(-1)]),
                       torch.zeros(0, 0, dtype=torch.int64), torch.zeros(0, 0, 0,
                                                                         dtype=mrf.h.dtype))
    dense = best_of(lambda: loopy_bp(mrf, n_iter=n_iter, tol=0.0), 3)
    sparse = best_of(lambda: loopy_bp(flat, n_iter=n_iter, tol=0.0), 3)
    return {"dense_s": dense, "edge_list_s": sparse, "n": n, "bag_size": bag_size,
            "n_iter": n_iter}
