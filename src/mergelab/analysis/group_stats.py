"""GroupStats: the geometry of a group of tensors (a layer, a kind, the whole model) in plain numbers;
tensor_kind: the kind a tensor is grouped under.

Built from the GeometrySums that inspect adds up tensor by tensor (analysis/geometry.py); what
`mergelab inspect` prints, plots and writes as JSON.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch

from mergelab.analysis.geometry import MASS_DENSITIES, GeometrySums, cosine_from_gram


KINDS = ("attention", "mlp", "embedding", "norm", "other")
_KIND_PATTERNS = (  # first match wins; matched against dotted name components
    ("norm", re.compile(r"norm|^ln_?\w*$")),
    ("attention", re.compile(r"attn|attention|^(q|k|v|o|qkv)_proj$|^(query|key|value|c_attn|wqkv|wq|wk|wv|wo)$")),
    ("mlp", re.compile(r"mlp|ffn|feed_forward|^(up|gate|down|gate_up)_proj$|^(fc1|fc2|c_fc|w1|w2|w3)$"
                       r"|dense_h_to_4h|dense_4h_to_h|experts|intermediate")),
    ("embedding", re.compile(r"embed|^wte$|^wpe$|^lm_head$|^word_embeddings$")),
)


def tensor_kind(name: str) -> str:
    """attention, mlp, embedding, norm or other, from the components of a tensor name."""
    parts = name.split(".")
    for kind, pattern in _KIND_PATTERNS:
        if any(pattern.search(part) for part in parts):
            return kind
    return "other"


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _matrix(t: torch.Tensor) -> list[list[float | None]]:
    return [[_none_if_nan(v) for v in row] for row in t.tolist()]


def _mean_offdiag(m: list[list[float | None]] | None) -> float | None:
    if m is None:
        return None
    vals = [v for i, row in enumerate(m) for j, v in enumerate(row) if i < j and v is not None]
    return sum(vals) / len(vals) if vals else None


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


@dataclasses.dataclass
class GroupStats:
    """Geometry of one group of tensors (a layer, a kind, or the whole model); plain data.

    Per-model lists are in the order of `InspectReport.models`; matrices are (N, N)
    with None where undefined (a zero task vector). Rates are shares in [0, 1].
    """

    name: str
    n_tensors: int
    n_params: int
    weight_norm: list[float]
    task_norm: list[float]
    reference_norm: float  # norm of the base (or of the models' mean) over this group
    weight_cosine: list[list[float | None]]
    task_cosine: list[list[float | None]]
    sign_conflict: float | None
    sign_conflict_chance: float | None  # the rate independent random signs would give
    sign_conflict_trimmed: float | None
    sign_conflict_trimmed_chance: float | None
    spectral_overlap: list[list[float | None]] | None  # None: no 2-D tensor in the group
    spectral_overlap_chance: float | None
    mass_kept: dict[str, list[float | None]]  # density -> share of each task vector's L1 mass kept

    @classmethod
    def from_sums(cls, name: str, s: GeometrySums) -> GroupStats:
        conflicts, contested, chance = s.conflicts
        t_conflicts, t_contested, t_chance = s.trimmed
        defined = s.overlap_count > 0
        overlap = torch.where(defined, s.overlap_sum / s.overlap_count.clamp(min=1), math.nan)
        pairs = defined & ~torch.eye(s.n_models, dtype=torch.bool)  # the chance level of distinct pairs
        chance_level = s.chance_sum[pairs].sum() / s.overlap_count[pairs].sum() if pairs.any() else None
        return cls(
            name=name, n_tensors=s.n_tensors, n_params=s.n_params,
            weight_norm=s.weight_gram.diagonal().sqrt().tolist(),
            task_norm=s.task_gram.diagonal().sqrt().tolist(),
            reference_norm=math.sqrt(s.ref_sq),
            weight_cosine=_matrix(cosine_from_gram(s.weight_gram)),
            task_cosine=_matrix(cosine_from_gram(s.task_gram)),
            sign_conflict=_ratio(conflicts, contested), sign_conflict_chance=_ratio(chance, contested),
            sign_conflict_trimmed=_ratio(t_conflicts, t_contested),
            sign_conflict_trimmed_chance=_ratio(t_chance, t_contested),
            spectral_overlap=_matrix(overlap) if defined.any() else None,
            spectral_overlap_chance=None if chance_level is None else float(chance_level),
            mass_kept={str(d): [_ratio(float(k), float(t)) for k, t in zip(s.mass_kept[d], s.mass_total)]
                       for d in MASS_DENSITIES},
        )

    @property
    def mean_task_cosine(self) -> float | None:
        return _mean_offdiag(self.task_cosine)

    @property
    def mean_weight_cosine(self) -> float | None:
        return _mean_offdiag(self.weight_cosine)

    @property
    def mean_spectral_overlap(self) -> float | None:
        return _mean_offdiag(self.spectral_overlap)

    @property
    def trimmed_conflict_ratio(self) -> float | None:
        """Trimmed sign-conflict rate over its chance level: 0 all signs agree, 1 as random as coin flips."""
        if self.sign_conflict_trimmed is None or not self.sign_conflict_trimmed_chance:
            return None
        return self.sign_conflict_trimmed / self.sign_conflict_trimmed_chance

    @property
    def excess_overlap(self) -> float | None:
        """Mean spectral overlap rescaled so that random subspaces give 0 and identical ones 1."""
        o, c = self.mean_spectral_overlap, self.spectral_overlap_chance
        if o is None or c is None or c >= 1:
            return None
        return (o - c) / (1 - c)

    @property
    def relative_task_norm(self) -> float | None:
        """Mean over models of |tau_i| / |theta_ref|: how far the models moved."""
        return sum(self.task_norm) / len(self.task_norm) / self.reference_norm if self.reference_norm else None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("mean_task_cosine", "mean_weight_cosine", "mean_spectral_overlap",
                    "trimmed_conflict_ratio", "excess_overlap", "relative_task_norm"):
            out[key] = getattr(self, key)
        return out
