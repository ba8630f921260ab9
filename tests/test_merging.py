"""Permutation symmetry, weight matching and the SVD analyses of repsuite.merging."""

import itertools
import math

import numpy as np
import pytest
import torch

from repsuite.merging import (
    MLP,
    VGGLike,
    activation_matching,
    alignment_profile,
    apply_permutation,
    barrier,
    energy_rank,
    group_alignment,
    identity_perms,
    interpolation_path,
    inverse,
    l2_distance,
    layer_matrices,
    layer_svds,
    matching_objective,
    mlp_activations,
    permute_svds,
    r_alignment,
    random_perm_distance,
    random_perms,
    singular_values,
    solve_lap,
    spec_for,
    ste_matching,
    truncate,
    truncated_params,
    weight_matching,
)


def make(model_cls, *args, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = model_cls(*args).to(dtype)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def permuted_copy(model, params, seed=1):
    spec = spec_for(model)
    perms = random_perms(spec, params, torch.Generator().manual_seed(seed))
    return spec, perms, apply_permutation(spec, perms, params)


ARCHS = [(MLP, (20, [16, 12, 8], 5)), (VGGLike, (2, 8, [4, 6], 3))]


@pytest.mark.parametrize(("cls", "args"), ARCHS)
def test_permuting_hidden_units_leaves_the_function_unchanged(cls, args):
    model, params = make(cls, *args, dtype=torch.float64)
    spec, perms, permuted = permuted_copy(model, params)
    assert any(not torch.equal(perms[p], torch.arange(len(perms[p]))) for p in perms)
    X = torch.randn(64, math.prod(args[:1]) if cls is MLP else args[0] * args[1] ** 2,
                    dtype=torch.float64)
    out = torch.func.functional_call(model, params, (X,))
    out_perm = torch.func.functional_call(model, permuted, (X,))
    assert (out - out_perm).abs().max() < 1e-6
    assert l2_distance(params, permuted) > 0.1  # the weights themselves did move


@pytest.mark.parametrize(("cls", "args"), ARCHS)
def test_weight_matching_recovers_a_planted_permutation(cls, args):
    model, params = make(cls, *args)
    spec, perms, permuted = permuted_copy(model, params, seed=3)
    result = weight_matching(spec, params, permuted, seed=0)
    for p, found in result.perms.items():
        assert torch.equal(found, inverse(perms)[p]), p
    assert l2_distance(params, apply_permutation(spec, result.perms, permuted)) < 1e-6


def test_weight_matching_objective_never_decreases_and_beats_identity():
    _, params_a = make(MLP, 10, [24, 24], 4, seed=0)
    model, params_b = make(MLP, 10, [24, 24], 4, seed=1)
    spec = spec_for(model)
    result = weight_matching(spec, params_a, params_b, seed=5)
    start = matching_objective(spec, identity_perms(spec, params_b), params_a, params_b)
    objective = [start, *result.objective]
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(objective))
    assert result.sweeps < 100
    after = l2_distance(params_a, apply_permutation(spec, result.perms, params_b))
    assert after < l2_distance(params_a, params_b)


def test_weight_matching_of_one_hidden_layer_is_the_brute_force_optimum():
    # With a single permutation one assignment solves WM globally: compare with all 5! orders.
    _, params_a = make(MLP, 6, [5], 3, seed=0)
    model, params_b = make(MLP, 6, [5], 3, seed=1)
    spec = spec_for(model)
    found = weight_matching(spec, params_a, params_b).perms
    best = min(l2_distance(params_a, apply_permutation(spec, {"P_1": torch.tensor(order)},
                                                       params_b))
               for order in itertools.permutations(range(5)))
    assert l2_distance(params_a, apply_permutation(spec, found, params_b)) == pytest.approx(best)


@pytest.mark.parametrize("seed", range(5))
def test_assignment_step_matches_brute_force(seed):
    cost = np.random.default_rng(seed).normal(size=(5, 5))
    col = solve_lap(cost)
    best = max(cost[np.arange(5), list(order)].sum() for order in itertools.permutations(range(5)))
    assert sorted(col) == list(range(5))
    assert cost[np.arange(5), col].sum() == pytest.approx(best)


@pytest.mark.parametrize(("cls", "args"), ARCHS)
def test_singular_values_are_invariant_under_permutation(cls, args):
    model, params = make(cls, *args)
    spec, perms, permuted = permuted_copy(model, params)
    before, after = layer_matrices(spec, params), layer_matrices(spec, permuted)
    for name in before:
        assert np.abs(singular_values(before[name]) - singular_values(after[name])).max() < 1e-5
    # The SVD of the permuted model is the original's with reordered vector entries.
    for name, (U, S, V) in permute_svds(spec, perms, layer_svds(spec, params), params).items():
        np.testing.assert_allclose((U * S) @ V.T, after[name].numpy(), atol=1e-5)


def test_r_alignment_is_one_for_a_model_with_itself_and_recovered_after_matching():
    model, params = make(MLP, 30, [40, 40], 6)
    spec, perms, permuted = permuted_copy(model, params)
    svds, svds_perm = layer_svds(spec, params), layer_svds(spec, permuted)
    for gamma in (0.0, 0.3):
        assert r_alignment(svds, svds, gamma)["R"] == pytest.approx(1.0, abs=1e-6)
    assert abs(r_alignment(svds, svds_perm, 0.0)["R"]) < 0.3
    matched = permute_svds(spec, inverse(perms), svds_perm, permuted)
    assert r_alignment(svds, matched, 0.3)["R"] == pytest.approx(1.0, abs=1e-6)


def test_r_alignment_at_gamma_zero_is_the_inner_product_of_polar_factors():
    _, params_a = make(MLP, 8, [8], 8, seed=0)
    model, params_b = make(MLP, 8, [8], 8, seed=1)
    spec = spec_for(model)
    out = r_alignment(layer_svds(spec, params_a), layer_svds(spec, params_b), 0.0)
    W_a, W_b = params_a["layers.0.weight"].double(), params_b["layers.0.weight"].double()

    def polar(W):
        U, _, Vh = torch.linalg.svd(W)
        return U @ Vh

    expected = float((polar(W_a) * polar(W_b)).sum()) / 8
    assert out["per_layer"]["layers.0.weight"] == pytest.approx(expected, abs=1e-5)


def test_alignment_profile_and_groups():
    model, params = make(MLP, 30, [40, 40], 6)
    spec = spec_for(model)
    svds = layer_svds(spec, params)
    prof = alignment_profile(svds["layers.1.weight"], svds["layers.1.weight"], True, True)
    np.testing.assert_allclose(prof, 1.0, atol=1e-6)
    groups = group_alignment(spec, svds, svds, 0.1)
    assert groups["top"] == pytest.approx(1.0) and groups["bottom"] == pytest.approx(1.0)
    # Only permuted sides count: the first layer's input side and the last's class side are out.
    assert set(groups["profiles"]) == {f"layers.{i}.weight" for i in range(3)}
    with pytest.raises(ValueError, match="at least one side"):
        alignment_profile(svds["layers.0.weight"], svds["layers.0.weight"], False, False)


def test_barrier_is_zero_for_identical_models_and_exact_for_a_quadratic():
    model, params = make(MLP, 12, [16], 3)
    X, y = torch.randn(50, 12), torch.randint(0, 3, (50,))
    lambdas = np.linspace(0, 1, 11)
    path = interpolation_path(model, params, params, X, y, lambdas)
    assert barrier(path["loss"], lambdas) == pytest.approx(0.0, abs=1e-12)
    assert barrier(path["acc"], lambdas, higher_is_better=True) == pytest.approx(0.0, abs=1e-12)
    # A path 1 + 2 lam + c lam (1 - lam) bulges c / 4 above its chord at lam = 1/2.
    assert barrier(1 + 2 * lambdas + 0.8 * lambdas * (1 - lambdas), lambdas) == pytest.approx(0.2)
    assert barrier(0.9 - 0.8 * lambdas * (1 - lambdas), lambdas, True) == pytest.approx(0.2)


def test_activation_matching_recovers_a_planted_permutation():
    model, params = make(MLP, 20, [16, 12], 5)
    spec, perms, permuted = permuted_copy(model, params, seed=4)
    X = torch.randn(256, 20)
    found = activation_matching(spec, mlp_activations(model, params, X),
                                mlp_activations(model, permuted, X)).perms
    for p in found:
        assert torch.equal(found[p], inverse(perms)[p])


def test_ste_on_a_planted_copy_returns_the_planted_permutation():
    model, params = make(MLP, 20, [16, 12], 5)
    spec, perms, permuted = permuted_copy(model, params, seed=4)
    X, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    found = ste_matching(model, spec, params, permuted, X, y, steps=3, batch_size=32).perms
    for p in found:
        assert torch.equal(found[p], inverse(perms)[p])


def test_truncation_follows_eckart_young():
    W = torch.randn(20, 30)
    S = singular_values(W)
    assert torch.allclose(truncate(W, len(S)), W, atol=1e-5)
    err = torch.linalg.norm(W - truncate(W, 5)).item()
    assert err == pytest.approx(math.sqrt((S[5:] ** 2).sum()), rel=1e-4)
    err_bottom = torch.linalg.norm(W - truncate(W, 5, keep="bottom")).item()
    assert err_bottom == pytest.approx(math.sqrt((S[:-5] ** 2).sum()), rel=1e-4)
    assert energy_rank(np.array([2.0, 1.0, 1.0]), 0.6) == 1
    assert energy_rank(np.array([2.0, 1.0, 1.0]), 0.8) == 2
    assert energy_rank(np.array([2.0, 1.0, 1.0]), 1.0) == 3
    model, params = make(MLP, 10, [8], 4)
    cut, ranks = truncated_params(spec_for(model), params, 1.0)
    assert ranks == {"layers.0.weight": 8, "layers.1.weight": 4}
    assert l2_distance(cut, params) < 1e-5


def test_random_permutation_distance_is_positive_for_a_model_and_itself():
    model, params = make(MLP, 10, [8, 8], 4)
    d = random_perm_distance(spec_for(model), params, params, 5, torch.Generator().manual_seed(0))
    assert d > 0.5


def test_a_width_one_layer_is_matched_trivially():
    _, params_a = make(MLP, 4, [1, 6], 3, seed=0)
    model, params_b = make(MLP, 4, [1, 6], 3, seed=1)
    result = weight_matching(spec_for(model), params_a, params_b)
    assert torch.equal(result.perms["P_1"], torch.tensor([0]))
    assert sorted(result.perms["P_2"].tolist()) == list(range(6))


def test_bad_inputs_get_clear_errors():
    model, params = make(MLP, 10, [8, 8], 4)
    spec = spec_for(model)
    _, wider = make(MLP, 10, [9, 8], 4)
    with pytest.raises(ValueError, match="different architectures"):
        weight_matching(spec, params, wider)
    _, deeper = make(MLP, 10, [8, 8, 8], 4)
    with pytest.raises(ValueError, match="different parameters"):
        weight_matching(spec, params, deeper)
    broken = dict(params, **{"layers.1.weight": params["layers.1.weight"].clone()})
    broken["layers.1.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        weight_matching(spec, params, broken)
    with pytest.raises(ValueError, match="NaN"):
        layer_svds(spec, broken)
    with pytest.raises(ValueError, match="width must be >= 1"):
        MLP(10, [8, 0], 4)
    with pytest.raises(ValueError, match="not a permutation"):
        apply_permutation(spec, {"P_1": torch.zeros(8, dtype=torch.long),
                                 "P_2": torch.arange(8)}, params)
    with pytest.raises(ValueError, match="square"):
        solve_lap(np.ones((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        solve_lap(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="from 0 to 1"):
        barrier([1.0, 2.0], [0.0, 0.5])
    with pytest.raises(ValueError, match="gamma"):
        r_alignment(layer_svds(spec, params), layer_svds(spec, params), 1.5)
    with pytest.raises(ValueError, match="rank 9"):
        truncate(torch.randn(4, 8), 9)
    with pytest.raises(TypeError, match="no permutation spec"):
        spec_for(torch.nn.Linear(3, 3))
    X = torch.randn(10, 10)
    acts = mlp_activations(model, params, X)
    with pytest.raises(ValueError, match="one shape"):
        activation_matching(spec, acts, {**acts, "P_1": acts["P_1"][:5]})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_weight_matching_on_cuda_matches_cpu():
    model, params = make(MLP, 20, [16, 12], 5)
    spec, perms, permuted = permuted_copy(model, params)
    on_gpu = {k: v.cuda() for k, v in params.items()}
    found = weight_matching(spec, on_gpu, {k: v.cuda() for k, v in permuted.items()}).perms
    assert all(torch.equal(found[p].cpu(), inverse(perms)[p]) for p in found)
