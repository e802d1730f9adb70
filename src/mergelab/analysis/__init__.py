"""Merge diagnostics: will these models merge, with which method, and why did a merge fail?

Data-free (`inspect`): task-vector geometry streamed from checkpoints, with a
method recommendation. With data: interpolation paths and barriers, task-arithmetic
scaling curves and loss planes, through pluggable evaluators. Also the effective
noise scale of a training configuration. Plots live in `mergelab.analysis.plots`
(imported on demand, as matplotlib is slow to load).
"""

from mergelab.analysis.evaluators import (
    Evaluator,
    causal_lm_evaluator,
    classifier_evaluator,
    evaluate,
    load_evaluator,
)
from mergelab.analysis.group_stats import GroupStats
from mergelab.analysis.inspect import InspectReport, inspect_models
from mergelab.analysis.recommend import recommend
from mergelab.analysis.noise_scale import (
    NoiseScale,
    effective_noise_scale,
    noise_scale_from_trainer,
)
from mergelab.analysis.paths import (
    PathResult,
    PlaneResult,
    ScalingResult,
    barrier,
    interpolation_path,
    plane,
    scaling_curve,
)

__all__ = [
    "Evaluator", "causal_lm_evaluator", "classifier_evaluator", "evaluate", "load_evaluator",
    "GroupStats", "InspectReport", "inspect_models", "recommend",
    "NoiseScale", "effective_noise_scale", "noise_scale_from_trainer",
    "PathResult", "PlaneResult", "ScalingResult", "barrier", "interpolation_path", "plane",
    "scaling_curve",
]
