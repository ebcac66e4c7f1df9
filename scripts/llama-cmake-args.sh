# The CMake options llama.cpp is built with (sourced by scripts/install.sh and
# benchmarks/gpu_check.sh, so the GPU check builds what users get, plus CUDA): the library, its
# common code and the multimodal library (libmtmd: images for MedGemma and other image-text
# models), with no server, tools, tests or examples, which roughly halves the build.
llama_cmake_args() {
    local args="-DLLAVA_BUILD=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF"
    args+=" -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF"
    args+=" -DLLAMA_OPENSSL=OFF"
    # llama.cpp's RPC backend: a model's layers on a clinic's other machines (localmed worker,
    # --rpc); its server runs inside localmed's worker, behind localmed's TLS relay.
    # (no RDMA: an upgraded link would leave the relay, and its TLS, behind)
    args+=" -DGGML_RPC=ON -DGGML_RPC_RDMA=OFF"
    if [ "$(uname -m)" = "x86_64" ]; then
        # An AVX2 baseline instead of -march=native: native builds use AMX where the CPU lists
        # it, and virtual machines that list AMX without enabling it die with SIGILL on Q8_0/Q4.
        args+=" -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
        args+=" -DGGML_BMI2=ON"
    fi
    if [ "$(uname -s)" = "Linux" ]; then
        # A compiler that links the C++ runtime statically (the GPU machine's /opt/gcc g++ does)
        # would export that copy's symbols from every llama.cpp library, and a process that
        # loaded the system's libstdc++ first (sentencepiece, which gguf imports; torch) then
        # crashed in llama.cpp's model loader (std::ostream, 2026-12-04). Kept private to each
        # library; where libstdc++ is linked as a shared library (usual) this changes nothing.
        args+=" -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,libstdc++.a:libsupc++.a"
    fi
    if [ "${LOCALMED_GPU:-}" = "cuda" ]; then
        # No flash-attention kernels (GGML_CUDA_NO_FA): ggml-cuda then reports the op as
        # unsupported, and llama.cpp's flash attention `auto`, which localmed asks for, resolves
        # to off on the layers a GPU holds. They were the largest part of a compile that once
        # ran out of the GPU check's budget (2026-11-30); without them the build took 157-198 s
        # on 16 cores (2026-12-04). Building them is for a GPU session that measures both.
        args+=" -DGGML_CUDA=on -DGGML_CUDA_FA=OFF"
    fi
    echo "$args ${CMAKE_ARGS:-}"
}
