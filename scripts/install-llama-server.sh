#!/usr/bin/env bash
# Install a real llama.cpp OpenAI-compatible server (llama-cpp-python[server])
# into its own virtualenv, outside the repository, for the e2e tests.
#
#   bash scripts/install-llama-server.sh     # install (or reuse) the venv
#   LLAMA_SERVER_PYTHON=$(bash scripts/install-llama-server.sh)
#
# Layout under ${CHAT_PROXY_CACHE:-$HOME/.cache/chat-proxy}:
#   llama-venv/        the server's venv, reused while its stamp matches
#   sdist/             the llama-cpp-python source archive from PyPI
#   wheels/<key>/      the compiled wheel, keyed by version + build flags
# llama.cpp is compiled from the PyPI sdist -- nothing but pip packages is
# downloaded. The build is trimmed to the shared libraries the Python bindings
# load (no llava/mtmd, tests, examples, tools, C++ server, OpenSSL, curl) and
# uses every core. From scratch on 2 idle cores: ~4 min (CPU ~5 min); with the
# wheel already cached (venv deleted or pins changed): ~15-25 s.
#
# Environment:
#   CHAT_PROXY_CACHE      cache root (default: $HOME/.cache/chat-proxy)
#   PYTHON                interpreter used to create the venv (default: python3)
#   FORCE_REINSTALL=1     wipe the venv and the cached wheel, recompile
#   CMAKE_ARGS            extra CMake arguments, appended to the defaults below
# Progress and timing go to stderr; stdout is only the venv's python path.
set -euo pipefail

LLAMA_CPP_VERSION="0.3.36"
# The server stack is pinned too: the SSE framing the e2e tests record (event
# separator, ": ping" comments) comes from sse-starlette, not from llama.cpp.
PINS="llama-cpp-python==$LLAMA_CPP_VERSION
fastapi==0.165.0
starlette==1.10.0
sse-starlette==3.7.0
starlette-context==0.3.6
uvicorn==0.54.0
pydantic==2.14.4
pydantic-settings==2.16.3
gguf==0.19.0
numpy==2.4.6"

CACHE_DIR="${CHAT_PROXY_CACHE:-$HOME/.cache/chat-proxy}"
VENV="$CACHE_DIR/llama-venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.chat-proxy-stamp"
SDIST_DIR="$CACHE_DIR/sdist"
PYTHON="${PYTHON:-python3}"

log() { printf '[install-llama-server] %s\n' "$*" >&2; }

jobs="$(nproc 2>/dev/null || echo 2)"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$jobs}"
# Use the system ninja if there is one (the system cmake >= 3.21 is used as found).
if command -v ninja >/dev/null 2>&1; then
    export CMAKE_GENERATOR="${CMAKE_GENERATOR:-Ninja}"
fi
# -O1 instead of -O3: ~30% less compile time; the tiny test model still runs at
#   ~650 tokens/s on one thread (vs ~1900 at -O3), plenty for tests.
# GGML_NATIVE=OFF: a portable binary (the cache may outlive the CPU it was built on).
# LLAVA_BUILD=OFF: skip the multimodal (mtmd) library, only loaded for llava models.
# llama.cpp's tests/examples/tools/server are already off when it is a subproject;
# they are listed to stay off whatever a new version defaults to.
export CMAKE_ARGS="-DCMAKE_C_FLAGS_RELEASE=-O1 -DCMAKE_CXX_FLAGS_RELEASE=-O1 \
-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
-DGGML_BLAS=OFF -DGGML_RPC=OFF -DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF\
${CMAKE_ARGS:+ $CMAKE_ARGS}"
build_key="$(printf '%s|%s|%s' "$LLAMA_CPP_VERSION" "$CMAKE_ARGS" "${CMAKE_GENERATOR:-}" \
    | sha256sum | cut -c1-12)"
WHEEL_DIR="$CACHE_DIR/wheels/$build_key"
STAMP_TEXT="$PINS
build=$build_key"

installed_ok() {
    [[ -x "$VPY" && -f "$STAMP" ]] \
        && [[ "$(cat "$STAMP")" == "$STAMP_TEXT" ]] \
        && "$VPY" -c "import llama_cpp.server, gguf, numpy" >/dev/null 2>&1
}

if [[ "${FORCE_REINSTALL:-0}" != "1" ]] && installed_ok; then
    log "already installed: llama-cpp-python $LLAMA_CPP_VERSION in $VENV"
    echo "$VPY"
    exit 0
fi

start=$(date +%s)
mkdir -p "$CACHE_DIR"
if [[ -e "$VENV" ]]; then
    log "removing stale or incomplete venv $VENV"
    rm -rf "$VENV"
fi
log "creating venv $VENV with $("$PYTHON" --version 2>&1)"
"$PYTHON" -m venv "$VENV"
"$VPY" -m pip install --quiet --upgrade pip >&2

# The compiled wheel is kept, keyed by version and build flags, so re-creating
# the venv does not recompile. pip's own wheel cache is bypassed (--no-cache-dir):
# it is keyed by the sdist only and would not notice changed CMAKE_ARGS.
if [[ "${FORCE_REINSTALL:-0}" == "1" ]]; then
    rm -rf "$WHEEL_DIR"
fi
find_wheel() {
    find "$WHEEL_DIR" -maxdepth 1 -name "llama_cpp_python-$LLAMA_CPP_VERSION-*.whl" 2>/dev/null \
        | head -n1 || true
}
wheel="$(find_wheel)"
if [[ -z "$wheel" ]]; then
    sdist="$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz"
    if [[ ! -f "$sdist" ]]; then
        log "downloading the llama-cpp-python $LLAMA_CPP_VERSION sdist (~75 MB)"
        mkdir -p "$SDIST_DIR"
        "$VPY" -m pip download --quiet --no-deps --no-binary :all: -d "$SDIST_DIR" \
            "llama-cpp-python==$LLAMA_CPP_VERSION" >&2
    fi
    log "compiling llama-cpp-python $LLAMA_CPP_VERSION (CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL," \
        "CMAKE_GENERATOR=${CMAKE_GENERATOR:-default})"
    log "CMAKE_ARGS=$CMAKE_ARGS"
    build_start=$(date +%s)
    tmp_wheels="$(mktemp -d "$CACHE_DIR/wheels-tmp.XXXXXX")"
    trap 'rm -rf "$tmp_wheels"' EXIT
    "$VPY" -m pip wheel --no-cache-dir --no-deps --progress-bar off -w "$tmp_wheels" \
        "$sdist" >&2
    mkdir -p "$WHEEL_DIR"
    mv "$tmp_wheels"/llama_cpp_python-*.whl "$WHEEL_DIR"/
    wheel="$(find_wheel)"
    log "compiled in $(($(date +%s) - build_start))s: $wheel"
else
    log "reusing the wheel compiled earlier with the same flags: $wheel"
fi

constraints="$VENV/constraints.txt"
printf '%s\n' "$PINS" >"$constraints"
"$VPY" -m pip install --progress-bar off -c "$constraints" "${wheel}[server]" gguf numpy >&2

if ! "$VPY" -c "import llama_cpp.server, gguf, numpy" >&2; then
    log "ERROR: installed, but 'import llama_cpp.server' fails in $VENV"
    exit 1
fi
printf '%s' "$STAMP_TEXT" >"$STAMP"
log "done in $(($(date +%s) - start))s: llama-cpp-python $LLAMA_CPP_VERSION in $VENV"
echo "$VPY"
