#!/usr/bin/env bash
# Rehearse the GPU check on CPU before spending device time: `bench/gpu_check.sh --dry-run` end to end in two
# fresh virtual environments that mirror the GPU image as far as a CPU machine allows (triton 3.6.0,
# transformers 5.17.0, numpy; torch 2.13.0's CPU build in place of the image's 2.11 + CUDA 13), one with pytest
# and one without. Each runs on a copy of the working tree's files as the device tool sends them (tracked and
# untracked-not-ignored: no .venv, no rhythm_kernels link), in an emptied environment, with the optional
# end-to-end step switched on, and is then checked: the plan printed and within its limits, every step run to
# exit 0 inside its box and recorded, each step's records and files written under OUT (at most 8 files).
#
#   bash scripts/rehearse_gpu_check.sh
#   REHEARSAL_VENVS=/path/to/venvs bash scripts/rehearse_gpu_check.sh     (default ~/.cache/rhythm-rehearsal)
#
# Missing environments are created (pip, from whatever index or local wheel store pip is configured with).
# Logs: $REHEARSAL_OUT (default /tmp/rhythm_rehearsal)/<env>/out/gpu_check.log
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
VENVS=${REHEARSAL_VENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/rhythm-rehearsal}
WORK=${REHEARSAL_OUT:-/tmp/rhythm_rehearsal}
PINS=(torch==2.13.0 triton==3.6.0 numpy transformers==5.17.0)
rm -rf "$WORK"
mkdir -p "$WORK" "$VENVS"
overall=0

for name in gpucheck-pytest gpucheck-nopytest; do
    venv=$VENVS/$name
    if [ ! -x "$venv/bin/python" ]; then
        echo "== creating $venv"
        python3 -m venv "$venv" || exit 1
        extra=(); [ "$name" = gpucheck-pytest ] && extra=(pytest)
        "$venv/bin/pip" install -q "${PINS[@]}" "${extra[@]}" || { echo "pip install into $venv failed"; exit 1; }
    fi
    has_pytest=$("$venv/bin/python" -c "import importlib.util as u; print(u.find_spec('pytest') is not None)")
    versions=$("$venv/bin/python" -c "import torch, triton, transformers, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)")
    echo "== $name: $versions, pytest $has_pytest"
    if { [ "$name" = gpucheck-pytest ] && [ "$has_pytest" != True ]; } || \
       { [ "$name" = gpucheck-nopytest ] && [ "$has_pytest" != False ]; }; then
        echo "$venv: pytest presence is not what its name says"; exit 1
    fi

    tree=$WORK/$name/tree
    out=$WORK/$name/out
    mkdir -p "$tree" "$out"
    git ls-files -z --cached --others --exclude-standard | (cd "$ROOT" && xargs -0 cp --parents -P -t "$tree")
    started=$SECONDS
    env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$HOME" TMPDIR="$WORK/$name" LANG=C.UTF-8 \
        PYTHON="$venv/bin/python" OUT="$out" GPU_CHECK_E2E_S=60 TRITON_CACHE_DIR="$WORK/$name/triton_cache" \
        bash "$tree/bench/gpu_check.sh" --dry-run >"$WORK/$name/console.txt" 2>&1
    rc=$?
    echo "   gpu_check.sh --dry-run: exit $rc after $(( SECONDS - started )) s"
    grep '^plan:' "$out/gpu_check.log" | sed 's/^/   /'
    "$venv/bin/python" - "$out" "$has_pytest" "$rc" <<'EOF'
import json, os, re, sys

out, has_pytest, rc = sys.argv[1], sys.argv[2] == "True", int(sys.argv[3])
problems = []
log = open(os.path.join(out, "gpu_check.log")).read()
plan = re.findall(r"^plan: (\S+) +box +(\d+) s", log, re.M)
total = sum(int(box) for _, box in plan)
bench = sum(int(box) for step, box in plan if step.startswith("bench_"))
steps = [step for step, _ in plan]
if steps[:4] != ["preflight", "warm", "smoke", "bench_long"] or total > 510 or bench < 240:
    problems.append(f"plan {plan}: total {total} s, benchmark {bench} s")
rows = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
done = {r["step"]: r for r in rows if r["kind"] == "step_done"}
for step in steps:
    if step not in done:
        problems.append(f"step {step} left no record")
    elif done[step]["rc"] != 0 or done[step]["seconds"] > done[step]["box_s"]:
        problems.append(f"step {step}: {done[step]}")
kinds = {(r["step"], r["kind"]) for r in rows}
for needed in [("preflight", "preflight"), ("warm", "compile"), ("warm", "warm_done"), ("smoke", "smoke"),
               ("bench_long", "bench"), ("bench_long", "ratios"), ("bench_2k", "bench")]:
    if needed not in kinds:
        problems.append(f"no {needed[1]} record from {needed[0]}")
bad = [r for r in rows if r.get("ok") is False]
if bad:
    problems.append(f"{len(bad)} failing records, first: {json.dumps(bad[0])[:300]}")
checked = [r for r in rows if r["kind"] == "bench" and "check" in r]
if not checked:
    problems.append("no benchmark record carries a check")
files = sorted(os.listdir(out))
expected = {"gpu_check.log", "results.jsonl", "bench_gpu_kernels.json", "warm.json", "tuned_configs.json",
            "pytest_cuda.log", "end_to_end_gpu_dryrun.json"}
if set(files) != expected or len(files) > 8 or any(not re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files):
    problems.append(f"files in OUT: {files}")
pytest_log = open(os.path.join(out, "pytest_cuda.log")).read()
if has_pytest != ("passed" in pytest_log):
    problems.append(f"pytest_cuda.log does not match pytest being {'present' if has_pytest else 'absent'}")
if rc != 0:
    problems.append(f"gpu_check.sh exit {rc}")
print(f"   {len(rows)} records, {len(checked)} checked benchmark methods, files: {', '.join(files)}")
for problem in problems:
    print(f"   PROBLEM: {problem}")
print("   rehearsal " + ("FAILED" if problems else "passed"))
sys.exit(1 if problems else 0)
EOF
    [ $? -eq 0 ] || overall=1
done
echo "== rehearsal $([ $overall -eq 0 ] && echo passed || echo FAILED) (logs under $WORK)"
exit $overall
