#!/usr/bin/env bash
# Join this machine to a running Ray head as a worker node (see launch/README.md).
#
#   launch/multinode/worker.sh HEAD_IP:PORT [--node-ip IP] [EXTRA `ray start` ARGS ...]
#
# EXTRA args go to `ray start` unchanged, e.g. --num-gpus=8 or --block. Workers run no
# dashboard; they need to reach the head's GCS port and open ports among themselves.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    [[ $# -ge 1 ]] && exit 0 || exit 2
fi
HEAD_ADDRESS="$1"
shift
NODE_IP="${NODE_IP:-}"
EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --node-ip) NODE_IP="$2"; shift 2 ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done
if [[ -z "$NODE_IP" ]]; then
    NODE_IP="$(hostname -I 2>/dev/null | awk '{print $1}')"
    NODE_IP="${NODE_IP:-127.0.0.1}"
fi
command -v ray >/dev/null || { echo "worker.sh: 'ray' not found; activate the environment where ckf-dist is installed" >&2; exit 127; }

exec ray start --address="$HEAD_ADDRESS" --node-ip-address="$NODE_IP" "${EXTRA[@]}"
