#!/usr/bin/env bash
# N jaxchat processes on this machine, as one program: how the tests and a curious user run the multi-process path
# without a cluster.
#
#   launch/local.sh N COMMAND...        e.g. launch/local.sh 2 python -m jaxchat.launch --config=tiny
#
# Each process gets JAXCHAT_COORDINATOR (127.0.0.1 and a free port), JAXCHAT_NUM_PROCESSES=N and its
# JAXCHAT_PROCESS_ID, and, on CPU, DEVICES_PER_PROCESS fake devices (default 4; XLA_FLAGS
# --xla_force_host_platform_device_count). Process 0 prints; the others print only errors. When one process
# fails, the rest are stopped at once and the script exits with the first failure's code; otherwise 0.
# Assumes: jaxchat installed in the active Python environment; JAX_PLATFORMS (default cpu) chooses the backend.
set -euo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N COMMAND... (N processes of COMMAND on this machine)" >&2
  exit 2
fi
n=$1
shift
port=${JAXCHAT_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export JAXCHAT_COORDINATOR=127.0.0.1:$port JAXCHAT_NUM_PROCESSES=$n
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}"
export JAXCHAT_DISTRIBUTED_TIMEOUT=${JAXCHAT_DISTRIBUTED_TIMEOUT:-30}

pids=()
stop_all() { kill "${pids[@]}" 2>/dev/null || true; }
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < n; i++)); do
  JAXCHAT_PROCESS_ID=$i "$@" &
  pids+=($!)
done
status=0
for ((left = n; left > 0; left--)); do
  set +e
  wait -n
  rc=$?
  set -e
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    echo "local.sh: a process exited with code $rc; stopping the others" >&2
    stop_all
  fi
done
exit $status
