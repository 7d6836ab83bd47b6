#!/usr/bin/env bash
# Usage: sudo launch/netns_bench_compress.sh          (what `make bench-compress` runs; issue 19)
#   Two owners in two network namespaces joined by a veth pair shaped with tc tbf to RATE each way
#   (launch/netns_lib.sh), one rank in each: resnet18's avg unify plain, with unify.compress = bf16 and
#   with int8, interleaved round by round (benchmarks/compress_links.py). Prints medians over rounds of
#   the slowest owner's unify, the time inside the wire calls, the local work, the bytes each veth sent
#   and the link's floor, and the ratios bf16 / plain and int8 / plain against issue 19's targets.
#   A few minutes at 20 Mbit (about 37 s a round). Needs root (CAP_NET_ADMIN), iproute2 and tc.
#   Env: RATE (20mbit), ROUNDS (3), MODEL (resnet18), SUMMARY (results/bench_compress.json), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/netns_lib.sh
me=netns_bench_compress.sh
netns_require "$me"
rate=${RATE:-20mbit} rounds=${ROUNDS:-3} model=${MODEL:-resnet18}
summary=$(realpath -m "${SUMMARY:-results/bench_compress.json}")
port=29588
netns_up "$me" "$rate"
echo "$me: 2 owners in namespaces $NETNS_A, $NETNS_B over a $rate tc-tbf link (each way); $model, $rounds rounds"
args=(-m benchmarks.compress_links --rate "$rate" --rounds "$rounds" --model "$model" --out "$summary")
netns_torchrun "$NETNS_A" 0 "$port" bench-compress "${args[@]}" &
node_a=$!
netns_torchrun "$NETNS_B" 1 "$port" bench-compress "${args[@]}" >/dev/null
wait "$node_a"
echo "$me: load average $(cut -d' ' -f1-3 /proc/loadavg) on $(getconf _NPROCESSORS_ONLN) cores (figures from a loaded machine are upper ones)"
