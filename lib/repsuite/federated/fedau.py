"""FedAU: federated averaging with online estimates of the optimal aggregation weights.

Wang & Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in Federated
Averaging", ICLR 2024 (arXiv 2306.03401).

Client n takes part in round t with an unknown probability p_n. Averaging only the participants'
updates then minimises a re-weighted objective (client n counts ~ p_n) instead of the original
f(x) = (1/N) sum_n F_n(x). The optimal aggregation weight is 1/p_n, the mean number of rounds
between two participations; FedAU estimates it online for every client from its own participation
history, with three scalars of memory per client:

    M_n        rounds since the last recorded interval
    sum_n      sum of the recorded intervals
    S_n        number of recorded intervals

Each round, M_n grows by one. When the client participates, or when M_n reaches the cutoff K
without a participation, M_n is recorded as one interval and reset. The weight used in round t is
the mean recorded interval up to round t - 1 (1 before any interval is recorded), so it is
independent of the participation in round t itself. A finite K caps the intervals: under
Bernoulli participation the estimate tends to (1 - (1 - p)^K) / p instead of 1/p, a downward
bias that the paper trades for a lower variance of the estimate.

The server update divides by the total number of clients N, not by the number of participants:

    x_{t+1} = x_t + eta_g * (1/N) * sum_{n participating} omega_n * Delta_n

This module holds the estimator, FedAU and the baselines the paper compares against (average
over participants, average over all clients, known participation probabilities, MIFA, FedVARP)
as aggregation rules with one interface, the paper's participation patterns that the shared
simulator does not have (label-correlated rates, Markovian and per-client cyclic participation),
and a lockstep driver that trains many runs (methods x rates x seeds) with one vectorised local
update per round.
"""

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from repsuite.federated.clients import (
    BatchSampler,
    Clients,
    flatten_stack,
    local_sgd,
    params_of,
    unflatten,
)
from repsuite.progress import bar

# -------------------------------------------------------------------------------------------------
# Input checks


def _as_participation(participation, name: str = "participation") -> np.ndarray:
    """A (T, N) bool array from 0/1 or bool values, or a clear error."""
    arr = np.asarray(participation)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a (rounds, clients) array, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} needs at least one round and one client, got shape {arr.shape}")
    return _as_mask(arr, name)


def _as_mask(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must hold 0/1 or booleans, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if not np.all((arr == 0) | (arr == 1)):
        bad = np.unique(arr[(arr != 0) & (arr != 1)])[:5]
        raise ValueError(f"{name} must hold only 0 and 1, found {bad.tolist()}")
    return arr.astype(bool)


def _check_K(K) -> float:
    """The cutoff as a float (inf for none); K must be a positive integer or None."""
    if K is None or (isinstance(K, float) and math.isinf(K) and K > 0):
        return math.inf
    if isinstance(K, bool) or not isinstance(K, int | np.integer) or K < 1:
        raise ValueError(f"cutoff K must be a positive integer or None (no cutoff), got {K!r}")
    return float(K)


def check_rates(rates, n_clients: int | None = None) -> np.ndarray:
    """Participation probabilities in (0, 1], one per client, or a clear error."""
    p = np.asarray(rates, dtype=float)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"participation rates must be a non-empty 1-D array, got shape {p.shape}")
    if n_clients is not None and p.size != n_clients:
        raise ValueError(f"{p.size} participation rates given for {n_clients} clients")
    if not np.all(np.isfinite(p)):
        raise ValueError("participation rates contain NaN or infinite values")
    if np.any(p > 1) or np.any(p < 0):
        raise ValueError(f"participation rates must lie in [0, 1], got min {p.min():g}, "
                         f"max {p.max():g}")
    zero = np.flatnonzero(p == 0)
    if zero.size:
        raise ValueError(f"clients {zero[:10].tolist()} have participation rate 0: they never take "
                         "part, so the weight 1/p is undefined and their objective is unreachable")
    return p


# -------------------------------------------------------------------------------------------------
# The online weight estimate


class OnlineWeights:
    """FedAU's estimate of each client's optimal aggregation weight 1/p_n, for all clients at once.

    Call `weights()` for the weights of the current round, then `update(participated)` with that
    round's participation. `K=None` means no cutoff (the paper's K -> infinity).
    """

    def __init__(self, n_clients: int, K: int | None = None):
        if isinstance(n_clients, bool) or not isinstance(n_clients, int | np.integer) \
                or n_clients < 1:
            raise ValueError(f"n_clients must be a positive integer, got {n_clients!r}")
        self.n_clients = int(n_clients)
        self.K = _check_K(K)
        self.M = np.zeros(self.n_clients, dtype=np.int64)
        self.interval_sum = np.zeros(self.n_clients, dtype=np.float64)
        self.S = np.zeros(self.n_clients, dtype=np.int64)

    def weights(self) -> np.ndarray:
        """omega_n: the mean recorded interval, 1 for a client with none recorded yet."""
        omega = np.ones(self.n_clients)
        seen = self.S > 0
        omega[seen] = self.interval_sum[seen] / self.S[seen]
        return omega

    def update(self, participated) -> None:
        """Advance one round with this round's participation (N bools)."""
        q = _as_mask(participated, "participated")
        if q.shape != (self.n_clients,):
            raise ValueError(f"participated must have one entry per client ({self.n_clients}), "
                             f"got shape {q.shape}")

        self.M += 1

        # An interval ends at a participation or when it reaches the cutoff K.
        ended = q | (self.M >= self.K)
        self.interval_sum[ended] += self.M[ended]
        self.S[ended] += 1
        self.M[ended] = 0

    @property
    def memory_scalars(self) -> int:
        """Extra server memory, in scalars: three per client, whatever the model size."""
        return 3 * self.n_clients


def online_weights(participation, K: int | None = None) -> np.ndarray:
    """The weights omega_t^n FedAU uses in every round t of a (T, N) participation record."""
    q = _as_participation(participation)
    est = OnlineWeights(q.shape[1], K)
    out = np.empty(q.shape)
    for t in range(q.shape[0]):
        out[t] = est.weights()
        est.update(q[t])
    return out


def expected_weight(rates, K: int | None = None) -> np.ndarray:
    """Limit of the estimate under Bernoulli(p) participation: E[min(G, K)], G ~ Geometric(p).

    Equal to 1/p without a cutoff and to (1 - (1 - p)^K) / p with one; the gap is the estimate's
    bias that the cutoff K introduces.
    """
    p = check_rates(rates)
    cutoff = _check_K(K)
    if math.isinf(cutoff):
        return 1.0 / p
    return (1.0 - (1.0 - p) ** cutoff) / p


# -------------------------------------------------------------------------------------------------
# Aggregation rules: FedAU and the paper's baselines


def _check_round(deltas: torch.Tensor, participated, n_clients: int) -> np.ndarray:
    q = _as_mask(participated, "participated")
    if q.shape != (n_clients,):
        raise ValueError(f"participated must have one entry per client ({n_clients}), "
                         f"got shape {q.shape}")
    idx = np.flatnonzero(q)
    if deltas.ndim != 2 or deltas.shape[0] != idx.size:
        raise ValueError(f"deltas must be (participants, params) = ({idx.size}, P), "
                         f"got shape {tuple(deltas.shape)}")
    if not torch.isfinite(deltas).all():
        raise ValueError("client updates contain NaN or infinite values (diverged local training?)")
    return idx


class Rule:
    """An aggregation rule: `rule(deltas, participated) -> update` with server-side state.

    `deltas` holds the participants' updates (theta_local - theta_global) as rows, in increasing
    client order; `participated` is the round's (N,) participation. The global model then moves by
    `global_lr * update`. A round without participants never yields NaN.
    """

    name = "rule"

    def __init__(self, n_clients: int):
        if isinstance(n_clients, bool) or not isinstance(n_clients, int | np.integer) \
                or n_clients < 1:
            raise ValueError(f"n_clients must be a positive integer, got {n_clients!r}")
        self.n_clients = int(n_clients)

    def __call__(self, deltas: torch.Tensor, participated) -> torch.Tensor:
        idx = _check_round(deltas, participated, self.n_clients)
        return self.aggregate(deltas, idx)

    def aggregate(self, deltas: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def memory_scalars(self, n_params: int) -> int:
        """Extra server memory in scalars for a model of `n_params` parameters."""
        return 0


def _weighted_sum_over_n(deltas, weights, n_clients) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=deltas.dtype, device=deltas.device)
    return (w @ deltas) / n_clients


class FedAU(Rule):
    """(1/N) sum omega_n Delta_n with FedAU's online weights (the paper's Algorithm 1)."""

    name = "FedAU"

    def __init__(self, n_clients: int, K: int | None = None):
        super().__init__(n_clients)
        self.estimator = OnlineWeights(n_clients, K)

    def __call__(self, deltas, participated):
        idx = _check_round(deltas, participated, self.n_clients)

        # The weight of round t uses the history up to t - 1 only.
        omega = self.estimator.weights()[idx]
        self.estimator.update(participated)
        if idx.size == 0:
            return deltas.new_zeros(deltas.shape[1])
        return _weighted_sum_over_n(deltas, omega, self.n_clients)

    def memory_scalars(self, n_params: int) -> int:
        return self.estimator.memory_scalars


class KnownProb(Rule):
    """(1/N) sum Delta_n / p_n with the true participation probabilities (the paper's oracle)."""

    name = "known prob."

    def __init__(self, rates):
        self.rates = check_rates(rates)
        super().__init__(self.rates.size)

    def aggregate(self, deltas, idx):
        if idx.size == 0:
            return deltas.new_zeros(deltas.shape[1])
        return _weighted_sum_over_n(deltas, 1.0 / self.rates[idx], self.n_clients)


class AverageParticipating(Rule):
    """Plain FedAvg under partial participation: the mean over the round's participants."""

    name = "avg. participating"

    def aggregate(self, deltas, idx):
        if idx.size == 0:
            return deltas.new_zeros(deltas.shape[1])
        return deltas.mean(0)


class AverageAll(Rule):
    """(1/N) sum Delta_n: absent clients count as zero updates (unbiased only if all p_n equal)."""

    name = "avg. all"

    def aggregate(self, deltas, idx):
        return deltas.sum(0) / self.n_clients


class MIFA(Rule):
    """MIFA (Gu et al., 2021): the mean over all N clients of each one's latest update.

    The server stores one update per client (zeros until the client first participates).
    """

    name = "MIFA"

    def __init__(self, n_clients: int):
        super().__init__(n_clients)
        self.latest = None

    def aggregate(self, deltas, idx):
        if self.latest is None:
            self.latest = deltas.new_zeros(self.n_clients, deltas.shape[1])
        self.latest[torch.as_tensor(idx, device=deltas.device)] = deltas
        return self.latest.mean(0)

    def memory_scalars(self, n_params: int) -> int:
        return self.n_clients * n_params


class FedVARP(Rule):
    """FedVARP (Jhunjhunwala et al., 2022): SAGA-style correction with stored client updates.

    update = mean over participants of (Delta_n - y_n) + mean over all clients of y, then
    y_n <- Delta_n for the participants. With no participant the correction term is empty and the
    update is the stored mean alone.
    """

    name = "FedVARP"

    def __init__(self, n_clients: int):
        super().__init__(n_clients)
        self.latest = None

    def aggregate(self, deltas, idx):
        if self.latest is None:
            self.latest = deltas.new_zeros(self.n_clients, deltas.shape[1])
        stored_mean = self.latest.mean(0)
        if idx.size == 0:
            return stored_mean
        rows = torch.as_tensor(idx, device=deltas.device)
        update = (deltas - self.latest[rows]).mean(0) + stored_mean
        self.latest[rows] = deltas
        return update

    def memory_scalars(self, n_params: int) -> int:
        return (self.n_clients + 1) * n_params


METHODS = ("fedau", "avg_participating", "avg_all", "known_prob", "mifa", "fedvarp")


def make_rule(method: str, n_clients: int, *, rates=None, K: int | None = None) -> Rule:
    """A fresh rule by name (one of METHODS); `rates` only for the oracle, `K` only for FedAU."""
    if method == "fedau":
        return FedAU(n_clients, K)
    if method == "known_prob":
        if rates is None:
            raise ValueError("the known-probability oracle needs the true participation rates")
        rule = KnownProb(rates)
        if rule.n_clients != n_clients:
            raise ValueError(f"{rule.n_clients} participation rates given for {n_clients} clients")
        return rule
    simple = {"avg_participating": AverageParticipating, "avg_all": AverageAll, "mifa": MIFA,
              "fedvarp": FedVARP}
    if method not in simple:
        raise ValueError(f"unknown aggregation method {method!r}; choose one of {METHODS}")
    return simple[method](n_clients)


# -------------------------------------------------------------------------------------------------
# Participation patterns of the paper


def label_correlated_rates(label_counts, *, mean_rate: float = 0.1, min_rate: float = 0.02,
                           alpha: float = 0.1, seed: int = 0) -> np.ndarray:
    """Participation probabilities that depend on each client's label mix (the paper's setup).

    A multiplier m over the C classes is drawn from Dirichlet(alpha); client n gets
    p_n = C * mean_rate * sum_c d_nc m_c, with d_n its label distribution, floored at `min_rate`.
    Clients holding the favoured classes participate often, the others rarely, so averaging
    only the participants over-weights some classes.
    """
    counts = np.asarray(label_counts, dtype=float)
    if counts.ndim != 2 or counts.shape[0] < 1 or counts.shape[1] < 2:
        raise ValueError(f"label_counts must be (clients, classes >= 2), got shape {counts.shape}")
    if np.any(counts < 0) or not np.all(np.isfinite(counts)):
        raise ValueError("label_counts must be finite and non-negative")
    empty = np.flatnonzero(counts.sum(1) == 0)
    if empty.size:
        raise ValueError(f"clients {empty[:10].tolist()} hold no samples")
    if not 0 < mean_rate <= 1:
        raise ValueError(f"mean_rate must be in (0, 1], got {mean_rate}")
    if not 0 < min_rate <= 1:
        raise ValueError(f"min_rate must be in (0, 1], got {min_rate}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")

    n_classes = counts.shape[1]
    dist = counts / counts.sum(1, keepdims=True)
    multiplier = np.random.default_rng(seed).dirichlet(alpha * np.ones(n_classes))
    p = n_classes * mean_rate * dist @ multiplier
    return np.clip(p, min_rate, 1.0)


def markov(rates, n_rounds: int, seed: int, max_to_active: float = 0.05) -> np.ndarray:
    """Markovian participation with stationary probability p_n (the paper's "markov-0.05").

    A client moves inactive -> active with probability a and active -> inactive with
    b = a (1/p - 1), a = `max_to_active` unless b would exceed 1 (then b = 1, a = p / (1 - p)).
    The first state is drawn from the stationary law. Returns (n_rounds, N) bools.
    """
    p = check_rates(rates)
    if not 0 < max_to_active <= 1:
        raise ValueError(f"max_to_active must be in (0, 1], got {max_to_active}")
    _check_rounds(n_rounds)
    rng = np.random.default_rng(seed)

    to_active = np.full(p.size, float(max_to_active))
    to_inactive = np.where(p < 1, to_active * (1 / p - 1), 0.0)
    over = to_inactive > 1
    to_active[over] /= to_inactive[over]
    to_inactive[over] = 1.0

    out = np.empty((n_rounds, p.size), dtype=bool)
    state = rng.random(p.size) < p
    for t in range(n_rounds):
        u = rng.random(p.size)
        state = np.where(state, u >= to_inactive, u < to_active)
        out[t] = state
    return out


def cyclic_rates(rates, n_rounds: int, seed: int, cycle: int = 100) -> np.ndarray:
    """Per-client cyclic participation (the paper's "cyclic-100"): each client alternates between
    round(cycle * p_n) active rounds and the rest of the cycle inactive, from a random phase.
    Returns (n_rounds, N) bools.
    """
    p = check_rates(rates)
    _check_rounds(n_rounds)
    if isinstance(cycle, bool) or not isinstance(cycle, int) or cycle < 2:
        raise ValueError(f"cycle must be an integer >= 2, got {cycle!r}")
    active = np.maximum(1, np.round(cycle * p)).astype(int)
    inactive = np.maximum(1, cycle - active)
    period = active + inactive
    phase = np.random.default_rng(seed).integers(0, period)
    t = np.arange(n_rounds)[:, None]
    return (t + phase[None, :]) % period[None, :] < active[None, :]


def _check_rounds(n_rounds) -> None:
    if isinstance(n_rounds, bool) or not isinstance(n_rounds, int | np.integer) or n_rounds < 1:
        raise ValueError(f"n_rounds must be a positive integer, got {n_rounds!r}")


# -------------------------------------------------------------------------------------------------
# Many federated runs in lockstep


@dataclass
class Run:
    """One federated training run: where its clients sit in the shared `Clients`, who takes part
    in each round, how the server aggregates and at what global rate, and the start model."""

    name: str
    rule: Rule
    participation: np.ndarray  # (rounds, N) bools
    offset: int  # client n of this run is row offset + n of the shared Clients
    start: torch.Tensor  # (P,) flattened start parameters
    global_lr: float = 1.0
    meta: dict = field(default_factory=dict)  # labels for the results table (method, seed, ...)
    batch_seed: int | None = None  # the run's own minibatch stream (linear fast path)

    def __post_init__(self):
        self.participation = _as_participation(self.participation, f"run {self.name}: "
                                                                   "participation")
        if self.participation.shape[1] != self.rule.n_clients:
            raise ValueError(f"run {self.name}: participation has {self.participation.shape[1]} "
                             f"clients, its rule {self.rule.n_clients}")
        if not np.isfinite(self.global_lr) or self.global_lr <= 0:
            raise ValueError(f"run {self.name}: global_lr must be > 0, got {self.global_lr}")
        if self.offset < 0:
            raise ValueError(f"run {self.name}: offset must be >= 0, got {self.offset}")


@dataclass
class Lockstep:
    """What `train_lockstep` returns: final and iterate-averaged parameters, snapshots."""

    final: torch.Tensor  # (R, P)
    averaged: torch.Tensor  # (R, P): mean of the global models over rounds [average_from, T)
    snapshots: dict[int, torch.Tensor]  # round -> (R, P) global models after that many rounds
    diverged: np.ndarray  # (R,) bool: a run whose update became NaN/inf, frozen from then on
    sample_grads: int


class RunBatchSampler:
    """The core `BatchSampler`'s minibatches for several runs at once, each run's rows shuffling
    with the run's own generator, so that a run's batches do not depend on the runs trained
    beside it. With one run it draws exactly what `BatchSampler` draws with that generator.

    `counts[j]` consecutive rows (clients) belong to run j, which draws from `generators[j]`.
    """

    def __init__(self, sizes: torch.Tensor, batch_size: int, generators: Sequence,
                 counts: Sequence[int]):
        counts = [int(c) for c in counts]
        if len(generators) != len(counts) or sum(counts) != len(sizes):
            raise ValueError(f"{len(generators)} generators and counts summing to {sum(counts)} "
                             f"for {len(sizes)} rows: need one generator a run and one count "
                             "a run, covering every row")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) \
                or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.sizes = sizes
        self.per_client = sizes.clamp(max=int(batch_size))
        self.per_epoch = (sizes + self.per_client - 1) // self.per_client
        self.width = int(self.per_client.max())
        self.n_max = int(sizes.max())
        self._cols = torch.arange(self.n_max, device=sizes.device)
        ends = np.cumsum(counts)
        self.groups = [(g, int(e - c), int(e)) for g, c, e in zip(generators, counts, ends,
                                                                  strict=True) if c]
        # A run whose clients all train full batch never draws, as in `BatchSampler`.
        self.draws = [bool((self.per_epoch[a:b] > 1).any()) for _, a, b in self.groups]
        self.started = [False] * len(self.groups)
        self.keys = (self._cols / self.n_max).expand(len(sizes), -1).clone()
        self.order = None

    def draw(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows (k, width), valid (k, width) bool) for `step`, as `BatchSampler.draw`."""
        offsets = torch.arange(self.width, device=self.sizes.device)
        position = step % self.per_epoch
        fresh = position == 0
        renew = torch.zeros(len(self.sizes), dtype=torch.bool, device=self.sizes.device)
        for j, (g, a, b) in enumerate(self.groups):
            if not self.draws[j] or (self.started[j] and not bool(fresh[a:b].any())):
                continue

            # The run's keys span its own largest client, as its own BatchSampler's would.
            width = int(self.sizes[a:b].max())
            self.keys[a:b, :width] = torch.rand(b - a, width, generator=g,
                                                device=g.device).to(self.sizes.device)
            self.keys[a:b, width:] = 2.0
            renew[a:b] = fresh[a:b] | (not self.started[j])
            self.started[j] = True
        if self.order is None or bool(renew.any()):
            order = self.keys.masked_fill(self._cols >= self.sizes[:, None], 2.0).argsort(dim=1)
            self.order = order if self.order is None else torch.where(renew[:, None], order,
                                                                       self.order)
        slot = position[:, None] * self.per_client[:, None] + offsets
        valid = (offsets < self.per_client[:, None]) & (slot < self.sizes[:, None])
        rows = self.order.gather(1, slot % self.sizes[:, None])
        return rows, valid


def softmax_regression_sgd(starts: torch.Tensor, clients: Clients, idx, *, n_classes: int,
                           steps: int, lr: float, batch_size: int, generator,
                           counts: Sequence[int] | None = None,
                           weight_decay: float = 0.0) -> tuple[torch.Tensor, int]:
    """Local SGD of a softmax regression (`nn.Linear` + cross-entropy) with its gradient in
    closed form, for many clients at once: the same steps as the core `local_sgd` on that model
    (same batches from `BatchSampler`, same weight decay), several times faster because no
    per-client autograd graph is built.

    `starts` (k, P) holds each selected client's flattened start (weight (C, D) then bias (C),
    `nn.Linear`'s order). `generator` is one generator for all rows, or one per run with
    `counts` giving each run's number of rows (see `RunBatchSampler`). Returns (trained (k, P),
    sample gradients computed).
    """
    idx = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=clients.device).reshape(-1)
    k, D = len(idx), int(np.prod(clients.X.shape[2:]))
    C = int(n_classes)
    if starts.shape != (k, C * D + C):
        raise ValueError(f"starts must be ({k}, {C * D + C}) for {k} clients, {D} features and "
                         f"{C} classes; got {tuple(starts.shape)}")
    W = starts[:, :C * D].reshape(k, C, D).clone()
    b = starts[:, C * D:].clone()
    if counts is None:
        sampler = BatchSampler(clients.sizes[idx], batch_size, generator)
    else:
        sampler = RunBatchSampler(clients.sizes[idx], batch_size, generator, counts)
    counted = 0
    for step in range(steps):
        rows, valid = sampler.draw(step)
        xb = clients.X[idx[:, None], rows].reshape(k, -1, D)
        yb = clients.y[idx[:, None], rows]
        wb = valid.to(xb.dtype)
        wb = wb / wb.sum(1, keepdim=True)

        # d(mean cross-entropy)/d(logits) = softmax - one-hot, per sample, weighted.
        logits = torch.baddbmm(b[:, None, :], xb, W.transpose(1, 2))
        g = torch.softmax(logits, dim=-1)
        g.scatter_add_(2, yb[..., None], -torch.ones_like(yb[..., None], dtype=g.dtype))
        g = g * wb[..., None]
        grad_W = torch.bmm(g.transpose(1, 2), xb)
        grad_b = g.sum(1)
        if weight_decay:
            grad_W = grad_W + weight_decay * W
            grad_b = grad_b + weight_decay * b
        W = W - lr * grad_W
        b = b - lr * grad_b
        counted += int(valid.sum())
    return torch.cat([W.reshape(k, -1), b], dim=1), counted


def train_lockstep(model: nn.Module, clients: Clients, runs: Sequence[Run], *, rounds: int,
                   local_steps: int, lr: float, batch_size: int, seed: int,
                   weight_decay: float = 0.0, snapshot_every: int = 0,
                   average_from: int | None = None, fast_linear: bool = True,
                   progress: bool = True) -> Lockstep:
    """Train every run for `rounds` rounds, all local updates of a round in one vectorised call.

    Each round, every run's participants start local SGD (`local_steps` minibatch steps at rate
    `lr`) from that run's global model; the run's rule turns their updates into one update and
    the global model moves by `global_lr` times it. Runs that share participation records and
    start models form paired comparisons. Minibatches come from one generator seeded by `seed`;
    a round's participants of all runs draw from it together, so a run's batches (not its
    expected behaviour) depend on the other runs in the call. With `fast_linear`, an `nn.Linear`
    model trains by `softmax_regression_sgd` (the same steps, closed-form gradients); there, if
    every run has a `batch_seed`, each run draws from its own stream, seeded from it as the
    core server loop seeds its stream from `seed`, and no longer depends on the other runs.
    """
    if not runs:
        raise ValueError("no runs given")
    _check_rounds(rounds)
    for run in runs:
        if run.participation.shape[0] < rounds:
            raise ValueError(f"run {run.name}: participation covers "
                             f"{run.participation.shape[0]} rounds, {rounds} asked for")
        if run.offset + run.rule.n_clients > clients.n_clients:
            raise ValueError(f"run {run.name}: clients {run.offset}..."
                             f"{run.offset + run.rule.n_clients - 1} do not exist "
                             f"({clients.n_clients} clients)")
    average_from = rounds // 2 if average_from is None else average_from
    if not 0 <= average_from < rounds:
        raise ValueError(f"average_from must be in [0, {rounds}), got {average_from}")

    like = params_of(model)
    device = clients.device
    linear = fast_linear and isinstance(model, nn.Linear) and model.bias is not None \
        and not clients.y.is_floating_point()
    theta = torch.stack([r.start.to(device=device, dtype=clients.X.dtype) for r in runs])
    if theta.shape[1] != sum(p.numel() for p in like.values()):
        raise ValueError(f"start vectors have {theta.shape[1]} entries, the model "
                         f"{sum(p.numel() for p in like.values())} parameters")
    glr = torch.tensor([r.global_lr for r in runs], dtype=theta.dtype, device=device)
    running = torch.zeros_like(theta)
    diverged = np.zeros(len(runs), dtype=bool)
    snapshots = {0: theta.clone()} if snapshot_every else {}
    # The batch stream is derived from `seed` as the core server loop derives it, so that a single
    # run here reproduces `server.run` draw for draw.
    batches_seed = int(np.random.SeedSequence(seed).generate_state(2)[0])
    generator = torch.Generator().manual_seed(batches_seed)
    own = linear and all(r.batch_seed is not None for r in runs)
    if own:
        generators = [torch.Generator().manual_seed(
            int(np.random.SeedSequence(r.batch_seed).generate_state(2)[0])) for r in runs]
    sample_grads = 0

    for t in bar(range(rounds), enabled=progress, desc="rounds", leave=False):
        chosen = [np.flatnonzero(r.participation[t]) if not diverged[i] else np.empty(0, int)
                  for i, r in enumerate(runs)]
        counts = np.array([c.size for c in chosen])
        update = torch.zeros_like(theta)
        deltas = theta.new_zeros(0, theta.shape[1])

        # Every participant of every run trains in one call, each from its own run's model.
        if counts.sum():
            owner = torch.as_tensor(np.repeat(np.arange(len(runs)), counts), device=device)
            idx = np.concatenate([r.offset + c for r, c in zip(runs, chosen, strict=True)])
            starts = theta[owner]
            if linear:
                busy = np.flatnonzero(counts)
                trained, n = softmax_regression_sgd(
                    starts, clients, idx, n_classes=model.out_features, steps=local_steps, lr=lr,
                    batch_size=batch_size, weight_decay=weight_decay,
                    generator=[generators[i] for i in busy] if own else generator,
                    counts=counts[busy] if own else None)
            else:
                stacked, n = local_sgd(model, unflatten(starts, like), clients, idx,
                                       steps=local_steps, lr=lr, batch_size=batch_size,
                                       generator=generator, weight_decay=weight_decay)
                trained = flatten_stack(stacked)
            deltas = trained - starts
            sample_grads += n

        # Runs own consecutive rows of `deltas`; a run with a non-finite update is frozen.
        finite = torch.isfinite(deltas).all(1).cpu().numpy()
        ends = np.cumsum(counts)
        for i, run in enumerate(runs):
            if diverged[i]:
                continue
            lo, hi = ends[i] - counts[i], ends[i]
            if not finite[lo:hi].all():
                diverged[i] = True
                continue
            update[i] = run.rule(deltas[lo:hi], run.participation[t])
        theta = theta + glr[:, None] * update
        bad = ~torch.isfinite(theta).all(1).cpu().numpy()
        diverged |= bad

        if t >= average_from:
            running += theta
        if snapshot_every and ((t + 1) % snapshot_every == 0 or t + 1 == rounds):
            snapshots[t + 1] = theta.clone()

    return Lockstep(final=theta, averaged=running / (rounds - average_from), snapshots=snapshots,
                    diverged=diverged, sample_grads=sample_grads)


# -------------------------------------------------------------------------------------------------
# Measuring runs: the original objective, accuracy, the optimum


def _pooled_rows(clients: Clients, offset: int, n_clients: int, client_weights=None):
    """The real rows of clients offset..offset+N-1, and each row's weight a_n / n_c, with
    a_n = 1/N (the original objective) or the given client weights normalised to sum 1."""
    if isinstance(n_clients, bool) or not isinstance(n_clients, int | np.integer) or n_clients < 1:
        raise ValueError(f"n_clients must be a positive integer, got {n_clients!r}")
    if offset < 0 or offset + n_clients > clients.n_clients:
        raise ValueError(f"clients {offset}..{offset + n_clients - 1} do not exist "
                         f"({clients.n_clients} clients)")
    if client_weights is None:
        a = torch.full((n_clients, 1), 1.0 / n_clients, dtype=torch.float64)
    else:
        a = torch.as_tensor(np.asarray(client_weights, dtype=np.float64)).reshape(-1, 1)
        if a.shape[0] != n_clients or not torch.isfinite(a).all() or (a < 0).any() \
                or a.sum() <= 0:
            raise ValueError(f"client_weights must be {n_clients} finite values >= 0, not all "
                             "zero")
        a = a / a.sum()
    block = slice(offset, offset + n_clients)
    mask = clients.mask[block]
    w = mask.double() * a.to(mask.device) / mask.sum(1, keepdim=True).double()
    return clients.X[block][mask], clients.y[block][mask], w[mask].to(clients.X.dtype)


def objective(model: nn.Module, flat: torch.Tensor, clients: Clients, offset: int,
              n_clients: int, *, weight_decay: float = 0.0, client_weights=None,
              chunk_size: int | None = None) -> torch.Tensor:
    """f(x) = (1/N) sum_n F_n(x) (+ weight_decay/2 ||x||^2) for each row of `flat` (R, P).

    F_n is client n's mean cross-entropy on its own data: every client counts the same, whatever
    its size or participation rate. This original objective is the one FedAU targets. With
    `client_weights` a_n it is the re-weighted sum_n a_n F_n / sum a (e.g. a_n = p_n, the
    objective that averaging only the participants minimises).
    """
    like = params_of(model)
    flat = _as_rows(flat, like)
    X, y, w = _pooled_rows(clients, offset, n_clients, client_weights)
    w = w.to(flat.dtype)

    def f(p):
        per_sample = nn.functional.cross_entropy(functional_call(model, p, (X,)), y,
                                                 reduction="none")
        value = (per_sample * w).sum()
        if weight_decay:
            value = value + 0.5 * weight_decay * sum((q ** 2).sum() for q in p.values())
        return value

    with torch.no_grad():
        return vmap(f, chunk_size=chunk_size)(unflatten(flat, like))


def correct(model: nn.Module, flat: torch.Tensor, X: torch.Tensor, y: torch.Tensor, *,
            chunk_size: int | None = None) -> torch.Tensor:
    """(R, n) float 0/1: whether each row of `flat` classifies each sample of (X, y) right."""
    like = params_of(model)
    flat = _as_rows(flat, like)
    if len(X) != len(y) or len(X) == 0:
        raise ValueError(f"X has {len(X)} rows and y {len(y)} labels (need equal and > 0)")

    def hits(p):
        return (functional_call(model, p, (X,)).argmax(-1) == y).to(flat.dtype)

    with torch.no_grad():
        return vmap(hits, chunk_size=chunk_size)(unflatten(flat, like))


def _as_rows(flat: torch.Tensor, like) -> torch.Tensor:
    flat = torch.as_tensor(flat)
    if flat.ndim == 1:
        flat = flat[None]
    n = sum(p.numel() for p in like.values())
    if flat.ndim != 2 or flat.shape[1] != n:
        raise ValueError(f"parameters must be (runs, {n}), got shape {tuple(flat.shape)}")
    if not torch.isfinite(flat).all():
        raise ValueError("parameters contain NaN or infinite values (a diverged run?)")
    return flat


def optimum(model: nn.Module, clients: Clients, offset: int, n_clients: int, *,
            weight_decay: float, client_weights=None, init: torch.Tensor | None = None,
            max_iter: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """argmin of `objective` by full-batch L-BFGS in float64 from `init` (zeros by default): the
    unique optimum x* when the model is linear and weight_decay > 0 (a gradient entry of 1e-7
    leaves f within ~1e-11 of f* at that curvature). Returned flattened in the model's dtype."""
    if weight_decay <= 0:
        raise ValueError("the optimum is only unique with weight_decay > 0 (a strongly convex "
                         f"objective for a linear model), got {weight_decay}")
    like = params_of(model)
    X, y, w = _pooled_rows(clients, offset, n_clients, client_weights)
    X, w = X.double(), w.double()
    like64 = {k: v.double() for k, v in like.items()}
    n = sum(p.numel() for p in like.values())
    x = (torch.zeros(n, dtype=torch.float64, device=X.device) if init is None
         else init.detach().to(device=X.device, dtype=torch.float64).reshape(n).clone())
    x.requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=tol * 1e-2, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        out = functional_call(model, unflatten(x, like64), (X,))
        loss = (nn.functional.cross_entropy(out, y, reduction="none") * w).sum()
        loss = loss + 0.5 * weight_decay * (x ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return x.detach().to(next(iter(like.values())).dtype)


def as_server_aggregate(rule: Rule) -> Callable:
    """`rule` in the core server loop's signature `(deltas, weights, round, info) -> delta`.

    The loop skips rounds without participants; FedAU's estimate must still count them as
    silent rounds, so the skipped rounds are replayed as empty rounds before the next call. The
    loop's client weights are ignored: these rules weight clients by participation alone.
    """
    seen = {"next": 0}

    def aggregate(deltas, weights, round, info):
        n = info["n_clients"]
        if n != rule.n_clients:
            raise ValueError(f"the server has {n} clients, the rule {rule.n_clients}")
        for _ in range(seen["next"], round):
            rule(deltas.new_zeros(0, deltas.shape[1]), np.zeros(n, dtype=bool))
        q = np.zeros(n, dtype=bool)
        q[np.asarray(info["participants"])] = True
        seen["next"] = round + 1
        return rule(deltas, q)

    aggregate.__name__ = rule.name
    return aggregate


# -------------------------------------------------------------------------------------------------
# Building the experiment: federations over seeds, participation patterns, runs, results


def downsample(X: np.ndarray, side: int, pool: int) -> np.ndarray:
    """Square images stored as rows (n, side*side) averaged over pool x pool blocks."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != side * side:
        raise ValueError(f"expected rows of {side}x{side} images, got shape {X.shape}")
    if pool < 1 or side % pool:
        raise ValueError(f"pool must divide the image side {side}, got {pool}")
    s = side // pool
    return X.reshape(-1, s, pool, s, pool).mean((2, 4)).reshape(len(X), s * s)


def label_skew_partition(y, n_clients: int, alpha: float, seed: int, *, min_size: int = 1,
                         max_tries: int = 100) -> list[np.ndarray]:
    """The paper's non-IID split: client n draws a label distribution q_n ~ Dirichlet(alpha) and
    each class's samples are cut among the clients in proportion to their q_nc.

    Unlike a split that draws, per class, shares over the clients, every client ends up with
    about len(y) / n_clients samples, mostly of one or two classes. A draw that leaves a client
    with fewer than `min_size` samples is redrawn, at most `max_tries` times.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be a 1-D array of labels, got shape {y.shape}")
    if isinstance(n_clients, bool) or not isinstance(n_clients, int | np.integer) \
            or not 1 <= n_clients <= len(y):
        raise ValueError(f"n_clients must be an int in [1, {len(y)}], got {n_clients!r}")
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    smallest = 0
    for _ in range(max_tries):
        q = rng.dirichlet(alpha * np.ones(len(classes)), size=n_clients)
        parts = [[] for _ in range(n_clients)]
        for j, c in enumerate(classes):
            members = rng.permutation(np.flatnonzero(y == c))
            ends = np.round(np.cumsum(q[:, j]) / q[:, j].sum() * len(members)).astype(int)
            for n, chunk in enumerate(np.split(members, ends[:-1])):
                parts[n].append(chunk)
        parts = [np.sort(np.concatenate(p)) for p in parts]
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            return parts
    raise ValueError(f"label-skew split with alpha={alpha} left a client with {smallest} samples "
                     f"(min_size={min_size}) in each of {max_tries} draws: use fewer clients or a "
                     "larger alpha")


@dataclass
class Federation:
    """One seed's federation inside the shared `Clients`: rows offset..offset+n_clients-1."""

    seed: int
    offset: int
    n_clients: int
    rates: np.ndarray  # true participation probabilities, unknown to the server
    label_counts: np.ndarray  # (n_clients, classes)
    X_test: torch.Tensor
    y_test: torch.Tensor
    rare_classes: np.ndarray  # the classes whose samples sit at the least-participating clients


def build_federations(X: np.ndarray, y: np.ndarray, seeds: Sequence[int], *, n_clients: int,
                      data_alpha: float, participation_alpha: float, mean_rate: float,
                      min_rate: float, test_size: float, scale: float, n_rare_classes: int,
                      device, min_size: int = 1) -> tuple[Clients, list[Federation]]:
    """A stratified train/test split, the paper's label-skew partition and label-correlated
    participation rates for every seed, all clients stacked in one `Clients`."""
    from repsuite.training import split_tensors

    if not seeds:
        raise ValueError("no seeds given")
    n_classes = int(np.max(y)) + 1
    if not 1 <= n_rare_classes < n_classes:
        raise ValueError(f"n_rare_classes must be in [1, {n_classes - 1}], got {n_rare_classes}")
    X_parts, y_parts, parts, federations = [], [], [], []
    offset_rows = 0
    for i, seed in enumerate(seeds):
        split_seed, part_seed, rate_seed = (int(v) for v in
                                            np.random.SeedSequence(seed).generate_state(3))
        Xtr, Xte, ytr, yte = split_tensors(X, y, test_size=test_size, seed=split_seed % 2**31,
                                           device="cpu", scale=scale)
        idx = label_skew_partition(ytr.numpy(), n_clients, data_alpha, seed=part_seed,
                                   min_size=min_size)
        counts = np.stack([np.bincount(ytr.numpy()[p], minlength=n_classes) for p in idx])
        rates = label_correlated_rates(counts, mean_rate=mean_rate, min_rate=min_rate,
                                       alpha=participation_alpha, seed=rate_seed)

        # A class is "rare" when its samples sit, on average, at rarely participating clients.
        class_rate = (counts * rates[:, None]).sum(0) / np.maximum(counts.sum(0), 1)
        rare = np.sort(np.argsort(class_rate)[:n_rare_classes])
        federations.append(Federation(seed, i * n_clients, n_clients, rates, counts,
                                      Xte.to(device), yte.to(device), rare))
        X_parts.append(Xtr)
        y_parts.append(ytr)
        parts += [p + offset_rows for p in idx]
        offset_rows += len(ytr)
    clients = Clients.from_partition(torch.cat(X_parts), torch.cat(y_parts), parts, device)
    return clients, federations


PATTERNS = ("bernoulli", "markov", "cyclic")


def participation_pattern(kind: str, rates, n_rounds: int, seed: int, *,
                          max_to_active: float = 0.05, cycle: int = 100) -> np.ndarray:
    """(n_rounds, N) participation of one of the paper's patterns: bernoulli, markov, cyclic."""
    from repsuite.federated import participation

    if kind == "bernoulli":
        return participation.bernoulli(check_rates(rates), n_rounds, seed)
    if kind == "markov":
        return markov(rates, n_rounds, seed, max_to_active)
    if kind == "cyclic":
        return cyclic_rates(rates, n_rounds, seed, cycle)
    raise ValueError(f"unknown participation pattern {kind!r}; choose one of {PATTERNS}")


def long_run_rates(kind: str, rates, *, cycle: int = 100) -> np.ndarray:
    """The long-run participation frequency of each client under a pattern: p itself, except for
    cyclic participation, whose active block is rounded to whole rounds."""
    p = check_rates(rates)
    if kind in ("bernoulli", "markov"):
        return p
    if kind == "cyclic":
        active = np.maximum(1, np.round(cycle * p))
        return active / (active + np.maximum(1, cycle - active))
    raise ValueError(f"unknown participation pattern {kind!r}; choose one of {PATTERNS}")


def weight_errors(participation, long_run, *, K: int | None = None, rare_fraction: float = 0.25
                  ) -> dict:
    """How far FedAU's final weights are from their targets, for the rarest clients.

    Returns `bias`: the mean over the rarest `rare_fraction` of clients of omega_n * p_n - 1 (the
    signed relative error against the optimal weight 1/p_n), and `spread`: their mean squared
    relative error around the estimate's own Bernoulli limit E[min(G, K)] (its variance part).
    """
    q = _as_participation(participation)
    p = check_rates(long_run, q.shape[1])
    if not 0 < rare_fraction <= 1:
        raise ValueError(f"rare_fraction must be in (0, 1], got {rare_fraction}")
    est = OnlineWeights(q.shape[1], K)
    for row in q:
        est.update(row)
    omega = est.weights()
    rare = np.argsort(p)[:max(1, int(round(rare_fraction * p.size)))]
    limit = expected_weight(p[rare], K)
    return {"bias": float(np.mean(omega[rare] * p[rare] - 1)),
            "spread": float(np.mean((omega[rare] / limit - 1) ** 2)),
            "omega": omega, "rare": rare}


def seed_streams(seed: int, n: int) -> list[int]:
    """`n` independent integer seeds derived from one (for init, participation, batches...)."""
    return [int(v) % 2**31 for v in np.random.SeedSequence(seed).generate_state(n)]


def evaluate_runs(model: nn.Module, out: Lockstep, runs: Sequence[Run], clients: Clients,
                  federations: Sequence[Federation], *, weight_decay: float, late_from: int):
    """Results of a lockstep call as two tables (pandas): `curves`, one row per run and snapshot
    (original objective, test accuracy, accuracy on the rare classes), and `table`, one row per
    run with their means over the snapshots at round >= `late_from` and the objective of the
    iterate average. Diverged runs get NaN (a claim refuses NaN, so none is used silently)."""
    import pandas as pd

    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError("run names must be unique to label the results")
    by_offset = {f.offset: f for f in federations}
    rounds = sorted(out.snapshots)
    if not rounds:
        raise ValueError("the lockstep call kept no snapshots (snapshot_every=0)")
    curves, table = [], []
    for offset in sorted({r.offset for r in runs}):
        fed = by_offset[offset]
        rows = [i for i, r in enumerate(runs) if r.offset == offset and not out.diverged[i]]
        if not rows:
            continue
        rare = torch.as_tensor(np.isin(fed.y_test.cpu().numpy(), fed.rare_classes),
                               device=fed.y_test.device)
        for t in rounds:
            flat = out.snapshots[t][rows]
            f = objective(model, flat, clients, offset, fed.n_clients,
                          weight_decay=weight_decay).cpu().numpy()
            hit = correct(model, flat, fed.X_test, fed.y_test)
            acc, rare_acc = hit.mean(1).cpu().numpy(), hit[:, rare].mean(1).cpu().numpy()
            for j, i in enumerate(rows):
                curves.append({**runs[i].meta, "run": runs[i].name, "round": t,
                               "objective": f[j], "test_acc": acc[j], "rare_acc": rare_acc[j]})
        f_avg = objective(model, out.averaged[rows], clients, offset, fed.n_clients,
                          weight_decay=weight_decay).cpu().numpy()
        for j, i in enumerate(rows):
            table.append({"run": runs[i].name, "objective_avg_iterate": f_avg[j]})
    columns = ["objective", "test_acc", "rare_acc"]
    curves = pd.DataFrame(curves, columns=["run", "round", *columns, *runs[0].meta])
    late = curves[curves["round"] >= late_from].groupby("run")[columns].mean()
    table = pd.DataFrame(table, columns=["run", "objective_avg_iterate"]).set_index("run")
    # Diverged runs keep a row (NaN results) with their labels.
    meta = pd.DataFrame([r.meta for r in runs], index=pd.Index(names, name="run"))
    meta["diverged"] = out.diverged
    return curves, meta.join(table.join(late)).reset_index()


def reweighted_gaps(model: nn.Module, out: Lockstep, runs: Sequence[Run], clients: Clients,
                    federations: Sequence[Federation], *, weight_decay: float):
    """For each run's iterate average: its gap to the optimum of the original objective and its
    gap to the optimum of the participation-weighted objective sum_n p_n F_n / sum p (the one
    that averaging only the participants converges to). A table (pandas), one row per run."""
    import pandas as pd

    rows = []
    for fed in federations:
        mine = [i for i, r in enumerate(runs) if r.offset == fed.offset and not out.diverged[i]]
        if not mine:
            continue
        averaged = out.averaged[mine]
        gaps, x_star = {}, None
        for label, a in (("gap", None), ("gap_weighted", fed.rates)):
            x_star = optimum(model, clients, fed.offset, fed.n_clients, init=x_star,
                             weight_decay=weight_decay, client_weights=a).to(averaged)
            both = objective(model, torch.cat([averaged, x_star[None]]), clients, fed.offset,
                             fed.n_clients, weight_decay=weight_decay, client_weights=a)
            gaps[label] = (both[:-1] - both[-1]).cpu().numpy()
        for j, i in enumerate(mine):
            rows.append({**runs[i].meta, "run": runs[i].name,
                         **{k: float(v[j]) for k, v in gaps.items()}})
    return pd.DataFrame(rows)


def weight_study(federations: Sequence[Federation], patterns: Sequence[str], n_rounds: int, *,
                 cutoffs: Sequence, rare_fraction: float, max_to_active: float, cycle: int,
                 seed_offset: int = 0):
    """FedAU's weight estimate after `n_rounds` rounds of each participation pattern, for every
    federation and cutoff (None: no cutoff). Returns (table, final weights): the table (pandas)
    has one row per (pattern, seed, K) with the rarest clients' signed bias and spread (see
    `weight_errors`); the weights map (pattern, seed, K) to (omega, long-run rates)."""
    import pandas as pd

    rows, finals = [], {}
    for kind in patterns:
        for fed in federations:
            q = participation_pattern(kind, fed.rates, n_rounds,
                                      seed_streams(fed.seed + seed_offset, 3)[2],
                                      max_to_active=max_to_active, cycle=cycle)
            target = long_run_rates(kind, fed.rates, cycle=cycle)
            for K in cutoffs:
                e = weight_errors(q, target, K=K, rare_fraction=rare_fraction)
                rows.append({"pattern": kind, "seed": fed.seed, "K": "inf" if K is None else K,
                             "bias": e["bias"], "spread": e["spread"],
                             "rarest_rate": float(target[e["rare"]].max())})
                finals[(kind, fed.seed, K)] = (e["omega"], target)
    return pd.DataFrame(rows), finals


def make_model(kind: str, n_features: int, n_classes: int, *, hidden: int = 32,
               seed: int = 0) -> nn.Module:
    """`linear`: softmax regression (convex); `mlp`: one hidden ReLU layer. The init is seeded
    by `seed` without touching the global random state."""
    if kind not in ("linear", "mlp"):
        raise ValueError(f"unknown model {kind!r}; choose linear or mlp")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "linear":
            return nn.Linear(n_features, n_classes)
        return nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(),
                             nn.Linear(hidden, n_classes))


def make_runs(federations: Sequence[Federation], participation: dict, starts: dict,
              configs: Sequence[tuple[str, float]], *, K: int | None, tag: dict) -> list[Run]:
    """One run per federation and (method, global rate) in `configs`. Methods are those of
    `METHODS` plus `fedau_K`, FedAU with the finite cutoff `K` (plain `fedau` has none).
    `participation` and `starts` map a federation's seed to its record and start vector. A run's
    minibatch stream is seeded from its name (see `train_lockstep`)."""
    runs = []
    for fed in federations:
        for method, global_lr in configs:
            base, cutoff = ("fedau", K) if method == "fedau_K" else (method, None)
            rule = make_rule(base, fed.n_clients, rates=fed.rates, K=cutoff)
            label = "|".join(str(v) for v in tag.values())
            name = f"{label}|{method}|{global_lr:g}|{fed.seed}"
            runs.append(Run(name, rule, participation[fed.seed], fed.offset, starts[fed.seed],
                            global_lr, meta={**tag, "method": method, "global_lr": global_lr,
                                             "seed": fed.seed},
                            batch_seed=zlib.crc32(name.encode())))
    return runs


def best_global_rates(table, *, metric: str = "objective") -> dict:
    """method -> the global rate with the lowest `metric` among its non-diverged runs; a method
    whose runs all diverged is an error."""
    ok = table[~table["diverged"].astype(bool)].dropna(subset=[metric])
    missing = sorted(set(table["method"]) - set(ok["method"]))
    if missing:
        raise ValueError(f"every global rate diverged for {missing}: widen the grid downwards")
    best = ok.loc[ok.groupby("method")[metric].idxmin()]
    return dict(zip(best["method"], best["global_lr"].astype(float), strict=True))


@dataclass
class Stage:
    """One lockstep call and its results: the model, the runs, what training returned, and the
    `curves` and `table` of `evaluate_runs`."""

    model: nn.Module
    runs: list
    out: Lockstep
    curves: object
    table: object


def run_stage(model_kind: str, federations: Sequence[Federation], clients: Clients, *,
              patterns: Sequence[str], configs: dict, participation: dict, starts: dict,
              K: int | None, n_features: int, n_classes: int, hidden: int, rounds: int,
              local_steps: int, lr: float, batch_size: int, seed: int, weight_decay: float,
              eval_every: int, late_from: int, progress: bool = True) -> Stage:
    """Train every (pattern, method, global rate) of `configs[pattern]` on every federation in
    one lockstep call and evaluate the runs. `participation` maps (pattern, seed) to a record,
    `starts` maps (model_kind, seed) to a start vector."""
    model = make_model(model_kind, n_features, n_classes, hidden=hidden).to(clients.device)
    runs = []
    for kind in patterns:
        runs += make_runs(federations, {f.seed: participation[(kind, f.seed)] for f in federations},
                          {f.seed: starts[(model_kind, f.seed)] for f in federations},
                          configs[kind], K=K, tag={"model": model_kind, "pattern": kind})
    out = train_lockstep(model, clients, runs, rounds=rounds, local_steps=local_steps, lr=lr,
                         batch_size=batch_size, seed=seed, weight_decay=weight_decay,
                         snapshot_every=eval_every, progress=progress)
    curves, table = evaluate_runs(model, out, runs, clients, federations,
                                  weight_decay=weight_decay, late_from=late_from)
    return Stage(model, runs, out, curves, table)


def per_seed(frame, method: str, column: str) -> np.ndarray:
    """`column` of `method`'s runs in seed order, or a clear error if one of them diverged."""
    rows = frame[frame["method"] == method].sort_values("seed")
    if rows.empty:
        raise ValueError(f"no runs of {method!r} in this table")
    bad = rows["diverged"].astype(bool)
    if bad.any():
        raise ValueError(f"{method} diverged on seeds {rows['seed'][bad].tolist()}: lower its "
                         "global rate or widen the grid")
    return rows[column].to_numpy(dtype=float)


def mean_ci_table(frame, columns: Sequence[str], *, by: str = "method"):
    """One row per `by` group: 'mean [95% CI]' over its rows (seeds) of each column."""
    import pandas as pd

    from repsuite.stats import mean_ci

    out = {}
    for key, g in frame.groupby(by):
        out[key] = {c: "{mean:.4g} [{ci95[0]:.4g}, {ci95[1]:.4g}]".format(**mean_ci(g[c]))
                    for c in columns if c in g and g[c].notna().all()}
    return pd.DataFrame(out).T


def bench_local_linear(n_clients: int = 250, local_steps: int = 5, *, samples_per_client: int = 20,
                       batch_size: int = 16, n_features: int = 196, n_classes: int = 10,
                       device="auto", repeats: int = 3) -> dict:
    """Seconds for one round of local SGD of a softmax regression on every client: the
    closed-form `softmax_regression_sgd` against the core's autograd `local_sgd`; best of
    `repeats` after one warm-up call each."""
    import time

    from repsuite.seeding import pick_device

    device = pick_device(device)
    g = torch.Generator().manual_seed(0)
    n = n_clients * samples_per_client
    X = torch.randn(n, n_features, generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    clients = Clients.from_partition(X, y, np.array_split(np.arange(n), n_clients), device)
    model = nn.Linear(n_features, n_classes).to(device)
    like = params_of(model)
    starts = torch.zeros(n_clients, n_features * n_classes + n_classes, device=device)
    idx = np.arange(n_clients)

    def closed_form():
        softmax_regression_sgd(starts, clients, idx, n_classes=n_classes, steps=local_steps,
                               lr=0.1, batch_size=batch_size,
                               generator=torch.Generator().manual_seed(1))

    def autograd():
        local_sgd(model, unflatten(starts, like), clients, idx, steps=local_steps, lr=0.1,
                  batch_size=batch_size, generator=torch.Generator().manual_seed(1))

    def timed(fn):
        best = float("inf")
        for _ in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    fast, core = timed(closed_form), timed(autograd)
    return {"device": str(device), "n_clients": n_clients, "local_steps": local_steps,
            "closed_form_s": fast, "autograd_s": core, "speedup": core / fast}
