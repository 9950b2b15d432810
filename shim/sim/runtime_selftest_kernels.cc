// runtime_selftest_kernels.cc — a kernel library written by hand, the way the
// translator (translate.cpp) would generate one from MSL, so the runtime can be
// tested on its own: tests/test_sim_runtime.py loads it with
// camel_sim_library_load. Built by `make -C shim sim-selftest`.
//
// Each kernel shows the MSL it stands for in a comment.
#include <stdarg.h>
#include <stdint.h>
#include <string.h>

#include "../front/sim_abi.h"

static const camel_sim_runtime *rt;

// ---- helpers the translator's compat header would provide ---------------------

static int resolve_sum(camel_sim_lane *lanes, uint32_t mask, const void *, const char **) {
    float sum = 0;
    for (int i = 0; i < 32; i++)
        if (mask >> i & 1) sum += *(const float *)lanes[i].in;
    for (int i = 0; i < 32; i++)
        if (mask >> i & 1) *(float *)lanes[i].out = sum;
    return 0;
}

// simd_shuffle_down(x, delta): lane i gets lane i + delta's value (its own if
// that lane is not active).
static int resolve_shuffle_down(camel_sim_lane *lanes, uint32_t mask, const void *arg,
                                const char **) {
    uint32_t delta = *(const uint32_t *)arg;
    float vals[32];
    for (int i = 0; i < 32; i++)
        if (mask >> i & 1) vals[i] = *(const float *)lanes[i].in;
    for (int i = 0; i < 32; i++) {
        if (!(mask >> i & 1)) continue;
        uint32_t src = i + delta;
        *(float *)lanes[i].out = src < 32 && (mask >> src & 1) ? vals[src] : vals[i];
    }
    return 0;
}

static int resolve_full_only(camel_sim_lane *, uint32_t mask, const void *, const char **error) {
    if (mask != 0xffffffffu) {
        *error = "simdgroup_matrix needs all 32 lanes of the SIMD group";
        return 1;
    }
    return 0;
}

static float simd_sum(const camel_sim_thread *t, float x, uint32_t site) {
    float out;
    rt->simd_collective(t, site, resolve_sum, &x, &out, nullptr);
    return out;
}

#define SITE (__LINE__ * 4096)
#define BARRIER(t) rt->threadgroup_barrier(t, 1, SITE)

// ---- kernels -------------------------------------------------------------------

// kernel void add(device const float *a [[buffer(0)]], device const float *b [[buffer(1)]],
//                 device float *out [[buffer(2)]], constant uint &n [[buffer(3)]],
//                 uint i [[thread_position_in_grid]])
// { if (i < n) out[i] = a[i] + b[i]; }
static void k_add(void *const *bind, void *const *, const camel_sim_thread *t) {
    const float *a = (const float *)bind[0], *b = (const float *)bind[1];
    float *out = (float *)bind[2];
    uint32_t n = *(const uint32_t *)bind[3];
    uint32_t i = t->thread_position_in_grid[0];
    if (i < n) out[i] = a[i] + b[i];
}

// Tree reduction of each threadgroup in threadgroup memory:
// threadgroup float tile[1024]; tile[lid] = in[gid]; barrier;
// for (s = n/2; s > 0; s /= 2) { if (lid < s) tile[lid] += tile[lid + s]; barrier; }
// if (lid == 0) out[group] = tile[0];
static void k_reduce(void *const *bind, void *const *, const camel_sim_thread *t) {
    const float *in = (const float *)bind[0];
    float *out = (float *)bind[1];
    float *tile = (float *)rt->threadgroup_static(t, 1024 * sizeof(float), 16);
    uint32_t lid = t->thread_index_in_threadgroup, n = t->threads_per_threadgroup[0];
    tile[lid] = in[t->thread_position_in_grid[0]];
    BARRIER(t);
    for (uint32_t s = n / 2; s > 0; s /= 2) {
        if (lid < s) tile[lid] += tile[lid + s];
        BARRIER(t);
    }
    if (lid == 0) out[t->threadgroup_position_in_grid[0]] = tile[0];
}

// The same exchange with and without the barrier between write and read:
// tile[lid] = in[gid]; (barrier;) out[gid] = tile[(lid + 1) % n];
static void exchange(void *const *bind, const camel_sim_thread *t, bool with_barrier) {
    const float *in = (const float *)bind[0];
    float *out = (float *)bind[1];
    float *tile = (float *)rt->threadgroup_static(t, 256 * sizeof(float), 16);
    uint32_t lid = t->thread_index_in_threadgroup, n = t->threads_per_threadgroup[0];
    tile[lid] = in[t->thread_position_in_grid[0]];
    if (with_barrier) BARRIER(t);
    out[t->thread_position_in_grid[0]] = tile[(lid + 1) % n];
}
static void k_exchange(void *const *b, void *const *, const camel_sim_thread *t) { exchange(b, t, true); }
static void k_exchange_nobarrier(void *const *b, void *const *, const camel_sim_thread *t) {
    exchange(b, t, false);
}

// out[gid] = simd_sum(in[gid]); out2[gid] = (lane is even) ? simd_sum(1.0) : -1;
// then a shuffle_down by 1 of in[gid] into out3.
static void k_simd(void *const *bind, void *const *, const camel_sim_thread *t) {
    const float *in = (const float *)bind[0];
    float *out = (float *)bind[1], *out2 = (float *)bind[2], *out3 = (float *)bind[3];
    uint32_t gid = t->thread_position_in_grid[0];
    out[gid] = simd_sum(t, in[gid], SITE);
    out2[gid] = t->thread_index_in_simdgroup % 2 == 0 ? simd_sum(t, 1.0f, SITE) : -1.0f;
    uint32_t delta = 1;
    float x = in[gid], y;
    rt->simd_collective(t, SITE, resolve_shuffle_down, &x, &y, &delta);
    out3[gid] = y;
}

// if (lid >= n / 2) return; threadgroup_barrier(...);   — a partial barrier
static void k_partial_barrier(void *const *, void *const *, const camel_sim_thread *t) {
    if (t->thread_index_in_threadgroup >= t->threads_per_threadgroup[0] / 2) return;
    BARRIER(t);
}

// if (lid % 2) threadgroup_barrier(...); else threadgroup_barrier(...);
static void k_two_barriers(void *const *, void *const *, const camel_sim_thread *t) {
    if (t->thread_index_in_threadgroup % 2)
        BARRIER(t);
    else
        BARRIER(t);
}

// A simdgroup_matrix-like collective reached by a partial SIMD group.
static void k_matrix_partial(void *const *, void *const *, const camel_sim_thread *t) {
    int dummy = 0;
    rt->simd_collective(t, SITE, resolve_full_only, &dummy, &dummy, nullptr);
}

// device int *p = (device int *)16; if (gid == 5) *p = 1;   — a wild write
static void k_crash(void *const *, void *const *, const camel_sim_thread *t) {
    if (t->thread_position_in_grid[0] == 5) *(volatile int *)16 = 1;
}
static void k_crash_fiber(void *const *b, void *const *tg, const camel_sim_thread *t) {
    BARRIER(t);
    k_crash(b, tg, t);
}

// int q = 0; out[gid] = 7 / q;   — integer division by zero (SIGFPE on x86)
static void k_divzero(void *const *bind, void *const *, const camel_sim_thread *t) {
    volatile int q = 0;
    ((int *)bind[0])[t->thread_position_in_grid[0]] = 7 / q;
}

static void k_fail(void *const *, void *const *, const camel_sim_thread *t) {
    if (t->thread_index_in_threadgroup == 3) rt->fail(t, "index 99 out of bounds");
}

// kernel void dyn(device float *out, device float *first, threadgroup float *tg [[threadgroup(0)]], ...)
// { first[gid] = tg[lid]; (NaN: never written) tg[lid] = lid; barrier; out[gid] = tg[n - 1 - lid]; }
static void k_dyn(void *const *bind, void *const *tgp, const camel_sim_thread *t) {
    float *out = (float *)bind[0], *first = (float *)bind[1];
    float *tg = (float *)tgp[0];
    uint32_t lid = t->thread_index_in_threadgroup, n = t->threads_per_threadgroup[0];
    uint32_t gid = t->thread_position_in_grid[0];
    first[gid] = tg[lid];
    BARRIER(t);
    tg[lid] = (float)lid;
    BARRIER(t);
    out[gid] = tg[n - 1 - lid];
}

// Writes every builtin of the thread, 24 uints per thread at its linear grid index.
static void k_ids(void *const *bind, void *const *, const camel_sim_thread *t) {
    uint32_t *out = (uint32_t *)bind[0];
    const uint32_t *p = t->thread_position_in_grid;
    const uint32_t *g = t->threads_per_grid;
    uint32_t *o = out + 24 * (p[0] + g[0] * (p[1] + g[1] * p[2]));
    for (int a = 0; a < 3; a++) {
        o[0 + a] = t->thread_position_in_grid[a];
        o[3 + a] = t->thread_position_in_threadgroup[a];
        o[6 + a] = t->threadgroup_position_in_grid[a];
        o[9 + a] = t->threads_per_threadgroup[a];
        o[12 + a] = t->dispatch_threads_per_threadgroup[a];
        o[15 + a] = t->threadgroups_per_grid[a];
    }
    o[18] = t->thread_index_in_threadgroup;
    o[19] = t->thread_index_in_simdgroup;
    o[20] = t->simdgroup_index_in_threadgroup;
    o[21] = t->simdgroups_per_threadgroup;
    o[22] = t->thread_index_in_quadgroup;
    o[23] = 1;  // "this thread ran"
}

// threadgroup float big[10000];   — 40000 bytes, more than 32 KiB
static void k_big_static(void *const *, void *const *, const camel_sim_thread *t) {
    rt->threadgroup_static(t, 40000, 16);
}

// threadgroup float tile[2048]; (8 KiB) — for the static + dynamic limit
static void k_static_8k(void *const *, void *const *tgp, const camel_sim_thread *t) {
    float *tile = (float *)rt->threadgroup_static(t, 8192, 16);
    tile[t->thread_index_in_threadgroup] = 0;
    (void)tgp;
}

static int call_printf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = rt->vprintf(fmt, ap);
    va_end(ap);
    return n;
}

static void k_printf(void *const *, void *const *, const camel_sim_thread *t) {
    call_printf("hello from thread %u\n", t->thread_position_in_grid[0]);
}

// out[gid] = in[gid] * scale; with constant float &scale [[buffer(2)]]
static void k_scale(void *const *bind, void *const *, const camel_sim_thread *t) {
    uint32_t i = t->thread_position_in_grid[0];
    ((float *)bind[1])[i] = ((const float *)bind[0])[i] * *(const float *)bind[2];
}

// A busy kernel for the benchmark: 256 barrier phases per threadgroup.
static void k_barrier_loop(void *const *, void *const *, const camel_sim_thread *t) {
    for (int i = 0; i < 256; i++) BARRIER(t);
}

// ---- the library description ------------------------------------------------------

#define P_BUF(name, i) {name, CAMEL_SIM_PARAM_BUFFER, i, 0, 1}
#define P_VAL(name, i, size) {name, CAMEL_SIM_PARAM_BUFFER, i, size, 0}
#define P_TG(name, i) {name, CAMEL_SIM_PARAM_THREADGROUP, i, 0, 1}
#define P_BUILTIN(name) {name, CAMEL_SIM_PARAM_BUILTIN, 0, 0, 0}

static const camel_sim_param p_add[] = {P_BUF("a", 0), P_BUF("b", 1), P_BUF("out", 2),
                                        P_VAL("n", 3, 4), P_BUILTIN("i")};
static const camel_sim_param p_in_out[] = {P_BUF("in", 0), P_BUF("out", 1), P_BUILTIN("gid")};
static const camel_sim_param p_simd[] = {P_BUF("in", 0), P_BUF("out", 1), P_BUF("out2", 2),
                                         P_BUF("out3", 3)};
static const camel_sim_param p_none[] = {P_BUILTIN("lid")};
static const camel_sim_param p_out[] = {P_BUF("out", 0)};
static const camel_sim_param p_dyn[] = {P_BUF("out", 0), P_BUF("first", 1), P_TG("tg", 0)};
static const camel_sim_param p_scale[] = {P_BUF("in", 0), P_BUF("out", 1), P_VAL("scale", 2, 4)};
static const camel_sim_param p_tg[] = {P_TG("scratch", 0)};

#define KERNEL(name, fn, params, maxbuf, fibers) \
    {name, fn, (int32_t)(sizeof(params) / sizeof(params[0])), params, maxbuf, fibers}

static const camel_sim_kernel_desc kernels[] = {
    KERNEL("add", k_add, p_add, 3, 0),
    KERNEL("reduce", k_reduce, p_in_out, 1, 1),
    KERNEL("exchange", k_exchange, p_in_out, 1, 1),
    KERNEL("exchange_nobarrier", k_exchange_nobarrier, p_in_out, 1, 0),
    KERNEL("simd", k_simd, p_simd, 3, 1),
    KERNEL("partial_barrier", k_partial_barrier, p_none, -1, 1),
    KERNEL("two_barriers", k_two_barriers, p_none, -1, 1),
    KERNEL("matrix_partial", k_matrix_partial, p_none, -1, 1),
    KERNEL("crash", k_crash, p_none, -1, 0),
    KERNEL("crash_fiber", k_crash_fiber, p_none, -1, 1),
    KERNEL("divzero", k_divzero, p_out, 0, 0),
    KERNEL("fail", k_fail, p_none, -1, 0),
    KERNEL("dyn", k_dyn, p_dyn, 1, 1),
    KERNEL("ids", k_ids, p_out, 0, 0),
    KERNEL("ids_fibers", k_ids, p_out, 0, 1),
    KERNEL("big_static", k_big_static, p_none, -1, 0),
    KERNEL("static_8k", k_static_8k, p_tg, -1, 0),
    KERNEL("printf", k_printf, p_none, -1, 0),
    KERNEL("scale", k_scale, p_scale, 2, 0),
    KERNEL("barrier_loop", k_barrier_loop, p_none, -1, 1),
};

static const camel_sim_library_desc library = {
    CAMEL_SIM_ABI_VERSION, (int32_t)(sizeof(kernels) / sizeof(kernels[0])), kernels};

extern "C" const camel_sim_library_desc *camel_sim_library(void) { return &library; }
extern "C" void camel_sim_bind(const camel_sim_runtime *runtime) { rt = runtime; }
