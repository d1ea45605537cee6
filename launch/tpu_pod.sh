#!/usr/bin/env bash
# jaxchat on a Cloud TPU VM pod slice: the same launcher on every worker at once, one process per worker.
#
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a launch/tpu_pod.sh [--key=value ...]      (extra args: overrides)
#
# Run it from any machine with gcloud. Assumes, on every worker: the repository cloned at REPO_DIR (relative to the
# worker's home) and installed into REPO_DIR/.venv with `pip install -e '.[tpu]'` (and a Rust toolchain for that
# build); and JAXCHAT_BASE_DIR on a filesystem all workers mount at the same path (a Filestore or NFS mount):
# orbax writes each checkpoint from every worker into one path, and process 0 alone writes data, tokenizer, logs.
# --coordinator=auto: on a pod slice jax.distributed.initialize() finds the other workers itself. The configs are
# sized for 8 devices: with more, lower device_batch_size where a stage says the step is not a multiple of it.
# Check first, on any machine with `pip install 'jaxchat[tpu]'` (no TPU needed), that every stage fits the slice:
#   python -m jaxchat.memory --config=d20 --target=tpu-v5p --devices=4      (a v5p-8: 4 chips; v5p-32: 16)
# it compiles exactly the programs this launch runs (Splash attention included) with libtpu.
set -euo pipefail

TPU_NAME=${TPU_NAME:?set TPU_NAME to the TPU VM}
ZONE=${ZONE:?set ZONE to the TPU VM zone}
PROJECT=${PROJECT:-}   # optional: the gcloud project, else gcloud's default
CONFIG=${CONFIG:-d20}
STAGES=${STAGES:-}     # empty: every stage of the config; or a list such as base_train,base_eval
REPO_DIR=${REPO_DIR:-jaxchat}
JAXCHAT_BASE_DIR=${JAXCHAT_BASE_DIR:?set JAXCHAT_BASE_DIR to a path every worker mounts, e.g. /mnt/nfs/jaxchat}
# seconds a silent worker is waited for before the others stop
JAXCHAT_DISTRIBUTED_TIMEOUT=${JAXCHAT_DISTRIBUTED_TIMEOUT:-60}

# the command each worker runs, every value quoted for the remote shell
remote="cd $(printf %q "$REPO_DIR") && export JAXCHAT_BASE_DIR=$(printf %q "$JAXCHAT_BASE_DIR")"
remote+=" JAXCHAT_DISTRIBUTED_TIMEOUT=$(printf %q "$JAXCHAT_DISTRIBUTED_TIMEOUT")"
remote+=" && .venv/bin/python -m jaxchat.launch --coordinator=auto --config=$(printf %q "$CONFIG")"
remote+=" --stages=$(printf %q "$STAGES")"
(($# == 0)) || remote+=" $(printf '%q ' "$@")"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all \
  --command "$remote"
