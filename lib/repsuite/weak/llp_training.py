"""Networks for learning from label proportions: a stack of independent MLPs trained together
on one input (`MultiMLP`, `train_models`). LLP-BP's pseudo-labels and the LLP baselines' losses
(DLLP, EasyLLP, bag-proportion labels) are objectives of the same trainer, so that every method
gets the same network, optimiser and budget."""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from repsuite.weak.bags import check_bags

OBJECTIVES = ("labels", "dllp", "easyllp")


# -------------------------------------------------------------------------------------------------
# Independent MLPs evaluated together


class MultiMLP(nn.Module):
    """`n_models` independent MLPs of the same shape, evaluated on one shared input batch.

    Weights are stacked along a leading model axis, so one batched matrix product serves all
    models; gradients and Adam's element-wise updates stay separate, which makes training them
    together the same as training each alone. Each model has a bag head (mean embedding of a bag
    -> `bag_hidden` ReLU units -> logit of the bag's positive fraction) for the aggregate
    embedding loss. The embedding is the output of the second-to-last hidden layer.
    """

    def __init__(self, n_models: int, d_in: int, hidden=(64, 32), *, bag_hidden: int = 64,
                 seeds=None, device=None):
        super().__init__()
        if n_models < 1 or d_in < 1:
            raise ValueError(f"need n_models >= 1 and d_in >= 1, got {n_models}, {d_in}")
        if len(hidden) < 2 or min(hidden) < 1:
            raise ValueError(f"hidden needs at least two positive layer widths (the embedding is "
                             f"the second-to-last), got {tuple(hidden)}")
        seeds = list(range(n_models)) if seeds is None else list(seeds)
        if len(seeds) != n_models:
            raise ValueError(f"{len(seeds)} seeds for {n_models} models")
        # Each model draws its initial weights from its own generator: a model starts the same
        # whatever the other models of the stack.
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        widths = [d_in, *hidden, 1, None]
        shapes = [(a, b) for a, b in zip(widths[:-2], widths[1:-1], strict=True)]
        shapes += [(hidden[-2], bag_hidden), (bag_hidden, 1)]
        per_model = [[self._linear(a, b, g) for a, b in shapes] for g in gens]
        stacked = [torch.stack([m[i][j] for m in per_model]) for i in range(len(shapes))
                   for j in range(2)]
        n_main = 2 * (len(hidden) + 1)
        self.embed_layer = len(hidden) - 2
        self.layers = nn.ParameterList([nn.Parameter(t) for t in stacked[:n_main]])
        self.bag_head = nn.ParameterList([nn.Parameter(t) for t in stacked[n_main:]])
        self.to(device)

    @staticmethod
    def _linear(a: int, b: int, g: torch.Generator):
        # nn.Linear's default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1 / math.sqrt(a)
        W = (torch.rand(a, b, generator=g) * 2 - 1) * bound
        c = (torch.rand(1, b, generator=g) * 2 - 1) * bound
        return W, c

    @property
    def n_models(self) -> int:
        return self.layers[0].shape[0]

    def forward(self, X: torch.Tensor):
        """(logits (M, B), embeddings (M, B, e)) for a batch X (B, d) shared by all models."""
        a, embed = X, None
        n_layers = len(self.layers) // 2
        for k in range(n_layers):
            W, c = self.layers[2 * k], self.layers[2 * k + 1]
            a = torch.baddbmm(c, a, W) if a.dim() == 3 else torch.matmul(a, W) + c
            if k < n_layers - 1:
                a = torch.relu(a)
            if k == self.embed_layer:
                embed = a
        return a.squeeze(-1), embed

    def bag_logits(self, k: int, pooled: torch.Tensor) -> torch.Tensor:
        """Model k's logit of a bag's positive fraction from the bag's mean embedding, for mean
        embeddings `pooled` (n_bags, e): (n_bags,)."""
        W1, c1, W2, c2 = (p[k] for p in self.bag_head)
        return (torch.relu(pooled @ W1 + c1) @ W2 + c2).squeeze(-1)

    @torch.no_grad()
    def predict(self, X: torch.Tensor, batch_size: int = 8192):
        """(probabilities (M, n), embeddings (M, n, e)) in eval mode, in batches."""
        probs, embeds = [], []
        for start in range(0, len(X), batch_size):
            logits, embed = self(X[start:start + batch_size])
            probs.append(torch.sigmoid(logits))
            embeds.append(embed)
        return torch.cat(probs, 1), torch.cat(embeds, 1)


@dataclass
class Objective:
    """What one model of a `MultiMLP` is trained on.

    - `labels`: binary cross-entropy to per-instance `targets` in [0, 1] (pseudo-labels, bag
      proportions, or true labels for a supervised reference);
    - `dllp`: DLLP's proportion loss, BCE between each bag's mean prediction and its proportion;
    - `easyllp`: EasyLLP's debiased soft labels |b| (alpha_b - p) + p with p the overall positive
      fraction, in a cross-entropy that is linear in the (possibly out-of-range) label.
    `bags` and `proportions` are needed by `dllp`, `easyllp` and by `agg_lambda` > 0 (the
    aggregate embedding loss of LLP-BP's refinement step).
    """

    kind: str
    targets: np.ndarray | None = None
    bags: np.ndarray | None = None
    proportions: np.ndarray | None = None
    agg_lambda: float = 0.0

    def checked(self, n: int) -> "Objective":
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective kind must be one of {OBJECTIVES}, got {self.kind!r}")
        needs_bags = self.kind != "labels" or self.agg_lambda > 0
        if needs_bags:
            if self.bags is None or self.proportions is None:
                raise ValueError(f"a {self.kind!r} objective (agg_lambda={self.agg_lambda}) needs "
                                 "bags and proportions")
            bags = check_bags(self.bags, n)
            if (bags < 0).any():
                raise ValueError(f"a {self.kind!r} objective needs every instance in a bag")
            props = np.asarray(self.proportions, dtype=np.float64)
            if len(props) != bags.max() + 1 or not ((props >= 0) & (props <= 1)).all():
                raise ValueError(f"need one proportion in [0, 1] per bag ({bags.max() + 1}), got "
                                 f"{len(props)} values in [{props.min():g}, {props.max():g}]")
        if self.kind == "labels":
            t = np.asarray(self.targets if self.targets is not None else [], dtype=np.float64)
            if t.shape != (n,) or not np.isfinite(t).all() or t.min() < 0 or t.max() > 1:
                raise ValueError(f"`labels` targets must be {n} values in [0, 1]")
        return self

    def soft_labels(self) -> np.ndarray:
        """Per-instance targets of the instance-level losses (labels and easyllp)."""
        if self.kind == "labels":
            return np.asarray(self.targets, dtype=np.float64)
        bags = np.asarray(self.bags)
        sizes = np.bincount(bags[bags >= 0])
        props = np.asarray(self.proportions, dtype=np.float64)
        p = float((props * sizes).sum() / sizes.sum())
        return sizes[bags] * (props[bags] - p) + p


def bag_batch_means(values: torch.Tensor, bag_idx: torch.Tensor, n_bags: int):
    """Means of `values` (B,) or (B, e) over the bags present in a batch, in increasing bag id,
    and the ids of those bags: the batched form of `bags.bag_means` for the training loop."""
    counts = torch.bincount(bag_idx, minlength=n_bags)
    present = torch.nonzero(counts, as_tuple=True)[0]
    sums = torch.zeros((n_bags, *values.shape[1:]), dtype=values.dtype, device=values.device)
    sums.index_add_(0, bag_idx, values)
    shape = (-1,) + (1,) * (values.dim() - 1)
    return sums[present] / counts[present].to(values.dtype).reshape(shape), present


def dllp_loss(p: torch.Tensor, bag_idx: torch.Tensor, proportions: torch.Tensor,
              eps: float = 1e-7) -> torch.Tensor:
    """DLLP's proportion loss on a batch of whole bags (`bags.proportion_loss` without its numpy
    checks): BCE between each present bag's mean prediction and its proportion."""
    mean_p, present = bag_batch_means(p, bag_idx, len(proportions))
    mean_p, target = mean_p.clamp(eps, 1 - eps), proportions[present]
    return -(target * mean_p.log() + (1 - target) * (1 - mean_p).log()).mean()


def _batches(groups: np.ndarray, batch_size: int, rng: np.random.Generator):
    """Index batches of about `batch_size` instances made of whole groups, in random order."""
    ids = rng.permutation(groups.max() + 1)
    order = np.argsort(groups, kind="stable")
    sizes = np.bincount(groups)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    batch, count = [], 0
    for g in ids:
        batch.append(order[starts[g]:starts[g + 1]])
        count += sizes[g]
        if count >= batch_size:
            yield np.concatenate(batch)
            batch, count = [], 0
    if batch:
        yield np.concatenate(batch)


def train_models(X: torch.Tensor, objectives: list[Objective], *, groups=None, hidden=(64, 32),
                 epochs: int = 20, batch_size: int = 256, lr: float = 1e-3,
                 weight_decay: float = 0.0, seed: int = 0, model_seeds=None) -> MultiMLP:
    """Train one MLP per objective on the same instances X (n, d), all in one `MultiMLP`.

    Batches are whole `groups` (by default single instances); every bag used by an objective
    must lie inside one group, so the bag losses see complete bags. AdamW with the given rate and
    decay, a fixed number of epochs, the same batches (drawn from `seed`) for every model; model
    k starts from `model_seeds[k]` (default seed + k).
    """
    n = len(X)
    if not objectives:
        raise ValueError("no objectives to train")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"need epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}")
    objectives = [o.checked(n) for o in objectives]
    groups = np.arange(n) if groups is None else check_bags(groups, n)
    if (groups < 0).any():
        raise ValueError("every instance needs a batching group (no -1 ids)")
    for k, o in enumerate(objectives):
        if o.bags is not None and (o.kind != "labels" or o.agg_lambda > 0):
            first = np.full(np.max(o.bags) + 1, -1)
            first[o.bags] = groups
            if (first[o.bags] != groups).any():
                raise ValueError(f"objective {k}: a bag spans two batching groups")

    device = X.device
    if model_seeds is None:
        model_seeds = [seed + k for k in range(len(objectives))]
    model = MultiMLP(len(objectives), X.shape[1], hidden, seeds=model_seeds,
                     device=device).to(X.dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    targets = torch.stack([torch.as_tensor(o.soft_labels() if o.kind != "dllp" else
                                           np.zeros(n), dtype=X.dtype) for o in objectives])
    targets = targets.to(device)
    kinds = [o.kind for o in objectives]
    instance = torch.tensor([k != "dllp" for k in kinds], device=device)
    bag_terms_of = {k: (torch.as_tensor(o.bags, device=device),
                        torch.as_tensor(o.proportions, dtype=X.dtype, device=device))
                    for k, o in enumerate(objectives) if o.kind == "dllp" or o.agg_lambda > 0}
    rng = np.random.default_rng(seed)

    for _ in range(epochs):
        for idx in _batches(groups, batch_size, rng):
            t_idx = torch.as_tensor(idx, device=device)
            logits, embed = model(X[t_idx])
            per_model = F.binary_cross_entropy_with_logits(
                logits, targets[:, t_idx], reduction="none").mean(1)
            loss = (per_model * instance).sum()
            for k, (bag_t, props) in bag_terms_of.items():
                bag_idx = bag_t[t_idx]
                if kinds[k] == "dllp":
                    loss = loss + dllp_loss(torch.sigmoid(logits[k]), bag_idx, props)
                if objectives[k].agg_lambda > 0:
                    pooled, present = bag_batch_means(embed[k], bag_idx, len(props))
                    loss = loss + objectives[k].agg_lambda * F.binary_cross_entropy_with_logits(
                        model.bag_logits(k, pooled), props[present])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()
