#!/usr/bin/env bash
# Stage 1 ([identify], grounded findings): one task per GPU under srun. Submit from the repository root:
#   mkdir -p logs && sbatch slurm/stage1.sh
# Defaults are the paper's hardware (1 node x 4 A100); sbatch options on the command line override
# them (e.g. --nodes=2, --time=12:00:00), the rest comes from the environment:
#   LITEGPT_PYTHON      interpreter                      (default .venv/bin/python)
#   LITEGPT_CONFIG      stage recipe                     (default configs/stage1.yaml)
#   LITEGPT_DS_CONFIG   DeepSpeed config                 (default ds_configs/zero2.json)
#   LITEGPT_TRAIN_ARGS  extra train.py arguments, word-split (e.g. "--set run.dir=/scratch/runs")
# train.py exits 75 after checkpointing on SIGUSR1/SIGTERM; this script then requeues the job, and the
# next run continues with --resume auto.
#SBATCH --job-name=litegpt-stage1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=8
#SBATCH --time=06:00:00
# No "B:" prefix: SLURM sends USR1 to the srun tasks (train.py) themselves, 5 minutes before the limit.
#SBATCH --signal=USR1@300
#SBATCH --requeue
# Append, so a requeued job keeps the log of its earlier runs (SLURM creates the file, not logs/).
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
set -euo pipefail

# sbatch runs a copy of this script from its spool directory; paths are relative to the submit dir.
cd "${SLURM_SUBMIT_DIR:-.}"
LITEGPT_PYTHON=${LITEGPT_PYTHON:-.venv/bin/python}
LITEGPT_CONFIG=${LITEGPT_CONFIG:-configs/stage1.yaml}
LITEGPT_DS_CONFIG=${LITEGPT_DS_CONFIG:-ds_configs/zero2.json}
# Threads per rank = CPUs per task (one rank per GPU), unless the caller chose.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

echo "litegpt: job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on $(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd,)" \
     "tasks ${SLURM_NTASKS:-?} config ${LITEGPT_CONFIG}"

# srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05), so pass it on. train.py maps
# SLURM_PROCID/LOCALID/NTASKS/JOB_NODELIST to RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR itself.
status=0
# shellcheck disable=SC2086  # LITEGPT_TRAIN_ARGS is a list of words on purpose
srun --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    "$LITEGPT_PYTHON" train.py --config "$LITEGPT_CONFIG" --deepspeed "$LITEGPT_DS_CONFIG" --resume auto \
    ${LITEGPT_TRAIN_ARGS:-} || status=$?

if [ "$status" -eq 75 ]; then
    # Checkpoint written: requeue (same job id, SLURM_RESTART_COUNT + 1) and count this run as a success.
    echo "litegpt: train.py asked to be requeued (exit 75); requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
