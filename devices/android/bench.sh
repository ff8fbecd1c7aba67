#!/usr/bin/env bash
# Stock llama.cpp on an Android phone with mtpkit's exported pair, results in the bench JSON schema.
#
#   devices/android/bench.sh PAIR_DIR OUT_DIR [SUITE...]      (default suites: humaneval mtbench everyday)
#
# 1. builds llama-server for arm64 with the Android NDK from the source mtpkit's llama.cpp backend runs
#    (devices/llamacpp/build.sh --android "$ANDROID_NDK"), unless LLAMACPP_BIN names a directory that has one;
# 2. pushes it and PAIR_DIR/target.gguf + drafter.gguf to the phone with adb;
# 3. starts two servers on the phone: plain, and --spec-type draft-mtp with our drafter (same flags, see
#    docs/gguf.md), and forwards their ports to this machine;
# 4. runs bench/stock_llamacpp.py here against them: OUT_DIR/bench_SUITE.json / .md, OUT_DIR/machine.json.
#
# Environment: ANDROID_NDK (the NDK's root, for step 1), LLAMACPP_BIN, ADB (default adb), ANDROID_SERIAL (which
# phone, adb's own variable), DEVICE_DIR (default /data/local/tmp/mtpkit), THREADS (default 4: the big cores),
# LIMIT (8), REPEATS (2), MAX_NEW_TOKENS (128), K (5), TEMPERATURE (0), PORT (8080: PORT and PORT+1 are used),
# PYTHON (default python3, with mtpkit installed; torch is not needed).
set -euo pipefail
die() { echo "error: $*" >&2; exit 2; }
[ $# -ge 2 ] || die "usage: $0 PAIR_DIR OUT_DIR [SUITE...]"
pair=$1; out=$2; shift 2
suites=("$@"); [ ${#suites[@]} -gt 0 ] || suites=(humaneval mtbench everyday)
here=$(cd "$(dirname "$0")" && pwd); repo=$(cd "$here/../.." && pwd)
ADB=${ADB:-adb}; DEVICE_DIR=${DEVICE_DIR:-/data/local/tmp/mtpkit}; PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-4}; LIMIT=${LIMIT:-8}; REPEATS=${REPEATS:-2}; MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}; K=${K:-5}
TEMPERATURE=${TEMPERATURE:-0}; PORT=${PORT:-8080}
# = mtpkit.bench.llama_server.EXACT_FLAGS: with them draft-mtp's greedy output equals plain decoding
FLAGS="-fa on -ctk q8_0 -ctv q8_0 --swa-full -nr"

for f in target.gguf drafter.gguf; do [ -f "$pair/$f" ] || die "$pair/$f not found (mtpkit export --format gguf --out $pair)"; done
command -v "$ADB" >/dev/null || die "$ADB not found (install Android's platform-tools, or set ADB)"
[ "$("$ADB" get-state 2>/dev/null)" = device ] || die "no phone ready for adb (adb devices; enable USB debugging)"
mkdir -p "$out" || die "cannot create $out"

if [ -n "${LLAMACPP_BIN:-}" ]; then bin=$LLAMACPP_BIN
else
  [ -n "${ANDROID_NDK:-}" ] || die "set ANDROID_NDK to the NDK's root (or LLAMACPP_BIN to a build for the phone)"
  bin=$("$repo/devices/llamacpp/build.sh" --android "$ANDROID_NDK" | tail -1)
fi
[ -x "$bin/llama-server" ] || die "$bin/llama-server not found"

echo "pushing llama-server and the pair to $DEVICE_DIR" >&2
"$ADB" shell mkdir -p "$DEVICE_DIR"
"$ADB" push --sync "$bin/llama-server" "$pair/target.gguf" "$pair/drafter.gguf" "$DEVICE_DIR/" >/dev/null

pids=()
cleanup() {  # stop the servers (and wait until they are gone: at most 10 s each), drop the forwards
  for p in "${pids[@]}"; do "$ADB" shell kill "$p" >/dev/null 2>&1 || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 100); do
      [ -n "$("$ADB" shell "kill -0 $p 2>/dev/null && echo alive" 2>/dev/null | tr -d '\r')" ] || break
      sleep 0.1
    done
  done
  "$ADB" forward --remove "tcp:$PORT" >/dev/null 2>&1 || true
  "$ADB" forward --remove "tcp:$((PORT + 1))" >/dev/null 2>&1 || true
}
trap cleanup EXIT
start() {  # start PORT LOG [ARGS...]: a server on the phone, in the background; prints its pid
  local port=$1 log=$2; shift 2
  "$ADB" shell "cd $DEVICE_DIR && chmod +x llama-server && (nohup ./llama-server -m target.gguf -c 4096 -np 1 \
    -t $THREADS -tb $THREADS --no-webui $FLAGS $* --host 127.0.0.1 --port $port > $log 2>&1 & echo \$!)" | tr -d '\r'
}
pids+=("$(start "$PORT" plain.log)")
pids+=("$(start $((PORT + 1)) mtp.log -md drafter.gguf --spec-type draft-mtp --spec-draft-n-max "$K")")
"$ADB" forward "tcp:$PORT" "tcp:$PORT" >/dev/null
"$ADB" forward "tcp:$((PORT + 1))" "tcp:$((PORT + 1))" >/dev/null

prop() { "$ADB" shell getprop "$1" 2>/dev/null | tr -d '\r'; }
model=$(prop ro.product.model); soc=$(prop ro.soc.model); rel=$(prop ro.build.version.release)
"$PYTHON" - "$out/machine.json" "$model" "$soc" "$rel" "$THREADS" <<'PY'
import json, sys
path, model, soc, rel, threads = sys.argv[1:]
json.dump({"cpu": f"{soc or 'unknown SoC'} ({model or 'unknown phone'})", "gpu": None,
           "platform": f"Android {rel or '?'}", "threads": int(threads),
           "versions": {"llama.cpp": "0c1e570 (llama-cpp-python 0.3.36)"}}, open(path, "w"), indent=2)
PY

for s in "${suites[@]}"; do
  echo "bench $s on $model" >&2
  "$PYTHON" "$repo/bench/stock_llamacpp.py" "$pair" --plain-url "http://127.0.0.1:$PORT" \
    --mtp-url "http://127.0.0.1:$((PORT + 1))" --suite "$s" --limit "$LIMIT" --repeats "$REPEATS" \
    --max-new-tokens "$MAX_NEW_TOKENS" --temperature "$TEMPERATURE" -k "$K" --threads "$THREADS" \
    --machine-json "$out/machine.json" --json "$out/bench_$s.json" --markdown "$out/bench_$s.md" >/dev/null
  echo "wrote $out/bench_$s.json" >&2
done
