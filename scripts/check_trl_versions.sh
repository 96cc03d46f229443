#!/usr/bin/env bash
# Run the TRL adapter's tests against other TRL releases, each in its own virtual environment.
#
#   scripts/check_trl_versions.sh                 # the versions below
#   scripts/check_trl_versions.sh 1.15.0 newest   # chosen ones ("newest" = the newest release pip resolves)
#
# Each environment is .venvs-trl/trl-<version> in the repository (git-ignored; VENVS overrides the folder): a venv that sees the main
# environment's packages (.venv at the repository root, or MAIN_PY=/path/to/python: torch, transformers,
# accelerate, datasets, ...) through
# a .pth file and holds only its own TRL, installed with --no-deps, which shadows the main one (so every other
# package is the main environment's version). The summary line per version goes to stdout; the full pytest
# output to <venv>/pytest.log.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
MAIN_PY="${MAIN_PY:-$root/.venv/bin/python}"
VENVS="${VENVS:-$root/.venvs-trl}"
TESTS=(tests/test_trl_integration.py tests/test_trl_config.py)
versions=("$@")
[ ${#versions[@]} -eq 0 ] && versions=(1.16.0 1.15.0 1.14.2 newest)
if [ ! -x "$MAIN_PY" ]; then
    echo "no main environment at $MAIN_PY: run scripts/bootstrap.sh first, or set MAIN_PY to its python" >&2
    exit 2
fi
main_site="$("$MAIN_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
status=0
for version in "${versions[@]}"; do
    venv="$VENVS/trl-$version"
    if [ ! -x "$venv/bin/python" ]; then
        "$MAIN_PY" -m venv --without-pip "$venv" || { echo "trl $version: cannot create $venv"; status=1; continue; }
    fi
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$main_site" > "$site/main_env.pth"
    spec="trl==$version"
    [ "$version" = newest ] && spec="trl"
    "$MAIN_PY" -m pip install --disable-pip-version-check -q --no-deps --upgrade --target "$site" "$spec" \
        >"$venv/pip.log" 2>&1 || { echo "trl $version: pip install failed (see $venv/pip.log)"; status=1; continue; }
    got="$("$venv/bin/python" -c 'import trl; print(trl.__version__)' 2>/dev/null)"
    PYTHONPATH="$root" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        "${TESTS[@]}" >"$venv/pytest.log" 2>&1
    rc=$?
    echo "trl $version (imported $got): $(grep -E '(passed|failed|error)' "$venv/pytest.log" | tail -1) [exit $rc]"
    [ $rc -eq 0 ] || status=1
done
exit $status
