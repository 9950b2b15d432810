// runtime.cpp — the camel_* C ABI (shim/camel_shim.h) over the CUDA driver API.
//
// The same calls Python makes on a Mac, on an NVIDIA GPU:
//   - libcuda.so.1 is opened with dlopen at run time (no CUDA toolkit to build camel);
//     the primary context of device 0, two non-blocking streams (work, downloads).
//   - A library is the PTX that the translator (camel_cuda_compile, cuda_abi.h) makes
//     from the .metal source, loaded with cuModuleLoadDataEx; a pipeline is one kernel.
//   - A buffer is device memory plus a host mirror (a discrete GPU has no unified
//     memory; no managed memory either). Python writes the mirror and calls
//     camel_buffer_did_modify; the range is uploaded, in stream order, before the next
//     command that binds the buffer. camel_buffer_sync_to_host waits for the last
//     command buffer that used the buffer and copies device -> mirror.
//   - Command buffers are lists of commands (uploads, launches, cuBLAS GEMMs) that
//     camel_commit enqueues on the stream between two CUDA events (the GPU time that
//     camel.profile() shows). Resources they use are released when the end event fires.
//   - dispatchThreads becomes up to eight uniform launches with Metal's edge sizes
//     (see cuda_abi.h), so threads outside the grid never run.
#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <deque>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "../camel_shim.h"
#include "../front/copy_out.h"
#include "../front/translate_internal.h"  // constant_literal (translate.cpp)
#include "../front/unbound_args.h"
#include "cuda_abi.h"

#define CAMEL_EXPORT extern "C" __attribute__((visibility("default")))

// Until the translator (translate_cuda.cpp) is linked in, libraries can only come from
// camel_cuda_library_load. The real definition replaces this weak one.
extern "C" __attribute__((weak)) int camel_cuda_compile(const char *, const char *, int,
                                                        char **ptx, char **kernels, char **log) {
    *ptx = *kernels = nullptr;
    *log = strdup("[cuda] this build has no MSL-to-CUDA translator (shim/cuda/translate_cuda.cpp)");
    return 1;
}
extern "C" __attribute__((weak)) void camel_cuda_free(void *p) { free(p); }
extern "C" __attribute__((weak)) int camel_cuda_compile_specialised(const char *, const char *, int,
                                                                    const char *, const char *,
                                                                    char **ptx, char **kernels,
                                                                    char **log) {
    *ptx = *kernels = nullptr;
    *log = strdup("[cuda] this build has no MSL-to-CUDA translator (shim/cuda/translate_cuda.cpp)");
    return 1;
}

// ---- the few driver API types and functions we use (cuda.h, declared by hand) -----------

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st *CUcontext;
typedef struct CUmod_st *CUmodule;
typedef struct CUfunc_st *CUfunction;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;

enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_PTX = 218,
    CUDA_ERROR_UNSUPPORTED_PTX_VERSION = 222,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_TIMEOUT = 702,
    CUDA_ERROR_ASSERT = 710,
    CUDA_ERROR_HARDWARE_STACK_ERROR = 714,
    CUDA_ERROR_ILLEGAL_INSTRUCTION = 715,
    CUDA_ERROR_MISALIGNED_ADDRESS = 716,
    CUDA_ERROR_INVALID_ADDRESS_SPACE = 717,
    CUDA_ERROR_INVALID_PC = 718,
    CUDA_ERROR_LAUNCH_FAILED = 719,
};
enum : int {  // CUdevice_attribute
    ATTR_MAX_THREADS_PER_BLOCK = 1,
    ATTR_MAX_BLOCK_DIM_X = 2,
    ATTR_MAX_GRID_DIM_X = 5,
    ATTR_WARP_SIZE = 10,
    ATTR_CC_MAJOR = 75,
    ATTR_CC_MINOR = 76,
    ATTR_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97,
};
enum : int {  // CUfunction_attribute
    FUNC_MAX_THREADS_PER_BLOCK = 0,
    FUNC_SHARED_SIZE_BYTES = 1,
    FUNC_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8,
};
enum : int {  // CUjit_option
    JIT_INFO_LOG_BUFFER = 3,
    JIT_INFO_LOG_BUFFER_SIZE_BYTES = 4,
    JIT_ERROR_LOG_BUFFER = 5,
    JIT_ERROR_LOG_BUFFER_SIZE_BYTES = 6,
    JIT_LOG_VERBOSE = 12,
};
constexpr unsigned kStreamNonBlocking = 1;  // CU_STREAM_NON_BLOCKING

static struct Driver {
    void *dl = nullptr;
    CUresult (*Init)(unsigned);
    CUresult (*DeviceGetCount)(int *);
    CUresult (*DeviceGet)(CUdevice *, int);
    CUresult (*DeviceGetName)(char *, int, CUdevice);
    CUresult (*DeviceGetAttribute)(int *, int, CUdevice);
    CUresult (*DeviceTotalMem)(size_t *, CUdevice);
    CUresult (*DevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*CtxSetCurrent)(CUcontext);
    CUresult (*StreamCreate)(CUstream *, unsigned);
    CUresult (*StreamSynchronize)(CUstream);
    CUresult (*EventCreate)(CUevent *, unsigned);
    CUresult (*EventRecord)(CUevent, CUstream);
    CUresult (*EventQuery)(CUevent);
    CUresult (*EventSynchronize)(CUevent);
    CUresult (*EventElapsedTime)(float *, CUevent, CUevent);
    CUresult (*MemAlloc)(CUdeviceptr *, size_t);
    CUresult (*MemFree)(CUdeviceptr);
    CUresult (*MemHostAlloc)(void **, size_t, unsigned);
    CUresult (*MemFreeHost)(void *);
    CUresult (*MemcpyHtoDAsync)(CUdeviceptr, const void *, size_t, CUstream);
    CUresult (*MemcpyDtoHAsync)(void *, CUdeviceptr, size_t, CUstream);
    CUresult (*MemsetD8Async)(CUdeviceptr, unsigned char, size_t, CUstream);
    CUresult (*MemGetInfo)(size_t *, size_t *);
    CUresult (*ModuleLoadDataEx)(CUmodule *, const void *, unsigned, int *, void **);
    CUresult (*ModuleUnload)(CUmodule);
    CUresult (*ModuleGetFunction)(CUfunction *, CUmodule, const char *);
    CUresult (*ModuleGetGlobal)(CUdeviceptr *, size_t *, CUmodule, const char *);
    CUresult (*FuncGetAttribute)(int *, int, CUfunction);
    CUresult (*FuncSetAttribute)(CUfunction, int, int);
    CUresult (*LaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, unsigned, CUstream, void **, void **);
    CUresult (*GetErrorName)(CUresult, const char **);
    CUresult (*GetErrorString)(CUresult, const char **);
} D;

// Entry points, newest name first (the _v2 ones are what cuda.h's macros pick).
struct Symbol {
    const char *names[2];
    void **slot;
};
static const Symbol kSymbols[] = {
    {{"cuInit"}, (void **)&D.Init},
    {{"cuDeviceGetCount"}, (void **)&D.DeviceGetCount},
    {{"cuDeviceGet"}, (void **)&D.DeviceGet},
    {{"cuDeviceGetName"}, (void **)&D.DeviceGetName},
    {{"cuDeviceGetAttribute"}, (void **)&D.DeviceGetAttribute},
    {{"cuDeviceTotalMem_v2", "cuDeviceTotalMem"}, (void **)&D.DeviceTotalMem},
    {{"cuDevicePrimaryCtxRetain"}, (void **)&D.DevicePrimaryCtxRetain},
    {{"cuCtxSetCurrent"}, (void **)&D.CtxSetCurrent},
    {{"cuStreamCreate"}, (void **)&D.StreamCreate},
    {{"cuStreamSynchronize"}, (void **)&D.StreamSynchronize},
    {{"cuEventCreate"}, (void **)&D.EventCreate},
    {{"cuEventRecord"}, (void **)&D.EventRecord},
    {{"cuEventQuery"}, (void **)&D.EventQuery},
    {{"cuEventSynchronize"}, (void **)&D.EventSynchronize},
    {{"cuEventElapsedTime_v2", "cuEventElapsedTime"}, (void **)&D.EventElapsedTime},
    {{"cuMemAlloc_v2", "cuMemAlloc"}, (void **)&D.MemAlloc},
    {{"cuMemFree_v2", "cuMemFree"}, (void **)&D.MemFree},
    {{"cuMemHostAlloc"}, (void **)&D.MemHostAlloc},
    {{"cuMemFreeHost"}, (void **)&D.MemFreeHost},
    {{"cuMemcpyHtoDAsync_v2", "cuMemcpyHtoDAsync"}, (void **)&D.MemcpyHtoDAsync},
    {{"cuMemcpyDtoHAsync_v2", "cuMemcpyDtoHAsync"}, (void **)&D.MemcpyDtoHAsync},
    {{"cuMemsetD8Async"}, (void **)&D.MemsetD8Async},
    {{"cuMemGetInfo_v2", "cuMemGetInfo"}, (void **)&D.MemGetInfo},
    {{"cuModuleLoadDataEx"}, (void **)&D.ModuleLoadDataEx},
    {{"cuModuleUnload"}, (void **)&D.ModuleUnload},
    {{"cuModuleGetFunction"}, (void **)&D.ModuleGetFunction},
    {{"cuModuleGetGlobal_v2", "cuModuleGetGlobal"}, (void **)&D.ModuleGetGlobal},
    {{"cuFuncGetAttribute"}, (void **)&D.FuncGetAttribute},
    {{"cuFuncSetAttribute"}, (void **)&D.FuncSetAttribute},
    {{"cuLaunchKernel"}, (void **)&D.LaunchKernel},
    {{"cuGetErrorName"}, (void **)&D.GetErrorName},
    {{"cuGetErrorString"}, (void **)&D.GetErrorString},
};

// "CUDA_ERROR_ILLEGAL_ADDRESS (an illegal memory access was encountered)"
static std::string cu_error(CUresult r) {
    const char *name = nullptr, *text = nullptr;
    if (D.GetErrorName) D.GetErrorName(r, &name);
    if (D.GetErrorString) D.GetErrorString(r, &text);
    std::string s = name ? name : "CUDA error " + std::to_string(r);
    if (text) s += std::string(" (") + text + ")";
    return s;
}

// Errors after which the context cannot be used again (the driver's "sticky" errors).
static bool is_sticky(CUresult r) {
    switch (r) {
        case CUDA_ERROR_ILLEGAL_ADDRESS:
        case CUDA_ERROR_LAUNCH_TIMEOUT:
        case CUDA_ERROR_ASSERT:
        case CUDA_ERROR_HARDWARE_STACK_ERROR:
        case CUDA_ERROR_ILLEGAL_INSTRUCTION:
        case CUDA_ERROR_MISALIGNED_ADDRESS:
        case CUDA_ERROR_INVALID_ADDRESS_SPACE:
        case CUDA_ERROR_INVALID_PC:
        case CUDA_ERROR_LAUNCH_FAILED:
            return true;
        default:
            return false;
    }
}

// ---- cuBLAS, for camel_mps_matmul ("kernel 0" of the matmul ladder) ------------------

typedef struct cublasContext *cublasHandle_t;
static struct Blas {
    bool tried = false;
    void *dl = nullptr;
    cublasHandle_t handle = nullptr;
    std::string error;  // why it is unavailable
    int (*Create)(cublasHandle_t *);
    int (*SetStream)(cublasHandle_t, CUstream);
    int (*SetMathMode)(cublasHandle_t, int);
    int (*Sgemm)(cublasHandle_t, int, int, int, int, int, const float *, const float *, int,
                 const float *, int, const float *, float *, int);
} B;
constexpr int kCublasOpN = 0, kCublasDefaultMath = 0;

// ---- errors ---------------------------------------------------------------------------

static thread_local std::string tl_error;

__attribute__((format(printf, 1, 2))) static void set_error(const char *fmt, ...) {
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    tl_error = buf;
}

CAMEL_EXPORT const char *camel_last_error(void) { return tl_error.c_str(); }
CAMEL_EXPORT int camel_abi_version(void) { return CAMEL_SHIM_ABI_VERSION; }

static double now_seconds() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// ---- objects ----------------------------------------------------------------------------

constexpr uint64_t kPinnedMirrorMax = 1 << 20;  // larger mirrors: lazily committed mmap pages
constexpr uint32_t kMaxSetBytes = 4095;  // as Metal: setBytes takes "smaller than 4 KB"
constexpr uint32_t kStagingChunk = 256 * 1024;  // > 31 * 4096: one dispatch always fits
constexpr uint32_t kEagerCommit = 16;           // commit early when the GPU runs dry

struct camel_buffer {
    CUdeviceptr dptr;
    void *mirror;
    uint64_t nbytes;
    bool pinned;        // mirror from cuMemHostAlloc (else mmap)
    int refs;           // 1 for the caller's handle + 1 per command buffer that uses it
    bool released;      // the caller has called camel_buffer_release
    uint64_t dirty_lo;  // host-written range of the mirror not yet uploaded [lo, hi)
    uint64_t dirty_hi;
    bool device_newer;  // bound by a command since the last download
    uint64_t last_use;  // newest command buffer that binds it
};

struct Param {
    int position;
    std::string name;
    int kind;
    int index;
    bool is_pointer;
    uint32_t value_size;  // from camel_kernel_<n>_value_sizes; 0: not checked
};

struct Kernel {
    int n;
    std::string name;   // the MSL (host) name
    std::string entry;  // the __global__ function in the PTX: camel_<name>
    bool uses_barrier = false, uses_simd = false;
    std::vector<Param> params;
    int max_buffer_index = -1;
};

struct camel_library {
    CUmodule module;
    std::vector<Kernel> kernels;
    std::string path;  // for messages
    int refs;          // 1 for the caller + 1 per live pipeline
    // Function constants ("index type name" lines; "" for none). A library that has them
    // keeps its source: each pipeline is a specialisation compiled from it.
    std::string constants;
    std::string source;
};

struct camel_pipeline {
    camel_library *library;
    const Kernel *kernel;
    CUfunction fn;
    int refs;                    // 1 for the caller + 1 per command buffer that uses it
    uint32_t max_threads;        // CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK (registers!)
    uint32_t static_smem;        // bytes of `threadgroup` variables (__shared__)
    uint32_t dynamic_smem_limit; // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES set so far
};

// Device and pinned host memory for setBytes data, reused once its command buffer is done.
struct Chunk {
    CUdeviceptr dev;
    uint8_t *host;
    uint32_t used;
};

struct Piece {  // one uniform launch of a dispatch
    uint32_t grid[3], block[3], origin[3];
};

struct Command {
    enum Kind { kUpload, kLaunch, kGemm } kind;
    camel_buffer *buffer = nullptr;  // kUpload
    uint64_t lo = 0, hi = 0;
    camel_pipeline *pipeline = nullptr;  // kLaunch
    camel_cuda_args args;
    std::vector<Piece> pieces;
    uint32_t smem = 0;
    uint32_t request[3] = {0, 0, 0}, tpg[3] = {0, 0, 0};  // as asked, for messages
    bool grid_is_threads = false;
    camel_buffer *gemm[3] = {nullptr, nullptr, nullptr};  // kGemm: a, b, c
    uint32_t m = 0, n = 0, k = 0;
};

struct CommandBuffer {
    uint64_t id;
    std::vector<Command> commands;
    uint32_t ndispatches = 0;
    std::vector<camel_buffer *> retained;  // one ref each (a buffer once per command buffer)
    std::vector<camel_pipeline *> pipelines;
    std::vector<Chunk *> chunks;
    CUevent start = nullptr, end = nullptr;
    std::string enqueue_error;  // a launch the driver refused at commit
};

static struct State {
    std::mutex mu;  // every ABI call that touches the state below holds it
    bool ready = false;
    std::string init_error;  // why camel_init failed (repeated on every later call)
    CUdevice device = 0;
    CUcontext ctx = nullptr;
    CUstream stream = nullptr, copy_stream = nullptr;
    char name[128] = {0};
    int arch = 0;  // 90 for sm_90
    uint32_t max_threads = 1024, max_block[3] = {1024, 1024, 64}, max_grid[3] = {0x7fffffff,
                                                                                 65535, 65535};
    uint32_t smem_optin = 49152, warp = 32;
    uint64_t total_mem = 0;
    bool sync_each = false;  // CAMEL_CUDA_SYNC=1: wait after every dispatch
    std::string dead;        // set by a sticky error: the context is unusable
    std::unordered_set<camel_buffer *> buffers;  // live handles (released ones until freed)
    uint64_t allocated_bytes = 0;
    CommandBuffer *open = nullptr;
    uint64_t next_id = 1, completed_id = 0;
    std::deque<CommandBuffer *> pending;  // committed, not yet seen complete
    std::string failure;                  // first failure since the last camel_synchronize
    std::vector<Chunk *> free_chunks;
    std::vector<CUevent> free_events;
    CUevent chain_event = nullptr;  // start event of the last completed command buffer
    double chain_time = 0;          // its start, in seconds
} S;

constexpr uint64_t kTimes = 65536;
struct CbTime {
    uint64_t id;
    double start, end;
};
static CbTime cb_times[kTimes];

static thread_local bool tl_ctx_current = false;

// ---- device ---------------------------------------------------------------------------

static bool init_locked() {
    if (S.ready) return true;
    if (!S.init_error.empty()) {
        tl_error = S.init_error;
        return false;
    }
    auto fail = [](const std::string &msg) {
        S.init_error = msg;
        tl_error = msg;
        return false;
    };
    D.dl = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!D.dl)
        return fail(std::string("[cuda] no NVIDIA driver: cannot load libcuda.so.1 (") + dlerror() +
                    "). Install the NVIDIA driver, or run the kernels on the CPU simulator "
                    "with CAMEL_SHIM=sim");
    for (const Symbol &s : kSymbols) {
        for (const char *n : s.names)
            if (n && !*s.slot) *s.slot = dlsym(D.dl, n);
        if (!*s.slot)
            return fail(std::string("[cuda] libcuda.so.1 has no ") + s.names[0] +
                        ": the NVIDIA driver is too old for camel (CUDA 12 or newer needed)");
    }
    CUresult r = D.Init(0);
    int count = 0;
    if (r == CUDA_SUCCESS) r = D.DeviceGetCount(&count);
    if (r != CUDA_SUCCESS || count == 0)
        return fail("[cuda] no CUDA device: " +
                    (r != CUDA_SUCCESS ? "cuInit failed with " + cu_error(r)
                                       : std::string("the driver sees 0 devices")) +
                    ". Check nvidia-smi and CUDA_VISIBLE_DEVICES, or run on the CPU simulator "
                    "with CAMEL_SHIM=sim");
    if ((r = D.DeviceGet(&S.device, 0)) || (r = D.DevicePrimaryCtxRetain(&S.ctx, S.device)) ||
        (r = D.CtxSetCurrent(S.ctx)) || (r = D.StreamCreate(&S.stream, kStreamNonBlocking)) ||
        (r = D.StreamCreate(&S.copy_stream, kStreamNonBlocking)))
        return fail("[cuda] cannot set up device 0 (primary context, streams): " + cu_error(r));
    tl_ctx_current = true;
    char name[100] = {0};
    D.DeviceGetName(name, sizeof name - 1, S.device);
    snprintf(S.name, sizeof S.name, "%s (CUDA shim: MSL translated to PTX)", name);
    int major = 0, minor = 0;
    auto attr = [](int a, int fallback) {
        int value = 0;
        return D.DeviceGetAttribute(&value, a, S.device) == CUDA_SUCCESS && value > 0 ? value
                                                                                       : fallback;
    };
    S.max_threads = attr(ATTR_MAX_THREADS_PER_BLOCK, 1024);
    for (int a = 0; a < 3; a++) {
        S.max_block[a] = attr(ATTR_MAX_BLOCK_DIM_X + a, a == 2 ? 64 : 1024);
        S.max_grid[a] = attr(ATTR_MAX_GRID_DIM_X + a, a == 0 ? 0x7fffffff : 65535);
    }
    S.warp = attr(ATTR_WARP_SIZE, 32);
    S.smem_optin = attr(ATTR_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, 49152);
    major = attr(ATTR_CC_MAJOR, 8);
    minor = attr(ATTR_CC_MINOR, 0);
    S.arch = major * 10 + minor;
    size_t total = 0;
    if (D.DeviceTotalMem(&total, S.device) == CUDA_SUCCESS) S.total_mem = total;
    const char *sync = getenv("CAMEL_CUDA_SYNC");
    S.sync_each = sync && *sync && strcmp(sync, "0") != 0;
    S.ready = true;
    return true;
}

// Every entry point: the device exists, this thread has the context, no sticky error.
static bool ready_locked(bool allow_dead = false) {
    if (!init_locked()) return false;
    if (!tl_ctx_current) {
        D.CtxSetCurrent(S.ctx);
        tl_ctx_current = true;
    }
    if (!allow_dead && !S.dead.empty()) {
        tl_error = S.dead;
        return false;
    }
    return true;
}

// Calls that reach the driver from a thread that may not have the context yet.
static void bind_thread() {
    if (S.ready && !tl_ctx_current) {
        D.CtxSetCurrent(S.ctx);
        tl_ctx_current = true;
    }
}

CAMEL_EXPORT int camel_init(void) {
    std::lock_guard<std::mutex> lock(S.mu);
    tl_error.clear();
    return ready_locked(true) ? 0 : 1;
}

CAMEL_EXPORT int camel_device_info_get(camel_device_info *out) {
    // A query: keeps the last error readable (Python reads limits for its message).
    std::lock_guard<std::mutex> lock(S.mu);
    if (!ready_locked(true)) return 1;
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "%s", S.name);
    out->is_simulator = 0;
    out->max_threads_per_threadgroup = S.max_threads;
    out->max_threadgroup_memory = S.smem_optin;
    out->simd_width = S.warp;
    out->recommended_working_set = S.total_mem;
    out->host_mirrors = 1;
    return 0;
}

// ---- command buffer bookkeeping -------------------------------------------------------

static void buffer_free(camel_buffer *b) {  // S.mu held
    S.allocated_bytes -= b->nbytes;
    S.buffers.erase(b);
    D.MemFree(b->dptr);  // fails harmlessly in a dead context
    if (b->pinned)
        D.MemFreeHost(b->mirror);
    else
        munmap(b->mirror, b->nbytes);
    delete b;
}

static void buffer_unref(camel_buffer *b) {  // S.mu held
    if (--b->refs == 0) buffer_free(b);
}

static void library_unref(camel_library *lib) {  // S.mu held
    if (--lib->refs > 0) return;
    if (S.dead.empty()) D.ModuleUnload(lib->module);
    delete lib;
}

static void pipeline_unref(camel_pipeline *p) {  // S.mu held
    if (--p->refs > 0) return;
    library_unref(p->library);
    delete p;
}

static CUevent take_event() {  // S.mu held; nullptr if the driver refuses
    if (!S.free_events.empty()) {
        CUevent e = S.free_events.back();
        S.free_events.pop_back();
        return e;
    }
    CUevent e = nullptr;
    return D.EventCreate(&e, 0) == CUDA_SUCCESS ? e : nullptr;
}

static void put_event(CUevent e) {
    if (e) S.free_events.push_back(e);
}

// Names of a command buffer's kernels, for the message of a failure inside it.
static std::string describe(const CommandBuffer *cb) {
    std::string s;
    int shown = 0, index = 0;
    for (const Command &c : cb->commands) {
        if (c.kind == Command::kUpload) continue;
        index++;
        if (shown == 6) {
            s += ", ...";
            break;
        }
        char buf[256];
        if (c.kind == Command::kGemm)
            snprintf(buf, sizeof buf, "%scuBLAS SGEMM %ux%ux%u (dispatch %d)", shown ? ", " : "",
                     c.m, c.n, c.k, index);
        else
            snprintf(buf, sizeof buf, "%s'%s' (dispatch %d: %s=(%u, %u, %u), "
                     "threads_per_threadgroup=(%u, %u, %u))",
                     shown ? ", " : "", c.pipeline->kernel->name.c_str(), index,
                     c.grid_is_threads ? "threads" : "threadgroups", c.request[0], c.request[1],
                     c.request[2], c.tpg[0], c.tpg[1], c.tpg[2]);
        s += buf;
        shown++;
    }
    return s;
}

static void note_failure(const CommandBuffer *cb, CUresult r, const char *when) {  // S.mu held
    std::string msg = "[cuda] command buffer " + std::to_string(cb->id) + " failed " + when +
                      ": " + cu_error(r) + "; it held " + std::to_string(cb->ndispatches) +
                      " dispatch" + (cb->ndispatches == 1 ? "" : "es") + ": " + describe(cb);
    if (is_sticky(r)) {
        msg += ". The CUDA context is now unusable (a sticky error): every later GPU call "
               "fails, so restart the Python process. To find the faulting kernel, rerun with "
               "CAMEL_CUDA_SYNC=1 (each dispatch waits, so the error names it) or under "
               "compute-sanitizer --tool memcheck (a message the kernel printed before it trapped, "
               "e.g. simdgroup_matrix with a partial SIMD group, is on stdout)";
        if (S.dead.empty()) S.dead = msg;
    }
    if (S.failure.empty()) S.failure = msg;
}

static void finish(CommandBuffer *cb) {  // S.mu held: release what the command buffer held
    for (camel_buffer *b : cb->retained) buffer_unref(b);
    for (camel_pipeline *p : cb->pipelines) pipeline_unref(p);
    for (Chunk *c : cb->chunks) {
        c->used = 0;
        S.free_chunks.push_back(c);
    }
    delete cb;
}

// Retire completed command buffers in order; wait_id > 0 waits until that one is done.
static void reap(uint64_t wait_id) {  // S.mu held
    while (!S.pending.empty()) {
        CommandBuffer *cb = S.pending.front();
        CUresult r = cb->id <= wait_id ? D.EventSynchronize(cb->end) : D.EventQuery(cb->end);
        if (r == CUDA_ERROR_NOT_READY) break;
        S.pending.pop_front();
        if (r != CUDA_SUCCESS) {
            note_failure(cb, r, "on the GPU");
        } else if (cb->enqueue_error.empty()) {
            float ms = 0, gap = 0;
            D.EventElapsedTime(&ms, cb->start, cb->end);
            double start;
            if (S.chain_event && D.EventElapsedTime(&gap, S.chain_event, cb->start) == CUDA_SUCCESS)
                start = S.chain_time + gap * 1e-3;
            else
                start = now_seconds() - ms * 1e-3;  // the first: anchor on the host clock
            cb_times[cb->id % kTimes] = {cb->id, start, start + ms * 1e-3};
            put_event(S.chain_event);
            S.chain_event = cb->start;
            S.chain_time = start;
            cb->start = nullptr;
        }
        put_event(cb->start);
        put_event(cb->end);
        S.completed_id = cb->id;
        finish(cb);
    }
}

static void retain(CommandBuffer *cb, camel_buffer *b) {  // once per command buffer
    if (b->last_use == cb->id) return;
    b->last_use = cb->id;
    b->refs++;
    cb->retained.push_back(b);
}

static CommandBuffer *open_cb() {  // S.mu held
    if (!S.open) {
        S.open = new CommandBuffer();
        S.open->id = S.next_id++;
    }
    return S.open;
}

// Before a command that binds b: upload what the host wrote into the mirror.
static void bind_buffer(CommandBuffer *cb, camel_buffer *b) {
    if (b->dirty_hi > b->dirty_lo) {
        Command up;
        up.kind = Command::kUpload;
        up.buffer = b;
        up.lo = b->dirty_lo;
        up.hi = b->dirty_hi;
        cb->commands.push_back(std::move(up));
        b->dirty_lo = b->dirty_hi = 0;
    }
    b->device_newer = true;  // the command may write it
    retain(cb, b);
}

static CUresult enqueue(CommandBuffer *cb, const Command &c, uint32_t index) {
    switch (c.kind) {
        case Command::kUpload:
            return D.MemcpyHtoDAsync(c.buffer->dptr + c.lo, (uint8_t *)c.buffer->mirror + c.lo,
                                     c.hi - c.lo, S.stream);
        case Command::kLaunch: {
            camel_cuda_args args = c.args;
            for (const Piece &p : c.pieces) {
                memcpy(args.group_origin, p.origin, sizeof p.origin);
                void *params[] = {&args};
                CUresult r = D.LaunchKernel(c.pipeline->fn, p.grid[0], p.grid[1], p.grid[2],
                                            p.block[0], p.block[1], p.block[2], c.smem, S.stream,
                                            params, nullptr);
                if (r != CUDA_SUCCESS) {
                    char buf[512];
                    snprintf(buf, sizeof buf,
                             "[cuda] launching kernel '%s' (dispatch %u of command buffer %llu: "
                             "a piece of grid (%u, %u, %u) blocks of (%u, %u, %u) threads, %u "
                             "bytes of dynamic shared memory) failed: %s",
                             c.pipeline->kernel->name.c_str(), index, (unsigned long long)cb->id,
                             p.grid[0], p.grid[1], p.grid[2], p.block[0], p.block[1], p.block[2],
                             c.smem, cu_error(r).c_str());
                    cb->enqueue_error = buf;
                    return r;
                }
            }
            return CUDA_SUCCESS;
        }
        case Command::kGemm: {
            // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: swap the operands.
            const float one = 1.0f, zero = 0.0f;
            int st = B.Sgemm(B.handle, kCublasOpN, kCublasOpN, c.n, c.m, c.k, &one,
                             (const float *)c.gemm[1]->dptr, c.n, (const float *)c.gemm[0]->dptr,
                             c.k, &zero, (float *)c.gemm[2]->dptr, c.n);
            if (st != 0) {
                cb->enqueue_error = "[cuda] cublasSgemm_v2 " + std::to_string(c.m) + "x" +
                                    std::to_string(c.n) + "x" + std::to_string(c.k) +
                                    " failed with cublasStatus_t " + std::to_string(st);
                return CUDA_SUCCESS;  // not a driver error: the context stays usable
            }
            return CUDA_SUCCESS;
        }
    }
    return CUDA_SUCCESS;
}

// Enqueue the open command buffer on the stream (S.mu held). Returns its id or 0.
static uint64_t commit_locked() {
    CommandBuffer *cb = S.open;
    if (!cb) return 0;
    S.open = nullptr;
    if (!S.dead.empty()) {  // nothing can run any more: account for it and move on
        if (S.failure.empty()) S.failure = S.dead;
        S.completed_id = cb->id;
        finish(cb);
        return cb->id;
    }
    cb->start = take_event();
    cb->end = take_event();
    CUresult r = !cb->start || !cb->end ? CUDA_ERROR_OUT_OF_MEMORY
                                        : D.EventRecord(cb->start, S.stream);
    for (Chunk *c : cb->chunks)
        if (r == CUDA_SUCCESS && c->used)
            r = D.MemcpyHtoDAsync(c->dev, c->host, c->used, S.stream);
    uint32_t index = 0;
    for (const Command &c : cb->commands) {
        if (r != CUDA_SUCCESS || !cb->enqueue_error.empty()) break;  // the rest is skipped
        if (c.kind != Command::kUpload) index++;
        r = enqueue(cb, c, index);
    }
    if (cb->end && (r == CUDA_SUCCESS || !is_sticky(r))) {
        CUresult re = D.EventRecord(cb->end, S.stream);
        if (r == CUDA_SUCCESS) r = re;
    }
    if (!cb->enqueue_error.empty() && S.failure.empty()) S.failure = cb->enqueue_error;
    if (r != CUDA_SUCCESS) {
        if (cb->enqueue_error.empty()) note_failure(cb, r, "to enqueue");
        else if (is_sticky(r)) note_failure(cb, r, "to enqueue");
        if (is_sticky(r) || !cb->end) {  // its end event will never fire
            S.completed_id = cb->id;
            put_event(cb->start);
            put_event(cb->end);
            finish(cb);
            return cb->id;
        }
    }
    S.pending.push_back(cb);
    return cb->id;
}

CAMEL_EXPORT uint64_t camel_commit(void) {
    std::lock_guard<std::mutex> lock(S.mu);
    tl_error.clear();
    if (!ready_locked(true)) return 0;
    return commit_locked();
}

static int synchronize_locked() {
    commit_locked();
    if (!S.pending.empty()) reap(S.pending.back()->id);
    if (!S.failure.empty()) {
        tl_error = S.failure;
        S.failure.clear();
        return 1;
    }
    return 0;
}

CAMEL_EXPORT int camel_synchronize(void) {
    std::lock_guard<std::mutex> lock(S.mu);
    tl_error.clear();
    if (!ready_locked(true)) return 1;
    return synchronize_locked();
}

CAMEL_EXPORT uint64_t camel_completed_id(void) {
    std::lock_guard<std::mutex> lock(S.mu);
    bind_thread();
    if (S.ready) reap(0);
    return S.completed_id;
}

CAMEL_EXPORT int camel_command_buffer_time(uint64_t id, double *start, double *end) {
    std::lock_guard<std::mutex> lock(S.mu);
    tl_error.clear();
    const CbTime &t = cb_times[id % kTimes];
    if (id == 0 || t.id != id) {
        set_error("[cuda] no timing for command buffer %llu (not completed, failed, or older "
                  "than the last %llu)",
                  (unsigned long long)id, (unsigned long long)kTimes);
        return 1;
    }
    *start = t.start;
    *end = t.end;
    return 0;
}

// ---- buffers ------------------------------------------------------------------------------

static std::string mib(uint64_t n) {
    char buf[64];
    snprintf(buf, sizeof buf, "%.1f MiB", n / 1048576.0);
    return buf;
}

CAMEL_EXPORT camel_buffer *camel_buffer_new(uint64_t nbytes, void **contents) {
    std::lock_guard<std::mutex> lock(S.mu);
    tl_error.clear();
    if (!ready_locked()) return nullptr;
    if (nbytes == 0) {
        set_error("[cuda] camel_buffer_new: a buffer needs at least 1 byte, got 0");
        return nullptr;
    }
    CUdeviceptr dptr = 0;
    CUresult r = D.MemAlloc(&dptr, nbytes);
    if (r == CUDA_ERROR_OUT_OF_MEMORY) {  // retire finished work (deferred frees), try again
        reap(0);
        r = D.MemAlloc(&dptr, nbytes);
    }
    if (r != CUDA_SUCCESS) {
        size_t free_b = 0, total_b = 0;
        D.MemGetInfo(&free_b, &total_b);
        set_error("[cuda] out of device memory: cannot allocate a buffer of %llu bytes (%s); the "
                  "GPU has %s free of %s, camel holds %llu bytes in %zu buffers (%s). "
                  "camel.metal.empty_cache() returns cached buffers; smaller batches need less",
                  (unsigned long long)nbytes, mib(nbytes).c_str(), mib(free_b).c_str(),
                  mib(total_b).c_str(), (unsigned long long)S.allocated_bytes, S.buffers.size(),
                  cu_error(r).c_str());
        return nullptr;
    }
    void *mirror = nullptr;
    bool pinned = false;
    if (nbytes <= kPinnedMirrorMax && D.MemHostAlloc(&mirror, nbytes, 0) == CUDA_SUCCESS) {
        pinned = true;
        memset(mirror, 0, nbytes);
    } else {
        mirror = mmap(nullptr, nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mirror == MAP_FAILED) {
            D.MemFree(dptr);
            set_error("[cuda] out of host memory: cannot map a %llu-byte host mirror (%s)",
                      (unsigned long long)nbytes, mib(nbytes).c_str());
            return nullptr;
        }
    }
    // Zero on the device too, in stream order (the mirror starts zeroed as well).
    r = D.MemsetD8Async(dptr, 0, nbytes, S.stream);
    if (r != CUDA_SUCCESS) {
        D.MemFree(dptr);
        if (pinned) D.MemFreeHost(mirror); else munmap(mirror, nbytes);
        set_error("[cuda] camel_buffer_new: zeroing %llu bytes failed: %s",
                  (unsigned long long)nbytes, cu_error(r).c_str());
        return nullptr;
    }
    auto *b = new camel_buffer{dptr, mirror, nbytes, pinned, 1, false, 0, 0, false, 0};
    S.buffers.insert(b);
    S.allocated_bytes += nbytes;
    if (contents) *contents = mirror;
    return b;
}

static bool live(camel_buffer *b, const char *what) {  // S.mu held
    if (!S.buffers.count(b) || b->released) {
        set_error("[cuda] %s: %p is not a live buffer (released already?)", what, (void *)b);
        return false;
    }
    return true;
}

CAMEL_EXPORT int camel_buffer_release(camel_buffer *b) {
    std::lock_guard<std::mutex> lock(S.mu);
    tl_error.clear();
    bind_thread();
    if (!live(b, "camel_buffer_release")) return 1;
    if (S.ready) reap(0);  // retire finished command buffers: frees what they held now
    b->released = true;
    buffer_unref(b);  // freed now, or when the last command buffer using it completes
    return 0;
}

CAMEL_EXPORT int camel_buffer_did_modify(camel_buffer *b, uint64_t offset, uint64_t length) {
    std::lock_guard<std::mutex> lock(S.mu);
    tl_error.clear();
    if (!live(b, "camel_buffer_did_modify")) return 1;
    if (offset > b->nbytes || length > b->nbytes - offset) {
        set_error("[cuda] camel_buffer_did_modify: range %llu + %llu bytes is outside the "
                  "%llu-byte buffer",
                  (unsigned long long)offset, (unsigned long long)length,
                  (unsigned long long)b->nbytes);
        return 1;
    }
    if (length == 0) return 0;
    if (b->dirty_hi > b->dirty_lo) {  // one range: the hull of both
        b->dirty_lo = offset < b->dirty_lo ? offset : b->dirty_lo;
        b->dirty_hi = offset + length > b->dirty_hi ? offset + length : b->dirty_hi;
    } else {
        b->dirty_lo = offset;
        b->dirty_hi = offset + length;
    }
    return 0;
}

CAMEL_EXPORT int camel_buffer_sync_to_host(camel_buffer *b) {
    std::lock_guard<std::mutex> lock(S.mu);
    tl_error.clear();
    if (!ready_locked() || !live(b, "camel_buffer_sync_to_host")) return 1;
    if (!b->device_newer) return 0;  // the mirror is current
    if (S.open && b->last_use == S.open->id) commit_locked();
    if (b->last_use > S.completed_id) reap(b->last_use);
    if (!S.dead.empty()) {
        tl_error = S.dead;
        return 1;
    }
    // The host's own unsent writes (the dirty range) are newer than the device: keep them.
    uint64_t lo = b->dirty_hi > b->dirty_lo ? b->dirty_lo : b->nbytes;
    uint64_t hi = b->dirty_hi > b->dirty_lo ? b->dirty_hi : b->nbytes;
    CUresult r = CUDA_SUCCESS;
    if (lo > 0) r = D.MemcpyDtoHAsync(b->mirror, b->dptr, lo, S.copy_stream);
    if (r == CUDA_SUCCESS && hi < b->nbytes)
        r = D.MemcpyDtoHAsync((uint8_t *)b->mirror + hi, b->dptr + hi, b->nbytes - hi,
                              S.copy_stream);
    if (r == CUDA_SUCCESS) r = D.StreamSynchronize(S.copy_stream);
    if (r != CUDA_SUCCESS) {
        set_error("[cuda] copying a %llu-byte buffer to the host failed: %s",
                  (unsigned long long)b->nbytes, cu_error(r).c_str());
        if (is_sticky(r) && S.dead.empty()) S.dead = tl_error;
        return 1;
    }
    b->device_newer = false;
    return 0;
}

CAMEL_EXPORT int camel_memory_info_get(camel_memory_info *out) {
    // A query that cannot fail: keeps the last error readable.
    std::lock_guard<std::mutex> lock(S.mu);
    out->allocated_bytes = S.allocated_bytes;
    out->buffers = S.buffers.size();
    return 0;
}

// ---- libraries and pipelines -----------------------------------------------------------

// The translator's kernel description: "kernel <n> <name> <barrier> <simd>" and
// "param <n> <position> <name> <kind> <index> <is_pointer>" lines (cuda_abi.h).
static bool parse_kernels(const char *text, std::vector<Kernel> &out, std::string &constants) {
    const char *line = text ? text : "";
    while (*line) {
        const char *eol = strchr(line, '\n');
        std::string l(line, eol ? eol - line : strlen(line));
        line = eol ? eol + 1 : line + l.size();
        char word[16], name[256];
        int n, a, b, c, d, e;
        if (sscanf(l.c_str(), "%15s", word) != 1) continue;
        char entry[300] = "";
        if (!strcmp(word, "kernel") &&
            sscanf(l.c_str(), "kernel %d %255s %d %d %299s", &n, name, &a, &b, entry) >= 4) {
            Kernel k;
            k.n = n;
            k.name = name;
            k.entry = entry[0] ? entry : "camel_kernel_" + std::to_string(n);
            k.uses_barrier = a;
            k.uses_simd = b;
            out.push_back(k);
        } else if (!strcmp(word, "param") &&
                   sscanf(l.c_str(), "param %d %d %255s %d %d %d", &n, &a, name, &c, &d, &e) == 6) {
            Kernel *k = nullptr;
            for (Kernel &kk : out)
                if (kk.n == n) k = &kk;
            if (!k) {
                set_error("[cuda] kernel description: param line for unknown kernel %d: %s", n,
                          l.c_str());
                return false;
            }
            k->params.push_back(Param{a, name, c, d, e != 0, 0});
            if (c == CAMEL_CUDA_PARAM_BUFFER && d > k->max_buffer_index) k->max_buffer_index = d;
        } else if (!strcmp(word, "constant") && l.size() > 9) {
            constants += l.substr(9) + "\n";  // "<index> <type> <name>"
        } else {
            set_error("[cuda] kernel description: cannot read line '%s'", l.c_str());
            return false;
        }
    }
    return true;
}

static camel_library *load_locked(const char *ptx, const char *kernels, const char *path) {
    std::vector<Kernel> list;
    std::string constants;
    if (!parse_kernels(kernels, list, constants)) return nullptr;
    static char info_log[16384], error_log[16384];
    info_log[0] = error_log[0] = 0;
    int options[] = {JIT_INFO_LOG_BUFFER, JIT_INFO_LOG_BUFFER_SIZE_BYTES, JIT_ERROR_LOG_BUFFER,
                     JIT_ERROR_LOG_BUFFER_SIZE_BYTES, JIT_LOG_VERBOSE};
    void *values[] = {info_log, (void *)(uintptr_t)sizeof info_log, error_log,
                      (void *)(uintptr_t)sizeof error_log, (void *)(uintptr_t)0};
    CUmodule module = nullptr;
    CUresult r = D.ModuleLoadDataEx(&module, ptx, 5, options, values);
    if (r != CUDA_SUCCESS) {
        std::string hint;
        if (r == CUDA_ERROR_UNSUPPORTED_PTX_VERSION)
            hint = " (the driver is older than the PTX ISA clang wrote: update the NVIDIA driver)";
        if (is_sticky(r) && S.dead.empty()) S.dead = "[cuda] the context failed earlier: " + cu_error(r);
        set_error("[cuda] the driver cannot load the PTX of %s: %s%s\n%s%s",
                  path && *path ? path : "<source>", cu_error(r).c_str(), hint.c_str(), error_log,
                  *error_log ? "" : info_log);
        return nullptr;
    }
    auto *lib = new camel_library{module, std::move(list), path ? path : "", 1, constants, {}};
    // Sizes of by-value/reference parameters, for the setBytes length check.
    for (Kernel &k : lib->kernels) {
        std::string sym = "camel_kernel_" + std::to_string(k.n) + "_value_sizes";
        CUdeviceptr dp = 0;
        size_t size = 0;
        if (D.ModuleGetGlobal(&dp, &size, module, sym.c_str()) != CUDA_SUCCESS || size == 0)
            continue;
        std::vector<uint32_t> sizes(size / 4);
        if (D.MemcpyDtoHAsync(sizes.data(), dp, sizes.size() * 4, S.copy_stream) != CUDA_SUCCESS ||
            D.StreamSynchronize(S.copy_stream) != CUDA_SUCCESS)
            continue;
        for (Param &p : k.params)
            if (p.position >= 0 && (size_t)p.position < sizes.size()) p.value_size = sizes[p.position];
    }
    return lib;
}

// Extra export (not in camel_shim.h): load PTX + a kernel description directly, as
// camel_library_new does after camel_cuda_compile. Lets tests drive the runtime.
CAMEL_EXPORT camel_library *camel_cuda_library_load(const char *ptx, const char *kernels,
                                                    const char *path) {
    std::lock_guard<std::mutex> lock(S.mu);
    tl_error.clear();
    if (!ready_locked()) return nullptr;
    return load_locked(ptx, kernels, path);
}

// What a compile (camel_cuda_compile, camel_cuda_compile_specialised) gave, loaded: the
// library, or NULL with the log as the error. Frees ptx, kernels and log. S.mu held.
static camel_library *load_compiled_locked(int rc, char *ptx, char *kernels, char *log, const char *path) {
    camel_library *lib = nullptr;
    if (rc != 0)
        tl_error = log ? log : "[cuda] translation failed (no log)";
    else
        lib = load_locked(ptx, kernels, path);
    camel_cuda_free(log);
    camel_cuda_free(ptx);
    camel_cuda_free(kernels);
    return lib;
}

CAMEL_EXPORT camel_library *camel_library_new(const char *source, const char *path) {
    {
        std::lock_guard<std::mutex> lock(S.mu);
        tl_error.clear();
        if (!ready_locked()) return nullptr;
    }
    if (!source) {
        set_error("[cuda] camel_library_new: source is NULL");
        return nullptr;
    }
    char *ptx = nullptr, *kernels = nullptr, *log = nullptr;
    int rc = camel_cuda_compile(source, path, S.arch, &ptx, &kernels, &log);  // no lock: slow
    std::lock_guard<std::mutex> lock(S.mu);
    camel_library *lib = load_compiled_locked(rc, ptx, kernels, log, path);
    if (lib && !lib->constants.empty()) lib->source = source;  // for the specialisations
    return lib;
}

CAMEL_EXPORT void camel_library_release(camel_library *lib) {
    std::lock_guard<std::mutex> lock(S.mu);
    tl_error.clear();
    bind_thread();
    if (lib) library_unref(lib);
}

CAMEL_EXPORT uint64_t camel_library_function_names(camel_library *lib, char *out, uint64_t cap) {
    // A query that cannot fail: keeps the last error readable.
    std::string names;
    for (size_t i = 0; i < lib->kernels.size(); i++) {
        if (i) names += '\n';
        names += lib->kernels[i].name;
    }
    return copy_out(names, out, cap);
}

CAMEL_EXPORT uint64_t camel_library_function_constants(camel_library *lib, char *out, uint64_t cap) {
    // A query that cannot fail: keeps the last error readable.
    return copy_out(lib->constants, out, cap);
}

static camel_pipeline *pipeline_of_locked(camel_library *lib, const char *name);

CAMEL_EXPORT camel_pipeline *camel_pipeline_new(camel_library *lib, const char *name) {
    return camel_pipeline_new_with_constants(lib, name, nullptr, 0);
}

CAMEL_EXPORT camel_pipeline *camel_pipeline_new_with_constants(camel_library *lib, const char *name,
                                                              const camel_constant_value *values,
                                                              uint32_t nvalues) {
    {
        std::lock_guard<std::mutex> lock(S.mu);
        tl_error.clear();
        if (!ready_locked()) return nullptr;
        if (!name) {
            set_error("[cuda] camel_pipeline_new_with_constants: name is NULL");
            return nullptr;
        }
        if (nvalues && !values) {
            set_error("[cuda] kernel '%s': %u function-constant values but values is NULL", name, nvalues);
            return nullptr;
        }
        bool known = false;
        for (const Kernel &k : lib->kernels) known = known || k.name == name;
        if (lib->constants.empty() || !known) return pipeline_of_locked(lib, name);
    }
    // the declared constants, "index type name" lines
    std::string text, spec;
    std::vector<int> seen;
    for (uint32_t i = 0; i < nvalues; i++) {
        const std::string &c = lib->constants;
        std::string type, cname;
        for (size_t p = 0; p < c.size();) {
            size_t e = c.find('\n', p);
            if (e == std::string::npos) e = c.size();
            std::string l = c.substr(p, e - p);
            size_t a = l.find(' '), b = a == std::string::npos ? a : l.find(' ', a + 1);
            if (b != std::string::npos && atoi(l.c_str()) == (int)values[i].index) {
                type = l.substr(a + 1, b - a - 1);
                cname = l.substr(b + 1);
            }
            p = e + 1;
        }
        if (type.empty()) continue;  // Metal ignores a value no constant of the function has
        std::string err;
        std::string lit = camel_sim::constant_literal(type, values[i].type, values[i].components,
                                                      values[i].bytes, err);
        bool dup = std::find(seen.begin(), seen.end(), (int)values[i].index) != seen.end();
        if (lit.empty() || dup) {
            set_error("[cuda] kernel '%s': function constant '%s' (index %u): %s", name, cname.c_str(),
                      values[i].index, dup ? "two values for it" : err.c_str());
            return nullptr;
        }
        seen.push_back((int)values[i].index);
        spec += std::to_string(values[i].index) + " " + lit + "\n";
    }
    char *ptx = nullptr, *kernels = nullptr, *log = nullptr;
    int rc = camel_cuda_compile_specialised(lib->source.c_str(), lib->path.empty() ? nullptr : lib->path.c_str(),
                                            S.arch, name, spec.c_str(), &ptx, &kernels, &log);  // no lock: slow
    std::lock_guard<std::mutex> lock(S.mu);
    camel_library *variant = load_compiled_locked(rc, ptx, kernels, log, lib->path.c_str());
    if (!variant) return nullptr;
    camel_pipeline *p = pipeline_of_locked(variant, name);
    library_unref(variant);  // the pipeline holds it
    return p;
}

static camel_pipeline *pipeline_of_locked(camel_library *lib, const char *name) {
    for (const Kernel &k : lib->kernels) {
        if (k.name != name) continue;
        const std::string &sym = k.entry;
        CUfunction fn = nullptr;
        CUresult r = D.ModuleGetFunction(&fn, lib->module, sym.c_str());
        if (r != CUDA_SUCCESS) {
            set_error("[cuda] kernel '%s': no entry %s in the PTX of %s: %s", name, sym.c_str(),
                      lib->path.c_str(), cu_error(r).c_str());
            return nullptr;
        }
        int max_threads = 0, smem = 0;
        D.FuncGetAttribute(&max_threads, FUNC_MAX_THREADS_PER_BLOCK, fn);
        D.FuncGetAttribute(&smem, FUNC_SHARED_SIZE_BYTES, fn);
        auto *p = new camel_pipeline{lib, &k, fn, 1,
                                     (uint32_t)(max_threads > 0 ? max_threads : S.max_threads),
                                     (uint32_t)smem, 48 * 1024 - (uint32_t)smem};
        lib->refs++;
        return p;
    }
    std::string names;
    for (const Kernel &k : lib->kernels) names += (names.empty() ? "" : ", ") + k.name;
    set_error("[cuda] no kernel named '%s' in the library; it has: %s", name,
              names.empty() ? "(no kernels)" : names.c_str());
    return nullptr;
}

CAMEL_EXPORT void camel_pipeline_release(camel_pipeline *p) {
    std::lock_guard<std::mutex> lock(S.mu);
    tl_error.clear();
    bind_thread();
    if (p) pipeline_unref(p);
}

CAMEL_EXPORT int camel_pipeline_info_get(camel_pipeline *p, camel_pipeline_info *out) {
    // A query that cannot fail: keeps the last error readable.
    out->max_total_threads_per_threadgroup = p->max_threads;
    out->thread_execution_width = S.warp;
    out->static_threadgroup_memory = p->static_smem;
    return 0;
}

// ---- dispatch -------------------------------------------------------------------------------

// Check a dispatch the way Metal's validation layer would (and CUDA's limits), with
// messages that name the kernel, the parameter and both numbers. S.mu held.
static bool validate(const camel_dispatch_desc *desc, const camel_pipeline *p, uint64_t *dynamic) {
    const Kernel &k = *p->kernel;
    const char *name = k.name.c_str();
    const uint32_t *tpg = desc->threads_per_threadgroup;
    uint64_t nthreads = (uint64_t)tpg[0] * tpg[1] * tpg[2];
    if (nthreads == 0) {
        set_error("[dispatch] kernel '%s': threads_per_threadgroup (%u, %u, %u) has a zero "
                  "dimension", name, tpg[0], tpg[1], tpg[2]);
        return false;
    }
    if (nthreads > p->max_threads) {
        set_error("[dispatch] kernel '%s': threads_per_threadgroup (%u, %u, %u) = %llu threads "
                  "exceeds the pipeline's max_total_threads_per_threadgroup %u (CUDA's limit for "
                  "this kernel: its registers per thread bound the block size)",
                  name, tpg[0], tpg[1], tpg[2], (unsigned long long)nthreads, p->max_threads);
        return false;
    }
    for (int a = 0; a < 3; a++) {
        if (tpg[a] > S.max_block[a]) {
            set_error("[dispatch] kernel '%s': threads_per_threadgroup (%u, %u, %u) has %u along "
                      "%c, more than the CUDA device's block limit %u there; put the threads on "
                      "x or y",
                      name, tpg[0], tpg[1], tpg[2], tpg[a], "xyz"[a], S.max_block[a]);
            return false;
        }
        if (desc->grid[a] == 0) {
            set_error("[dispatch] kernel '%s': the grid (%u, %u, %u) has a zero dimension", name,
                      desc->grid[0], desc->grid[1], desc->grid[2]);
            return false;
        }
    }
    uint64_t groups_total = 1;
    for (int a = 0; a < 3; a++) {
        uint64_t g = desc->grid[a];
        uint64_t threads = desc->grid_is_threads ? g : g * tpg[a];
        groups_total *= desc->grid_is_threads ? (g + tpg[a] - 1) / tpg[a] : g;
        if (threads > 0xffffffffull || groups_total > 0xffffffffull) {
            set_error("[dispatch] kernel '%s': the grid (%u, %u, %u) %s is too large: more "
                      "than 2^32 - 1 threads along an axis or threadgroups in total",
                      name, desc->grid[0], desc->grid[1], desc->grid[2],
                      desc->grid_is_threads ? "threads" : "threadgroups");
            return false;
        }
    }
    if (desc->nargs > CAMEL_CUDA_MAX_BUFFERS) {
        set_error("[dispatch] kernel '%s': %u arguments, Metal binds at most %d", name,
                  desc->nargs, CAMEL_CUDA_MAX_BUFFERS);
        return false;
    }
    int needed = k.max_buffer_index + 1;
    if ((int)desc->nargs != needed) {
        // the first parameter left unbound and the optional arguments left out, in the
        // simulator's words (shim/front/unbound_args.h)
        camel_front::UnboundArgs u = camel_front::unbound_args(
            k.params.begin(), k.params.end(), desc->nargs,
            [](const Param &p) { return p.kind == CAMEL_CUDA_PARAM_BUFFER; },
            [](const Param &p) { return p.kind == CAMEL_CUDA_PARAM_ABSENT; });
        if (needed == 0)
            set_error("[dispatch] kernel '%s' takes no buffer arguments, got %u%s", name,
                      desc->nargs, u.absent.c_str());
        else
            set_error("[dispatch] kernel '%s' takes %d buffer argument%s ([[buffer(0)]] .. "
                      "[[buffer(%d)]]), got %u%s%s",
                      name, needed, needed == 1 ? "" : "s", k.max_buffer_index, desc->nargs,
                      u.which.c_str(), u.absent.c_str());
        return false;
    }
    for (uint32_t i = 0; i < desc->nargs; i++) {
        const camel_arg &a = desc->args[i];
        if (a.buffer) {
            if (!S.buffers.count(a.buffer) || a.buffer->released) {
                set_error("[dispatch] kernel '%s' argument %u: the buffer was released", name, i);
                return false;
            }
            if (a.offset > a.buffer->nbytes) {
                set_error("[dispatch] kernel '%s' argument %u: offset %llu is past the end of "
                          "a %llu-byte buffer", name, i, (unsigned long long)a.offset,
                          (unsigned long long)a.buffer->nbytes);
                return false;
            }
        } else if (a.bytes && a.length > kMaxSetBytes) {
            set_error("[dispatch] kernel '%s' argument %u: %llu bytes is more than setBytes "
                      "allows (%u); use a buffer", name, i, (unsigned long long)a.length,
                      kMaxSetBytes);
            return false;
        }
    }
    for (size_t j = 0; j < k.params.size(); j++) {
        const Param &prm = k.params[j];
        if (prm.kind == CAMEL_CUDA_PARAM_BUFFER) {
            const camel_arg &a = desc->args[prm.index];
            if (!a.buffer && (!a.bytes || a.length == 0)) {
                set_error("[dispatch] kernel '%s' parameter %d '%s' ([[buffer(%d)]]) is not "
                          "bound: pass a buffer or bytes", name, prm.position, prm.name.c_str(),
                          prm.index);
                return false;
            }
            if (prm.is_pointer || prm.value_size == 0) continue;
            uint64_t have = a.buffer ? a.buffer->nbytes - a.offset : a.length;
            if (a.buffer ? have < prm.value_size : have != prm.value_size) {
                set_error("[dispatch] kernel '%s' parameter %d '%s' ([[buffer(%d)]]) is a "
                          "%u-byte value, got %llu bytes", name, prm.position, prm.name.c_str(),
                          prm.index, prm.value_size, (unsigned long long)have);
                return false;
            }
        } else if (prm.kind == CAMEL_CUDA_PARAM_THREADGROUP) {
            if (prm.index >= CAMEL_CUDA_MAX_THREADGROUP ||
                (uint32_t)prm.index >= desc->nthreadgroup_memory ||
                desc->threadgroup_memory[prm.index] == 0) {
                set_error("[dispatch] kernel '%s' parameter %d '%s' ([[threadgroup(%d)]]) needs "
                          "a threadgroup memory length (threadgroup_memory=[...])", name,
                          prm.position, prm.name.c_str(), prm.index);
                return false;
            }
        }
    }
    if (desc->nthreadgroup_memory > CAMEL_CUDA_MAX_THREADGROUP) {
        set_error("[dispatch] kernel '%s': %u threadgroup memory lengths, at most %d", name,
                  desc->nthreadgroup_memory, CAMEL_CUDA_MAX_THREADGROUP);
        return false;
    }
    *dynamic = 0;
    for (uint32_t i = 0; i < desc->nthreadgroup_memory; i++)
        *dynamic += (desc->threadgroup_memory[i] + 15ull) & ~15ull;
    if (*dynamic + p->static_smem > S.smem_optin) {
        set_error("[dispatch] kernel '%s' needs %llu bytes of threadgroup memory (%llu in "
                  "[[threadgroup(i)]] buffers + %u of threadgroup variables), more than the "
                  "device's %u (CUDA shared memory per block, opt-in)", name,
                  (unsigned long long)(*dynamic + p->static_smem), (unsigned long long)*dynamic,
                  p->static_smem, S.smem_optin);
        return false;
    }
    return true;
}

// One axis of a dispatch as segments of uniform blocks: (origin, count, block size).
struct Segment {
    uint32_t origin, count, block;
};

static std::vector<Segment> segments(uint32_t grid, uint32_t tpg, bool is_threads,
                                     uint32_t max_grid) {
    std::vector<Segment> out;
    uint32_t full = is_threads ? grid / tpg : grid;
    uint32_t edge = is_threads ? grid % tpg : 0;  // threads in the partial last group
    for (uint32_t o = 0; o < full; o += max_grid)  // CUDA's grid limit per launch
        out.push_back({o, full - o < max_grid ? full - o : max_grid, tpg});
    if (edge) out.push_back({full, 1, edge});
    return out;
}

// Metal's dispatchThreads as uniform CUDA launches: the full groups and the edges in
// x, y and z, each launch with the exact block size Metal gives those groups.

static void split(const uint32_t grid[3], const uint32_t tpg[3], bool is_threads,
                  const uint32_t max_grid[3], std::vector<Piece> &pieces) {
    std::vector<Segment> axes[3];
    for (int a = 0; a < 3; a++) axes[a] = segments(grid[a], tpg[a], is_threads, max_grid[a]);
    for (const Segment &z : axes[2])
        for (const Segment &y : axes[1])
            for (const Segment &x : axes[0])
                pieces.push_back(Piece{{x.count, y.count, z.count},
                                       {x.block, y.block, z.block},
                                       {x.origin, y.origin, z.origin}});
}

// Extra export for tests: the pieces of a dispatch, 9 numbers each (grid, block,
// origin) into out; returns the number of pieces.
CAMEL_EXPORT uint32_t camel_cuda_split(const uint32_t grid[3], const uint32_t tpg[3],
                                       int32_t grid_is_threads, const uint32_t max_grid[3],
                                       uint32_t *out, uint32_t cap) {
    std::vector<Piece> pieces;
    split(grid, tpg, grid_is_threads != 0, max_grid, pieces);
    for (size_t i = 0; i < pieces.size() && i < cap; i++) {
        memcpy(out + 9 * i, pieces[i].grid, 12);
        memcpy(out + 9 * i + 3, pieces[i].block, 12);
        memcpy(out + 9 * i + 6, pieces[i].origin, 12);
    }
    return (uint32_t)pieces.size();
}

// Room for n bytes of setBytes data in the command buffer's staging; its device address.
static bool stage(CommandBuffer *cb, const void *bytes, uint64_t n, CUdeviceptr *dev) {
    uint32_t need = (uint32_t)((n + 15) & ~15ull);
    Chunk *c = cb->chunks.empty() ? nullptr : cb->chunks.back();
    if (!c || c->used + need > kStagingChunk) {
        if (!S.free_chunks.empty()) {
            c = S.free_chunks.back();
            S.free_chunks.pop_back();
        } else {
            c = new Chunk{0, nullptr, 0};
            CUresult r = D.MemAlloc(&c->dev, kStagingChunk);
            if (r == CUDA_SUCCESS) r = D.MemHostAlloc((void **)&c->host, kStagingChunk, 0);
            if (r != CUDA_SUCCESS) {
                if (c->dev) D.MemFree(c->dev);
                delete c;
                set_error("[cuda] cannot allocate %u bytes of setBytes staging: %s",
                          kStagingChunk, cu_error(r).c_str());
                return false;
            }
        }
        cb->chunks.push_back(c);
    }
    if (bytes) memcpy(c->host + c->used, bytes, n);
    *dev = c->dev + c->used;
    c->used += need;
    return true;
}

static void maybe_commit_early() {  // S.mu held: keep the GPU fed while Python encodes
    CommandBuffer *cb = S.open;
    if (cb->ndispatches >= CAMEL_MAX_DISPATCHES_PER_COMMAND_BUFFER) {
        commit_locked();
    } else if (cb->ndispatches >= kEagerCommit && cb->ndispatches % 8 == 0) {
        reap(0);
        if (S.pending.size() < 2) commit_locked();  // at most one queued behind the running one
    }
}

static uint64_t finish_dispatch() {  // S.mu held: after a command was added to S.open
    uint64_t id = S.open->id;
    if (S.sync_each) {  // CAMEL_CUDA_SYNC=1: the failure names this very dispatch
        if (synchronize_locked() != 0) return 0;
        return id;
    }
    maybe_commit_early();
    return id;
}

CAMEL_EXPORT uint64_t camel_dispatch(const camel_dispatch_desc *desc) {
    std::lock_guard<std::mutex> lock(S.mu);
    tl_error.clear();
    if (!ready_locked()) return 0;
    if (!desc || !desc->pipeline) {
        set_error("[dispatch] no pipeline");
        return 0;
    }
    camel_pipeline *p = desc->pipeline;
    uint64_t dynamic = 0;
    if (!validate(desc, p, &dynamic)) return 0;
    if (dynamic > p->dynamic_smem_limit) {  // > 48 KiB in all: opt in, once per size
        CUresult r = D.FuncSetAttribute(p->fn, FUNC_MAX_DYNAMIC_SHARED_SIZE_BYTES, (int)dynamic);
        if (r != CUDA_SUCCESS) {
            set_error("[dispatch] kernel '%s': cannot allow %llu bytes of dynamic shared memory "
                      "(+ %u static; the device allows %u): %s", p->kernel->name.c_str(),
                      (unsigned long long)dynamic, p->static_smem, S.smem_optin,
                      cu_error(r).c_str());
            return 0;
        }
        p->dynamic_smem_limit = (uint32_t)dynamic;
    }
    CommandBuffer *cb = open_cb();
    Command c;
    c.kind = Command::kLaunch;
    c.pipeline = p;
    memset(&c.args, 0, sizeof c.args);
    c.grid_is_threads = desc->grid_is_threads != 0;
    for (int a = 0; a < 3; a++) {
        uint32_t g = desc->grid[a], t = desc->threads_per_threadgroup[a];
        c.request[a] = g;
        c.tpg[a] = t;
        c.args.threadgroups_per_grid[a] = c.grid_is_threads ? (g + t - 1) / t : g;
        c.args.threads_per_grid[a] = c.grid_is_threads ? g : g * t;
        c.args.dispatch_threads_per_threadgroup[a] = t;
    }
    for (uint32_t i = 0; i < desc->nargs; i++) {
        const camel_arg &a = desc->args[i];
        if (a.buffer) {
            bind_buffer(cb, a.buffer);
            c.args.buffers[i] = (void *)(uintptr_t)(a.buffer->dptr + a.offset);
        } else if (a.bytes && a.length) {
            CUdeviceptr dev = 0;
            if (!stage(cb, a.bytes, a.length, &dev)) return 0;
            c.args.buffers[i] = (void *)(uintptr_t)dev;
        }
    }
    uint32_t offset = 0;
    for (uint32_t i = 0; i < desc->nthreadgroup_memory; i++) {
        c.args.threadgroup_offset[i] = offset;
        offset += (desc->threadgroup_memory[i] + 15) & ~15u;  // Metal: multiples of 16
    }
    c.smem = offset;
    split(desc->grid, desc->threads_per_threadgroup, c.grid_is_threads, S.max_grid, c.pieces);
    p->refs++;
    cb->pipelines.push_back(p);
    cb->commands.push_back(std::move(c));
    cb->ndispatches++;
    return finish_dispatch();
}

// ---- extras -------------------------------------------------------------------------------

static bool blas_ready() {  // S.mu held
    if (B.handle) return true;
    if (B.tried) {
        tl_error = B.error;
        return false;
    }
    B.tried = true;
    std::string tried;
    const char *env = getenv("CAMEL_CUBLAS");  // set: that library and no other
    const char *names[] = {env && *env ? env : "libcublas.so.13",
                           env && *env ? nullptr : "libcublas.so.12",
                           env && *env ? nullptr : "libcublas.so.11",
                           env && *env ? nullptr : "/usr/local/cuda/lib64/libcublas.so.13",
                           env && *env ? nullptr : "/usr/local/cuda/lib64/libcublas.so.12"};
    for (const char *n : names) {
        if (!n) continue;
        B.dl = dlopen(n, RTLD_NOW | RTLD_LOCAL);
        if (B.dl) break;
        tried += std::string(tried.empty() ? "" : "; ") + dlerror();
    }
    if (!B.dl) {
        B.error = "[cuda] camel_mps_matmul (the vendor GEMM, 'kernel 0') needs cuBLAS, and " +
                  std::string(env && *env ? "CAMEL_CUBLAS" : "no libcublas.so.13/.12/.11") +
                  " could not be loaded (" + tried + "). Install it (the "
                  "CUDA toolkit, or pip install nvidia-cublas-cu12) and put its lib folder on "
                  "LD_LIBRARY_PATH, or set CAMEL_CUBLAS=/path/to/libcublas.so.N";
        tl_error = B.error;
        return false;
    }
    B.Create = (int (*)(cublasHandle_t *))dlsym(B.dl, "cublasCreate_v2");
    B.SetStream = (int (*)(cublasHandle_t, CUstream))dlsym(B.dl, "cublasSetStream_v2");
    B.SetMathMode = (int (*)(cublasHandle_t, int))dlsym(B.dl, "cublasSetMathMode");
    B.Sgemm = (decltype(B.Sgemm))dlsym(B.dl, "cublasSgemm_v2");
    int st = -1;
    if (B.Create && B.SetStream && B.SetMathMode && B.Sgemm && (st = B.Create(&B.handle)) == 0 &&
        (st = B.SetStream(B.handle, S.stream)) == 0 &&
        (st = B.SetMathMode(B.handle, kCublasDefaultMath)) == 0)  // FP32: no TF32
        return true;
    B.handle = nullptr;
    B.error = "[cuda] cuBLAS was loaded but cannot be set up (cublasCreate_v2/SetStream/"
              "SetMathMode/Sgemm_v2: status " + std::to_string(st) + ")";
    tl_error = B.error;
    return false;
}

CAMEL_EXPORT uint64_t camel_mps_matmul(camel_buffer *a, camel_buffer *b, camel_buffer *c,
                                       uint32_t m, uint32_t n, uint32_t k) {
    std::lock_guard<std::mutex> lock(S.mu);
    tl_error.clear();
    if (!ready_locked()) return 0;
    camel_buffer *bufs[3] = {a, b, c};
    uint64_t need[3] = {4ull * m * k, 4ull * k * n, 4ull * m * n};
    for (int i = 0; i < 3; i++) {
        if (!live(bufs[i], "camel_mps_matmul")) return 0;
        if (bufs[i]->nbytes < need[i]) {
            set_error("[cuda] camel_mps_matmul %ux%ux%u: %c needs %llu bytes, its buffer has %llu",
                      m, n, k, "abc"[i], (unsigned long long)need[i],
                      (unsigned long long)bufs[i]->nbytes);
            return 0;
        }
    }
    if (m == 0 || n == 0 || k == 0 || m > 0x7fffffff || n > 0x7fffffff || k > 0x7fffffff) {
        set_error("[cuda] camel_mps_matmul: sizes %ux%ux%u must be in 1 .. 2^31 - 1", m, n, k);
        return 0;
    }
    if (!blas_ready()) return 0;
    CommandBuffer *cb = open_cb();
    for (camel_buffer *x : bufs) bind_buffer(cb, x);
    Command cmd;
    cmd.kind = Command::kGemm;
    for (int i = 0; i < 3; i++) cmd.gemm[i] = bufs[i];
    cmd.m = m;
    cmd.n = n;
    cmd.k = k;
    cb->commands.push_back(std::move(cmd));
    cb->ndispatches++;
    return finish_dispatch();
}

CAMEL_EXPORT uint64_t camel_mpsgraph_attention(camel_buffer *, camel_buffer *, camel_buffer *,
                                               camel_buffer *, uint32_t, uint32_t, uint32_t,
                                               float, int32_t) {
    set_error("[cuda] MPSGraph attention is not available on the CUDA shim (it is Apple's "
              "MPSGraph); on an NVIDIA GPU the attention bench compares against PyTorch's "
              "torch.nn.functional.scaled_dot_product_attention when a CUDA PyTorch is installed");
    return 0;
}

CAMEL_EXPORT int camel_capture_begin(const char *) {
    set_error("[cuda] GPU capture (.gputrace) needs Metal; on an NVIDIA GPU profile with "
              "Nsight Systems (nsys profile python ...) or Nsight Compute (ncu python ...)");
    return 1;
}

CAMEL_EXPORT int camel_capture_end(void) {
    set_error("[cuda] GPU capture (.gputrace) needs Metal; on an NVIDIA GPU use Nsight Systems");
    return 1;
}
