"""Registry of merge methods.

A method is a pure function on float32 tensors, registered with `@merge_method`.
Every method has the same calling convention:

    fn(x, base, p, s, gen) -> Tensor

    x:    (N, *shape) float32, the inputs being merged. When the method uses a
          base model (``base != "ignored"``), x holds the non-base models only
          and ``base`` is the base tensor (*shape); otherwise x holds every input
          (the base too, if the recipe lists it among its models) and ``base``
          is None.
    base: (*shape) float32 or None.
    p:    PerModel of the method's per-model parameters, one entry per row of x.
    s:    instance of the method's shared parameters (one value per tensor).
    gen:  torch.Generator seeded from (seed, tensor name) for randomised
          methods; None for deterministic ones.

Methods that need statistics (``needs_stats=True``) take a sixth keyword
argument ``stats``: (N, *shape) float32 metric tensors, or for Gram-based
methods whatever the method's docstring says.

The function returns the merged tensor (*shape) in float32 and never mutates
its inputs. The registry itself is methods/registry.py; the family modules are
imported here, explicitly and in one place.
"""

from __future__ import annotations

from mergelab.methods.registry import (  # noqa: F401  (the registry's public names, importable from here)
    BasePolicy,
    MethodParams,
    NoParams,
    P,
    spellings,
    PerModel,
    MethodSpec,
    REGISTRY,
    merge_method,
    run_method,
    get_method,
)

# Family modules register their methods on import; this is the one place they are imported.
from mergelab.methods import (  # noqa: F401
    emr,
    fusion,
    linear,
    magmax,
    pcb,
    preconditioned,
    gradient_matching,  # after preconditioned: the registry lists it after regmean, as before
    ram,
    regmean_plusplus,
    spectral,
    sparsify,
    sce,  # after sparsify: the registry lists sce after the task-vector methods, as before
    spherical,
    tall_masks,
    task_arithmetic,
    wudi,
)
