"""Normalized networks for 28x28 digits: every hidden weight is followed by BatchNorm.

A Linear or Conv weight that feeds a BatchNorm layer is scale invariant in train mode: multiplying
it by c > 0 multiplies the pre-activations by c, and the normalization divides it out again (up to
BN's `eps`). Its gradient is therefore orthogonal to it, row by row (each output channel is
normalized on its own), which is the premise of AdamP and SGDP. The classifier head feeds the loss
directly and is not scale invariant. Both networks take flat inputs of 784 pixels, as
`repsuite.data` returns them.
"""

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

IMAGE_SIDE = 28


class BNMLP(nn.Sequential):
    """784 -> hidden -> ... -> n_classes; Linear (no bias), BatchNorm1d, ReLU per hidden layer."""

    def __init__(self, in_features: int = IMAGE_SIDE**2, hidden: tuple[int, ...] = (256, 256),
                 n_classes: int = 10):
        if in_features < 1 or n_classes < 2 or not hidden or min(hidden) < 1:
            raise ValueError(
                f"BNMLP needs in_features >= 1, n_classes >= 2 and at least one hidden layer of "
                f"width >= 1; got in_features={in_features}, hidden={hidden}, n_classes={n_classes}"
            )
        layers, width = [], in_features
        for h in hidden:
            # A bias before BN would be removed by the mean subtraction anyway.
            layers += [nn.Linear(width, h, bias=False), nn.BatchNorm1d(h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_classes))
        super().__init__(*layers)


class BNCNN(nn.Sequential):
    """Conv3x3 (no bias) -> BatchNorm2d -> ReLU -> MaxPool2d(2) per block, then a linear head."""

    def __init__(self, channels: tuple[int, ...] = (16, 32), n_classes: int = 10):
        if not channels or min(channels) < 1 or n_classes < 2:
            raise ValueError(f"BNCNN needs channels >= 1 and n_classes >= 2; got {channels}, "
                             f"{n_classes}")
        if IMAGE_SIDE >> len(channels) < 1:
            raise ValueError(f"{len(channels)} pooling blocks shrink a {IMAGE_SIDE}-pixel image "
                             "to nothing")
        layers: list[nn.Module] = [nn.Unflatten(1, (1, IMAGE_SIDE, IMAGE_SIDE))]
        c_in, side = 1, IMAGE_SIDE
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c_in, side = c, side // 2
        layers += [nn.Flatten(), nn.Linear(c_in * side * side, n_classes)]
        super().__init__(*layers)


def build_model(name: str, *, hidden: tuple[int, ...] = (256, 256),
                channels: tuple[int, ...] = (16, 32), n_classes: int = 10) -> nn.Module:
    """'mlp' (BNMLP with `hidden`) or 'cnn' (BNCNN with `channels`)."""
    if name == "mlp":
        return BNMLP(hidden=tuple(hidden), n_classes=n_classes)
    if name == "cnn":
        return BNCNN(channels=tuple(channels), n_classes=n_classes)
    raise ValueError(f"model must be 'mlp' or 'cnn', got {name!r}")


def bn_preceded_weights(model: nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, weight) of each Linear or Conv layer whose output goes straight into a BatchNorm
    layer.

    Reads the leaf modules in registration order, which is the data flow for sequential networks
    like the ones above; a network with branches needs its own list.
    """
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    found = []
    for (name, m), (_, following) in zip(leaves, leaves[1:], strict=False):
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d) and isinstance(following,
                                                                                       _BatchNorm):
            found.append((f"{name}.weight", m.weight))
    return found
