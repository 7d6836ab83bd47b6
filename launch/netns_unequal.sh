#!/usr/bin/env bash
# Usage: sudo launch/netns_unequal.sh [CONFIG] [--set section.key=value ...]
#   Issue 19: owners of different speeds over a shaped link. Two owners, one per network namespace (a veth
#   pair shaped with tc tbf to RATE), node B's agent and worker held to SHARE of one core by a cgroup v1 CPU
#   quota (a real slow machine, not a sleep). The same config (CONFIG defaults to configs/paper_v.toml) runs
#   in each of MODES, each stopped once a round's unified_test_acc reaches TARGET:
#     epochs   one local epoch each (today's rounds: the fast owner waits for the slow one)
#     seconds  train.round_seconds=ROUND_SECONDS: every owner trains until the budget has passed
#     overlap  seconds, plus unify.overlap: round r's unify runs while round r+1 trains
#     damped   overlap from the unified state with an outer sgd step of lr 0.5 (for label-skewed owners)
#     paced    overlap, its transfer in FRAGMENTS pieces spread over the round (unify.overlap_fragments)
#     weighted seconds, with weighted_avg weighing each owner by the steps it took (unify.weight_by=steps)
#   Prints each mode's time to TARGET, its speed-up over the first mode, each owner's median idle fraction
#   (unify_s / round_s), and node A's bytes on the link in 1-s windows (its veth's counter sampled every
#   0.1 s: the busiest window, the mean, the share of windows in use); writes SUMMARY. Env: RATE (100mbit),
#   SHARE (0.33), TARGET (0.88), MODES ("epochs seconds overlap"), FRAGMENTS (16), ROUND_SECONDS (10: about
#   the fast owner's epoch here), OUT (runs/netns_unequal), SUMMARY (results/netns_unequal_RATE.json), PYTHON. Needs root, iproute2, tc and the
#   cgroup v1 cpu controller; namespaces and the cgroup are removed on exit, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/netns_lib.sh
me=netns_unequal.sh
netns_require "$me"
config=${1:-configs/paper_v.toml}; shift || true
target=${TARGET:-0.88} rate=${RATE:-100mbit} share=${SHARE:-0.33} seconds=${ROUND_SECONDS:-10} fragments=${FRAGMENTS:-16}
out=${OUT:-runs/netns_unequal} summary=${SUMMARY:-results/netns_unequal_$rate.json}
python=$(netns_python)
netns_up "$me" "$rate"
netns_slow_b "$share"
common=(--config "$config" --set train.threads=1 --set unify.rule=avg --set output.resume=false
  --set output.local_metrics=false "$@")
echo "$me: time to $target test accuracy; node B at $share of a core; $rate veth link; config $config"
runs=() port=29581
for mode in ${MODES:-epochs seconds overlap}; do
  case $mode in
    epochs) extra=() ;;
    seconds) extra=(--set "train.round_seconds=$seconds") ;;
    overlap) extra=(--set "train.round_seconds=$seconds" --set unify.overlap=true) ;;
    damped) extra=(--set "train.round_seconds=$seconds" --set unify.overlap=true --set unify.overlap_start=unified
      --set unify.outer=sgd --set unify.outer_lr=0.5 --set unify.outer_momentum=0) ;;
    paced) extra=(--set "train.round_seconds=$seconds" --set unify.overlap=true --set "unify.overlap_fragments=$fragments") ;;
    weighted) extra=(--set "train.round_seconds=$seconds" --set unify.rule=weighted_avg --set unify.weight_by=steps) ;;
    *) echo "$me: unknown mode '$mode' in MODES; use epochs, seconds, overlap, damped, paced or weighted" >&2; exit 2 ;;
  esac
  echo "$me: [$mode]"
  mkdir -p "$out" && rm -f "$out/$mode.link.tsv"
  ip netns exec "$NETNS_A" "$python" benchmarks/time_to_accuracy.py sample ud_bench_va "$out/$mode.link.tsv" &
  sampler=$!
  netns_run_pair "$out/$mode" "$port" unified_test_acc -m unify_dist train "${common[@]}" "${extra[@]}" \
    --set "output.dir=$out/$mode"
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  mv "$out/$mode.link.tsv" "$out/$mode/link.tsv"
  if [ ! -s "$out/$mode/metrics.jsonl" ]; then  # a run that never finished a round: its own error says why
    echo "$me: [$mode] ended before its first round; its output: $out/$mode/output.log" >&2
    grep -m1 "error:" "$out/$mode/output.log" >&2 || true
    exit 1
  fi
  runs+=(--run "$mode=$out/$mode") port=$((port + 1))
done
"$python" benchmarks/time_to_accuracy.py modes "${runs[@]}" --target "$target" --out "$summary" \
  --note "rate=$rate" --note "slow_share=$share" --note "round_seconds=$seconds" --note "config=$config" \
  --note "overrides=$*" --note "host=$(getconf _NPROCESSORS_ONLN) cores, both namespaces on one machine"
