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
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

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
