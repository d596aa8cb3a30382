#!/bin/bash
# Multi-node MixGRPO training under SLURM: one launcher (`mixgrpo launch`: torchrun with mixgrpo's exit statuses) per
# node, c10d rendezvous on the first node.
#
#   sbatch --nodes 4 examples/slurm.sh configs/flux_mixgrpo.yaml run.out_dir=/shared/runs/flux parallel.strategy=fsdp
#
# Every node runs `mixgrpo launch ... train` with the same arguments; it starts one process per GPU
# and finds the other nodes through the rendezvous endpoint, so no address is written anywhere. The run
# directory (run.out_dir) must be on a filesystem all nodes share. `--resume` makes a requeued or resubmitted job
# continue from the last complete checkpoint (a fresh run starts normally). SLURM sends SIGTERM 5 minutes
# before the time limit (--signal below); the launcher passes it to the trainers, which finish the iteration and
# checkpoint (it waits up to 900 s, --shutdown-timeout; plain torchrun kills them after 30 s), and the job step ends
# with status 143, not a success. If SLURM's own limit comes first, the next job resumes from the previous
# checkpoint, so keep run.checkpoint_every small enough to lose little.
#
#SBATCH --job-name=mixgrpo
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=slurm-%j.out

set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: sbatch --nodes N examples/slurm.sh CONFIG.yaml [key.sub=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=${RDZV_PORT:-29500}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export HF_HUB_OFFLINE=1  # models and rewards load from local paths only
# export NCCL_SOCKET_IFNAME=ib0  # set when the nodes have several network interfaces

srun --kill-on-bad-exit=1 python -m mixgrpo launch \
    --nnodes "$SLURM_NNODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv-id "$SLURM_JOB_ID" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$HEAD_NODE:$RDZV_PORT" \
    train --config "$CONFIG" --resume "$@"
