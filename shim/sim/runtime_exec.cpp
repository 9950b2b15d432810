// runtime_exec.cpp — how the simulator runs one dispatch on the CPU.
//
// The picture to keep in mind (docs/simulator.md walks through it):
//
//   grid ── threadgroups ── SIMD groups of 32 lanes ── threads
//    │          │                  │
//    │          │                  └ collectives (simd_sum, simd_shuffle, ...)
//    │          │                    are resolved once per SIMD group
//    │          └ one worker runs a whole threadgroup: its threads share the
//    │            threadgroup memory arena and meet at threadgroup_barrier
//    └ the worker pool pulls threadgroups from a counter, in any order
//
// A kernel without barriers and SIMD ops (needs_fibers == 0) runs its
// threads as a plain loop: thread 0 to completion, then thread 1, ...
// Otherwise each thread is a fiber with its own 64 KiB stack, and the
// threadgroup advances from barrier to barrier: run every thread in turn
// until it blocks (at a threadgroup barrier or a SIMD-group collective) or
// returns. As soon as every lane of a SIMD group waits in a collective, that
// SIMD group alone is resolved and runs on, up to the next threadgroup
// barrier, before any other thread runs: a collective synchronises its own
// SIMD group, never the threadgroup.
#include <dlfcn.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include <condition_variable>
#include <new>
#include <mutex>
#include <thread>

#include "fiber.h"
#include "runtime.h"

namespace sim {

constexpr size_t kStackSize = 64 * 1024;  // per simulated thread (fiber)
constexpr size_t kGuardSize = 4096;       // PROT_NONE page below each stack
constexpr uint32_t kPoison = 0x7fc00000;  // a quiet NaN as float

double now_seconds() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

const char *order_name(Order order) {
    return order == kForward ? "forward" : order == kReverse ? "reverse" : "random";
}

// ---- one simulated thread --------------------------------------------------

enum LaneState : uint8_t {
    kReady,        // may run
    kAtBarrier,    // waits in threadgroup_barrier (until Group::ready_states lets it run)
    kAtSimdBarrier,// waits in simdgroup_barrier
    kAtCollective, // waits in a SIMD-group collective
    kDone,         // returned from the kernel
};

// The scheduler's view of one simulated thread: one cache line, because the
// scheduler touches it at every barrier of every thread. What the thread knows
// about itself (camel_sim_thread, ~120 bytes) lives in Group::threads.
struct alignas(64) Lane {
    void *sp;  // saved stack pointer while this fiber is switched out
    uint32_t site;  // call site of the barrier / collective it waits at
    LaneState state;
    uint32_t static_cursor;  // how many `threadgroup` variables it has declared
    camel_sim_resolver resolver;
    const void *in;
    void *out;
    const void *arg;
    // simdgroup_load/store calls since its SIMD group's last barrier (valid while
    // blk_epoch equals the SIMD group's epoch): the k-th call of every lane is one access.
    uint32_t blk_epoch;
    uint32_t blk_op;
};

// One simdgroup_load or simdgroup_store of an 8x8 block, by a SIMD group as a whole: 8 rows
// of 8 elements of `elem` bytes at base, row_bytes apart (the same footprint transposed or
// not). A store's values wait here until the SIMD group's next barrier.
struct BlockAccess {
    uint8_t *base;
    uint64_t row_bytes;
    uint32_t elem;
    bool store;
    uint32_t site;
    uint64_t have;         // store: the elements (row * 8 + column) a lane has handed over
    uint32_t values[64];   // store: their bits
};

// A kernel-scope `threadgroup T x[N];` — placed once per threadgroup.
struct StaticVar {
    uint64_t size;
    uint32_t offset;
};

struct Worker;

// The state of the threadgroup a worker is running.
struct Group {
    const Dispatch *d;
    const camel_sim_kernel_desc *k;
    Worker *w;
    uint32_t gid[3];        // threadgroup_position_in_grid
    uint32_t origin[3];     // thread_position_in_grid of its thread (0, 0, 0)
    uint32_t size[3];       // this group's size (smaller at a partial edge)
    uint32_t nthreads;
    bool fibers;            // false: plain loop
    Lane *lanes;            // fibers: one per thread; plain loop: lanes[0] reused
    camel_sim_thread *threads;  // what each thread knows about itself (same indices)
    Lane *current;          // lane running now
    uint8_t *arena;         // threadgroup memory
    uint32_t arena_top;     // first free byte
    std::vector<StaticVar> statics;
    std::vector<void *> tg; // [[threadgroup(i)]] addresses
    std::vector<uint32_t> order;  // the order threads run in (thread indices)
    std::vector<Lane *> run;      // fibers: the same order as lanes
    std::vector<Lane *> by_simdgroup;  // run cut by SIMD group: SIMD group s's lanes (in run's
    std::vector<uint32_t> sg_begin;    // order) are by_simdgroup[sg_begin[s] .. sg_begin[s+1])
    std::vector<Lane *> sg_run;   // the lanes of one SIMD group, in the same order
    Lane *const *walk;            // the list being run now: run, or sg_run ...
    uint32_t walk_n;              // ... its length
    uint32_t walk_pos;            // ... and the next entry this pass looks at
    bool in_simdgroup;            // walk is sg_run (finish_simdgroup runs)
    int32_t full_simdgroup;       // a SIMD group whose every live lane waits in a collective
    // Per SIMD group: lanes neither returned nor at the next threadgroup barrier
    // ("live"), lanes waiting in a collective or simdgroup_barrier, lanes returned.
    uint16_t sg_live[kMaxThreadsPerThreadgroup / kSimdWidth];
    uint16_t sg_blocked[kMaxThreadsPerThreadgroup / kSimdWidth];
    uint16_t sg_done[kMaxThreadsPerThreadgroup / kSimdWidth];
    // simdgroup_load/store tracking (the section "blocks" below), per SIMD group: the
    // blocks accessed since its last barrier, which barrier that was (site; kind 0: the
    // start, 1: simdgroup_barrier, 2: threadgroup_barrier), the last collective since.
    std::vector<BlockAccess> sg_log[kMaxThreadsPerThreadgroup / kSimdWidth];
    uint32_t sg_epoch[kMaxThreadsPerThreadgroup / kSimdWidth];
    uint32_t sg_sync_site[kMaxThreadsPerThreadgroup / kSimdWidth];
    uint8_t sg_sync_kind[kMaxThreadsPerThreadgroup / kSimdWidth];
    uint32_t sg_collective[kMaxThreadsPerThreadgroup / kSimdWidth];
    bool blocks;                  // the kernel uses them: snap is kept up to date
    uint8_t *snap;                // threadgroup memory as of the latest barrier
    uint32_t snap_top;            // ... bytes of it
    uint32_t ready_states;        // bit s set: a lane in state s may run this phase
    uint64_t rng;
    void *sched_sp;         // the worker's own stack while fibers run
    uint32_t n_done;        // threads that have returned
    uint32_t n_barrier;     // threads waiting at a threadgroup_barrier ...
    uint32_t barrier_site;  // ... the first one's site
    bool barrier_mixed;     // ... and whether another one waits at a different site
    bool in_group_entry;    // the kernel's group entry runs (no thread index known)
    bool failed;
    std::string error;
};

// Per worker thread: fiber stacks, threadgroup memory, crash recovery.
struct Worker {
    Group group;
    std::vector<Lane> lanes;
    std::vector<camel_sim_thread> threads;
    uint8_t *stacks = nullptr;  // nstacks * (kGuardSize + kStackSize)
    uint32_t nstacks = 0;
    uint8_t *arena = nullptr;
    uint8_t *snap = nullptr;    // Group::snap
    bool stacks_dirty = false;  // a fiber was abandoned mid-run
    // The threadgroup state of the previous fiber group, kept for the next one: threads[]
    // and the run order are set up for threadgroups of size fibers_size of dispatch
    // fibers_job (0: for none), so a threadgroup of the same shape only moves the threads'
    // positions (forward and reverse order; random order shuffles at every pass anyway).
    uint64_t job_id = 0;  // the dispatch being run (execute counts them)
    uint64_t fibers_job = 0;
    uint32_t fibers_size[3] = {0, 0, 0};
    // A crash in a group entry: the threadgroup runs again, one thread at a time
    // (run_plain's own loop), so that the message can name the thread.
    bool replaying = false;
    uint32_t group_index = 0;  // the threadgroup being run
    sigjmp_buf crash_jmp;
    volatile sig_atomic_t in_kernel = 0;
    char crash_msg[1024];
    void *altstack = nullptr;
};

// initial-exec: one instruction to read, no __tls_get_addr call (it is read at every barrier).
static thread_local Worker *tl_worker __attribute__((tls_model("initial-exec")));

static Worker *this_worker() {
    if (!tl_worker) {
        Worker *w = new Worker();
        w->arena = (uint8_t *)aligned_alloc(64, kMaxThreadgroupMemory);
        w->snap = (uint8_t *)aligned_alloc(64, kMaxThreadgroupMemory);
        // The crash handler runs on its own stack so a fiber's stack overflow
        // (a hit on its guard page) can still be reported.
        stack_t old;
        if (sigaltstack(nullptr, &old) == 0 && (old.ss_flags & SS_DISABLE)) {
            stack_t ss;
            ss.ss_size = 64 * 1024;
            ss.ss_sp = w->altstack = malloc(ss.ss_size);
            ss.ss_flags = 0;
            sigaltstack(&ss, nullptr);
        }
        tl_worker = w;
    }
    return tl_worker;
}

static uint8_t *stack_of(Worker *w, uint32_t i) {
    return w->stacks + (size_t)i * (kGuardSize + kStackSize) + kGuardSize;
}

static bool ensure_stacks(Worker *w, uint32_t n) {
    if (w->nstacks >= n) return true;
    if (w->stacks) munmap(w->stacks, (size_t)w->nstacks * (kGuardSize + kStackSize));
    size_t bytes = (size_t)n * (kGuardSize + kStackSize);
    void *p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        w->stacks = nullptr;
        w->nstacks = 0;
        return false;
    }
    w->stacks = (uint8_t *)p;
    w->nstacks = n;
    for (uint32_t i = 0; i < n; i++) mprotect(stack_of(w, i) - kGuardSize, kGuardSize, PROT_NONE);
    return true;
}

// ASan (CAMEL_SIM_SANITIZE=address) keeps "shadow" bytes for stacks; a fiber
// abandoned mid-kernel leaves its frames poisoned. Weak: only there under ASan.
extern "C" void __asan_unpoison_memory_region(void const volatile *addr, size_t size)
    __attribute__((weak));

// ---- messages ------------------------------------------------------------------

// Sites are chosen by the translator: line * 4096 + column (0: unknown).
static std::string site_str(uint32_t site) {
    char buf[64];
    if (site >= 4096)
        snprintf(buf, sizeof buf, "line %u", site / 4096);
    else
        snprintf(buf, sizeof buf, "site %u", site);
    return buf;
}

static std::string where(const Group &g) {
    char buf[160];
    snprintf(buf, sizeof buf, "kernel '%s', threadgroup (%u, %u, %u)", g.k->name, g.gid[0],
             g.gid[1], g.gid[2]);
    return buf;
}

static void group_fail(Group &g, const std::string &msg) {
    if (!g.failed) {
        g.failed = true;
        g.error = where(g) + ": " + msg;
    }
}

// ---- threads, orders ------------------------------------------------------------

static uint64_t splitmix(uint64_t &s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Fill g.order with the lanes in the order CAMEL_SIM_ORDER asks for.
static void make_order(Group &g) {
    uint32_t n = g.nthreads;
    g.order.resize(n);
    for (uint32_t i = 0; i < n; i++) g.order[i] = g.d->order == kReverse ? n - 1 - i : i;
    if (g.d->order == kRandom)
        for (uint32_t i = n - 1; i > 0; i--) {
            uint32_t j = (uint32_t)(splitmix(g.rng) % (i + 1));
            uint32_t tmp = g.order[i];
            g.order[i] = g.order[j];
            g.order[j] = tmp;
        }
}

// What every thread of the group knows alike (set once per threadgroup), into a
// camel_sim_thread or a group entry's camel_sim_group: the same field names.
template <class Fields> static void fill_shared_fields(const Group &g, Fields &t) {
    const Dispatch &d = *g.d;
    for (int a = 0; a < 3; a++) {
        t.threadgroup_position_in_grid[a] = g.gid[a];
        t.threads_per_threadgroup[a] = g.size[a];
        t.dispatch_threads_per_threadgroup[a] = d.tpg[a];
        t.threadgroups_per_grid[a] = d.groups[a];
        t.threads_per_grid[a] = d.threads[a];
    }
    t.simdgroups_per_threadgroup = (g.nthreads + kSimdWidth - 1) / kSimdWidth;
    t.threads_per_simdgroup = kSimdWidth;
    t.quadgroups_per_threadgroup = (g.nthreads + 3) / 4;
}
static void fill_group_fields(const Group &g, camel_sim_thread &t) {
    fill_shared_fields(g, t);
    t.group = (void *)&g;
}

// Where the thread at (x, y, z) of threadgroup g lies in the grid.
static inline void set_grid_position(const Group &g, camel_sim_thread &t, uint32_t x,
                                     uint32_t y, uint32_t z) {
    t.thread_position_in_grid[0] = g.origin[0] + x;
    t.thread_position_in_grid[1] = g.origin[1] + y;
    t.thread_position_in_grid[2] = g.origin[2] + z;
}

// What one thread knows about itself: its position (x, y, z) in the group and
// its linear index i = x + y * size.x + z * size.x * size.y. No divisions:
// this runs once per simulated thread, millions of times per second.
static inline void set_position(const Group &g, camel_sim_thread &t, uint32_t x, uint32_t y,
                                uint32_t z, uint32_t i) {
    t.thread_position_in_threadgroup[0] = x;
    t.thread_position_in_threadgroup[1] = y;
    t.thread_position_in_threadgroup[2] = z;
    set_grid_position(g, t, x, y, z);
    t.thread_index_in_threadgroup = i;
    t.thread_index_in_simdgroup = i % kSimdWidth;
    t.simdgroup_index_in_threadgroup = i / kSimdWidth;
    t.thread_index_in_quadgroup = i % 4;
    t.quadgroup_index_in_threadgroup = i / 4;
}

// The same from the linear index alone (random order needs it).
static inline void set_position(const Group &g, camel_sim_thread &t, uint32_t i) {
    uint32_t x = i % g.size[0], y = (i / g.size[0]) % g.size[1];
    set_position(g, t, x, y, i / (g.size[0] * g.size[1]), i);
}

// ---- fibers: blocking and phases ------------------------------------------------

// The next lane of this pass that may run, or null. Each lane is looked at
// once per pass: one that blocks again waits for the next pass.
static inline Lane *next_ready(Group &g) {
    while (g.walk_pos < g.walk_n) {
        Lane *l = g.walk[g.walk_pos++];
        if ((g.ready_states >> l->state) & 1) return l;
    }
    return nullptr;
}

// Bookkeeping when a lane stops (blocks or returns) in SIMD group s. In the
// pass over the whole group, a SIMD group whose live lanes all wait in
// collectives is finished before anything else runs (full_simdgroup).
static inline void lane_stopped(Group &g, uint32_t s, LaneState state) {
    if (state == kAtCollective || state == kAtSimdBarrier) {
        g.sg_blocked[s]++;
    } else {
        g.sg_live[s]--;
        if (state == kDone) g.sg_done[s]++;
    }
    if (!g.in_simdgroup && g.sg_blocked[s] != 0 && g.sg_blocked[s] == g.sg_live[s])
        g.full_simdgroup = (int32_t)s;
}

// Cache lines of a switched-out fiber's stack that its next run touches first:
// the registers camel_fiber_switch saved, then the kernel's own frame.
constexpr int kHotStackLines = 4;

// The current fiber stops; the next ready one runs. When none is left the
// worker's scheduler (run_fibers) continues and ends the phase. Going
// straight from fiber to fiber costs one switch per block instead of two.
//
// With 256 threads per group, the fibers' stacks do not fit in the L1 cache,
// so every switch would wait for its stack to come from L2. Instead we ask for
// the stack of the fiber *after* `next` now: it arrives while `next` runs.
static inline void block(Group &g, Lane *self) {
    Lane *next = g.failed || g.full_simdgroup >= 0 ? nullptr : next_ready(g);
    g.current = next;
    if (next && g.walk_pos < g.walk_n) {
        const char *sp = (const char *)g.walk[g.walk_pos]->sp;
        for (int i = 0; i < kHotStackLines; i++) __builtin_prefetch(sp + 64 * i);
    }
    camel_fiber_switch(&self->sp, next ? next->sp : g.sched_sp);
}

static void lane_main(void *arg) {
    Lane *l = (Lane *)arg;
    Group &g = tl_worker->group;
    uint32_t i = (uint32_t)(l - g.lanes);
    g.k->entry(g.d->bindings.data(), g.tg.data(), &g.threads[i]);
    l->state = kDone;
    g.n_done++;
    lane_stopped(g, i / kSimdWidth, kDone);
    block(g, l);  // never comes back: a done lane is never ready again
}

// ---- blocks: simdgroup_load and simdgroup_store ---------------------------------
//
// Metal does not say which lane of a SIMD group reads or writes which element of an 8x8
// block, and it orders memory only at barriers (a shuffle, a reduction, a ballot or a
// multiply exchanges values; it orders no memory). So a simdgroup_load or simdgroup_store
// is an access by the SIMD group as a whole, and it races with any other access of the
// block's words since the SIMD group's last barrier (simdgroup_barrier or
// threadgroup_barrier), except read with read. The simulator shows these races whatever
// order the lanes run in:
//   - each SIMD group logs the blocks it loaded and stored since its last barrier; a new
//     access that overlaps a logged one (one of them a store) is an error;
//   - `snap` is a copy of threadgroup memory as of the latest barrier: a block that differs
//     from it was written since (by a plain store of any thread), an error for a load or a
//     store of the block, checked when the access starts and again at the next barrier;
//   - a store writes NaN over the whole block at once and its values at the SIMD group's
//     next barrier, so a plain read in between (by any lane) reads NaN.
// Plain reads are invisible here (nothing sees them); the rest is a few comparisons per
// access and a copy of threadgroup memory per barrier, in kernels that use blocks.

static inline uint8_t *block_row(const BlockAccess &a, uint32_t i) {
    return a.base + i * a.row_bytes;
}

// One element (float or half) as bits, and back: fixed-size copies the compiler inlines.
static inline uint32_t get_elem(const uint8_t *p, uint32_t elem) {
    if (elem == 4) {
        uint32_t v;
        memcpy(&v, p, 4);
        return v;
    }
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}
static inline void put_elem(uint8_t *p, uint32_t elem, uint32_t v) {
    if (elem == 4) {
        memcpy(p, &v, 4);
    } else {
        uint16_t h = (uint16_t)v;
        memcpy(p, &h, 2);
    }
}
// Do 8 elements (one row of a block) differ?
static inline bool row_differs(const uint8_t *p, const uint8_t *q, uint32_t elem) {
    return elem == 4 ? memcmp(p, q, 32) != 0 : memcmp(p, q, 16) != 0;
}

static bool blocks_overlap(const BlockAccess &a, const BlockAccess &b) {
    uintptr_t a0 = (uintptr_t)a.base, b0 = (uintptr_t)b.base;
    uintptr_t a1 = a0 + 7 * a.row_bytes + 8 * a.elem, b1 = b0 + 7 * b.row_bytes + 8 * b.elem;
    if (a1 <= b0 || b1 <= a0) return false;
    for (uint32_t i = 0; i < 8; i++) {
        uintptr_t lo = (uintptr_t)block_row(a, i), hi = lo + 8 * a.elem;
        for (uint32_t j = 0; j < 8; j++) {
            uintptr_t blo = (uintptr_t)block_row(b, j);
            if (lo < blo + 8 * b.elem && blo < hi) return true;
        }
    }
    return false;
}

// The first element (row * 8 + column) of block a in threadgroup memory whose bytes differ
// from the copy taken at the latest barrier, or -1.
static int block_changed(const Group &g, const BlockAccess &a) {
    uint32_t n = 8 * a.elem;
    for (uint32_t i = 0; i < 8; i++) {
        const uint8_t *p = block_row(a, i);
        if (p < g.arena || p + n > g.arena + g.snap_top) continue;  // device memory
        const uint8_t *q = g.snap + (p - g.arena);
        if (!row_differs(p, q, a.elem)) continue;
        for (uint32_t j = 0; j < 8; j++)
            if (get_elem(p + j * a.elem, a.elem) != get_elem(q + j * a.elem, a.elem))
                return (int)(i * 8 + j);
    }
    return -1;
}

static inline uint32_t nan_bits(uint32_t elem) { return elem == 2 ? 0x7e00u : kPoison; }

static void take_snapshot(Group &g) {
    memcpy(g.snap, g.arena, g.arena_top);
    g.snap_top = g.arena_top;
}

// The first block access of a threadgroup whose kernel was not known to use them: from now
// on (later threadgroups: from their start) threadgroup memory is copied at every barrier.
static void start_blocks(Group &g) {
    g.blocks = true;
    g.d->pipeline->uses_blocks.store(true, std::memory_order_relaxed);
    take_snapshot(g);
}

// "element [2][5] (threadgroup memory, byte 1044)": where element e of block a lies.
static std::string element_str(const Group &g, const BlockAccess &a, int e) {
    const uint8_t *p = block_row(a, (uint32_t)e / 8) + (e % 8) * a.elem;
    char buf[128];
    if (p >= g.arena && p < g.arena + kMaxThreadgroupMemory)
        snprintf(buf, sizeof buf, "element [%d][%d] of the block (threadgroup memory, byte %u)",
                 e / 8, e % 8, (unsigned)(p - g.arena));
    else
        snprintf(buf, sizeof buf, "element [%d][%d] of the block (device memory)", e / 8, e % 8);
    return buf;
}

static const char *access_name(const BlockAccess &a) {
    return a.store ? "simdgroup_store" : "simdgroup_load";
}

// "SIMD group 1's last barrier (the simdgroup_barrier at line 310)"
static std::string since_str(const Group &g, uint32_t s) {
    std::string r = "SIMD group " + std::to_string(s) + "'s last barrier (";
    if (g.sg_sync_kind[s] == 0) return r + "none since the kernel started)";
    r += g.sg_sync_kind[s] == 1 ? "the simdgroup_barrier at " : "the threadgroup_barrier at ";
    return r + site_str(g.sg_sync_site[s]) + ")";
}

static std::string race_advice(const Group &g, uint32_t s) {
    std::string r;
    if (g.sg_collective[s])
        r = " The SIMD-group function at " + site_str(g.sg_collective[s]) +
            " since that barrier exchanges values but does not order memory.";
    return r + " Metal does not say which lane moves which element of a block: put "
               "simdgroup_barrier(mem_flags::mem_threadgroup) between the two accesses "
               "(threadgroup_barrier if another SIMD group makes one of them).";
}

// Does access a (by SIMD group s; `skip`: the log entry it stands for, if any) race with
// what came since the SIMD group's last barrier? The message, or "".
static std::string block_race(const Group &g, uint32_t s, const BlockAccess &a, size_t skip) {
    const std::vector<BlockAccess> &log = g.sg_log[s];
    for (size_t i = 0; i < log.size(); i++) {
        const BlockAccess &b = log[i];
        if (i == skip || (!a.store && !b.store) || !blocks_overlap(a, b)) continue;
        return "SIMD group " + std::to_string(s) + ": " + access_name(a) + " at " +
               site_str(a.site) + (a.store ? " writes" : " reads") + " a block that " +
               access_name(b) + " at " + site_str(b.site) + (b.store ? " wrote" : " read") +
               " since " + since_str(g, s) + "." + race_advice(g, s);
    }
    int e = block_changed(g, a);
    if (e >= 0)
        return "SIMD group " + std::to_string(s) + ": " + access_name(a) + " at " +
               site_str(a.site) + (a.store ? " writes" : " reads") + " " + element_str(g, a, e) +
               ", which a thread wrote since " + since_str(g, s) + "." + race_advice(g, s);
    return "";
}

static bool block_race_fails(Group &g, uint32_t s, const BlockAccess &a, size_t skip) {
    std::string race = block_race(g, s, a, skip);
    if (race.empty()) return false;
    group_fail(g, race);
    return true;
}

// SIMD group s has reached a barrier (every lane of it at once): the blocks it loaded must
// not have been written since, its stores land now, and a new log starts. false: a race.
static bool end_block_epoch(Group &g, uint32_t s) {
    std::vector<BlockAccess> &log = g.sg_log[s];
    for (const BlockAccess &a : log) {
        if (a.store) continue;
        int e = block_changed(g, a);
        if (e >= 0) {
            group_fail(g, "SIMD group " + std::to_string(s) + ": a thread wrote " +
                              element_str(g, a, e) + " that simdgroup_load at " +
                              site_str(a.site) + " read since " + since_str(g, s) +
                              ", before the SIMD group's next barrier." + race_advice(g, s));
            return false;
        }
    }
    for (const BlockAccess &a : log) {
        if (!a.store) continue;
        uint32_t nan = nan_bits(a.elem);
        for (uint32_t e = 0; e < 64; e++) {
            uint8_t *p = block_row(a, e / 8) + (e % 8) * a.elem;
            bool in_arena = p >= g.arena && p + a.elem <= g.arena + g.snap_top;
            if (in_arena && get_elem(p, a.elem) != nan) {
                group_fail(g, "SIMD group " + std::to_string(s) + ": a thread wrote " +
                                  element_str(g, a, (int)e) + " after simdgroup_store at " +
                                  site_str(a.site) + " stored it, before the SIMD group's "
                                  "next barrier." + race_advice(g, s));
                return false;
            }
            if ((a.have >> e) & 1) put_elem(p, a.elem, a.values[e]);
        }
    }
    log.clear();
    return true;
}

// A barrier of SIMD group s (kind 1) or of the whole threadgroup (kind 2, s ignored) is
// released at `site`: a new epoch for the SIMD groups it orders.
static bool blocks_barrier(Group &g, uint32_t s, uint8_t kind, uint32_t site) {
    uint32_t first = s, last = s + 1;
    if (kind == 2) first = 0, last = (g.nthreads + kSimdWidth - 1) / kSimdWidth;
    for (uint32_t i = first; i < last; i++) {
        if (g.blocks && !end_block_epoch(g, i)) return false;
        g.sg_epoch[i]++;
        g.sg_sync_kind[i] = kind;
        g.sg_sync_site[i] = site;
        g.sg_collective[i] = 0;
    }
    if (g.blocks) take_snapshot(g);
    return true;
}

// SIMD group s (every live lane waits in a collective or at a
// simdgroup_barrier) resolves what its lanes wait for. Returns true if any
// lane became ready.
//
// Lanes of one SIMD group may wait at different places: after
//     if (lane % 2 == 0) a = simd_sum(x);   // line 10
//     b = simd_shuffle_down(y, 1);          // line 11
// the even lanes wait at line 10 and the odd ones already at line 11. A GPU
// runs the `if` body for the even lanes while the odd ones wait where the
// branches join, so line 11 runs with all 32 lanes. The simulator imitates
// that: it resolves only the waiting point that comes first in the source
// (the smallest site), the others wait for the next pass. The active mask is
// then exactly the lanes waiting there. (Loops defeat this rule: a lane in
// iteration 2 and a lane in iteration 1 at the same line look alike. That is
// one of the documented gaps.)
static bool resolve_simdgroup(Group &g, uint32_t s) {
    bool woke = false;
    {
        uint32_t base = s * kSimdWidth;
        uint32_t width = g.nthreads - base < kSimdWidth ? g.nthreads - base : kSimdWidth;
        uint32_t waiting = 0;  // lanes in a collective or simdgroup_barrier at the first site
        uint32_t site = UINT32_MAX;
        for (uint32_t i = 0; i < width; i++) {
            Lane &l = g.lanes[base + i];
            if (l.state != kAtSimdBarrier && l.state != kAtCollective) continue;
            if (l.site < site) {
                site = l.site;
                waiting = 0;
            }
            if (l.site == site) waiting |= 1u << i;
        }
        // simdgroup_barrier: every lane that will arrive this phase has arrived.
        bool barrier = false;
        for (uint32_t bits = waiting; bits; bits &= bits - 1) {
            Lane &l = g.lanes[base + __builtin_ctz(bits)];
            if (l.state == kAtSimdBarrier) {
                l.state = kReady;
                g.sg_blocked[s]--;
                waiting &= ~(1u << __builtin_ctz(bits));
                woke = barrier = true;
            }
        }
        if (barrier && !blocks_barrier(g, s, 1, site)) return false;
        // Collectives: lanes at this site with the same resolver form one.
        while (waiting) {
            Lane &lead = g.lanes[base + __builtin_ctz(waiting)];
            uint32_t mask = 0;
            camel_sim_lane io[kSimdWidth];
            for (uint32_t bits = waiting; bits; bits &= bits - 1) {
                uint32_t i = __builtin_ctz(bits);
                Lane &l = g.lanes[base + i];
                if (l.resolver == lead.resolver) {
                    mask |= 1u << i;
                    io[i].in = l.in;
                    io[i].out = l.out;
                }
            }
            const char *err = nullptr;
            g.sg_collective[s] = lead.site;  // for messages: it orders no memory
            if (lead.resolver(io, mask, lead.arg, &err) != 0) {
                group_fail(g, "SIMD group " + std::to_string(base / kSimdWidth) +
                                  ", collective at " + site_str(lead.site) + ": " +
                                  (err ? err : "invalid collective"));
                return false;
            }
            for (uint32_t bits = mask; bits; bits &= bits - 1)
                g.lanes[base + __builtin_ctz(bits)].state = kReady;
            g.sg_blocked[s] -= __builtin_popcount(mask);
            waiting &= ~mask;
            woke = true;
        }
    }
    return woke;
}

// End of a phase, step 2: nothing but threadgroup barriers is left. Release
// it when every thread of the group waits at the same one; otherwise the
// kernel is wrong (on a GPU it would hang or read stale memory).
//
// Releasing does not touch the lanes (256 cache lines): the next phase simply
// lets lanes waiting at a threadgroup barrier run (ready_states). A lane that
// reaches the next barrier during that phase is not looked at again before
// the phase ends, so it waits there, as it should.
static bool release_barrier(Group &g) {
    if (g.n_done == 0 && !g.barrier_mixed) {  // the usual case: everybody is here
        g.ready_states = 1u << kReady | 1u << kAtBarrier;
        g.n_barrier = 0;
        return true;
    }
    // Something is wrong: count who waits where, for the message.
    uint32_t done = 0, waiting = 0, site = 0, other_site = 0, at_site = 0;
    bool mixed = false;
    for (uint32_t i = 0; i < g.nthreads; i++) {
        Lane &l = g.lanes[i];
        if (l.state == kDone) {
            done++;
        } else {  // kAtBarrier: nothing else can be left here
            if (waiting == 0) site = l.site;
            if (l.site == site) {
                at_site++;
            } else {
                mixed = true;
                other_site = l.site;
            }
            waiting++;
        }
    }
    if (mixed) {
        group_fail(g, "threads wait at different threadgroup_barrier calls (" +
                          std::to_string(at_site) + " at " + site_str(site) + ", " +
                          std::to_string(waiting - at_site) + " at " + site_str(other_site) +
                          "); every thread of a threadgroup must reach the same barrier");
        return false;
    }
    if (done > 0) {
        group_fail(g, "threadgroup_barrier at " + site_str(site) + " was reached by " +
                          std::to_string(waiting) + " of " + std::to_string(g.nthreads) +
                          " threads; the other " + std::to_string(done) +
                          " had returned. Every thread of a threadgroup must reach every "
                          "barrier (return early only after the last one)");
        return false;
    }
    group_fail(g, "simulator bug: barrier bookkeeping out of step");
    return false;
}

// g.run: the lanes in the order CAMEL_SIM_ORDER asks for; g.by_simdgroup: the same cut by
// SIMD group (counted once here, not looked for by finish_simdgroup in all of g.run).
static void make_run_order(Group &g) {
    make_order(g);
    uint32_t n = g.nthreads, nsg = (n + kSimdWidth - 1) / kSimdWidth;
    g.run.resize(n);
    g.by_simdgroup.resize(n);
    g.sg_begin.assign(nsg + 1, 0);
    for (uint32_t i = 0; i < n; i++) {
        g.run[i] = &g.lanes[g.order[i]];
        g.sg_begin[g.order[i] / kSimdWidth + 1]++;
    }
    for (uint32_t s = 0; s < nsg; s++) g.sg_begin[s + 1] += g.sg_begin[s];
    uint32_t fill[kMaxThreadsPerThreadgroup / kSimdWidth];  // each SIMD group's next slot
    for (uint32_t s = 0; s < nsg; s++) fill[s] = g.sg_begin[s];
    for (uint32_t i = 0; i < n; i++) {
        uint32_t s = (uint32_t)(g.run[i] - g.lanes) / kSimdWidth;
        g.by_simdgroup[fill[s]++] = g.run[i];
    }
}

static inline uint32_t simdgroup_width(const Group &g, uint32_t s) {
    uint32_t left = g.nthreads - s * kSimdWidth;
    return left < kSimdWidth ? left : kSimdWidth;
}

// Every live lane of SIMD group s waits in a collective: resolve it and run its
// lanes (nobody else) until each has reached a threadgroup barrier or returned.
// On a GPU the other SIMD groups may be anywhere meanwhile; running this one
// ahead is one of the schedules a GPU may pick, and the one that exposes a
// missing threadgroup_barrier next to a SIMD-group function.
static void finish_simdgroup(Group &g, uint32_t s) {
    g.sg_run.assign(g.by_simdgroup.begin() + g.sg_begin[s],
                    g.by_simdgroup.begin() + g.sg_begin[s + 1]);
    g.in_simdgroup = true;
    while (g.sg_blocked[s] != 0 && !g.failed) {
        if (!resolve_simdgroup(g, s)) {
            if (!g.failed) group_fail(g, "simulator bug: a SIMD group waits but cannot resume");
            break;
        }
        if (g.d->order == kRandom)
            for (uint32_t i = (uint32_t)g.sg_run.size() - 1; i > 0; i--) {
                uint32_t j = (uint32_t)(splitmix(g.rng) % (i + 1));
                Lane *tmp = g.sg_run[i];
                g.sg_run[i] = g.sg_run[j];
                g.sg_run[j] = tmp;
            }
        g.walk = g.sg_run.data();
        g.walk_n = (uint32_t)g.sg_run.size();
        g.walk_pos = 0;
        g.ready_states = 1u << kReady;  // threadgroup barriers stay closed
        if (Lane *first = next_ready(g)) {
            g.current = first;
            camel_fiber_switch(&g.sched_sp, first->sp);
        }
    }
    g.in_simdgroup = false;
}

static bool run_fibers(Group &g) {
    Worker *w = g.w;
    if (!ensure_stacks(w, g.nthreads)) {
        group_fail(g, "cannot allocate fiber stacks");
        return false;
    }
    if (w->stacks_dirty && __asan_unpoison_memory_region)
        __asan_unpoison_memory_region(w->stacks, (size_t)w->nstacks * (kGuardSize + kStackSize));
    w->stacks_dirty = false;
    // A threadgroup shaped like the previous one on this worker (the usual case) keeps its
    // threads' fields and run order: only the positions in the grid move.
    bool same_shape = w->fibers_job == w->job_id && w->fibers_size[0] == g.size[0] &&
                      w->fibers_size[1] == g.size[1] && w->fibers_size[2] == g.size[2];
    camel_sim_thread common;
    fill_group_fields(g, common);
    uint32_t i = 0;
    for (uint32_t z = 0; z < g.size[2]; z++)
        for (uint32_t y = 0; y < g.size[1]; y++)
            for (uint32_t x = 0; x < g.size[0]; x++, i++) {
                Lane &l = g.lanes[i];
                camel_sim_thread &t = g.threads[i];
                if (same_shape) {  // what differs from the last threadgroup's thread i
                    for (int a = 0; a < 3; a++) t.threadgroup_position_in_grid[a] = g.gid[a];
                    set_grid_position(g, t, x, y, z);
                } else {
                    t = common;
                    set_position(g, t, x, y, z, i);
                }
                l.state = kReady;
                l.static_cursor = 0;
                l.blk_epoch = 0;
                l.blk_op = 0;
                // Stack tops 68 KiB apart would all fall into the same cache
                // sets; shifting each by a different multiple of 64 bytes
                // spreads the hot top-of-stack lines over the cache.
                size_t color = (i % 63) * 64;
                l.sp = camel_fiber_init(stack_of(w, i), kStackSize - color, lane_main, &l);
            }
    g.n_done = g.n_barrier = 0;
    g.barrier_mixed = false;
    g.full_simdgroup = -1;
    g.in_simdgroup = false;
    uint32_t nsg = (g.nthreads + kSimdWidth - 1) / kSimdWidth;
    for (uint32_t s = 0; s < nsg; s++) {
        g.sg_blocked[s] = g.sg_done[s] = 0;
        g.sg_log[s].clear();
        g.sg_epoch[s] = g.sg_sync_kind[s] = 0;
        g.sg_sync_site[s] = g.sg_collective[s] = 0;
    }
    g.blocks = g.d->pipeline->uses_blocks.load(std::memory_order_relaxed);
    if (g.blocks) take_snapshot(g);
    uint32_t pass_states = 1u << kReady;  // the first pass starts every thread
    if (!same_shape || g.d->order == kRandom) make_run_order(g);
    w->fibers_job = w->job_id;
    for (int a = 0; a < 3; a++) w->fibers_size[a] = g.size[a];
    for (;;) {
        // One pass from barrier to barrier: every thread runs (in the order
        // CAMEL_SIM_ORDER asks for) until it reaches the next threadgroup
        // barrier or returns; a SIMD group that fills up in collectives on the
        // way is finished first (finish_simdgroup).
        if (g.d->order == kRandom) make_run_order(g);  // a new shuffle every pass
        for (uint32_t s = 0; s < nsg; s++)
            g.sg_live[s] = (uint16_t)(simdgroup_width(g, s) - g.sg_done[s]);
        g.walk = g.run.data();
        g.walk_n = g.nthreads;
        g.walk_pos = 0;
        g.ready_states = pass_states;
        while (Lane *next = next_ready(g)) {
            g.current = next;
            camel_fiber_switch(&g.sched_sp, next->sp);
            if (!g.failed && g.full_simdgroup >= 0) {
                uint32_t s = (uint32_t)g.full_simdgroup;
                g.full_simdgroup = -1;
                uint32_t pos = g.walk_pos;
                finish_simdgroup(g, s);
                g.walk = g.run.data();
                g.walk_n = g.nthreads;
                g.walk_pos = pos;
                g.ready_states = pass_states;
            }
            if (g.failed) break;
        }
        if (g.failed) {
            w->stacks_dirty = true;
            return false;
        }
        if (g.n_done == g.nthreads) {  // the last blocks stored land now
            for (uint32_t s = 0; s < nsg && g.blocks; s++)
                if (!end_block_epoch(g, s)) return false;
            return true;
        }
        // Everyone left waits at a threadgroup barrier.
        if (!release_barrier(g) || !blocks_barrier(g, 0, 2, g.barrier_site)) {
            w->stacks_dirty = true;
            return false;
        }
        pass_states = g.ready_states;
    }
}

// CAMEL_SIM_REGIONS=0: kernels with barriers run on fibers even where the translator
// generated barrier regions (read at every dispatch, before the workers start).
static bool regions_on = true;

// A barrier-free kernel with a group entry (the translator generates one when the kernel
// has no `threadgroup` variable either): the library runs the whole threadgroup itself, as
// loops over its threads, in the order CAMEL_SIM_ORDER asks for (camel_sim_group).
static bool run_group_entry(Group &g) {
    const Dispatch &d = *g.d;
    g.w->fibers_job = 0;  // threads[0] and the order change here
    camel_sim_group gr;
    fill_shared_fields(g, gr);
    for (int a = 0; a < 3; a++) gr.origin[a] = g.origin[a];
    gr.order_list = nullptr;
    gr.seed = g.rng;
    // Thread 0 with the group's fields, for the kernel's calls into the runtime
    // (threadgroup variables, failures).
    fill_group_fields(g, g.threads[0]);
    set_position(g, g.threads[0], 0, 0, 0, 0);
    g.lanes[0].static_cursor = 0;
    g.current = &g.lanes[0];
    gr.thread = &g.threads[0];
    if (d.order == kForward) {
        gr.order = CAMEL_SIM_GROUP_FORWARD;
    } else if (d.order == kReverse) {
        gr.order = CAMEL_SIM_GROUP_REVERSE;
    } else {
        make_order(g);
        gr.order = CAMEL_SIM_GROUP_LIST;
        gr.order_list = g.order.data();
    }
    g.in_group_entry = true;
    g.k->group_entry(d.bindings.data(), g.tg.data(), &gr);
    g.in_group_entry = false;
    return true;
}

// A kernel without barriers and SIMD ops: one thread after the other on the
// worker's own stack, in the order CAMEL_SIM_ORDER asks for.
static bool run_plain(Group &g) {
    if (g.k->group_entry && !g.w->replaying && (regions_on || !g.k->needs_fibers))
        return run_group_entry(g);
    Lane &l = g.lanes[0];
    camel_sim_thread &t = g.threads[0];
    g.current = &l;
    g.w->fibers_job = 0;  // threads[0] and the order change here
    fill_group_fields(g, t);
    void *const *bindings = g.d->bindings.data();
    void *const *tg = g.tg.data();
    camel_sim_entry entry = g.k->entry;
    uint32_t sx = g.size[0], sy = g.size[1], sz = g.size[2];
    if (g.d->order == kForward) {
        uint32_t i = 0;
        for (uint32_t z = 0; z < sz; z++)
            for (uint32_t y = 0; y < sy; y++)
                for (uint32_t x = 0; x < sx; x++, i++) {
                    set_position(g, t, x, y, z, i);
                    l.static_cursor = 0;
                    entry(bindings, tg, &t);
                }
    } else if (g.d->order == kReverse) {
        uint32_t i = g.nthreads;
        for (uint32_t z = sz; z-- > 0;)
            for (uint32_t y = sy; y-- > 0;)
                for (uint32_t x = sx; x-- > 0;) {
                    set_position(g, t, x, y, z, --i);
                    l.static_cursor = 0;
                    entry(bindings, tg, &t);
                }
    } else {
        make_order(g);
        for (uint32_t i : g.order) {
            set_position(g, t, i);
            l.static_cursor = 0;
            entry(bindings, tg, &t);
        }
    }
    return !g.failed;  // a failure jumps out (abandon), so this is true
}

// Run threadgroup number `index` (linear, x fastest) of the dispatch.
static bool run_group(Worker *w, const Dispatch &d, uint32_t index) {
    Group &g = w->group;
    g.d = &d;
    g.k = d.kernel;
    g.w = w;
    w->group_index = index;
    if (d.groups[1] == 1 && d.groups[2] == 1) {  // a 1-D grid: no divisions (tens of
        g.gid[0] = index;                          // cycles each, per threadgroup)
        g.gid[1] = g.gid[2] = 0;
    } else {
        g.gid[0] = index % d.groups[0];
        g.gid[1] = (index / d.groups[0]) % d.groups[1];
        g.gid[2] = index / (d.groups[0] * d.groups[1]);
    }
    g.nthreads = 1;
    for (int a = 0; a < 3; a++) {
        g.origin[a] = g.gid[a] * d.tpg[a];
        // dispatchThreads: the last group along an axis holds what is left.
        uint32_t left = d.threads[a] - g.gid[a] * d.tpg[a];
        g.size[a] = d.grid_is_threads && left < d.tpg[a] ? left : d.tpg[a];
        g.nthreads *= g.size[a];
    }
    // A kernel with barriers and a group entry runs its barrier regions as loops; the
    // fibers run it when CAMEL_SIM_REGIONS=0, and to name the thread after a crash.
    g.fibers = d.kernel->needs_fibers != 0 && !(d.kernel->group_entry && regions_on && !w->replaying);
    uint32_t nlanes = g.fibers ? g.nthreads : 1;
    if (w->lanes.size() < nlanes) {
        w->lanes.resize(nlanes);
        w->threads.resize(nlanes);
    }
    g.lanes = w->lanes.data();
    g.threads = w->threads.data();
    g.failed = false;
    g.in_group_entry = false;
    g.rng = d.seed ^ (0x9e3779b97f4a7c15ull * (index + 1));

    // Threadgroup memory: [[threadgroup(i)]] buffers first, then the kernel's
    // `threadgroup` variables as they are declared. All of it starts as NaN
    // so a read before any write shows up in the results.
    g.arena = w->arena;
    uint32_t *words = (uint32_t *)g.arena;
    for (uint32_t i = 0; i < d.tg_dynamic_bytes / 4; i++) words[i] = kPoison;
    g.tg.resize(d.tg_offsets.size());
    for (size_t i = 0; i < d.tg_offsets.size(); i++) g.tg[i] = g.arena + d.tg_offsets[i];
    g.arena_top = d.tg_dynamic_bytes;
    g.statics.clear();
    g.blocks = false;  // run_fibers decides
    g.snap = w->snap;

    bool ok = g.fibers ? run_fibers(g) : run_plain(g);
    uint32_t static_bytes = g.arena_top - d.tg_dynamic_bytes;
    std::atomic<uint32_t> &measured = d.pipeline->static_tg_bytes;
    if (static_bytes > measured.load(std::memory_order_relaxed)) measured.store(static_bytes);
    return ok;
}

// ---- calls from kernels (the camel_sim_runtime table) ----------------------------

static Group &group_of(const camel_sim_thread *t) { return *(Group *)t->group; }

// Stop the calling thread for good after a failure.
[[noreturn]] __attribute__((noinline, cold)) static void abandon(Group &g) {
    if (g.fibers) {
        Lane *self = g.current;
        self->state = kDone;
        camel_fiber_switch(&self->sp, g.sched_sp);
    }
    siglongjmp(g.w->crash_jmp, 2);  // plain loop: back to run_part
    __builtin_unreachable();
}

[[noreturn]] __attribute__((noinline, cold)) static void not_barrier_free(Group &g,
                                                                         const char *what) {
    group_fail(g, std::string(what) + " in a kernel the translator marked barrier-free "
                                      "(needs_fibers == 0): a simulator bug");
    abandon(g);
}

// The calling thread waits (at a barrier or a collective) until the end of
// the phase. Kept small on purpose: it runs once per thread per barrier, and
// its stack frame is part of every fiber's hot memory.
static inline void wait_as(const camel_sim_thread *t, LaneState state, uint32_t site,
                           const char *what) {
    (void)t;  // the worker knows its group, and the group its running lane
    Group &g = tl_worker->group;
    if (__builtin_expect(!g.fibers, 0)) not_barrier_free(g, what);
    Lane *self = g.current;
    self->state = state;
    self->site = site;
    if (state == kAtBarrier) {
        if (g.n_barrier++ == 0) {
            g.barrier_site = site;
        } else if (site != g.barrier_site) {
            g.barrier_mixed = true;
        }
    }
    lane_stopped(g, (uint32_t)(self - g.lanes) / kSimdWidth, state);
    block(g, self);  // a failed group never resumes its fibers
}

static void rt_threadgroup_barrier(const camel_sim_thread *t, uint32_t, uint32_t site) {
    wait_as(t, kAtBarrier, site, "threadgroup_barrier");
}

static void rt_simdgroup_barrier(const camel_sim_thread *t, uint32_t, uint32_t site) {
    wait_as(t, kAtSimdBarrier, site, "simdgroup_barrier");
}

static void rt_simd_collective(const camel_sim_thread *t, uint32_t site,
                               camel_sim_resolver resolve, const void *in, void *out,
                               const void *arg) {
    Group &g = tl_worker->group;
    if (g.fibers) {
        Lane *self = g.current;
        self->resolver = resolve;
        self->in = in;
        self->out = out;
        self->arg = arg;
    }
    wait_as(t, kAtCollective, site, "a SIMD-group function");
}

static void *rt_threadgroup_static(const camel_sim_thread *t, uint64_t size, uint64_t align) {
    Group &g = group_of(t);
    Lane *self = g.fibers ? &g.lanes[t->thread_index_in_threadgroup] : &g.lanes[0];
    uint32_t k = self->static_cursor++;
    if (k < g.statics.size()) {  // another thread of the group declared it already
        if (g.statics[k].size != size) {
            group_fail(g, "threads declared threadgroup variables in different orders");
            abandon(g);
        }
        return g.arena + g.statics[k].offset;
    }
    if (align < 16) align = 16;
    uint64_t offset = (g.arena_top + align - 1) & ~(align - 1);
    if (offset + size > kMaxThreadgroupMemory) {
        char buf[256];
        snprintf(buf, sizeof buf,
                 "threadgroup memory: %llu bytes of threadgroup variables + %u bytes of "
                 "[[threadgroup(i)]] buffers exceed the device's %u bytes",
                 (unsigned long long)(offset + size - g.d->tg_dynamic_bytes),
                 g.d->tg_dynamic_bytes, kMaxThreadgroupMemory);
        group_fail(g, buf);
        abandon(g);
    }
    uint32_t *words = (uint32_t *)(g.arena + offset);
    for (uint64_t i = 0; i < (size + 3) / 4; i++) words[i] = kPoison;
    g.statics.push_back({size, (uint32_t)offset});
    g.arena_top = (uint32_t)(offset + size);
    if (g.blocks) {  // nobody has written it yet: the copy as of the last barrier is NaN too
        memcpy(g.snap + g.snap_top, g.arena + g.snap_top, g.arena_top - g.snap_top);
        g.snap_top = g.arena_top;
    }
    return g.arena + offset;
}

// The first lane of SIMD group s at its k-th block access since the barrier (or a lane
// whose arguments differ from the first one's): check the access and log it; a store
// writes NaN over the block. The log entry, or null when the lanes disagree.
static __attribute__((noinline)) BlockAccess *start_block(Group &g, uint32_t s, size_t k,
                                                          uint32_t site, int32_t store,
                                                          void *block, uint64_t row_bytes,
                                                          uint32_t elem) {
    if (!g.blocks) start_blocks(g);
    std::vector<BlockAccess> &log = g.sg_log[s];
    BlockAccess a;
    a.base = (uint8_t *)block;
    a.row_bytes = row_bytes;
    a.elem = elem;
    a.store = store != 0;
    a.site = site;
    a.have = 0;
    bool fresh = k == log.size();
    if (block_race_fails(g, s, a, fresh ? SIZE_MAX : k)) abandon(g);
    // Not fresh: lanes disagree about the block (Apple requires the same arguments in
    // every lane; undefined there): this lane's own elements, as it asks.
    if (!fresh) return nullptr;
    if (a.store) {
        uint32_t nan = nan_bits(elem);
        for (uint32_t e = 0; e < 64; e++) put_elem(block_row(a, e / 8) + (e % 8) * elem, elem, nan);
    }
    log.push_back(a);
    return &log.back();
}

// One lane's part of a simdgroup_load (store == 0) or simdgroup_store: see "blocks" above.
static void rt_simdgroup_block(const camel_sim_thread *, uint32_t site, int32_t store,
                               void *block, uint64_t row_bytes, uint32_t elem,
                               const uint32_t *index, const void *values) {
    Group &g = tl_worker->group;
    BlockAccess *entry = nullptr;
    if (__builtin_expect(g.fibers, 1)) {
        Lane *self = g.current;
        uint32_t s = (uint32_t)(self - g.lanes) / kSimdWidth;
        if (self->blk_epoch != g.sg_epoch[s]) {
            self->blk_epoch = g.sg_epoch[s];
            self->blk_op = 0;
        }
        std::vector<BlockAccess> &log = g.sg_log[s];
        size_t k = self->blk_op++;
        if (k < log.size()) {  // an earlier lane has started this access: checked then
            BlockAccess &e = log[k];
            if (e.base == block && e.row_bytes == row_bytes && e.elem == elem &&
                e.store == (store != 0))
                entry = &e;
        }
        if (!entry) entry = start_block(g, s, k, site, store, block, row_bytes, elem);
    }
    if (!store) return;
    for (uint32_t j = 0; j < 2; j++) {
        uint32_t v = get_elem((const uint8_t *)values + j * elem, elem);
        if (entry) {
            entry->values[index[j]] = v;
            entry->have |= 1ull << index[j];
        } else {
            put_elem((uint8_t *)block + (index[j] / 8) * row_bytes + (index[j] % 8) * elem, elem, v);
        }
    }
}

static void rt_fail(const camel_sim_thread *t, const char *message) {
    Group &g = group_of(t);
    group_fail(g, std::string("thread ") + std::to_string(t->thread_index_in_threadgroup) + ": " +
                      message);
    abandon(g);
}

static std::mutex print_mu;

static int rt_vprintf(const char *fmt, __builtin_va_list ap) {
    std::lock_guard<std::mutex> lock(print_mu);
    return vfprintf(stdout, fmt, ap);
}

// Address space that faults on every access: what absent optional arguments point into
// (CAMEL_SIM_PARAM_ABSENT), one slot per parameter position, so a crash there names the
// parameter. Reserved, never committed (PROT_NONE, MAP_NORESERVE: no memory).
static const size_t kAbsentBytes = (size_t)CAMEL_SIM_ABSENT_SLOTS * CAMEL_SIM_ABSENT_SPAN;
static void *absent_arguments() {
    static void *region = [] {
        void *p = mmap(nullptr, kAbsentBytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        return p == MAP_FAILED ? nullptr : p;  // null: absent arguments are null pointers
    }();
    return region;
}

const camel_sim_runtime runtime_table = {
    CAMEL_SIM_ABI_VERSION, rt_threadgroup_barrier, rt_simdgroup_barrier, rt_simd_collective,
    rt_threadgroup_static, rt_fail,                rt_vprintf,
    rt_simdgroup_block,    absent_arguments(),
};

// ---- crashes inside kernels -------------------------------------------------------

static struct sigaction old_actions[32];
static const int kCrashSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};

// Whether the fault in `ctx` was a write (x86-64: bit 1 of the page-fault error code;
// AArch64: the WnR bit of ESR_EL1); -1 where the CPU does not say.
static int fault_was_write(void *ctx) {
#if defined(__x86_64__) && defined(REG_ERR)
    return (((ucontext_t *)ctx)->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
#elif defined(__aarch64__) && defined(ESR_MAGIC)
    auto *head = (struct _aarch64_ctx *)((ucontext_t *)ctx)->uc_mcontext.__reserved;
    for (; head->magic; head = (struct _aarch64_ctx *)((char *)head + head->size))
        if (head->magic == ESR_MAGIC) return (((struct esr_context *)head)->esr >> 6) & 1;
    return -1;
#else
    (void)ctx;
    return -1;
#endif
}

// The memory address of the faulting instruction's ModRM operand, decoded from the signal
// context: x86-64 reports a general-protection fault, such as a movaps or addps on a float4
// at an address that is not a multiple of 16, with no address at all. Knows the
// instructions a kernel's vector code uses (legacy prefixes, REX, the 0F maps, VEX); 0
// for anything else (RIP-relative operands, 32-bit addressing, no memory operand).
static uintptr_t fault_operand_address(void *ctx) {
#if defined(__x86_64__) && defined(REG_RIP)
    const greg_t *r = ((ucontext_t *)ctx)->uc_mcontext.gregs;
    static const int regs[16] = {REG_RAX, REG_RCX, REG_RDX, REG_RBX, REG_RSP, REG_RBP,
                                 REG_RSI, REG_RDI, REG_R8,  REG_R9,  REG_R10, REG_R11,
                                 REG_R12, REG_R13, REG_R14, REG_R15};
    const uint8_t *p = (const uint8_t *)r[REG_RIP];
    int x = 0, b = 0;  // REX.X and REX.B (VEX carries them inverted)
    for (;; p++) {
        uint8_t c = *p;
        if (c == 0x67) return 0;  // 32-bit addressing
        if (c != 0x66 && c != 0xF2 && c != 0xF3 && c != 0xF0 && c != 0x2E && c != 0x3E &&
            c != 0x26 && c != 0x36 && c != 0x64 && c != 0x65)
            break;
    }
    if (*p == 0xC5) {  // two-byte VEX: X and B are 0; the opcode follows
        p += 2;
    } else if (*p == 0xC4) {  // three-byte VEX
        x = !((p[1] >> 6) & 1), b = !((p[1] >> 5) & 1);
        p += 3;
    } else {
        if ((*p & 0xF0) == 0x40) x = (*p >> 1) & 1, b = *p & 1, p++;
        if (*p++ != 0x0F) return 0;  // SSE moves and arithmetic are all 0F-escaped
        if (*p == 0x38 || *p == 0x3A) p++;
    }
    uint8_t modrm = p[1];  // p[0] is the opcode
    p += 2;
    int mod = modrm >> 6, rm = modrm & 7;
    if (mod == 3) return 0;  // a register operand
    uintptr_t addr = 0;
    if (rm == 4) {  // a SIB byte: base + index << scale
        uint8_t sib = *p++;
        int index = ((sib >> 3) & 7) | (x << 3), base = (sib & 7) | (b << 3);
        if (index != 4) addr += (uintptr_t)r[regs[index]] << (sib >> 6);
        if ((sib & 7) == 5 && mod == 0) {  // no base: a 32-bit displacement
            int32_t d;
            memcpy(&d, p, 4);
            return addr + d;
        }
        addr += r[regs[base]];
    } else if (rm == 5 && mod == 0) {
        return 0;  // RIP-relative: a constant of the library, not a buffer
    } else {
        addr += r[regs[rm | (b << 3)]];
    }
    if (mod == 1) addr += (int8_t)*p;
    if (mod == 2) {
        int32_t d;
        memcpy(&d, p, 4);
        addr += d;
    }
    return addr;
#else
    (void)ctx;
    return 0;
#endif
}

static void on_crash(int sig, siginfo_t *info, void *ctx) {
    Worker *w = tl_worker;
    if (!w || !w->in_kernel) {
        // Not ours: put back whoever handled it before (Python's faulthandler,
        // the default core dump) and let the faulting instruction run again.
        // If that handler passes it back to us, fall back to the default.
        static volatile sig_atomic_t passed_on = 0;
        if (passed_on++) {
            signal(sig, SIG_DFL);
            return;
        }
        if (sig == SIGSEGV) host_fault_in_slack((uintptr_t)info->si_addr);
        sigaction(sig, &old_actions[sig], nullptr);
        return;
    }
    Group &g = w->group;
    uintptr_t addr = (uintptr_t)info->si_addr;
    const char *what = sig == SIGSEGV   ? "SIGSEGV (invalid memory access"
                       : sig == SIGBUS  ? "SIGBUS (misaligned or invalid memory access"
                       : sig == SIGFPE  ? "SIGFPE (integer division by zero"
                                        : "SIGILL (trap";
    const char *hint = "";
    if (sig == SIGSEGV && w->stacks && addr >= (uintptr_t)w->stacks) {
        uintptr_t rel = addr - (uintptr_t)w->stacks;
        size_t slot = kGuardSize + kStackSize;
        if (rel < (uintptr_t)w->nstacks * slot && rel % slot < kGuardSize)
            hint = "; this is a stack overflow: each simulated thread has a 64 KiB stack";
    }
    char misaligned[320];
#ifdef SI_KERNEL
    // x86-64 reports a general-protection fault with no address: in a kernel that is
    // almost always a vector load or store (float4, ...) at a misaligned address, whose
    // address the instruction's operand gives.
    if (sig == SIGSEGV && !*hint && info->si_code == SI_KERNEL && addr == 0) {
        uintptr_t operand = fault_operand_address(ctx);
        if (operand && operand % 16) {
            addr = operand;
            snprintf(misaligned, sizeof misaligned,
                     "; a misaligned vector access: the address is %u bytes past a multiple of "
                     "16, and a float4 (half8, int4, ...) load or store needs an address that "
                     "is a multiple of its size (Metal rejects such buffer offsets; reaching one "
                     "by pointer arithmetic is undefined). Rerun with "
                     "CAMEL_SIM_SANITIZE=undefined to find the line",
                     (unsigned)(operand % 16));
            hint = misaligned;
        } else {
            hint = "; a misaligned vector access? A float4 (half4, int4, ...) load or store "
                   "needs an address that is a multiple of its size (16 for float4); the CPU "
                   "reports no address. Rerun with CAMEL_SIM_SANITIZE=undefined to find the line";
        }
    }
#endif
    char absent[512];
    uintptr_t region = (uintptr_t)runtime_table.absent_arguments;
    if ((sig == SIGSEGV || sig == SIGBUS) && !*hint && region && addr >= region &&
        addr - region < kAbsentBytes && g.k) {
        int j = (int)((addr - region) / CAMEL_SIM_ABSENT_SPAN);
        const camel_sim_param *prm = nullptr;
        for (int i = 0; i < g.k->nparams; i++)
            if (g.k->params[i].kind == CAMEL_SIM_PARAM_ABSENT &&
                (i == j || (j == CAMEL_SIM_ABSENT_SLOTS - 1 && i >= j)))
                prm = &g.k->params[i];
        int write = fault_was_write(ctx);
        char index[32] = "";
        if (prm && prm->index >= 0) snprintf(index, sizeof index, "[[buffer(%d)]], ", prm->index);
        // left_out: "function constant 'c' is false"; the name is between the quotes
        const char *why = prm && prm->left_out ? prm->left_out : nullptr;
        const char *q = why ? strchr(why, '\'') : nullptr, *q2 = q ? strchr(q + 1, '\'') : nullptr;
        snprintf(absent, sizeof absent,
                 "; the kernel %s its optional argument '%s' (%s[[function_constant]]), which this "
                 "pipeline leaves out because %s (MSL 5.8.1.2): nothing is bound there. Use it "
                 "only where that constant is true (inside `if (%.*s)`), or make the pipeline "
                 "with the constant true",
                 write == 1 ? "wrote" : write == 0 ? "read" : "used", prm ? prm->name : "?", index,
                 why ? why : "its function constant is false, 0 or has no value",
                 q2 ? (int)(q2 - q - 1) : 6, q2 ? q + 1 : "has_it");
        hint = absent;
    }
    const char *trailer = "Memory the kernel wrote may be damaged; restart Python to be safe.";
    if (hint == absent)  // a read or write of nothing: nothing was damaged
        trailer = "The access that faulted changed nothing; Python can go on.";
    char slack[512];
    uint32_t arg = 0;
    const camel_buffer *buf = nullptr;
    uint64_t at = 0;
    if (sig == SIGSEGV && !*hint && g.d && guarded_slack(*g.d, addr, &arg, &buf, &at)) {
        int write = fault_was_write(ctx);
        const char *param = "?";
        for (int i = 0; g.k && i < g.k->nparams; i++)
            if (g.k->params[i].kind == CAMEL_SIM_PARAM_BUFFER && g.k->params[i].index == (int32_t)arg)
                param = g.k->params[i].name;
        snprintf(slack, sizeof slack,
                 "; it %s past the end of argument %u ('%s', [[buffer(%u)]]): byte %llu of a "
                 "buffer of %llu bytes (%llu bytes past the end), in its slack, whose pages the "
                 "simulator protects. Rerun with CAMEL_SIM_SANITIZE=address to find the line",
                 write == 1 ? "wrote" : write == 0 ? "read" : "read or wrote", arg, param, arg,
                 (unsigned long long)at, (unsigned long long)buf->used,
                 (unsigned long long)(at - buf->used));
        hint = slack;
        trailer = "The access that faulted changed nothing; Python can go on.";
    }
    if (sig == SIGSEGV && !*hint)
        hint = "; an out-of-bounds index? Rerun with CAMEL_SIM_SANITIZE=address to find the line";
    char thread[32] = "";  // a group entry runs its threads itself: no index known here
    if (!g.in_group_entry)
        snprintf(thread, sizeof thread, ", thread %u",
                 g.current ? g.threads[g.current - g.lanes].thread_index_in_threadgroup : 0);
    snprintf(w->crash_msg, sizeof w->crash_msg,
             "kernel '%s', threadgroup (%u, %u, %u)%s: crashed with %s at %p)%s. %s",
             g.k ? g.k->name : "?", g.gid[0], g.gid[1], g.gid[2], thread, what, (void *)addr,
             hint, trailer);
    siglongjmp(w->crash_jmp, g.in_group_entry ? 3 : 1);
}

// Installed by camel_init, and again before a command buffer runs if someone (e.g.
// Python's faulthandler, which pytest enables) has replaced it since.
void install_crash_handlers() {
    // CAMEL_SIM_CATCH_CRASHES=0 leaves crashes to the debugger (gdb, lldb).
    const char *env = getenv("CAMEL_SIM_CATCH_CRASHES");
    if (env && !strcmp(env, "0")) return;
    struct sigaction sa, cur;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_crash;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    for (int sig : kCrashSignals) {
        if (sigaction(sig, nullptr, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) &&
            cur.sa_sigaction == on_crash)
            continue;  // still ours
        sigaction(sig, &sa, &old_actions[sig]);
    }
}

// ---- the worker pool ---------------------------------------------------------------

// One dispatch being run: workers take threadgroups off `next`, `chunk` at a time.
// Taking one at a time made the two workers fight over `next`'s cache line after every
// threadgroup (a small barrier-free group costs less than that fight); `next` and `failed`
// live on lines of their own for the same reason.
struct Job {
    const Dispatch *d;
    uint64_t id;  // a number no other dispatch of this process has
    uint32_t ngroups;
    uint32_t chunk;
    alignas(64) std::atomic<uint32_t> next{0};
    alignas(64) std::atomic<bool> failed{false};
    alignas(64) std::mutex mu;
    std::string error;
};

static void job_fail(Job &job, const std::string &msg) {
    std::lock_guard<std::mutex> lock(job.mu);
    if (!job.failed.load()) {
        job.error = msg;
        job.failed.store(true);
    }
}

// What one worker (or the calling thread) does for a job.
static void run_part(Job &job) {
    Worker *w = this_worker();
    w->job_id = job.id;
    int jumped = sigsetjmp(w->crash_jmp, 1);
    if (jumped == 3) {
        // A crash in a group entry, which knows no thread index: run the threadgroup again,
        // one thread at a time. It crashes again (jumped == 1), now naming the thread; if it
        // does not, the first message stands.
        w->group.in_group_entry = false;
        w->replaying = true;
        w->in_kernel = 1;
        run_group(w, *job.d, w->group_index);
        jumped = 1;
    }
    w->replaying = false;
    if (jumped) {  // 1: a crash signal; 2: a failure in a plain-loop kernel
        w->in_kernel = 0;
        w->stacks_dirty = true;
        job_fail(job, jumped == 1 ? std::string(w->crash_msg) : w->group.error);
        return;
    }
    w->in_kernel = 1;
    while (!job.failed.load(std::memory_order_relaxed)) {
        uint32_t first = job.next.fetch_add(job.chunk, std::memory_order_relaxed);
        if (first >= job.ngroups) break;
        uint32_t last = job.ngroups - first < job.chunk ? job.ngroups : first + job.chunk;
        for (uint32_t i = first; i < last && !job.failed.load(std::memory_order_relaxed); i++)
            if (!run_group(w, *job.d, i)) {
                job_fail(job, w->group.error);
                w->in_kernel = 0;
                return;
            }
    }
    w->in_kernel = 0;
}

static struct Pool {
    std::mutex mu;
    std::condition_variable wake, done;
    std::vector<std::thread> threads;
    Job *job = nullptr;
    uint64_t generation = 0;
    std::atomic<uint64_t> published{0};
    int busy = 0;  // helpers still working on the current job
    int workers = 0;
} &pool = *new Pool;  // never destroyed: detached workers still wait on it at exit

static void helper_main() {
    uint64_t seen = 0;
    for (;;) {
        // Spin briefly: back-to-back dispatches then start without a wake-up.
        double until = now_seconds() + 50e-6;
        while (pool.published.load(std::memory_order_acquire) == seen && now_seconds() < until)
            std::this_thread::yield();
        Job *job;
        {
            std::unique_lock<std::mutex> lock(pool.mu);
            pool.wake.wait(lock, [&] { return pool.generation != seen; });
            seen = pool.generation;
            job = pool.job;
        }
        run_part(*job);
        std::lock_guard<std::mutex> lock(pool.mu);
        if (--pool.busy == 0) pool.done.notify_all();
    }
}

// After fork() only the forking thread exists in the child: without this the
// child would wait forever for helpers that are not there. It runs alone.
static void pool_after_fork_in_child() {
    new (&pool.mu) std::mutex();
    new (&pool.wake) std::condition_variable();
    new (&pool.done) std::condition_variable();
    for (auto &t : pool.threads) new (&t) std::thread();  // forget the parent's threads
    pool.threads.clear();
    if (pool.workers > 1) pool.workers = 1;
}

void pool_start(int workers) {
    std::lock_guard<std::mutex> lock(pool.mu);
    if (pool.workers) return;
    pthread_atfork(nullptr, nullptr, pool_after_fork_in_child);
    pool.workers = workers;
    // The calling thread is worker 0; the pool adds the others.
    for (int i = 1; i < workers; i++) pool.threads.emplace_back(helper_main);
    for (auto &t : pool.threads) t.detach();
}

int pool_workers() { return pool.workers; }

bool execute(const Dispatch &d, std::string &error) {
    const char *regions = getenv("CAMEL_SIM_REGIONS");
    regions_on = !(regions && !strcmp(regions, "0"));
    static std::atomic<uint64_t> jobs{0};
    Job job;
    job.d = &d;
    job.id = ++jobs;
    job.ngroups = d.groups[0] * d.groups[1] * d.groups[2];
    if (job.ngroups == 0) return true;
    // About 64 chunks per worker: few enough claims to be cheap, small enough that
    // the last chunks still balance the workers.
    job.chunk = job.ngroups / (64 * (uint32_t)(pool.workers > 1 ? pool.workers : 1));
    if (job.chunk < 1) job.chunk = 1;
    int helpers = pool.workers - 1;
    if (helpers > (int)job.ngroups - 1) helpers = (int)job.ngroups - 1;
    if (helpers > 0) {
        std::lock_guard<std::mutex> lock(pool.mu);
        pool.job = &job;
        pool.busy = pool.workers - 1;  // every helper takes part, even if it finds no work
        pool.generation++;
        pool.published.store(pool.generation, std::memory_order_release);
        pool.wake.notify_all();
    }
    run_part(job);
    if (helpers > 0) {
        std::unique_lock<std::mutex> lock(pool.mu);
        pool.done.wait(lock, [] { return pool.busy == 0; });
    }
    fflush(stdout);  // kernel printf output
    if (job.failed.load()) {
        error = job.error;
        return false;
    }
    return true;
}

// ---- benchmark hook ----------------------------------------------------------------

static void *bench_main_sp, *bench_fiber_sp;

static void bench_fiber(void *arg) {
    uint64_t n = *(uint64_t *)arg;
    for (uint64_t i = 0; i < n; i++) camel_fiber_switch(&bench_fiber_sp, bench_main_sp);
    for (;;) camel_fiber_switch(&bench_fiber_sp, bench_main_sp);
}

}  // namespace sim

extern "C" __attribute__((visibility("default"))) double camel_sim_bench_fiber_switch(uint64_t n) {
    using namespace sim;
    void *stack = malloc(kStackSize);
    bench_fiber_sp = camel_fiber_init(stack, kStackSize, bench_fiber, &n);
    double t0 = now_seconds();
    for (uint64_t i = 0; i < n; i++) camel_fiber_switch(&bench_main_sp, bench_fiber_sp);
    double t1 = now_seconds();
    free(stack);
    return (t1 - t0) * 1e9 / (2.0 * (double)n);
}
