"""Write the mergekit parity references once, with real mergekit: `tests/data/mergekit_parity_refs.safetensors`.

    /tmp/mkvenv/bin/python scripts/make_parity_references.py      # mergekit 0.1.5's Python (see mergekit_parity.py)

For each case of `tests/parity_models.CASES` it builds the tiny seeded models, runs the config through
mergekit's own `run_merge` (what mergekit-yaml runs; --random-seed 0), and keeps the `KEPT` tensors of
the result as `<config>/<variant>/<tensor>` (in mergekit's output dtype), about 80 KB in all.
`tests/test_mergekit_parity.py` runs the same configs through `evomerge merge` and compares.

The vocabulary and LoRA cases (`tests/vocab_models.CASES` and `LORA_CASES`: sources with added tokens,
tokenizer settings, `model+adapter` sources; mergekit with `--lora-merge-cache`) go the same way into
`tests/data/mergekit_vocab_refs.safetensors` (`tests/test_mergekit_vocab.py`, `tests/test_mergekit_lora.py`),
with the merged tokenizer's vocabulary and chat template as `<config>/<variant>/tokenizer` (JSON, as bytes).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import vocab_models  # noqa: E402
from parity_models import CASES, KEPT, REFERENCES, render, write_models  # noqa: E402


def tokenizer():
    """mergekit copies the base's tokenizer and fails without one: a small word-level one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{f"w{i}": 4 + i for i in range(28)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def main() -> None:
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        models = write_models(Path(tmp) / "models")
        for folder in models.glob("*/*"):
            tokenizer().save_pretrained(folder)
        write_references(CASES, KEPT, lambda c, v: render(c, v, models), Path(tmp), REFERENCES)
        vocab = vocab_models.write_models(Path(tmp) / "vocab")
        write_references((*vocab_models.CASES, *vocab_models.LORA_CASES), vocab_models.KEPT,
                         lambda c, v: vocab_models.render(c, v, vocab), Path(tmp), vocab_models.REFERENCES, with_tokenizer=True)


def write_references(cases, kept_names, rendered, tmp: Path, target: Path, *, with_tokenizer: bool = False) -> None:
    """Run each (config, variant) through mergekit's run_merge; keep `kept_names` of each result in `target`."""
    import torch
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file, save_file

    kept = {}
    for config, variant in cases:
        out = tmp / f"{config}-{variant}"
        merge = MergeConfiguration.model_validate(yaml.safe_load(rendered(config, variant)))
        run_merge(merge, str(out), MergeOptions(quiet=True, random_seed=0, lora_merge_cache=str(tmp / "lora-cache")))
        tensors = {}
        for f in sorted(out.glob("*.safetensors")):
            tensors |= load_file(f)
        kept |= {f"{config}/{variant}/{name}": tensors[name].contiguous() for name in kept_names}
        if with_tokenizer:
            kept[f"{config}/{variant}/tokenizer"] = torch.frombuffer(bytearray(tokenizer_summary(out).encode()), dtype=torch.uint8)
        print(f"{config} {variant}: {sorted({str(t.dtype) for t in tensors.values()})}")
    save_file(kept, str(target))
    print(f"wrote {target} ({target.stat().st_size / 1024:.0f} KB)")


def tokenizer_summary(folder: Path) -> str:
    """The merged tokenizer as JSON: its vocabulary (token -> id), which tokens are special, its chat template."""
    import json

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    special = sorted(t.content for t in tok.added_tokens_decoder.values() if t.special)
    return json.dumps({"vocab": tok.get_vocab(), "special": special, "chat_template": tok.chat_template}, sort_keys=True)


if __name__ == "__main__":
    main()
