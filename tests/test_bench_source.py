"""`bench matmul --source/--diff` and `bench attention --source/--diff`: one rung's kernel,
specialised, as its own MSL file.

The printed file must be the rung: it compiles on its own, and dispatched in place of the
kernel of the shader file it gives the same results (checked against NumPy at awkward
sizes). The text checks say the flags are gone and the dead branches with them.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_shim

from camel import flash, gemm, metal
from camel.bench import attention as bench_attention
from camel.bench import matmul as bench_matmul
from camel.bench import source

require_shim()


def _swap_in(monkeypatch, shader: str, name: str, text: str):
    """Make metal.kernel(shader, name) return the kernel compiled from `text`."""
    fn = metal.compile(text, path=f"{name}.metal").function(name)
    original = metal.kernel

    def kernel(filename, kernel_name):
        if (filename, kernel_name) == (shader, name):
            return fn
        return original(filename, kernel_name)

    monkeypatch.setattr(metal, "kernel", kernel)


# -- the folding rules on small pieces ------------------------------------------------------


def test_fold_ifs_keeps_the_live_branch_of_a_chain():
    text = "if (exact) {\n    a();\n} else if (!true) {\n    b();\n} else {\n    c();\n}"
    assert source.fold_ifs(text) == "if (exact) {\n    a();\n} else {\n    c();\n}"
    text = "    if (false) {\n        a();\n    } else {\n        c();\n        d();\n    }"
    assert source.fold_ifs(text) == "    c();\n    d();"
    assert source.fold_ifs("x;\n    if (false && y) z();\nw;") == "x;\nw;"
    assert source.fold_ifs("if (true && n > 0) { f(); }") == "if (n > 0) { f(); }"
    assert source.fold_ifs("if (n > 0) { f(); }") == "if (n > 0) { f(); }"


def test_fold_ternaries_and_constants():
    assert source.fold_ternaries("x = false ? s : s * k;") == "x = s * k;"
    assert source.fold_ternaries("y = v ? (true ? s : t) : u;") == "y = v ? (s) : u;"
    assert (
        source.fold_ternaries("z = !false ? 4 * (n ^ r) + q : 4 * n + q;") == "z = 4 * (n ^ r) + q;"
    )
    assert source.fold_arith("a[128 * 16 / 4]; i < 8 / 4; (64 / 4) * x; 64 + 8 * x") == (
        "a[512]; i < 2; 16 * x; 64 + 8 * x"
    )
    known = {"BM": 128, "BN": 64, "TM": 8, "TN": 4}
    got = source.fold_constexpr("constexpr uint T = (BM / TM) * (BN / TN);", known)
    assert got == "constexpr uint T = 256;  // (BM / TM) * (BN / TN)" and known["T"] == 256
    assert source.fold_constexpr("constexpr uint N = K * 2;", known) == "constexpr uint N = K * 2;"


def test_drop_unused_locals_keeps_what_is_named():
    text = (
        "    KvShare<kv_share<32, 64, 256>()> next;  // v9\n    float acc;\n    uint a, b;\n"
        "    float s[4];\n    acc = 1.0f;\n    // next is only named in a comment\n"
    )
    assert source.drop_unused_locals(text) == (
        "    float acc;\n    uint a, b;\n    float s[4];\n    acc = 1.0f;\n"
        "    // next is only named in a comment\n"
    )
    kept = "    KvShare<2> next;\n    fetch(next);\n    return next;\n"
    assert source.drop_unused_locals(kept) == kept


# -- the printed rungs --------------------------------------------------------------------


def test_template_rung_is_specialised():
    text = bench_matmul.rung_source("9")
    assert "kernel void matmul_v9_128x64x16_8x4(" in text
    assert "matmul_blocktile_vec4<BM = 128, BN = 64, BK = 16, TM = 8, TN = 4>" in text
    assert "constexpr uint BM = 128;  // template parameter" in text
    assert "constexpr uint THREADS = 256;  // (BM / TM) * (BN / TN)" in text
    assert (
        "template <uint BM, uint BN, uint BK, uint TM" not in text
        and "MATMUL_BLOCKTILE" not in text
    )
    assert "load_tile_vec4" in text and "struct MatmulParams" in text  # what it uses
    assert "matmul_v10" not in text and "simdgroup" not in text  # and nothing else


@pytest.mark.parametrize("name", ["flash_v1", "flash_v3", "flash_v5", "flash_v6_64x32",
                                  "flash_v7", "flash_v8", "flash_v9"])  # fmt: skip
def test_flash_rung_has_no_flags_left(name):
    text = bench_attention.rung_source(name, 64)
    body = text[text.index("kernel void") :]
    for flag in ("SWIZZLE", "DB_KV", "INTERLEAVE", "DB_REG", "FMA ?", "(FMA)", "REG_SOFTMAX",
                 "PAD ?", "PREFETCH"):  # fmt: skip
        assert flag not in body.split("//")[0], flag
    code = "\n".join(line.split("//")[0] for line in body.split("\n"))
    for dead in ("true ?", "false ?", "(false", "(true", "!false", "!true"):
        assert dead not in code, (name, dead)
    rung = flash.RUNGS[name]
    assert f"kernel void {rung.kernel(64)}(" in text
    # the double-buffer prologue exists exactly where DB_KV is on
    assert ("v3 prologue" in text) == (rung.buffers == 2)
    assert ("exp2(fma(" in text) == (rung.version >= 6)
    # v7: no score tile, no diag(alpha) multiply, and no helper only those needed
    for tile_code in ("simdgroup_store(Sf[j]", "simdgroup_multiply(scaled", "scale_rows_exact"):
        assert (tile_code in text) == (not rung.reg_softmax), (name, tile_code)
    assert ("thread_elements()" in text) == rung.reg_softmax
    # v9: the next chunk's reads go to registers (fetch) and reach threadgroup memory
    # later (stash); every other double-buffered rung copies it in one go
    assert ("fetch_kv_chunk<" in body and "stash_kv_chunk<" in body) == rung.prefetch
    assert ("load_kv_chunk<" in body.split("for (uint g = 0")[1]) == (not rung.prefetch)


def _code(text: str) -> str:
    return "\n".join(line.split("//")[0] for line in text.split("\n"))


_TILED = [n for n, r in flash.RUNGS.items() if not (r.reg_softmax or r.simt)]  # s_sg and buf


@pytest.mark.parametrize("name", _TILED)
def test_flash_tiles_are_read_at_their_named_strides(name):
    """Every access of the score tile and of a K/V chunk uses the row stride SLD or KLD
    (v8 pads them, the others' are B_c and DK), so no access keeps an unpadded stride
    while the others are padded: that would compute the same numbers, at the old banks."""
    import re

    whole = _code(bench_attention.rung_source(name, 64))
    assert "tile4[r * (LD / 4) + c4]" in whole  # load_kv_chunk stores at the stride it gets
    code = whole[whole.index("kernel void") :]
    access = r"simdgroup_(?:load|store)\(\w+(?:\[[^\]]*\])?, ((?:s_sg|buf)[^;]*?)\);"
    calls = re.findall(access, code)
    assert len(calls) >= 6, calls
    for args in calls:
        if args == "s_sg, 8":  # the 8x8 scratch of an edge tile's output: not the score tile
            continue
        stride = args.split(",")[1].strip()
        assert stride == ("SLD" if args.startswith("s_sg") else "KLD"), args
    assert not re.search(r"s_sg\[[^\]]*\* BC\b", code) and "s_sg[r * SLD + c]" in code
    assert not re.search(r"buf\[[^\]]*\* DK\b", code)
    calls = code.count("load_kv_chunk<")
    assert calls >= 1 and code.count("load_kv_chunk<BC, DK, D, THREADS, KLD>") == calls
    padded = flash.RUNGS[name].pad == 4
    assert ("constexpr uint SLD = BC + 4;" in code) == padded
    assert ("constexpr uint KLD = DK + 4;" in code) == padded


def test_v8_diff_is_the_strides_and_the_walk(capsys):
    """v6 64x32 -> v8: the two strides padded and the swizzle gone, nothing else."""
    assert bench_attention.main(["--diff", "flash_v6_64x32", "flash_v8"]) == 0
    out = capsys.readouterr().out
    changed = [ln[1:].strip() for ln in out.splitlines()[2:] if ln[:1] in "+-"]
    code = sorted(ln for ln in changed if not ln.startswith(("//", "kernel void")))
    assert code == sorted(["constexpr uint SLD = BC;  // row stride of the score tile",
                           "constexpr uint KLD = DK;  // row stride of a K/V chunk",
                           "constexpr uint SLD = BC + 4;  // row stride of the score tile",
                           "constexpr uint KLD = DK + 4;  // row stride of a K/V chunk"]
                          + ["const uint c = 4 * (n ^ r) + qd;"] * 2
                          + ["const uint c = 4 * n + qd;"] * 2), code  # fmt: skip


def test_v9_reads_the_next_chunk_before_the_multiplies_and_stores_it_after(capsys):
    """v7 -> v9: the copy of chunk g + 1 split in two around step g's multiplies (the
    fetch before the first, the stash after the last, before the step's barrier)."""
    for d in flash.HEAD_DIMS:
        code = _code(bench_attention.rung_source("flash_v9", d))
        loop = code[code.index("for (uint g = 0") :]
        loop = loop[: loop.index("threadgroup_barrier(")]
        fetch, stash = loop.index("fetch_kv_chunk<"), loop.index("stash_kv_chunk<")
        mma = [i for i in range(len(loop)) if loop.startswith("simdgroup_multiply_accumulate(", i)]
        assert mma and fetch < mma[0] and mma[-1] < stash, d
        assert "(g + 1) % 2" in loop[stash:] and "g1 = g + 1" in loop[:fetch], d
    assert bench_attention.main(["--diff", "flash_v7", "flash_v9"]) == 0
    out = capsys.readouterr().out
    removed = [ln[1:].strip() for ln in out.splitlines()[2:] if ln[:1] == "-"]
    assert not [ln for ln in removed if ln and not ln.startswith(("//", "kernel void",
                "load_kv_chunk<", "(i1 % NCHUNK) * DK,", "kv + (g1 % 2)"))], removed  # fmt: skip


def test_diffs_show_one_idea_per_rung(capsys):
    assert bench_attention.main(["--diff", "flash_v3", "flash_v4"]) == 0
    out = capsys.readouterr().out
    assert "-            for (uint j = 0; j < NC; j++) {" in out
    assert "+            for (uint dd = 0; dd < DK / 8; dd++) {" in out
    assert "exp2" not in out  # v6's softmax is not part of v3 -> v4
    # v7 and v9: one template, other tile sizes; nothing else may differ
    assert bench_matmul.main(["--diff", "7", "9"]) == 0
    out = capsys.readouterr().out
    changed = [ln[1:] for ln in out.splitlines()[2:] if ln[:1] in "+-"]
    other = [ln for ln in changed if not ln.startswith(("//", "kernel void", " " * 20))]
    assert sorted(other) == sorted(["    constexpr uint BM = 64;  // template parameter",
                     "    constexpr uint BK = 8;  // template parameter",
                     "    constexpr uint TM = 4;  // template parameter",
                     "    constexpr uint BM = 128;  // template parameter",
                     "    constexpr uint BK = 16;  // template parameter",
                     "    constexpr uint TM = 8;  // template parameter"])  # fmt: skip


def test_unknown_rung_names_the_valid_ones(capsys):
    assert bench_matmul.main(["--source", "16"]) == 2
    assert "valid versions: 1, 2" in capsys.readouterr().err
    assert bench_attention.main(["--source", "flash_v13"]) == 2
    assert "flash_v1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no kernel"):
        source.specialise(gemm.SHADER, "matmul_v99")


@pytest.mark.parametrize("version", gemm.versions() + ["64x64x16_4x4"])
def test_printed_matmul_rung_computes_the_same(monkeypatch, version):
    rung = gemm.get_rung(version)
    _swap_in(monkeypatch, gemm.SHADER, rung.kernel, bench_matmul.rung_source(version))
    rng = np.random.default_rng(3)
    for a_shape, b_shape, ta, tb in [((33, 31), (31, 65), False, False),
                                     ((31, 33), (65, 31), True, True)]:  # fmt: skip
        a = rng.standard_normal(a_shape, dtype=np.float32)
        b = rng.standard_normal(b_shape, dtype=np.float32)
        got = gemm.matmul(
            metal.DeviceArray.from_numpy(a), metal.DeviceArray.from_numpy(b),
            transpose_a=ta, transpose_b=tb, version=version,
        ).numpy()  # fmt: skip
        want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["flash_v1", "flash_v2", "flash_v3", "flash_v4", "flash_v5",
                                  "flash_v6_64x32", "flash_v6_128x32", "flash_v7",
                                  "flash_v8", "flash_v9", "flash_v10",
                                  "flash_v10_32x32", "flash_v11", "flash_v12"])  # fmt: skip
def test_printed_flash_rung_computes_the_same(monkeypatch, name):
    d = 32
    rung = flash.RUNGS[name]
    _swap_in(monkeypatch, flash.SHADER, rung.kernel(d), bench_attention.rung_source(name, d))
    rng = np.random.default_rng(4)
    for t, causal in ((70, True), (33, False)):
        q, k, v = (rng.standard_normal((1, 2, t, d), dtype=np.float32) for _ in "qkv")
        want, want_lse = flash.reference_numpy(q, k, v, causal)
        dq, dk, dv = (metal.DeviceArray.from_numpy(x) for x in (q, k, v))
        out, lse = flash.forward(dq, dk, dv, causal, rung=name)
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(lse.numpy(), want_lse, rtol=1e-4, atol=1e-4)
