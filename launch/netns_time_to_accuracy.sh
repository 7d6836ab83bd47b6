#!/usr/bin/env bash
# Usage: sudo launch/netns_time_to_accuracy.sh [CONFIG] [--set section.key=value ...]
#   Issue 4.5: wall-clock time to TARGET test accuracy, unify-dist (rule avg) against DistributedDataParallel
#   (gradients all_reduced every step), each run as `torchrun --nnodes=2` with one rank in each of two network
#   namespaces joined by a veth pair shaped with tc tbf to RATE. Both runs get the same config and --set
#   (CONFIG defaults to configs/paper_v.toml): same split, model, batch size, optimizer, threads.
#   unify-dist stops itself only on validation accuracy, so this script stops it (SIGTERM) once a round's
#   unified_test_acc reaches TARGET; DDP stops itself there (--target). Prints each run's launch->target and
#   training->target time, rounds/epochs needed and the ratio unify-dist/DDP (goal <= 0.3); writes SUMMARY.
#   Needs root (CAP_NET_ADMIN), iproute2 and tc. Namespaces are removed on exit, also on failure or Ctrl-C.
#   Env: TARGET (0.88), RATE (100mbit), THREADS (torch threads per rank; default half this machine's cores,
#   as both "machines" share them), OUT (runs/netns_time_to_accuracy), SUMMARY
#   (results/netns_time_to_accuracy.json), PYTHON (default .venv/bin/python or python3).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/netns_lib.sh
me=netns_time_to_accuracy.sh
netns_require "$me"
config=${1:-configs/paper_v.toml}; shift || true
target=${TARGET:-0.88} rate=${RATE:-100mbit} out=${OUT:-runs/netns_time_to_accuracy}
cores=$(getconf _NPROCESSORS_ONLN)  # not nproc: it honours OMP_NUM_THREADS
threads=${THREADS:-$(( cores / 2 > 0 ? cores / 2 : 1 ))}
summary=${SUMMARY:-results/netns_time_to_accuracy.json}
python=$(netns_python)
common=(--config "$config" --set "train.threads=$threads" "$@")
netns_up "$me" "$rate"

echo "$me: unify-dist avg vs DDP to $target test accuracy; 1 rank in each of $NETNS_A, $NETNS_B over a $rate" \
  "veth link; config $config; $threads torch thread(s) per rank"
echo "$me: [1/2] unify-dist avg"
# DDP evaluates the test set once per epoch; unify-dist skips its local-model evaluation so both evaluate alike.
netns_run_pair "$out/unify" 29577 unified_test_acc -m unify_dist train "${common[@]}" \
  --set unify.rule=avg --set "output.dir=$out/unify" --set output.resume=false --set output.local_metrics=false
echo "$me: [2/2] DDP"
netns_run_pair "$out/ddp" 29578 - -m benchmarks.ddp_baseline "${common[@]}" --target "$target" --out "$out/ddp"
"$python" benchmarks/time_to_accuracy.py summary --unify "$out/unify" --ddp "$out/ddp" --target "$target" --out "$summary" \
  --note "rate=$rate" --note "config=$config" --note "threads_per_rank=$threads" --note "overrides=$*" \
  --note "host=$cores cores, both namespaces on one machine"
