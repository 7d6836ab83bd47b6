# Two "machines" on one host, for the launch/netns_*.sh scripts: `source` this file; it runs nothing itself.
#   netns_require NAME        refuse (one line, exit 2) without root, iproute2 (ip) or tc
#   netns_up NAME RATE        namespaces $NETNS_A and $NETNS_B joined by a veth pair, each direction shaped
#                             with tc tbf to RATE; removed on exit (also on failure or Ctrl-C), with any
#                             process still running in them; refuses (exit 2) while another script has them
#   netns_torchrun NS NODE_RANK PORT RDZV_ID ARGS...
#                             one torchrun agent with one rank in namespace NS (node 0 in $NETNS_A hosts the
#                             c10d store); ARGS follow torchrun's options, e.g. `-m unify_dist train ...`
#   netns_stop                SIGTERM every process in the two namespaces (all of them were started here)
#   netns_python              prints the Python to use: $PYTHON, else .venv/bin/python, else python3
NETNS_A=ud_bench_a NETNS_B=ud_bench_b
NETNS_IP_A=10.77.0.1 NETNS_IP_B=10.77.0.2

netns_require() {
  if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
    echo "$1: needs root with iproute2 (ip) and tc to create network namespaces; run it with sudo" >&2
    exit 2
  fi
}

netns_python() {
  local python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  realpath -s "$python" 2>/dev/null || command -v "$python"  # -s: keep the venv link
}

netns_stop() {
  local ns pid
  for ns in "$NETNS_A" "$NETNS_B"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
  done
}

netns_down() {
  netns_stop
  ip netns del "$NETNS_A" 2>/dev/null || true
  ip netns del "$NETNS_B" 2>/dev/null || true
}

netns_up() {
  local name=$1 rate=$2 ns dev addr
  exec 9>"${TMPDIR:-/tmp}/unify_dist_netns.lock"  # held until exit: both scripts use the same namespace names
  if ! flock -n 9; then
    echo "$name: another netns script is running (it holds ${TMPDIR:-/tmp}/unify_dist_netns.lock); wait for it" >&2
    exit 2
  fi
  trap netns_down EXIT
  trap 'exit 130' INT TERM  # exit runs the EXIT trap: the namespaces go on Ctrl-C too
  netns_down  # leftovers of an earlier, killed run
  if ! ip netns add "$NETNS_A" 2>/dev/null; then
    echo "$name: cannot create network namespaces here (no CAP_NET_ADMIN?); run it as root on a host" >&2
    exit 2
  fi
  ip netns add "$NETNS_B"
  ip link add ud_bench_va type veth peer name ud_bench_vb
  ip link set ud_bench_va netns "$NETNS_A"
  ip link set ud_bench_vb netns "$NETNS_B"
  for side in "$NETNS_A ud_bench_va $NETNS_IP_A" "$NETNS_B ud_bench_vb $NETNS_IP_B"; do
    read -r ns dev addr <<<"$side"
    ip -n "$ns" addr add "$addr/24" dev "$dev"
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "$dev" up
    tc -n "$ns" qdisc add dev "$dev" root tbf rate "$rate" burst 64kbit latency 100ms  # shapes what leaves
  done
}

netns_torchrun() {  # NS NODE_RANK PORT RDZV_ID ARGS...: talks over the veth only
  local ns=$1 node_rank=$2 port=$3 id=$4 addr=$NETNS_IP_A
  shift 4
  [ "$ns" = "$NETNS_A" ] || addr=$NETNS_IP_B
  # Both namespaces share one hostname, so name each agent by its address; node 0 hosts the store.
  # PYTHONUNBUFFERED: lines reach a pipe when printed, so a reader can timestamp them.
  ip netns exec "$ns" env OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 GLOO_SOCKET_IFNAME="ud_bench_v${ns: -1}" \
    "$(netns_python)" -m torch.distributed.run --nnodes=2 --node_rank="$node_rank" --nproc_per_node=1 \
    --local-addr="$addr" --rdzv-backend=c10d --rdzv-endpoint="$NETNS_IP_A:$port" --rdzv-id="$id" \
    --rdzv-conf="is_host=$((1 - node_rank))" "$@"
}
