"""The data layer: named datasets from the packages that ship them, exported byte-stable."""

import numpy as np
import pytest

from repsuite import data

SHAPES = {"pima": ((768, 8), 268), "satimage": ((6435, 36), 626), "page_blocks0": ((5472, 10), 559)}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_imbalanced_sets_load_with_their_minority(name):
    X, y = data.SOURCES[name].build()
    shape, minority = SHAPES[name]
    assert X.shape == shape and set(np.unique(y)) == {0, 1} and y.sum() == minority
    assert np.isfinite(X).all()


def test_mnist_subset_is_the_real_5k():
    X, y = data.SOURCES["mnist5k"].build()
    assert X.shape == (5000, 784) and X.dtype == np.uint8
    assert np.bincount(y).tolist() == [500] * 10


def test_export_round_trip_and_load_prefers_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data.paths, "data_dir", lambda: tmp_path)
    data.export("iris")
    X, y = data.load("iris")
    Xs, ys = data.SOURCES["iris"].build()
    assert np.array_equal(X, Xs) and np.array_equal(y, ys)
    first = (tmp_path / "iris.npz").read_bytes()
    data.export("iris")
    assert (tmp_path / "iris.npz").read_bytes() == first, "re-export changed the bytes"


def test_unknown_dataset_names_the_choices():
    with pytest.raises(KeyError, match="unknown dataset 'mnist'; known datasets: .*mnist5k"):
        data.load("mnist")
    assert data.main(["nope"]) == 2
