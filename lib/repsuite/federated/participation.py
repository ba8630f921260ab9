"""Who takes part in each round: boolean masks of shape (n_rounds, n_clients).

Draws come from numpy generators seeded by `seed`, so a seed gives the same schedule.
"""

import numpy as np


def _count(name: str, value, low: int = 1) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _rng(seed) -> np.random.Generator:
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return np.random.default_rng(int(seed))


def _rates(rates) -> np.ndarray:
    rates = np.asarray(rates, dtype=float)
    if rates.ndim != 1 or len(rates) == 0:
        raise ValueError(f"rates must be a non-empty 1-D array (one per client), got shape "
                         f"{rates.shape}")
    bad = np.flatnonzero(~np.isfinite(rates) | (rates < 0) | (rates > 1))
    if len(bad):
        raise ValueError(f"participation rates must lie in [0, 1]; clients {bad[:10].tolist()} "
                         f"have {rates[bad[:10]].tolist()}")
    if not rates.any():
        raise ValueError("all participation rates are zero: no client would ever take part")
    return rates


def bernoulli(rates, n_rounds: int, seed: int) -> np.ndarray:
    """Client n takes part in each round independently with probability rates[n]."""
    rates = _rates(rates)
    n_rounds = _count("n_rounds", n_rounds)
    return _rng(seed).random((n_rounds, len(rates))) < rates


def uniform(n_clients: int, per_round: int, n_rounds: int, seed: int) -> np.ndarray:
    """Exactly `per_round` distinct clients a round, drawn uniformly without replacement."""
    n_clients = _count("n_clients", n_clients)
    per_round = _count("per_round", per_round)
    n_rounds = _count("n_rounds", n_rounds)
    if per_round > n_clients:
        raise ValueError(f"per_round={per_round} distinct clients a round, but there are only "
                         f"{n_clients} clients")
    keys = _rng(seed).random((n_rounds, n_clients))
    chosen = np.argsort(keys, axis=1)[:, :per_round]
    mask = np.zeros((n_rounds, n_clients), dtype=bool)
    np.put_along_axis(mask, chosen, True, axis=1)
    return mask


def cyclic(n_clients: int, n_groups: int, n_rounds: int) -> np.ndarray:
    """Clients are cut into `n_groups` contiguous groups; group r % n_groups is active in
    round r."""
    n_clients = _count("n_clients", n_clients)
    n_groups = _count("n_groups", n_groups)
    n_rounds = _count("n_rounds", n_rounds)
    if n_groups > n_clients:
        raise ValueError(f"n_groups={n_groups} groups need at least as many clients; there are "
                         f"{n_clients}")
    group = np.empty(n_clients, dtype=int)
    for g, members in enumerate(np.array_split(np.arange(n_clients), n_groups)):
        group[members] = g
    return group[None, :] == (np.arange(n_rounds) % n_groups)[:, None]


def markov(rates, n_rounds: int, seed: int, max_on_prob: float = 0.05) -> np.ndarray:
    """Two-state Markov participation whose stationary probability of being active is rates[n].

    The inactive-to-active probability is `max_on_prob` scaled so the largest rate gets it,
    q_n = max_on_prob * rates[n] / max(rates), and the active-to-inactive probability follows
    from stationarity, q_n (1 - p_n) / p_n. Each chain starts from its stationary law.
    """
    rates = _rates(rates)
    n_rounds = _count("n_rounds", n_rounds)
    if not 0 < max_on_prob <= 1:
        raise ValueError(f"max_on_prob must be in (0, 1], got {max_on_prob}")
    if (rates == 1).any() or (rates == 0).any():
        raise ValueError("markov participation needs rates strictly inside (0, 1)")
    on = max_on_prob * rates / rates.max()
    off = on * (1 - rates) / rates
    if (off > 1).any():
        raise ValueError(f"max_on_prob={max_on_prob} is too large for the smallest rate "
                         f"{rates.min():.3g}: its active-to-inactive probability would exceed 1")
    rng = _rng(seed)
    mask = np.empty((n_rounds, len(rates)), dtype=bool)
    state = rng.random(len(rates)) < rates
    for r in range(n_rounds):
        mask[r] = state
        u = rng.random(len(rates))
        state = np.where(state, u >= off, u < on)
    return mask


def heterogeneous_rates(n_clients: int, low: float, high: float, seed: int,
                        kind: str = "uniform") -> np.ndarray:
    """Per-client participation rates in [low, high]; the server is not told them.

    kind: `uniform` (uniform on [low, high]) or `loguniform` (uniform in log scale, many rare
    clients; needs low > 0).
    """
    n_clients = _count("n_clients", n_clients)
    if not (0 <= low <= high <= 1):
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    if high == 0:
        raise ValueError("high=0 makes all participation rates zero: no client would take part")
    rng = _rng(seed)
    if kind == "uniform":
        return rng.uniform(low, high, n_clients)
    if kind == "loguniform":
        if low <= 0:
            raise ValueError(f"kind='loguniform' needs low > 0, got {low}")
        return np.exp(rng.uniform(np.log(low), np.log(high), n_clients))
    raise ValueError(f"kind must be 'uniform' or 'loguniform', got {kind!r}")
