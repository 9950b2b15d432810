"""tools/plot_measured.py reads the measured tables of docs/cuda.md (no matplotlib needed to
parse): every row gives numbers, 'a / b' cells become two bars with their own names."""

import importlib.util
import pathlib
import sys

_PATH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "plot_measured.py"
_spec = importlib.util.spec_from_file_location("plot_measured", _PATH)
plot_measured = importlib.util.module_from_spec(_spec)
sys.modules["plot_measured"] = plot_measured
_spec.loader.exec_module(plot_measured)


def test_parses_the_measured_tables_of_cuda_md():
    text = plot_measured.CUDA_MD.read_text()
    sizes, series, cublas = plot_measured.gemm(text)
    assert sizes == ["1024³", "2048³", "4096³"]
    assert len(series) >= 11 and all(None not in v and len(v) == 3 for _, v in series)
    assert cublas is None or len(cublas) == 3
    cols, paths = plot_measured.attention(text)
    assert paths and all(len(v) == len(cols) and None not in v for _, v in paths)
    bars = plot_measured.memory(text)
    assert bars and all(pct is not None for _, pct in bars)


def test_split_cells_keep_their_names():
    table = "\n".join([
        "| kernel | shape | GB/s | % of copy |", "|---|---|---:|---:|",
        "| relu_float / relu_float4 | 64 M | 2,543 / 4,164 | 61 % / 101 % |",
        "| LayerNorm v1 / v2 / v3 | (65536, 1024) | 1 / 2 / 3 | 48 % / 50 % / 70 % |",
    ])  # fmt: skip
    assert plot_measured.memory(table) == [
        ("relu_float", 61.0), ("relu_float4", 101.0),
        ("LayerNorm v1", 48.0), ("LayerNorm v2", 50.0), ("LayerNorm v3", 70.0),
    ]  # fmt: skip
    assert plot_measured._number("**27,211**") == 27211.0
    assert plot_measured._number("4.6 (18 % of SDPA)") == 4.6


def test_check_mode_needs_no_matplotlib(capsys):
    assert plot_measured.main(["--check"]) == 0
    assert "GEMM:" in capsys.readouterr().out
