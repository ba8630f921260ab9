"""Progress bars: tqdm's notebook-aware bar where a person watches, silence in headless runs.

The runner sets `REPSUITE_HEADLESS=1` for the kernels it starts: nobody watches those bars, and in
the HTML reports each update would become a line of text.
"""

import os

from tqdm.auto import tqdm

HEADLESS_ENV = "REPSUITE_HEADLESS"


def bar(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    """`tqdm.auto.tqdm(iterable, **kwargs)`, disabled when not `enabled` or in a headless run."""
    headless = os.environ.get(HEADLESS_ENV) == "1"
    return tqdm(iterable, disable=headless or not enabled, **kwargs)
