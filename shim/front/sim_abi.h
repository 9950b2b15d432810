/*
 * sim_abi.h — the interface inside the simulator between
 *   the runtime  (shim/sim/runtime*.cpp: the camel_* C ABI, buffers, command
 *                 buffers, worker pool, fibers, barriers, SIMD-group collectives)
 *   and a kernel library (one shared object per .metal source, produced by the
 *                 translator shim/front/translate*.cpp from the source rewritten
 *                 against shim/sim/include/metal_stdlib).
 *
 * Plain C so both sides (and a learner) can read it in one sitting.
 *
 * A kernel library exports exactly two symbols:
 *   const camel_sim_library_desc *camel_sim_library(void);
 *   void camel_sim_bind(const camel_sim_runtime *rt);   (called once, before any kernel runs)
 */
#ifndef CAMEL_SIM_ABI_H
#define CAMEL_SIM_ABI_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CAMEL_SIM_ABI_VERSION 5

/* What one simulated thread knows about itself. The runtime fills it; the
 * generated wrapper converts fields to the exact types the kernel declares
 * (uint, ushort2, uint3, ...). */
typedef struct camel_sim_thread {
    uint32_t thread_position_in_grid[3];
    uint32_t thread_position_in_threadgroup[3];
    uint32_t threadgroup_position_in_grid[3];
    uint32_t threads_per_threadgroup[3];    /* this group's size (smaller at a partial edge) */
    uint32_t dispatch_threads_per_threadgroup[3]; /* the requested size */
    uint32_t threadgroups_per_grid[3];
    uint32_t threads_per_grid[3];
    uint32_t thread_index_in_threadgroup;
    uint32_t thread_index_in_simdgroup;
    uint32_t simdgroup_index_in_threadgroup;
    uint32_t simdgroups_per_threadgroup;
    uint32_t threads_per_simdgroup;         /* 32 */
    uint32_t thread_index_in_quadgroup;
    uint32_t quadgroup_index_in_threadgroup;
    uint32_t quadgroups_per_threadgroup;
    void *group;                            /* runtime's threadgroup state (opaque) */
} camel_sim_thread;

/* Kinds of kernel parameters. */
enum camel_sim_param_kind {
    CAMEL_SIM_PARAM_BUFFER = 1,       /* device/constant pointer or reference: [[buffer(i)]] */
    CAMEL_SIM_PARAM_THREADGROUP = 2,  /* threadgroup pointer: [[threadgroup(i)]] */
    CAMEL_SIM_PARAM_BUILTIN = 3,      /* [[thread_position_in_grid]] and friends */
    CAMEL_SIM_PARAM_ABSENT = 4,       /* an optional argument, [[function_constant(name)]],
                                         that this specialisation does not declare (name false
                                         or without a value, MSL 5.8.1.2): nothing binds it;
                                         index is the one written (-1 if none) */
};

/* What an absent argument points into: parameter j of a kernel at
 * absent_arguments + j * CAMEL_SIM_ABSENT_SPAN + CAMEL_SIM_ABSENT_SPAN / 2 (slot
 * CAMEL_SIM_ABSENT_SLOTS - 1 for the rest), memory that faults on any access, so the
 * runtime's crash message can name the parameter. */
#define CAMEL_SIM_ABSENT_SLOTS 64
#define CAMEL_SIM_ABSENT_SPAN (16u << 20)

typedef struct camel_sim_param {
    const char *name;        /* parameter name as written, for messages */
    int32_t kind;            /* camel_sim_param_kind */
    int32_t index;           /* buffer or threadgroup index; builtin: unused */
    uint32_t value_size;     /* for a reference/value bound to a buffer index:
                                sizeof the type (so setBytes of the wrong length
                                is an error); 0 for pointers */
    int32_t is_pointer;      /* 1 for pointers */
    int32_t writable;        /* buffer: 1 if the kernel may write through it (a pointer to,
                                or reference of, a non-const type); 0 for const/constant */
    uint32_t align;          /* buffer: alignof the type it points to (a bound offset must
                                be a multiple, as Metal requires); 0 if unknown */
    const char *left_out;    /* absent: why, "function constant 'has_b' is false" ("is 0",
                                "has no value"); NULL otherwise */
} camel_sim_param;

/* bindings[i] is the address bound to [[buffer(i)]] (buffer contents + offset,
 * or a copy of setBytes data); tg[i] the address of [[threadgroup(i)]]. */
typedef void (*camel_sim_entry)(void *const *bindings, void *const *tg,
                                const camel_sim_thread *thread);

/* What all threads of one threadgroup know alike, and the order to run them in:
 * the argument of a group entry. The field names are those of camel_sim_thread. */
enum camel_sim_group_order {
    CAMEL_SIM_GROUP_FORWARD = 0,  /* thread index 0, 1, 2, ... */
    CAMEL_SIM_GROUP_REVERSE = 1,  /* ..., 2, 1, 0 */
    CAMEL_SIM_GROUP_LIST = 2,     /* order_list[0], order_list[1], ... */
};

typedef struct camel_sim_group {
    uint32_t threadgroup_position_in_grid[3];
    uint32_t threads_per_threadgroup[3];    /* this group's size (smaller at a partial edge) */
    uint32_t dispatch_threads_per_threadgroup[3];
    uint32_t threadgroups_per_grid[3];
    uint32_t threads_per_grid[3];
    uint32_t origin[3];                     /* thread_position_in_grid of thread (0, 0, 0) */
    uint32_t simdgroups_per_threadgroup;
    uint32_t threads_per_simdgroup;
    uint32_t quadgroups_per_threadgroup;
    int32_t order;                          /* camel_sim_group_order */
    const uint32_t *order_list;             /* CAMEL_SIM_GROUP_LIST: thread indices */
    uint64_t seed;                          /* CAMEL_SIM_GROUP_LIST: for a new shuffle per pass */
    const camel_sim_thread *thread;         /* thread 0, for calls into the runtime */
} camel_sim_group;

/* Runs every thread of one threadgroup in g->order, as loops inside the kernel's
 * library (so the compiler can vectorise across threads): a barrier-free kernel's
 * threads one after the other, or a kernel's barrier regions (the code between two
 * barriers) one after the other, each a loop over the threads. */
typedef void (*camel_sim_group_entry)(void *const *bindings, void *const *tg,
                                      const camel_sim_group *g);

typedef struct camel_sim_kernel_desc {
    const char *name;          /* host name: [[host_name("...")]] or the function name */
    camel_sim_entry entry;
    int32_t nparams;
    const camel_sim_param *params;
    int32_t max_buffer_index;  /* highest [[buffer(i)]] used, -1 if none */
    int32_t needs_fibers;      /* 1 if the kernel may reach a barrier or a SIMD-group op;
                                  0 lets the runtime run threads as a plain loop */
    camel_sim_group_entry group_entry;  /* null, or the whole group at once: a barrier-free
                                           kernel without `threadgroup` variables, or one
                                           whose barriers split it into regions */
} camel_sim_kernel_desc;

typedef struct camel_sim_library_desc {
    int32_t abi_version;       /* CAMEL_SIM_ABI_VERSION */
    int32_t nkernels;
    const camel_sim_kernel_desc *kernels;
} camel_sim_library_desc;

/* One lane's part in a SIMD-group collective. */
typedef struct camel_sim_lane {
    const void *in;   /* this lane's operand (type known to the resolver) */
    void *out;        /* where this lane's result goes */
} camel_sim_lane;

/* Called once per SIMD group by the runtime when the lanes in `active_mask`
 * (bit i = lane i) all wait at the same call site with the same resolver.
 * lanes[i] is valid for every bit set in active_mask. `arg` is the caller's
 * extra argument (shuffle delta, simdgroup_matrix stride, ...) from the
 * lowest active lane. Return 0, or non-zero with a message in *error when
 * the collective is invalid (e.g. simdgroup_matrix with a partial SIMD group). */
typedef int (*camel_sim_resolver)(camel_sim_lane *lanes, uint32_t active_mask,
                                  const void *arg, const char **error);

/* What the runtime gives a kernel library (all calls from inside a kernel). */
typedef struct camel_sim_runtime {
    int32_t abi_version;
    /* threadgroup_barrier / simdgroup_barrier (flags are MSL mem_flags). */
    void (*threadgroup_barrier)(const camel_sim_thread *t, uint32_t flags, uint32_t site);
    void (*simdgroup_barrier)(const camel_sim_thread *t, uint32_t flags, uint32_t site);
    /* (sim-runtime note) Sites must grow with the position in the source, as
     * line * 4096 + column does: when lanes of one SIMD group wait at different
     * sites, the runtime resolves the smallest site first (where a GPU would
     * reconverge) and keeps the others waiting. 0 means unknown.
     * A SIMD-group collective at call site `site` (e.g. line * 4096 + column).
     * Blocks this lane until resolved. */
    void (*simd_collective)(const camel_sim_thread *t, uint32_t site,
                            camel_sim_resolver resolve, const void *in, void *out,
                            const void *arg);
    /* Address of a kernel-scope `threadgroup T x[...]` declaration, shared by
     * all threads of the group; every thread calls it in the same order. */
    void *(*threadgroup_static)(const camel_sim_thread *t, uint64_t size, uint64_t align);
    /* Report a fatal error in the kernel (reported as a failed command buffer). */
    void (*fail)(const camel_sim_thread *t, const char *message);
    /* printf inside kernels goes through here so output is not interleaved. */
    int (*vprintf)(const char *fmt, __builtin_va_list ap);
    /* simdgroup_load (store = 0) or simdgroup_store (store = 1) of one 8x8 block, called by
     * each lane: the block is 8 rows of 8 elements of elem_size bytes at `block`, row_bytes
     * apart. Metal does not say which lane moves which element, so the runtime treats the
     * block as accessed by the SIMD group as a whole and fails the kernel when that races
     * with another access since the SIMD group's last barrier. A store hands over the lane's
     * two elements (index[j] = row * 8 + column within the block, values[j]); the runtime
     * writes them at the SIMD group's next barrier, and the block reads NaN until then. A
     * load reads its two elements itself, after this call. */
    void (*simdgroup_block)(const camel_sim_thread *t, uint32_t site, int32_t store,
                            void *block, uint64_t row_bytes, uint32_t elem_size,
                            const uint32_t *index, const void *values);
    /* CAMEL_SIM_ABSENT_SLOTS * CAMEL_SIM_ABSENT_SPAN bytes of address space that fault
     * (PROT_NONE): what absent arguments point into (CAMEL_SIM_PARAM_ABSENT). */
    void *absent_arguments;
} camel_sim_runtime;

#ifdef __cplusplus
}
#endif
#endif /* CAMEL_SIM_ABI_H */
