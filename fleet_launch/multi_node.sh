#!/usr/bin/env bash
# Many nodes: run this same command on every node (the rendezvous orders them).
#
#   IPS=10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4 fleet_launch/multi_node.sh CONFIG [-o Section.key=value ...]
#
# Environment:
#   IPS        comma-separated node IPs; the first one hosts the rendezvous (required unless
#              MASTER and NNODES are given)
#   MASTER     ip:port of the rendezvous (default <first IP>:8090; the port must be open)
#   NNODES     number of nodes (default: number of IPS)
#   DEVICES    GPU ids per node (default 0,1,2,3,4,5,6,7)
#   LOG_DIR    worker logs on each node (default log/<config name>)
#   NIC        network interface for NCCL / gloo (e.g. eth0, ib0); unset = auto-detect
# Set Distributed.dp_degree x Distributed.sharding_degree = nodes x GPUs per node, with the
# sharding group inside a node (sharding_degree <= GPUs per node), e.g.
#   -o Distributed.sharding_degree=8 -o Distributed.dp_degree=$NNODES
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
CONFIG="${1:?usage: IPS=a,b,... $0 CONFIG [-o Section.key=value ...]}"; shift
PY="${PYTHON:-python}"
IPS="${IPS:-}"
if [[ -n "$IPS" ]]; then
  FIRST="${IPS%%,*}"
  NNODES="${NNODES:-$(awk -F, '{print NF}' <<<"$IPS")}"
  MASTER="${MASTER:-${FIRST}:8090}"
fi
: "${MASTER:?set IPS=ip1,ip2,... or MASTER=ip:port and NNODES}"
: "${NNODES:?set IPS=ip1,ip2,... or NNODES}"
DEVICES="${DEVICES:-0,1,2,3,4,5,6,7}"
GPUS_PER_NODE=$(awk -F, '{print NF}' <<<"$DEVICES")
LOG_DIR="${LOG_DIR:-log/$(basename "${CONFIG%.yaml}")}"
if [[ -n "${NIC:-}" ]]; then export NCCL_SOCKET_IFNAME="$NIC" GLOO_SOCKET_IFNAME="$NIC"; fi
export FLAGS_call_stack_level=2
# print and check the layout first: a wrong product fails here, not after minutes of start-up
"$PY" "$REPO/tools/plan_memory.py" -c "$CONFIG" "$@" --topology-only --nodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE"
IPS_ARGS=()
if [[ -n "$IPS" ]]; then IPS_ARGS=(--ips "$IPS"); fi
echo "launch: $NNODES node(s) x $GPUS_PER_NODE GPU(s), master $MASTER, logs in $LOG_DIR"
exec "$PY" -m paddle.distributed.launch --master "$MASTER" --nnodes "$NNODES" "${IPS_ARGS[@]}" \
  --devices "$DEVICES" --log_dir "$LOG_DIR" "$REPO/tools/train.py" -c "$CONFIG" "$@"
