import os

# Figures must stay in the notebooks: never let an inherited Agg backend reach the kernels.
os.environ.pop("MPLBACKEND", None)
