"""Shared test fixtures: the devices every op test runs on.

`device` is "cpu", plus "mps" when camel/backend_mps.py exists and a shim
(the Metal shim on a Mac, the simulator elsewhere) loads. So the same op
tests run on the simulator in CI as soon as the Metal backend lands.
CAMEL_TEST_DEVICES=cpu (or cpu,mps) overrides the choice.
"""

import ctypes
import importlib.util
import os

# NumPy's OpenBLAS threads spin for a while after every matrix product, on the cores the
# simulator's workers need: on a 2-core machine a third of test_flash.py's CPU time went to
# that spinning. One BLAS thread is plenty for the tests' reference results. (Set before
# NumPy is imported; an explicit OPENBLAS_NUM_THREADS wins.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _mps_available():
    if importlib.util.find_spec("camel.backend_mps") is None:
        return False
    try:
        import camel.backend_mps  # noqa: F401
        import camel.metal

        camel.metal.device_name()  # loads (or builds) the shim and creates the device
    except Exception:
        return False
    return True


def _devices():
    # CAMEL_TEST_DEVICES=cpu (or "cpu,mps") picks the devices by hand, e.g. to
    # run the op tests without touching the simulator.
    chosen = os.environ.get("CAMEL_TEST_DEVICES")
    if chosen:
        return [d.strip() for d in chosen.split(",") if d.strip()]
    return ["cpu"] + (["mps"] if _mps_available() else [])


DEVICES = _devices()


@pytest.fixture(params=DEVICES)
def device(request):
    """Each test that takes `device` runs once per available device."""
    return request.param


@pytest.fixture
def devices():
    """All available devices, for tests that compare them."""
    return list(DEVICES)


@pytest.fixture(autouse=True)
def _choices_last_one_test():
    """config.set_choices(...) in a test lasts for that test, as monkeypatch.setenv would."""
    from camel import config

    with config.choices():
        yield


@pytest.fixture(autouse=True)
def _fresh_matmul_decisions():
    """Each test starts with gemm.matmul() deciding afresh, as a new process would: tests
    monkeypatch the rules it caches its decisions by (choose_version, device_limits, the
    shim, the tuning cache)."""
    from camel import gemm

    gemm.forget()


@pytest.fixture(autouse=True)
def _no_pending_gpu_checks():
    """A test that leaves a GPU check unread (a cross_entropy whose loss it never reads)
    fails itself: unread, a failed check (an out-of-range target) would be raised by the
    next test's first synchronize(), and a passed one hides a result nobody looked at."""
    from camel.metal import buffers

    yield
    pending, buffers._checks[:] = list(buffers._checks), []
    assert not pending, f"{len(pending)} GPU check(s) left unread: read the result or synchronize()"


@pytest.fixture
def rng():
    """A fresh, seeded NumPy generator per test (tests never share random state)."""
    return np.random.default_rng(1234)


# ---- the Metal backend's kernel tests ------------------------------------------------


def _on_simulator():
    try:
        from camel import metal

        return metal.shim() == "sim"
    except Exception:
        return True  # no shim: the tests that need one skip or fail on their own


# The simulator's schedules (CAMEL_SIM_ORDER). On a GPU (Metal, CUDA) there is one
# schedule, the hardware's: the parametrisation is a no-op there, run once.
ON_SIMULATOR = _on_simulator() if "mps" in DEVICES else True
ORDERS = ["forward", "reverse", "random"] if ON_SIMULATOR else ["forward"]


# ---- pytest-xdist (`make test` runs `-n auto --dist loadgroup`) -------------------------
#
# The suite's time is mostly clang compiling kernels (single-threaded) into the kernel
# cache, which processes share safely (each entry is written to a temporary file and
# renamed). One worker per CPU; each test module is one group, run by one worker, so its
# module fixtures (and the kernels they compile) are made once. A few long tests that
# compile a big shader file on their own (the PTX of each arch, the ASan builds in a
# subprocess) are groups of their own, so they overlap with the rest. The
# CUDA tests that compile a whole shader file for an arch go with that arch's PTX test:
# they hit its cache entries instead of compiling the same file at the same time.
def _arch_group(item):
    return f"ptx-sm{item.callspec.params.get('arch', 90)}"


OWN_GROUP = {
    "tests/test_cuda_translate.py::test_every_shader_compiles_to_ptx": _arch_group,
    "tests/test_cuda_translate.py::test_gemm_register_arrays_stay_in_registers": _arch_group,
    "tests/test_cuda_translate.py::test_description_lines_of_a_few_kernels": "ptx-sm90",
    "tests/test_cuda_translate.py::test_description_flags_count_calls_and_host_names_are_joined": (
        "ptx-sm90"
    ),
    "tests/test_cuda_translate.py::test_simdgroup_matrix_modes": "ptx-sm90",
    "tests/test_flash.py::test_every_forward_rung_under_address_sanitizer": "asan-flash",
    "tests/test_gemm.py::test_every_rung_under_address_sanitizer": "asan-gemm",
}


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per CPU this process may use (xdist's own default counts
    physical cores where psutil is installed: 1 on a VM whose 2 CPUs are one core's two
    threads). PYTEST_XDIST_AUTO_NUM_WORKERS still wins (xdist's hook reads it)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


# xdist hands out the biggest groups (most tests) first, so these, one long test each,
# would come last and run alone at the end: they go first instead, longest first.
FIRST = ["asan-gemm", "asan-flash", "ptx-sm80", "ptx-sm90"]


def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup with the groups in FIRST handed out before the rest."""
    if config.getvalue("dist") != "loadgroup":
        return None
    try:
        from xdist.scheduler import LoadGroupScheduling
    except ImportError:  # pragma: no cover - another xdist: its own order
        return None

    class LongFirst(LoadGroupScheduling):
        def _assign_work_unit(self, node):
            queue = getattr(self, "workqueue", None)
            if hasattr(queue, "move_to_end"):
                for group in reversed(FIRST):
                    if group in queue:
                        queue.move_to_end(group, last=False)
            super()._assign_work_unit(node)

    return LongFirst(config, log)


def _xdist_groups(config, items):
    if not getattr(config.option, "loadgroup", False):  # an xdist worker under loadgroup
        return
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
        group = OWN_GROUP.get(item.nodeid.split("[")[0], module)
        if callable(group):
            group = group(item)
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Tests parametrised over an `order` of their own run once on a GPU shim."""
    _xdist_groups(config, items)
    if ON_SIMULATOR:
        return
    skip = pytest.mark.skip(reason="schedule orders are the simulator's; a GPU has one")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("order", "forward") != "forward":
            item.add_marker(skip)


def backend_mps_or_skip():
    """camel.backend_mps with a working device, or skip the test saying why."""
    try:
        from camel import backend_mps, metal

        metal.device_name()
    except Exception as e:
        pytest.skip(f"no 'mps' device here: {e}")
    return backend_mps


@pytest.fixture(params=ORDERS)
def mps(request, monkeypatch):
    """camel.backend_mps, once per simulator schedule order."""
    monkeypatch.setenv("CAMEL_SIM_ORDER", request.param)
    return backend_mps_or_skip()


def require_shim():
    """Skip the calling test module when the shim cannot be built or loaded here; in CI
    (CI set) that is an error instead, so a broken build never passes as skips."""
    from camel import metal

    try:
        metal.device_name()  # loads the shim, building it once if needed
    except metal.MetalError as e:  # pragma: no cover - only where the shim cannot be built
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the camel shim cannot be built or loaded: {e}", allow_module_level=True)


def asan_runtime_or_skip():
    """Path of clang's AddressSanitizer runtime, to LD_PRELOAD into a Python subprocess
    running kernels built with CAMEL_SIM_SANITIZE=address; skips the test without it."""
    import platform
    import subprocess

    name = f"libclang_rt.asan-{platform.machine()}.so"
    for cc in ("clang-19", "clang-18", "clang-17", "clang-16", "clang"):
        try:
            r = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True)
        except FileNotFoundError:
            continue
        path = r.stdout.strip()
        if os.path.isabs(path) and os.path.exists(path):
            return path
    pytest.skip("no ASan runtime (Debian: apt-get install libclang-rt-19-dev)")


def run_under_asan(script: str, *args: str, timeout: int = 600):
    """Run `python -c script args` with the simulator's kernels built under ASan (the runtime
    must be loaded before Python, hence a subprocess). Skips without the runtime."""
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, CAMEL_SIM_SANITIZE="address", LD_PRELOAD=asan_runtime_or_skip(),
               ASAN_OPTIONS="detect_leaks=0",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))  # fmt: skip
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


# ---- the simulator's library description (shim/front/sim_abi.h), read with ctypes ------


class SimParam(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("kind", ctypes.c_int32),
        ("index", ctypes.c_int32),
        ("value_size", ctypes.c_uint32),
        ("is_pointer", ctypes.c_int32),
        ("writable", ctypes.c_int32),
        ("align", ctypes.c_uint32),
        ("left_out", ctypes.c_char_p),
    ]


class SimKernel(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("entry", ctypes.c_void_p),
        ("nparams", ctypes.c_int32),
        ("params", ctypes.POINTER(SimParam)),
        ("max_buffer_index", ctypes.c_int32),
        ("needs_fibers", ctypes.c_int32),
        ("group_entry", ctypes.c_void_p),
    ]


class SimLibrary(ctypes.Structure):
    _fields_ = [
        ("abi_version", ctypes.c_int32),
        ("nkernels", ctypes.c_int32),
        ("kernels", ctypes.POINTER(SimKernel)),
    ]


def sim_library_description(source: str, path: str) -> SimLibrary:
    """The description the simulator's runtime reads from the kernel library of `source`
    (camel_sim_compile: the kernel cache entry metal.compile(source, path) uses too)."""
    from camel import metal

    shim = ctypes.CDLL(metal._native()._name)
    compile_ = shim.camel_sim_compile
    compile_.restype = ctypes.c_int
    compile_.argtypes = [ctypes.c_char_p, ctypes.c_char_p] + [ctypes.POINTER(ctypes.c_char_p)] * 2
    so, log = ctypes.c_char_p(), ctypes.c_char_p()
    rc = compile_(source.encode(), path.encode(), ctypes.byref(so), ctypes.byref(log))
    assert rc == 0, log.value.decode() if log.value else path
    lib = ctypes.CDLL(so.value.decode())  # ctypes never unloads it: the pointers stay valid
    lib.camel_sim_library.restype = ctypes.POINTER(SimLibrary)
    return lib.camel_sim_library().contents


# ---- memory that is not zero: edge bugs change numbers ---------------------------------
#
# The simulator zero-fills new buffers, so a kernel that reads one element past its data
# often meets a 0 (added or multiplied away) and no numeric test notices.

SLACK = 256  # bytes of NaN on each side (a multiple of 16 keeps float4 alignment)


_nan_payloads = iter(range(1, 1 << 22))  # each buffer's slack gets its own NaN bits


class NanSlack:
    """The NaN around an array placed by in_nan_slack. Its bits are this buffer's own
    quiet NaN (0x7FC00000 | a counter): a value computed from another buffer's slack
    and written here still changes them."""

    def __init__(self, whole, pattern, nbytes):
        self.whole, self.pattern, self.n = whole, pattern, nbytes // 4

    def intact(self) -> bool:
        raw, k = self.whole.numpy(), SLACK // 4
        return bool((raw[:k] == self.pattern).all() and (raw[k + self.n :] == self.pattern).all())


def in_nan_slack(arr):
    """(DeviceArray holding arr, NanSlack): arr sits SLACK bytes into a buffer that is NaN
    everywhere else, so a read past its edges yields NaN and .intact() sees a write."""
    from camel import metal

    arr = np.ascontiguousarray(arr)
    buf = metal.Buffer(arr.nbytes + 2 * SLACK, host_write=True)
    whole = metal.DeviceArray((buf.nbytes // 4,), np.uint32, buf)
    pattern = 0x7FC00000 | next(_nan_payloads)
    whole.numpy()[...] = pattern
    d = metal.DeviceArray(arr.shape, arr.dtype, buf, offset=SLACK)
    d.numpy()[...] = arr
    return d, NanSlack(whole, pattern, arr.nbytes)


@pytest.fixture
def poisoned_memory():
    """Every buffer allocated during the test starts as 0xFF bytes (NaN floats, -1 ints)
    instead of zeros: outputs a kernel forgets to write, and reads past the end of an
    array's data into its size class's slack, show up as NaN."""
    from camel import metal

    metal.synchronize()
    metal.empty_cache()  # later allocations come fresh from the shim, poisoned
    metal.buffers.poison_byte = 0xFF
    try:
        yield
    finally:
        metal.buffers.poison_byte = None
        metal.synchronize()
        metal.empty_cache()  # no poisoned block is recycled into another test
