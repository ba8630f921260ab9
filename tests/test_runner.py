"""The runner: parameter checks before any work, execution, failure reporting, offline reports."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from repsuite import params, run
from repsuite.params import ParamsError, resolve
from repsuite.report import REMOTE

FIXTURE = Path(__file__).parent / "fixtures" / "minimal.ipynb"
DECLARED = {"profile": "cpu", "seed": 0, "n_seeds": 3, "lr": 0.1, "flag": False, "names": ["a"]}


def test_resolve_applies_profile_overrides():
    section = {"n_seeds": 5, "lr": 0.2, "profiles": {"smoke": {"n_seeds": 2}, "gpu": {"lr": 1}}}
    assert resolve("p", section, DECLARED, "cpu") == {"n_seeds": 5, "lr": 0.2, "profile": "cpu"}
    assert resolve("p", section, DECLARED, "smoke")["n_seeds"] == 2
    assert resolve("p", section, DECLARED, "gpu")["lr"] == 1


@pytest.mark.parametrize("section, profile, match", [
    ({"n_seed": 5}, "cpu", r"unknown parameter papers\.p\.n_seed; .* takes: flag, lr, n_seeds"),
    ({"profiles": {"smoke": {"epochs": 1}}}, "smoke", r"unknown parameter papers\.p\.profiles"),
    ({"n_seeds": "5"}, "cpu", r"papers\.p\.n_seeds = '5' is a str; the notebook's n_seeds is an"),
    ({"n_seeds": 2.5}, "cpu", r"is a float; the notebook's n_seeds is an int"),
    ({"flag": 1}, "cpu", r"p\.flag = 1 is an int; the notebook's flag is a bool"),
    ({"n_seeds": True}, "cpu", r"is a bool"),
    ({"names": "a"}, "cpu", r"is a str; the notebook's names is a list"),
    ({"profile": "gpu"}, "cpu", r"set by the runner"),
    ({"profiles": {"fast": {}}}, "cpu", r"papers\.p\.profiles\.fast is not a profile"),
    ({"profiles": {"smoke": {"n_seeds": "2"}}}, "cpu",
     r"papers\.p\.profiles\.smoke\.n_seeds = '2' is a str"),
    ({}, "huge", r"unknown profile 'huge'; choose one of smoke, cpu, gpu"),
])
def test_resolve_rejects_bad_sections(section, profile, match):
    with pytest.raises(ParamsError, match=match):
        resolve("p", section, DECLARED, profile)


def test_resolve_accepts_int_for_float():
    assert resolve("p", {"lr": 1}, DECLARED, "cpu")["lr"] == 1


def _fake_repo(tmp_path, section, notebook=FIXTURE):
    (tmp_path / "notebooks").mkdir(parents=True)
    if notebook is not None:
        shutil.copy(notebook, tmp_path / "notebooks" / "minimal.ipynb")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"papers": {"minimal": section}}))
    return tmp_path


def test_prepare_reads_the_notebook_parameters(tmp_path):
    root = _fake_repo(tmp_path, {"n_seeds": 4})
    notebook, resolved = run.prepare("minimal", "smoke", root)
    assert notebook.name == "minimal.ipynb"
    assert resolved == {"n_seeds": 4, "profile": "smoke"}
    assert params.notebook_parameters(notebook)["effect"] == 1.0


@pytest.mark.parametrize("slug, section, notebook, match", [
    ("other", {}, FIXTURE, r"unknown paper 'other'; params.yaml has: minimal"),
    ("minimal", {}, None, r"notebooks/minimal.ipynb not found"),
    ("minimal", {"epochs": 3}, FIXTURE, r"unknown parameter papers.minimal.epochs"),
])
def test_run_fails_before_any_work(tmp_path, capsys, slug, section, notebook, match):
    root = _fake_repo(tmp_path / "repo", section, notebook)
    out = tmp_path / "out"
    assert run.run(slug, "smoke", out, root) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(match, err)
    assert not out.exists()


def test_run_executes_and_renders_an_offline_report(tmp_path):
    root = _fake_repo(tmp_path / "repo", {"n_seeds": 3})
    out = tmp_path / "out"
    assert run.run("minimal", "smoke", out, root) == 0
    metrics = json.loads((out / "reports/metrics/minimal.json").read_text())
    assert metrics["profile"] == "smoke" and metrics["seeds"] == [0, 1, 2]
    assert metrics["wall_s"] >= metrics["runtime_s"]
    html = (out / "reports/minimal.html").read_text()
    assert "data:image/png;base64" in html, "the figure is not embedded"
    assert [p.name for p in (out / "reports/figures/minimal").iterdir()] == ["fig-01.png"]
    assert "MathJax" in html, "math would not render"
    assert not REMOTE.search(html)
    assert "require.js" not in html and "cdnjs" not in html
    assert "enableEnrichment: false" in html, "MathJax's speech maps would load from a CDN"


def test_run_failure_prints_the_cell_error_first_and_keeps_previous_results(tmp_path):
    root = _fake_repo(tmp_path / "repo", {"n_seeds": 3})
    out = tmp_path / "out"
    assert run.run("minimal", "smoke", out, root) == 0
    before = {p: p.read_bytes() for p in (out / "reports").rglob("*") if p.is_file()}

    (root / "params.yaml").write_text(yaml.safe_dump({"papers": {"minimal": {"fail": True}}}))
    code = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from repsuite import run; "
         f"sys.exit(run.run('minimal', 'smoke', Path(r'{out}'), Path(r'{root}')))"],
        capture_output=True, text=True,
    )
    assert code.returncode == 1
    assert code.stderr.startswith("error: minimal failed at cell In[")
    assert "ValueError: failing on purpose" in code.stderr.splitlines()[0]
    assert (out / "reports/failed/minimal.html").exists()
    after = {p: p.read_bytes() for p in (out / "reports").rglob("*")
             if p.is_file() and "failed" not in p.parts}
    assert after == before, "a failed run changed the previous results"
    assert not list((out / "reports").glob(".staging-*"))

    (root / "params.yaml").write_text(yaml.safe_dump({"papers": {"minimal": {}}}))
    assert run.run("minimal", "smoke", out, root) == 0
    assert not (out / "reports/failed/minimal.html").exists(), "a stale failure report remains"


def test_a_trial_at_another_profile_does_not_touch_the_pipelines_results(tmp_path):
    root = _fake_repo(tmp_path, {"n_seeds": 2})
    assert run.run("minimal", "smoke", None, root) == 0
    assert (root / "build/runs/smoke/reports/metrics/minimal.json").exists()
    assert not (root / "reports").exists()


def test_cli_rejects_unknown_slug():
    proc = subprocess.run([sys.executable, "-m", "repsuite.run", "no-such-paper"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown paper 'no-such-paper'; params.yaml has:")
