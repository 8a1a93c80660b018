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

setup() {
    local extra=$1
    if [ ! -x "$PY" ]; then
        local base
        base=$(command -v python3.11 || command -v python3)
        "$base" -c 'import sys; assert sys.version_info[:2] == (3, 11), "tdask needs Python 3.11"'
        "$base" -m venv "$VENV"
    fi
    local stamp="$VENV/.tdask-installed-$extra"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "Installing tdask and its dependencies into $VENV (log: $VENV/pip.log) ..."
        { "$PY" -m pip install --upgrade pip && "$PY" -m pip install -e ".[$extra]"; } >"$VENV/pip.log" 2>&1 \
            || { tail -50 "$VENV/pip.log"; exit 1; }
        touch "$stamp"
    fi
    # Triton's Python stub takes its site-packages from the first python3 on PATH
    export PATH="$VENV/bin:$PATH"
}

case "${1:-}" in
hello)
    shift
    setup test
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
    grep -E "^(Embedded cluster|Started|Workers started)" "$log"
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
    setup test
    exec python -m pytest "$@"
    ;;
bench)
    shift
    setup test
    exec python -m benchmarks "$@"
    ;;
*)
    echo "usage: bash run.sh hello|test|bench [options]" >&2
    exit 2
    ;;
esac
