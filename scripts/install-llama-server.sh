#!/usr/bin/env bash
# Install a real llama.cpp OpenAI-compatible server (llama-cpp-python[server])
# into its own virtualenv, outside the repository, for the e2e tests.
#
#   scripts/install-llama-server.sh            # install (or reuse) the venv
#   LLAMA_SERVER_PYTHON=$(scripts/install-llama-server.sh | tail -n1)
#
# The venv lives in ${CHAT_PROXY_CACHE:-$HOME/.cache/chat-proxy}/llama-venv and
# is reused across runs. llama.cpp is compiled from the PyPI sdist (nothing but
# pip packages is downloaded); the build is trimmed to the shared libraries the
# Python bindings load (no llava/mtmd, tests, examples, tools, server binary,
# OpenSSL or curl) and runs with CMAKE_BUILD_PARALLEL_LEVEL = number of cores.
#
# Environment:
#   CHAT_PROXY_CACHE      cache root (default: $HOME/.cache/chat-proxy)
#   LLAMA_CPP_VERSION     llama-cpp-python version to build (default: pinned below)
#   PYTHON                interpreter used to create the venv (default: python3)
#   FORCE_REINSTALL=1     wipe and rebuild the venv
# Progress goes to stderr; the last line on stdout is the venv's python path.
set -euo pipefail

LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
CACHE_DIR="${CHAT_PROXY_CACHE:-$HOME/.cache/chat-proxy}"
VENV="$CACHE_DIR/llama-venv"
VPY="$VENV/bin/python"
PYTHON="${PYTHON:-python3}"

log() { printf '[install-llama-server] %s\n' "$*" >&2; }

installed_ok() {
    [[ -x "$VPY" ]] \
        && "$VPY" -c "import llama_cpp.server, gguf, numpy" >/dev/null 2>&1 \
        && [[ "$("$VPY" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null)" \
            == "$LLAMA_CPP_VERSION" ]]
}

if [[ "${FORCE_REINSTALL:-0}" != "1" ]] && installed_ok; then
    log "already installed: llama-cpp-python $LLAMA_CPP_VERSION in $VENV"
    echo "$VPY"
    exit 0
fi

start=$(date +%s)
mkdir -p "$CACHE_DIR"
if [[ -d "$VENV" ]]; then
    log "removing stale/incomplete venv $VENV"
    rm -rf "$VENV"
fi
log "creating venv $VENV with $("$PYTHON" --version 2>&1)"
"$PYTHON" -m venv "$VENV"
"$VPY" -m pip install --quiet --upgrade pip >&2

jobs="$(nproc 2>/dev/null || echo 2)"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$jobs}"
# Use the system cmake/ninja if present (scikit-build-core otherwise fetches them).
if command -v ninja >/dev/null 2>&1; then
    export CMAKE_GENERATOR="${CMAKE_GENERATOR:-Ninja}"
fi
# GGML_NATIVE=OFF: portable binary (the cache may outlive the CPU it was built on).
# LLAVA_BUILD=OFF: skip the multimodal (mtmd) library, only loaded for llava models.
export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
-DGGML_BLAS=OFF -DGGML_RPC=OFF -DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF"
log "building llama-cpp-python[server]==$LLAMA_CPP_VERSION from source" \
    "(CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL, CMAKE_GENERATOR=${CMAKE_GENERATOR:-default})"
log "CMAKE_ARGS=$CMAKE_ARGS"
# --no-binary: there is no prebuilt CPU wheel on PyPI anyway; be explicit. pip's
# wheel cache keeps the built wheel, so a re-created venv on the same machine
# installs in seconds; FORCE_REINSTALL=1 bypasses it and really recompiles.
cache_flag=()
if [[ "${FORCE_REINSTALL:-0}" == "1" ]]; then cache_flag=(--no-cache-dir); fi
"$VPY" -m pip install "${cache_flag[@]}" --no-binary llama-cpp-python \
    "llama-cpp-python[server]==$LLAMA_CPP_VERSION" gguf numpy >&2

if ! installed_ok; then
    log "ERROR: installed, but 'import llama_cpp.server' failed in $VENV"
    "$VPY" -c "import llama_cpp.server" >&2 || true
    exit 1
fi
end=$(date +%s)
log "done in $((end - start))s: llama-cpp-python $LLAMA_CPP_VERSION in $VENV"
echo "$VPY"
