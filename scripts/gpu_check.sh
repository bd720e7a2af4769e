#!/usr/bin/env bash
# GPU check for a lent H100/H200 (scripts/gpu_check.py does the work; its docstring lists the steps):
# a ~1B Llama and three perturbed specialists built on the GPU (no downloads), evomerge's CandidateWorker
# driven in-process (no Ray), in-memory ties / dare_ties builds against the HBM copy bound, and lm-eval
# throughput on a generated task; then a Mistral-7B-shaped merge of 3 specialists with sources_on host and
# device (peak GPU memory, build time against the PCIe and HBM bounds, lm-eval tokens/s). Writes
# $OUT/gpu_check.json; about 6-8 minutes, killed at 9 min 20 s (call the device tool with timeout_s 590;
# --skip-7b for the 1B part alone).
#
# The GPU image has torch, transformers, safetensors, accelerate, peft, pyarrow, pandas, sacrebleu,
# scikit-learn, huggingface-hub, but not lm-eval or its dataset stack; optuna, cma and ray are not needed
# (evomerge.runtime.worker and what it imports load none of them). Those four travel as wheels (9.6 MB), which
# the scorer's code path was checked to need and no more (lm-eval's other requirements, e.g. evaluate,
# sqlitedict, pytablewriter, rouge-score, are not imported by evaluate() + HFLM + a YAML task). Once, in the
# repo root of the machine that calls the device tool (.whl/ is in .gitignore):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#     -d .whl lm_eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#
# Then call the device tool's `run` with carry [".whl"], timeout_s 590, and the command
#   bash scripts/gpu_check.sh
# This script installs them first, as the device README says:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# Anywhere without a GPU: `python scripts/gpu_check.py --smoke --out /tmp/gc` runs the same steps on a
# tiny model on the CPU in a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit
fi
if ! python3 -c "import lm_eval, datasets" 2>/dev/null; then
  echo "gpu_check: lm_eval or datasets is missing; download the wheels into .whl/ (see this script's header) and carry .whl" >&2
  exit 2
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT_DIR="${OUT:-gpu_check_out}"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT_DIR/nvidia_smi.txt" || true
# checkpoints (4 x ~2 GB) go to local disk under /tmp, removed at the end
timeout 560 python3 scripts/gpu_check.py --out "$OUT_DIR" --work /tmp "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
