#!/usr/bin/env bash
# One machine's share of a multi-node `distill train` run: one `accelerate launch` per node, which starts this
# node's processes. launch/slurm.sbatch runs it once per node through srun; outside Slurm set the same variables
# by hand (tests/distill/training/test_deepspeed.py runs two "nodes" on 127.0.0.1 this way).
#
#   SLURM_NNODES     number of machines             SLURM_NODEID   this machine's rank (0 = main)
#   MASTER_ADDR      address of machine rank 0      MASTER_PORT    a free TCP port on it (default 29500)
#   PROCS_PER_NODE   processes per machine (default: SLURM_GPUS_ON_NODE, else 1)
#   ACCELERATE_CONFIG  launch config (default launch/multinode.yaml: ZeRO-3, the `standard` launcher, no ssh)
# Arguments are passed to `distill train`, e.g. --config my_run.yaml --resume auto
set -euo pipefail
: "${SLURM_NNODES:?set SLURM_NNODES (number of machines)}"
: "${SLURM_NODEID:?set SLURM_NODEID (this machine rank)}"
if [[ -z "${MASTER_ADDR:-}" ]]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
MASTER_PORT=${MASTER_PORT:-29500}
PROCS_PER_NODE=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launch/multinode.yaml}

# torchrun (inside accelerate launch) starts the ranks in their own sessions, so a signal Slurm sends to this step
# reaches only the launcher. Have it forward SIGUSR1 as well as SIGTERM to the ranks (distill train saves a
# checkpoint and exits 75 on either), and give them time to finish the save before it kills them (default 30 s).
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}

# `python -m distill.training.launch` is `accelerate launch` with one difference: it exits 75 when every rank of this
# node saved a checkpoint on the signal and exited 75 (accelerate launch itself exits 1 after any signal; see
# distill/training/launch.py), 128 + the signal number when the launcher was signalled and the ranks did not all save.
exec "${PYTHON:-python}" -m distill.training.launch --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$SLURM_NNODES" --num_processes $((SLURM_NNODES * PROCS_PER_NODE)) \
    --machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    -m distill train "$@"
