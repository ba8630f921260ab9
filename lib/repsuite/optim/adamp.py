"""AdamP and SGDP (Heo et al., ICLR 2021): momentum optimizers that leave the norm of
scale-invariant weights alone.

A weight followed by a normalization layer is scale invariant: the loss does not change when the
weight is multiplied by a positive constant, so its gradient is orthogonal to it. The momentum
update is not (it carries older gradients), and its radial part only inflates the weight norm,
which shrinks the effective step size lr / ||w||^2. At every step, for each tensor with more than
one dimension, both optimizers here

1. test whether the tensor looks scale invariant: the cosine between weight and current gradient,
   per output channel (channel view, one cosine per row of `w.reshape(out, -1)`) and then over the
   whole tensor (layer view), must stay below `delta / sqrt(d)` with d the length of one row of
   that view;
2. in the first view that passes, remove the radial part of the update, p <- p - (w_hat . p) w_hat
   with w_hat the weight normalized within the view, and scale the weight decay by `wd_ratio`;
3. decay the weight multiplicatively (decoupled weight decay) and take the step.

One-dimensional tensors (biases, normalization gains) are never projected. The step-by-step
arithmetic follows the authors' reference package, down to where `eps` enters, so that the two
agree to rounding.
"""

import math

import torch
import torch.nn.functional as F
from torch.optim import Optimizer

VIEWS = ("channel", "layer")


def _view(x: torch.Tensor, view: str) -> torch.Tensor:
    """Channel view: one row per output channel (dim 0, PyTorch's layout). Layer view: one row."""
    return x.reshape(x.shape[0], -1) if view == "channel" else x.reshape(1, -1)


def scale_invariance_view(w: torch.Tensor, grad: torch.Tensor, delta: float,
                          eps: float) -> str | None:
    """The first view ('channel', then 'layer') in which `w` looks scale invariant, or None.

    The test is on the current gradient, not on the update: a scale-invariant weight has a gradient
    orthogonal to it in every row of the view, so every |cos(w_row, g_row)| falls below
    delta / sqrt(d), with d the length of a row.
    """
    for view in VIEWS:
        w_v, g_v = _view(w, view), _view(grad, view)
        cosine = F.cosine_similarity(g_v, w_v, dim=1, eps=eps).abs()
        if cosine.max() < delta / math.sqrt(w_v.shape[1]):
            return view
    return None


def project_radial(w: torch.Tensor, update: torch.Tensor, view: str, eps: float) -> torch.Tensor:
    """`update` without its component along `w`, row by row in `view` (a new tensor).

    `eps` is added to the row norms, so an all-zero weight leaves the update unchanged instead of
    dividing by zero.
    """
    w_v, u_v = _view(w, view), _view(update, view)
    w_hat = w_v / w_v.norm(dim=1, keepdim=True).add(eps)
    radial = (w_hat * u_v).sum(dim=1, keepdim=True)
    return (u_v - radial * w_hat).reshape(update.shape)


def _check(name: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


class _ProjectedOptimizer(Optimizer):
    """Shared checks and the projection step of SGDP and AdamP."""

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._validate(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def _validate(self, group: dict) -> None:
        _check("lr", group["lr"], _finite(group["lr"]) and group["lr"] >= 0, "a finite number >= 0")
        for name in ("weight_decay", "delta", "wd_ratio"):
            value = group[name]
            _check(name, value, _finite(value) and value >= 0, "a finite number >= 0")
        _check("eps", group["eps"], _finite(group["eps"]) and group["eps"] > 0,
               "a finite number > 0 (it keeps all-zero weights finite)")

    def _project(self, p: torch.Tensor, grad: torch.Tensor, update: torch.Tensor, group: dict,
                 state: dict) -> tuple[torch.Tensor, float]:
        """The update to apply and the factor on weight decay; the state records the view used."""
        view = None
        if p.dim() > 1:
            view = scale_invariance_view(p, grad, group["delta"], group["eps"])
        state["scale_invariant_view"] = view or ""
        if view is None:
            return update, 1.0
        return project_radial(p, update, view, group["eps"]), group["wd_ratio"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                self._update(p, p.grad, group, self.state[p])
        return loss

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError


class SGDP(_ProjectedOptimizer):
    """SGD with momentum and the projection of AdamP's paper.

    The momentum buffer starts at zero and accumulates `(1 - dampening) * grad`, as in the authors'
    package (torch's SGD copies the first gradient instead; with dampening = 0 the two agree).
    Without Nesterov the update *is* the buffer, and the authors' package projects it in place, so
    the buffer itself loses its radial part; we keep that behaviour. Weight decay is decoupled and
    divided by (1 - momentum), which matches the steady-state shrinkage of coupled L2 decay through
    the buffer.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, eps: float = 1e-8,
                 delta: float = 0.1, wd_ratio: float = 0.1):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio)
        super().__init__(params, defaults)

    def _validate(self, group: dict) -> None:
        super()._validate(group)
        m, d = group["momentum"], group["dampening"]
        _check("momentum", m, _finite(m) and 0 <= m < 1,
               "in [0, 1) (weight decay is divided by 1 - momentum)")
        _check("dampening", d, _finite(d) and 0 <= d <= 1, "in [0, 1]")
        if group["nesterov"] and (m <= 0 or d != 0):
            raise ValueError(
                f"Nesterov momentum needs momentum > 0 and dampening = 0, got momentum={m}, "
                f"dampening={d}"
            )

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
        lr, momentum = group["lr"], group["momentum"]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)

        buf = state["momentum_buffer"]
        buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
        d_p = grad + momentum * buf if group["nesterov"] else buf

        d_p, wd_factor = self._project(p, grad, d_p, group, state)
        if not group["nesterov"]:
            buf.copy_(d_p)

        if group["weight_decay"] > 0:
            p.mul_(1 - lr * group["weight_decay"] * wd_factor / (1 - momentum))

        p.add_(d_p, alpha=-lr)


class AdamP(_ProjectedOptimizer):
    """Adam with decoupled weight decay (AdamW) and the projection of AdamP's paper.

    The projection acts on Adam's direction m_hat / (sqrt(v_hat) + eps), before the bias-corrected
    step size; the moment estimates themselves are never projected. Weight decay shrinks the weight
    by lr * weight_decay (times `wd_ratio` on projected tensors), as AdamW does. With `nesterov`,
    the first moment is looked ahead by one step: beta1 * m + (1 - beta1) * grad.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, delta: float = 0.1,
                 wd_ratio: float = 0.1, nesterov: bool = False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, delta=delta,
                        wd_ratio=wd_ratio, nesterov=nesterov)
        super().__init__(params, defaults)

    def _validate(self, group: dict) -> None:
        super()._validate(group)
        betas = group["betas"]
        _check("betas", betas, len(betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in betas),
               "a pair of numbers in [0, 1)")

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)

        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        numer = beta1 * m + (1 - beta1) * grad if group["nesterov"] else m
        direction = numer / denom

        direction, wd_factor = self._project(p, grad, direction, group, state)

        if group["weight_decay"] > 0:
            p.mul_(1 - lr * group["weight_decay"] * wd_factor)

        p.add_(direction, alpha=-lr / (1 - beta1**t))
