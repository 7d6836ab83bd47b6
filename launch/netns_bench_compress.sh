#!/usr/bin/env bash
# Usage: sudo launch/netns_bench_compress.sh          (what `make bench-compress` runs; issue 19)
#   Two owners in two network namespaces joined by a veth pair shaped with tc tbf to RATE each way
#   (launch/netns_lib.sh), one rank in each: resnet18's avg unify plain, with unify.compress = bf16 and
#   with int8, interleaved round by round (benchmarks/compress_links.py). Prints medians over rounds of
#   the slowest owner's unify, the time inside the wire calls, the local work, the bytes each veth sent
#   and the link's floor, and the ratios bf16 / plain and int8 / plain against issue 19's targets.
#   A few minutes at 20 Mbit (about 37 s a round). Needs root (CAP_NET_ADMIN), iproute2 and tc.
#   OWNERS=N (N > 2): N owners instead, each on its own host behind its own RATE link up and down
#   (launch/netns_links_lib.sh, namespaces udc_links_*; where 16-bit compression runs sharded from 4).
#   Env: RATE (20mbit), ROUNDS (3), MODEL (resnet18), OWNERS (2), SUMMARY (results/bench_compress.json), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/netns_lib.sh
me=netns_bench_compress.sh
netns_require "$me"
rate=${RATE:-20mbit} rounds=${ROUNDS:-3} model=${MODEL:-resnet18}
summary=$(realpath -m "${SUMMARY:-results/bench_compress.json}")
port=29588 owners=${OWNERS:-2}
args=(-m benchmarks.compress_links --rate "$rate" --rounds "$rounds" --model "$model" --out "$summary")
if [ "$owners" -gt 2 ] 2>/dev/null; then
  export LINKS_TAG=${LINKS_TAG:-udc} LINKS_HOSTS=$owners LINKS_NNODES=$owners
  source launch/netns_links_lib.sh
  links_up "$me" "$rate"
  echo "$me: $owners owners, each on its own host behind its own $rate tc-tbf link; $model, $rounds rounds"
  pids=()
  for i in $(seq 1 $((owners - 1))); do
    links_torchrun "$i" "$i" "$port" bench-compress "${args[@]}" >/dev/null &
    pids+=($!)
  done
  links_torchrun 0 0 "$port" bench-compress "${args[@]}"
  for pid in "${pids[@]}"; do wait "$pid"; done
elif [ "$owners" = 2 ]; then
  netns_up "$me" "$rate"
  echo "$me: 2 owners in namespaces $NETNS_A, $NETNS_B over a $rate tc-tbf link (each way); $model, $rounds rounds"
  netns_torchrun "$NETNS_A" 0 "$port" bench-compress "${args[@]}" &
  node_a=$!
  netns_torchrun "$NETNS_B" 1 "$port" bench-compress "${args[@]}" >/dev/null
  wait "$node_a"
else
  echo "$me: OWNERS is '$owners'; give a whole number of owners, 2 or more" >&2
  exit 2
fi
echo "$me: load average $(cut -d' ' -f1-3 /proc/loadavg) on $(getconf _NPROCESSORS_ONLN) cores (figures from a loaded machine are upper ones)"
