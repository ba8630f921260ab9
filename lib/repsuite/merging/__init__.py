"""Model merging by permutation: specs of the permutation symmetry, permutation search (weight
matching, activation matching, straight-through estimator) and the analyses of Ito, Yamada and
Kumagai (ICLR 2025) on the linear path between two models."""

from repsuite.merging.analysis import (
    alignment_profile,
    average,
    barrier,
    energy_rank,
    evaluate_params,
    group_alignment,
    interpolate,
    interpolation_path,
    l2_distance,
    layer_matrices,
    layer_svds,
    pair_report,
    permute_svds,
    permuted_sides,
    r_alignment,
    random_perm_distance,
    singular_values,
    truncate,
    truncated_params,
    truncation_curve,
)
from repsuite.merging.models import MLP, VGGLike, train_mlp
from repsuite.merging.permutation import (
    PermutationSpec,
    apply_permutation,
    identity_perms,
    inverse,
    mlp_spec,
    random_perms,
    spec_for,
    vgg_spec,
)
from repsuite.merging.weight_matching import (
    MatchResult,
    activation_matching,
    cost_matrix,
    matching_objective,
    mlp_activations,
    solve_lap,
    ste_matching,
    weight_matching,
)

__all__ = [
    "MLP", "MatchResult", "PermutationSpec", "VGGLike", "activation_matching", "alignment_profile",
    "apply_permutation", "average", "barrier", "cost_matrix", "energy_rank", "evaluate_params",
    "group_alignment", "identity_perms", "interpolate", "interpolation_path", "inverse",
    "l2_distance", "layer_matrices", "layer_svds", "matching_objective", "mlp_activations",
    "mlp_spec", "pair_report", "permute_svds", "permuted_sides", "r_alignment",
    "random_perm_distance", "random_perms", "singular_values", "solve_lap", "spec_for",
    "ste_matching", "train_mlp", "truncate", "truncated_params", "truncation_curve", "vgg_spec",
    "weight_matching",
]
