// camel_cuda_msl.h — the Metal Shading Language standard library for MSL
// compiled as CUDA (clang -x cuda --cuda-device-only -nocudainc -nocudalib).
//
// Most of MSL is the header both targets share (../../front/include/camel_sim_msl.h:
// vector types with swizzles, bool vectors, constructors, integer, relational
// and geometric functions, as_type, atomics). What differs on a GPU is here:
//   - no CUDA headers: the few CUDA keywords we need, and the thread indices
//     as the NVPTX special registers
//   - every function is __host__ __device__ (#pragma clang force_cuda_host_device),
//     so MSL's helper functions and kernels need no annotation; the pragma is
//     closed by the translator after the kernel source
//   - math without libdevice: camel_cuda_math.h (the simulator header spells
//     math as clang builtins such as __builtin_expf; they are redirected there)
//   - barriers, SIMD-group functions and simdgroup_matrix on warps:
//     camel_cuda_simd.h, included right after the shared header (the
//     simulator's <metal_stdlib> includes its camel_sim_simd.h there)
//   - the entry-wrapper helpers: Metal's builtins from threadIdx/blockIdx
//     and camel_cuda_args (../cuda_abi.h)
#pragma once
#define __CAMEL_CUDA__ 1
#define __METAL_CUDA__ 1

#ifndef __device__
#define __host__ __attribute__((host))
#define __device__ __attribute__((device))
#define __global__ __attribute__((global))
#define __shared__ __attribute__((shared))
#define __constant__ __attribute__((constant))
#endif

// <stdint.h> without a C library (cuda_abi.h uses these names)
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
#include "../cuda_abi.h"

#ifdef __CUDA__
#pragma clang force_cuda_host_device begin
#endif

#include "camel_cuda_math.h"
#define __builtin_expf camel_cuda_math::expf
#define __builtin_exp2f camel_cuda_math::exp2f
#define __builtin_logf camel_cuda_math::logf
#define __builtin_log2f camel_cuda_math::log2f
#define __builtin_log10f camel_cuda_math::log10f
#define __builtin_powf camel_cuda_math::powf
#define __builtin_sinf camel_cuda_math::sinf
#define __builtin_cosf camel_cuda_math::cosf
#define __builtin_tanf camel_cuda_math::tanf
#define __builtin_asinf camel_cuda_math::asinf
#define __builtin_acosf camel_cuda_math::acosf
#define __builtin_atanf camel_cuda_math::atanf
#define __builtin_atan2f camel_cuda_math::atan2f
#define __builtin_sinhf camel_cuda_math::sinhf
#define __builtin_coshf camel_cuda_math::coshf
#define __builtin_tanhf camel_cuda_math::tanhf
#define __builtin_asinhf camel_cuda_math::asinhf
#define __builtin_acoshf camel_cuda_math::acoshf
#define __builtin_atanhf camel_cuda_math::atanhf
#define __builtin_fmodf camel_cuda_math::fmodf
#define __builtin_nextafterf camel_cuda_math::nextafterf
#define __builtin_frexpf camel_cuda_math::frexpf
#define __builtin_ldexpf camel_cuda_math::ldexpf
#define __builtin_ilogbf camel_cuda_math::ilogbf

// The thread's place, from the NVPTX special registers (CUDA's threadIdx ...).
#define __camel_tid(c) (uint32_t) __nvvm_read_ptx_sreg_tid_##c()
#define __camel_ctaid(c) (uint32_t) __nvvm_read_ptx_sreg_ctaid_##c()
#define __camel_ntid(c) (uint32_t) __nvvm_read_ptx_sreg_ntid_##c()
inline unsigned __camel_laneid() { return __nvvm_read_ptx_sreg_laneid(); }

// printf in a kernel: clang turns device-side printf into CUDA's vprintf.
extern "C" int printf(const char *, ...);

#include "../../front/include/camel_sim_msl.h"  // the MSL library both targets share
#include "camel_cuda_simd.h"                    // this target's barriers, SIMD groups, matrices

// ---------------------------------------------------------------------------
// The entry wrappers' view of a thread: the fields of camel_sim_thread (so the
// generated code reads the same as the simulator's), computed from the block
// and camel_cuda_args. The runtime launches each piece of a dispatch with the
// exact threadgroup size Metal gives it, so blockDim is that size.
// ---------------------------------------------------------------------------
struct __camel_thread {
    uint32_t thread_position_in_grid[3];
    uint32_t thread_position_in_threadgroup[3];
    uint32_t threadgroup_position_in_grid[3];
    uint32_t threads_per_threadgroup[3];
    uint32_t dispatch_threads_per_threadgroup[3];
    uint32_t threadgroups_per_grid[3];
    uint32_t threads_per_grid[3];
    uint32_t thread_index_in_threadgroup;
    uint32_t thread_index_in_simdgroup;
    uint32_t simdgroup_index_in_threadgroup;
    uint32_t simdgroups_per_threadgroup;
    uint32_t threads_per_simdgroup;
    uint32_t thread_index_in_quadgroup;
    uint32_t quadgroup_index_in_threadgroup;
    uint32_t quadgroups_per_threadgroup;
};
inline __camel_thread __camel_thread_of(const camel_cuda_args &a) {
    __camel_thread t;
    uint32_t tid[3] = {__camel_tid(x), __camel_tid(y), __camel_tid(z)};
    uint32_t ctaid[3] = {__camel_ctaid(x), __camel_ctaid(y), __camel_ctaid(z)};
    uint32_t ntid[3] = {__camel_ntid(x), __camel_ntid(y), __camel_ntid(z)};
    for (int i = 0; i < 3; i++) {
        t.thread_position_in_threadgroup[i] = tid[i];
        t.threadgroup_position_in_grid[i] = a.group_origin[i] + ctaid[i];
        t.threads_per_threadgroup[i] = ntid[i];
        t.dispatch_threads_per_threadgroup[i] = a.dispatch_threads_per_threadgroup[i];
        t.threadgroups_per_grid[i] = a.threadgroups_per_grid[i];
        t.threads_per_grid[i] = a.threads_per_grid[i];
        // Metal: the group's position times the requested (full) size, plus the local one
        t.thread_position_in_grid[i] =
            t.threadgroup_position_in_grid[i] * a.dispatch_threads_per_threadgroup[i] + tid[i];
    }
    uint32_t n = ntid[0] * ntid[1] * ntid[2];
    t.thread_index_in_threadgroup = tid[0] + ntid[0] * (tid[1] + ntid[1] * tid[2]);
    // CUDA forms warps from the same linear index, so these are the hardware lanes
    t.thread_index_in_simdgroup = t.thread_index_in_threadgroup % 32;
    t.simdgroup_index_in_threadgroup = t.thread_index_in_threadgroup / 32;
    t.simdgroups_per_threadgroup = (n + 31) / 32;
    t.threads_per_simdgroup = 32;
    t.thread_index_in_quadgroup = t.thread_index_in_threadgroup % 4;
    t.quadgroup_index_in_threadgroup = t.thread_index_in_threadgroup / 4;
    t.quadgroups_per_threadgroup = (n + 3) / 4;
    return t;
}

// [[threadgroup(i)]] parameters: the launch's dynamic shared memory, at
// args.threadgroup_offset[i] (the runtime keeps each offset 16-byte aligned).
extern __shared__ __attribute__((aligned(16))) unsigned char __camel_threadgroup_memory[];
