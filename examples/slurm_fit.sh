#!/bin/bash
# fastflow fit on a SLURM cluster: one torchrun per node, DDP across nodes; requeue-safe.
#
#   sbatch examples/slurm_fit.sh examples/digits_nsf.toml
#
# If the job is preempted, killed or times out, `sbatch` the same script again (or let
# --requeue do it): `fastflow fit` resumes from the last checkpoint in --out and finishes with the
# same parameters as an uninterrupted run. Rank 0 writes all files; --out must be on a file
# system every node sees.
#SBATCH --job-name=fastflow-fit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun launcher per node
#SBATCH --gpus-per-node=4            # drop on CPU-only partitions (gloo is used then)
#SBATCH --cpus-per-task=16
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120          # a warning before the time limit; checkpoints make it harmless
#SBATCH --output=%x-%j.out

set -euo pipefail
CONFIG=${1:-examples/digits_nsf.toml}
OUT=${OUT:-runs/${SLURM_JOB_NAME}}
PROCS_PER_NODE=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-4}}

# The first node of the allocation hosts the rendezvous.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / PROCS_PER_NODE > 0 ? SLURM_CPUS_PER_TASK / PROCS_PER_NODE : 1 ))

# batch_size in the config is the global batch: it must be divisible by nodes x procs per node.
srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_NNODES" --nproc_per_node="$PROCS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
    -m fastflow fit "$CONFIG" --out "$OUT" --quiet

# Score a large file and draw samples with the trained model, split across the same ranks.
# srun torchrun ... -m fastflow score "$OUT" big.npy --out "$OUT/logp.npy" --on-bad-rows nan
# srun torchrun ... -m fastflow sample "$OUT" -n 10000000 --seed 0 --out "$OUT/samples_10M.npy"
