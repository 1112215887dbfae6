#!/usr/bin/env bash
# The 10B generator on many 8-GPU nodes, the paper's layout (Figure 3): optimizer states,
# gradients and parameters sharded over the 8 GPUs of a node (sharding stage 3), data parallel
# across nodes, optimizer states + fp32 master weights offloaded to CPU, float16 O2, full
# recompute, gradient accumulation. Stage 3 because Paddle refuses stage-2 offload with dp > 1.
#   IPS=10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4 fleet_launch/ernie_vilg_10b_multi_node.sh [-o ...]
#   DRY_RUN=1 IPS=... fleet_launch/ernie_vilg_10b_multi_node.sh   # check the topology, print the command
# Check the memory first:
#   python tools/plan_memory.py -c configs/vilg/ernie_vilg_10b.yaml --nodes 4 --gpus-per-node 8 --gpu-mem 32 \
#     -o Distributed.sharding_stage=3
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
IPS="${IPS:?set IPS=ip1,ip2,... (same command on every node)}"
NNODES="${NNODES:-$(awk -F, '{print NF}' <<<"$IPS")}"
export DEVICES="${DEVICES:-0,1,2,3,4,5,6,7}"  # passed on, so sharding degree = GPUs launched per node
GPUS=$(awk -F, '{print NF}' <<<"$DEVICES")
export IPS NNODES
exec "$HERE/multi_node.sh" "$(dirname "$HERE")/configs/vilg/ernie_vilg_10b.yaml" \
  -o Distributed.sharding_degree="$GPUS" -o Distributed.dp_degree="$NNODES" \
  -o Distributed.sharding_stage=3 -o Distributed.offload=true "$@"
