#!/usr/bin/env bash
# CUDA offload, proven on the lent GPU machine in one command (an NVIDIA H200 with CUDA 13, its
# python3 3.12 with torch and transformers, nothing reachable from it; see the device tool's
# notes). Three modes:
#
#   benchmarks/gpu_check.sh --prepare   here: put what must travel in .gpu/ (llama-cpp-python's
#                                       source archive, pruned to what the build reads, and the
#                                       pure-Python wheels that machine lacks), check it against
#                                       the transfer limit, print the device call
#   benchmarks/gpu_check.sh --dry-run   here, no GPU needed: --prepare, then every step that
#                                       needs no GPU (CUDA configure of the pruned archive when
#                                       nvcc is here, the installs, the checks on the CPU)
#   benchmarks/gpu_check.sh --device    there: build llama.cpp with CUDA for sm_90 within a time
#                                       budget, install localmed and the wheels into a private
#                                       folder, run the checks, write report.{txt,json} to $OUT
#
# The device call it prints: run(command="bash benchmarks/gpu_check.sh --device",
# carry=[".gpu"], timeout_s=600). A second call on the still-warm machine reuses the build.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=${1:---dry-run}
CARRY=${LOCALMED_GPU_CARRY:-.gpu}  # what travels (the device's carry); tests put it elsewhere
VERSION=0.3.36
SDIST="$CARRY/llama_cpp_python-$VERSION.tar.gz"
SITE=${LOCALMED_GPU_SITE:-/tmp/localmed-gpu-site}
OUT=${OUT:-$(mktemp -d)}
BUILD_BUDGET=${LOCALMED_GPU_BUILD_SECONDS:-360}  # of the call's 600 s: the rest is for the checks
# here, the project's environment (README's install); there, the image's python3
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi

# shellcheck source=scripts/llama-cmake-args.sh
. scripts/llama-cmake-args.sh

prepare() {
    "$PY" benchmarks/gpu_carry.py --carry "$CARRY" --version "$VERSION" || exit 2
}

configure_only() {
    # The pruned archive still configures with the device's options: for CUDA (sm_90) where
    # this machine has the CUDA toolkit with cuBLAS, else for the CPU (a toolkit with nvcc alone
    # stops at ggml-cuda's link to CUDA::cublas). What the device builds, short of compiling.
    local src build cuda="" what="CPU (no CUDA toolkit with cuBLAS here)"
    if command -v nvcc >/dev/null && ldconfig -p 2>/dev/null | grep -q libcublas \
            || compgen -G "/usr/local/cuda/lib64/libcublas.so*" >/dev/null; then
        cuda="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" what="CUDA, sm_90"
    fi
    src=$(mktemp -d) build=$(mktemp -d)
    tar -xzf "$SDIST" -C "$src" --strip-components=1
    # shellcheck disable=SC2046,SC2086  # the options are words
    if cmake -S "$src" -B "$build" $(llama_cmake_args) $cuda >"$OUT/configure.txt" 2>&1; then
        echo "configure: ok ($what)" | tee -a "$OUT/configure.txt"
    else
        echo "configure: FAILED ($what; see configure.txt)" >&2
        rm -rf "$src" "$build"
        return 1
    fi
    rm -rf "$src" "$build"
}

install_site() {
    # localmed's wheel (built by --prepare from this tree) and the wheels the machine lacks,
    # into a private folder: nothing can be fetched there.
    mkdir -p "$SITE"
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$CARRY"/wheels/*.whl
}

build_cuda() {
    if PYTHONPATH="$SITE" "$PY" -c "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())" 2>/dev/null; then
        echo "build: reused the CUDA build in $SITE" | tee "$OUT/build.txt"
        return 0
    fi
    local start=$SECONDS
    # shellcheck disable=SC2155
    export CMAKE_ARGS="$(LOCALMED_GPU=cuda llama_cmake_args) -DCMAKE_CUDA_ARCHITECTURES=90"
    export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
    # A build folder that outlives the call: a second call on the still-warm machine resumes
    # the build where the budget stopped it (ninja rebuilds only what is missing).
    # -v: ninja's [done/total] lines land in build.txt, so a build cut short says how far it got
    timeout "$BUILD_BUDGET" "$PY" -m pip install -v --no-index --no-deps \
        --no-build-isolation --no-cache-dir --config-settings=build-dir=/tmp/localmed-gpu-build \
        --target "$SITE" "$SDIST" >"$OUT/build.txt" 2>&1
    local status=$?
    local reached
    reached=$(grep -o '^ *\[[0-9]*/[0-9]*\]' "$OUT/build.txt" | tail -1 | tr -d ' ')
    echo "build: exit $status after $((SECONDS - start)) s (budget $BUILD_BUDGET s;" \
        "last ninja step ${reached:-none})" | tee -a "$OUT/build.txt"
    # how the C++ runtime is linked: shared (NEEDED libstdc++), or static with its std::
    # symbols exported (the crash of 2026-12-04) or kept private (scripts/llama-cmake-args.sh)
    local lib
    for lib in libllama.so libggml-cuda.so; do
        lib="$SITE/llama_cpp/lib/$lib"
        [ -f "$lib" ] || continue
        echo "linkage: $(basename "$lib"): libstdc++ $(readelf -d "$lib" | grep -q 'libstdc++' \
            && echo shared || echo static), std::ostream symbols exported:" \
            "$(nm -D --defined-only "$lib" 2>/dev/null | grep -c ' _ZNSo')" | tee -a "$OUT/build.txt"
    done
    return $status
}

case "$MODE" in
    --prepare)
        prepare
        ;;
    --dry-run)
        prepare
        configure_only || exit 1
        SITE=$(mktemp -d)
        install_site || { echo "install: FAILED" >&2; exit 1; }
        # llama.cpp, torch and the rest from this machine's environment; localmed from $SITE
        PYTHONPATH="$SITE" "$PY" benchmarks/gpu_check.py --out "$OUT" --carry "$CARRY" --dry-run
        status=$?
        rm -rf "$SITE"
        echo "dry run: report in $OUT" >&2
        exit $status
        ;;
    --device)
        nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
        install_site || { echo "install: FAILED" | tee "$OUT/report.txt"; exit 1; }
        build_cuda || { echo "CUDA build failed or ran out of time" >>"$OUT/build.txt"; }
        PYTHONPATH="$SITE" PYTHONUNBUFFERED=1 "$PY" benchmarks/gpu_check.py --out "$OUT" --carry "$CARRY"
        ;;
    *)
        echo "usage: benchmarks/gpu_check.sh --prepare | --dry-run | --device" >&2
        exit 2
        ;;
esac
