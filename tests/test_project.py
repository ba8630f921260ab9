"""Contracts of the project as a whole: pins, lint, notebooks, params and stages agree."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from repsuite import data, pipeline
from repsuite.paths import repo_root

ROOT = repo_root()
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _pins(lines):
    return {ln.strip() for ln in lines if re.match(r"^[A-Za-z0-9_.\-\[\]]+==\S+$", ln.strip())}


def test_environment_yml_mirrors_requirements():
    reqs = _pins((ROOT / "requirements.txt").read_text().splitlines())
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert set(pip_section) == reqs
    assert "python=3.11" in env["dependencies"]


def test_every_requirement_is_pinned():
    for name in ("requirements.txt", "requirements-nodeps.txt"):
        lines = [ln.strip() for ln in (ROOT / name).read_text().splitlines()
                 if ln.strip() and not ln.startswith("#")]
        assert lines and all("==" in ln for ln in lines), f"{name} has an unpinned line"
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text()


def test_ruff_is_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "lib", "tests", "notebooks"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_notebook_has_a_params_section_and_a_stage_and_vice_versa():
    slugs = {p.stem for p in NOTEBOOKS}
    assert slugs == set(PARAMS["papers"])
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert dvc["stages"]["paper"]["foreach"] == "${papers}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean_with_a_sourced_parameters_cell(notebook):
    nb = json.loads(notebook.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    tagged = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged `parameters`"
    for line in "".join(tagged[0]["source"]).splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line, f"parameter without a comment naming its source: {line}"
    assert any("profile =" in ln for ln in "".join(tagged[0]["source"]).splitlines())
    source = "".join("".join(c["source"]) for c in code)
    assert "%matplotlib inline" in source
    assert not re.search(r"matplotlib\.use\(\s*['\"]agg|MPLBACKEND", source, re.I), "figures vanish"


def test_data_stages_cover_every_dataset_a_paper_uses():
    declared = set(PARAMS["datasets"])
    assert declared <= set(data.SOURCES)
    for slug, section in PARAMS["papers"].items():
        used = pipeline.paper_dependencies(slug, section, ROOT)["data"]
        missing = {Path(p).stem for p in used} - declared
        assert not missing, f"{slug} uses {missing}, which params.yaml: datasets does not export"


def test_dependency_scan_follows_imports_transitively(tmp_path):
    lib = tmp_path / "lib"
    (lib / "repsuite/family").mkdir(parents=True)
    (lib / "repsuite/__init__.py").write_text("")
    (lib / "repsuite/family/__init__.py").write_text("from .method import thing\n")
    (lib / "repsuite/family/method.py").write_text("from repsuite import stats\nthing = 1\n")
    (lib / "repsuite/stats.py").write_text("")
    (lib / "repsuite/other.py").write_text("")
    names = pipeline.imported_modules("from repsuite.family import thing\n")
    files = {p.relative_to(lib).as_posix() for p in pipeline.module_files(names, lib)}
    assert files == {"repsuite/__init__.py", "repsuite/family/__init__.py",
                     "repsuite/family/method.py", "repsuite/stats.py"}


def test_each_method_family_is_a_dependency_of_its_own_papers_only():
    """Editing one method family reruns only the papers that import it."""
    users = {}
    for slug, section in PARAMS["papers"].items():
        for module in pipeline.paper_dependencies(slug, section, ROOT)["modules"]:
            parts = Path(module).parts
            if len(parts) > 3:  # lib/repsuite/<family>/<file>
                users.setdefault(parts[2], set()).add(slug)
    expected = {"oversampling": {"smote"}, "optim": {"adamp"}, "merging": {"lmc-weight-matching"},
                "federated": {"fedau", "fedamd-anchor-sampling", "frl", "fl-unlimited-staleness",
                              "flag-aggregator"},
                "fairness": {"aranyani", "predictive-multiplicity", "equitable-sampling", "feamoe",
                             "groupwise-regret"},
                "regression": {"quantile-aggregation", "presto"},
                "clustering": {"ppp-clustering", "ila-sdp"},
                "weak": {"aggregate-responses", "llp-bp"}}
    for family, slugs in expected.items():
        if slugs <= set(PARAMS["papers"]):
            assert users.get(family) == slugs, f"{family} is used by {users.get(family)}"


def test_dvc_config_is_offline():
    config = (ROOT / ".dvc/config").read_text()
    assert re.search(r"analytics\s*=\s*false", config)
    assert re.search(r"check_update\s*=\s*false", config)
    assert "__pycache__" in (ROOT / ".dvcignore").read_text()


def test_each_paper_module_is_a_dependency_of_its_own_paper_only():
    """Papers of one family share its core; each paper's own modules rerun only that paper."""
    owners = {"federated/fedau": "fedau", "federated/fedau_runs": "fedau",
              "federated/fedau_experiment": "fedau", "federated/fedamd": "fedamd-anchor-sampling",
              "federated/frl": "frl", "federated/frl_experiment": "frl",
              "federated/staleness": "fl-unlimited-staleness",
              "federated/staleness_runs": "fl-unlimited-staleness",
              "federated/flag": "flag-aggregator", "federated/flag_experiment": "flag-aggregator",
              "fairness/aranyani": "aranyani", "fairness/aranyani_experiment": "aranyani",
              "fairness/multiplicity": "predictive-multiplicity",
              "fairness/multiplicity_experiment": "predictive-multiplicity",
              "fairness/sampling": "equitable-sampling",
              "fairness/sampling_experiment": "equitable-sampling",
              "fairness/feamoe": "feamoe", "fairness/feamoe_experiment": "feamoe",
              "fairness/groupwise": "groupwise-regret",
              "fairness/groupwise_experiment": "groupwise-regret",
              "regression/quantile": "quantile-aggregation",
              "regression/quantile_aggregation": "quantile-aggregation",
              "regression/quantile_experiment": "quantile-aggregation",
              "regression/ordinal": "presto", "regression/presto_experiment": "presto",
              "clustering/ppp": "ppp-clustering", "clustering/ppp_experiment": "ppp-clustering",
              "clustering/sdp": "ila-sdp", "clustering/sdp_experiment": "ila-sdp",
              "weak/aggregate": "aggregate-responses",
              "weak/aggregate_experiment": "aggregate-responses",
              "weak/llp_bp": "llp-bp", "weak/llp_training": "llp-bp",
              "weak/llp_experiment": "llp-bp"}
    deps = {slug: pipeline.paper_dependencies(slug, section, ROOT)["modules"]
            for slug, section in PARAMS["papers"].items()}
    for module, owner in owners.items():
        if owner not in deps:
            continue
        users = {slug for slug, modules in deps.items()
                 if f"lib/repsuite/{module}.py" in modules}
        assert users == {owner}, f"{module}.py is used by {users}"
