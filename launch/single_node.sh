#!/usr/bin/env bash
# Usage: launch/single_node.sh NPROC CONFIG [--set section.key=value ...]
#   One machine, NPROC owners: NCCL with one GPU per owner when CUDA is available, else gloo on CPU.
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 NPROC CONFIG [--set section.key=value ...]" >&2; exit 2; fi
nproc=$1 config=$2; shift 2
exec torchrun --standalone --nproc_per_node="$nproc" -m unify_dist train --config "$config" "$@"
