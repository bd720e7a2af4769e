"""The tiny model zoo: a char-level base model and skill specialists fine-tuned from it, built on CPU.

`build_zoo(dir)` writes real Hugging Face checkpoints (Llama by default; Qwen2 and GPT-2 exist to test
other tensor-naming schemes). Each Llama specialist trains until it reaches its skill target on a
validation split the build holds out, and the build fails (`ZooBuildError`) if one cannot. The same
deterministic generator makes the training data, that validation split and the lm-eval task data under
evaluators/zoo/ (`write_eval_data`); training never sees a validation or eval prompt.

`build_zoo(dir, family="hard")` is the hard zoo (issue 16): a third skill (upper), and the rev specialist
over-trained past its target so that it poisons naive merges (a plain average of the three scores
clearly below the best of them; the build checks it). Its tasks (evaluators/zoo/hard_*.yaml) score by
generate_until with exact match; scripts/hard_zoo_references.py measures its reference merges.

    _build.py      build_zoo: recipes, targets, caching, atomic swap-in
    _train.py      the model families, the training loop, exact match
    _data.py       skills, text lines, eval and validation splits
    _tokenizer.py  the byte-level tokenizer
    demo.py        `evomerge demo`: zoo, search, export, a results table and a verdict
"""

from evomerge.zoo._build import RECIPES, ZOO_VERSION, Overtrain, Zoo, ZooBuildError, ZooRecipe, build_zoo, zoo_fingerprint
from evomerge.zoo._data import (
    ALL_SKILLS,
    EVAL_SPLITS,
    SKILLS,
    Example,
    eval_examples,
    jsonl_text,
    training_examples,
    validation_examples,
    write_eval_data,
)
from evomerge.zoo._tokenizer import char_tokenizer

__all__ = [
    "ALL_SKILLS",
    "EVAL_SPLITS",
    "RECIPES",
    "Overtrain",
    "SKILLS",
    "ZOO_VERSION",
    "Example",
    "Zoo",
    "ZooBuildError",
    "ZooRecipe",
    "build_zoo",
    "char_tokenizer",
    "eval_examples",
    "jsonl_text",
    "training_examples",
    "validation_examples",
    "write_eval_data",
    "zoo_fingerprint",
]
