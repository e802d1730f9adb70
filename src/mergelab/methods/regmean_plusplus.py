"""RegMean++: RegMean whose Gram matrices are taken with the merged earlier layers.

The per-tensor arithmetic is RegMean's (methods/preconditioned.py `regmean`);
only the statistics differ. They come from mergelab.stats.gram_sequential,
which merges the model block by block and measures each block's Gram
matrices on the inputs the already merged blocks produce.
"""

from __future__ import annotations

from torch import Tensor

from mergelab.methods.preconditioned import MetricWeight, RegMeanShared, regmean
from mergelab.methods.registry import PerModel, merge_method


@merge_method("regmean_plusplus", model_params=MetricWeight, shared_params=RegMeanShared, needs_stats=True)
def regmean_plusplus(x: Tensor, base: None, p: PerModel[MetricWeight], s: RegMeanShared,
                     gen=None, *, stats: Tensor | None = None) -> Tensor:
    """RegMean++: RegMean with inter-layer dependency, from Grams taken with the merged earlier blocks.

    Per linear weight, exactly RegMean's closed form:

        W^T = (sum_i l_i G~_i)^-1 sum_i l_i G~_i W_i^T,  G~_i = alpha G_i + (1 - alpha) diag(G_i)

    and the weighted average for tensors without a Gram matrix. The difference
    is G_i: for a linear layer in block l, RegMean takes G_i = X_i^T X_i with X_i
    the layer's inputs in candidate model i alone; RegMean++ feeds task i's data
    through the *merged* embeddings and blocks 0..l-1 and then through model i's
    own block l, so X_i are the features the merged model will actually give
    that block (cross-layer dependency), while inside a block each candidate's
    own layers are used (intra-layer dependency). These Grams depend on the
    merge itself (alpha, weights, the list of models): compute them with
    mergelab.stats.gram_sequential.regmean_plusplus_stats (`mergelab stats
    gram-plusplus`) for the same parameters as the recipe.
    Nguyen, Huu-Tien, Suzuki, Nguyen, 2025, "RegMean++: Enhancing Effectiveness
    and Generalization of Regression Mean for Model Merging", arXiv:2508.03121.

    Parameters: as `regmean`: per-model weight (1.0); shared alpha (0.1; FusionBench's
    `reduce_non_diagonal_ratio`, whose CLIP configuration uses 0.95), transposed
    (False), ridge (1e-6).

    Differences to FusionBench's RegMeanAlgorithmPlusPlus: FusionBench averages
    with equal weights only and inverts the summed Gram in float32
    (torch.inverse) where this is a float64 Cholesky solve; it keeps every tensor
    outside the embeddings and the blocks (final norm, heads) at the *pretrained*
    value, here every tensor outside the blocks (embeddings, norms, linear heads)
    is averaged like any tensor without a Gram; the blocks' Grams use every token (FusionBench's CLIP has no padding), here padded
    positions are left out as in `mergelab stats gram`.

    Args:
        x: (N, out, in) the models' weights ((N, in, out) if transposed), or any shape without stats.
        base: unused (None).
        p: per-model parameters, one per row of x.
        s: shared parameters.
        gen: unused.
        stats: (N, in, in) RegMean++ Gram matrices, or None.

    Returns:
        The merged tensor, x's shape without the first dimension.
    """
    return regmean(x, base, p, s, gen, stats=stats)
