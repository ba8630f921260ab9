"""Bags: groups of instances of which only an aggregate is observed (a mean response, a label
proportion). Bag ids are integers 0..m-1, one per instance."""

import numpy as np
import torch


def make_bags(n: int, bag_size: int, seed: int, *, drop_last: bool = False) -> np.ndarray:
    """Random bags of `bag_size` instances; the remainder forms a smaller last bag, or is left out
    (bag id -1) with `drop_last`."""
    if bag_size < 1 or n < 1:
        raise ValueError(f"need n >= 1 and bag_size >= 1, got n={n}, bag_size={bag_size}")
    if bag_size > n:
        raise ValueError(f"bag_size {bag_size} is larger than the {n} instances")
    order = np.random.default_rng(seed).permutation(n)
    bags = np.empty(n, dtype=np.int64)
    bags[order] = np.arange(n) // bag_size
    if drop_last and n % bag_size:
        bags[bags == n // bag_size] = -1
    return bags


def check_bags(bags, n: int | None = None, min_size: int = 1) -> np.ndarray:
    """Bag ids as a 1-D int array (-1 = left out), checked: right length, ids 0..m-1 all used, every
    bag at least `min_size` instances."""
    bags = np.asarray(bags)
    if bags.ndim != 1 or bags.dtype.kind not in "iu":
        raise ValueError(f"bags must be one integer bag id per instance, got {bags.dtype} "
                         f"of shape {bags.shape}")
    if n is not None and len(bags) != n:
        raise ValueError(f"bags has {len(bags)} ids but there are {n} instances")
    used = bags[bags >= 0]
    if len(used) == 0:
        raise ValueError("no instance is in a bag")
    sizes = np.bincount(used)
    if (sizes == 0).any():
        raise ValueError(f"bag ids must run 0..{len(sizes) - 1} without gaps; empty: "
                         f"{np.flatnonzero(sizes == 0)[:5].tolist()}")
    small = np.flatnonzero(sizes < min_size)
    if len(small):
        raise ValueError(f"bag {small[0]} has {sizes[small[0]]} instance(s); this needs at least "
                         f"{min_size} per bag ({len(small)} bag(s) too small)")
    return bags


def bag_sizes(bags) -> np.ndarray:
    bags = check_bags(bags)
    return np.bincount(bags[bags >= 0])


def bag_means(values, bags):
    """Mean of `values` (n,) or (n, d) over each bag's instances: (m,) or (m, d); numpy in, numpy
    out; torch in, torch out (differentiable)."""
    bags = check_bags(bags, len(values))
    keep = bags >= 0
    m = int(bags[keep].max()) + 1
    if isinstance(values, torch.Tensor):
        idx = torch.as_tensor(bags[keep], device=values.device)
        v = values[torch.as_tensor(keep, device=values.device)]
        sums = torch.zeros((m, *v.shape[1:]), dtype=v.dtype, device=v.device).index_add_(0, idx, v)
        counts = torch.bincount(idx, minlength=m).to(v.dtype)
        return sums / counts.reshape(-1, *([1] * (v.dim() - 1)))
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():
        raise ValueError("values contain NaN")
    v = values[keep]
    sums = np.zeros((m, *v.shape[1:]))
    np.add.at(sums, bags[keep], v)
    return sums / np.bincount(bags[keep], minlength=m).reshape(-1, *([1] * (v.ndim - 1)))


def bag_proportions(y, bags) -> np.ndarray:
    """Share of positive labels in each bag (0 or 1 for a bag whose labels are all equal)."""
    y = np.asarray(y)
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y must be 0/1 labels; found {np.unique(y[~np.isin(y, (0, 1))])[:5]}")
    return bag_means(y.astype(np.float64), bags)


def proportion_loss(p: torch.Tensor, bags, proportions, eps: float = 1e-7) -> torch.Tensor:
    """DLLP's loss: binary cross-entropy between each bag's mean predicted probability and its
    label proportion, averaged over bags."""
    if torch.isnan(p).any():
        raise ValueError("predicted probabilities contain NaN")
    mean_p = bag_means(p, bags).clamp(eps, 1 - eps)
    target = torch.as_tensor(proportions, dtype=mean_p.dtype, device=mean_p.device)
    if target.shape != mean_p.shape:
        raise ValueError(f"{len(target)} proportions for {len(mean_p)} bags")
    return -(target * mean_p.log() + (1 - target) * (1 - mean_p).log()).mean()


def bag_operator(bags, *, dense: bool = False, dtype=torch.float64) -> torch.Tensor:
    """The n x n averaging matrix P with P[i, j] = 1 / |bag| when i and j share a bag (rows of
    left-out instances are zero): P @ v replaces each value by its bag's mean."""
    bags = check_bags(bags)
    n = len(bags)
    keep = np.flatnonzero(bags >= 0)
    sizes = np.bincount(bags[keep])
    rows, cols = [], []
    for b in range(len(sizes)):
        members = keep[bags[keep] == b]
        rows.append(np.repeat(members, len(members)))
        cols.append(np.tile(members, len(members)))
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    vals = torch.as_tensor(1.0 / sizes[bags[rows]], dtype=dtype)
    P = torch.sparse_coo_tensor(torch.as_tensor(np.vstack([rows, cols])), vals, (n, n),
                                check_invariants=True)
    return P.to_dense() if dense else P.coalesce()
