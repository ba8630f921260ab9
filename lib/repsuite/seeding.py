"""Seeding and device choice, the same way in every notebook."""

import os
import platform
import random
import sys
from importlib import metadata

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; deterministic CPU kernels, so a seed gives the same numbers."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pick_device(preference: str = "auto") -> torch.device:
    """`auto` takes CUDA when present and the CPU otherwise; `cpu` and `cuda` force one."""
    if preference not in {"auto", "cpu", "cuda"}:
        raise ValueError(f"device must be one of auto, cpu, cuda; got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but no CUDA device is visible")
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(preference)


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator of its own, so one stream of draws does not shift another."""
    return torch.Generator(device=device).manual_seed(seed)


VERSIONED = ("torch", "numpy", "scipy", "scikit-learn", "pandas", "matplotlib", "papermill",
             "imbalanced-learn", "mlxtend")


def versions() -> dict[str, str]:
    """Versions of python and of the packages the results depend on."""
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
