"""tools/bank_calc.py: the conflict model on patterns with known answers, and each kernel's
pattern against what the code's index arithmetic gives and what ncu counted on the H200
(docs/cuda.md: which of a rung's loads and stores conflict)."""

import importlib.util
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bank_calc.py"
_spec = importlib.util.spec_from_file_location("bank_calc", _PATH)
bank_calc = importlib.util.module_from_spec(_spec)
sys.modules["bank_calc"] = bank_calc  # dataclasses look their module up there
_spec.loader.exec_module(bank_calc)


def degree(words, width=4):
    return bank_calc.conflict(words, width)[0]


@pytest.mark.parametrize(
    "stride, want",
    [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (32, 32), (33, 1), (64, 32), (68, 4), (17, 1)],
)
def test_column_reads_of_a_float_tile(stride, want):
    # word lane·stride lands in bank (lane·stride) % 32: gcd(stride, 32) lanes share a bank
    assert degree(bank_calc.column(stride)) == want


def test_broadcast_and_consecutive_are_free():
    assert degree(bank_calc.broadcast()) == 1
    assert degree(bank_calc.row()) == 1
    # 8 lanes of a phase reading consecutive float4s cover the 32 banks once
    assert degree([4 * lane for lane in range(32)], width=16) == 1
    # float4s 8 floats apart: two lanes of a phase per group of 4 banks
    assert degree([8 * lane for lane in range(32)], width=16) == 2


def test_inactive_lanes_do_not_count():
    assert degree([0] + [None] * 31) == 1
    assert degree([None] * 32) == 1


def _find(accesses, kernel, text):
    hits = [a for a in accesses if a.kernel == kernel and text in a.what]
    assert len(hits) == 1, (kernel, text, [a.what for a in accesses if a.kernel == kernel])
    return hits[0]


def test_gemm_v3_transposed_store_is_a_stride_32_column():
    acc = bank_calc.gemm_accesses()
    assert _find(acc, "matmul_v3", "A transposed").degree == 32
    assert _find(acc, "matmul_v3", "not transposed").degree == 1
    assert _find(acc, "matmul_v3", "read As").degree == 1  # one row per SIMD group: broadcast


@pytest.mark.parametrize(
    "rung, ld, st",
    # the direction of ncu's shared-memory conflict counts at 2048^3 (docs/cuda.md, ld / st):
    # v5 67 M / 0.2 M, v7 5 k / 18 M, v9 16 k / 19 M, v6 36 M / 9.0 M, v8 34 M / 8.5 M
    [("matmul_v5", 4, 1), ("matmul_v7", 1, 4), ("matmul_v9", 1, 4), ("matmul_v6", 2, 4),
     ("matmul_v8", 2, 4)],
)  # fmt: skip
def test_gemm_rungs_conflict_where_ncu_counted_them(rung, ld, st):
    acc = [a for a in bank_calc.gemm_accesses() if a.kernel == rung]
    assert max(a.degree for a in acc if a.op == "ld") == ld
    assert max(a.degree for a in acc if a.op == "st" and a.width == 4) == st


def test_v9_conflicts_are_its_transposing_store():
    acc = bank_calc.gemm_accesses()
    # As[k][m] is written 4 floats per thread, BM = 128 floats apart: bank = m % 32
    assert _find(acc, "matmul_v9", "store As").degree == 4
    assert _find(acc, "matmul_v9", "read As4").degree == 1
    assert _find(acc, "matmul_v9", "read Bs4").degree == 1


@pytest.mark.parametrize("rung", ["matmul_v15", *(f"matmul_{v}" for v in bank_calc.WARPTILE_RUNGS
                                                   if not v.isdigit())])  # fmt: skip
def test_v15_swizzle_makes_every_access_conflict_free(rung):
    acc = [a for a in bank_calc.gemm_accesses() if a.kernel == rung]
    assert len(acc) == 6 and all(a.degree == 1 for a in acc), [(a.what, a.degree) for a in acc]


def test_v15_unswizzled_transposing_stores_conflict():
    # without the XOR the transposed stores (A stored (M, K), B stored (N, K)) are v9's
    # 4-way conflict; the float4 stores and the reads do not need it
    acc = [a for a in bank_calc.gemm_accesses() if a.kernel == "matmul_v15 unswizzled"]
    assert [a.degree for a in acc if a.op == "st"] == [4, 1, 1, 4]
    assert all(a.degree == 1 for a in acc if a.op == "ld")


def test_v10_padding_spreads_the_fragment_loads():
    acc = bank_calc.gemm_accesses()
    padded = _find(acc, "matmul_v10", "simdgroup_load B fragment").degree
    unpadded = _find(acc, "matmul_v10 unpadded", "simdgroup_load B fragment").degree
    assert (unpadded, padded) == (8, 2)
    assert _find(acc, "matmul_v10 unpadded", "simdgroup_load A fragment").degree == 4
    assert _find(acc, "matmul_v10", "simdgroup_load A fragment").degree == 2


def test_flash_score_tile_walks():
    # v1: 8 rows at stride 64 read the same 4 columns: 8-way; the swizzle and a padded
    # stride of 68 (row r starts 4r banks on) both make it conflict-free
    assert degree(bank_calc.flash_walk(64, 64, swizzle=False)) == 8
    assert degree(bank_calc.flash_walk(64, 64, swizzle=True)) == 1
    assert degree(bank_calc.flash_walk(68, 64, swizzle=False)) == 1
    assert degree(bank_calc.flash_walk(32, 32, swizzle=False)) == 8  # v6 64x32: same problem
    assert degree(bank_calc.flash_walk(32, 32, swizzle=True)) == 1
    # broken on purpose (the stage 5B exercise): 4 (n ^ (r & 1)) + qd uses 2 groups: 4-way,
    # at every step n, and the tool's flash table prints it
    words = []
    for lane in range(32):
        r, qd = lane // 4, lane % 4
        words.append(r * 64 + 4 * (0 ^ (r & 1)) + qd)
    assert degree(words) == 4
    assert degree(bank_calc.flash_walk(64, 64, swizzle=True, row_mask=1)) == 4
    for n in range(16):
        assert degree(bank_calc.flash_walk(64, 64, swizzle=True, n=n, row_mask=1)) == 4
    assert _find(bank_calc.flash_accesses(), "flash (B_c = 64)", "broken swizzle").degree == 4


def test_flash_score_store_padding_in_the_cuda_layout():
    acc = bank_calc.flash_accesses()
    assert _find(acc, "flash (B_c = 64)", "scores, stride 64").degree == 8
    assert _find(acc, "flash (B_c = 64)", "scores, padded stride 68").degree == 2
    # V fragments, row stride DK: 8 rows 32 floats apart share 4 banks; 16 apart, 8 banks
    assert _find(acc, "flash (B_c = 64)", "V chunk: simdgroup_load, DK = 32").degree == 8
    assert _find(acc, "flash (B_c = 64)", "V chunk: simdgroup_load, DK = 16").degree == 4


def _degrees(name):
    """{access text: n-way} of one rung in flash_v8_accesses (v6 64x32, v8, the what-ifs)."""
    return {a.what: a.degree for a in bank_calc.flash_v8_accesses() if a.kernel == name}


@pytest.mark.parametrize("dk", [32, 64])  # D = 32, and D = 64 and 128
def test_flash_v8_padding_against_v6(dk):
    # v6 64x32: swizzled walk conflict-free, score tile 8-way (stride 32), K fragments
    # 4-way / 8-way (their two pairs in the CUDA shim), V 8-way / 4-way
    v6, v8 = _degrees("flash_v6_64x32"), _degrees("flash_v8")
    ld6, ld8 = dk, dk + 4
    want6 = {"softmax walk, stride 32, XOR swizzle": 1,
             "simdgroup_store of scores, stride 32": 8, "simdgroup_load of P, stride 32": 8,
             f"K chunk: simdgroup_load transposed, DK = {dk}, stride {ld6}": 4,
             f"K chunk: the B operand's pair, DK = {dk}, stride {ld6}": 8,
             f"V chunk: simdgroup_load, DK = {dk}, stride {ld6}": 8,
             f"V chunk: the B operand's pair, DK = {dk}, stride {ld6}": 4,
             f"K/V chunk store (float4), DK = {dk}, stride {ld6}": 1,
             f"K/V chunk store (float4), DK = {dk}, stride {ld6}, second buffer": 1,
             "simdgroup_load of diag(alpha), stride 8": 2}  # fmt: skip
    # v8: rows of 36 (scores) and DK + 4 (chunks) start 4 banks apart: the plain walk and
    # the transposed reads conflict-free, the row-wise fragment reads at the floor of 2
    want8 = {"softmax walk, stride 36, no swizzle": 1,
             "simdgroup_store of scores, stride 36": 2, "simdgroup_load of P, stride 36": 2,
             f"K chunk: simdgroup_load transposed, DK = {dk}, stride {ld8}": 1,
             f"K chunk: the B operand's pair, DK = {dk}, stride {ld8}": 2,
             f"V chunk: simdgroup_load, DK = {dk}, stride {ld8}": 2,
             f"V chunk: the B operand's pair, DK = {dk}, stride {ld8}": 1,
             f"K/V chunk store (float4), DK = {dk}, stride {ld8}": 1,
             f"K/V chunk store (float4), DK = {dk}, stride {ld8}, second buffer": 1,
             "simdgroup_load of diag(alpha), stride 8": 2}  # fmt: skip
    assert {k: v6[k] for k in want6} == want6
    assert {k: v8[k] for k in want8} == want8


def test_flash_v8_what_ifs_and_the_floor():
    # no row stride does better than 2-way for a fragment's row-wise read in the CUDA layout,
    # so v8's 2-way loads are the floor and diag(alpha) (2-way at stride 8) gains nothing
    # from padding; the swizzle on top of stride 36 sends all 8 rows to the same banks
    assert bank_calc.fragment_floor() == 2
    what_if = _degrees("flash_v8 what-if")
    assert what_if == {"softmax walk, stride 36, XOR swizzle as well": 8,
                       "simdgroup_load of diag(alpha), stride 12": 2}  # fmt: skip
    # the second chunk buffer starts 32 (DK + 4) floats on, a multiple of 32: same banks
    for dk in (32, 64):
        a, b = bank_calc._chunk_store(dk, dk + 4), bank_calc._chunk_store(dk, dk + 4, 1)
        assert [x % 32 for x in a] == [x % 32 for x in b]


def test_flash_v8_block_totals():
    # per SIMD group and key block at D = 64, K and V as the default tf32x3 multiply reads
    # them: v6 64x32's load conflicts are mostly its K and V fragments (64 accesses each,
    # 8-way and 4-way: 7 + 3 extra passes) plus P's 8 x 7 and diag's 2 x 1; v8 keeps P's
    # 8 x 1, diag's 2 and K's 64 x 1 (V's become 1-way). Stores: the scores' 8 x 7 vs 8 x 1.
    v6 = bank_calc.flash_block_passes(pad=0, swizzle=True, d=64)
    v8 = bank_calc.flash_block_passes(pad=4, swizzle=False, d=64)
    assert v6 == {"ld": (844, 56 + 2 + 64 * (7 + 3)), "st": (77, 56)}
    assert v8 == {"ld": (220, 8 + 2 + 64), "st": (29, 8)}
    # fp32 mode reads the other pattern of each: the same totals, K and V swapped
    assert bank_calc.flash_block_passes(pad=4, swizzle=False, d=64, mode="fp32") == v8
    # the same rung with the swizzle kept on top of the padding: the walk turns 8-way
    both = bank_calc.flash_block_passes(pad=4, swizzle=True, d=64)
    assert both["ld"][1] - v8["ld"][1] == 8 * 7 and both["st"][1] - v8["st"][1] == 8 * 7


def test_flash_v9_stash_stores_what_load_kv_chunk_stores():
    # v9 writes a staged chunk with the float4s e = t + i * 256: store 0 is exactly
    # load_kv_chunk's first store (v7), conflict-free in either buffer; store 1 is 256
    # float4s (a multiple of 32 words) further on: the same banks. Adjacent float4s per
    # thread (e = 2t + i) would put lanes 8 floats apart: 2-way.
    acc = {a.what: a for a in bank_calc.flash_v9_accesses()}
    for dk in (32, 64):
        assert bank_calc._stash(dk, dk) == bank_calc._chunk_store(dk, dk)
        assert bank_calc._stash(dk, dk, buffer=1) == bank_calc._chunk_store(dk, dk, 1)
        stores = [a for w, a in acc.items() if w.startswith("stash_kv_chunk") and f"{dk}," in w]
        assert len(stores) == (2 if dk == 32 else 4) and all(a.degree == 1 for a in stores)
    one = bank_calc._stash(64, 64, 1)
    assert [w - 256 * 4 for w in one] == bank_calc._stash(64, 64, 0)
    assert acc["stash with a thread's float4s adjacent (e = 2 t + i), DK = 64"].degree == 2
    # the fragment loads are v6 64x32's (v7's tile, stride DK)
    v6 = _degrees("flash_v6_64x32")
    for w, a in acc.items():
        if w.startswith(("K chunk", "V chunk")):
            assert a.degree == v6[w], w


def test_flash_model_against_ncu_on_the_h200():
    # docs/cuda.md: ncu on the H200 (CUDA shim), T = 4096, D = 64, causal, H = 16: shared
    # load conflicts 384 M (v1) and 218 M (v3). The model, times the (SIMD group, key
    # block) pairs of that call, comes within 10 % of both (401 M, 235 M); its stores do
    # not (60 M, 30 M against 43 M, 13 M: ptxas merges some 4-byte pairs, docs/stage5b.md)
    pairs = bank_calc.flash_pairs(4096, 64, 64, 16, causal=True)
    assert pairs == 16 * (64 * 65 // 2) * 8
    v1 = bank_calc.flash_block_passes(pad=0, swizzle=False, d=64, bc=64, dk=32)
    v3 = bank_calc.flash_block_passes(pad=0, swizzle=True, d=64, bc=64, dk=16)
    assert abs(v1["ld"][1] * pairs / 384e6 - 1) < 0.1
    assert abs(v3["ld"][1] * pairs / 218e6 - 1) < 0.1
    assert bank_calc.flash_pairs(4096, 64, 32, 16, causal=True) == 2 * pairs
    assert bank_calc.flash_pairs(100, 64, 32, 1, causal=False) == 2 * 4 * 8


def test_reductions_have_no_conflicts():
    assert all(a.degree == 1 for a in bank_calc.reduce_accesses())


def test_command_line(capsys):
    assert bank_calc.main([]) == 0
    out = capsys.readouterr().out
    assert "assumption" in out and "| matmul_v9 |" in out and "| flash (B_c = 64) |" in out
    assert "| flash_v8 | softmax walk, stride 36, no swizzle | ld | 4 | 1 |" in out
    assert "| flash_v8 | 64 | 220 (74) | 29 (8) | 39 M / 4 M |" in out
    assert "| flash_v9 | stash_kv_chunk store 1 (float4), DK = 64, buffer 1 | st | 16 | 1 |" in out
    assert bank_calc.main(["--stride", "33"]) == 0
    assert "conflict-free" in capsys.readouterr().out
    assert bank_calc.main(["nope"]) == 2


def test_what_if_padding_v9():
    # the stage 3 exercise: As rows of BM + 4 = 132 floats halve v9's store conflicts
    # (bank = m + 4 (k % 8): two k of a lane group meet), and leave the float4 reads alone
    acc = bank_calc.gemm_accesses(pad=4)
    assert _find(acc, "matmul_v9 pad 4", "store As").degree == 2
    assert _find(acc, "matmul_v9 pad 4", "read Bs4").degree == 1
    assert _find(acc, "matmul_v9", "store As").degree == 4  # unpadded still listed


def test_v11_second_buffer_banks_like_v10():
    # the second buffer starts 64·20 and 16·68 floats on, multiples of 32: the same banks
    acc = bank_calc.gemm_accesses()
    v10 = [a.degree for a in acc if a.kernel == "matmul_v10"]
    v11 = [a.degree for a in acc if a.kernel == "matmul_v11 (buffer 1)"]
    assert v10 and v10 == v11


def test_wavefronts_of_float4_reads():
    # the two patterns an H100 user counted with ncu (NVIDIA's forum): lanes l and l + 16
    # reading one float4, the float4s 32 bytes apart: 8 wavefronts (a 2-way conflict in
    # each of the 4 phases; pairs 16 apart do not merge); lanes 0-15 reading one float4 and
    # 16-31 another: 2 (the pairs merge, 16 lanes a phase)
    assert bank_calc.wavefronts([8 * (lane % 16) for lane in range(32)], 16) == 8
    assert bank_calc.wavefronts([4 * (lane // 16) for lane in range(32)], 16) == 2
    consecutive = [4 * lane for lane in range(32)]
    assert bank_calc.wavefronts(consecutive, 16) == 4  # one a phase of 8 lanes
    assert bank_calc.wavefronts([4 * (lane // 2) for lane in range(32)], 16) == 2  # l, l ^ 1
    assert bank_calc.wavefronts([4 * (lane % 2 + lane // 4 * 2) for lane in range(32)], 16) == 2
    assert bank_calc.wavefronts([4 * (lane // 2) for lane in range(32)], 16, "st") == 4
    assert bank_calc.wavefronts(bank_calc.row()) == 1  # 4-byte reads: 32 lanes a phase already


def _simt_kernel_text():
    shader = (_PATH.parents[1] / "shaders" / "ops_attention.metal").read_text()
    return shader[shader.index("kernel void flash_forward_simt") :]


@pytest.mark.parametrize("d, bc", [(32, 32), (64, 32), (128, 16)])  # v10's instances
def test_flash_v10_tiles_are_conflict_free(d, bc):
    # v10's float4 accesses, phases of 8 lanes (one ri each): the swizzled K reads, the Q
    # reads (a phase reads one float4), the block stores, P [ri][key] and V, all 1-way.
    # Unswizzled, the 8 keys of a phase are rows of D floats (a multiple of 32 words)
    # apart: 8-way. P written key-major, as v10 first did: keys 16 words apart, 4-way.
    acc = bank_calc.flash_simt_accesses(d, bc, 10)
    mine = [a for a in acc if a.kernel == "flash_v10"]
    assert len(mine) == 7 and all(a.degree == 1 for a in mine), [(a.what, a.degree) for a in mine]
    what_if = {a.what.split(",")[0]: a.degree for a in acc if a.kernel == "flash_v10 what-if"}
    assert what_if == {"S loop: K keys ci + 8 j unswizzled": 8,
                       "S loop: Q rows ri + 4 i unswizzled": 1, "P store": 4}  # fmt: skip
    # wavefronts: only the Q reads pair (8 lanes of one ri read one float4); the paired
    # phase of 16 lanes holds rows r, r + 1, which only the swizzle puts in different banks
    waves = {a.what.split(",")[0]: a.wavefronts for a in acc}
    assert waves["S loop: Q rows ri + 4 i"] == 2
    assert waves["S loop: Q rows ri + 4 i unswizzled"] == 4
    assert waves["S loop: K keys ci + 8 j"] == waves["V load"] == waves["P load"] == 4
    # the model's index arithmetic is the shader's
    kernel = _simt_kernel_text()
    for index in ("q_tile[r * D4 + (d4 ^ (r % 8))]", "k_tile[c * D4 + (d4 ^ (c % 8))]",
                  "v_tile[c * D4 + d4]", "p_sg[ri * P_RI + (ci + 8 * j) * P_KEY]",
                  "p_sg[ri * P_RI + c * P_KEY]", "v_tile[c * D4 + ci + 8 * u]",
                  ": lane / 8;", ": lane % 8;", "P_RI = PAIRED ? 1 : BC, P_KEY = PAIRED ? 4 : 1",
                  "const uint e = t + n * THREADS, c = e / D4, d4 = e % D4;"):  # fmt: skip
        assert index in kernel, index


@pytest.mark.parametrize("d, bc", [(32, 32), (64, 32), (128, 16)])  # v11's instances
def test_flash_v11_reads_are_paired(d, bc):
    # v11's lanes: l and l ^ 1 share ri, l and l ^ 2 share ci; P [key][ri]. Every read of
    # the S and P·V loops takes 2 wavefronts (v10: K, P and V 4), conflict-free; P's
    # store is 2-way (keys 4 float4s apart in a phase of rows ri, ri + 1)
    acc = bank_calc.flash_simt_accesses(d, bc, 11)
    reads = [a for a in acc if a.op == "ld"]
    assert len(reads) == 4 and all(a.wavefronts == 2 and a.degree == 1 for a in reads), [
        (a.what, a.degree, a.wavefronts) for a in reads
    ]
    (store,) = [a for a in acc if a.op == "st"]
    assert (store.degree, store.wavefronts) == (2, 8)
    # a SIMD group's reads in one key block; at D = 64: 768 against 448, 2048 warp FMAs
    v10, v11 = (bank_calc.simt_block_wavefronts(d, bc, v) for v in (10, 11))
    assert v11["reads"] < v10["reads"] and v11["warp_fmas"] == v10["warp_fmas"]
    if d == 64:
        assert (v10["reads"], v11["reads"], v11["warp_fmas"]) == (768, 448, 2048)
    # the lane layout and the masks of the row reductions are the shader's: a row's 8
    # lanes (one ri) differ in lane bits 0, 2, 3, the XOR masks 1, 4, 8
    kernel = _simt_kernel_text()
    assert "PAIRED ? ((lane >> 1) & 1) | ((lane >> 4) << 1)" in kernel
    assert "PAIRED ? (lane & 1) | (((lane >> 2) & 3) << 1)" in kernel
    assert "X2 = PAIRED ? 4 : 2, X3 = PAIRED ? 8 : 4" in kernel
    lanes = bank_calc.simt_lanes(11)
    assert sorted(lanes) == sorted((ri, ci) for ri in range(4) for ci in range(8))
    for lane, (ri, _) in enumerate(lanes):
        row = {other for other in range(32) if lanes[other][0] == ri}
        assert row == {lane ^ m for m in (0, 1, 4, 5, 8, 9, 12, 13)}
