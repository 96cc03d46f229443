#!/usr/bin/env bash
# The GPU check: one command for a bare CUDA machine without network (torch, triton preinstalled; pytest,
# flash-attn and pip may be missing; only this repository is there).
#
#   OUT=/some/dir bash bench/gpu_check.sh             (from anywhere; $OUT collects everything, at most 7 files)
#   bash bench/gpu_check.sh --dry-run                 (CPU: the same steps, boxes and files, tiny shapes)
#
# The plan (step, time box in seconds) is the PLAN table below and nowhere else; the log prints it first.
# A step that ends early passes its time on: each step runs until its planned deadline (the sum of the
# boxes up to it), so the whole run ends within the plan's total. Every measurement is written to
# $OUT/results.jsonl the moment it is taken, so a step cut by its box loses nothing already measured.
# Files in $OUT: gpu_check.log, results.jsonl, bench_gpu_kernels.json, warm.json, tuned_configs.json,
# pytest_cuda.log, end_to_end_gpu.json (when that optional step runs).
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
if [ -z "${OUT:-}" ]; then
    if [ "$DRY" = 1 ]; then OUT=${TMPDIR:-/tmp}/rhythm_gpu_check_dryrun; rm -rf "$OUT"; else OUT=$ROOT/bench/results/gpu_check; fi
fi
export OUT
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

# ---- the plan: step, box (s), what. Total <= 510 s (8.5 min); the benchmark boxes >= 240 s. ---------------
PLAN=(
    "preflight   40 C compiler, Python.h, import shim, TRITON_CACHE_DIR, one tiny kernel launch"
    "warm        60 compile the benchmark's, smoke's and CUDA tests' kernel variants in parallel processes"
    "smoke       40 correctness: fp32 T=2048, bf16 T=1024 (Hq 32, Hkv 8, D 128), MLA bf16 D 192 / Dv 128 vs fp64"
    "bench_long 200 benchmark + checks: D=128 T=8192, 32768, then D=64 T=8192, 32768 (bf16, Hq 32, Hkv 8)"
    "bench_2k    50 benchmark + checks: D=128, D=64 and MLA D=192 / Dv=128 at T=2048"
    "cuda_tests  60 pytest: the CUDA cases, the GPU-only determinism ones, tests/test_triton_numerics.py"
    "end_to_end ${GPU_CHECK_E2E_S:-0} optional (GPU_CHECK_E2E_S=60): RhythmScorer vs SDPA/eager forward, Qwen3-4B shape"
)
LIMIT_S=510
MIN_BENCH_S=240

declare -A BOX DEADLINE
total=0
bench=0
echo "== plan ($([ "$DRY" = 1 ] && echo 'dry run: CPU, Triton interpreter, tiny shapes' || echo 'GPU'); OUT=$OUT)"
for line in "${PLAN[@]}"; do
    read -r step box what <<<"$line"
    BOX[$step]=$box
    total=$(( total + box ))
    DEADLINE[$step]=$total
    case $step in bench_*) bench=$(( bench + box ));; esac
    printf 'plan: %-11s box %3d s  ends by %3d s  %s\n' "$step" "$box" "$total" "$what"
done
printf 'plan: total %d s (limit %d s), benchmark %d s (at least %d s)\n' "$total" "$LIMIT_S" "$bench" "$MIN_BENCH_S"
if [ "$total" -gt "$LIMIT_S" ] || [ "$bench" -lt "$MIN_BENCH_S" ]; then
    echo "the plan does not fit: shrink a box (or GPU_CHECK_E2E_S) so the total is <= $LIMIT_S s"; exit 2
fi

status=0
SECONDS=0
record() {  # step rc seconds box: one record beside the python steps' (bench/records.py, the one schema)
    $PY bench/records.py emit "$1" step_done "rc=$2" "seconds=$3" "box_s=$4" >/dev/null \
        || echo "== $1: its step_done record could not be written (bench/records.py failed)"
}
run_step() {  # run_step STEP [--log FILE] CMD...: CMD until the step's deadline; records and reports its exit
    local step=$1; shift
    local log=/dev/null
    if [ "$1" = --log ]; then log=$2; shift 2; fi
    local box=$(( DEADLINE[$step] - SECONDS ))
    if [ "${BOX[$step]}" -le 0 ]; then echo "== $step: not planned (box 0)"; return 0; fi
    if [ "$box" -lt 5 ]; then
        echo "== $step: skipped, ${box} s left before its deadline"; record "$step" 124 0 "$box"; status=1; return 0
    fi
    echo "== $step (box ${box} s, ${SECONDS} s elapsed)"
    local start=$SECONDS
    timeout -k 5 "$box" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    record "$step" "$rc" $(( SECONDS - start )) "$box"
    if [ "$rc" -ne 0 ]; then
        status=1
        echo "== $step: exit $rc$([ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo ' (time box hit)')"
    fi
    return "$rc"
}

# ---- install: a path shim exposing exactly rhythm and rhythm_kernels (never a top-level "kernels") ---------
SHIM=$(mktemp -d "${TMPDIR:-/tmp}/rhythm_shim.XXXXXX")
ln -s "$ROOT/rhythm" "$SHIM/rhythm"
ln -s "$ROOT/kernels" "$SHIM/rhythm_kernels"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
if [ "${GPU_CHECK_PIP:-0}" = 1 ]; then   # optional; the shim stays first on the path either way
    $PY -m pip install --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -n 3 || echo "pip install failed"
fi
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/rhythm_triton_cache}   # local disk
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
DRYFLAG=()
[ "$DRY" = 1 ] && DRYFLAG=(--dry-run)
echo "python: $(command -v "$PY") | PYTHONPATH=$PYTHONPATH | TRITON_CACHE_DIR=$TRITON_CACHE_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: unavailable"

if ! run_step preflight $PY bench/gpu_preflight.py "${DRYFLAG[@]}"; then
    echo "== preflight failed: nothing later can run (see the FAIL lines above)"
    $PY bench/gpu_summary.py "$OUT"
    exit 1
fi

run_step warm $PY bench/gpu_warm.py --step warm "${DRYFLAG[@]}"
run_step smoke $PY bench/gpu_smoke.py --step smoke "${DRYFLAG[@]}"

if [ "$DRY" = 1 ]; then LONG=(64:96); SHORT=(64:64 192/128:48); else LONG=(128:8192 128:32768 64:8192 64:32768); SHORT=(128:2048 64:2048 192/128:2048); fi
left=$(( DEADLINE[bench_long] - SECONDS ))
run_step bench_long $PY bench/bench_gpu_kernels.py --step bench_long --shapes "${LONG[@]}" \
    --budget-s $(( left > 60 ? left - 35 : left / 2 )) "${DRYFLAG[@]}"
left=$(( DEADLINE[bench_2k] - SECONDS ))
run_step bench_2k $PY bench/bench_gpu_kernels.py --step bench_2k --shapes "${SHORT[@]}" \
    --budget-s $(( left > 30 ? left - 15 : left / 2 )) "${DRYFLAG[@]}"

if $PY -c "import pytest" 2>/dev/null; then
    run_step cuda_tests --log "$OUT/pytest_cuda.log" $PY -m pytest -q -p no:cacheprovider \
        tests/test_triton_backend.py tests/test_triton_numerics.py tests/test_torch_backend.py \
        -k "cuda or split_heads or two_size or deterministic or numerics" --durations=5
else
    echo "== cuda_tests: pytest is not installed here; the smoke and the benchmark's checks are the correctness record"
    echo "pytest is not installed: tests/test_triton_backend.py was not run" >"$OUT/pytest_cuda.log"
    record cuda_tests 0 0 0
fi

E2E=()
[ "$DRY" = 1 ] && E2E=(--dry-run)
run_step end_to_end $PY bench/bench_end_to_end.py --gpu --out "$OUT" "${E2E[@]}"

echo "== summary ($SECONDS s elapsed, plan $total s)"
$PY bench/gpu_summary.py "$OUT"
count=$(find "$OUT" -maxdepth 1 -type f | wc -l)
echo "== files in $OUT ($count; the device tool brings back at most 8):"
ls -l "$OUT"
[ "$count" -le 8 ] || { echo "too many files in OUT"; status=1; }
echo "== done in $SECONDS s (status $status)"
exit $status
