"""Scale-invariant weights under momentum: norm growth, effective step sizes, a 2-D toy.

For a scale-invariant weight w (loss(c w) = loss(w) for c > 0) the gradient g is orthogonal to w,
so a plain gradient step grows the norm only at second order:
||w - lr g||^2 = ||w||^2 + lr^2 ||g||^2. On the sphere the step turns w by about lr ||g|| / ||w||,
and ||g|| itself scales as 1 / ||w||, so the effective step size is lr / ||w||^2. A momentum
update is not orthogonal to w: its radial part grows ||w|| faster and shrinks the effective step
size early. This module measures that on training runs (`NormTracker`, `train_normalized`) and on
the toy of the paper's project page, minimising -cos(w, w*) over w in R^2 (`toy_run`).
"""

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from repsuite import training
from repsuite.optim.adamp import SGDP, AdamP
from repsuite.optim.models import bn_preceded_weights, build_model
from repsuite.progress import bar
from repsuite.stats import mean_ci

OPTIMIZER_KINDS = ("sgd", "sgdp", "adam", "adamw", "adamp")


def make_optimizer(kind: str, params, *, lr: float, momentum: float = 0.0, nesterov: bool = False,
                   weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                   delta: float = 0.1, wd_ratio: float = 0.1) -> torch.optim.Optimizer:
    """One optimizer by name, with hyperparameters shared by a baseline and its projected twin.

    'sgd' and 'adam' are torch's, with coupled L2 weight decay (the paper's baselines); 'adamw' is
    torch's AdamW; 'sgdp' and 'adamp' are ours. `momentum` and `nesterov` are read by the SGD
    family, `betas` by the Adam family, `delta` and `wd_ratio` by the projected ones.
    """
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov,
                               weight_decay=weight_decay)
    if kind == "sgdp":
        return SGDP(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                    delta=delta, wd_ratio=wd_ratio)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if kind == "adamp":
        return AdamP(params, lr=lr, betas=betas, weight_decay=weight_decay, delta=delta,
                     wd_ratio=wd_ratio, nesterov=nesterov)
    raise ValueError(f"optimizer kind must be one of {OPTIMIZER_KINDS}, got {kind!r}")


def effective_step_size(lr: float, norm) -> np.ndarray:
    """lr / ||w||^2, the step size a scale-invariant weight feels on the unit sphere."""
    norm = np.asarray(norm, dtype=float)
    if np.any(norm <= 0):
        raise ValueError("effective step size needs weight norms > 0 (an all-zero weight has none)")
    return lr / norm**2


class NormTracker:
    """Records the norm of each tracked weight, and the learning rate in effect, at each
    `record()`.

    The learning rate is read from the optimizer's first parameter group at the time of recording,
    so a record taken after an epoch's scheduler step pairs the weights with the rate of the next
    step.
    """

    def __init__(self, weights: list[tuple[str, torch.Tensor]], optimizer: torch.optim.Optimizer):
        if not weights:
            raise ValueError("NormTracker got no weights to track (is any layer followed by "
                             "BatchNorm?)")
        self.names = [name for name, _ in weights]
        self._weights = [w for _, w in weights]
        self._optimizer = optimizer
        self._norms: list[list[float]] = []
        self._lrs: list[float] = []

    @torch.no_grad()
    def record(self) -> None:
        self._norms.append([float(w.norm()) for w in self._weights])
        self._lrs.append(float(self._optimizer.param_groups[0]["lr"]))

    @property
    def norms(self) -> np.ndarray:
        """(records, weights) array of L2 norms."""
        return np.asarray(self._norms, dtype=float).reshape(len(self._norms), len(self.names))

    @property
    def lrs(self) -> np.ndarray:
        return np.asarray(self._lrs, dtype=float)

    def effective_steps(self) -> np.ndarray:
        """(records, weights) array of lr / ||w||^2."""
        return effective_step_size(1.0, self.norms) * self.lrs[:, None]

    def norm_ratio(self) -> float:
        """Mean over tracked weights of ||w_last|| / ||w_first||."""
        n = self.norms
        if len(n) < 2:
            raise ValueError("norm_ratio needs at least two records")
        return float(np.mean(n[-1] / n[0]))


@dataclass
class RunResult:
    """What one training run leaves behind, per epoch (index 0 is before training)."""

    train_loss: list[float]
    test_acc: list[float]
    norm_mean: list[float]
    eff_step_mean: list[float]
    norm_ratio: float
    eff_step_avg: float
    invariant_fraction: float
    extra: dict = field(default_factory=dict)

    @property
    def final_acc(self) -> float:
        return self.test_acc[-1]


def train_normalized(model: nn.Module, optimizer: torch.optim.Optimizer, Xtr: torch.Tensor,
                     ytr: torch.Tensor, Xte: torch.Tensor, yte: torch.Tensor, *, epochs: int,
                     batch_size: int, seed: int, cosine: bool = True) -> RunResult:
    """Train with minibatch cross-entropy and track the BN-preceded weights after every epoch.

    With `cosine` the learning rate follows a cosine schedule to 0 over `epochs`. `eff_step_avg` is
    the mean over epochs of the effective step size in force during the epoch (its learning rate
    over the squared norm at the epoch's start), averaged over the tracked weights: the value at
    the end of training is 0 under a cosine schedule and says nothing.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    tracker = NormTracker(bn_preceded_weights(model), optimizer)
    tracker.record()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs) if cosine else None
    accs = [training.evaluate(model, Xte, yte)[1]]

    def on_epoch(_epoch: int) -> None:
        tracker.record()
        accs.append(training.evaluate(model, Xte, yte)[1])

    losses = training.train(model, optimizer, Xtr, ytr, epochs=epochs, batch_size=batch_size,
                            seed=seed, scheduler=scheduler, on_epoch=on_epoch)
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(f"training diverged (non-finite loss); losses: {losses}")

    eff = tracker.effective_steps()
    return RunResult(
        train_loss=[float("nan")] + [float(x) for x in losses],
        test_acc=[float(a) for a in accs],
        norm_mean=tracker.norms.mean(axis=1).tolist(),
        eff_step_mean=eff.mean(axis=1).tolist(),
        norm_ratio=tracker.norm_ratio(),
        # Records 0..epochs-1 hold each epoch's rate and starting norm; the last is after training.
        eff_step_avg=float(eff[:-1].mean()),
        invariant_fraction=invariant_fraction(model, optimizer),
    )


def compare_optimizers(configs: dict[str, dict], X: np.ndarray, y: np.ndarray, *, seeds,
                       model: str = "mlp", hidden: tuple[int, ...] = (256, 256),
                       channels: tuple[int, ...] = (16, 32), epochs: int, batch_size: int,
                       test_size: float = 0.2, device="cpu",
                       progress: bool = True) -> dict[str, list[RunResult]]:
    """Train one normalized network per (config, seed) and return the runs per config label.

    `configs` maps a label to `make_optimizer` keywords plus `kind`. Within a seed every config
    starts from the same weights and sees the same split and batch order, so differences between
    configs are paired by seed. Pixels are scaled to [0, 1].
    """
    if not configs:
        raise ValueError("compare_optimizers needs at least one optimizer config")
    for label, cfg in configs.items():
        if cfg.get("kind") not in OPTIMIZER_KINDS:
            raise ValueError(f"config {label!r}: 'kind' must be one of {OPTIMIZER_KINDS}, "
                             f"got {cfg.get('kind')!r}")
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X must be (samples, features) with one label each; got X {X.shape}, "
                         f"y {y.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError("X contains NaN or infinite values")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("compare_optimizers needs at least one seed")

    runs: dict[str, list[RunResult]] = {label: [] for label in configs}
    jobs = [(seed, label) for seed in seeds for label in configs]
    split_seed, split = None, None
    for seed, label in bar(jobs, enabled=progress, desc="runs"):
        if seed != split_seed:
            split_seed = seed
            split = training.split_tensors(X, y, test_size=test_size, seed=seed, device=device,
                                           scale=255.0)
        Xtr, Xte, ytr, yte = split
        torch.manual_seed(seed)
        net = build_model(model, hidden=hidden, channels=channels,
                          n_classes=int(y.max()) + 1).to(device)
        kw = {k: v for k, v in configs[label].items() if k != "kind"}
        opt = make_optimizer(configs[label]["kind"], net.parameters(), **kw)
        runs[label].append(train_normalized(net, opt, Xtr, ytr, Xte, yte, epochs=epochs,
                                            batch_size=batch_size, seed=seed))
    return runs


def per_seed(runs: dict[str, list[RunResult]], label: str, field: str) -> np.ndarray:
    """One number per seed: a `RunResult` field (final_acc, norm_ratio, ...) of config `label`."""
    if label not in runs:
        raise KeyError(f"no runs for {label!r}; configs: {list(runs)}")
    return np.asarray([getattr(r, field) for r in runs[label]], dtype=float)


def mean_curves(runs: dict[str, list[RunResult]]) -> dict[str, dict[str, np.ndarray]]:
    """Per config, the per-epoch mean over seeds of norm_mean, eff_step_mean and test_acc."""
    return {label: {key: np.mean([getattr(r, key) for r in rs], axis=0)
                    for key in ("norm_mean", "eff_step_mean", "test_acc")}
            for label, rs in runs.items()}


def summary_table(runs: dict[str, list[RunResult]]) -> pd.DataFrame:
    """Per config: mean and 95% interval over seeds of test accuracy (%), norm ratio and the
    effective step size averaged over training, and the share of weights judged scale invariant."""
    rows = {}
    for label in runs:
        row = {}
        for key, name, scale in [("final_acc", "test acc %", 100.0),
                                   ("norm_ratio", "||w_T||/||w_0||", 1.0),
                                   ("eff_step_avg", "mean lr/||w||^2", 1.0)]:
            ci = mean_ci(per_seed(runs, label, key) * scale)
            row[name] = ci["mean"]
            row[f"{name} 95% CI"] = "[{:.4g}, {:.4g}]".format(*ci["ci95"])
        row["judged invariant"] = float(np.mean(per_seed(runs, label, "invariant_fraction")))
        rows[label] = row
    return pd.DataFrame(rows).T


def invariant_fraction(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """Share of multi-dimensional weights (by count of entries) that the last projected step judged
    scale invariant; NaN for optimizers without the test."""
    total = judged = 0
    for p in model.parameters():
        if p.dim() < 2:
            continue
        total += p.numel()
        view = optimizer.state.get(p, {}).get("scale_invariant_view")
        if view is None:
            return float("nan")
        judged += p.numel() if view else 0
    return judged / total if total else float("nan")


@torch.no_grad()
def scale_invariance_gap(model: nn.Module, X: torch.Tensor, weight_name: str,
                         factor: float = 3.0) -> float:
    """Largest change of the train-mode logits on `X` when the weight `weight_name` is scaled by
    `factor`; about 0 for a weight that feeds a BatchNorm layer. Works on a copy of `model`."""
    if factor <= 0:
        raise ValueError(f"factor must be > 0 (scale invariance is for positive scalings), "
                         f"got {factor}")
    if len(X) < 2:
        raise ValueError("train-mode BatchNorm needs a batch of at least 2 samples")
    names = dict(model.named_parameters())
    if weight_name not in names:
        raise KeyError(f"no parameter {weight_name!r}; parameters: {sorted(names)}")
    scaled = copy.deepcopy(model).train()
    reference = copy.deepcopy(model).train()
    dict(scaled.named_parameters())[weight_name].mul_(factor)
    return float((scaled(X) - reference(X)).abs().max())


# --- The toy of the paper's project page: maximise the cosine similarity to w* in R^2 ---

def cosine_loss(W: torch.Tensor, w_star: torch.Tensor) -> torch.Tensor:
    """-cos(w, w*) for each row w of `W`: scale invariant in w, minimal on the ray through w*."""
    w_star = w_star.reshape(1, -1)
    return -(W @ w_star.T).squeeze(1) / (W.norm(dim=1) * w_star.norm())


@dataclass
class ToyTrajectory:
    """Iterates of several independent starts, run side by side (one row of the parameter each)."""

    w: np.ndarray        # (steps + 1, starts, 2)
    norm: np.ndarray     # (steps + 1, starts): ||w_t||
    loss: np.ndarray     # (steps + 1, starts): -cos(w_t, w*)

    def steps_to(self, tau: float) -> np.ndarray:
        """Per start, the first step at which 1 - cos(w_t, w*) < `tau`; steps + 1 if never."""
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        hit = 1 + self.loss < tau
        return np.where(hit.any(axis=0), hit.argmax(axis=0), len(self.loss))


def toy_run(kind: str, W0, w_star, *, lr: float, momentum: float = 0.0, steps: int = 300,
            nesterov: bool = False) -> ToyTrajectory:
    """Full-batch GD on -cos(w, w*) with 'sgd' (torch) or 'sgdp' (ours), in float64.

    Each row of `W0` (shape (starts, d), or one start of shape (d,)) is an independent run: the
    loss is the sum over rows, so each row receives its own gradient, and SGDP's channel view (one
    row per output channel) tests and projects every row on its own, exactly as separate runs
    would. A single start is still a 1 x d matrix, since the projection only acts on tensors with
    more than one dimension.
    """
    if kind not in ("sgd", "sgdp"):
        raise ValueError(f"the toy compares 'sgd' and 'sgdp', got {kind!r}")
    W0 = torch.as_tensor(np.asarray(W0, dtype=float))
    W0 = W0.reshape(1, -1) if W0.dim() == 1 else W0
    w_star = torch.as_tensor(np.asarray(w_star, dtype=float)).reshape(-1)
    if W0.dim() != 2 or W0.shape[1] != w_star.numel():
        raise ValueError(f"W0 must be (starts, {w_star.numel()}) to match w*, "
                         f"got {tuple(W0.shape)}")
    if not torch.all(W0.norm(dim=1) > 0) or float(w_star.norm()) == 0:
        raise ValueError("every start and w* must be non-zero (the cosine is undefined at 0)")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")

    W = W0.clone().requires_grad_(True)
    opt = make_optimizer(kind, [W], lr=lr, momentum=momentum, nesterov=nesterov)
    iterates = [W.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        cosine_loss(W, w_star).sum().backward()
        opt.step()
        iterates.append(W.detach().clone())
    traj = torch.stack(iterates)
    with torch.no_grad():
        losses = torch.stack([cosine_loss(w, w_star) for w in traj])
    return ToyTrajectory(w=traj.numpy(), norm=traj.norm(dim=2).numpy(), loss=losses.numpy())


def toy_starts(n: int, seed: int,
               max_angle: float = math.pi * 0.9) -> tuple[np.ndarray, np.ndarray]:
    """`n` unit-norm starts at angles drawn uniformly in [-max_angle, max_angle] from w* = (1, 0).

    Angles near pi are left out: the antipode of w* is a stationary point where every method stalls.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < max_angle < math.pi:
        raise ValueError(f"max_angle must be in (0, pi), got {max_angle}")
    angles = np.random.default_rng(seed).uniform(-max_angle, max_angle, size=n)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1), np.array([1.0, 0.0])


def calibrate_toy_lr(target_norm: float, W0, w_star, *, momentum: float, steps: int,
                     lo: float = 1e-4, hi: float = 1.0, rtol: float = 1e-3) -> float:
    """The learning rate at which momentum SGD ends the toy with median norm `target_norm`.

    The project page reports the norm reached (1 -> 2.93 at momentum 0.9) but not the learning rate;
    the final norm grows with the learning rate, so a bisection on log(lr) recovers a matching one.
    """
    if target_norm <= 1:
        raise ValueError(f"target_norm must be > 1 (starts have norm 1), got {target_norm}")

    def median_norm(lr: float) -> float:
        return float(np.median(toy_run("sgd", W0, w_star, lr=lr, momentum=momentum,
                                       steps=steps).norm[-1]))

    if not median_norm(lo) < target_norm < median_norm(hi):
        raise ValueError(f"no learning rate in [{lo}, {hi}] reaches median norm {target_norm}")
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if median_norm(mid) < target_norm else (lo, mid)
        if hi / lo - 1 < rtol:
            break
    return math.sqrt(lo * hi)
