#!/usr/bin/env bash
# mtpkit bench on a Mac (Apple Silicon): a measured device profile, then HumanEval and MT-Bench benches
# (ours vs transformers generate / prompt lookup vs llama.cpp on Metal / prompt lookup), the predictor's
# check, Markdown tables and PNG plots. Run from the repository root:
#
#   bash devices/macos/bench.sh OUT_DIR [SUITE...]        # default suites: humaneval mtbench
#
# First run: creates .venv-bench and installs mtpkit with the dev and bench extras (llama-cpp-python builds
# with Metal, a few minutes). Environment: BACKEND (torch, default, or mlx: then the target and drafter are
# first exported to OUT_DIR/mlx and the baselines are mlx-lm's own plain and speculative loops; or coreml: exported
# to OUT_DIR/coreml for COMPUTE gpu (default) or ane, run through MLModel.predict; macOS 15+), DEVICE (torch
# device for our loop, default cpu; mps is not tested yet), QUANT (MLX export bits, 4 or 8; default bf16; Core ML:
# int8 or int4),
# LIMIT (8), REPEATS (2), TOKENS (128), K (5), THREADS (default: performance cores), BENCH_ARGS (more options).
set -uo pipefail
out=${1:?usage: devices/macos/bench.sh OUT_DIR [SUITE...]}; shift
suites=${*:-humaneval mtbench}
[ "$(uname -s)" = Darwin ] || { echo "this runner is for macOS; on Linux use mtpkit bench directly" >&2; exit 2; }
if [ ! -x .venv-bench/bin/mtpkit ]; then
  python3 -m venv .venv-bench && .venv-bench/bin/pip install -q -e ".[dev,bench]" || exit 1
fi
mt=.venv-bench/bin/mtpkit
threads=${THREADS:-$(sysctl -n hw.perflevel0.physicalcpu 2>/dev/null || sysctl -n hw.physicalcpu)}
mkdir -p "$out"
{ sysctl -n machdep.cpu.brand_string; sysctl -n hw.memsize; sw_vers; } > "$out/machine.txt" 2>/dev/null
$mt profile-device --device cpu --threads "$threads" --kind laptop --name "$(hostname -s)-cpu" \
  --out "$out/profile.json" >/dev/null || echo "profile-device failed" >&2
target_args=(--device "${DEVICE:-cpu}")
thread_args=(--threads "$threads")
if [ "${BACKEND:-torch}" = mlx ]; then
  $mt export --format mlx --out "$out/mlx" ${QUANT:+--quant "$QUANT"} || exit 1
  target_args=(--target "$out/mlx/target")
elif [ "${BACKEND:-torch}" = coreml ]; then
  $mt export --format coreml --out "$out/coreml" --compute "${COMPUTE:-gpu}" ${QUANT:+--quant "$QUANT"} || exit 1
  target_args=(--target "$out/coreml" --device "${COMPUTE:-gpu}")
  thread_args=()  # Core ML schedules its own compute units
fi
rc=0
for suite in $suites; do
  $mt bench --backend "${BACKEND:-torch}" "${target_args[@]}" "${thread_args[@]}" --suite "$suite" \
    --limit "${LIMIT:-8}" --repeats "${REPEATS:-2}" --max-new-tokens "${TOKENS:-128}" -k "${K:-5}" ${BENCH_ARGS:-} \
    --json "$out/bench_$suite.json" --markdown "$out/bench_$suite.md" --plot "$out/bench_$suite.png" || rc=1
  [ -f "$out/profile.json" ] && [ -f "$out/bench_$suite.json" ] && \
    $mt predict "$out/bench_$suite.json" --profile "$out/profile.json"
done
echo "results in $out (compare only with results from this same machine)"
exit $rc
