"""What a method needs is declared on its spec, so recipes reach what the Python API reaches (issue 12 §1)."""

import inspect

from mergelab.api import methods
from mergelab.methods import REGISTRY


def test_statistics_keywords_match_the_declared_capabilities():
    """A method takes `stats`/`base_stats` exactly when its spec says so (the planner wires what the spec says)."""
    for name, spec in REGISTRY.items():
        params = inspect.signature(spec.fn).parameters
        assert ("stats" in params) == spec.needs_stats, name
        assert ("base_stats" in params) == spec.uses_base_stats, name
    assert REGISTRY["gradient_matching"].uses_base_stats  # H_0, reachable from a recipe's `base_stats:`


def test_methods_catalog_lists_base_statistics():
    catalog = methods()
    assert catalog["gradient_matching"]["uses_base_stats"] and catalog["gradient_matching"]["needs_stats"]
    assert not catalog["fisher"]["uses_base_stats"] and not catalog["linear"]["uses_base_stats"]
