"""Planning: one job per output tensor of a recipe, decided before any tensor is read.

A plan (plan.py) names, for every output tensor, the input tensors (checkpoint, name) it
is computed from, the method and its resolved parameters. Everything that can
be wrong with the inputs (shapes, vocabularies, missing tensors, parameters
that do not validate) is found here and reported together, so a merge never
fails halfway for a reason that was knowable at the start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pydantic import ValidationError

from mergelab.checkpoint.reader import Checkpoint, layer_index, with_layer_index
from mergelab.errors import RecipeError, ShapeMismatch
from mergelab.methods import MethodParams, MethodSpec, spellings
from mergelab.plan import Job, OutputSpec, Plan, TensorRef
from mergelab.recipe import OutputSlice, Recipe, Source
from mergelab.tokenizer import VocabularyPlan, plan_vocabulary, tokenizer_files

# Names of input-embedding-like tensors: in slice mode they come from the first
# slice's models, everything else outside the layers from the last slice's.
_PRE_MARKERS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type")
# Tensors whose first dimension is the vocabulary.
_VOCAB_MARKERS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out")


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
        shape, in_dtype = ref_ck.shape(ref_name), ref_ck.dtype(ref_name)
        out_dtype = self.out_dtype or in_dtype
        ref = TensorRef(self.index[ref_path], ref_name)
        if not in_dtype.is_floating_point:
            self.jobs.append(Job(name=out_name, shape=shape, dtype=in_dtype, inputs=(ref,), op="copy",
                                 note=f"non-float tensor ({in_dtype}) copied from {ref_path}"))
            return
        inputs, row_sources, resize = self._matched_inputs(out_name, sources, base_path if uses_base else None,
                                                           ref_path, shape)
        if len(inputs) < self.spec.min_models:
            self.jobs.append(self._by_token(Job(name=out_name, shape=shape, dtype=out_dtype, inputs=(ref,), op="copy",
                                                note=f"only in {ref_path}: copied"), base_path))
            return
        out_shape, vocab_rows, vocab_fill, note = shape, None, None, None
        if resize:
            resized = self._resized_vocabulary(ref_in_name, shape)
            if resized is None:
                return
            out_shape, vocab_rows, vocab_fill, note = resized
        where = f"{self.recipe.source_name}: tensor {out_name}"
        job = self._by_token(Job(name=out_name, shape=out_shape, dtype=out_dtype, inputs=tuple(inputs),
                                 base=ref if uses_base else None, vocab_rows=vocab_rows, vocab_fill=vocab_fill,
                                 note=note, **self._job_params(out_name, row_sources, t, out_slice, where)), base_path)
        self._check_weight_sum(job, where)
        self.jobs.append(job)

    def _matched_inputs(self, out_name: str, sources: list[tuple[Source, str]], base_path: str | None,
                        ref_path: str, shape: tuple) -> tuple[list[TensorRef], list[tuple[Source, str]], bool]:
        """The models' tensors that can be merged into `out_name` (the base's left out when it is the base),
        their (source, name) rows, and whether vocabularies differ so rows must be cut or padded."""
        inputs: list[TensorRef] = []
        row_sources: list[tuple[Source, str]] = []
        resize = False
        for src, in_name in sources:
            if base_path is not None and src.model == base_path:
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
                    resize = True
                else:
                    self.shape_problems.append(
                        f"model '{src.model}' tensor {name} has shape {tuple(other)}, "
                        f"{ref_path} has {tuple(shape)}: these models cannot be merged tensor by tensor")
                    continue
            inputs.append(TensorRef(self.index[src.model], name))
            row_sources.append((src, in_name))
        return inputs, row_sources, resize

    def _resized_vocabulary(self, ref_in_name: str, shape: tuple) -> tuple | None:
        """(output shape, rows, fill tensor, note) for a vocabulary cut or padded to the tokenizer source's."""
        tok = self.tokenizer_ref
        tok_name = self._resolve_name(tok, ref_in_name)
        if tok_name is None:
            self.problems.append(f"tokenizer source '{tok}' has no tensor {ref_in_name} to size the vocabulary")
            return None
        rows = self.ckpts[self.index[tok]].shape(tok_name)[0]
        return ((rows, *shape[1:]), rows, TensorRef(self.index[tok], tok_name),
                f"vocabulary resized to {rows} rows of {tok}")

    def _job_params(self, out_name: str, row_sources: list[tuple[Source, str]], t: float, out_slice: OutputSlice,
                    where: str) -> dict:
        """A merge job's validated parameters and statistics: model_params, shared, stats, base_stats."""
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
        return dict(model_params=model_params, shared=shared, stats=None if stats is None else tuple(stats),
                    base_stats=base_stats_ref)

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
