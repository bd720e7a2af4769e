"""build_zoo: a base model and one fine-tuned specialist per skill, as real HF checkpoints, cached.

Regime (DESIGN.md, "Tiny zoo, measured here"; specialists fine-tuned from a base that never saw their
skills do not merge at all): the base is pretrained on generic text-like lines mixed with every skill in
prose (the answer ends in "." like a sentence, `_data.in_prose`). It learns reversal's circuitry (and
a little of addition's) yet fails both tasks: exact match wants the terse answer and a stop. Each
specialist is a fine-tune of that base on its skill (loss on the answer only, lr 2e-4, a fifth of each
batch replayed from the base's mix) that stops when the skill reaches its target on a validation split
the build holds out: on every machine the specialists end at the same skill, not at a step count whose
outcome depends on the CPU's float rounding. The build checks its targets and fails (ZooBuildError) when a
specialist misses its target within the step cap, or when the base is not weak on a skill.

The hard zoo (family "hard", a Llama like the demo zoo's) adds a third skill and one over-trained
specialist (`Overtrain`): after reaching its target it trains on its skill alone, at a higher lr, well
past it. Its task vector grows (to 10x the norm of the upper one, which reached its target in as many
steps) and overrides the others in a sum or a sign election, so naive merges of all three lose to tuned
weights. The build checks that the sum of the task vectors scores clearly lower than it did before the
over-training, and records which specialist was over-trained and how, with the plain average's and both
sums' scores.

Layout: <out_dir>/<family>/{zoo.json, base/, <skill>/...}. zoo.json is written last and holds the
fingerprint (code version, seed, family, recipe) and every model's skill scores; a matching
fingerprint means "done, reuse".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from evomerge.errors import ConfigError, EvomergeError
from evomerge.zoo._data import N_VALIDATION, PROSE, SKILLS, Example, training_examples, validation_examples
from evomerge.zoo._tokenizer import char_tokenizer
from evomerge.zoo._train import ModelShape, Schedule, Trained, batches, exact_match, new_model, train

ZOO_VERSION = 2  # bump whenever a change here or in _data/_train/_tokenizer changes the checkpoints
MANIFEST = "zoo.json"
THREADS_ENV = "EVOMERGE_ZOO_THREADS"  # torch threads for the build (default 1; see _training_env)


class ZooBuildError(EvomergeError):
    """The zoo's models missed a skill target (a specialist too weak, or the base too strong)."""


@dataclass(frozen=True)
class Overtrain:
    """One specialist trained on past its skill target: `schedule` more steps on its skill alone (no
    replay). The build then checks that it poisons naive merges: the sum of all task vectors (task
    arithmetic, weights 1) scores at least `poison_margin` lower (mean exact match over the skills,
    validation split) than the same sum with this specialist as it was at its target."""

    skill: str
    schedule: Schedule
    poison_margin: float = 0.0


@dataclass(frozen=True)
class ZooRecipe:
    """Everything besides the seed that decides the zoo's weights (it is part of the fingerprint)."""

    shape: ModelShape
    pretrain: Schedule
    finetune: Schedule  # steps: the cap; a fine-tune with a skill_target stops when it reaches it
    batch_size: int = 32
    # share of each data source in the base's pretraining mix (`_data.data_sources`)
    base_mix: tuple[tuple[str, float], ...] = (("text", 0.4), ("arith" + PROSE, 0.3), ("rev" + PROSE, 0.3))
    # share of each fine-tune batch replayed from the base mix (see finetune_mix): the specialist keeps
    # what the base knew besides its own skill, so the task vectors add up instead of erasing each other
    replay: float = 0.2
    skills: tuple[str, ...] = tuple(SKILLS)  # the llama, qwen2 and gpt2 zoos' (a change here changes them)
    skill_target: float | None = None  # a specialist's least exact match on its skill (validation split)
    base_ceiling: float | None = None  # the base's most exact match on any skill: weak, so merging has something to gain
    check_every: int = 25  # fine-tune steps between validation checks
    # fields added after ZOO_VERSION 2's zoos were built: they enter the fingerprint only when set
    # (LATER_FIELDS), so those zoos keep their fingerprints and caches
    arch: str | None = None  # model family (`_train.new_model`); None: the zoo's own name
    overtrain: Overtrain | None = None

    def __post_init__(self) -> None:
        if self.overtrain is not None and self.overtrain.skill not in self.skills:
            raise ValueError(f"overtrain.skill = {self.overtrain.skill!r} is not one of the recipe's skills "
                             f"({', '.join(self.skills)}); over-train one of them")


LATER_FIELDS = ("arch", "overtrain")


RECIPES: dict[str, ZooRecipe] = {
    # the real zoo (demo, search): 900 pretraining steps, then each specialist until it reaches 0.9 exact
    # match (825-1200 steps for arith, 25 for rev, over 4 seeds; capped at 3000); 1.5 CPU-minutes on one idle core
    "llama": ZooRecipe(ModelShape(n_layers=4, hidden=128, n_heads=4, intermediate=256),
                       pretrain=Schedule(steps=900, lr=1e-3, warmup_steps=100, cosine=True),
                       finetune=Schedule(steps=3000, lr=2e-4), skill_target=0.9, base_ceiling=0.2),
    # other tensor-naming schemes for tests: real fine-tunes of a common base, trained only briefly
    "qwen2": ZooRecipe(ModelShape(n_layers=2, hidden=64, n_heads=4, intermediate=128),
                       pretrain=Schedule(steps=60, lr=2e-3, warmup_steps=10, cosine=True),
                       finetune=Schedule(steps=20, lr=5e-4)),
    "gpt2": ZooRecipe(ModelShape(n_layers=2, hidden=64, n_heads=4, intermediate=128),
                      pretrain=Schedule(steps=60, lr=2e-3, warmup_steps=10, cosine=True),
                      finetune=Schedule(steps=20, lr=5e-4)),
    # the hard zoo (issue 16): the llama zoo's model and regime with a third skill (upper), and the rev
    # specialist over-trained so that naive merges of the three lose to tuned weights. Measured while
    # designing it (seed 0, validation split, mean exact match over the skills): 300 steps at lr 1e-3 drop
    # the sum of the task vectors from 0.662 to 0.313, and a coarse weight grid's best from 0.862 to 0.698
    # (weights 1, 0.25, 0.5); default TIES scores 0.33 either way, and the plain average rises from 0.113 to
    # 0.493 (at 1/3 each, only the over-trained vector still acts). After 600 steps the grid's best (0.603)
    # leaves rev out. Seeds 0, 1, 2: the sum fell by 0.35, 0.24, 0.32 (the margin checked: 0.15); arith took
    # 1400, 950, 750 fine-tune steps, rev and upper 25. 2 CPU-minutes on one idle core (seed 0).
    "hard": ZooRecipe(ModelShape(n_layers=4, hidden=128, n_heads=4, intermediate=256),
                      pretrain=Schedule(steps=900, lr=1e-3, warmup_steps=100, cosine=True),
                      finetune=Schedule(steps=3000, lr=2e-4), skill_target=0.9, base_ceiling=0.2,
                      base_mix=(("text", 0.3), ("arith" + PROSE, 0.3), ("rev" + PROSE, 0.2), ("upper" + PROSE, 0.2)),
                      skills=("arith", "rev", "upper"), arch="llama",
                      overtrain=Overtrain("rev", Schedule(steps=300, lr=1e-3, warmup_steps=50), poison_margin=0.15)),
}


@dataclass(frozen=True)
class Zoo:
    root: Path  # <out_dir>/<family>
    base: Path  # model dir of the base
    specialists: dict[str, Path]  # skill name -> model dir of its specialist
    family: str


def zoo_fingerprint(family: str, seed: int, recipe: ZooRecipe) -> str:
    fields = {k: v for k, v in asdict(recipe).items() if not (k in LATER_FIELDS and v is None)}
    payload = json.dumps({"version": ZOO_VERSION, "family": family, "seed": seed, "recipe": fields}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_zoo(
    out_dir: Path, *, seed: int = 0, family: str = "llama", progress: Callable[[str], None] | None = print,
    threads: int | None = None,
) -> Zoo:
    """Build (or reuse) the zoo of `family` under out_dir/<family>; returns where its models are.

    Deterministic for a seed and thread count on one machine. The build happens in a hidden temp dir
    beside root that is renamed into place when complete: an interrupted or failed build removes it,
    and only a killed process can leave a `.<family>.building-*` dir behind (safe to delete).
    `threads`: torch threads while training (default: $EVOMERGE_ZOO_THREADS, else 1). It is not part
    of the fingerprint: a zoo is defined by its recipe and skill targets, which hold at any count.
    Raises ZooBuildError (one line) when a model misses a skill target.
    """
    if family not in RECIPES:
        raise ValueError(f"unknown zoo family {family!r}; known families: {', '.join(RECIPES)}")
    recipe, root = RECIPES[family], Path(out_dir) / family
    fingerprint = zoo_fingerprint(family, seed, recipe)
    zoo = Zoo(root=root, base=root / "base", specialists={s: root / s for s in recipe.skills}, family=family)
    if _manifest_fingerprint(root) == fingerprint:
        return zoo
    say = progress or (lambda _line: None)
    n_threads = threads or build_threads()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}.building-", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the zoo is meant to be shared like any model dir
    try:
        t0 = time.perf_counter()
        with _training_env(n_threads):
            built = _train_zoo(tmp, family, seed, recipe, say)
        manifest = {"fingerprint": fingerprint, "zoo_version": ZOO_VERSION, "family": family, "seed": seed,
                    "recipe": asdict(recipe), "base": "base", "specialists": {s: s for s in recipe.skills},
                    "build_s": round(time.perf_counter() - t0, 1), "torch_threads": n_threads, **built}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_in(tmp, root, fingerprint)
        say(f"zoo: {family} zoo ready at {root} ({manifest['build_s']} s, {n_threads} torch thread(s))")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return zoo


def build_threads() -> int:
    """Torch threads for a zoo build: $EVOMERGE_ZOO_THREADS, else 1."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return 1
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{THREADS_ENV}={value!r}: give a whole number of torch threads, 1 or more (default 1)")
    return int(value)


def _manifest_fingerprint(root: Path) -> str | None:
    try:
        return json.loads((root / MANIFEST).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _swap_in(tmp: Path, root: Path, fingerprint: str) -> None:
    """Replace root by tmp with renames only, so readers never see a half-written zoo."""
    if _manifest_fingerprint(root) == fingerprint:  # a concurrent build of the same zoo finished first
        return
    old = None
    if root.exists():
        old = root.with_name(f".{root.name}.old-{os.getpid()}")
        root.rename(old)
    try:
        tmp.rename(root)
    except OSError:
        if _manifest_fingerprint(root) != fingerprint:  # not a concurrent build of the same zoo
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _derived_seed(seed: int, purpose: str) -> int:
    return zlib.crc32(f"{seed}/{purpose}".encode())


@contextmanager
def _training_env(n_threads: int) -> Iterator[None]:
    """n_threads torch threads, and the caller's torch RNG state and thread count restored afterwards.

    These models are too small for intra-op threads to pay, hence the default of one: on 2 idle cores
    a Llama step took 46 ms with 2 threads vs 52 ms with 1, but on a busy machine (load 8) 4.7 s vs
    0.31 s, as OpenMP threads spin waiting for each other.
    """
    before = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(n_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def _train_zoo(out: Path, family: str, seed: int, recipe: ZooRecipe, say: Callable[[str], None]) -> dict:
    """Train and save the base and every specialist into out, checking the recipe's skill targets;
    returns what zoo.json records about them (skill scores per model, fine-tune steps per specialist,
    and with an over-trained specialist, its schedule and the naive merges' scores)."""
    tokenizer = char_tokenizer()
    validation = {skill: validation_examples(skill) for skill in recipe.skills}
    torch.manual_seed(seed)
    model = new_model(recipe.arch or family, recipe.shape)
    data = batches(training_examples(dict(recipe.base_mix), _derived_seed(seed, "base")), recipe.batch_size)
    train(model, data, recipe.pretrain, _reporter(say, f"pretraining {family} base", recipe.pretrain.steps), 10)
    scores = {"base": skill_scores(model, validation)}
    _check_base(family, recipe, scores["base"])
    _save(model, tokenizer, out / "base")
    base_state = _copy(model)
    steps, specialists, at_target = {}, {}, {}
    for skill in recipe.skills:
        model.load_state_dict(base_state)
        trained = _finetune(model, family, seed, skill, recipe, validation[skill], say)
        scores[skill], steps[skill] = skill_scores(model, validation), trained.steps
        _check_specialist(family, recipe, skill, scores[skill][skill], trained.steps)
        if recipe.overtrain is not None and recipe.overtrain.skill == skill:
            at_target = {skill: _copy(model)}
            _overtrain(model, family, seed, recipe, say)
            scores[skill] = skill_scores(model, validation)
            _check_overtrained(family, recipe, scores[skill][skill])
        _save(model, tokenizer, out / skill)
        specialists[skill] = _copy(model)
    _say_scores(say, scores, steps)
    built = {"skill_scores": scores, "finetune_steps": steps}
    if recipe.overtrain is None:
        return built
    merged = _naive_merges(model, base_state, specialists, at_target, validation, say)
    _check_poisoned(family, recipe, merged)
    # the over-trained specialist's steps to its target are in finetune_steps; these came after them
    return {**built, "overtrained": {"skill": recipe.overtrain.skill, **asdict(recipe.overtrain.schedule)},
            "naive_merge_scores": merged}


NAIVE_MERGES = {  # zoo.json key -> what it is, as printed
    "plain_average": "the mean of the specialists' weights",
    "task_sum": "base + the sum of the task vectors: task arithmetic, weights 1",
    "task_sum_at_target": "the same, the over-trained specialist as it was at its target",
}


def _naive_merges(model: PreTrainedModel, base: dict[str, torch.Tensor], specialists: dict[str, dict[str, torch.Tensor]],
                  at_target: dict[str, dict[str, torch.Tensor]], validation: dict[str, list[Example]],
                  say: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """NAIVE_MERGES of the specialists (at_target: the over-trained skill -> its weights at its target), each
    loaded into model and scored on validation."""
    before = list({**specialists, **at_target}.values())
    states = {"plain_average": plain_average(list(specialists.values())),
              "task_sum": task_sum(base, list(specialists.values())), "task_sum_at_target": task_sum(base, before)}
    scores = {}
    for name, state in states.items():
        model.load_state_dict(state)
        scores[name] = skill_scores(model, validation)
        _say_row(say, name.replace("_", " "), scores[name], f"  ({NAIVE_MERGES[name]})")
    return scores


def _copy(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def plain_average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of the models' weights, tensor by tensor (mergekit's `linear` with equal weights)."""
    return {k: torch.stack([state[k] for state in states]).mean(0) for k in states[0]}


def task_sum(base: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """base + the sum of the task vectors (model - base): task arithmetic with weights 1."""
    return {k: b + torch.stack([state[k] - b for state in states]).sum(0) for k, b in base.items()}


def _overtrain(model: PreTrainedModel, family: str, seed: int, recipe: ZooRecipe, say: Callable[[str], None]) -> Trained:
    """Train on past the target: the skill alone (no replay: the model forgets the rest), recipe.overtrain's schedule."""
    over = recipe.overtrain
    if over is None:
        raise ValueError(f"the {family} recipe over-trains no specialist")
    data = batches(training_examples({over.skill: 1.0}, _derived_seed(seed, f"{over.skill}/overtrain")),
                   recipe.batch_size, prompt_loss=False)
    report = _reporter(say, f"over-training {family} {over.skill} (lr {over.schedule.lr:g}, no replay)", over.schedule.steps)
    return train(model, data, over.schedule, report, 4)


def _finetune(model: PreTrainedModel, family: str, seed: int, skill: str, recipe: ZooRecipe,
              validation: list[Example], say: Callable[[str], None]) -> Trained:
    """Fine-tune model on one skill (loss on the answer only) until it reaches the recipe's target."""
    data = batches(training_examples(finetune_mix(recipe, skill), _derived_seed(seed, skill)), recipe.batch_size, prompt_loss=False)
    target = recipe.skill_target
    done = None if target is None else (lambda: exact_match(model, validation) >= target)
    until = "" if target is None else f" (until {target} exact match)"
    report = _reporter(say, f"fine-tuning {family} {skill}{until}", recipe.finetune.steps)
    return train(model, data, recipe.finetune, report, 4, done=done, check_every=recipe.check_every)


def finetune_mix(recipe: ZooRecipe, skill: str) -> dict[str, float]:
    """The skill at 1 - replay, the base mix at replay, less the skill's own prose form (its answers end
    in "." and would contradict the terse ones the fine-tune teaches).

    Measured while designing this recipe, without replay: over 5 builds (seeds, pretraining lengths) the
    arith specialist's reversal exact match ended anywhere from 0.005 to 0.56, and where it ended near 0
    no merge of the two specialists beat the best of them (0.49 against 0.49), so the merge gain
    depended on the build. With it, every build tried kept a gain (docs/results/demo.md).
    """
    rest = {name: share for name, share in recipe.base_mix if name != skill + PROSE}
    total = sum(rest.values())
    if not recipe.replay or not total:
        return {skill: 1.0}
    return {skill: 1.0 - recipe.replay, **{name: recipe.replay * share / total for name, share in rest.items()}}


def skill_scores(model: PreTrainedModel, validation: dict[str, list[Example]]) -> dict[str, float]:
    """skill -> exact match of model on that skill's validation examples."""
    return {skill: exact_match(model, examples) for skill, examples in validation.items()}


_REPORT = f"please report it with your CPU model and torch version ({torch.__version__})"


def _check_base(family: str, recipe: ZooRecipe, scores: dict[str, float]) -> None:
    for skill, score in scores.items():
        if recipe.base_ceiling is not None and score > recipe.base_ceiling:
            raise ZooBuildError(
                f"zoo build failed: the {family} base already scores {score:.3f} exact match on {skill} (validation "
                f"split), above its ceiling {recipe.base_ceiling}: merging would have little to gain; {_REPORT}")


def _check_specialist(family: str, recipe: ZooRecipe, skill: str, score: float, steps: int) -> None:
    if recipe.skill_target is not None and score < recipe.skill_target:
        raise ZooBuildError(
            f"zoo build failed: the {family} {skill} specialist reached {score:.3f} exact match on its validation "
            f"split in {steps} fine-tune steps (the cap), short of its target {recipe.skill_target}; {_REPORT}")


def _check_overtrained(family: str, recipe: ZooRecipe, score: float) -> None:
    over = recipe.overtrain
    if over is not None and recipe.skill_target is not None and score < recipe.skill_target:
        raise ZooBuildError(
            f"zoo build failed: the {family} {over.skill} specialist fell to {score:.3f} exact match on its validation "
            f"split after over-training ({over.schedule.steps} steps at lr {over.schedule.lr:g}), below its target "
            f"{recipe.skill_target}; {_REPORT}")


def _check_poisoned(family: str, recipe: ZooRecipe, merged: dict[str, dict[str, float]]) -> None:
    """The over-trained specialist must poison naive merges: the sum of the task vectors at least
    poison_margin lower than with that specialist at its target, by mean exact match over the skills."""
    over = recipe.overtrain
    if over is None:
        return
    poisoned, before = (statistics.fmean(merged[name].values()) for name in ("task_sum", "task_sum_at_target"))
    if poisoned > before - over.poison_margin:
        raise ZooBuildError(
            f"zoo build failed: the sum of the {family} specialists' task vectors scores {poisoned:.3f} mean exact match "
            f"(validation split), not {over.poison_margin} below the {before:.3f} it scores with the {over.skill} "
            f"specialist at its target: over-training it does not poison naive merges; {_REPORT}")


def _say_scores(say: Callable[[str], None], scores: dict[str, dict[str, float]], steps: dict[str, int]) -> None:
    say(f"zoo: skill scores (exact match on the build's validation split, {N_VALIDATION} prompts per skill):")
    for name, by_skill in scores.items():
        tail = f"  ({steps[name]} fine-tune steps)" if name in steps else ""
        _say_row(say, "base" if name == "base" else f"{name} specialist", by_skill, tail)


def _say_row(say: Callable[[str], None], label: str, by_skill: dict[str, float], tail: str = "") -> None:
    cells = "  ".join(f"{skill} {score:.3f}" for skill, score in by_skill.items())
    say(f"zoo:   {label:<18} {cells}{tail}")


def _reporter(say: Callable[[str], None], label: str, total: int) -> Callable[[int, float], None]:
    return lambda step, loss: say(f"zoo: {label} step {step}/{total} loss {loss:.3f}")


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Writing model shards" bar per tiny checkpoint is noise
    try:
        model.save_pretrained(path)  # safetensors
        tokenizer.save_pretrained(path)
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()
