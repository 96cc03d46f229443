#!/usr/bin/env bash
# Run the verl tests against verl's own dependency pins (transformers<5.11 among them), in a second virtual
# environment beside the main one (.venv keeps the newest transformers and installs verl --no-deps).
#
#   scripts/test_verl_pins.sh                 # creates $VENV when missing, then runs the verl tests there
#   VENV=/path/to/venv scripts/test_verl_pins.sh -k v1
#
# The venv gets torch 2.13.0 first (the CPU build), then `verl==0.9.1` with the dependencies verl declares,
# so pip picks verl's transformers; then what verl's trainers import but declare only in its optional
# `verl-core` extra (TransferQueue - the v1 trainer's store -, cachetools, fastapi, uvicorn), pytest, triton (the kernels package) and this checkout itself, editable and --no-deps (so nothing of verl's
# pins moves). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$root/.venv-verl-pins}"
PY="${PYTHON:-python3}"
pipi() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
stamp="$VENV/.verl-pins-stamp"
want="torch==2.13.0 verl==0.9.1 TransferQueue==0.1.11 cachetools fastapi uvicorn triton==3.6.0 $root"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    echo "[verl-pins] installing torch 2.13.0 (CPU), then verl 0.9.1 with its own pins into $VENV"
    pipi "torch==2.13.0"
    pipi "verl==0.9.1"
    pipi "TransferQueue==0.1.11" cachetools fastapi uvicorn "triton==3.6.0" "pytest>=8" "hypothesis>=6"
    pipi --no-deps -e "$root"
    echo "$want" > "$stamp"
fi
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
print("[verl-pins] " + ", ".join(f"{p} {md.version(p)}" for p in ("verl", "transformers", "torch", "tensordict",
                                                                  "ray", "TransferQueue")))
EOF
cd "$root"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rs tests/test_verl_integration.py tests/test_verl_trainers.py "$@"
