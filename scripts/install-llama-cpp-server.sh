#!/usr/bin/env bash
# Build llama.cpp's own HTTP server, `llama-server`, for the fleet benchmark
# (bench/fleet/engines.py). Unlike the llama-cpp-python server the e2e tests
# run, it serves several sequences at once (`-np N` slots), each keeping its
# own prompt cache.
#
#   bash scripts/install-llama-cpp-server.sh          # build (or reuse) it
#   LLAMA_SERVER_BIN=$(bash scripts/install-llama-cpp-server.sh)
#
# The sources are the llama.cpp tree vendored in the llama-cpp-python sdist
# from PyPI (the same archive scripts/install-llama-server.sh uses), so pip is
# the only thing that downloads. Only the `llama-server` target is compiled:
# Release, static (one self-contained binary), no tests, examples, web UI,
# OpenSSL or curl, every core.
#
# Layout under ${CHAT_PROXY_CACHE:-$HOME/.cache/chat-proxy}:
#   sdist/                       the llama-cpp-python source archive
#   llama-server-bin/<key>/      the binary, keyed by version, flags and CPU
#                                (GGML_NATIVE=ON tunes it to this CPU)
#
# Environment:
#   CHAT_PROXY_CACHE   cache root (default: $HOME/.cache/chat-proxy)
#   PYTHON             interpreter whose pip downloads the sdist (default: python3)
#   FORCE_REBUILD=1    rebuild even if a cached binary exists
#   CMAKE_ARGS         extra CMake arguments, appended to the defaults below
# Progress and timing go to stderr; stdout is only the binary's path.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"

CACHE_DIR="${CHAT_PROXY_CACHE:-$HOME/.cache/chat-proxy}"
SDIST_DIR="$CACHE_DIR/sdist"
SDIST="$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
PYTHON="${PYTHON:-python3}"

log() { printf '[install-llama-cpp-server] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

jobs="$(nproc 2>/dev/null || echo 2)"
CMAKE_FLAGS="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
-DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
-DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_BLAS=OFF -DGGML_RPC=OFF -DGGML_BACKEND_DL=OFF\
${CMAKE_ARGS:+ $CMAKE_ARGS}"
# GGML_NATIVE compiles for this CPU's instruction set: the key includes it.
cpu_flags="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m)"
key_hash="$(printf '%s|%s|%s' "$LLAMA_CPP_PYTHON_VERSION" "$CMAKE_FLAGS" "$cpu_flags" \
    | sha256sum | cut -c1-12)"
BIN_DIR="$CACHE_DIR/llama-server-bin/$LLAMA_CPP_PYTHON_VERSION-$key_hash"
BIN="$BIN_DIR/llama-server"

if [[ "${FORCE_REBUILD:-0}" != "1" && -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; then
    log "already built: $BIN"
    echo "$BIN"
    exit 0
fi

missing=()
for tool in cmake make cc c++ tar; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    die "missing build tools: ${missing[*]}. On Debian/Ubuntu: apt-get update && apt-get install -y cmake build-essential (cmake alone also comes from PyPI: pip install cmake)"
fi

start=$(date +%s)
if [[ ! -f "$SDIST" ]]; then
    log "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist (~75 MB) with pip"
    mkdir -p "$SDIST_DIR"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: -d "$SDIST_DIR" \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2
fi

mkdir -p "$CACHE_DIR"
work="$(mktemp -d "$CACHE_DIR/llama-server-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log "unpacking $SDIST"
tar -xzf "$SDIST" -C "$work" --strip-components=1 \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
src="$work/vendor/llama.cpp"
[[ -f "$src/tools/server/CMakeLists.txt" ]] || die "no tools/server in $src"

generator=()
if command -v ninja >/dev/null 2>&1; then
    generator=(-G Ninja)
fi
log "configuring: $CMAKE_FLAGS"
# shellcheck disable=SC2086  # CMAKE_FLAGS is a list of words
cmake -S "$src" -B "$work/build" "${generator[@]}" $CMAKE_FLAGS >"$work/configure.log" 2>&1 \
    || { tail -n 40 "$work/configure.log" >&2; die "cmake configure failed"; }
log "compiling llama-server with $jobs jobs"
build_start=$(date +%s)
cmake --build "$work/build" --target llama-server --parallel "$jobs" >"$work/build.log" 2>&1 \
    || { tail -n 40 "$work/build.log" >&2; die "cmake build failed"; }
built="$work/build/bin/llama-server"
[[ -x "$built" ]] || die "the build finished but $built is missing"
build_seconds=$(($(date +%s) - build_start))

mkdir -p "$BIN_DIR"
cp "$built" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
printf 'llama-cpp-python %s\nflags %s\nbuild_seconds %s\n' \
    "$LLAMA_CPP_PYTHON_VERSION" "$CMAKE_FLAGS" "$build_seconds" >"$BIN_DIR/BUILD-INFO"
log "compiled in ${build_seconds}s (total $(($(date +%s) - start))s): $BIN"
log "$("$BIN" --version 2>&1 | tr '\n' ' ')"
echo "$BIN"
