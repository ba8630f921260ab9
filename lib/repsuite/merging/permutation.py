"""Permutation specs: which axis of which parameter array each hidden-unit permutation acts on.

A network's function is unchanged when the units of a hidden layer are reordered and every array
that reads or writes those units is reordered the same way: the rows of the layer's weight and its
bias, and the input columns of the next layer's weight. A spec names one permutation per hidden
layer (`P_1`, `P_2`, ...) and, for every parameter, the permutation acting on each of its axes
(`None` for an axis no permutation touches: the network's input features and output classes).

Parameters are plain dicts `name -> tensor` (a model's `state_dict()`), so models can be permuted,
interpolated and averaged without touching modules. A permutation is a 1-D int64 tensor `perm` with
the convention `permuted[..., i, ...] = original[..., perm[i], ...]`: unit `i` of the new model is
unit `perm[i]` of the old one.
"""

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from repsuite.merging.models import MLP, VGGLike

Params = dict[str, torch.Tensor]
Perms = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PermutationSpec:
    """`axes_to_perm[name]`: per axis of parameter `name`, the permutation acting on it (or None).

    `views[name]` (optional) is the shape a parameter is seen with while permuting, for arrays whose
    permuted axis is folded into another: a classifier reading flattened conv features of shape
    (channels, height * width) sees its input axis as `(n_classes, channels, height * width)`.
    """

    axes_to_perm: dict[str, tuple[str | None, ...]]
    views: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        """For each permutation, the (parameter, axis) pairs it acts on, in a stable order."""
        out: dict[str, list[tuple[str, int]]] = {}
        for name, axes in self.axes_to_perm.items():
            for axis, p in enumerate(axes):
                if p is not None:
                    out.setdefault(p, []).append((name, axis))
        return out

    @property
    def perm_names(self) -> list[str]:
        return sorted(self.perm_to_axes, key=lambda p: (len(p), p))


def mlp_spec(n_layers: int) -> PermutationSpec:
    """Spec of an MLP of `n_layers` linear layers `layers.<i>`; `P_l` permutes hidden layer l."""
    if n_layers < 1:
        raise ValueError(f"an MLP has at least one linear layer, got n_layers={n_layers}")

    def p(l):  # the permutation of the units that layer l-1 writes (0 = input, n_layers = output)
        return None if l in (0, n_layers) else f"P_{l}"

    axes = {}
    for i in range(n_layers):
        axes[f"layers.{i}.weight"] = (p(i + 1), p(i))
        axes[f"layers.{i}.bias"] = (p(i + 1),)
    return PermutationSpec(axes)


def vgg_spec(model: VGGLike) -> PermutationSpec:
    """Spec of `VGGLike`: conv output channels, the next conv's input channels, the head's input."""
    n = len(model.layers)
    axes, views = {}, {}
    for i in range(n - 1):
        axes[f"layers.{i}.weight"] = (f"P_{i + 1}", f"P_{i}" if i else None, None, None)
        axes[f"layers.{i}.bias"] = (f"P_{i + 1}",)
    head = model.layers[-1]
    axes[f"layers.{n - 1}.weight"] = (None, f"P_{n - 1}", None)
    views[f"layers.{n - 1}.weight"] = (head.out_features, model.channels[-1], model.out_side ** 2)
    axes[f"layers.{n - 1}.bias"] = (None,)
    return PermutationSpec(axes, views)


def spec_for(model: nn.Module) -> PermutationSpec:
    """The spec of one of this package's models."""
    if isinstance(model, MLP):
        return mlp_spec(len(model.layers))
    if isinstance(model, VGGLike):
        return vgg_spec(model)
    raise TypeError(f"no permutation spec is known for {type(model).__name__}; "
                    "write a PermutationSpec for it by hand")


def view_param(spec: PermutationSpec, name: str, w: torch.Tensor) -> torch.Tensor:
    """A parameter in the shape it is permuted with (see `PermutationSpec.views`)."""
    shape = spec.views.get(name)
    if shape is None:
        return w
    if math.prod(shape) != w.numel():
        raise ValueError(f"parameter {name!r} of shape {tuple(w.shape)} cannot be viewed as "
                         f"{shape}")
    return w.reshape(shape)


def perm_sizes(spec: PermutationSpec, params: Params) -> dict[str, int]:
    """Number of units each permutation acts on; an error if two arrays disagree about it."""
    sizes: dict[str, int] = {}
    for p, where in spec.perm_to_axes.items():
        for name, axis in where:
            if name not in params:
                raise KeyError(f"the spec names parameter {name!r}, which the model does not have; "
                               f"it has {sorted(params)}")
            w = view_param(spec, name, params[name])
            if w.dim() != len(spec.axes_to_perm[name]):
                raise ValueError(f"parameter {name!r} has {w.dim()} axes but the spec gives "
                                 f"{len(spec.axes_to_perm[name])}")
            n = w.shape[axis]
            if sizes.setdefault(p, n) != n:
                raise ValueError(f"permutation {p} acts on axes of different sizes "
                                 f"({sizes[p]} and {n}, the latter at {name!r} axis {axis})")
    return sizes


def check_params(spec: PermutationSpec, params: Params, what: str = "model") -> None:
    """Every parameter of the spec present, shapes consistent, all values finite."""
    perm_sizes(spec, params)
    for name, w in params.items():
        if not torch.is_floating_point(w):
            continue
        if not torch.isfinite(w).all():
            raise ValueError(f"{what}: parameter {name!r} contains NaN or infinite values")


def check_pair(spec: PermutationSpec, params_a: Params, params_b: Params) -> None:
    """Two models of the same architecture: same parameter names and shapes, finite values."""
    if set(params_a) != set(params_b):
        only_a = sorted(set(params_a) - set(params_b))
        only_b = sorted(set(params_b) - set(params_a))
        raise ValueError(f"the two models have different parameters: only in A {only_a}, "
                         f"only in B {only_b}")
    for name in params_a:
        if params_a[name].shape != params_b[name].shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(params_a[name].shape)} in "
                             f"model A and {tuple(params_b[name].shape)} in model B: different "
                             "architectures")
    check_params(spec, params_a, "model A")
    check_params(spec, params_b, "model B")


def check_perms(spec: PermutationSpec, perms: Perms, params: Params) -> None:
    """`perms` holds one valid permutation of the right size for every permutation of the spec."""
    sizes = perm_sizes(spec, params)
    if set(perms) != set(sizes):
        raise ValueError(f"permutations given for {sorted(perms)}, the spec has {sorted(sizes)}")
    for p, n in sizes.items():
        perm = perms[p]
        if perm.dim() != 1 or len(perm) != n:
            raise ValueError(f"permutation {p} must be a vector of {n} indices, got shape "
                             f"{tuple(perm.shape)}")
        if not torch.equal(torch.sort(perm.cpu()).values, torch.arange(n)):
            raise ValueError(f"{p} is not a permutation of 0..{n - 1}")


def identity_perms(spec: PermutationSpec, params: Params) -> Perms:
    return {p: torch.arange(n) for p, n in perm_sizes(spec, params).items()}


def random_perms(spec: PermutationSpec, params: Params, generator: torch.Generator) -> Perms:
    """Uniformly random permutations of every hidden layer (drawn in the order of `perm_names`)."""
    sizes = perm_sizes(spec, params)
    return {p: torch.randperm(sizes[p], generator=generator) for p in spec.perm_names}


def inverse(perms: Perms) -> Perms:
    """The permutations that undo `perms`."""
    return {p: torch.argsort(perm) for p, perm in perms.items()}


def permute_param(spec: PermutationSpec, perms: Perms, name: str, w: torch.Tensor,
                  except_axis: int | None = None) -> torch.Tensor:
    """One parameter with every permutation applied, except the one on `except_axis` if given.

    With `except_axis` the result keeps the shape of the parameter's view (see `view_param`).
    """
    shape = w.shape
    w = view_param(spec, name, w)
    for axis, p in enumerate(spec.axes_to_perm.get(name, ())):
        if p is None or axis == except_axis:
            continue
        w = torch.index_select(w, axis, perms[p].to(w.device))
    return w.reshape(shape) if except_axis is None else w


def apply_permutation(spec: PermutationSpec, perms: Perms, params: Params) -> Params:
    """The parameters of the permuted, functionally identical model."""
    check_perms(spec, perms, params)
    return {name: permute_param(spec, perms, name, w) for name, w in params.items()}
