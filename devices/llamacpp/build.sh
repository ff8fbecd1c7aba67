#!/usr/bin/env bash
# Build llama.cpp's programs (llama-server, llama-cli, llama-completion, llama-bench, llama-speculative-simple)
# from the exact source llama-cpp-python 0.3.36 vendors (llama.cpp commit 0c1e570), i.e. the library mtpkit's
# llama.cpp backend runs. The build is cached; the last line printed is the directory holding the programs.
#
#   devices/llamacpp/build.sh                 # this machine's CPU (GGML_NATIVE)
#   devices/llamacpp/build.sh --cuda [ARCH]   # NVIDIA (ARCH e.g. 90 for H100/H200, 89 for RTX 40xx; default native)
#   devices/llamacpp/build.sh --metal         # macOS, Apple Silicon (Metal is on by default there)
#   devices/llamacpp/build.sh --android NDK   # cross-compile for arm64 phones with the Android NDK at NDK
#
# Cache: $MTPKIT_CACHE/llamacpp/0.3.36-FLAVOR (else $XDG_CACHE_HOME/mtpkit, else ~/.cache/mtpkit), with the sdist
# (sha256-checked), the build tree and bin/. bin/ appears only once every program is built (a build that fails or is
# interrupted leaves no bin/ and is resumed by the next call). Environment: JOBS (default: all cores), SDIST (a
# local copy of llama_cpp_python-0.3.36.tar.gz, for machines without PyPI), EXTRA_CMAKE (more -D options),
# ANDROID_MARCH (default armv8.2-a+dotprod+fp16).
set -euo pipefail

VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
PROGRAMS=(llama-server llama-cli llama-completion llama-bench llama-speculative-simple)

die() { echo "error: $*" >&2; exit 2; }

flavor=cpu; cuda_arch=native; ndk=
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) flavor=cuda; if [ $# -gt 1 ] && [[ "$2" =~ ^[0-9]+$ ]]; then cuda_arch=$2; shift; fi ;;
    --metal) flavor=metal ;;
    --android) flavor=android; [ $# -gt 1 ] || die "--android needs the NDK's directory"; ndk=$2; shift ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see $0 --help)" ;;
  esac
  shift
done

cache=${MTPKIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mtpkit}/llamacpp/$VERSION-$flavor
if [ "$flavor" = cuda ] && [ "$cuda_arch" != native ]; then cache=$cache-sm$cuda_arch; fi
bin=$cache/bin
if [ -d "$bin" ]; then echo "$bin"; exit 0; fi

for tool in cmake tar; do command -v $tool >/dev/null || die "$tool is not installed"; done
mkdir -p "$cache" || die "cannot create $cache"

# 1. the source: llama-cpp-python's sdist, checked against the pinned hash
sdist=$cache/llama_cpp_python-$VERSION.tar.gz
if [ ! -f "$sdist" ]; then
  if [ -n "${SDIST:-}" ]; then
    cp "$SDIST" "$sdist.$$.tmp"
  else
    echo "downloading llama-cpp-python $VERSION's source from PyPI" >&2
    tmpd=$(mktemp -d "$cache/.dl-$$-XXXX")
    python3 -m pip download --quiet --no-deps --no-binary :all: -d "$tmpd" \
      "llama-cpp-python==$VERSION" >&2 || { rm -rf "$tmpd"; die "could not download llama-cpp-python $VERSION (set SDIST=path/to/the .tar.gz)"; }
    mv "$tmpd/llama_cpp_python-$VERSION.tar.gz" "$sdist.$$.tmp"; rm -rf "$tmpd"
  fi
  got=$(sha256sum "$sdist.$$.tmp" 2>/dev/null || shasum -a 256 "$sdist.$$.tmp")
  [ "${got%% *}" = "$SHA256" ] || { rm -f "$sdist.$$.tmp"; die "llama-cpp-python $VERSION's sdist has sha256 ${got%% *}, expected $SHA256"; }
  mv "$sdist.$$.tmp" "$sdist"
fi
src=$cache/src
if [ ! -f "$src/CMakeLists.txt" ]; then
  rm -rf "$src" "$cache/.src.tmp"; mkdir -p "$cache/.src.tmp"
  tar xzf "$sdist" -C "$cache/.src.tmp" --strip-components=3 "llama_cpp_python-$VERSION/vendor/llama.cpp"
  mv "$cache/.src.tmp" "$src"
fi

# 2. configure + build: no network at build time (no prebuilt web UI, no curl/openssl), static programs
args=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_UI=OFF
      -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_NUMBER=0 -DLLAMA_BUILD_COMMIT=0c1e570)
case $flavor in
  cpu) ;;
  cuda) args+=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$cuda_arch") ;;
  metal) [ "$(uname -s)" = Darwin ] || die "--metal builds on macOS only"; args+=(-DGGML_METAL=ON) ;;
  android)
    tc=$ndk/build/cmake/android.toolchain.cmake
    [ -f "$tc" ] || die "$tc not found: --android takes the NDK's root directory"
    # every arm64 phone core since ~2018 (Cortex-A55/A75 and later) has dot product and fp16 arithmetic; newer
    # ones (Cortex-X2/A710 and later) run faster with ANDROID_MARCH=armv8.7a (i8mm)
    android_march=${ANDROID_MARCH:-armv8.2-a+dotprod+fp16}
    args+=("-DCMAKE_TOOLCHAIN_FILE=$tc" -DANDROID_ABI=arm64-v8a -DANDROID_PLATFORM=android-28
           -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DGGML_LLAMAFILE=OFF
           "-DCMAKE_C_FLAGS=-march=$android_march" "-DCMAKE_CXX_FLAGS=-march=$android_march") ;;
esac
# shellcheck disable=SC2206
args+=(${EXTRA_CMAKE:-})
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
jobs=${JOBS:-$( (nproc || sysctl -n hw.ncpu) 2>/dev/null || echo 2)}
echo "building llama.cpp ($flavor) in $cache/build with $jobs jobs: ${PROGRAMS[*]}" >&2
cmake -S "$src" -B "$cache/build" "${gen[@]}" "${args[@]}" >"$cache/configure.log" 2>&1 \
  || die "cmake configure failed: see $cache/configure.log"
cmake --build "$cache/build" -j "$jobs" --target "${PROGRAMS[@]}" >"$cache/build.log" 2>&1 \
  || die "build failed: see $cache/build.log"

# 3. publish bin/ in one rename
rm -rf "$cache/.bin.tmp"; mkdir -p "$cache/.bin.tmp"
for p in "${PROGRAMS[@]}"; do cp "$cache/build/bin/$p" "$cache/.bin.tmp/"; done
mv "$cache/.bin.tmp" "$bin"
echo "$bin"
