"""Tokenizers and vocabularies: rows of embeddings and lm_head matched by token, MergeKit's
`tokenizer_source` (base, union, a model) and `tokens:`, and the output tokenizer's files."""

from mergelab.tokenizer.build import VocabularyPlan, plan_vocabulary, tokenizer_files
from mergelab.tokenizer.config import ModelTokenSource, TokenEntry, TokenizerEntry, ZeroSource
from mergelab.tokenizer.embed import VocabJob, permute_rows
from mergelab.tokenizer.vocab import read_vocabulary

__all__ = ["VocabularyPlan", "plan_vocabulary", "tokenizer_files", "ModelTokenSource", "TokenEntry", "TokenizerEntry", "ZeroSource",
           "VocabJob", "permute_rows", "read_vocabulary"]
