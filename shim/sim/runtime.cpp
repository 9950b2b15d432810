// runtime.cpp — the camel_* C ABI (shim/camel_shim.h) on the Metal simulator.
//
// Python sees the same calls as on a Mac: buffers are plain host memory
// (Apple's unified memory makes that faithful), a library is a shared object
// compiled from the .metal source (translate.cpp), a pipeline is one kernel
// of it, and a command buffer is a list of dispatches that camel_commit runs
// on the worker pool (runtime_exec.cpp) before it returns.
#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <new>
#include <thread>
#include <unordered_set>

#include "../front/copy_out.h"
#include "../front/unbound_args.h"
#include "runtime.h"
#include "../front/translate.h"
#include "../front/translate_internal.h"

#define CAMEL_EXPORT extern "C" __attribute__((visibility("default")))

using sim::Dispatch;

// Until the compiler (translate.cpp) is linked in, libraries can only come
// from camel_sim_library_load. The real definition replaces this weak one.
extern "C" __attribute__((weak)) int camel_sim_compile(const char *, const char *, char **so_path,
                                                       char **log) {
    *so_path = nullptr;
    *log = strdup("[sim] this build has no MSL compiler (shim/front/translate.cpp)");
    return 1;
}

// ---- errors ---------------------------------------------------------------------

static thread_local std::string tl_error;

__attribute__((format(printf, 1, 2))) static void set_error(const char *fmt, ...) {
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    tl_error = buf;
}

CAMEL_EXPORT const char *camel_last_error(void) { return tl_error.c_str(); }
CAMEL_EXPORT int camel_abi_version(void) { return CAMEL_SHIM_ABI_VERSION; }

// ---- global state ---------------------------------------------------------------

static struct State {
    std::mutex mu;  // every ABI call that touches the state below holds it
    bool ready = false;
    int workers = 0;
    std::unordered_set<camel_buffer *> buffers;  // live handles (released ones stay until freed)
    uint64_t allocated_bytes = 0;
    std::vector<Dispatch *> open;  // the open command buffer
    uint64_t open_id = 0;          // its id, 0 if none is open
    uint64_t next_id = 1;
    uint64_t completed_id = 0;
    std::string failure;  // first failure since the last camel_synchronize
    uint64_t seed_counter = 0;
} &S = *new State;  // never destroyed: the completion thread (CAMEL_SIM_ASYNC) may outlive exit

static void async_after_fork_in_child();  // below, with the asynchronous mode

// Timing of the most recent command buffers, indexed by id % kTimes.
constexpr uint64_t kTimes = 65536;
struct CbTime {
    uint64_t id;
    double start, end;
};
static CbTime cb_times[kTimes];

CAMEL_EXPORT int camel_init(void) {
    std::lock_guard<std::mutex> lock(S.mu);
    if (S.ready) return 0;
    tl_error.clear();
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    int workers = n < 1 ? 1 : n > 8 ? 8 : (int)n;
    if (const char *env = getenv("CAMEL_SIM_WORKERS")) {
        int w = atoi(env);
        if (w < 1 || w > 256) {
            set_error("[sim] CAMEL_SIM_WORKERS must be a number from 1 to 256, got '%s'", env);
            return 1;
        }
        workers = w;
    }
    S.workers = workers;
    pthread_atfork(nullptr, nullptr, async_after_fork_in_child);
    sim::pool_start(workers);
    sim::install_crash_handlers();
    S.ready = true;
    return 0;
}

static bool ensure_init() { return S.ready || camel_init() == 0; }

CAMEL_EXPORT int camel_device_info_get(camel_device_info *out) {
    // A query: keeps the last error readable (Python reads limits for its message).
    if (!ensure_init()) return 1;
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "camel simulator (%d worker%s)", S.workers,
             S.workers == 1 ? "" : "s");
    out->is_simulator = 1;
    out->max_threads_per_threadgroup = kMaxThreadsPerThreadgroup;
    out->max_threadgroup_memory = kMaxThreadgroupMemory;
    out->simd_width = kSimdWidth;
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    out->recommended_working_set = pages > 0 && page > 0 ? (uint64_t)pages * page / 2 : 0;
    return 0;
}

// ---- buffers --------------------------------------------------------------------

// Overrun detection. camel.metal hands out buffers of a size class (up to 25% larger
// than asked), so the bytes past what the owner uses would hide a kernel writing past
// its end. Under ASan (CAMEL_SIM_SANITIZE=address with the runtime preloaded) they are
// poisoned: the first byte read or written there is reported with its .metal line.
// Otherwise:
//  - a buffer of kPagedBytes or more is mapped on pages of its own, and the pages past
//    the one where the owner's length ends fault (PROT_NONE, plus one page past the
//    allocation): a kernel reading or writing there crashes, and the crash handler
//    (runtime_exec.cpp) names the kernel, the argument and the byte;
//  - the bytes from the length to that page boundary (a smaller buffer: to a kRedZone
//    past the allocation; less than a page either way) hold a pattern. The first
//    kSlackGuard of them are checked after every dispatch (naming the kernel), all of
//    them once per command buffer, for every buffer it binds (naming the kernels that
//    may write it). A change fails the command buffer.
// So every write into a buffer's own allocation past its length is reported, at a cost
// of at most a page of comparisons per buffer and command buffer.
extern "C" void __asan_poison_memory_region(void const volatile *, size_t) __attribute__((weak));
extern "C" void __asan_unpoison_memory_region(void const volatile *, size_t)
    __attribute__((weak));
constexpr uint64_t kSlackGuard = 256, kRedZone = 64;
constexpr uint64_t kPagedBytes = 16384;
constexpr uint64_t kMetalPage = 16384;  // buffers are aligned like a Metal page
constexpr uint8_t kGuardByte = 0xa5;

static bool asan_active() { return __asan_poison_memory_region != nullptr; }

static uint64_t page_bytes() {
    static const uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    return page;
}

static uint64_t round_up(uint64_t n, uint64_t m) { return (n + m - 1) / m * m; }

// [start, end) of the pattern-guarded bytes of b: from its length to the first page that
// faults (a mapped buffer) or to the end of the red zone past the allocation.
static uint64_t guard_end(const camel_buffer *b) {
    return b->mapped ? b->fault_from : b->nbytes + kRedZone;
}

// The pages of a mapped buffer past its length fault: move fault_from to the page
// boundary at or past b->used. Pages that cannot be protected (mprotect fails: too
// many mappings) stay readable and are pattern-guarded instead, checked each command buffer.
static void protect_slack(camel_buffer *b) {
    uint64_t page = page_bytes(), from = round_up(b->used, page), old = b->fault_from;
    if (from == old) return;
    uint8_t *p = (uint8_t *)b->contents;
    if (from > old) {
        if (mprotect(p + old, from - old, PROT_READ | PROT_WRITE) != 0) return;  // stays
    } else if (mprotect(p + from, old - from, PROT_NONE) != 0) {
        return;  // keep the readable pages: the pattern guards them
    }
    b->fault_from = from;
}

static void guard_arm(camel_buffer *b) {
    uint8_t *p = (uint8_t *)b->contents;
    if (asan_active()) {
        __asan_unpoison_memory_region(p, b->used);
        if (b->nbytes > b->used) __asan_poison_memory_region(p + b->used, b->nbytes - b->used);
        return;
    }
    if (b->mapped) protect_slack(b);
    memset(p + b->used, kGuardByte, guard_end(b) - b->used);
}

// Offset of the first byte in [from, to) of p that is not the guard pattern, or UINT64_MAX.
static uint64_t first_changed(const uint8_t *p, uint64_t from, uint64_t to) {
    static const struct Pattern {
        uint8_t bytes[4096];
        Pattern() { memset(bytes, kGuardByte, sizeof bytes); }
    } pattern;
    for (uint64_t at = from; at < to; at += sizeof pattern.bytes) {
        uint64_t n = to - at < sizeof pattern.bytes ? to - at : sizeof pattern.bytes;
        if (memcmp(p + at, pattern.bytes, n) == 0) continue;  // glibc's: vectorised
        for (uint64_t i = at; i < at + n; i++)
            if (p[i] != kGuardByte) return i;
    }
    return UINT64_MAX;
}

// Offset of the first guard byte a kernel changed, or UINT64_MAX; re-arms the guard.
// whole: every pattern byte (once per command buffer); else the first kSlackGuard.
static uint64_t guard_check(camel_buffer *b, bool whole) {
    if (asan_active()) return UINT64_MAX;
    uint64_t end = guard_end(b);
    if (!whole && end - b->used > kSlackGuard) end = b->used + kSlackGuard;
    uint64_t at = first_changed((const uint8_t *)b->contents, b->used, end);
    if (at != UINT64_MAX) guard_arm(b);
    return at;
}

namespace sim {
bool guarded_slack(const Dispatch &d, uintptr_t addr, uint32_t *arg, const camel_buffer **b,
                   uint64_t *offset) {
    for (size_t i = 0; i < d.retained.size(); i++) {
        const camel_buffer *r = d.retained[i];
        uintptr_t p = (uintptr_t)r->contents;
        if (r->mapped && addr >= p + r->fault_from && addr < p + r->mapped) {
            *arg = d.retained_arg[i];
            *b = r;
            *offset = addr - p;
            return true;
        }
    }
    return false;
}
// A fault outside a kernel (the host: a NumPy view kept past Buffer.release()) in a
// buffer's protected slack: writes the message to stderr; false if addr is in none.
// From the crash handler: it takes S.mu only if free, and calls only write() then.
bool host_fault_in_slack(uintptr_t addr) {
    if (!S.mu.try_lock()) return false;
    bool found = false;
    for (const camel_buffer *b : S.buffers) {
        uintptr_t p = (uintptr_t)b->contents;
        if (!b->mapped || addr < p + b->fault_from || addr >= p + b->mapped) continue;
        char msg[400];
        int n = snprintf(msg, sizeof msg,
                         "[sim] the host touched byte %llu of a buffer of %llu bytes, %llu bytes "
                         "past its length, in the slack pages the simulator protects: a NumPy "
                         "view or ctypes pointer kept after Buffer.release()?\n",
                         (unsigned long long)(addr - p), (unsigned long long)b->used,
                         (unsigned long long)(addr - p - b->used));
        if (n > 0 && write(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1) < 0) n = 0;
        found = true;
        break;
    }
    S.mu.unlock();
    return found;
}
}  // namespace sim

static void set_used(camel_buffer *b, uint64_t used) {  // S.mu held
    b->used = used;
    b->next_used = UINT64_MAX;
    guard_arm(b);
}

static void buffer_unref(camel_buffer *b) {  // S.mu held
    if (--b->refs > 0) {
        // The last queued dispatch of the previous owner has run: guard the new length.
        if (b->refs == 1 && b->next_used != UINT64_MAX) set_used(b, b->next_used);
        return;
    }
    S.allocated_bytes -= b->nbytes;
    S.buffers.erase(b);
    if (b->mapped) {
        munmap(b->contents, b->mapped);
    } else {
        if (asan_active()) __asan_unpoison_memory_region(b->contents, b->nbytes);
        free(b->contents);
    }
    delete b;
}

CAMEL_EXPORT camel_buffer *camel_buffer_new(uint64_t nbytes, void **contents) {
    tl_error.clear();
    if (!ensure_init()) return nullptr;
    if (nbytes == 0) {
        set_error("[sim] camel_buffer_new: a buffer needs at least 1 byte, got 0");
        return nullptr;
    }
    // Aligned like a Metal page. Under ASan exactly nbytes long, so that it sees a write
    // one past the end; otherwise a small one is followed by the red zone, and a large
    // one has pages of its own, one more that faults, and slack pages that fault.
    void *p = nullptr;
    uint64_t mapped = 0;
    if (!asan_active() && nbytes >= kPagedBytes) {
        uint64_t page = page_bytes(), align = kMetalPage > page ? kMetalPage : page;
        mapped = round_up(nbytes, page) + page;
        // Over-map by the alignment, then unmap what lies before and after the aligned part.
        uint64_t over = mapped + align - page;
        void *m = mmap(nullptr, over, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m != MAP_FAILED) {
            uintptr_t start = round_up((uintptr_t)m, align);
            if (start > (uintptr_t)m) munmap(m, start - (uintptr_t)m);
            if ((uintptr_t)m + over > start + mapped)
                munmap((void *)(start + mapped), (uintptr_t)m + over - (start + mapped));
            p = (void *)start;  // zero-filled by the kernel
            if (mprotect((uint8_t *)p + mapped - page, page, PROT_NONE) != 0) {
                munmap(p, mapped);
                p = nullptr;
            }
        }
        if (!p) mapped = 0;  // no mapping (too many, vm.max_map_count): a malloc'd one
    }
    if (!mapped) {
        uint64_t alloc = asan_active() ? nbytes : nbytes + kRedZone;
        if (posix_memalign(&p, kMetalPage, alloc) != 0) p = nullptr;
        if (p) memset(p, 0, nbytes);
    }
    if (!p) {
        set_error("[sim] camel_buffer_new: out of memory allocating %llu bytes",
                  (unsigned long long)nbytes);
        return nullptr;
    }
    uint64_t fault_from = mapped ? mapped - page_bytes() : 0;
    camel_buffer *b =
        new camel_buffer{p, nbytes, 1, false, nbytes, UINT64_MAX, mapped, fault_from, 0};
    guard_arm(b);
    std::lock_guard<std::mutex> lock(S.mu);
    S.buffers.insert(b);
    S.allocated_bytes += nbytes;
    if (contents) *contents = p;
    return b;
}

CAMEL_EXPORT int camel_buffer_release(camel_buffer *b) {
    tl_error.clear();
    std::lock_guard<std::mutex> lock(S.mu);
    if (!S.buffers.count(b) || b->released) {
        set_error("[sim] camel_buffer_release: %p is not a live buffer (released twice?)",
                  (void *)b);
        return 1;
    }
    b->released = true;
    buffer_unref(b);  // freed now, or when the last queued dispatch using it has run
    return 0;
}

// Shared storage: the host and the kernels see the same memory, nothing to copy.
// Only the handle is checked, so a misuse is reported here as on the CUDA shim.
static int check_live(camel_buffer *b, const char *what) {
    tl_error.clear();
    std::lock_guard<std::mutex> lock(S.mu);
    if (!S.buffers.count(b) || b->released) {
        set_error("[sim] %s: %p is not a live buffer (released already?)", what, (void *)b);
        return 1;
    }
    return 0;
}

CAMEL_EXPORT int camel_buffer_sync_to_host(camel_buffer *b) {
    return check_live(b, "camel_buffer_sync_to_host");
}

CAMEL_EXPORT int camel_buffer_did_modify(camel_buffer *b, uint64_t offset, uint64_t length) {
    if (check_live(b, "camel_buffer_did_modify")) return 1;
    if (offset > b->nbytes || length > b->nbytes - offset) {
        set_error("[sim] camel_buffer_did_modify: range %llu + %llu bytes is outside the "
                  "%llu-byte buffer",
                  (unsigned long long)offset, (unsigned long long)length,
                  (unsigned long long)b->nbytes);
        return 1;
    }
    return 0;
}

// (sim only) The owner uses the first `used` bytes of b: guard the rest (see above).
// camel.metal calls it whenever it hands out a cached buffer of a size class.
CAMEL_EXPORT int camel_sim_buffer_set_length(camel_buffer *b, uint64_t used) {
    tl_error.clear();
    std::lock_guard<std::mutex> lock(S.mu);
    if (!S.buffers.count(b) || b->released || used > b->nbytes) {
        set_error("[sim] camel_sim_buffer_set_length: not a live buffer, or %llu > its %llu bytes",
                  (unsigned long long)used, (unsigned long long)b->nbytes);
        return 1;
    }
    if (b->refs == 1) {
        set_used(b, used);
    } else {  // queued dispatches of the previous owner may still use the old length
        if (used > b->used) set_used(b, used);
        b->next_used = used;
    }
    return 0;
}

CAMEL_EXPORT int camel_memory_info_get(camel_memory_info *out) {
    // A query that cannot fail: keeps the last error readable.
    std::lock_guard<std::mutex> lock(S.mu);
    out->allocated_bytes = S.allocated_bytes;
    out->buffers = S.buffers.size();
    return 0;
}

// ---- libraries and pipelines -----------------------------------------------------

static void library_unref(camel_library *lib) {  // S.mu held
    if (--lib->refs > 0) return;
    dlclose(lib->dl);
    delete lib;
}

CAMEL_EXPORT camel_library *camel_sim_library_load(const char *so_path) {
    tl_error.clear();
    if (!ensure_init()) return nullptr;
    void *dl = dlopen(so_path, RTLD_NOW | RTLD_LOCAL);
    if (!dl) {
        set_error("[sim] cannot load kernel library %s: %s", so_path, dlerror());
        return nullptr;
    }
    auto get_desc = (const camel_sim_library_desc *(*)(void))dlsym(dl, "camel_sim_library");
    auto bind = (void (*)(const camel_sim_runtime *))dlsym(dl, "camel_sim_bind");
    if (!get_desc || !bind) {
        set_error("[sim] %s is not a kernel library (no camel_sim_library/camel_sim_bind)",
                  so_path);
        dlclose(dl);
        return nullptr;
    }
    const camel_sim_library_desc *desc = get_desc();
    if (!desc || desc->abi_version != CAMEL_SIM_ABI_VERSION) {
        set_error("[sim] %s was built for simulator ABI %d, this runtime speaks %d: "
                  "clear the kernel cache",
                  so_path, desc ? desc->abi_version : -1, CAMEL_SIM_ABI_VERSION);
        dlclose(dl);
        return nullptr;
    }
    bind(&sim::runtime_table);
    // Set while the library loaded if a kernel calls simdgroup_load/store (the compat header).
    const int *blocks = (const int *)dlsym(dl, "camel_sim_uses_blocks");
    const char *constants = (const char *)dlsym(dl, "camel_sim_function_constants");
    auto *lib = new camel_library{dl, desc, 1, so_path, blocks && *blocks, {}, {}, {}};
    if (constants) lib->constants = constants;
    return lib;
}

// What a compile (camel_sim_compile, camel_sim::compile_library) gave, loaded: the library,
// or NULL with the log (after `context`) as the error. Frees so_path and log.
static camel_library *load_compiled(int rc, char *so_path, char *log, const std::string &context) {
    if (rc != 0) {
        const char *none = context.empty() ? "[sim] compilation failed (no log)" : "compilation failed (no log)";
        tl_error = context + (log ? log : none);
        free(log);
        free(so_path);
        return nullptr;
    }
    free(log);
    camel_library *lib = camel_sim_library_load(so_path);
    free(so_path);
    return lib;
}

CAMEL_EXPORT camel_library *camel_library_new(const char *source, const char *path) {
    tl_error.clear();
    if (!ensure_init()) return nullptr;
    if (!source) {
        set_error("[sim] camel_library_new: source is NULL");
        return nullptr;
    }
    char *so_path = nullptr, *log = nullptr;
    int rc = camel_sim_compile(source, path, &so_path, &log);
    camel_library *lib = load_compiled(rc, so_path, log, "");
    if (lib && !lib->constants.empty()) {  // kept for the specialisations
        lib->source = source;
        lib->path = path ? path : "";
    }
    return lib;
}

CAMEL_EXPORT void camel_library_release(camel_library *lib) {
    tl_error.clear();
    if (!lib) return;
    std::lock_guard<std::mutex> lock(S.mu);
    library_unref(lib);
}

CAMEL_EXPORT uint64_t camel_library_function_names(camel_library *lib, char *out, uint64_t cap) {
    // A query that cannot fail: keeps the last error readable.
    std::string names;
    for (int i = 0; i < lib->desc->nkernels; i++) {
        if (i) names += '\n';
        names += lib->desc->kernels[i].name;
    }
    return copy_out(names, out, cap);
}

CAMEL_EXPORT uint64_t camel_library_function_constants(camel_library *lib, char *out, uint64_t cap) {
    // A query that cannot fail: keeps the last error readable.
    return copy_out(lib->constants, out, cap);
}

static camel_pipeline *pipeline_of(camel_library *lib, const char *name);

CAMEL_EXPORT camel_pipeline *camel_pipeline_new(camel_library *lib, const char *name) {
    return camel_pipeline_new_with_constants(lib, name, nullptr, 0);
}

// The declared constants of a library: index -> (type, name)
static std::vector<camel_sim::FunctionConstant> parse_constants(const std::string &lines) {
    std::vector<camel_sim::FunctionConstant> out;
    size_t i = 0;
    while (i < lines.size()) {
        size_t e = lines.find('\n', i);
        if (e == std::string::npos) e = lines.size();
        std::string l = lines.substr(i, e - i);
        size_t a = l.find(' '), b = a == std::string::npos ? a : l.find(' ', a + 1);
        if (b != std::string::npos) {
            camel_sim::FunctionConstant c;
            c.index = atoi(l.c_str());
            c.type = l.substr(a + 1, b - a - 1);
            c.name = l.substr(b + 1);
            out.push_back(c);
        }
        i = e + 1;
    }
    return out;
}

CAMEL_EXPORT camel_pipeline *camel_pipeline_new_with_constants(camel_library *lib, const char *name,
                                                              const camel_constant_value *values,
                                                              uint32_t nvalues) {
    tl_error.clear();
    if (!name) {
        set_error("[sim] camel_pipeline_new_with_constants: name is NULL");
        return nullptr;
    }
    if (nvalues && !values) {
        set_error("[sim] kernel '%s': %u function-constant values but values is NULL", name, nvalues);
        return nullptr;
    }
    if (lib->constants.empty()) return pipeline_of(lib, name);  // Metal ignores unused values
    bool known = false;
    for (int i = 0; i < lib->desc->nkernels; i++) known = known || strcmp(lib->desc->kernels[i].name, name) == 0;
    if (!known) return pipeline_of(lib, name);  // the message lists the kernels
    std::vector<camel_sim::FunctionConstant> declared = parse_constants(lib->constants);
    camel_sim::Specialisation spec;
    spec.kernel = name;
    for (uint32_t i = 0; i < nvalues; i++) {
        const camel_sim::FunctionConstant *c = nullptr;
        for (const auto &d : declared)
            if (d.index == (int)values[i].index) c = &d;
        if (!c) continue;  // Metal ignores a value no constant of the function has
        std::string err;
        std::string lit = camel_sim::constant_literal(c->type, values[i].type, values[i].components,
                                                      values[i].bytes, err);
        if (lit.empty()) {
            set_error("[sim] kernel '%s': function constant '%s' (index %d): %s", name,
                      c->name.c_str(), c->index, err.c_str());
            return nullptr;
        }
        bool dup = false;
        for (auto &v : spec.values) dup = dup || v.first == c->index;
        if (dup) {
            set_error("[sim] kernel '%s': two values for function constant '%s' (index %d)", name,
                      c->name.c_str(), c->index);
            return nullptr;
        }
        spec.values.push_back({c->index, lit});
    }
    std::sort(spec.values.begin(), spec.values.end());  // one cache entry per set of values
    char *so_path = nullptr, *log = nullptr;
    int rc = camel_sim::compile_library(lib->source.c_str(), lib->path.empty() ? nullptr : lib->path.c_str(),
                                        &spec, &so_path, &log);
    camel_library *variant =
        load_compiled(rc, so_path, log, std::string("[sim] kernel '") + name + "' with its function constants: ");
    if (!variant) {
        if (rc != 0) return nullptr;  // the compiler's log is the message
        int missing = camel_sim::missing_constant(tl_error);
        for (const auto &d : declared)
            if (d.index == missing) {
                set_error("[sim] kernel '%s' uses function constant '%s' (index %d, %s), which has no "
                          "value: give it one when making the pipeline, or guard its uses with "
                          "is_function_constant_defined(%s) (Metal: newFunctionWithName:constantValues:"
                          "error: fails the same way)",
                          name, d.name.c_str(), d.index, d.type.c_str(), d.name.c_str());
                break;
            }
        return nullptr;
    }
    camel_pipeline *p = pipeline_of(variant, name);
    std::lock_guard<std::mutex> lock(S.mu);
    library_unref(variant);  // the pipeline holds it
    return p;
}

static camel_pipeline *pipeline_of(camel_library *lib, const char *name) {
    const camel_sim_library_desc *desc = lib->desc;
    for (int i = 0; i < desc->nkernels; i++) {
        const camel_sim_kernel_desc *k = &desc->kernels[i];
        if (strcmp(k->name, name) != 0) continue;
        auto *p = new camel_pipeline();
        p->library = lib;
        p->kernel = k;
        p->refs = 1;
        p->max_tg_index = -1;
        p->uses_blocks.store(lib->uses_blocks);
        for (int j = 0; j < k->nparams; j++)
            if (k->params[j].kind == CAMEL_SIM_PARAM_THREADGROUP && k->params[j].index > p->max_tg_index)
                p->max_tg_index = k->params[j].index;
        std::lock_guard<std::mutex> lock(S.mu);
        lib->refs++;
        return p;
    }
    std::string names;
    for (int i = 0; i < desc->nkernels; i++) names += std::string(i ? ", " : "") + desc->kernels[i].name;
    set_error("[sim] no kernel named '%s' in the library; it has: %s", name,
              names.empty() ? "(no kernels)" : names.c_str());
    return nullptr;
}

static void pipeline_unref(camel_pipeline *p) {  // S.mu held
    if (--p->refs > 0) return;
    library_unref(p->library);
    delete p;
}

CAMEL_EXPORT void camel_pipeline_release(camel_pipeline *p) {
    tl_error.clear();
    if (!p) return;
    std::lock_guard<std::mutex> lock(S.mu);
    pipeline_unref(p);
}

CAMEL_EXPORT int camel_pipeline_info_get(camel_pipeline *p, camel_pipeline_info *out) {
    // A query that cannot fail: keeps the last error readable.
    out->max_total_threads_per_threadgroup = kMaxThreadsPerThreadgroup;
    out->thread_execution_width = kSimdWidth;
    out->static_threadgroup_memory = p->static_tg_bytes.load();
    return 0;
}

// ---- command buffers --------------------------------------------------------------

static void dispatch_free(Dispatch *d) {  // S.mu held
    for (camel_buffer *b : d->retained) buffer_unref(b);
    pipeline_unref(d->pipeline);
    delete d;
}

// The name of argument `arg` of kernel k ("?" if none) and whether the kernel may write it.
static const char *buffer_param(const camel_sim_kernel_desc *k, uint32_t arg, bool *writable) {
    for (int j = 0; j < k->nparams; j++)
        if (k->params[j].kind == CAMEL_SIM_PARAM_BUFFER && k->params[j].index == (int32_t)arg) {
            if (writable) *writable = k->params[j].writable;
            return k->params[j].name;
        }
    if (writable) *writable = true;
    return "?";
}

// What follows "wrote past the end of ...": byte `at` of buffer b changed.
static std::string changed_byte(const camel_buffer *b, uint64_t at) {
    char buf[320];
    snprintf(buf, sizeof buf,
             "byte %llu of a buffer of %llu bytes changed (%llu bytes past the end). Rerun with "
             "CAMEL_SIM_SANITIZE=address to find the line%s",
             (unsigned long long)at, (unsigned long long)b->used,
             (unsigned long long)(at - b->used),
             b->mapped ? "" : "; memory past the buffer may be damaged");
    return buf;
}

// After a dispatch: did the kernel write just past the end of a buffer it was given
// (the first kSlackGuard bytes of the pattern)?
static bool check_guards(const Dispatch &d, std::string &error) {
    for (size_t i = 0; i < d.retained.size(); i++) {
        camel_buffer *b = d.retained[i];
        uint64_t at = guard_check(b, false);
        if (at == UINT64_MAX) continue;
        uint32_t arg = d.retained_arg[i];
        error = "kernel '" + std::string(d.kernel->name) + "' wrote past the end of argument " +
                std::to_string(arg) + " ('" + buffer_param(d.kernel, arg, nullptr) +
                "', [[buffer(" + std::to_string(arg) + ")]]): " + changed_byte(b, at);
        return false;
    }
    return true;
}

// After a command buffer: the whole pattern of every buffer its dispatches bound. A change
// names the kernels that bound the buffer through a writable parameter (all that bound
// it if none did); one kernel and argument is named as the writer.
static bool check_guards_whole(uint64_t id, const std::vector<Dispatch *> &list,
                               std::string &error) {
    for (Dispatch *d : list)
        for (camel_buffer *b : d->retained) {
            if (b->checked_in == id) continue;  // once per buffer
            b->checked_in = id;
            uint64_t at = guard_check(b, true);
            if (at == UINT64_MAX) continue;
            // (kernel, argument) pairs that bound b, writable ones first
            std::vector<std::pair<const camel_sim_kernel_desc *, uint32_t>> writers, all;
            for (const Dispatch *e : list)
                for (size_t i = 0; i < e->retained.size(); i++) {
                    if (e->retained[i] != b) continue;
                    bool writable = false;
                    buffer_param(e->kernel, e->retained_arg[i], &writable);
                    auto one = std::make_pair(e->kernel, e->retained_arg[i]);
                    auto &to = writable ? writers : all;
                    if (std::find(to.begin(), to.end(), one) == to.end()) to.push_back(one);
                }
            if (writers.empty()) writers = all;
            auto arg_text = [](const camel_sim_kernel_desc *k, uint32_t arg) {
                return "argument " + std::to_string(arg) + " ('" + buffer_param(k, arg, nullptr) +
                       "', [[buffer(" + std::to_string(arg) + ")]])";
            };
            if (writers.size() == 1) {
                error = "kernel '" + std::string(writers[0].first->name) +
                        "' wrote past the end of " + arg_text(writers[0].first, writers[0].second) +
                        ": " + changed_byte(b, at) + " (seen when its command buffer completed)";
            } else {
                error = "a kernel wrote past the end of a buffer: " + changed_byte(b, at) +
                        " (seen when the command buffer completed). The kernels of the command "
                        "buffer that may write it:";
                for (size_t i = 0; i < writers.size(); i++)
                    error += std::string(i ? "," : "") + " '" + writers[i].first->name + "' " +
                             arg_text(writers[i].first, writers[i].second);
            }
            return false;
        }
    return true;
}

// Run command buffer `id` (S.mu held by `lock`; released while kernels run when
// `unlock_to_run`, so the host keeps going: the asynchronous mode).
static void run_command_buffer(uint64_t id, std::vector<Dispatch *> &list,
                               std::unique_lock<std::mutex> &lock, bool unlock_to_run) {
    sim::install_crash_handlers();  // in case Python's faulthandler took them over
    double start = sim::now_seconds();
    bool failed = false;
    auto fail = [&](const Dispatch *d, std::string &error) {
        if (d && d->order == sim::kRandom)
            error += " [CAMEL_SIM_ORDER=random; CAMEL_SIM_SEED=" + std::to_string(d->seed) +
                     " replays this schedule]";
        if (S.failure.empty())
            S.failure = "[sim] command buffer " + std::to_string(id) + " failed: " + error;
        error.clear();
    };
    for (Dispatch *d : list) {
        std::string error;
        // After a failure the rest of the command buffer is skipped, as on a GPU.
        if (!failed) {
            if (unlock_to_run) lock.unlock();
            bool ok = sim::execute(*d, error);
            if (unlock_to_run) lock.lock();
            failed = !ok || !check_guards(*d, error);
        }
        if (failed && !error.empty()) fail(d, error);
    }
    // The dispatches keep their buffers until the whole guard is checked.
    std::string error;
    if (!failed && !check_guards_whole(id, list, error)) fail(list.size() == 1 ? list[0] : nullptr, error);
    for (Dispatch *d : list) dispatch_free(d);
    double end = sim::now_seconds();
    cb_times[id % kTimes] = {id, start, end};
    S.completed_id = id;
}

// CAMEL_SIM_ASYNC=1: camel_commit hands the command buffer to a completion thread and
// returns at once, as on a GPU, so camel_completed_id lags behind and a host write
// racing a queued kernel can show. Read at every commit (tests switch it).
static struct Async {
    std::condition_variable work, idle;
    std::deque<std::pair<uint64_t, std::vector<Dispatch *>>> queue;
    bool running = false;  // the thread is running a command buffer
    bool started = false;
} &A = *new Async;  // never destroyed: the thread may still wait on it at exit

static bool async_mode() {
    const char *env = getenv("CAMEL_SIM_ASYNC");
    return env && *env && strcmp(env, "0") != 0;
}

static void async_main() {
    std::unique_lock<std::mutex> lock(S.mu);
    for (;;) {
        A.work.wait(lock, [] { return !A.queue.empty(); });
        auto item = std::move(A.queue.front());
        A.queue.pop_front();
        A.running = true;
        run_command_buffer(item.first, item.second, lock, true);
        A.running = false;
        if (A.queue.empty()) A.idle.notify_all();
    }
}

static void async_after_fork_in_child() {  // the thread is not there any more
    new (&A.work) std::condition_variable();
    new (&A.idle) std::condition_variable();
    A.queue.clear();
    A.running = A.started = false;
}

static void wait_async(std::unique_lock<std::mutex> &lock) {
    A.idle.wait(lock, [] { return A.queue.empty() && !A.running; });
}

// Commit the open command buffer (S.mu held): run it now, or queue it (CAMEL_SIM_ASYNC).
static uint64_t commit_locked(std::unique_lock<std::mutex> &lock) {
    if (!S.open_id) return 0;
    uint64_t id = S.open_id;
    std::vector<Dispatch *> list;
    list.swap(S.open);
    S.open_id = 0;
    if (async_mode()) {
        if (!A.started) {
            A.started = true;
            std::thread(async_main).detach();
        }
        A.queue.emplace_back(id, std::move(list));
        A.work.notify_one();
        return id;
    }
    wait_async(lock);  // command buffers complete in order
    run_command_buffer(id, list, lock, false);
    return id;
}

CAMEL_EXPORT uint64_t camel_commit(void) {
    tl_error.clear();
    std::unique_lock<std::mutex> lock(S.mu);
    return commit_locked(lock);
}

CAMEL_EXPORT int camel_synchronize(void) {
    tl_error.clear();
    std::unique_lock<std::mutex> lock(S.mu);
    commit_locked(lock);
    wait_async(lock);  // everything committed has completed
    if (!S.failure.empty()) {
        tl_error = S.failure;
        S.failure.clear();
        return 1;
    }
    return 0;
}

CAMEL_EXPORT uint64_t camel_completed_id(void) {
    std::lock_guard<std::mutex> lock(S.mu);
    return S.completed_id;
}

CAMEL_EXPORT int camel_command_buffer_time(uint64_t id, double *start, double *end) {
    tl_error.clear();
    std::lock_guard<std::mutex> lock(S.mu);
    const CbTime &t = cb_times[id % kTimes];
    if (id == 0 || t.id != id) {
        set_error("[sim] no timing for command buffer %llu (not completed, or older than the "
                  "last %llu)",
                  (unsigned long long)id, (unsigned long long)kTimes);
        return 1;
    }
    *start = t.start;
    *end = t.end;
    return 0;
}

// ---- dispatch ---------------------------------------------------------------------

static bool read_order(sim::Order *order) {
    const char *env = getenv("CAMEL_SIM_ORDER");
    if (!env || !*env || !strcmp(env, "forward")) {
        *order = sim::kForward;
    } else if (!strcmp(env, "reverse")) {
        *order = sim::kReverse;
    } else if (!strcmp(env, "random")) {
        *order = sim::kRandom;
    } else {
        set_error("[sim] CAMEL_SIM_ORDER must be forward, reverse or random, got '%s'", env);
        return false;
    }
    return true;
}

static uint64_t next_seed() {  // S.mu held
    if (const char *env = getenv("CAMEL_SIM_SEED")) return strtoull(env, nullptr, 10);
    uint64_t z = (++S.seed_counter + (uint64_t)getpid()) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 31)) * 0xbf58476d1ce4e5b9ull;
    return (z ^ (z >> 29)) % 1000000007ull;  // short enough to type back in
}

// Check a dispatch the way Metal's validation layer would, with messages
// that name the kernel, the parameter and the numbers. S.mu held.
static bool validate(const camel_dispatch_desc *desc, const camel_sim_kernel_desc *k,
                     const camel_pipeline *p) {
    const char *name = k->name;
    const uint32_t *tpg = desc->threads_per_threadgroup;
    uint64_t nthreads = (uint64_t)tpg[0] * tpg[1] * tpg[2];
    if (nthreads == 0) {
        set_error("[dispatch] kernel '%s': threads_per_threadgroup (%u, %u, %u) has a zero "
                  "dimension",
                  name, tpg[0], tpg[1], tpg[2]);
        return false;
    }
    if (nthreads > kMaxThreadsPerThreadgroup) {
        set_error("[dispatch] kernel '%s': threads_per_threadgroup (%u, %u, %u) = %llu threads "
                  "exceeds the pipeline's max_total_threads_per_threadgroup %u",
                  name, tpg[0], tpg[1], tpg[2], (unsigned long long)nthreads,
                  kMaxThreadsPerThreadgroup);
        return false;
    }
    // thread_position_in_grid is a 32-bit uint on every axis.
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
    int needed = k->max_buffer_index + 1;
    if ((int)desc->nargs != needed) {
        // the first parameter left unbound and the optional arguments this specialisation
        // does not declare (MSL 5.8.1.2), in words both runtimes share
        camel_front::UnboundArgs u = camel_front::unbound_args(
            k->params, k->params + k->nparams, desc->nargs,
            [](const camel_sim_param &p) { return p.kind == CAMEL_SIM_PARAM_BUFFER; },
            [](const camel_sim_param &p) { return p.kind == CAMEL_SIM_PARAM_ABSENT; });
        if (needed == 0)
            set_error("[dispatch] kernel '%s' takes no buffer arguments, got %u%s", name,
                      desc->nargs, u.absent.c_str());
        else
            set_error("[dispatch] kernel '%s' takes %d buffer argument%s ([[buffer(0)]] .. "
                      "[[buffer(%d)]]), got %u%s%s",
                      name, needed, needed == 1 ? "" : "s", k->max_buffer_index, desc->nargs,
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
                          "a %llu-byte buffer",
                          name, i, (unsigned long long)a.offset,
                          (unsigned long long)a.buffer->nbytes);
                return false;
            }
        } else if (a.bytes && a.length > kMaxSetBytes) {
            set_error("[dispatch] kernel '%s' argument %u: %llu bytes is more than setBytes "
                      "allows (%u); use a buffer",
                      name, i, (unsigned long long)a.length, kMaxSetBytes);
            return false;
        }
    }
    // Per parameter: every [[buffer(i)]] bound, values with the right size.
    for (int j = 0; j < k->nparams; j++) {
        const camel_sim_param &prm = k->params[j];
        if (prm.kind == CAMEL_SIM_PARAM_BUFFER) {
            const camel_arg &a = desc->args[prm.index];
            if (!a.buffer && (!a.bytes || a.length == 0)) {
                set_error("[dispatch] kernel '%s' parameter %d '%s' ([[buffer(%d)]]) is not "
                          "bound: pass a buffer or bytes",
                          name, j, prm.name, prm.index);
                return false;
            }
            if (prm.writable && !a.buffer) {
                set_error("[dispatch] kernel '%s' parameter %d '%s' ([[buffer(%d)]]) is written "
                          "by the kernel (not const), but was bound by setBytes (a copy of a "
                          "NumPy array or a Python value), so its writes would be lost: pass a "
                          "DeviceArray or Buffer, or declare the parameter const/constant",
                          name, j, prm.name, prm.index);
                return false;
            }
            if (a.buffer && prm.align > 1 && a.offset % prm.align != 0) {
                set_error("[dispatch] kernel '%s' parameter %d '%s' ([[buffer(%d)]]): offset "
                          "%llu is not a multiple of %u, the alignment of the type it points "
                          "to (Metal requires it)",
                          name, j, prm.name, prm.index, (unsigned long long)a.offset, prm.align);
                return false;
            }
            if (prm.is_pointer || prm.value_size == 0) continue;
            uint64_t have = a.buffer ? a.buffer->nbytes - a.offset : a.length;
            bool wrong = a.buffer ? have < prm.value_size : have != prm.value_size;
            if (wrong) {
                set_error("[dispatch] kernel '%s' parameter %d '%s' ([[buffer(%d)]]) is a "
                          "%u-byte value, got %llu bytes",
                          name, j, prm.name, prm.index, prm.value_size, (unsigned long long)have);
                return false;
            }
        } else if (prm.kind == CAMEL_SIM_PARAM_THREADGROUP) {
            if ((uint32_t)prm.index >= desc->nthreadgroup_memory ||
                desc->threadgroup_memory[prm.index] == 0) {
                set_error("[dispatch] kernel '%s' parameter %d '%s' ([[threadgroup(%d)]]) needs "
                          "a threadgroup memory length (threadgroup_memory=[...])",
                          name, j, prm.name, prm.index);
                return false;
            }
        }
    }
    uint64_t dynamic = 0;
    for (uint32_t i = 0; i < desc->nthreadgroup_memory; i++)
        dynamic += (desc->threadgroup_memory[i] + 15ull) & ~15ull;
    uint32_t stat = p->static_tg_bytes.load();
    if (dynamic + stat > kMaxThreadgroupMemory) {
        set_error("[dispatch] kernel '%s' needs %llu bytes of threadgroup memory (%llu in "
                  "[[threadgroup(i)]] buffers + %u of threadgroup variables), more than the "
                  "device's %u",
                  name, (unsigned long long)(dynamic + stat), (unsigned long long)dynamic, stat,
                  kMaxThreadgroupMemory);
        return false;
    }
    return true;
}

CAMEL_EXPORT uint64_t camel_dispatch(const camel_dispatch_desc *desc) {
    tl_error.clear();
    if (!ensure_init()) return 0;
    if (!desc || !desc->pipeline) {
        set_error("[dispatch] no pipeline");
        return 0;
    }
    camel_pipeline *p = desc->pipeline;
    const camel_sim_kernel_desc *k = p->kernel;
    sim::Order order;
    if (!read_order(&order)) return 0;
    std::unique_lock<std::mutex> lock(S.mu);
    if (!validate(desc, k, p)) return 0;

    auto *d = new Dispatch();
    d->pipeline = p;
    d->kernel = k;
    d->order = order;
    d->seed = order == sim::kRandom ? next_seed() : 0;
    d->grid_is_threads = desc->grid_is_threads != 0;
    for (int a = 0; a < 3; a++) {
        uint32_t g = desc->grid[a], t = desc->threads_per_threadgroup[a];
        d->tpg[a] = t;
        // dispatchThreads(n): ceil(n / t) groups, the last one partial.
        d->groups[a] = d->grid_is_threads ? (g + t - 1) / t : g;
        d->threads[a] = d->grid_is_threads ? g : g * t;
    }
    // Copy setBytes data now: the caller may reuse its memory right away.
    size_t words = 0;
    for (uint32_t i = 0; i < desc->nargs; i++)
        if (!desc->args[i].buffer) words += (desc->args[i].length + 15) / 8;
    d->bytes.resize(words + 2);
    uint64_t *dst = d->bytes.data();
    if ((uintptr_t)dst % 16) dst++;  // 16-byte alignment for float4 and friends
    d->bindings.resize(desc->nargs);
    for (uint32_t i = 0; i < desc->nargs; i++) {
        const camel_arg &a = desc->args[i];
        if (a.buffer) {
            a.buffer->refs++;  // kept alive until this dispatch has run
            d->retained.push_back(a.buffer);
            d->retained_arg.push_back(i);
            d->bindings[i] = (uint8_t *)a.buffer->contents + a.offset;
        } else {
            if (a.bytes) memcpy(dst, a.bytes, a.length);
            d->bindings[i] = dst;
            dst += ((a.length + 15) & ~15ull) / 8;
        }
    }
    uint32_t offset = 0;
    for (uint32_t i = 0; i < desc->nthreadgroup_memory; i++) {
        d->tg_offsets.push_back(offset);
        offset += (desc->threadgroup_memory[i] + 15) & ~15u;  // Metal: multiples of 16
    }
    d->tg_dynamic_bytes = offset;
    p->refs++;

    if (!S.open_id) S.open_id = S.next_id++;
    S.open.push_back(d);
    uint64_t id = S.open_id;
    if (S.open.size() >= CAMEL_MAX_DISPATCHES_PER_COMMAND_BUFFER) commit_locked(lock);
    return id;
}

// ---- extras -------------------------------------------------------------------------

CAMEL_EXPORT uint64_t camel_mps_matmul(camel_buffer *, camel_buffer *, camel_buffer *, uint32_t,
                                       uint32_t, uint32_t) {
    set_error("[sim] MPS is not available on the simulator");
    return 0;
}

CAMEL_EXPORT uint64_t camel_mpsgraph_attention(camel_buffer *, camel_buffer *, camel_buffer *,
                                               camel_buffer *, uint32_t, uint32_t, uint32_t,
                                               float, int32_t) {
    set_error("[sim] MPSGraph attention is not available on the simulator (it needs Metal on "
              "macOS 15+)");
    return 0;
}

CAMEL_EXPORT int camel_capture_begin(const char *) {
    set_error("[sim] GPU capture needs Metal (macOS)");
    return 1;
}

CAMEL_EXPORT int camel_capture_end(void) {
    set_error("[sim] GPU capture needs Metal (macOS)");
    return 1;
}
