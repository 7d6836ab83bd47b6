#!/usr/bin/env bash
# Usage: experiments/overlap_accuracy.sh [ENV ...]   (issue 19: what unify.overlap's one round of delay costs)
#   For each ENV (v: configs/paper_v.toml, h: configs/paper_h.toml, hsgd: configs/h_sgd.toml; default: v h),
#   two 30-round runs with 2 owners in epoch rounds (accuracy does not depend on timing; SET can give a step
#   budget, train.local_steps=N): blocking, then unify.overlap = true.
#   One run at a time: each takes both cores of a 2-core CPU for 10-15 min. Prints each run's mean unified
#   test accuracy over the last 5 rounds and the gap, and draws both curves when matplotlib is importable.
#   Env: OUT (runs/overlap_accuracy), PYTHON (.venv/bin/python), SET (more --set key=value words, both runs),
#   OVERLAP_SET (--set words for the overlapped run only, e.g. the damped setting for label skew:
#   "unify.overlap_start=unified unify.outer=sgd unify.outer_lr=0.5 unify.outer_momentum=0"),
#   SEEDS (e.g. "0 1 2": one pair per seed, train.seed=N, in OUT/<env>_seedN_{blocking,overlap}, then the mean
#   gap over the seeds with its 95% interval from experiments.overlap_gap; one seed's gap says little on H),
#   SUMMARY_ONLY=1 (run nothing: summarise the runs already in OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/overlap_accuracy} python=${PYTHON:-.venv/bin/python}
export UNIFY_DIST_DATA_ROOT=${UNIFY_DIST_DATA_ROOT:-$PWD/.data} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$out"
envs=("$@")
[ ${#envs[@]} -gt 0 ] || envs=(v h)
extra=()
for kv in ${SET:-}; do extra+=(--set "$kv"); done
overlap_extra=()
for kv in ${OVERLAP_SET:-}; do overlap_extra+=(--set "$kv"); done
tags=("")  # one pair per environment, the config's seed; with SEEDS one per seed
if [ -n "${SEEDS:-}" ]; then
  tags=()
  for seed in $SEEDS; do
    [[ $seed =~ ^[0-9]+$ ]] || { echo "overlap_accuracy: SEEDS holds '$seed'; give whole numbers, e.g. SEEDS=\"0 1 2\"" >&2; exit 2; }
    tags+=("_seed$seed")
  done
fi
for env in "${envs[@]}"; do
  case $env in v) config=configs/paper_v.toml ;; h) config=configs/paper_h.toml ;; hsgd) config=configs/h_sgd.toml ;;
    *) echo "overlap_accuracy: unknown environment '$env'; give v, h or hsgd" >&2; exit 2 ;; esac
  [ "${SUMMARY_ONLY:-0}" = 1 ] && continue
  for tag in "${tags[@]}"; do
    seed=()
    [ -n "$tag" ] && seed=(--set "train.seed=${tag#_seed}")
    for mode in blocking overlap; do
      overlap=false only=()
      [ "$mode" = overlap ] && overlap=true only=("${overlap_extra[@]}")
      echo "overlap_accuracy: $(date +%T) $env$tag $mode" >&2
      "$python" -m torch.distributed.run --standalone --nproc_per_node=2 -m unify_dist train --config "$config" \
        --set unify.overlap=$overlap --set output.progress=false --set output.resume=false \
        --set output.dir="$out/$env${tag}_$mode" "${seed[@]}" "${extra[@]}" "${only[@]}" >"$out/$env${tag}_$mode.log" 2>&1
    done
  done
done
if [ -n "${SEEDS:-}" ]; then  # paired over the seeds
  for env in "${envs[@]}"; do
    pairs=()
    for tag in "${tags[@]}"; do pairs+=("$out/$env${tag}_blocking/metrics.jsonl:$out/$env${tag}_overlap/metrics.jsonl"); done
    echo "$env:"
    "$python" -m experiments.overlap_gap "${pairs[@]}"
  done
  exit
fi
"$python" - "$out" "${envs[@]}" <<'PY'
import json, os, statistics, sys
out = sys.argv[1]
for env in sys.argv[2:]:
    curves = {}
    for mode in ("blocking", "overlap"):
        path = f"{out}/{env}_{mode}/metrics.jsonl"
        if not os.path.exists(path):
            print(f"overlap_accuracy: no {path}; run without SUMMARY_ONLY, or point OUT at the runs", file=sys.stderr)
            sys.exit(2)
        rows = [json.loads(x) for x in open(path)]
        curves[mode] = [r["unified_test_acc"] * 100 for r in rows]
    last5 = {m: statistics.mean(c[-5:]) for m, c in curves.items()}
    print(f"{env}: last 5 rounds, blocking {last5['blocking']:.2f}%, overlap {last5['overlap']:.2f}% "
          f"({last5['overlap'] - last5['blocking']:+.2f} points)")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        continue
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, c in curves.items():
        ax.plot(range(1, len(c) + 1), c, marker=".", label=f"{mode} (last 5: {last5[mode]:.2f}%)")
    budget = os.environ.get("SET") or "epoch rounds"
    ax.set(xlabel="round", ylabel="unified test accuracy (%)", title=f"{env}: 2 owners, {budget}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{out}/overlap_accuracy_{env}.png", dpi=100)
PY
