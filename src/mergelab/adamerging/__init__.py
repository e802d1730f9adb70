"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by entropy minimisation on
unlabelled inputs; the result is a task_arithmetic recipe. See train.py for the method."""

from mergelab.adamerging.entropy import entropy
from mergelab.adamerging.functional import MergedFunction
from mergelab.adamerging.recipe import adamerging_recipe
from mergelab.adamerging.train import AdaMergingResult, adamerging

__all__ = ["AdaMergingResult", "MergedFunction", "adamerging", "adamerging_recipe", "entropy"]
