# LINKS_HOSTS "machines" on one host (3 unless set before sourcing), each behind its own shaped link, for
# launch/netns_bench_links.sh and launch/netns_bench_lora_links.sh: `source` this file (after
# launch/netns_lib.sh, whose netns_require and netns_python it uses); it runs nothing itself. Separate
# names from netns_lib.sh's two namespaces, so the two never collide; LINKS_TAG (default ud, at most 4
# characters) prefixes every namespace, device and the lock, so runs with different tags can share a host.
#
#   hosts ${LINKS_NS[0..LINKS_HOSTS-1]} (10.78.0.1, .2, ...) --veth-- bridge in namespace $LINKS_NS_BR
#   Each host's veth is shaped with tc tbf to RATE on the way out (its upload) and the bridge's end of
#   it to RATE on the way in (its download): every host has a RATE link of its own, as machines of
#   different organisations would. Two owners talk host 0 <-> host 1 (one RATE link each way, like
#   netns_lib.sh's pair); Flower's server sits on host 2, so both owners' traffic shares its one link.
#
#   links_up NAME RATE          create it all; removed on exit (also on failure or Ctrl-C) with every
#                               process still in it; refuses (exit 2) while another script holds it
#   links_rate RATE             re-shape every link to RATE
#   links_exec I CMD...         run CMD on host I (one torch thread, unbuffered output)
#   links_torchrun I NODE_RANK PORT RDZV_ID ARGS...
#                               one torchrun agent with one rank on host I; node 0 (on host 0) hosts the store;
#                               LINKS_NNODES agents in all (2 unless set)
#   links_sample I FILE         in the background: every 0.2 s, "time tx_bytes" of host I's veth to FILE
#   links_stop                  SIGTERM (then SIGKILL) every process in the namespaces (all started here)
LINKS_TAG=${LINKS_TAG:-ud} LINKS_HOSTS=${LINKS_HOSTS:-3}
LINKS_NS_BR=${LINKS_TAG}_links_br LINKS_NS=() LINKS_IP=()
for _i in $(seq 0 $((LINKS_HOSTS - 1))); do LINKS_NS+=("${LINKS_TAG}_links_h$_i") LINKS_IP+=("10.78.0.$((_i + 1))"); done

links_dev() { echo "${LINKS_TAG}_lk_h$1"; }  # host I's end of its veth; the bridge's end is links_port I
links_port() { echo "${LINKS_TAG}_lk_p$1"; }

links_stop() {
  local ns pid left
  for ns in "${LINKS_NS[@]}" "$LINKS_NS_BR"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
  done
  for _ in $(seq 50); do  # Flower's processes take a moment to leave; the next run starts on an idle machine
    left=$(for ns in "${LINKS_NS[@]}" "$LINKS_NS_BR"; do ip netns pids "$ns" 2>/dev/null || true; done)
    [ -z "$left" ] && return 0
    sleep 0.2
  done
  for pid in $left; do kill -KILL "$pid" 2>/dev/null || true; done
}

links_down() {
  links_stop
  local ns
  for ns in "${LINKS_NS[@]}" "$LINKS_NS_BR"; do ip netns del "$ns" 2>/dev/null || true; done
}

links_shape() {  # NS DEV RATE: tbf on DEV's egress, as netns_lib.sh shapes its pair
  tc -n "$1" qdisc replace dev "$2" root tbf rate "$3" burst 64kbit latency 100ms
}

links_rate() {
  local i
  for i in "${!LINKS_NS[@]}"; do
    links_shape "${LINKS_NS[$i]}" "$(links_dev "$i")" "$1"
    links_shape "$LINKS_NS_BR" "$(links_port "$i")" "$1"
  done
}

links_up() {
  local name=$1 rate=$2 i ns
  local lock=${TMPDIR:-/tmp}/unify_dist_links.lock  # tag ud: the name earlier versions used for the same namespaces
  [ "$LINKS_TAG" = ud ] || lock=${TMPDIR:-/tmp}/unify_dist_links_$LINKS_TAG.lock
  exec 8>"$lock"  # held until exit
  if ! flock -n 8; then
    echo "$name: another run holds $lock (its namespaces are named ${LINKS_TAG}_links_*); wait for it, or set LINKS_TAG" >&2
    exit 2
  fi
  trap links_down EXIT
  trap 'exit 130' INT TERM  # exit runs the EXIT trap: the namespaces go on Ctrl-C too
  links_down  # leftovers of an earlier, killed run
  if ! ip netns add "$LINKS_NS_BR" 2>/dev/null; then
    echo "$name: cannot create network namespaces here (no CAP_NET_ADMIN?); run it as root on a host" >&2
    exit 2
  fi
  ip -n "$LINKS_NS_BR" link add "${LINKS_TAG}_lk_br" type bridge
  ip -n "$LINKS_NS_BR" link set "${LINKS_TAG}_lk_br" up
  for i in "${!LINKS_NS[@]}"; do
    ns=${LINKS_NS[$i]}
    ip netns add "$ns"
    ip link add "$(links_dev "$i")" type veth peer name "$(links_port "$i")"
    ip link set "$(links_dev "$i")" netns "$ns"
    ip link set "$(links_port "$i")" netns "$LINKS_NS_BR"
    ip -n "$LINKS_NS_BR" link set "$(links_port "$i")" master "${LINKS_TAG}_lk_br"
    ip -n "$LINKS_NS_BR" link set "$(links_port "$i")" up
    ip -n "$ns" addr add "${LINKS_IP[$i]}/24" dev "$(links_dev "$i")"
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "$(links_dev "$i")" up
  done
  links_rate "$rate"
}

links_exec() {  # I CMD...
  local i=$1
  shift
  # PYTHONUNBUFFERED: lines reach a pipe when printed, so a reader can timestamp them.
  ip netns exec "${LINKS_NS[$i]}" env OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 GLOO_SOCKET_IFNAME="$(links_dev "$i")" "$@"
}

links_torchrun() {  # I NODE_RANK PORT RDZV_ID ARGS...: talks over host I's link only
  local i=$1 node_rank=$2 port=$3 id=$4
  shift 4
  # The namespaces share one hostname, so name each agent by its address; node 0 hosts the store.
  links_exec "$i" "$(netns_python)" -m torch.distributed.run --nnodes="${LINKS_NNODES:-2}" --node_rank="$node_rank" \
    --nproc_per_node=1 --local-addr="${LINKS_IP[$i]}" --rdzv-backend=c10d --rdzv-endpoint="${LINKS_IP[0]}:$port" \
    --rdzv-id="$id" --rdzv-conf="is_host=$((node_rank == 0 ? 1 : 0))" "$@"
}

links_sample() {  # I FILE: read inside the namespace (its own /sys), no process forked per sample but sleep
  ip netns exec "${LINKS_NS[$1]}" bash -c '
    f=/sys/class/net/$0/statistics/tx_bytes
    while :; do read -r b <"$f"; echo "$EPOCHREALTIME $b"; sleep 0.2; done' "$(links_dev "$1")" >"$2" &
}
