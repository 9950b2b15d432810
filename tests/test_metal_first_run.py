"""The Metal shim's first-run risks (issue 10, part 3), checked where they can be here.

No Mac runs CI, so what lives in shim/metal/metal_shim.m is checked by reading the source
(as tests/test_metal_shim_source.py does for the ABI); what lives in camel/metal/ runs.
DEVELOPERS.md's cross-compile against the macOS SDK is the check that the source builds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from camel import metal

ROOT = Path(__file__).resolve().parent.parent
METAL_SRC = ROOT / "shim" / "metal" / "metal_shim.m"
SIM_RUNTIME_H = ROOT / "shim" / "sim" / "runtime.h"


def _code(path: Path) -> str:
    """The source without comments, so a comment naming an API does not count as a call."""
    text = re.sub(r"/\*.*?\*/", " ", path.read_text(), flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _functions(code: str) -> dict[str, str]:
    """{name: body} of the top-level C functions (a definition starts in column 0)."""
    heads = list(re.finditer(r"^[A-Za-z_][^\n;]*?\b(\w+)\([^;{]*\)\s*\{", code, flags=re.M))
    out = {}
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(code)
        out[m.group(1)] = code[m.end() : end]
    return out


def _metal_rule() -> str:
    makefile = (ROOT / "shim" / "Makefile").read_text()
    m = re.search(r"^\$\(METAL_LIB\):.*?(?=^\s*$)", makefile, flags=re.M | re.S)
    assert m, "shim/Makefile has no $(METAL_LIB) rule"
    return m.group(0)


def test_the_metal_rule_links_coregraphics():
    # Apple: a command-line tool must link CoreGraphics for MTLCreateSystemDefaultDevice.
    assert "-framework CoreGraphics" in _metal_rule()


def test_device_falls_back_to_a_listed_device_that_is_not_low_power():
    fns = _functions(_code(METAL_SRC))
    pick = fns["default_device"]
    assert "MTLCreateSystemDefaultDevice()" in pick and "MTLCopyAllDevices()" in pick
    assert re.search(r"\.lowPower|isLowPower", pick)
    assert "default_device()" in fns["camel_init"]
    assert "MTLCreateSystemDefaultDevice()" not in fns["camel_init"]


def test_the_queue_has_room_for_more_than_64_command_buffers():
    code = _code(METAL_SRC)
    assert "newCommandQueue]" not in code  # Apple: that queue holds 64
    m = re.search(r"newCommandQueueWithMaxCommandBufferCount:(\w+)", code)
    assert m, "the queue is not made with newCommandQueueWithMaxCommandBufferCount:"
    count = m.group(1)
    if not count.isdigit():
        count = re.search(rf"#define {count} (\d+)", METAL_SRC.read_text()).group(1)
    assert int(count) > 64


def test_no_command_buffer_is_made_while_the_lock_is_held():
    # -[MTLCommandQueue commandBuffer] blocks while the queue is full: never under g_lock.
    sites = 0
    for name, body in _functions(_code(METAL_SRC)).items():
        for m in re.finditer(r"\[g_queue commandBuffer\]", body):
            sites += 1
            assert not name.endswith("_locked"), f"{name} (called with g_lock held) makes one"
            before = body[: m.start()]
            last = max(before.rfind("pthread_mutex_lock(&g_lock)"), before.rfind("unlock(&g_lock)"))
            held = last >= 0 and before.rfind("pthread_mutex_lock(&g_lock)") == last
            assert not held, f"{name} calls -commandBuffer with g_lock held"
    assert sites >= 1


def test_set_bytes_stays_below_4_kib_everywhere():
    # Apple: setBytes takes "smaller than 4 KB"; the simulator must not accept more.
    shim = int(re.search(r"#define CAMEL_MAX_SET_BYTES (\d+)", METAL_SRC.read_text()).group(1))
    sim = int(re.search(r"kMaxSetBytes = (\d+)", SIM_RUNTIME_H.read_text()).group(1))
    assert shim == sim == metal.MAX_SET_BYTES == 4095


def test_the_shim_rejects_grids_past_32_bits_like_the_simulator():
    validate = _functions(_code(METAL_SRC))["validate_locked"]
    assert "0xffffffffull" in validate and "grid_is_threads" in validate
    assert "2^32 - 1 threads" in validate


def test_msl_version_is_pinned_and_documented():
    # MSL 3.1 from macOS 14 on (the macOS 13 SDK lacks the enumerator: its value, 3.1 being
    # (3 << 16) + 1), MSL 3.0 before; the simulator and CUDA read MSL 3.1 (__METAL_VERSION__)
    code = _code(METAL_SRC)
    lib_new = _functions(code)["camel_library_new"]
    assert re.search(r"isOperatingSystemAtLeastVersion:\w+\]\)\s*options\.languageVersion = "
                     r"\(MTLLanguageVersion\)\(\(3 << 16\) \+ 1\);", lib_new)  # fmt: skip
    assert re.search(r"else\s*options\.languageVersion = MTLLanguageVersion3_0;", lib_new)
    assert "{14, 0, 0}" in lib_new
    doc = (ROOT / "docs" / "metal_shim.md").read_text()
    assert "**MSL 3.1** on macOS 14 and later" in doc and "MSL 3.0 on macOS 13" in doc
    sim = (ROOT / "shim" / "front" / "translate.cpp").read_text()
    assert sim.count("-D__METAL_VERSION__=310") == 2  # the compile and the typed check


def test_fast_math_is_relaxed_or_safe_never_fast():
    lib_new = _functions(_code(METAL_SRC))["camel_library_new"]
    # fastMathEnabled defaults to YES and does not honour inf/NaN: always off ...
    assert re.search(r"fastMathEnabled = NO;", lib_new)
    assert not re.search(r"fastMathEnabled = (YES|\(|fast)", lib_new)
    # ... and CAMEL_METAL_FAST_MATH=1 asks for MTLMathModeRelaxed where it exists (macOS 15).
    assert "CAMEL_METAL_FAST_MATH" in lib_new and "respondsToSelector:set_math_mode" in lib_new
    assert re.search(r"#define CAMEL_MTL_MATH_MODE_RELAXED 1\b", METAL_SRC.read_text())


def test_mpsgraph_checks_what_may_be_nil_and_builds_the_band_on_float():
    fns = _functions(_code(METAL_SRC))
    build = fns["attention_graph_locked"]
    # bandPart is not documented for Bool: the band is cut from a float tensor.
    band = re.search(r"bandPartWithTensor:(\w+)", build).group(1)
    assert re.search(rf"\*{band} = \[graph constantWithScalar:1\.0 shape:plane\s*dataType:"
                     r"MPSDataTypeFloat32", build)  # fmt: skip
    assert "MPSDataTypeBool" not in build
    assert "result == nil" in build and "graph == nil" in build
    encode = fns["mpsgraph_attention"]
    # MPSGraphTensorData init is documented "nil if allocation failure"; it goes into @{...}.
    assert encode.index("data[i] == nil") < encode.index("@{g.q")
    assert "if (g == nil)" in encode
    # Sizes are checked before a graph is built.
    outer = fns["camel_mpsgraph_attention"]
    assert outer.index("__builtin_mul_overflow") < outer.index("return mpsgraph_attention(")


# ---- the Python side: runs here -----------------------------------------------------


def test_capture_env_is_set_for_metal_only_and_keeps_the_users_value():
    env = {}
    metal._enable_capture("metal", "run.gputrace", env)
    assert env["MTL_CAPTURE_ENABLED"] == "1"
    env = {"MTL_CAPTURE_ENABLED": "0"}
    metal._enable_capture("metal", "run.gputrace", env)
    assert env["MTL_CAPTURE_ENABLED"] == "0"
    for choice, capture in (("sim", "x"), ("metal", "")):
        env = {}
        metal._enable_capture(choice, capture, env)
        assert "MTL_CAPTURE_ENABLED" not in env


def test_capture_env_is_set_before_the_shim_is_loaded(monkeypatch, tmp_path):
    seen = {}
    fake = tmp_path / "libcamel_metal.dylib"
    fake.write_bytes(b"")

    def fake_cdll(path):
        seen["MTL_CAPTURE_ENABLED"] = os.environ.get("MTL_CAPTURE_ENABLED")
        raise OSError("not a real library")

    loading = metal.loading  # the shim's state and loader live there
    monkeypatch.setattr(loading, "_lib", None)
    monkeypatch.setattr(loading, "_shim_choice", lambda: "metal")
    monkeypatch.setattr(loading, "_shim_candidates", lambda choice: [fake])
    monkeypatch.setattr(loading.ctypes, "CDLL", fake_cdll)
    monkeypatch.setenv("CAMEL_CAPTURE", str(tmp_path / "run.gputrace"))
    monkeypatch.delenv("MTL_CAPTURE_ENABLED", raising=False)
    monkeypatch.delenv("CAMEL_SHIM_LIBRARY", raising=False)
    with pytest.raises(metal.MetalError, match="cannot load"):
        loading._native()
    assert seen == {"MTL_CAPTURE_ENABLED": "1"}
