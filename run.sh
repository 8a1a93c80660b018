#!/usr/bin/env bash
# tdask's two set-up commands (see README):
#   bash run.sh hello [client options]   set up, deploy the hello-world pipeline on an embedded
#                                        cluster, drive it with the client, stop everything
#   bash run.sh test [pytest options]    set up and run the tests
#   bash run.sh bench [...]              set up and run the benchmarks (see benchmarks/README.md)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=${TDASK_VENV:-$ROOT/.venv}
PY=$VENV/bin/python

# The Python tdask runs on: $TDASK_PYTHON, else the first of python3, python3.13 ... python3.10 that is 3.10-3.13
find_python() {
    local candidate path
    for candidate in ${TDASK_PYTHON:-python3 python3.13 python3.12 python3.11 python3.10}; do
        path=$(command -v "$candidate" 2>/dev/null) || continue
        if "$path" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 13))' 2>/dev/null; then
            echo "$path"
            return 0
        fi
    done
    echo "tdask needs Python 3.10 to 3.13, and none was found (python3 here: $(python3 --version 2>&1 || echo none))." >&2
    echo "Install one (Debian/Ubuntu: apt install python3.12 python3.12-venv) or set TDASK_PYTHON=/path/to/python3.X." >&2
    return 1
}

# $1: the extras to install ("" for tdask alone); default for tests: test, plus UCX where it installs (Python 3.11+)
setup() {
    local extras=$1
    if [ ! -x "$PY" ]; then
        local base
        base=$(find_python) || exit 1
        "$base" -m venv "$VENV" || {
            echo "$base cannot make a virtual environment: install its venv module (Debian/Ubuntu: apt install" \
                 "python3.X-venv for your 3.X)" >&2
            exit 1
        }
    fi
    local stamp="$VENV/.tdask-installed-${extras:-base}"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "Installing tdask${extras:+[$extras]} into $VENV with $("$PY" --version) (log: $VENV/pip.log) ..."
        { "$PY" -m pip install --upgrade pip && "$PY" -m pip install -e ".${extras:+[$extras]}"; } >"$VENV/pip.log" 2>&1 \
            || { tail -50 "$VENV/pip.log"; exit 1; }
        touch "$stamp"
    fi
    export PATH="$VENV/bin:$PATH"  # dask scheduler / dask worker of this environment
    # Triton's server and its stubs' NumPy 1.x live in an environment of their own, made once (a progress line says so)
    tdask-triton-env >/dev/null
}

test_extras() {
    local py=$PY
    [ -x "$py" ] || py=$(find_python) || exit 1
    if "$py" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))'; then
        echo "${TDASK_EXTRAS-test,ucx-cu12}"
    else
        echo "${TDASK_EXTRAS-test}"  # distributed-ucxx's current releases need Python 3.11+
    fi
}

case "${1:-}" in
hello)
    shift
    setup "${TDASK_EXTRAS-}"
    log=$(mktemp -d)/deploy.log
    export DASK_TDASK__ADDRESS_FILE="$(dirname "$log")/embedded-cluster.json"
    python -m deploy --log-dir "$ROOT/logs" --clear-logs >"$log" 2>&1 &
    deploy=$!
    trap 'kill -TERM $deploy 2>/dev/null || true; wait $deploy 2>/dev/null || true' EXIT
    for _ in $(seq 300); do
        grep -q "press Ctrl-C to Exit" "$log" && break
        kill -0 $deploy 2>/dev/null || { cat "$log"; exit 1; }
        sleep 0.5
    done
    grep -E "^(Embedded cluster|Started|KServe v2|Workers started)" "$log"
    set +e
    python -m tdask.client "$@"
    code=$?
    set -e
    kill -TERM $deploy
    wait $deploy
    deploy_code=$?
    trap - EXIT
    grep -E "^(Stopping|Stopped)" "$log"
    echo "deploy exited with $deploy_code; logs in $ROOT/logs"
    exit $code
    ;;
test)
    shift
    setup "$(test_extras)"
    exec python -m pytest "$@"
    ;;
bench)
    shift
    setup "$(test_extras)"
    exec python -m benchmarks "$@"
    ;;
*)
    echo "usage: bash run.sh hello|test|bench [options]" >&2
    exit 2
    ;;
esac
