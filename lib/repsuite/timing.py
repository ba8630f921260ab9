"""Wall-clock measurement shared by `make bench` and the libraries' own bench functions.

Kept apart from `repsuite.bench`, which imports every method family: a library module that times
itself must not depend on all of them.
"""

import time

import torch


def best_of(fn, repeats: int = 5, device=None) -> float:
    """Seconds of the fastest of `repeats` calls of `fn()`, after one warm-up call (first-call
    costs are not what is compared); CUDA work is waited for on a CUDA `device`."""
    on_cuda = torch.device(device or "cpu").type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)
