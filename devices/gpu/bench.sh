#!/usr/bin/env bash
# mtpkit bench on an NVIDIA GPU: a measured device profile, then HumanEval and MT-Bench benches (ours vs
# transformers generate and prompt lookup, interleaved), each with the predictor's check against it.
#
#   pip install -e ".[dev]"                     # torch with CUDA, transformers
#   bash devices/gpu/bench.sh OUT_DIR [SUITE...] # default suites: humaneval mtbench
#   mtpkit report OUT_DIR/bench_humaneval.json --plot OUT_DIR/bench_humaneval.png   # plots (needs matplotlib)
#
# Environment: MTPKIT (command, default `mtpkit`), LIMIT (prompts, 10), REPEATS (2), TOKENS (128), K (5),
# TEMPS (temperatures, "0"; e.g. "0 1"), BENCH_ARGS (more `mtpkit bench` options, e.g. "--gate both").
# Writes profile.json, bench_<suite>.{json,md} and predict_<suite>.json (T = 0), bench_<suite>_t<T>.* (T > 0).
set -uo pipefail
out=${1:?usage: devices/gpu/bench.sh OUT_DIR [SUITE...]}; shift
suites=${*:-humaneval mtbench}
mt=${MTPKIT:-mtpkit}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>/dev/null || true
$mt profile-device --device cuda --kind datacenter-gpu --name "$(hostname)-gpu" --out "$out/profile.json" >/dev/null \
  || echo "profile-device failed" >&2
rc=0
for suite in $suites; do
  for t in ${TEMPS:-0}; do
    name=$suite; [ "$t" = 0 ] || name=${suite}_t$t
    $mt bench --device cuda --suite "$suite" --limit "${LIMIT:-10}" --repeats "${REPEATS:-2}" \
      --max-new-tokens "${TOKENS:-128}" -k "${K:-5}" --temperature "$t" --quiet ${BENCH_ARGS:-} \
      --json "$out/bench_$name.json" --markdown "$out/bench_$name.md" || rc=1
    cat "$out/bench_$name.md" 2>/dev/null
    [ -f "$out/profile.json" ] && [ "$t" = 0 ] && $mt predict "$out/bench_$name.json" --profile "$out/profile.json" \
      --json > "$out/predict_$name.json" && tail -n 12 "$out/predict_$name.json"
  done
done
exit $rc
