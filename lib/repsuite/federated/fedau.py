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
as aggregation rules with one interface, and the paper's participation patterns that the shared
simulator does not have (label-correlated rates, Markovian and per-client cyclic participation).
`fedau_runs` trains many runs in lockstep; `fedau_experiment` builds the notebook's experiment.
"""

import math

import numpy as np
import torch

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


class _StoredUpdates(Rule):
    """A rule that keeps each client's latest update on the server (zeros until it participates)."""

    def __init__(self, n_clients: int):
        super().__init__(n_clients)
        self.latest = None

    def _stored(self, deltas) -> torch.Tensor:
        if self.latest is None:
            self.latest = deltas.new_zeros(self.n_clients, deltas.shape[1])
        return self.latest


class MIFA(_StoredUpdates):
    """MIFA (Gu et al., 2021): the mean over all N clients of each one's latest update."""

    name = "MIFA"

    def aggregate(self, deltas, idx):
        self._stored(deltas)[torch.as_tensor(idx, device=deltas.device)] = deltas
        return self.latest.mean(0)

    def memory_scalars(self, n_params: int) -> int:
        return self.n_clients * n_params


class FedVARP(_StoredUpdates):
    """FedVARP (Jhunjhunwala et al., 2022): SAGA-style correction with stored client updates.

    update = mean over participants of (Delta_n - y_n) + mean over all clients of y, then
    y_n <- Delta_n for the participants. With no participant the correction term is empty and the
    update is the stored mean alone.
    """

    name = "FedVARP"

    def aggregate(self, deltas, idx):
        stored_mean = self._stored(deltas).mean(0)
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
