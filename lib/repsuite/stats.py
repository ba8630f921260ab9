"""Intervals and verdicts from per-seed measurements.

A verdict compares measured values with a criterion fixed before the run:

- `greater` / `less`: the claimed effect has a direction. With a baseline, the per-seed paired
  differences (ours minus baseline) are used; without one, ours minus a fixed `threshold`. The
  two-sided t interval at `level` decides: entirely on the claimed side of `margin` means
  reproduced, entirely on the other side means not reproduced, straddling it means inconclusive.
- `noninferior`: "no worse than" the baseline by more than `margin` (larger is better). Reproduced
  when the interval's lower end is above `-margin`, not reproduced when its upper end is below
  `-margin`.
- `equivalent`: within `margin` of the baseline or threshold in both directions (the interval inside
  `[-margin, margin]`); not reproduced when the interval lies entirely outside it.
"""

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats as sps

DIRECTIONS = ("greater", "less", "noninferior", "equivalent")
VERDICTS = ("reproduced", "inconclusive", "not_reproduced")


def as_values(values, name: str = "values") -> np.ndarray:
    """A finite 1-D float array, or a clear error naming `name`."""
    arr = np.asarray(values, dtype=float).ravel()
    if arr.size == 0:
        raise ValueError(f"{name}: no measurements given")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or infinite values: {arr.tolist()}")
    return arr


def mean_ci(values, level: float = 0.95) -> dict:
    """Mean, two-sided t interval, n and the values (the interval is a point when n = 1)."""
    arr = as_values(values)
    n = arr.size
    mean = float(arr.mean())
    if n < 2 or np.all(arr == arr[0]):
        lo = hi = mean
    else:
        half = float(sps.t.ppf(0.5 + level / 2, n - 1) * arr.std(ddof=1) / np.sqrt(n))
        lo, hi = mean - half, mean + half
    return {"mean": mean, "ci95" if level == 0.95 else f"ci{int(level * 100)}": [lo, hi], "n": n,
            "per_seed": arr.tolist()}


@dataclass(frozen=True)
class Criterion:
    """How a claim is judged, declared before the run.

    `margin` and `threshold` come from the paper where it states them; `ours` says that a number
    is our choice, and `note` gives the reason in words shown in the reports.
    """

    direction: str
    margin: float = 0.0
    threshold: float | None = None
    level: float = 0.95
    ours: bool = False
    note: str = ""
    test: str = field(default="", compare=False)

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(
                f"criterion direction must be one of {DIRECTIONS}, got {self.direction!r}"
            )
        if not 0.5 < self.level < 1:
            raise ValueError(f"criterion level must be in (0.5, 1), got {self.level}")
        if self.margin < 0:
            raise ValueError(f"criterion margin must be >= 0, got {self.margin}")
        if self.direction == "noninferior" and self.threshold is not None:
            raise ValueError("a non-inferiority criterion compares with a baseline, "
                             "not a threshold")

    def describe(self, paired: bool) -> str:
        if paired or self.threshold is None:
            against = "paired difference ours - baseline"
        else:
            against = f"ours - {self.threshold:g}"
        words = {
            "greater": f"{against}: {self.level:.0%} t interval above {self.margin:g}",
            "less": f"{against}: {self.level:.0%} t interval below {0.0 - self.margin:g}",
            "noninferior": f"{against}: {self.level:.0%} t interval's lower end above "
                           f"{0.0 - self.margin:g}",
            "equivalent": f"{against}: {self.level:.0%} t interval inside +-{self.margin:g}",
        }[self.direction]
        return words + (f" ({self.note})" if self.note else "")

    def as_dict(self, paired: bool) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "test"}
        out["test"] = ("paired difference, t interval" if paired
                       else "one sample against a threshold, t interval")
        out["words"] = self.describe(paired)
        return out


def judge(criterion: Criterion, ours, baseline=None) -> tuple[str, dict]:
    """The verdict, and the interval it rests on (of paired differences or of ours - threshold)."""
    ours = as_values(ours, "ours")
    if baseline is not None:
        base = as_values(baseline, "baseline")
        if base.shape != ours.shape:
            raise ValueError(
                f"ours has {ours.size} per-seed values and the baseline {base.size}: a paired "
                "comparison needs one baseline value per seed"
            )
        diff = ours - base
    elif criterion.threshold is not None:
        diff = ours - criterion.threshold
    else:
        raise ValueError("a claim needs a baseline or a criterion threshold to be judged against")

    summary = mean_ci(diff, criterion.level)
    lo, hi = summary.get("ci95", summary.get(f"ci{int(criterion.level * 100)}"))
    m = criterion.margin
    if summary["n"] < 2:
        return "inconclusive", summary
    if criterion.direction == "greater":
        verdict = "reproduced" if lo > m else "not_reproduced" if hi < m else "inconclusive"
    elif criterion.direction == "less":
        verdict = "reproduced" if hi < -m else "not_reproduced" if lo > -m else "inconclusive"
    elif criterion.direction == "noninferior":
        verdict = "reproduced" if lo > -m else "not_reproduced" if hi < -m else "inconclusive"
    else:
        inside = -m <= lo and hi <= m
        outside = hi < -m or lo > m
        verdict = "reproduced" if inside else "not_reproduced" if outside else "inconclusive"
    return verdict, summary
