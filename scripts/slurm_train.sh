#!/usr/bin/env bash
# Multi-node diffalign training under SLURM: one `accelerate launch` per node, 8 GPUs each.
#   sbatch scripts/slurm_train.sh dpo --config sd15_dpo --model /models/sd15 --data /data/pickapic --output_dir runs/dpo
# Every argument after the first (the method) goes to `diffalign train <method>`. Resume after a requeue with
# `--resume latest` (a preempted run restarts from its newest complete checkpoint).
#SBATCH --job-name=diffalign
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; accelerate starts one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

METHOD=${1:?usage: sbatch scripts/slurm_train.sh METHOD [diffalign train flags...]}
shift
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))
CONFIG=${ACCELERATE_CONFIG:-$(python -c "import diffalign.config as c; print(c.PRESET_DIR / 'accelerate' / 'multi_gpu.yaml')")}

srun --kill-on-bad-exit=1 bash -c "accelerate launch \
    --config_file $CONFIG \
    --num_machines $SLURM_NNODES --num_processes $NUM_PROCESSES \
    --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_HOST --main_process_port $MAIN_PORT \
    --rdzv_backend c10d \
    -m diffalign train $METHOD $* --resume latest"
