// runtime.h — what the two halves of the simulator runtime share.
//
//   runtime.cpp       the camel_* C ABI: device, buffers, libraries, pipelines,
//                     dispatch validation, command buffers, timing
//   runtime_exec.cpp  running one dispatch: the worker pool, threadgroups,
//                     fibers, barriers, SIMD-group collectives, crash handling
#ifndef CAMEL_SIM_RUNTIME_H
#define CAMEL_SIM_RUNTIME_H

#include <stdint.h>

#include <atomic>
#include <string>
#include <vector>

#include "../camel_shim.h"
#include "../front/sim_abi.h"

// Apple GPU limits the simulator enforces.
constexpr uint32_t kMaxThreadsPerThreadgroup = 1024;
constexpr uint32_t kMaxThreadgroupMemory = 32768;
constexpr uint32_t kSimdWidth = 32;
constexpr uint32_t kMaxSetBytes = 4095;  // Apple: setBytes takes "smaller than 4 KB"

struct camel_buffer {
    void *contents;
    uint64_t nbytes;
    int refs;       // 1 for the caller's handle + 1 per queued dispatch that binds it
    bool released;  // the caller has called camel_buffer_release
    // Bytes the owner uses (camel_sim_buffer_set_length; nbytes until then). What lies
    // past it is guarded (see guard_* in runtime.cpp): poisoned for ASan; else a pattern
    // up to the next page (a small buffer: up to a red zone past nbytes), checked after
    // each dispatch and command buffer, and pages that fault from there on.
    uint64_t used;
    uint64_t next_used;  // a new length asked for while queued dispatches still use it
    // A buffer of kPagedBytes or more has pages of its own: `mapped` bytes from contents
    // (nbytes rounded up to a page, then one more page), PROT_NONE from fault_from on,
    // the first page boundary at or past used. 0, 0 for a malloc'd one.
    uint64_t mapped;
    uint64_t fault_from;
    uint64_t checked_in;  // the last command buffer whose end checked the whole pattern
};

struct camel_library {
    void *dl;  // dlopen handle of the kernel shared object
    const camel_sim_library_desc *desc;
    int refs;  // 1 for the caller + 1 per live pipeline
    std::string so_path;
    bool uses_blocks;  // some kernel calls simdgroup_load/store (camel_pipeline::uses_blocks)
    // Function constants ("index type name" lines; "" for none). A library that has
    // them keeps its source: each pipeline is a specialisation compiled from it.
    std::string constants;
    std::string source, path;
};

struct camel_pipeline {
    camel_library *library;
    const camel_sim_kernel_desc *kernel;
    int refs;                // 1 for the caller + 1 per queued dispatch
    int32_t max_tg_index;    // highest [[threadgroup(i)]], -1 if none
    // Bytes of kernel-scope `threadgroup` variables. The simulator learns
    // this when a threadgroup first runs (the translated kernel asks for them
    // as it goes), so it reads 0 before the first dispatch has run.
    std::atomic<uint32_t> static_tg_bytes{0};
    // The kernel (its library) calls simdgroup_load/simdgroup_store: its threadgroups keep
    // a copy of threadgroup memory from the start, to see what was written since a barrier.
    std::atomic<bool> uses_blocks{false};
};

namespace sim {

enum Order { kForward, kReverse, kRandom };
const char *order_name(Order order);

// One encoded dispatch: everything copied at encode time, so the caller may
// change its argument arrays and setBytes data right after camel_dispatch.
struct Dispatch {
    camel_pipeline *pipeline;
    const camel_sim_kernel_desc *kernel;
    std::vector<void *> bindings;          // address bound to [[buffer(i)]]
    std::vector<camel_buffer *> retained;  // buffers to release after the run
    std::vector<uint32_t> retained_arg;    // ... and the argument each was bound to
    std::vector<uint32_t> tg_offsets;      // [[threadgroup(i)]] offset in the arena
    uint32_t tg_dynamic_bytes;             // sum of the lengths (rounded to 16)
    uint32_t groups[3];                    // threadgroups per grid
    uint32_t tpg[3];                       // requested threads per threadgroup
    uint32_t threads[3];                   // threads per grid
    bool grid_is_threads;                  // dispatchThreads: edge groups shrink
    Order order;
    uint64_t seed;                         // for kRandom
    std::vector<uint64_t> bytes;           // setBytes copies (8-byte aligned storage)
};

// Run every threadgroup of d on the worker pool and wait. false + message on
// a kernel failure (partial barrier, crash, limit exceeded, ...).
bool execute(const Dispatch &d, std::string &error);

void pool_start(int workers);   // idempotent
int pool_workers();
void install_crash_handlers();  // SIGSEGV/SIGBUS/SIGFPE/SIGILL inside kernels
// The protected slack of a buffer a dispatch binds (camel_buffer::fault_from): which
// argument holds address `addr`, and the byte offset in its buffer; false if none.
bool guarded_slack(const Dispatch &d, uintptr_t addr, uint32_t *arg, const camel_buffer **b,
                   uint64_t *offset);
// The crash handler, for a fault outside kernels in some buffer's protected slack: says so
// on stderr (the host touched it: a view kept past a release). false if none holds addr.
bool host_fault_in_slack(uintptr_t addr);
double now_seconds();           // CLOCK_MONOTONIC

extern const camel_sim_runtime runtime_table;

}  // namespace sim

// Extra exports of the simulator (not part of camel_shim.h): used by the
// runtime's own tests and by `python -m camel.bench sim`.
extern "C" {
// Load an already-built kernel library (what camel_library_new does after
// camel_sim_compile). Lets tests drive the runtime with a hand-written one.
camel_library *camel_sim_library_load(const char *so_path);
// Nanoseconds per fiber switch, measured over n round trips.
double camel_sim_bench_fiber_switch(uint64_t n);
}

#endif
