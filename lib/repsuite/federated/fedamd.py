"""FedAMD (Wu et al., ICML 2023): anchor sampling for federated learning with partial participation.

Every round the server samples participants and splits them into two groups:

- the *anchor group* computes a large-batch gradient of its local objective at the current global
  model (its "bullseye") and sends it; the server keeps the latest bullseye of every client, and
  their average over all N clients is the *global direction* v, an estimate of the gradient that
  full participation would give;
- the *miner group* runs K local steps with small batches, starting along v and correcting it
  recursively (a SARAH-type estimator): v_0 = v and, for k >= 1, on the minibatch B_k,

      v_k = v_{k-1} + grad f_i(y_k; B_k) - grad f_i(y_{k-1}; B_k),   y_{k+1} = y_k - lr * v_k.

  Only miners move the global model: x <- x + server_lr * mean_i(y_K^i - x).

A participant is an anchor with a constant probability p, or, in the sequential setting, every
participant is an anchor in the rounds t with t % period == 0 and a miner otherwise. Before round
0 every client computes its bullseye once, so that v starts as a full-participation gradient (the
authors' code does this; its cost is counted like every other gradient). Miners use v as it
stood at the start of the round; the anchors' fresh bullseyes count from the next round.

The comparisons the paper makes run on the shared simulator (`repsuite.federated.run`): FedAvg
(plain mean of the participants' updates, as in the authors' baselines), SCAFFOLD (Karimireddy et
al. 2020, option II, control variates started from one full-gradient pass as in the authors'
baseline) and MIFA (Gu et al. 2021: the server averages the latest update of all N clients).

Costs, per client and round, with P parameters, minibatch b and K local steps:

| role                | sample gradients            | floats down | floats up |
|---------------------|-----------------------------|-------------|-----------|
| initial pass        | n_i (or the anchor batch)   | P           | P         |
| FedAMD anchor       | n_i (or the anchor batch)   | P           | P         |
| FedAMD miner        | 2 b (K - 1)                 | 2P (x, v)   | P         |
| FedAvg, MIFA        | b K                         | P           | P         |
| SCAFFOLD            | b K                         | 2P (x, c)   | 2P        |

A miner's first step moves along v and needs no gradient (the two gradients of step 0 cancel).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from repsuite.federated.clients import (
    BatchSampler,
    Clients,
    Params,
    cross_entropy,
    evaluate,
    flatten,
    flatten_stack,
    local_sgd,
    params_of,
    unflatten,
)
from repsuite.federated.server import History, run
from repsuite.progress import bar

LossFn = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------
# Anchor sampling


@dataclass(frozen=True)
class AnchorSampling:
    """Who is an anchor: each participant with probability `prob` (constant setting), or all
    participants in the rounds t with t % period == 0 (sequential setting). Give exactly one."""

    prob: float | None = None
    period: int | None = None

    def __post_init__(self):
        if (self.prob is None) == (self.period is None):
            raise ValueError("give exactly one of an anchor probability `prob` (constant setting) "
                             "or an anchor `period` (sequential setting)")
        if self.prob is not None and not (0.0 <= self.prob < 1.0):
            raise ValueError(f"anchor probability must be in [0, 1), got {self.prob}: with "
                             "probability 1 no miner would ever update the model")
        if self.period is not None and (isinstance(self.period, bool) or
                                        not isinstance(self.period, int) or self.period < 2):
            raise ValueError(f"anchor period must be an int >= 2, got {self.period!r}: with "
                             "period 1 every round is an anchor round and the model never moves")

    def split(self, participants, t: int, generator: torch.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
        """(anchors, miners) among `participants` in round `t`, each in the given order."""
        participants = np.asarray(participants, dtype=np.int64).ravel()
        if self.period is not None:
            # As in the authors' code, round 0 is an anchor round too, although the initial
            # pass has just computed every bullseye at the same model.
            is_anchor = np.full(len(participants), t % self.period == 0)
        else:
            # One draw per participant even when p = 0, so the stream does not depend on p.
            is_anchor = torch.rand(len(participants), generator=generator).numpy() < self.prob
        return participants[is_anchor], participants[~is_anchor]


# ---------------------------------------------------------------------------------------------
# Client-side computations


def _client_ids(idx, clients: Clients) -> np.ndarray:
    ids = np.asarray(idx).ravel()
    if ids.dtype == bool:
        if ids.size != clients.n_clients:
            raise ValueError(f"a participation mask needs {clients.n_clients} entries, got "
                             f"{ids.size}")
        ids = np.flatnonzero(ids)
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= clients.n_clients):
        raise ValueError(f"client indices must lie in [0, {clients.n_clients}), got "
                         f"{ids.tolist()}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"participants repeat a client: {ids.tolist()}")
    return ids


def _check_sizes(clients: Clients):
    if (clients.sizes < 1).any():
        empty = torch.nonzero(clients.sizes < 1).reshape(-1).tolist()
        raise ValueError(f"clients {empty} hold no data: every client needs at least one sample")


def local_gradients(model: nn.Module, params: Params, clients: Clients, idx, *,
                    batch: int | None = None, generator: torch.Generator | None = None,
                    loss_fn: LossFn | None = None) -> tuple[Tensor, int]:
    """Gradients (k, P) of the clients `idx` at the same `params`, each on its whole data
    (`batch=None`, the authors' anchors) or on `batch` random samples of it, and the number of
    sample gradients computed."""
    _check_sizes(clients)
    ids = torch.as_tensor(_client_ids(idx, clients), device=clients.device)
    sizes = clients.sizes[ids]
    n_max = clients.X.shape[1]
    if batch is None or batch >= int(sizes.max()):
        rows = torch.arange(n_max, device=clients.device).expand(len(ids), n_max)
        weight = rows < sizes[:, None]
    else:
        if generator is None:
            raise ValueError("a random anchor batch needs a generator")
        keys = torch.rand(len(ids), n_max, generator=generator).to(clients.device)
        keys = keys.masked_fill(torch.arange(n_max, device=clients.device) >= sizes[:, None], 2)
        rows = keys.argsort(dim=1)[:, :batch]
        weight = torch.arange(batch, device=clients.device) < sizes[:, None].clamp(max=batch)
    Xb, yb = clients.X[ids[:, None], rows], clients.y[ids[:, None], rows]
    weight = weight.to(Xb.dtype if Xb.is_floating_point() else torch.float32)
    stacked = {n: p.unsqueeze(0).expand(len(ids), *p.shape) for n, p in params.items()}
    g = _grads_of(model, loss_fn)(stacked, Xb, yb, weight)
    return flatten_stack(g), int(weight.sum().item())


def sarah_transform(direction: Params) -> Callable:
    """The miner's estimator as a gradient transform for the simulator's `local_sgd`: step 0
    returns the global direction v, step k >= 1 returns v_{k-1} + grad(y_k; B_k) -
    grad(y_{k-1}; B_k). A reference for `miner_update`, which computes the same steps without the
    discarded step-0 gradient and with both gradients of a step in one call."""

    def transform(grads: Params, state: dict) -> Params:
        memory = state["memory"]
        if state["step"] == 0:
            k = len(state["idx"])
            memory["v"] = {n: d.unsqueeze(0).expand(k, *d.shape) for n, d in direction.items()}
        else:
            before = state["grad_at"](memory["previous"])
            memory["v"] = {n: memory["v"][n] + grads[n] - before[n] for n in grads}
        memory["previous"] = state["params"]
        return memory["v"]

    return transform


def _grads_of(model: nn.Module, loss_fn: LossFn | None) -> Callable:
    """Per-client gradients of the weighted mean batch loss, vmapped over stacked parameters."""
    loss_fn = cross_entropy if loss_fn is None else loss_fn

    def batch_loss(p, xb, yb, wb):
        return (loss_fn(functional_call(model, p, (xb,)), yb) * wb).sum() / wb.sum()

    return vmap(grad(batch_loss))


def miner_update(model: nn.Module, params: Params, direction: Tensor | None, clients: Clients,
                 idx, *, steps: int, lr: float, batch_size: int, generator: torch.Generator,
                 loss_fn: LossFn | None = None, variance_reduction: bool = True
                 ) -> tuple[Params, int]:
    """K local steps of the miners `idx` from the global `params`; returns their final models
    (stacked, leading dim len(idx)) and the number of sample gradients computed.

    With `variance_reduction` the steps follow the SARAH estimator started at `direction` (the
    global direction v, a flat (P,) vector); without it they are plain local SGD (`direction`
    unused), which is the simulator's `local_sgd` itself. Minibatches come from the simulator's
    `BatchSampler`, so both draw the same batches from the same generator.
    """
    _check_sizes(clients)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"local steps must be an int >= 1, got {steps!r}")
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"local learning rate must be a positive number, got {lr}")
    ids = _client_ids(idx, clients)
    if not variance_reduction:
        return local_sgd(model, params, clients, ids, steps=steps, lr=lr, batch_size=batch_size,
                         generator=generator, loss_fn=loss_fn)

    n_params = sum(p.numel() for p in params.values())
    direction = torch.as_tensor(direction)
    if direction.shape != (n_params,):
        raise ValueError(f"the global direction has shape {tuple(direction.shape)}; the model "
                         f"has {n_params} parameters")
    if not torch.isfinite(direction).all():
        raise ValueError("the global direction holds NaN or infinite values (a bullseye "
                         "diverged); lower the learning rate")
    k = len(ids)
    rows_of = torch.as_tensor(ids, device=clients.device)
    sampler = BatchSampler(clients.sizes[rows_of], batch_size, generator)
    grads_of = _grads_of(model, loss_fn)
    y_k = flatten(params).unsqueeze(0).expand(k, n_params).clone()
    v_k = direction.to(y_k).unsqueeze(0).expand(k, n_params).clone()
    y_prev, counted = None, 0
    for step in range(steps):
        # Step 0's batch is drawn but unused (its two gradients cancel), which keeps the batch
        # stream the same as plain local SGD's.
        rows, valid = sampler.draw(step)
        if step > 0:
            xb = clients.X[rows_of[:, None], rows]
            yb = clients.y[rows_of[:, None], rows]
            wb = valid.to(xb.dtype)
            both = unflatten(torch.cat([y_k, y_prev]), params)
            g = flatten_stack(grads_of(both, torch.cat([xb, xb]), torch.cat([yb, yb]),
                                       torch.cat([wb, wb])))
            v_k = v_k + g[:k] - g[k:]
            counted += 2 * int(valid.sum())
        y_prev, y_k = y_k, y_k - lr * v_k
    return unflatten(y_k, params), counted


def global_objective(model: nn.Module, params: Params, clients: Clients, *,
                     loss_fn: LossFn | None = None) -> float:
    """f(x) = (1/N) sum_i f_i(x): the mean over clients of each client's mean training loss,
    the objective whose stationary points the paper's theory is about."""
    loss_fn = cross_entropy if loss_fn is None else loss_fn
    n, n_max = clients.X.shape[:2]
    with torch.no_grad():
        out = functional_call(model, params, (clients.X.reshape(n * n_max, *clients.X.shape[2:]),))
        per_sample = loss_fn(out, clients.y.reshape(n * n_max, *clients.y.shape[2:]))
    per_sample = per_sample.reshape(n, n_max) * clients.mask
    return float((per_sample.sum(1) / clients.sizes).mean())


# ---------------------------------------------------------------------------------------------
# Runs


@dataclass
class CostedHistory(History):
    """The simulator's `History` plus what it does not see: the cost of a pass before round 0,
    the training objective at each evaluation, and FedAMD's anchors and miners per round."""

    init_sample_grads: int = 0
    init_floats: int = 0
    objective: list = field(default_factory=list)
    anchors: list = field(default_factory=list)
    miners: list = field(default_factory=list)

    def frame(self) -> pd.DataFrame:
        """One row per evaluation: round, test loss and accuracy, training objective, and the
        cumulative sample gradients and floats communicated (initial pass included)."""
        grads = self.init_sample_grads + np.concatenate([[0], np.cumsum(self.sample_grads)])
        floats = self.init_floats + np.concatenate([[0], np.cumsum(self.floats_communicated)])
        rounds = np.asarray(self.eval_round, dtype=int)
        out = pd.DataFrame({"round": rounds, "test_loss": self.test_loss,
                            "test_acc": self.test_acc,
                            "sample_grads": grads[rounds], "floats": floats[rounds]})
        if self.objective:
            out["objective"] = self.objective
        return out


def _from_history(h: History, **extra) -> CostedHistory:
    return CostedHistory(**{k: getattr(h, k) for k in History.__dataclass_fields__}, **extra)


def _objective_recorder(model, clients, loss_fn, rounds: int, eval_every: int, store: list):
    """on_round callback recording the training objective on the evaluation schedule."""

    def on_round(r, params, info):
        if (r + 1) % eval_every == 0 or r + 1 == rounds:
            store.append(global_objective(model, params, clients, loss_fn=loss_fn))

    return on_round


def _check_common(rounds, participation, clients, eval_every):
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    mask = np.asarray(participation)
    if mask.dtype != bool or mask.shape != (rounds, clients.n_clients):
        raise ValueError(f"participation must be a bool array of shape (rounds, clients) = "
                         f"({rounds}, {clients.n_clients}), got {mask.dtype} {mask.shape}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every must be an int >= 1, got {eval_every!r}")
    _check_sizes(clients)
    return mask


def run_baseline(method: str, model: nn.Module, clients: Clients, *, rounds: int, participation,
                 local_steps: int, lr: float, batch_size: int, seed: int, eval_data,
                 server_lr: float = 1.0, eval_every: int = 1, loss_fn: LossFn | None = None,
                 progress: bool = False) -> CostedHistory:
    """FedAvg, SCAFFOLD or MIFA on the shared simulator, updates averaged with equal weights."""
    if method not in ("fedavg", "scaffold", "mifa"):
        raise ValueError(f"method must be one of fedavg, scaffold, mifa; got {method!r}")
    _check_common(rounds, participation, clients, eval_every)
    x0 = params_of(model)
    n_params = sum(p.numel() for p in x0.values())
    objective = [global_objective(model, x0, clients, loss_fn=loss_fn)]
    kw = dict(rounds=rounds, participation=participation, local_steps=local_steps, lr=lr,
              batch_size=batch_size, seed=seed, server_lr=server_lr, eval_every=eval_every,
              eval_data=eval_data, loss_fn=loss_fn, weights="uniform", progress=progress,
              on_round=_objective_recorder(model, clients, loss_fn, rounds, eval_every,
                                           objective))
    init_grads = init_floats = 0

    if method == "mifa":
        stored = torch.zeros(clients.n_clients, n_params, device=clients.device,
                             dtype=flatten(x0).dtype)

        def aggregate(deltas, weights, r, info):
            stored[torch.as_tensor(info["participants"], device=stored.device)] = deltas
            return stored.mean(0)

        kw["aggregate"] = aggregate

    if method == "scaffold":
        controls, init_grads = local_gradients(model, x0, clients, np.arange(clients.n_clients),
                                               loss_fn=loss_fn)
        init_floats = 2 * n_params * clients.n_clients

        def correct(grads, state):
            rows = state["idx"]
            shift = unflatten(controls.mean(0)[None] - controls[rows], x0)
            return {n: g + shift[n] for n, g in grads.items()}

        def aggregate(deltas, weights, r, info):
            rows = torch.as_tensor(info["participants"], device=controls.device)
            # Option II: c_i <- c_i - c + (x - y_i) / (K lr), the mean of the gradients used.
            controls[rows] = (controls[rows] - controls.mean(0)
                              - deltas.to(controls.dtype) / (local_steps * lr))
            return deltas.mean(0)

        kw.update(grad_transform=correct, aggregate=aggregate)

    if method == "fedavg":
        kw["aggregate"] = lambda deltas, weights, r, info: deltas.mean(0)

    h = _from_history(run(model, clients, **kw), init_sample_grads=init_grads,
                      init_floats=init_floats, objective=objective)
    if method == "scaffold":
        # Control variates travel with the model both ways.
        h.floats_up = [2 * f for f in h.floats_up]
        h.floats_down = [2 * f for f in h.floats_down]
    return h


def run_fedamd(model: nn.Module, clients: Clients, *, rounds: int, participation,
               local_steps: int, lr: float, batch_size: int, seed: int, sampling: AnchorSampling,
               eval_data, anchor_batch: int | None = None, server_lr: float = 1.0,
               eval_every: int = 1, loss_fn: LossFn | None = None,
               variance_reduction: bool = True, progress: bool = False) -> CostedHistory:
    """FedAMD for `rounds` rounds; `participation[t]` (bool per client) says who takes part in
    round t. Returns the simulator's history with the initial pass's cost, the training
    objective and the anchors and miners of every round."""
    mask = _check_common(rounds, participation, clients, eval_every)
    if not isinstance(sampling, AnchorSampling):
        raise TypeError(f"sampling must be an AnchorSampling, got {type(sampling).__name__}")
    if anchor_batch is not None and (isinstance(anchor_batch, bool) or
                                     not isinstance(anchor_batch, int) or anchor_batch < 1):
        raise ValueError(f"anchor batch must be None (whole local data) or an int >= 1, got "
                         f"{anchor_batch!r}")
    if not (np.isfinite(server_lr) and server_lr > 0):
        raise ValueError(f"server learning rate must be a positive number, got {server_lr}")
    batches_seed, split_seed = np.random.SeedSequence(seed).generate_state(2)
    batch_gen = torch.Generator().manual_seed(int(batches_seed))
    split_gen = torch.Generator().manual_seed(int(split_seed))
    X_test, y_test = (torch.as_tensor(a).to(clients.device) for a in eval_data)

    x = params_of(model)
    n_params = sum(p.numel() for p in x.values())
    everyone = np.arange(clients.n_clients)
    bullseyes, init_grads = local_gradients(model, x, clients, everyone, batch=anchor_batch,
                                            generator=batch_gen, loss_fn=loss_fn)
    h = CostedHistory(init_sample_grads=init_grads, init_floats=2 * n_params * clients.n_clients)

    def record(r):
        loss, acc = evaluate(model, x, X_test, y_test, loss_fn=loss_fn)
        h.eval_round.append(r)
        h.test_loss.append(loss)
        h.test_acc.append(acc)
        h.objective.append(global_objective(model, x, clients, loss_fn=loss_fn))

    record(0)
    for t in bar(range(rounds), enabled=progress, desc="rounds", leave=False):
        participants = np.flatnonzero(mask[t])
        anchors, miners = sampling.split(participants, t, split_gen)
        v = bullseyes.mean(0)
        grads = up = down = 0
        if len(miners):
            finals, n = miner_update(model, x, v, clients, miners, steps=local_steps, lr=lr,
                                     batch_size=batch_size, generator=batch_gen,
                                     loss_fn=loss_fn, variance_reduction=variance_reduction)
            delta = (flatten_stack(finals) - flatten(x)[None]).mean(0)
            if not torch.isfinite(delta).all():
                raise FloatingPointError(f"round {t}: a miner's update holds NaN or infinite "
                                         "values; lower the local learning rate")
            new_x = unflatten(flatten(x) + server_lr * delta, x)
            grads, up, down = n, n_params * len(miners), 2 * n_params * len(miners)
        else:
            new_x = x
        if len(anchors):
            # Bullseyes at the model the anchors received, i.e. this round's global model.
            fresh, n = local_gradients(model, x, clients, anchors, batch=anchor_batch,
                                       generator=batch_gen, loss_fn=loss_fn)
            bullseyes[torch.as_tensor(anchors, device=fresh.device)] = fresh
            grads, up, down = grads + n, up + n_params * len(anchors), down + n_params * len(
                anchors)
        x = new_x
        h.participants.append(participants)
        h.anchors.append(anchors)
        h.miners.append(miners)
        h.sample_grads.append(grads)
        h.floats_up.append(up)
        h.floats_down.append(down)
        if (t + 1) % eval_every == 0 or t + 1 == rounds:
            record(t + 1)
    h.params = x
    return h


# ---------------------------------------------------------------------------------------------
# Read-outs


def rounds_to_target(frame: pd.DataFrame, key: str, target: float, *, higher: bool = True,
                     cost: str = "round") -> float:
    """The first recorded `cost` (round, sample_grads or floats) at which `frame[key]` reaches
    `target` (>= when `higher`, <= otherwise); inf when it never does."""
    values = np.asarray(frame[key], dtype=float)
    hit = values >= target if higher else values <= target
    if not hit.any():
        return float("inf")
    return float(np.asarray(frame[cost])[np.argmax(hit)])


def value_at_cost(frame: pd.DataFrame, key: str, budget: float,
                  cost: str = "sample_grads") -> float:
    """`frame[key]` at the last record whose cumulative `cost` is within `budget` (NaN when even
    the first record exceeds it): the comparison at equal computation or communication."""
    spent = np.asarray(frame[cost], dtype=float)
    within = np.flatnonzero(spent <= budget)
    if not len(within):
        return float("nan")
    return float(np.asarray(frame[key], dtype=float)[within[-1]])


# ---------------------------------------------------------------------------------------------
# Experiment helpers for the notebook


METHODS = ("fedamd", "fedavg", "scaffold", "mifa")


def pool_images(X: np.ndarray, side: int, factor: int) -> np.ndarray:
    """Average-pool flattened square images (n, side * side) by `factor` in each direction."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != side * side:
        raise ValueError(f"expected flattened {side}x{side} images (n, {side * side}), got shape "
                         f"{X.shape}")
    if factor < 1 or side % factor:
        raise ValueError(f"pooling factor must be >= 1 and divide the side {side}, got {factor}")
    s = side // factor
    return X.reshape(-1, s, factor, s, factor).mean((2, 4)).reshape(len(X), s * s)


def make_mlp(n_in: int, hidden: int, n_classes: int, seed: int, device) -> nn.Module:
    """n_in -> hidden (ReLU) -> n_classes, initialised from `seed`."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_classes)).to(device)


def run_method(method: str, model: nn.Module, clients: Clients, *, anchor_prob: float = 0.2,
               anchor_period: int = 0, anchor_batch: int = 0, **common) -> CostedHistory:
    """One run of `method` (fedamd, fedavg, scaffold or mifa). FedAMD uses the sequential setting
    when `anchor_period` > 0 and the constant probability `anchor_prob` otherwise;
    `anchor_batch` 0 means the whole local data. `common` goes to run_fedamd / run_baseline."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if method != "fedamd":
        return run_baseline(method, model, clients, **common)
    sampling = (AnchorSampling(period=anchor_period) if anchor_period
                else AnchorSampling(prob=anchor_prob))
    return run_fedamd(model, clients, sampling=sampling, anchor_batch=anchor_batch or None,
                      **common)


def to_target(frame: pd.DataFrame, target: float, cost: str = "round",
              key: str = "test_acc") -> tuple[float, bool]:
    """(cost at which `key` first reaches `target`, whether it did). A run that never reaches it
    is censored at its next evaluation: the spent cost plus one more evaluation interval's worth,
    a lower bound on the truth."""
    spent = rounds_to_target(frame, key, target, cost=cost)
    if np.isfinite(spent):
        return spent, True
    values = np.asarray(frame[cost], dtype=float)
    step = values[-1] - values[-2] if len(values) > 1 else values[-1]
    return float(values[-1] + step), False


def bullseye_age(history: CostedHistory, n_clients: int) -> np.ndarray:
    """Per round, the mean age in rounds of the N cached bullseyes that make up the global
    direction (the initial pass counts as round 0): how stale v is."""
    computed = np.zeros(n_clients)
    ages = []
    for t, anchors in enumerate(history.anchors):
        ages.append(float(np.mean(t - computed)))
        computed[np.asarray(anchors, dtype=np.int64)] = t
    return np.array(ages)
