"""One launch of every GEMM rung (M = N = K = 2048) and every flash rung (B = 1, H = 16,
T = 4096, D = 64, causal), nothing else: the program `ncu` profiles in tools/gpu/h200.sh,
so each kernel in its report is one rung (the entries are named after the kernels)."""

import numpy as np

from camel import flash, gemm, metal

rng = np.random.default_rng(0)
a, b = (metal.DeviceArray.from_numpy(rng.standard_normal((2048, 2048), dtype=np.float32))
        for _ in "ab")  # fmt: skip
for v in gemm.versions():
    if gemm.fits(gemm.get_rung(v)):
        gemm.matmul(a, b, version=v)
        metal.synchronize()
q, k, v = (metal.DeviceArray.from_numpy(rng.standard_normal((1, 16, 4096, 64), dtype=np.float32))
           for _ in "qkv")  # fmt: skip
for name in flash.RUNGS:
    flash.forward(q, k, v, True, rung=name)
    metal.synchronize()
print("one launch per rung done")
