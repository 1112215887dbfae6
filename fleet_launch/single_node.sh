#!/usr/bin/env bash
# One node: N processes (GPUs, or CPU processes over gloo) of tools/train.py.
#
#   fleet_launch/single_node.sh CONFIG [-o Section.key=value ...]
#
# Environment (all optional):
#   DEVICES   GPU ids, e.g. "0,1,2,3,4,5,6,7" (default: every visible GPU; on CPU unused)
#   NPROC     processes on CPU (default 2; keep gloo sub-groups at 2 ranks, see docs/distributed.md)
#   MASTER    ip:port of the rendezvous (default 127.0.0.1:<free port>)
#   LOG_DIR   worker logs (default log/<config name>), one workerlog.N per process
#   DRY_RUN   1 = check the topology, print the exact launch command and exit without starting it
#             (with DEVICES set, the command for a GPU node even on a machine without GPUs)
# The degrees come from the config / overrides: dp_degree x sharding_degree must equal the
# number of processes (the topology is printed and checked before anything starts).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
CONFIG="${1:?usage: $0 CONFIG [-o Section.key=value ...]}"; shift
PY="${PYTHON:-python}"
LOG_DIR="${LOG_DIR:-log/$(basename "${CONFIG%.yaml}")}"
if [[ -z "${MASTER:-}" ]]; then
  PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  MASTER="127.0.0.1:${PORT}"
fi
if [[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != 0 && -n "${DEVICES:-}" ]] || \
   "$PY" -c 'import paddle, sys; sys.exit(0 if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0 else 1)' 2>/dev/null; then
  DEVICES="${DEVICES:-$("$PY" -c 'import paddle; print(",".join(map(str, range(paddle.device.cuda.device_count()))))')}"
  NGPU=$(awk -F, '{print NF}' <<<"$DEVICES")
  "$PY" "$REPO/tools/plan_memory.py" -c "$CONFIG" "$@" --topology-only --nodes 1 --gpus-per-node "$NGPU"
  DEV_ARGS=(--devices "$DEVICES")
else
  NPROC="${NPROC:-2}"
  "$PY" "$REPO/tools/plan_memory.py" -c "$CONFIG" "$@" --topology-only --nodes 1 --gpus-per-node "$NPROC"
  DEV_ARGS=(--nproc_per_node "$NPROC")
fi
CMD=("$PY" -m paddle.distributed.launch --master "$MASTER" --nnodes 1 "${DEV_ARGS[@]}" --log_dir "$LOG_DIR"
     "$REPO/tools/train.py" -c "$CONFIG" "$@")
if [[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != 0 ]]; then
  printf 'dry run, would execute:'; printf ' %q' "${CMD[@]}"; printf '\n'
  exit 0
fi
echo "launch: master $MASTER, logs in $LOG_DIR"
exec "${CMD[@]}"
