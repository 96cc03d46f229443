#!/usr/bin/env bash
# The main job: set up .venv when needed, then run it. Extra arguments go to the program.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/python" -m rhythm.quickstart "$@"
