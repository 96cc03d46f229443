#!/usr/bin/env bash
# The main job: set up .venv when needed, then `rhythm analyze` on the bundled SmolLM2-135M-Instruct
# (greedy answer to a math prompt, per-token WAAD/FAI, preplan/anchor marks in the terminal, an HTML and
# PNG report in reports/). Extra arguments go to `rhythm analyze` (see --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh" main
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$root/.venv/bin/rhythm" analyze "$@"
