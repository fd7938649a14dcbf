#!/usr/bin/env bash
# Single node: bash launch/torchrun.sh CONFIG.yaml [key.sub=value ...]
# NPROC defaults to the visible GPUs, or on CPU to the config's TP x PP (one data-parallel rank; set NPROC for more).
# Resumes from RESUME_FROM (a checkpoint root) when it has a `latest` checkpoint.
set -euo pipefail
CONFIG=${1:?usage: launch/torchrun.sh CONFIG.yaml [overrides...]}
shift
PYTHON=${PYTHON:-python}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
else
  NPROC=${NPROC:-$("$PYTHON" -c 'import sys
from dapo_megatron.config import build_config
p = build_config(sys.argv[1], sys.argv[2:]).parallel
print(p.tensor_model_parallel_size * p.pipeline_model_parallel_size)' "$CONFIG" "$@")}
fi
RESUME=()
if [ -n "${RESUME_FROM:-}" ] && [ -f "$RESUME_FROM/latest" ]; then RESUME=("trainer.load=$RESUME_FROM"); fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m dapo_megatron.cli train \
  --config "$CONFIG" "${RESUME[@]}" "$@"
