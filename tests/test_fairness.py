"""The shared fairness pieces: metrics against fairlearn, stream bookkeeping, the tables."""

import numpy as np
import pytest
import torch
from fairlearn import metrics as fl

from repsuite import data
from repsuite.fairness import metrics, stream


@pytest.fixture
def predictions():
    rng = np.random.default_rng(0)
    group = rng.choice(["a", "b", "c"], size=400, p=[0.5, 0.3, 0.2])
    y_true = rng.integers(0, 2, 400)
    y_pred = (rng.random(400) < 0.3 + 0.3 * (group == "a")).astype(int)
    return y_true, y_pred, group


def test_gaps_equal_fairlearn(predictions):
    y_true, y_pred, group = predictions
    assert metrics.demographic_parity_difference(y_pred, group) == pytest.approx(
        fl.demographic_parity_difference(y_true, y_pred, sensitive_features=group), abs=1e-12)
    assert metrics.demographic_parity_ratio(y_pred, group) == pytest.approx(
        fl.demographic_parity_ratio(y_true, y_pred, sensitive_features=group), abs=1e-12)
    assert metrics.equalized_odds_difference(y_true, y_pred, group) == pytest.approx(
        fl.equalized_odds_difference(y_true, y_pred, sensitive_features=group), abs=1e-12)
    assert metrics.equal_opportunity_difference(y_true, y_pred, group) == pytest.approx(
        fl.equal_opportunity_difference(y_true, y_pred, sensitive_features=group), abs=1e-12)


def test_group_report_equals_fairlearn_metric_frame(predictions):
    y_true, y_pred, group = predictions
    frame = fl.MetricFrame(metrics={"selection_rate": fl.selection_rate,
                                    "tpr": fl.true_positive_rate, "fpr": fl.false_positive_rate},
                           y_true=y_true, y_pred=y_pred, sensitive_features=group).by_group
    ours = metrics.group_report(y_true, y_pred, group)
    for column in ["selection_rate", "tpr", "fpr"]:
        np.testing.assert_allclose(ours[column].to_numpy(), frame[column].to_numpy(), atol=1e-12)
    assert ours["n"].sum() == len(group)


def test_scores_give_mean_score_gap():
    scores = np.array([0.2, 0.4, 0.9, 0.7])
    assert metrics.demographic_parity_difference(scores, [0, 0, 1, 1]) == pytest.approx(0.5)


def test_calibration_error_of_a_calibrated_and_a_miscalibrated_score():
    y = np.array([0, 1] * 50)
    assert metrics.expected_calibration_error(y, np.full(100, 0.5)) == pytest.approx(0.0)
    assert metrics.expected_calibration_error(y, np.full(100, 0.9)) == pytest.approx(0.4)


@pytest.mark.parametrize("call, message", [
    (lambda: metrics.demographic_parity_difference([0, 1, 1], [0, 0, 0]), "single group"),
    (lambda: metrics.demographic_parity_difference([0, 1], [0, 1, 1]), "3 rows but"),
    (lambda: metrics.demographic_parity_difference([0, np.nan], [0, 1]), "NaN"),
    (lambda: metrics.true_positive_rates([0, 0, 1], [0, 1, 1], [5, 5, 7]), "group 5 has no pos"),
    (lambda: metrics.false_positive_rates([1, 0, 1], [0, 1, 1], [5, 7, 7]), "group 5 has no neg"),
    (lambda: metrics.equalized_odds_difference([0, 2], [0, 1], [0, 1]), "0/1 labels"),
    (lambda: metrics.demographic_parity_difference([0, 1.5], [0, 1]), r"scores in \[0, 1\]"),
    (lambda: metrics.check_groups([[0, 1]]), "one-dimensional"),
])
def test_bad_input_names_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_group_report_marks_an_undefined_rate_as_nan():
    report = metrics.group_report([0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1])
    assert np.isnan(report.loc[0, "tpr"]) and report.loc[1, "tpr"] == 1.0


def test_prequential_matches_recomputation_on_every_prefix(predictions):
    y_true, y_pred, group = predictions
    run = stream.prequential(y_true, y_pred, group)
    for t in [5, 50, 399]:
        prefix = slice(0, t + 1)
        assert run.online_accuracy[t] == pytest.approx((y_true[prefix] == y_pred[prefix]).mean())
        if len(np.unique(group[prefix])) == 3:
            assert run.dp_gap[t] == pytest.approx(
                metrics.demographic_parity_difference(y_pred[prefix], group[prefix]))
    assert np.isnan(run.dp_gap[0])


def test_stream_orders():
    shuffled = stream.stream_order(10, seed=1)
    assert sorted(shuffled) == list(range(10))
    assert np.array_equal(shuffled, stream.stream_order(10, seed=1))
    key = np.array([3, 1, 2, 1, 3, 2, 1, 2, 3, 1])
    ordered = stream.stream_order(10, seed=1, kind="sorted", key=key)
    assert np.all(np.diff(key[ordered]) >= 0)
    with pytest.raises(ValueError, match="needs a key"):
        stream.stream_order(10, seed=1, kind="sorted")
    assert [w.stop - w.start for w in stream.windows(10, 4)] == [4, 4, 2]


def test_running_means_equal_the_group_means_of_everything_seen():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    groups = torch.randint(0, 2, (50,), generator=gen)
    running = stream.RunningGroupMeans(2, shape=(3,), dtype=torch.float64)
    for start in range(0, 50, 7):
        running.update(values[start:start + 7], groups[start:start + 7])
    for g in (0, 1):
        torch.testing.assert_close(running.mean(g), values[groups == g].mean(0))
        assert running.count(g) == int((groups == g).sum())
    torch.testing.assert_close(running.gap(1, 0), values[groups == 1].mean(0)
                               - values[groups == 0].mean(0))


def test_running_means_with_momentum_and_unseen_groups():
    running = stream.RunningGroupMeans(3, momentum=0.5)
    running.update(torch.tensor([2.0]), torch.tensor([0]))
    running.update(torch.tensor([4.0]), torch.tensor([0]))
    assert running.mean(0).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="group 2 has not appeared"):
        running.mean(2)
    with pytest.raises(ValueError, match="group codes must be in 0..2"):
        running.update(torch.tensor([1.0]), torch.tensor([3]))
    with pytest.raises(ValueError, match="shape"):
        running.update(torch.ones(2, 2), torch.tensor([0, 1]))


@pytest.mark.parametrize("name, n, attrs", [
    ("adult", 48842, {"sex": 2, "race": 5}), ("compas", 6172, {"race": 4, "sex": 2}),
    ("german", 1000, {"sex": 2, "age": 2}), ("hmda", 2380, {"black": 2}),
])
def test_fairness_tables(name, n, attrs):
    table = data.load_table(name)
    assert table.X.shape == (n, len(table.features)) and table.y.shape == (n,)
    assert set(np.unique(table.y)) == {0, 1} and not np.isnan(table.X).any()
    for attr, n_levels in attrs.items():
        codes = table.group(attr)
        assert len(table.levels[attr]) == n_levels and set(np.unique(codes)) == set(range(n_levels))
    # Sex and race never enter the features; German credit's age band is derived from its age
    # feature, which stays.
    assert not {"sex", "race", "black"} & set(table.features)
    with pytest.raises(KeyError, match="no sensitive attribute 'zip'"):
        table.group("zip")


def test_fairness_tables_known_values():
    # Published counts: Adult's 48,842 rows with 11,687 above 50K; ProPublica's filtered COMPAS
    # sample of 6,172 with 3,175 African-American defendants; German credit's 700 good risks;
    # Boston HMDA's 2,380 applications with 285 denials.
    assert data.load_table("adult").y.sum() == 11687
    assert (data.load_table("compas").group("race") == 0).sum() == 3175
    assert data.load_table("german").y.sum() == 700
    assert data.load_table("hmda").y.sum() == 285


def test_arrays_dataset_is_not_a_table():
    with pytest.raises(ValueError, match="no sensitive attributes"):
        data.load_table("iris")
