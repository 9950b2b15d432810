"""camel/bench/roofline.py: the peaks per device, the bound, the "% of roofline" column of
the benches, and the per-rung counts the lessons quote (checked against the tile sizes by
hand, so a change to a rung's table that the model misses shows up here)."""

from __future__ import annotations

import re

import pytest

from camel.bench import roofline


@pytest.mark.parametrize(
    "device, key",
    [("NVIDIA H200 (CUDA shim: MSL translated to PTX)", "h200"), ("Apple M1 Max", "m1max"),
     ("Apple M1", "m1"), ("Apple M1 Pro", None), ("Apple M3", None),
     ("camel simulator (2 workers)", None)],
)  # fmt: skip
def test_peaks_by_device_name(device, key):
    got = roofline.peaks_for(device)
    assert got is (roofline.PEAKS[key] if key else None)


def test_peaks_are_the_cited_figures():
    p = roofline.PEAKS
    assert (p["m1"].tflops, p["m1"].gbs) == (2.6, 68.0)
    assert (p["m1max"].tflops, p["m1max"].gbs) == (10.6, 400.0)
    assert (p["h200"].tflops, p["h200"].gbs) == (67.0, 4142.0)  # docs/cuda.md


def test_bound_is_the_slower_of_compute_and_memory():
    m1 = roofline.PEAKS["m1"]
    assert roofline.bound_ms(2.6e12, 0, m1) == pytest.approx(1000.0)
    assert roofline.bound_ms(0, 68e9, m1) == pytest.approx(1000.0)
    assert roofline.bound_ms(2.6e12, 136e9, m1) == pytest.approx(2000.0)
    assert roofline.percent(2.6e12, 0, 4000.0, m1) == "25%"
    assert roofline.percent(1.0, 1.0, 1.0, None) == "n/a"


def test_camel_peaks_overrides_and_is_checked(monkeypatch):
    monkeypatch.setenv("CAMEL_PEAKS", "3.6,100")
    got = roofline.peaks("Apple M3", simulator=False)
    assert (got.tflops, got.gbs) == (3.6, 100.0)
    assert roofline.peaks("Apple M3", simulator=True) is None  # the simulator never has one
    monkeypatch.setenv("CAMEL_PEAKS", "fast")
    with pytest.raises(SystemExit, match="CAMEL_PEAKS"):
        roofline.peaks("Apple M3", simulator=False)


def test_gemm_counts():
    n = 1024
    rows = {r["version"]: r for r in roofline.gemm_rows(n)}
    assert all(r["flops"] == 2 * n**3 for r in rows.values())
    # each threadgroup reads its BM x K strip of A and K x BN strip of B, and writes C once
    assert rows["3"]["dev_bytes"] == 4 * (2 * n**3 / 32 + n * n)
    assert rows["9"]["dev_bytes"] == 4 * (n**3 / 64 + n**3 / 128 + n * n)
    # threadgroup bytes read per FMA: v3 two floats, v4 9 per 8, v5 16 per 64, v9 12 per 32,
    # v10 8 fragments of 64 floats per 16 x 512 FMAs
    reads = {v: rows[v]["tg_read"] for v in ("3", "4", "5", "7", "9", "10")}
    assert reads == {"3": 8.0, "4": 4.5, "5": 1.0, "7": 2.0, "9": 1.5, "10": 0.25}
    assert rows["1"]["tg_bytes"] == 0 and rows["1"]["tg_read"] == 0


def test_gemm_counts_warp_tile_per_thread():
    """v15's name ends in its SIMD-group tile (64x32), not a thread's: each thread owns
    (WM/32) x (WN/16) blocks of 4 x 4 = 8 x 8 outputs and reads 8 + 8 floats per k for 64
    FMAs (1 B per FMA, as v5), not the 96 floats of a 64 x 32 outer product per 2,048."""
    rows = {r["version"]: r for r in roofline.gemm_rows(1024)}
    assert rows["15"]["tg_read"] == 1.0
    assert rows["15"]["tg_bytes"] == 2 * 16 * (128 + 128) * 4  # two k-major 16 KiB buffers
    assert rows["15"]["tg_per_core"] == 1
    # v11's second buffer: fewer threadgroups fit a core (60 KB) than v10's
    assert (rows["10"]["tg_per_core"], rows["11"]["tg_per_core"]) == (5, 3)
    # on M1 v5's counts are compute-bound at 4096 and memory-bound at v3's tile size
    big = {r["version"]: r for r in roofline.gemm_rows(4096)}
    assert big["3"]["m1"] < big["5"]["m1"] <= 2600.0


def test_flash_rescale_costs_one_nc_th_of_pv():
    rows = {r["name"]: r for r in roofline.flash_rows(4096, 64, 16)}
    assert rows["flash_v1"]["rescale"] == pytest.approx(0.125)  # B_c = 64
    assert rows["flash_v6_64x32"]["rescale"] == pytest.approx(0.25)  # B_c = 32
    # v7: the same tile as v6_64x32, rescaled in registers, no score tile: no rescale
    # multiplies, 4 * 8 * B_c * 4 threadgroup bytes fewer per SIMD group and key block,
    # 16 KiB instead of 26 at D = 64, so 3 threadgroups fit a core's ~60 KB instead of 2
    v6, v7 = rows["flash_v6_64x32"], rows["flash_v7"]
    assert v7["rescale"] == 0 and v7["fma_exec"] == v6["fma_exec"] * 16 / 18
    assert v7["tg_per_fma"] < v6["tg_per_fma"] and v7["dev_bytes"] == v6["dev_bytes"]
    assert (v6["tg_per_core"], v7["tg_per_core"]) == (2, 3)
    # v8: v6_64x32's work and traffic at other addresses; the padding costs 2 KiB (28 KiB
    # at D = 64), still 2 threadgroups a core
    v8 = rows["flash_v8"]
    for key in ("fma_exec", "rescale", "tg_per_fma", "dev_bytes", "tg_per_core"):
        assert v8[key] == v6[key], key
    assert (v6["tg_bytes"], v8["tg_bytes"]) == (26624, 28672)
    # v9: v7's work, bytes and threadgroup memory (its staged chunk is in registers, which
    # this table does not count)
    v9 = rows["flash_v9"]
    assert {k: v9[k] for k in v7 if k != "name"} == {k: v7[k] for k in v7 if k != "name"}
    assert rows["flash_v1"]["flops"] == 16 * 4.0 * 4096**2 * 64
    # the naive path moves its (T, T) matrices (scores written, read and written by the
    # softmax, which applies the scale, read by P·V: 4 passes) and the GEMMs' tile reads:
    # several times flash's bytes
    tt = 16 * 4096**2 * 4
    tiles = 2 * 16 * 4 * 4096**2 * 64 * (1 / 64 + 1 / 128)
    assert rows["naive"]["dev_bytes"] == pytest.approx(4 * tt + 4 * 16 * 4 * 4096 * 64 + tiles)
    assert rows["naive"]["dev_bytes"] > 3 * rows["flash_v1"]["dev_bytes"]


def test_tables_print(capsys):
    assert roofline.main([]) == 0
    out = capsys.readouterr().out
    assert "| 9 | 128x64 |" in out and "| flash_v3 |" in out and "| layer_norm v3 |" in out


def test_matmul_table_has_the_column():
    from camel.bench import matmul

    n = 4096
    m1 = roofline.PEAKS["m1"]
    at_bound = roofline.bound_ms(2.0 * n**3, 12.0 * n * n, m1)
    rows = [("5", n, at_bound, 2.0 * n**3 / at_bound / 1e6, None)]
    text = matmul.table(rows, simulator=False, device="Apple M1")
    assert "% of roofline |" in text and "| n/a | 100% |" in text and "Apple M1" in text
    assert "| n/a | n/a |" in matmul.table(rows, simulator=True, device="sim")


def test_attention_table_has_the_column():
    from camel.bench import attention

    rows = [("flash_v1", 1024, 64, False, 1.0, 2.6, 0, 100.0)]  # 2.6 TFLOP/s in 1 ms
    text = attention.table(rows, simulator=False, device="Apple M1", heads=1)
    assert "| % of roofline |" in text and text.splitlines()[4].endswith("| 100% |")


def test_memory_bench_prints_the_column(capsys):
    from conftest import require_shim

    require_shim()
    from camel import metal
    from camel.bench import bandwidth, reduce

    bandwidth.time_cases("shape", [(4, 64)], reduce.cases, 1, "sim GB/s")
    out = capsys.readouterr().out
    assert "% of copy | % of roofline | kernels |" in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| sum")]
    assert rows
    if metal.is_simulator():
        assert {row[-3].strip() for row in rows} == {"n/a"} and "n/a (the simulator" in out
    # the kernels column names what ran, each with its time in that call: v1 and v2 of the
    # last-axis sum at (4, 64)
    ran = [re.findall(r"(\w+) \((\d+\.\d{4}) ms\)", row[-2]) for row in rows]
    assert all(ran) and all(float(ms) > 0 for kernels in ran for _, ms in kernels), rows
    assert {name for kernels, row in zip(ran, rows, strict=True) if "last axis" in row[1]
            for name, _ in kernels} >= {"sum_last_axis", "sum_last_axis_v2"}, rows  # fmt: skip


@pytest.mark.parametrize(
    "doc, table", [("stage3.md", lambda: roofline.gemm_table(4096)),
                   ("stage5b.md", lambda: roofline.flash_table(4096, 64))],
)  # fmt: skip
def test_lessons_quote_the_generated_tables(doc, table):
    # the lessons paste `python -m camel.bench roofline`; a row there must be a row the
    # generator prints today (a rung added since may be missing, none may be stale)
    import pathlib

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / doc).read_text()
    generated = table().splitlines()
    header = generated[2]
    assert header in text, f"docs/{doc} lost the table; paste `python -m camel.bench roofline`"
    start = text.index(header)
    quoted = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        quoted.append(line)
    assert quoted and all(line in generated for line in quoted), (
        f"docs/{doc} quotes rows the generator no longer prints; rerun "
        "`python -m camel.bench roofline` and paste its table"
    )


def test_launch_order_model_of_causal_calls():
    # docs/stage5b.md, Version 12. One threadgroup an SM (v7, v9: ncu), 132 SMs: the model
    # gives causal / full 0.57, as measured on an H100 (v7 5.18 / 9.21 ms = 0.56, v9 4.63 /
    # 7.93 = 0.58). At 4 an SM (v11) the last heads' heaviest tiles start last: 0.83;
    # started heaviest first (v12), 0.50, the least (half the key blocks, plus the diagonal)
    from camel import flash

    def ratio(name, per_sm):
        rung = flash.RUNGS[name]
        c, f = (roofline.launch_makespan(rung, 4096, 16, 64, x, 132 * per_sm) for x in (1, 0))
        return round(c / f, 2)

    assert [ratio("flash_v9", 1), ratio("flash_v11", 4), ratio("flash_v12", 4)] == [0.57, 0.83, 0.5]
    assert "| flash_v12 | heaviest tiles first | 4 | 0.50 |" in roofline.schedule_table()
    # the launch order is the kernels' own mapping of a group (x, y) to (head, tile)
    v12, v11 = flash.RUNGS["flash_v12"], flash.RUNGS["flash_v11"]
    assert v12.grid(130, 6, 64) == (6, 3, 1) and v11.grid(130, 6, 64) == (3, 6, 1)
    assert v12.launch_order(130, 2, 64) == [(0, 2), (1, 2), (0, 1), (1, 1), (0, 0), (1, 0)]
    assert v11.launch_order(130, 2, 64) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    import pathlib

    shader = (pathlib.Path(__file__).resolve().parents[1] / "shaders" / flash.SHADER).read_text()
    kernel = shader[shader.index("kernel void flash_forward_simt") :]
    assert "const uint bh = HEAVY_FIRST ? group.x : group.y;" in kernel
    assert "const uint tile = HEAVY_FIRST ? (T + BR - 1) / BR - 1 - group.y : group.x;" in kernel
    assert "FLASH_FORWARD_SIMT(12, 64, 32, 64, true, true)" in shader
