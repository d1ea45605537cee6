#!/usr/bin/env bash
# The d20 speedrun: one 8-GPU node, from nothing to a chat model you can talk to (jaxchat's take on nanochat's
# speedrun.sh). Run it from the repository root, inside screen or tmux, since it takes hours:
#
#   screen -L -Logfile speedrun.log -S speedrun bash launch/speedrun.sh [--key=value ...]
#
# Extra arguments are overrides for the training stages (see jaxchat/launch.py), e.g. --base_train.save_every=500.
# Assumes: a fresh Ubuntu node (24.04, or any with python3 >= 3.11) with 8 NVIDIA GPUs and CUDA 12 drivers
# (>= 525; with CUDA 13 drivers set GPU_EXTRA=gpu-cuda13), network access, and sudo for the few system packages
# below; on an older Ubuntu, point PYTHON at a python >= 3.11. Installs jaxchat with its `gpu` extra into ./.venv;
# everything the run makes goes to $JAXCHAT_BASE_DIR (default ~/.cache/jaxchat).
#
# Time and cost, EXPECTED, not measured for jaxchat: nanochat's d20 speedrun (same model, same 11.2B-token budget)
# takes about 4 hours on 8xH100 at about $24/hour, about $100, most of it base_train. jaxchat's d20 config also
# runs chat_rl (GSM8K), which nanochat's $100 figure leaves out: expect some extra time for it.
set -euo pipefail

export JAXCHAT_BASE_DIR=${JAXCHAT_BASE_DIR:-$HOME/.cache/jaxchat}
GPU_EXTRA=${GPU_EXTRA:-gpu}
PYTHON=${PYTHON:-python3}
TOKENIZER_SHARDS=8    # ~250M characters each: 8 cover tok_train's 2B characters (d20.toml: max_chars)
TRAIN_SHARDS=370      # d20.toml's [data] num_files: 11.2B tokens, with room for what packing crops
# without chat_rl, also pass --chat_eval.source=mid,sft (d20.toml has chat_eval evaluate mid, SFT and RL)
TRAIN_STAGES=${TRAIN_STAGES:-base_train,base_eval,mid_train,chat_sft,chat_rl,chat_eval}
mkdir -p "$JAXCHAT_BASE_DIR"

# --- system packages: venv, a C toolchain and Rust (pip builds the tokenizer trainer), bubblewrap (the sandbox
# that runs model-written code in HumanEval and the python tool)
SUDO=$([[ $EUID -eq 0 ]] || echo sudo)
if ! "$PYTHON" -c 'import ensurepip' 2>/dev/null || ! command -v cc >/dev/null || ! command -v bwrap >/dev/null; then
  $SUDO apt-get update && $SUDO apt-get install -y python3-venv python3-dev build-essential curl bubblewrap
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "jaxchat needs python3 >= 3.11" >&2; exit 1; }
if ! command -v cargo >/dev/null; then
  [[ -x $HOME/.cargo/bin/cargo ]] || curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  export PATH=$HOME/.cargo/bin:$PATH
fi

# --- Python environment: jaxchat and JAX's CUDA wheels
[[ -d .venv ]] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -e ".[$GPU_EXTRA]"
# shellcheck source=/dev/null
source .venv/bin/activate
# one process drives every GPU of the host (JAX: one process per host), so no torchrun; show what it sees (8)
python -c 'import jax; d = jax.devices(); print(len(d), "devices:", d[0].device_kind); assert d[0].platform == "gpu"'

# --- a new report card ($JAXCHAT_BASE_DIR/report/report.md, copied to ./report.md): every stage below adds its section
python -m jaxchat.report reset

# --- data and tokenizer: the first shards now, the rest in the background while the tokenizer trains
python -m jaxchat.dataset --num-files=$TOKENIZER_SHARDS
python -m jaxchat.dataset --num-files=$TRAIN_SHARDS &
download_pid=$!
trap 'kill "$download_pid" 2>/dev/null || true' EXIT   # a failed run does not leave the download behind
python -m jaxchat.launch --config=d20 --stages=tok_train,tok_eval
echo "waiting for the $TRAIN_SHARDS training shards to finish downloading..."
wait "$download_pid"   # set -e: a failed download stops here (rerun the script: finished shards are kept)
trap - EXIT

# --- pretraining, base evals (CORE, bits per byte, samples), midtraining, SFT, RL, chat evals: one process, 8 GPUs.
# A stage that stopped can be continued: python -m jaxchat.launch --config=d20 --stages=STAGE --resume=1
python -m jaxchat.launch --config=d20 --stages="$TRAIN_STAGES" "$@"

# --- results: ./report.md (the launcher wrote it after the last stage; `python -m jaxchat.report generate` again
# at any time, with --gpu_hourly_rate=R for your price), the JSON of every eval in $JAXCHAT_BASE_DIR/{base_eval,
# chat_eval}, and the training curves: tensorboard --logdir $JAXCHAT_BASE_DIR/runs
# Talk to it:  python -m jaxchat.chat_cli -i rl -g d20     (in the terminal)
#              python -m jaxchat.chat_web -i rl -g d20     (a chat page and an OpenAI-compatible API on port 8000)
echo "done: the report card is ./report.md; talk to it: python -m jaxchat.chat_cli -i rl -g d20"
