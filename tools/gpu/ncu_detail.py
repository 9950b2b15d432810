"""One launch of each kernel that misses its H200 goal, for `ncu`'s detailed sections
(tools/gpu/h200.sh ncu_detail): the memory-bound kernels under 70 % of the copy bandwidth
(softmax / log_softmax / cross-entropy forward, LayerNorm backward) next to two that reach
it (softmax backward, LayerNorm forward v4), version 3 of the softmax family on rows of
16384 floats (the cross-entropy forward's kernel and its mean over rows), the best GEMM
rung at 4096^3, the best flash rung at T = 4096 (v7), v9 (v7 with the next K/V chunk
staged in registers), v10 (scalar FMAs, no simdgroup_matrix) and v11 (v10 with its lanes
paired: fewer shared-memory wavefronts a read, tools/bank_calc.py) and v12 (v11 with the
heaviest query tiles started first). The report's sections
(issue slots, warp stalls, occupancy, memory) say whether each is bound by memory, by
instruction issue or by latency."""

import numpy as np

from camel import backend_mps as mps
from camel import config, flash, gemm, metal

rng = np.random.default_rng(0)
n, d = 65536, 1024  # 256 MiB, the bench's largest shape
x = mps.from_numpy(rng.standard_normal((n, d), dtype=np.float32))
g = mps.from_numpy(rng.standard_normal((n, d), dtype=np.float32))
t = mps.from_numpy(rng.integers(0, d, n).astype(np.int32))
w = mps.from_numpy(rng.standard_normal(d, dtype=np.float32))
b = mps.from_numpy(rng.standard_normal(d, dtype=np.float32))
y = mps.softmax(x)
mps.log_softmax(x)
mps.softmax_backward(y, g)
mps.cross_entropy(x, t)
_, mean, rstd = mps.layer_norm(x, w, b, 1e-5)
mps.layer_norm_backward(g, x, w, mean, rstd)
with config.choices(layernorm_backward="3"):  # v3 next to the default
    mps.layer_norm_backward(g, x, w, mean, rstd)
metal.synchronize()
# rows too wide for registers (1024, 16384), 64 MiB: version 3 by default; the
# cross-entropy's mean over rows and its target check is a second kernel
# (cross_entropy_mean), timed here too
wide = (1024, 16384)
xw = mps.from_numpy(rng.standard_normal(wide, dtype=np.float32))
gw = mps.from_numpy(rng.standard_normal(wide, dtype=np.float32))
tw = mps.from_numpy(rng.integers(0, wide[1], wide[0]).astype(np.int32))
mps.softmax_backward(mps.softmax(xw), gw)
mps.cross_entropy(xw, tw)
metal.synchronize()
a, bb = (metal.DeviceArray.from_numpy(rng.standard_normal((4096, 4096), dtype=np.float32))
         for _ in "ab")  # fmt: skip
gemm.matmul(a, bb, version="9")
metal.synchronize()
q, k, v = (metal.DeviceArray.from_numpy(rng.standard_normal((1, 16, 4096, 64), dtype=np.float32))
           for _ in "qkv")  # fmt: skip
flash.forward(q, k, v, True, rung="flash_v7")
metal.synchronize()
# v9: v7 with the next K/V chunk staged in registers; its warp stalls next to v7's say
# whether the waits for device memory inside a SIMD group were what it removed
flash.forward(q, k, v, True, rung="flash_v9")
metal.synchronize()
# v10: no simdgroup_matrix (scalar FMAs on 4 x 4 register tiles); its FMA-pipe use and
# stalls next to v9's say whether the tensor-core translation was what held flash back
flash.forward(q, k, v, True, rung="flash_v10")
metal.synchronize()
flash.forward(q, k, v, True, rung="flash_v10_32x32")  # half the rows a threadgroup
metal.synchronize()
# v11: v10 with its lanes paired; its shared-load wavefronts (l1tex__data_pipe_lsu_
# wavefronts_mem_shared_op_ld) next to v10's test the bank_calc model (768 against 448 a
# SIMD group and key block)
flash.forward(q, k, v, True, rung="flash_v11")
metal.synchronize()
# v12: v11 with the heaviest query tiles first; its SM-busy share (SpeedOfLight) and
# duration next to v11's test the launch-order model (roofline.schedule_table)
flash.forward(q, k, v, True, rung="flash_v12")
metal.synchronize()
print("one launch per kernel done")
