"""tools/check_install_smoke.py — run by tools/check-install.sh inside a fresh venv, from a
directory outside the checkout: the installed camel must do real "mps" work on its own."""

import sys
from pathlib import Path

import numpy as np

import camel
import camel.metal as metal

checkout = Path(sys.argv[1]).resolve()
package = Path(camel.__file__).resolve().parent
assert checkout not in package.parents, f"camel was imported from the checkout: {package}"
assert metal.SHADERS_DIR.is_relative_to(package), f"shaders from {metal.SHADERS_DIR}"

# a matmul at awkward sizes, against NumPy
rng = np.random.default_rng(0)
a = rng.standard_normal((33, 17)).astype(np.float32)
b = rng.standard_normal((17, 31)).astype(np.float32)
got = (camel.tensor(a, device="mps") @ camel.tensor(b, device="mps")).numpy()
np.testing.assert_allclose(got, a @ b, rtol=1e-5, atol=1e-5)

# a kernel of our own, compiled at run time (the simulator needs its headers for this)
source = """
#include <metal_stdlib>
using namespace metal;
kernel void twice_plus_one(device float *x [[buffer(0)]], uint i [[thread_position_in_grid]]) {
    x[i] = 2.0f * x[i] + 1.0f;
}
"""
fn = metal.compile(source, "check_install.metal").function("twice_plus_one")
x = metal.DeviceArray.from_numpy(np.arange(37, dtype=np.float32))
fn(x, threads=37, threads_per_threadgroup=32)
metal.synchronize()
np.testing.assert_array_equal(x.numpy(), 2 * np.arange(37, dtype=np.float32) + 1)

print(f"check-install: ok: camel from {package} on {metal.device_name()}")
