#!/usr/bin/env bash
# llama-cpp-python, built from its source with one fix to llama.cpp's AMX matmul, into the venv whose pip is $1.
#
# On Intel Xeons with AMX, llama.cpp's AMX kernels (its "extra buffer type" for quantized weights) crash at the
# first tile instruction: a #GP in ggml_backend_amx_mul_mat (llama.cpp issue 20824; the fix proposed upstream is
# its pull request 26954). The tile configuration is loaded once per thread from the stack, and the tile
# instructions then meet an invalid one. amx-tile-config.patch keeps the configuration in static memory and loads
# it at every AMX matmul. With it, prefill and decode of SmolLM2's q8_0 export run about 2x faster here
# (BENCHMARKS.md, Engines). collegeadvisor's engine probes the installed build on its first load and uses the AMX
# kernels only where they run (llamacpp.amx_runs), so a stock build stays safe.
set -euo pipefail
PIP=${1:?usage: build.sh PATH/TO/pip}
VERSION=0.3.36  # the patch is against this release's vendored llama.cpp
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PIP" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION"
(cd "$SRC" && git apply -p1 "$HERE/amx-tile-config.patch")
# the build uses every core it is given (about 5 minutes on 2)
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} "$PIP" install -q --force-reinstall --no-deps "$SRC"
"$PIP" install -q "llama-cpp-python[server]==$VERSION"  # the server's dependencies; the build above stays
