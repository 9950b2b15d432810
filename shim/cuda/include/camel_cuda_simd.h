// camel_cuda_simd.h — barriers, SIMD-group and quad-group functions and
// simdgroup_matrix for MSL compiled as CUDA: the CUDA shim's own section of its
// MSL library. camel_cuda_msl.h (beside this file) includes the header both
// targets share (../../front/include/camel_sim_msl.h: types, math, atomics,
// mem_flags, the vote types), then this one; the simulator's <metal_stdlib> puts
// its own section there (shim/sim/include/camel_sim_simd.h: the same functions
// through the simulator runtime).
//
// A Metal SIMD group is a CUDA warp: 32 lanes, formed from the same linear
// thread index. The active lanes are __activemask() (a partial warp at the end
// of a threadgroup, or after some threads returned). Every collective works
// on them only, as Metal's do; a quad is the 4 lanes 4q..4q+3 of a warp.
// All data exchange is shfl.sync.idx on 32-bit words, so any type works.
#pragma once

namespace metal {

// ---------------------------------------------------------------------------
// Barriers
// ---------------------------------------------------------------------------
inline void threadgroup_barrier(mem_flags) { __syncthreads(); }  // bar.sync 0
inline void simdgroup_barrier(mem_flags) { __nvvm_bar_warp_sync(__nvvm_activemask()); }
inline void atomic_thread_fence(mem_flags f, memory_order,
                                thread_scope = thread_scope::thread_scope_device) {
    if (((uint)f & (uint)mem_flags::mem_device) != 0) __nvvm_membar_gl();
    else __nvvm_membar_cta();
}

// ---------------------------------------------------------------------------
// One shuffle primitive: this lane receives `x` of lane `src` (0..31) among
// the lanes in `members` (this lane's group: the warp, or its quad).
// ---------------------------------------------------------------------------
template <class T> inline T __camel_shfl(uint32_t members, T x, uint32_t src) {
    constexpr int W = (sizeof(T) + 3) / 4;
    struct Words { int w[W]; } in{}, out;
    __builtin_memcpy(&in, &x, sizeof(T));
    for (int i = 0; i < W; i++) out.w[i] = __nvvm_shfl_sync_idx_i32(members, in.w[i], (int)src, 0x1f);
    T r;
    __builtin_memcpy(&r, &out, sizeof(T));
    return r;
}

// The lanes of this thread's group of G (32 or 4) that are active:
// base = first lane of the group, me = this lane in the group, members =
// the active lanes as a warp mask, in_group = the same shifted to bit 0.
template <int G> struct __camel_group {
    uint32_t base, me, members, in_group;
    __camel_group() {
        uint32_t lane = __camel_laneid(), active = __nvvm_activemask();
        base = lane & ~(uint32_t)(G - 1);
        me = lane - base;
        uint32_t gm = G == 32 ? ~0u : (0xfu << base);
        members = active & gm;
        in_group = members >> base;
    }
    bool full() const { return in_group == (G == 32 ? ~0u : 0xfu); }
};

// The operators (__camel_op_sum ...): the shared header, camel_sim_msl.h.

// A reduction over the active lanes of the group; every active lane gets it.
// Full group: a butterfly (lane l and l^k add the same two values, so all
// lanes end equal). Partial group: the active lanes in order, one broadcast each.
template <class Op, int G, class T> inline T __camel_reduce(T x) {
    __camel_group<G> g;
    if (g.full()) {
        for (int k = G / 2; k >= 1; k /= 2) x = Op::f(x, __camel_shfl(g.members, x, (g.base + g.me) ^ k));
        return x;
    }
    T acc = x;
    bool first = true;
    for (uint32_t m = g.in_group; m; m &= m - 1) {
        T v = __camel_shfl(g.members, x, g.base + __builtin_ctz(m));
        acc = first ? v : Op::f(acc, v);
        first = false;
    }
    return acc;
}
// Prefix scans over the active lanes in lane order.
template <class Op, int G, bool Inclusive, class T> inline T __camel_prefix(T x) {
    __camel_group<G> g;
    typedef typename __camel_vt<T>::elem E;
    T acc = (T)(E)Op::unit;
    for (uint32_t m = g.in_group; m; m &= m - 1) {
        uint32_t l = __builtin_ctz(m);
        T v = __camel_shfl(g.members, x, g.base + l);
        if (l < g.me || (Inclusive && l == g.me)) acc = Op::f(acc, v);
    }
    return acc;
}

// simd_vote and quad_vote: the simulator's header, shared.
template <int G> inline void __camel_vote(bool b, uint32_t &bits, uint32_t &active) {
    __camel_group<G> g;
    bits = (__nvvm_vote_ballot_sync(g.members, b) & g.members) >> g.base;
    active = g.in_group;
}

// Which lane of the group each shuffle reads (Metal's rules: shuffle_up and
// shuffle_down leave the lanes with no source unchanged).
template <int G> inline uint32_t __camel_src_up(uint32_t me, uint32_t d) { return me < d ? me : me - d; }
template <int G> inline uint32_t __camel_src_down(uint32_t me, uint32_t d) { return me + d >= G ? me : me + d; }

#define __CAMEL_GROUP_FUNCS(P, G)                                                                  \
    template <class T> inline T P##_sum(T x) { return __camel_reduce<__camel_op_sum, G>(x); }    \
    template <class T> inline T P##_product(T x) { return __camel_reduce<__camel_op_product, G>(x); } \
    template <class T> inline T P##_min(T x) { return __camel_reduce<__camel_op_min, G>(x); }    \
    template <class T> inline T P##_max(T x) { return __camel_reduce<__camel_op_max, G>(x); }    \
    template <class T> inline T P##_and(T x) { return __camel_reduce<__camel_op_and, G>(x); }    \
    template <class T> inline T P##_or(T x) { return __camel_reduce<__camel_op_or, G>(x); }      \
    template <class T> inline T P##_xor(T x) { return __camel_reduce<__camel_op_xor, G>(x); }    \
    template <class T> inline T P##_prefix_inclusive_sum(T x) {                                  \
        return __camel_prefix<__camel_op_sum, G, true>(x);                                       \
    }                                                                                            \
    template <class T> inline T P##_prefix_exclusive_sum(T x) {                                  \
        return __camel_prefix<__camel_op_sum, G, false>(x);                                      \
    }                                                                                            \
    template <class T> inline T P##_prefix_inclusive_product(T x) {                              \
        return __camel_prefix<__camel_op_product, G, true>(x);                                   \
    }                                                                                            \
    template <class T> inline T P##_prefix_exclusive_product(T x) {                              \
        return __camel_prefix<__camel_op_product, G, false>(x);                                  \
    }                                                                                            \
    template <class T> inline T P##_shuffle(T x, ushort lane) {                                  \
        __camel_group<G> g;                                                                      \
        return __camel_shfl(g.members, x, g.base + (lane & (G - 1)));                            \
    }                                                                                            \
    template <class T> inline T P##_broadcast(T x, ushort lane) {                                \
        __camel_group<G> g;                                                                      \
        return __camel_shfl(g.members, x, g.base + (lane & (G - 1)));                            \
    }                                                                                            \
    template <class T> inline T P##_shuffle_up(T x, ushort delta) {                              \
        __camel_group<G> g;                                                                      \
        return __camel_shfl(g.members, x, g.base + __camel_src_up<G>(g.me, delta));              \
    }                                                                                            \
    template <class T> inline T P##_shuffle_down(T x, ushort delta) {                            \
        __camel_group<G> g;                                                                      \
        return __camel_shfl(g.members, x, g.base + __camel_src_down<G>(g.me, delta));            \
    }                                                                                            \
    template <class T> inline T P##_shuffle_xor(T x, ushort mask) {                              \
        __camel_group<G> g;                                                                      \
        return __camel_shfl(g.members, x, g.base + ((g.me ^ mask) & (G - 1)));                   \
    }                                                                                            \
    template <class T> inline T P##_shuffle_rotate_up(T x, ushort delta) {                       \
        __camel_group<G> g;                                                                      \
        return __camel_shfl(g.members, x, g.base + ((g.me + G - delta % G) % G));                \
    }                                                                                            \
    template <class T> inline T P##_shuffle_rotate_down(T x, ushort delta) {                     \
        __camel_group<G> g;                                                                      \
        return __camel_shfl(g.members, x, g.base + ((g.me + delta) % G));                        \
    }                                                                                            \
    template <class T> inline T P##_broadcast_first(T x) {                                       \
        __camel_group<G> g;                                                                      \
        return __camel_shfl(g.members, x, g.base + __builtin_ctz(g.in_group));                   \
    }                                                                                            \
    template <class T>                                                                           \
    inline T P##_shuffle_and_fill_down(T data, __camel_identity_t<T> fill, ushort delta,         \
                                       ushort modulo = 0) {                                      \
        return __camel_fill<G, true>(data, fill, delta, modulo);                                 \
    }                                                                                            \
    template <class T>                                                                           \
    inline T P##_shuffle_and_fill_up(T data, __camel_identity_t<T> fill, ushort delta,           \
                                     ushort modulo = 0) {                                        \
        return __camel_fill<G, false>(data, fill, delta, modulo);                                \
    }                                                                                            \
    inline bool P##_all(bool b) {                                                                \
        uint32_t bits, active;                                                                   \
        __camel_vote<G>(b, bits, active);                                                        \
        return bits == active;                                                                   \
    }                                                                                            \
    inline bool P##_any(bool b) {                                                                \
        uint32_t bits, active;                                                                   \
        __camel_vote<G>(b, bits, active);                                                        \
        return bits != 0;                                                                        \
    }                                                                                            \
    inline bool P##_is_first() {                                                                 \
        __camel_group<G> g;                                                                      \
        return (uint32_t)__builtin_ctz(g.in_group) == g.me;                                      \
    }                                                                                            \
    inline bool P##_is_helper_thread() { return false; }

// simd_shuffle_and_fill_down(data, fill, delta[, modulo]): within segments of
// `modulo` lanes (default: the whole group), lane l reads data from l + delta;
// past the end of the segment it reads fill from l + delta - modulo.
// _up mirrors it: l - delta, and before the start fill from l - delta + modulo.
template <int G, bool Down, class T> inline T __camel_fill(T data, T fill, uint32_t delta, uint32_t modulo) {
    __camel_group<G> g;
    int m = modulo ? (int)modulo : G, d = (int)delta;
    int seg = (int)g.me - (int)g.me % m, me = (int)g.me % m, src = Down ? me + d : me - d;
    bool from_fill = Down ? src >= m : src < 0;
    src = ((src % m) + m) % m + seg;
    T a = __camel_shfl(g.members, data, g.base + src);
    T b = __camel_shfl(g.members, fill, g.base + src);
    return from_fill ? b : a;
}

__CAMEL_GROUP_FUNCS(simd, 32)
__CAMEL_GROUP_FUNCS(quad, 4)
#undef __CAMEL_GROUP_FUNCS

inline simd_vote simd_ballot(bool b) {
    uint32_t bits, active;
    __camel_vote<32>(b, bits, active);
    return simd_vote(bits, active);
}
inline quad_vote quad_ballot(bool b) {
    uint32_t bits, active;
    __camel_vote<4>(b, bits, active);
    return quad_vote((ushort)bits, (ushort)active);
}
inline simd_vote simd_active_threads_mask() { return simd_ballot(true); }
inline quad_vote quad_active_threads_mask() { return quad_ballot(true); }

// ---------------------------------------------------------------------------
// simdgroup_matrix<T, 8, 8>: an 8x8 tile spread over the warp's 32 lanes,
// two elements per lane: lane l holds row l / 4, columns 2 (l % 4) and
// 2 (l % 4) + 1 (__e). That is the accumulator layout of the tensor cores'
// mma.m16n8k8 (rows 0-7), so a multiply needs no shuffles for C, D or A (A's
// columns 2q and 2q + 1 go in as the instruction's k slots q and q + 4: the
// order in which k is summed does not matter). B is needed transposed (column
// l / 4, rows 2 (l % 4) and 2 (l % 4) + 1): simdgroup_load and the
// constructors keep that too (__t); a matrix computed by a multiply does not,
// and a multiply that uses it as B gathers it with 4 shuffles.
//
// Two ways to multiply (CAMEL_CUDA_MATRIX at compile time, see
// camel_cuda_matrix_mode in translate_cuda.cpp):
//   tf32x3 (default, sm_80+): on the tensor cores. Each operand is split into
//     a TF32 "big" part and the TF32 rounding of the rest ("small"); the
//     products big*big + small*big + big*small (CUTLASS's 3xTF32) carry about
//     21 bits of each operand, close to FP32; the small*small term is dropped.
//     Two mma.m16n8k8: rows 0-7 of the instruction accumulate c + big*big,
//     rows 8-15 the two cross terms, added at the end where the first part is
//     finite (where it is not, an inf or NaN operand made it so, as in FP32).
//   fp32 (CAMEL_CUDA_MATRIX_FP32): exact FP32 fma on the CUDA cores, in k
//     order, A's row and B's columns gathered with 24 shuffles.
// All 32 lanes must be active, as on Apple GPUs; otherwise the kernel traps
// with a message.
// ---------------------------------------------------------------------------
template <class T, int Cols, int Rows> struct simdgroup_matrix {
    static_assert(Cols == 8 && Rows == 8, "the CUDA shim implements simdgroup_matrix 8x8 only");
    typedef T __pair __attribute__((ext_vector_type(2)));
    __pair __e;         // this lane's two elements: row l / 4, columns 2 (l % 4), + 1
    __pair __t;         // if __t_ok: column l / 4, rows 2 (l % 4), + 1 (for use as B)
    bool __t_ok = false;
    simdgroup_matrix() = default;
    // simdgroup_float8x8(x): x on the diagonal, 0 elsewhere (symmetric: __t = __e).
    explicit simdgroup_matrix(T diagonal) {
        uint32_t l = __camel_laneid(), r = l / 4, c = 2 * (l % 4);
        __e[0] = r == c ? diagonal : (T)0;
        __e[1] = r == c + 1 ? diagonal : (T)0;
        __t = __e;
        __t_ok = true;
    }
    // A reference the kernel may write through: the transposed copy is stale then.
    __pair &thread_elements() {
        __t_ok = false;
        return __e;
    }
    const __pair &thread_elements() const { return __e; }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;

// make_filled_simdgroup_matrix<float, 8>(v): Rows defaults to Cols, as in the simulator
template <class T, int C, int R = C> inline simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T v) {
    simdgroup_matrix<T, C, R> m;
    m.__e[0] = m.__e[1] = v;
    m.__t = m.__e;
    m.__t_ok = true;
    return m;
}

inline void __camel_need_full_warp(const char *what) {
    uint32_t active = __nvvm_activemask();
    if (active != ~0u) {
        printf("[cuda] %s needs all 32 threads of the SIMD group active, but the active mask is "
               "0x%08x (threads that returned early or a threadgroup size that is not a multiple "
               "of 32)\n",
               what, active);
        __builtin_trap();
    }
}

// Element (i, j) of the 8x8 tile at base: row i, column j (of the transpose
// when transpose_matrix, as Metal's simdgroup_load/store).
template <class P>
inline P *__camel_tile_at(P *base, ulong elements_per_row, bool transpose, uint32_t i, uint32_t j) {
    return transpose ? base + j * elements_per_row + i : base + i * elements_per_row + j;
}

template <class P, class T, int C, int R>
inline void simdgroup_load(simdgroup_matrix<T, C, R> &d, P *src, ulong elements_per_row = C,
                           ulong2 matrix_origin = 0, bool transpose_matrix = false) {
    __camel_need_full_warp("simdgroup_load");
    uint32_t l = __camel_laneid(), r = l / 4, c = 2 * (l % 4);
    P *base = src + matrix_origin.y * elements_per_row + matrix_origin.x;
    for (uint32_t j = 0; j < 2; j++) {
        d.__e[j] = (T)*__camel_tile_at(base, elements_per_row, transpose_matrix, r, c + j);
        // two more loads; the compiler drops them where the matrix is never a B operand
        d.__t[j] = (T)*__camel_tile_at(base, elements_per_row, transpose_matrix, c + j, r);
    }
    d.__t_ok = true;
}
template <class P, class T, int C, int R>
inline void simdgroup_store(const simdgroup_matrix<T, C, R> &m, P *dst, ulong elements_per_row = C,
                            ulong2 matrix_origin = 0, bool transpose_matrix = false) {
    __camel_need_full_warp("simdgroup_store");
    uint32_t l = __camel_laneid(), r = l / 4, c = 2 * (l % 4);
    P *base = dst + matrix_origin.y * elements_per_row + matrix_origin.x;
    for (uint32_t j = 0; j < 2; j++)
        *__camel_tile_at(base, elements_per_row, transpose_matrix, r, c + j) = (P)m.__e[j];
}

// B's transposed pair for this lane, B[2q][r] and B[2q + 1][r] (r = l / 4,
// q = l % 4): kept by a load, else gathered. B[k][n] lives in lane 4k + n/2,
// element n % 2; both elements are shuffled and this lane keeps one.
template <class T> inline void __camel_b_column_pair(const simdgroup_matrix<T, 8, 8> &b, float (&out)[2]) {
    if (b.__t_ok) {
        out[0] = (float)b.__t[0];
        out[1] = (float)b.__t[1];
        return;
    }
    uint32_t l = __camel_laneid(), r = l / 4, q = l % 4;
    for (uint32_t j = 0; j < 2; j++) {
        uint32_t src = 4 * (2 * q + j) + r / 2;
        float e0 = (float)__camel_shfl(~0u, b.__e[0], src), e1 = (float)__camel_shfl(~0u, b.__e[1], src);
        out[j] = r % 2 ? e1 : e0;
    }
}

// d = a * b + c exactly in FP32 (c may be null: d = a * b). d[r][c] = c[r][c] + sum_k a[r][k] b[k][c].
// The operands may differ in element type (half tiles into a float accumulator).
template <class TD, class TA, class TB, class TC>
inline void __camel_mma_fp32(simdgroup_matrix<TD, 8, 8> &d, const simdgroup_matrix<TA, 8, 8> &a,
                             const simdgroup_matrix<TB, 8, 8> &b, const simdgroup_matrix<TC, 8, 8> *c) {
    uint32_t l = __camel_laneid(), r = l / 4, q = l % 4;
    float d0 = c ? (float)c->__e[0] : 0.0f, d1 = c ? (float)c->__e[1] : 0.0f;
#pragma unroll
    for (uint32_t k = 0; k < 8; k++) {
        float ak = (float)__camel_shfl(~0u, a.__e[k % 2], 4 * r + k / 2);  // a[r][k]
        float b0 = (float)__camel_shfl(~0u, b.__e[0], 4 * k + q);         // b[k][2q]
        float b1 = (float)__camel_shfl(~0u, b.__e[1], 4 * k + q);         // b[k][2q + 1]
        d0 = __builtin_fmaf(ak, b0, d0);
        d1 = __builtin_fmaf(ak, b1, d1);
    }
    d.__e[0] = (TD)d0;
    d.__e[1] = (TD)d1;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(CAMEL_CUDA_MATRIX_FP32)
#define __CAMEL_MATRIX_TF32X3 1
// x split for the tensor cores, which read the 19 high bits of a float (TF32:
// 10 mantissa bits): big = x truncated to them (never overflows; inf and NaN
// stay inf and NaN), small = the TF32 rounding of the exact rest x - big, and 0
// for inf and NaN (a NaN there would reach rows 0-7 through 0 * small).
inline void __camel_split_tf32(float x, uint32_t &big, uint32_t &small) {
    uint32_t bits = __builtin_bit_cast(uint32_t, x);
    big = x != x ? bits : bits & 0xffffe000u;
    float rest = x - __builtin_bit_cast(float, big);
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(small) : "f"(rest));
    small = isfinite(x) ? small : 0u;
}
// One mma.m16n8k8 on TF32 operands with an FP32 accumulator: d = a b + c, a
// 16x8 (rows g, g + 8 and k slots q, q + 4 of lane 4g + q), b 8x8 (k slots q,
// q + 4 of column g), c and d 16x8 (row g, columns 2q, 2q + 1, then row g + 8).
inline void __camel_mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                             const float (&c)[4]) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
// The warp check of a multiply without a branch (a branch between two
// multiplies would keep their mma from overlapping): a partial warp traps.
inline void __camel_trap_unless_full_warp() {
    asm volatile("{ .reg .pred p; setp.ne.u32 p, %0, -1; @p trap; }" ::"r"(__nvvm_activemask()));
}
#endif

// (half operands are exact in TF32: their small parts are 0)
template <class TD, class TA, class TB, class TC>
inline void __camel_mma(simdgroup_matrix<TD, 8, 8> &d, const simdgroup_matrix<TA, 8, 8> &a,
                        const simdgroup_matrix<TB, 8, 8> &b, const simdgroup_matrix<TC, 8, 8> *c) {
#ifdef __CAMEL_MATRIX_TF32X3
    __camel_trap_unless_full_warp();
    float bt[2];
    __camel_b_column_pair(b, bt);  // b[2q][r], b[2q + 1][r]: the k slots q, q + 4
    uint32_t abig[2], asmall[2], bbig[2], bsmall[2];
    __camel_split_tf32((float)a.__e[0], abig[0], asmall[0]);  // a[r][2q]: k slot q
    __camel_split_tf32((float)a.__e[1], abig[1], asmall[1]);  // a[r][2q + 1]: k slot q + 4
    __camel_split_tf32(bt[0], bbig[0], bsmall[0]);
    __camel_split_tf32(bt[1], bbig[1], bsmall[1]);
    float c4[4] = {c ? (float)c->__e[0] : 0.0f, c ? (float)c->__e[1] : 0.0f, 0.0f, 0.0f};
    float d4[4];
    // rows 0-7: c + big * big; rows 8-15: small * big
    __camel_mma_tf32(d4, {abig[0], asmall[0], abig[1], asmall[1]}, bbig, c4);
    // rows 8-15: + big * small
    __camel_mma_tf32(d4, {0u, abig[0], 0u, abig[1]}, bsmall, d4);
    // An inf or NaN operand makes its row's and column's FP32 result inf or NaN, and
    // c + big * big is that already; the cross terms would turn inf * 0 into NaN there.
    d.__e[0] = (TD)(isfinite(d4[0]) ? d4[0] + d4[2] : d4[0]);
    d.__e[1] = (TD)(isfinite(d4[1]) ? d4[1] + d4[3] : d4[1]);
#else
    __camel_need_full_warp("simdgroup_multiply");
    __camel_mma_fp32(d, a, b, c);
#endif
    d.__t_ok = false;
}
// a and b of float or half each, as on Apple GPUs (llama.cpp: half tiles, float
// accumulator); c and d of one type
template <class TD, class TA, class TB, int M, int N, int K>
inline void simdgroup_multiply(simdgroup_matrix<TD, N, M> &d, const simdgroup_matrix<TA, K, M> &a,
                               const simdgroup_matrix<TB, N, K> &b) {
    __camel_mma<TD, TA, TB, TD>(d, a, b, nullptr);
}
template <class T, class TA, class TB, int M, int N, int K>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<T, N, M> &d,
                                          const simdgroup_matrix<TA, K, M> &a,
                                          const simdgroup_matrix<TB, N, K> &b,
                                          const simdgroup_matrix<T, N, M> &c) {
    __camel_mma<T, TA, TB, T>(d, a, b, &c);
}
}  // namespace metal
