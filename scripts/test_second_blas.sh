#!/usr/bin/env bash
# The numerics tests on other BLAS and vector-kernel paths than the machine's default (docs/testing.md,
# "Other BLAS paths"). No test may depend on one machine's summation order: each path below re-runs the same
# tests with the kernels a different CPU would pick.
#
#   haswell   numpy's OpenBLAS on its Haswell kernels (those of the fresh clone that once failed
#             test_big_logits_fai), MKL (torch's matmuls) limited to AVX2, torch's own kernels at AVX2
#   sandybridge  OpenBLAS on its Sandybridge kernels (AVX, no FMA), MKL limited to SSE4.2, torch's kernels without vectors
#
# Usage: bash scripts/test_second_blas.sh [haswell|sandybridge|all] [extra pytest arguments]
# Uses .venv (or $PYTHON); installs nothing. Exit status: non-zero if any path fails.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
which="${1:-all}"
[[ $# -gt 0 ]] && shift
tests=(tests/test_oracle.py tests/test_torch_backend.py tests/test_layer_attention.py tests/test_properties.py
       tests/test_batch_invariance.py tests/test_triton_numerics.py tests/test_triton_backend.py
       tests/test_triton_layers.py tests/test_triton_properties.py)
declare -A paths=(
  [haswell]="OPENBLAS_CORETYPE=Haswell MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2"
  [sandybridge]="OPENBLAS_CORETYPE=Sandybridge MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default"
)
case "$which" in
  all) names=(haswell sandybridge) ;;
  haswell|sandybridge) names=("$which") ;;
  *) echo "test_second_blas.sh: unknown path '$which' (haswell, sandybridge or all)" >&2; exit 2 ;;
esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_INTERPRET=1
status=0
for name in "${names[@]}"; do
  # shellcheck disable=SC2086
  env ${paths[$name]} "$py" - <<'PY'
import ctypes, glob, os
import numpy, torch
core = "unknown"
for lib in glob.glob(os.path.join(os.path.dirname(os.path.dirname(numpy.__file__)), "numpy.libs", "*openblas*.so*")):
    so = ctypes.CDLL(lib)
    for symbol in ("scipy_openblas_get_corename64_", "openblas_get_corename"):
        if hasattr(so, symbol):
            getattr(so, symbol).restype = ctypes.c_char_p
            core = getattr(so, symbol)().decode()
print(f"numpy {numpy.__version__} OpenBLAS core: {core}; torch {torch.__version__} CPU capability: "
      f"{torch.backends.cpu.get_cpu_capability()}; MKL_ENABLE_INSTRUCTIONS={os.environ.get('MKL_ENABLE_INSTRUCTIONS')}")
PY
  echo "== $name: ${paths[$name]}"
  # shellcheck disable=SC2086
  if ! env ${paths[$name]} "$py" -m pytest -q -p no:cacheprovider "${tests[@]}" "$@"; then
    echo "== $name: FAILED"
    status=1
  fi
done
exit $status
