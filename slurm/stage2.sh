#!/usr/bin/env bash
# Stage 2 ([vqa], diagnosis), starting from stage 1's export (its recipe says where). Submit from the
# repository root: mkdir -p logs && sbatch slurm/stage2.sh
# Same resources, environment variables and requeue contract as slurm/stage1.sh, whose body this runs;
# only the default recipe differs (LITEGPT_CONFIG, default configs/stage2.yaml).
#SBATCH --job-name=litegpt-stage2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=8
#SBATCH --time=06:00:00
# No "B:" prefix: SLURM sends USR1 to the srun tasks (train.py) themselves, 5 minutes before the limit.
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
set -euo pipefail

# sbatch copies only this file, so the shared body is found through the submit dir.
cd "${SLURM_SUBMIT_DIR:-.}"
export LITEGPT_CONFIG=${LITEGPT_CONFIG:-configs/stage2.yaml}
exec bash slurm/stage1.sh
