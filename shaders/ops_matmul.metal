// ops_matmul.metal — the GEMM ladder: C = op(A) · op(B) in float32, one rung at a time.
//
// Every rung computes the same thing; each one changes ONE idea so you can time it:
//   version 1 is naive: one thread per output element, grid x walks rows (uncoalesced)
//   version 2 is coalesced: the same, but consecutive threads take consecutive columns
//   version 3 caches 32x32 tiles of A and B in threadgroup memory (1024 threads)
//   version 4 is 1-D blocktiling: each thread computes 8 outputs of one column (64x64x8 tiles)
//   version 5 is 2-D blocktiling: each thread computes an 8x8 block (128x128x8 tiles, 256 threads)
//   version 6 adds float4 global loads and stores A transposed in threadgroup memory,
//             so a thread reads its A and B fragments with float4 threadgroup loads
//   versions 7-9 are version 6 with other tile sizes: template instantiations named
//             matmul_v7_64x64x8_4x4, matmul_v8_128x128x16_8x8, matmul_v9_128x64x16_8x4
//             (BMxBNxBK threadgroup tile _ TMxTN outputs per thread)
//             (more instantiations, matmul_tile_*, are tuning variants for the autotuner)
//   version 10 tiles over SIMD groups with simdgroup_matrix (8x8 matrix operations that
//             run on the ordinary FP32 ALUs, per public measurements; the gain is fewer
//             registers and threadgroup loads per FMA): 64x64x16 tiles, 4 SIMD groups of 32x32
//   version 11 is version 10 with two tile buffers: the next K tile goes to the other
//             buffer, one barrier per K step; each thread still waits for its own device
//             loads before it multiplies (no asynchronous copy), and 2x the tile memory
//   version 12 is version 11 with the next K tile staged in registers: its device loads are
//             issued before the multiplies and written to threadgroup memory after them,
//             so the multiplies do not wait for device memory
//   version 13 is version 9 with the same register-staged prefetch (two padded tile buffers,
//             one barrier per K step): matmul_v13_prefetch_128x64x16_8x4 (more
//             instantiations, matmul_pftile_*, are its tuning variants)
//   version 14 is version 9 with a K step's device reads issued together (one buffer)
//   version 15 is warp tiling: each SIMD group owns a 64 x 32 part of a 128 x 128 x 16 tile,
//             each thread 8 x 8 outputs as 2 x 2 spaced 4 x 4 blocks, both tiles k-major
//             with swizzled float4 slots (conflict-free without padding), v13's loop:
//             matmul_v15_warptile_128x128x16_64x32 (tuning variants: matmul_wtile_*)
//
// Run and benchmark them:
//   python -m camel.bench matmul --list          # one version per line
//   python -m camel.bench matmul                 # validate against NumPy, then time
//   CAMEL_MATMUL=5 python examples/mlp.py        # every matmul uses rung 5
// The host side (grid, threadgroup size, threadgroup memory of each rung) is the table
// in camel/gemm.py; the lesson is docs/stage3.md.
//
// Operands and layouts (every rung):
//   op(A) is (M, K): A is stored row-major (M, K) with row stride lda, or, when trans_a,
//                    stored (K, M) and read transposed (dW = X^T · dY needs this)
//   op(B) is (K, N): B is stored (K, N) with row stride ldb, or, when trans_b, stored (N, K)
//                    (dX = dY · W^T needs this)
//   C is (M, N) row-major with row stride ldc.
//   Batches: threadgroup_position_in_grid.z (or thread_position_in_grid.z) is the batch
//   index z = outer * batch_inner + inner; each operand moves by its own element strides
//   per outer/inner batch, and a stride of 0 broadcasts a 2-D operand over the batch.
// No rung needs a separate transpose pass: the transposes are folded into the loads.

#include <metal_stdlib>
using namespace metal;

// Sizes, strides and flags of one matmul, bound with setBytes as [[buffer(3)]].
// camel/gemm.py packs it as 17 uint32 values in this order.
struct MatmulParams {
    uint M, N, K;
    uint lda, ldb, ldc;          // elements between consecutive stored rows
    uint trans_a, trans_b;       // 1: the operand is stored transposed (see above)
    uint batch_inner;            // size of the inner batch dimension (1 if none)
    uint a_stride0, a_stride1;   // elements between batches of A (outer, inner); 0 broadcasts
    uint b_stride0, b_stride1;
    uint c_stride0, c_stride1;
    uint vec4;                   // 1: float4 loads/stores are 16-byte aligned for A, B and C
    uint triangle;               // 0, or the causal attention product (tile_k_range below)
};

// Element offset of the matrix of batch z for an operand with batch strides s0 (outer)
// and s1 (inner); a stride of 0 broadcasts the operand over that batch dimension.
inline uint batch_offset(constant MatmulParams& p, uint z, uint s0, uint s1) {
    return (z / p.batch_inner) * s0 + (z % p.batch_inner) * s1;
}

// The causal attention products (softmax(q k^T) v with query t seeing keys s <= t, and
// its backward) need only a triangle of the work. `triangle` says which, per batch matrix,
// the diagonal being i == j (i == k for op(A)):
//   0  everything (every other matmul)
//   1  only C(i, j) with j <= i is wanted (scores q k^T, dP = dO v^T): a tile wholly above
//      the diagonal (first column n0 > last row m0 + BM - 1) is neither computed nor
//      written; what C holds there is unspecified
//   2  op(A)(i, k) = 0 for k > i (the causal softmax's output P or dS): the K loop stops
//      after the tile's last row (k < m0 + BM), the zeros beyond are never read
//   3  op(A)(i, k) = 0 for k < i (P^T or dS^T): the K loop starts at the tile's first row
// For the BM-row tile at (m0, n0): [k_begin, k_end) of the K loop, and whether the tile is
// wanted at all; a tile to skip gets an empty K range and stores nothing. (No early return:
// the kernel passes its barriers as always, none of them inside a K step, so the
// simulator's barrier-region schedule still applies; a skipped tile costs a GPU next to
// nothing.) Honoured by versions 6-9, 11 and 15 (and their tuning variants); the other rungs
// compute everything (camel/gemm.py passes them 0), which gives the same wanted part
// because the promised zeros are zeros.
inline bool tile_k_range(constant MatmulParams& p, uint m0, uint n0, uint bm,
                         thread uint& k_begin, thread uint& k_end) {
    bool wanted = !(p.triangle == 1 && n0 >= m0 + bm);
    k_begin = p.triangle == 3 ? min(m0, p.K) : 0;
    k_end = !wanted ? k_begin : p.triangle == 2 ? min(m0 + bm, p.K) : p.K;
    return wanted;
}

// The row tile threadgroup row y computes: y, or for triangle 2 the rows in reverse, so the
// tiles with the longest K loops (the last rows) are dispatched first and the short ones
// fill the tail (GPUs tend to start threadgroups in grid order; P v has few of them).
inline uint tile_row(constant MatmulParams& p, uint y, uint bm) {
    return p.triangle == 2 ? (p.M + bm - 1) / bm - 1 - y : y;
}

// op(A)(i, k) and op(B)(k, j), whatever the storage.
inline float load_a(device const float* A, constant MatmulParams& p, uint i, uint k) {
    return p.trans_a ? A[k * p.lda + i] : A[i * p.lda + k];
}
inline float load_b(device const float* B, constant MatmulParams& p, uint k, uint j) {
    return p.trans_b ? B[j * p.ldb + k] : B[k * p.ldb + j];
}

// ---------------------------------------------------------------------------------------
// Version 1: naive. One thread computes C(i, j) with i = thread_position_in_grid.x.
// Threads next to each other in a SIMD group have consecutive i, so their loads of A and
// their stores to C are lda / ldc floats apart: each one touches its own cache line.
// Threadgroup (32, 8, 1); grid of threadgroups (ceil(M/32), ceil(N/8), batches).
kernel void matmul_v1_naive(device const float* A [[buffer(0)]],
                            device const float* B [[buffer(1)]],
                            device float* C [[buffer(2)]],
                            constant MatmulParams& p [[buffer(3)]],
                            uint3 gid [[thread_position_in_grid]]) {
    uint i = gid.x;  // row of C
    uint j = gid.y;  // column of C
    if (i >= p.M || j >= p.N) return;
    A += batch_offset(p, gid.z, p.a_stride0, p.a_stride1);
    B += batch_offset(p, gid.z, p.b_stride0, p.b_stride1);
    C += batch_offset(p, gid.z, p.c_stride0, p.c_stride1);
    float acc = 0.0f;
    for (uint k = 0; k < p.K; k++) {
        acc += load_a(A, p, i, k) * load_b(B, p, k, j);
    }
    C[i * p.ldc + j] = acc;
}

// ---------------------------------------------------------------------------------------
// Version 2: coalesced. Same work per thread, but j = thread_position_in_grid.x: the 32
// threads of a SIMD group read 32 consecutive floats of a row of B and write 32
// consecutive floats of C, while all of them read the same A(i, k) (one broadcast load).
// Threadgroup (32, 8, 1); grid of threadgroups (ceil(N/32), ceil(M/8), batches).
kernel void matmul_v2_coalesced(device const float* A [[buffer(0)]],
                                device const float* B [[buffer(1)]],
                                device float* C [[buffer(2)]],
                                constant MatmulParams& p [[buffer(3)]],
                                uint3 gid [[thread_position_in_grid]]) {
    uint j = gid.x;  // column of C
    uint i = gid.y;  // row of C
    if (i >= p.M || j >= p.N) return;
    A += batch_offset(p, gid.z, p.a_stride0, p.a_stride1);
    B += batch_offset(p, gid.z, p.b_stride0, p.b_stride1);
    C += batch_offset(p, gid.z, p.c_stride0, p.c_stride1);
    float acc = 0.0f;
    for (uint k = 0; k < p.K; k++) {
        acc += load_a(A, p, i, k) * load_b(B, p, k, j);
    }
    C[i * p.ldc + j] = acc;
}

// ---------------------------------------------------------------------------------------
// Tile loader shared by versions 3-5 (scalar loads).
// Copies the R x S tile of a matrix X starting at (r0, s0) into threadgroup memory:
//   dst[r * dr + s * ds] = X(r0 + r, s0 + s), and 0 outside rows x cols,
// where X(r, s) = X[r * rs + s * ss]. Thread t of T copies elements t, t + T, ...
// in the order that walks memory with unit stride, so neighbouring threads read
// neighbouring addresses whichever way X is stored (coalesced).
template <uint R, uint S, uint T>
inline void load_tile(device const float* X, uint rs, uint ss, uint r0, uint s0,
                      uint rows, uint cols, threadgroup float* dst, uint dr, uint ds, uint t) {
    for (uint e = t; e < R * S; e += T) {
        uint r, s;
        if (ss == 1) {  // X is contiguous along s: consecutive e -> consecutive s
            r = e / S;
            s = e % S;
        } else {        // X is contiguous along r
            s = e / R;
            r = e % R;
        }
        uint gr = r0 + r, gs = s0 + s;
        dst[r * dr + s * ds] = (gr < rows && gs < cols) ? X[gr * rs + gs * ss] : 0.0f;
    }
}

// The strides of op(A) (M, K) and op(B) (K, N) as X(r, s) = X[r * rs + s * ss].
inline uint a_rs(constant MatmulParams& p) { return p.trans_a ? 1 : p.lda; }
inline uint a_ss(constant MatmulParams& p) { return p.trans_a ? p.lda : 1; }
inline uint b_rs(constant MatmulParams& p) { return p.trans_b ? 1 : p.ldb; }
inline uint b_ss(constant MatmulParams& p) { return p.trans_b ? p.ldb : 1; }

// ---------------------------------------------------------------------------------------
// Version 3: threadgroup-memory tiling. A threadgroup of 32 x 32 threads computes a
// 32 x 32 tile of C; thread (tx, ty) computes C(m0 + ty, n0 + tx). For each K step the
// group copies a 32 x 32 tile of op(A) and of op(B) into threadgroup memory once, and
// every thread then reads 32 values of each from there instead of from device memory:
// each loaded float is used 32 times.
// As is (BM, BK) = As[m][k], Bs is (BK, BN) = Bs[k][n].
// Threadgroup (32, 32, 1) = 1024 threads; grid (ceil(N/32), ceil(M/32), batches); 8 KiB.
kernel void matmul_v3_tiled(device const float* A [[buffer(0)]],
                            device const float* B [[buffer(1)]],
                            device float* C [[buffer(2)]],
                            constant MatmulParams& p [[buffer(3)]],
                            uint3 group [[threadgroup_position_in_grid]],
                            uint3 tid [[thread_position_in_threadgroup]],
                            uint t [[thread_index_in_threadgroup]]) {
    constexpr uint TILE = 32;
    threadgroup float As[TILE * TILE];
    threadgroup float Bs[TILE * TILE];
    A += batch_offset(p, group.z, p.a_stride0, p.a_stride1);
    B += batch_offset(p, group.z, p.b_stride0, p.b_stride1);
    C += batch_offset(p, group.z, p.c_stride0, p.c_stride1);
    uint m0 = group.y * TILE, n0 = group.x * TILE;
    uint row = tid.y, col = tid.x;
    float acc = 0.0f;
    for (uint k0 = 0; k0 < p.K; k0 += TILE) {
        load_tile<TILE, TILE, TILE * TILE>(A, a_rs(p), a_ss(p), m0, k0, p.M, p.K, As, TILE, 1, t);
        load_tile<TILE, TILE, TILE * TILE>(B, b_rs(p), b_ss(p), k0, n0, p.K, p.N, Bs, TILE, 1, t);
        threadgroup_barrier(mem_flags::mem_threadgroup);  // tiles complete before use
        for (uint k = 0; k < TILE; k++) {
            acc += As[row * TILE + k] * Bs[k * TILE + col];
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // everyone done before overwrite
    }
    if (m0 + row < p.M && n0 + col < p.N) {
        C[(m0 + row) * p.ldc + n0 + col] = acc;
    }
}

// ---------------------------------------------------------------------------------------
// Version 4: 1-D blocktiling. A threadgroup of 512 threads computes a 64 x 64 tile of C;
// each thread computes TM = 8 outputs of one column: C(m0 + r*8 + 0..7, n0 + c) with
// c = t % 64, r = t / 64. Per K step it reads one Bs value into a register and reuses it
// for 8 multiply-adds, so there are fewer threadgroup-memory loads per FMA.
// As is (BM, BK) = As[m][k], Bs is (BK, BN) = Bs[k][n].
// Threadgroup (512, 1, 1); grid (ceil(N/64), ceil(M/64), batches); 4 KiB.
kernel void matmul_v4_blocktile1d(device const float* A [[buffer(0)]],
                                  device const float* B [[buffer(1)]],
                                  device float* C [[buffer(2)]],
                                  constant MatmulParams& p [[buffer(3)]],
                                  uint3 group [[threadgroup_position_in_grid]],
                                  uint t [[thread_index_in_threadgroup]]) {
    constexpr uint BM = 64, BN = 64, BK = 8, TM = 8;
    constexpr uint THREADS = BM * BN / TM;  // 512
    threadgroup float As[BM * BK];
    threadgroup float Bs[BK * BN];
    A += batch_offset(p, group.z, p.a_stride0, p.a_stride1);
    B += batch_offset(p, group.z, p.b_stride0, p.b_stride1);
    C += batch_offset(p, group.z, p.c_stride0, p.c_stride1);
    uint m0 = group.y * BM, n0 = group.x * BN;
    uint c = t % BN, r = t / BN;
    float acc[TM];
    for (uint i = 0; i < TM; i++) acc[i] = 0.0f;
    for (uint k0 = 0; k0 < p.K; k0 += BK) {
        load_tile<BM, BK, THREADS>(A, a_rs(p), a_ss(p), m0, k0, p.M, p.K, As, BK, 1, t);
        load_tile<BK, BN, THREADS>(B, b_rs(p), b_ss(p), k0, n0, p.K, p.N, Bs, BN, 1, t);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint k = 0; k < BK; k++) {
            float b = Bs[k * BN + c];  // one register, reused TM times
            for (uint i = 0; i < TM; i++) {
                acc[i] += As[(r * TM + i) * BK + k] * b;
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    for (uint i = 0; i < TM; i++) {
        uint m = m0 + r * TM + i, n = n0 + c;
        if (m < p.M && n < p.N) C[m * p.ldc + n] = acc[i];
    }
}

// ---------------------------------------------------------------------------------------
// Version 5: 2-D blocktiling. A threadgroup of 256 threads computes a 128 x 128 tile of C;
// each thread computes an 8 x 8 block: rows m0 + tr*8 + 0..7, columns n0 + tc*8 + 0..7
// with tc = t % 16, tr = t / 16. Per K step it loads 8 values of As and 8 of Bs into
// registers and does their 64 multiply-adds (an outer product): 16 loads for 64 FMAs.
// As is (BM, BK) = As[m][k], Bs is (BK, BN) = Bs[k][n]; scalar loads everywhere.
// Threadgroup (256, 1, 1); grid (ceil(N/128), ceil(M/128), batches); 8 KiB.
kernel void matmul_v5_blocktile2d(device const float* A [[buffer(0)]],
                                  device const float* B [[buffer(1)]],
                                  device float* C [[buffer(2)]],
                                  constant MatmulParams& p [[buffer(3)]],
                                  uint3 group [[threadgroup_position_in_grid]],
                                  uint t [[thread_index_in_threadgroup]]) {
    constexpr uint BM = 128, BN = 128, BK = 8, TM = 8, TN = 8;
    constexpr uint THREADS = (BM / TM) * (BN / TN);  // 256
    threadgroup float As[BM * BK];
    threadgroup float Bs[BK * BN];
    A += batch_offset(p, group.z, p.a_stride0, p.a_stride1);
    B += batch_offset(p, group.z, p.b_stride0, p.b_stride1);
    C += batch_offset(p, group.z, p.c_stride0, p.c_stride1);
    uint m0 = group.y * BM, n0 = group.x * BN;
    uint tc = t % (BN / TN), tr = t / (BN / TN);
    float acc[TM * TN];
    for (uint i = 0; i < TM * TN; i++) acc[i] = 0.0f;
    float reg_m[TM], reg_n[TN];
    for (uint k0 = 0; k0 < p.K; k0 += BK) {
        load_tile<BM, BK, THREADS>(A, a_rs(p), a_ss(p), m0, k0, p.M, p.K, As, BK, 1, t);
        load_tile<BK, BN, THREADS>(B, b_rs(p), b_ss(p), k0, n0, p.K, p.N, Bs, BN, 1, t);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint k = 0; k < BK; k++) {
            for (uint i = 0; i < TM; i++) reg_m[i] = As[(tr * TM + i) * BK + k];
            for (uint j = 0; j < TN; j++) reg_n[j] = Bs[k * BN + tc * TN + j];
            for (uint i = 0; i < TM; i++) {
                for (uint j = 0; j < TN; j++) acc[i * TN + j] += reg_m[i] * reg_n[j];
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    for (uint i = 0; i < TM; i++) {
        uint m = m0 + tr * TM + i;
        for (uint j = 0; j < TN; j++) {
            uint n = n0 + tc * TN + j;
            if (m < p.M && n < p.N) C[m * p.ldc + n] = acc[i * TN + j];
        }
    }
}

// X[gr][gs .. gs + 3] of X (rows x cols, row stride ld) as a float4, zeros outside X: one
// float4 read when vec4 (16-byte aligned) and all four are inside, else one float each.
inline float4 read_float4(device const float* X, uint ld, uint gr, uint gs, uint rows,
                          uint cols, bool vec4) {
    float4 v = float4(0.0f);
    if (vec4 && gr < rows && gs + 3 < cols) {
        v = *((device const float4*)(X + gr * ld + gs));
    } else if (gr < rows) {
        for (uint q = 0; q < 4; q++) {
            if (gs + q < cols) v[q] = X[gr * ld + gs + q];
        }
    }
    return v;
}

// ---------------------------------------------------------------------------------------
// float4 tile loader shared by versions 6-11.
// Copies the R x S tile of X at (r0, s0), where X is contiguous along s
// (X(r, s) = X[r * ld + s]), into dst[r * dr + s * ds], 0 outside rows x cols.
// Thread t of T reads 4 consecutive floats at a time with one float4 load when `vec4`
// says the address is 16-byte aligned and all 4 are inside the matrix; at an edge it
// falls back to scalar loads. With dr = 1 the tile lands transposed in threadgroup memory.
template <uint R, uint S, uint T>
inline void load_tile_vec4(device const float* X, uint ld, uint r0, uint s0, uint rows,
                           uint cols, bool vec4, threadgroup float* dst, uint dr, uint ds,
                           uint t) {
    for (uint e = t; e < R * S / 4; e += T) {
        uint r = e / (S / 4);
        uint s = (e % (S / 4)) * 4;
        uint gr = r0 + r, gs = s0 + s;
        float4 v = read_float4(X, ld, gr, gs, rows, cols, vec4);
        threadgroup float* d = dst + r * dr + s * ds;
        d[0] = v.x;
        d[ds] = v.y;
        d[2 * ds] = v.z;
        d[3 * ds] = v.w;
    }
}

// Load the (BM, BK) tile of op(A) at (m0, k0) as As[k][m] (A transposed in threadgroup
// memory) and the (BK, BN) tile of op(B) at (k0, n0) as Bs[k][n], with float4 reads along
// whichever dimension is contiguous in device memory.
template <uint BM, uint BN, uint BK, uint T>
inline void load_tiles_km(device const float* A, device const float* B,
                          constant MatmulParams& p, uint m0, uint n0, uint k0,
                          threadgroup float* As, threadgroup float* Bs, uint t) {
    bool v = p.vec4 != 0;
    if (p.trans_a) {  // A stored (K, M): rows are k, contiguous along m
        load_tile_vec4<BK, BM, T>(A, p.lda, k0, m0, p.K, p.M, v, As, BM, 1, t);
    } else {          // A stored (M, K): rows are m, contiguous along k -> transpose
        load_tile_vec4<BM, BK, T>(A, p.lda, m0, k0, p.M, p.K, v, As, 1, BM, t);
    }
    if (p.trans_b) {  // B stored (N, K): rows are n, contiguous along k -> transpose
        load_tile_vec4<BN, BK, T>(B, p.ldb, n0, k0, p.N, p.K, v, Bs, 1, BN, t);
    } else {          // B stored (K, N)
        load_tile_vec4<BK, BN, T>(B, p.ldb, k0, n0, p.K, p.N, v, Bs, BN, 1, t);
    }
}

// A thread's TM x TN block of C at (m, n), acc row-major: float4 stores when the row
// segment is inside and aligned, else one float each (versions 6-9 and 13).
template <uint TM, uint TN>
inline void store_thread_block(thread const float* acc, device float* C,
                               constant MatmulParams& p, uint m, uint n) {
    for (uint i = 0; i < TM && m + i < p.M; i++) {
        for (uint j = 0; j < TN; j += 4) {
            float4 v = float4(acc[i * TN + j], acc[i * TN + j + 1], acc[i * TN + j + 2],
                              acc[i * TN + j + 3]);
            device float* c = C + (m + i) * p.ldc + n + j;
            if (p.vec4 && n + j + 3 < p.N) {
                *((device float4*)c) = v;
            } else {
                for (uint q = 0; q < 4; q++) {
                    if (n + j + q < p.N) c[q] = v[q];
                }
            }
        }
    }
}

// One K step of a thread's TM x TN block: for each k of the tile, TM values of As[k][m]
// and TN of Bs[k][n] in float4 reads from threadgroup memory (rows LDA and LDB floats
// apart), then TM x TN FMAs into acc (row-major). Versions 6-9, 13 and 14.
template <uint BK, uint TM, uint TN, uint LDA, uint LDB>
inline void thread_block_fma(threadgroup const float4* As4, threadgroup const float4* Bs4,
                             uint tr, uint tc, thread float* acc) {
    float4 reg_m[TM / 4], reg_n[TN / 4];
    for (uint k = 0; k < BK; k++) {
        for (uint i = 0; i < TM / 4; i++) reg_m[i] = As4[(k * LDA + tr * TM) / 4 + i];
        for (uint j = 0; j < TN / 4; j++) reg_n[j] = Bs4[(k * LDB + tc * TN) / 4 + j];
        for (uint i = 0; i < TM; i++) {
            float a = reg_m[i / 4][i % 4];
            for (uint j = 0; j < TN; j++) acc[i * TN + j] += a * reg_n[j / 4][j % 4];
        }
    }
}

// ---------------------------------------------------------------------------------------
// Versions 6-9: 2-D blocktiling with float4 loads, as a template over the tile sizes.
// A threadgroup of (BM/TM) * (BN/TN) threads computes a BM x BN tile of C; thread t
// computes the TM x TN block at rows m0 + tr*TM, columns n0 + tc*TN (tc = t % (BN/TN),
// tr = t / (BN/TN)). As is stored transposed, As[k][m], so the TM values a thread needs
// for one k are contiguous and come in TM/4 float4 loads from threadgroup memory, like
// its TN values of Bs[k][n]. Threadgroup memory: (BM + BN) * BK * 4 bytes.
// Causal attention products: the K loop runs over tile_k_range's part, and a tile wholly
// above the diagonal stores nothing (p.triangle; 0 for every other matmul).
// Grid (ceil(N/BN), ceil(M/BM), batches).
template <uint BM, uint BN, uint BK, uint TM, uint TN>
kernel void matmul_blocktile_vec4(device const float* A [[buffer(0)]],
                                  device const float* B [[buffer(1)]],
                                  device float* C [[buffer(2)]],
                                  constant MatmulParams& p [[buffer(3)]],
                                  uint3 group [[threadgroup_position_in_grid]],
                                  uint t [[thread_index_in_threadgroup]]) {
    constexpr uint THREADS = (BM / TM) * (BN / TN);
    // float4 arrays so that float4 reads from them are 16-byte aligned
    threadgroup float4 As4[BM * BK / 4];
    threadgroup float4 Bs4[BK * BN / 4];
    threadgroup float* As = (threadgroup float*)As4;  // As[k * BM + m]
    threadgroup float* Bs = (threadgroup float*)Bs4;  // Bs[k * BN + n]
    A += batch_offset(p, group.z, p.a_stride0, p.a_stride1);
    B += batch_offset(p, group.z, p.b_stride0, p.b_stride1);
    C += batch_offset(p, group.z, p.c_stride0, p.c_stride1);
    uint m0 = tile_row(p, group.y, BM) * BM, n0 = group.x * BN;
    uint k_begin, k_end;
    bool wanted = tile_k_range(p, m0, n0, BM, k_begin, k_end);  // false: above the diagonal
    uint tc = t % (BN / TN), tr = t / (BN / TN);
    float acc[TM * TN];
    for (uint i = 0; i < TM * TN; i++) acc[i] = 0.0f;
    for (uint k0 = k_begin; k0 < k_end; k0 += BK) {
        load_tiles_km<BM, BN, BK, THREADS>(A, B, p, m0, n0, k0, As, Bs, t);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        thread_block_fma<BK, TM, TN, BM, BN>(As4, Bs4, tr, tc, acc);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (wanted) store_thread_block<TM, TN>(acc, C, p, m0 + tr * TM, n0 + tc * TN);
}

#define MATMUL_BLOCKTILE(NAME, BM, BN, BK, TM, TN)                                         \
    template [[host_name(NAME)]] kernel void matmul_blocktile_vec4<BM, BN, BK, TM, TN>(   \
        device const float* A [[buffer(0)]], device const float* B [[buffer(1)]],         \
        device float* C [[buffer(2)]], constant MatmulParams& p [[buffer(3)]],            \
        uint3 group [[threadgroup_position_in_grid]], uint t [[thread_index_in_threadgroup]]);

// Version 6: 128x128x8 tiles, 8x8 per thread, 256 threads, 8 KiB.
MATMUL_BLOCKTILE("matmul_v6_vec4", 128, 128, 8, 8, 8)
// Versions 7-9: the same kernel, other tile sizes (see the table in camel/gemm.py).
MATMUL_BLOCKTILE("matmul_v7_64x64x8_4x4", 64, 64, 8, 4, 4)        // 256 threads, 4 KiB
MATMUL_BLOCKTILE("matmul_v8_128x128x16_8x8", 128, 128, 16, 8, 8)  // 256 threads, 16 KiB
MATMUL_BLOCKTILE("matmul_v9_128x64x16_8x4", 128, 64, 16, 8, 4)    // 256 threads, 12 KiB

// Tuning variants: more points of the same template for the autotuner's grid search
// (camel/autotune.py); not rungs of the ladder. CAMEL_MATMUL=64x64x16_4x4 forces one.
MATMUL_BLOCKTILE("matmul_tile_32x32x8_4x4", 32, 32, 8, 4, 4)        // 64 threads, 2 KiB
MATMUL_BLOCKTILE("matmul_tile_64x64x8_8x8", 64, 64, 8, 8, 8)        // 64 threads, 4 KiB
MATMUL_BLOCKTILE("matmul_tile_64x64x16_4x4", 64, 64, 16, 4, 4)      // 256 threads, 8 KiB
MATMUL_BLOCKTILE("matmul_tile_64x128x16_8x8", 64, 128, 16, 8, 8)    // 128 threads, 12 KiB
MATMUL_BLOCKTILE("matmul_tile_128x128x8_8x4", 128, 128, 8, 8, 4)    // 512 threads, 8 KiB
MATMUL_BLOCKTILE("matmul_tile_128x128x32_8x8", 128, 128, 32, 8, 8)  // 256 threads, 32 KiB

// ---------------------------------------------------------------------------------------
// Versions 10-11: SIMD-group tiling on simdgroup_matrix.
// A threadgroup of 4 SIMD groups (128 threads) computes a 64 x 64 tile of C. SIMD group
// sg = 0..3 owns the 32 x 32 quarter at rows m0 + (sg / 2) * 32, columns n0 + (sg % 2) * 32
// as 4 x 4 accumulators of type simdgroup_float8x8: the 32 threads of the SIMD group hold
// one 8x8 matrix together (2 floats each) and multiply 8x8 matrices with one operation
// (on Apple GPUs it runs on the FP32 ALUs; metal-benchmarks measures 101.7 matrix FMAs
// per core-cycle against 128 scalar on M1: the gain is in registers and loads, not FLOPs).
// A K step copies a (64, 16) tile of op(A) and a (16, 64) tile of op(B) into threadgroup
// memory; for each 8 of its 16 columns a SIMD group loads 4 fragments of op(A) and 4 of
// op(B) and does 16 simdgroup_multiply_accumulate (16 x 512 FMAs).
// As is (BM, BK) = As[m][k], Bs is (BK, BN) = Bs[k][n]; both zero-filled at edges, rows
// padded (SG_LDA, SG_LDB) against bank conflicts.
#define SG_BM 64u
#define SG_BN 64u
#define SG_BK 16u
#define SG_THREADS 128u
// Row strides of the threadgroup tiles, padded by 4 floats. Under the bank model that
// docs/stage3.md states as an assumption for Apple GPUs (32 banks of 4 bytes, bank = word
// address % 32, as on NVIDIA; Apple does not document its banks, MLX pads by 16 bytes as
// if it had them): with 16 floats per row the 8 rows an 8x8 simdgroup_load reads start in
// only 2 of the 32 banks (with 64, in 1) and conflict; with 20 (or 68) in 8 different ones.
// (MLX's FP32 GEMM pads its 64 x 16 and 16 x 64 tiles to exactly these strides.)
#define SG_LDA (SG_BK + 4u)  // As[m][k] at As[m * SG_LDA + k]
#define SG_LDB (SG_BN + 4u)  // Bs[k][n] at Bs[k * SG_LDB + n]

// Copy the (64, 16) tile of op(A) at (m0, k0) into As[m][k] and the (16, 64) tile of op(B)
// at (k0, n0) into Bs[k][n] (padded rows), with float4 reads along the contiguous dimension.
inline void load_tiles_sg(device const float* A, device const float* B,
                          constant MatmulParams& p, uint m0, uint n0, uint k0,
                          threadgroup float* As, threadgroup float* Bs, uint t) {
    bool v = p.vec4 != 0;
    if (p.trans_a) {  // A stored (K, M): contiguous along m -> As[m][k] is a transpose
        load_tile_vec4<SG_BK, SG_BM, SG_THREADS>(A, p.lda, k0, m0, p.K, p.M, v, As, 1, SG_LDA, t);
    } else {
        load_tile_vec4<SG_BM, SG_BK, SG_THREADS>(A, p.lda, m0, k0, p.M, p.K, v, As, SG_LDA, 1, t);
    }
    if (p.trans_b) {  // B stored (N, K): contiguous along k -> Bs[k][n] is a transpose
        load_tile_vec4<SG_BN, SG_BK, SG_THREADS>(B, p.ldb, n0, k0, p.N, p.K, v, Bs, 1, SG_LDB, t);
    } else {
        load_tile_vec4<SG_BK, SG_BN, SG_THREADS>(B, p.ldb, k0, n0, p.K, p.N, v, Bs, SG_LDB, 1, t);
    }
}

// The accumulators of one SIMD group: its (8 FM) x (8 FN) part of C.
template <uint FM, uint FN> struct SgAccs {
    simdgroup_float8x8 m[FM][FN];
};

// acc[i][j] += op(A) fragment i · op(B) fragment j over the BK columns of one tile
// (As[m][k] and Bs[k][n] with row strides LDA and LDB).
template <uint FM, uint FN, uint BK, uint LDA, uint LDB>
inline void mma_tiles(threadgroup const float* As, threadgroup const float* Bs, uint wm,
                      uint wn, thread SgAccs<FM, FN>& acc) {
    for (uint kk = 0; kk < BK; kk += 8) {
        simdgroup_float8x8 a[FM], b[FN];
        for (uint i = 0; i < FM; i++) simdgroup_load(a[i], As + (wm + i * 8) * LDA + kk, LDA);
        for (uint j = 0; j < FN; j++) simdgroup_load(b[j], Bs + kk * LDB + wn + j * 8, LDB);
        for (uint i = 0; i < FM; i++) {
            for (uint j = 0; j < FN; j++) {
                simdgroup_multiply_accumulate(acc.m[i][j], a[i], b[j], acc.m[i][j]);
            }
        }
    }
}

// Store the accumulators of one SIMD group at C(m, n), m = m0 + wm + i*8,
// n = n0 + wn + j*8: straight to device memory when the 8x8 block is inside C,
// otherwise through a 64-float scratch in threadgroup memory with per-element checks.
template <uint FM, uint FN>
inline void store_accs(thread SgAccs<FM, FN>& acc, device float* C, constant MatmulParams& p,
                       uint m0, uint n0, uint wm, uint wn, threadgroup float* scratch, uint lane) {
    for (uint i = 0; i < FM; i++) {
        for (uint j = 0; j < FN; j++) {
            uint m = m0 + wm + i * 8, n = n0 + wn + j * 8;
            if (m >= p.M || n >= p.N) continue;  // the same for all 32 lanes
            if (m + 8 <= p.M && n + 8 <= p.N) {
                simdgroup_store(acc.m[i][j], C + m * p.ldc + n, p.ldc);
            } else {
                simdgroup_store(acc.m[i][j], scratch, 8);
                simdgroup_barrier(mem_flags::mem_threadgroup);
                for (uint e = lane; e < 64; e += 32) {
                    uint r = e / 8, c = e % 8;
                    if (m + r < p.M && n + c < p.N) C[(m + r) * p.ldc + n + c] = scratch[e];
                }
                simdgroup_barrier(mem_flags::mem_threadgroup);  // reads done before reuse
            }
        }
    }
}

// Version 10: simdgroup_matrix tiling, one threadgroup buffer (two barriers per K step).
// Threadgroup (128, 1, 1); grid (ceil(N/64), ceil(M/64), batches); 9.25 KiB + 1 KiB scratch.
kernel void matmul_v10_simdgroup(device const float* A [[buffer(0)]],
                                 device const float* B [[buffer(1)]],
                                 device float* C [[buffer(2)]],
                                 constant MatmulParams& p [[buffer(3)]],
                                 uint3 group [[threadgroup_position_in_grid]],
                                 uint t [[thread_index_in_threadgroup]],
                                 uint sg [[simdgroup_index_in_threadgroup]],
                                 uint lane [[thread_index_in_simdgroup]]) {
    threadgroup float As[SG_BM * SG_LDA];
    threadgroup float Bs[SG_BK * SG_LDB];
    threadgroup float scratch[4 * 64];
    A += batch_offset(p, group.z, p.a_stride0, p.a_stride1);
    B += batch_offset(p, group.z, p.b_stride0, p.b_stride1);
    C += batch_offset(p, group.z, p.c_stride0, p.c_stride1);
    uint m0 = group.y * SG_BM, n0 = group.x * SG_BN;
    uint wm = (sg / 2) * 32, wn = (sg % 2) * 32;  // this SIMD group's quarter of the tile
    SgAccs<4, 4> acc;  // its 32 x 32 part of C
    for (uint i = 0; i < 4; i++) {
        for (uint j = 0; j < 4; j++) acc.m[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    for (uint k0 = 0; k0 < p.K; k0 += SG_BK) {
        load_tiles_sg(A, B, p, m0, n0, k0, As, Bs, t);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        mma_tiles<4, 4, SG_BK, SG_LDA, SG_LDB>(As, Bs, wm, wn, acc);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    store_accs(acc, C, p, m0, n0, wm, wn, scratch + sg * 64, lane);
}

// Version 11: version 10 with two copies of the As/Bs tiles: while the SIMD groups
// multiply the tile in buffer (k step) % 2, the next K tile is copied into the other
// buffer, and one barrier per K step suffices (the buffer being written was last read
// before the previous barrier). The copy is plain loads and stores, no asynchronous copy:
// each thread waits for its device loads before its multiplies, so only other SIMD groups
// and threadgroups can hide that latency, and the second buffer costs occupancy (v12
// stages the next tile in registers instead). Causal attention products: as versions 6-9,
// the K steps cover tile_k_range's part, and a tile above the diagonal stores nothing.
// Threadgroup (128, 1, 1); grid (ceil(N/64), ceil(M/64), batches); 18.5 KiB + 1 KiB scratch.
kernel void matmul_v11_double_buffer(device const float* A [[buffer(0)]],
                                     device const float* B [[buffer(1)]],
                                     device float* C [[buffer(2)]],
                                     constant MatmulParams& p [[buffer(3)]],
                                     uint3 group [[threadgroup_position_in_grid]],
                                     uint t [[thread_index_in_threadgroup]],
                                     uint sg [[simdgroup_index_in_threadgroup]],
                                     uint lane [[thread_index_in_simdgroup]]) {
    threadgroup float As[2 * SG_BM * SG_LDA];  // buffer s at As + s * SG_BM * SG_LDA
    threadgroup float Bs[2 * SG_BK * SG_LDB];
    threadgroup float scratch[4 * 64];
    A += batch_offset(p, group.z, p.a_stride0, p.a_stride1);
    B += batch_offset(p, group.z, p.b_stride0, p.b_stride1);
    C += batch_offset(p, group.z, p.c_stride0, p.c_stride1);
    uint m0 = tile_row(p, group.y, SG_BM) * SG_BM, n0 = group.x * SG_BN;
    uint k_begin, k_end;
    bool wanted = tile_k_range(p, m0, n0, SG_BM, k_begin, k_end);  // false: above the diagonal
    uint wm = (sg / 2) * 32, wn = (sg % 2) * 32;
    SgAccs<4, 4> acc;  // its 32 x 32 part of C
    for (uint i = 0; i < 4; i++) {
        for (uint j = 0; j < 4; j++) acc.m[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    uint steps = (k_end - k_begin + SG_BK - 1) / SG_BK;
    if (steps > 0) load_tiles_sg(A, B, p, m0, n0, k_begin, As, Bs, t);  // prologue: tile 0
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint s = 0; s < steps; s++) {
        uint cur = s % 2, nxt = 1 - cur;
        if (s + 1 < steps) {  // prefetch the next tile into the other buffer
            load_tiles_sg(A, B, p, m0, n0, k_begin + (s + 1) * SG_BK,
                          As + nxt * SG_BM * SG_LDA, Bs + nxt * SG_BK * SG_LDB, t);
        }
        mma_tiles<4, 4, SG_BK, SG_LDA, SG_LDB>(As + cur * SG_BM * SG_LDA, Bs + cur * SG_BK * SG_LDB,
                                               wm, wn, acc);
        threadgroup_barrier(mem_flags::mem_threadgroup);  // next tile written, this one read
    }
    if (wanted) store_accs(acc, C, p, m0, n0, wm, wn, scratch + sg * 64, lane);
}

// Version 12: version 11 with register-staged prefetch. In v11 a thread loads the next tile
// from device memory and writes it to threadgroup memory in one statement, so it waits for
// device memory before it can start its multiplies. Here the load is split: fetch_tile
// issues the device reads into registers before the multiplies and stash_tile writes them
// to the other buffer after them; the multiplies run while the reads are in flight. Same
// buffers and barrier as v11 (one per K step).
// A template over the tile shape, as v6-v9: a threadgroup computes a BM x BN tile of C
// with BK = 16; each SIMD group owns an (8 FM) x (8 FN) part of it as FM x FN accumulators.
// v12 is <64, 64, 4, 4> (v11's shape: 4 SIMD groups of 32 x 32); more instantiations
// (matmul_sgtile_*) are tuning variants. Threadgroup (32 x SIMD groups, 1, 1); grid
// (ceil(N/BN), ceil(M/BM), batches); v12: 128 threads, 18.5 KiB + 1 KiB scratch
// (2 (BM (BK + 4) + BK (BN + 4)) floats + 64 a SIMD group).

// One thread's share of a tile being staged: float4 e of an (R, S) tile stored row-major
// with S contiguous is element (e / (S/4), 4 (e % (S/4))); thread t holds e = t, t + T, ...
template <uint N> struct TileShare {
    float4 v[N];
};
template <uint R, uint S, uint T> constexpr uint share_size() { return (R * S / 4 + T - 1) / T; }

// The device reads of a (R, S) tile at (r0, s0) of X (rows x cols, row stride ld) into
// registers, zeros outside X.
template <uint R, uint S, uint T>
inline void fetch_tile(device const float* X, uint ld, uint r0, uint s0, uint rows, uint cols,
                       bool vec4, uint t, thread TileShare<share_size<R, S, T>()>& share) {
    for (uint i = 0; i < share_size<R, S, T>(); i++) {
        uint e = t + i * T;
        uint gr = r0 + e / (S / 4), gs = s0 + (e % (S / 4)) * 4;
        share.v[i] = e < R * S / 4 ? read_float4(X, ld, gr, gs, rows, cols, vec4) : float4(0.0f);
    }
}

// Write a fetched (R, S) tile to threadgroup memory: element (r, s) at dst[r * dr + s * ds].
template <uint R, uint S, uint T>
inline void stash_tile(thread const TileShare<share_size<R, S, T>()>& share,
                       threadgroup float* dst, uint dr, uint ds, uint t) {
    for (uint i = 0; i < share_size<R, S, T>(); i++) {
        uint e = t + i * T;
        if (e >= R * S / 4) break;
        threadgroup float* d = dst + (e / (S / 4)) * dr + (e % (S / 4)) * 4 * ds;
        float4 v = share.v[i];
        d[0] = v.x;
        d[ds] = v.y;
        d[2 * ds] = v.z;
        d[3 * ds] = v.w;
    }
}

// The A (BM x BK) and B (BK x BN) tiles at K offset k0, fetched in whichever orientation
// they are stored (the same number of floats either way).
template <uint BM, uint BN, uint BK, uint T>
inline void fetch_tiles(device const float* A, device const float* B, constant MatmulParams& p,
                        uint m0, uint n0, uint k0, uint t,
                        thread TileShare<share_size<BM, BK, T>()>& a,
                        thread TileShare<share_size<BK, BN, T>()>& b) {
    bool v = p.vec4 != 0;
    if (p.trans_a) fetch_tile<BK, BM, T>(A, p.lda, k0, m0, p.K, p.M, v, t, a);
    else fetch_tile<BM, BK, T>(A, p.lda, m0, k0, p.M, p.K, v, t, a);
    if (p.trans_b) fetch_tile<BN, BK, T>(B, p.ldb, n0, k0, p.N, p.K, v, t, b);
    else fetch_tile<BK, BN, T>(B, p.ldb, k0, n0, p.K, p.N, v, t, b);
}

// ... written to threadgroup memory: element (m, k) of op(A) at As[m * AM + k * AK] and
// (k, n) of op(B) at Bs[k * BKS + n * BNS], whichever way each was fetched. v12 stores
// As[m][k] and Bs[k][n] (AM = LDA, AK = 1; BKS = LDB, BNS = 1), v13 As[k][m] (AM = 1,
// AK = LDA).
template <uint BM, uint BN, uint BK, uint T, uint AM, uint AK, uint BKS, uint BNS>
inline void stash_tiles(thread const TileShare<share_size<BM, BK, T>()>& a,
                        thread const TileShare<share_size<BK, BN, T>()>& b,
                        constant MatmulParams& p, threadgroup float* As, threadgroup float* Bs,
                        uint t) {
    if (p.trans_a) stash_tile<BK, BM, T>(a, As, AK, AM, t);  // A stored (K, M)
    else stash_tile<BM, BK, T>(a, As, AM, AK, t);
    if (p.trans_b) stash_tile<BN, BK, T>(b, Bs, BNS, BKS, t);  // B stored (N, K)
    else stash_tile<BK, BN, T>(b, Bs, BKS, BNS, t);
}

template <uint BM, uint BN, uint FM, uint FN>
kernel void matmul_sg_prefetch(device const float* A [[buffer(0)]],
                               device const float* B [[buffer(1)]],
                               device float* C [[buffer(2)]],
                               constant MatmulParams& p [[buffer(3)]],
                               uint3 group [[threadgroup_position_in_grid]],
                               uint t [[thread_index_in_threadgroup]],
                               uint sg [[simdgroup_index_in_threadgroup]],
                               uint lane [[thread_index_in_simdgroup]]) {
    constexpr uint BK = 16;
    constexpr uint LDA = BK + 4, LDB = BN + 4;  // padded as v10's (bank conflicts)
    constexpr uint SGN = BN / (8 * FN);         // SIMD groups along N
    constexpr uint T = 32 * (BM / (8 * FM)) * SGN;
    threadgroup float As[2 * BM * LDA];  // buffer s at As + s * BM * LDA
    threadgroup float Bs[2 * BK * LDB];
    threadgroup float scratch[T / 32 * 64];
    A += batch_offset(p, group.z, p.a_stride0, p.a_stride1);
    B += batch_offset(p, group.z, p.b_stride0, p.b_stride1);
    C += batch_offset(p, group.z, p.c_stride0, p.c_stride1);
    const uint m0 = group.y * BM, n0 = group.x * BN;
    const uint wm = (sg / SGN) * 8 * FM, wn = (sg % SGN) * 8 * FN;  // this SIMD group's part
    SgAccs<FM, FN> acc;
    for (uint i = 0; i < FM; i++) {
        for (uint j = 0; j < FN; j++) acc.m[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    const uint steps = (p.K + BK - 1) / BK;
    TileShare<share_size<BM, BK, T>()> a;  // the next tiles, in flight
    TileShare<share_size<BK, BN, T>()> b;
    if (steps > 0) {  // prologue: tile 0 into buffer 0
        fetch_tiles<BM, BN, BK, T>(A, B, p, m0, n0, 0, t, a, b);
        stash_tiles<BM, BN, BK, T, LDA, 1, LDB, 1>(a, b, p, As, Bs, t);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint s = 0; s < steps; s++) {
        const uint cur = s % 2, nxt = 1 - cur;
        const bool more = s + 1 < steps;
        if (more) fetch_tiles<BM, BN, BK, T>(A, B, p, m0, n0, (s + 1) * BK, t, a, b);
        mma_tiles<FM, FN, BK, LDA, LDB>(As + cur * BM * LDA, Bs + cur * BK * LDB, wm, wn, acc);
        // the other buffer was last read before the previous barrier: free to overwrite
        if (more) {
            stash_tiles<BM, BN, BK, T, LDA, 1, LDB, 1>(a, b, p, As + nxt * BM * LDA,
                                                       Bs + nxt * BK * LDB, t);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // next tile written, this one read
    }
    store_accs(acc, C, p, m0, n0, wm, wn, scratch + sg * 64, lane);
}

#define MATMUL_SG_PREFETCH(NAME, BM, BN, FM, FN)                                         \
    template [[host_name(NAME)]] kernel void matmul_sg_prefetch<BM, BN, FM, FN>(          \
        device const float* A [[buffer(0)]], device const float* B [[buffer(1)]],       \
        device float* C [[buffer(2)]], constant MatmulParams& p [[buffer(3)]],          \
        uint3 group [[threadgroup_position_in_grid]], uint t [[thread_index_in_threadgroup]], \
        uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]);

// Version 12: v11's shape, 64 x 64 tiles, 4 SIMD groups of 32 x 32.
MATMUL_SG_PREFETCH("matmul_v12_register_prefetch", 64, 64, 4, 4)
// Tuning variants (camel/gemm.py): 8 SIMD groups of 32 x 32, or 4 of 64 x 32 or 32 x 64.
MATMUL_SG_PREFETCH("matmul_sgtile_128x64_4x4", 128, 64, 4, 4)  // 256 threads, 30.5 KiB
MATMUL_SG_PREFETCH("matmul_sgtile_128x64_8x4", 128, 64, 8, 4)  // 128 threads, 29.5 KiB
MATMUL_SG_PREFETCH("matmul_sgtile_64x128_4x8", 64, 128, 4, 8)  // 128 threads, 27.5 KiB

// ---------------------------------------------------------------------------------------
// Version 13: version 9's thread tiles with version 12's register-staged prefetch.
// v6-v9 load a tile, wait at a barrier, multiply, wait again: while the device reads are in
// flight a thread has nothing to do but wait (only other threadgroups on the core can use
// the time). Here, as in v12, a K step issues the device reads of the next tile into
// registers (fetch_tiles), multiplies the current tile, then writes the fetched one to the
// other of two buffers (stash_tiles, As transposed): one barrier per K step instead of two.
// The tiles are stored as in v6-v9, As[k][m] and Bs[k][n], with each row padded by 4
// floats: the transposed store of a (BM, BK) tile of A (thread t writes column 4 (t % 4) ..
// of row t / 4 into As[k][m], a stride of BM floats between its four stores) hits
// 8 banks with BM = 128 (bank = m mod 32 for every k, under the bank model assumed for
// v10 above: 32 banks of 4 bytes); with a stride of BM + 4 it hits 16.
// The padding keeps rows 16-byte aligned, so the reads stay float4 reads.
// Thread t computes the TM x TN block at rows tr TM, columns tc TN as in v6-v9.
// Threadgroup ((BM/TM)(BN/TN), 1, 1); grid (ceil(N/BN), ceil(M/BM), batches);
// threadgroup memory 2 BK (BM + 4 + BN + 4) floats (v13: 12.5 KiB x 2 = 25 KiB).
template <uint BM, uint BN, uint BK, uint TM, uint TN>
kernel void matmul_blocktile_prefetch(device const float* A [[buffer(0)]],
                                      device const float* B [[buffer(1)]],
                                      device float* C [[buffer(2)]],
                                      constant MatmulParams& p [[buffer(3)]],
                                      uint3 group [[threadgroup_position_in_grid]],
                                      uint t [[thread_index_in_threadgroup]]) {
    constexpr uint T = (BM / TM) * (BN / TN);
    constexpr uint LDA = BM + 4, LDB = BN + 4;  // padded rows (bank conflicts, see above)
    // float4 arrays so that float4 reads from them are 16-byte aligned; buffer s of As
    // starts at As4 + s * BK * LDA / 4
    threadgroup float4 As4[2 * BK * LDA / 4];
    threadgroup float4 Bs4[2 * BK * LDB / 4];
    threadgroup float* As = (threadgroup float*)As4;
    threadgroup float* Bs = (threadgroup float*)Bs4;
    A += batch_offset(p, group.z, p.a_stride0, p.a_stride1);
    B += batch_offset(p, group.z, p.b_stride0, p.b_stride1);
    C += batch_offset(p, group.z, p.c_stride0, p.c_stride1);
    const uint m0 = group.y * BM, n0 = group.x * BN;
    const uint tc = t % (BN / TN), tr = t / (BN / TN);
    float acc[TM * TN];
    for (uint i = 0; i < TM * TN; i++) acc[i] = 0.0f;
    const uint steps = (p.K + BK - 1) / BK;
    TileShare<share_size<BM, BK, T>()> a;  // the next tiles, in flight
    TileShare<share_size<BK, BN, T>()> b;
    if (steps > 0) {  // prologue: tile 0 into buffer 0
        fetch_tiles<BM, BN, BK, T>(A, B, p, m0, n0, 0, t, a, b);
        stash_tiles<BM, BN, BK, T, 1, LDA, LDB, 1>(a, b, p, As, Bs, t);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint s = 0; s < steps; s++) {
        const uint cur = s % 2, nxt = 1 - cur;
        const bool more = s + 1 < steps;
        if (more) fetch_tiles<BM, BN, BK, T>(A, B, p, m0, n0, (s + 1) * BK, t, a, b);
        thread_block_fma<BK, TM, TN, LDA, LDB>(As4 + cur * BK * LDA / 4, Bs4 + cur * BK * LDB / 4,
                                               tr, tc, acc);
        // the other buffer was last read before the previous barrier: free to overwrite
        if (more) {
            stash_tiles<BM, BN, BK, T, 1, LDA, LDB, 1>(a, b, p, As + nxt * BK * LDA,
                                                       Bs + nxt * BK * LDB, t);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // next tile written, this one read
    }
    store_thread_block<TM, TN>(acc, C, p, m0 + tr * TM, n0 + tc * TN);
}

#define MATMUL_BLOCKTILE_PREFETCH(NAME, BM, BN, BK, TM, TN)                                 \
    template [[host_name(NAME)]] kernel void matmul_blocktile_prefetch<BM, BN, BK, TM, TN>( \
        device const float* A [[buffer(0)]], device const float* B [[buffer(1)]],         \
        device float* C [[buffer(2)]], constant MatmulParams& p [[buffer(3)]],            \
        uint3 group [[threadgroup_position_in_grid]], uint t [[thread_index_in_threadgroup]]);

// Version 13: v9's shape, 128 x 64 x 16 tiles, 8 x 4 per thread, 256 threads, 25 KiB.
MATMUL_BLOCKTILE_PREFETCH("matmul_v13_prefetch_128x64x16_8x4", 128, 64, 16, 8, 4)
// Tuning variants (camel/gemm.py): v6's shape, a shallower K step, 64 x 64 (v8's shape,
// 128 x 128 x 16, would need 33 KiB: over Apple's 32 KiB).
MATMUL_BLOCKTILE_PREFETCH("matmul_pftile_128x128x8_8x8", 128, 128, 8, 8, 8)    // 256 thr, 16.5 KiB
MATMUL_BLOCKTILE_PREFETCH("matmul_pftile_128x64x8_8x4", 128, 64, 8, 8, 4)      // 256 thr, 12.5 KiB
MATMUL_BLOCKTILE_PREFETCH("matmul_pftile_64x64x16_4x4", 64, 64, 16, 4, 4)      // 256 thr, 17 KiB

// ---------------------------------------------------------------------------------------
// Version 14: version 9 with a K step's device reads issued together.
// v6-v9's tile loader (load_tile_vec4) stores each float4 into threadgroup memory right
// after reading it, and the compiler keeps that order: in the SASS of v9 (ptxas for sm_90)
// a thread's three tile reads of a K step are waited for one after the other, and under
// ncu on an H200 a third of v9's stall cycles wait for them (docs/cuda.md). v13 issues them
// together but doubles the threadgroup memory; here a K step first reads the whole tile
// share of the thread into registers (fetch_tiles: 3 float4s at v9's shape), then writes
// them (stash_tiles), so the reads are in flight together and the thread waits once. One
// tile buffer, two barriers per K step and v9's 12 KiB, so as many threadgroups per core.
// Tiles as v6-v9: As[k][m] (A transposed), Bs[k][n], rows unpadded.
// Threadgroup ((BM/TM)(BN/TN), 1, 1); grid (ceil(N/BN), ceil(M/BM), batches).
template <uint BM, uint BN, uint BK, uint TM, uint TN>
kernel void matmul_blocktile_fetch(device const float* A [[buffer(0)]],
                                   device const float* B [[buffer(1)]],
                                   device float* C [[buffer(2)]],
                                   constant MatmulParams& p [[buffer(3)]],
                                   uint3 group [[threadgroup_position_in_grid]],
                                   uint t [[thread_index_in_threadgroup]]) {
    constexpr uint T = (BM / TM) * (BN / TN);
    threadgroup float4 As4[BM * BK / 4];  // float4 arrays: 16-byte aligned float4 reads
    threadgroup float4 Bs4[BK * BN / 4];
    A += batch_offset(p, group.z, p.a_stride0, p.a_stride1);
    B += batch_offset(p, group.z, p.b_stride0, p.b_stride1);
    C += batch_offset(p, group.z, p.c_stride0, p.c_stride1);
    const uint m0 = group.y * BM, n0 = group.x * BN;
    const uint tc = t % (BN / TN), tr = t / (BN / TN);
    float acc[TM * TN];
    for (uint i = 0; i < TM * TN; i++) acc[i] = 0.0f;
    TileShare<share_size<BM, BK, T>()> a;  // this K step's tiles, read before any is stored
    TileShare<share_size<BK, BN, T>()> b;
    for (uint k0 = 0; k0 < p.K; k0 += BK) {
        fetch_tiles<BM, BN, BK, T>(A, B, p, m0, n0, k0, t, a, b);
        stash_tiles<BM, BN, BK, T, 1, BM, BN, 1>(a, b, p, (threadgroup float*)As4,
                                                 (threadgroup float*)Bs4, t);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        thread_block_fma<BK, TM, TN, BM, BN>(As4, Bs4, tr, tc, acc);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    store_thread_block<TM, TN>(acc, C, p, m0 + tr * TM, n0 + tc * TN);
}

#define MATMUL_BLOCKTILE_FETCH(NAME, BM, BN, BK, TM, TN)                                    \
    template [[host_name(NAME)]] kernel void matmul_blocktile_fetch<BM, BN, BK, TM, TN>(    \
        device const float* A [[buffer(0)]], device const float* B [[buffer(1)]],         \
        device float* C [[buffer(2)]], constant MatmulParams& p [[buffer(3)]],            \
        uint3 group [[threadgroup_position_in_grid]], uint t [[thread_index_in_threadgroup]]);

// Version 14: v9's shape, 128 x 64 x 16 tiles, 8 x 4 per thread, 256 threads, 12 KiB.
MATMUL_BLOCKTILE_FETCH("matmul_v14_fetch_128x64x16_8x4", 128, 64, 16, 8, 4)

// ---------------------------------------------------------------------------------------
// Version 15: warp tiling (each 32-thread SIMD group owns a part of the tile), 8 x 8 outputs
// per thread as four 4 x 4 blocks, both tiles stored k-major with swizzled float4 slots,
// two buffers with the next tile staged in registers (v13's loop).
// What v9 and v13 leave on the table on an NVIDIA GPU (docs/cuda.md, "Why v9 stops at
// half"): per k a v9 thread reads 3 float4s of threadgroup memory for 32 FMAs; here 4 for
// 64 (1 B of threadgroup memory per FMA instead of 1.5). A thread's 4 x 4 blocks are spaced
// so that the 8 (A) or 4 (B) different float4s a SIMD group reads for one k are
// consecutive: every read is a conflict-free float4 read, the others being broadcasts.
//   SIMD group g of the threadgroup owns the WM x WN part at rows wm = (g / (BN/WN)) WM,
//   columns wn = (g % (BN/WN)) WN; lane l of it has lm = l % 8, ln = l / 8 and owns the
//   4 x 4 blocks at rows wm + 32 mi + 4 lm, columns wn + 16 ni + 4 ln (mi < WM/32,
//   ni < WN/16): v15 (WM, WN = 64, 32) gives each thread 2 x 2 blocks, 8 x 8 outputs.
// Both tiles are k-major, As[k][m] and Bs[k][n] (A transposed, as v6-v9), and instead of
// v13's padding (33 KiB for two 128 x 128 x 16 buffers: over Apple's 32 KiB) the float4
// slot c of row k is stored at slot c ^ swz(k): transposed stores (thread t writes 4
// floats of row t / (BK/4) into 4 rows of As[k][m]) would land in 8 banks (4-way
// conflict); with the XOR each of the BK/4 groups of k that one store instruction meets
// gets its own slots, so all 32 threads hit different banks (32 banks of 4 bytes, bank =
// word address % 32: NVIDIA's layout, an assumption on Apple GPUs). The XOR moves a float4
// within an aligned group of 8 slots, so the float4s of one read stay in one 128-byte row.
// Threadgroup (32 (BM/WM) (BN/WN), 1, 1); grid (ceil(N/BN), ceil(M/BM), batches);
// threadgroup memory 2 BK (BM + BN) floats (v15: 32 KiB). BM, BN multiples of 32,
// BK in {8, 16, 32}. Causal attention products as v6-v9: the K steps cover tile_k_range's
// part, and a tile above the diagonal stores nothing.

// The swizzle: float4 slot c of row k of a k-major tile (BK rows) is stored at slot
// c ^ swz<BK>(k). One store instruction of a transposed tile meets BK/4 groups of k (4 k a
// group) and 32/BK aligned slots of each (see above): swz spaces the groups 32/BK slots apart.
template <uint BK> inline uint swz(uint k) { return ((k / 4) * (32 / BK)) % 8; }

// Write a fetched tile (fetch_tile's share of thread t) to a k-major swizzled tile
// Xs[k][c] of C columns: the tile was fetched as (BK, C) with rows k (k_rows: float4
// stores) or as (C, BK) with rows c (the 4 floats go to 4 rows k).
template <uint R, uint S, uint T, uint BK, uint C, bool k_rows>
inline void stash_swizzled(thread const TileShare<share_size<R, S, T>()>& share,
                           threadgroup float4* dst, uint t) {
    for (uint i = 0; i < share_size<R, S, T>(); i++) {
        uint e = t + i * T;
        if (e >= R * S / 4) break;
        float4 v = share.v[i];
        if (k_rows) {
            uint k = e / (S / 4), c4 = e % (S / 4);
            dst[k * (C / 4) + (c4 ^ swz<BK>(k))] = v;
        } else {
            uint c = e / (S / 4), k = (e % (S / 4)) * 4;  // k .. k + 3: one group of k
            threadgroup float* d = (threadgroup float*)dst + 4 * ((c / 4) ^ swz<BK>(k)) + c % 4;
            d[k * C] = v.x;
            d[(k + 1) * C] = v.y;
            d[(k + 2) * C] = v.z;
            d[(k + 3) * C] = v.w;
        }
    }
}

// One K step of a thread's MI x NI blocks of 4 x 4: for each k, MI float4s of As[k][m] at
// slots am4 + 8 mi and NI of Bs[k][n] at slots bn4 + 4 ni (before the swizzle), then
// 16 MI NI FMAs. acc holds block (mi, ni) row-major at acc + 16 (mi NI + ni).
template <uint BM, uint BN, uint BK, uint MI, uint NI>
inline void warp_tile_fma(threadgroup const float4* As4, threadgroup const float4* Bs4,
                          uint am4, uint bn4, thread float* acc) {
    for (uint k = 0; k < BK; k++) {
        float4 a[MI], b[NI];
        for (uint i = 0; i < MI; i++) a[i] = As4[k * (BM / 4) + ((am4 + 8 * i) ^ swz<BK>(k))];
        for (uint j = 0; j < NI; j++) b[j] = Bs4[k * (BN / 4) + ((bn4 + 4 * j) ^ swz<BK>(k))];
        for (uint i = 0; i < MI; i++) {
            for (uint j = 0; j < NI; j++) {
                thread float* c = acc + 16 * (i * NI + j);
                for (uint r = 0; r < 4; r++) {
                    for (uint q = 0; q < 4; q++) c[4 * r + q] += a[i][r] * b[j][q];
                }
            }
        }
    }
}

// The K loop and the stores of v15 for one storage layout: TA (A stored (K, M)) and TB (B
// stored (N, K)) are template parameters, so the loop holds one layout's loads and stores
// and no branch on the flags (the kernel below picks one of the four), and the sizes are
// read from p once into registers (on the CUDA shim p is device memory, and after a
// barrier every read of it is a read of memory again).
template <uint BM, uint BN, uint BK, uint WM, uint WN, bool TA, bool TB>
inline void warptile_loop(device const float* A, device const float* B, device float* C,
                          constant MatmulParams& p, uint m0, uint n0, uint k_begin, uint k_end,
                          bool wanted, uint t, threadgroup float4* As4,
                          threadgroup float4* Bs4) {
    constexpr uint MI = WM / 32, NI = WN / 16;  // 4 x 4 blocks a thread, along M and N
    constexpr uint GN = BN / WN;                // SIMD groups along N
    constexpr uint T = 32 * (BM / WM) * GN;
    const uint M = p.M, N = p.N, K = p.K, lda = p.lda, ldb = p.ldb;
    const bool v4 = p.vec4 != 0;
    // 32-thread groups of t: the SIMD groups of NVIDIA and Apple GPUs (correct for any width)
    const uint g = t / 32, lane = t % 32;
    const uint wm = (g / GN) * WM, wn = (g % GN) * WN;
    const uint lm = lane % 8, ln = lane / 8;
    float acc[MI * NI * 16];
    for (uint i = 0; i < MI * NI * 16; i++) acc[i] = 0.0f;
    const uint steps = (k_end - k_begin + BK - 1) / BK;  // 0 for a tile above the diagonal
    TileShare<share_size<BM, BK, T>()> a;  // the next tiles, in flight
    TileShare<share_size<BK, BN, T>()> b;
    for (uint s = 0; s <= steps; s++) {  // step s fetches tile s and multiplies tile s - 1
        const uint cur = (s + 1) % 2, nxt = s % 2;  // tile s goes to buffer s % 2
        const bool more = s < steps;
        if (more) {  // the device reads of tile s, in whichever layout A and B are stored
            const uint k0 = k_begin + s * BK;
            if (TA) fetch_tile<BK, BM, T>(A, lda, k0, m0, K, M, v4, t, a);
            else fetch_tile<BM, BK, T>(A, lda, m0, k0, M, K, v4, t, a);
            if (TB) fetch_tile<BN, BK, T>(B, ldb, n0, k0, N, K, v4, t, b);
            else fetch_tile<BK, BN, T>(B, ldb, k0, n0, K, N, v4, t, b);
        }
        if (s > 0) {
            warp_tile_fma<BM, BN, BK, MI, NI>(As4 + cur * BK * BM / 4, Bs4 + cur * BK * BN / 4,
                                              wm / 4 + lm, wn / 4 + ln, acc);
        }
        // buffer nxt was last read by step s - 1, before the previous barrier: free to write
        if (more) {
            threadgroup float4* as = As4 + nxt * BK * BM / 4;
            threadgroup float4* bs = Bs4 + nxt * BK * BN / 4;
            // rows k: float4 stores; rows m (or n): 4 floats into 4 rows k
            stash_swizzled<TA ? BK : BM, TA ? BM : BK, T, BK, BM, TA>(a, as, t);
            stash_swizzled<TB ? BN : BK, TB ? BK : BN, T, BK, BN, !TB>(b, bs, t);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // buffer nxt written, cur read by all
    }
    if (!wanted) return;  // a tile above the diagonal stores nothing (all barriers passed)
    for (uint i = 0; i < MI; i++) {
        for (uint j = 0; j < NI; j++) {
            store_thread_block<4, 4>(acc + 16 * (i * NI + j), C, p, m0 + wm + 32 * i + 4 * lm,
                                     n0 + wn + 16 * j + 4 * ln);
        }
    }
}

// The simulator runs this kernel on fibers, not as barrier regions: its barrier is in a
// called function (docs/simulator.md).
template <uint BM, uint BN, uint BK, uint WM, uint WN>
kernel void matmul_warptile(device const float* A [[buffer(0)]],
                            device const float* B [[buffer(1)]],
                            device float* C [[buffer(2)]],
                            constant MatmulParams& p [[buffer(3)]],
                            uint3 group [[threadgroup_position_in_grid]],
                            uint t [[thread_index_in_threadgroup]]) {
    // two buffers each: buffer s of As4 at As4 + s * BK * BM / 4
    threadgroup float4 As4[2 * BK * BM / 4];
    threadgroup float4 Bs4[2 * BK * BN / 4];
    A += batch_offset(p, group.z, p.a_stride0, p.a_stride1);
    B += batch_offset(p, group.z, p.b_stride0, p.b_stride1);
    C += batch_offset(p, group.z, p.c_stride0, p.c_stride1);
    const uint m0 = tile_row(p, group.y, BM) * BM, n0 = group.x * BN;
    uint kb, ke;
    const bool wanted = tile_k_range(p, m0, n0, BM, kb, ke);  // false: above the diagonal
    // the same branch for every thread of the threadgroup: each reaches the same barriers
    if (p.trans_a && p.trans_b) {
        warptile_loop<BM, BN, BK, WM, WN, true, true>(A, B, C, p, m0, n0, kb, ke, wanted, t,
                                                      As4, Bs4);
    } else if (p.trans_a) {
        warptile_loop<BM, BN, BK, WM, WN, true, false>(A, B, C, p, m0, n0, kb, ke, wanted, t,
                                                       As4, Bs4);
    } else if (p.trans_b) {
        warptile_loop<BM, BN, BK, WM, WN, false, true>(A, B, C, p, m0, n0, kb, ke, wanted, t,
                                                       As4, Bs4);
    } else {
        warptile_loop<BM, BN, BK, WM, WN, false, false>(A, B, C, p, m0, n0, kb, ke, wanted, t,
                                                        As4, Bs4);
    }
}

#define MATMUL_WARPTILE(NAME, BM, BN, BK, WM, WN)                                           \
    template [[host_name(NAME)]] kernel void matmul_warptile<BM, BN, BK, WM, WN>(           \
        device const float* A [[buffer(0)]], device const float* B [[buffer(1)]],         \
        device float* C [[buffer(2)]], constant MatmulParams& p [[buffer(3)]],            \
        uint3 group [[threadgroup_position_in_grid]], uint t [[thread_index_in_threadgroup]]);

// Version 15: 128 x 128 x 16 tiles, 8 SIMD groups of 64 x 32, 8 x 8 per thread, 256 threads,
// 32 KiB (two buffers of 16 x (128 + 128) floats).
MATMUL_WARPTILE("matmul_v15_warptile_128x128x16_64x32", 128, 128, 16, 64, 32)
// Tuning variants (camel/gemm.py, wt_*): a shallower K step (half the memory), a 128 x 64
// tile with 4 SIMD groups of 8 x 8 a thread, and two with 4 x 8 a thread (fewer registers:
// on an NVIDIA GPU more threadgroups per SM; ptxas for sm_90 counts in docs/stage3.md).
MATMUL_WARPTILE("matmul_wtile_128x128x8_64x32", 128, 128, 8, 64, 32)  // 256 thr, 16 KiB
MATMUL_WARPTILE("matmul_wtile_128x64x16_64x32", 128, 64, 16, 64, 32)  // 128 thr, 24 KiB
MATMUL_WARPTILE("matmul_wtile_128x64x8_32x32", 128, 64, 8, 32, 32)    // 256 thr, 12 KiB
MATMUL_WARPTILE("matmul_wtile_64x64x16_32x32", 64, 64, 16, 32, 32)    // 128 thr, 16 KiB
