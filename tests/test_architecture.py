"""The package's boundaries, checked by tools and by running the controller: not remembered, enforced."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from tiny_models import save_tiny

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "evomerge"
TOP_LEVEL_MODULES = {"__init__", "cli", "config", "dirs", "dtypes", "errors"}  # the rest is a folder per role


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["name"]: c for c in config["contracts"]}


def _roles() -> set[str]:
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    return {f"evomerge.{n}" for n in folders | {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}}


def test_import_contracts_are_kept() -> None:
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(("contract", "allowed"), [
    ("merge imports only itself and errors", {"evomerge.merge", "evomerge.errors"}),
    ("recipe imports only errors", {"evomerge.recipe", "evomerge.errors"}),
])
def test_allow_list_contracts_forbid_every_other_role(contract: str, allowed: set[str]) -> None:
    """A new role (folder or top-level module) must be forbidden to merge and recipe too."""
    forbidden = set(_contracts()[contract]["forbidden_modules"])
    assert forbidden == _roles() - allowed


def test_no_top_level_module_does_the_job_of_a_folder() -> None:
    assert {p.stem for p in PACKAGE.glob("*.py")} == TOP_LEVEL_MODULES


def test_the_controller_process_never_loads_torch(tmp_path: Path) -> None:
    """Checking a study, writing it and asking the first generation: no torch, no transformers."""
    base = save_tiny(tmp_path / "base", "llama")
    a = save_tiny(tmp_path / "a", perturb_from=base, seed=1)
    b = save_tiny(tmp_path / "b", perturb_from=base, seed=2)
    config = tmp_path / "study.yaml"
    config.write_text(textwrap.dedent(f"""
        name: t
        storage: sqlite:///{tmp_path / 'study.db'}
        models: {{base: {base}, sources: [{a}, {b}]}}
        search_space: ties_or_dare
        evaluation: {{tasks: [{{name: zoo_arith}}, {{name: zoo_rev}}]}}
    """))
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from evomerge.config import load_config
        from evomerge.search import prepare
        from evomerge.search.controllers import make_controller
        from evomerge.search.samplers import sampler_for
        from evomerge.study import StudyStore
        prepared = prepare(load_config({str(config)!r}))
        genes = prepared.space.genes
        store = StudyStore.create(prepared.cfg, {{g.name: g.default for g in genes}}, sampler_for(prepared.cfg))
        controller = make_controller(prepared.cfg.optimizer, np.array([g.to_unit(g.default) for g in genes]), 2)
        store.save_controller(0, controller.dumps())
        recipe = prepared.space.decode({{g.name: g.default for g in genes}})
        heavy = sorted(m for m in ("torch", "transformers", "safetensors", "numba") if m in sys.modules)
        print("heavy:", heavy, "method:", recipe.method)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "heavy: [] method: ties" in done.stdout
