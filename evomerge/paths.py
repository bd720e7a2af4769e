"""Where the project's data folders live (an editable install keeps them beside the package)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SEARCH_SPACES_DIR = REPO_ROOT / "search_spaces"
EVALUATORS_DIR = REPO_ROOT / "evaluators"
