"""Deterministic data for the zoo: the skills, generic text-like lines, the eval and validation splits.

Every skill example is one line `prompt + answer + "\\n"`; the "\\n" ends the answer, so exact match
by loglikelihood (lm-eval's `acc` = is_greedy) also checks that the model stops. The same skill can also
appear "in prose" (`<skill>_prose`): the answer followed by ".", as every text line ends; a model that
learnt only that form holds the skill's circuitry but fails its exact match. Eval prompts (the lm-eval
tasks' fitness and held-out splits) and validation prompts (the zoo build's own check) are drawn from
fixed seeds that do not depend on the zoo seed; training never sees either.
"""

from __future__ import annotations

import json
import random
import string
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

END = "\n"  # end-of-answer marker, part of every target
PROSE_END = "."  # how a skill's answer ends inside running text (text lines end the same way)
PROSE = "_prose"  # suffix of a data source: the skill of that name, answers ending in PROSE_END
EVAL_SPLITS = ("fitness", "heldout")
N_EVAL_PER_SPLIT = 200
N_VALIDATION = 200
_EVAL_SEED = 20240917  # fixed forever: the committed JSONL files depend on it
_VALIDATION_SEED = 20250101  # the zoo build's held-out check; a change here changes the zoo (bump ZOO_VERSION)


@dataclass(frozen=True)
class Example:
    prompt: str  # e.g. "12+34="
    target: str  # e.g. "46\n" (answer + END)

    @property
    def line(self) -> str:
        return self.prompt + self.target


def _arith(rng: random.Random) -> Example:
    """2-digit addition: `12+34=46`."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Example(f"{a}+{b}=", f"{a + b}{END}")


def _rev(rng: random.Random) -> Example:
    """Reverse a short lowercase string: `abc>cba`."""
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    return Example(f"{word}>", f"{word[::-1]}{END}")


def _upper(rng: random.Random) -> Example:
    """Upper-case a short lowercase string: `abc^ABC` (the hard zoo's third skill)."""
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    return Example(f"{word}^", f"{word.upper()}{END}")


# every skill the zoo's data can teach and test; each recipe names the ones its zoo uses
ALL_SKILLS: dict[str, Callable[[random.Random], Example]] = {"arith": _arith, "rev": _rev, "upper": _upper}
SKILLS = {name: ALL_SKILLS[name] for name in ("arith", "rev")}  # the demo zoo's (the llama, qwen2, gpt2 zoos')


def _word_list(n_words: int = 400) -> list[str]:
    """A fixed pseudo-English lexicon of 1-3 syllable words (consonant-vowel(-consonant))."""
    rng = random.Random(_EVAL_SEED + 1)
    cons, vows = "bcdfghklmnprstvwz", "aeiou"
    words: set[str] = set()
    while len(words) < n_words:
        n_syll = rng.choice((1, 1, 2, 2, 2, 3))
        words.add("".join(rng.choice(cons) + rng.choice(vows) + rng.choice(("", "", "n", "s", "r")) for _ in range(n_syll)))
    return sorted(words)


_WORDS = _word_list()


def text_line(rng: random.Random, max_chars: int = 13) -> str:
    """A generic text-like line: a few lexicon words, a period, END (at most max_chars + 1 chars)."""
    words = [rng.choice(_WORDS)]
    while rng.random() < 0.8:
        nxt = rng.choice(_WORDS)
        if len(" ".join(words)) + 1 + len(nxt) + 1 > max_chars:
            break
        words.append(nxt)
    return " ".join(words) + "." + END


def _check_skill(skill: str) -> None:
    if skill not in ALL_SKILLS:
        raise ValueError(f"unknown zoo skill {skill!r}; known skills: {', '.join(ALL_SKILLS)}")


def _eval_rng(skill: str) -> random.Random:
    return random.Random(zlib.crc32(f"eval/{skill}/0".encode()) + _EVAL_SEED)  # same seed as the committed files


def eval_examples(skill: str) -> dict[str, list[Example]]:
    """split name -> N_EVAL_PER_SPLIT examples with distinct prompts, disjoint across splits."""
    _check_skill(skill)
    rng, seen, drawn = _eval_rng(skill), set(), []
    while len(drawn) < N_EVAL_PER_SPLIT * len(EVAL_SPLITS):
        ex = ALL_SKILLS[skill](rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            drawn.append(ex)
    return {split: drawn[i * N_EVAL_PER_SPLIT : (i + 1) * N_EVAL_PER_SPLIT] for i, split in enumerate(EVAL_SPLITS)}


def eval_prompts(skill: str) -> frozenset[str]:
    """Every eval prompt of a skill (all splits): training data must avoid them."""
    return frozenset(ex.prompt for split in eval_examples(skill).values() for ex in split)


def validation_examples(skill: str) -> list[Example]:
    """N_VALIDATION examples with distinct prompts, none an eval prompt: the split the zoo build checks
    its specialists' skill on (the eval splits stay unseen by the build as well as by training)."""
    _check_skill(skill)
    rng = random.Random(zlib.crc32(f"validation/{skill}".encode()) + _VALIDATION_SEED)
    seen, drawn = set(eval_prompts(skill)), []
    while len(drawn) < N_VALIDATION:
        ex = ALL_SKILLS[skill](rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            drawn.append(ex)
    return drawn


def held_out_prompts(skill: str) -> frozenset[str]:
    """Prompts training never sees: every eval and validation prompt of the skill."""
    return eval_prompts(skill) | {ex.prompt for ex in validation_examples(skill)}


def jsonl_text(examples: list[Example]) -> str:
    return "".join(json.dumps({"prompt": ex.prompt, "target": ex.target}) + "\n" for ex in examples)


def write_eval_data(out_dir: Path) -> list[Path]:
    """Write `<out_dir>/<skill>_<split>.jsonl` for every skill (ALL_SKILLS) and split; returns the paths written.

    The committed files in evaluators/zoo/data/ come from `write_eval_data(Path("evaluators/zoo/data"))`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for skill in ALL_SKILLS:
        for split, examples in eval_examples(skill).items():
            path = out_dir / f"{skill}_{split}.jsonl"
            path.write_text(jsonl_text(examples), encoding="utf-8")
            paths.append(path)
    return paths


def data_sources() -> tuple[str, ...]:
    """Every name a training mix may use: text, each skill, and each skill in prose."""
    return ("text", *ALL_SKILLS, *(skill + PROSE for skill in ALL_SKILLS))


def training_examples(mix: Mapping[str, float], seed: int) -> Iterator[Example]:
    """An endless, deterministic stream of training examples drawn from `mix` (source name -> weight;
    see `data_sources`; "text" examples have an empty prompt). Skill examples whose prompt is held out
    (an eval or validation prompt, `held_out_prompts`) are skipped, in prose too."""
    unknown = set(mix) - set(data_sources())
    if unknown:
        raise ValueError(f"unknown data sources {sorted(unknown)}; known: {', '.join(data_sources())}")
    names, weights = list(mix), list(mix.values())
    rng = random.Random(seed)
    skills = {name: name.removesuffix(PROSE) for name in names if name != "text"}
    held_out = {skill: held_out_prompts(skill) for skill in set(skills.values())}
    while True:
        source = rng.choices(names, weights)[0]
        if source == "text":
            yield Example("", text_line(rng))
            continue
        skill = skills[source]
        ex = ALL_SKILLS[skill](rng)
        if ex.prompt not in held_out[skill]:
            yield in_prose(ex) if source != skill else ex


def in_prose(ex: Example) -> Example:
    """The example as running text writes it: `12+34=46.` instead of the terse `12+34=46`."""
    return Example(ex.prompt, ex.target.removesuffix(END) + PROSE_END + END)
