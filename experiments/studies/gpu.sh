#!/usr/bin/env bash
# Reproduce docs/results.md on a machine with an NVIDIA GPU (issue 11).
#
#   bash experiments/studies/gpu.sh                 # all six studies into docs/results
#   bash experiments/studies/gpu.sh --only 2,4      # any arguments go to experiments.studies.reproduce
#
# Installs the project and the CUDA 12 build of the JAX version it resolved into a fresh virtual
# environment (.gpu-venv), refuses to go on unless JAX sees a GPU, then runs every study's
# documented command (experiments/studies/reproduce.py): the training studies 2, 3, 4 and 6 on
# the GPU; study 5 on the CPU, because the claim it checks is about CPU cost; study 1 traces
# shapes only. Writes each study's JSON and PNG and docs/results/reproduce.json (wall time per
# study and the device it ran on).
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV="${GPU_VENV:-.gpu-venv}"
python3 -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
pip install --quiet -e .
JAX_VERSION="$(python -c 'import jax; print(jax.__version__)')"
pip install --quiet "jax[cuda12]==${JAX_VERSION}"

python - <<'EOF'
import jax

backend = jax.default_backend()
if backend != "gpu":
    raise SystemExit(f"JAX runs on {backend!r}, not 'gpu': {jax.devices()}; check the CUDA driver")
print("JAX", jax.__version__, "on", jax.devices())
EOF

python -m experiments.studies.reproduce "$@"
