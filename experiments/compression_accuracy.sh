#!/usr/bin/env bash
# Usage: experiments/compression_accuracy.sh   (issue 14: the accuracy cost of unify.compress)
#   Six 30-round runs at once, 2 owners each: configs/paper_v.toml (V) and configs/h_sgd.toml (H), each with
#   unify.compress = none, bf16, int8. Meant for a machine with a GPU and many cores (DEVICE=cuda: owners train
#   on the GPU and unify over gloo); on a CPU-only machine set DEVICE=cpu and expect hours.
#   Env: DEVICE (cuda), OUT (runs/compression_accuracy), PYTHON (python). Prints the last-5-round means.
set -euo pipefail
cd "$(dirname "$0")/.."
device=${DEVICE:-cuda} out=${OUT:-runs/compression_accuracy} python=${PYTHON:-python}
mkdir -p "$out"
run() {  # NAME CONFIG COMPRESS
  "$python" -m torch.distributed.run --standalone --nproc_per_node=2 -m unify_dist train --config "$2" \
    --set dist.backend=gloo --set dist.device="$device" --set unify.compress="$3" --set train.threads=1 \
    --set output.progress=false --set output.resume=false --set output.dir="$out/$1" >"$out/$1.log" 2>&1
}
for c in none bf16 int8; do
  run "v_$c" configs/paper_v.toml "$c" &
  run "h_$c" configs/h_sgd.toml "$c" &
done
wait
"$python" - "$out" <<'PY'
import json, statistics, sys
for env in ("v", "h"):
    means = {}
    for c in ("none", "bf16", "int8"):
        rows = [json.loads(x) for x in open(f"{sys.argv[1]}/{env}_{c}/metrics.jsonl")]
        means[c] = statistics.mean(r["unified_test_acc"] for r in rows[-5:]) * 100
        print(f"{env} {c}: last 5 rounds {means[c]:.2f}% ({means[c] - means['none']:+.2f} points vs none)")
PY
