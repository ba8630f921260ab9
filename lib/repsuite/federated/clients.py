"""Clients' data as padded stacked tensors, and local SGD vectorized over clients.

Local training runs all selected clients at once: the model is called functionally
(`torch.func.functional_call`) on a stack of parameter sets, per-client gradients come from
`torch.func.grad` mapped with `torch.func.vmap`, and masks make padded rows count zero. A model
with BatchNorm running statistics cannot be used this way (vmap forbids their in-place update);
BatchNorm without running statistics (`track_running_stats=False`) works, with batch statistics
per client; they include the padding slots of a batch smaller than the widest one (repeats of
the client's own rows), so they are exact only when every batch is full. Dropout draws from
torch's global generator (seed it with `seeding.seed_everything`).
"""

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

Params = dict[str, torch.Tensor]


@dataclass
class Clients:
    """Every client's data, padded to the largest client: X (C, n_max, ...), y (C, n_max).

    `mask[c, j]` is True where row j of client c is real data; `sizes[c]` is its number of rows.
    """

    X: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    sizes: torch.Tensor

    @classmethod
    def from_partition(cls, X, y, parts: Sequence, device="cpu",
                       dtype: torch.dtype = torch.float32) -> "Clients":
        """Stack `X[parts[c]]` for every client c (on `device`). Features become `dtype`; integer
        labels become int64 and float targets `dtype`. A sample may appear in several parts."""
        X = torch.as_tensor(X)
        y = torch.as_tensor(y)
        if len(X) != len(y):
            raise ValueError(f"X has {len(X)} rows and y has {len(y)} labels")
        X = X.to(dtype)
        y = y.long() if not y.is_floating_point() else y.to(dtype)
        if not torch.isfinite(X).all():
            raise ValueError("X contains NaN or inf")
        if y.is_floating_point() and not torch.isfinite(y).all():
            raise ValueError("y contains NaN or inf")
        if len(parts) == 0:
            raise ValueError("parts is empty: there must be at least one client")
        parts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in parts]
        empty = [c for c, p in enumerate(parts) if len(p) == 0]
        if empty:
            raise ValueError(f"clients {empty[:10]} have no data ({len(empty)} empty of "
                             f"{len(parts)}): every client needs at least one sample")
        for c, p in enumerate(parts):
            if p.min() < 0 or p.max() >= len(X):
                raise ValueError(f"client {c} has sample indices outside [0, {len(X)})")
        sizes = [len(p) for p in parts]
        n_max = max(sizes)
        index = torch.zeros(len(parts), n_max, dtype=torch.long)
        mask = torch.zeros(len(parts), n_max, dtype=torch.bool)
        for c, p in enumerate(parts):
            index[c, :len(p)] = torch.from_numpy(p)
            mask[c, :len(p)] = True
        # Padded rows repeat sample 0 of the dataset: finite values, weighted zero by the mask.
        index = torch.where(mask, index, torch.zeros_like(index))
        return cls(X=X[index].to(device), y=y[index].to(device), mask=mask.to(device),
                   sizes=torch.tensor(sizes, dtype=torch.long, device=device))

    @property
    def n_clients(self) -> int:
        return len(self.sizes)

    @property
    def device(self) -> torch.device:
        return self.X.device

    def data(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client c's own rows, without padding."""
        n = int(self.sizes[c])
        return self.X[c, :n], self.y[c, :n]

    def weights(self) -> torch.Tensor:
        """Each client's share of all samples, n_c / sum(n)."""
        return self.sizes.double() / self.sizes.sum()


def params_of(model: nn.Module) -> Params:
    """Detached copies of the model's trainable parameters (frozen ones stay in the module)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def flatten(params: Params) -> torch.Tensor:
    """One vector (P,) of all parameters, in the dict's order."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def flatten_stack(stacked: Params) -> torch.Tensor:
    """(k, P): one row per client of a stacked parameter dict."""
    k = len(next(iter(stacked.values())))
    return torch.cat([p.reshape(k, -1) for p in stacked.values()], dim=1)


def unflatten(vec: torch.Tensor, like: Params) -> Params:
    """The inverse of `flatten` (vec (P,)) or of `flatten_stack` (vec (k, P)), shaped as `like`
    (a single parameter dict)."""
    total = sum(p.numel() for p in like.values())
    if vec.dim() not in (1, 2) or vec.shape[-1] != total:
        raise ValueError(f"vector of shape {tuple(vec.shape)} does not hold the {total} "
                         "parameters of `like`")
    lead = vec.shape[:-1]
    out, start = {}, 0
    for name, p in like.items():
        out[name] = vec[..., start:start + p.numel()].reshape(*lead, *p.shape)
        start += p.numel()
    return out


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The default per-sample loss."""
    return nn.functional.cross_entropy(output, target, reduction="none")


def _check_model(model: nn.Module, device: torch.device) -> Params:
    for name, module in model.named_modules():
        if (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
                and module.track_running_stats):
            raise ValueError(f"BatchNorm layer {name!r} updates running statistics, which the "
                             "vectorized local training cannot do: build it with "
                             "track_running_stats=False, or use GroupNorm/LayerNorm")
    reference = params_of(model)
    if not reference:
        raise ValueError("the model has no trainable parameters")
    for name, p in reference.items():
        if p.device != device:
            raise ValueError(f"model parameter {name!r} is on {p.device} but the clients' data are "
                             f"on {device}: move the model with model.to(device)")
    return reference


def _stacked_start(params: Params, reference: Params, k: int) -> Params:
    """Copies of the start parameters, one per client: `params` is one dict (everyone starts
    there) or a stacked dict with leading dim k (each client its own start)."""
    if set(params) != set(reference):
        raise ValueError(f"params keys {sorted(params)} differ from the model's trainable "
                         f"parameters {sorted(reference)}")
    out = {}
    for name, ref in reference.items():
        p = params[name]
        if p.shape == ref.shape:
            out[name] = p.detach().unsqueeze(0).expand(k, *ref.shape).clone()
        elif p.shape == (k, *ref.shape):
            out[name] = p.detach().clone()
        else:
            raise ValueError(f"params[{name!r}] has shape {tuple(p.shape)}; expected "
                             f"{tuple(ref.shape)} (one start for all) or {(k, *ref.shape)} "
                             f"(one start per selected client)")
        out[name] = out[name].to(device=ref.device, dtype=ref.dtype)
    return out


def _client_index(idx, n_clients: int, device) -> torch.Tensor:
    idx = torch.as_tensor(np.asarray(idx) if not isinstance(idx, torch.Tensor) else idx)
    idx = idx.reshape(-1).long()
    if len(idx) == 0:
        raise ValueError("no clients selected (idx is empty)")
    if idx.min() < 0 or idx.max() >= n_clients:
        raise ValueError(f"client indices must lie in [0, {n_clients}), got min {int(idx.min())} "
                         f"and max {int(idx.max())}")
    return idx.to(device)


class BatchSampler:
    """Minibatch indices for k clients at once: each client shuffles its own rows every epoch and
    walks through them `batch_size` at a time (the last batch of an epoch may be smaller; a batch
    size at least the client's size means full batch). Draws come from `generator` on its own
    device, so the batches are the same whichever device holds the data.
    """

    def __init__(self, sizes: torch.Tensor, batch_size: int, generator: torch.Generator):
        if not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.sizes = sizes
        self.generator = generator
        self.per_client = sizes.clamp(max=int(batch_size))
        self.per_epoch = (sizes + self.per_client - 1) // self.per_client
        self.width = int(self.per_client.max())
        self.n_max = int(sizes.max())
        self.full_batch = bool((self.per_epoch == 1).all())
        self.order = None
        self._cols = torch.arange(self.n_max, device=sizes.device)

    def draw(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows (k, width) into each client's padded data, valid (k, width) bool) for `step`.

        Slots past a client's batch repeat its own rows (weighted zero by `valid`), so layers
        that look across the batch, such as BatchNorm without running statistics, see only
        that client's data.
        """
        offsets = torch.arange(self.width, device=self.sizes.device)
        if self.full_batch:
            # Order within a full batch changes nothing, so no draws are needed.
            rows = offsets % self.sizes[:, None]
            return rows, offsets < self.sizes[:, None]
        position = step % self.per_epoch
        fresh = position == 0
        if self.order is None or bool(fresh.any()):
            keys = torch.rand(len(self.sizes), self.n_max, generator=self.generator,
                              device=self.generator.device).to(self.sizes.device)
            keys = keys.masked_fill(self._cols >= self.sizes[:, None], 2.0)
            order = keys.argsort(dim=1)
            self.order = order if self.order is None else torch.where(fresh[:, None], order,
                                                                       self.order)
        slot = position[:, None] * self.per_client[:, None] + offsets
        valid = (offsets < self.per_client[:, None]) & (slot < self.sizes[:, None])
        rows = self.order.gather(1, slot % self.sizes[:, None])
        return rows, valid


def _lr_at(lr, step: int) -> float:
    value = lr(step) if callable(lr) else lr
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"learning rate must be a finite number >= 0, got {value!r} at step "
                         f"{step}")
    return float(value)


def _steps_per_client(steps, k: int, device) -> tuple[int, torch.Tensor | None]:
    if isinstance(steps, int | np.integer) and not isinstance(steps, bool):
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        return int(steps), None
    per = torch.as_tensor(np.asarray(steps), dtype=torch.long).reshape(-1)
    if len(per) != k:
        raise ValueError(f"steps has {len(per)} entries for {k} selected clients")
    if (per < 0).any():
        raise ValueError("steps must be >= 0 for every client")
    return int(per.max()), per.to(device)


def _per_client_grad(model: nn.Module, loss_fn: Callable, chunk_size: int | None) -> Callable:
    """(stacked params, X (k, B, ...), y (k, B), weights (k, B)) -> stacked gradients of each
    client's weighted mean loss."""

    def batch_loss(p, xb, yb, wb):
        per_sample = loss_fn(functional_call(model, p, (xb,)), yb)
        return (per_sample * wb).sum() / wb.sum()

    return vmap(grad(batch_loss), randomness="different", chunk_size=chunk_size)


def gradients(model: nn.Module, params: Params, clients: Clients, idx, *,
              batch_size: int | None = None, generator: torch.Generator | None = None,
              loss_fn: Callable | None = None, chunk_size: int | None = None
              ) -> tuple[Params, int]:
    """Gradient of each selected client's mean loss at `params` (one dict, or stacked with
    leading dim len(idx)): on all its data when `batch_size` is None, else on one minibatch of
    at most `batch_size` rows drawn with `generator`. Returns (stacked gradients, sample
    gradients computed)."""
    loss_fn = cross_entropy if loss_fn is None else loss_fn
    device = clients.device
    reference = _check_model(model, device)
    idx = _client_index(idx, clients.n_clients, device)
    current = _stacked_start(params, reference, len(idx))
    sizes = clients.sizes[idx]
    if batch_size is None:
        batch_size, generator = int(sizes.max()), torch.Generator()
    rows, valid = BatchSampler(sizes, batch_size, generator).draw(0)
    xb, yb = clients.X[idx[:, None], rows], clients.y[idx[:, None], rows]
    grads = _per_client_grad(model, loss_fn, chunk_size)(current, xb, yb, valid.to(xb.dtype))
    return grads, int(valid.sum())


def local_sgd(model: nn.Module, params: Params, clients: Clients, idx, *, steps, lr,
              batch_size: int, generator: torch.Generator, momentum: float = 0.0,
              loss_fn: Callable | None = None, grad_transform: Callable | None = None,
              weight_decay: float = 0.0, transform_state: dict | None = None,
              chunk_size: int | None = None) -> tuple[Params, int]:
    """Minibatch SGD on each selected client's data, all clients at once.

    - `params`: one parameter dict (every client starts there) or a stacked dict with leading dim
      len(idx) (client j starts from row j, e.g. from a stale model).
    - `steps`: an int, or one int per selected client (a client stops after its own count).
    - `lr`: a number, or a function of the step (0-based) giving the rate.
    - `loss_fn(output, target)` returns the per-sample loss (B,); the default is cross-entropy.
      A client's step minimises the mean over its batch (padding weighted zero).
    - `momentum`, `weight_decay`: as in `torch.optim.SGD` (decay added to the gradient, then the
      heavy-ball buffer, started at the first gradient).
    - `grad_transform(grads, state) -> direction`: replaces the stacked gradients before the
      momentum and the step, e.g. for control variates or variance reduction. `state` holds
      `step`, `idx` (client ids), `params` (stacked, before the step), `batch` (X, y, valid
      mask), `grad_at(stacked_params)` (gradients at other parameters on the same batch; its
      sample gradients are counted) and `memory` (a dict kept across steps, started from
      `transform_state`).
    - `chunk_size`: passed to vmap to bound memory with many clients.

    Returns (stacked parameters after training, leading dim len(idx); the number of sample
    gradients computed).
    """
    loss_fn = cross_entropy if loss_fn is None else loss_fn
    device = clients.device
    reference = _check_model(model, device)
    idx = _client_index(idx, clients.n_clients, device)
    k = len(idx)
    n_steps, per_client_steps = _steps_per_client(steps, k, device)
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    current = _stacked_start(params, reference, k)
    sampler = BatchSampler(clients.sizes[idx], batch_size, generator)

    grads_of = _per_client_grad(model, loss_fn, chunk_size)
    counted = torch.zeros((), dtype=torch.long, device=device)
    buffer = None
    state = {"idx": idx, "memory": dict(transform_state or {})}
    for step in range(n_steps):
        rows, valid = sampler.draw(step)
        active = None
        if per_client_steps is not None:
            active = per_client_steps > step
            valid = valid & active[:, None]
        xb = clients.X[idx[:, None], rows]
        yb = clients.y[idx[:, None], rows]
        # A finished client gets a dummy full weight so its loss stays defined; it does not move.
        wb = valid.to(xb.dtype) if active is None else torch.where(
            active[:, None], valid, rows == rows[:, :1]).to(xb.dtype)

        def grad_at(p, xb=xb, yb=yb, wb=wb, valid=valid):
            nonlocal counted
            counted = counted + valid.sum()
            return grads_of(p, xb, yb, wb)

        grads = grad_at(current)
        if weight_decay:
            grads = {n: torch.add(g, current[n], alpha=weight_decay) for n, g in grads.items()}
        if grad_transform is not None:
            state.update(step=step, params=current, batch=(xb, yb, valid), grad_at=grad_at)
            grads = grad_transform(grads, state)
            if set(grads) != set(current):
                raise ValueError("grad_transform must return a dict with the parameters' keys")
        if momentum:
            buffer = grads if buffer is None else {
                n: torch.add(g, buffer[n], alpha=momentum) for n, g in grads.items()}
            grads = buffer
        rate = _lr_at(lr, step)
        if active is None:
            current = {n: torch.add(p, grads[n], alpha=-rate) for n, p in current.items()}
        else:
            gate = active.to(xb.dtype)
            current = {n: p - rate * gate.view(-1, *[1] * (p.dim() - 1)) * grads[n]
                       for n, p in current.items()}
    return current, int(counted)


def local_sgd_loop(model: nn.Module, params: Params, clients: Clients, idx, *, steps: int, lr,
                   batch_size: int, generator: torch.Generator, momentum: float = 0.0,
                   loss_fn: Callable | None = None, weight_decay: float = 0.0
                   ) -> tuple[Params, int]:
    """The same local training as `local_sgd`, one client after another with `torch.optim.SGD`
    on a copy of the model: a reference for tests and the speed comparison."""
    loss_fn = cross_entropy if loss_fn is None else loss_fn
    reference = _check_model(model, clients.device)
    idx = _client_index(idx, clients.n_clients, clients.device)
    start = _stacked_start(params, reference, len(idx))
    sampler = BatchSampler(clients.sizes[idx], batch_size, generator)
    draws = [sampler.draw(step) for step in range(steps)]
    names = list(reference)
    results = {n: [] for n in names}
    counted = 0
    for j, c in enumerate(idx.tolist()):
        worker = copy.deepcopy(model)
        own = dict(worker.named_parameters())
        with torch.no_grad():
            for n in names:
                own[n].copy_(start[n][j])
        opt = torch.optim.SGD([own[n] for n in names], lr=_lr_at(lr, 0), momentum=momentum,
                              weight_decay=weight_decay)
        Xc, yc = clients.data(c)
        for step, (rows, valid) in enumerate(draws):
            batch = rows[j][valid[j]]
            for group in opt.param_groups:
                group["lr"] = _lr_at(lr, step)
            opt.zero_grad()
            loss_fn(worker(Xc[batch]), yc[batch]).mean().backward()
            opt.step()
            counted += len(batch)
        for n in names:
            results[n].append(own[n].detach().clone())
    return {n: torch.stack(v) for n, v in results.items()}, counted


@torch.no_grad()
def evaluate(model: nn.Module, params: Params, X: torch.Tensor, y: torch.Tensor, *,
             loss_fn: Callable | None = None, batch_size: int = 4096) -> tuple[float, float]:
    """(mean loss, accuracy) of the model with `params` on (X, y), in eval mode. Accuracy is
    argmax agreement for integer labels and NaN for float targets."""
    loss_fn = cross_entropy if loss_fn is None else loss_fn
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows and y has {len(y)} labels")
    if len(X) == 0:
        raise ValueError("cannot evaluate on an empty set")
    first = next(iter(params.values()))
    X, y = torch.as_tensor(X).to(first.device), torch.as_tensor(y).to(first.device)
    if X.is_floating_point():
        X = X.to(first.dtype)
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    try:
        for start in range(0, len(X), batch_size):
            out = functional_call(model, params, (X[start:start + batch_size],))
            target = y[start:start + batch_size]
            loss += float(loss_fn(out, target).sum())
            if not target.is_floating_point():
                correct += int((out.argmax(-1) == target).sum())
    finally:
        model.train(was_training)
    acc = correct / len(X) if not y.is_floating_point() else float("nan")
    return loss / len(X), acc


def bench_round(n_clients: int = 100, local_steps: int = 5, *, samples_per_client: int = 50,
                batch_size: int = 16, n_features: int = 784, hidden: int = 64, n_classes: int = 10,
                device="auto", repeats: int = 3) -> dict:
    """Seconds for one round of local SGD on every client: vectorized vs a per-client loop.

    An MLP n_features-hidden-n_classes on random data shaped like MNIST; best of `repeats`.
    """
    from repsuite.seeding import pick_device
    from repsuite.timing import best_of

    device = pick_device(device)
    g = torch.Generator().manual_seed(0)
    n = n_clients * samples_per_client
    X = torch.randn(n, n_features, generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    parts = np.array_split(np.arange(n), n_clients)
    clients = Clients.from_partition(X, y, parts, device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(),
                          nn.Linear(hidden, n_classes)).to(device)
    start = params_of(model)
    idx = np.arange(n_clients)

    def timed(fn):
        return best_of(lambda: fn(model, start, clients, idx, steps=local_steps, lr=0.1,
                                  batch_size=batch_size,
                                  generator=torch.Generator().manual_seed(1)), repeats, device)

    vectorized, loop = timed(local_sgd), timed(local_sgd_loop)
    return {"device": str(device), "n_clients": n_clients, "local_steps": local_steps,
            "params": sum(p.numel() for p in start.values()), "vectorized_s": vectorized,
            "loop_s": loop, "speedup": loop / vectorized}
