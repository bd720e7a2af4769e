"""Loader for the zoo task YAMLs (`custom_dataset: !function zoo_data.load`).

Reads data/<skill>_<split>.jsonl relative to this file, so the YAMLs work from any working directory.
The JSONL files come from `evomerge.zoo.write_eval_data` (a test checks they match the generator).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("fitness", "heldout")
END = "\n"  # every target's end-of-answer marker (evomerge.zoo._data.END)


def load(skill: str, answer_only: bool = False, **_metadata: object) -> dict[str, datasets.Dataset]:
    """split name -> Dataset with columns prompt, target; lm-eval also passes task metadata, ignored.

    answer_only: targets without their "\\n" end marker, for generate_until tasks (generation stops
    at "\\n" and leaves it out of the answer it compares)."""
    out = {}
    for split in SPLITS:
        path = DATA_DIR / f"{skill}_{split}.jsonl"
        with path.open(encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        if answer_only:
            rows = [{**row, "target": row["target"].removesuffix(END)} for row in rows]
        out[split] = datasets.Dataset.from_list(rows)
    return out
