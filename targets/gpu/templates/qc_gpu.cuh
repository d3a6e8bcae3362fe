// qc_gpu.cuh: the few device functions the bit kernels need beyond plain CUDA C++, as inline PTX.
// Built by nvcc for the GPU; for host tests, templates/emu/cuda_emu.h defines twins of the same functions.
#pragma once
#include <cstdint>

#if defined(QC_EMU)
#include "emu/cuda_emu.h"
#else

// D += popc(A AND B) over 256 bits, per output element: one warp-wide b1 tensor-core MMA (sm_80+).
// a: 4 x b32 of the 16x256 bit A tile, b: 2 x b32 of the 256x8 bit B tile, d: 4 x s32 of the 16x8 accumulator,
// in the PTX ISA's fragment layout for mma.m16n8k256 (see emu/cuda_emu.h for the mapping).
__device__ __forceinline__ void qc_mma_b1_and(int32_t d[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();  // the launcher never runs the MMA kernels below sm_80
#endif
}

// asynchronous global -> shared copy of BYTES (4, 8 or 16); zero-filled when !valid (the source is not read)
template <int BYTES>
__device__ __forceinline__ void qc_cp_async(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    const int src_bytes = valid ? BYTES : 0;
    if (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(gmem), "n"(BYTES),
                     "r"(src_bytes));
#else
    const uint32_t* s = static_cast<const uint32_t*>(gmem);
    uint32_t* d = static_cast<uint32_t*>(smem);
    for (int i = 0; i < BYTES / 4; ++i) d[i] = valid ? s[i] : 0u;
#endif
}

__device__ __forceinline__ void qc_cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// wait until at most N committed groups are still in flight
template <int N>
__device__ __forceinline__ void qc_cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
#endif
