/*
 * cuda_abi.h — the interface inside the CUDA shim between
 *   the translator  (shim/cuda/translate_cuda.cpp + shim/cuda/include/: MSL in,
 *                    one self-contained CUDA translation unit and PTX out)
 *   and the runtime (shim/cuda/runtime.cpp: camel_shim.h over the CUDA driver
 *                    API, loaded with dlopen("libcuda.so.1")).
 *
 * Every kernel of a .metal file becomes
 *     extern "C" __global__ void camel_<host_name>(camel_cuda_args args);
 * (camel_kernel_<n> where the host name is not a C identifier), so profilers
 * and compute-sanitizer name the kernel;
 * whose body computes Metal's builtins from threadIdx/blockIdx/blockDim and
 * `args`, binds [[buffer(i)]] to args.buffers[i] and [[threadgroup(i)]] to
 * dynamic shared memory at args.threadgroup_offset[i], then calls the kernel.
 *
 * Metal's dispatchThreads gives the edge threadgroups of a grid fewer threads;
 * CUDA blocks are uniform. The runtime therefore launches a grid as up to
 * eight uniform pieces (full groups, and the edge in x, y, z), each with the
 * exact block size Metal would give, and `group_origin` says where the piece
 * starts: threadgroup_position_in_grid = group_origin + blockIdx, and
 * threads_per_threadgroup = blockDim (the edge size, as Metal reports).
 */
#ifndef CAMEL_CUDA_ABI_H
#define CAMEL_CUDA_ABI_H

/* The translated kernels include this file with no C library: there
 * camel_cuda_msl.h defines the fixed-width types first. */
#ifndef __CAMEL_CUDA__
#include <stdint.h>
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define CAMEL_CUDA_MAX_BUFFERS 31      /* [[buffer(0..30)]], as Metal */
#define CAMEL_CUDA_MAX_THREADGROUP 31  /* [[threadgroup(0..30)]] */

/* The one kernel parameter (by value, 420 bytes). */
typedef struct camel_cuda_args {
    void *buffers[CAMEL_CUDA_MAX_BUFFERS];       /* device address of [[buffer(i)]] (+ offset);
                                                    setBytes data is staged in device memory */
    uint32_t threadgroup_offset[CAMEL_CUDA_MAX_THREADGROUP]; /* byte offset of [[threadgroup(i)]]
                                                    in the dynamic shared memory */
    uint32_t group_origin[3];                    /* threadgroup position of blockIdx (0,0,0) */
    uint32_t threadgroups_per_grid[3];           /* the whole dispatch, all pieces */
    uint32_t threads_per_grid[3];                /* dispatchThreads: the exact grid;
                                                    dispatchThreadgroups: groups * size */
    uint32_t dispatch_threads_per_threadgroup[3];/* the requested (full) threadgroup size */
} camel_cuda_args;

/* Parameter kinds, as in the simulator (shim/front/sim_abi.h). */
enum camel_cuda_param_kind {
    CAMEL_CUDA_PARAM_BUFFER = 1,
    CAMEL_CUDA_PARAM_THREADGROUP = 2,
    CAMEL_CUDA_PARAM_BUILTIN = 3,
    CAMEL_CUDA_PARAM_ABSENT = 4,  /* an optional argument this specialisation does not declare
                                     ([[function_constant(name)]], name false or without a
                                     value): nothing binds it, the kernel sees a null pointer */
};

/* The translator, exported by libcamel_cuda.so (usable without a GPU or driver). */

/* MSL source -> the complete CUDA translation unit (what camel.metal.translate
 * returns), plus a description of its kernels, one line each:
 *     kernel <n> <host_name> <uses_barrier 0|1> <uses_simd 0|1> <entry symbol>
 *     param <n> <position> <name> <kind 1|2|3|4> <binding index> <is_pointer 0|1>
 * n counts the kernels from 0 in source order (template instantiations where
 * they are instantiated); the param lines of kernel n follow its kernel line,
 * in parameter order. uses_barrier: the kernel reaches threadgroup_barrier
 * (directly or through a helper); uses_simd: it reaches a SIMD-group or
 * quad-group function or simdgroup_matrix (including simdgroup_barrier).
 * binding index: [[buffer(i)]] / [[threadgroup(i)]] (when omitted, the first index no
 * other parameter writes, in order: MSL 5.2.1), -1 for builtins; an unnamed parameter's name is "-".
 * Sizes of parameters bound by value or reference (setBytes must match) are in
 * the module as  extern "C" __device__ const uint32_t camel_kernel_<n>_value_sizes[nparams]
 * (0 for pointers and builtins; one 0 for a kernel without parameters), in
 * .const memory: cuModuleGetGlobal + cuMemcpyDtoH read it after the module loads.
 * 0 on success; otherwise non-zero and a malloc'd message in *log naming the
 * .metal line. Outputs are malloc'd; free them with camel_cuda_free.
 *
 * What else the runtime must know (added with the translator):
 *   - the PTX's only external symbol is vprintf (printf and the message of a
 *     trapped simdgroup_matrix with a partial warp), which the driver provides
 *   - [[threadgroup(i)]] memory is `extern __shared__` __camel_threadgroup_memory
 *     (16-byte aligned): give each offset 16-byte aligned and sharedMemBytes =
 *     the sum; static threadgroup arrays are ordinary __shared__ variables,
 *     CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES; above 48 KiB in total the launch
 *     needs CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
 *   - no __launch_bounds__: the most threads a kernel can take is
 *     CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK (may be < 1024 for kernels with
 *     many registers), Metal's maxTotalThreadsPerThreadgroup
 *   - every CUDA thread of a launch is a Metal thread (no bounds check in the
 *     wrapper): launch exactly the pieces described at the top
 *   - SIMD-group functions act on __activemask(); simdgroup_matrix needs all 32
 *     lanes and otherwise traps (the context is then unusable: CUDA_ERROR_LAUNCH_FAILED
 *     or _ILLEGAL_INSTRUCTION, with the message on stdout through vprintf) */
int camel_cuda_translate(const char *source, const char *path, char **cuda_source,
                         char **kernels, char **log);

/* Translate and compile to PTX for sm_<arch> (80, 90, ...) with clang
 * (-x cuda --cuda-device-only -nocudainc -nocudalib), cached on disk by the hash
 * of source, path, arch, compiler and headers. *ptx: the PTX text; *kernels as above. */
int camel_cuda_compile(const char *source, const char *path, int arch, char **ptx,
                       char **kernels, char **log);

/* camel_cuda_compile of one kernel with its function constants' values (a pipeline of
 * camel_pipeline_new_with_constants): `values` holds a line "<index> <MSL expression>"
 * per constant given a value (the simulator's constant_literal spells them); a constant
 * without one is undefined (is_function_constant_defined false) and a use of it that the
 * optimiser keeps is an error naming it. The PTX has only that kernel's entry, and the
 * description (above) ends with a line per function constant the source declares:
 *     constant <index> <type> <name>
 * (camel_cuda_compile's description has these lines too). */
int camel_cuda_compile_specialised(const char *source, const char *path, int arch,
                                   const char *kernel, const char *values, char **ptx,
                                   char **kernels, char **log);

void camel_cuda_free(void *p);

#ifdef __cplusplus
}
#endif
#endif /* CAMEL_CUDA_ABI_H */
