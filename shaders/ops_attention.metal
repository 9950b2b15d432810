// ops_attention.metal — the flash-attention ladder (Stage 5B):
//
//     O = softmax(Q·Kᵀ·scale [+ causal mask]) · V        scale = 1/sqrt(D)
//
// without ever writing the (T, S) score matrix to memory. Every rung computes the same
// thing (FlashAttention-2 forward: one threadgroup per block of B_r query rows, a loop
// over blocks of B_c keys, an online softmax with a running max m and sum l per query
// row, the output rescaled incrementally); each one changes ONE idea:
//   version 1 is the baseline: B_r = B_c = 64, K and V staged in threadgroup memory in
//             chunks of DK columns of D, simdgroup_matrix for Q·Kᵀ and P·V
//   version 2 XOR-swizzles the lanes' walk over the score tile (no conflicts in that walk
//             under the assumed bank model, docs/stage5b.md)
//   version 3 keeps two K/V chunk buffers: chunk g + 1 is copied into the other buffer
//             before chunk g is multiplied, one barrier per chunk instead of two; with no
//             asynchronous copy a thread still waits for its own loads, and the chunks are
//             half as wide, so the barriers per key block stay the same
//   version 4 interleaves fragments in the source: consecutive simdgroup multiplies write
//             different accumulators (independent), instead of a dependent chain into one
//             (after unrolling the compiler may schedule either order; check the compiled code)
//   version 5 double-buffers threadgroup → registers in the source: the next 8x8
//             fragment's load is written before the current multiply (the compiler
//             schedules both; check the compiled code before crediting it)
//   version 6 fuses the softmax arithmetic into FMAs (exp2 with the scale folded in) and
//             comes in several (B_r, B_c) tile shapes for the autotuner
//   version 7 does the softmax in registers, on the lanes' own elements of the score
//             fragments (thread_elements()): no score tile and no diag(alpha) tile in
//             threadgroup memory, O rescaled element by element instead of by a multiply
//   version 8 is v6's 64x32 tile with padded rows instead of the XOR swizzle: the score
//             tile's rows are B_c + 4 floats apart and the K/V chunks' DK + 4, so the
//             lanes' plain walk, the simdgroup_store/load of the scores and the K/V
//             fragment loads spread over the banks (tools/bank_calc.py; docs/stage5b.md)
//   version 9 is v7 with the next K/V chunk staged in registers: a step issues the device
//             reads of chunk g + 1 into registers before it multiplies chunk g and writes
//             them to the other buffer after, so the multiplies do not wait for device
//             memory (what v3's two buffers alone do not do; GEMM v12/v13's loop)
//   version 10 drops simdgroup_matrix: each lane computes 4 x 4 blocks of S and of O with
//             scalar FMAs from threadgroup tiles of Q, K and V (the GEMM ladder's register
//             blocking), its own template, `flash_forward_simt`
//   version 11 is v10 with its lanes paired: every threadgroup read of the S and P·V
//             loops has lane pairs that read one address (lanes l and l ^ 1 the same row
//             of Q or of P, lanes l and l ^ 2 the same key of K or V), which NVIDIA's
//             shared memory serves in 2 returns of 128 bytes instead of 4
//   version 12 is v11 with the heaviest query tiles first: the grid is (B · H, tiles) and
//             tile (tiles - 1 - y) runs in row y, so a causal call starts the tiles with
//             the most key blocks first and the GPU does not wait on them at the end
// v1-v9 are instances of ONE template kernel, `flash_forward`, whose bool parameters
// switch the ideas on; the instances are named `flash_v<rung>_<B_r>x<B_c>_d<D>`.
//
// Run and benchmark them:
//   python -m camel.bench attention --list      # one rung per line
//   python -m camel.bench attention             # validate every rung, then time
//   CAMEL_ATTENTION=flash_v3 python examples/gpt_mini.py --device mps
// The host side (grid, threadgroup size, threadgroup memory per rung) is the table in
// camel/flash.py; the lesson is docs/stage5b.md.
//
// Layouts (every kernel): q (B, H, T, D), k and v (B, H, S, D), o (B, H, T, D), all
// contiguous float32; lse (B, H, T) is the per-row log-sum-exp of the scaled, masked
// scores (natural log), which the backward uses to recompute P without storing it.
// D is 32, 64 or 128 (a template parameter: the fragments of Q and O live in registers).
//
// Why the chunks of D: threadgroup memory is 32 KiB. The score tile alone is
// B_r·B_c·4 = 16 KiB for 64x64, so K and V (64·D·4 = 32 KiB each at D = 128) cannot sit
// in threadgroup memory whole. They stream through a small buffer of B_c x DK floats
// (DK = 32 in v1: 8 KiB), one chunk of DK columns of D at a time.

#include <metal_stdlib>
using namespace metal;

// Sizes of one attention call, bound with setBytes as [[buffer(5)]] (camel/flash.py).
struct FlashParams {
    uint T;       // query rows per (batch, head)
    uint S;       // key rows per (batch, head)
    uint causal;  // 1: query t sees keys s <= t (top-left aligned, like PyTorch)
    float scale;  // 1 / sqrt(D)
};

// Copy one chunk of K or V into threadgroup memory: rows c0 .. c0+BC-1 (keys), columns
// d0 .. d0+DK-1 of D, as tile[key][d] (row stride LD: DK, or DK + 4 in v8, whose padded
// rows spread the fragment loads over the banks; LD is a multiple of 4, so each row
// starts on a float4). Keys >= S are zero-filled: the
// scores there are masked anyway, and a zero V row adds nothing (threadgroup memory
// starts as garbage — NaN on the simulator — and 0 * NaN is NaN).
// One thread copies float4s; consecutive threads read consecutive float4s of one row.
// A NaN or inf in the chunk sets *bad (see `exact` in flash_forward).
template <uint BC, uint DK, uint D, uint THREADS, uint LD>
inline void load_kv_chunk(device const float* src, uint S, uint c0, uint d0,
                          threadgroup float* tile, uint t, threadgroup atomic_uint* bad) {
    threadgroup float4* tile4 = (threadgroup float4*)tile;
    bool finite = true;
    for (uint e = t; e < BC * DK / 4; e += THREADS) {
        uint r = e / (DK / 4), c4 = e % (DK / 4);
        uint key = c0 + r;
        float4 val = float4(0.0f);
        if (key < S) val = *((device const float4*)(src + key * D + d0) + c4);
        finite = finite && all(isfinite(val));
        tile4[r * (LD / 4) + c4] = val;
    }
    if (!finite) atomic_store_explicit(bad, 1u, memory_order_relaxed);
}

// v9 splits load_kv_chunk in two, around the multiplies: fetch_kv_chunk issues a thread's
// device reads of a chunk into registers (KvShare: its N float4s, float4 e = t + i THREADS
// of the chunk, the same ones load_kv_chunk copies), stash_kv_chunk writes them to
// threadgroup memory later. Nothing reads the registers in between, so the thread does
// not wait for device memory until the stash. The NaN/inf check is in the stash: checking
// in the fetch would wait for the reads right there.
template <uint N> struct KvShare {
    float4 v[N];
};
// float4s of a B_c x DK chunk a thread stages (v9: 1 at D = 32, 2 at D = 64 and 128)
template <uint BC, uint DK, uint THREADS> constexpr uint kv_share() {
    return (BC * DK / 4 + THREADS - 1) / THREADS;
}

template <uint BC, uint DK, uint D, uint THREADS, uint N>
inline void fetch_kv_chunk(device const float* src, uint S, uint c0, uint d0, uint t,
                           thread KvShare<N>& share) {
    for (uint i = 0; i < N; i++) {
        const uint e = t + i * THREADS;
        const uint r = e / (DK / 4), c4 = e % (DK / 4);
        const uint key = c0 + r;
        share.v[i] = float4(0.0f);
        if (e < BC * DK / 4 && key < S) {
            share.v[i] = *((device const float4*)(src + key * D + d0) + c4);
        }
    }
}

template <uint BC, uint DK, uint THREADS, uint LD, uint N>
inline void stash_kv_chunk(thread const KvShare<N>& share, threadgroup float* tile, uint t,
                           threadgroup atomic_uint* bad) {
    threadgroup float4* tile4 = (threadgroup float4*)tile;
    bool finite = true;
    for (uint i = 0; i < N; i++) {
        const uint e = t + i * THREADS;
        if (e >= BC * DK / 4) break;
        finite = finite && all(isfinite(share.v[i]));
        tile4[(e / (DK / 4)) * (LD / 4) + e % (DK / 4)] = share.v[i];
    }
    if (!finite) atomic_store_explicit(bad, 1u, memory_order_relaxed);
}

// f = diag(scale) · f for one 8x8 fragment of O without the multiply (whose zeros turn a
// NaN or inf of one row into NaN in all 8): the fragment goes through `scratch` (64 floats
// of threadgroup memory); the lane scales element `lane` (row lane / 8) by lo and element
// lane + 32 (row lane / 8 + 4) by hi.
inline void scale_rows_exact(thread simdgroup_float8x8& f, float lo, float hi,
                             threadgroup float* scratch, uint lane) {
    simdgroup_store(f, scratch, 8);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    scratch[lane] *= lo;
    scratch[lane + 32] *= hi;
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_load(f, scratch, 8);
    simdgroup_barrier(mem_flags::mem_threadgroup);
}

// Where a lane's two elements of an 8x8 simdgroup_matrix sit (v7): thread_elements()[i]
// of lane `lane` is element (row, col + i), and the 4 lanes lane ^ m, m in {0, x1, x2,
// x1 ^ x2}, hold the 4 pairs of one row. The Metal Shading Language Specification does not
// say which elements a lane holds; this is the layout of Apple GPUs that MLX's kernels
// (steel/attn) rely on, and the simulator's (docs/simulator.md). The CUDA shim keeps the
// tensor cores' own layout instead (shim/front/include/camel_cuda_simd.h), so it gets its
// own branch; tests/test_flash.py checks both against their headers.
struct FragLane {
    uint row;     // 0..7
    uint col;     // 0, 2, 4 or 6
    uint x1, x2;  // XOR masks from this lane to the other lanes of its row
};
inline FragLane frag_lane(uint lane) {
#ifdef __CAMEL_CUDA__
    // mma.m16n8k8's accumulator: row lane / 4, columns 2 (lane % 4), + 1 (lane bits 4-2
    // are the row, bits 1-0 the column pair)
    return FragLane{lane / 4, 2 * (lane % 4), 1, 2};
#else
    // Apple: lane bits 4, 2, 1 are the row, bits 3 and 0 the column pair
    const uint q = lane / 4;
    return FragLane{(q & 4) + (lane / 2) % 4, (q & 2) * 2 + (lane % 2) * 2, 1, 8};
#endif
}

// ---------------------------------------------------------------------------------------
// flash_forward: one threadgroup computes BR query rows of one (batch, head).
// BR / 8 SIMD groups; SIMD group sg owns query rows row0 .. row0+7 (row0 = q0 + 8 sg):
//   Qf[D/8]  its 8 x D rows of Q as 8x8 fragments (registers, loaded once)
//   Of[D/8]  its 8 x D rows of the output accumulator (registers)
//   Sf[BC/8] its 8 x BC scores of the current key block, then P (registers)
//   s_sg     8 x BC floats of threadgroup memory where the lanes do the softmax (row
//            stride SLD: BC, or BC + 4 in v8)
//   diag     8 x 8 floats: diag(alpha), to rescale Of with one simdgroup multiply
// In the softmax, lane = 4 r + qd works on row r (qd = 0..3 share a row): each lane
// takes BC/4 scores of that row, and the row's max and sum meet with two shuffles.
// v7 (REG_SOFTMAX) has neither s_sg nor diag: each lane works on the 2 elements per
// fragment it already holds (frag_lane), 2 NC scores of its row, and scales its own
// elements of Of; the row's max and sum meet the same way, over frag_lane's masks.
// v9 (PREFETCH) adds, per thread, `next`: its kv_share() float4s of chunk g + 1, read
// from device memory at the top of step g and written to the other buffer at its end.
//
// The work is a stream of chunks: per key block, NCHUNK chunks of K (S = Q·Kᵀ, one DK
// slice of D each), then NCHUNK chunks of V (O += P·V, DK columns of O each), each a
// BC x DK tile at row stride KLD (DK, or DK + 4 in v8). The softmax runs after the last
// K chunk of a block.
// Threadgroup (BR/8 * 32, 1, 1); grid (ceil(T / BR), B * H, 1).
template <uint BR, uint BC, uint DK, uint D, bool SWIZZLE, bool DB_KV, bool INTERLEAVE,
          bool DB_REG, bool FMA, bool REG_SOFTMAX, bool PAD, bool PREFETCH>
kernel void flash_forward(device const float* q [[buffer(0)]],
                          device const float* k [[buffer(1)]],
                          device const float* v [[buffer(2)]],
                          device float* o [[buffer(3)]],
                          device float* lse [[buffer(4)]],
                          constant FlashParams& p [[buffer(5)]],
                          uint2 group [[threadgroup_position_in_grid]],
                          uint t [[thread_index_in_threadgroup]],
                          uint sg [[simdgroup_index_in_threadgroup]],
                          uint lane [[thread_index_in_simdgroup]]) {
    constexpr uint THREADS = BR / 8 * 32;
    constexpr uint ND = D / 8;           // 8-wide fragments along D
    constexpr uint NC = BC / 8;          // 8-wide fragments along a key block
    constexpr uint NCHUNK = D / DK;      // chunks of K (or V) per key block
    constexpr uint NBUF = DB_KV ? 2 : 1;  // v3+: two K/V chunk buffers
    constexpr float LOG2E = 1.4426950408889634f;
    constexpr float LN2 = 0.6931471805599453f;
    // v8: rows padded by 4 floats. 8 rows of SLD = BC + 4 floats start 4 banks apart
    // (if the banks are 32 of 4 bytes, docs/stage5b.md), and so do the rows of a K/V
    // fragment at KLD = DK + 4. diag stays 8 x 8: no stride does better for its load.
    constexpr uint SLD = PAD ? BC + 4 : BC;  // row stride of the score tile
    constexpr uint KLD = PAD ? DK + 4 : DK;  // row stride of a K/V chunk
    // v7 uses neither the score tile nor diag: 4 floats each, as Metal has no empty arrays
    constexpr uint S_FLOATS = REG_SOFTMAX ? 4 : BR * SLD;
    constexpr uint DIAG_FLOATS = REG_SOFTMAX ? 4 : BR * 8;
    threadgroup float4 kv4[NBUF * BC * KLD / 4];  // K or V chunk(s), [key][d]
    threadgroup float s_all[S_FLOATS];            // per SIMD group: 8 x BC scores / P
    threadgroup float diag_all[DIAG_FLOATS];      // per SIMD group: 8 x 8 diag(alpha)
    threadgroup atomic_uint kv_bad;               // 1 once a K/V chunk held a NaN or inf
    threadgroup float* kv = (threadgroup float*)kv4;
    threadgroup float* s_sg = s_all + (REG_SOFTMAX ? 0 : sg * 8 * SLD);
    threadgroup float* diag = diag_all + (REG_SOFTMAX ? 0 : sg * 64);

    const uint T = p.T, S = p.S;
    const uint bh = group.y;
    q += bh * T * D;
    k += bh * S * D;
    v += bh * S * D;
    o += bh * T * D;
    lse += bh * T;
    const uint q0 = group.x * BR;
    const uint row0 = q0 + sg * 8;
    const uint r = lane / 4, qd = lane % 4;  // softmax: this lane's row and quarter
    // v7: this lane's row is where its elements of a fragment sit (frag_lane)
    const uint row = row0 + (REG_SOFTMAX ? frag_lane(lane).row : r);
    const bool row_first = REG_SOFTMAX ? frag_lane(lane).col == 0 : qd == 0;  // one lane per row

    // Q: 8 rows of this SIMD group, BC columns of D at a time through s_sg (rows >= T
    // are zero), into registers. Only this SIMD group touches s_sg: simdgroup barriers.
    // v7: each lane reads its own two elements of every fragment from device memory.
    simdgroup_float8x8 Qf[ND];
    if (REG_SOFTMAX) {
        const uint at = row * D + frag_lane(lane).col;
        for (uint d = 0; d < ND; d++) {
            for (uint e = 0; e < 2; e++) {
                Qf[d].thread_elements()[e] = row < T ? q[at + d * 8 + e] : 0.0f;
            }
        }
    } else {
        for (uint c0 = 0; c0 < D; c0 += BC) {
            const uint w = min(BC, D - c0);
            for (uint e = lane; e < 8 * w; e += 32) {
                uint rr = e / w, cc = e % w;
                s_sg[rr * SLD + cc] = (row0 + rr < T) ? q[(row0 + rr) * D + c0 + cc] : 0.0f;
            }
            simdgroup_barrier(mem_flags::mem_threadgroup);
            for (uint j = 0; j < w / 8; j++) simdgroup_load(Qf[c0 / 8 + j], s_sg + j * 8, SLD);
            simdgroup_barrier(mem_flags::mem_threadgroup);
        }
        for (uint e = lane; e < 64; e += 32) diag[e] = 0.0f;  // only the diagonal changes later
    }
    if (t == 0) atomic_store_explicit(&kv_bad, 0u, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // NaN and inf: O is rescaled by diag(alpha) · O, a multiply in which the 7 zeros of a
    // row of diag(alpha) meet the other rows of O; 0 * NaN and 0 * inf are NaN, so one row
    // holding a NaN or inf (or a NaN or inf alpha) would poison the SIMD group's 8 rows.
    // Likewise P · V multiplies the masked zeros of P with V. Once that can happen
    // (`exact`: a K/V chunk or a row's softmax had a non-finite value), this SIMD group
    // scales O row by row and adds P · V pair by pair, skipping masked pairs, through
    // threadgroup memory (diag serves as the 8x8 scratch: its off-diagonal zeros are
    // only needed by the fast multiply, never used again once `exact` is set).
    // v7 scales each lane's own elements of O, so only P · V needs `exact`: there a lane
    // gathers its row of P from the row's 4 lanes with shuffles (no threadgroup memory).
    bool exact = false;

    simdgroup_float8x8 Of[ND];
    for (uint d = 0; d < ND; d++) Of[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    simdgroup_float8x8 Sf[NC];
    float m = -INFINITY;  // running max of row `row` (scaled units; raw units in v6)
    float l = 0.0f;       // running sum of exp(score - m) of row `row`

    // Causal: keys past the tile's last query row are masked for every row of the tile,
    // so those key blocks are skipped entirely.
    const uint q_last = min(q0 + BR, T) - 1;
    const uint kend = p.causal ? min(S, q_last + 1) : S;
    const uint nblocks = (kend + BC - 1) / BC;
    const uint nsteps = nblocks * 2 * NCHUNK;

    if (DB_KV && nsteps > 0) {  // v3 prologue: chunk 0 (K of block 0, columns 0..DK-1)
        load_kv_chunk<BC, DK, D, THREADS, KLD>(k, S, 0, 0, kv, t, &kv_bad);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    for (uint g = 0; g < nsteps; g++) {
        const uint kb = g / (2 * NCHUNK), i = g % (2 * NCHUNK);
        const bool is_v = i >= NCHUNK;
        const uint ch = i % NCHUNK;
        const uint c0 = kb * BC;
        threadgroup float* buf = kv + (DB_KV ? (g % 2) * BC * KLD : 0);
        KvShare<kv_share<BC, DK, THREADS>()> next;  // v9: chunk g + 1, reads to stash
        if (DB_KV && PREFETCH) {
            // v9: issue the device reads of the next chunk into registers; they are
            // stashed in the other buffer at the end of this step (below)
            if (g + 1 < nsteps) {
                const uint g1 = g + 1, kb1 = g1 / (2 * NCHUNK), i1 = g1 % (2 * NCHUNK);
                fetch_kv_chunk<BC, DK, D, THREADS>(i1 >= NCHUNK ? v : k, S, kb1 * BC,
                                                   (i1 % NCHUNK) * DK, t, next);
            }
        } else if (DB_KV) {
            // v3: copy the next chunk into the other buffer (plain loads and stores: the
            // thread waits for its reads here, before the multiplies below); that buffer
            // was last read in step g - 1, which ended with a barrier.
            if (g + 1 < nsteps) {
                const uint g1 = g + 1, kb1 = g1 / (2 * NCHUNK), i1 = g1 % (2 * NCHUNK);
                load_kv_chunk<BC, DK, D, THREADS, KLD>(i1 >= NCHUNK ? v : k, S, kb1 * BC,
                                                       (i1 % NCHUNK) * DK,
                                                       kv + (g1 % 2) * BC * KLD, t, &kv_bad);
            }
        } else {
            load_kv_chunk<BC, DK, D, THREADS, KLD>(is_v ? v : k, S, c0, ch * DK, buf, t,
                                                   &kv_bad);
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }

        if (!is_v) {
            // S[:, j] += Q[:, chunk] · Kᵀ[chunk, j]: Kᵀ fragments are K's 8x8 blocks
            // loaded with transpose_matrix = true.
            if (ch == 0) {
                for (uint j = 0; j < NC; j++) Sf[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
            }
            const uint qf0 = ch * (DK / 8);
            if (!INTERLEAVE) {
                // v1-v3: j outer, dd inner: DK/8 multiplies in a chain into Sf[j]
                for (uint j = 0; j < NC; j++) {
                    for (uint dd = 0; dd < DK / 8; dd++) {
                        simdgroup_float8x8 kt;
                        simdgroup_load(kt, buf + j * 8 * KLD + dd * 8, KLD, ulong2(0, 0), true);
                        simdgroup_multiply_accumulate(Sf[j], Qf[qf0 + dd], kt, Sf[j]);
                    }
                }
            } else if (!DB_REG) {
                // v4: dd outer, j inner: NC independent multiplies in a row
                for (uint dd = 0; dd < DK / 8; dd++) {
                    for (uint j = 0; j < NC; j++) {
                        simdgroup_float8x8 kt;
                        simdgroup_load(kt, buf + j * 8 * KLD + dd * 8, KLD, ulong2(0, 0), true);
                        simdgroup_multiply_accumulate(Sf[j], Qf[qf0 + dd], kt, Sf[j]);
                    }
                }
            } else {
                // v5: as v4, with the fragment of step n + 1 loaded before multiply n (in the
                // source; the compiler may hoist v4's loads the same way)
                constexpr uint N = (DK / 8) * NC;
                simdgroup_float8x8 cur, nxt;
                simdgroup_load(cur, buf, KLD, ulong2(0, 0), true);
                for (uint n = 0; n < N; n++) {
                    const uint dd = n / NC, j = n % NC;
                    if (n + 1 < N) {
                        const uint dd1 = (n + 1) / NC, j1 = (n + 1) % NC;
                        simdgroup_load(nxt, buf + j1 * 8 * KLD + dd1 * 8, KLD, ulong2(0, 0),
                                       true);
                    }
                    simdgroup_multiply_accumulate(Sf[j], Qf[qf0 + dd], cur, Sf[j]);
                    if (n + 1 < N) cur = nxt;
                }
            }
        } else {
            // O[:, chunk] += P · V[:, chunk]
            const uint of0 = ch * (DK / 8);
            // This chunk was loaded before the last barrier: its flag is visible now.
            const bool v_bad = atomic_load_explicit(&kv_bad, memory_order_relaxed) != 0;
            exact = exact || simd_max(v_bad ? 1u : 0u) != 0;
            if (exact && REG_SOFTMAX) {
                // v7: P times V pair by pair, skipping masked pairs; P[row][c] comes from
                // the lane of the row that holds it (lane ^ mask, element i)
                const FragLane fl = frag_lane(lane);
                for (uint dd = 0; dd < DK / 8; dd++) {
                    float acc[2] = {Of[of0 + dd].thread_elements()[0],
                                    Of[of0 + dd].thread_elements()[1]};
                    for (uint j = 0; j < NC; j++) {
                        for (uint mi = 0; mi < 4; mi++) {
                            const uint mask = (mi & 1 ? fl.x1 : 0) ^ (mi & 2 ? fl.x2 : 0);
                            const uint col_of = frag_lane(lane ^ mask).col;
                            for (uint i = 0; i < 2; i++) {
                                const float pv = simd_shuffle_xor(Sf[j].thread_elements()[i],
                                                                  ushort(mask));
                                const uint c = j * 8 + col_of + i, col = c0 + c;
                                if (col < S && (p.causal == 0 || col <= row)) {
                                    for (uint e = 0; e < 2; e++) {
                                        acc[e] = fma(pv, buf[c * KLD + dd * 8 + fl.col + e], acc[e]);
                                    }
                                }
                            }
                        }
                    }
                    for (uint e = 0; e < 2; e++) Of[of0 + dd].thread_elements()[e] = acc[e];
                }
            } else if (exact && !REG_SOFTMAX) {
                // P (in s_sg since the softmax) times V pair by pair: a masked pair adds
                // nothing, even where V holds a NaN or inf.
                for (uint dd = 0; dd < DK / 8; dd++) {
                    simdgroup_store(Of[of0 + dd], diag, 8);
                    simdgroup_barrier(mem_flags::mem_threadgroup);
                    for (uint e = lane; e < 64; e += 32) {
                        const uint rr = e / 8, qrow = row0 + rr;
                        float acc = diag[e];
                        for (uint c = 0; c < BC; c++) {
                            const uint col = c0 + c;
                            if (col < S && (p.causal == 0 || col <= qrow)) {
                                acc = fma(s_sg[rr * SLD + c], buf[c * KLD + dd * 8 + e % 8],
                                          acc);
                            }
                        }
                        diag[e] = acc;
                    }
                    simdgroup_barrier(mem_flags::mem_threadgroup);
                    simdgroup_load(Of[of0 + dd], diag, 8);
                    simdgroup_barrier(mem_flags::mem_threadgroup);
                }
            } else if (!INTERLEAVE) {
                // v1-v3: dd outer, j inner: NC multiplies in a chain into Of[dd]
                for (uint dd = 0; dd < DK / 8; dd++) {
                    for (uint j = 0; j < NC; j++) {
                        simdgroup_float8x8 vf;
                        simdgroup_load(vf, buf + j * 8 * KLD + dd * 8, KLD);
                        simdgroup_multiply_accumulate(Of[of0 + dd], Sf[j], vf, Of[of0 + dd]);
                    }
                }
            } else if (!DB_REG) {
                // v4: j outer, dd inner: DK/8 independent multiplies in a row
                for (uint j = 0; j < NC; j++) {
                    for (uint dd = 0; dd < DK / 8; dd++) {
                        simdgroup_float8x8 vf;
                        simdgroup_load(vf, buf + j * 8 * KLD + dd * 8, KLD);
                        simdgroup_multiply_accumulate(Of[of0 + dd], Sf[j], vf, Of[of0 + dd]);
                    }
                }
            } else {
                // v5: as v4, with the next V fragment loaded before the current multiply
                constexpr uint N = (DK / 8) * NC;
                simdgroup_float8x8 cur, nxt;
                simdgroup_load(cur, buf, KLD);
                for (uint n = 0; n < N; n++) {
                    const uint j = n / (DK / 8), dd = n % (DK / 8);
                    if (n + 1 < N) {
                        const uint j1 = (n + 1) / (DK / 8), dd1 = (n + 1) % (DK / 8);
                        simdgroup_load(nxt, buf + j1 * 8 * KLD + dd1 * 8, KLD);
                    }
                    simdgroup_multiply_accumulate(Of[of0 + dd], Sf[j], cur, Of[of0 + dd]);
                    if (n + 1 < N) cur = nxt;
                }
            }
        }

        if (i == NCHUNK - 1 && REG_SOFTMAX) {
            // v7: the block's scores are complete; the online softmax runs where they are.
            // Lane (row, col) holds scores (row, 8 j + col + e) of the block, j < NC, e < 2.
            const FragLane fl = frag_lane(lane);
            float mx = -INFINITY;
            for (uint j = 0; j < NC; j++) {
                for (uint e = 0; e < 2; e++) {
                    const uint col = c0 + j * 8 + fl.col + e;
                    const bool visible = col < S && (p.causal == 0 || col <= row);
                    const float s = Sf[j].thread_elements()[e];
                    const float sv = visible ? (FMA ? s : s * p.scale) : -INFINITY;
                    Sf[j].thread_elements()[e] = sv;
                    mx = max(mx, sv);
                }
            }
            mx = max(mx, simd_shuffle_xor(mx, ushort(fl.x1)));  // the 4 lanes of the row agree
            mx = max(mx, simd_shuffle_xor(mx, ushort(fl.x2)));
            const float m_new = max(m, mx);
            const float m_use = (m_new == -INFINITY) ? 0.0f : m_new;  // no visible key yet
            const float c2 = p.scale * LOG2E;
            const float mc = m_use * c2;
            const float alpha = FMA ? exp2(m * c2 - mc) : exp(m - m_use);
            float sum = 0.0f;
            for (uint j = 0; j < NC; j++) {
                for (uint e = 0; e < 2; e++) {
                    const float sv = Sf[j].thread_elements()[e];
                    const float pe = FMA ? exp2(fma(sv, c2, -mc)) : exp(sv - m_use);
                    Sf[j].thread_elements()[e] = pe;  // P, in place of S
                    sum += pe;
                }
            }
            sum += simd_shuffle_xor(sum, ushort(fl.x1));
            sum += simd_shuffle_xor(sum, ushort(fl.x2));
            l = l * alpha + sum;
            m = m_new;
            // O = diag(alpha) · O without a multiply: this lane's elements are in its row
            for (uint d = 0; d < ND; d++) Of[d].thread_elements() *= alpha;
        } else if (i == NCHUNK - 1 && !REG_SOFTMAX) {
            // The block's scores are complete: online softmax on this SIMD group's 8 rows.
            for (uint j = 0; j < NC; j++) simdgroup_store(Sf[j], s_sg + j * 8, SLD);
            simdgroup_barrier(mem_flags::mem_threadgroup);
            float sv[BC / 4];
            float mx = -INFINITY;
            for (uint n = 0; n < BC / 4; n++) {
                // v1: lane (r, qd) reads column 4n + qd: at one n, the 8 rows hit the same
                // 4 banks (row stride BC is a multiple of 32 floats): an 8-way conflict,
                // if Apple's banks are NVIDIA's 32 of 4 bytes (an assumption, stage5b.md).
                // v2: the XOR swizzle 4 (n ^ r) + qd sends the 8 rows to 8 different groups
                // of 4 banks; each row still visits all its columns once.
                // v8: the plain walk at row stride SLD = BC + 4: row r starts 4 r banks on,
                // which does the same (the swizzle on top would undo it: 8-way at B_c 32).
                const uint c = SWIZZLE ? 4 * (n ^ r) + qd : 4 * n + qd;
                const uint col = c0 + c;
                const bool visible = col < S && (p.causal == 0 || col <= row);
                const float s = s_sg[r * SLD + c];
                sv[n] = visible ? (FMA ? s : s * p.scale) : -INFINITY;  // v6: raw units
                mx = max(mx, sv[n]);
            }
            mx = max(mx, simd_shuffle_xor(mx, 1));  // the 4 lanes of the row agree
            mx = max(mx, simd_shuffle_xor(mx, 2));
            const float m_new = max(m, mx);
            const float m_use = (m_new == -INFINITY) ? 0.0f : m_new;  // no visible key yet
            float alpha, sum = 0.0f;
            if (FMA) {
                // v6: p = exp2(s * c - m * c) is one FMA and one exp2 per score
                const float c2 = p.scale * LOG2E;
                const float mc = m_use * c2;
                alpha = exp2(m * c2 - mc);
                for (uint n = 0; n < BC / 4; n++) {
                    const uint c = SWIZZLE ? 4 * (n ^ r) + qd : 4 * n + qd;
                    const float e = exp2(fma(sv[n], c2, -mc));
                    s_sg[r * SLD + c] = e;
                    sum += e;
                }
            } else {
                alpha = exp(m - m_use);
                for (uint n = 0; n < BC / 4; n++) {
                    const uint c = SWIZZLE ? 4 * (n ^ r) + qd : 4 * n + qd;
                    const float e = exp(sv[n] - m_use);
                    s_sg[r * SLD + c] = e;
                    sum += e;
                }
            }
            sum += simd_shuffle_xor(sum, 1);
            sum += simd_shuffle_xor(sum, 2);
            l = l * alpha + sum;
            m = m_new;
            if (qd == 0) diag[r * 8 + r] = alpha;
            // Sticky and the same in all 32 lanes (simd_max), so the branch below is uniform.
            const bool bad_here = !isfinite(sum) || !isfinite(alpha) ||
                                  atomic_load_explicit(&kv_bad, memory_order_relaxed) != 0;
            exact = exact || simd_max(bad_here ? 1u : 0u) != 0;
            simdgroup_barrier(mem_flags::mem_threadgroup);
            // P into registers (in place of S), then O = diag(alpha) · O
            for (uint j = 0; j < NC; j++) simdgroup_load(Sf[j], s_sg + j * 8, SLD);
            simdgroup_barrier(mem_flags::mem_threadgroup);
            if (exact) {
                const float lo = diag[(lane / 8) * 9], hi = diag[(lane / 8 + 4) * 9];
                simdgroup_barrier(mem_flags::mem_threadgroup);
                for (uint d = 0; d < ND; d++) scale_rows_exact(Of[d], lo, hi, diag, lane);
            } else {
                simdgroup_float8x8 dg;
                simdgroup_load(dg, diag, 8);
                for (uint d = 0; d < ND; d++) {
                    simdgroup_float8x8 scaled;
                    simdgroup_multiply(scaled, dg, Of[d]);
                    Of[d] = scaled;
                }
            }
        }
        if (DB_KV && PREFETCH && g + 1 < nsteps) {
            // v9: the next chunk into the other buffer, last read in step g - 1 (before the
            // barrier that ended it); the first wait for the reads issued above
            stash_kv_chunk<BC, DK, THREADS, KLD>(next, kv + ((g + 1) % 2) * BC * KLD, t,
                                                 &kv_bad);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // chunk read (and next written)
    }

    // O /= l, then store. Padding rows (>= T) get 0. A real row always sees a key, so its
    // l is 0 only when every score it sees is -inf: 0 * (1 / 0) = NaN, as PyTorch's softmax
    // of all -inf; a NaN l gives NaN.
    const float inv_l = row < T ? 1.0f / l : 0.0f;
    if (REG_SOFTMAX) {
        // v7: each lane scales and stores its own elements (rows < T), no tile between
        for (uint d = 0; d < ND; d++) Of[d].thread_elements() *= inv_l;
        if (row < T) {
            const uint at = row * D + frag_lane(lane).col;
            for (uint d = 0; d < ND; d++) {
                for (uint e = 0; e < 2; e++) o[at + d * 8 + e] = Of[d].thread_elements()[e];
            }
        }
    } else {
        if (qd == 0) diag[r * 8 + r] = inv_l;
        const bool bad_end = !isfinite(inv_l) ||
                             atomic_load_explicit(&kv_bad, memory_order_relaxed) != 0;
        exact = exact || simd_max(bad_end ? 1u : 0u) != 0;
        simdgroup_barrier(mem_flags::mem_threadgroup);
        if (exact) {
            const float lo = diag[(lane / 8) * 9], hi = diag[(lane / 8 + 4) * 9];
            simdgroup_barrier(mem_flags::mem_threadgroup);
            for (uint d = 0; d < ND; d++) scale_rows_exact(Of[d], lo, hi, diag, lane);
        } else {
            simdgroup_float8x8 dg;
            simdgroup_load(dg, diag, 8);
            for (uint d = 0; d < ND; d++) {
                simdgroup_float8x8 scaled;
                simdgroup_multiply(scaled, dg, Of[d]);
                Of[d] = scaled;
            }
        }
        if (row0 + 8 <= T) {
            for (uint d = 0; d < ND; d++) simdgroup_store(Of[d], o + row0 * D + d * 8, D);
        } else if (row0 < T) {  // edge: through s_sg, only rows < T written
            for (uint d = 0; d < ND; d++) {
                simdgroup_store(Of[d], s_sg, 8);
                simdgroup_barrier(mem_flags::mem_threadgroup);
                for (uint e = lane; e < 64; e += 32) {
                    if (row0 + e / 8 < T) o[(row0 + e / 8) * D + d * 8 + e % 8] = s_sg[e];
                }
                simdgroup_barrier(mem_flags::mem_threadgroup);
            }
        }
    }
    if (row_first && row < T) {
        // log-sum-exp of the scaled scores: m + log(l) (v6 keeps m in raw units)
        lse[row] = FMA ? (m * p.scale * LOG2E + log2(l)) * LN2 : m + log(l);
    }
}

#define FLASH_FORWARD(NAME, BR, BC, DK, D, SW, DBKV, IL, DBR, FMA, REG, PAD, PF)            \
    template [[host_name(NAME)]] kernel void                                               \
    flash_forward<BR, BC, DK, D, SW, DBKV, IL, DBR, FMA, REG, PAD, PF>(                    \
        device const float* q [[buffer(0)]], device const float* k [[buffer(1)]],          \
        device const float* v [[buffer(2)]], device float* o [[buffer(3)]],                \
        device float* lse [[buffer(4)]], constant FlashParams& p [[buffer(5)]],            \
        uint2 group [[threadgroup_position_in_grid]],                                      \
        uint t [[thread_index_in_threadgroup]], uint sg [[simdgroup_index_in_threadgroup]], \
        uint lane [[thread_index_in_simdgroup]]);

// Each rung for D = 32, 64, 128. Threadgroup memory (floats): K/V chunks NBUF*BC*KLD,
// scores BR*SLD, diag BR*8 (KLD = DK and SLD = BC, + 4 each in v8); the table in
// camel/flash.py repeats these numbers.
#define FLASH_RUNG(V, BR, BC, DK32, DK64, DK128, SW, DBKV, IL, DBR, FMA, REG, PAD, PF)        \
    FLASH_FORWARD("flash_v" #V "_" #BR "x" #BC "_d32", BR, BC, DK32, 32, SW, DBKV, IL, DBR, FMA, REG, PAD, PF) \
    FLASH_FORWARD("flash_v" #V "_" #BR "x" #BC "_d64", BR, BC, DK64, 64, SW, DBKV, IL, DBR, FMA, REG, PAD, PF) \
    FLASH_FORWARD("flash_v" #V "_" #BR "x" #BC "_d128", BR, BC, DK128, 128, SW, DBKV, IL, DBR, FMA, REG, PAD, PF)

// v1, v2: 64x64, DK 32: 8 + 16 + 2 = 26 KiB
FLASH_RUNG(1, 64, 64, 32, 32, 32, false, false, false, false, false, false, false, false)
FLASH_RUNG(2, 64, 64, 32, 32, 32, true, false, false, false, false, false, false, false)
// v3-v5: 64x64, two chunk buffers of DK 16: 8 + 16 + 2 = 26 KiB
FLASH_RUNG(3, 64, 64, 16, 16, 16, true, true, false, false, false, false, false, false)
FLASH_RUNG(4, 64, 64, 16, 16, 16, true, true, true, false, false, false, false, false)
FLASH_RUNG(5, 64, 64, 16, 16, 16, true, true, true, true, false, false, false, false)
// v6: the autotuner's tile shapes. 64x32, DK up to 64: 16 + 8 + 2 = 26 KiB;
// 64x64, DK 16: 26 KiB; 128x32, DK 32: 8 + 16 + 4 = 28 KiB.
// 128x64 needs 32 KiB for the scores alone: over the limit, not built.
FLASH_RUNG(6, 64, 32, 32, 64, 64, true, true, true, true, true, false, false, false)
FLASH_RUNG(6, 64, 64, 16, 16, 16, true, true, true, true, true, false, false, false)
FLASH_RUNG(6, 128, 32, 32, 32, 32, true, true, true, true, true, false, false, false)
// v7: v6's 64x32 tile with the softmax in registers: only the two K/V chunk buffers,
// DK 32 / 64 / 64: 8 / 16 / 16 KiB (+ 32 bytes of placeholders for the unused tiles).
FLASH_RUNG(7, 64, 32, 32, 64, 64, true, true, true, true, true, true, false, false)
// v8: v6's 64x32 tile, padded rows instead of the swizzle (SW off, PAD on). Chunks of
// 32 x (DK + 4), two of them: 9 / 17 / 17 KiB; scores 64 x 36: 9 KiB; diag 2 KiB:
// 20 / 28 / 28 KiB for D = 32 / 64 / 128.
FLASH_RUNG(8, 64, 32, 32, 64, 64, false, true, true, true, true, false, true, false)
// v9: v7 with the next K/V chunk staged in registers: v7's threadgroup memory (8 / 16 /
// 16 KiB), and 4 / 8 / 8 floats a thread of registers for the staged chunk.
FLASH_RUNG(9, 64, 32, 32, 64, 64, true, true, true, true, true, true, false, true)

// ---------------------------------------------------------------------------------------
// flash_forward_simt (version 10): the same algorithm with no simdgroup_matrix at all.
// Each lane computes a 4 x TC block of S and a 4 x (D / 8) block of O with scalar FMAs,
// as the GEMM ladder's register-blocked rungs (v5-v9) do; no multiply mixes two rows, so
// there is no `exact` path: NaN and inf follow from the arithmetic, and only a causal
// block's masked pairs are skipped in P·V (masked P is 0, and 0 * NaN is NaN).
//
// One threadgroup computes BR query rows of one (batch, head), BR / 16 SIMD groups; SIMD
// group sg owns rows 16 sg .. 16 sg + 15 of the tile. Lane = 8 ri + ci (ri < 4, ci < 8):
//   S: rows ri + 4 i (i < 4) of the SIMD group's 16, keys ci + 8 j (j < TC = BC / 8)
//   O: the same rows, float4 columns ci + 8 u (u < D / 32) of D
// so a row's scores sit in the 8 lanes of one ri (its max and sum meet over XOR masks
// 1, 2, 4), and a step of the S loop reads 4 float4s of Q and TC of K for 16 TC FMAs.
// Threadgroup memory, float4s of D = 4 floats each:
//   q_tile  Q's BR rows, loaded once; k_tile  K's block, then this block's P (below);
//   v_tile  V's block. Q and K rows are XOR-swizzled (float4 d4 of row r is stored at
//   d4 ^ (r % 8)): the 8 K rows that the 8 lanes of one ri read at one step then start in
//   different banks (if banked like NVIDIA: 32 of 4 bytes, 8 lanes a phase of a float4
//   access; tools/bank_calc.py). Those lanes read one float4 of Q; Q's swizzle is for
//   the paired reads below, where a phase holds two rows ri (row r and r + 1).
//   P goes from the lanes that hold it to the lanes that multiply it with V through
//   k_tile, once every SIMD group is done with K: SIMD group sg's P is 4 x BC float4s,
//   [ri][key], the float4 holding rows ri + 4 i (i < 4) of one key. A lane reads its 4
//   rows of one key as one float4 (the 8 lanes of a phase of a 16-byte access share
//   it), and the 8 lanes of a phase write 8 consecutive float4s.
//
// PAIRED (version 11) changes which lane is which, and P's layout (tools/bank_calc.py,
// its wavefronts column): shared memory returns 128 bytes a cycle, so a 16-byte read of
// 32 lanes at distinct addresses takes 4 cycles (wavefronts); where the lanes read in
// pairs (every lane what lane l ^ 1 reads, or every lane what lane l ^ 2 reads) two
// lanes share each returned word and it takes 2 (NVIDIA's rule; docs/stage5b.md). With
// lane = 8 ri + ci the Q reads pair, but the K and V reads follow ci and do not, and a
// P read's phase holds rows ri and ri + 1 of [ri][key], BC float4s apart: one bank, so
// those take 4 as well. PAIRED takes ri from lane bits 1 and 4 and ci from bits 0, 2 and
// 3 (lanes l, l ^ 1 share ri: Q and P; lanes l, l ^ 2 share ci: K and V; a row's 8 lanes
// meet over XOR masks 1, 4 and 8) and writes P [key][ri], a key's 4 float4s side by side.
// Every read of the two loops then takes 2: 448 wavefronts a SIMD group and key block at
// D = 64 against v10's 768, for 2048 warp FMAs. P's store is 2-way conflicted (a
// quarter-warp holds ri, ri + 1 with ci < 4, keys 4 float4s apart), 4 stores a block.
//
// HEAVY_FIRST (version 12) changes only which threadgroup takes which tile. Causal, tile
// x of a (batch, head) scores (x + 1) · BR keys, and GPUs start threadgroups in the
// order of their index, x fastest (in practice; neither CUDA nor Metal promises an
// order): with the grid (tiles, B · H) the last heads' heaviest tiles start last, and at
// the end of the call most of the GPU waits for them.
// HEAVY_FIRST takes the grid (B · H, tiles): threadgroup (x, y) does head x and tile
// tiles - 1 - y, so the tiles start heaviest first (longest processing time first, whose
// end Graham's bound puts within 4/3 of the best schedule's; FlashAttention's CuTe
// kernels schedule causal tiles the same way). Full attention: every tile is as heavy.
// Threadgroup (BR / 16 · 32, 1, 1); grid (ceil(T / BR), B · H, 1), or (B · H, ceil(T /
// BR), 1) with HEAVY_FIRST. BR · D + max(BC · D, BR · BC) + BC · D floats: at most 32 KiB
// for the instances below.
template <uint BR, uint BC, uint D, bool PAIRED, bool HEAVY_FIRST>
kernel void flash_forward_simt(device const float* q [[buffer(0)]],
                               device const float* k [[buffer(1)]],
                               device const float* v [[buffer(2)]],
                               device float* o [[buffer(3)]],
                               device float* lse [[buffer(4)]],
                               constant FlashParams& p [[buffer(5)]],
                               uint2 group [[threadgroup_position_in_grid]],
                               uint t [[thread_index_in_threadgroup]],
                               uint sg [[simdgroup_index_in_threadgroup]],
                               uint lane [[thread_index_in_simdgroup]]) {
    constexpr uint THREADS = BR / 16 * 32;
    constexpr uint TC = BC / 8;  // keys of a block a lane scores
    constexpr uint D4 = D / 4;   // float4s in a row of Q, K, V or O
    constexpr uint NU = D / 32;  // float4 columns of O a lane owns
    constexpr uint KP4 = BC * D4 > BR * BC / 4 ? BC * D4 : BR * BC / 4;  // K block or P
    constexpr uint Q_SHARE = BR * D4 / THREADS;   // float4s of Q a thread loads (D4 / 2)
    constexpr uint KV_SHARE = BC * D4 / THREADS;  // float4s of a K (or V) block a thread loads
    static_assert(BC * D4 % THREADS == 0, "a K/V block is whole float4s for every thread");
    constexpr float LOG2E = 1.4426950408889634f;
    constexpr float LN2 = 0.6931471805599453f;
    threadgroup float4 q_tile[BR * D4];  // [row][d4 ^ (row % 8)]
    threadgroup float4 k_tile[KP4];      // [key][d4 ^ (key % 8)], then P (see above)
    threadgroup float4 v_tile[BC * D4];  // [key][d4]

    const uint T = p.T, S = p.S;
    const uint bh = HEAVY_FIRST ? group.x : group.y;
    const uint tile = HEAVY_FIRST ? (T + BR - 1) / BR - 1 - group.y : group.x;
    q += bh * T * D;
    k += bh * S * D;
    v += bh * S * D;
    o += bh * T * D;
    lse += bh * T;
    const uint q0 = tile * BR;
    // the lane's row group ri < 4 and key/column group ci < 8, and the XOR masks between
    // the 8 lanes of one ri
    const uint ri = PAIRED ? ((lane >> 1) & 1) | ((lane >> 4) << 1) : lane / 8;
    const uint ci = PAIRED ? (lane & 1) | (((lane >> 2) & 3) << 1) : lane % 8;
    constexpr ushort X2 = PAIRED ? 4 : 2, X3 = PAIRED ? 8 : 4;  // and mask 1
    constexpr uint P_RI = PAIRED ? 1 : BC, P_KEY = PAIRED ? 4 : 1;  // P's float4 strides
    const uint rows0 = sg * 16 + ri;  // this lane's rows in the tile: rows0 + 4 i

    // Q: the tile's rows (rows >= T are zero), consecutive threads along a row; a thread's
    // Q_SHARE float4s, all reads issued before the first store (as K and V below)
    float4 qr[Q_SHARE];
    for (uint n = 0; n < Q_SHARE; n++) {
        const uint e = t + n * THREADS, r = e / D4, d4 = e % D4;
        qr[n] = float4(0.0f);
        if (q0 + r < T) qr[n] = ((device const float4*)(q + (q0 + r) * D))[d4];
    }
    for (uint n = 0; n < Q_SHARE; n++) {
        const uint e = t + n * THREADS, r = e / D4, d4 = e % D4;
        q_tile[r * D4 + (d4 ^ (r % 8))] = qr[n];
    }

    float4 acc[4][NU];  // O: row rows0 + 4 i, float4 column ci + 8 u
    float m[4], l[4];   // running max (raw units, as v6) and sum of each of the 4 rows
    for (uint i = 0; i < 4; i++) {
        for (uint u = 0; u < NU; u++) acc[i][u] = float4(0.0f);
        m[i] = -INFINITY;
        l[i] = 0.0f;
    }
    const float c2 = p.scale * LOG2E;

    // Causal: key blocks past the tile's last query row are skipped entirely.
    const uint q_last = min(q0 + BR, T) - 1;
    const uint kend = p.causal ? min(S, q_last + 1) : S;
    for (uint c0 = 0; c0 < kend; c0 += BC) {
        // K and V of the block (keys >= S are zero: masked in S, and a zero V row adds 0):
        // a thread's KV_SHARE float4s of each, all reads issued before the first store
        float4 kr[KV_SHARE], vr[KV_SHARE];
        for (uint n = 0; n < KV_SHARE; n++) {
            const uint e = t + n * THREADS, c = e / D4, d4 = e % D4;
            kr[n] = float4(0.0f);
            vr[n] = float4(0.0f);
            if (c0 + c < S) {
                kr[n] = ((device const float4*)(k + (c0 + c) * D))[d4];
                vr[n] = ((device const float4*)(v + (c0 + c) * D))[d4];
            }
        }
        for (uint n = 0; n < KV_SHARE; n++) {
            const uint e = t + n * THREADS, c = e / D4, d4 = e % D4;
            k_tile[c * D4 + (d4 ^ (c % 8))] = kr[n];
            v_tile[c * D4 + d4] = vr[n];
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // Q (first block), K and V in

        // S = Q·Kᵀ for the lane's 4 x TC scores: one float4 of D at a time
        float s[4][TC];
        for (uint i = 0; i < 4; i++) {
            for (uint j = 0; j < TC; j++) s[i][j] = 0.0f;
        }
        #pragma clang loop unroll(disable)
        for (uint d4 = 0; d4 < D4; d4++) {
            float4 qf[4], kf[TC];
            for (uint i = 0; i < 4; i++) {
                const uint r = rows0 + 4 * i;
                qf[i] = q_tile[r * D4 + (d4 ^ (r % 8))];
            }
            for (uint j = 0; j < TC; j++) {
                const uint c = ci + 8 * j;
                kf[j] = k_tile[c * D4 + (d4 ^ (c % 8))];
            }
            for (uint i = 0; i < 4; i++) {
                for (uint j = 0; j < TC; j++) {
                    s[i][j] = fma(qf[i].x, kf[j].x, s[i][j]);
                    s[i][j] = fma(qf[i].y, kf[j].y, s[i][j]);
                    s[i][j] = fma(qf[i].z, kf[j].z, s[i][j]);
                    s[i][j] = fma(qf[i].w, kf[j].w, s[i][j]);
                }
            }
        }

        // Online softmax of the lane's 4 rows (v6's FMA-fused exp2, the scale folded in).
        // A block needs the mask where it holds keys >= S or, causal, keys past its first row.
        const bool masked = c0 + BC > S || (p.causal != 0 && c0 + BC - 1 > q0);
        for (uint i = 0; i < 4; i++) {
            const uint row = q0 + rows0 + 4 * i;
            float mx = -INFINITY;
            for (uint j = 0; j < TC; j++) {
                const uint col = c0 + ci + 8 * j;
                const bool visible = !masked || (col < S && (p.causal == 0 || col <= row));
                s[i][j] = visible ? s[i][j] : -INFINITY;
                mx = max(mx, s[i][j]);
            }
            mx = max(mx, simd_shuffle_xor(mx, ushort(1)));  // the row's 8 lanes agree
            mx = max(mx, simd_shuffle_xor(mx, X2));
            mx = max(mx, simd_shuffle_xor(mx, X3));
            const float m_new = max(m[i], mx);
            const float mc = (m_new == -INFINITY ? 0.0f : m_new) * c2;  // no visible key yet
            const float alpha = exp2(m[i] * c2 - mc);
            float sum = 0.0f;
            for (uint j = 0; j < TC; j++) {
                s[i][j] = exp2(fma(s[i][j], c2, -mc));  // P, in place of S
                sum += s[i][j];
            }
            sum += simd_shuffle_xor(sum, ushort(1));
            sum += simd_shuffle_xor(sum, X2);
            sum += simd_shuffle_xor(sum, X3);
            l[i] = l[i] * alpha + sum;
            m[i] = m_new;
            for (uint u = 0; u < NU; u++) acc[i][u] *= alpha;
        }

        // P into k_tile once no SIMD group reads K any more; only this SIMD group reads
        // its part back
        threadgroup_barrier(mem_flags::mem_threadgroup);
        // 16 rows x BC keys: [ri][key] (v10) or [key][ri] (v11)
        threadgroup float4* p_sg = k_tile + sg * 4 * BC;
        for (uint j = 0; j < TC; j++) {
            p_sg[ri * P_RI + (ci + 8 * j) * P_KEY] = float4(s[0][j], s[1][j], s[2][j], s[3][j]);
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);

        // O += P·V: per key, the lane's 4 rows of P (one float4) times its columns of V.
        // Two copies of the loop, so that only the causal blocks on the diagonal pay for
        // the test of each pair.
        if (p.causal != 0 && masked) {
            // a masked pair adds nothing, even where V holds a NaN or inf (0 * NaN is NaN)
            for (uint c = 0; c < BC; c++) {
                const float4 pc = p_sg[ri * P_RI + c * P_KEY];
                const uint col = c0 + c;
                for (uint u = 0; u < NU; u++) {
                    const float4 vv = v_tile[c * D4 + ci + 8 * u];
                    for (uint i = 0; i < 4; i++) {
                        const bool visible = col <= q0 + rows0 + 4 * i;
                        if (visible) acc[i][u] = fma(float4(pc[i]), vv, acc[i][u]);
                    }
                }
            }
        } else {
            for (uint c = 0; c < BC; c++) {
                const float4 pc = p_sg[ri * P_RI + c * P_KEY];
                for (uint u = 0; u < NU; u++) {
                    const float4 vv = v_tile[c * D4 + ci + 8 * u];
                    for (uint i = 0; i < 4; i++) acc[i][u] = fma(float4(pc[i]), vv, acc[i][u]);
                }
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // P and V read: the next block may load
    }

    // O /= l, then store the rows < T (a real row's l is 0 only when every score it sees
    // is -inf: 0 * (1 / 0) = NaN, as PyTorch's softmax of all -inf)
    for (uint i = 0; i < 4; i++) {
        const uint row = q0 + rows0 + 4 * i;
        if (row >= T) continue;
        const float inv_l = 1.0f / l[i];
        device float4* out = (device float4*)(o + row * D);
        for (uint u = 0; u < NU; u++) out[ci + 8 * u] = acc[i][u] * inv_l;
        // log-sum-exp of the scaled scores: m keeps raw units
        if (ci == 0) lse[row] = (m[i] * c2 + log2(l[i])) * LN2;
    }
}

#define FLASH_FORWARD_SIMT(V, BR, BC, D, PAIRED, HEAVY_FIRST)                               \
    template [[host_name("flash_v" #V "_" #BR "x" #BC "_d" #D)]] kernel void                 \
    flash_forward_simt<BR, BC, D, PAIRED, HEAVY_FIRST>(                                     \
        device const float* q [[buffer(0)]], device const float* k [[buffer(1)]],          \
        device const float* v [[buffer(2)]], device float* o [[buffer(3)]],                \
        device float* lse [[buffer(4)]], constant FlashParams& p [[buffer(5)]],            \
        uint2 group [[threadgroup_position_in_grid]],                                      \
        uint t [[thread_index_in_threadgroup]], uint sg [[simdgroup_index_in_threadgroup]], \
        uint lane [[thread_index_in_simdgroup]]);

// v10: 64 query rows (four SIMD groups) and 32 keys a block: Q 16 / 8 KiB, K or P 8 / 8,
// V 8 / 4 at D = 64 / 32 (32 / 20 KiB). flash_v10_32x32 (two SIMD groups): Q 8 / 4, K (or
// P) 8 / 4, V 8 / 4 (24 / 12 KiB). At D = 128 both are 32 rows and 16 keys a block, as 64
// rows of Q alone would fill 32 KiB: Q 16 + K 8 + V 8 = 32 KiB.
FLASH_FORWARD_SIMT(10, 64, 32, 32, false, false)
FLASH_FORWARD_SIMT(10, 64, 32, 64, false, false)
FLASH_FORWARD_SIMT(10, 32, 32, 32, false, false)
FLASH_FORWARD_SIMT(10, 32, 32, 64, false, false)
FLASH_FORWARD_SIMT(10, 32, 16, 128, false, false)
// v11: v10's tiles (64 x 32; 32 x 16 at D = 128) with the lanes paired.
FLASH_FORWARD_SIMT(11, 64, 32, 32, true, false)
FLASH_FORWARD_SIMT(11, 64, 32, 64, true, false)
FLASH_FORWARD_SIMT(11, 32, 16, 128, true, false)
// v12: v11 with the heaviest query tiles first.
FLASH_FORWARD_SIMT(12, 64, 32, 32, true, true)
FLASH_FORWARD_SIMT(12, 64, 32, 64, true, true)
FLASH_FORWARD_SIMT(12, 32, 16, 128, true, true)

// ---------------------------------------------------------------------------------------
// Backward: recomputation from the saved log-sum-exp, one thread per row, no (T, S)
// buffer. With P = exp(scale·q·kᵀ - lse) rebuilt on the fly:
//   delta_t = sum_d dO[t, d] · O[t, d]                              (flash_backward_delta)
//   dP = dO·Vᵀ,  dS = P ∘ (dP - delta),  dQ = scale · dS·K               (flash_backward_dq)
//   dV = Pᵀ·dO,  dK = scale · dSᵀ·Q                                      (flash_backward_dkv)
// flash_backward_dq / _dkv: every thread reads all the rows of the other side from device
// memory itself. flash_backward_dq_tiled / _dkv_tiled (the default): the same arithmetic,
// with those rows shared through threadgroup memory (see docs/stage5b.md).
// Light on device memory (no (T, S) buffer), heavy on registers: scalar code, no
// simdgroup_matrix; the dK/dV kernels keep 4·D floats a thread (kr, vr, dka, dva: 256 at
// D = 64, 512 at D = 128) and the dQ kernels 3·D (qr, dor, acc), more than a thread's
// registers from D = 64 on. ptxas 13.0 for sm_90 on the CUDA translation: 255 registers
// and spills for both kernels at D = 64 and 128 (dK/dV tiled: 680 and 4,204 bytes of
// spill stores), none at D = 32 (docs/stage5b.md, "Backward").

// delta[row] = dO[row, :] · O[row, :]. One thread per row of (B*H*T, D).
kernel void flash_backward_delta(device const float* o [[buffer(0)]],
                                 device const float* dout [[buffer(1)]],
                                 device float* delta [[buffer(2)]],
                                 constant uint& rows [[buffer(3)]],
                                 constant uint& D [[buffer(4)]],
                                 uint row [[thread_position_in_grid]]) {
    if (row >= rows) return;
    float acc = 0.0f;
    for (uint d = 0; d < D; d++) acc = fma(o[row * D + d], dout[row * D + d], acc);
    delta[row] = acc;
}

// dQ for query row t of (batch, head) bh: thread (t, bh). Keys s < S (s <= t if causal).
template <uint D>
kernel void flash_backward_dq(device const float* q [[buffer(0)]],
                              device const float* k [[buffer(1)]],
                              device const float* v [[buffer(2)]],
                              device const float* dout [[buffer(3)]],
                              device const float* lse [[buffer(4)]],
                              device const float* delta [[buffer(5)]],
                              device float* dq [[buffer(6)]],
                              constant FlashParams& p [[buffer(7)]],
                              uint2 gid [[thread_position_in_grid]]) {
    const uint t = gid.x, bh = gid.y;
    if (t >= p.T) return;
    q += (bh * p.T + t) * D;
    dout += (bh * p.T + t) * D;
    k += bh * p.S * D;
    v += bh * p.S * D;
    float qr[D], dor[D], acc[D];
    for (uint d = 0; d < D; d++) {
        qr[d] = q[d];
        dor[d] = dout[d];
        acc[d] = 0.0f;
    }
    const float L = lse[bh * p.T + t], dl = delta[bh * p.T + t];
    const uint send = p.causal ? min(p.S, t + 1) : p.S;
    for (uint s = 0; s < send; s++) {
        float qk = 0.0f, dp = 0.0f;
        for (uint d = 0; d < D; d++) {
            qk = fma(qr[d], k[s * D + d], qk);
            dp = fma(dor[d], v[s * D + d], dp);
        }
        const float ds = exp(qk * p.scale - L) * (dp - dl);
        for (uint d = 0; d < D; d++) acc[d] = fma(ds, k[s * D + d], acc[d]);
    }
    dq += (bh * p.T + t) * D;
    for (uint d = 0; d < D; d++) dq[d] = acc[d] * p.scale;
}

// dK and dV for key row s of (batch, head) bh: thread (s, bh). Queries t < T (t >= s if
// causal).
template <uint D>
kernel void flash_backward_dkv(device const float* q [[buffer(0)]],
                               device const float* k [[buffer(1)]],
                               device const float* v [[buffer(2)]],
                               device const float* dout [[buffer(3)]],
                               device const float* lse [[buffer(4)]],
                               device const float* delta [[buffer(5)]],
                               device float* dk [[buffer(6)]],
                               device float* dv [[buffer(7)]],
                               constant FlashParams& p [[buffer(8)]],
                               uint2 gid [[thread_position_in_grid]]) {
    const uint s = gid.x, bh = gid.y;
    if (s >= p.S) return;
    k += (bh * p.S + s) * D;
    v += (bh * p.S + s) * D;
    q += bh * p.T * D;
    dout += bh * p.T * D;
    lse += bh * p.T;
    delta += bh * p.T;
    float kr[D], vr[D], dka[D], dva[D];
    for (uint d = 0; d < D; d++) {
        kr[d] = k[d];
        vr[d] = v[d];
        dka[d] = 0.0f;
        dva[d] = 0.0f;
    }
    for (uint t = p.causal ? s : 0; t < p.T; t++) {
        float qk = 0.0f, dp = 0.0f;
        for (uint d = 0; d < D; d++) {
            qk = fma(q[t * D + d], kr[d], qk);
            dp = fma(dout[t * D + d], vr[d], dp);
        }
        const float pr = exp(qk * p.scale - lse[t]);
        const float ds = pr * (dp - delta[t]);
        for (uint d = 0; d < D; d++) {
            dva[d] = fma(pr, dout[t * D + d], dva[d]);
            dka[d] = fma(ds, q[t * D + d], dka[d]);
        }
    }
    dk += (bh * p.S + s) * D;
    dv += (bh * p.S + s) * D;
    for (uint d = 0; d < D; d++) {
        dk[d] = dka[d] * p.scale;
        dv[d] = dva[d];
    }
}

// The same two kernels, blockwise: a threadgroup of 64 threads owns 64 rows (one per
// thread, as above), and the rows of the other side pass through threadgroup memory R = 16
// at a time, read from device memory once per threadgroup instead of once per thread
// (64x less device traffic). Threads past the end still copy and meet at the barriers.
#define BW_ROWS 64u  // rows per threadgroup (one per thread)
#define BW_R 16u     // rows of the other side staged per step

template <uint D>
kernel void flash_backward_dq_tiled(device const float* q [[buffer(0)]],
                                    device const float* k [[buffer(1)]],
                                    device const float* v [[buffer(2)]],
                                    device const float* dout [[buffer(3)]],
                                    device const float* lse [[buffer(4)]],
                                    device const float* delta [[buffer(5)]],
                                    device float* dq [[buffer(6)]],
                                    constant FlashParams& p [[buffer(7)]],
                                    uint2 group [[threadgroup_position_in_grid]],
                                    uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float ks[BW_R * D], vs[BW_R * D];  // R rows of K and V
    const uint bh = group.y, t = group.x * BW_ROWS + tid;
    const bool live = t < p.T;
    k += bh * p.S * D;
    v += bh * p.S * D;
    float qr[D], dor[D], acc[D];
    for (uint d = 0; d < D; d++) {
        qr[d] = live ? q[(bh * p.T + t) * D + d] : 0.0f;
        dor[d] = live ? dout[(bh * p.T + t) * D + d] : 0.0f;
        acc[d] = 0.0f;
    }
    const float L = live ? lse[bh * p.T + t] : 0.0f;
    const float dl = live ? delta[bh * p.T + t] : 0.0f;
    const uint last = min(group.x * BW_ROWS + BW_ROWS, p.T) - 1;  // last query of the group
    const uint send = p.causal ? min(p.S, last + 1) : p.S;       // later keys: all masked
    for (uint s0 = 0; s0 < send; s0 += BW_R) {
        for (uint e = tid; e < BW_R * D; e += BW_ROWS) {
            const uint key = s0 + e / D;
            ks[e] = key < p.S ? k[key * D + e % D] : 0.0f;
            vs[e] = key < p.S ? v[key * D + e % D] : 0.0f;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint r = 0; r < BW_R; r++) {
            const uint s = s0 + r;
            if (!live || s >= send || (p.causal && s > t)) continue;
            float qk = 0.0f, dp = 0.0f;
            for (uint d = 0; d < D; d++) {
                qk = fma(qr[d], ks[r * D + d], qk);
                dp = fma(dor[d], vs[r * D + d], dp);
            }
            const float ds = exp(qk * p.scale - L) * (dp - dl);
            for (uint d = 0; d < D; d++) acc[d] = fma(ds, ks[r * D + d], acc[d]);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // rows read before the next copy
    }
    if (live) {
        for (uint d = 0; d < D; d++) dq[(bh * p.T + t) * D + d] = acc[d] * p.scale;
    }
}

template <uint D>
kernel void flash_backward_dkv_tiled(device const float* q [[buffer(0)]],
                                     device const float* k [[buffer(1)]],
                                     device const float* v [[buffer(2)]],
                                     device const float* dout [[buffer(3)]],
                                     device const float* lse [[buffer(4)]],
                                     device const float* delta [[buffer(5)]],
                                     device float* dk [[buffer(6)]],
                                     device float* dv [[buffer(7)]],
                                     constant FlashParams& p [[buffer(8)]],
                                     uint2 group [[threadgroup_position_in_grid]],
                                     uint tid [[thread_index_in_threadgroup]]) {
    threadgroup float qs[BW_R * D], dos[BW_R * D];  // R rows of Q and dO
    threadgroup float ls[BW_R], dls[BW_R];          // their lse and delta
    const uint bh = group.y, s = group.x * BW_ROWS + tid;
    const bool live = s < p.S;
    q += bh * p.T * D;
    dout += bh * p.T * D;
    lse += bh * p.T;
    delta += bh * p.T;
    float kr[D], vr[D], dka[D], dva[D];
    for (uint d = 0; d < D; d++) {
        kr[d] = live ? k[(bh * p.S + s) * D + d] : 0.0f;
        vr[d] = live ? v[(bh * p.S + s) * D + d] : 0.0f;
        dka[d] = 0.0f;
        dva[d] = 0.0f;
    }
    // causal: queries before the group's first key see none of its keys
    const uint t_first = p.causal ? min(group.x * BW_ROWS, p.T) : 0;
    for (uint t0 = t_first; t0 < p.T; t0 += BW_R) {
        for (uint e = tid; e < BW_R * D; e += BW_ROWS) {
            const uint row = t0 + e / D;
            qs[e] = row < p.T ? q[row * D + e % D] : 0.0f;
            dos[e] = row < p.T ? dout[row * D + e % D] : 0.0f;
        }
        if (tid < BW_R) {
            ls[tid] = t0 + tid < p.T ? lse[t0 + tid] : 0.0f;
            dls[tid] = t0 + tid < p.T ? delta[t0 + tid] : 0.0f;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint r = 0; r < BW_R; r++) {
            const uint t = t0 + r;
            if (!live || t >= p.T || (p.causal && t < s)) continue;
            float qk = 0.0f, dp = 0.0f;
            for (uint d = 0; d < D; d++) {
                qk = fma(qs[r * D + d], kr[d], qk);
                dp = fma(dos[r * D + d], vr[d], dp);
            }
            const float pr = exp(qk * p.scale - ls[r]);
            const float ds = pr * (dp - dls[r]);
            for (uint d = 0; d < D; d++) {
                dva[d] = fma(pr, dos[r * D + d], dva[d]);
                dka[d] = fma(ds, qs[r * D + d], dka[d]);
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (live) {
        for (uint d = 0; d < D; d++) {
            dk[(bh * p.S + s) * D + d] = dka[d] * p.scale;
            dv[(bh * p.S + s) * D + d] = dva[d];
        }
    }
}

#define FLASH_BACKWARD(D)                                                                   \
    template [[host_name("flash_backward_dq_d" #D)]] kernel void flash_backward_dq<D>(      \
        device const float* q [[buffer(0)]], device const float* k [[buffer(1)]],          \
        device const float* v [[buffer(2)]], device const float* dout [[buffer(3)]],       \
        device const float* lse [[buffer(4)]], device const float* delta [[buffer(5)]],    \
        device float* dq [[buffer(6)]], constant FlashParams& p [[buffer(7)]],             \
        uint2 gid [[thread_position_in_grid]]);                                            \
    template [[host_name("flash_backward_dkv_d" #D)]] kernel void flash_backward_dkv<D>(    \
        device const float* q [[buffer(0)]], device const float* k [[buffer(1)]],          \
        device const float* v [[buffer(2)]], device const float* dout [[buffer(3)]],       \
        device const float* lse [[buffer(4)]], device const float* delta [[buffer(5)]],    \
        device float* dk [[buffer(6)]], device float* dv [[buffer(7)]],                    \
        constant FlashParams& p [[buffer(8)]], uint2 gid [[thread_position_in_grid]]);

#define FLASH_BACKWARD_TILED(D)                                                             \
    template [[host_name("flash_backward_dq_tiled_d" #D)]] kernel void                     \
    flash_backward_dq_tiled<D>(                                                            \
        device const float* q [[buffer(0)]], device const float* k [[buffer(1)]],          \
        device const float* v [[buffer(2)]], device const float* dout [[buffer(3)]],       \
        device const float* lse [[buffer(4)]], device const float* delta [[buffer(5)]],    \
        device float* dq [[buffer(6)]], constant FlashParams& p [[buffer(7)]],             \
        uint2 group [[threadgroup_position_in_grid]],                                      \
        uint tid [[thread_index_in_threadgroup]]);                                         \
    template [[host_name("flash_backward_dkv_tiled_d" #D)]] kernel void                    \
    flash_backward_dkv_tiled<D>(                                                           \
        device const float* q [[buffer(0)]], device const float* k [[buffer(1)]],          \
        device const float* v [[buffer(2)]], device const float* dout [[buffer(3)]],       \
        device const float* lse [[buffer(4)]], device const float* delta [[buffer(5)]],    \
        device float* dk [[buffer(6)]], device float* dv [[buffer(7)]],                    \
        constant FlashParams& p [[buffer(8)]], uint2 group [[threadgroup_position_in_grid]], \
        uint tid [[thread_index_in_threadgroup]]);

FLASH_BACKWARD(32)
FLASH_BACKWARD(64)
FLASH_BACKWARD(128)
FLASH_BACKWARD_TILED(32)
FLASH_BACKWARD_TILED(64)
FLASH_BACKWARD_TILED(128)
