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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn

from repsuite.federated import attacks, partition
from repsuite.federated.aggregators import coordinate_median, fedavg, trimmed_mean
from repsuite.federated.clients import BatchSampler, Clients
from repsuite.federated.server import History, run
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


# Model poisoning of the float-update baselines


def agr_tailored(benign: torch.Tensor, n_malicious: int, aggregate: Callable, *,
                 deviation: str = "std", lambda_init: float = 5.0, tol: float = 1e-5
                 ) -> torch.Tensor:
    """The malicious update of the AGR-tailored attack (Shejwalkar and Houmansadr, NDSS 2021),
    as the FRL authors run it against Trimmed-mean and Multi-Krum.

    The update is mean - lambda * p, with p the coordinate-wise std of the known benign updates
    (`deviation="std"`), their sign (`"sign"`) or their unit mean (`"unit"`). lambda is searched
    to maximise || aggregate(n_malicious copies + benign) - mean ||: start at `lambda_init`, move
    up after an improvement and down otherwise, halving the move each time, until it is below
    `tol`; the best lambda seen wins. `aggregate` maps (n, P) updates to (P,).
    """
    benign = torch.as_tensor(benign)
    if benign.dim() != 2 or len(benign) < 2:
        raise ValueError(f"benign must be (k >= 2 updates, P), got shape {tuple(benign.shape)}")
    if not bool(torch.isfinite(benign).all()):
        raise ValueError("benign updates contain NaN or infinite values")
    if not isinstance(n_malicious, int | np.integer) or n_malicious < 1:
        raise ValueError(f"n_malicious must be an int >= 1, got {n_malicious!r}")
    if not lambda_init > 0 or not tol > 0:
        raise ValueError(f"lambda_init and tol must be > 0, got {lambda_init} and {tol}")
    mean = benign.mean(0)
    if deviation == "std":
        p = benign.std(0)
    elif deviation == "sign":
        p = mean.sign()
    elif deviation == "unit":
        p = mean / mean.norm().clamp(min=1e-12)
    else:
        raise ValueError(f"deviation must be one of std, sign, unit; got {deviation!r}")

    def damage(lam: float) -> float:
        crafted = (mean - lam * p).expand(int(n_malicious), -1)
        return float((aggregate(torch.cat([crafted, benign])) - mean).norm())

    lam, move = float(lambda_init), float(lambda_init) / 2
    best_lam, best = 0.0, damage(0.0)
    previous = best
    while move > tol:
        now = damage(lam)
        if now > best:
            best_lam, best = lam, now
        lam = lam + move if now > previous else max(lam - move, 0.0)
        previous = now
        move /= 2
    return mean - best_lam * p


BASELINES = ("fedavg", "trmean", "median")
BASELINE_ATTACKS = ("none", "tailored")


def baseline_rule(name: str, malicious: Sequence[int] = (), attack: str = "none", *,
                  lambda_init: float = 5.0, tol: float = 1e-5) -> Callable:
    """The server rule of a float-update baseline, in the simulator's signature, with the
    round's malicious participants replaced by the AGR-tailored update against that rule.

    `fedavg`: the plain mean (the authors' FedAvg ignores client sizes); `trmean`: the
    coordinate-wise trimmed mean dropping, at each end, as many values as there are malicious
    clients in the round (the authors' server knows that count, which favours it); `median`:
    the coordinate-wise median. Against the mean the attack's damage has no maximum, so its
    lambda search ends at its cap, about 2 * lambda_init.
    """
    if name not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {name!r}")
    if attack not in BASELINE_ATTACKS:
        raise ValueError(f"baseline attack must be one of {BASELINE_ATTACKS}, got {attack!r}")
    bad_ids = np.asarray(sorted(set(int(c) for c in malicious)), dtype=int)

    def rule(deltas: torch.Tensor, n_bad: int) -> torch.Tensor:
        if name == "fedavg":
            return fedavg(deltas)
        if name == "trmean":
            return trimmed_mean(deltas, n_trim=n_bad)
        return coordinate_median(deltas)

    def aggregate(deltas, weights, round, info):
        rows = attacks.byzantine_rows(info["participants"], bad_ids) if attack != "none" else []
        n_bad = len(rows)
        if n_bad:
            benign = np.ones(len(deltas), dtype=bool)
            benign[rows] = False
            crafted = agr_tailored(deltas[torch.as_tensor(benign)], n_bad,
                                   lambda d: rule(d, n_bad), lambda_init=lambda_init, tol=tol)
            deltas = deltas.clone()
            deltas[torch.as_tensor(rows)] = crafted
        return rule(deltas, n_bad)

    aggregate.__name__ = f"{name}_{attack}"
    return aggregate


def run_baseline(name: str, sizes: Sequence[int], clients: Clients, *, participation: np.ndarray,
                 eval_data, malicious: Sequence[int] = (), attack: str = "none",
                 local_steps: int, lr: float, batch_size: int, momentum: float = 0.9,
                 weight_decay: float = 1e-4, seed: int, eval_every: int = 1,
                 lambda_init: float = 5.0, attack_tol: float = 1e-5,
                 progress: bool = False) -> History:
    """A float-update baseline on the simulator's server loop: the dense bias-free MLP, its
    weights initialised from `seed` (PyTorch's default Linear init), trained by local SGD."""
    model = DenseMLP(sizes).to(clients.device)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                weight = torch.empty(layer.weight.shape)
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=g)
                layer.weight.copy_(weight)
    participation = np.asarray(participation, dtype=bool)
    return run(model, clients, rounds=len(participation), participation=participation,
               local_steps=local_steps, lr=lr, batch_size=batch_size, seed=seed,
               aggregate=baseline_rule(name, malicious, attack, lambda_init=lambda_init,
                                       tol=attack_tol),
               eval_every=eval_every,
               eval_data=eval_data, momentum=momentum, weight_decay=weight_decay,
               weights="uniform", progress=progress)


def final_accuracy(acc: Sequence[float], tail: int) -> float:
    """Mean of the last `tail` evaluated accuracies: one round's accuracy is noisy."""
    acc = list(acc)
    if not isinstance(tail, int) or tail < 1 or tail > len(acc):
        raise ValueError(f"tail must be an int in [1, {len(acc)}] (evaluations made), got {tail!r}")
    return float(np.mean(acc[-tail:]))


# One experiment: data split, clients, schedule; one method under one attack


@dataclass
class Problem:
    """One seed's federated problem: train / validation / test tensors, the clients' padded
    data, who takes part in each round and which clients are malicious."""

    seed: int
    clients: Clients
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    participation: np.ndarray
    malicious: np.ndarray
    n_features: int
    n_classes: int


def make_problem(X: np.ndarray, y: np.ndarray, *, n_clients: int, alpha: float, per_round: int,
                 rounds: int, mal_frac: float, seed: int, device, pool: int = 1,
                 test_size: float = 0.2, val_size: float = 0.1) -> Problem:
    """Split (stratified, by `seed`) into train / validation / test, spread the training rows
    over `n_clients` with Dirichlet(`alpha`) label skew, and draw the rounds with the authors'
    rule: malicious clients are the lowest ids, int(mal_frac * n_clients) of them, and fewer
    than half of any round.

    Pixels are scaled to [0, 1] (by their maximum, 255 for MNIST and 16 for sklearn digits);
    `pool` > 1 average-pools square images by that factor (28x28 -> 14x14 for pool=2).
    """
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X must be (n, d) with one label per row; got X {X.shape}, y {y.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError("X contains NaN or infinite values")
    if not 0 <= mal_frac < 0.5:
        raise ValueError(f"mal_frac must be in [0, 0.5), got {mal_frac}")
    if not (0 < test_size < 1 and 0 < val_size < 1 and test_size + val_size < 1):
        raise ValueError(f"need test_size, val_size in (0, 1) with a sum below 1; got "
                         f"{test_size} and {val_size}")
    X = X / max(float(X.max()), 1e-12)
    if pool > 1:
        side = math.isqrt(X.shape[1])
        if side * side != X.shape[1] or side % pool:
            raise ValueError(f"pool={pool} needs square images whose side it divides; rows "
                             f"have {X.shape[1]} pixels")
        images = torch.from_numpy(X).view(-1, 1, side, side)
        X = nn.functional.avg_pool2d(images, pool).flatten(1).numpy()
    X_rest, X_test, y_rest, y_test = train_test_split(X, y, test_size=test_size,
                                                      random_state=seed, stratify=y)
    X_train, X_val, y_train, y_val = train_test_split(
        X_rest, y_rest, test_size=val_size / (1 - test_size), random_state=seed, stratify=y_rest)
    parts = partition.dirichlet(y_train, n_clients, alpha, seed=seed, min_size=2)
    clients = Clients.from_partition(X_train, y_train, parts, device)
    n_malicious = int(mal_frac * n_clients)

    def t(a, dtype):
        return torch.as_tensor(a, dtype=dtype, device=device)

    return Problem(seed=seed, clients=clients, X_val=t(X_val, torch.float32),
                   y_val=t(y_val, torch.long), X_test=t(X_test, torch.float32),
                   y_test=t(y_test, torch.long),
                   participation=sample_rounds(n_clients, per_round, rounds, n_malicious, seed),
                   malicious=np.arange(n_malicious), n_features=X.shape[1],
                   n_classes=int(np.max(y)) + 1)


METHODS = ("frl",) + BASELINES


def run_method(problem: Problem, method: str, attack: str, *, hidden: Sequence[int], lr: float,
               local_steps: int, batch_size: int, density: float, momentum: float,
               weight_decay: float, tail: int, on: str = "test", lambda_init: float = 5.0,
               attack_tol: float = 1e-5, progress: bool = False) -> dict:
    """Train one method under one attack on `problem`; the accuracy curve is on the test split
    (`on="test"`) or the validation split (`on="val"`). Returns one row of results: method,
    attack, seed, lr, final_acc (mean of the last `tail` rounds), best_acc, acc_curve,
    upload / download bits per client per round, mean vote diagnostic (FRL only)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if on not in ("test", "val"):
        raise ValueError(f"on must be 'test' or 'val', got {on!r}")
    sizes = [problem.n_features, *hidden, problem.n_classes]
    eval_data = (problem.X_test, problem.y_test) if on == "test" else (problem.X_val,
                                                                      problem.y_val)
    common = dict(participation=problem.participation, eval_data=eval_data,
                  malicious=problem.malicious, attack=attack, local_steps=local_steps, lr=lr,
                  batch_size=batch_size, momentum=momentum, weight_decay=weight_decay,
                  seed=problem.seed, progress=progress)
    bits = communication_bits(sizes)
    if method == "frl":
        hist = run_frl(sizes, problem.clients, density=density, **common)
        curve, kept = hist.acc, float(np.nanmean(hist.kept))
        up, down = bits["frl_upload"], bits["frl_download"]
    else:
        hist = run_baseline(method, sizes, problem.clients, lambda_init=lambda_init,
                            attack_tol=attack_tol, **common)
        curve, kept = hist.test_acc[1:], float("nan")  # entry 0 is the untrained model
        up, down = bits["fedavg_upload"], bits["fedavg_download"]
    return {"method": method, "attack": attack, "seed": problem.seed, "lr": lr,
            "final_acc": final_accuracy(curve, tail), "best_acc": float(max(curve)),
            "acc_curve": [float(a) for a in curve], "upload_bits": up, "download_bits": down,
            "kept": kept}
