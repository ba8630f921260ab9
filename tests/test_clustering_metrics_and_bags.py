"""Shared pieces of the statistics papers: clustering metrics and bags."""

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score

from repsuite.clustering import metrics
from repsuite.weak import bags as B


def test_misclustering_error_is_invariant_to_renaming_clusters():
    truth = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    pred = np.array([5, 5, 7, 7, 7, 9, 9, 9])  # one point of class 0 lands with class 1
    assert metrics.misclustering_error(truth, pred) == pytest.approx(1 / 8)
    renamed = metrics.match_labels(truth, pred)
    assert accuracy_score(truth, renamed) == pytest.approx(7 / 8)
    assert metrics.misclustering_error(truth, truth[::-1][::-1] + 10) == 0.0


def test_more_clusters_than_classes_leave_unmatched_clusters_wrong():
    truth = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 2, 2])
    assert metrics.misclustering_error(truth, pred) == pytest.approx(0.25)
    assert -1 in metrics.match_labels(truth, pred)


def test_within_cluster_ss_and_rand_index():
    X = np.array([[0.0], [2.0], [10.0], [14.0]])
    assert metrics.within_cluster_ss(X, [0, 0, 1, 1]) == pytest.approx(2.0 + 8.0)
    assert metrics.adjusted_rand([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)


@pytest.mark.parametrize("call, message", [
    (lambda: metrics.misclustering_error([0, 1], [0, 1, 1]), "3 points but labels_true has 2"),
    (lambda: metrics.misclustering_error([], []), "empty"),
    (lambda: metrics.within_cluster_ss([[np.nan]], [0]), "NaN"),
    (lambda: B.make_bags(5, 8, seed=0), "larger than the 5 instances"),
    (lambda: B.check_bags([0, 0, 2]), "without gaps"),
    (lambda: B.check_bags([0, 0, 1], min_size=2), "bag 1 has 1 instance"),
    (lambda: B.bag_proportions([0, 2], [0, 0]), "0/1 labels"),
    (lambda: B.bag_means(np.array([1.0, np.nan]), [0, 0]), "NaN"),
])
def test_bad_input_names_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_random_bags_cover_every_instance_once():
    bags = B.make_bags(103, 10, seed=3)
    assert sorted(B.bag_sizes(bags)) == [3] + [10] * 10
    assert np.array_equal(bags, B.make_bags(103, 10, seed=3))
    dropped = B.make_bags(103, 10, seed=3, drop_last=True)
    assert (dropped == -1).sum() == 3 and B.bag_sizes(dropped).tolist() == [10] * 10


def test_bag_means_numpy_torch_and_operator_agree():
    rng = np.random.default_rng(0)
    bags = B.make_bags(30, 4, seed=1)
    v = rng.normal(size=(30, 2))
    means = B.bag_means(v, bags)
    torch.testing.assert_close(B.bag_means(torch.as_tensor(v), bags), torch.as_tensor(means))
    P = B.bag_operator(bags, dense=True)
    torch.testing.assert_close(P @ torch.as_tensor(v), torch.as_tensor(means[bags]))
    torch.testing.assert_close(B.bag_operator(bags).to_dense(), P)
    torch.testing.assert_close(P @ P, P)  # an averaging operator is a projection


def test_proportion_loss_is_bce_of_bag_means_and_is_differentiable():
    bags = np.array([0, 0, 1, 1, 1])
    y = np.array([1, 0, 1, 1, 1])  # the second bag's labels are all equal
    props = B.bag_proportions(y, bags)
    assert props.tolist() == [0.5, 1.0]
    p = torch.tensor([0.2, 0.6, 0.9, 0.7, 0.8], requires_grad=True)
    loss = B.proportion_loss(p, bags, props)
    m = torch.tensor([0.4, 0.8])
    expected = -(0.5 * m[0].log() + 0.5 * (1 - m[0]).log() + m[1].log()) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(p.grad).all()
