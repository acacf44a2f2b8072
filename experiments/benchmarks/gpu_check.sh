#!/usr/bin/env bash
# Every CUDA path in one run: bf16 autocast with fp32 attack gradients, channels_last,
# torch.compile, the matrix engine, a DARHT epoch on CIFAR-shaped data, standard AutoAttack on 500
# images, a one-GPU NCCL group. Under 8 minutes on one GPU; prints one line of timings at the end.
#   bash experiments/benchmarks/gpu_check.sh            # on a machine with a CUDA GPU
#   bash experiments/benchmarks/gpu_check.sh --dry-run  # tiny, on the CPU
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python experiments/benchmarks/gpu_check.py "$@"
