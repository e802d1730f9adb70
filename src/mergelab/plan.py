"""Planning: one job per output tensor, decided before any tensor is read.

A plan names, for every output tensor, the input tensors (checkpoint, name) it
is computed from, the method and its resolved parameters. Everything that can
be wrong with the inputs (shapes, vocabularies, missing tensors, parameters
that do not validate) is found here and reported together, so a merge never
fails halfway for a reason that was knowable at the start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from pydantic import ValidationError

from mergelab.checkpoint.reader import Checkpoint, layer_index, with_layer_index
from mergelab.checkpoint.writer import TensorInfo
from mergelab.errors import RecipeError, ShapeMismatch
from mergelab.methods import MethodParams, MethodSpec, spellings
from mergelab.recipe import OutputSlice, Recipe, Source
from mergelab.tokenizer import VocabJob, VocabularyPlan, plan_vocabulary, tokenizer_files

# Names of input-embedding-like tensors: in slice mode they come from the first
# slice's models, everything else outside the layers from the last slice's.
_PRE_MARKERS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type")
# Tensors whose first dimension is the vocabulary.
_VOCAB_MARKERS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out")


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """One input tensor: which checkpoint, which name inside it."""

    model: int
    name: str


# What a job does with its input tensors (engine/compute.py runs each):
#   merge      the plan's method over inputs (and base, stats)     -> one output tensor, maybe in row chunks
#   copy       inputs[0] as it is (converted to the output dtype)  -> one output tensor
#   factorize  fn(inputs) -> {name: tensor}, e.g. a task matrix's low-rank factors (extract-lora)
#   permute    fn(inputs) -> tensor, an input with permuted rows/columns (align)
#   expert     fn(inputs) -> {name: tensor}, expert and gate tensors of a mixture of experts (moe)
#   observe    nothing written: the run's `observe` callback sees the inputs (inspect, statistics)
Op = Literal["merge", "copy", "factorize", "permute", "expert", "observe"]
FN_OPS = ("factorize", "permute", "expert")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    """How to compute one output tensor (or several, or none): a sealed record, built once with keywords.

    The engine reads it and never changes it; what a method warns about while
    merging goes into the run's report (RunReport.copied), not into the job.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype
    inputs: tuple[TensorRef, ...]  # the stacked models x (non-base models, or all for base-ignoring methods)
    base: TensorRef | None = None
    model_params: tuple[MethodParams, ...] = ()  # one per input
    shared: MethodParams | None = None
    op: Op = "merge"
    # factorize/permute/expert: fn(tensors, device) with the inputs' tensors as stored (refs() order, on
    # device) returns the output tensor (permute) or {output name: tensor} (factorize, expert).
    fn: Callable[[list[torch.Tensor], torch.device], Any] | None = dataclasses.field(default=None, compare=False)
    outputs: tuple[TensorInfo, ...] | None = None  # what fn writes when it is not (name, shape, dtype)
    vocab_rows: int | None = None  # resize every input's first dim to this (vocab_mismatch: resize)
    vocab_fill: TensorRef | None = None  # where padding rows come from
    stats: tuple[TensorRef, ...] | None = None  # per-input statistics (methods with needs_stats)
    base_stats: TensorRef | None = None  # the base model's statistics (methods with uses_base_stats)
    vocab: VocabJob | None = None  # rows moved into the output vocabulary by token (mergelab.tokenizer)
    note: str | None = None

    def __post_init__(self) -> None:
        if (self.op in FN_OPS) != (self.fn is not None):
            raise ValueError(f"job {self.name}: op {self.op} {'needs' if self.op in FN_OPS else 'takes no'} fn")

    @property
    def copy(self) -> bool:
        """Copied from inputs[0] without a method."""
        return self.op == "copy"

    @property
    def layout(self) -> tuple[TensorInfo, ...]:
        """The output tensors this job writes (none for observe)."""
        if self.op == "observe":
            return ()
        return self.outputs if self.outputs is not None else (TensorInfo(self.name, tuple(self.shape), self.dtype),)

    def refs(self) -> list[TensorRef]:
        out = list(self.inputs)
        if self.base is not None:
            out.append(self.base)
        if self.vocab_fill is not None and self.vocab_fill not in out:
            out.append(self.vocab_fill)
        return out + list(self.stats or []) + ([self.base_stats] if self.base_stats is not None else [])

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.layout)


@dataclasses.dataclass
class OutputSpec:
    """What a checkpoint folder gets besides the tensors: config and tokenizer files."""

    config_updates: dict = dataclasses.field(default_factory=dict)
    assets_from: Checkpoint | None = None  # config.json, tokenizer ... copied from this input's folder
    tokenizer_files: dict[str, bytes] | None = None  # the output tokenizer, when it is not assets_from's


@dataclasses.dataclass
class Plan:
    """Everything the engine needs: the method, dtypes, jobs, inputs, what was left out, the output.

    The recipe stays with its caller (the API and the model card); a plan does not carry it.
    `method` is None for plans without merge jobs (inspect, extract-lora).
    """

    method: MethodSpec | None
    checkpoints: list[Checkpoint]
    jobs: list[Job]
    left_out: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (model path, tensor, reason)
    output: OutputSpec = dataclasses.field(default_factory=OutputSpec)
    compute_dtype: torch.dtype = torch.float32  # what reference methods compute in
    ignored: tuple[str, ...] = ()  # recipe parameters that no tensor used, as the report words them

    @property
    def layout(self) -> list[TensorInfo]:
        return [info for job in self.jobs for info in job.layout]

    @property
    def bytes_read(self) -> int:
        seen: set[TensorRef] = set()
        total = 0
        for job in self.jobs:
            for ref in job.refs():
                if ref not in seen:
                    seen.add(ref)
                    total += self.checkpoints[ref.model].nbytes(ref.name)
        return total

    @property
    def bytes_written(self) -> int:
        return sum(job.nbytes for job in self.jobs)

    # The output spec's fields, as the plan named them before it had one.
    @property
    def config_updates(self) -> dict:
        return self.output.config_updates

    @property
    def assets_from(self) -> Checkpoint | None:
        return self.output.assets_from

    @property
    def tokenizer_files(self) -> dict[str, bytes] | None:
        return self.output.tokenizer_files


def _gradient_t(index: int, count: int) -> float:
    # mergekit: t = idx / (L - 1) within a slice, 1 for a one-layer slice.
    return index / (count - 1) if count > 1 else 1.0


class _Planner:
    def __init__(self, recipe: Recipe, checkpoints: dict[str, Checkpoint]):
        self.recipe = recipe
        self.spec: MethodSpec = recipe.method
        self.paths = list(checkpoints)
        self.ckpts = list(checkpoints.values())
        self.index = {p: i for i, p in enumerate(self.paths)}
        self.problems: list[str] = []
        self.shape_problems: list[str] = []  # inputs that cannot be merged tensor by tensor
        self.zero_sums: set[tuple] = set()  # weight sets already reported as summing to zero
        self.left_out: list[tuple[str, str, str]] = []
        self.jobs: list[Job] = []
        self.out_dtype = recipe.out_dtype
        self.tokenizer_ref = self._tokenizer_source()
        self.vocab: VocabularyPlan | None = None
        self.built: dict[tuple, MethodParams] = {}  # (parameter model, settings) -> validated parameters

    # -- helpers -------------------------------------------------------------
    def _tokenizer_source(self) -> str:
        src = self.recipe.tokenizer_source_path()
        if src is not None:
            return src
        return self.recipe.base or self.paths[0]

    def _resolve_name(self, model: str, name: str) -> str | None:
        ck = self.ckpts[self.index[model]]
        if name in ck:
            return name
        return ck.alias_for(name)

    def _params(self, name: str, t: float, model: str | None, out_slice: OutputSlice,
                params: type[MethodParams]) -> dict:
        """Resolved settings that belong to `params`, keyed as the recipe spells them (field name or alias)."""
        keys = spellings(params)
        values = self.recipe.parameters_for(name, t, model, out_slice)
        return {k: v for k, v in values.items() if k in keys}

    def _build(self, cls: type[MethodParams], values: dict, where: str) -> MethodParams | None:
        try:
            key = (cls, tuple((k, type(v), v) for k, v in values.items()))
            hash(key)
        except TypeError:  # a list-valued setting: built each time
            key = None
        if key is not None and key in self.built:
            return self.built[key]  # parameter models are frozen: one object serves every tensor with these values
        try:
            params = cls(**values)
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(x) for x in err["loc"])
                self.problems.append(f"{where}: parameter {loc}: {err['msg']}")
            return None
        if key is not None:
            self.built[key] = params
        return params

    def _is_vocab(self, name: str) -> bool:
        return any(m in name for m in _VOCAB_MARKERS)

    # -- one output tensor ---------------------------------------------------
    def add(self, out_name: str, sources: list[tuple[Source, str]], t: float, out_slice: OutputSlice) -> None:
        """Plan output `out_name` from (source, input tensor name) pairs."""
        base_path = out_slice.base_model or self.recipe.base
        uses_base = self.spec.base != "ignored" and base_path is not None
        ref_path = base_path if uses_base else sources[0][0].model
        ref_in_name = next((n for s, n in sources if s.model == ref_path), sources[0][1])
        ref_name = self._resolve_name(ref_path, ref_in_name)
        if ref_name is None:
            self.left_out.append((ref_path, ref_in_name, "not in the reference model"))
            return
        ref_ck = self.ckpts[self.index[ref_path]]
        shape = ref_ck.shape(ref_name)
        in_dtype = ref_ck.dtype(ref_name)
        out_dtype = self.out_dtype or in_dtype
        ref = TensorRef(self.index[ref_path], ref_name)

        if not in_dtype.is_floating_point:
            self.jobs.append(Job(name=out_name, shape=shape, dtype=in_dtype, inputs=(ref,), op="copy",
                                 note=f"non-float tensor ({in_dtype}) copied from {ref_path}"))
            return

        inputs: list[TensorRef] = []
        row_sources: list[tuple[Source, str]] = []
        vocab_rows = None
        for src, in_name in sources:
            if uses_base and src.model == base_path:
                continue
            name = self._resolve_name(src.model, in_name)
            if name is None:
                self.left_out.append((src.model, in_name, f"missing; {out_name} merged without this model"))
                continue
            other = self.ckpts[self.index[src.model]].shape(name)
            by_token = self.vocab is not None and self._is_vocab(out_name) and other[1:] == shape[1:]
            if other != shape and not by_token:
                if self._is_vocab(out_name) and other[1:] == shape[1:] and len(shape) >= 1:
                    if self.recipe.vocab_mismatch != "resize":
                        self.shape_problems.append(
                            f"model '{src.model}' tensor {name} has shape {tuple(other)}, "
                            f"{ref_path} has {tuple(shape)}: vocabularies differ; add `vocab_mismatch: resize` "
                            "(and `tokenizer_source:`) to the recipe to cut or pad rows to the tokenizer source's vocabulary")
                        continue
                    vocab_rows = -1  # decided below
                else:
                    self.shape_problems.append(
                        f"model '{src.model}' tensor {name} has shape {tuple(other)}, "
                        f"{ref_path} has {tuple(shape)}: these models cannot be merged tensor by tensor")
                    continue
            inputs.append(TensorRef(self.index[src.model], name))
            row_sources.append((src, in_name))

        if len(inputs) < self.spec.min_models:
            self.jobs.append(self._by_token(Job(name=out_name, shape=shape, dtype=out_dtype, inputs=(ref,), op="copy",
                                                note=f"only in {ref_path}: copied"), base_path))
            return

        out_shape, vocab_fill, note = shape, None, None
        if vocab_rows is not None:
            tok = self.tokenizer_ref
            tok_name = self._resolve_name(tok, ref_in_name)
            if tok_name is None:
                self.problems.append(f"tokenizer source '{tok}' has no tensor {ref_in_name} to size the vocabulary")
                return
            tok_shape = self.ckpts[self.index[tok]].shape(tok_name)
            vocab_rows, vocab_fill = tok_shape[0], TensorRef(self.index[tok], tok_name)
            out_shape, note = (tok_shape[0], *shape[1:]), f"vocabulary resized to {tok_shape[0]} rows of {tok}"

        where = f"{self.recipe.source_name}: tensor {out_name}"
        # As in MergeKit: a model's own filters match its input tensor's name (its own layer
        # number in a shifted slice), shared parameters match the output tensor's name.
        model_params = tuple(
            self._build(self.spec.model_params, self._params(in_name, t, src.model, out_slice, self.spec.model_params),
                        f"{where}, model '{src.model}'")
            for src, in_name in row_sources)
        shared = self._build(self.spec.shared_params,
                             self._params(out_name, t, None, out_slice, self.spec.shared_params), where)
        stats = self._stats_refs(out_name, [src for src, _ in row_sources], where) if self.spec.needs_stats else None
        base_stats = self.recipe.resolve(self.recipe.base_stats) if self.recipe.base_stats else None
        base_stats_ref = None
        if self.spec.uses_base_stats and base_stats and stats is not None:
            if out_name in self.ckpts[self.index[base_stats]]:
                base_stats_ref = TensorRef(self.index[base_stats], out_name)
        job = self._by_token(Job(name=out_name, shape=out_shape, dtype=out_dtype, inputs=tuple(inputs),
                                 base=ref if uses_base else None, model_params=model_params, shared=shared,
                                 stats=None if stats is None else tuple(stats), base_stats=base_stats_ref,
                                 vocab_rows=vocab_rows, vocab_fill=vocab_fill, note=note), base_path)
        self._check_weight_sum(job, where)
        self.jobs.append(job)

    def _by_token(self, job: Job, base_path: str | None) -> Job:
        """A vocabulary tensor's job with its rows matched by token into the output vocabulary."""
        if self.vocab is None or not self._is_vocab(job.name) or not job.shape:
            return job
        models = [self.paths[r.model] for r in job.inputs] + ([self.paths[job.base.model]] if job.base else [])
        try:
            vocab = self.vocab.job(models, base_path, job.name)
        except RecipeError as exc:
            self.problems += [p for p in exc.problems if p not in self.problems]
            return job
        return dataclasses.replace(job, vocab=vocab, shape=(self.vocab.rows, *job.shape[1:]),
                                   note="; ".join(filter(None, [job.note, "rows matched by token to the output "
                                                                "vocabulary", *self.vocab.notes])))

    def _check_weight_sum(self, job: Job, where: str) -> None:
        """Weights that `normalize` would divide by must not sum to zero: caught here, before any reading."""
        if not (self.spec.divides_by_weight_sum and getattr(job.shared, "normalize", False)):
            return
        weights = [getattr(p, "weight", None) for p in job.model_params]
        if any(not isinstance(w, (int, float)) for w in weights):
            return
        if abs(sum(weights)) < 1e-8 and tuple(weights) not in self.zero_sums:
            self.zero_sums.add(tuple(weights))  # one message per set of weights, not one per tensor
            self.problems.append(f"{where} (and any other with these weights): the weights {weights} sum to zero, "
                                 "so `normalize: true` would divide by zero; change the weights or set "
                                 "`normalize: false`")

    def _stats_refs(self, name: str, sources: list[Source], where: str) -> list[TensorRef] | None:
        """Each row's statistics tensor for `name`; None when no model has one (the method's fallback)."""
        refs = []
        for src in sources:
            path = getattr(src, "stats", None)
            if path is None:
                self.problems.append(f"{where}: {self.spec.name} needs statistics; add `stats:` to model "
                                     f"'{src.model}' (see `mergelab stats`)")
                return None
            ck = self.ckpts[self.index[path]]
            refs.append(TensorRef(self.index[path], name) if name in ck else None)
        if all(r is None for r in refs):
            return None
        if any(r is None for r in refs):
            missing = [s.stats for s, r in zip(sources, refs) if r is None]
            self.problems.append(f"{where}: statistics file(s) {', '.join(missing)} have no tensor {name} "
                                 "while others do; statistics must cover the same tensors for every model")
            return None
        return refs

    def finish(self) -> None:
        if self.problems:
            raise RecipeError(self.problems + self.shape_problems, None)
        if self.shape_problems:
            raise ShapeMismatch("\n".join(self.shape_problems))


def _sources_layer_names(ck: Checkpoint, layer: int) -> list[str]:
    return [n for n in ck.keys() if layer_index(n) == layer]


def make_plan(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> Plan:
    """Plan every output tensor of `recipe` over opened `checkpoints` (path -> Checkpoint,
    statistics files included)."""
    planner = _Planner(recipe, checkpoints)
    slices = recipe.output_slices()
    config_updates: dict = {}
    merged = [p for p in recipe.input_paths() if p in planner.index]
    planner.vocab = plan_vocabulary(recipe, checkpoints, planner.tokenizer_ref, merged)
    if planner.vocab is not None:
        config_updates["vocab_size"] = planner.vocab.rows
    if recipe.slices:
        total = _plan_slices(planner, slices)
        config_updates["num_hidden_layers"] = total
    else:
        _plan_models(planner, slices[0])
    planner.finish()
    if recipe.out_dtype is not None:
        config_updates["torch_dtype"] = str(recipe.out_dtype).removeprefix("torch.")
    tok = planner.tokenizer_ref
    output = OutputSpec(config_updates, planner.ckpts[planner.index[tok]],
                        tokenizer_files(recipe, checkpoints, tok, planner.vocab))
    return Plan(recipe.method, planner.ckpts, planner.jobs, planner.left_out, output,
                compute_dtype=recipe.compute_dtype, ignored=tuple(recipe.ignored_parameters()))


def _plan_models(planner: _Planner, out_slice: OutputSlice) -> None:
    spec = planner.spec
    base = out_slice.base_model or planner.recipe.base
    ref_path = base if (spec.base != "ignored" and base) else out_slice.sources[0].model
    ref = planner.ckpts[planner.index[ref_path]]
    num_layers = max(ref.num_layers, 1)
    for name in ref.keys():
        layer = layer_index(name)
        t = _gradient_t(layer, num_layers) if layer is not None else 0.0
        planner.add(name, [(s, name) for s in out_slice.sources], t, out_slice)
    # Tensors other models have and the reference lacks are reported, never dropped silently.
    seen = set(ref.keys())
    for s in out_slice.sources:
        for name in planner.ckpts[planner.index[s.model]].keys():
            if name not in seen:
                planner.left_out.append((s.model, name, f"not in the reference model {ref_path}"))


def _plan_slices(planner: _Planner, slices: Sequence[OutputSlice]) -> int:
    first, last = slices[0], slices[-1]
    ref = planner.ckpts[planner.index[first.sources[0].model]]
    non_layer = [n for n in ref.keys() if layer_index(n) is None]
    pre = [n for n in non_layer if any(m in n for m in _PRE_MARKERS)]
    post = [n for n in non_layer if n not in pre]
    for name in pre:
        planner.add(name, [(s, name) for s in first.sources], 0.0, first)
    for i, sl in enumerate(slices):
        for j, src in enumerate(sl.sources):
            have = planner.ckpts[planner.index[src.model]].num_layers
            if src.layer_range[1] > have:
                planner.problems.append(
                    f"slices[{i}].sources[{j}].layer_range: [{src.layer_range[0]}, {src.layer_range[1]}] goes past "
                    f"the {have} layers of {src.model}; its layers are 0..{have - 1}, so the range ends at {have} "
                    "at most")
    if planner.problems:
        return 0
    offset = 0
    for sl in slices:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        length = lengths.pop()
        src0 = sl.sources[0]
        ck0 = planner.ckpts[planner.index[src0.model]]
        for i in range(length):
            t = _gradient_t(i, length)
            for name in _sources_layer_names(ck0, src0.layer_range[0] + i):
                out_name = with_layer_index(name, offset + i)
                inputs = [(s, with_layer_index(name, s.layer_range[0] + i)) for s in sl.sources]
                planner.add(out_name, inputs, t, sl)
        offset += length
    for name in post:
        planner.add(name, [(s, name) for s in last.sources], 0.0, last)
    return offset
