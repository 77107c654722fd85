#!/usr/bin/env bash
# Build ik_llama.cpp for this CPU from ik-llama-cpp-python's PyPI sdist (which vendors its source) and
# install it, for `python benchmarks/llama_cpp_compare.py --engines llama_cpp,ik_llama_cpp`.
# The PyPI wheel would install in seconds, but it is a generic AVX2 build (no AVX-512, no VNNI): a
# comparison against it would measure the build flags. The build took 17 minutes here (2 cores, shared).
set -euo pipefail
VERSION=0.1.5
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m pip download --no-deps --no-binary ik-llama-cpp-python "ik-llama-cpp-python==$VERSION" -d "$work"
tar xzf "$work/ik_llama_cpp_python-$VERSION.tar.gz" -C "$work"
source_dir="$work/ik_llama_cpp_python-$VERSION"
# The sdist lacks the script its build runs to write common/build-info.cpp (the build stops at
# "Generating build details from Git"); this is that script as llama.cpp has it.
script="$source_dir/vendor/ik_llama.cpp/common/cmake/build-info-gen-cpp.cmake"
if [ ! -f "$script" ]; then
    mkdir -p "$(dirname "$script")"
    cat > "$script" <<'EOF'
include(${CMAKE_CURRENT_SOURCE_DIR}/cmake/build-info.cmake)

set(TEMPLATE_FILE "${CMAKE_CURRENT_SOURCE_DIR}/common/build-info.cpp.in")
set(OUTPUT_FILE "${CMAKE_CURRENT_SOURCE_DIR}/common/build-info.cpp")

configure_file(${TEMPLATE_FILE} ${OUTPUT_FILE})
EOF
fi
# without the run path its libllama.so and llama-quantize do not find libggml.so beside them
CMAKE_ARGS='-DGGML_NATIVE=ON -DCMAKE_INSTALL_RPATH=$ORIGIN;$ORIGIN/../lib' CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python -m pip install --no-deps "$source_dir"
