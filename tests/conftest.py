import os

import pytest
import torch
from threadpoolctl import threadpool_limits

# Figures must stay in the notebooks: never let an inherited Agg backend reach the kernels.
os.environ.pop("MPLBACKEND", None)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' problems are small (tiny online steps, small eigendecompositions, k-means on a few
    hundred points): handing work between threads costs more than it saves, and on a busy machine
    far more. The notebooks' kernels run in their own processes and set their own threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)
