#!/usr/bin/env bash
# Usage: sudo launch/netns_bench_lora_links.sh     (what `make bench-lora-links` runs; `make bench-links`
#   runs it too, into its own run directory, so its rows land in results/bench_links.json; issue 18)
#   A LoRA adapter with LLaMA-7B's shapes (r=16 on q and v, 32 layers of width 4096: 8.4M elements;
#   benchmarks/lora_links.py) unified by 4 owners, each on its own host behind its own RATE link
#   (launch/netns_links_lib.sh, 5 hosts: owners on 0-3, Flower's server on 4), over gloo:
#   1. unify-dist lora_separate in fp32 and in bf16, and lora_ffa in fp32 (A frozen: only B travels):
#      each unify's time against the link's floor, the bytes a ring all_reduce must send per owner
#      (2 (W-1)/W x the adapter) / RATE;
#   2. Flower's deployment engine doing the same adapter-only FedAvg (FlowerTune's recipe: the server
#      sends the adapter to every client, each sends its adapter back; no federated evaluation):
#      round overhead and the bytes each host sends per round, beside unify-dist's.
#   Then benchmarks/links_summary.py writes SUMMARY (unless SUMMARY is empty) and its bar chart (.png beside it).
#   Needs root, iproute2, tc; flwr importable from FLWR_DIR (part 2; the Makefile installs it there).
#   Env: RATE (100mbit), ROUNDS (3), FLOWER (1: run part 2), OUT (runs/bench_lora_links), SUMMARY
#   (results/bench_lora_links.json), LINKS_TAG (udl: its namespaces are udl_links_*), FLWR_DIR (.flwr),
#   PYTHON (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
export LINKS_TAG=${LINKS_TAG:-udl} LINKS_HOSTS=5
source launch/netns_lib.sh
source launch/netns_links_lib.sh
me=netns_bench_lora_links.sh
netns_require "$me"
root=$(pwd)
python=$(netns_python)
flwr_dir=$(realpath -m "${FLWR_DIR:-.flwr}")
out=$(realpath -m "${OUT:-runs/bench_lora_links}")
summary=${SUMMARY-results/bench_lora_links.json}
rate=${RATE:-100mbit} rounds=${ROUNDS:-3} flower=${FLOWER:-1} cases=${CASES:-fp32 bf16 ffa} chunk=${CHUNK:-0}
rate_bits=$("$python" -c "import sys; s=sys.argv[1].lower(); u={'gbit':1e9,'mbit':1e6,'kbit':1e3}; \
print(next(float(s[:-len(k)])*v for k,v in u.items() if s.endswith(k)))" "$rate")
if [ "$flower" = 1 ] && ! PYTHONPATH="$flwr_dir" "$python" -c "import flwr" 2>/dev/null; then
  echo "$me: flwr is not importable from $flwr_dir; run it through 'make bench-lora-links', which installs it there" >&2
  exit 2
fi
# Flower's processes find flwr in the side folder, the app in benchmarks/flower_app, the adapter's shapes in benchmarks/.
flower_env=(env "PYTHONPATH=$flwr_dir:$root/benchmarks/flower_app:$root" "PATH=$flwr_dir/bin:$PATH")
port=29700
owners=(0 1 2 3) server=4

links_up "$me" "$rate"
case_dir=$out/lora7b_$rate
rm -rf -- "$case_dir" && mkdir -p "$case_dir"

begin_run() {  # DIR KIND: a fresh run directory, the launch time, the byte counters sampling
  rm -rf -- "$1" && mkdir -p "$1"
  echo "$2" >"$1/kind"
  echo "$EPOCHREALTIME" >"$1/launch"
  for i in "${!LINKS_NS[@]}"; do links_sample "$i" "$1/tx_h$i.tsv"; done
  tc_stats "$1/tc_before"
  port=$((port + 1))
}

tc_stats() {  # FILE: every shaped link's tbf counters (sent, dropped, overlimits), both ends
  local i
  for i in "${!LINKS_NS[@]}"; do
    echo "host $i up: $(tc -n "${LINKS_NS[$i]}" -s qdisc show dev "$(links_dev "$i")" | grep -m1 Sent)"
    echo "host $i down: $(tc -n "$LINKS_NS_BR" -s qdisc show dev "$(links_port "$i")" | grep -m1 Sent)"
  done >"$1"
}

end_run() {  # DIR: stop the samplers (and anything left), note the machine's load and the links' counters
  tc_stats "$1/tc_after"
  links_stop
  uptime >"$1/load"
  echo "$me:   done in $(awk -v now="${EPOCHREALTIME/,/.}" '{printf "%.0f", now - $1}' "$1/launch") s;$(cat "$1/load")"
}

run_unify() {  # DIR DTYPE RULE: one owner on each of hosts 0-3, rank 0's store on host 0
  local dir=$1 pids=() i
  for i in "${owners[@]}"; do
    links_exec "$i" "$python" -m benchmarks.lora_links --rank "$i" --world "${#owners[@]}" --master "${LINKS_IP[0]}:$port" \
      --dtype "$2" --rule "$3" --rounds "$rounds" --chunk-elements "$chunk" --rate-bits "$rate_bits" --out "$dir" >"$dir/owner$i.log" 2>&1 &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || echo "$me:   an owner failed: see $dir/owner*.log" >&2; done
  grep -h "digest" "$dir/owner0.log" || true
}

run_flower() {  # DIR: SuperLink on host 4, a SuperNode on each owner's host, adapter-only FedAvg
  local dir=$1 home=$1/flwr_home link=${LINKS_IP[$server]}:$port i
  mkdir -p "$home"
  printf '[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "%s"\ninsecure = true\n' "$link" >"$home/config.toml"
  links_exec "$server" "${flower_env[@]}" FLWR_HOME="$home" flower-superlink --insecure --disable-runtime-dependency-installation \
    --host "${LINKS_IP[$server]}" --port "$port" >"$dir/superlink.log" 2>&1 &
  for i in "${owners[@]}"; do
    links_exec "$i" "${flower_env[@]}" FLWR_HOME="$home/node$i" flower-supernode --insecure --superlink "$link" \
      --port 9094 --node-config "partition-id=$i num-partitions=${#owners[@]}" >"$dir/supernode$i.log" 2>&1 &
  done
  for _ in $(seq 60); do  # until the SuperLink answers
    links_exec "$server" "${flower_env[@]}" FLWR_HOME="$home" flwr run "$root/benchmarks/flower_app" bench --run-config \
      "task='lora7b' nodes=${#owners[@]} rounds=$rounds out='$dir'" >>"$dir/flwr_run.log" 2>&1 && break
    sleep 1
  done
  local end=$((SECONDS + 900))
  while [ ! -e "$dir/done" ] && [ $SECONDS -lt $end ]; do sleep 0.5; done
  [ -e "$dir/done" ] || echo "$me:   Flower run did not finish: see $dir/*.log" >&2
}

echo "$me: ${#owners[@]} owners on hosts 0-3, each behind its own $rate tc-tbf link; a LLaMA-7B-shaped LoRA adapter, $rounds rounds"
for c in $cases; do
  case $c in
    fp32) name=unify dtype=fp32 rule=lora_separate what="lora_separate, fp32 adapter" ;;
    bf16) name=unify_bf16 dtype=bf16 rule=lora_separate what="lora_separate, bf16 adapter" ;;
    ffa) name=unify_ffa dtype=fp32 rule=lora_ffa what="lora_ffa, fp32 (A frozen: only B travels)" ;;
    *) echo "$me: CASES holds '$c'; name fp32, bf16 or ffa" >&2; exit 2 ;;
  esac
  echo "$me: unify-dist $what"
  begin_run "$case_dir/$name" lora_unify; run_unify "$case_dir/$name" "$dtype" "$rule"; end_run "$case_dir/$name"
done
if [ "$flower" = 1 ]; then
  echo "$me: Flower FedAvg of the adapter, deployment engine (server on host $server)"
  begin_run "$case_dir/flower" flower; run_flower "$case_dir/flower"; end_run "$case_dir/flower"
fi

if [ -n "$summary" ]; then
  PYTHONPATH="$flwr_dir" "$python" benchmarks/links_summary.py --runs "$out" --out "$summary" --lora-plot "${summary%.json}.png" \
    --note "lora_rate=$rate" --note "host=$(getconf _NPROCESSORS_ONLN) cores, all namespaces on one machine; 1 torch thread per process"
fi
