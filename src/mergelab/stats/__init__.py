"""Statistics that metric-aware merges need, saved as safetensors "stats checkpoints" keyed like the model.

    diagonal_fisher(model, dataloader, kind=...)        -> name -> diagonal Fisher     (fisher, gradient_matching)
    gram_matrices(model, dataloader)                    -> weight name -> (in, in) Gram (regmean)
    extract_optimizer_metrics(model, optimizer_state)   -> name -> optimizer metric    (optimizer_aware)
    load_trainer_checkpoint(folder)                     -> weights + optimizer.pt of a Trainer checkpoint
    save_stats(path, stats) / load_stats(path)          -> the safetensors file and its metadata
"""

from mergelab.stats.fisher import diagonal_fisher
from mergelab.stats.gram import gram_matrices
from mergelab.stats.io import StatsDict, load_stats, read_stats_meta, save_stats, validate_stats
from mergelab.stats.optimizer_state import (
    TrainerCheckpoint,
    detect_kind,
    extract_optimizer_metrics,
    load_trainer_checkpoint,
    metric_from_state,
)

__all__ = [
    "StatsDict",
    "TrainerCheckpoint",
    "detect_kind",
    "diagonal_fisher",
    "extract_optimizer_metrics",
    "gram_matrices",
    "load_stats",
    "load_trainer_checkpoint",
    "metric_from_state",
    "read_stats_meta",
    "save_stats",
    "validate_stats",
]
