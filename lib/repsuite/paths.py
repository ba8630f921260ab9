"""Where things live: the repository root and the folders the pipeline reads and writes.

Notebooks run with the repository root as working directory under papermill and DVC, and with
`notebooks/` as working directory in JupyterLab. Paths are therefore never taken relative to the
working directory: the root is found from this file's location (the package sits in
`<root>/lib/repsuite`). The runner sets `REPSUITE_OUTPUT` to send a run's reports elsewhere (the
tests use a temporary folder).
"""

import os
from pathlib import Path

OUTPUT_ENV = "REPSUITE_OUTPUT"


def repo_root() -> Path:
    """The repository root: the nearest folder above this package that holds `dvc.yaml`."""
    here = Path(__file__).resolve().parent
    for folder in here.parents:
        if (folder / "dvc.yaml").exists():
            return folder
    raise FileNotFoundError(
        f"no dvc.yaml found above {here}: repsuite must run from a checkout of the repository"
    )


def output_root() -> Path:
    """Where a run writes `reports/`: `$REPSUITE_OUTPUT` when set, else the repository root."""
    override = os.environ.get(OUTPUT_ENV)
    return Path(override).resolve() if override else repo_root()


def reports_dir() -> Path:
    return output_root() / "reports"


def metrics_path(slug: str) -> Path:
    return reports_dir() / "metrics" / f"{slug}.json"


def figures_dir(slug: str) -> Path:
    path = reports_dir() / "figures" / slug
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    return repo_root() / "data"
