"""repsuite: replications of machine-learning papers on one shared PyTorch library.

The core modules (`paths`, `seeding`, `stats`, `claims`, `params`, `run`, `report`, `index`, `data`)
are shared by every paper; each method family lives in a subpackage of its own.
"""

__version__ = "0.1.0"
