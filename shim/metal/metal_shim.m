/*
 * metal_shim.m — the camel C ABI (camel_shim.h) over Apple's Metal.
 *
 * Python (camel/metal/) loads this dylib with ctypes and calls the plain C
 * functions below. Each one is a thin, readable wrapper over a few Metal
 * calls. Read it top to bottom; it follows the life of a kernel launch:
 *
 *   device and queue      MTLCreateSystemDefaultDevice, one MTLCommandQueue
 *   buffers               MTLResourceStorageModeShared: one address for CPU and GPU
 *   libraries             MSL source compiled at run time (newLibraryWithSource)
 *   pipelines             one MTLComputePipelineState per kernel, with its limits
 *   dispatch              validate, then encode into ONE open command buffer
 *   commit and wait       lazily: on synchronize, or every 256 dispatches
 *   timing and errors     a completed handler records GPUStartTime/GPUEndTime
 *   extras                MPS matrix multiply (the GEMM reference), MPSGraph
 *                         attention (the attention reference), GPU capture
 *
 * Memory management: ARC. Opaque handles handed to C are ObjC objects retained
 * with __bridge_retained and given back to ARC with CFBridgingRelease. Every
 * live handle sits in a set, so a released or bogus handle is reported as an
 * error instead of crashing the Python interpreter.
 *
 * Threads: one mutex (g_lock) guards the encoder state, the live sets and the
 * memory counters. A second small mutex (g_done_lock) guards what Metal's
 * completion handlers write (timings, errors, the completed id); handlers run
 * on a Metal thread and take only that one, so they can never deadlock with a
 * thread that waits for the GPU.
 *
 * Build: `make -C shim metal` (xcrun clang -fobjc-arc ...).
 */
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>
#import <MetalPerformanceShaders/MetalPerformanceShaders.h>
#import <MetalPerformanceShadersGraph/MetalPerformanceShadersGraph.h>
#import <objc/message.h>

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "../camel_shim.h"

/* Apple GPUs run a SIMD group (Metal's name for a warp) of 32 threads. The
 * device object has no property for it; every compute pipeline reports it
 * as threadExecutionWidth (32 on all Apple-silicon GPUs), which is where
 * camel_pipeline_info_get gets the per-kernel value. */
#define CAMEL_APPLE_SIMD_WIDTH 32

/* setBytes:length:atIndex: only works for small data (Apple: "smaller than
 * 4 kilobytes"): at most 4095 bytes, as in the simulator and camel/metal/abi.py. */
#define CAMEL_MAX_SET_BYTES 4095

/* Metal's buffer argument table has 31 entries per kernel; we allow as many
 * [[threadgroup(i)]] lengths (camel/metal/abi.py uses the same two numbers). */
#define CAMEL_MAX_BUFFER_BINDINGS 31
#define CAMEL_MAX_THREADGROUP_BINDINGS 31

/* Timings of the most recent command buffers, indexed by id % size. */
#define CAMEL_TIMING_RING 65536

/* Reflection option bit 0: called MTLPipelineOptionArgumentInfo in the macOS
 * 13 SDK and MTLPipelineOptionBindingInfo in later SDKs (the old name is
 * deprecated from macOS 13). Same bit, so we spell it once, by value. */
static const MTLPipelineOption kCamelBindingInfo = (MTLPipelineOption)(1 << 0);

/* ---- the last error: one message per thread ------------------------------ */

static _Thread_local char *t_error = NULL;
static _Thread_local size_t t_error_cap = 0;

/* printf-style; every message starts with the component, e.g. "[dispatch]". */
static void set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void set_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int need = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (need < 0) need = 0;
    if ((size_t)need + 1 > t_error_cap) {
        char *grown = realloc(t_error, (size_t)need + 1);
        if (grown == NULL) return; /* keep the old message rather than crash */
        t_error = grown;
        t_error_cap = (size_t)need + 1;
    }
    va_start(ap, fmt);
    vsnprintf(t_error, t_error_cap, fmt, ap);
    va_end(ap);
}

/* Every entry point starts with this, so "" means the last call succeeded. */
static void clear_error(void) {
    if (t_error != NULL) t_error[0] = '\0';
}

const char *camel_last_error(void) { return t_error ? t_error : ""; }

int camel_abi_version(void) { return CAMEL_SHIM_ABI_VERSION; }

/* C string -> NSString; nil for NULL or invalid UTF-8 (never an exception,
 * which would take the Python interpreter down with it). */
static NSString *utf8(const char *s) { return s ? [NSString stringWithUTF8String:s] : nil; }

/* ---- handle classes -------------------------------------------------------- */

/* A compiled MSL source. */
@interface CamelLibrary : NSObject
@property(nonatomic, strong) id<MTLLibrary> library;
@property(nonatomic, copy) NSString *path; /* for messages; "<source>" if none */
@end
@implementation CamelLibrary
@end

/* What reflection told us about one [[buffer(i)]] or [[threadgroup(i)]]
 * parameter; checked on every dispatch, so kept as plain C. */
typedef struct camel_binding {
    int present;      /* the kernel declares this index */
    uint64_t size;    /* sizeof(T) of the pointee / reference */
    uint64_t align;   /* minimum offset alignment (buffers) */
    int writable;     /* the kernel may write through it (not const/constant) */
    char name[64];    /* parameter name as written in the kernel */
} camel_binding;

/* A compute pipeline: the kernel compiled for this GPU plus its limits. */
@interface CamelPipeline : NSObject {
  @public
    camel_binding buffers[CAMEL_MAX_BUFFER_BINDINGS];
    camel_binding threadgroups[CAMEL_MAX_THREADGROUP_BINDINGS];
    uint32_t nbuffer_params;     /* highest buffer index + 1 */
    uint32_t nthreadgroup_params;
    char cname[128];             /* the kernel name for messages, as a C string */
}
@property(nonatomic, strong) id<MTLComputePipelineState> state;
@property(nonatomic, copy) NSString *name;
@end
@implementation CamelPipeline
@end

/* ---- global state ---------------------------------------------------------- */

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

static id<MTLDevice> g_device = nil;
static id<MTLCommandQueue> g_queue = nil;

/* Live handles: CFSets with NULL callbacks compare raw pointers and retain
 * nothing, which is exactly "is this pointer one we handed out?". It catches
 * double releases and stale handles; it cannot tell a stale handle from a new
 * object that happens to reuse the same address (camel/metal/ also drops
 * its reference on release), and a handle must not be released by one thread
 * while another is still passing it in. */
static CFMutableSetRef g_live_buffers = NULL;
static CFMutableSetRef g_live_libraries = NULL;
static CFMutableSetRef g_live_pipelines = NULL;
/* Is `handle` one we handed out and have not released? Caller holds g_lock. */
static int is_live(CFMutableSetRef set, const void *handle) {
    return handle != NULL && set != NULL && CFSetContainsValue(set, handle);
}
static uint64_t g_allocated_bytes = 0;
static uint64_t g_buffer_count = 0;

/* The open command buffer and its compute encoder, reused across dispatches
 * until the next commit. */
static id<MTLCommandBuffer> g_open_cb = nil;
static id<MTLComputeCommandEncoder> g_encoder = nil;
static uint64_t g_open_id = 0;
static uint32_t g_open_dispatches = 0;
static NSMutableOrderedSet<NSString *> *g_open_kernels = nil; /* names, for error messages */
static NSMutableArray *g_open_keep_alive = nil;              /* MPS kernels used by the open cb */
static uint64_t g_next_id = 1;
static id<MTLCommandBuffer> g_last_committed = nil;
static int g_capturing = 0;

/* Written by completion handlers (under g_done_lock). */
static pthread_mutex_t g_done_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_done_cond = PTHREAD_COND_INITIALIZER;
typedef struct camel_timing {
    uint64_t cb_id; /* which command buffer this slot holds; 0 = empty */
    double start, end;
} camel_timing;
static camel_timing g_timings[CAMEL_TIMING_RING];
static uint64_t g_committed_count = 0; /* command buffers committed */
static uint64_t g_handled_count = 0;   /* ... whose completed handler has run */
static uint64_t g_completed_id = 0;    /* every id <= this has completed */
static NSMutableString *g_failures = nil; /* command buffer errors since last synchronize */

/* ---- device ---------------------------------------------------------------- */

/* Uncompleted command buffers the queue holds before -commandBuffer blocks. */
#define CAMEL_MAX_COMMAND_BUFFERS 1024

/* The system default device; when there is none (Apple: a command-line tool
 * must link CoreGraphics for it, and it has been reported nil over SSH and in
 * tmux), the first device MTLCopyAllDevices lists that is not low-power,
 * else the first one. */
static id<MTLDevice> default_device(void) {
    id<MTLDevice> device = MTLCreateSystemDefaultDevice();
    if (device != nil) return device;
    NSArray<id<MTLDevice>> *all = MTLCopyAllDevices();
    for (id<MTLDevice> candidate in all)
        if (!candidate.lowPower) return candidate;
    return all.firstObject;
}

int camel_init(void) {
    @autoreleasepool {
        clear_error();
        pthread_mutex_lock(&g_lock);
        if (g_device != nil) {
            pthread_mutex_unlock(&g_lock);
            return 0;
        }
        /* Programmatic capture to a .gputrace file needs MTL_CAPTURE_ENABLED=1
         * in the environment before Metal loads, which is when this library
         * loads: too late to set it here. camel/metal/loading.py sets it before it
         * loads the shim when CAMEL_CAPTURE asks for a capture. */

        id<MTLDevice> device = default_device();
        if (device == nil) {
            pthread_mutex_unlock(&g_lock);
            set_error("[metal] no Metal device found (MTLCreateSystemDefaultDevice returned nil "
                      "and MTLCopyAllDevices listed none); set CAMEL_SHIM=sim to run the kernels "
                      "on the CPU with the Metal simulator");
            return 1;
        }
        /* newCommandQueue allows 64 uncompleted command buffers, and
         * -commandBuffer blocks once they are all taken; MPSGraph's
         * commitAndContinue takes extra ones. Room for many more. */
        id<MTLCommandQueue> queue =
            [device newCommandQueueWithMaxCommandBufferCount:CAMEL_MAX_COMMAND_BUFFERS];
        if (queue == nil) {
            pthread_mutex_unlock(&g_lock);
            set_error("[metal] %s: newCommandQueueWithMaxCommandBufferCount:%d returned nil",
                      device.name.UTF8String, CAMEL_MAX_COMMAND_BUFFERS);
            return 1;
        }
        queue.label = @"camel";
        g_live_buffers = CFSetCreateMutable(NULL, 0, NULL);
        g_live_libraries = CFSetCreateMutable(NULL, 0, NULL);
        g_live_pipelines = CFSetCreateMutable(NULL, 0, NULL);
        g_failures = [NSMutableString string];
        g_queue = queue;
        g_device = device; /* last: g_device != nil means "fully initialised" */
        pthread_mutex_unlock(&g_lock);
        return 0;
    }
}

/* Every entry point that needs the device starts with this. */
static int need_device(void) {
    if (g_device != nil) return 0;
    return camel_init();
}

int camel_device_info_get(camel_device_info *out) {
    @autoreleasepool {
        clear_error();
        if (out == NULL) {
            set_error("[device] camel_device_info_get: out is NULL");
            return 1;
        }
        if (need_device()) return 1;
        memset(out, 0, sizeof(*out));
        snprintf(out->name, sizeof(out->name), "%s", g_device.name.UTF8String);
        out->is_simulator = 0;
        /* MTLSize per dimension; Apple GPUs report 1024 for width. The total
         * per kernel is the pipeline's maxTotalThreadsPerThreadgroup. */
        out->max_threads_per_threadgroup = (uint32_t)g_device.maxThreadsPerThreadgroup.width;
        out->max_threadgroup_memory = (uint32_t)g_device.maxThreadgroupMemoryLength;
        out->simd_width = CAMEL_APPLE_SIMD_WIDTH;
        out->recommended_working_set = g_device.recommendedMaxWorkingSetSize;
        return 0;
    }
}

/* ---- buffers ----------------------------------------------------------------- */

camel_buffer *camel_buffer_new(uint64_t nbytes, void **contents) {
    @autoreleasepool {
        clear_error();
        if (need_device()) return NULL;
        if (nbytes == 0) {
            set_error("[buffer] cannot allocate a buffer of 0 bytes");
            return NULL;
        }
        if (nbytes > g_device.maxBufferLength) {
            set_error("[buffer] %llu bytes requested, but %s allows at most %llu bytes per buffer",
                      (unsigned long long)nbytes, g_device.name.UTF8String,
                      (unsigned long long)g_device.maxBufferLength);
            return NULL;
        }
        /* Shared storage: CPU and GPU see the same memory (unified memory on
         * Apple silicon), so contents is directly readable and writable from
         * NumPy. Metal zero-fills a new buffer. */
        id<MTLBuffer> buffer = [g_device newBufferWithLength:(NSUInteger)nbytes
                                                     options:MTLResourceStorageModeShared];
        if (buffer == nil) {
            set_error("[buffer] newBufferWithLength:%llu failed (out of memory? %llu bytes are "
                      "allocated through camel in %llu buffers)",
                      (unsigned long long)nbytes, (unsigned long long)g_allocated_bytes,
                      (unsigned long long)g_buffer_count);
            return NULL;
        }
        if (contents != NULL) *contents = buffer.contents;
        /* Hand one retain to C; camel_buffer_release gives it back to ARC. */
        camel_buffer *handle = (__bridge_retained camel_buffer *)buffer;
        pthread_mutex_lock(&g_lock);
        CFSetAddValue(g_live_buffers, handle);
        g_allocated_bytes += buffer.length;
        g_buffer_count += 1;
        pthread_mutex_unlock(&g_lock);
        return handle;
    }
}

int camel_buffer_release(camel_buffer *handle) {
    @autoreleasepool {
        clear_error();
        pthread_mutex_lock(&g_lock);
        if (!is_live(g_live_buffers, handle)) {
            pthread_mutex_unlock(&g_lock);
            set_error("[buffer] release of %p, which is not a live buffer (released twice?)",
                      (void *)handle);
            return 1;
        }
        CFSetRemoveValue(g_live_buffers, handle);
        /* Back to ARC; `buffer` dies at the end of this scope. That is safe
         * even if a command buffer that uses it is still pending: command
         * buffers made with -[MTLCommandQueue commandBuffer] keep strong
         * references to every resource encoded into them, so Metal frees the
         * storage only after the last of them completes. */
        id<MTLBuffer> buffer = CFBridgingRelease(handle);
        g_allocated_bytes -= buffer.length;
        g_buffer_count -= 1;
        pthread_mutex_unlock(&g_lock);
        return 0;
    }
}

int camel_memory_info_get(camel_memory_info *out) {
    clear_error();
    if (out == NULL) {
        set_error("[buffer] camel_memory_info_get: out is NULL");
        return 1;
    }
    pthread_mutex_lock(&g_lock);
    out->allocated_bytes = g_allocated_bytes;
    out->buffers = g_buffer_count;
    pthread_mutex_unlock(&g_lock);
    return 0;
}

/* ---- libraries ------------------------------------------------------------------ */

/* MTLMathModeRelaxed (macOS 15 SDK: MTLMathModeSafe 0, Relaxed 1, Fast 2). */
#define CAMEL_MTL_MATH_MODE_RELAXED 1

camel_library *camel_library_new(const char *source, const char *path) {
    @autoreleasepool {
        clear_error();
        if (need_device()) return NULL;
        NSString *where = utf8(path);
        if (where == nil) where = @"<source>";
        if (source == NULL) {
            set_error("[compile] %s: source is NULL", where.UTF8String);
            return NULL;
        }
        NSString *text = utf8(source);
        if (text == nil) {
            set_error("[compile] %s: source is not valid UTF-8", where.UTF8String);
            return NULL;
        }
        MTLCompileOptions *options = [[MTLCompileOptions alloc] init];
        /* MSL 3.1 where the system has it (macOS 14 and later), MSL 3.0 on macOS
         * 13 (the oldest system we support): pinned so a newer macOS compiles the
         * kernels as the simulator and the CUDA translation read them (MSL 3.1,
         * __METAL_VERSION__ 310, bfloat). The macOS 13 SDK has no
         * MTLLanguageVersion3_1; Apple documents it as 3.1, (3 << 16) + 1 like
         * the others (MTLLanguageVersion3_0 is (3 << 16) + 0). The system is
         * asked through NSProcessInfo, not @available, whose check needs
         * compiler-rt's __isPlatformVersionAtLeast (not in the cross-link). */
        NSOperatingSystemVersion sonoma = {14, 0, 0};
        if ([[NSProcessInfo processInfo] isOperatingSystemAtLeastVersion:sonoma])
            options.languageVersion = (MTLLanguageVersion)((3 << 16) + 1); /* MTLLanguageVersion3_1 */
        else
            options.languageVersion = MTLLanguageVersion3_0;
        /* IEEE float semantics by default (inf and NaN behave as in NumPy and
         * in the simulator; the kernels use -inf masks). fastMathEnabled
         * defaults to YES, so it is switched off explicitly; NO means
         * MTLMathModeSafe. CAMEL_METAL_FAST_MATH=1 asks for MTLMathModeRelaxed
         * (aggressive optimisations that still honour inf/NaN), which exists
         * from macOS 15 on; the macOS 13 SDK does not declare it, so it is set
         * by selector when this Metal has it. Older systems stay safe: their
         * only fast mode (fastMathEnabled) does not honour inf/NaN. */
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wdeprecated-declarations"
        options.fastMathEnabled = NO;
#pragma clang diagnostic pop
        const char *fast = getenv("CAMEL_METAL_FAST_MATH");
        SEL set_math_mode = @selector(setMathMode:);
        if (fast != NULL && strcmp(fast, "1") == 0 && [options respondsToSelector:set_math_mode])
            ((void (*)(id, SEL, NSInteger))objc_msgSend)(options, set_math_mode,
                                                         CAMEL_MTL_MATH_MODE_RELAXED);

        NSError *error = nil;
        id<MTLLibrary> library = [g_device newLibraryWithSource:text options:options error:&error];
        if (library == nil) {
            /* Metal names the source "program_source" in its log; put the
             * real file there so "file:line:col: error" points at the .metal. */
            NSString *log = error ? error.localizedDescription : @"(no compiler log)";
            NSString *prefix = [where stringByAppendingString:@":"];
            log = [log stringByReplacingOccurrencesOfString:@"program_source:" withString:prefix];
            set_error("[compile] %s: compilation failed:\n%s", where.UTF8String, log.UTF8String);
            return NULL;
        }
        /* On success `error` may still hold warnings; kernels run anyway. */
        CamelLibrary *lib = [[CamelLibrary alloc] init];
        lib.library = library;
        lib.path = where;
        camel_library *handle = (__bridge_retained camel_library *)lib;
        pthread_mutex_lock(&g_lock);
        CFSetAddValue(g_live_libraries, handle);
        pthread_mutex_unlock(&g_lock);
        return handle;
    }
}

/* Look up a live library handle; NULL (with the error set) if it is not one. */
static CamelLibrary *live_library(camel_library *handle, const char *component) {
    pthread_mutex_lock(&g_lock);
    int live = is_live(g_live_libraries, handle);
    pthread_mutex_unlock(&g_lock);
    if (!live) {
        set_error("[%s] %p is not a live library (released?)", component, (void *)handle);
        return nil;
    }
    return (__bridge CamelLibrary *)handle;
}

void camel_library_release(camel_library *handle) {
    @autoreleasepool {
        clear_error();
        pthread_mutex_lock(&g_lock);
        int live = is_live(g_live_libraries, handle);
        if (live) CFSetRemoveValue(g_live_libraries, handle);
        pthread_mutex_unlock(&g_lock);
        if (!live) {
            /* void in the ABI: the message is there for whoever asks. */
            set_error("[compile] release of %p, which is not a live library (released twice?)",
                      (void *)handle);
            return;
        }
        /* Pipelines made from it keep working: they hold what they need. */
        CamelLibrary *lib = CFBridgingRelease(handle);
        (void)lib;
    }
}

/* Kernel names, sorted, for listings and error messages. */
static NSArray<NSString *> *sorted_names(CamelLibrary *lib) {
    return [lib.library.functionNames sortedArrayUsingSelector:@selector(compare:)];
}

/* s into out (cap bytes, NUL-terminated, cut to fit; nothing when out is NULL or cap 0).
 * Returns the length needed, excluding the NUL (camel_library_function_names). */
static uint64_t copy_out(const char *s, char *out, uint64_t cap) {
    uint64_t len = strlen(s);
    if (out != NULL && cap > 0) {
        uint64_t n = len < cap - 1 ? len : cap - 1;
        memcpy(out, s, n);
        out[n] = '\0';
    }
    return len;
}

uint64_t camel_library_function_names(camel_library *handle, char *out, uint64_t cap) {
    @autoreleasepool {
        clear_error();
        CamelLibrary *lib = live_library(handle, "compile");
        if (lib == nil) return copy_out("", out, cap);
        return copy_out([sorted_names(lib) componentsJoinedByString:@"\n"].UTF8String, out, cap);
    }
}

/* ---- pipelines ---------------------------------------------------------------- */

static void copy_name(char dst[64], NSString *name) {
    snprintf(dst, 64, "%s", name ? name.UTF8String : "?");
}

/* Function constants: camel_constant_type (+ components) <-> MTLDataType. The vector
 * types follow their scalar in MTLDataType (MTLDataTypeFloat2 = MTLDataTypeFloat + 1). */
static const struct {
    uint32_t code;
    MTLDataType type;
    const char *msl;
} kConstantTypes[] = {
    {CAMEL_CONSTANT_BOOL, MTLDataTypeBool, "bool"},     {CAMEL_CONSTANT_CHAR, MTLDataTypeChar, "char"},
    {CAMEL_CONSTANT_UCHAR, MTLDataTypeUChar, "uchar"},  {CAMEL_CONSTANT_SHORT, MTLDataTypeShort, "short"},
    {CAMEL_CONSTANT_USHORT, MTLDataTypeUShort, "ushort"}, {CAMEL_CONSTANT_INT, MTLDataTypeInt, "int"},
    {CAMEL_CONSTANT_UINT, MTLDataTypeUInt, "uint"},     {CAMEL_CONSTANT_HALF, MTLDataTypeHalf, "half"},
    {CAMEL_CONSTANT_FLOAT, MTLDataTypeFloat, "float"},
};

/* "float2" for MTLDataTypeFloat2; "unsupported" for a type the ABI has no code for. */
static NSString *constant_type_name(MTLDataType type) {
    for (size_t i = 0; i < sizeof kConstantTypes / sizeof kConstantTypes[0]; i++) {
        NSInteger n = (NSInteger)type - (NSInteger)kConstantTypes[i].type + 1;
        if (n == 1) return @(kConstantTypes[i].msl);
        if (n >= 2 && n <= 4 && kConstantTypes[i].code != CAMEL_CONSTANT_BOOL)
            return [NSString stringWithFormat:@"%s%ld", kConstantTypes[i].msl, (long)n];
    }
    return @"unsupported";
}

/* The MTLDataType of a camel_constant_value, or MTLDataTypeNone. */
static MTLDataType constant_data_type(const camel_constant_value *v) {
    for (size_t i = 0; i < sizeof kConstantTypes / sizeof kConstantTypes[0]; i++)
        if (kConstantTypes[i].code == v->type && v->components >= 1 && v->components <= 4 &&
            (v->components == 1 || v->type != CAMEL_CONSTANT_BOOL))
            return (MTLDataType)(kConstantTypes[i].type + (v->components - 1));
    return MTLDataTypeNone;
}

uint64_t camel_library_function_constants(camel_library *handle, char *out, uint64_t cap) {
    @autoreleasepool {
        clear_error();
        CamelLibrary *lib = live_library(handle, "compile");
        if (lib == nil) return copy_out("", out, cap);
        /* The union over the library's functions (MTLFunction.functionConstantsDictionary),
         * by index. */
        NSMutableDictionary<NSNumber *, NSString *> *lines = [NSMutableDictionary dictionary];
        for (NSString *fname in lib.library.functionNames) {
            id<MTLFunction> f = [lib.library newFunctionWithName:fname];
            for (MTLFunctionConstant *c in f.functionConstantsDictionary.allValues)
                lines[@(c.index)] = [NSString stringWithFormat:@"%lu %@ %@", (unsigned long)c.index,
                                                               constant_type_name(c.type), c.name];
        }
        NSMutableString *text = [NSMutableString string];
        for (NSNumber *index in [lines.allKeys sortedArrayUsingSelector:@selector(compare:)])
            [text appendFormat:@"%@\n", lines[index]];
        return copy_out(text.UTF8String, out, cap);
    }
}

camel_pipeline *camel_pipeline_new(camel_library *handle, const char *name) {
    return camel_pipeline_new_with_constants(handle, name, NULL, 0);
}

camel_pipeline *camel_pipeline_new_with_constants(camel_library *handle, const char *name,
                                                  const camel_constant_value *values,
                                                  uint32_t nvalues) {
    @autoreleasepool {
        clear_error();
        CamelLibrary *lib = live_library(handle, "pipeline");
        if (lib == nil) return NULL;
        NSString *kernel = utf8(name);
        if (kernel == nil) {
            set_error("[pipeline] kernel name is NULL or not UTF-8");
            return NULL;
        }
        if (nvalues > 0 && values == NULL) {
            set_error("[pipeline] kernel '%s': %u function-constant values but values is NULL", name,
                      nvalues);
            return NULL;
        }
        id<MTLFunction> function = [lib.library newFunctionWithName:kernel];
        if (function == nil) {
            NSString *names = [sorted_names(lib) componentsJoinedByString:@", "];
            set_error("[pipeline] %s has no kernel named '%s'; it has: %s", lib.path.UTF8String,
                      name, names.length ? names.UTF8String : "(no functions)");
            return NULL;
        }
        NSDictionary<NSString *, MTLFunctionConstant *> *declared = function.functionConstantsDictionary;
        if (declared.count > 0) {
            /* A specialised function (newFunctionWithName:constantValues:error:); a value
             * for a constant this function lacks is ignored, as Metal ignores it. */
            MTLFunctionConstantValues *constants = [[MTLFunctionConstantValues alloc] init];
            for (uint32_t i = 0; i < nvalues; i++) {
                MTLFunctionConstant *c = nil;
                for (MTLFunctionConstant *d in declared.allValues)
                    if (d.index == values[i].index) c = d;
                if (c == nil) continue;
                MTLDataType type = constant_data_type(&values[i]);
                if (type != c.type) {
                    set_error("[pipeline] kernel '%s': function constant '%s' (index %u) is %s, the "
                              "value given is not (camel type %u, %u components)",
                              name, c.name.UTF8String, values[i].index,
                              constant_type_name(c.type).UTF8String, values[i].type,
                              values[i].components);
                    return NULL;
                }
                [constants setConstantValue:values[i].bytes type:type atIndex:values[i].index];
            }
            NSError *error = nil;
            function = [lib.library newFunctionWithName:kernel constantValues:constants error:&error];
            if (function == nil) {
                set_error("[pipeline] cannot specialise kernel '%s' in %s with its function "
                          "constants: %s",
                          name, lib.path.UTF8String,
                          error ? error.localizedDescription.UTF8String : "(no message)");
                return NULL;
            }
        }
        if (function.functionType != MTLFunctionTypeKernel) {
            set_error("[pipeline] '%s' in %s is not a kernel function", name, lib.path.UTF8String);
            return NULL;
        }

        /* Ask for reflection too: the kernel's [[buffer(i)]] and
         * [[threadgroup(i)]] parameters, so dispatches can be checked. */
        NSError *error = nil;
        MTLComputePipelineReflection *reflection = nil;
        id<MTLComputePipelineState> state =
            [g_device newComputePipelineStateWithFunction:function
                                                  options:kCamelBindingInfo
                                               reflection:&reflection
                                                    error:&error];
        if (state == nil) {
            set_error("[pipeline] cannot build a pipeline for '%s' in %s: %s", name,
                      lib.path.UTF8String,
                      error ? error.localizedDescription.UTF8String : "(no message)");
            return NULL;
        }

        CamelPipeline *pipeline = [[CamelPipeline alloc] init];
        pipeline.state = state;
        pipeline.name = kernel;
        snprintf(pipeline->cname, sizeof(pipeline->cname), "%s", name);
        for (id<MTLBinding> binding in reflection.bindings) {
            NSUInteger i = binding.index;
            if (binding.type == MTLBindingTypeBuffer && i < CAMEL_MAX_BUFFER_BINDINGS) {
                id<MTLBufferBinding> b = (id<MTLBufferBinding>)binding;
                camel_binding *slot = &pipeline->buffers[i];
                slot->present = 1;
                slot->size = b.bufferDataSize;
                /* Apple: align a device-buffer offset to its data type,
                 * which never needs more than 16 bytes. */
                slot->align = b.bufferAlignment < 16 ? b.bufferAlignment : 16;
                /* 0 is read-only: MTLArgumentAccessReadOnly in the macOS 13 SDK,
                 * MTLBindingAccessReadOnly (same value, new type) from macOS 14 */
                slot->writable = (NSUInteger)b.access != 0;
                copy_name(slot->name, b.name);
                if (i + 1 > pipeline->nbuffer_params) pipeline->nbuffer_params = (uint32_t)i + 1;
            } else if (binding.type == MTLBindingTypeThreadgroupMemory &&
                       i < CAMEL_MAX_THREADGROUP_BINDINGS) {
                id<MTLThreadgroupBinding> t = (id<MTLThreadgroupBinding>)binding;
                camel_binding *slot = &pipeline->threadgroups[i];
                slot->present = 1;
                slot->size = t.threadgroupMemoryDataSize;
                slot->align = t.threadgroupMemoryAlignment;
                copy_name(slot->name, t.name);
                if (i + 1 > pipeline->nthreadgroup_params)
                    pipeline->nthreadgroup_params = (uint32_t)i + 1;
            }
        }
        camel_pipeline *out = (__bridge_retained camel_pipeline *)pipeline;
        pthread_mutex_lock(&g_lock);
        CFSetAddValue(g_live_pipelines, out);
        pthread_mutex_unlock(&g_lock);
        return out;
    }
}

/* Caller holds g_lock. */
static CamelPipeline *live_pipeline_locked(camel_pipeline *handle) {
    if (!is_live(g_live_pipelines, handle)) return nil;
    return (__bridge CamelPipeline *)handle;
}

void camel_pipeline_release(camel_pipeline *handle) {
    @autoreleasepool {
        clear_error();
        pthread_mutex_lock(&g_lock);
        int live = live_pipeline_locked(handle) != nil;
        if (live) CFSetRemoveValue(g_live_pipelines, handle);
        pthread_mutex_unlock(&g_lock);
        if (!live) {
            set_error("[pipeline] release of %p, which is not a live pipeline (released twice?)",
                      (void *)handle);
            return;
        }
        /* An encoded dispatch keeps its pipeline state alive on its own. */
        CamelPipeline *pipeline = CFBridgingRelease(handle);
        (void)pipeline;
    }
}

int camel_pipeline_info_get(camel_pipeline *handle, camel_pipeline_info *out) {
    @autoreleasepool {
        clear_error();
        pthread_mutex_lock(&g_lock);
        CamelPipeline *pipeline = live_pipeline_locked(handle);
        pthread_mutex_unlock(&g_lock);
        if (pipeline == nil || out == NULL) {
            set_error("[pipeline] %p is not a live pipeline (or out is NULL)", (void *)handle);
            return 1;
        }
        id<MTLComputePipelineState> state = pipeline.state;
        out->max_total_threads_per_threadgroup = (uint32_t)state.maxTotalThreadsPerThreadgroup;
        out->thread_execution_width = (uint32_t)state.threadExecutionWidth;
        out->static_threadgroup_memory = (uint32_t)state.staticThreadgroupMemoryLength;
        return 0;
    }
}

/* ---- command buffers ------------------------------------------------------------ */

/* Metal requires threadgroup memory lengths in multiples of 16 bytes
 * (setThreadgroupMemoryLength:atIndex:). */
static uint64_t round_up_16(uint64_t n) { return (n + 15) & ~(uint64_t)15; }

/* Record what a finished command buffer tells us. Runs on a Metal thread.
 * `earlier` is nil, or a command buffer that MPS committed by itself before
 * `cb` for the same camel id (MPSCommandBuffer's commitAndContinue, see the
 * MPSGraph section): the id's time then starts there and its errors count. */
static void command_buffer_done(id<MTLCommandBuffer> cb, id<MTLCommandBuffer> earlier,
                                uint64_t cb_id, NSArray<NSString *> *kernels) {
    pthread_mutex_lock(&g_done_lock);
    camel_timing *t = &g_timings[cb_id % CAMEL_TIMING_RING];
    t->cb_id = cb_id;
    t->start = cb.GPUStartTime;
    if (earlier != nil && earlier.GPUStartTime > 0.0 && earlier.GPUStartTime < t->start)
        t->start = earlier.GPUStartTime;
    t->end = cb.GPUEndTime;
    NSError *error = cb.error ? cb.error : earlier.error;
    if (cb.status == MTLCommandBufferStatusError || error != nil) {
        NSString *what = error ? error.localizedDescription : @"unknown error";
        [g_failures appendFormat:@"%@[metal] command buffer #%llu (kernels: %@) failed: %@",
                                 g_failures.length ? @"\n" : @"", (unsigned long long)cb_id,
                                 [kernels componentsJoinedByString:@", "], what];
    }
    /* The queue runs command buffers in order, but handlers may be called
     * out of order: advance the completed id only over a contiguous run. */
    while (g_timings[(g_completed_id + 1) % CAMEL_TIMING_RING].cb_id == g_completed_id + 1)
        g_completed_id += 1;
    g_handled_count += 1;
    pthread_cond_broadcast(&g_done_cond);
    pthread_mutex_unlock(&g_done_lock);
}

/* Make `cb` the open command buffer; it gets the next id. Caller holds g_lock. */
static void open_command_buffer_locked(id<MTLCommandBuffer> cb) {
    g_open_id = g_next_id++;
    cb.label = [NSString stringWithFormat:@"camel #%llu", (unsigned long long)g_open_id];
    g_open_cb = cb;
    g_open_dispatches = 0;
    g_open_kernels = [NSMutableOrderedSet orderedSet];
    g_open_keep_alive = [NSMutableArray array];
}

/* Take g_lock with a command buffer open. -[MTLCommandQueue commandBuffer]
 * blocks while the queue's CAMEL_MAX_COMMAND_BUFFERS are all uncompleted, so
 * it is called with g_lock released: a thread waiting for the GPU must not
 * hold up camel_synchronize or a completion on another thread. Returns 0 with
 * g_lock held and g_open_cb set, or 1 with g_lock released and the error set. */
static int lock_with_command_buffer(const char *component) {
    id<MTLCommandBuffer> fresh = nil;
    for (;;) {
        pthread_mutex_lock(&g_lock);
        if (g_open_cb != nil) return 0; /* an unused `fresh` is dropped uncommitted */
        if (fresh != nil) {
            open_command_buffer_locked(fresh);
            return 0;
        }
        pthread_mutex_unlock(&g_lock);
        /* -commandBuffer retains every resource encoded into it (see
         * camel_buffer_release). */
        fresh = [g_queue commandBuffer];
        if (fresh == nil) {
            set_error("[%s] -[MTLCommandQueue commandBuffer] returned nil", component);
            return 1;
        }
    }
}

/* The open command buffer's compute encoder, reused by every dispatch until
 * the next commit (or MPS, which encodes its own passes). Caller holds g_lock
 * and a command buffer is open (lock_with_command_buffer). */
static int ensure_encoder_locked(void) {
    if (g_encoder != nil) return 0;
    g_encoder = [g_open_cb computeCommandEncoder];
    if (g_encoder == nil) {
        set_error("[dispatch] -[MTLCommandBuffer computeCommandEncoder] returned nil");
        return 1;
    }
    return 0;
}

/* End encoding and commit the open command buffer. Caller holds g_lock.
 * Returns its id, or 0 if none was open. */
static uint64_t commit_locked(void) {
    if (g_open_cb == nil) return 0;
    if (g_encoder != nil) {
        [g_encoder endEncoding];
        g_encoder = nil;
    }
    id<MTLCommandBuffer> cb = g_open_cb;
    uint64_t cb_id = g_open_id;
    NSArray<NSString *> *kernels = g_open_kernels.array;
    NSArray *keep_alive = g_open_keep_alive; /* captured by the block until completion */
    [cb addCompletedHandler:^(id<MTLCommandBuffer> done) {
        (void)keep_alive;
        command_buffer_done(done, nil, cb_id, kernels);
    }];
    pthread_mutex_lock(&g_done_lock);
    g_committed_count += 1;
    pthread_mutex_unlock(&g_done_lock);
    [cb commit];
    g_last_committed = cb;
    g_open_cb = nil;
    g_open_kernels = nil;
    g_open_keep_alive = nil;
    g_open_dispatches = 0;
    return cb_id;
}

uint64_t camel_commit(void) {
    @autoreleasepool {
        clear_error();
        pthread_mutex_lock(&g_lock);
        uint64_t cb_id = commit_locked();
        pthread_mutex_unlock(&g_lock);
        return cb_id;
    }
}

int camel_synchronize(void) {
    @autoreleasepool {
        clear_error();
        if (g_device == nil) return 0; /* nothing was ever sent */
        pthread_mutex_lock(&g_lock);
        commit_locked();
        id<MTLCommandBuffer> last = g_last_committed;
        pthread_mutex_unlock(&g_lock);

        /* The queue executes command buffers in commit order, so waiting for
         * the last one waits for all of them. */
        if (last != nil) [last waitUntilCompleted];

        /* Completed handlers may run just after waitUntilCompleted returns;
         * wait for every one so their errors are reported here. */
        pthread_mutex_lock(&g_done_lock);
        int stuck = 0;
        while (g_handled_count < g_committed_count && !stuck) {
            struct timespec deadline;
            clock_gettime(CLOCK_REALTIME, &deadline);
            deadline.tv_sec += 10;
            if (pthread_cond_timedwait(&g_done_cond, &g_done_lock, &deadline) != 0 &&
                g_handled_count < g_committed_count)
                stuck = 1;
        }
        NSString *failures = g_failures.length ? [g_failures copy] : nil;
        [g_failures setString:@""];
        uint64_t pending = g_committed_count - g_handled_count;
        pthread_mutex_unlock(&g_done_lock);

        if (failures != nil) {
            set_error("%s", failures.UTF8String);
            return 1;
        }
        if (stuck) {
            set_error("[synchronize] %llu command buffer(s) did not report completion within 10 s",
                      (unsigned long long)pending);
            return 1;
        }
        return 0;
    }
}

uint64_t camel_completed_id(void) {
    pthread_mutex_lock(&g_done_lock);
    uint64_t cb_id = g_completed_id;
    pthread_mutex_unlock(&g_done_lock);
    return cb_id;
}

int camel_command_buffer_time(uint64_t cb_id, double *start, double *end) {
    clear_error();
    pthread_mutex_lock(&g_done_lock);
    camel_timing t = g_timings[cb_id % CAMEL_TIMING_RING];
    pthread_mutex_unlock(&g_done_lock);
    if (cb_id == 0 || t.cb_id != cb_id) {
        set_error("[timing] no timing for command buffer #%llu (not completed yet, or older than "
                  "the last %d)", (unsigned long long)cb_id, CAMEL_TIMING_RING);
        return 1;
    }
    if (t.start == 0.0 && t.end == 0.0) {
        set_error("[timing] command buffer #%llu has no GPU timestamps (it failed?)",
                  (unsigned long long)cb_id);
        return 1;
    }
    if (start) *start = t.start;
    if (end) *end = t.end;
    return 0;
}

/* ---- dispatch --------------------------------------------------------------------- */

/* Check a dispatch against the pipeline, the device and the kernel's
 * parameters. Caller holds g_lock. 0 if it may be encoded. */
static int validate_locked(const camel_dispatch_desc *d, CamelPipeline *p) {
    const char *k = p->cname;
    const uint32_t *tg = d->threads_per_threadgroup;

    /* Threadgroup size: every dimension >= 1, the product within the
     * pipeline's limit (which depends on the kernel's register use). */
    if (tg[0] == 0 || tg[1] == 0 || tg[2] == 0) {
        set_error("[dispatch] kernel '%s': threads_per_threadgroup (%u, %u, %u) has a zero "
                  "dimension", k, tg[0], tg[1], tg[2]);
        return 1;
    }
    uint64_t threads = (uint64_t)tg[0] * tg[1] * tg[2];
    uint64_t max_threads = p.state.maxTotalThreadsPerThreadgroup;
    if (threads > max_threads) {
        set_error("[dispatch] kernel '%s': threadgroup (%u, %u, %u) has %llu threads, more than "
                  "the pipeline's maxTotalThreadsPerThreadgroup %llu",
                  k, tg[0], tg[1], tg[2], (unsigned long long)threads,
                  (unsigned long long)max_threads);
        return 1;
    }
    MTLSize dev = g_device.maxThreadsPerThreadgroup;
    if (tg[0] > dev.width || tg[1] > dev.height || tg[2] > dev.depth) {
        set_error("[dispatch] kernel '%s': threadgroup (%u, %u, %u) exceeds the device's "
                  "per-dimension limit (%llu, %llu, %llu)", k, tg[0], tg[1], tg[2],
                  (unsigned long long)dev.width, (unsigned long long)dev.height,
                  (unsigned long long)dev.depth);
        return 1;
    }

    /* thread_position_in_grid is a 32-bit uint on every axis, and the
     * threadgroup count must fit one too (the simulator checks the same). */
    uint64_t groups_total = 1;
    for (int a = 0; a < 3; a++) {
        uint64_t g = d->grid[a];
        uint64_t axis_threads = d->grid_is_threads ? g : g * tg[a];
        groups_total *= d->grid_is_threads ? (g + tg[a] - 1) / tg[a] : g;
        if (axis_threads > 0xffffffffull || groups_total > 0xffffffffull) {
            set_error("[dispatch] kernel '%s': the grid (%u, %u, %u) %s is too large: more "
                      "than 2^32 - 1 threads along an axis or threadgroups in total", k,
                      d->grid[0], d->grid[1], d->grid[2],
                      d->grid_is_threads ? "threads" : "threadgroups");
            return 1;
        }
    }

    /* Threadgroup memory: the kernel's static `threadgroup` variables plus
     * every [[threadgroup(i)]] length (rounded up to 16) within the device. */
    if (d->nthreadgroup_memory > 0 && d->threadgroup_memory == NULL) {
        set_error("[dispatch] kernel '%s': %u threadgroup memory lengths but the array is NULL",
                  k, d->nthreadgroup_memory);
        return 1;
    }
    if (d->nthreadgroup_memory > CAMEL_MAX_THREADGROUP_BINDINGS) {
        set_error("[dispatch] kernel '%s': %u threadgroup memory lengths, Metal allows %d", k,
                  d->nthreadgroup_memory, CAMEL_MAX_THREADGROUP_BINDINGS);
        return 1;
    }
    uint64_t static_tg = p.state.staticThreadgroupMemoryLength;
    uint64_t total_tg = static_tg;
    for (uint32_t i = 0; i < d->nthreadgroup_memory; i++)
        total_tg += round_up_16(d->threadgroup_memory[i]);
    uint64_t max_tg = g_device.maxThreadgroupMemoryLength;
    if (total_tg > max_tg) {
        set_error("[dispatch] kernel '%s': threadgroup memory %llu bytes (static %llu + dynamic "
                  "%llu, each length rounded up to 16) exceeds the device limit %llu bytes", k,
                  (unsigned long long)total_tg, (unsigned long long)static_tg,
                  (unsigned long long)(total_tg - static_tg), (unsigned long long)max_tg);
        return 1;
    }
    for (uint32_t i = 0; i < p->nthreadgroup_params; i++) {
        const camel_binding *want = &p->threadgroups[i];
        if (!want->present) continue;
        if (i >= d->nthreadgroup_memory || d->threadgroup_memory[i] == 0) {
            set_error("[dispatch] kernel '%s': parameter '%s' [[threadgroup(%u)]] needs a "
                      "threadgroup memory length (got %u lengths)", k, want->name, i,
                      d->nthreadgroup_memory);
            return 1;
        }
    }

    /* Arguments: one per [[buffer(i)]] the kernel declares, no more. */
    if (d->nargs > 0 && d->args == NULL) {
        set_error("[dispatch] kernel '%s': %u arguments but the array is NULL", k, d->nargs);
        return 1;
    }
    if (d->nargs != p->nbuffer_params) {
        if (p->nbuffer_params == 0)
            set_error("[dispatch] kernel '%s' takes no buffer arguments, got %u", k, d->nargs);
        else
            set_error("[dispatch] kernel '%s' takes %u buffer argument(s) ([[buffer(0)]] .. "
                      "[[buffer(%u)]]), got %u", k, p->nbuffer_params, p->nbuffer_params - 1,
                      d->nargs);
        return 1;
    }
    for (uint32_t i = 0; i < d->nargs; i++) {
        const camel_arg *a = &d->args[i];
        const camel_binding *want = &p->buffers[i];
        const char *pname = want->present ? want->name : "(unused index)";
        if (a->buffer != NULL) {
            if (!is_live(g_live_buffers, a->buffer)) {
                set_error("[dispatch] kernel '%s': argument %u ('%s') is %p, not a live buffer "
                          "(released?)", k, i, pname, (void *)a->buffer);
                return 1;
            }
            id<MTLBuffer> buffer = (__bridge id<MTLBuffer>)a->buffer;
            if (a->offset > buffer.length) {
                set_error("[dispatch] kernel '%s': argument %u ('%s') offset %llu is past the end "
                          "of its %llu-byte buffer", k, i, pname, (unsigned long long)a->offset,
                          (unsigned long long)buffer.length);
                return 1;
            }
            if (want->present && want->align > 1 && a->offset % want->align != 0) {
                set_error("[dispatch] kernel '%s': argument %u ('%s') offset %llu is not a "
                          "multiple of %llu, the alignment of its element type", k, i, pname,
                          (unsigned long long)a->offset, (unsigned long long)want->align);
                return 1;
            }
        } else if (a->bytes != NULL) {
            if (a->length == 0 || a->length > CAMEL_MAX_SET_BYTES) {
                set_error("[dispatch] kernel '%s': argument %u ('%s') is %llu constant bytes; "
                          "setBytes takes 1..%d (use a buffer for more)", k, i, pname,
                          (unsigned long long)a->length, CAMEL_MAX_SET_BYTES);
                return 1;
            }
            if (want->present && want->writable) {
                set_error("[dispatch] kernel '%s': argument %u ('%s') is written by the kernel "
                          "(not const), but was bound by setBytes (a copy of a NumPy array or "
                          "a Python value), so its writes would be lost: pass a DeviceArray or "
                          "Buffer, or declare the parameter const/constant", k, i, pname);
                return 1;
            }
            if (want->present && a->length < want->size) {
                set_error("[dispatch] kernel '%s': argument %u ('%s') is %llu bytes, but the "
                          "kernel reads a %llu-byte value there", k, i, pname,
                          (unsigned long long)a->length, (unsigned long long)want->size);
                return 1;
            }
        } else if (want->present) { /* None from Python: only where nothing is declared */
            set_error("[dispatch] kernel '%s': argument %u ('%s') has neither a buffer nor "
                      "bytes", k, i, pname);
            return 1;
        }
    }
    return 0;
}

uint64_t camel_dispatch(const camel_dispatch_desc *d) {
    @autoreleasepool {
        clear_error();
        if (d == NULL) {
            set_error("[dispatch] desc is NULL");
            return 0;
        }
        if (need_device()) return 0;
        if (lock_with_command_buffer("dispatch") != 0) return 0;
        CamelPipeline *p = live_pipeline_locked(d->pipeline);
        if (p == nil) {
            pthread_mutex_unlock(&g_lock);
            set_error("[dispatch] %p is not a live pipeline (released?)", (void *)d->pipeline);
            return 0;
        }
        if (validate_locked(d, p) != 0 || ensure_encoder_locked() != 0) {
            pthread_mutex_unlock(&g_lock);
            return 0;
        }

        id<MTLComputeCommandEncoder> enc = g_encoder;
        if (g_capturing) [enc pushDebugGroup:p.name]; /* names the dispatch in Xcode */
        [enc setComputePipelineState:p.state];
        for (uint32_t i = 0; i < d->nargs; i++) {
            const camel_arg *a = &d->args[i];
            if (a->buffer != NULL)
                [enc setBuffer:(__bridge id<MTLBuffer>)a->buffer offset:a->offset atIndex:i];
            else if (a->bytes != NULL)
                [enc setBytes:a->bytes length:a->length atIndex:i]; /* copied now */
        }
        for (uint32_t i = 0; i < d->nthreadgroup_memory; i++)
            if (d->threadgroup_memory[i] > 0)
                [enc setThreadgroupMemoryLength:round_up_16(d->threadgroup_memory[i]) atIndex:i];

        MTLSize grid = MTLSizeMake(d->grid[0], d->grid[1], d->grid[2]);
        MTLSize group = MTLSizeMake(d->threads_per_threadgroup[0], d->threads_per_threadgroup[1],
                                    d->threads_per_threadgroup[2]);
        if (grid.width == 0 || grid.height == 0 || grid.depth == 0) {
            /* An empty grid runs no thread: nothing to encode (the
             * simulator accepts it the same way). */
        } else if (d->grid_is_threads) {
            /* Exactly grid threads; Metal shrinks the threadgroups at the
             * edge (non-uniform threadgroup sizes: every Apple-silicon GPU
             * supports them). */
            [enc dispatchThreads:grid threadsPerThreadgroup:group];
        } else {
            [enc dispatchThreadgroups:grid threadsPerThreadgroup:group];
        }
        if (g_capturing) [enc popDebugGroup];

        uint64_t cb_id = g_open_id;
        [g_open_kernels addObject:p.name];
        /* Split long chains so no command buffer runs into the GPU watchdog. */
        if (++g_open_dispatches >= CAMEL_MAX_DISPATCHES_PER_COMMAND_BUFFER) commit_locked();
        pthread_mutex_unlock(&g_lock);
        return cb_id;
    }
}

/* ---- MPS: the vendor GEMM the matmul ladder is measured against -------------------- */

uint64_t camel_mps_matmul(camel_buffer *a, camel_buffer *b, camel_buffer *c, uint32_t m,
                          uint32_t n, uint32_t k) {
    @autoreleasepool {
        clear_error();
        if (need_device()) return 0;
        if (!MPSSupportsMTLDevice(g_device)) {
            set_error("[mps] MetalPerformanceShaders does not support %s",
                      g_device.name.UTF8String);
            return 0;
        }
        if (m == 0 || n == 0 || k == 0) {
            set_error("[mps] matmul sizes must be positive, got M=%u N=%u K=%u", m, n, k);
            return 0;
        }
        if (lock_with_command_buffer("mps") != 0) return 0;
        camel_buffer *handles[3] = {a, b, c};
        const char *names[3] = {"A", "B", "C"};
        uint64_t need[3] = {(uint64_t)m * k * 4, (uint64_t)k * n * 4, (uint64_t)m * n * 4};
        for (int i = 0; i < 3; i++) {
            if (!is_live(g_live_buffers, handles[i])) {
                pthread_mutex_unlock(&g_lock);
                set_error("[mps] %s is %p, not a live buffer", names[i], (void *)handles[i]);
                return 0;
            }
            NSUInteger have = ((__bridge id<MTLBuffer>)handles[i]).length;
            if (have < need[i]) {
                pthread_mutex_unlock(&g_lock);
                set_error("[mps] %s (M=%u N=%u K=%u, float32) needs %llu bytes, its buffer "
                          "has %llu", names[i], m, n, k, (unsigned long long)need[i],
                          (unsigned long long)have);
                return 0;
            }
        }
        /* MPS encodes its own passes into the command buffer, so the open
         * compute encoder must end first; the next dispatch opens a new one. */
        if (g_encoder != nil) {
            [g_encoder endEncoding];
            g_encoder = nil;
        }
        /* Row-major, contiguous: rowBytes = columns * sizeof(float). */
        MPSMatrixDescriptor *da = [MPSMatrixDescriptor matrixDescriptorWithRows:m columns:k
                                   rowBytes:(NSUInteger)k * 4 dataType:MPSDataTypeFloat32];
        MPSMatrixDescriptor *db = [MPSMatrixDescriptor matrixDescriptorWithRows:k columns:n
                                   rowBytes:(NSUInteger)n * 4 dataType:MPSDataTypeFloat32];
        MPSMatrixDescriptor *dc = [MPSMatrixDescriptor matrixDescriptorWithRows:m columns:n
                                   rowBytes:(NSUInteger)n * 4 dataType:MPSDataTypeFloat32];
        MPSMatrix *ma = [[MPSMatrix alloc] initWithBuffer:(__bridge id<MTLBuffer>)a descriptor:da];
        MPSMatrix *mb = [[MPSMatrix alloc] initWithBuffer:(__bridge id<MTLBuffer>)b descriptor:db];
        MPSMatrix *mc = [[MPSMatrix alloc] initWithBuffer:(__bridge id<MTLBuffer>)c descriptor:dc];
        /* C = 1.0 * A·B + 0.0 * C */
        MPSMatrixMultiplication *gemm =
            [[MPSMatrixMultiplication alloc] initWithDevice:g_device
                                              transposeLeft:NO
                                             transposeRight:NO
                                                 resultRows:m
                                              resultColumns:n
                                            interiorColumns:k
                                                      alpha:1.0
                                                       beta:0.0];
        [gemm encodeToCommandBuffer:g_open_cb leftMatrix:ma rightMatrix:mb resultMatrix:mc];
        /* Keep the kernel object alive until the command buffer completes. */
        [g_open_keep_alive addObject:gemm];

        uint64_t cb_id = g_open_id;
        [g_open_kernels addObject:@"MPSMatrixMultiplication"];
        if (++g_open_dispatches >= CAMEL_MAX_DISPATCHES_PER_COMMAND_BUFFER) commit_locked();
        pthread_mutex_unlock(&g_lock);
        return cb_id;
    }
}

/* ---- MPSGraph: the vendor attention the flash ladder is measured against ---------- */

/* MPSGraph (a graph compiler over MPS) has a fused scaled-dot-product attention
 * op from macOS 15 on:
 *   -[MPSGraph scaledDotProductAttentionWithQueryTensor:keyTensor:valueTensor:
 *              maskTensor:scale:name:]
 * computing softmax(scale * Q·Kᵀ + M)·V for Q, K, V of shape [B, H, N, D] and an
 * additive mask M that broadcasts to [B, H, Nq, Nkv]. camel builds against the
 * macOS 13 SDK, which does not declare it, so we look the method up at run time
 * (instancesRespondToSelector:) and call it through objc_msgSend cast to its exact
 * signature. (`@available` would need compiler-rt's __isPlatformVersionAtLeast,
 * and a declaration of our own would clash with newer SDKs' availability marks.) */
static SEL sdpa_selector(void) {
    return @selector(scaledDotProductAttentionWithQueryTensor:keyTensor:valueTensor:
                     maskTensor:scale:name:);
}
typedef MPSGraphTensor *(*SdpaMethod)(id graph, SEL cmd, MPSGraphTensor *query,
                                      MPSGraphTensor *key, MPSGraphTensor *value,
                                      MPSGraphTensor *mask, float scale, NSString *name);

/* One built graph per (batch_heads, T, D, scale, causal): placeholders in,
 * attention out. MPSGraph compiles a graph on its first run and caches the
 * result inside it, so keeping the graph keeps the compiled kernels. */
@interface CamelAttentionGraph : NSObject
@property(nonatomic, strong) MPSGraph *graph;
@property(nonatomic, strong) MPSGraphTensor *q, *k, *v, *result;
@end
@implementation CamelAttentionGraph
@end

#define CAMEL_MAX_ATTENTION_GRAPHS 64
static NSMutableDictionary<NSString *, CamelAttentionGraph *> *g_attention_graphs = nil;

/* The graph for one shape, built on first use. Caller holds g_lock. Returns
 * nil with the error set when MPSGraph hands back nil (a nil key or value in
 * an Objective-C dictionary literal raises outside any @try and aborts
 * Python, so every object that enters one is checked first); may raise an
 * Objective-C exception if MPSGraph rejects the shapes. */
static CamelAttentionGraph *attention_graph_locked(uint32_t bh, uint32_t t, uint32_t d,
                                                   float scale, int causal) {
    uint32_t scale_bits;
    memcpy(&scale_bits, &scale, sizeof(scale_bits)); /* the exact float in the key */
    NSString *key = [NSString stringWithFormat:@"%u %u %u %08x %d", bh, t, d, scale_bits, causal];
    if (g_attention_graphs == nil) g_attention_graphs = [NSMutableDictionary dictionary];
    CamelAttentionGraph *cached = g_attention_graphs[key];
    if (cached != nil) return cached;

    MPSGraph *graph = [[MPSGraph alloc] init];
    if (graph == nil) {
        set_error("[mpsgraph] [[MPSGraph alloc] init] returned nil");
        return nil;
    }
    /* Shared buffers need no synchronising blit after the run. */
    graph.options = MPSGraphOptionsNone;
    /* (B·H, T, D) as [B = 1, H = B·H, T, D], the rank the op documents. */
    MPSShape *shape = @[ @1, @(bh), @(t), @(d) ];
    MPSGraphTensor *q = [graph placeholderWithShape:shape dataType:MPSDataTypeFloat32 name:@"q"];
    MPSGraphTensor *k = [graph placeholderWithShape:shape dataType:MPSDataTypeFloat32 name:@"k"];
    MPSGraphTensor *v = [graph placeholderWithShape:shape dataType:MPSDataTypeFloat32 name:@"v"];
    MPSGraphTensor *mask = nil; /* nil: no mask */
    if (causal) {
        /* Additive mask, one [T, T] plane broadcast over the heads: 0 where
         * key j <= query i, -inf above. Apple documents bandPart without
         * naming the data types it takes, so the band is cut from a float
         * tensor of ones (1 in the lower triangle, 0 above) and compared. */
        MPSShape *plane = @[ @1, @1, @(t), @(t) ];
        MPSGraphTensor *ones = [graph constantWithScalar:1.0 shape:plane
                                                dataType:MPSDataTypeFloat32];
        MPSGraphTensor *band = [graph bandPartWithTensor:ones numLower:-1 numUpper:0 name:@"band"];
        MPSGraphTensor *zero = [graph constantWithScalar:0.0 shape:plane
                                                dataType:MPSDataTypeFloat32];
        MPSGraphTensor *keep = [graph notEqualWithPrimaryTensor:band secondaryTensor:zero
                                                           name:@"causal"];
        MPSGraphTensor *minus_inf = [graph constantWithScalar:-INFINITY shape:plane
                                                     dataType:MPSDataTypeFloat32];
        mask = [graph selectWithPredicateTensor:keep
                            truePredicateTensor:zero
                           falsePredicateTensor:minus_inf
                                           name:@"mask"];
    }
    if (q == nil || k == nil || v == nil || (causal && mask == nil)) {
        set_error("[mpsgraph] building attention for (%u, %u, %u) causal=%d: MPSGraph returned "
                  "a nil placeholder or mask tensor", bh, t, d, causal);
        return nil;
    }
    SdpaMethod sdpa = (SdpaMethod)objc_msgSend;
    MPSGraphTensor *result = sdpa(graph, sdpa_selector(), q, k, v, mask, scale, @"sdpa");
    if (result == nil) {
        set_error("[mpsgraph] scaledDotProductAttention for (%u, %u, %u) causal=%d returned nil",
                  bh, t, d, causal);
        return nil;
    }
    CamelAttentionGraph *entry = [[CamelAttentionGraph alloc] init];
    entry.graph = graph;
    entry.q = q;
    entry.k = k;
    entry.v = v;
    entry.result = result;
    /* A benchmark sweeps a few dozen shapes; past that, start over. */
    if (g_attention_graphs.count >= CAMEL_MAX_ATTENTION_GRAPHS) [g_attention_graphs removeAllObjects];
    g_attention_graphs[key] = entry;
    return entry;
}

/* Validate, build (or find) the graph and encode it. */
static uint64_t mpsgraph_attention(camel_buffer *q, camel_buffer *k, camel_buffer *v,
                                   camel_buffer *out, uint32_t bh, uint32_t t, uint32_t d,
                                   float scale, int causal) {
    /* MPSGraph's own command buffer, made before g_lock is taken
     * (-commandBuffer may block, see lock_with_command_buffer). */
    id<MTLCommandBuffer> first = [g_queue commandBuffer];
    if (first == nil) {
        set_error("[mpsgraph] -[MTLCommandQueue commandBuffer] returned nil");
        return 0;
    }
    pthread_mutex_lock(&g_lock);
    camel_buffer *handles[4] = {q, k, v, out};
    const char *names[4] = {"q", "k", "v", "out"};
    uint64_t need = (uint64_t)bh * t * d * 4;
    for (int i = 0; i < 4; i++) {
        if (!is_live(g_live_buffers, handles[i])) {
            pthread_mutex_unlock(&g_lock);
            set_error("[mpsgraph] %s is %p, not a live buffer", names[i], (void *)handles[i]);
            return 0;
        }
        NSUInteger have = ((__bridge id<MTLBuffer>)handles[i]).length;
        if (have < need) {
            pthread_mutex_unlock(&g_lock);
            set_error("[mpsgraph] %s of shape (%u, %u, %u) float32 needs %llu bytes, its buffer "
                      "has %llu", names[i], bh, t, d, (unsigned long long)need,
                      (unsigned long long)have);
            return 0;
        }
    }
    CamelAttentionGraph *g = nil;
    @try {
        g = attention_graph_locked(bh, t, d, scale, causal);
    } @catch (NSException *e) {
        pthread_mutex_unlock(&g_lock);
        set_error("[mpsgraph] building attention for (%u, %u, %u) causal=%d failed: %s: %s", bh,
                  t, d, causal, e.name.UTF8String, e.reason ? e.reason.UTF8String : "");
        return 0;
    }
    if (g == nil) { /* the error is set */
        pthread_mutex_unlock(&g_lock);
        return 0;
    }

    /* MPSGraph encodes through an MPSCommandBuffer, which may commit the
     * command buffer it wraps and carry on in a fresh one (commitAndContinue).
     * So it never gets our open command buffer: we send that off first, and
     * give MPSGraph a command buffer of its own on the same queue. The queue
     * runs command buffers in commit order, so the attention still sees every
     * dispatch before it and the dispatches after it see its result. */
    commit_locked();
    MPSCommandBuffer *mcb = [MPSCommandBuffer commandBufferWithCommandBuffer:first];
    /* Zero-copy views of our buffers as [1, B·H, T, D] float32 tensors. */
    MPSShape *shape = @[ @1, @(bh), @(t), @(d) ];
    MPSGraphTensorData *data[4];
    for (int i = 0; i < 4; i++) {
        data[i] = [[MPSGraphTensorData alloc] initWithMTLBuffer:(__bridge id<MTLBuffer>)handles[i]
                                                          shape:shape
                                                       dataType:MPSDataTypeFloat32];
        if (data[i] == nil) { /* Apple: "nil if allocation failure" */
            pthread_mutex_unlock(&g_lock);
            set_error("[mpsgraph] MPSGraphTensorData for %s (%u, %u, %u) float32 is nil "
                      "(allocation failure)", names[i], bh, t, d);
            return 0;
        }
    }
    MPSGraphTensorDataDictionary *feeds = @{g.q : data[0], g.k : data[1], g.v : data[2]};
    MPSGraphTensorDataDictionary *results = @{g.result : data[3]}; /* written in place */
    @try {
        [g.graph encodeToCommandBuffer:mcb
                                 feeds:feeds
                      targetOperations:nil
                     resultsDictionary:results
                   executionDescriptor:nil];
    } @catch (NSException *e) {
        pthread_mutex_unlock(&g_lock);
        set_error("[mpsgraph] encoding attention for (%u, %u, %u) causal=%d failed: %s: %s", bh,
                  t, d, causal, e.name.UTF8String, e.reason ? e.reason.UTF8String : "");
        return 0;
    }

    /* The command buffer MPS left open: ours to finish, like commit_locked. */
    id<MTLCommandBuffer> last = mcb.rootCommandBuffer;
    id<MTLCommandBuffer> earlier = (last == first) ? nil : first; /* committed by MPS */
    uint64_t cb_id = g_next_id++;
    last.label = [NSString stringWithFormat:@"camel #%llu (MPSGraph attention)",
                                            (unsigned long long)cb_id];
    NSArray<NSString *> *kernels = @[ @"MPSGraph scaledDotProductAttention" ];
    NSArray *keep_alive = @[ g, feeds, results ];
    [last addCompletedHandler:^(id<MTLCommandBuffer> done) {
        (void)keep_alive;
        command_buffer_done(done, earlier, cb_id, kernels);
    }];
    pthread_mutex_lock(&g_done_lock);
    g_committed_count += 1;
    pthread_mutex_unlock(&g_done_lock);
    [mcb commit];
    g_last_committed = last;
    pthread_mutex_unlock(&g_lock);
    return cb_id;
}

uint64_t camel_mpsgraph_attention(camel_buffer *q, camel_buffer *k, camel_buffer *v,
                                  camel_buffer *out, uint32_t batch_heads, uint32_t t,
                                  uint32_t d, float scale, int32_t causal) {
    @autoreleasepool {
        clear_error();
        if (need_device()) return 0;
        if (batch_heads == 0 || t == 0 || d == 0) {
            set_error("[mpsgraph] attention sizes must be positive, got batch_heads=%u T=%u D=%u",
                      batch_heads, t, d);
            return 0;
        }
        if (!isfinite(scale)) {
            set_error("[mpsgraph] attention scale must be finite, got %g", (double)scale);
            return 0;
        }
        /* Sizes that MPSGraph could not hold, checked before any graph is built:
         * each of q, k, v, out and the causal mask's (T, T) plane is one buffer. */
        uint64_t elems = 0;
        uint64_t max_elems = g_device.maxBufferLength / 4;
        if (__builtin_mul_overflow((uint64_t)batch_heads * t, (uint64_t)d, &elems) ||
            elems > max_elems || (causal && (uint64_t)t * t > max_elems)) {
            set_error("[mpsgraph] attention of shape (%u, %u, %u)%s float32 does not fit in one "
                      "buffer (%s allows %llu bytes)", batch_heads, t, d,
                      causal ? " with a (T, T) causal mask" : "", g_device.name.UTF8String,
                      (unsigned long long)g_device.maxBufferLength);
            return 0;
        }
        if (!MPSSupportsMTLDevice(g_device)) {
            set_error("[mpsgraph] MetalPerformanceShaders does not support %s",
                      g_device.name.UTF8String);
            return 0;
        }
        /* Both checks: the OS version, and that this MPSGraph really has the method. */
        NSOperatingSystemVersion macos15 = {15, 0, 0};
        if ([NSProcessInfo.processInfo isOperatingSystemAtLeastVersion:macos15] &&
            [MPSGraph instancesRespondToSelector:sdpa_selector()])
            return mpsgraph_attention(q, k, v, out, batch_heads, t, d, scale, causal != 0);
        set_error("[mpsgraph] MPSGraph scaled-dot-product attention needs macOS 15; this is %s",
                  NSProcessInfo.processInfo.operatingSystemVersionString.UTF8String);
        return 0;
    }
}

/* ---- programmatic GPU capture (open the .gputrace in Xcode) ------------------------ */

int camel_capture_begin(const char *path) {
    @autoreleasepool {
        clear_error();
        if (need_device()) return 1;
        NSString *file = utf8(path);
        if (file.length == 0) {
            set_error("[capture] no output path given (e.g. CAMEL_CAPTURE=run.gputrace)");
            return 1;
        }
        struct stat st;
        if (stat(path, &st) == 0) {
            set_error("[capture] %s already exists; remove it or choose another path", path);
            return 1;
        }
        MTLCaptureManager *manager = [MTLCaptureManager sharedCaptureManager];
        if (![manager supportsDestination:MTLCaptureDestinationGPUTraceDocument]) {
            set_error("[capture] this process cannot write .gputrace files: start it with "
                      "MTL_CAPTURE_ENABLED=1 in the environment (macOS 14+), or run it from Xcode");
            return 1;
        }
        /* Only command buffers created after the capture starts are recorded:
         * send off the open one first. */
        pthread_mutex_lock(&g_lock);
        commit_locked();
        MTLCaptureDescriptor *descriptor = [[MTLCaptureDescriptor alloc] init];
        descriptor.captureObject = g_device;
        descriptor.destination = MTLCaptureDestinationGPUTraceDocument;
        descriptor.outputURL = [NSURL fileURLWithPath:file];
        NSError *error = nil;
        BOOL ok = [manager startCaptureWithDescriptor:descriptor error:&error];
        if (ok) g_capturing = 1;
        pthread_mutex_unlock(&g_lock);
        if (!ok) {
            set_error("[capture] startCaptureWithDescriptor failed for %s: %s", path,
                      error ? error.localizedDescription.UTF8String : "(no message)");
            return 1;
        }
        return 0;
    }
}

int camel_capture_end(void) {
    @autoreleasepool {
        clear_error();
        pthread_mutex_lock(&g_lock);
        if (!g_capturing) {
            pthread_mutex_unlock(&g_lock);
            set_error("[capture] camel_capture_end without a capture in progress");
            return 1;
        }
        /* Only command buffers committed before stopCapture are recorded.
         * Waiting for them too (completion handlers take only g_done_lock,
         * so this cannot deadlock) means the trace ends with finished work. */
        commit_locked();
        [g_last_committed waitUntilCompleted];
        [[MTLCaptureManager sharedCaptureManager] stopCapture];
        g_capturing = 0;
        pthread_mutex_unlock(&g_lock);
        return 0;
    }
}

/* ---- host mirrors (ABI 2) ------------------------------------------------------ */

/* Every buffer here is MTLResourceStorageModeShared: the CPU and the GPU see one
 * memory, so there is nothing to synchronise (the CUDA shim copies instead; these
 * are the analogues of synchronizeResource: and didModifyRange: for managed storage). */
int camel_buffer_sync_to_host(camel_buffer *buffer) {
    clear_error();
    if (buffer == NULL) {
        set_error("[buffer] camel_buffer_sync_to_host: buffer is NULL");
        return 1;
    }
    return 0;
}

int camel_buffer_did_modify(camel_buffer *buffer, uint64_t offset, uint64_t length) {
    clear_error();
    if (buffer == NULL) {
        set_error("[buffer] camel_buffer_did_modify: buffer is NULL");
        return 1;
    }
    (void)offset;
    (void)length;
    return 0;
}
