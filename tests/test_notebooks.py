"""Every notebook through the runner at the smoke profile, twice, in a temporary folder."""

import json
from pathlib import Path

import pytest

from repsuite import run
from repsuite.paths import repo_root
from repsuite.report import REMOTE
from repsuite.stats import VERDICTS

NOTEBOOKS = sorted(p.stem for p in (repo_root() / "notebooks").glob("*.ipynb"))
# These vary from run to run by nature; everything else must be identical for the same seed.
TIMING = ("runtime_s", "wall_s", "peak_memory_mb", "peak_gpu_memory_mb")


def _check_schema(m: dict, slug: str) -> None:
    for key in ("slug", "title", "arxiv", "profile", "device", "seeds", "runtime_s",
                "peak_memory_mb", "versions", "claims", "metrics"):
        assert key in m, f"{slug}: metrics without {key}"
    assert m["slug"] == slug and m["profile"] == "smoke"
    assert m["claims"], f"{slug}: no claims"
    for c in m["claims"]:
        assert c["verdict"] in VERDICTS
        assert c["paper_value"]["value"] not in (None, "") and c["paper_value"]["source"]
        assert c["criterion"]["words"]
        assert c["ours"]["n"] == len(c["ours"]["per_seed"]) >= 1


@pytest.mark.notebooks
@pytest.mark.parametrize("slug", NOTEBOOKS)
def test_notebook_smoke_runs_reproducibly(slug, tmp_path):
    metrics = []
    for attempt in ("first", "second"):
        out = tmp_path / attempt
        assert run.run(slug, "smoke", out) == 0, f"{slug} failed at the smoke profile"
        metrics.append(json.loads((out / "reports/metrics" / f"{slug}.json").read_text()))
        html = (out / "reports" / f"{slug}.html").read_text()
        assert not REMOTE.search(html), f"{slug}'s report loads a remote asset"
    _check_schema(metrics[0], slug)
    first, second = ({k: v for k, v in m.items() if k not in TIMING} for m in metrics)
    assert first == second, f"{slug}: the same seed gave different metrics"
    assert not (Path.cwd() / "notebooks" / "reports").exists()
