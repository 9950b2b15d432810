// camel_sim_simd.h — barriers, SIMD-group and quad-group functions and
// simdgroup_matrix for the camel Metal simulator: each one calls into the
// simulator runtime (camel_sim_runtime, ../../front/sim_abi.h), which runs the
// lanes of a SIMD group as fibers and meets them at each call site.
//
// The simulator's own section of its MSL library: the simulator's <metal_stdlib>
// (beside this file) includes the header both targets share,
// ../../front/include/camel_sim_msl.h (types, math, atomics, mem_flags, the
// vote types, __camel_rt and __camel_cur), then this one. The CUDA shim's
// <metal_stdlib> puts its own section there instead
// (shim/cuda/include/camel_cuda_simd.h: the same functions on warps).
#pragma once

// A call site id for barriers and collectives: the caller's line and column,
// taken by a last parameter `__camel_where w = {__builtin_LINE(), __builtin_COLUMN()}`
// (a struct, so a stray extra argument such as simd_sum(x, 3) does not compile).
struct __camel_where {
    unsigned line, col;
};
inline uint32_t __camel_site(__camel_where w) { return w.line * 4096u + (w.col & 4095u); }
#define __CAMEL_SITE __camel_where __w = {__builtin_LINE(), __builtin_COLUMN()}
#define __CAMEL_AT __camel_site(__w)

namespace metal {
inline void threadgroup_barrier(mem_flags f, __CAMEL_SITE) {
    const camel_sim_thread *t = __camel_cur;
    __camel_rt->threadgroup_barrier(t, (uint)f, __CAMEL_AT);
    __camel_cur = t;
}
inline void simdgroup_barrier(mem_flags f, __CAMEL_SITE) {
    const camel_sim_thread *t = __camel_cur;
    __camel_rt->simdgroup_barrier(t, (uint)f, __CAMEL_AT);
    __camel_cur = t;
}
inline void atomic_thread_fence(mem_flags, memory_order, thread_scope = thread_scope::thread_scope_device) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

// ---------------------------------------------------------------------------
// SIMD-group (32 lanes) and quad-group (4 lanes) functions.
//
// Each call is a collective: this lane hands its operand to the runtime and
// waits; when every active lane of the SIMD group has reached the same call
// site, the runtime calls the resolver once with all lanes' operands, and
// every lane continues with its result. Reading a lane that is not active
// (a shuffle from a thread that returned early or does not exist) gives NaN
// for floating types and 0 for integers: on a GPU the value is undefined.
// ---------------------------------------------------------------------------
template <class T> struct __camel_lane_in {
    T value;
    uint32_t arg;  // this lane's shuffle lane / delta / mask
};
template <class T> inline T __camel_poison() {
    typedef typename __camel_vt<T>::elem E;
    if constexpr (__camel_is_float<E>::value)
        return (T)(E)__builtin_nanf("");
    else
        return T{};
}
template <int G> constexpr uint32_t __camel_group_mask() { return G == 32 ? ~0u : ((1u << (G % 32)) - 1u); }
inline uint32_t __camel_lowest(uint32_t mask) { return (uint32_t)__builtin_ctz(mask); }

template <class T, class R>
inline R __camel_collective(camel_sim_resolver resolve, const T &in, uint32_t site) {
    R out;
    const camel_sim_thread *t = __camel_cur;
    __camel_rt->simd_collective(t, site, resolve, &in, &out, nullptr);
    __camel_cur = t;
    return out;
}

// Reductions and prefix scans over the active lanes of each group of G lanes
// (G = 32: the SIMD group; G = 4: a quad).
// The operators (__camel_op_sum ...): the shared header, camel_sim_msl.h.

template <class T, class Op, int G>
int __camel_resolve_reduce(camel_sim_lane *lanes, uint32_t mask, const void *, const char **) {
    static_assert(__is_arithmetic(typename __camel_vt<T>::elem),
                  "MSL: SIMD-group and quad-group reductions take a scalar or vector type, not a struct");
    for (int base = 0; base < 32; base += G) {
        uint32_t m = (mask >> base) & __camel_group_mask<G>();
        if (!m) continue;
        int first = base + (int)__camel_lowest(m);
        T acc = *(const T *)lanes[first].in;
        for (int i = first + 1; i < base + G; i++)
            if (mask & (1u << i)) acc = Op::f(acc, *(const T *)lanes[i].in);
        for (int i = first; i < base + G; i++)
            if (mask & (1u << i)) *(T *)lanes[i].out = acc;
    }
    return 0;
}
template <class T, class Op, int G, bool Inclusive>
int __camel_resolve_prefix(camel_sim_lane *lanes, uint32_t mask, const void *, const char **) {
    static_assert(__is_arithmetic(typename __camel_vt<T>::elem),
                  "MSL: SIMD-group and quad-group reductions take a scalar or vector type, not a struct");
    for (int base = 0; base < 32; base += G) {
        T acc = (T)(typename __camel_vt<T>::elem)Op::unit;
        for (int i = base; i < base + G; i++) {
            if (!(mask & (1u << i))) continue;
            T v = *(const T *)lanes[i].in;
            if (Inclusive) acc = Op::f(acc, v);
            *(T *)lanes[i].out = acc;
            if (!Inclusive) acc = Op::f(acc, v);
        }
    }
    return 0;
}

// Shuffles: which lane each lane reads from.
enum __camel_shuffle_kind { __camel_idx, __camel_up, __camel_down, __camel_xor, __camel_rot_up,
                            __camel_rot_down, __camel_first };
template <class T, int Kind, int G>
int __camel_resolve_shuffle(camel_sim_lane *lanes, uint32_t mask, const void *, const char **) {
    static_assert(__is_arithmetic(typename __camel_vt<T>::elem),
                  "MSL: SIMD-group and quad-group shuffles and broadcasts take a scalar or vector type, "
                  "not a struct");
    T result[32];
    for (int l = 0; l < 32; l++) {
        if (!(mask & (1u << l))) continue;
        const __camel_lane_in<T> *in = (const __camel_lane_in<T> *)lanes[l].in;
        int base = l - l % G, me = l % G, a = (int)in->arg, src;
        switch (Kind) {
        case __camel_idx: src = a; break;
        case __camel_up: src = me - a < 0 ? me : me - a; break;          // lower lanes keep their value
        case __camel_down: src = me + a >= G ? me : me + a; break;       // upper lanes keep their value
        case __camel_xor: src = (me ^ a) & (G - 1); break;
        case __camel_rot_up: src = ((me - a) % G + G) % G; break;
        case __camel_rot_down: src = (me + a) % G; break;
        default: {  // first active lane of the group
            uint32_t m = (mask >> base) & __camel_group_mask<G>();
            src = (int)__camel_lowest(m);
        }
        }
        if (src < 0 || src >= G || !(mask & (1u << (base + src))))
            result[l] = __camel_poison<T>();
        else
            result[l] = ((const __camel_lane_in<T> *)lanes[base + src].in)->value;
    }
    for (int l = 0; l < 32; l++)
        if (mask & (1u << l)) *(T *)lanes[l].out = result[l];
    return 0;
}

template <int G>
int __camel_resolve_vote(camel_sim_lane *lanes, uint32_t mask, const void *, const char **) {
    for (int base = 0; base < 32; base += G) {
        uint32_t gm = __camel_group_mask<G>();
        uint32_t active = (mask >> base) & gm, bits = 0;
        for (int i = 0; i < G; i++)
            if ((active & (1u << i)) && *(const bool *)lanes[base + i].in) bits |= 1u << i;
        for (int i = 0; i < G; i++)
            if (active & (1u << i)) {
                uint32_t *out = (uint32_t *)lanes[base + i].out;
                out[0] = bits;
                out[1] = active;
            }
    }
    return 0;
}
inline simd_vote __camel_vote32(bool b, uint32_t site) {
    uint32_t r[2];
    const camel_sim_thread *t = __camel_cur;
    __camel_rt->simd_collective(t, site, __camel_resolve_vote<32>, &b, r, nullptr);
    __camel_cur = t;
    return simd_vote(r[0], r[1]);
}
inline quad_vote __camel_vote4(bool b, uint32_t site) {
    uint32_t r[2];
    const camel_sim_thread *t = __camel_cur;
    __camel_rt->simd_collective(t, site, __camel_resolve_vote<4>, &b, r, nullptr);
    __camel_cur = t;
    return quad_vote((ushort)r[0], (ushort)r[1]);
}


#define __CAMEL_GROUP_FUNCS(P, G)                                                                  \
    template <class T> inline T P##_sum(T x, __CAMEL_SITE) {                                     \
        return __camel_collective<T, T>(__camel_resolve_reduce<T, __camel_op_sum, G>, x, __CAMEL_AT); \
    }                                                                                            \
    template <class T> inline T P##_product(T x, __CAMEL_SITE) {                                 \
        return __camel_collective<T, T>(__camel_resolve_reduce<T, __camel_op_product, G>, x, __CAMEL_AT); \
    }                                                                                            \
    template <class T> inline T P##_min(T x, __CAMEL_SITE) {                                     \
        return __camel_collective<T, T>(__camel_resolve_reduce<T, __camel_op_min, G>, x, __CAMEL_AT); \
    }                                                                                            \
    template <class T> inline T P##_max(T x, __CAMEL_SITE) {                                     \
        return __camel_collective<T, T>(__camel_resolve_reduce<T, __camel_op_max, G>, x, __CAMEL_AT); \
    }                                                                                            \
    template <class T> inline T P##_and(T x, __CAMEL_SITE) {                                     \
        return __camel_collective<T, T>(__camel_resolve_reduce<T, __camel_op_and, G>, x, __CAMEL_AT); \
    }                                                                                            \
    template <class T> inline T P##_or(T x, __CAMEL_SITE) {                                      \
        return __camel_collective<T, T>(__camel_resolve_reduce<T, __camel_op_or, G>, x, __CAMEL_AT); \
    }                                                                                            \
    template <class T> inline T P##_xor(T x, __CAMEL_SITE) {                                     \
        return __camel_collective<T, T>(__camel_resolve_reduce<T, __camel_op_xor, G>, x, __CAMEL_AT); \
    }                                                                                            \
    template <class T> inline T P##_prefix_inclusive_sum(T x, __CAMEL_SITE) {                    \
        return __camel_collective<T, T>(__camel_resolve_prefix<T, __camel_op_sum, G, true>, x, __CAMEL_AT); \
    }                                                                                            \
    template <class T> inline T P##_prefix_exclusive_sum(T x, __CAMEL_SITE) {                    \
        return __camel_collective<T, T>(__camel_resolve_prefix<T, __camel_op_sum, G, false>, x, __CAMEL_AT); \
    }                                                                                            \
    template <class T> inline T P##_prefix_inclusive_product(T x, __CAMEL_SITE) {                \
        return __camel_collective<T, T>(__camel_resolve_prefix<T, __camel_op_product, G, true>, x, __CAMEL_AT); \
    }                                                                                            \
    template <class T> inline T P##_prefix_exclusive_product(T x, __CAMEL_SITE) {                \
        return __camel_collective<T, T>(__camel_resolve_prefix<T, __camel_op_product, G, false>, x, __CAMEL_AT); \
    }                                                                                            \
    template <class T> inline T P##_shuffle(T x, ushort lane, __CAMEL_SITE) {                    \
        return __camel_collective<__camel_lane_in<T>, T>(                                        \
            __camel_resolve_shuffle<T, __camel_idx, G>, {x, lane}, __CAMEL_AT);                  \
    }                                                                                            \
    template <class T> inline T P##_broadcast(T x, ushort lane, __CAMEL_SITE) {                  \
        return __camel_collective<__camel_lane_in<T>, T>(                                        \
            __camel_resolve_shuffle<T, __camel_idx, G>, {x, lane}, __CAMEL_AT);                  \
    }                                                                                            \
    template <class T> inline T P##_shuffle_up(T x, ushort delta, __CAMEL_SITE) {                \
        return __camel_collective<__camel_lane_in<T>, T>(                                        \
            __camel_resolve_shuffle<T, __camel_up, G>, {x, delta}, __CAMEL_AT);                  \
    }                                                                                            \
    template <class T> inline T P##_shuffle_down(T x, ushort delta, __CAMEL_SITE) {              \
        return __camel_collective<__camel_lane_in<T>, T>(                                        \
            __camel_resolve_shuffle<T, __camel_down, G>, {x, delta}, __CAMEL_AT);                \
    }                                                                                            \
    template <class T> inline T P##_shuffle_xor(T x, ushort mask, __CAMEL_SITE) {                \
        return __camel_collective<__camel_lane_in<T>, T>(                                        \
            __camel_resolve_shuffle<T, __camel_xor, G>, {x, mask}, __CAMEL_AT);                  \
    }                                                                                            \
    template <class T> inline T P##_shuffle_rotate_up(T x, ushort delta, __CAMEL_SITE) {         \
        return __camel_collective<__camel_lane_in<T>, T>(                                        \
            __camel_resolve_shuffle<T, __camel_rot_up, G>, {x, delta}, __CAMEL_AT);              \
    }                                                                                            \
    template <class T> inline T P##_shuffle_rotate_down(T x, ushort delta, __CAMEL_SITE) {       \
        return __camel_collective<__camel_lane_in<T>, T>(                                        \
            __camel_resolve_shuffle<T, __camel_rot_down, G>, {x, delta}, __CAMEL_AT);            \
    }                                                                                            \
    template <class T> inline T P##_broadcast_first(T x, __CAMEL_SITE) {                         \
        return __camel_collective<__camel_lane_in<T>, T>(                                        \
            __camel_resolve_shuffle<T, __camel_first, G>, {x, 0}, __CAMEL_AT);                   \
    }                                                                                            \
    inline bool P##_all(bool b, __CAMEL_SITE) { return __camel_vote##G(b, __CAMEL_AT).all(); }   \
    inline bool P##_any(bool b, __CAMEL_SITE) { return __camel_vote##G(b, __CAMEL_AT).any(); }   \
    inline bool P##_is_first(__CAMEL_SITE) {                                                     \
        const camel_sim_thread *t = __camel_cur;                                                 \
        uint32_t me = G == 32 ? t->thread_index_in_simdgroup : t->thread_index_in_quadgroup;     \
        auto v = __camel_vote##G(true, __CAMEL_AT);                                              \
        return __camel_lowest((uint32_t)v.__active) == me;                                       \
    }                                                                                            \
    inline bool P##_is_helper_thread() { return false; }

__CAMEL_GROUP_FUNCS(simd, 32)
__CAMEL_GROUP_FUNCS(quad, 4)

// simd_shuffle_and_fill_down(data, fill, delta[, modulo]): within segments of
// `modulo` lanes (default: the whole group), lane l reads data from l + delta;
// past the end of the segment it reads fill from l + delta - modulo.
// _up mirrors it: l - delta, and before the start fill from l - delta + modulo.
template <class T> struct __camel_fill_in {
    T data, fill;
    uint32_t delta, modulo;
};
template <class T, bool Down, int G>
int __camel_resolve_fill(camel_sim_lane *lanes, uint32_t mask, const void *, const char **error) {
    T result[32];
    for (int l = 0; l < 32; l++) {
        if (!(mask & (1u << l))) continue;
        const __camel_fill_in<T> *in = (const __camel_fill_in<T> *)lanes[l].in;
        int m = in->modulo ? (int)in->modulo : G, d = (int)in->delta;
        if (m > G || G % m != 0) {
            *error = "simd_shuffle_and_fill: modulo must divide the SIMD-group width";
            return 1;
        }
        int base = l - l % m, me = l % m, src = Down ? me + d : me - d;
        bool fill = Down ? src >= m : src < 0;
        src = ((src % m) + m) % m + base;
        if (!(mask & (1u << src))) {
            result[l] = __camel_poison<T>();
        } else {
            const __camel_fill_in<T> *from = (const __camel_fill_in<T> *)lanes[src].in;
            result[l] = fill ? from->fill : from->data;
        }
    }
    for (int l = 0; l < 32; l++)
        if (mask & (1u << l)) *(T *)lanes[l].out = result[l];
    return 0;
}
#define __CAMEL_FILL_FUNCS(P, G)                                                                   \
    template <class T>                                                                           \
    inline T P##_shuffle_and_fill_down(T data, __camel_identity_t<T> fill, ushort delta,         \
                                       ushort modulo = 0, __CAMEL_SITE) {                        \
        return __camel_collective<__camel_fill_in<T>, T>(__camel_resolve_fill<T, true, G>,       \
                                                         {data, fill, delta, modulo}, __CAMEL_AT); \
    }                                                                                            \
    template <class T>                                                                           \
    inline T P##_shuffle_and_fill_up(T data, __camel_identity_t<T> fill, ushort delta,           \
                                     ushort modulo = 0, __CAMEL_SITE) {                          \
        return __camel_collective<__camel_fill_in<T>, T>(__camel_resolve_fill<T, false, G>,      \
                                                         {data, fill, delta, modulo}, __CAMEL_AT); \
    }
__CAMEL_FILL_FUNCS(simd, 32)
__CAMEL_FILL_FUNCS(quad, 4)
#undef __CAMEL_FILL_FUNCS

inline simd_vote simd_ballot(bool b, __CAMEL_SITE) { return __camel_vote32(b, __CAMEL_AT); }
inline quad_vote quad_ballot(bool b, __CAMEL_SITE) { return __camel_vote4(b, __CAMEL_AT); }
inline simd_vote simd_active_threads_mask(__CAMEL_SITE) {
    simd_vote v = __camel_vote32(true, __CAMEL_AT);
    return v;
}
inline quad_vote quad_active_threads_mask(__CAMEL_SITE) { return __camel_vote4(true, __CAMEL_AT); }

// ---------------------------------------------------------------------------
// simdgroup_matrix<T, Cols, Rows>: an 8x8 tile spread over the 32 lanes of a
// SIMD group, two elements per lane, in the layout of Apple GPUs (the one
// MLX's steel kernels rely on through thread_elements()): lane l holds row
//     (q & 4) + (l / 2) % 4,  q = l / 4,
// columns col0 and col0 + 1, col0 = (q & 2) * 2 + (l % 2) * 2. So lanes
// 0, 1, 8, 9 hold row 0; lanes 16, 17, 24, 25 row 4.
//
// Each lane loads its own two elements when it gets there: simdgroup_load and
// simdgroup_store wait for no other lane (they synchronise nothing). Metal does not
// say which lane moves which element, so the runtime treats every load and store as
// the SIMD group's access of the whole block (simdgroup_block in sim_abi.h): it
// reports one that races with another access since the last barrier, and a store's
// values land at the SIMD group's next barrier (the block reads NaN until then). A
// multiply needs every lane's elements: it is a collective, resolved once all 32
// lanes have reached it.
// ---------------------------------------------------------------------------
struct __camel_frag {
    uint32_t row, col;  // this lane's elements: (row, col) and (row, col + 1)
};
inline __camel_frag __camel_frag_of(uint32_t lane) {
    uint32_t q = lane / 4;
    return {(q & 4) + (lane / 2) % 4, (q & 2) * 2 + (lane % 2) * 2};
}

template <class T, int Cols, int Rows> struct simdgroup_matrix {
    static_assert(__camel_same<T, float>::value || __camel_same<T, half>::value ||
                      __camel_same<T, __bf16>::value,
                  "MSL: simdgroup_matrix elements are float or half (or bfloat, MSL 3.1)");
    static_assert(Cols == 8 && Rows == 8, "MSL: simdgroup_matrix is 8x8 (simdgroup_float8x8, simdgroup_half8x8)");
    vec<T, 2> __v;  // this lane's two elements (see __camel_frag_of)
    simdgroup_matrix() = default;
    // simdgroup_float8x8(x): x on the diagonal, 0 elsewhere.
    explicit simdgroup_matrix(T diagonal) {
        __camel_frag f = __camel_frag_of(__camel_cur->thread_index_in_simdgroup);
        __v[0] = f.row == f.col ? diagonal : (T)0;
        __v[1] = f.row == f.col + 1 ? diagonal : (T)0;
    }
    // The calling lane's two elements, (row, col0) and (row, col0 + 1).
    vec<T, 2> &thread_elements() { return __v; }
    const vec<T, 2> &thread_elements() const { return __v; }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<__bf16, 8, 8> simdgroup_bfloat8x8;  // MSL 3.1 (bfloat: camel_sim_types.h)

// make_filled_simdgroup_matrix<float, 8>(v): Rows defaults to Cols
template <class T, int C, int R = C> inline simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T v) {
    simdgroup_matrix<T, C, R> m;
    m.__v = v;
    return m;
}

inline int __camel_need_full_simdgroup(uint32_t mask, const char *what, const char **error) {
    if (mask == ~0u) return 0;
    static thread_local char buf[200];
    __builtin_snprintf(buf, sizeof buf,
                       "%s needs all 32 threads of the SIMD group active, but only lanes with "
                       "mask 0x%08x arrived (threads that returned early or a threadgroup size "
                       "that is not a multiple of 32)",
                       what, mask);
    *error = buf;
    return 1;
}
// Loads and stores do not meet the other lanes, so they can only see a SIMD
// group that is short by construction (a lane that returned early goes unseen).
inline void __camel_need_whole_simdgroup(const camel_sim_thread *t, const char *what) {
    uint32_t n = t->threads_per_threadgroup[0] * t->threads_per_threadgroup[1] *
                 t->threads_per_threadgroup[2];
    uint32_t have = n - t->simdgroup_index_in_threadgroup * 32;
    if (have >= 32) return;
    static thread_local char buf[200];
    __builtin_snprintf(buf, sizeof buf,
                       "%s needs all 32 threads of the SIMD group active, but SIMD group %u has "
                       "only %u (a threadgroup size that is not a multiple of 32)",
                       what, t->simdgroup_index_in_threadgroup, have);
    __camel_rt->fail(t, buf);
}

// A library whose kernels call simdgroup_load/store says so as it loads (the runtime
// reads this through dlsym), so that their threadgroups keep a copy of threadgroup memory
// from the start: the first instantiation of either sets it.
extern "C" __attribute__((visibility("default"))) inline int camel_sim_uses_blocks = 0;
template <class = void> struct __camel_uses_blocks {
    static inline const bool mark = (camel_sim_uses_blocks = 1, true);
};

#ifdef __CAMEL_TYPED_CHECK
// The typed address-space check (camel_check_msl.h) sees Apple's declarations: a load
// or store takes device or threadgroup memory (MSL 6.7, Table 6.9 lists no other), not
// constant or thread memory. One per element type and space, not templates, so that
// clang names the space in its note ("no known conversion from 'thread float[64]' to
// 'const device float *'"); translate.cpp reads those notes for these two functions.
void simdgroup_load(simdgroup_matrix<float, 8, 8> &d, const __global float *src, ulong elements_per_row = 8,
                    ulong2 matrix_origin = 0, bool transpose_matrix = false);
void simdgroup_store(const simdgroup_matrix<float, 8, 8> &m, __global float *dst, ulong elements_per_row = 8,
                     ulong2 matrix_origin = 0, bool transpose_matrix = false);
void simdgroup_load(simdgroup_matrix<float, 8, 8> &d, const __local float *src, ulong elements_per_row = 8,
                    ulong2 matrix_origin = 0, bool transpose_matrix = false);
void simdgroup_store(const simdgroup_matrix<float, 8, 8> &m, __local float *dst, ulong elements_per_row = 8,
                     ulong2 matrix_origin = 0, bool transpose_matrix = false);
void simdgroup_load(simdgroup_matrix<half, 8, 8> &d, const __global half *src, ulong elements_per_row = 8,
                    ulong2 matrix_origin = 0, bool transpose_matrix = false);
void simdgroup_store(const simdgroup_matrix<half, 8, 8> &m, __global half *dst, ulong elements_per_row = 8,
                     ulong2 matrix_origin = 0, bool transpose_matrix = false);
void simdgroup_load(simdgroup_matrix<half, 8, 8> &d, const __local half *src, ulong elements_per_row = 8,
                    ulong2 matrix_origin = 0, bool transpose_matrix = false);
void simdgroup_store(const simdgroup_matrix<half, 8, 8> &m, __local half *dst, ulong elements_per_row = 8,
                     ulong2 matrix_origin = 0, bool transpose_matrix = false);
void simdgroup_load(simdgroup_matrix<__bf16, 8, 8> &d, const __global __bf16 *src, ulong elements_per_row = 8,
                    ulong2 matrix_origin = 0, bool transpose_matrix = false);
void simdgroup_store(const simdgroup_matrix<__bf16, 8, 8> &m, __global __bf16 *dst, ulong elements_per_row = 8,
                     ulong2 matrix_origin = 0, bool transpose_matrix = false);
void simdgroup_load(simdgroup_matrix<__bf16, 8, 8> &d, const __local __bf16 *src, ulong elements_per_row = 8,
                    ulong2 matrix_origin = 0, bool transpose_matrix = false);
void simdgroup_store(const simdgroup_matrix<__bf16, 8, 8> &m, __local __bf16 *dst, ulong elements_per_row = 8,
                     ulong2 matrix_origin = 0, bool transpose_matrix = false);
#else
template <class P, class T, int C, int R>
inline void simdgroup_load(simdgroup_matrix<T, C, R> &d, P *src, ulong elements_per_row = C,
                           ulong2 matrix_origin = 0, bool transpose_matrix = false,
                           __CAMEL_SITE) {
    static_assert(__camel_same<__remove_cv(P), T>::value,
                  "MSL: simdgroup_load/simdgroup_store need a pointer to the matrix's element type "
                  "(a half matrix for half data, a float matrix for float data)");
    const camel_sim_thread *t = __camel_cur;
    __camel_need_whole_simdgroup(t, "simdgroup_load");
    __camel_frag f = __camel_frag_of(t->thread_index_in_simdgroup);
    P *base = src + matrix_origin.y * elements_per_row + matrix_origin.x;
    (void)__camel_uses_blocks<>::mark;
    __camel_rt->simdgroup_block(t, __CAMEL_AT, 0, (void *)base, elements_per_row * sizeof(P),
                                sizeof(P), nullptr, nullptr);
    for (uint32_t j = 0; j < 2; j++) {
        uint32_t c = f.col + j;
        d.__v[j] = (T)(transpose_matrix ? base[c * elements_per_row + f.row]
                                        : base[f.row * elements_per_row + c]);
    }
}
template <class P, class T, int C, int R>
inline void simdgroup_store(const simdgroup_matrix<T, C, R> &m, P *dst, ulong elements_per_row = C,
                            ulong2 matrix_origin = 0, bool transpose_matrix = false,
                            __CAMEL_SITE) {
    static_assert(__camel_same<__remove_cv(P), T>::value,
                  "MSL: simdgroup_load/simdgroup_store need a pointer to the matrix's element type "
                  "(a half matrix for half data, a float matrix for float data)");
    const camel_sim_thread *t = __camel_cur;
    __camel_need_whole_simdgroup(t, "simdgroup_store");
    __camel_frag f = __camel_frag_of(t->thread_index_in_simdgroup);
    P *base = dst + matrix_origin.y * elements_per_row + matrix_origin.x;
    // This lane's two elements: where they go in the block (memory row * 8 + column) and
    // their values; the runtime writes them at the SIMD group's next barrier.
    uint32_t index[2];
    T values[2];
    for (uint32_t j = 0; j < 2; j++) {
        uint32_t c = f.col + j;
        index[j] = transpose_matrix ? c * 8 + f.row : f.row * 8 + c;
        values[j] = m.__v[j];
    }
    (void)__camel_uses_blocks<>::mark;
    __camel_rt->simdgroup_block(t, __CAMEL_AT, 1, (void *)base, elements_per_row * sizeof(P),
                                sizeof(P), index, values);
}
#endif  // __CAMEL_TYPED_CHECK

// The operands may differ in element type (float, half or bfloat each): llama.cpp's kernels
// multiply half tiles into a float accumulator (d = a * b + c, a and b half, c and d
// float) and a float tile by a half one. Every product is formed and summed in float,
// in k order, and rounded once to d's type.
template <class TA, class TB, class TC, int M, int N, int K> struct __camel_mat_mul_in {
    const simdgroup_matrix<TA, K, M> *a;  // M rows, K columns
    const simdgroup_matrix<TB, N, K> *b;  // K rows, N columns
    const simdgroup_matrix<TC, N, M> *c;  // M rows, N columns, or null
};
// Every lane hands over pointers to its own parts of a, b (and c): gather the
// three matrices whole, then give each lane its two elements of the result
// (d may be c: nothing is written before everything is read).
template <class TD, class TA, class TB, class TC, int M, int N, int K>
int __camel_resolve_mat_mul(camel_sim_lane *lanes, uint32_t mask, const void *, const char **error) {
    if (__camel_need_full_simdgroup(mask, "simdgroup_multiply", error)) return 1;
    float a[M][K], b[K][N], c[M][N];
    for (uint32_t l = 0; l < 32; l++) {
        const __camel_mat_mul_in<TA, TB, TC, M, N, K> *in =
            (const __camel_mat_mul_in<TA, TB, TC, M, N, K> *)lanes[l].in;
        __camel_frag f = __camel_frag_of(l);
        for (uint32_t j = 0; j < 2; j++) {
            a[f.row][f.col + j] = (float)in->a->__v[j];
            b[f.row][f.col + j] = (float)in->b->__v[j];
            c[f.row][f.col + j] = in->c ? (float)in->c->__v[j] : 0.0f;
        }
    }
    for (uint32_t l = 0; l < 32; l++) {
        __camel_frag f = __camel_frag_of(l);
        simdgroup_matrix<TD, N, M> *d = (simdgroup_matrix<TD, N, M> *)lanes[l].out;
        for (uint32_t j = 0; j < 2; j++) {
            float s = c[f.row][f.col + j];
            for (int k = 0; k < K; k++) s += a[f.row][k] * b[k][f.col + j];
            d->__v[j] = (TD)s;
        }
    }
    return 0;
}
// d = a * b
template <class TD, class TA, class TB, int M, int N, int K>
inline void simdgroup_multiply(simdgroup_matrix<TD, N, M> &d, const simdgroup_matrix<TA, K, M> &a,
                               const simdgroup_matrix<TB, N, K> &b, __CAMEL_SITE) {
    __camel_mat_mul_in<TA, TB, TD, M, N, K> in{&a, &b, nullptr};
    const camel_sim_thread *t = __camel_cur;
    __camel_rt->simd_collective(t, __CAMEL_AT, __camel_resolve_mat_mul<TD, TA, TB, TD, M, N, K>, &in,
                                &d, nullptr);
    __camel_cur = t;
}
// d = a * b + c; c and d of one type (the accumulator)
template <class T, class TA, class TB, int M, int N, int K>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<T, N, M> &d,
                                          const simdgroup_matrix<TA, K, M> &a,
                                          const simdgroup_matrix<TB, N, K> &b,
                                          const simdgroup_matrix<T, N, M> &c, __CAMEL_SITE) {
    __camel_mat_mul_in<TA, TB, T, M, N, K> in{&a, &b, &c};
    const camel_sim_thread *t = __camel_cur;
    __camel_rt->simd_collective(t, __CAMEL_AT, __camel_resolve_mat_mul<T, TA, TB, T, M, N, K>, &in,
                                &d, nullptr);
    __camel_cur = t;
}
}  // namespace metal

#undef __CAMEL_SITE
#undef __CAMEL_AT
