"""The tiny model zoo: a char-level base model and skill specialists fine-tuned from it, built on CPU.

`build_zoo(dir)` writes real Hugging Face checkpoints (Llama by default; Qwen2 and GPT-2 exist to test
other tensor-naming schemes). The same deterministic generator makes the training data and the
lm-eval task data under evaluators/zoo/ (`write_eval_data`), and training never sees an eval prompt.
"""

from evomerge.zoo._build import RECIPES, ZOO_VERSION, Zoo, ZooRecipe, build_zoo, zoo_fingerprint
from evomerge.zoo._data import EVAL_SPLITS, SKILLS, Example, eval_examples, jsonl_text, training_examples, write_eval_data
from evomerge.zoo._tokenizer import char_tokenizer

__all__ = [
    "EVAL_SPLITS",
    "RECIPES",
    "SKILLS",
    "ZOO_VERSION",
    "Example",
    "Zoo",
    "ZooRecipe",
    "build_zoo",
    "char_tokenizer",
    "eval_examples",
    "jsonl_text",
    "training_examples",
    "write_eval_data",
    "zoo_fingerprint",
]
