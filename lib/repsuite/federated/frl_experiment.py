"""FRL's experiment: model poisoning of the float-update baselines and one experiment (data split,
clients, schedule) of one method under one attack.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn

from repsuite.federated import attacks, partition
from repsuite.federated.aggregators import coordinate_median, fedavg, trimmed_mean
from repsuite.federated.clients import Clients
from repsuite.federated.frl import (
    DenseMLP,
    communication_bits,
    run_frl,
    sample_rounds,
)
from repsuite.federated.server import History, run

# Model poisoning of the float-update baselines


def agr_tailored(benign: torch.Tensor, n_malicious: int, aggregate: Callable, *,
                 deviation: str = "std", lambda_init: float = 5.0, tol: float = 1e-5
                 ) -> torch.Tensor:
    """The malicious update of the AGR-tailored attack (Shejwalkar and Houmansadr, NDSS 2021),
    as the FRL authors run it against Trimmed-mean and Multi-Krum.

    The update is mean - lambda * p, with p the coordinate-wise std of the known benign updates
    (`deviation="std"`), their sign (`"sign"`) or their unit mean (`"unit"`). lambda is searched
    to maximise || aggregate(n_malicious copies + benign) - mean ||: start at `lambda_init`, move
    up after an improvement and down otherwise, halving the move each time, until it is below
    `tol`; the best lambda seen wins. `aggregate` maps (n, P) updates to (P,).
    """
    benign = torch.as_tensor(benign)
    if benign.dim() != 2 or len(benign) < 2:
        raise ValueError(f"benign must be (k >= 2 updates, P), got shape {tuple(benign.shape)}")
    if not bool(torch.isfinite(benign).all()):
        raise ValueError("benign updates contain NaN or infinite values")
    if not isinstance(n_malicious, int | np.integer) or n_malicious < 1:
        raise ValueError(f"n_malicious must be an int >= 1, got {n_malicious!r}")
    if not lambda_init > 0 or not tol > 0:
        raise ValueError(f"lambda_init and tol must be > 0, got {lambda_init} and {tol}")
    mean = benign.mean(0)
    if deviation == "std":
        p = benign.std(0)
    elif deviation == "sign":
        p = mean.sign()
    elif deviation == "unit":
        p = mean / mean.norm().clamp(min=1e-12)
    else:
        raise ValueError(f"deviation must be one of std, sign, unit; got {deviation!r}")

    def damage(lam: float) -> float:
        crafted = (mean - lam * p).expand(int(n_malicious), -1)
        return float((aggregate(torch.cat([crafted, benign])) - mean).norm())

    lam, move = float(lambda_init), float(lambda_init) / 2
    best_lam, best = 0.0, damage(0.0)
    previous = best
    while move > tol:
        now = damage(lam)
        if now > best:
            best_lam, best = lam, now
        lam = lam + move if now > previous else max(lam - move, 0.0)
        previous = now
        move /= 2
    return mean - best_lam * p


BASELINES = ("fedavg", "trmean", "median")
BASELINE_ATTACKS = ("none", "tailored")


def baseline_rule(name: str, malicious: Sequence[int] = (), attack: str = "none", *,
                  lambda_init: float = 5.0, tol: float = 1e-5) -> Callable:
    """The server rule of a float-update baseline, in the simulator's signature, with the
    round's malicious participants replaced by the AGR-tailored update against that rule.

    `fedavg`: the plain mean (the authors' FedAvg ignores client sizes); `trmean`: the
    coordinate-wise trimmed mean dropping, at each end, as many values as there are malicious
    clients in the round (the authors' server knows that count, which favours it); `median`:
    the coordinate-wise median. Against the mean the attack's damage has no maximum, so its
    lambda search ends at its cap, about 2 * lambda_init.
    """
    if name not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {name!r}")
    if attack not in BASELINE_ATTACKS:
        raise ValueError(f"baseline attack must be one of {BASELINE_ATTACKS}, got {attack!r}")
    bad_ids = np.asarray(sorted(set(int(c) for c in malicious)), dtype=int)

    def rule(deltas: torch.Tensor, n_bad: int) -> torch.Tensor:
        if name == "fedavg":
            return fedavg(deltas)
        if name == "trmean":
            return trimmed_mean(deltas, n_trim=n_bad)
        return coordinate_median(deltas)

    def aggregate(deltas, weights, round, info):
        rows = attacks.byzantine_rows(info["participants"], bad_ids) if attack != "none" else []
        n_bad = len(rows)
        if n_bad:
            benign = np.ones(len(deltas), dtype=bool)
            benign[rows] = False
            crafted = agr_tailored(deltas[torch.as_tensor(benign)], n_bad,
                                   lambda d: rule(d, n_bad), lambda_init=lambda_init, tol=tol)
            deltas = deltas.clone()
            deltas[torch.as_tensor(rows)] = crafted
        return rule(deltas, n_bad)

    aggregate.__name__ = f"{name}_{attack}"
    return aggregate


def run_baseline(name: str, sizes: Sequence[int], clients: Clients, *, participation: np.ndarray,
                 eval_data, malicious: Sequence[int] = (), attack: str = "none",
                 local_steps: int, lr: float, batch_size: int, momentum: float = 0.9,
                 weight_decay: float = 1e-4, seed: int, eval_every: int = 1,
                 lambda_init: float = 5.0, attack_tol: float = 1e-5,
                 progress: bool = False) -> History:
    """A float-update baseline on the simulator's server loop: the dense bias-free MLP, its
    weights initialised from `seed` (PyTorch's default Linear init), trained by local SGD."""
    model = DenseMLP(sizes).to(clients.device)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                weight = torch.empty(layer.weight.shape)
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=g)
                layer.weight.copy_(weight)
    participation = np.asarray(participation, dtype=bool)
    return run(model, clients, rounds=len(participation), participation=participation,
               local_steps=local_steps, lr=lr, batch_size=batch_size, seed=seed,
               aggregate=baseline_rule(name, malicious, attack, lambda_init=lambda_init,
                                       tol=attack_tol),
               eval_every=eval_every,
               eval_data=eval_data, momentum=momentum, weight_decay=weight_decay,
               weights="uniform", progress=progress)


def final_accuracy(acc: Sequence[float], tail: int) -> float:
    """Mean of the last `tail` evaluated accuracies: one round's accuracy is noisy."""
    acc = list(acc)
    if not isinstance(tail, int) or tail < 1 or tail > len(acc):
        raise ValueError(f"tail must be an int in [1, {len(acc)}] (evaluations made), got {tail!r}")
    return float(np.mean(acc[-tail:]))


# One experiment: data split, clients, schedule; one method under one attack


@dataclass
class Problem:
    """One seed's federated problem: train / validation / test tensors, the clients' padded
    data, who takes part in each round and which clients are malicious."""

    seed: int
    clients: Clients
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    participation: np.ndarray
    malicious: np.ndarray
    n_features: int
    n_classes: int


def make_problem(X: np.ndarray, y: np.ndarray, *, n_clients: int, alpha: float, per_round: int,
                 rounds: int, mal_frac: float, seed: int, device, pool: int = 1,
                 test_size: float = 0.2, val_size: float = 0.1) -> Problem:
    """Split (stratified, by `seed`) into train / validation / test, spread the training rows
    over `n_clients` with Dirichlet(`alpha`) label skew, and draw the rounds with the authors'
    rule: malicious clients are the lowest ids, int(mal_frac * n_clients) of them, and fewer
    than half of any round.

    Pixels are scaled to [0, 1] (by their maximum, 255 for MNIST and 16 for sklearn digits);
    `pool` > 1 average-pools square images by that factor (28x28 -> 14x14 for pool=2).
    """
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X must be (n, d) with one label per row; got X {X.shape}, y {y.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError("X contains NaN or infinite values")
    if not 0 <= mal_frac < 0.5:
        raise ValueError(f"mal_frac must be in [0, 0.5), got {mal_frac}")
    if not (0 < test_size < 1 and 0 < val_size < 1 and test_size + val_size < 1):
        raise ValueError(f"need test_size, val_size in (0, 1) with a sum below 1; got "
                         f"{test_size} and {val_size}")
    X = X / max(float(X.max()), 1e-12)
    if pool > 1:
        side = math.isqrt(X.shape[1])
        if side * side != X.shape[1] or side % pool:
            raise ValueError(f"pool={pool} needs square images whose side it divides; rows "
                             f"have {X.shape[1]} pixels")
        images = torch.from_numpy(X).view(-1, 1, side, side)
        X = nn.functional.avg_pool2d(images, pool).flatten(1).numpy()
    X_rest, X_test, y_rest, y_test = train_test_split(X, y, test_size=test_size,
                                                      random_state=seed, stratify=y)
    X_train, X_val, y_train, y_val = train_test_split(
        X_rest, y_rest, test_size=val_size / (1 - test_size), random_state=seed, stratify=y_rest)
    parts = partition.dirichlet(y_train, n_clients, alpha, seed=seed, min_size=2)
    clients = Clients.from_partition(X_train, y_train, parts, device)
    n_malicious = int(mal_frac * n_clients)

    def t(a, dtype):
        return torch.as_tensor(a, dtype=dtype, device=device)

    return Problem(seed=seed, clients=clients, X_val=t(X_val, torch.float32),
                   y_val=t(y_val, torch.long), X_test=t(X_test, torch.float32),
                   y_test=t(y_test, torch.long),
                   participation=sample_rounds(n_clients, per_round, rounds, n_malicious, seed),
                   malicious=np.arange(n_malicious), n_features=X.shape[1],
                   n_classes=int(np.max(y)) + 1)


METHODS = ("frl",) + BASELINES


def run_method(problem: Problem, method: str, attack: str, *, hidden: Sequence[int], lr: float,
               local_steps: int, batch_size: int, density: float, momentum: float,
               weight_decay: float, tail: int, on: str = "test", lambda_init: float = 5.0,
               attack_tol: float = 1e-5, progress: bool = False) -> dict:
    """Train one method under one attack on `problem`; the accuracy curve is on the test split
    (`on="test"`) or the validation split (`on="val"`). Returns one row of results: method,
    attack, seed, lr, final_acc (mean of the last `tail` rounds), best_acc, acc_curve,
    upload / download bits per client per round, mean vote diagnostic (FRL only)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if on not in ("test", "val"):
        raise ValueError(f"on must be 'test' or 'val', got {on!r}")
    sizes = [problem.n_features, *hidden, problem.n_classes]
    eval_data = (problem.X_test, problem.y_test) if on == "test" else (problem.X_val,
                                                                      problem.y_val)
    common = dict(participation=problem.participation, eval_data=eval_data,
                  malicious=problem.malicious, attack=attack, local_steps=local_steps, lr=lr,
                  batch_size=batch_size, momentum=momentum, weight_decay=weight_decay,
                  seed=problem.seed, progress=progress)
    bits = communication_bits(sizes)
    if method == "frl":
        hist = run_frl(sizes, problem.clients, density=density, **common)
        curve, kept = hist.acc, float(np.nanmean(hist.kept))
        up, down = bits["frl_upload"], bits["frl_download"]
    else:
        hist = run_baseline(method, sizes, problem.clients, lambda_init=lambda_init,
                            attack_tol=attack_tol, **common)
        curve, kept = hist.test_acc[1:], float("nan")  # entry 0 is the untrained model
        up, down = bits["fedavg_upload"], bits["fedavg_download"]
    return {"method": method, "attack": attack, "seed": problem.seed, "lr": lr,
            "final_acc": final_accuracy(curve, tail), "best_acc": float(max(curve)),
            "acc_curve": [float(a) for a in curve], "upload_bits": up, "download_bits": down,
            "kept": kept}
