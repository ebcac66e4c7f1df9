#!/usr/bin/env bash
# Install localmed into ./.venv (or $LOCALMED_VENV): torch's CPU build first, then llama-cpp-python
# built from source with only what localmed uses, then localmed itself.
#
#   LOCALMED_GPU=cuda  scripts/install.sh   # NVIDIA: llama.cpp built with CUDA offload
#   (Apple Silicon gets Metal without asking.)
#   CMAKE_ARGS="..."   scripts/install.sh   # extra llama.cpp CMake options, appended
#   LOCALMED_EXTRAS=test,gptq scripts/install.sh   # with GPTQ export
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${LOCALMED_VENV:-.venv}
PYTHON=${PYTHON:-python3}
LLAMA_CPP_PYTHON="llama-cpp-python==0.3.36"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip

# The CPU build of torch, before anything that depends on torch can pull a CUDA one.
"${PIP[@]}" install --quiet "torch==2.13.0"

# shellcheck source=scripts/llama-cmake-args.sh
. scripts/llama-cmake-args.sh
cmake_args=$(llama_cmake_args)

# One source archive of the pinned llama-cpp-python serves twice: llama.cpp is built from it, and
# llama.cpp's own convert_hf_to_gguf.py (for architectures localmed does not convert itself) is
# taken from it, so the converter and the runtime are always the same release.
VERSION=${LLAMA_CPP_PYTHON#*==}
SDIST_DIR="$VENV/share/localmed/sdist"
SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
CONVERTER_VERSION="$VENV/share/localmed/llama.cpp/LLAMA_CPP_PYTHON_VERSION"
need_build=""
if ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null \
   || [ -n "${LOCALMED_REBUILD_LLAMA:-}" ]; then
    need_build=1
fi
need_converter=""
[ "$(cat "$CONVERTER_VERSION" 2>/dev/null)" = "$VERSION" ] || need_converter=1
if { [ -n "$need_build" ] || [ -n "$need_converter" ]; } && [ ! -f "$SDIST" ]; then
    "${PIP[@]}" download --quiet --no-deps --no-binary :all: "$LLAMA_CPP_PYTHON" -d "$SDIST_DIR"
fi

# --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS, and would hand back a build made with
# other options.
if [ -n "$need_build" ]; then
    echo "building $LLAMA_CPP_PYTHON (a few minutes) ..." >&2
    CMAKE_ARGS="$cmake_args" "${PIP[@]}" install --quiet --no-cache-dir --force-reinstall \
        --no-deps "$SDIST"
fi

# LOCALMED_EXTRAS=test,gptq adds GPTQ export (GPTQModel, optimum); BUILD_CUDA_EXT=0 keeps its
# install from compiling CUDA kernels on machines without a GPU.
BUILD_CUDA_EXT=${BUILD_CUDA_EXT:-0} "${PIP[@]}" install --quiet -e ".[${LOCALMED_EXTRAS:-test}]"

if [ -n "$need_converter" ]; then
    "$VENV/bin/localmed" install-converter --sdist "$SDIST" >&2
fi
rm -rf "$SDIST_DIR"
echo "localmed installed in $VENV: run $VENV/bin/localmed" >&2
