"""Compiled merge kernels are keyed on everything their code depends on, not on their own source alone:
a changed helper (`_numba`), a changed constant (`_random`), another numba or another CPU compiles afresh.

The end-to-end test runs a copy of the package in fresh processes against one kernel folder, as two
versions of evomerge on one machine would, and changes a helper the generated kernels inline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.merge import _fused

PACKAGE = Path(__file__).resolve().parents[2] / "evomerge"

MERGE = """
import sys
from pathlib import Path
import torch
import evomerge
from evomerge.merge import get_method, merge_tensor, use_kernel_dir
assert evomerge.__file__.startswith(sys.argv[2]), evomerge.__file__  # the copy, not the installed package
use_kernel_dir(Path(sys.argv[1]))
base, deltas = torch.zeros(256), torch.full((2, 256), 0.25)
merged = merge_tensor(get_method("task_arithmetic"), base, deltas, {"weight": [1.0, 1.0]})
print(float(merged[0]))
"""


def merged_value(copy: Path, kernel_dir: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["PYTHONPATH"] = str(copy)
    done = subprocess.run([sys.executable, "-c", MERGE, str(kernel_dir), str(copy)], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_changed_helper_compiles_new_kernels(tmp_path: Path) -> None:
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "evomerge", ignore=shutil.ignore_patterns("__pycache__"))
    kernels = tmp_path / "kernels"
    assert merged_value(copy, kernels) == 0.5
    helpers = copy / "evomerge" / "merge" / "_numba.py"
    text = helpers.read_text()
    stored = "        def store_float(array, k, value):\n            array[k] = value\n"
    assert stored in text, "the float store helper changed shape; update this test's edit"
    helpers.write_text(text.replace(stored, stored.replace("array[k] = value", "array[k] = value + np.float32(1.0)")))
    assert merged_value(copy, kernels) == 1.5  # the old compiled kernels gave 0.5 again
    assert len(list(kernels.glob("fused_2_*.py"))) == 2


def test_the_key_covers_helpers_numba_and_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _fused.kernel_key()
    try:
        for module, value in [("numba", "0.0.0-other"), ("cpu", "some-other-cpu")]:
            with monkeypatch.context() as patch:
                if module == "numba":
                    patch.setattr(_fused.numba, "__version__", value)
                else:
                    patch.setattr(_fused.numba.config, "CPU_NAME", value)
                _fused.kernel_key.cache_clear()
                assert _fused.kernel_key() != before, module
    finally:
        _fused.kernel_key.cache_clear()
    assert _fused.kernel_key() == before
    assert set(_fused.KERNEL_HELPERS) == {"evomerge.merge._numba", "evomerge.merge._random"}
