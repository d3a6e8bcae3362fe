// cuda_emu.h: run qcompile's generated CUDA kernels as host C++ (g++), for tests on machines without a GPU.
//
// The kernel source is the same file nvcc compiles. This header maps the CUDA keywords it uses onto C++ and runs a
// launch as the GPU would, one block at a time: every thread of the block is a cooperative fiber (its own stack),
// switched only where CUDA threads synchronize, so __syncthreads() and the warp-collective operations keep their
// meaning:
//   __syncthreads()        all live threads of the block arrive before any continues;
//   warp collectives       (mma.sync, __shfl_xor_sync, __ballot_sync, __syncwarp) the 32 lanes of a warp each
//                          deposit their operands; the last lane to arrive computes the result for all 32 and
//                          releases them.
// The b1 MMA follows the PTX ISA's register layout for mma.m16n8k256 (.row.col, .b1, .s32, .and.popc), section
// "Matrix Fragments for mma.m16n8k256": groupID = lane >> 2, threadID_in_group = lane % 4;
//   A (16x256 bits, 4 x b32): a0 = row g, bits [32t, 32t+32); a1 = row g+8, same bits; a2, a3 = the same rows,
//                             bits [128 + 32t, 128 + 32t + 32)
//   B (256x8 bits, 2 x b32):  b0 = column g, bits [32t, 32t+32); b1 = column g, bits [128 + 32t, ...)
//   C, D (16x8 s32, 4 x s32): c0, c1 = row g, columns 2t, 2t+1; c2, c3 = row g+8, columns 2t, 2t+1
// Element e of a register is its bit e. cp.async copies synchronously (the waits are then no-ops).
// Atomics are plain read-modify-writes: one fiber runs at a time and none yields inside one.
#pragma once
#ifndef QC_EMU
#define QC_EMU 1
#endif
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>
#include <ucontext.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace qc_emu {

enum State { RUN, AT_SYNCTHREADS, AT_WARP, DONE };

struct Fiber {
    ucontext_t uc;
    jmp_buf jb;
    char* stack = nullptr;
    bool started = false;
    State state = RUN;
    dim3 tid;
    int linear = 0;
};

// a warp-collective operation in flight: every lane deposits `in`, the last one fills `out` for all
struct Warp {
    int arrived = 0;
    int op = -1;
    uint32_t in[32][10];
    uint32_t out[32][4];
};

struct Launch {
    dim3 grid, block, block_idx;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    Fiber* cur = nullptr;
    jmp_buf sched;
    const std::function<void()>* body = nullptr;
    size_t stack_bytes = 256 * 1024;
};

inline Launch& ctx() {
    static Launch l;
    return l;
}

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "cuda_emu: %s\n", what);
    std::abort();
}

inline void yield_to_scheduler() {
    Launch& l = ctx();
    if (!_setjmp(l.cur->jb)) _longjmp(l.sched, 1);
}

inline void fiber_main() {
    Launch& l = ctx();
    (*l.body)();
    l.cur->state = DONE;
    _longjmp(l.sched, 1);
}

inline void resume(Fiber* f) {
    Launch& l = ctx();
    l.cur = f;
    if (!_setjmp(l.sched)) {
        if (!f->started) {
            f->started = true;
            setcontext(&f->uc);
        }
        _longjmp(f->jb, 1);
    }
}

// run `body` once per thread of every block of the grid
inline void launch(const std::function<void()>& body, dim3 grid, dim3 block) {
    Launch& l = ctx();
    const int nt = int(block.x * block.y * block.z);
    if (nt <= 0 || nt > 1024 || nt % 32) fail("block size must be a positive multiple of 32, at most 1024");
    l.grid = grid;
    l.block = block;
    l.body = &body;
    l.fibers.assign(nt, Fiber());
    l.warps.assign(nt / 32, Warp());
    for (auto& f : l.fibers) f.stack = static_cast<char*>(std::malloc(l.stack_bytes));
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                l.block_idx = dim3(bx, by, bz);
                for (int t = 0; t < nt; ++t) {
                    Fiber& f = l.fibers[t];
                    f.started = false;
                    f.state = RUN;
                    f.linear = t;
                    f.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
                    getcontext(&f.uc);
                    f.uc.uc_stack.ss_sp = f.stack;
                    f.uc.uc_stack.ss_size = l.stack_bytes;
                    f.uc.uc_link = nullptr;
                    makecontext(&f.uc, fiber_main, 0);
                }
                for (auto& w : l.warps) w.arrived = 0;
                int done = 0;
                while (done < nt) {
                    bool ran = false;
                    for (auto& f : l.fibers)
                        if (f.state == RUN) {
                            ran = true;
                            resume(&f);
                            if (f.state == DONE) ++done;
                        }
                    if (ran || done == nt) continue;
                    // nobody can run: a block barrier that every live thread reached releases them all
                    for (auto& f : l.fibers)
                        if (f.state == AT_WARP) fail("deadlock: a warp collective waits for a lane that left or "
                                                     "waits at __syncthreads");
                    for (auto& f : l.fibers)
                        if (f.state == AT_SYNCTHREADS) f.state = RUN;
                }
            }
    for (auto& f : l.fibers) std::free(f.stack);
    l.fibers.clear();
}

inline void syncthreads() {
    Launch& l = ctx();
    l.cur->state = AT_SYNCTHREADS;
    yield_to_scheduler();
}

enum Op { OP_SYNC = 0, OP_MMA_B1_AND = 1, OP_SHFL_XOR = 2, OP_BALLOT = 3 };

inline void compute(Warp& w) {
    switch (w.op) {
    case OP_SYNC:
        return;
    case OP_SHFL_XOR:  // in[lane] = {value, laneMask}
        for (int l = 0; l < 32; ++l) w.out[l][0] = w.in[l ^ int(w.in[l][1] & 31)][0];
        return;
    case OP_BALLOT: {  // in[lane] = {predicate}: bit l of the result is lane l's predicate
        uint32_t bits = 0;
        for (int l = 0; l < 32; ++l) bits |= uint32_t(w.in[l][0] != 0) << l;
        for (int l = 0; l < 32; ++l) w.out[l][0] = bits;
        return;
    }
    case OP_MMA_B1_AND: {  // in[lane] = {a0..a3, b0, b1, c0..c3}
        uint32_t A[16][8], B[8][8];
        int32_t C[16][8];
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            const uint32_t* r = w.in[l];
            A[g][t] = r[0];
            A[g + 8][t] = r[1];
            A[g][4 + t] = r[2];
            A[g + 8][4 + t] = r[3];
            B[g][t] = r[4];
            B[g][4 + t] = r[5];
            C[g][2 * t] = int32_t(r[6]);
            C[g][2 * t + 1] = int32_t(r[7]);
            C[g + 8][2 * t] = int32_t(r[8]);
            C[g + 8][2 * t + 1] = int32_t(r[9]);
        }
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
            for (int i = 0; i < 4; ++i) {
                uint32_t d = uint32_t(C[rows[i]][cols[i]]);
                for (int k = 0; k < 8; ++k) d += uint32_t(__builtin_popcount(A[rows[i]][k] & B[cols[i]][k]));
                w.out[l][i] = d;
            }
        }
        return;
    }
    default:
        fail("unknown warp operation");
    }
}

// one lane's part of a warp-collective operation; returns this lane's out[]
inline const uint32_t* warp_collective(int op, const uint32_t* in, int n_in) {
    Launch& l = ctx();
    Fiber* me = l.cur;
    const int warp = me->linear / 32, lane = me->linear % 32;
    Warp& w = l.warps[warp];
    if (w.arrived == 0) w.op = op;
    else if (w.op != op) fail("lanes of one warp reached different collective operations");
    std::memcpy(w.in[lane], in, sizeof(uint32_t) * n_in);
    if (++w.arrived == 32) {
        compute(w);
        w.arrived = 0;
        for (int i = 0; i < 32; ++i) {
            Fiber& f = l.fibers[warp * 32 + i];
            if (&f != me) {
                if (f.state != AT_WARP) fail("a warp collective completed while a lane was elsewhere");
                f.state = RUN;
            }
        }
    } else {
        me->state = AT_WARP;
        yield_to_scheduler();
    }
    return w.out[lane];
}

inline dim3& thread_idx() { return ctx().cur->tid; }

}  // namespace qc_emu

#define threadIdx (qc_emu::thread_idx())
#define blockIdx (qc_emu::ctx().block_idx)
#define blockDim (qc_emu::ctx().block)
#define gridDim (qc_emu::ctx().grid)

inline void __syncthreads() { qc_emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { qc_emu::warp_collective(qc_emu::OP_SYNC, nullptr, 0); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline float __fmul_rn(float a, float b) {
    volatile float r = a * b;  // no contraction into a fused multiply-add
    return r;
}
inline float __fadd_rn(float a, float b) {
    volatile float r = a + b;
    return r;
}
inline int __shfl_xor_sync(unsigned, int v, int mask) {
    uint32_t in[2] = {uint32_t(v), uint32_t(mask)};
    return int(qc_emu::warp_collective(qc_emu::OP_SHFL_XOR, in, 2)[0]);
}
inline unsigned __ballot_sync(unsigned, int predicate) {
    uint32_t in[1] = {uint32_t(predicate != 0)};
    return qc_emu::warp_collective(qc_emu::OP_BALLOT, in, 1)[0];
}
inline unsigned atomicOr(unsigned* p, unsigned v) {
    const unsigned old = *p;
    *p = old | v;
    return old;
}
inline int atomicAdd(int* p, int v) {
    const int old = *p;
    *p = int(unsigned(old) + unsigned(v));
    return old;
}
template <class T> inline T __ldg(const T* p) { return *p; }
using std::max;
using std::min;

// ---- the twins of the inline-PTX device functions in qc_gpu.cuh ----
inline void qc_mma_b1_and(int32_t d[4], const uint32_t a[4], const uint32_t b[2]) {
    uint32_t in[10] = {a[0], a[1], a[2], a[3], b[0], b[1], uint32_t(d[0]), uint32_t(d[1]), uint32_t(d[2]),
                       uint32_t(d[3])};
    const uint32_t* out = qc_emu::warp_collective(qc_emu::OP_MMA_B1_AND, in, 10);
    for (int i = 0; i < 4; ++i) d[i] = int32_t(out[i]);
}
template <int BYTES> inline void qc_cp_async(void* smem, const void* gmem, bool valid) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    if (valid) std::memcpy(smem, gmem, BYTES);
    else std::memset(smem, 0, BYTES);
}
inline void qc_cp_async_commit() {}
template <int N> inline void qc_cp_async_wait() {}
