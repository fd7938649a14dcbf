#!/usr/bin/env bash
# Single node: bash launch/torchrun.sh CONFIG.yaml [key.sub=value ...]
# NPROC defaults to the visible GPUs (or TP x PP on CPU). Resumes from the run's checkpoints when they exist.
set -euo pipefail
CONFIG=${1:?usage: launch/torchrun.sh CONFIG.yaml [overrides...]}
shift
if command -v nvidia-smi >/dev/null 2>&1; then
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
else
  NPROC=${NPROC:-1}
fi
RESUME=()
if [ -n "${RESUME_FROM:-}" ] && [ -f "$RESUME_FROM/latest" ]; then RESUME=("trainer.load=$RESUME_FROM"); fi
exec torchrun --standalone --nproc_per_node "$NPROC" -m dapo_megatron.cli train --config "$CONFIG" "${RESUME[@]}" "$@"
