"""examples/transformer_block.py (Stage 4's milestone): residual LayerNorm + GELU MLP blocks
train on "cpu" and "mps", and the two devices agree step for step."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TEXT = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 30


def load_example():
    path = ROOT / "examples" / "transformer_block.py"
    spec = importlib.util.spec_from_file_location("example_transformer_block", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(tmp_path, device):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    args = ["--device", device, "--data", str(data), "--steps", "25", "--batch-size", "32",
            "--d-model", "16", "--n-blocks", "2", "--lr", "1e-2", "--log-every", "25"]  # fmt: skip
    return load_example().main(args)["losses"]


def test_transformer_block_trains_on_cpu_and_mps(tmp_path, capsys):
    cpu = run(tmp_path, "cpu")
    assert np.mean(cpu[-5:]) < cpu[0] - 1.0, cpu
    try:
        from camel import metal

        metal.device_name()
    except Exception as e:
        pytest.skip(f"no 'mps' device here: {e}")
    mps = run(tmp_path, "mps")
    out = capsys.readouterr().out
    assert "ms/step" in out
    # the same seed, data and weights: the kernels follow the NumPy reference step by step
    np.testing.assert_allclose(mps[:10], cpu[:10], rtol=1e-3, atol=1e-4)
    assert np.mean(mps[-5:]) < mps[0] - 1.0, mps
