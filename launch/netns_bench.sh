#!/usr/bin/env bash
# Usage: sudo launch/netns_bench.sh [CONFIG] [--set section.key=value ...]
#   Two "machines" on one host: two network namespaces joined by a veth pair whose link is shaped with
#   tc tbf (RATE, default 100mbit, each direction). `torchrun --nnodes=2` runs one owner in each namespace,
#   so every unify crosses the slow link. Prints the median over rounds of the slowest owner's unify_s (metrics.jsonl).
#   Needs root (CAP_NET_ADMIN), iproute2 and tc. Namespaces are removed on exit, also on failure or Ctrl-C.
#   Env: RATE (tbf rate, default 100mbit), PYTHON (default .venv/bin/python or python3), OUT (run dir).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/netns_lib.sh
netns_require netns_bench.sh
config=${1:-configs/demo_cpu.toml}; shift || true
rate=${RATE:-100mbit}
out=${OUT:-runs/netns_bench}
port=29577
netns_up netns_bench.sh "$rate"

echo "netns_bench.sh: 2 owners in namespaces $NETNS_A, $NETNS_B over a $rate veth link; config $config"
start=$(date +%s)
train=(-m unify_dist train --config "$config" --set "output.dir=$out" "$@")
netns_torchrun "$NETNS_A" 0 "$port" netns-bench "${train[@]}" &
node_a=$!
netns_torchrun "$NETNS_B" 1 "$port" netns-bench "${train[@]}"
wait "$node_a"
echo "netns_bench.sh: run took $(( $(date +%s) - start )) s; outputs in $out"
"$(netns_python)" - "$out/metrics.jsonl" "$rate" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
times = [max(o["unify_s"] for o in r["owners"]) for r in rows]  # a unify ends when its slowest owner does
if times:
    print(f"median unify_s (slowest owner) over {len(times)} rounds on a {sys.argv[2]} link: {statistics.median(times):.3f} s")
PY
