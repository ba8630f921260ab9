"""repsuite: replications of machine-learning papers on one shared PyTorch library.

The core modules (`paths`, `seeding`, `stats`, `claims`, `params`, `run`, `report`, `index`, `data`,
`pipeline`) are shared by every paper; each method family lives in a subpackage of its own.
"""

import importlib.util
import sys

__version__ = "0.1.0"

# DVC stage commands call `python`: outside the project's environment the first missing package
# would otherwise surface as a bare ModuleNotFoundError somewhere deep in an import.
_missing = [name for name in ("torch", "papermill", "nbformat", "yaml")
            if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(
        f"repsuite needs {', '.join(_missing)}, which {sys.executable} does not have: activate the "
        "project's environment (`source .venv/bin/activate`, after `make setup`) and run again"
    )
