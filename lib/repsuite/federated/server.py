"""The generic federated loop: broadcast, local SGD on the round's participants, aggregate.

Client i's update is delta_i = theta_i - theta_global (flattened); the aggregation rule maps
(deltas (k, P), weights (k,), round, info) to one delta (P,), and the new global model is
theta_global + server_lr * delta.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from repsuite.federated.aggregators import fedavg_aggregate
from repsuite.federated.clients import (
    Clients,
    Params,
    evaluate,
    flatten,
    flatten_stack,
    local_sgd,
    params_of,
    unflatten,
)
from repsuite.progress import bar


@dataclass
class History:
    """What a run recorded. Per round r = 1..rounds: `participants` (client ids),
    `sample_grads`, `floats_up` and `floats_down` (parameters sent by clients and to them).
    Per evaluation: `eval_round` (0 is the initial model), `test_loss`, `test_acc`."""

    participants: list = field(default_factory=list)
    sample_grads: list = field(default_factory=list)
    floats_up: list = field(default_factory=list)
    floats_down: list = field(default_factory=list)
    eval_round: list = field(default_factory=list)
    test_loss: list = field(default_factory=list)
    test_acc: list = field(default_factory=list)
    params: Params | None = None

    @property
    def floats_communicated(self) -> list:
        return [u + d for u, d in zip(self.floats_up, self.floats_down, strict=True)]

    def rounds_frame(self):
        """One row per round: participants, sample gradients, floats, and their running sums."""
        import pandas as pd

        frame = pd.DataFrame({
            "round": np.arange(1, len(self.participants) + 1),
            "n_participants": [len(p) for p in self.participants],
            "sample_grads": self.sample_grads, "floats_up": self.floats_up,
            "floats_down": self.floats_down})
        for column in ("sample_grads", "floats_up", "floats_down"):
            frame[f"cum_{column}"] = frame[column].cumsum()
        return frame

    def eval_frame(self):
        """One row per evaluation: round, test loss, test accuracy."""
        import pandas as pd

        return pd.DataFrame({"round": self.eval_round, "test_loss": self.test_loss,
                             "test_acc": self.test_acc})


def _participation(participation, rounds: int, n_clients: int) -> np.ndarray:
    mask = np.asarray(participation)
    if mask.dtype != bool:
        raise ValueError(f"participation must be a bool array, got dtype {mask.dtype}")
    if mask.shape != (rounds, n_clients):
        raise ValueError(f"participation has shape {mask.shape}; expected (rounds, n_clients) = "
                         f"({rounds}, {n_clients})")
    return mask


def _client_weights(weights, clients: Clients, device) -> torch.Tensor:
    if isinstance(weights, str):
        if weights == "size":
            return clients.sizes.to(device=device, dtype=torch.float64)
        if weights == "uniform":
            return torch.ones(clients.n_clients, dtype=torch.float64, device=device)
        raise ValueError(f"weights must be 'size', 'uniform' or an array, got {weights!r}")
    w = torch.as_tensor(np.asarray(weights), dtype=torch.float64, device=device)
    if w.shape != (clients.n_clients,):
        raise ValueError(f"weights has shape {tuple(w.shape)}; expected ({clients.n_clients},)")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("client weights must be finite and >= 0")
    return w


def client_deltas(model: nn.Module, global_params: Params, clients: Clients, idx,
                  **local) -> tuple[torch.Tensor, int]:
    """Updates (k, P) of the clients `idx` after local SGD from `global_params` (one dict, or
    stacked starts for clients starting from other models), and the sample gradients spent.
    `local` holds local_sgd's keyword arguments (steps, lr, batch_size, generator, ...)."""
    trained, grads = local_sgd(model, global_params, clients, idx, **local)
    # Rows follow the model's parameter order, whatever the order of the caller's dict.
    start = {name: global_params[name] for name in trained}
    first = next(iter(trained))
    if start[first].shape == trained[first].shape[1:]:
        return flatten_stack(trained) - flatten(start)[None], grads
    return flatten_stack(trained) - flatten_stack(start), grads


def run(model: nn.Module, clients: Clients, *, rounds: int, participation, local_steps, lr,
        batch_size: int, seed: int, aggregate: Callable = fedavg_aggregate, server_lr: float = 1.0,
        eval_every: int = 1, eval_data=None, on_round: Callable | None = None,
        momentum: float = 0.0, weight_decay: float = 0.0, loss_fn: Callable | None = None,
        grad_transform: Callable | None = None, weights="size", init_params: Params | None = None,
        chunk_size: int | None = None, progress: bool = False) -> History:
    """Federated training for `rounds` rounds; `participation[r]` (bool, one per client) says who
    trains in round r. A round without participants leaves the model as it is.

    - `aggregate(deltas, weights, round, info) -> delta`: `weights` are the participants'
      entries of `weights` ('size': their sample counts, 'uniform', or an array over all
      clients); `info` holds `participants` (client ids), `n_clients`, `global` (the flattened
      global model), `generator` (a torch generator for randomized rules and attacks), `lr`.
    - `round` is the 0-based row of `participation`; `on_round(round, params, info)` is called
      after that round's update with the new global parameters.
    - `eval_data=(X_test, y_test)` is evaluated before training and every `eval_every` rounds
      (and after the last round).
    - Local training: `local_sgd` with `local_steps`, `lr`, `batch_size`, `momentum`,
      `weight_decay`, `loss_fn`, `grad_transform`; batches come from a generator seeded by
      `seed`, so a seed gives the same run.
    The model's own parameters are not changed; the final ones are in `History.params`.
    """
    if not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
    if not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every must be an int >= 1, got {eval_every!r}")
    if not np.isfinite(server_lr):
        raise ValueError(f"server_lr must be finite, got {server_lr}")
    mask = _participation(participation, rounds, clients.n_clients)
    device = clients.device
    client_weights = _client_weights(weights, clients, device)
    global_params = params_of(model)
    if init_params is not None:
        if set(init_params) != set(global_params):
            raise ValueError(f"init_params keys {sorted(init_params)} differ from the model's "
                             f"trainable parameters {sorted(global_params)}")
        for name, p in global_params.items():
            if init_params[name].shape != p.shape:
                raise ValueError(f"init_params[{name!r}] has shape "
                                 f"{tuple(init_params[name].shape)}, expected {tuple(p.shape)}")
        global_params = {name: init_params[name].detach().to(p.device, p.dtype).clone()
                         for name, p in global_params.items()}
    n_params = sum(p.numel() for p in global_params.values())
    batches_seed, rule_seed = np.random.SeedSequence(seed).generate_state(2)
    batch_gen = torch.Generator().manual_seed(int(batches_seed))
    rule_gen = torch.Generator().manual_seed(int(rule_seed))
    history = History()
    if eval_data is not None:
        X_test, y_test = (torch.as_tensor(a).to(device) for a in eval_data)
        if X_test.is_floating_point():
            X_test = X_test.to(clients.X.dtype)

    def record_eval(r):
        if eval_data is None:
            return
        loss, acc = evaluate(model, global_params, X_test, y_test, loss_fn=loss_fn)
        history.eval_round.append(r)
        history.test_loss.append(loss)
        history.test_acc.append(acc)

    record_eval(0)
    for r in bar(range(rounds), enabled=progress, desc="rounds", leave=False):
        active = np.flatnonzero(mask[r])
        history.participants.append(active)
        if len(active) == 0:
            history.sample_grads.append(0)
            history.floats_up.append(0)
            history.floats_down.append(0)
        else:
            deltas, grads = client_deltas(
                model, global_params, clients, active, steps=local_steps, lr=lr,
                batch_size=batch_size, generator=batch_gen, momentum=momentum,
                weight_decay=weight_decay, loss_fn=loss_fn, grad_transform=grad_transform,
                chunk_size=chunk_size)
            flat = flatten(global_params)
            info = {"participants": active, "n_clients": clients.n_clients, "global": flat,
                    "generator": rule_gen, "lr": lr}
            w = client_weights[torch.as_tensor(active, device=device)]
            delta = aggregate(deltas, w, r, info)
            if not isinstance(delta, torch.Tensor) or delta.shape != (n_params,):
                raise ValueError(f"aggregate returned shape {getattr(delta, 'shape', None)}; "
                                 f"expected ({n_params},), one entry per parameter")
            global_params = unflatten(flat + server_lr * delta.to(flat.dtype), global_params)
            history.sample_grads.append(grads)
            history.floats_up.append(len(active) * n_params)
            history.floats_down.append(len(active) * n_params)
        if on_round is not None:
            on_round(r, global_params, {"participants": active})
        if (r + 1) % eval_every == 0 or r + 1 == rounds:
            record_eval(r + 1)
    history.params = global_params
    return history
