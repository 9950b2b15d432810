"""The benchmarks' correctness halves: every bench validates against NumPy before it times,
and a wrong kernel must make validation fail (so no table is ever printed for it).

Timings are not asserted anywhere (benchmarks, not timed tests): these tests run the
validation and the table code on small cases, on whatever shim "mps" is here.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_shim

from camel import backend_mps, config, metal

require_shim()


@pytest.mark.parametrize("name", ["elementwise", "reduce", "softmax", "layernorm"])
def test_memory_bound_benches_validate(name):
    import importlib

    bench = importlib.import_module(f"camel.bench.{name}")
    assert bench.validate(log=lambda *_: None)


def test_layernorm_bench_catches_a_wrong_kernel(monkeypatch):
    from camel.bench import layernorm

    right = backend_mps.gelu
    monkeypatch.setattr(backend_mps, "gelu", lambda x: backend_mps.gelu_backward(x, right(x)))
    lines = []
    assert not layernorm.validate(log=lines.append)
    assert any("gelu" in line and "FAIL" in line for line in lines)


def test_layernorm_bench_covers_every_forward_version():
    from camel.bench import layernorm

    labels = [c[0] for c in layernorm.cases((2, 40), np.random.default_rng(0))]
    versions = [f"layer_norm v{v}" for v in backend_mps.LAYERNORM_FORWARD]
    assert versions == labels[: len(versions)]
    # v3 (and v4 past 16384) keep a row in registers: not offered where D is too wide
    wide = [c[0] for c in layernorm.cases((1, 2000), np.random.default_rng(0))]
    assert "layer_norm v3" not in wide and "layer_norm v2" in wide and "layer_norm v4" in wide


def test_attention_bench_counts_flops_per_head():
    from camel.bench import attention

    rows = attention.run(["flash_v1"], seqs=[17], dims=[32], reps=1, log=lambda *_: None,
                         heads=3)  # fmt: skip
    for name, t, d, causal, ms, tflops, _peak, _pct in rows:
        flops = 3 * 4.0 * t * t * d / (2 if causal else 1)
        assert tflops == pytest.approx(flops / ms / 1e9), name
    text = attention.table(rows, metal.is_simulator(), metal.device_name(), heads=3)
    assert "Batch 1, 3 heads" in text


def test_attention_reference_is_sdpa_only_on_the_cuda_shim():
    from camel.bench import attention

    torch, why = attention.torch_cuda()
    if metal.shim() != "cuda":
        assert torch is None and "CUDA shim" in why


def test_matmul_bench_names_its_vendor_reference():
    from camel.bench import matmul

    assert matmul.vendor() == ("cuBLAS" if metal.shim() == "cuda" else "MPS")
    rows = [("0 (MPS)", 64, 1.0, 0.5, 100.0), ("11", 64, 2.0, 0.25, 50.0)]
    assert "% of MPS" in matmul.table(rows, simulator=True, device="sim")


def test_models_bench_tune_and_profile(tmp_path, monkeypatch):
    """--tune records the step's GEMM shapes and tunes them (winners saved for the timed
    steps); --profile logs the kernel table of one camel step."""
    from camel.bench import models, tuner

    monkeypatch.setenv("CAMEL_CACHE_DIR", str(tmp_path))
    config.set_choices(matmul=None)
    tuned = []
    monkeypatch.setattr(tuner, "tune_shapes", lambda shapes, **kw: tuned.append(shapes))
    lines = []
    models.run(["mlp"], "tiny", steps=1, warmup=1, tune=True, profile=True, log=lines.append)
    # the MLP's Linear layers, batch 128: x Wᵀ forward, dyᵀ x for each weight gradient
    assert len(tuned) == 1, tuned
    for shape in [(128, 256, 784, False, True, 1), (128, 10, 256, False, True, 1),
                  (256, 784, 128, True, False, 1), (10, 256, 128, True, False, 1)]:  # fmt: skip
        assert shape in tuned[0], (shape, tuned)
    assert any(line.startswith("camel.profile:") for line in lines), lines


def test_models_bench_runs_both_sides_and_compares_rates():
    from camel.bench import models

    rows = models.run(["mlp"], "tiny", steps=1, warmup=1, log=lambda *_: None)
    sides = [r[1] for r in rows]
    assert sides[0] == "camel mps"
    name, side, ms, rate, unit, host = rows[0]
    assert unit == "samples/s" and rate == pytest.approx(128 / (ms / 1000.0))
    assert host is not None and 0.0 <= host <= 1.0
    fake = [("mlp", "camel mps", 10.0, 100.0, "samples/s", 0.25),
            ("mlp", "PyTorch cuda", 5.0, 200.0, "samples/s", None)]  # fmt: skip
    text = models.table(fake, "dev", simulator=False, config="gpu")
    assert "| mlp | camel mps | 10.0 | 100 samples/s | 0.50 | 25% |" in text
