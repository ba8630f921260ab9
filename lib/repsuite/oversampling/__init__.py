"""Over- and under-sampling for imbalanced classification (SMOTE, Chawla et al., 2002).

- `smote`: SMOTE and SMOTE-NC in PyTorch, random under-sampling, over-sampling by replication,
  and the paper's combination of over- and under-sampling;
- `roc`: ROC points of sampling sweeps, the ROC convex hull, its area and the paper's trapezoid AUC;
- `protocol`: the cross-validated sweeps (resampling inside training folds only).
"""

from repsuite.oversampling.smote import (
    SMOTE,
    SMOTENC,
    RandomOverSampler,
    RandomUnderSampler,
    resample,
)

__all__ = ["SMOTE", "SMOTENC", "RandomOverSampler", "RandomUnderSampler", "resample"]
