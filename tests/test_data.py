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


@pytest.mark.parametrize("name, shape, target", [
    ("diabetes", (442, 10), 152.1335), ("california", (20640, 8), 2.0686),
    ("diamonds", (53940, 9), 3932.7997),
])
def test_regression_sets_keep_their_continuous_target(name, shape, target):
    X, y = data.load(name)
    assert X.shape == shape and y.dtype == np.float64 and not np.isnan(X).any()
    assert y.mean() == pytest.approx(target, abs=1e-4)


@pytest.mark.parametrize("name, counts", [
    # 1,610 diamonds of Fair cut (as ggplot2 documents); 821 one-star reviews among the 22,641
    # with a text.
    ("diamonds_cut", [1610, 4906, 12082, 13791, 21551]),
    ("reviews", [821, 1549, 2823, 4908, 12540]),
])
def test_ordinal_sets_keep_their_rare_end_class(name, counts):
    X, y = data.load(name)
    assert y.dtype == np.int64 and np.bincount(y).tolist() == counts
    assert len(X) == sum(counts) and np.isfinite(X).all()
