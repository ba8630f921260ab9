"""SMOTE, SMOTE-NC, samplers, ROC hulls and the CV protocol: checked against imbalanced-learn."""

import numpy as np
import pytest
import torch
from imblearn.over_sampling import SMOTE as ImbSMOTE
from imblearn.over_sampling import SMOTENC as ImbSMOTENC
from sklearn.neighbors import NearestNeighbors

from repsuite import data, seeding
from repsuite.oversampling import protocol, roc
from repsuite.oversampling.smote import (
    SMOTE,
    SMOTENC,
    RandomOverSampler,
    RandomUnderSampler,
    knn_indices,
    median_std,
    n_majority_kept,
    nominal_vote,
    resample,
    smotenc_distances,
)


def imbalanced(n_major=120, n_minor=30, n_features=4, seed=0):
    rng = np.random.default_rng(seed)
    X = np.vstack([rng.normal(0, 1, (n_major, n_features)),
                   rng.normal(1.5, 1, (n_minor, n_features))])
    y = np.r_[np.zeros(n_major, int), np.ones(n_minor, int)]
    return X, y


def segment_residuals(X_min, synthetic, neighbors):
    """For each synthetic point, the best (residual, u) over every minority point and neighbour,
    fitting ONE scalar u per point: s = x + u (x_nn - x)."""
    best = []
    for s in synthetic:
        cands = []
        for i, x in enumerate(X_min):
            for j in neighbors[i]:
                d = X_min[j] - x
                u = float((s - x) @ d / (d @ d))
                cands.append((float(np.linalg.norm(s - x - u * d)), u))
        best.append(min(cands))
    return np.array(best)


# --------------------------------------------------------------------------------------------------
# SMOTE against imbalanced-learn


def test_neighbours_match_imblearn():
    X, y = imbalanced()
    imb = ImbSMOTE(k_neighbors=5, random_state=0)
    imb.fit_resample(X, y)
    X_min = X[y == 1]
    theirs = imb.nn_k_.kneighbors(X_min, return_distance=False)[:, 1:]
    ours = knn_indices(torch.as_tensor(X_min), 5).numpy()
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.77, 1.0])
def test_counts_match_imblearn_sampling_ratio(ratio):
    X, y = imbalanced()
    _, y_imb = ImbSMOTE(sampling_strategy=ratio, random_state=0).fit_resample(X, y)
    _, y_ours = SMOTE(sampling_ratio=ratio, seed=0).fit_resample(X, y)
    np.testing.assert_array_equal(np.bincount(y_ours), np.bincount(y_imb))


@pytest.mark.parametrize("amount, expected", [(50, 15), (100, 30), (250, 75), (300, 90), (0, 0)])
def test_amount_gives_paper_counts(amount, expected):
    X, y = imbalanced()
    sm = SMOTE(amount, seed=1)
    X_res, y_res = sm.fit_resample(X, y)
    assert (y_res == 1).sum() == 30 + expected and (y_res == 0).sum() == 120
    np.testing.assert_array_equal(X_res[:len(X)], X)  # originals first, untouched
    base = np.bincount(sm.last_draw.base.numpy(), minlength=30)
    # Multiples of 100 seed every sample N/100 times; the remainder comes from distinct samples.
    assert base.min() >= amount // 100 and base.max() <= amount // 100 + 1


def test_synthetic_points_lie_on_segments_to_k_neighbours_with_one_gap():
    X, y = imbalanced(n_minor=20, n_features=3, seed=3)
    X_min = X[y == 1]
    sm = SMOTE(200, k_neighbors=5, seed=0)
    X_res, _ = sm.fit_resample(X, y)
    synthetic = X_res[len(X):]
    neighbors = knn_indices(torch.as_tensor(X_min), 5).numpy()
    best = segment_residuals(X_min, synthetic, neighbors)
    assert np.all(best[:, 0] < 1e-9)
    assert np.all((best[:, 1] >= 0) & (best[:, 1] <= 1))

    # The draw's own record agrees: x_nn among the base's k neighbours, s = x + u (x_nn - x).
    d = sm.last_draw
    base, nn, gap = d.base.numpy(), d.neighbor.numpy(), d.gap.numpy()
    assert all(nn[i] in neighbors[base[i]] for i in range(len(base)))
    np.testing.assert_allclose(synthetic, X_min[base] + gap[:, None] * (X_min[nn] - X_min[base]))


def test_segment_check_rejects_a_gap_per_feature():
    # The pseudocode reading (a gap per attribute) leaves the segment: the check must see it.
    X, y = imbalanced(n_minor=20, n_features=3, seed=3)
    X_min = X[y == 1]
    neighbors = knn_indices(torch.as_tensor(X_min), 5).numpy()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 20, 10)
    nn = neighbors[base, rng.integers(0, 5, 10)]
    per_feature = X_min[base] + rng.random((10, 3)) * (X_min[nn] - X_min[base])
    assert np.all(segment_residuals(X_min, per_feature, neighbors)[:, 0] > 1e-6)


def test_imblearn_output_passes_the_same_segment_check():
    X, y = imbalanced(n_minor=20, n_features=3, seed=3)
    X_res, _ = ImbSMOTE(k_neighbors=5, random_state=0).fit_resample(X, y)
    X_min = X[y == 1]
    neighbors = knn_indices(torch.as_tensor(X_min), 5).numpy()
    best = segment_residuals(X_min, X_res[len(X):][:30], neighbors)
    assert np.all(best[:, 0] < 1e-9)


def test_same_seed_same_output_other_seed_other_output():
    X, y = imbalanced()
    a = SMOTE(200, seed=4).fit_resample(X, y)[0]
    b = SMOTE(200, seed=4).fit_resample(X, y)[0]
    c = SMOTE(200, seed=5).fit_resample(X, y)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_output_lies_on_segments():
    X, y = imbalanced(n_minor=20, n_features=3, seed=3)
    X_res, _ = SMOTE(100, seed=0, device="cuda").fit_resample(X, y)
    X_min = X[y == 1]
    neighbors = knn_indices(torch.as_tensor(X_min), 5).numpy()
    assert np.all(segment_residuals(X_min, X_res[len(X):], neighbors)[:, 0] < 1e-9)


# --------------------------------------------------------------------------------------------------
# Edge cases and clear errors


def test_k_neighbours_must_be_below_minority_count():
    X, y = imbalanced(n_minor=5)
    with pytest.raises(ValueError, match="k_neighbors=5 needs at least 6 minority samples"):
        SMOTE(100, k_neighbors=5).fit_resample(X, y)
    SMOTE(100, k_neighbors=4).fit_resample(X, y)  # the largest k that fits


def test_single_minority_sample_is_refused():
    X, y = imbalanced(n_minor=1)
    with pytest.raises(ValueError, match="at least 2 minority samples"):
        SMOTE(100, k_neighbors=1).fit_resample(X, y)


def test_nan_and_shape_mismatch_and_classes():
    X, y = imbalanced()
    X_nan = X.copy()
    X_nan[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite values \(first at row 3, column 2\)"):
        SMOTE().fit_resample(X_nan, y)
    with pytest.raises(ValueError, match="X has 150 rows but y has 149 labels"):
        SMOTE().fit_resample(X, y[:-1])
    with pytest.raises(ValueError, match="one-vs-rest"):
        SMOTE().fit_resample(X, np.arange(len(y)) % 3)
    with pytest.raises(ValueError, match="single class"):
        SMOTE().fit_resample(X, np.zeros(len(y)))
    with pytest.raises(ValueError, match="X must be 2-D"):
        SMOTE().fit_resample(X[:, 0], y)


def test_amount_and_ratio_errors():
    X, y = imbalanced()
    with pytest.raises(ValueError, match="not both"):
        SMOTE(100, sampling_ratio=0.5)
    with pytest.raises(ValueError, match="over-sampling cannot remove samples"):
        SMOTE(sampling_ratio=0.1).fit_resample(X, y)
    with pytest.raises(ValueError, match=r"amount must be >= 0"):
        SMOTE(-10)


def test_identical_minority_points_give_finite_copies():
    X, y = imbalanced()
    X[y == 1] = X[y == 1][0]
    X_res, _ = SMOTE(300, seed=0).fit_resample(X, y)
    assert np.all(np.isfinite(X_res))
    np.testing.assert_allclose(X_res[len(X):], np.broadcast_to(X[y == 1][0], (90, 4)))


def test_self_is_never_its_own_neighbour_with_duplicates():
    X = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    nn = knn_indices(X, 1).squeeze(1).tolist()
    assert nn == [1, 0, 0, 2]


# --------------------------------------------------------------------------------------------------
# Replication and under-sampling


def test_replication_copies_each_minority_sample_n_over_100_times():
    X, y = imbalanced()
    X_res, y_res = RandomOverSampler(300, seed=0).fit_resample(X, y)
    copies = X_res[len(X):]
    assert len(copies) == 90
    _, counts = np.unique(copies, axis=0, return_counts=True)
    assert set(counts.tolist()) == {3}


def test_under_sampling_follows_the_papers_example():
    # Section 4.3: 50 minority and 200 majority samples under-sampled at 200% keep 25 majority ones.
    assert n_majority_kept(50, 200, 200) == 25
    assert n_majority_kept(50, 200, 10) == 200  # never more than there are
    X, y = imbalanced(n_major=200, n_minor=50)
    _, y_res = RandomUnderSampler(200, seed=0).fit_resample(X, y)
    assert np.bincount(y_res).tolist() == [25, 50]


def test_smote_plus_under_keeps_as_many_majority_as_plain_under():
    X, y = imbalanced(n_major=200, n_minor=50)
    _, y_under = resample(X, y, over=None, under_amount=150, under_seed=7)
    Xs, y_smote = resample(X, y, over="smote", amount=300, under_amount=150, seed=1, under_seed=7)
    assert (y_under == 0).sum() == (y_smote == 0).sum() == 33
    assert (y_smote == 1).sum() == 200
    maj_under = resample(X, y, over=None, under_amount=150, under_seed=7)[0][y_under == 0]
    np.testing.assert_array_equal(maj_under, Xs[y_smote == 0])  # the same majority subset


# --------------------------------------------------------------------------------------------------
# SMOTE-NC


def test_smotenc_distance_on_the_papers_example():
    # Section 6.1, Table 6: F1 = (1 2 3 A B C), F2 = (4 6 5 A D E): two nominal mismatches.
    cont = torch.tensor([[1.0, 2, 3], [4, 6, 5], [3, 5, 6]], dtype=torch.float64)
    codes = torch.tensor([[0, 0, 0], [0, 1, 1], [0, 0, 2]])
    med = torch.tensor(0.7, dtype=torch.float64)
    d = smotenc_distances(cont, codes, med)
    assert d[0, 1].item() == pytest.approx(np.sqrt(9 + 16 + 4 + 2 * 0.49))
    assert d[0, 2].item() == pytest.approx(np.sqrt(4 + 9 + 9 + 1 * 0.49))


def test_smotenc_penalty_changes_the_nearest_neighbour():
    # q is nearer in the continuous features but differs in the nominal one; r matches it.
    X = np.array([[0.0, 0.0, 1], [0.5, 0.0, 2], [0.0, 0.8, 1], [5.0, 5.0, 1], [6, 4, 2], [9, 9, 1]])
    y = np.array([1, 1, 1, 1, 1, 0])
    sm = SMOTENC([2], 100, k_neighbors=1, seed=0, minority_label=1)
    sm.fit_resample(X, y)
    assert sm.median_std_ > 0.8  # large enough to outweigh the 0.3 gap in continuous distance
    draw = sm.last_draw
    nn_of_first = draw.neighbor[draw.base == 0].tolist()
    assert nn_of_first == [2]


def test_nominal_value_is_the_neighbours_majority():
    codes = torch.tensor([[[7, 1], [7, 2], [9, 2]]])  # one sample, k = 3, two nominal features
    got = nominal_vote(codes, seeding.generator(0))
    assert got.tolist() == [[7, 2]]


def smotenc_hand_case():
    # Two tight minority clusters that differ in their nominal value; k = 2 keeps neighbours inside.
    rng = np.random.default_rng(0)
    a = np.c_[rng.normal(0, 0.1, (3, 2)), np.full(3, 4.0)]
    b = np.c_[rng.normal(5, 0.1, (3, 2)), np.full(3, 8.0)]
    maj = np.c_[rng.normal(2.5, 1, (12, 2)), rng.choice([4.0, 8.0], 12)]
    return np.vstack([a, b, maj]), np.r_[np.ones(6, int), np.zeros(12, int)]


def test_smotenc_matches_imblearn_on_a_hand_case():
    X, y = smotenc_hand_case()
    ours = SMOTENC([2], sampling_ratio=1.0, k_neighbors=2, seed=0)
    X_o, y_o = ours.fit_resample(X, y)
    imb = ImbSMOTENC(categorical_features=[2], sampling_strategy=1.0, k_neighbors=2,
                     random_state=0)
    X_i, y_i = imb.fit_resample(X, y)
    np.testing.assert_array_equal(np.bincount(y_o), np.bincount(y_i))
    assert ours.median_std_ == pytest.approx(imb.median_std_[1])
    assert ours.median_std_ == pytest.approx(median_std(torch.as_tensor(X[y == 1][:, :2])).item())
    for X_new in (X_o[len(X):], X_i[len(X):]):
        cluster_b = X_new[:, 0] > 2.5
        assert np.all(X_new[cluster_b, 2] == 8.0) and np.all(X_new[~cluster_b, 2] == 4.0)

    # The neighbours equal those of imbalanced-learn's encoding: one-hot scaled by med / sqrt(2).
    X_min = X[y == 1]
    enc = np.c_[X_min[:, :2], (X_min[:, 2:] == [4.0, 8.0]) * imb.median_std_[1] / np.sqrt(2)]
    theirs = NearestNeighbors(n_neighbors=3).fit(enc).kneighbors(enc, return_distance=False)[:, 1:]
    draw = ours.last_draw
    expected = {(int(b), int(n)) for b in range(6) for n in theirs[b]}
    assert {(int(b), int(n)) for b, n in zip(draw.base, draw.neighbor, strict=True)} <= expected


def test_smotenc_input_errors():
    X, y = smotenc_hand_case()
    with pytest.raises(ValueError, match="at least one continuous feature"):
        SMOTENC([0, 1, 2], k_neighbors=2).fit_resample(X, y)
    with pytest.raises(ValueError, match="out of range"):
        SMOTENC([3], k_neighbors=2).fit_resample(X, y)


# --------------------------------------------------------------------------------------------------
# ROC convex hull and areas


HAND = np.array([[0.1, 0.5], [0.2, 0.6], [0.3, 0.9], [0.5, 0.85], [0.6, 0.95]])


def test_convex_hull_and_area_by_hand():
    hull = roc.convex_hull(HAND)
    np.testing.assert_allclose(hull, [[0, 0], [0.1, 0.5], [0.3, 0.9], [0.6, 0.95], [1, 1]])
    # Trapezoids under the hull: 0.025 + 0.14 + 0.2775 + 0.39.
    assert roc.hull_area(HAND) == pytest.approx(0.8325)
    assert roc.on_hull(HAND).tolist() == [True, False, True, False, True]


def test_papers_trapezoid_auc_by_hand():
    # From the leftmost point to the added (1, 1): 0.055 + 0.075 + 0.175 + 0.09 + 0.39.
    assert roc.trapezoid_auc(HAND) == pytest.approx(0.785)
    assert roc.trapezoid_auc(np.vstack([HAND, [1, 1]])) == pytest.approx(0.785)


def test_hull_grows_with_more_points_and_chance_gives_half():
    assert roc.hull_area([[0.3, 0.3], [0.7, 0.7]]) == pytest.approx(0.5)
    more = np.vstack([HAND, [[0.05, 0.45]]])
    assert roc.hull_area(more) > roc.hull_area(HAND)


def test_roc_points_must_be_rates():
    with pytest.raises(ValueError, match="rates in \\[0, 1\\] \\(not percent\\)"):
        roc.hull_area(HAND * 100)
    with pytest.raises(ValueError, match="no ROC points"):
        roc.hull_area(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="NaN"):
        roc.trapezoid_auc([[0.1, np.nan]])


# --------------------------------------------------------------------------------------------------
# The protocol: resampling sees training folds only


def small_spec():
    return protocol.SweepSpec((50.0, 100.0, 200.0), smote_amounts=(100.0,),
                              replication_amounts=(200.0,))


def test_resampling_only_sees_training_folds():
    X, y = imbalanced(n_major=60, n_minor=20, seed=2)
    X = np.c_[np.arange(len(y)), X]  # a row id in the first feature
    calls = []

    def spy(X_tr, y_tr, **kw):
        calls.append((frozenset(X_tr[:, 0].astype(int)), kw["over"]))
        return resample(X_tr, y_tr, **kw)

    spec, seeds, n_folds = small_spec(), [0, 1], 4
    protocol.run_sweeps(X, y, spec, seeds=seeds, n_folds=n_folds, resampler=spy)
    folds = [(frozenset(tr), frozenset(te)) for s in seeds
             for tr, te in protocol.cv_splits(y, n_folds, s)]
    for ids, _ in calls:
        assert any(ids == tr for tr, _ in folds)  # exactly one training fold ...
        assert not any(ids == tr and ids & te for tr, te in folds)  # ... and none of its test rows
    per_fold = 3 * len(spec.under_amounts)  # under, smote 100, replicate 200
    assert len(calls) == len(seeds) * n_folds * per_fold
    assert {over for _, over in calls} == {None, "smote", "replicate"}


def test_protocol_is_deterministic_and_thread_independent():
    X, y = imbalanced(n_major=80, n_minor=20, seed=5)
    a = protocol.run_sweeps(X, y, small_spec(), seeds=[0], n_folds=3, n_jobs=1)
    b = protocol.run_sweeps(X, y, small_spec(), seeds=[0], n_folds=3, n_jobs=2)
    assert a.equals(b)
    areas = protocol.curve_areas(protocol.roc_points(a))
    # Every curve has the raw point plus one point per under-sampling amount.
    assert set(areas["n_points"]) == {4}
    assert set(areas["family"]) == {"under", "smote", "replicate", "loss_ratio", "nb_prior"}


def test_naive_bayes_prior_sweep_starts_at_the_plain_classifier():
    from sklearn.naive_bayes import GaussianNB

    X, y = imbalanced(n_major=80, n_minor=20, seed=6)
    tr, te = protocol.cv_splits(y, 4, 0)[0]
    rows = protocol.fold_points(X[tr], y[tr], X[te], y[te], small_spec(), seed=0, fold=0)
    nb = [r for r in rows if r["family"] == "nb_prior"]
    pred = GaussianNB().fit(X[tr], y[tr]).predict(X[te])
    assert nb[0]["tpr"] == pytest.approx(pred[y[te] == 1].mean())
    assert nb[0]["fpr"] == pytest.approx(pred[y[te] == 0].mean())
    # Raising the minority prior only lowers the threshold: rates never fall along the sweep.
    assert np.all(np.diff([r["tpr"] for r in nb[1:]]) >= 0)


def test_effective_under_amounts_drop_void_levels():
    # Pima-like proportions: 10% or 50% would keep more majority samples than there are.
    assert protocol.effective_under_amounts(241, 450, [10, 50, 75, 100]) == (75.0, 100.0)


def test_protocol_input_errors():
    X, y = imbalanced(n_major=30, n_minor=3)
    with pytest.raises(ValueError, match="10-fold CV needs at least 10 samples per class"):
        protocol.run_sweeps(X, y, small_spec(), seeds=[0], n_folds=10)
    with pytest.raises(ValueError, match="at least one under-sampling amount"):
        protocol.SweepSpec(())


def test_stratified_subsample_keeps_proportions():
    X, y = imbalanced(n_major=300, n_minor=60)
    Xs, ys = protocol.stratified_subsample(X, y, 120, seed=0)
    assert np.bincount(ys).tolist() == [100, 20]
    assert protocol.stratified_subsample(X, y, 0, seed=0)[0] is X  # 0 keeps every row
    with pytest.raises(ValueError, match="max_samples must be >= 0"):
        protocol.stratified_subsample(X, y, -1, seed=0)


@pytest.mark.parametrize("name", ["pima", "satimage"])
def test_neighbour_distances_match_sklearn_on_real_minorities(name):
    """Real features with many ties: the fast candidate step must not lose a true neighbour."""
    X, y = data.load(name)
    X_min = X[y == 1]
    ours = knn_indices(torch.as_tensor(X_min), 5).numpy()
    ref_dist, _ = NearestNeighbors(n_neighbors=6).fit(X_min).kneighbors(X_min)
    our_dist = np.linalg.norm(X_min[:, None, :] - X_min[ours], axis=2)
    np.testing.assert_allclose(np.sort(our_dist, axis=1), ref_dist[:, 1:], rtol=0, atol=1e-9)
