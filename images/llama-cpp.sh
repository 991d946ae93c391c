#!/usr/bin/env bash
# Installs t2s export's llama.cpp tools into a Python environment, as one pinned pair from one llama-cpp-python sdist
# (PyPI's only distribution of it: the sdist vendors llama.cpp):
#   - the converter (vendor/llama.cpp/convert_hf_to_gguf.py, its conversion/ package and the gguf-py beside it), unpacked
#     into <prefix>/share/t2s/llama.cpp (pure Python: f16 and q8_0 need nothing else);
#   - llama-cpp-python itself (the quantizer for q4_k_m, and llama.cpp for the checks), from a wheel built once from
#     that sdist and cached in $T2S_WHEEL_CACHE (~/.cache/t2s/wheels), keyed by version; the wheel is py3-none (ctypes),
#     so Python 3.10 and 3.11 share it. Building it takes ~12 min on 2 cores (cmake, a C++ compiler); a cached wheel
#     installs in seconds.
# Usage: images/llama-cpp.sh PYTHON [converter|wheel|all]   (default all)
#   T2S_LLAMA_CPP_BUILD=0: never build (install the cached wheel if there is one, else skip it with one line)
set -euo pipefail
LLAMA_CPP_PYTHON_VERSION=0.3.36  # keep equal to jobs/lib/llama_cpp.py's LLAMA_CPP_PYTHON
python=${1:?usage: images/llama-cpp.sh PYTHON [converter|wheel|all]}
what=${2:-all}
cache=${T2S_WHEEL_CACHE:-$HOME/.cache/t2s/wheels}
sdist_dir=$cache/sdist
sdist=$sdist_dir/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz
# Portable CPU code (AVX2/FMA/F16C, no -march=native): the cached wheel also goes into images run on other machines.
CMAKE_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
mkdir -p "$cache" "$sdist_dir"

if [ ! -f "$sdist" ]; then
  "$python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$sdist_dir"
fi

if [ "$what" = all ] || [ "$what" = converter ]; then
  prefix=$("$python" -c 'import sys; print(sys.prefix)')
  target=$prefix/share/t2s/llama.cpp
  if [ "$(cat "$target/VERSION" 2>/dev/null)" != "$LLAMA_CPP_PYTHON_VERSION" ]; then
    rm -rf "$target" && mkdir -p "$target"
    root=llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp
    tar -xzf "$sdist" -C "$target" --strip-components=3 "$root/convert_hf_to_gguf.py" "$root/conversion" "$root/gguf-py" \
      "$root/LICENSE"
    echo "$LLAMA_CPP_PYTHON_VERSION" > "$target/VERSION"
  fi
  echo "llama.cpp converter (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION) in $target"
fi

if [ "$what" = all ] || [ "$what" = wheel ]; then
  wheel=$(ls "$cache"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-py3-none-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then
    if [ "${T2S_LLAMA_CPP_BUILD:-1}" = 0 ]; then
      echo "llama-cpp-python: no cached wheel in $cache and T2S_LLAMA_CPP_BUILD=0: not installed (export makes f16 and q8_0 only)"
      exit 0
    fi
    echo "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION: building the wheel once into $cache (about 12 min on 2 cores)"
    build=$(mktemp -d)
    CMAKE_ARGS="$CMAKE_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
      "$python" -m pip wheel -q --no-deps --no-binary llama-cpp-python "$sdist" -w "$build"
    mv "$build"/llama_cpp_python-*.whl "$cache"/ && rm -rf "$build"
    wheel=$(ls "$cache"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-py3-none-*.whl | head -1)
  fi
  "$python" -m pip install -q "$wheel"
  echo "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION from $wheel"
fi
