"""Federated training with slow clients, all systems (method x staleness x seed) side by side, and
the summaries the claims rest on.
"""

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call, vmap

from repsuite.federated.clients import Clients, params_of, unflatten
from repsuite.federated.partition import pathological
from repsuite.federated.server import client_deltas
from repsuite.federated.staleness import (
    GIConfig,
    ParamLayout,
    Reconstruction,
    _as_batch,
    convert_stale_update,
    first_order_compensation,
    relative_l1,
    staleness_weight,
)
from repsuite.progress import bar
from repsuite.training import split_tensors

# -- federated training with slow clients ----------------------------------------------------------

METHODS = ("fresh", "stale", "weighted", "drop", "dc", "gi")
# fresh: no delay at all (the oracle); stale: the stale update as it is; weighted: scaled by
# `staleness_weight`; drop: left out of the aggregate; dc: first-order compensation; gi: the paper.

# The inversion settings of the CPU profile; GIConfig is frozen, so one shared default is safe.
DEFAULT_GI = GIConfig()


@dataclass
class StaleHistory:
    """What `run_stale` recorded for R simulated systems (one per method, staleness and seed).

    Per evaluation e (eval_round[e]; 0 is the initial model): `test_loss`, `test_acc` (R, E) and
    `group_acc[name]` (R, E) on the evaluation samples of each named group. Per conversion of one
    stale update by gradient inversion: the round, system and client, the relative L1 errors and
    the cosines of the converted and of the stale update against the true fresh one, and the
    inversion's residual (`conversions`, a dict of equal-length arrays).
    """

    eval_round: np.ndarray
    test_loss: np.ndarray
    test_acc: np.ndarray
    group_acc: dict
    conversions: dict
    gi_seconds: float
    theta: torch.Tensor  # (R, P) final global models

    def conversions_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.conversions)


def _check_systems(methods, taus, theta0, n_params):
    methods, taus = list(methods), list(taus)
    bad = sorted({m for m in methods if m not in METHODS})
    if bad:
        raise ValueError(f"unknown methods {bad}; known: {METHODS}")
    if len(taus) != len(methods):
        raise ValueError(f"{len(methods)} methods but {len(taus)} staleness values: one per system")
    if any(not isinstance(t, int | np.integer) or isinstance(t, bool) or t < 0 for t in taus):
        raise ValueError(f"staleness values must be ints >= 0 (rounds), got {taus}")
    if theta0.shape != (len(methods), n_params):
        raise ValueError(f"theta0 must be (systems, P) = ({len(methods)}, {n_params}), got "
                         f"{tuple(theta0.shape)}")
    return methods, [int(t) for t in taus]


def _evaluate_systems(model, layout, theta, X, y, groups):
    """Mean loss, accuracy and per-group accuracy of every system on its own evaluation set."""
    with torch.no_grad():
        out = vmap(lambda th, x: functional_call(model, layout.unflatten(th), (x,)))(theta, X)
        loss = nn.functional.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)
        hit = (out.argmax(-1) == y).double()
        accs = {name: (hit * m).sum(1) / m.sum(1).clamp_min(1) for name, m in groups.items()}
    return loss.cpu().numpy(), hit.mean(1).cpu().numpy(), {k: v.cpu().numpy()
                                                          for k, v in accs.items()}


def run_stale(model: nn.Module, clients: Clients, *, system_of, slow, methods, taus,
              theta0: torch.Tensor, rounds: int, local_steps: int, lr: float, eval_X: torch.Tensor,
              eval_y: torch.Tensor, eval_groups: dict | None = None, n_classes: int,
              input_shape: tuple[int, ...], gi: GIConfig = DEFAULT_GI, seed: int = 0,
              weighting: tuple[str, float] = ("exp", 20.0), dc_lambda: float = 4.0,
              participation=None, eval_every: int = 1, system_seeds=None,
              progress: bool = False) -> StaleHistory:
    """Synchronous FedAvg rounds in which the slow clients' updates are computed on an old model.

    R systems run side by side in lock step (for speed: the clients of all of them train in one
    vectorized call): `clients` holds every system's clients, `system_of[c]` says which system
    client c belongs to, `methods[s]` and `taus[s]` give system s's way of handling stale updates
    and its staleness, `theta0[s]` its initial model, `eval_X[s]`, `eval_y[s]` its test set.

    In round r a slow client of system s trains, with the same local steps as everyone (full
    batch, `local_steps` steps at rate `lr`), from the global model of round max(r - tau, 0):
    staleness min(r, tau). A stale update is then used as it is, weighted by
    `staleness_weight(staleness, *weighting)`, dropped, compensated to first order (`dc_lambda`)
    or converted by gradient inversion (config `gi`, D_rec warm-started from the client's previous
    conversion), as `methods[s]` says; 'fresh' systems have no delay. The server averages the
    updates weighted by client size (FedAvg) and adds the average to the global model.

    Every conversion is compared with the true fresh update (computed for that purpose only),
    which is what `StaleHistory.conversions` records. A client's first D_rec is drawn from a
    generator seeded by its system's entry of `system_seeds` (default: `seed` for all) and its
    position within the system, so a system's result does not depend on which others run.
    """
    layout = ParamLayout(model)
    device = clients.device
    theta = _as_batch("theta0", theta0.to(device), layout.n_params).clone()
    methods, taus = _check_systems(methods, taus, theta, layout.n_params)
    R, C = len(methods), clients.n_clients
    system_of = torch.as_tensor(np.asarray(system_of), dtype=torch.long, device=device)
    slow = torch.as_tensor(np.asarray(slow), dtype=torch.bool, device=device)
    if system_of.shape != (C,) or slow.shape != (C,):
        raise ValueError(f"system_of and slow need one entry per client ({C}), got "
                         f"{tuple(system_of.shape)} and {tuple(slow.shape)}")
    if system_of.min() < 0 or system_of.max() >= R:
        raise ValueError(f"system_of must hold system indices in [0, {R})")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every must be an int >= 1, got {eval_every!r}")
    mask = np.ones((rounds, C), dtype=bool) if participation is None else np.asarray(participation)
    if mask.dtype != bool or mask.shape != (rounds, C):
        raise ValueError(f"participation must be a bool array of shape (rounds, clients) = "
                         f"({rounds}, {C}), got {mask.dtype} {mask.shape}")
    eval_X, eval_y = eval_X.to(device), eval_y.to(device)
    if eval_X.shape[0] != R or eval_y.shape[:1] != (R,) or eval_X.shape[1] != eval_y.shape[1]:
        raise ValueError(f"eval_X and eval_y must be (systems, n, ...) and (systems, n) with "
                         f"systems = {R}, got {tuple(eval_X.shape)} and {tuple(eval_y.shape)}")
    groups = {k: torch.as_tensor(v, device=device).double() for k, v in (eval_groups or {}).items()}
    for k, v in groups.items():
        if v.shape != eval_y.shape:
            raise ValueError(f"eval group {k!r} has shape {tuple(v.shape)}; expected "
                             f"{tuple(eval_y.shape)}")

    seeds = [seed] * R if system_seeds is None else [int(v) for v in system_seeds]
    if len(seeds) != R:
        raise ValueError(f"system_seeds needs one seed per system ({R}), got {len(seeds)}")
    # A client's key for its first D_rec: (its system's seed, its position within the system).
    owner = system_of.cpu().numpy()
    position = np.zeros(C, dtype=np.int64)
    for sys_id in range(R):
        members = np.flatnonzero(owner == sys_id)
        position[members] = np.arange(len(members))
    keys = [(seeds[owner[c]], int(position[c])) for c in range(C)]

    code = {m: i for i, m in enumerate(METHODS)}
    method_of = torch.tensor([code[m] for m in methods], device=device)[system_of]
    tau_of = torch.tensor(taus, device=device)[system_of]
    # Who is ever delayed: slow clients of systems that have a delay at all.
    delayed = slow & (method_of != code["fresh"]) & (tau_of > 0)
    sizes = clients.sizes.to(torch.float64)
    like = params_of(model)
    local = dict(steps=local_steps, lr=lr, batch_size=int(clients.sizes.max()),
                 generator=torch.Generator().manual_seed(seed))
    weight_kind, weight_a = weighting
    staleness_weight(0, weight_kind, weight_a)  # checks the weighting before any work

    history = [theta]  # global models of the last max(taus) rounds, oldest first
    oldest = 0  # the round of history[0]
    recs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    conv = {k: [] for k in ("round", "system", "client", "staleness", "err_converted",
                            "err_stale", "cos_converted", "cos_stale", "residual")}
    gi_seconds = 0.0
    evals = [(0, *_evaluate_systems(model, layout, theta, eval_X, eval_y, groups))]

    for r in bar(range(rounds), enabled=progress, desc="rounds", leave=False):
        active = torch.as_tensor(np.flatnonzero(mask[r]), device=device)
        s_of = torch.where(delayed, tau_of.clamp(max=r), 0)[active]
        start_round = r - s_of
        hist = torch.stack(history)  # (H, R, P)
        starts = hist[start_round - oldest, system_of[active]]
        deltas, _ = client_deltas(model, unflatten(starts, like), clients, active, **local)
        weights = sizes[active].clone()
        now = theta[system_of[active]]

        stale_rows = s_of > 0
        meth = method_of[active]
        if stale_rows.any():
            rows = stale_rows & (meth == code["weighted"])
            factor = staleness_weight(s_of[rows].cpu().numpy(), weight_kind, weight_a)
            deltas[rows] *= torch.as_tensor(factor, dtype=deltas.dtype, device=device)[:, None]
            weights[stale_rows & (meth == code["drop"])] = 0.0
            rows = stale_rows & (meth == code["dc"])
            deltas[rows] = first_order_compensation(deltas[rows], now[rows], starts[rows],
                                                    dc_lambda)
            rows = (stale_rows & (meth == code["gi"])).nonzero().reshape(-1)
            if len(rows):
                gi_seconds += _convert_rows(
                    model, rows, active, deltas, now, starts, s_of, r, system_of, clients, like,
                    local, recs, conv, gi, keys, n_classes, input_shape)

        total = torch.zeros(R, dtype=torch.float64, device=device).index_add_(
            0, system_of[active], weights)
        if (total[torch.unique(system_of[active])] <= 0).any():
            raise ValueError(f"round {r}: some system's updates all carry zero weight (every "
                             "participant was a dropped stale client)")
        summed = torch.zeros(R, layout.n_params, dtype=torch.float64, device=device).index_add_(
            0, system_of[active], weights[:, None] * deltas.double())
        theta = theta + (summed / total.clamp_min(1e-300)[:, None]).to(theta.dtype)

        history.append(theta)
        while len(history) > max(taus) + 1:
            history.pop(0)
            oldest += 1
        if (r + 1) % eval_every == 0 or r + 1 == rounds:
            evals.append((r + 1, *_evaluate_systems(model, layout, theta, eval_X, eval_y, groups)))

    group_acc = {k: np.stack([e[3][k] for e in evals], axis=1) for k in groups}
    return StaleHistory(
        eval_round=np.array([e[0] for e in evals]),
        test_loss=np.stack([e[1] for e in evals], axis=1),
        test_acc=np.stack([e[2] for e in evals], axis=1), group_acc=group_acc,
        conversions={k: np.asarray(v) for k, v in conv.items()}, gi_seconds=gi_seconds,
        theta=theta)


def _convert_rows(model, rows, active, deltas, now, starts, s_of, r, system_of, clients, like,
                  local, recs, conv, gi, keys, n_classes, input_shape) -> float:
    """Replace the stale updates in `rows` (of this round's participants) by their conversions;
    record the comparison with the true fresh updates. Returns the seconds spent inverting."""
    ids = active[rows].tolist()
    warm = [i for i, c in enumerate(ids) if c in recs]
    cold = [i for i, c in enumerate(ids) if c not in recs]
    fresh_est = torch.empty_like(deltas[rows])
    residual = torch.empty(len(ids), dtype=deltas.dtype, device=deltas.device)
    t0 = time.perf_counter()
    for part, is_warm in ((warm, True), (cold, False)):
        if not part:
            continue
        sel = rows[part]
        if is_warm:
            X0 = torch.stack([recs[ids[i]][0] for i in part])
            L0 = torch.stack([recs[ids[i]][1] for i in part])
        else:
            X0, L0 = _cold_start([keys[ids[i]] for i in part], gi, n_classes, input_shape,
                                 deltas.dtype, deltas.device)
        init = Reconstruction(X0, L0, torch.zeros(len(part)))
        its = gi.warm_iterations if is_warm else gi.iterations
        fresh, rec = convert_stale_update(
            model, now[sel], starts[sel], deltas[sel], steps=local["steps"], lr=local["lr"],
            n_classes=n_classes, input_shape=input_shape, config=gi, init=init, iterations=its)
        fresh_est[part] = fresh
        residual[part] = rec.residual
        for j, i in enumerate(part):
            recs[ids[i]] = (rec.X[j], rec.label_logits[j])
    seconds = time.perf_counter() - t0

    true, _ = client_deltas(model, unflatten(now[rows], like), clients, active[rows], **local)
    stale = deltas[rows]
    cos = nn.functional.cosine_similarity
    conv["round"] += [r] * len(ids)
    conv["system"] += system_of[active[rows]].tolist()
    conv["client"] += ids
    conv["staleness"] += s_of[rows].tolist()
    conv["err_converted"] += relative_l1(fresh_est, true).tolist()
    conv["err_stale"] += relative_l1(stale, true).tolist()
    conv["cos_converted"] += cos(fresh_est, true, dim=1).tolist()
    conv["cos_stale"] += cos(stale, true, dim=1).tolist()
    conv["residual"] += residual.tolist()
    deltas[rows] = fresh_est
    return seconds


def _cold_start(keys, gi, n_classes, input_shape, dtype, device):
    """D_rec starts of the given clients, each from a generator of its own (one key a client)."""
    lo, hi = gi.box if gi.box is not None else (0.0, 1.0)
    Xs, Ls = [], []
    for key in keys:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
        Xs.append(lo + (hi - lo) * torch.rand((gi.n_rec, *input_shape), generator=g, dtype=dtype))
        Ls.append(torch.randn((gi.n_rec, n_classes), generator=g, dtype=dtype))
    return torch.stack(Xs).to(device), torch.stack(Ls).to(device)


def final_value(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` evaluations of each row (R, E) -> (R,)."""
    values = np.asarray(values, dtype=float)
    if not isinstance(window, int) or not 1 <= window <= values.shape[1]:
        raise ValueError(f"window must be an int in [1, {values.shape[1]}], got {window!r}")
    return values[:, -window:].mean(axis=1)


def rounds_to_target(values: np.ndarray, eval_round: np.ndarray, target) -> np.ndarray:
    """First evaluated round at which each row reaches its `target` (scalar or (R,)).

    A row that never reaches it gets one evaluation interval past the last round (a censored
    count, so that it still ranks behind every row that got there).
    """
    values = np.asarray(values, dtype=float)
    eval_round = np.asarray(eval_round)
    if values.ndim != 2 or values.shape[1] != len(eval_round):
        raise ValueError(f"values must be (rows, evaluations) with {len(eval_round)} evaluations, "
                         f"got {values.shape}")
    target = np.broadcast_to(np.asarray(target, dtype=float), (values.shape[0],))
    if not np.all(np.isfinite(target)):
        raise ValueError("target must be finite")
    reached = values >= target[:, None]
    step = eval_round[-1] - eval_round[-2] if len(eval_round) > 1 else 1
    first = np.where(reached.any(1), eval_round[reached.argmax(1)], eval_round[-1] + step)
    return first.astype(float)


@dataclass
class Systems:
    """Everything `run_stale` needs for a set of systems, and a table describing them."""

    clients: Clients  # the clients of all systems together
    system_of: np.ndarray
    slow: np.ndarray
    methods: list
    taus: list
    seeds: list
    theta0: torch.Tensor
    eval_X: torch.Tensor
    eval_y: torch.Tensor
    eval_groups: dict
    affected_classes: dict  # seed -> the classes that only slow clients hold

    def table(self):
        return pd.DataFrame({"method": self.methods, "tau": self.taus, "seed": self.seeds})

    def kwargs(self) -> dict:
        return dict(clients=self.clients, system_of=self.system_of, slow=self.slow,
                    methods=self.methods, taus=self.taus, theta0=self.theta0, eval_X=self.eval_X,
                    eval_y=self.eval_y, eval_groups=self.eval_groups, system_seeds=self.seeds)


def intertwined_systems(X, y, *, seeds, methods, taus, n_clients: int, classes_per_client: int,
                        slow_classes, test_size: float, make_model, device="cpu",
                        scale: float | None = None) -> Systems:
    """One system per (seed, method, staleness), with intertwined data and device heterogeneity.

    For each seed: a stratified train/test split, a pathological split of the training set
    (`classes_per_client` classes a client), the slow clients are those holding any of
    `slow_classes`, and the initial model is `make_model()` after `torch.manual_seed(seed)`.
    The 'fresh' method (no delay) gets one system per seed; every other method one per
    staleness in `taus`. The evaluation group 'affected' holds the test samples of the classes
    that only slow clients have; 'slow_classes' those of `slow_classes`.
    """
    bad = sorted({m for m in methods if m not in METHODS})
    if bad:
        raise ValueError(f"unknown methods {bad}; known: {METHODS}")
    if not seeds or not taus:
        raise ValueError("at least one seed and one staleness value are needed")
    y = np.asarray(y)
    missing = sorted(set(slow_classes) - set(np.unique(y).tolist()))
    if missing or not slow_classes:
        raise ValueError(f"slow_classes must be classes present in y; {missing or 'none'} given")
    Xs, ys, parts, rows = [], [], [], []
    eval_X, eval_y, theta0 = [], [], []
    system_of, slow = [], []
    affected_classes = {}
    offset = 0
    for seed in seeds:
        Xtr, Xte, ytr, yte = split_tensors(X, y, test_size=test_size, seed=seed, device="cpu",
                                           scale=scale)
        labels = ytr.numpy()
        split = pathological(labels, n_clients, classes_per_client, seed)
        is_slow = [bool(np.isin(labels[p], slow_classes).any()) for p in split]
        fast_classes = {int(c) for p, s in zip(split, is_slow, strict=True) if not s
                        for c in np.unique(labels[p])}
        affected_classes[seed] = sorted(set(np.unique(labels).tolist()) - fast_classes)
        torch.manual_seed(seed)
        model = make_model()
        init = ParamLayout(model).flatten(model)
        for method in methods:
            for tau in ([0] if method == "fresh" else taus):
                rows.append((method, int(tau), seed))
                system_of += [len(rows) - 1] * n_clients
                slow += is_slow
                parts += [p + offset for p in split]
                offset += len(Xtr)
                Xs.append(Xtr)
                ys.append(ytr)
                eval_X.append(Xte)
                eval_y.append(yte)
                theta0.append(init)

    eval_y = torch.stack(eval_y)
    seed_of = [r[2] for r in rows]
    groups = {
        "affected": torch.stack([torch.isin(eval_y[i], torch.tensor(affected_classes[s]))
                                 for i, s in enumerate(seed_of)]),
        "slow_classes": torch.isin(eval_y, torch.tensor(list(slow_classes))),
    }
    clients = Clients.from_partition(torch.cat(Xs), torch.cat(ys), parts, device)
    return Systems(clients=clients, system_of=np.asarray(system_of), slow=np.asarray(slow),
                   methods=[r[0] for r in rows], taus=[r[1] for r in rows], seeds=seed_of,
                   theta0=torch.stack(theta0).to(device), eval_X=torch.stack(eval_X).to(device),
                   eval_y=eval_y.to(device), eval_groups={k: v.to(device) for k, v in
                                                          groups.items()},
                   affected_classes=affected_classes)


# -- summaries for the claims ----------------------------------------------------------------------


def summarize(history: StaleHistory, systems: Systems, *, final_window: int,
              target_frac: float):
    """One row per system: method, tau, seed, final overall and affected-class accuracy (mean of
    the last `final_window` evaluations), and the rounds to reach `target_frac` times the final
    overall accuracy of the same seed's no-delay ('fresh') system."""
    if not 0 < target_frac <= 1:
        raise ValueError(f"target_frac must be in (0, 1], got {target_frac!r}")
    frame = systems.table()
    frame["final_acc"] = final_value(history.test_acc, final_window)
    frame["affected_acc"] = final_value(history.group_acc["affected"], final_window)
    fresh = frame[frame.method == "fresh"].set_index("seed")["final_acc"]
    if fresh.index.has_duplicates or set(frame.seed) - set(fresh.index):
        raise ValueError("rounds to target need exactly one 'fresh' system per seed")
    frame["target"] = target_frac * frame.seed.map(fresh).to_numpy()
    frame["rounds_to_target"] = rounds_to_target(history.test_acc, history.eval_round,
                                                 frame["target"].to_numpy())
    return pd.DataFrame(frame)


def mlp(n_in: int, hidden: int, n_classes: int) -> nn.Module:
    """A one-hidden-layer ReLU network, or softmax regression when `hidden` is 0."""
    if hidden == 0:
        return nn.Linear(n_in, n_classes)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


def rows_of(systems: Systems, method: str, tau: int) -> np.ndarray:
    """Indices of the systems running `method` at staleness `tau`, ordered by seed."""
    tau = 0 if method == "fresh" else tau
    rows = [i for i, (m, t) in enumerate(zip(systems.methods, systems.taus, strict=True))
            if m == method and t == tau]
    if not rows:
        raise KeyError(f"no system with method {method!r} and tau {tau}")
    return np.array(sorted(rows, key=lambda i: systems.seeds[i]))


def per_seed(frame, column: str, method: str, tau: int) -> np.ndarray:
    """`column` of one method at one staleness, ordered by seed (the no-delay method has tau 0)."""
    rows = frame[(frame.method == method) & (frame.tau == (0 if method == "fresh" else tau))]
    if rows.empty:
        raise KeyError(f"no system with method {method!r} and tau {tau}")
    return rows.sort_values("seed")[column].to_numpy()


def best_baseline(frame, column: str, baselines, tau: int, larger: bool = True) -> str:
    """The baseline with the best mean `column` at staleness `tau`."""
    means = {b: per_seed(frame, column, b, tau).mean() for b in baselines}
    return (max if larger else min)(means, key=means.get)
