"""FRL, federated rank learning: clients rank the edges of a fixed random network, the server votes.

Mozaffari, Shejwalkar and Houmansadr, "FRL: Federated Rank Learning" (arXiv 2110.04350; USENIX
Security 2023 as "Every Vote Counts"). The server fixes a randomly initialised network whose
weights never change (signed constants, +-std of Kaiming's init) and gives every weight, an *edge*,
a *score*. A layer's forward pass uses only the top `density` share of its edges by score (a
supermask; edge-popup); the scores learn through a straight-through gradient. Each round:

1. every sampled client starts from the global scores, trains them on its own data and uploads,
   per layer, its *ranking*: the edge ids sorted from the lowest score to the highest;
2. the server turns each ranking into each edge's *position* (0 = lowest score), sums the
   positions over clients (a Borda count: one vote per client) and sorts the sums: the result is
   the global ranking;
3. the global scores are reset to the initial scores' sorted values laid out in the global order,
   so that only the order carries information from round to round.

Words used below: `sizes` are the MLP's layer widths `[d_in, h_1, ..., n_classes]`; a layer's
weight and score tensors have shape (out, in); "stacked" tensors carry one leading row per client.
Malicious clients submit the *rank reversal* of the benign aggregate (the authors' attack) or our
stronger *boundary flip*, which spends their votes on the edges next to the top-k cut.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from repsuite.federated.clients import BatchSampler, Clients
from repsuite.progress import bar

ATTACKS = ("none", "reversal", "boundary")
FLOAT_BITS = 32


# Network: fixed signed-constant weights, trainable scores, top-k supermask


def check_sizes(sizes: Sequence[int]) -> list[int]:
    """Layer widths `[d_in, ..., n_classes]` as ints, or a clear error."""
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least an input and an output width, got sizes={sizes}")
    if any(not isinstance(s, int | np.integer) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ValueError(f"layer widths must be positive ints, got sizes={sizes}")
    return [int(s) for s in sizes]


def check_density(density: float) -> float:
    """The share of edges kept per layer, in (0, 1]."""
    if not isinstance(density, int | float) or not 0 < density <= 1:
        raise ValueError(f"density (share of edges kept per layer) must be in (0, 1], "
                         f"got {density!r}")
    return float(density)


def layer_shapes(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(out, in) of each linear layer."""
    sizes = check_sizes(sizes)
    return [(sizes[i + 1], sizes[i]) for i in range(len(sizes) - 1)]


def signed_constant(sizes: Sequence[int], generator: torch.Generator,
                    dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Frozen weights: a random sign times Kaiming's std for ReLU, sqrt(2 / fan_in)."""
    out = []
    for n_out, n_in in layer_shapes(sizes):
        sign = torch.randint(0, 2, (n_out, n_in), generator=generator).to(dtype) * 2 - 1
        out.append(sign * math.sqrt(2.0 / n_in))
    return out


def init_scores(sizes: Sequence[int], generator: torch.Generator,
                dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Scores uniform on +-1/sqrt(fan_in): Kaiming's uniform init with a = sqrt(5), as in the
    authors' code (the scale only matters relative to the learning rate)."""
    out = []
    for n_out, n_in in layer_shapes(sizes):
        bound = 1.0 / math.sqrt(n_in)
        out.append((torch.rand(n_out, n_in, generator=generator, dtype=dtype) * 2 - 1) * bound)
    return out


def n_dropped(n_edges: int, density: float) -> int:
    """Edges left out of a layer of `n_edges`: int((1 - density) * n_edges), as the authors."""
    return int((1.0 - check_density(density)) * n_edges)


def supermask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """0/1 mask of the top `density` share of each layer's edges by score.

    The last two axes are one layer's (out, in) edges; leading axes (clients) are independent.
    Exactly `n_edges - n_dropped(n_edges, density)` edges are kept per layer: ties at the cut are
    broken by edge id.
    """
    density = check_density(density)
    if scores.dim() < 2:
        raise ValueError(f"scores must have at least the two axes (out, in), got shape "
                         f"{tuple(scores.shape)}")
    flat = scores.detach().reshape(*scores.shape[:-2], -1)
    n = flat.shape[-1]
    j = n_dropped(n, density)
    if j == 0:
        return torch.ones_like(scores)
    # The j-th smallest score is the cut; a selection is O(n) where a full sort is O(n log n).
    cut = flat.kthvalue(j, dim=-1, keepdim=True).values
    mask = flat > cut
    if bool((mask.sum(-1) != n - j).any()):
        # Tied scores at the cut: fall back to the exact order.
        order = flat.argsort(dim=-1, stable=True)
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, order[..., j:], True)
    return mask.to(scores.dtype).reshape(scores.shape)


class _StraightThrough(torch.autograd.Function):
    """The supermask forward, the identity backward: d loss / d score = d loss / d mask."""

    @staticmethod
    def forward(ctx, scores, density):
        return supermask(scores, density)

    @staticmethod
    def backward(ctx, grad_mask):
        return grad_mask, None


def straight_through_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """`supermask(scores, density)` whose gradient reaches the scores unchanged (edge-popup)."""
    return _StraightThrough.apply(scores, density)


def _check_layers(weights: Sequence[torch.Tensor], scores: Sequence[torch.Tensor]) -> None:
    if len(weights) != len(scores):
        raise ValueError(f"{len(weights)} weight tensors but {len(scores)} score tensors")
    for i, (w, s) in enumerate(zip(weights, scores, strict=True)):
        if s.shape[-2:] != w.shape:
            raise ValueError(f"layer {i}: scores of shape {tuple(s.shape)} do not end with the "
                             f"weight's shape {tuple(w.shape)}")


def forward(weights: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], x: torch.Tensor,
            density: float) -> torch.Tensor:
    """Logits of the supermasked MLP: ReLU between layers, no biases (the authors' models).

    Unstacked: scores (out, in), x (B, in). Stacked over k clients: scores (k, out, in) and
    x (k, B, in), giving (k, B, n_classes).
    """
    _check_layers(weights, scores)
    h = x
    for i, (w, s) in enumerate(zip(weights, scores, strict=True)):
        if h.shape[-1] != w.shape[1]:
            raise ValueError(f"layer {i} expects {w.shape[1]} input features, got "
                             f"{h.shape[-1]} (x has shape {tuple(x.shape)})")
        h = h @ (w * straight_through_mask(s, density)).transpose(-1, -2)
        if i < len(weights) - 1:
            h = torch.relu(h)
    return h


def dense_forward(weights: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The same MLP with every edge on: the reference for `forward` at density 1."""
    h = x
    for i, w in enumerate(weights):
        h = h @ w.T
        if i < len(weights) - 1:
            h = torch.relu(h)
    return h


class DenseMLP(nn.Sequential):
    """The baselines' network: the same bias-free ReLU MLP, with ordinary trainable weights."""

    def __init__(self, sizes: Sequence[int]):
        sizes = check_sizes(sizes)
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=False))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)


# Rankings and the vote


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Edge ids of a layer from the lowest score to the highest (what a client uploads).

    scores (out, in) gives (n,); stacked scores (k, out, in) give (k, n). Ties keep edge-id order.
    """
    if scores.dim() < 2:
        raise ValueError(f"scores must have the two axes (out, in), got shape "
                         f"{tuple(scores.shape)}")
    flat = scores.detach().reshape(*scores.shape[:-2], -1)
    return flat.argsort(dim=-1, stable=True)


def _check_rankings(rankings: torch.Tensor) -> torch.Tensor:
    rankings = torch.as_tensor(rankings)
    if rankings.dim() != 2 or rankings.shape[0] == 0 or rankings.shape[1] == 0:
        raise ValueError(f"rankings must be a (voters, edges) array with at least one voter and "
                         f"one edge, got shape {tuple(rankings.shape)}")
    if rankings.dtype.is_floating_point or rankings.dtype == torch.bool:
        raise ValueError(f"rankings hold edge ids (integers), got dtype {rankings.dtype}")
    k, n = rankings.shape
    rankings = rankings.long()
    if int(rankings.min()) < 0 or int(rankings.max()) >= n:
        raise ValueError(f"rankings of {n} edges must hold ids in [0, {n}), got ids from "
                         f"{int(rankings.min())} to {int(rankings.max())}")
    counts = torch.zeros(k, n, dtype=torch.long, device=rankings.device)
    counts.scatter_add_(1, rankings, torch.ones_like(rankings))
    bad = torch.nonzero((counts != 1).any(1)).flatten()
    if len(bad):
        raise ValueError(f"every ranking must list each of the {n} edges exactly once; voters "
                         f"{bad[:10].tolist()} repeat or omit edges")
    return rankings


def positions(rankings: torch.Tensor) -> torch.Tensor:
    """Each edge's place in each ranking (0 = lowest score): the inverse permutations."""
    rankings = _check_rankings(rankings)
    k, n = rankings.shape
    places = torch.arange(n, device=rankings.device).expand(k, n)
    return torch.empty_like(rankings).scatter_(1, rankings, places)


def vote(rankings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's aggregation of one layer: (global ranking (n,), position sums (n,)).

    Every voter's ranking counts once: the positions are summed (a Borda count) and the edges
    sorted by their sum, lowest first; equal sums keep edge-id order.
    """
    sums = positions(rankings).sum(0)
    return sums.argsort(stable=True), sums


def reset_scores(global_ranking: torch.Tensor, sorted_initial: torch.Tensor,
                 shape: Sequence[int]) -> torch.Tensor:
    """Scores whose order is `global_ranking` and whose values are the initial sorted scores.

    The edge listed at place i of the ranking gets the i-th smallest initial score, so the vote's
    winners (largest sums) get the largest scores and are the ones the supermask keeps.
    """
    global_ranking = _check_rankings(torch.as_tensor(global_ranking).reshape(1, -1))[0]
    if sorted_initial.shape != global_ranking.shape:
        raise ValueError(f"{len(sorted_initial)} initial scores for a ranking of "
                         f"{len(global_ranking)} edges")
    if math.prod(shape) != len(global_ranking):
        raise ValueError(f"shape {tuple(shape)} does not hold {len(global_ranking)} edges")
    flat = torch.empty_like(sorted_initial)
    flat[global_ranking] = sorted_initial
    return flat.reshape(*shape)


# Malicious rankings


def rank_reversal(reference: torch.Tensor) -> torch.Tensor:
    """The authors' attack: vote over the rankings the attacker knows, submit the reverse.

    The edges the reference agrees matter most get the lowest positions, and the least useful
    ones the highest.
    """
    return vote(reference)[0].flip(0)


def boundary_flip(reference: torch.Tensor, density: float) -> torch.Tensor:
    """Our stronger attack: all malicious weight goes on the edges nearest the top-k cut.

    With the reference aggregate's places q and the cut b = n_dropped (edges at q >= b are kept),
    the kept edge at distance d = q - b above the cut gets place d, the lowest for the edge just
    above the cut, and the dropped edge at distance d = b - 1 - q below it gets place n - 1 - d,
    the highest for the edge just below: the aggregate rotated by b places. A rank reversal gives
    the edges next to the cut middle places, so it spends votes on edges far from the cut that a
    minority cannot flip. Like the later "vulnerable edge" attacks on FRL, it targets the edges
    whose selection is closest to changing; the construction is ours.
    """
    agg = vote(reference)[0]
    n = len(agg)
    b = n_dropped(n, density)
    return agg.roll(-b)


def malicious_ranking(attack: str, reference: torch.Tensor, density: float) -> torch.Tensor:
    """The ranking every malicious client of a round submits for one layer."""
    if attack == "reversal":
        return rank_reversal(reference)
    if attack == "boundary":
        return boundary_flip(reference, density)
    raise ValueError(f"attack must be one of {ATTACKS[1:]} to build a malicious ranking, "
                     f"got {attack!r}")


def kept_share(benign_rankings: torch.Tensor, global_ranking: torch.Tensor, density: float,
               agreement: float = 0.7) -> float:
    """Diagnostic: of the edges that at least `agreement` of benign voters keep, the share the
    vote keeps (NaN when no edge has that much agreement)."""
    k, n = benign_rankings.shape
    b = n_dropped(n, density)
    benign_kept = (positions(benign_rankings) >= b).float().mean(0) >= agreement
    if not bool(benign_kept.any()):
        return float("nan")
    kept = torch.zeros(n, dtype=torch.bool, device=global_ranking.device)
    kept[global_ranking[b:]] = True
    return float(kept[benign_kept].float().mean())


# Communication


def ranking_bits(n_edges: int) -> int:
    """Bits of one layer's ranking: n ids of ceil(log2 n) bits each."""
    if not isinstance(n_edges, int | np.integer) or n_edges < 1:
        raise ValueError(f"a layer has at least one edge, got n_edges={n_edges!r}")
    return int(n_edges) * max(1, math.ceil(math.log2(n_edges)))


def communication_bits(sizes: Sequence[int], float_bits: int = FLOAT_BITS) -> dict[str, int]:
    """Bits per client per round, each way, for FRL and for FedAvg-style float updates.

    FRL: a client uploads every layer's ranking, sum_l n_l * ceil(log2 n_l), and downloads the
    global ranking, the same size (it rebuilds the scores from the initial ones, known from the
    seed). FedAvg: float_bits per weight, both ways.
    """
    edges = [o * i for o, i in layer_shapes(sizes)]
    frl = sum(ranking_bits(n) for n in edges)
    dense = float_bits * sum(edges)
    return {"n_edges": sum(edges), "frl_upload": frl, "frl_download": frl,
            "fedavg_upload": dense, "fedavg_download": dense}


# Clients: local edge-popup training of the scores, all selected clients at once


def train_scores(weights: Sequence[torch.Tensor], scores: Sequence[torch.Tensor],
                 clients: Clients, idx, *, steps: int, lr: float, batch_size: int, density: float,
                 generator: torch.Generator, momentum: float = 0.9, weight_decay: float = 1e-4
                 ) -> tuple[list[torch.Tensor], int]:
    """Edge-popup on each selected client's data, all clients at once.

    Every client in `idx` starts from the global `scores` and runs `steps` minibatch SGD steps
    (heavy-ball momentum and weight decay, the authors' optimiser) on its scores, the weights
    frozen; batches are drawn as the simulator's `local_sgd` draws them (`BatchSampler`). The k
    clients' losses are summed, so one backward pass gives each client the gradient of its own
    mean batch loss. Returns (stacked scores, one (k, out, in) tensor per layer; sample
    gradients computed).
    """
    density = check_density(density)
    if not isinstance(steps, int | np.integer) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not (math.isfinite(lr) and lr >= 0) or not 0 <= momentum < 1 or weight_decay < 0:
        raise ValueError(f"need lr >= 0, momentum in [0, 1) and weight_decay >= 0; got lr={lr}, "
                         f"momentum={momentum}, weight_decay={weight_decay}")
    _check_layers(weights, scores)
    device = clients.X.device
    idx = torch.as_tensor(np.asarray(idx), dtype=torch.long).reshape(-1)
    if len(idx) == 0:
        raise ValueError("no clients selected (idx is empty)")
    if int(idx.min()) < 0 or int(idx.max()) >= clients.n_clients:
        raise ValueError(f"client ids must lie in [0, {clients.n_clients}), got {idx.tolist()}")
    if clients.X.shape[-1] != weights[0].shape[1]:
        raise ValueError(f"the network takes {weights[0].shape[1]} features, the clients' data "
                         f"have {clients.X.shape[-1]}")
    idx = idx.to(device)
    k = len(idx)
    sampler = BatchSampler(clients.sizes[idx], batch_size, generator)
    current = [s.detach().unsqueeze(0).expand(k, *s.shape).clone() for s in scores]
    buffers = None
    counted = 0
    for step in range(int(steps)):
        rows, valid = sampler.draw(step)
        xb, yb = clients.X[idx[:, None], rows], clients.y[idx[:, None], rows]
        w = valid.to(xb.dtype)
        leaves = [s.requires_grad_() for s in current]
        logits = forward(weights, leaves, xb, density)
        per_sample = nn.functional.cross_entropy(logits.flatten(0, 1), yb.flatten(),
                                                 reduction="none").view_as(w)
        loss = ((per_sample * w).sum(1) / w.sum(1)).sum()
        grads = torch.autograd.grad(loss, leaves)
        counted += int(valid.sum())
        with torch.no_grad():
            steps_ = [g + weight_decay * s for g, s in zip(grads, current, strict=True)]
            buffers = steps_ if buffers is None else [
                momentum * b + g for b, g in zip(buffers, steps_, strict=True)]
            current = [s.detach() - lr * b for s, b in zip(current, buffers, strict=True)]
    return [s.detach() for s in current], counted


@torch.no_grad()
def evaluate(weights: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], X: torch.Tensor,
             y: torch.Tensor, density: float, batch_size: int = 4096) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the supermasked network with global `scores`."""
    if len(X) != len(y) or len(X) == 0:
        raise ValueError(f"need as many labels as rows and at least one row; X has {len(X)} rows "
                         f"and y {len(y)} labels")
    loss, correct = 0.0, 0
    for start in range(0, len(X), batch_size):
        logits = forward(weights, scores, X[start:start + batch_size], density)
        target = y[start:start + batch_size]
        loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    return loss / len(X), correct / len(X)


# Who takes part: the authors' sampling, which keeps malicious clients below half of a round


def sample_rounds(n_clients: int, per_round: int, n_rounds: int, n_malicious: int,
                  seed: int) -> np.ndarray:
    """(n_rounds, n_clients) bool: `per_round` distinct clients a round, drawn uniformly and
    redrawn while malicious clients (ids below `n_malicious`, as in the authors' code) would make
    up half of the round or more."""
    for name, value in [("n_clients", n_clients), ("per_round", per_round),
                        ("n_rounds", n_rounds)]:
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if per_round > n_clients:
        raise ValueError(f"per_round={per_round} distinct clients, but only {n_clients} clients")
    if not 0 <= n_malicious <= n_clients:
        raise ValueError(f"n_malicious must be in [0, {n_clients}], got {n_malicious}")
    most = math.ceil(per_round / 2) - 1  # malicious clients a round may hold
    if n_clients - n_malicious < per_round - most:
        raise ValueError(f"with {n_malicious} malicious of {n_clients} clients no round of "
                         f"{per_round} can keep malicious clients below half")
    rng = np.random.default_rng(seed)
    out = np.zeros((n_rounds, n_clients), dtype=bool)
    for r in range(n_rounds):
        while True:
            chosen = rng.choice(n_clients, per_round, replace=False)
            if np.sum(chosen < n_malicious) <= most:
                break
        out[r, chosen] = True
    return out


# Server


@dataclass
class FRLHistory:
    """Per evaluated round: test loss and accuracy; per round: malicious participants, the vote
    diagnostic (`kept`, see `kept_share`) and sample gradients; bits per client per round."""

    rounds: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    acc: list[float] = field(default_factory=list)
    n_malicious: list[int] = field(default_factory=list)
    kept: list[float] = field(default_factory=list)
    sample_grads: list[int] = field(default_factory=list)
    upload_bits: int = 0
    download_bits: int = 0
    scores: list[torch.Tensor] = field(default_factory=list)


def run_frl(sizes: Sequence[int], clients: Clients, *, participation: np.ndarray, eval_data,
            malicious: Sequence[int] = (), attack: str = "none", local_steps: int, lr: float,
            batch_size: int, density: float = 0.5, momentum: float = 0.9,
            weight_decay: float = 1e-4, seed: int, eval_every: int = 1, agreement: float = 0.7,
            progress: bool = False) -> FRLHistory:
    """Federated rank learning on the simulator's clients, one round per row of `participation`.

    `malicious` clients that take part submit the malicious ranking of `attack` (computed from
    the round's benign rankings: an attacker that knows the benign updates); with
    `attack="none"` they behave like everyone else. Local training: `train_scores` with
    `local_steps`, `lr`, `batch_size`, `momentum`, `weight_decay`. `seed` fixes the network, the
    scores and the minibatches.
    """
    sizes = check_sizes(sizes)
    density = check_density(density)
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
    participation = np.asarray(participation, dtype=bool)
    if participation.ndim != 2 or participation.shape[1] != len(clients.sizes):
        raise ValueError(f"participation must be (rounds, {len(clients.sizes)} clients), got "
                         f"shape {participation.shape}")
    malicious = np.asarray(sorted(set(int(c) for c in malicious)), dtype=int)
    if len(malicious) and (malicious.min() < 0 or malicious.max() >= len(clients.sizes)):
        raise ValueError(f"malicious client ids must lie in [0, {len(clients.sizes)})")
    X_test, y_test = eval_data
    device = clients.X.device
    g = torch.Generator().manual_seed(seed)
    weights = [w.to(device) for w in signed_constant(sizes, g)]
    scores = [s.to(device) for s in init_scores(sizes, g)]
    sorted_initial = [s.flatten().sort().values for s in scores]
    bits = communication_bits(sizes)
    hist = FRLHistory(upload_bits=bits["frl_upload"], download_bits=bits["frl_download"])

    for r in bar(range(len(participation)), enabled=progress, leave=False, desc=f"FRL {attack}"):
        part = np.flatnonzero(participation[r])
        if len(part) == 0:
            raise ValueError(f"round {r} has no participants")
        bad = np.isin(part, malicious) if attack != "none" else np.zeros(len(part), bool)
        benign, n_bad = part[~bad], int(bad.sum())
        if len(benign) == 0:
            raise ValueError(f"round {r} has only malicious participants: nothing to vote on")
        trained, count = train_scores(weights, scores, clients, benign, steps=local_steps,
                                      lr=lr, batch_size=batch_size, density=density,
                                      generator=g, momentum=momentum, weight_decay=weight_decay)
        kept = []
        for layer, stacked in enumerate(trained):
            votes = ranking(stacked)
            if n_bad:
                evil = malicious_ranking(attack, votes, density)
                votes = torch.cat([votes, evil.expand(n_bad, -1)])
            global_ranking = vote(votes)[0]
            kept.append(kept_share(votes[:len(benign)], global_ranking, density, agreement))
            scores[layer] = reset_scores(global_ranking, sorted_initial[layer],
                                         scores[layer].shape)
        hist.n_malicious.append(n_bad)
        hist.kept.append(float(np.nanmean(kept)) if not np.all(np.isnan(kept)) else float("nan"))
        hist.sample_grads.append(count)
        if (r + 1) % eval_every == 0 or r == len(participation) - 1:
            loss, acc = evaluate(weights, scores, X_test, y_test, density)
            hist.rounds.append(r)
            hist.loss.append(loss)
            hist.acc.append(acc)
    hist.scores = [s.detach().cpu() for s in scores]
    return hist
