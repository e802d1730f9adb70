"""Rows of vocabulary-indexed tensors (embeddings, lm_head) moved into the output vocabulary.

Each model's rows are put where its tokens sit in the output vocabulary;
rows of tokens a model lacks (or that `force` replaces) are filled as
MergeKit's PermutedVocabulary fills them (mergekit/tokenizer/embed.py):

    a token only one model has        -> that model's row, for every model
    a token in no model               -> zeros
    a token the base model has        -> the base's row
    any other token some model lacks  -> the mean of the rows of the models that have it
    `tokens: {T: {source: ...}}`      -> the row that source names (a model's row for T,
                                         a model's row for another token or id, or zeros)

so that the merge method then sees, for every model, one row per output
token. Rows past the vocabulary (`pad_to_multiple_of`, or a model padded past
its tokenizer) are the model's own row at that index when it has one that
holds no token, else the mean of its token rows (MergeKit's padding rule,
after Hewitt, "Initializing new word embeddings", 2021).
"""

from __future__ import annotations

import dataclasses

import torch

ZERO = ()  # a fill with no source rows: zeros


@dataclasses.dataclass(frozen=True)
class VocabJob:
    """How to bring the inputs of one job (models in the job's input order) into the output vocabulary.

    index[j][r]: the row of model j that lands in output row r, or -1 (a fill).
    fill_rows: the output rows with a fill; fill_sources[k]: the (model position, row)
    pairs averaged for fill_rows[k] (ZERO for zeros).
    """

    rows: int
    vocab_len: int
    index: tuple[torch.Tensor, ...]
    fill_rows: torch.Tensor
    fill_sources: tuple[tuple[tuple[int, int], ...], ...]

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each model's tensor (its rows, *rest) -> (self.rows, *rest), in its own dtype."""
        return permute_rows(tensors, self)


def _fills(tensors: list[torch.Tensor], job: VocabJob) -> torch.Tensor:
    """(K, *rest) float32: the fill row of each output row in job.fill_rows."""
    rest = tensors[0].shape[1:]
    out = torch.zeros((len(job.fill_sources), *rest), dtype=torch.float32)
    for k, sources in enumerate(job.fill_sources):
        if sources:
            out[k] = torch.stack([tensors[j][r].float() for j, r in sources]).mean(0)
    return out


def permute_rows(tensors: list[torch.Tensor], job: VocabJob) -> list[torch.Tensor]:
    """Every model's vocabulary rows in the output vocabulary's order, fills in place (see module doc).

    Args:
        tensors: model j's tensor, (rows_j, *rest), rows in its own vocabulary's order.
        job: the row maps and fills of these models.

    Returns:
        model j's tensor as (job.rows, *rest), in its own dtype.
    """
    fills = _fills(tensors, job)
    out = []
    for t, index in zip(tensors, job.index):
        new = torch.zeros((job.rows, *t.shape[1:]), dtype=t.dtype)
        have = index >= 0
        new[have] = t[index[have]]
        if len(job.fill_rows):
            need = index[job.fill_rows] < 0  # (K,)
            new[job.fill_rows[need]] = fills[need].to(t.dtype)
        pad = ~have
        pad[: job.vocab_len] = False
        if len(job.fill_rows):
            pad[job.fill_rows] = False
        if pad.any():
            new[pad] = new[: job.vocab_len].float().mean(0).to(t.dtype)
        out.append(new)
    return out
