"""Study configs over the tiny zoo, small enough for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def zoo_config(zoo, tmp_path: Path, *, name: str = "t", trials: int = 6, popsize: int = 4, limit: int | None = 40,
               storage: str | None = None, **overrides: Any) -> Path:
    """Write a study YAML over `zoo` (an evomerge.zoo.Zoo) and return its path."""
    config: dict[str, Any] = {
        "name": name,
        "storage": storage or f"sqlite:///{tmp_path / 'study.db'}",
        "models": {"base": str(zoo.base), "sources": [str(p) for p in zoo.specialists.values()]},
        "search_space": {"preset": "global_ties"},
        "evaluation": {"tasks": [{"name": f"zoo_{skill}", "limit": limit} for skill in zoo.specialists], "heldout_top_k": 2},
        "optimizer": {"kind": "cmaes", "seed": 0, "popsize": popsize},
        "budget": {"trials": trials},
        "workers": {"n": 2},
    }
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split("__")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
