"""Intervals, verdicts and the claims ledger."""

import json

import numpy as np
import pytest
from scipy import stats as sps

from repsuite import claims, paths
from repsuite.stats import Criterion, judge, mean_ci


def test_mean_ci_matches_scipy_t_interval():
    x = np.array([0.91, 0.92, 0.90, 0.91, 0.95])
    got = mean_ci(x)
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert got["mean"] == pytest.approx(x.mean())
    assert got["ci95"] == pytest.approx([lo, hi])
    assert got["n"] == 5 and got["per_seed"] == x.tolist()


@pytest.mark.parametrize("ours, base, direction, margin, expected", [
    ([1.1, 1.2, 1.15, 1.3], [1.0, 1.0, 1.0, 1.1], "greater", 0.0, "reproduced"),
    ([0.9, 0.8, 0.85, 0.7], [1.0, 1.0, 1.0, 1.1], "greater", 0.0, "not_reproduced"),
    ([1.1, 0.9, 1.05, 0.95], [1.0, 1.0, 1.0, 1.0], "greater", 0.0, "inconclusive"),
    ([0.9, 0.8, 0.85, 0.7], [1.0, 1.0, 1.0, 1.1], "less", 0.0, "reproduced"),
    ([0.99, 0.98, 1.0, 0.99], [1.0, 1.0, 1.0, 1.0], "noninferior", 0.05, "reproduced"),
    ([0.80, 0.82, 0.79, 0.81], [1.0, 1.0, 1.0, 1.0], "noninferior", 0.05, "not_reproduced"),
    ([1.0, 1.01, 0.99, 1.0], [1.0, 1.0, 1.0, 1.0], "equivalent", 0.05, "reproduced"),
    ([1.3, 1.31, 1.29, 1.3], [1.0, 1.0, 1.0, 1.0], "equivalent", 0.05, "not_reproduced"),
])
def test_judge_paired(ours, base, direction, margin, expected):
    verdict, diff = judge(Criterion(direction, margin=margin), ours, base)
    assert verdict == expected
    assert diff["mean"] == pytest.approx(np.mean(np.subtract(ours, base)))


def test_judge_against_threshold_and_margin_direction():
    assert judge(Criterion("less", threshold=0.25), [0.1, 0.12, 0.09])[0] == "reproduced"
    assert judge(Criterion("less", threshold=0.25), [0.5, 0.6, 0.55])[0] == "not_reproduced"
    # A margin in the claimed direction must be exceeded, not merely the zero line.
    verdict, _ = judge(Criterion("greater", margin=0.5), [1.2, 1.3, 1.25], [1.0] * 3)
    assert verdict == "not_reproduced"


def test_judge_single_seed_is_inconclusive():
    assert judge(Criterion("greater"), [2.0], [1.0])[0] == "inconclusive"


@pytest.mark.parametrize("kwargs, match", [
    ({"direction": "bigger"}, "direction must be one of"),
    ({"direction": "greater", "margin": -1}, "margin must be >= 0"),
    ({"direction": "greater", "level": 1.5}, "level must be in"),
    ({"direction": "noninferior", "threshold": 0.3}, "compares with a baseline"),
])
def test_criterion_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Criterion(**kwargs)


def test_judge_rejects_bad_measurements():
    with pytest.raises(ValueError, match="NaN"):
        judge(Criterion("greater"), [1.0, float("nan")], [0.0, 0.0])
    with pytest.raises(ValueError, match="one baseline value per seed"):
        judge(Criterion("greater"), [1.0, 2.0, 3.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="baseline or a criterion threshold"):
        judge(Criterion("greater"), [1.0, 2.0])
    with pytest.raises(ValueError, match="no measurements"):
        judge(Criterion("greater"), [], [])


def _ledger():
    return claims.Ledger("demo", title="Demo", arxiv="1234.5678", profile="smoke", seeds=[0, 1, 2],
                         device="cpu")


def test_ledger_writes_the_metrics_schema(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.OUTPUT_ENV, str(tmp_path))
    ledger = _ledger()
    ledger.claim("C1", "A beats B", paper_value={"value": "+1.0", "source": "Table 1"},
                 metric="accuracy", criterion=Criterion("greater"))
    ledger.claim("C2", "A under 0.5", paper_value={"value": "0.3", "source": "Fig. 2"},
                 metric="loss", criterion=Criterion("less", threshold=0.5, ours=True,
                                                    note="the paper states no threshold"))
    ledger.measure("C1", ours=[2.0, 2.1, 2.2], baseline=np.array([1.0, 1.1, 1.0]))
    ledger.measure("C2", ours=[0.9, 0.8, 0.85], reason="smaller network")
    ledger.metrics["curve"] = {"x": np.arange(3), "y": np.array([0.1, np.nan, 0.3])}
    written = ledger.write()

    on_disk = json.loads(paths.metrics_path("demo").read_text())
    assert on_disk == written
    for key in ("slug", "title", "arxiv", "profile", "device", "seeds", "runtime_s",
                "peak_memory_mb", "versions", "claims", "metrics"):
        assert key in on_disk
    c1, c2 = on_disk["claims"]
    assert c1["verdict"] == "reproduced" and c1["baseline"]["n"] == 3
    assert c1["criterion"]["test"] == "paired difference, t interval"
    assert c2["verdict"] == "not_reproduced" and c2["reason"] == "smaller network"
    assert c2["criterion"]["ours"] is True
    assert on_disk["metrics"]["curve"]["y"] == [0.1, None, 0.3]
    assert list(ledger.table()["verdict"]) == ["reproduced", "not_reproduced"]


def test_ledger_guards_its_order():
    ledger = _ledger()
    paper = {"value": "1", "source": "Table 1"}
    ledger.claim("C1", "s", paper_value=paper, metric="m", criterion=Criterion("greater"))
    with pytest.raises(ValueError, match="declared twice"):
        ledger.claim("C1", "s", paper_value=paper, metric="m", criterion=Criterion("greater"))
    with pytest.raises(KeyError, match="never declared"):
        ledger.measure("C9", ours=[1, 2])
    with pytest.raises(ValueError, match="never measured"):
        ledger.as_dict()
    with pytest.raises(ValueError, match="'value' and 'source'"):
        ledger.claim("C2", "s", paper_value={"value": 1}, metric="m",
                     criterion=Criterion("greater"))
    with pytest.raises(ValueError, match="needs a note"):
        ledger.claim("C3", "s", paper_value=paper, metric="m",
                     criterion=Criterion("less", threshold=1.0, ours=True))
    ledger.measure("C1", ours=[1, 2], baseline=[0, 0])
    with pytest.raises(ValueError, match="already measured"):
        ledger.measure("C1", ours=[1, 2], baseline=[0, 0])
    with pytest.raises(ValueError, match="profile must be one of"):
        claims.Ledger("x", title="t", arxiv="a", profile="fast", seeds=[0])
