"""The Flag Aggregator's parameter-server experiment: many independent training runs (seeds,
scenarios, rules, learning rates) advanced together, as the notebook uses them.
"""

import functools
from dataclasses import dataclass

import numpy as np
import torch

from repsuite.federated.flag import (
    bulyan,
    flag_median,
    uniform_noise,
)

# --------------------------------------------------------------------------------------------
# A parameter-server experiment: many independent training runs advanced together.
#
# The paper trains with one parameter server and p workers: every step each worker sends a
# minibatch gradient, f of them are Byzantine (or train on augmented data), the server
# aggregates and takes an SGD step with momentum. The core loop `server.run` advances one run;
# here every (seed, scenario, rule, learning rate) run is a row of one stacked model, so that
# one vectorized `local_sgd` call gives all workers' gradients of all runs each step.

RULES = ("mean", "median", "trimmed_mean", "multi_krum", "bulyan", "flag")
ATTACKS = ("none", "gaussian", "uniform", "sign_flip", "zero", "alie", "min_max")


@dataclass(frozen=True)
class RunSpec:
    """One training run: its seed group (start model, data split, test set), the workers'
    client ids in the shared `Clients` (p of them; augmented workers point at noisy copies),
    the aggregation rule, the Byzantine attack, the server learning rate and FA's lambda."""

    group: int
    clients: tuple
    rule: str
    attack: str = "none"
    lr: float = 0.1
    lam: float = 0.0
    scenario: str = ""


@dataclass
class RunsResult:
    """Test accuracy (R, E) at `eval_steps` (E,) for every run; FA's diagnostics per run: the
    mean reconstruction ratio of the Byzantine and of the honest workers at each evaluation,
    and whether the IRLS objective never went up in any step; `diverged` marks runs whose
    model overflowed (they stay at their last finite parameters)."""

    specs: list
    eval_steps: list
    acc: np.ndarray
    loss: np.ndarray
    ratio_byz: np.ndarray
    ratio_honest: np.ndarray
    monotone: np.ndarray
    diverged: np.ndarray
    seconds: float

    def frame(self):
        import pandas as pd

        rows = []
        for r, sp in enumerate(self.specs):
            rows.append({"run": r, "group": sp.group, "scenario": sp.scenario, "rule": sp.rule,
                         "attack": sp.attack, "lr": sp.lr, "lam": sp.lam,
                         "acc": float(self.acc[r, -1]), "loss": float(self.loss[r, -1]),
                         "diverged": bool(self.diverged[r])})
        return pd.DataFrame(rows)


def pool_images(X, side: int = 28, factor: int = 2) -> np.ndarray:
    """Average-pool square images given as flat rows (n, side*side) by `factor` per axis."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != side * side:
        raise ValueError(f"expected rows of {side}x{side} images, got shape {X.shape}")
    if side % factor:
        raise ValueError(f"side {side} is not a multiple of the pooling factor {factor}")
    k = side // factor
    return X.reshape(len(X), k, factor, k, factor).mean((2, 4)).reshape(len(X), k * k)


def noisy_copy(X, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Inputs with Gaussian noise of standard deviation `sigma` added: the data of an
    "augmented-loss" worker (our stand-in for the paper's workers on generated data)."""
    X = torch.as_tensor(X)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    noise = torch.randn(X.shape, generator=generator, dtype=X.dtype)
    return X + sigma * noise.to(X.device)


@functools.cache
def _alie_z(n: int, f: int) -> float:
    from repsuite.federated import attacks

    return attacks.alie_z(n, f)


def apply_attack(deltas: torch.Tensor, attack: str, byz, generator: torch.Generator, *,
                 gaussian_std: float = 1.0, flip_scale: float = 4.0) -> torch.Tensor:
    """The updates (p, P) of one run after the Byzantine workers `byz` (rows) replaced theirs."""
    from repsuite.federated import attacks

    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; known: {ATTACKS}")
    if attack == "none" or len(byz) == 0:
        return deltas
    if attack == "gaussian":
        return attacks.gaussian(deltas, byz, gaussian_std, generator)
    if attack == "uniform":
        return uniform_noise(deltas, byz, generator=generator)
    if attack == "sign_flip":
        return attacks.sign_flip(deltas, byz, flip_scale)
    if attack == "zero":
        return attacks.zero(deltas, byz)
    if attack == "alie":
        return attacks.alie(deltas, byz, _alie_z(len(deltas), len(byz)))
    return attacks.min_max(deltas, byz)


def coordinate_median_batch(X: torch.Tensor) -> torch.Tensor:
    """`aggregators.coordinate_median` for a batch (B, p, P): per run and coordinate, the median
    of the p updates (the middle pair averaged when p is even)."""
    p = X.shape[1]
    srt = X.transpose(1, 2).sort(dim=-1).values
    return 0.5 * (srt[..., (p - 1) // 2] + srt[..., p // 2])


def trimmed_mean_batch(X: torch.Tensor, n_trim: int) -> torch.Tensor:
    """`aggregators.trimmed_mean(.., n_trim=b)` for a batch (B, p, P): per coordinate, the mean
    after dropping the b largest and b smallest values. Needs 2b < p."""
    p = X.shape[1]
    if 2 * n_trim >= p:
        raise ValueError(f"trimmed mean cannot drop {n_trim} values at each end of {p} updates: "
                         f"needs 2 * {n_trim} < {p}")
    return X.transpose(1, 2).sort(dim=-1).values[..., n_trim:p - n_trim].mean(-1)


def multi_krum_batch(X: torch.Tensor, f: int) -> torch.Tensor:
    """`aggregators.multi_krum(.., f)` for a batch (B, p, P): the mean of the p - f updates with
    the smallest Krum scores (sum of squared distances to the p - f - 2 nearest others)."""
    p = X.shape[1]
    if p <= 2 * f + 2:
        raise ValueError(f"Krum tolerates f Byzantine workers only when n > 2f + 2; got n={p}, "
                         f"f={f}")
    Xd = X.double()
    sq = (Xd * Xd).sum(-1)
    D = (sq[..., :, None] + sq[..., None, :] - 2 * Xd @ Xd.transpose(-1, -2)).clamp_min(0.0)
    D = D + torch.diag_embed(torch.full_like(sq, float("inf")))
    score = D.sort(dim=-1).values[..., :p - f - 2].sum(-1)
    keep = score.argsort(dim=-1)[..., :p - f]
    return torch.gather(X, 1, keep[..., None].expand(-1, -1, X.shape[-1])).mean(1)


def aggregate_batch(rule: str, X: torch.Tensor, *, f: int, m: int = 1, lam: float = 0.0,
                    n_iter: int = 10, generator: torch.Generator | None = None):
    """Aggregate a batch (B, p, P) of runs' updates with one rule; FA also returns its solution.

    The baselines are the core rules of `aggregators`, written here for a whole batch of runs
    (the tests check that they agree with the core's one-run versions).
    """
    if rule == "mean":
        return X.mean(1), None
    if rule == "median":
        return coordinate_median_batch(X), None
    if rule == "trimmed_mean":
        return trimmed_mean_batch(X, f), None
    if rule == "multi_krum":
        return multi_krum_batch(X, f), None
    if rule == "bulyan":
        return bulyan(X, f), None
    if rule == "flag":
        sol = flag_median(X, m=m, lam=lam, n_iter=n_iter, generator=generator, f=f)
        return sol.aggregate, sol
    raise ValueError(f"unknown rule {rule!r}; known: {RULES}")


def _stack_params(params_list: list[dict]) -> dict:
    return {n: torch.stack([p[n] for p in params_list]) for n in params_list[0]}


def _evaluate_runs(model, stacked: dict, rows: list[int], X, y):
    """(loss, accuracy) of each run in `rows` on one test set, all runs in one vmap."""
    from torch.func import functional_call, vmap

    sub = {n: v[rows] for n, v in stacked.items()}
    with torch.no_grad():
        logits = vmap(lambda p: functional_call(model, p, (X,)))(sub)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.repeat(len(rows)), reduction="none")
        acc = (logits.argmax(-1) == y).double().mean(-1)
    return loss.reshape(len(rows), -1).mean(-1).double(), acc


def train_runs(model, clients, specs: list[RunSpec], *, group_init: list[dict],
               eval_sets: list, byzantine: list[int], f: int, steps: int, batch_size: int,
               momentum: float = 0.9, milestones: tuple = (), decay: float = 0.2,
               eval_every: int = 50, m: int = 1, n_iter: int = 10, gaussian_std: float = 1.0,
               flip_scale: float = 4.0, seed: int = 0, progress: bool = False) -> RunsResult:
    """Parameter-server SGD for every run in `specs`, advanced in lockstep.

    Each step, every worker of every run computes a minibatch gradient at its run's model (one
    `local_sgd` step with rate 1, so its update is minus the gradient); the attack of the run
    replaces the rows `byzantine`; the run's rule aggregates; the server applies heavy-ball
    momentum and the run's learning rate, multiplied by `decay` at each step in `milestones`.
    `group_init[g]` is the start model of seed group g and `eval_sets[g]` its test set (X, y).
    `f` is the number of Byzantine workers every robust rule is told to tolerate.
    """
    import time

    from repsuite.federated.clients import flatten, flatten_stack, local_sgd, unflatten
    from repsuite.progress import bar

    if not specs:
        raise ValueError("no runs to train")
    for sp in specs:
        if sp.rule not in RULES:
            raise ValueError(f"unknown rule {sp.rule!r}; known: {RULES}")
        if sp.attack not in ATTACKS:
            raise ValueError(f"unknown attack {sp.attack!r}; known: {ATTACKS}")
        if not 0 <= sp.group < len(group_init) or sp.group >= len(eval_sets):
            raise ValueError(f"run group {sp.group} has no start model or test set")
    p = len(specs[0].clients)
    if any(len(sp.clients) != p for sp in specs):
        raise ValueError("every run needs the same number of workers")
    if any(not 0 <= b < p for b in byzantine):
        raise ValueError(f"Byzantine rows {list(byzantine)} outside 0..{p - 1}")
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps and eval_every must be >= 1, got {steps} and {eval_every}")
    start = time.perf_counter()
    device = clients.device
    R = len(specs)
    like = group_init[0]
    theta = torch.stack([flatten(group_init[sp.group]) for sp in specs]).to(device)
    velocity = torch.zeros_like(theta)
    lrs = torch.tensor([sp.lr for sp in specs], dtype=theta.dtype, device=device)
    idx = np.concatenate([np.asarray(sp.clients) for sp in specs])
    seeds = np.random.SeedSequence(seed).generate_state(3)
    batch_gen = torch.Generator().manual_seed(int(seeds[0]))
    attack_gen = torch.Generator().manual_seed(int(seeds[1]))
    flag_gen = torch.Generator().manual_seed(int(seeds[2]))
    byz = list(byzantine)
    honest = [i for i in range(p) if i not in set(byz)]

    by_rule: dict[tuple, list[int]] = {}
    for r, sp in enumerate(specs):
        by_rule.setdefault((sp.rule, sp.lam if sp.rule == "flag" else 0.0), []).append(r)
    attacked = [r for r, sp in enumerate(specs) if sp.attack != "none"]
    by_group: dict[int, list[int]] = {}
    for r, sp in enumerate(specs):
        by_group.setdefault(sp.group, []).append(r)
    eval_steps = sorted({0, *range(eval_every, steps, eval_every), steps})
    acc = np.zeros((R, len(eval_steps)))
    loss = np.zeros((R, len(eval_steps)))
    ratio_byz = np.full((R, len(eval_steps)), np.nan)
    ratio_honest = np.full((R, len(eval_steps)), np.nan)
    monotone = np.ones(R, dtype=bool)
    ratios_now = torch.full((R, p), float("nan"), dtype=torch.float64)
    diverged = torch.zeros(R, dtype=torch.bool, device=device)

    def record(e):
        stacked = unflatten(theta, like)
        for g, rows in by_group.items():
            lo, ac = _evaluate_runs(model, stacked, rows, *eval_sets[g])
            loss[rows, e], acc[rows, e] = lo.cpu().numpy(), ac.cpu().numpy()
        if byz:
            ratio_byz[:, e] = ratios_now[:, byz].mean(1).numpy()
        ratio_honest[:, e] = ratios_now[:, honest].mean(1).numpy()

    record(0)
    for step in bar(range(steps), enabled=progress, desc="steps", leave=False):
        rows_start = theta.repeat_interleave(p, dim=0)
        trained, _ = local_sgd(model, unflatten(rows_start, like), clients, idx, steps=1,
                               lr=1.0, batch_size=batch_size, generator=batch_gen)
        deltas = (flatten_stack(trained) - rows_start).reshape(R, p, -1)
        del trained, rows_start
        # One sum per run finds NaN or inf anywhere in its updates (an overflowing sum is a
        # diverged run too).
        diverged |= ~torch.isfinite(deltas.sum((1, 2)))
        if diverged.any():
            deltas[diverged] = 0.0
        for r in attacked:
            deltas[r] = apply_attack(deltas[r], specs[r].attack, byz, attack_gen,
                                     gaussian_std=gaussian_std, flip_scale=flip_scale)
        agg = torch.empty_like(theta)
        for (rule, lam), rows in by_rule.items():
            out, sol = aggregate_batch(rule, deltas[rows], f=f, m=m, lam=lam, n_iter=n_iter,
                                       generator=flag_gen)
            agg[rows] = out.to(agg.dtype)
            if sol is not None:
                ratios_now[rows] = sol.ratios.double().cpu()
                obj = sol.objective
                rise = (obj[:, 1:] > obj[:, :-1] + 1e-9 * obj[:, :-1].abs()).any(-1)
                monotone[rows] &= ~rise.cpu().numpy()
        velocity = momentum * velocity + agg
        rate = lrs * decay ** sum(step >= s for s in milestones)
        new = theta + rate[:, None] * velocity
        # A run whose model overflowed stops where it last was finite (its accuracy is then
        # that of a failed run) instead of stopping every other run.
        diverged |= ~torch.isfinite(new.sum(1))
        theta = torch.where(diverged[:, None], theta, new)
        velocity = torch.where(diverged[:, None], torch.zeros_like(velocity), velocity)
        if step + 1 in eval_steps:
            record(eval_steps.index(step + 1))
    return RunsResult(specs=list(specs), eval_steps=eval_steps, acc=acc, loss=loss,
                      ratio_byz=ratio_byz, ratio_honest=ratio_honest, monotone=monotone,
                      diverged=diverged.cpu().numpy(), seconds=time.perf_counter() - start)


@dataclass
class Workers:
    """The data side of an experiment: every seed group's workers as clients of one `Clients`.

    Group g has a stratified train/test split of its own and an i.i.d. partition of its
    training rows over p workers; `clean[g]` are those workers' client ids and `augmented[g]`
    the same with the rows in `byzantine` pointing at copies of their data with input noise.
    `tests[g]` is the group's evaluation set and `inits[g]` its start model.
    """

    clients: object
    clean: list
    augmented: list
    tests: list
    inits: list


def make_workers(X, y, *, seeds: list[int], p: int, byzantine: list[int], aug_sigma: float,
                 test_size: float, make_model, device, validation: bool = False) -> Workers:
    """Split, partition and stack the data of every seed in `seeds` (see `Workers`).

    With `validation`, each seed's training split is split once more and the held-out part
    takes the test set's place (for choosing learning rates without touching the test sets).
    `make_model(seed)` builds the start model of a seed.
    """
    from repsuite import training
    from repsuite.federated import Clients, params_of, partition

    if not seeds:
        raise ValueError("no seeds given")
    if p < 1 or any(not 0 <= b < p for b in byzantine):
        raise ValueError(f"Byzantine rows {list(byzantine)} must lie in 0..{p - 1}")
    blocks, labels, parts, clean, augmented, tests, inits = [], [], [], [], [], [], []
    offset = 0
    for s in seeds:
        Xtr, Xte, ytr, yte = training.split_tensors(X, y, test_size=test_size, seed=s,
                                                    device="cpu", scale=1.0)
        if validation:
            Xtr, Xte, ytr, yte = training.split_tensors(Xtr.numpy(), ytr.numpy(),
                                                        test_size=test_size, seed=s,
                                                        device="cpu", scale=1.0)
        if len(ytr) < p:
            raise ValueError(f"{len(ytr)} training rows cannot be shared by {p} workers")
        noisy = noisy_copy(Xtr, aug_sigma, torch.Generator().manual_seed(s))
        shards = partition.iid(ytr.numpy(), p, s)
        base = len(parts)
        parts += [offset + q for q in shards] + [offset + len(Xtr) + shards[b] for b in byzantine]
        clean.append(tuple(range(base, base + p)))
        noisy_id = {b: base + p + j for j, b in enumerate(byzantine)}
        augmented.append(tuple(noisy_id.get(i, base + i) for i in range(p)))
        blocks += [Xtr, noisy]
        labels += [ytr, ytr]
        offset += 2 * len(Xtr)
        tests.append((Xte.to(device), yte.to(device)))
        inits.append({n: v.to(device) for n, v in params_of(make_model(s)).items()})
    clients = Clients.from_partition(torch.cat(blocks), torch.cat(labels), parts, device)
    return Workers(clients=clients, clean=clean, augmented=augmented, tests=tests, inits=inits)


def make_specs(workers: Workers, *, rules, scenarios, lrs: dict, lams=(0.0,)) -> list[RunSpec]:
    """One run per seed group, scenario and rule (FA once per lambda in `lams`).

    A scenario is an attack name, or "augmented" (the Byzantine rows train on noisy data and
    send honest gradients of it). `lrs[rule]` is the rule's learning rate, or a list of rates
    for a learning-rate grid (one run per rate).
    """
    specs = []
    for g in range(len(workers.clean)):
        for sc in scenarios:
            if sc != "augmented" and sc not in ATTACKS:
                raise ValueError(f"unknown scenario {sc!r}; known: augmented, {ATTACKS}")
            ids = workers.augmented[g] if sc == "augmented" else workers.clean[g]
            attack = "none" if sc == "augmented" else sc
            for rule in rules:
                if rule not in RULES:
                    raise ValueError(f"unknown rule {rule!r}; known: {RULES}")
                rates = lrs[rule] if isinstance(lrs[rule], list | tuple) else [lrs[rule]]
                for lr in rates:
                    for lam in (lams if rule == "flag" else (0.0,)):
                        specs.append(RunSpec(group=g, clients=ids, rule=rule, attack=attack,
                                             lr=float(lr), lam=float(lam), scenario=sc))
    return specs


def best_rates(result: RunsResult) -> dict:
    """Per rule, the learning rate with the best mean final accuracy over the runs (ties: the
    smaller rate), from a grid run on validation sets."""
    table = result.frame().groupby(["rule", "lr"]).acc.mean().reset_index()
    table = table.sort_values(["rule", "acc", "lr"], ascending=[True, False, True])
    return {r: float(t.lr.iloc[0]) for r, t in table.groupby("rule")}


def per_seed(result: RunsResult, scenario: str, rule: str, lr: float,
             lam: float = 0.0) -> np.ndarray:
    """Final test accuracy of one scenario, rule, learning rate (and FA lambda), one value per
    seed group in group order."""
    df = result.frame()
    sel = df[(df.scenario == scenario) & (df.rule == rule) & np.isclose(df.lr, lr)
             & np.isclose(df.lam, lam)]
    if sel.empty:
        raise KeyError(f"no runs for scenario {scenario!r}, rule {rule!r}, lr {lr}, lambda {lam}")
    if sel.group.duplicated().any():
        raise ValueError(f"several runs per seed for scenario {scenario!r}, rule {rule!r}")
    return sel.sort_values("group").acc.to_numpy()
