"""build_zoo: a base model and one fine-tuned specialist per skill, as real HF checkpoints, cached.

Regime (DESIGN.md, "Tiny zoo, measured here"): the base is pretrained on generic text-like lines mixed
with every skill at a lower share, so it already holds weak circuitry for each; each specialist is a
short fine-tune (600 steps, lr 2e-4, loss on the answer only) of that base on one skill. Specialists
fine-tuned from a base that never saw their skills do not merge at all.

Layout: <out_dir>/<family>/{zoo.json, base/, <skill>/...}. zoo.json is written last and holds the
fingerprint (code version, seed, family, recipe); a matching one means "done, reuse".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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

from evomerge.zoo._data import SKILLS, training_examples
from evomerge.zoo._tokenizer import char_tokenizer
from evomerge.zoo._train import ModelShape, Schedule, batches, new_model, train

ZOO_VERSION = 1  # bump whenever a change here or in _data/_train/_tokenizer changes the checkpoints
MANIFEST = "zoo.json"


@dataclass(frozen=True)
class ZooRecipe:
    """Everything besides the seed that decides the zoo's weights (it is part of the fingerprint)."""

    shape: ModelShape
    pretrain: Schedule
    finetune: Schedule
    batch_size: int = 32
    # share of each data source in the base's pretraining mix; specialists see only their skill
    base_mix: tuple[tuple[str, float], ...] = (("text", 0.4), ("arith", 0.45), ("rev", 0.15))
    skills: tuple[str, ...] = tuple(SKILLS)


RECIPES: dict[str, ZooRecipe] = {
    # the real zoo (demo, search): 1500 + 2 x 600 steps on one thread, about 2 CPU-minutes
    "llama": ZooRecipe(ModelShape(n_layers=4, hidden=128, n_heads=4, intermediate=256),
                       pretrain=Schedule(steps=1500, lr=1e-3, warmup_steps=100, cosine=True),
                       finetune=Schedule(steps=600, lr=2e-4)),
    # other tensor-naming schemes for tests: real fine-tunes of a common base, trained only briefly
    "qwen2": ZooRecipe(ModelShape(n_layers=2, hidden=64, n_heads=4, intermediate=128),
                       pretrain=Schedule(steps=60, lr=2e-3, warmup_steps=10, cosine=True),
                       finetune=Schedule(steps=20, lr=5e-4)),
    "gpt2": ZooRecipe(ModelShape(n_layers=2, hidden=64, n_heads=4, intermediate=128),
                      pretrain=Schedule(steps=60, lr=2e-3, warmup_steps=10, cosine=True),
                      finetune=Schedule(steps=20, lr=5e-4)),
}


@dataclass(frozen=True)
class Zoo:
    root: Path  # <out_dir>/<family>
    base: Path  # model dir of the base
    specialists: dict[str, Path]  # skill name -> model dir of its specialist
    family: str


def zoo_fingerprint(family: str, seed: int, recipe: ZooRecipe) -> str:
    payload = json.dumps({"version": ZOO_VERSION, "family": family, "seed": seed, "recipe": asdict(recipe)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_zoo(
    out_dir: Path, *, seed: int = 0, family: str = "llama", progress: Callable[[str], None] | None = print
) -> Zoo:
    """Build (or reuse) the zoo of `family` under out_dir/<family>; returns where its models are.

    Deterministic for a seed (bit-identical on one machine). The build happens in a hidden temp dir
    beside root that is renamed into place when complete: an interrupted build removes it, and only a
    killed process can leave a `.<family>.building-*` dir behind (safe to delete).
    """
    if family not in RECIPES:
        raise ValueError(f"unknown zoo family {family!r}; known families: {', '.join(RECIPES)}")
    recipe, root = RECIPES[family], Path(out_dir) / family
    fingerprint = zoo_fingerprint(family, seed, recipe)
    zoo = Zoo(root=root, base=root / "base", specialists={s: root / s for s in recipe.skills}, family=family)
    if _manifest_fingerprint(root) == fingerprint:
        return zoo
    say = progress or (lambda _line: None)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}.building-", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the zoo is meant to be shared like any model dir
    try:
        t0 = time.perf_counter()
        _train_zoo(tmp, family, seed, recipe, say)
        manifest = {"fingerprint": fingerprint, "zoo_version": ZOO_VERSION, "family": family, "seed": seed,
                    "recipe": asdict(recipe), "base": "base", "specialists": {s: s for s in recipe.skills},
                    "build_s": round(time.perf_counter() - t0, 1)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_in(tmp, root, fingerprint)
        say(f"zoo: {family} zoo ready at {root} ({manifest['build_s']} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return zoo


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
def _training_env() -> Iterator[None]:
    """One torch thread, and the caller's torch RNG state and thread count restored afterwards.

    These models are too small for intra-op threads to pay: on 2 idle cores a Llama step took 46 ms
    with 2 threads vs 52 ms with 1, but on a busy machine (load 8) 4.7 s vs 0.31 s, as OpenMP
    threads spin waiting for each other. One thread also keeps the results independent of the core count.
    """
    n_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n_threads)


def _train_zoo(out: Path, family: str, seed: int, recipe: ZooRecipe, say: Callable[[str], None]) -> None:
    tokenizer = char_tokenizer()
    with _training_env():
        torch.manual_seed(seed)
        model = new_model(family, recipe.shape)
        data = batches(training_examples(dict(recipe.base_mix), _derived_seed(seed, "base")), recipe.batch_size)
        train(model, data, recipe.pretrain, _reporter(say, f"pretraining {family} base", recipe.pretrain.steps), 10)
        _save(model, tokenizer, out / "base")
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        for skill in recipe.skills:
            model.load_state_dict(base_state)
            data = batches(training_examples({skill: 1.0}, _derived_seed(seed, skill)), recipe.batch_size, prompt_loss=False)
            train(model, data, recipe.finetune, _reporter(say, f"fine-tuning {family} {skill}", recipe.finetune.steps), 4)
            _save(model, tokenizer, out / skill)


def _reporter(say: Callable[[str], None], label: str, total: int) -> Callable[[int, float], None]:
    return lambda step, loss: say(f"zoo: {label} {step}/{total} loss {loss:.3f}")


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Writing model shards" bar per tiny checkpoint is noise
    try:
        model.save_pretrained(path)  # safetensors
        tokenizer.save_pretrained(path)
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()
