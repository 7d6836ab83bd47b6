#!/usr/bin/env bash
# Usage: sudo launch/netns_bench.sh [CONFIG] [--set section.key=value ...]
#   Two "machines" on one host: two network namespaces joined by a veth pair whose link is shaped with
#   tc tbf (RATE, default 100mbit, each direction). `torchrun --nnodes=2` runs one owner in each namespace,
#   so every unify crosses the slow link. Prints the median over rounds of the slowest owner's unify_s (metrics.jsonl).
#   Needs root (CAP_NET_ADMIN), iproute2 and tc. Namespaces are removed on exit, also on failure or Ctrl-C.
#   Env: RATE (tbf rate, default 100mbit), PYTHON (default .venv/bin/python or python3), OUT (run dir).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
  echo "netns_bench.sh: needs root with iproute2 (ip) and tc to create network namespaces; run it with sudo" >&2
  exit 2
fi
config=${1:-configs/demo_cpu.toml}; shift || true
rate=${RATE:-100mbit}
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
python=$(realpath -s "$python" 2>/dev/null || command -v "$python")  # -s: keep the venv link
out=${OUT:-runs/netns_bench}
a=ud_bench_a b=ud_bench_b ip_a=10.77.0.1 ip_b=10.77.0.2 port=29577

cleanup() { ip netns del "$a" 2>/dev/null || true; ip netns del "$b" 2>/dev/null || true; }
trap cleanup EXIT INT TERM
cleanup  # leftovers of an earlier, killed run
if ! ip netns add "$a" 2>/dev/null; then
  echo "netns_bench.sh: cannot create network namespaces here (no CAP_NET_ADMIN?); run it as root on a host" >&2
  exit 2
fi
ip netns add "$b"
ip link add ud_bench_va type veth peer name ud_bench_vb
ip link set ud_bench_va netns "$a"
ip link set ud_bench_vb netns "$b"
for side in "$a ud_bench_va $ip_a" "$b ud_bench_vb $ip_b"; do
  read -r ns dev addr <<<"$side"
  ip -n "$ns" addr add "$addr/24" dev "$dev"
  ip -n "$ns" link set lo up
  ip -n "$ns" link set "$dev" up
  tc -n "$ns" qdisc add dev "$dev" root tbf rate "$rate" burst 64kbit latency 100ms  # shapes what leaves
done

run_node() {  # NAMESPACE NODE_RANK ADDR: one torchrun agent, one owner, talking over the veth only
  # Both namespaces share one hostname, so name each agent by its address; node 0 hosts the store.
  ip netns exec "$1" env OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME="ud_bench_v${1: -1}" \
    "$python" -m torch.distributed.run --nnodes=2 --node_rank="$2" --nproc_per_node=1 --local-addr="$3" \
    --rdzv-backend=c10d --rdzv-endpoint="$ip_a:$port" --rdzv-id=netns-bench --rdzv-conf="is_host=$((1 - $2))" \
    -m unify_dist train --config "$config" --set "output.dir=$out" "${@:4}"
}
echo "netns_bench.sh: 2 owners in namespaces $a, $b over a $rate veth link; config $config"
start=$(date +%s)
run_node "$a" 0 "$ip_a" "$@" &
node_a=$!
run_node "$b" 1 "$ip_b" "$@"
wait "$node_a"
echo "netns_bench.sh: run took $(( $(date +%s) - start )) s; outputs in $out"
"$python" - "$out/metrics.jsonl" "$rate" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
times = [max(o["unify_s"] for o in r["owners"]) for r in rows]  # a unify ends when its slowest owner does
if times:
    print(f"median unify_s (slowest owner) over {len(times)} rounds on a {sys.argv[2]} link: {statistics.median(times):.3f} s")
EOF
