"""The recipe's `tokenizer:` block, in MergeKit's format (mergekit/tokenizer/config.py's fields).

    tokenizer:
      source: union                 # base | union | a model path
      pad_to_multiple_of: 64        # round the output's rows up
      tokens:
        <|im_start|>:
          source: ./chat-model      # that model's row for this token
        <|im_end|>:
          source: {kind: model_token, model: ./chat-model, token: </s>}
          force: true               # also for models that have the token
        <pad>:
          source: {kind: zero}
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelTokenSource(_Strict):
    """The row of `token` (or of id `token_id`) in `model`'s own vocabulary."""

    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_of(self):
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of `token` and `token_id`")
        return self


class ZeroSource(_Strict):
    """An all-zero row."""

    kind: Literal["zero"]


class TokenEntry(_Strict):
    """Where one output token's row comes from: a model path (that model's row for the token), a
    model_token or zero source; None: MergeKit's automatic rule. `force` uses it for every model,
    also those that have the token."""

    source: Union[ModelTokenSource, ZeroSource, str, None] = None
    force: bool = False

    @model_validator(mode="after")
    def _force_needs_source(self):
        if self.force and self.source is None:
            raise ValueError("`force: true` needs a `source` to take the row from")
        return self


class TokenizerEntry(_Strict):
    source: str = "union"  # MergeKit's default when `tokenizer:` is given without a source
    tokens: dict[str, TokenEntry] | None = None
    pad_to_multiple_of: int | None = Field(None, ge=1)


def token_source_models(entry: TokenizerEntry | None) -> list[tuple[str, str]]:
    """(field path, model reference) of every model the `tokens:` entries name."""
    out = []
    for token, cfg in ((entry.tokens or {}) if entry else {}).items():
        src = cfg.source
        if isinstance(src, str):
            out.append((f"tokenizer.tokens[{token!r}].source", src))
        elif isinstance(src, ModelTokenSource):
            out.append((f"tokenizer.tokens[{token!r}].source.model", src.model))
    return out
