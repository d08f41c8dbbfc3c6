#!/usr/bin/env bash
# Train on this machine (see launch/README.md, "Local").
#
#   launch/local.sh CONFIG [--set KEY=VALUE ...]
#       `ckf train`: Ray starts inside the command, sized to this machine, and stops with it.
#   launch/local.sh --dashboard [--dashboard-host 127.0.0.1] [--dashboard-port 8265] CONFIG [--set ...]
#       start (or reuse) a local Ray head with its dashboard, then `ckf submit` to it, exactly
#       as on a remote cluster; watch http://127.0.0.1:8265. The head keeps running
#       afterwards for the next run; stop it with `ray stop`.
#
# Environment: CKF (the ckf command, default `ckf`), RAY_PORT (6379).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

CKF="${CKF:-ckf}"
DASHBOARD=0
DASHBOARD_HOST="${DASHBOARD_HOST:-127.0.0.1}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
RAY_PORT="${RAY_PORT:-6379}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dashboard) DASHBOARD=1; shift ;;
        --dashboard-host) DASHBOARD_HOST="$2"; shift 2 ;;
        --dashboard-port) DASHBOARD_PORT="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) break ;;
    esac
done
if [[ $# -lt 1 ]]; then
    usage >&2
    exit 2
fi
CONFIG="$1"
shift

if [[ "$DASHBOARD" -eq 0 ]]; then
    exec "$CKF" train "$CONFIG" "$@"
fi

url="http://127.0.0.1:$DASHBOARD_PORT"
if [[ "$DASHBOARD_HOST" != "127.0.0.1" && "$DASHBOARD_HOST" != "localhost" && "$DASHBOARD_HOST" != "0.0.0.0" ]]; then
    url="http://$DASHBOARD_HOST:$DASHBOARD_PORT"
fi
if ! python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)" "$url/api/version" 2>/dev/null; then
    ray start --head --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
        --dashboard-host="$DASHBOARD_HOST" --dashboard-port="$DASHBOARD_PORT"
fi
exec "$CKF" submit "$CONFIG" --address "$url" --local-cluster "$@"
