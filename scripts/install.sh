#!/usr/bin/env bash
# Install localmed into ./.venv (or $LOCALMED_VENV): llama-cpp-python built from source with only
# what localmed uses, then localmed itself. No torch by default: chat, serve, bench, pull, plan
# and export run GGUF files, and localmed converts Llama/Mistral/Mixtral safetensors without it.
#
#   LOCALMED_GPU=cuda  scripts/install.sh   # NVIDIA: llama.cpp built with CUDA offload
#   (Apple Silicon gets Metal without asking.)
#   CMAKE_ARGS="..."   scripts/install.sh   # extra llama.cpp CMake options, appended
#   LOCALMED_EXTRAS=convert scripts/install.sh     # + torch: llama.cpp's converter, .bin files
#   LOCALMED_EXTRAS=gptq scripts/install.sh        # + torch, GPTQModel: GPTQ export
#   LOCALMED_EXTRAS=test scripts/install.sh        # + what the tests need (torch among it)
#   LOCALMED_TORCH=cuda scripts/install.sh ...     # torch's CUDA build where an extra needs torch
#                                                  # (default cpu: PyTorch's CPU index)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${LOCALMED_VENV:-.venv}
PYTHON=${PYTHON:-python3}
LLAMA_CPP_PYTHON="llama-cpp-python==0.3.36"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip

EXTRAS=${LOCALMED_EXTRAS:-}
TORCH_BUILD=${LOCALMED_TORCH:-cpu}
case $TORCH_BUILD in
    cpu|cuda) ;;
    *) echo "LOCALMED_TORCH=$TORCH_BUILD: expected cpu or cuda" >&2; exit 2 ;;
esac
needs_torch=""
for extra in ${EXTRAS//,/ }; do
    case $extra in convert|gptq|test) needs_torch=1 ;; esac
done

# torch, where an extra needs it, before anything that depends on it can pull another build.
# PyPI's Linux x86-64 torch is the CUDA build (its nvidia-* and triton packages: ~4 GB in the
# venv); the CPU build (~1 GB) comes from PyTorch's own index, asked first when it answers (a
# local wheel in PIP_FIND_LINKS is taken too: pip prefers 2.13.0+cpu to 2.13.0).
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
if [ -n "$needs_torch" ] && ! "$VENV/bin/python" -c \
        "import importlib.metadata as m, sys; sys.exit(not m.version('torch').startswith('2.13.0'))" \
        2>/dev/null; then
    if [ "$TORCH_BUILD" = cpu ] && "$VENV/bin/python" -c \
            "import urllib.request; urllib.request.urlopen('$TORCH_CPU_INDEX/torch/', timeout=10)" \
            2>/dev/null; then
        "${PIP[@]}" install --quiet "torch==2.13.0" --extra-index-url "$TORCH_CPU_INDEX"
    else
        [ "$TORCH_BUILD" = cpu ] && echo "PyTorch's CPU index ($TORCH_CPU_INDEX) does not answer:" \
            "torch comes from your package index (on Linux x86-64, PyPI's is the CUDA build)" >&2
        "${PIP[@]}" install --quiet "torch==2.13.0"
    fi
fi

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

# BUILD_CUDA_EXT=0 keeps GPTQModel's install (the gptq extra) from compiling CUDA kernels on
# machines without a GPU.
BUILD_CUDA_EXT=${BUILD_CUDA_EXT:-0} "${PIP[@]}" install --quiet -e ".${EXTRAS:+[$EXTRAS]}"

if [ -n "$need_converter" ]; then
    "$VENV/bin/localmed" install-converter --sdist "$SDIST" >&2
fi
rm -rf "$SDIST_DIR"
echo "localmed installed in $VENV: run $VENV/bin/localmed" >&2
