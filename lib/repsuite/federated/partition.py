"""Splits of a labelled dataset across federated clients.

Every function returns one array of sample indices per client; each sample lands in exactly one
client. Draws come from a numpy generator seeded by `seed`, so a seed gives the same split.
"""

import numpy as np


def _labels(y, n_clients: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be a 1-D array of labels, got shape {y.shape}")
    if not isinstance(n_clients, int | np.integer) or isinstance(n_clients, bool) or n_clients < 1:
        raise ValueError(f"n_clients must be an int >= 1, got {n_clients!r}")
    if n_clients > len(y):
        raise ValueError(f"{n_clients} clients cannot each get a sample: there are only {len(y)} "
                         "samples")
    return y


def _rng(seed) -> np.random.Generator:
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return np.random.default_rng(int(seed))


def iid(y, n_clients: int, seed: int) -> list[np.ndarray]:
    """A random split into `n_clients` parts whose sizes differ by at most one."""
    y = _labels(y, n_clients)
    order = _rng(seed).permutation(len(y))
    return [np.sort(part) for part in np.array_split(order, n_clients)]


def dirichlet(y, n_clients: int, alpha: float, seed: int, min_size: int = 1,
              max_tries: int = 1000) -> list[np.ndarray]:
    """Label skew: each class is spread over the clients in proportions drawn from Dirichlet(alpha).

    Small `alpha` gives clients few classes. A draw that leaves some client with fewer than
    `min_size` samples is redrawn, at most `max_tries` times, then the split fails with an error
    (lower `min_size` or the number of clients, or raise `alpha`).
    """
    y = _labels(y, n_clients)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if not isinstance(min_size, int | np.integer) or min_size < 0:
        raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")
    if n_clients * min_size > len(y):
        raise ValueError(f"{n_clients} clients with at least {min_size} samples each need "
                         f"{n_clients * min_size} samples; there are {len(y)}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    rng = _rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    smallest = 0
    for _ in range(max_tries):
        parts = [[] for _ in range(n_clients)]
        for members in by_class:
            members = rng.permutation(members)
            share = rng.dirichlet(np.full(n_clients, float(alpha)))
            cuts = (np.cumsum(share)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        parts = [np.sort(np.concatenate(p)) for p in parts]
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            return parts
    raise ValueError(f"dirichlet split with alpha={alpha} left a client with {smallest} samples "
                     f"(min_size={min_size}) in each of {max_tries} draws: lower min_size or "
                     "n_clients, or raise alpha")


def pathological(y, n_clients: int, classes_per_client: int, seed: int) -> list[np.ndarray]:
    """Each client holds `classes_per_client` distinct classes (McMahan et al.'s shard split).

    Classes are dealt round-robin in a random class order, so every class goes to about
    n_clients * classes_per_client / n_classes clients, and a class's samples are shared
    evenly among the clients that hold it.
    """
    y = _labels(y, n_clients)
    classes = np.unique(y)
    k = classes_per_client
    if not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1:
        raise ValueError(f"classes_per_client must be an int >= 1, got {k!r}")
    if k > len(classes):
        raise ValueError(f"classes_per_client={k} but y has only {len(classes)} classes")
    if n_clients * k < len(classes):
        raise ValueError(f"{n_clients} clients with {k} classes each cannot cover the "
                         f"{len(classes)} classes: every sample must go to some client")
    rng = _rng(seed)
    order = rng.permutation(classes)
    holders = {c: [] for c in classes}
    for client in range(n_clients):
        for j in range(k):
            holders[order[(client * k + j) % len(classes)]].append(client)
    parts = [[] for _ in range(n_clients)]
    for c in classes:
        members = rng.permutation(np.flatnonzero(y == c))
        if len(members) < len(holders[c]):
            raise ValueError(f"class {c} has {len(members)} samples but {len(holders[c])} clients "
                             "hold it: use fewer clients or fewer classes per client")
        for client, chunk in zip(holders[c], np.array_split(members, len(holders[c])),
                                 strict=True):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]
