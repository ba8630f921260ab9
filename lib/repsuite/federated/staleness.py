"""Converting stale client updates into fresh ones by gradient inversion (Wang and Gao, "Tackling
the Unlimited Staleness in Federated Learning with Intertwined Data and Device Heterogeneities",
arXiv 2309.13536).

When the slow devices are exactly the ones that hold some of the data (intertwined data and device
heterogeneity), their updates reach the server computed on a global model that is many rounds old.
Down-weighting or dropping such an update throws away the only information about those data, and a
first-order (Taylor) correction is only good for small staleness. The paper's server instead

1. inverts the stale update: it optimises a small synthetic dataset D_rec (inputs and soft labels)
   so that the client's own local training, run from the *stale* global model theta_{t-tau} on
   D_rec, reproduces the uploaded update (the distance is L1 over the update's entries, optionally
   only its largest-magnitude entries: sparsification);
2. runs the same local training from the *current* global model theta_t on D_rec and aggregates
   that estimate of the fresh update in place of the stale one.

D_rec is warm-started from the client's previous reconstruction when its data do not change. The
client computes and sends nothing extra. Every parameter vector here is flat, in the order of
`model.named_parameters()`; inversions of several clients run at once with `torch.func.vmap`.

Baselines of the paper's comparison are here too: staleness-weighted aggregation and first-order
(DC-ASGD-style) delay compensation.
"""

import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from repsuite.federated.clients import Clients, params_of, unflatten
from repsuite.federated.partition import pathological
from repsuite.federated.server import client_deltas
from repsuite.progress import bar
from repsuite.training import split_tensors

COSTS = ("l1", "l2", "cosine")
WEIGHTINGS = ("exp", "poly")


# -- flat parameter vectors ------------------------------------------------------------------------


class ParamLayout:
    """Where each named parameter of `model` sits in a flat vector, and the way back to a dict."""

    def __init__(self, model: nn.Module):
        named = list(model.named_parameters())
        if not named:
            raise ValueError("the model has no parameters to update")
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.n_params = sum(self.sizes)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.reshape(s) for n, t, s in zip(self.names, theta.split(self.sizes), self.shapes,
                                                    strict=True)}

    def flatten(self, model: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _as_batch(name: str, value: torch.Tensor, n_params: int) -> torch.Tensor:
    """A (k, P) view of one flat vector or of k stacked ones, or a clear error."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(value).__name__}")
    if value.dim() == 1:
        value = value.unsqueeze(0)
    if value.dim() != 2 or value.shape[1] != n_params:
        raise ValueError(f"{name} must have shape (P,) or (k, P) with P = {n_params} model "
                         f"parameters, got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return value


def _positive(name: str, value, integer: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if integer:
        ok = ok and isinstance(value, int)
    if not ok or value <= 0:
        kind = "a positive integer" if integer else "a finite number > 0"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


# -- baselines -------------------------------------------------------------------------------------


def staleness_weight(staleness, kind: str = "exp", a: float = 20.0) -> np.ndarray:
    """The factor on a stale update in staleness-weighted aggregation.

    `exp`: 2 ** (-staleness / a), the form of the paper's code (a = 20 rounds halves the weight);
    `poly`: (1 + staleness) ** (-a), FedAsync's polynomial weighting. Staleness 0 gives weight 1.
    """
    s = np.asarray(staleness, dtype=float)
    if kind not in WEIGHTINGS:
        raise ValueError(f"staleness weighting must be one of {WEIGHTINGS}, got {kind!r}")
    _positive("the weighting's constant a", a)
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError(f"staleness must be finite and >= 0 rounds, got {s.tolist()}")
    return np.exp2(-s / a) if kind == "exp" else (1.0 + s) ** (-a)


def first_order_compensation(delta_stale: torch.Tensor, theta_now: torch.Tensor,
                             theta_stale: torch.Tensor, lam: float) -> torch.Tensor:
    """DC-ASGD-style delay compensation: delta - lam * delta*delta*(theta_t - theta_{t-tau}).

    In gradient terms DC-ASGD corrects g(theta_t) ~ g(theta_{t-tau}) + lam_g * g*g*(theta_t -
    theta_{t-tau}) (the diagonal outer-product approximation of the Hessian). For an update
    delta = -eta * g the corrected update is delta - (lam_g / eta) * delta*delta*(theta_t -
    theta_{t-tau}); `lam` here is that lam_g / eta, the form used by the paper's code.
    """
    if not isinstance(lam, int | float) or isinstance(lam, bool) or not math.isfinite(lam) \
            or lam < 0:
        raise ValueError(f"the compensation strength lam must be a finite number >= 0, got {lam!r}")
    shapes = {tuple(t.shape) for t in (delta_stale, theta_now, theta_stale)}
    if len(shapes) != 1:
        raise ValueError("delta_stale, theta_now and theta_stale must have one shape, got "
                         f"{[tuple(t.shape) for t in (delta_stale, theta_now, theta_stale)]}")
    for name, t in (("delta_stale", delta_stale), ("theta_now", theta_now),
                    ("theta_stale", theta_stale)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    return delta_stale - lam * delta_stale * delta_stale * (theta_now - theta_stale)


# -- the client's local training, simulated on D_rec -----------------------------------------------


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against probability targets (one-hot targets give the usual loss)."""
    return -(targets * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def _local_update_fn(model: nn.Module, layout: ParamLayout, steps: int, lr: float):
    """theta (P,), X (n, ...), T (n, C) -> the update after `steps` full-batch GD steps."""

    def loss(theta, X, T):
        return _soft_cross_entropy(functional_call(model, layout.unflatten(theta), (X,)), T)

    loss_grad = grad(loss)

    def update(theta0, X, T):
        theta = theta0
        for _ in range(steps):
            theta = theta - lr * loss_grad(theta, X, T)
        return theta - theta0

    return update


def simulate_update(model: nn.Module, theta: torch.Tensor, X: torch.Tensor, T: torch.Tensor, *,
                    steps: int, lr: float) -> torch.Tensor:
    """The update of `steps` full-batch gradient steps (rate `lr`, mean cross-entropy against the
    probability targets `T`) started at the flat parameters `theta`.

    Batched when `theta` is (k, P), `X` (k, n, ...) and `T` (k, n, C): one update per client.
    Differentiable with respect to `X` and `T`, which is what the inversion needs. This is the
    client's local training when the client uses full-batch steps (as the simulator's clients do).
    """
    _positive("steps", steps, integer=True)
    _positive("lr", lr)
    layout = ParamLayout(model)
    batched = theta.dim() == 2
    thetas = _as_batch("theta", theta, layout.n_params)
    Xb, Tb = (X, T) if batched else (X.unsqueeze(0), T.unsqueeze(0))
    k = thetas.shape[0]
    if Xb.shape[0] != k or Tb.shape[0] != k or Xb.shape[1] != Tb.shape[1] or Tb.dim() != 3:
        raise ValueError(f"for {k} parameter vector(s), X must be (k, n, ...) and T (k, n, C) with "
                         f"the same n, got X {tuple(X.shape)} and T {tuple(T.shape)}")
    if Xb.shape[1] < 1:
        raise ValueError("the dataset to train on is empty")
    fn = vmap(_local_update_fn(model, layout, steps, lr))
    out = fn(thetas, Xb, Tb)
    return out if batched else out[0]


# -- gradient inversion of a stale update ----------------------------------------------------------


@dataclass(frozen=True)
class GIConfig:
    """How the server inverts a stale update (defaults: our scale; the paper's code in comments)."""

    n_rec: int = 20  # size of D_rec (the paper's code: 128-256 images)
    iterations: int = 300  # Adam iterations from a fresh start (the paper's code: 10,000-40,000)
    warm_iterations: int = 100  # when D_rec is warm-started from the previous round
    lr: float = 0.1  # Adam step on D_rec (the paper's code: 1, on normalised images)
    cost: str = "l1"  # distance between simulated and uploaded update (the paper's code: L1)
    keep_frac: float = 1.0  # sparsification: match only this fraction of largest-|delta| entries
    signed: bool = True  # Adam on the sign of the input gradient, as the paper's code does
    lr_decay: bool = True  # x0.1 at 3/8, 5/8 and 7/8 of the iterations, as the paper's code does
    box: tuple[float, float] | None = (0.0, 1.0)  # the input domain D_rec is kept in

    def __post_init__(self):
        _positive("n_rec", self.n_rec, integer=True)
        _positive("iterations", self.iterations, integer=True)
        _positive("warm_iterations", self.warm_iterations, integer=True)
        _positive("lr", self.lr)
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {self.cost!r}")
        if not 0 < self.keep_frac <= 1:
            raise ValueError(f"keep_frac must be in (0, 1], got {self.keep_frac!r}")
        if self.box is not None and not self.box[0] < self.box[1]:
            raise ValueError(f"box must be (low, high) with low < high, got {self.box!r}")


@dataclass
class Reconstruction:
    """D_rec of k clients, and how well it reproduces each client's uploaded update."""

    X: torch.Tensor  # (k, n_rec, *input_shape)
    label_logits: torch.Tensor  # (k, n_rec, n_classes); the soft labels are their softmax
    residual: torch.Tensor  # (k,) ||simulated - uploaded||_1 / ||uploaded||_1 over all entries

    @property
    def targets(self) -> torch.Tensor:
        return self.label_logits.softmax(dim=-1)

    def select(self, rows) -> "Reconstruction":
        return Reconstruction(self.X[rows], self.label_logits[rows], self.residual[rows])


def _cost(sim: torch.Tensor, obs: torch.Tensor, mask: torch.Tensor | None, kind: str):
    """Per-client distance (k,) between simulated and uploaded updates over the matched entries."""
    if mask is not None:
        sim, obs = sim * mask, obs * mask
    if kind == "l1":
        return (sim - obs).abs().sum(dim=1)
    if kind == "l2":
        return (sim - obs).pow(2).sum(dim=1)
    return 1 - nn.functional.cosine_similarity(sim, obs, dim=1, eps=1e-12)


def _top_mask(delta: torch.Tensor, keep_frac: float) -> torch.Tensor | None:
    """1 on the `keep_frac` largest-magnitude entries of each row, 0 elsewhere (None: keep all)."""
    if keep_frac >= 1:
        return None
    k = max(1, int(round(keep_frac * delta.shape[1])))
    idx = delta.abs().topk(k, dim=1).indices
    return torch.zeros_like(delta).scatter_(1, idx, 1.0)


def relative_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a - b||_1 / ||b||_1 per row (the error measure of the paper's code)."""
    a, b = torch.atleast_2d(a), torch.atleast_2d(b)
    return (a - b).abs().sum(dim=1) / b.abs().sum(dim=1).clamp_min(1e-30)


def invert_update(model: nn.Module, theta_stale: torch.Tensor, delta_stale: torch.Tensor, *,
                  steps: int, lr: float, n_classes: int, input_shape: tuple[int, ...],
                  config: GIConfig = GIConfig(), generator: torch.Generator | None = None,
                  init: Reconstruction | None = None,
                  iterations: int | None = None) -> Reconstruction:
    """D_rec for each of k clients such that the client's local training (`steps` full-batch
    steps at rate `lr`) from `theta_stale` on D_rec reproduces the uploaded `delta_stale`.

    `theta_stale` and `delta_stale` are (P,) or (k, P). Inputs start uniform in `config.box` and
    label logits standard normal, both drawn from `generator` on the CPU (so a seed gives the same
    start on every device); with `init` (the previous reconstruction of the same clients) the
    search starts there and runs `config.warm_iterations` instead of `config.iterations`
    (`iterations`, when given, overrides both).
    """
    layout = ParamLayout(model)
    thetas = _as_batch("theta_stale", theta_stale, layout.n_params).detach()
    deltas = _as_batch("delta_stale", delta_stale, layout.n_params).detach()
    if thetas.shape != deltas.shape:
        raise ValueError(f"theta_stale {tuple(thetas.shape)} and delta_stale "
                         f"{tuple(deltas.shape)} must describe the same clients")
    _positive("n_classes", n_classes, integer=True)
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    _positive("steps", steps, integer=True)
    _positive("lr", lr)
    k, device, dtype = thetas.shape[0], thetas.device, thetas.dtype
    shape = (k, config.n_rec, *input_shape)

    if init is None:
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        lo, hi = config.box if config.box is not None else (0.0, 1.0)
        X = (lo + (hi - lo) * torch.rand(shape, generator=g, dtype=dtype)).to(device)
        L = torch.randn((k, config.n_rec, n_classes), generator=g, dtype=dtype).to(device)
    else:
        if tuple(init.X.shape) != shape or tuple(init.label_logits.shape) != (k, config.n_rec,
                                                                              n_classes):
            raise ValueError(f"the warm start holds D_rec of shape {tuple(init.X.shape)} and "
                             f"labels {tuple(init.label_logits.shape)}; expected {shape} and "
                             f"{(k, config.n_rec, n_classes)}")
        X, L = init.X.detach().clone(), init.label_logits.detach().clone()
    if iterations is not None:
        _positive("iterations", iterations, integer=True)
    iterations = iterations if iterations is not None else (
        config.iterations if init is None else config.warm_iterations)
    X.requires_grad_(True)
    L.requires_grad_(True)

    update = vmap(_local_update_fn(model, layout, steps, lr))
    mask = _top_mask(deltas, config.keep_frac)
    opt = torch.optim.Adam([X, L], lr=config.lr)
    sched = None
    if config.lr_decay:
        milestones = sorted({int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)} - {0})
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)

    for _ in range(iterations):
        opt.zero_grad(set_to_none=True)
        # Clients are independent, so the sum of their costs gives each D_rec its own gradient.
        cost = _cost(update(thetas, X, L.softmax(dim=-1)), deltas, mask, config.cost).sum()
        cost.backward()
        if config.signed:
            X.grad.sign_()
        opt.step()
        if sched is not None:
            sched.step()
        if config.box is not None:
            with torch.no_grad():
                X.clamp_(*config.box)

    with torch.no_grad():
        residual = relative_l1(update(thetas, X, L.softmax(dim=-1)), deltas)
    return Reconstruction(X.detach(), L.detach(), residual)


def convert_stale_update(model: nn.Module, theta_now: torch.Tensor, theta_stale: torch.Tensor,
                         delta_stale: torch.Tensor, *, steps: int, lr: float, n_classes: int,
                         input_shape: tuple[int, ...], config: GIConfig = GIConfig(),
                         generator: torch.Generator | None = None,
                         init: Reconstruction | None = None, iterations: int | None = None):
    """The paper's conversion: invert the stale update into D_rec, then train from `theta_now`.

    Returns `(fresh, rec)`: the estimated fresh updates, (k, P) (or (P,) for one client), and the
    reconstruction (to warm-start the next conversion of the same clients).
    """
    single = delta_stale.dim() == 1
    layout = ParamLayout(model)
    now = _as_batch("theta_now", theta_now, layout.n_params).detach()
    stale = _as_batch("theta_stale", theta_stale, layout.n_params)
    if now.shape != stale.shape:
        raise ValueError(f"theta_now {tuple(now.shape)} and theta_stale {tuple(stale.shape)} must "
                         "describe the same clients")
    rec = invert_update(model, stale, delta_stale, steps=steps, lr=lr, n_classes=n_classes,
                        input_shape=input_shape, config=config, generator=generator, init=init,
                        iterations=iterations)
    with torch.no_grad():
        fresh = simulate_update(model, now, rec.X, rec.targets, steps=steps, lr=lr)
    return (fresh[0] if single else fresh), rec


# -- federated training with slow clients ----------------------------------------------------------

METHODS = ("fresh", "stale", "weighted", "drop", "dc", "gi")
# fresh: no delay at all (the oracle); stale: the stale update as it is; weighted: scaled by
# `staleness_weight`; drop: left out of the aggregate; dc: first-order compensation; gi: the paper.


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
              input_shape: tuple[int, ...], gi: GIConfig = GIConfig(), seed: int = 0,
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
