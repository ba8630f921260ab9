"""FedAU experiments: many federated runs (methods x rates x seeds) trained in lockstep, and how
they are measured (the original objective, accuracy, the optimum).
"""

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
from repsuite.federated.fedau import (
    Rule,
    _as_participation,
    _check_rounds,
)
from repsuite.progress import bar

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
