/*
 * camel_shim.h — the one C ABI between Python (camel/metal/, via ctypes)
 * and the GPU. Three libraries implement it:
 *
 *   shim/metal/         Apple GPUs through Metal (macOS, Apple Silicon)
 *   shim/sim/           the Metal simulator: the same .metal sources on the CPU
 *   shim/cuda/          NVIDIA GPUs: the same .metal sources translated to PTX,
 *                       run through the CUDA driver API
 *
 * Rules of the boundary
 *   - Plain C types and opaque handles only.
 *   - Every call reports failure: a NULL handle or a non-zero status.
 *     camel_last_error() then returns the message (NSError text, compiler
 *     log, kernel name, sizes). The message is valid until the next call
 *     into the shim from the same thread.
 *   - One device per process, created on first use by camel_init().
 *   - Dispatches are encoded into an open command buffer and committed
 *     lazily: camel_commit() sends the open one off, camel_synchronize()
 *     commits and waits for everything sent so far. A shim commits by itself
 *     every CAMEL_MAX_DISPATCHES_PER_COMMAND_BUFFER dispatches so no command
 *     buffer runs into the GPU watchdog.
 *   - A buffer released while a command buffer that uses it is still
 *     pending is freed only after that command buffer completes.
 */
#ifndef CAMEL_SHIM_H
#define CAMEL_SHIM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CAMEL_SHIM_ABI_VERSION 3
#define CAMEL_MAX_DISPATCHES_PER_COMMAND_BUFFER 256

/* Opaque handles. */
typedef struct camel_buffer camel_buffer;
typedef struct camel_library camel_library;
typedef struct camel_pipeline camel_pipeline;

/* ---- errors and device ------------------------------------------------ */

int camel_abi_version(void);        /* CAMEL_SHIM_ABI_VERSION */
const char *camel_last_error(void); /* "" when there was none */

/* Create the device, command queue and worker threads. Idempotent.
 * 0 on success; non-zero when no device exists (the message says why). */
int camel_init(void);

typedef struct camel_device_info {
    char name[128];                      /* "Apple M1 Max", "camel simulator (2 workers)" */
    int32_t is_simulator;                /* 1 for shim/sim */
    uint32_t max_threads_per_threadgroup;/* 1024 on Apple GPUs */
    uint32_t max_threadgroup_memory;     /* bytes; 32768 on Apple GPUs */
    uint32_t simd_width;                 /* 32 */
    uint64_t recommended_working_set;    /* bytes; 0 if unknown */
    int32_t host_mirrors;                /* 1: buffers are device memory with a host
                                            mirror (CUDA shim; see below); 0: shared */
} camel_device_info;
int camel_device_info_get(camel_device_info *out);

/* ---- buffers (MTLResourceStorageModeShared: one address for CPU and GPU) -- */

/* A new zero-filled buffer of nbytes (> 0). *contents receives the CPU
 * address of its storage, valid until the buffer is released. */
camel_buffer *camel_buffer_new(uint64_t nbytes, void **contents);
/* Release the caller's reference. Freed once no pending command buffer
 * uses it. Releasing twice is an error the shim reports, not a crash. */
int camel_buffer_release(camel_buffer *buffer);

/* Discrete GPUs (the CUDA shim, host_mirrors = 1): a buffer is device memory and
 * *contents a host mirror of it, synchronised only at these two calls, the analogues
 * of Metal's managed storage (synchronizeResource:, didModifyRange:). Shared storage
 * (Metal, simulator) needs neither: they are no-ops there.
 *   sync_to_host  waits for the pending work that uses the buffer, then copies the
 *                 device contents into the mirror (a host-modified range not yet
 *                 uploaded is kept).
 *   did_modify    the host wrote [offset, offset + length) of the mirror: it is
 *                 copied to the device before the next command that binds the buffer. */
int camel_buffer_sync_to_host(camel_buffer *buffer);
int camel_buffer_did_modify(camel_buffer *buffer, uint64_t offset, uint64_t length);

/* Live buffers and bytes currently allocated through this ABI. */
typedef struct camel_memory_info {
    uint64_t allocated_bytes;
    uint64_t buffers;
} camel_memory_info;
int camel_memory_info_get(camel_memory_info *out);

/* ---- libraries and pipelines ------------------------------------------- */

/* Compile MSL source. `path` names the source in compiler messages
 * ("shaders/ops_reduce.metal"); it may be NULL. On failure returns NULL and
 * camel_last_error() holds the compiler log with line numbers. */
camel_library *camel_library_new(const char *source, const char *path);
void camel_library_release(camel_library *library);

/* Kernel names in the library, separated by '\n', into out (cap bytes,
 * NUL-terminated). Returns the length needed, excluding the NUL. */
uint64_t camel_library_function_names(camel_library *library, char *out, uint64_t cap);

/* Pipeline for the kernel `name`. NULL if there is no such kernel (the
 * message lists the names there are) or the pipeline cannot be built. */
camel_pipeline *camel_pipeline_new(camel_library *library, const char *name);
void camel_pipeline_release(camel_pipeline *pipeline);

/* ---- function constants (Metal: MTLFunctionConstantValues) ----------------
 * `constant T name [[function_constant(index)]];` at program scope, T one of bool,
 * char, uchar, short, ushort, int, uint, half, float or a 2-4 vector of them but bool.
 * A library compiles with them unset (Apple does too); their values are given when a
 * pipeline is made, as newFunctionWithName:constantValues:error: does. */
enum camel_constant_type {
    CAMEL_CONSTANT_BOOL = 1,
    CAMEL_CONSTANT_CHAR = 2,
    CAMEL_CONSTANT_UCHAR = 3,
    CAMEL_CONSTANT_SHORT = 4,
    CAMEL_CONSTANT_USHORT = 5,
    CAMEL_CONSTANT_INT = 6,
    CAMEL_CONSTANT_UINT = 7,
    CAMEL_CONSTANT_HALF = 8,
    CAMEL_CONSTANT_FLOAT = 9,
};

typedef struct camel_constant_value {
    uint32_t index;      /* [[function_constant(index)]] */
    uint32_t type;       /* enum camel_constant_type */
    uint32_t components; /* 1 (scalar) .. 4 */
    uint8_t bytes[16];   /* the value, little-endian, elements packed (bool: 1 byte, 0 or 1) */
} camel_constant_value;

/* The function constants the library declares, one a line, "index type name"
 * (type as MSL spells it: "int", "float2"), into out as
 * camel_library_function_names does. Returns the length needed. */
uint64_t camel_library_function_constants(camel_library *library, char *out, uint64_t cap);

/* camel_pipeline_new with values for function constants (values may be NULL when
 * nvalues is 0). A value whose index no constant of the library has is ignored, as
 * Metal ignores it; one of another type than the constant's is an error. A constant
 * without a value is undefined (is_function_constant_defined is false): a kernel that
 * uses it otherwise fails here, the message naming it. camel_pipeline_new on a kernel
 * of a library with function constants is this call with no values. The simulator
 * and the CUDA shim compile the specialised kernel at this call (cached on disk,
 * reading CAMEL_INCLUDE_PATH again). */
camel_pipeline *camel_pipeline_new_with_constants(camel_library *library, const char *name,
                                                  const camel_constant_value *values,
                                                  uint32_t nvalues);

typedef struct camel_pipeline_info {
    uint32_t max_total_threads_per_threadgroup;
    uint32_t thread_execution_width;     /* SIMD width: 32 */
    uint32_t static_threadgroup_memory;  /* bytes of `threadgroup` variables */
} camel_pipeline_info;
int camel_pipeline_info_get(camel_pipeline *pipeline, camel_pipeline_info *out);

/* ---- dispatch ----------------------------------------------------------- */

/* Argument i of a dispatch binds [[buffer(i)]]: either a buffer at a byte
 * offset (buffer != NULL), or `length` bytes copied from `bytes` at encode
 * time (setBytes; length < 4096, Apple: "smaller than 4 kilobytes"). */
typedef struct camel_arg {
    camel_buffer *buffer;
    uint64_t offset;
    const void *bytes;
    uint64_t length;
} camel_arg;

typedef struct camel_dispatch_desc {
    camel_pipeline *pipeline;
    const camel_arg *args;              /* args[i] binds [[buffer(i)]] */
    uint32_t nargs;
    const uint32_t *threadgroup_memory; /* lengths for [[threadgroup(i)]] */
    uint32_t nthreadgroup_memory;
    uint32_t grid[3];                   /* threadgroups, or threads (see below) */
    uint32_t threads_per_threadgroup[3];
    int32_t grid_is_threads;            /* 1: dispatchThreads (partial edge groups)
                                           0: dispatchThreadgroups */
} camel_dispatch_desc;

/* Validate (threadgroup size against the pipeline's limit, threadgroup
 * memory against the device's, argument count and kinds against the
 * kernel's parameters) and encode into the open command buffer.
 * Returns the id of the command buffer it was encoded into (>= 1), or 0 on
 * error. */
uint64_t camel_dispatch(const camel_dispatch_desc *desc);

/* Commit the open command buffer, if any, without waiting. Returns its id,
 * or 0 when none was open. */
uint64_t camel_commit(void);

/* Commit, then wait until every committed command buffer has completed.
 * Non-zero if any command buffer failed since the last call (the message
 * names the kernel and the error). */
int camel_synchronize(void);

/* Id of the newest command buffer known to have completed. Buffers whose
 * last use was in command buffer <= this id are idle. */
uint64_t camel_completed_id(void);

/* GPU start and end of a completed command buffer, in seconds on one
 * monotonic clock (Metal: GPUStartTime/GPUEndTime; simulator: wall time).
 * Kept for the most recent 65536 command buffers. Non-zero if unknown. */
int camel_command_buffer_time(uint64_t id, double *start, double *end);

/* ---- extras -------------------------------------------------------------- */

/* C = A·B in FP32 through MPSMatrixMultiplication (row-major, contiguous,
 * A is M×K, B is K×N, C is M×N), encoded like a dispatch. The simulator
 * reports that MPS is unavailable. Returns the command buffer id or 0. */
uint64_t camel_mps_matmul(camel_buffer *a, camel_buffer *b, camel_buffer *c,
                          uint32_t m, uint32_t n, uint32_t k);

/* out = softmax(Q·Kᵀ·scale + mask)·V in FP32 through MPSGraph's fused
 * scaled-dot-product attention (macOS 15+): the vendor attention the flash
 * ladder is measured against. q, k, v and out are contiguous
 * (batch_heads, t, d) float32 at offset 0; causal != 0 masks key j > query i.
 * Runs in order with the dispatches around it (in its own command buffer,
 * after the open one is committed). Older macOS and the simulator report
 * that it is unavailable. Returns the command buffer id or 0. */
uint64_t camel_mpsgraph_attention(camel_buffer *q, camel_buffer *k, camel_buffer *v,
                                  camel_buffer *out, uint32_t batch_heads, uint32_t t,
                                  uint32_t d, float scale, int32_t causal);

/* Begin/end a programmatic GPU capture to a .gputrace file (Metal only). */
int camel_capture_begin(const char *path);
int camel_capture_end(void);

#ifdef __cplusplus
}
#endif
#endif /* CAMEL_SHIM_H */
