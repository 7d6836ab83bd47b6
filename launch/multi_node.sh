#!/usr/bin/env bash
# Usage: launch/multi_node.sh NNODES NODE_RANK NPROC HOST:PORT CONFIG [--set section.key=value ...]
#   Run the same command on every machine (NODE_RANK 0..NNODES-1); they meet at HOST:PORT (c10d rendezvous,
#   HOST is any one of the machines, reachable from the others). Each process is one data owner.
set -euo pipefail
if [ $# -lt 5 ]; then echo "usage: $0 NNODES NODE_RANK NPROC HOST:PORT CONFIG [--set section.key=value ...]" >&2; exit 2; fi
nnodes=$1 node_rank=$2 nproc=$3 endpoint=$4 config=$5; shift 5
exec torchrun --nnodes="$nnodes" --node_rank="$node_rank" --nproc_per_node="$nproc" \
  --rdzv-backend=c10d --rdzv-endpoint="$endpoint" --rdzv-id="${RDZV_ID:-unify-dist}" \
  -m unify_dist train --config "$config" "$@"
