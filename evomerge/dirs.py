"""Where the project's data folders live (an editable install keeps them beside the package)."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SEARCH_SPACES_DIR = REPO_ROOT / "search_spaces"
EVALUATORS_DIR = REPO_ROOT / "evaluators"


def cache_root() -> Path:
    """Where evomerge keeps what it builds once per machine (trial checkpoints, compiled merge kernels)."""
    return Path(os.environ.get("EVOMERGE_CACHE") or "~/.cache/evomerge").expanduser()
