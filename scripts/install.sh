#!/usr/bin/env bash
# Create .venv (if missing) and install evomerge with its test extras, on the CPU build of torch.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build on a CPU-only machine.
# On a GPU machine, install the CUDA torch you want first and skip the pin: EVOMERGE_TORCH=skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${EVOMERGE_TORCH:-torch==2.13.0}" != skip ]; then
  .venv/bin/python -m pip install -q "${EVOMERGE_TORCH:-torch==2.13.0}"
fi
# setuptools announces every editable install with a multi-line notice; nothing to act on
PYTHONWARNINGS='ignore:Editable installation' .venv/bin/python -m pip install -q -e '.[test]'
echo "installed: $(.venv/bin/python -c 'import evomerge, torch; print("evomerge", evomerge.__version__, "torch", torch.__version__)')"
