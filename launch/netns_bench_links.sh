#!/usr/bin/env bash
# Usage: sudo launch/netns_bench_links.sh          (what `make bench-links` runs; issue 14 part 2)
#   unify-dist against DistributedDataParallel and Flower FedAvg over shaped links: three network
#   namespaces, each host behind its own tc-tbf link of RATE each way (launch/netns_links_lib.sh). The
#   owners run on hosts 0 and 1; Flower's server (SuperLink, or the legacy start_server) on host 2.
#   1. Round overhead (round wall time minus the slowest owner's local training) and the bytes each host
#      sent per round, for every model in MODELS and rate in RATES: unify-dist avg, unify-dist avg with
#      unify.compress = bf16, DDP (benchmarks/ddp_baseline.py), Flower's deployment engine (SuperLink,
#      SuperNodes, `flwr run`; benchmarks/flower_app) and Flower's legacy API. Small shares (training
#      time is subtracted anyway) and few rounds.
#   2. Time to TARGET test accuracy on the V split (configs/paper_v.toml) over a TTA_RATE link: unify-dist,
#      Flower (deployment engine) and DDP, each stopped at the target.
#   3. The LoRA case (issue 18): launch/netns_bench_lora_links.sh, a LLaMA-7B-shaped adapter unified by 4
#      owners against the 100 Mbit link's floor, and Flower's adapter-only FedAvg beside it (its own
#      5 hosts; its rows go into the same OUT and SUMMARY).
#   Then benchmarks/links_summary.py writes SUMMARY (JSON, with the issues' ratios) and PLOT (accuracy
#   against wall time of the three systems).
#   Needs root, iproute2, tc, and flwr importable from FLWR_DIR (the Makefile installs it there).
#   Env: QUICK=1 (paper_cnn at 100mbit, 2 rounds, no time to accuracy: a few minutes), MODELS
#   ("paper_cnn resnet18"), RATES ("100mbit 20mbit"), TTA (1: run part 2), TTA_RATE (100mbit), TARGET
#   (0.88), LORA (1: run part 3; QUICK=1 gives it 2 rounds), FLOWER (1; 0: leave Flower out of every part, so
#   flwr need not be installed: unify-dist against DDP only), OUT (runs/bench_links), SUMMARY (results/bench_links.json), PLOT (results/bench_links_tta.png),
#   FLWR_DIR (.flwr), PYTHON (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/netns_lib.sh
source launch/netns_links_lib.sh
me=netns_bench_links.sh
netns_require "$me"
root=$(pwd)
python=$(netns_python)
flwr_dir=$(realpath -m "${FLWR_DIR:-.flwr}")
config=$root/configs/paper_v.toml
out=$(realpath -m "${OUT:-runs/bench_links}")
summary=${SUMMARY:-results/bench_links.json} plot=${PLOT:-results/bench_links_tta.png}
target=${TARGET:-0.88} tta_rate=${TTA_RATE:-100mbit}
if [ "${QUICK:-0}" = 1 ]; then
  models=${MODELS:-paper_cnn} rates=${RATES:-100mbit} tta=${TTA:-0} rounds_cap=2 lora=${LORA:-1} lora_rounds=2
else
  models=${MODELS:-paper_cnn resnet18} rates=${RATES:-100mbit 20mbit} tta=${TTA:-1} rounds_cap=0 lora=${LORA:-1} lora_rounds=3
fi
flower=${FLOWER:-1}
if [ "$flower" = 1 ] && ! PYTHONPATH="$flwr_dir" "$python" -c "import flwr" 2>/dev/null; then
  echo "$me: flwr is not importable from $flwr_dir; run it through 'make bench-links', which installs it there" >&2
  echo "$me: (or FLOWER=0 to compare unify-dist with DDP only)" >&2
  exit 2
fi
# Flower's processes find flwr (and its CLI) in the side folder, and the app's package in benchmarks/flower_app.
flower_env=(env "PYTHONPATH=$flwr_dir:$root/benchmarks/flower_app" "PATH=$flwr_dir/bin:$PATH")
port=29600

links_up "$me" 100mbit
rm -rf -- "$out" && mkdir -p "$out"

shares() {  # MODEL ROUNDS: the --set values of an overhead run (training is subtracted, so shares are small)
  local n=256 test=512
  [ "$1" = resnet18 ] && n=64 test=128  # resnet18 on one CPU thread: about 0.1 s an image
  echo "model.name=$1 data.train_per_owner=$n data.test_size=$test train.max_rounds=$2 train.threads=1"
}

begin_run() {  # DIR KIND: a fresh run directory, the launch time, the byte counters sampling
  rm -rf -- "$1" && mkdir -p "$1"
  echo "$2" >"$1/kind"
  echo "$EPOCHREALTIME" >"$1/launch"
  for i in 0 1 2; do links_sample "$i" "$1/tx_h$i.tsv"; done
  port=$((port + 1))
}

end_run() {  # DIR: stop whatever is left (samplers included), note the machine's load
  if [ -n "$watcher" ]; then  # its own links_stop must be over before the next run's processes start
    if [ ! -e "$1/stopped" ]; then pkill -P "$watcher" 2>/dev/null || true; fi  # target never reached
    wait "$watcher" 2>/dev/null || true
    watcher=
  fi
  links_stop
  uptime >"$1/load"
  echo "$me:   done in $(awk -v now="${EPOCHREALTIME/,/.}" '{printf "%.0f", now - $1}' "$1/launch") s;$(cat "$1/load")"
}

watcher=
watch_target() {  # METRICS FIELD: in the background, stop the namespaces' processes once FIELD >= target
  ( "$python" benchmarks/time_to_accuracy.py wait "$1" "$2" "$target" && touch "$(dirname "$1")/stopped" && links_stop ) &
  watcher=$!  # end_run waits for it: a links_stop still running would kill the next run's processes
}

wait_for() {  # DIR SECONDS: until DIR/done (the server finished) or DIR/stopped (at the target), or SECONDS pass
  local end=$((SECONDS + $2))
  while [ ! -e "$1/done" ] && [ ! -e "$1/stopped" ] && [ $SECONDS -lt $end ]; do sleep 0.5; done
  [ -e "$1/done" ] || [ -e "$1/stopped" ]
}

run_unify() {  # DIR TARGET(0: none) SETS...: unify-dist avg, one owner on each of hosts 0 and 1
  local dir=$1 tgt=$2 a b
  shift 2
  local args=(-m benchmarks.links_clock "$dir" train --config "$config" --set "output.dir=$dir" --set output.resume=false
    --set output.local_metrics=false --set output.progress=false)  # DDP and Flower evaluate only the synchronised model
  for s in "$@"; do args+=(--set "$s"); done
  [ "$tgt" = 0 ] || watch_target "$dir/metrics.jsonl" unified_test_acc
  links_torchrun 0 0 "$port" "links-$port" "${args[@]}" >"$dir/output.log" 2>&1 &
  a=$!
  links_torchrun 1 1 "$port" "links-$port" "${args[@]}" >"$dir/output_h1.log" 2>&1 &
  b=$!
  wait "$a" || true  # non-zero when stopped at the target; the summary reads the records
  wait "$b" || true
}

run_ddp() {  # DIR TARGET SETS...
  local dir=$1 tgt=$2 a b
  shift 2
  local args=(-m benchmarks.ddp_baseline --config "$config" --out "$dir" --target "$tgt" --set output.progress=false)
  for s in "$@"; do args+=(--set "$s"); done
  links_torchrun 0 0 "$port" "links-$port" "${args[@]}" >"$dir/output.log" 2>&1 &
  a=$!
  links_torchrun 1 1 "$port" "links-$port" "${args[@]}" >"$dir/output_h1.log" 2>&1 &
  b=$!
  wait "$a" || true
  wait "$b" || true
}

run_flower() {  # DIR ROUNDS TARGET SETS...: the deployment engine; SuperLink on host 2, a SuperNode on hosts 0, 1
  local dir=$1 rounds=$2 tgt=$3 sets home=$1/flwr_home link=${LINKS_IP[2]}:$port
  shift 3
  sets=$(IFS=';'; echo "$*")
  mkdir -p "$home"
  printf '[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "%s"\ninsecure = true\n' "$link" >"$home/config.toml"
  # No dependency installation at run time: the hosts are offline, and the app needs nothing beyond flwr and torch.
  links_exec 2 "${flower_env[@]}" FLWR_HOME="$home" flower-superlink --insecure --disable-runtime-dependency-installation \
    --host "${LINKS_IP[2]}" --port "$port" >"$dir/superlink.log" 2>&1 &
  for i in 0 1; do
    links_exec "$i" "${flower_env[@]}" FLWR_HOME="$home/node$i" flower-supernode --insecure --superlink "$link" \
      --port 9094 --node-config "partition-id=$i num-partitions=2" >"$dir/supernode$i.log" 2>&1 &
  done
  [ "$tgt" = 0 ] || watch_target "$dir/rounds.jsonl" unified_test_acc
  for _ in $(seq 60); do  # until the SuperLink answers
    links_exec 2 "${flower_env[@]}" FLWR_HOME="$home" flwr run "$root/benchmarks/flower_app" bench --run-config \
      "config='$config' sets='$sets' rounds=$rounds target=$tgt out='$dir'" >>"$dir/flwr_run.log" 2>&1 && break
    sleep 1
  done
  wait_for "$dir" 1800 || echo "$me:   Flower run did not finish: see $dir/*.log" >&2
}

run_legacy() {  # DIR ROUNDS SETS...: start_server on host 2, start_client on hosts 0, 1
  local dir=$1 rounds=$2 sets addr=${LINKS_IP[2]}:$port server
  shift 2
  sets=$(IFS=';'; echo "$*")
  local common=(--address "$addr" --config "$config" --sets "$sets")
  links_exec 2 "${flower_env[@]}" "$python" -m ud_flower.legacy server "${common[@]}" --rounds "$rounds" --out "$dir" \
    >"$dir/server.log" 2>&1 &
  server=$!
  sleep 2  # the clients retry, but the first try should find the server
  for i in 0 1; do
    links_exec "$i" "${flower_env[@]}" "$python" -m ud_flower.legacy client "${common[@]}" --partition "$i" \
      >"$dir/client$i.log" 2>&1 &
  done
  wait "$server" || echo "$me:   legacy Flower server failed: see $dir/server.log" >&2
}

echo "$me: 3 hosts behind tc-tbf links (owners on hosts 0, 1; Flower's server on host 2); models: $models; rates: $rates"
for rate in $rates; do
  links_rate "$rate"
  for model in $models; do
    rounds=3 flower_rounds=3
    [ "$model" = resnet18 ] && [ "$rate" != 100mbit ] && rounds=2 flower_rounds=2  # a Flower round moves 6 x 45 MB through one link
    [ "$rounds_cap" = 0 ] || rounds=$rounds_cap flower_rounds=$rounds_cap
    base=$out/${model}_$rate
    # unify-dist's last round has no next round to end its overhead: it runs one more round than it reports.
    read -r -a unify_sets <<<"$(shares "$model" "$((rounds + 1))")"
    read -r -a sets <<<"$(shares "$model" "$rounds")"
    read -r -a flower_sets <<<"$(shares "$model" "$flower_rounds")"
    echo "$me: $model at $rate: [1/5] unify-dist avg"
    begin_run "$base/unify" unify; run_unify "$base/unify" 0 "${unify_sets[@]}"; end_run "$base/unify"
    echo "$me: $model at $rate: [2/5] unify-dist avg, bf16"
    begin_run "$base/unify_bf16" unify; run_unify "$base/unify_bf16" 0 "${unify_sets[@]}" unify.compress=bf16; end_run "$base/unify_bf16"
    echo "$me: $model at $rate: [3/5] DDP"
    begin_run "$base/ddp" ddp; run_ddp "$base/ddp" 0 "${sets[@]}"; end_run "$base/ddp"
    [ "$flower" = 1 ] || continue
    echo "$me: $model at $rate: [4/5] Flower, deployment engine"
    begin_run "$base/flower" flower; run_flower "$base/flower" "$flower_rounds" 0 "${flower_sets[@]}"; end_run "$base/flower"
    echo "$me: $model at $rate: [5/5] Flower, legacy API"
    begin_run "$base/flower_legacy" flower; run_legacy "$base/flower_legacy" "$flower_rounds" "${flower_sets[@]}"; end_run "$base/flower_legacy"
  done
done

if [ "$tta" = 1 ]; then
  links_rate "$tta_rate"
  tta_sets=(train.threads=1 train.max_rounds=10)  # the whole V split; each stops at the target
  echo "$me: time to $target test accuracy, V split, $tta_rate: [1/3] unify-dist avg"
  begin_run "$out/tta/unify" unify; run_unify "$out/tta/unify" "$target" "${tta_sets[@]}"; end_run "$out/tta/unify"
  if [ "$flower" = 1 ]; then
    echo "$me: time to $target: [2/3] Flower, deployment engine"
    begin_run "$out/tta/flower" flower; run_flower "$out/tta/flower" 10 "$target" "${tta_sets[@]}"; end_run "$out/tta/flower"
  fi
  echo "$me: time to $target: [3/3] DDP"
  begin_run "$out/tta/ddp" ddp; run_ddp "$out/tta/ddp" "$target" "${tta_sets[@]}"; end_run "$out/tta/ddp"
fi

if [ "$lora" = 1 ]; then  # its own 5 hosts (namespaces udl_links_*), its rows in this run's directory and summary
  echo "$me: LoRA case: a LLaMA-7B-shaped adapter, 4 owners, unify-dist against the link's floor and Flower (adapter only)"
  OUT="$out" SUMMARY= FLOWER="$flower" ROUNDS="$lora_rounds" PYTHON="$python" FLWR_DIR="$flwr_dir" launch/netns_bench_lora_links.sh
fi

# matplotlib (for the plot) lives in the same side folder as flwr.
PYTHONPATH="$flwr_dir" "$python" benchmarks/links_summary.py --runs "$out" --target "$target" --out "$summary" --plot "$plot" \
  --lora-plot "${plot%_tta.png}_lora.png" --note "lora_rate=100mbit" \
  --note "config=configs/paper_v.toml" --note "tta_rate=$tta_rate" \
  --note "host=$(getconf _NPROCESSORS_ONLN) cores, all namespaces on one machine; 1 torch thread per process"
