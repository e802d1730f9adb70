"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by entropy minimisation on
unlabelled inputs; the result is a task_arithmetic recipe. See train.py for the method."""

from mergelab.search.adamerging.entropy import entropy
from mergelab.search.adamerging.functional import MergedFunction
from mergelab.search.adamerging.recipe import adamerging_recipe
from mergelab.search.adamerging.train import AdaMergingResult, adamerging

__all__ = ["AdaMergingResult", "MergedFunction", "adamerging", "adamerging_recipe", "entropy"]
