#!/usr/bin/env bash
# Train on all GPUs of one node with torchrun (DistributedDataParallel; the batch size is the global batch).
#
#   bin/train-multigpu.sh PARTICLES.star RUN_DIR [tvae-em train options...]
#
# Inside a SLURM allocation: srun --gres=gpu:4 bin/train-multigpu.sh prep/particles.star run/
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,6p' "$0" >&2
  exit 2
fi
star=$1 run_dir=$2
shift 2
gpus=${NGPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ "$gpus" -lt 1 ]; then
  echo "error: no GPU found (set NGPUS to override)" >&2
  exit 2
fi
exec torchrun --standalone --nproc_per_node="$gpus" -m tvae_em.cli train "$star" -o "$run_dir" "$@"
