"""Aranyani: fair oblique decision forests trained online (Basu Roy Chowdhury et al., ICLR 2024).

An oblique soft tree of depth D has N = 2^D - 1 internal nodes and L = 2^D leaves. Node i routes
an input left with probability n_i(x) = sigmoid(w_i . x + b_i); the probability of a leaf is the
product of the routing probabilities along its path; leaf l holds class probabilities
softmax(theta_l); the tree outputs sum_l P_l(x) softmax(theta_l), and the forest averages its T
trees. The cross-entropy is taken on that averaged probability.

Demographic parity is enforced node by node. With F_i = E_1[n_i] - E_0[n_i] (group means of the
node output) the penalty lambda * h(F_i), h the Huber function, has the gradient

    lambda * h'(F_i) * (E_1[d n_i / d(w_i, b_i)] - E_0[d n_i / d(w_i, b_i)]),

and node i's output depends on its own (w_i, b_i) only, with d n_i / d(w_i, b_i) =
n_i (1 - n_i) (x, 1). Both group means are therefore running averages over the stream: a few
numbers per node, no stored examples and no extra forward or backward pass. Leaf parameters get no
fairness gradient. The leaf-level (output) variant keeps running means of the forest's positive
probability and of its full gradient instead.

Many independent runs (a lambda grid times several stream orders) are trained together: every
tensor carries a leading run axis R and run r reads its own stream. Forward and backward passes are
written out by hand (the tests compare them with autograd) so that one online step of all runs is a
few dozen small tensor operations.
"""

from dataclasses import dataclass

import numpy as np
import torch

from repsuite.fairness.stream import RunningGroupMeans
from repsuite.progress import bar

# -------------------------------------------------------------------------------------------------
# Tree structure


def tree_paths(depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every leaf, the internal nodes on its path (heap order: root 0, children 2i+1 and 2i+2)
    and whether the path turns left there. Leaf l's path spells the binary digits of l, most
    significant first, 0 meaning left. Returns `path` (L, D) long and `left` (L, D) bool."""
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"tree depth must be an int >= 1, got {depth!r}")
    n_leaves = 2**depth
    path = torch.zeros(n_leaves, depth, dtype=torch.long)
    left = torch.zeros(n_leaves, depth, dtype=torch.bool)
    for leaf in range(n_leaves):
        node = 0
        for k in range(depth):
            bit = (leaf >> (depth - 1 - k)) & 1
            path[leaf, k], left[leaf, k] = node, bit == 0
            node = 2 * node + 1 + bit
    return path, left


def softmax_last(t: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis, written out: torch's kernel is slow when that axis is short."""
    e = (t - t.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def huber_grad(F: torch.Tensor, delta: float) -> torch.Tensor:
    """Derivative of the Huber penalty, scaled to slope 1 outside the band: F / delta for
    |F| <= delta, sign(F) beyond (continuous at +-delta)."""
    if delta <= 0:
        raise ValueError(f"huber delta must be > 0, got {delta}")
    return torch.clamp(F / delta, -1.0, 1.0)


# -------------------------------------------------------------------------------------------------
# The forest: R independent forests in one flat parameter tensor


@dataclass
class ForwardCache:
    x: torch.Tensor  # (R, m, d) inputs
    n: torch.Tensor  # (R, m, T, N) node outputs
    f: torch.Tensor  # (R, m, T, L, D) routing factors along each leaf's path
    P: torch.Tensor  # (R, m, T, L) leaf probabilities
    s: torch.Tensor  # (R, T, L, C) leaf class probabilities softmax(theta)
    p: torch.Tensor  # (R, m, C) forest class probabilities


class ObliqueForest:
    """R soft oblique forests of `n_trees` trees of depth `depth` over `n_features` inputs.

    `params` is an (R, n_params) tensor laid out as [W (T, N, d), b (T, N), theta (T, L, C)];
    `W`, `b` and `theta` are views into it.
    """

    def __init__(self, n_runs: int, n_features: int, *, n_trees: int = 3, depth: int = 3,
                 n_classes: int = 2, device=None, dtype=torch.float64):
        for name, value, low in (("n_runs", n_runs, 1), ("n_features", n_features, 1),
                                 ("n_trees", n_trees, 1), ("n_classes", n_classes, 2)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.R, self.d, self.T, self.depth, self.C = n_runs, n_features, n_trees, depth, n_classes
        path, left = tree_paths(depth)
        self.N, self.L = 2**depth - 1, 2**depth
        self.device, self.dtype = torch.device(device or "cpu"), dtype
        self.path = path.to(self.device)
        self.off = (~left).to(self.device, dtype)  # factor = off + sgn * n: n (left), 1 - n (right)
        self.sgn = (2.0 * left - 1.0).to(self.device, dtype)
        # Scatter matrix from (leaf, step) pairs to nodes, with the routing sign folded in.
        scatter = torch.zeros(self.L * depth, self.N, dtype=dtype)
        scatter[torch.arange(self.L * depth), path.reshape(-1)] = self.sgn.cpu().reshape(-1)
        self.scatter = scatter.to(self.device)
        T, N, L, C, d = self.T, self.N, self.L, self.C, self.d
        self.sizes = {"W": T * N * d, "b": T * N, "theta": T * L * C}
        self.n_params = sum(self.sizes.values())
        self.params = torch.zeros(n_runs, self.n_params, device=self.device, dtype=dtype)
        self.n_node_params = T * N * (d + 1)  # W and b come first in the layout

    # views into the flat parameters
    @property
    def W(self) -> torch.Tensor:
        return self.params[:, :self.sizes["W"]].view(self.R, self.T, self.N, self.d)

    @property
    def b(self) -> torch.Tensor:
        start = self.sizes["W"]
        return self.params[:, start:start + self.sizes["b"]].view(self.R, self.T, self.N)

    @property
    def theta(self) -> torch.Tensor:
        return self.params[:, self.n_node_params:].view(self.R, self.T, self.L, self.C)

    def init_(self, seeds, init_std: float | None = None) -> "ObliqueForest":
        """Seeded start, one seed per run (runs with the same seed start identical): node weights
        N(0, init_std^2) (default 1 / sqrt(d)), biases N(0, 1), leaf logits U(0, 1)."""
        seeds = [int(s) for s in seeds]
        if len(seeds) != self.R:
            raise ValueError(f"need one seed per run ({self.R}), got {len(seeds)}")
        std = 1.0 / np.sqrt(self.d) if init_std is None else float(init_std)
        for r, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(seed)
            W = torch.randn(self.T, self.N, self.d, generator=g, dtype=torch.float64) * std
            b = torch.randn(self.T, self.N, generator=g, dtype=torch.float64)
            theta = torch.rand(self.T, self.L, self.C, generator=g, dtype=torch.float64)
            self.params[r] = torch.cat([W.reshape(-1), b.reshape(-1), theta.reshape(-1)]).to(
                self.params)
        return self

    def forward(self, x: torch.Tensor) -> ForwardCache:
        """Class probabilities of every run's forest for x of shape (R, m, d)."""
        R, T, N = self.R, self.T, self.N
        if x.ndim != 3 or x.shape[0] != R or x.shape[2] != self.d:
            raise ValueError(f"x must have shape (runs={R}, m, features={self.d}), "
                             f"got {tuple(x.shape)}")
        m = x.shape[1]
        z = torch.bmm(x, self.W.reshape(R, T * N, self.d).transpose(1, 2))
        n = torch.sigmoid(z + self.b.reshape(R, 1, T * N)).view(R, m, T, N)
        f = self.off + self.sgn * n[..., self.path]
        P = f.prod(-1)
        s = softmax_last(self.theta)
        p = torch.einsum("rmtl,rtlc->rmc", P, s) / T
        return ForwardCache(x, n, f, P, s, p)

    def backward(self, cache: ForwardCache, upstream: torch.Tensor) -> torch.Tensor:
        """Per-example gradients of K linear functionals of the output: `upstream` (R, m, K, C)
        holds dObjective/dp for each example; returns (R, m, K, n_params)."""
        R, T, L, D = self.R, self.T, self.L, self.depth
        m, K = upstream.shape[1], upstream.shape[2]
        G = upstream / T
        s = cache.s[:, None, None]  # (R, 1, 1, T, L, C)
        Gs = G[:, :, :, None, None, :]
        sG = (s * Gs).sum(-1, keepdim=True)  # dObjective / dP_l, (R, m, K, T, L, 1)
        d_theta = cache.P[:, :, None, :, :, None] * s * (Gs - sG)
        # Product of the other factors on the path, by prefix and suffix products.
        f = cache.f
        ones = torch.ones_like(f[..., :1])
        prefix = torch.cat([ones, f[..., :-1].cumprod(-1)], -1)
        suffix = torch.cat([f[..., 1:].flip(-1).cumprod(-1).flip(-1), ones], -1)
        d_f = sG * (prefix * suffix)[:, :, None]  # (R, m, K, T, L, D)
        d_n = d_f.reshape(R, m, K, T, L * D) @ self.scatter  # (R, m, K, T, N)
        d_z = d_n * (cache.n * (1 - cache.n))[:, :, None]
        d_W = d_z[..., None] * cache.x[:, :, None, None, None, :]
        return torch.cat([d_W.reshape(R, m, K, -1), d_z.reshape(R, m, K, -1),
                          d_theta.reshape(R, m, K, -1)], -1)

    @torch.no_grad()
    def predict_proba(self, X: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Positive-class probability of every run for shared inputs X (n, d): (R, n)."""
        out = []
        for start in range(0, len(X), chunk):
            xb = X[start:start + chunk].to(self.params)
            out.append(self.forward(xb.expand(self.R, -1, -1)).p[..., 1])
        return torch.cat(out, 1)


# -------------------------------------------------------------------------------------------------
# Adam on a flat (R, P) parameter tensor


class FlatAdam:
    """Adam applied row-wise to an (R, P) tensor; the same update as torch.optim.Adam."""

    def __init__(self, params: torch.Tensor, lr: float = 2e-3, betas=(0.9, 0.999),
                 eps: float = 1e-7):
        if lr <= 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m, self.v, self.t = torch.zeros_like(params), torch.zeros_like(params), 0

    def step(self, grad: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v / (1 - b2**self.t)).sqrt_().add_(self.eps)
        self.params.addcdiv_(self.m, denom, value=-self.lr / (1 - b1**self.t))


# -------------------------------------------------------------------------------------------------
# Online training


def check_stream(X, y, group, orders) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate a stream: finite features, 0/1 labels and groups, orders (R, n_steps) of rows."""
    X = np.asarray(X, dtype=np.float64)
    y, group, orders = np.asarray(y), np.asarray(group), np.asarray(orders)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D array (rows, features), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values")
    for name, v in (("y", y), ("group", group)):
        if v.shape != (len(X),):
            raise ValueError(f"{name} needs one value per row of X ({len(X)}), got {v.shape}")
        if not np.isin(v, (0, 1)).all():
            raise ValueError(f"{name} must hold 0/1 codes, found {np.unique(v)[:5].tolist()}")
    if orders.ndim != 2 or orders.shape[1] < 1:
        raise ValueError(f"orders must be (runs, steps) row indices, got shape {orders.shape}")
    if orders.min() < 0 or orders.max() >= len(X):
        raise ValueError(f"orders index rows 0..{len(X) - 1}, got {orders.min()}..{orders.max()}")
    return X, y.astype(np.int64), group.astype(np.int64), orders.astype(np.int64)


@dataclass
class OnlineResult:
    """Per-run predictions made before each update, and the final models."""

    proba: np.ndarray  # (R, n_steps) positive-class probability predicted at each step
    pred: np.ndarray  # (R, n_steps) hard prediction (argmax)
    model: object  # the trained models (an ObliqueForest or a baseline's)
    state_floats: int  # numbers kept per run for the fairness gradient, independent of the stream


def node_fairness_gradient(cache: ForwardCache, a: torch.Tensor, node_mean: RunningGroupMeans,
                           grad_mean: RunningGroupMeans, huber_delta: float) -> torch.Tensor:
    """Fold the current example (cache of a one-example forward pass, `a` its group) into the
    running statistics and return h'(F_i) (E_1[d n_i] - E_0[d n_i]) for every node's (w_i, b_i),
    laid out like the first `n_node_params` entries of the forest's parameters: (R, T*N*(d+1))."""
    R = a.shape[0]
    n, x = cache.n[:, 0], cache.x[:, 0]
    d = x.shape[-1]
    dn = n * (1 - n)  # d n_i / d b_i; times x for d n_i / d w_i
    node_mean.update(n, a)
    grad_mean.update(torch.cat([dn[..., None] * x[:, None, None, :], dn[..., None]], -1), a)
    h = huber_grad(node_mean.gap(), huber_delta)[..., None] * grad_mean.gap()
    return torch.cat([h[..., :d].reshape(R, -1), h[..., d].reshape(R, -1)], -1)


def train_online(X, y, group, orders, lambdas, seeds, *, constraint: str = "node",
                 n_trees: int = 3, depth: int = 3, lr: float = 2e-3, huber_delta: float = 0.01,
                 init_std: float | None = None, device=None, dtype=torch.float32,
                 progress: bool = False, desc: str = "Aranyani") -> OnlineResult:
    """Aranyani's online loop for R runs at once: run r reads rows orders[r] one at a time,
    predicts, then takes one Adam step on the cross-entropy plus lambdas[r] times the fairness
    gradient estimated from the running group statistics. `constraint` is "node" (Aranyani) or
    "leaf" (the output-level variant); lambda 0 is plain online learning."""
    if constraint not in ("node", "leaf"):
        raise ValueError(f"constraint must be 'node' or 'leaf', got {constraint!r}")
    X, y, group, orders = check_stream(X, y, group, orders)
    R, n_steps = orders.shape
    lambdas = np.asarray(lambdas, dtype=np.float64)
    if lambdas.shape != (R,) or (lambdas < 0).any() or not np.isfinite(lambdas).all():
        raise ValueError(f"need one finite lambda >= 0 per run ({R}), got {lambdas.tolist()}")
    dev = torch.device(device or "cpu")
    forest = ObliqueForest(R, X.shape[1], n_trees=n_trees, depth=depth, device=dev, dtype=dtype)
    forest.init_(seeds, init_std)
    opt = FlatAdam(forest.params, lr=lr)
    dt = forest.dtype
    Xt, yt = torch.as_tensor(X, device=dev, dtype=dt), torch.as_tensor(y, device=dev)
    at, order_t = torch.as_tensor(group, device=dev), torch.as_tensor(orders, device=dev)
    lam = torch.as_tensor(lambdas, device=dev, dtype=dt)[:, None]
    T, N, d, k_node = forest.T, forest.N, forest.d, forest.n_node_params
    if constraint == "node":
        node_mean = RunningGroupMeans(2, (T, N), runs=R, device=dev, dtype=dt)  # E_a[n_i]
        # E_a[d n_i / d(w_i, b_i)]
        grad_mean = RunningGroupMeans(2, (T, N, d + 1), runs=R, device=dev, dtype=dt)
        state = 2 * (T * N + T * N * (d + 1))
    else:
        out_mean = RunningGroupMeans(2, (), runs=R, device=dev, dtype=dt)  # E_a[p_1]
        # E_a[d p_1 / d params]
        out_grad = RunningGroupMeans(2, (forest.n_params,), runs=R, device=dev, dtype=dt)
        state = 2 * (1 + forest.n_params)
    K = 1 if constraint == "node" else 2
    upstream = torch.zeros(R, 1, K, forest.C, device=dev, dtype=dt)
    if constraint == "leaf":
        upstream[:, 0, 1, 1] = 1.0  # the second functional is the positive probability p_1
    proba = torch.zeros(R, n_steps, device=dev, dtype=dt)
    pred = torch.zeros(R, n_steps, device=dev, dtype=torch.long)
    rows = torch.arange(R, device=dev)
    use_fairness = bool((lambdas > 0).any())

    for t in bar(range(n_steps), enabled=progress, desc=desc, mininterval=1.0):
        idx = order_t[:, t]
        x, label, a = Xt[idx], yt[idx], at[idx]
        cache = forest.forward(x[:, None])
        p = cache.p[:, 0]
        proba[:, t], pred[:, t] = p[:, 1], p.argmax(-1)

        # Cross-entropy on the forest's probability: dL/dp_y = -1 / p_y.
        upstream[:, 0, 0].zero_()
        upstream[rows, 0, 0, label] = -1.0 / p[rows, label]
        grads = forest.backward(cache, upstream)[:, 0]
        grad = grads[:, 0]

        if use_fairness:
            if constraint == "node":
                fair = node_fairness_gradient(cache, a, node_mean, grad_mean, huber_delta)
                ready = node_mean.seen(0, 1)[:, None].to(dt)
                grad = grad.clone()
                grad[:, :k_node] += lam * ready * fair
            else:
                out_mean.update(p[:, 1], a)
                out_grad.update(grads[:, 1], a)
                h = huber_grad(out_mean.gap(), huber_delta)[:, None]
                ready = out_mean.seen(0, 1)[:, None].to(dt)
                grad = grad + lam * ready * h * out_grad.gap()
        opt.step(grad)

    return OnlineResult(proba.cpu().numpy(), pred.cpu().numpy(), forest, state)


# -------------------------------------------------------------------------------------------------
# From node-level gaps to the forest's demographic-parity gap


@torch.no_grad()
def dp_bound(forest: ObliqueForest, X, group) -> dict[str, np.ndarray]:
    """The forest's output gap on rows X and the bound implied by its node-level gaps, per run.

    gap = |E_1[p_1(x)] - E_0[p_1(x)]| (soft output, group means over the rows). If the node outputs
    along a path are independent given the group, leaf probabilities are those of a random walk
    that turns left at node i with probability q_i^a = E_a[n_i]; coupling the two groups' walks
    node by node, they part with probability at most sum_i r_i |F_i| (r_i: the smaller of the
    groups' chances to reach node i), which bounds the total variation between the two leaf
    distributions. Since the leaf probabilities sum to one in both groups, tree t's positive
    probability sum_l P_l s_l moves by at most (max_l s_l - min_l s_l) times that total variation,
    and the forest's by the average over trees:

        gap <= (1 / T) sum_t (max_l s_tl - min_l s_tl) sum_i r_ti |F_ti|.
    """
    group = np.asarray(group)
    X = torch.as_tensor(np.asarray(X, dtype=np.float64), dtype=forest.dtype)
    if X.ndim != 2 or group.shape != (len(X),):
        raise ValueError(f"X (rows, features) and one group code per row needed, got "
                         f"{tuple(X.shape)} and {group.shape}")
    masks = [torch.as_tensor(group == g) for g in (0, 1)]
    if not all(m.any() for m in masks):
        raise ValueError("both groups 0 and 1 need at least one row")
    R = forest.R
    gap_parts, q = [], []
    for m in masks:
        cache = forest.forward(X[m].to(forest.params).expand(R, -1, -1))
        gap_parts.append(cache.p[..., 1].mean(1))
        q.append(cache.n.mean(1))  # (R, T, N)
    gap = (gap_parts[1] - gap_parts[0]).abs()
    bound = bound_from_node_means(q[0], q[1], softmax_last(forest.theta)[..., 1])
    return {"gap": gap.cpu().numpy(), "bound": bound.cpu().numpy(),
            "node_gap_sum": (q[1] - q[0]).abs().sum((-1, -2)).cpu().numpy()}


def bound_from_node_means(q0: torch.Tensor, q1: torch.Tensor, leaf_values: torch.Tensor):
    """(1 / T) sum_t (max_l s_tl - min_l s_tl) sum_i r_ti |q1_ti - q0_ti| for node means q_a
    (..., T, N) and leaf values s (..., T, L), r_ti the smaller reach probability of node i."""
    reach_parts = []
    for qa in (q0, q1):  # chance of reaching each node for a walk turning left with probability q
        reach = torch.ones_like(qa)
        for node in range(1, qa.shape[-1]):
            parent = (node - 1) // 2
            turn = qa[..., parent] if node % 2 == 1 else 1 - qa[..., parent]
            reach[..., node] = reach[..., parent] * turn
        reach_parts.append(reach)
    r = torch.minimum(*reach_parts)
    spread = leaf_values.amax(-1) - leaf_values.amin(-1)
    return (spread * (r * (q1 - q0).abs()).sum(-1)).mean(-1)


def exact_gap_independent(q0: np.ndarray, q1: np.ndarray, leaf_values: np.ndarray) -> float:
    """The output gap of one tree when node outputs are independent Bernoulli-like variables with
    means q_a (N,): leaf probabilities are products of the path means. Used to test `dp_bound`."""
    depth = int(np.log2(len(leaf_values)))
    path, left = tree_paths(depth)
    path, left = path.numpy(), left.numpy()

    def leaf_probs(q):
        return np.where(left, q[path], 1 - q[path]).prod(-1)

    return float(abs(leaf_probs(q1) @ leaf_values - leaf_probs(q0) @ leaf_values))
