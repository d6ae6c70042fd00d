#!/usr/bin/env bash
# The main job as a chain of SLURM jobs: prepare -> cache-features -> stage 1 -> stage 2 -> evaluate.
# Each job waits for the previous one to succeed (afterok); when one fails, the rest are cancelled
# (--kill-on-invalid-dep) instead of pending forever. Run from the repository root: bash slurm/pipeline.sh
# Prints "<step> <job id>" per job. Environment (defaults):
#   LITEGPT_PYTHON         interpreter                         (.venv/bin/python)
#   LITEGPT_ROOT           VinDr-CXR root                      (data/vindr-cxr)
#   LITEGPT_SHARDS         shard set to write and train on     (shards/vindr)
#   LITEGPT_MODEL          model config for the feature cache  (configs/model_paper.yaml)
#   LITEGPT_STAGE1_CONFIG  stage 1 recipe                      (configs/stage1.yaml)
#   LITEGPT_STAGE2_CONFIG  stage 2 recipe                      (configs/stage2.yaml)
#   LITEGPT_EVAL_RUN       run directory to evaluate           (runs/paper/stage2)
#   LITEGPT_LOGS           directory of the jobs' logs         (logs)
#   LITEGPT_SBATCH_ARGS    sbatch options for every job, e.g. "--partition=gpu --account=proj"
#   LITEGPT_PREPARE_SBATCH, LITEGPT_CACHE_SBATCH, LITEGPT_TRAIN_SBATCH, LITEGPT_EVAL_SBATCH:
#                          sbatch options per step (training defaults are the stage scripts' headers)
# The stage jobs also read LITEGPT_DS_CONFIG and LITEGPT_TRAIN_ARGS (see slurm/stage1.sh).
set -euo pipefail

export LITEGPT_PYTHON=${LITEGPT_PYTHON:-.venv/bin/python}
ROOT=${LITEGPT_ROOT:-data/vindr-cxr}
SHARDS=${LITEGPT_SHARDS:-shards/vindr}
MODEL=${LITEGPT_MODEL:-configs/model_paper.yaml}
STAGE1=${LITEGPT_STAGE1_CONFIG:-configs/stage1.yaml}
STAGE2=${LITEGPT_STAGE2_CONFIG:-configs/stage2.yaml}
EVAL_RUN=${LITEGPT_EVAL_RUN:-runs/paper/stage2}
LOGS=${LITEGPT_LOGS:-logs}
PREPARE_SBATCH=${LITEGPT_PREPARE_SBATCH:---cpus-per-task=16 --time=04:00:00}
CACHE_SBATCH=${LITEGPT_CACHE_SBATCH:---gres=gpu:1 --cpus-per-task=8 --time=04:00:00}
TRAIN_SBATCH=${LITEGPT_TRAIN_SBATCH:-}
EVAL_SBATCH=${LITEGPT_EVAL_SBATCH:---gres=gpu:1 --cpus-per-task=8 --time=04:00:00}

# Fail now rather than after a day in the queue.
for path in "$ROOT" "$MODEL" "$STAGE1" "$STAGE2"; do
    [ -e "$path" ] || { echo "pipeline.sh: $path does not exist (see the variables at the top of $0)" >&2; exit 2; }
done
mkdir -p "$LOGS"  # SLURM does not create the directory of --output

# submit NAME [sbatch args...]: submit after the previous job (if any) and print the job id.
previous=""
submit() {
    local name=$1 id
    shift
    # shellcheck disable=SC2086  # option lists are word-split on purpose
    id=$(sbatch --parsable --output="$LOGS/%x-%j.out" ${LITEGPT_SBATCH_ARGS:-} \
        ${previous:+--dependency=afterok:$previous --kill-on-invalid-dep=yes} "$@")
    previous=${id%%;*}  # "id;cluster" on multi-cluster setups
    echo "$name $previous"
}
# Commands for --wrap, quoted for the shell that runs them; the worker count is read inside the job.
wrap() { printf '%q ' "$LITEGPT_PYTHON" -m litegpt.cli "$@"; }

# shellcheck disable=SC2086
submit prepare --job-name=litegpt-prepare $PREPARE_SBATCH \
    --wrap="$(wrap prepare --root "$ROOT" --out "$SHARDS") --workers \${SLURM_CPUS_PER_TASK:-1}"
# shellcheck disable=SC2086
submit cache-features --job-name=litegpt-cache $CACHE_SBATCH \
    --wrap="$(wrap cache-features --shards "$SHARDS" --model "$MODEL")"
# shellcheck disable=SC2086
LITEGPT_CONFIG=$STAGE1 submit stage1 $TRAIN_SBATCH slurm/stage1.sh
# shellcheck disable=SC2086
LITEGPT_CONFIG=$STAGE2 submit stage2 $TRAIN_SBATCH slurm/stage2.sh
# shellcheck disable=SC2086
submit evaluate --job-name=litegpt-evaluate $EVAL_SBATCH \
    --wrap="$(wrap evaluate --run "$EVAL_RUN" --shards "$SHARDS")"
