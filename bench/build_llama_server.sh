#!/usr/bin/env bash
# Build llama.cpp's C++ OpenAI-compatible server (llama-server) into .venv/bin, for bench/serve_throughput.py.
#
# The source is the llama.cpp that llama-cpp-python vendors, at the version constraints.txt pins, so the
# in-process peer and the HTTP peer are the same llama.cpp. Static, no web UI, no network features. About
# 6 minutes on 2 cores. GGML_NATIVE=OFF builds for a generic x86-64 with AVX2 instead of this CPU's flags
# (the native build crashed at load on an AVX512-bf16 EPYC).
#
#     [GGML_NATIVE=OFF] bash bench/build_llama_server.sh
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(grep -i '^llama[-_]cpp[-_]python==' constraints.txt | cut -d= -f3)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/pip download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version"
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE="${GGML_NATIVE:-ON}" \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF $([ "${GGML_NATIVE:-ON}" = OFF ] && echo -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON) \
    > "$work/configure.log"
cmake --build "$work/build" --target llama-server -j "$(nproc)"
install -m 0755 "$work/build/bin/llama-server" .venv/bin/llama-server
echo "built .venv/bin/llama-server (llama.cpp from llama-cpp-python $version)"
