#!/usr/bin/env bash
# Embed (or pose) a large STAR file in N shards as a SLURM array job, then merge the shards in order.
#
#   bin/slurm-embed-array.sh RUN_DIR PARTICLES.star OUT.star N [embed|pose] [extra tvae-em options...]
#
# Submits an array of N GPU tasks (one shard each) and a merge job that runs after all of them succeed.
# Set SBATCH_* environment variables (SBATCH_PARTITION, SBATCH_ACCOUNT, ...) or edit the flags below.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,8p' "$0" >&2
  exit 2
fi
run_dir=$1 star=$2 out=$3 shards=$4 command=${5:-embed}
shift $(( $# < 5 ? $# : 5 ))
tvae=${TVAE_EM:-tvae-em}
mkdir -p slurm-logs

array_id=$(sbatch --parsable --array="0-$((shards - 1))" --gres=gpu:1 --cpus-per-task=4 \
  --job-name="tvae-$command" --output="slurm-logs/%x-%A_%a.log" \
  --wrap="$tvae $command '$run_dir' '$star' -o '$out' --shard \${SLURM_ARRAY_TASK_ID}/$shards $*")
stem=${out%.star}
sbatch --parsable --dependency="afterok:$array_id" --job-name="tvae-merge" \
  --output="slurm-logs/%x-%j.log" \
  --wrap="$tvae merge ${stem}.shard*of${shards}.npz -o '$out'"
echo "submitted array $array_id ($shards shards) and its merge" >&2
