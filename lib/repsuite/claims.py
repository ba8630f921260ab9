"""The claims ledger: what a paper claims, how we judge it, what we measured, and the verdict.

A notebook declares every claim with its criterion before any training, supplies per-seed
measurements after, and writes `reports/metrics/<slug>.json`. Verdicts are computed here from the
numbers, never typed.

    ledger = Ledger("smote", title=..., arxiv="1106.1813", profile=profile, seeds=seeds)
    ledger.claim("C1", "SMOTE+under beats under-sampling alone", paper_value=..., metric="AUCH",
                 criterion=Criterion("greater"))
    ...
    ledger.measure("C1", ours=per_seed_smote, baseline=per_seed_under)
    ledger.write()
"""

import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from repsuite import paths, seeding
from repsuite.stats import Criterion, judge, mean_ci


@dataclass
class Claim:
    id: str
    statement: str
    paper_value: dict
    metric: str
    criterion: Criterion
    ours: dict | None = None
    baseline: dict | None = None
    interval: dict | None = None
    verdict: str | None = None
    reason: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {
            "id": self.id,
            "statement": self.statement,
            "paper_value": self.paper_value,
            "metric": self.metric,
            "direction": self.criterion.direction,
            "ours": self.ours,
            "criterion": self.criterion.as_dict(paired=self.baseline is not None),
            "verdict": self.verdict,
        }
        if self.baseline is not None:
            out["baseline"] = self.baseline
        # What the verdict rests on: paired differences, or ours minus the threshold.
        out["difference"] = self.interval
        if self.reason:
            out["reason"] = self.reason
        out.update(self.extra)
        return out


def _jsonable(value):
    """numpy and torch scalars and arrays as plain JSON values; NaN becomes null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Ledger:
    """Claims, measurements and run facts of one paper; writes the paper's metrics file."""

    def __init__(self, slug: str, *, title: str, arxiv: str, profile: str, seeds, device=None):
        if profile not in {"smoke", "cpu", "gpu"}:
            raise ValueError(f"profile must be one of smoke, cpu, gpu; got {profile!r}")
        self.slug, self.title, self.arxiv, self.profile = slug, title, arxiv, profile
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise ValueError("a ledger needs at least one seed")
        self.device = str(device) if device is not None else str(seeding.pick_device())
        self.claims: dict[str, Claim] = {}
        self.metrics: dict = {}
        self._start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def claim(self, id: str, statement: str, *, paper_value: dict, metric: str,
              criterion: Criterion) -> Claim:
        """Declare a claim and the criterion that will judge it, before anything is measured."""
        if id in self.claims:
            raise ValueError(f"claim {id!r} is declared twice")
        if not {"value", "source"} <= set(paper_value):
            raise ValueError(
                f"claim {id}: paper_value needs 'value' and 'source', got {sorted(paper_value)}"
            )
        if criterion.ours and not criterion.note:
            raise ValueError(f"claim {id}: a threshold of ours needs a note saying why")
        self.claims[id] = Claim(id, statement, paper_value, metric, criterion)
        return self.claims[id]

    def measure(self, id: str, ours, baseline=None, *, reason: str = "", **extra) -> Claim:
        """Record per-seed values (and the paired baseline's) and compute the verdict."""
        if id not in self.claims:
            raise KeyError(f"claim {id!r} was never declared; declared: {sorted(self.claims)}")
        c = self.claims[id]
        if c.verdict is not None:
            raise ValueError(f"claim {id} was already measured")
        c.ours = mean_ci(ours)
        c.baseline = mean_ci(baseline) if baseline is not None else None
        c.verdict, c.interval = judge(c.criterion, ours, baseline)
        if c.ours["n"] < 2:
            reason = (reason + "; " if reason else "") + "fewer than 2 seeds: no interval"
        c.reason, c.extra = reason, _jsonable(extra)
        return c

    def table(self) -> pd.DataFrame:
        """One row per claim, for display in the notebook."""
        rows = []
        for c in self.claims.values():
            ci = (c.ours or {}).get("ci95", [float("nan")] * 2)
            rows.append({
                "claim": c.id,
                "statement": c.statement,
                "paper": c.paper_value["value"],
                "ours (mean)": (c.ours or {}).get("mean"),
                "ours 95% CI": f"[{ci[0]:.4g}, {ci[1]:.4g}]" if c.ours else "",
                "baseline (mean)": (c.baseline or {}).get("mean"),
                "criterion": c.criterion.describe(c.baseline is not None),
                "verdict": c.verdict or "not measured",
            })
        return pd.DataFrame(rows).set_index("claim")

    def as_dict(self) -> dict:
        missing = [c.id for c in self.claims.values() if c.verdict is None]
        if missing:
            raise ValueError(f"claims declared but never measured: {missing}")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        if sys.platform == "darwin":
            peak /= 1024
        out = {
            "slug": self.slug,
            "title": self.title,
            "arxiv": self.arxiv,
            "profile": self.profile,
            "device": self.device,
            "seeds": self.seeds,
            "runtime_s": round(time.perf_counter() - self._start, 2),
            "peak_memory_mb": round(peak, 1),
            "versions": seeding.versions(),
            "claims": [c.as_dict() for c in self.claims.values()],
            # Flat, so that `dvc metrics show` and `dvc exp show` can put each claim in a column.
            "summary": {c.id: {"verdict": c.verdict, "ours": c.ours["mean"]}
                        for c in self.claims.values()},
            "metrics": _jsonable(self.metrics),
        }
        if torch.cuda.is_available():
            out["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out

    def write(self) -> dict:
        """Write `reports/metrics/<slug>.json` and return what was written."""
        out = self.as_dict()
        path = paths.metrics_path(self.slug)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1, allow_nan=False) + "\n")
        return out
