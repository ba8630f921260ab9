"""The networks whose hidden units are permuted: a plain ReLU MLP and a small VGG-style CNN.

Both keep every linear map in an indexed `layers` list, so parameter names are `layers.<i>.weight`
and `layers.<i>.bias` and a permutation spec (see `permutation.py`) can be written from the layer
sizes alone. No normalisation layers: with BatchNorm the running statistics of the merged model
would need repairing (REPAIR, Jordan et al. 2023), which is outside this paper's analysis of plain
weights.
"""

import torch
from torch import nn


def _check_widths(name: str, widths) -> list[int]:
    widths = [int(w) for w in widths]
    if any(w < 1 for w in widths):
        raise ValueError(f"{name}: every width must be >= 1, got {widths}")
    return widths


class MLP(nn.Module):
    """`d_in -> widths[0] -> ... -> widths[-1] -> n_classes` with ReLU between the linear layers."""

    def __init__(self, d_in: int, widths, n_classes: int):
        super().__init__()
        if d_in < 1 or n_classes < 1:
            raise ValueError(f"MLP: d_in and n_classes must be >= 1, got {d_in} and {n_classes}")
        self.widths = _check_widths("MLP", widths)
        sizes = [d_in, *self.widths, n_classes]
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)

    def hidden(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Post-ReLU activations of every hidden layer (what activation matching correlates)."""
        out, x = [], x.flatten(1)
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
            out.append(x)
        return out


class VGGLike(nn.Module):
    """3x3 convolutions (ReLU, 2x2 max-pool after each) on square images, then one linear
    classifier.

    A stand-in for the paper's VGG11 at a size a CPU trains: the same kinds of permuted axes (conv
    output channels, the next conv's input channels, the flattened features of the classifier).
    """

    def __init__(self, in_channels: int, side: int, channels, n_classes: int):
        super().__init__()
        self.channels = _check_widths("VGGLike", channels)
        if side < 2 ** len(self.channels):
            raise ValueError(f"VGGLike: images of side {side} are too small for "
                             f"{len(self.channels)} pooling steps")
        self.in_channels, self.side = in_channels, side
        sizes = [in_channels, *self.channels]
        convs = [nn.Conv2d(a, b, 3, padding=1) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        self.out_side = side // 2 ** len(self.channels)
        head = nn.Linear(self.channels[-1] * self.out_side ** 2, n_classes)
        self.layers = nn.ModuleList([*convs, head])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), self.in_channels, self.side, self.side)
        for conv in self.layers[:-1]:
            x = nn.functional.max_pool2d(torch.relu(conv(x)), 2)
        return self.layers[-1](x.flatten(1))


def train_mlp(X: torch.Tensor, y: torch.Tensor, *, widths, epochs: int, batch_size: int, lr: float,
              momentum: float, seed: int) -> tuple[MLP, dict[str, torch.Tensor]]:
    """An MLP trained by SGD with momentum from initialisation and data order drawn from `seed`.

    Returns the model (for its architecture) and a detached copy of its trained parameters.
    """
    from repsuite.training import train

    if len(X) != len(y) or len(X) < batch_size:
        raise ValueError(f"training needs at least batch_size={batch_size} labelled examples, got "
                         f"{len(X)} inputs and {len(y)} labels")
    torch.manual_seed(seed)
    model = MLP(X[0].numel(), widths, int(y.max()) + 1).to(X.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    train(model, opt, X, y, epochs=epochs, batch_size=batch_size, seed=seed)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}
