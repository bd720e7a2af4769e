"""Write the mergekit parity references once, with real mergekit: `tests/data/mergekit_parity_refs.safetensors`.

    /tmp/mkvenv/bin/python scripts/make_parity_references.py      # mergekit 0.1.5's Python (see mergekit_parity.py)

For each case of `tests/parity_models.CASES` it builds the tiny seeded models, runs the config through
mergekit's own `run_merge` (what mergekit-yaml runs; --random-seed 0), and keeps the `KEPT` tensors of
the result as `<config>/<variant>/<tensor>` (in mergekit's output dtype), about 80 KB in all.
`tests/test_mergekit_parity.py` runs the same configs through `evomerge merge` and compares.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

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
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file, save_file

    logging.disable(logging.WARNING)
    kept = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = write_models(Path(tmp) / "models")
        for folder in models.glob("*/*"):
            tokenizer().save_pretrained(folder)
        for config, variant in CASES:
            out = Path(tmp) / f"{config}-{variant}"
            merge = MergeConfiguration.model_validate(yaml.safe_load(render(config, variant, models)))
            run_merge(merge, str(out), MergeOptions(quiet=True, random_seed=0))
            tensors = {}
            for f in sorted(out.glob("*.safetensors")):
                tensors |= load_file(f)
            kept |= {f"{config}/{variant}/{name}": tensors[name].contiguous() for name in KEPT}
            print(f"{config} {variant}: {sorted({str(t.dtype) for t in tensors.values()})}")
    save_file(kept, str(REFERENCES))
    print(f"wrote {REFERENCES} ({REFERENCES.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
