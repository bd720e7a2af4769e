"""The study config: one YAML file that describes a search completely.

Config is data: it knows no torch, Ray or lm-eval. Every model is strict (`extra="forbid"`), so a typo
fails at load time with its field path and a did-you-mean. Relative paths are resolved against the
config file's folder, so a config means the same thing from any working directory, and the resolved
config is what gets stored in the study (resume needs nothing else).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.dtypes import DtypeName
from evomerge.errors import ConfigError
from evomerge.dirs import EVALUATORS_DIR, SEARCH_SPACES_DIR
from evomerge.recipe import OTHER, SPLIT_KINDS as SPLIT_TENSOR_KINDS
from evomerge.recipe.refs import is_lora, split_lora

DEFAULT_STORAGE = "sqlite:///evomerge.db"
DEFAULT_SEARCH_SPACE = "task_arithmetic"  # the preset a config without search_space gets (issue 16; bench_search)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Bound(_Strict):
    """A closed search interval for one gene."""

    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Bound:
        if self.low > self.high:
            raise ValueError(f"low = {self.low} > high = {self.high}; set low <= high")
        return self


class TrialRef(_Strict):
    """A trial of another evomerge study used as a model (PS+DFS: chain a merge study into a path study).

    Written as a mapping, `{study: NAME, storage: URL, trial: N}`, never as one string: a storage URL holds
    ':' and '/', which a string reference would confuse with a Hub id or a path. `storage` means what the
    study's own `storage:` means (a relative sqlite path is relative to the working directory). Before
    a search starts, the trial is written once as a checkpoint in a cache folder (evomerge.export.trial_models).
    """

    study: str
    storage: str
    trial: int | None = Field(None, ge=0, description="trial number; omitted = the best completed trial")


ModelRef = str | TrialRef


class ModelsConfig(_Strict):
    base: ModelRef = Field(description="base model: a local HF checkpoint dir, a Hub id 'org/name[@rev]', or a trial reference")
    sources: list[ModelRef] = Field(min_length=1, description="fine-tuned models merged onto the base; MODEL+ADAPTER is a "
                                    "LoRA adapter applied to MODEL (written once to lora_merge_cache)")
    dtype: DtypeName = "auto"
    allow_pickle: bool = False  # read pytorch_model.bin (pickle) checkpoints only when this is set
    trust_remote_code: bool = False
    lora_merge_cache: str | None = Field(None, description="where MODEL+ADAPTER sources are written once as merged models "
                                         "(default: $EVOMERGE_CACHE/lora; mergekit's --lora-merge-cache)")

    @field_validator("base", "sources", mode="before")
    @classmethod
    def _trial_refs(cls, value: Any) -> Any:
        """Check mappings as trial references here, so a typo gets a message that names the fix."""
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, dict):
                where = f"item {i}: " if isinstance(value, list) else ""
                _check_trial_ref(item, where)
        return value


def _check_trial_ref(item: dict, where: str) -> None:
    form = "write {study: NAME, storage: URL, trial: N} (trial omitted = the best trial)"
    unknown = [k for k in item if k not in TrialRef.model_fields]
    if unknown:
        hint = difflib.get_close_matches(str(unknown[0]), list(TrialRef.model_fields), n=1)
        fix = f"did you mean: {hint[0]}?" if hint else "allowed: study, storage, trial"
        raise ValueError(f"{where}unknown key {unknown[0]!r} in a trial reference ({fix}); {form}")
    try:
        TrialRef.model_validate(item)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        got = "" if err["type"] == "missing" else f" = {err.get('input')!r}"
        raise ValueError(f"{where}trial reference {key}{got}: {err['msg'].lower()}; {form}") from None


class ParameterSpaceConfig(_Strict):
    """A parameter-space search: per layer group, per source model, the method's parameters."""

    kind: Literal["parameter"] = "parameter"
    methods: list[str] = Field(default_factory=lambda: ["ties"], min_length=1)
    layer_groups: int = Field(1, ge=1, description="1 = one set of parameters for the whole model")
    params: dict[str, Bound] = Field(default_factory=dict, description="searched parameters and bounds")
    fixed: dict[str, float] = Field(default_factory=dict, description="parameters held at a value")
    tensor_kinds: bool | list[str] = Field(
        False, description="separate parameters per tensor kind within each layer group: true = attention, mlp "
        "and other; or the kinds to split out, e.g. [attention] (every other tensor shares 'other')"
    )

    @field_validator("tensor_kinds")
    @classmethod
    def _split_kinds(cls, kinds: bool | list[str]) -> bool | list[str]:
        if isinstance(kinds, bool):
            return kinds
        if not kinds:
            raise ValueError("is empty; list attention and/or mlp, or write true for both, or false for none")
        for kind in kinds:
            if kind not in SPLIT_TENSOR_KINDS:
                raise ValueError(
                    f"{kind!r} is not a kind to split out; use attention and/or mlp (every other tensor, "
                    "norms, embeddings and head included, shares the parameters of 'other')"
                )
        if len(set(kinds)) < len(kinds):
            raise ValueError(f"{kinds} lists a kind twice; list each kind once")
        return kinds

    @model_validator(mode="after")
    def _weights_can_move(self) -> ParameterSpaceConfig:
        """Weights pinned at 0 make every candidate the base model, and every linear merge a division by a
        zero weight sum: refuse them here, not after a whole budget of failed trials."""
        bound = self.params.get("weight")
        fixed_zero = self.fixed.get("weight") == 0
        if fixed_zero or (bound is not None and bound.low == bound.high == 0):
            got = "fixed weight = 0" if fixed_zero else "weight bounds {low: 0, high: 0}"
            raise ValueError(f"{got} pin every model's weight to 0, so every merge is the base model (linear: a "
                             "division by a zero weight sum); give weight a range that leaves 0, e.g. {low: 0, high: 1}")
        return self

    @property
    def kinds(self) -> tuple[str, ...]:
        """The recipe's kinds: the split-out kinds in canonical order, then 'other'; () when not split."""
        chosen = SPLIT_TENSOR_KINDS if self.tensor_kinds is True else self.tensor_kinds or ()
        return tuple(k for k in SPLIT_TENSOR_KINDS if k in chosen) + (OTHER,) if chosen else ()


class LayerSwapSpaceConfig(_Strict):
    """Each layer group takes its weights from one source model (or the base): one choice gene per group."""

    kind: Literal["layer_swap"]
    layer_groups: int = Field(0, ge=0, description="0 = one group per layer")
    include_base: bool = Field(True, description="the base model is one of the choices")
    blend_boundaries: bool = Field(False, description="the first layer after a change of source is a 50/50 mix")


class DataFlowSpaceConfig(_Strict):
    """Data-flow (path) search after Akiba et al. 2024: which layers of which models run, in which order."""

    kind: Literal["dfs"]
    repeats: int = Field(2, ge=1, description="the sources' layers are laid out in order and repeated this often")
    max_path_layers: int | None = Field(None, ge=1, description="cap on the path length (default: 2x the base's layers)")
    scale: Bound = Field(default_factory=lambda: Bound(low=0.5, high=2.0), description="hidden-state scale per slot")
    embed_from: str | None = Field(None, description="model label whose embeddings and head are used (default: first source)")
    include_base: bool = Field(False, description="lay out the base model's layers too")

    @field_validator("scale")
    @classmethod
    def _positive(cls, scale: Bound) -> Bound:
        if scale.low <= 0:
            raise ValueError(f"low = {scale.low}; a scale must be positive to fold into the weights; set low > 0")
        return scale


SPACE_KINDS = {"parameter": ParameterSpaceConfig, "layer_swap": LayerSwapSpaceConfig, "dfs": DataFlowSpaceConfig}
SearchSpaceConfig = Annotated[ParameterSpaceConfig | LayerSwapSpaceConfig | DataFlowSpaceConfig, Field(discriminator="kind")]


class TaskConfig(_Strict):
    """One lm-eval task of the fitness: its metric, weight and splits (also what the scorer takes)."""

    name: str = Field(description="an lm-eval task or group name (registered, or a YAML under evaluation.include_paths)")
    metric: str = Field("acc", description="key in lm-eval's results, without the ',none' filter suffix")
    weight: float = Field(1.0, description="weight in the fitness, a weighted mean over tasks")
    num_fewshot: int | None = Field(None, description="few-shot examples (default: the task's own)")
    limit: int | None = Field(None, description="examples scored per split (default: all)")
    fitness_split: str = Field("fitness", description="split scored during the search")
    heldout_split: str = Field("heldout", description="split the best trials are reported on")

    @field_validator("weight")
    @classmethod
    def _weight(cls, weight: float) -> float:
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"Input should be greater than 0 and finite; got weight = {weight}")
        return weight

    @field_validator("limit")
    @classmethod
    def _limit(cls, limit: int | None) -> int | None:
        if limit is not None and limit < 1:
            raise ValueError(f"limit = {limit}; set limit >= 1, or leave it out for all examples")
        return limit

    @field_validator("num_fewshot")
    @classmethod
    def _num_fewshot(cls, num_fewshot: int | None) -> int | None:
        if num_fewshot is not None and num_fewshot < 0:
            raise ValueError(f"num_fewshot = {num_fewshot}; set num_fewshot >= 0, or leave it out for the task's default")
        return num_fewshot

    def split(self, which: str) -> str:
        """The split name scored for `which` ("fitness" or "heldout")."""
        return self.fitness_split if which == "fitness" else self.heldout_split


class FirstPassConfig(_Strict):
    """Multi-fidelity: each candidate is first scored on the first `fraction` of every task's fitness
    examples; it is scored in full only when that first-pass fitness reaches the top `promote` share of
    earlier candidates' first passes. The rest are recorded as PRUNED trials with their first-pass fitness,
    which is also what the optimizer is told."""

    fraction: float = Field(0.25, gt=0, lt=1, description="share of each task's fitness examples in the first pass")
    promote: float = Field(0.5, gt=0, le=1, description="share of candidates (by first-pass fitness) scored in full")
    warmup: int | None = Field(None, ge=1, description="Optuna samplers: candidates scored in full before any is "
                               "held back (default: 2 x workers); CMA-ES scores its first generations in full")


class EstimateConfig(_Strict):
    """Cheap fitness (evomerge.runtime.estimate): each candidate is scored on anchor examples chosen from
    how the base and the sources do on the whole fitness split, and its full-set score is estimated. The
    best candidates by estimate are then scored on every example; that full score is what is reported,
    compared and exported."""

    anchors: float = Field(0.25, gt=0, le=1, description="share of each task's fitness examples a candidate is "
                           "scored on (at least one per group of examples the known models treat alike)")
    rescore_top: int = Field(3, ge=1, description="best candidates by estimate scored in full at the end")
    seed: int = Field(0, description="which examples of each group become anchors")


class EvaluationConfig(_Strict):
    tasks: list[TaskConfig] = Field(min_length=1)
    include_paths: list[str] = Field(default_factory=lambda: [str(EVALUATORS_DIR)])
    batch_size: int = Field(64, ge=1)
    heldout_top_k: int = Field(3, ge=0, description="best trials re-scored on the held-out split")
    first_pass: FirstPassConfig | None = Field(None, description="multi-fidelity: a cheap first pass, full scoring for the promising")
    estimate: EstimateConfig | None = Field(None, description="cheap fitness: anchors per task, an estimate of the full score")

    @model_validator(mode="after")
    def _one_cheap_fitness(self) -> EvaluationConfig:
        if self.first_pass is not None and self.estimate is not None:
            raise ValueError("first_pass and estimate are two ways to cheapen fitness; keep one of them")
        return self

    @field_validator("tasks")
    @classmethod
    def _unique(cls, tasks: list[TaskConfig]) -> list[TaskConfig]:
        names = [t.name for t in tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task {dup[0]!r} is listed twice; list each task once")
        return tasks


OPTUNA_SAMPLERS = ("tpe", "gp", "nsga2", "optuna_cmaes", "optuna_random")
MULTI_OBJECTIVE_SAMPLERS = ("tpe", "gp", "nsga2", "optuna_random")


class OptimizerConfig(_Strict):
    """`cmaes` (pycma, generation by generation, exact resume) and `random` are evomerge's own
    controllers; the Optuna samplers propose one trial whenever a worker is free (no generations)."""

    kind: Literal["cmaes", "random", "tpe", "gp", "nsga2", "optuna_cmaes", "optuna_random"] = "cmaes"
    popsize: int | None = Field(None, ge=2, description="default: CMA-ES's 4 + 3 ln(n_genes)")
    sigma0: float = Field(0.25, gt=0, le=1, description="initial step size in the unit cube of genes")
    lookahead: int | None = Field(
        None, ge=0, description="candidates of the next generation asked early, for workers that would wait on "
        "the slowest of this one (cmaes, random); default: popsize // 2 with several workers, 0 with one"
    )
    seed: int = 0
    objectives: Literal["fitness", "per_task"] = Field(
        "fitness", description="per_task: a multi-objective study, one objective per task (Optuna samplers)"
    )

    @model_validator(mode="after")
    def _objectives_need_a_sampler(self) -> OptimizerConfig:
        if self.objectives == "per_task" and self.kind not in MULTI_OBJECTIVE_SAMPLERS:
            raise ValueError(
                f"objectives = per_task needs a multi-objective sampler ({', '.join(MULTI_OBJECTIVE_SAMPLERS)}), "
                f"not {self.kind}; change optimizer.kind"
            )
        return self


class BudgetConfig(_Strict):
    trials: int = Field(64, ge=1)



class WorkersConfig(_Strict):
    """Ray workers. Memory per parameter of a worker, for E sources in bf16 and a bf16 live model: the live
    model (2 bytes) plus, by `sources_on`, base and sources resident on the worker's device (device:
    2(E + 1) bytes, private), in the worker's host memory (host: 2(E + 1) bytes of host RAM per worker,
    pinned on GPUs; the GPU holds a few tensors in flight), or memory-mapped (mmap: 0 private bytes; the
    node's page cache holds one copy, 2(E + 1) bytes, that every worker on the node shares)."""

    n: int = Field(2, ge=1)
    gpus_per_worker: float | None = Field(None, ge=0, description="default: 1 when the cluster has GPUs; "
                                          "k > 1 spreads the live model over k GPUs (transformers device_map)")
    cpus_per_worker: float = Field(1, gt=0)
    sources_on: Literal["auto", "device", "host", "mmap"] = Field(
        "auto", description="where base and sources live: device (resident on the GPU, fastest), host (host "
        "memory, streamed to the GPU per tensor), mmap (memory-mapped files, one copy per node shared by its "
        "workers); auto: mmap on CPUs, device on a GPU when base, sources and live model fit in 90% of its free "
        "memory, else mmap")
    merge_cache: bool = Field(False, description="keep per-worker precomputation over the sources (sorted "
                              "magnitudes for TIES/Breadcrumbs, the uniforms' order for DARE, row ranks for DELLA: "
                              "8 bytes per parameter per source once a method has run; off by default): CPU builds "
                              "several times faster (scripts/bench_merge.py), bit-identical results. Without it a "
                              "worker still keeps tens of KB per tensor per source (magnitude histograms, L1 norms)")


class StudyConfig(_Strict):
    name: str = "evomerge"
    storage: str = DEFAULT_STORAGE
    models: ModelsConfig
    search_space: SearchSpaceConfig = Field(description="a preset name (search_spaces/NAME.yaml) or a space; "
                                            "omitted: the default preset, task_arithmetic")
    evaluation: EvaluationConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    budget: BudgetConfig = BudgetConfig()
    workers: WorkersConfig = WorkersConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_space_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("search_space") is None:  # omitted: the default preset, expanded
            data = {**data, "search_space": {"kind": "parameter", **load_preset(DEFAULT_SEARCH_SPACE)}}
        space = data.get("search_space") if isinstance(data, dict) else None
        if isinstance(space, dict) and "kind" not in space:
            return {**data, "search_space": {"kind": "parameter", **space}}
        return data

    @model_validator(mode="after")
    def _estimate_needs_a_merge_space(self) -> StudyConfig:
        if self.evaluation.estimate is not None and isinstance(self.search_space, DataFlowSpaceConfig):
            raise ValueError("evaluation.estimate chooses anchors from merges of the sources; a data-flow (dfs) "
                             "space has none: remove estimate, or search a parameter or layer-swap space")
        return self

    @model_validator(mode="after")
    def _first_pass_needs_one_objective(self) -> StudyConfig:
        if self.evaluation.first_pass is not None and self.optimizer.objectives == "per_task":
            raise ValueError("evaluation.first_pass needs optimizer.objectives = fitness (Optuna cannot prune "
                             "multi-objective trials); remove first_pass or set objectives: fitness")
        return self

    def with_overrides(self, **changes: Any) -> StudyConfig:
        """A copy with dotted-path overrides, e.g. `{"budget.trials": 8}`; None values are skipped."""
        data = self.model_dump()
        for path, value in changes.items():
            if value is None:
                continue
            *parents, leaf = path.split(".")
            node = data
            for key in parents:
                node = node[key]
            node[leaf] = value
        return parse_config(data, source="override")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


def load_config(path: Path | str) -> StudyConfig:
    """Read, resolve presets and relative paths, and validate a study config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config error: {path}: no such file; pass the path of a study YAML file")
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path}: expected a mapping at the top level, got {type(data).__name__}")
    data = _expand_preset(data, path)
    _resolve_paths(data, path.parent)
    return parse_config(data, source=str(path))


def parse_config(data: dict[str, Any], source: str = "config") -> StudyConfig:
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"config error: {source}: {_one_line(exc)}") from None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config error: {path}: malformed YAML{where}: {problem}") from None


def _expand_preset(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """`search_space: NAME` or `search_space: {preset: NAME, ...overrides}` loads search_spaces/NAME.yaml."""
    space = data.get("search_space")
    if isinstance(space, str):
        space = {"preset": space}
    if not isinstance(space, dict) or "preset" not in space:
        return data
    overrides = {k: v for k, v in space.items() if k != "preset"}
    preset = load_preset(str(space["preset"]), path.parent)
    return {**data, "search_space": {**preset, **overrides}}


def load_preset(name: str, config_dir: Path | None = None) -> dict[str, Any]:
    """A search-space preset by name (search_spaces/NAME.yaml) or by path to a YAML file."""
    candidates = [Path(name)] if name.endswith((".yaml", ".yml")) else [SEARCH_SPACES_DIR / f"{name}.yaml"]
    if config_dir is not None and name.endswith((".yaml", ".yml")):
        candidates.insert(0, config_dir / name)
    for file in candidates:
        if file.is_file():
            preset = _read_yaml(file)
            if not isinstance(preset, dict):
                raise ConfigError(f"config error: preset {file}: expected a mapping")
            return preset
    known = sorted(p.stem for p in SEARCH_SPACES_DIR.glob("*.yaml"))
    hint = difflib.get_close_matches(name, known, n=3)
    suggestion = f"did you mean: {', '.join(hint)}?" if hint else f"known presets: {', '.join(known)}"
    raise ConfigError(f"config error: search_space.preset = {name!r} not found ({suggestion})")


def _resolve_paths(data: dict[str, Any], root: Path) -> None:
    """Make local model paths and task include paths absolute, relative to the config file's folder."""
    models = data.get("models")
    if isinstance(models, dict):
        for key in ("base",):
            if isinstance(models.get(key), str):
                models[key] = _local_or_ref(models[key], root)
        if isinstance(models.get("sources"), list):
            models["sources"] = [_local_or_ref(s, root) if isinstance(s, str) else s for s in models["sources"]]
        if isinstance(models.get("lora_merge_cache"), str):
            models["lora_merge_cache"] = str((root / Path(models["lora_merge_cache"]).expanduser()).resolve())
    evaluation = data.get("evaluation")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("include_paths"), list):
        evaluation["include_paths"] = [str((root / p).resolve()) for p in evaluation["include_paths"]]


def _local_or_ref(ref: str, root: Path) -> str:
    """Paths that look local ('./x', '../x', '/x', or an existing folder) become absolute; Hub ids stay;
    each side of a LoRA reference MODEL+ADAPTER on its own."""
    if is_lora(ref):
        return "+".join(_local_or_ref(part, root) for part in split_lora(ref))
    candidate = root / ref
    if ref.startswith((".", "/", "~")) or candidate.exists():
        return str(Path(ref).expanduser() if ref.startswith("~") else candidate.resolve())
    return ref


def _one_line(exc: ValidationError) -> str:
    # A typo'd key also makes the real key "missing": report the typo, which explains both.
    err = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    raw = tuple(err["loc"])
    kind = raw[1] if len(raw) > 1 and raw[0] == "search_space" and raw[1] in SPACE_KINDS else None
    err = {**err, "loc": _without_union_tags(raw)}
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key{_did_you_mean(err['loc'], kind)}; remove it or fix its spelling"
    if err["type"] == "missing":
        return f"{loc}: required key is missing; add it"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{loc or 'top level'}: {msg}{shown}{more}"


def _without_union_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """pydantic puts the union member's tag in the path (search_space.dfs.x); users wrote search_space.x."""
    if len(loc) > 1 and loc[0] == "search_space" and loc[1] in SPACE_KINDS:
        return (loc[0], *loc[2:])
    return tuple(loc)


def _did_you_mean(loc: tuple[Any, ...], space_kind: str | None = None) -> str:
    model: Any = StudyConfig
    for key in loc[:-1]:
        if isinstance(key, int):  # a list index: stay on the list's item model
            continue
        if key == "search_space" and model is StudyConfig:
            model = SPACE_KINDS.get(space_kind or "parameter", ParameterSpaceConfig)
            continue
        field = model.model_fields.get(str(key)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return ""
        model = _model_of(field.annotation)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    hint = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=2)
    return f" (did you mean: {', '.join(hint)}?)" if hint else f" (allowed: {', '.join(model.model_fields)})"


def _model_of(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as `list[TaskConfig]` or `TaskConfig`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
