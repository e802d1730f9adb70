"""Merging models trained apart: permutation specs, weight and activation matching, REPAIR, ZipIt.

    aligned_b, perms = mergelab.align.align(model_a, model_b, method="weight_matching")
    repaired = mergelab.align.repair(merged, model_a, aligned_b, data)
    zipped = mergelab.align.zipit(model_a, model_b, data)
"""

from mergelab.align.align import METHODS, align, align_many, check_pair, spec_for
from mergelab.align.hf import spec_for_hf
from mergelab.align.matching import MatchResult, activation_matching, objective, weight_matching
from mergelab.align.spec import (
    Axis,
    PermutationSpec,
    apply_permutations,
    identity_perms,
    inverse,
    permute_axis,
    random_perms,
)
from mergelab.align.trace import spec_from_module

__all__ = ["align", "align_many", "spec_for", "spec_for_hf", "spec_from_module", "check_pair", "METHODS",
           "weight_matching", "activation_matching", "objective", "MatchResult", "PermutationSpec", "Axis",
           "apply_permutations", "permute_axis", "identity_perms", "random_perms", "inverse"]

from mergelab.align.repair import interpolate_modules, repair  # noqa: E402
from mergelab.align.zipit import zip_matrices, zipit  # noqa: E402

__all__ += ["repair", "interpolate_modules", "zipit", "zip_matrices"]
