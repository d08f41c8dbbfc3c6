#!/usr/bin/env bash
# Start the head of a multi-node Ray cluster on this machine (see launch/README.md).
#
#   launch/multinode/head.sh [--node-ip IP] [--port 6379] [--dashboard-host 127.0.0.1]
#                            [--dashboard-port 8265] [EXTRA `ray start` ARGS ...]
#
# EXTRA args go to `ray start` unchanged, e.g. --num-gpus=8 or --block (stay in the
# foreground; Ctrl-C stops the head). The dashboard, which also serves the Jobs API used by
# `ckf submit`, binds to 127.0.0.1 unless --dashboard-host says otherwise: reach it from
# your laptop through an SSH tunnel (ssh -L 8265:127.0.0.1:8265 HEAD) instead of opening it.
# Environment defaults: NODE_IP, RAY_PORT, DASHBOARD_HOST, DASHBOARD_PORT.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

NODE_IP="${NODE_IP:-}"
PORT="${RAY_PORT:-6379}"
DASHBOARD_HOST="${DASHBOARD_HOST:-127.0.0.1}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --node-ip) NODE_IP="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --dashboard-host) DASHBOARD_HOST="$2"; shift 2 ;;
        --dashboard-port) DASHBOARD_PORT="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done

if [[ -z "$NODE_IP" ]]; then
    # The address the workers can reach; override with --node-ip on multi-homed hosts.
    NODE_IP="$(hostname -I 2>/dev/null | awk '{print $1}')"
    NODE_IP="${NODE_IP:-127.0.0.1}"
fi
command -v ray >/dev/null || { echo "head.sh: 'ray' not found; activate the environment where ckf-dist is installed" >&2; exit 127; }
if [[ "$DASHBOARD_HOST" != "127.0.0.1" && "$DASHBOARD_HOST" != "localhost" ]]; then
    echo "head.sh: warning: the dashboard (and its Jobs API, which runs any command it is sent) listens on $DASHBOARD_HOST" >&2
fi

echo "head.sh: Ray head at $NODE_IP:$PORT, dashboard http://$DASHBOARD_HOST:$DASHBOARD_PORT"
echo "head.sh: join workers with: launch/multinode/worker.sh $NODE_IP:$PORT"
echo "head.sh: then train here with: ckf train CONFIG --set train.address=$NODE_IP:$PORT"

exec ray start --head --node-ip-address="$NODE_IP" --port="$PORT" \
    --dashboard-host="$DASHBOARD_HOST" --dashboard-port="$DASHBOARD_PORT" "${EXTRA[@]}"
