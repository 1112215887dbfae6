#!/usr/bin/env bash
# The ~300M "lite" generator (paper Table 7) on one 8-GPU node: plain data parallelism over the
# 8 GPUs (its model states fit on each GPU), float16 O2, full recompute.
#   fleet_launch/lite_300m_one_node.sh [-o Section.key=value ...]
#   DRY_RUN=1 fleet_launch/lite_300m_one_node.sh   # check the topology, print the command, start nothing
# Check the memory first: python tools/plan_memory.py -c configs/vilg/lite_300m.yaml --nodes 1 --gpus-per-node 8 --gpu-mem 32
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# dp degree = the GPUs launched: DEVICES is passed on, so single_node.sh starts exactly these
export DEVICES="${DEVICES:-0,1,2,3,4,5,6,7}"
NGPU=$(awk -F, '{print NF}' <<<"$DEVICES")
exec "$HERE/single_node.sh" "$(dirname "$HERE")/configs/vilg/lite_300m.yaml" \
  -o Distributed.dp_degree="$NGPU" -o Distributed.sharding_degree=1 -o Distributed.sharding_stage=1 "$@"
