# Two "machines" on one host, for the launch/netns_*.sh scripts: `source` this file; it runs nothing itself.
#   netns_require NAME        refuse (one line, exit 2) without root, iproute2 (ip) or tc
#   netns_up NAME RATE        namespaces $NETNS_A and $NETNS_B joined by a veth pair, each direction shaped
#                             with tc tbf to RATE; removed on exit (also on failure or Ctrl-C), with any
#                             process still running in them; refuses (exit 2) while another script has them
#   netns_torchrun NS NODE_RANK PORT RDZV_ID ARGS...
#                             one torchrun agent with one rank in namespace NS (node 0 in $NETNS_A hosts the
#                             c10d store); ARGS follow torchrun's options, e.g. `-m unify_dist train ...`
#   netns_run_pair DIR PORT ACC_FIELD ARGS...
#                             both agents (ARGS: `-m MODULE ...`), output time-stamped into DIR/output.log, stopped
#                             once a record of DIR/metrics.jsonl has ACC_FIELD >= $target ("-": let it end);
#                             uses the caller's $me, $target and $python
#   netns_slow_b SHARE        from now on node B's agent and worker get SHARE of one core (a cgroup v1 CPU
#                             quota, inherited by every process B starts): a slow owner, not a sleep
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
  if [ -d "$NETNS_CGROUP_B" ]; then  # empty once its processes are gone
    for _ in $(seq 50); do rmdir "$NETNS_CGROUP_B" 2>/dev/null && break; sleep 0.1; done
  fi
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

NETNS_CGROUP_B=/sys/fs/cgroup/cpu/ud_bench_slow_b

netns_slow_b() {  # SHARE (0 < SHARE <= 1; 1 lifts the limit)
  local share=$1 period=100000
  if [ ! -e /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
    echo "$me: no cgroup v1 cpu controller at /sys/fs/cgroup/cpu: cannot slow node B down" >&2
    exit 2
  fi
  mkdir -p "$NETNS_CGROUP_B"
  echo "$period" >"$NETNS_CGROUP_B/cpu.cfs_period_us"
  awk -v s="$share" -v p="$period" 'BEGIN { q = int(s * p); print (s >= 1 ? -1 : q) }' >"$NETNS_CGROUP_B/cpu.cfs_quota_us"
  NETNS_SLOW_B=$share
}

netns_torchrun() {  # NS NODE_RANK PORT RDZV_ID ARGS...: talks over the veth only
  local ns=$1 node_rank=$2 port=$3 id=$4 addr=$NETNS_IP_A
  shift 4
  [ "$ns" = "$NETNS_A" ] || addr=$NETNS_IP_B
  # Both namespaces share one hostname, so name each agent by its address; node 0 hosts the store.
  # PYTHONUNBUFFERED: lines reach a pipe when printed, so a reader can timestamp them.
  local slow=()  # node B slowed down (netns_slow_b): a shell joins the cgroup, then becomes the agent
  if [ "$ns" = "$NETNS_B" ] && [ -n "${NETNS_SLOW_B:-}" ]; then
    slow=(sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$NETNS_CGROUP_B")
  fi
  "${slow[@]}" ip netns exec "$ns" env OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 GLOO_SOCKET_IFNAME="ud_bench_v${ns: -1}" \
    "$(netns_python)" -m torch.distributed.run --nnodes=2 --node_rank="$node_rank" --nproc_per_node=1 \
    --local-addr="$addr" --rdzv-backend=c10d --rdzv-endpoint="$NETNS_IP_A:$port" --rdzv-id="$id" \
    --rdzv-conf="is_host=$((1 - node_rank))" "$@"
}

netns_stamp() {  # DIR: append lines to DIR/output.log prefixed by the time they arrived; show them until DIR/stopped
  local line
  while IFS= read -r line; do
    printf '%s %s\n' "$EPOCHREALTIME" "$line" >>"$1/output.log"
    [ -e "$1/stopped" ] || printf '%s\n' "$line"  # a stopped run's shutdown tracebacks stay in the log
  done
}

netns_run_pair() {  # DIR PORT ACC_FIELD ARGS...: one rank per namespace; stopped once ACC_FIELD >= $target ("-": never)
  local dir=$1 port=$2 field=$3 watcher= node_a node_b
  shift 3
  rm -rf -- "$dir" && mkdir -p "$dir"
  if [ "$field" != - ]; then
    "$python" benchmarks/time_to_accuracy.py wait "$dir/metrics.jsonl" "$field" "$target" &
    watcher=$!
  fi
  echo "$EPOCHREALTIME" >"$dir/launch"
  netns_torchrun "$NETNS_A" 0 "$port" "tta-$port" "$@" > >(netns_stamp "$dir") 2>&1 &
  node_a=$!
  netns_torchrun "$NETNS_B" 1 "$port" "tta-$port" "$@" > >(netns_stamp "$dir") 2>&1 &
  node_b=$!
  while kill -0 "$node_a" 2>/dev/null || kill -0 "$node_b" 2>/dev/null; do
    if [ -n "$watcher" ] && ! kill -0 "$watcher" 2>/dev/null; then
      if wait "$watcher"; then
        echo "$me: target reached; stopping this run (its shutdown messages: $dir/output.log)"
        touch "$dir/stopped"
        netns_stop
      fi
      watcher=
    fi
    sleep 0.5
  done
  wait "$node_a" || true  # non-zero when stopped at the target; the summary says whether it got there
  wait "$node_b" || true
  if [ -n "$watcher" ]; then kill "$watcher" 2>/dev/null || true; fi
  for _ in $(seq 50); do  # the next run starts on an idle machine
    [ -z "$(ip netns pids "$NETNS_A"; ip netns pids "$NETNS_B")" ] && break
    sleep 0.2
  done
}
