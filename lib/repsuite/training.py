"""Small supervised-training helpers shared by the papers that train classifiers in PyTorch.

Tensors go to the caller's device; batches are drawn from a seeded generator of their own, so the
data order depends only on the seed given here.
"""

from collections.abc import Callable

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn

from repsuite.progress import bar


def split_tensors(X: np.ndarray, y: np.ndarray, *, test_size: float, seed: int, device,
                  scale: float | None = None):
    """Stratified split into float32 features and int64 labels on `device`.

    `scale` divides the features (255 for pixels); otherwise they are standardised with the
    training split's mean and standard deviation.
    """
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows and y has {len(y)} labels")
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
    Xtr, Xte = Xtr.astype(np.float32), Xte.astype(np.float32)
    if scale is not None:
        Xtr, Xte = Xtr / scale, Xte / scale
    else:
        mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-8
        Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd

    def t(a, dtype):
        return torch.as_tensor(a, dtype=dtype, device=device)

    return t(Xtr, torch.float32), t(Xte, torch.float32), t(ytr, torch.int64), t(yte, torch.int64)


def batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True):
    """Index batches of one shuffled epoch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 2048):
    """(mean cross-entropy, accuracy) of `model` in eval mode."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(X), batch_size):
        logits = model(X[start:start + batch_size])
        target = y[start:start + batch_size]
        loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    model.train(was_training)
    return loss / len(X), correct / len(X)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor, *,
          epochs: int, batch_size: int, seed: int, scheduler=None,
          on_epoch: Callable[[int], None] | None = None, progress: bool = False) -> list[float]:
    """Plain minibatch cross-entropy training; returns the mean training loss of each epoch.

    `on_epoch(epoch)` is called after every epoch (for tracking norms, say); `scheduler` steps
    once per epoch.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    g = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for epoch in bar(range(epochs), enabled=progress, leave=False):
        total, count = 0.0, 0
        for idx in batches(len(X), batch_size, g):
            idx = idx.to(X.device)
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            count += len(idx)
        if scheduler is not None:
            scheduler.step()
        history.append(total / max(count, 1))
        if on_epoch is not None:
            on_epoch(epoch)
    return history
