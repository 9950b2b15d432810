"""camel.metal.loading — the shim and its device: which library to load (`_shim_choice`,
`_shim_candidates`), building it when it is missing (`_build_shim`), loading and
initialising it once (`_native`), the device's name and limits, command buffers and their
times, and GPU capture (CAMEL_CAPTURE).

The state of the loaded shim lives here and is set once by _native(): `_lib`, `_is_sim`,
`_shim_kind`, `_mirrors`. The modules that build on this one (buffers, kernels, vendor)
read it as `loading._lib` etc.: a `from ... import _lib` would copy the None it held at
import.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import subprocess
import sys
from pathlib import Path

from camel import config
from camel.metal.abi import ABI_VERSION, MetalError, _declare, _DeviceInfo

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # camel/
_REPO_DIR = _PACKAGE_DIR.parent
# An installed camel (pip install ., a wheel) carries the built shim, the shaders and the
# simulator's headers in camel/_native/ (see setup.py); a checkout uses shim/build/ and shaders/.
_NATIVE_DIR = _PACKAGE_DIR / "_native"
_INSTALLED = (_NATIVE_DIR / "shaders").is_dir()
SHADERS_DIR = _NATIVE_DIR / "shaders" if _INSTALLED else _REPO_DIR / "shaders"
_SHIM_BUILD_DIR = _NATIVE_DIR if _INSTALLED else _REPO_DIR / "shim" / "build"
_REBUILD = f"make -C {_REPO_DIR / 'shim'} clean shim"  # what a stale shim's message says

# ---- loading the shim -----------------------------------------------------------

_lib: ctypes.CDLL | None = None  # set once by _native()
_is_sim = False
_shim_kind = ""  # "metal", "sim" or "cuda" once loaded
_mirrors = False  # buffers have host mirrors (CUDA shim): copy at sync points
_shutting_down = False


def _cuda_device_present() -> bool:
    """True when libcuda.so.1 loads and sees at least one device (the Linux default)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    try:
        return (
            cuda.cuInit(0) == 0
            and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0
            and (count.value > 0)
        )
    except AttributeError:
        return False


def _shim_choice() -> str:
    """'metal', 'sim' or 'cuda', from the platform and $CAMEL_SHIM."""
    want = config.shim()
    if want not in ("", "metal", "sim", "cuda"):
        raise MetalError(f"[metal] CAMEL_SHIM must be 'metal', 'sim' or 'cuda', got {want!r}")
    if sys.platform == "darwin":
        if want == "cuda":
            raise MetalError(
                "[metal] CAMEL_SHIM=cuda needs Linux with an NVIDIA GPU; on macOS use "
                "CAMEL_SHIM=metal (the default) or CAMEL_SHIM=sim."
            )
        return want or "metal"
    if want == "metal":
        raise MetalError(
            f"[metal] CAMEL_SHIM=metal needs macOS with an Apple GPU; this is {sys.platform}. "
            "Here use CAMEL_SHIM=cuda (an NVIDIA GPU) or CAMEL_SHIM=sim (the CPU simulator), "
            "or unset CAMEL_SHIM."
        )
    if want:
        return want
    return "cuda" if _cuda_device_present() else "sim"


def _shim_candidates(choice: str) -> list[Path]:
    build = _SHIM_BUILD_DIR
    if choice == "metal":
        return [build / "libcamel_metal.dylib"]
    if choice == "cuda":
        return [build / "libcamel_cuda.so"]
    return [build / "libcamel_sim.so", build / "libcamel_sim.dylib"]


def _build_shim() -> None:
    """Run `make -C <repo>/shim shim` once; raise with the tail of its output if it fails."""
    shim_dir = _REPO_DIR / "shim"
    if not (shim_dir / "Makefile").exists():
        raise MetalError(
            f"[metal] the native shim is not built and there is no {shim_dir}/Makefile to "
            "build it; run camel from a source checkout (pip install -e .)"
        )
    print(f"[camel.metal] building the native shim: make -C {shim_dir} shim", file=sys.stderr)
    try:
        proc = subprocess.run(
            ["make", "-C", str(shim_dir), "shim"],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError as e:
        raise MetalError(f"[metal] cannot build the shim: {e} (is `make` installed?)") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise MetalError(
            f"[metal] building the shim failed (make -C {shim_dir} shim, exit "
            f"{proc.returncode}):\n{tail}"
        )


def _native() -> ctypes.CDLL:
    """The loaded, initialised shim; loads (and if needed builds) it on first use."""
    global _lib, _is_sim, _shim_kind, _mirrors
    if _lib is not None:
        return _lib
    choice = _shim_choice()
    candidates = _shim_candidates(choice)
    override = config.shim_library()  # an explicit .so/.dylib path
    if override:
        candidates = [Path(override)]
        if not candidates[0].exists():
            raise MetalError(f"[metal] CAMEL_SHIM_LIBRARY={override} does not exist")
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        _build_shim()
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise MetalError(
                f"[metal] `make shim` succeeded but did not produce {candidates[0]}; "
                + ("try CAMEL_SHIM=sim" if choice == "metal" else "check shim/Makefile")
            )
    _enable_capture(choice, config.capture(), os.environ)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise MetalError(f"[metal] cannot load {path}: {e}") from None
    _declare(lib, _REBUILD)
    version = lib.camel_abi_version()
    if version != ABI_VERSION:
        raise MetalError(
            f"[metal] {path.name} speaks ABI version {version}, camel.metal expects "
            f"{ABI_VERSION}; rebuild it: {_REBUILD}"
        )
    if lib.camel_init() != 0:
        msg = _error_text(lib)
        if choice == "cuda":  # no fallback: the user asked for the GPU (or it was probed)
            raise MetalError(f"[metal] no CUDA device ({path.name}): {msg}")
        hint = (
            " Set CAMEL_SHIM=sim to run kernels on the CPU simulator instead."
            if choice == "metal"
            else ""
        )
        raise MetalError(f"[metal] no Metal device ({path.name}): {msg}.{hint}")
    info = _DeviceInfo()
    if lib.camel_device_info_get(ctypes.byref(info)) != 0:
        raise MetalError(f"[metal] camel_device_info_get: {_error_text(lib)}")
    _is_sim = bool(info.is_simulator)
    _mirrors = bool(info.host_mirrors)
    _shim_kind = "sim" if _is_sim else ("cuda" if _mirrors else "metal")
    _lib = lib
    _bind_hot_functions(lib)
    _start_capture_from_env()
    return lib


def _enable_capture(choice: str, capture: str, environ) -> None:
    """Metal allows a capture to a .gputrace file only when MTL_CAPTURE_ENABLED=1 is in the
    environment as Metal loads, i.e. before the shim is loaded: set it in `environ` when
    `capture` (CAMEL_CAPTURE) asks for one (a value the user set is kept)."""
    if choice == "metal" and capture:
        environ.setdefault("MTL_CAPTURE_ENABLED", "1")


def _start_capture_from_env() -> None:
    """CAMEL_CAPTURE=run.gputrace: capture the whole run for Xcode's Metal debugger."""
    path = config.capture()
    if not path:
        return
    if _is_sim:
        print("[camel.metal] CAMEL_CAPTURE is ignored: GPU capture needs Metal, and this is "
              "the simulator", file=sys.stderr)  # fmt: skip
        return
    capture_begin(path)
    print(f"[camel.metal] capturing GPU work to {path} (open it in Xcode)", file=sys.stderr)

    def stop() -> None:
        try:
            capture_end()
        except MetalError as e:
            print(f"[camel.metal] {e}", file=sys.stderr)

    atexit.register(stop)


def _error_text(lib: ctypes.CDLL | None = None) -> str:
    raw = (lib or _lib).camel_last_error()
    return raw.decode("utf-8", "replace") if raw else "(the shim gave no message)"


def _fail(what: str, cls: type[MetalError] = MetalError) -> MetalError:
    """An exception for a failed shim call: `[metal] what: <camel_last_error()>`."""
    return cls(f"[metal] {what}: {_error_text()}")


# Hot-path entry points, bound once after loading (saves an attribute lookup per call).
_c_dispatch = None
_c_commit = None
_c_completed = None


def _bind_hot_functions(lib: ctypes.CDLL) -> None:
    global _c_dispatch, _c_commit, _c_completed
    _c_dispatch = lib.camel_dispatch
    _c_commit = lib.camel_commit
    _c_completed = lib.camel_completed_id


@atexit.register
def _at_exit() -> None:
    # Buffers finalised during interpreter shutdown must not call into a shim that may
    # already be tearing down its worker threads; the OS reclaims the memory.
    global _shutting_down
    _shutting_down = True


# ---- the device, command buffers, timing, capture -------------------------------


def device_info() -> dict:
    """The device's name and limits, as a dict."""
    lib = _native()
    info = _DeviceInfo()
    if lib.camel_device_info_get(ctypes.byref(info)) != 0:
        raise _fail("camel_device_info_get")
    return {
        "name": info.name.decode("utf-8", "replace"),
        "is_simulator": bool(info.is_simulator),
        "max_threads_per_threadgroup": info.max_threads_per_threadgroup,
        "max_threadgroup_memory": info.max_threadgroup_memory,
        "simd_width": info.simd_width,
        "recommended_working_set": info.recommended_working_set,
    }


def device_name() -> str:
    """'Apple M1 Max', 'NVIDIA H200 (CUDA shim: MSL translated to PTX)', or the
    simulator's name (it says 'simulator')."""
    return device_info()["name"]


def is_simulator() -> bool:
    """True when kernels run on the CPU simulator (shim/sim), not a GPU."""
    _native()
    return _is_sim


def shim() -> str:
    """Which shim runs the kernels: 'metal' (Apple GPU), 'cuda' (NVIDIA GPU, the MSL
    translated to PTX) or 'sim' (the CPU simulator)."""
    _native()
    return _shim_kind


def commit() -> int:
    """Send the open command buffer to the GPU without waiting. Returns its id (0: none open)."""
    return _native().camel_commit()


def completed_id() -> int:
    """Id of the newest command buffer known to have completed."""
    return _native().camel_completed_id()


def command_buffer_time(cb_id: int) -> tuple[float, float] | None:
    """(start, end) in seconds of a completed command buffer, or None if unknown.
    Metal: GPU timestamps. Simulator: wall time."""
    start, end = ctypes.c_double(), ctypes.c_double()
    if _native().camel_command_buffer_time(cb_id, ctypes.byref(start), ctypes.byref(end)) != 0:
        return None
    return start.value, end.value


def capture_begin(path: str) -> None:
    """Start a programmatic GPU capture to `path` (.gputrace; Metal only). Metal allows it
    only in a process started with MTL_CAPTURE_ENABLED=1 (CAMEL_CAPTURE=path sets that
    before the shim loads and captures the whole run)."""
    if _native().camel_capture_begin(str(path).encode()) != 0:
        raise _fail(f"cannot start a GPU capture to {path}")


def capture_end() -> None:
    """Stop the capture (waits for the captured work first)."""
    if _native().camel_capture_end() != 0:
        raise _fail("cannot end the GPU capture")
