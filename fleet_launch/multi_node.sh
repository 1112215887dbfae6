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
#   NODE_RANK  this node's rank (default: assigned by the rendezvous in arrival order)
#   NPROC      on a machine without GPUs: CPU processes per node over gloo (default 1); this is
#              how the tests run two "nodes" on 127.0.0.1 (MASTER=127.0.0.1:port NNODES=2)
#   DRY_RUN    1 = check the topology, print the exact launch command and exit without starting it
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
DRY=0
if [[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != 0 ]]; then DRY=1; fi
if [[ -n "${DEVICES:-}" && $DRY == 1 ]] || \
   "$PY" -c 'import paddle, sys; sys.exit(0 if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0 else 1)' 2>/dev/null; then
  DEVICES="${DEVICES:-0,1,2,3,4,5,6,7}"
  GPUS_PER_NODE=$(awk -F, '{print NF}' <<<"$DEVICES")
  DEV_ARGS=(--devices "$DEVICES")
else  # CPU processes over gloo
  GPUS_PER_NODE="${NPROC:-1}"
  DEV_ARGS=(--nproc_per_node "$GPUS_PER_NODE")
fi
LOG_DIR="${LOG_DIR:-log/$(basename "${CONFIG%.yaml}")}"
if [[ -n "${NIC:-}" ]]; then export NCCL_SOCKET_IFNAME="$NIC" GLOO_SOCKET_IFNAME="$NIC"; fi
export FLAGS_call_stack_level=2
# print and check the layout first: a wrong product fails here, not after minutes of start-up
"$PY" "$REPO/tools/plan_memory.py" -c "$CONFIG" "$@" --topology-only --nodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE"
EXTRA_ARGS=()
if [[ -n "$IPS" ]]; then EXTRA_ARGS+=(--ips "$IPS"); fi
if [[ -n "${NODE_RANK:-}" ]]; then EXTRA_ARGS+=(--rank "$NODE_RANK"); fi
CMD=("$PY" -m paddle.distributed.launch --master "$MASTER" --nnodes "$NNODES" "${EXTRA_ARGS[@]}"
     "${DEV_ARGS[@]}" --log_dir "$LOG_DIR" "$REPO/tools/train.py" -c "$CONFIG" "$@")
if [[ $DRY == 1 ]]; then
  printf 'dry run, would execute:'; printf ' %q' "${CMD[@]}"; printf '\n'
  exit 0
fi
echo "launch: $NNODES node(s) x $GPUS_PER_NODE process(es), master $MASTER, logs in $LOG_DIR"
exec "${CMD[@]}"
