"""Optimizers for scale-invariant weights (AdamP, SGDP) and the tools to study them.

- `adamp`: the AdamP and SGDP optimizers and their scale-invariance test and projection.
- `scale_invariance`: weight-norm and effective-step tracking, training runs that record them, and
  the 2-D toy objective of the AdamP paper's project page.
- `models`: small networks with BatchNorm after every hidden weight.
"""

from repsuite.optim.adamp import SGDP, AdamP

__all__ = ["SGDP", "AdamP"]
