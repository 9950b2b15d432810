"""tools/gpu/registers.py: `ptxas -v` of the CUDA shim's PTX, read into a table; with a
ptxas at hand (PATH, $PTXAS or the nvidia-cuda-nvcc wheel), flash v10 compiled for sm_90
without spills, at the threadgroup memory its rung table gives."""

import importlib.util
import pathlib
import shutil
import sys

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "gpu" / "registers.py"
_spec = importlib.util.spec_from_file_location("registers", _PATH)
registers = importlib.util.module_from_spec(_spec)
sys.modules["registers"] = registers
_spec.loader.exec_module(registers)

# ptxas 13 for sm_90, two kernels (trimmed): one with spills, one without
LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'camel_flash_backward_dq_d64' for 'sm_90'
ptxas info    : Function properties for camel_flash_backward_dq_d64
    152 bytes stack frame, 148 bytes spill stores, 148 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 152 bytes cumulative stack size
ptxas info    : Compiling entry function 'camel_flash_v10_64x32_d64' for 'sm_90'
ptxas info    : Function properties for camel_flash_v10_64x32_d64
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 32768 bytes smem
"""


def test_parse_reads_each_kernel():
    rows = registers.parse(LOG)
    assert rows == [
        dict(name="camel_flash_backward_dq_d64", registers=255, stack=152, spill_stores=148,
             spill_loads=148, smem=0),
        dict(name="camel_flash_v10_64x32_d64", registers=128, stack=0, spill_stores=0,
             spill_loads=0, smem=32768),
    ]  # fmt: skip
    text = registers.table(rows)
    assert "| flash_backward_dq_d64 | 255 | 148 / 148 | 152 | 0 |" in text
    assert "| flash_v10_64x32_d64 | 128 | 0 / 0 | 0 | 32768 |" in text


def test_unknown_shader_lists_the_known_ones(capsys):
    assert registers.main(["ops_nope.metal"]) == 2
    assert "ops_attention.metal" in capsys.readouterr().err


@pytest.mark.skipif(
    registers.find_ptxas() is None, reason="no ptxas (pip install nvidia-cuda-nvcc)"
)
@pytest.mark.skipif(shutil.which("clang++-19") is None, reason="clang++-19 is not installed")
def test_flash_simt_rungs_compile_without_spills(capsys):
    # docs/stage5b.md, Versions 10 and 11: the S loop is kept rolled; fully unrolled, ptxas
    # spills. v11's lane layout costs no registers at D = 64 (128, as v10: 4 threadgroups
    # an SM), where a lane-dependent P address took 156
    from camel import flash

    names = [n for n, rung in flash.RUNGS.items() if rung.simt]  # v10-v12
    wanted = {flash.RUNGS[n].kernel(d) for n in names for d in (32, 64, 128)}
    assert registers.main(["ops_attention.metal", "-k", "flash_v1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [[cell.strip() for cell in line.split("|")[1:-1]]
            for line in lines if line.startswith("| flash_v1")]  # fmt: skip
    got = {r[0]: (r[2], int(r[4])) for r in rows if r[0] in wanted}
    regs = {r[0]: int(r[1]) for r in rows}
    assert set(got) == wanted
    assert regs["flash_v11_64x32_d64"] <= 128 and regs["flash_v12_64x32_d64"] <= 128
    for name in names:
        for d in (32, 64, 128):
            spills, smem = got[flash.RUNGS[name].kernel(d)]
            assert spills == "0 / 0" and smem == flash.RUNGS[name].tg_bytes(d), (name, d)
