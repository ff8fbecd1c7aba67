#!/usr/bin/env bash
# Issue 17's GPU sessions (draft trees at T > 0, pipelined rounds) on the lent H200 through the device tool, one `run`
# per step, back to back (a warm machine is given back after ~30 s idle, /tmp with it):
#   setup [notest|bgtest]  carry [.whl, .stage/suites]: the gguf wheel, the suites as jsonl; then the CUDA tests (graphs,
#                trees and pipelined rounds against the eager path, the chi-square of the sampled loop), in the
#                foreground, not at all (notest) or in the background (bgtest: -> /tmp/tree/tests.log, while parts upload)
#   part N LAST  carry [.stage/g3.partNN]: the target GGUF (PyPI's Q4_K_M file) in LAST parts; part LAST checks it
#                (split -b 32M -d -a 2 --numeric-suffixes=1 FILE .stage/g3.part: the tree and a part fit 64 MiB)
#   series "bench NAME SUITE LIMIT T [OPTIONS]; CMD; ..."  in the background, one after the other -> /tmp/tree/NAME.json
#   wait SECONDS [grab]  until the running series is done (or SECONDS pass); the log's tail; grab: results (JSON,
#                Markdown, logs) -> $OUT/tree.tgz (one file: $OUT takes 8)
# Every bench: `mtpkit bench --device cuda` (compile all, the shipped v3 drafter, gate on, k <= 5, 128 tokens,
# 2 repeats, no baselines) plus OPTIONS (--branches W: trees beside one chain; --pipeline both: rounds one at a time
# beside rounds queued ahead of the host).
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
    tests="python3 -m pytest -q -p no:cacheprovider tests/test_torch_cuda.py tests/test_backend_contract.py -k cuda"
    case "${2:-}" in
      notest) ;;
      bgtest) setsid nohup bash -c "$tests > $R/tests.log 2>&1" > /dev/null 2>&1 < /dev/null & ;;
      *) $tests -x 2>&1 | tail -15 ;;
    esac ;;
  part)
    n=$(printf %02d "$2") && cp ".stage/g3.part$n" /tmp/stage/ && ls /tmp/stage
    if [ "$2" = "${3:-}" ]; then cat /tmp/stage/g3.part* > /tmp/g3.gguf && echo "$SHA  /tmp/g3.gguf" | sha256sum -c; fi ;;
  series)  # "bench NAME SUITE LIMIT T [OPTIONS]; bench ..." run in the background, one after the other, from a copy
    # of the tree (each later `run` copies the working tree here again: a bench importing mtpkit meanwhile failed)
    rm -f "$R/done"; mkdir -p "$R"; rm -rf /tmp/snap && cp -a . /tmp/snap
    setsid nohup bash -c "cd /tmp/snap && export PYTHONPATH=/tmp/site:/tmp/snap && source devices/gpu/tree_session.sh fns; $2; touch $R/done" > "$R/series.log" 2>&1 < /dev/null &
    sleep 3; cat "$R/series.log" ;;
  fns) ;;  # sourced by a series: the functions only
  wait)
    for _ in $(seq "$2"); do [ -e "$R/done" ] && break; sleep 1; done
    tail -n 40 "$R/bench.log" 2>/dev/null; cat "$R/errors" 2>/dev/null || true; tail -n 5 "$R/tests.log" 2>/dev/null || true
    if [ -e "$R/done" ] || [ "${3:-}" = grab ]; then
      (cd "$R" && tar czf "$OUT/tree.tgz" $(ls *.json *.md *.log 2>/dev/null)) && ls -la "$OUT"; fi ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
