"""Stage 2 reductions (shaders/ops_reduce.metal) against the NumPy reference.

sum and max over the last axis (rows of 1 .. 10 000), over the whole tensor (two
passes), over leading and middle axes (the bias gradient), their backward, and
sum_to_shape, in all three simulator schedule orders. Ties in max: the first
maximum wins, as in np.argmax and camel/backend_cpu.py.
"""

import numpy as np
import pytest
from conftest import backend_mps_or_skip

import camel
import camel.functional as F
from camel import backend_cpu as cpu
from camel import config


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def host(mps, x):
    return np.array(mps.to_numpy(x))


def close(got, want, k=1):
    # float32 sums in a different order: error grows with the number of terms.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * max(1.0, np.sqrt(k)) * 4)


ROWS = [(1, 1), (3, 1), (2, 3), (4, 31), (5, 32), (3, 33), (2, 1000), (1, 4097), (2, 10000)]
# Version 2's geometry: a SIMD group per row (8 rows per threadgroup: 17 leaves a partial
# one), P = 2, 4, 8, 16 SIMD groups per row past 1024, 2048, 4096, 8192 floats (16: one row
# per threadgroup of 512, at most 16 even past 16384); K % 4 == 0 reads float4s.
ROWS_V2 = [(17, 1024), (9, 1028), (5, 2048), (3, 3001), (7, 4096), (2, 4100), (3, 8196),
           (2, 16388), (1, 20001)]  # fmt: skip


@pytest.fixture(params=[1, 2])
def version(request, monkeypatch, poisoned_memory):
    """CAMEL_MEMORY_KERNELS: 1 the lesson kernels, 2 the ones that fill a big GPU (on
    poisoned memory: an output a kernel forgets to write is NaN, not a recycled answer)."""
    config.set_choices(memory_kernels=str(request.param))
    return request.param


def unaligned(mps, x):
    """x on the device 4 bytes into its buffer: float4 loads are not allowed there."""
    from camel.metal import DeviceArray

    whole = mps.from_numpy(np.concatenate([[0.0], x.reshape(-1)]).astype(np.float32))
    return DeviceArray(x.shape, np.float32, whole.buffer, 4)


@pytest.mark.parametrize("shape", ROWS + ROWS_V2)
@pytest.mark.parametrize("keepdims", [False, True])
def test_sum_last_axis(mps, version, shape, keepdims):
    x = rand(*shape)
    got = host(mps, mps.sum(mps.from_numpy(x), 1, keepdims))
    want = cpu.sum(x, 1, keepdims)
    assert got.shape == want.shape
    close(got, want, shape[1])


class _Limit:
    def __init__(self, threads):
        self.max_total_threads_per_threadgroup = threads


@pytest.mark.parametrize("limit", [1024, 512, 448, 256, 192, 64, 32])
@pytest.mark.parametrize("k", [1, 1024, 1025, 3000, 8193, 16384, 50000])
def test_row_geometry_fits_the_kernels_thread_limit(limit, k):
    # A kernel whose registers allow fewer threads gets fewer SIMD groups per threadgroup,
    # always a multiple of P (a threadgroup never holds part of a row of the next one).
    from camel import backend_mps as mps

    rows = 37
    p, groups, tpg = mps._row_geometry(rows, k, _Limit(limit))
    simd_groups = tpg // 32
    assert tpg <= limit and simd_groups % p == 0 and p & (p - 1) == 0 and p <= 16
    assert groups * (simd_groups // p) >= rows > (groups - 1) * (simd_groups // p)
    most = 1 << (min(16, limit // 32).bit_length() - 1)  # SIMD groups a row may have
    assert mps._row_fits(_Limit(limit), k) == (k <= 1024 * most)


@pytest.mark.parametrize("shape", [(9, 1024), (3, 4096), (2, 36)])
def test_sum_and_max_last_axis_unaligned(mps, version, shape):
    # K % 4 == 0 but the data starts 4 bytes into its buffer: the float loads, not float4.
    x = ties(*shape, seed=15) + rand(*shape, seed=16) * np.float32(0.01)
    dx = unaligned(mps, x)
    close(host(mps, mps.sum(dx, 1, False)), cpu.sum(x, 1, False), shape[1])
    values, indices = mps.max(dx, 1, False)
    want_v, want_i = cpu.max(x, 1, False)
    np.testing.assert_array_equal(host(mps, values), want_v)
    np.testing.assert_array_equal(host(mps, indices), want_i)


@pytest.mark.parametrize("n", [1, 3, 31, 32, 33, 1000, 4097, 70001, 70002, 70003, 70004])
def test_sum_all_two_passes(mps, version, n):
    x = rand(n, seed=1)
    got = host(mps, mps.sum(mps.from_numpy(x), None, False))
    assert got.shape == ()
    close(got, np.sum(x, dtype=np.float64), n)


@pytest.mark.parametrize("memory", ["1", "2"])
def test_sum_all_grid_stride_many_elements_per_thread(monkeypatch, memory):
    # More than 1024 threadgroups' worth: each thread of pass 1 visits several elements.
    monkeypatch.setenv("CAMEL_SIM_ORDER", "random")
    config.set_choices(memory_kernels=memory)
    mps = backend_mps_or_skip()
    x = rand(3, 100_003, seed=2)
    got = host(mps, mps.sum(mps.from_numpy(x), None, True))
    assert got.shape == (1, 1)
    close(got, np.sum(x, dtype=np.float64).reshape(1, 1), x.size)


def test_sum_all_unaligned(mps, version):
    x = rand(70003, seed=21)
    got = host(mps, mps.sum(unaligned(mps, x), None, False))
    close(got, np.sum(x, dtype=np.float64), x.size)


# Version 2's column sum: blocks of >= 64 rows (two passes past 64 rows), 32 columns per
# threadgroup in float4s (inner % 4 == 0) or floats; (1000, 260): 65 float4 columns, three
# threadgroups wide, the last one partial; (3, 500, 8): 8 blocks of 63 rows per slab.
COLUMNS = [((4097, 3), 0), ((16, 10), 0), ((3, 5, 7), 1), ((2, 3, 4), 0), ((33, 1), 0),
           ((1000, 260), 0), ((300, 130), 0), ((3, 500, 8), 1), ((65, 4), 0), ((1, 33), 0),
           ((20000, 16), 0)]  # fmt: skip


@pytest.mark.parametrize("shape, axis", COLUMNS)
def test_sum_leading_and_middle_axes(mps, version, shape, axis):
    x = rand(*shape, seed=3)
    got = host(mps, mps.sum(mps.from_numpy(x), axis, False))
    # Against float64: version 2 adds in blocks, version 1 one long float32 chain (its
    # rounding error grows faster: 16x the terms' tolerance)
    close(got, x.sum(axis, dtype=np.float64), shape[axis] * (16 if version == 1 else 1))


def test_sum_leading_axis_unaligned(mps, version):
    x = rand(300, 64, seed=17)
    close(host(mps, mps.sum(unaligned(mps, x), 0, False)), cpu.sum(x, 0, False), 300)


def test_column_sum_is_deterministic(mps):
    # Two passes in a fixed order: the same bits every run, whatever the schedule.
    x = rand(5000, 36, seed=18) * np.float32(1e3)
    dx = mps.from_numpy(x)
    first = host(mps, mps.sum(dx, 0, False))
    for _ in range(3):
        np.testing.assert_array_equal(host(mps, mps.sum(dx, 0, False)), first)


@pytest.mark.parametrize(
    "grad_shape, shape",
    [((16, 10), (10,)), ((2, 3, 4), (3, 4)), ((4097, 1), (1,)), ((3, 4), ()), ((5,), (5,)),
     ((257, 3, 40), (3, 40)), ((2, 129, 7), (7,))],
)  # fmt: skip
def test_sum_to_shape(mps, version, grad_shape, shape):
    g = rand(*grad_shape, seed=4)
    got = host(mps, mps.sum_to_shape(mps.from_numpy(g), shape))
    want = cpu.sum_to_shape(g, shape)
    assert got.shape == want.shape
    close(got, want, g.size)


@pytest.mark.parametrize(
    "in_shape, axis, keepdims",
    [((3, 33), 1, False), ((3, 33), 1, True), ((4, 5, 6), 1, False), ((7,), None, False)],
)
def test_sum_backward(mps, in_shape, axis, keepdims):
    out_shape = cpu.sum(np.zeros(in_shape, np.float32), axis, keepdims).shape
    g = rand(*out_shape, seed=5) if out_shape else np.array(1.5, np.float32)
    got = host(mps, mps.sum_backward(mps.from_numpy(g), in_shape, axis))
    np.testing.assert_array_equal(got, cpu.sum_backward(g, in_shape, axis))


def ties(*shape, seed=0):
    """Small integers: many equal maxima per row, so the tie rule is exercised."""
    return np.random.default_rng(seed).integers(-3, 4, size=shape).astype(np.float32)


@pytest.mark.parametrize("shape", ROWS + ROWS_V2)
def test_max_last_axis_first_maximum_wins(mps, version, shape):
    x = ties(*shape, seed=6)
    values, indices = mps.max(mps.from_numpy(x), 1, False)
    want_v, want_i = cpu.max(x, 1, False)
    np.testing.assert_array_equal(host(mps, values), want_v)
    np.testing.assert_array_equal(host(mps, indices), want_i)
    assert host(mps, indices).dtype == np.int32


@pytest.mark.parametrize("n", [1, 33, 4097, 70001])
def test_max_all(mps, n):
    x = ties(n, seed=7)
    values, indices = mps.max(mps.from_numpy(x), None, False)
    want_v, want_i = cpu.max(x, None, False)
    assert host(mps, values).shape == ()
    np.testing.assert_array_equal(host(mps, values), want_v)
    np.testing.assert_array_equal(host(mps, indices), want_i)


def test_max_all_tie_in_the_last_threadgroup_loses_to_the_first(mps):
    x = np.zeros(70001, dtype=np.float32)
    x[[69000, 513, 40000]] = 5.0  # three maxima in different pass-1 threadgroups
    values, indices = mps.max(mps.from_numpy(x), None, True)
    assert host(mps, values).shape == (1,)
    assert int(host(mps, indices)[0]) == 513


@pytest.mark.parametrize("k", [37, 3000, 4100])
def test_max_with_minus_inf_entries(mps, version, k):
    x = rand(4, k, seed=8)
    x[:, ::3] = -np.inf
    x[2, :] = -np.inf  # a row of -inf everywhere: the max is -inf at index 0
    values, indices = mps.max(mps.from_numpy(x), 1, False)
    want_v, want_i = cpu.max(x, 1, False)
    np.testing.assert_array_equal(host(mps, values), want_v)
    np.testing.assert_array_equal(host(mps, indices), want_i)


@pytest.mark.parametrize("k", [40, 1024, 3000, 8192, 12000])
def test_max_nan_beats_inf_and_the_first_nan_wins(mps, version, k):
    # Rows of many SIMD groups (k = 3000: 4, 8192: 8, 12000: 16): specials in different ones.
    x = rand(6, k, seed=19)
    x[0, k // 3], x[0, k - 1] = np.inf, np.nan  # NaN after +inf: NaN wins
    x[1, k - 2], x[1, 5] = np.nan, np.nan  # two NaNs: the first one's index
    x[2, 1], x[2, k - 1] = np.inf, np.inf  # two +inf: the first
    x[3, :] = np.nan
    x[4, k // 2 :] = np.nan
    values, indices = mps.max(mps.from_numpy(x), 1, False)
    np.testing.assert_array_equal(host(mps, indices), np.argmax(x, axis=1))
    np.testing.assert_array_equal(host(mps, values), np.max(x, axis=1))  # NaN == NaN here


@pytest.mark.parametrize("shape, axis", [((4097, 3), 0), ((3, 5, 7), 1), ((2, 3, 4), 0)])
def test_max_leading_and_middle_axes(mps, shape, axis):
    x = ties(*shape, seed=9)
    values, indices = mps.max(mps.from_numpy(x), axis, True)
    want_v, want_i = cpu.max(x, axis, True)
    np.testing.assert_array_equal(host(mps, values), want_v)
    np.testing.assert_array_equal(host(mps, indices), want_i)


@pytest.mark.parametrize(
    "in_shape, axis, keepdims", [((3, 33), 1, False), ((4, 5, 6), 1, True), ((37,), None, False)]
)
def test_max_backward(mps, in_shape, axis, keepdims):
    x = ties(*in_shape, seed=10)
    _, idx = cpu.max(x, axis, keepdims)
    g = rand(*idx.shape, seed=11) if idx.shape else np.array(2.0, np.float32)
    got = mps.max_backward(mps.from_numpy(g), mps.from_numpy(idx), in_shape, axis)
    np.testing.assert_array_equal(host(mps, got), cpu.max_backward(g, idx, in_shape, axis))


def test_max_over_an_empty_axis_is_an_error(mps):
    with pytest.raises(ValueError, match=r"\[max\].*empty"):
        mps.max(mps.from_numpy(np.zeros((3, 0), np.float32)), 1, False)


# ---------------------------------------------------------------------------
# op tests through the Tensor API on "cpu" and "mps"
# ---------------------------------------------------------------------------


@pytest.fixture(params=["cpu", "mps"])
def device(request):
    if request.param == "mps":
        backend_mps_or_skip()
    return request.param


def test_op_sum_mean_max_backward(device):
    x_np = ties(5, 33, seed=12) + rand(5, 33, seed=13) * np.float32(0.01)
    x = camel.tensor(x_np, requires_grad=True, device=device)
    w = rand(5, seed=14)
    loss = (x.sum(axis=1) * camel.tensor(w, device=device)).sum() + x.max(axis=-1).values.sum()
    loss = loss + x.mean()
    loss.backward()
    onehot = np.zeros_like(x_np)
    onehot[np.arange(5), x_np.argmax(1)] = 1
    want = w[:, None] + onehot + 1.0 / x_np.size
    np.testing.assert_allclose(x.grad.numpy(), want, rtol=1e-5, atol=1e-6)
    want_loss = (x_np.sum(1) * w).sum() + x_np.max(1).sum() + x_np.mean()
    np.testing.assert_allclose(loss.item(), want_loss, rtol=1e-5, atol=1e-4)


def test_op_reduction_over_missing_axis_is_a_clear_error(device):
    x = camel.tensor(rand(2, 3), device=device)
    with pytest.raises((ValueError, IndexError), match="axis"):
        F.sum(x, axis=2)


@pytest.mark.parametrize("axis", [1, 0, None])
def test_version_2_refuses_arrays_its_32_bit_indices_cannot_address(monkeypatch, axis):
    # The limit (about 2^32 elements, 16 GiB of float32) is real on a large GPU; lowered here.
    mps = backend_mps_or_skip()
    monkeypatch.setattr(mps, "_V2_MAX_ELEMENTS", 100)
    x = mps.from_numpy(rand(2, 60))
    with pytest.raises(ValueError, match=r"\[sum\] 120 elements: .*32-bit integers, at most 100"):
        mps.sum(x, axis, False)
    for op in (mps.softmax, mps.log_softmax, mps.gelu):
        with pytest.raises(ValueError, match=r"120 elements"):
            op(x)
    config.set_choices(memory_kernels="1")  # the lesson kernels: no such check
    close(host(mps, mps.sum(x, axis, False)), cpu.sum(rand(2, 60), axis, False), 120)
