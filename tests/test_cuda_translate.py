"""The CUDA shim's translator (shim/cuda/translate_cuda.cpp): MSL -> CUDA -> PTX.

CI has no NVIDIA GPU, so this checks what can be checked without one:
  - every shaders/*.metal translates and compiles to PTX for sm_80 and sm_90
    with clang-19 (each kernel an .entry, no unresolved function but vprintf)
  - the kernel description lines the runtime reads (shim/cuda/cuda_abi.h)
  - errors name the .metal line
  - camel.metal.translate() gives a readable, self-contained translation unit
    that compiles on its own with the documented command
  - the math the translation uses (shim/cuda/include/camel_cuda_math.h),
    compiled for the host, against double-precision libm on many inputs
The GPU side (shuffles, barriers, simdgroup_matrix, edge threadgroups) is in
shim/cuda/tests/gpu_smoke.py, run on a machine with an NVIDIA GPU.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import camel.metal as metal

ROOT = Path(__file__).resolve().parent.parent
SHADERS = sorted((ROOT / "shaders").glob("*.metal"))
CLANG = shutil.which("clang++-19")

pytestmark = pytest.mark.skipif(
    CLANG is None,
    reason="clang++-19 is not installed (the CUDA translator compiles MSL to PTX with it; "
    "Debian/Ubuntu: apt-get install clang-19)",
)


def compile_ptx(source, path, arch):
    return metal._cuda_call("camel_cuda_compile", source, path, arch)


def kernel_lines(desc):
    return [line.split() for line in desc.splitlines() if line.startswith("kernel ")]


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("shader", SHADERS, ids=lambda p: p.name)
def test_every_shader_compiles_to_ptx(shader, arch):
    ptx, desc = compile_ptx(shader.read_text(), str(shader.relative_to(ROOT)), arch)
    assert f".target sm_{arch}" in ptx
    kernels = kernel_lines(desc)
    assert kernels, f"no kernels found in {shader.name}"
    entries = set(re.findall(r"\.entry (\w+)\(", ptx))
    assert entries == {k[5] for k in kernels}  # named after the kernels, for ncu's reports
    assert all(k[5] == f"camel_{k[2]}" for k in kernels)
    for k in kernels:  # the runtime reads these with cuModuleGetGlobal
        assert f"camel_kernel_{k[1]}_value_sizes" in ptx
    # everything is defined in the module: no libdevice, no libm (vprintf is the driver's)
    externs = re.findall(r"\.extern \.func[^;]*?(\w+)\s*\(", ptx)
    assert set(externs) <= {"vprintf"}, externs


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_named_like_the_entry_locals_compile(arch):
    # the CUDA entry has a local `t` (and the simulator's b, tg): the kernel is called as ::t
    names = ["b", "t", "tg", "g", "x", "i"]
    src = "#include <metal_stdlib>\nusing namespace metal;\n" + "".join(
        f"kernel void {n}(device float* y [[buffer(0)]], uint j [[thread_position_in_grid]]) "
        f"{{ y[j] += 1.0f; }}\n"
        for n in names
    )
    ptx, desc = compile_ptx(src, "names.metal", arch)
    assert sorted(k[2] for k in kernel_lines(desc)) == sorted(names)
    assert set(re.findall(r"\.entry (\w+)\(", ptx)) == {f"camel_{n}" for n in names}


def test_description_lines_of_a_few_kernels():
    src = (ROOT / "shaders" / "ops_reduce.metal").read_text()
    _, desc = compile_ptx(src, "shaders/ops_reduce.metal", 90)
    lines = desc.splitlines()
    # sum_last_axis(x [[buffer(0)]], out [[buffer(1)]], constant uint &K [[buffer(2)]],
    #   constant float &scale [[buffer(3)]], row [[threadgroup_position_in_grid]], ...)
    # threadgroup_sum: a barrier and simd_sum; the entry is named after the kernel
    assert lines[0] == "kernel 0 sum_last_axis 1 1 camel_sum_last_axis"
    assert lines[1:6] == [
        "param 0 0 x 1 0 1",
        "param 0 1 out 1 1 1",
        "param 0 2 K 1 2 0",
        "param 0 3 scale 1 3 0",
        "param 0 4 row 3 -1 0",
    ]
    kernels = {k[2]: k for k in kernel_lines(desc)}
    assert kernels["sum_axis_strided"][3:5] == ["0", "0"]  # no barrier, no SIMD-group function

    src = (ROOT / "shaders" / "ops_matmul.metal").read_text()
    _, desc = compile_ptx(src, "shaders/ops_matmul.metal", 90)
    kernels = {k[2]: k for k in kernel_lines(desc)}
    assert kernels["matmul_v1_naive"][3:5] == ["0", "0"]
    assert kernels["matmul_v3_tiled"][3:5] == ["1", "0"]
    assert kernels["matmul_v10_simdgroup"][3:5] == ["1", "1"]  # simdgroup_matrix
    # the template instantiations keep their host names
    assert "matmul_tile_64x64x8_8x8" in kernels


def test_description_flags_count_calls_and_host_names_are_joined():
    # a variable named like a SIMD-group function is not a call to one
    src = """#include <metal_stdlib>
using namespace metal;
kernel void named_like_simd(device uint *out [[buffer(0)]],
                            uint simd_group [[simdgroup_index_in_threadgroup]],
                            uint i [[thread_position_in_grid]]) {
    out[i] = simd_group;
}
"""
    _, desc = compile_ptx(src, "flags.metal", 90)
    assert desc.splitlines()[0] == "kernel 0 named_like_simd 0 0 camel_named_like_simd"
    # [[host_name("flash_v" "1" ...)]] built by a macro: one name, literals joined
    src = (ROOT / "shaders" / "ops_attention.metal").read_text()
    _, desc = compile_ptx(src, "shaders/ops_attention.metal", 90)
    names = [k[2] for k in kernel_lines(desc)]
    assert "flash_v1_64x64_d64" in names and "flash_backward_dq_d64" in names, names
    assert not any('"' in n for n in names)


THREADGROUP_KERNEL = """#include <metal_stdlib>
using namespace metal;

// out[g] = sum of the threadgroup's x, with a threadgroup-memory array
kernel void tg_sum(device const float *x [[buffer(0)]],
                   device float *out [[buffer(1)]],
                   threadgroup float *scratch [[threadgroup(0)]],
                   uint i [[thread_position_in_grid]],
                   uint t [[thread_index_in_threadgroup]],
                   uint g [[threadgroup_position_in_grid]],
                   uint lane [[thread_index_in_simdgroup]],
                   uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float partial[32];
    float s = simd_sum(x[i]);
    if (lane == 0) partial[sg] = s;
    scratch[t] = s;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (t == 0) {
        float total = 0.0f;
        for (uint k = 0; k < 4; k++) total += partial[k];
        out[g] = total;
    }
}
"""


def test_translation_is_readable_and_self_contained(tmp_path):
    cuda = metal.translate(THREADGROUP_KERNEL, path="tg_sum.metal")
    # the kernel as written, line for line, with the address spaces dropped
    assert '#line 1 "tg_sum.metal"' in cuda
    assert "void tg_sum(" in cuda
    assert "__shared__ float partial[32];" in cuda  # one allocation per declaration
    assert "float s = simd_sum(x[i]);" in cuda
    # the entry wrapper and its bindings
    assert 'extern "C" __global__ void camel_tg_sum(camel_cuda_args args)' in cuda
    assert "args.buffers[0]" in cuda and "args.buffers[1]" in cuda
    assert "__camel_threadgroup_memory + args.threadgroup_offset[0]" in cuda
    assert "t.thread_index_in_simdgroup" in cuda
    # the simulator's runtime calls are left out, the CUDA ones are in
    assert "camel_sim_runtime *" not in cuda and "__camel_rt->" not in cuda
    assert "__syncthreads()" in cuda and "__nvvm_shfl_sync_idx_i32" in cuda
    assert "#include" not in cuda.replace("#include <stdint.h>", "")  # nothing left to find
    # it compiles on its own with the command in its header comment
    cu = tmp_path / "tg_sum.cu"
    cu.write_text(cuda)
    for arch in (80, 90):
        out = tmp_path / f"tg_sum_sm{arch}.ptx"
        proc = subprocess.run(
            [CLANG, "-x", "cuda", "--cuda-device-only", f"--cuda-gpu-arch=sm_{arch}"]
            + ["-nocudainc", "-nocudalib", "-O3", "-S", "-Wno-unknown-cuda-version"]
            + [str(cu), "-o", str(out)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        ptx = out.read_text()
        assert ".entry camel_tg_sum(" in ptx
        assert "bar.sync" in ptx and "shfl.sync" in ptx


def test_translate_rejects_unknown_target():
    with pytest.raises(ValueError, match="only one is 'cuda'"):
        metal.translate(THREADGROUP_KERNEL, target="ptx")


def test_errors_name_the_metal_line():
    src = THREADGROUP_KERNEL.replace("float total = 0.0f;", "double total = 0.0;")
    with pytest.raises(
        metal.CompileError, match=r"\[cuda\] bad\.metal:19: 'double' is not supported"
    ):
        metal.translate(src, path="bad.metal")
    # a C++ error found by clang: the message names the .metal line and shows it as written
    src = THREADGROUP_KERNEL.replace("out[g] = total;", "out[g] = totl;")
    with pytest.raises(metal.CompileError) as e:
        compile_ptx(src, "bad.metal", 90)
    message = str(e.value)
    assert "bad.metal:21:" in message and "totl" in message, message
    assert "        out[g] = totl;" in message  # the source line, not the rewritten one
    with pytest.raises(metal.CompileError, match=r"bad\.metal:2: '#include <vector>'"):
        metal.translate("#include <metal_stdlib>\n#include <vector>\n", path="bad.metal")
    with pytest.raises(metal.CompileError, match="arch 7 is not a compute capability"):
        compile_ptx(THREADGROUP_KERNEL, "k.metal", 7)


NAN_KERNEL = """#include <metal_stdlib>
using namespace metal;
kernel void nan_helpers(device const float *x [[buffer(0)]],
                        device uint *idx [[buffer(1)]],
                        device float *out [[buffer(2)]],
                        uint i [[thread_position_in_grid]]) {
    float v = isnan(x[i]) ? NAN : (isinf(x[i]) ? -INFINITY : x[i]);
    uint m = simd_min(idx[i]);
    out[i] = select(v, (float)m, v > 0.0f) + precise::tanh(v) + exp2(v) + log(fabs(v) + 1.0f);
}
"""


def test_nan_helpers_and_uint_simd_min_compile():
    ptx, desc = compile_ptx(NAN_KERNEL, "nan.metal", 80)
    assert kernel_lines(desc) == [["kernel", "0", "nan_helpers", "0", "1", "camel_nan_helpers"]]
    assert "min.u32" in ptx  # simd_min on uint is an unsigned comparison
    assert "shfl.sync" in ptx


def entry_bodies(ptx):
    """{entry name: its PTX body}."""
    parts = re.split(r"\n(?=\.visible \.(?:entry|func))", ptx)
    entries = [p for p in parts if p.startswith(".visible .entry")]
    return {re.search(r"\.entry (\w+)\(", p).group(1): p for p in entries}


@pytest.mark.parametrize("arch", [80, 90])
def test_gemm_register_arrays_stay_in_registers(arch):
    # v5-v12 keep their accumulators in arrays: loops unrolled and helpers inlined, or
    # the arrays live in local memory and every K step reloads them (ld.local)
    src = (ROOT / "shaders" / "ops_matmul.metal").read_text()
    bodies = entry_bodies(compile_ptx(src, "shaders/ops_matmul.metal", arch)[0])
    rungs = [n for n in bodies if re.match(r"camel_matmul_v([5-9]|1[012])_", n)]
    assert len(rungs) == 8, sorted(bodies)
    spilled = {n: bodies[n].count("ld.local") for n in rungs if "ld.local" in bodies[n]}
    assert not spilled, f"register arrays in local memory: {spilled}"
    for n in rungs:  # nothing called but printf (a trap's message)
        callees = re.findall(r"call(?:\.uni)?\s*(?:\(\w+\),\s*)?(\w+),", bodies[n])
        assert set(callees) <= {"vprintf"}, (n, callees)


def test_simdgroup_matrix_modes(monkeypatch):
    src = (ROOT / "shaders" / "ops_matmul.metal").read_text()
    v10 = "camel_matmul_v10_simdgroup"
    # tensor cores by default: 16 multiplies per K step of 8, twice (BK = 16), 2 mma each
    tc = entry_bodies(compile_ptx(src, "shaders/ops_matmul.metal", 90)[0])[v10]
    assert tc.count("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32") == 64
    assert "cvt.rna.tf32.f32" in tc
    monkeypatch.setenv("CAMEL_CUDA_MATRIX", "fp32")
    assert "#define CAMEL_CUDA_MATRIX_FP32 1" in metal.translate(src, target="cuda")
    # the exact mode on v10 alone (`camel.bench matmul --source 10`: the same kernel text,
    # which test_bench_source runs), not the whole file again: a few seconds of compile less
    from camel.bench import source

    alone = source.specialise("ops_matmul.metal", "matmul_v10_simdgroup")
    exact = entry_bodies(compile_ptx(alone, "matmul_v10_simdgroup.metal", 90)[0])[v10]
    assert "mma.sync" not in exact and exact.count("fma.rn.f32") >= 16 * 16 * 2
    monkeypatch.setenv("CAMEL_CUDA_MATRIX", "tf64")
    with pytest.raises(metal.MetalError, match=r"CAMEL_CUDA_MATRIX=tf64 .*tf32x3.*fp32"):
        compile_ptx(src, "shaders/ops_matmul.metal", 90)


@pytest.mark.parametrize("arch", [80, 90])
def test_threadgroup_initialisers_are_dropped(arch):
    # Apple accepts them (MLX: `= {0}`, Skia: `{{}}`); CUDA rejects any initialiser on a
    # __shared__ variable, and Metal promises no value: the translation drops them
    src = """#include <metal_stdlib>
using namespace metal;
struct Scratch { float v[64]; };
kernel void k(device float *out [[buffer(0)]], uint t [[thread_index_in_threadgroup]]) {
    threadgroup float partial[2] = {0};
    threadgroup Scratch s{{}}, u{};
    s.v[t] = float(t);
    u.v[t] = 2.0f;
    partial[t % 2] = 1.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[t] = s.v[63 - t] + partial[0] + u.v[t ^ 1];
}
"""
    cuda = metal.translate(src, target="cuda")
    body = cuda[cuda.index("void k(") :]
    assert re.search(r"__shared__ float partial\[2\]\s*;", body), body
    assert re.search(r"__shared__ Scratch s\s*,\s*u\s*;", body), body
    ptx, desc = compile_ptx(src, "tg_init.metal", arch)
    assert [k[2] for k in kernel_lines(desc)] == ["k"]
    assert re.search(r"\.shared \.align \d+ \.b8 \w*partial\w*\[8\]", ptx), ptx


@pytest.mark.parametrize("mode", ["tf32x3", "fp32"])
def test_mixed_simdgroup_matrix_operands_compile(mode, monkeypatch):
    # llama.cpp's forms: half tiles into a float accumulator, a float tile times a half one
    monkeypatch.setenv("CAMEL_CUDA_MATRIX", mode)
    sys.path.insert(0, str(ROOT / "tests"))
    from test_sim_realworld import HEADER, MIXED_MMA

    for arch in (80, 90):
        ptx, desc = compile_ptx(HEADER + MIXED_MMA, "mixed_mma.metal", arch)
        body = entry_bodies(ptx)["camel_mixed"]
        mma = body.count("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32")
        assert mma == (10 if mode == "tf32x3" else 0), mma  # 5 multiplies, 2 mma each
        assert "cvt.f32.f16" in body  # the half operands, widened


def test_cache_hit_returns_the_same_ptx():
    a = compile_ptx(THREADGROUP_KERNEL, "cache.metal", 90)
    b = compile_ptx(THREADGROUP_KERNEL, "cache.metal", 90)
    assert a == b
    c = compile_ptx(THREADGROUP_KERNEL, "cache.metal", 80)
    assert ".target sm_80" in c[0]


def test_processes_missing_the_same_ptx_compile_it_once_per_arch(tmp_path, monkeypatch):
    # the cache's lock is per entry and arch (pytest-xdist's workers share the cache): a
    # second miss of one arch waits for the first compile; each arch is compiled once
    import threading
    import uuid

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    log, wrapper = tmp_path / "compiles.log", tmp_path / "clang++"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{CLANG}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CAMEL_CUDA_CXX", str(wrapper))
    src = THREADGROUP_KERNEL + f"// {uuid.uuid4().hex}\n"
    results, errors = {80: [], 90: []}, []

    def build(arch):
        try:
            results[arch].append(compile_ptx(src, "locked.metal", arch))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=build, args=(a,)) for a in (80, 90, 80, 90)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    lines = log.read_text().splitlines()
    for arch in (80, 90):
        assert len(results[arch]) == 2 and results[arch][0] == results[arch][1]
        assert f".target sm_{arch}" in results[arch][0][0]
        ptx = [line for line in lines if f"--cuda-gpu-arch=sm_{arch} " in line]
        assert len(ptx) == 1, ptx


def test_editing_an_included_header_recompiles_the_ptx(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "k.h").write_text("#define K 3.0f\n")
    src = (
        '#include <metal_stdlib>\n#include "k.h"\nusing namespace metal;\n'
        "kernel void k(device float *x [[buffer(0)]]) { x[0] = K; }\n"
    )
    path = str(tmp_path / "k.metal")
    assert "1077936128" in compile_ptx(src, path, 90)[0]  # the bits of 3.0f
    (tmp_path / "k.h").write_text("#define K 7.0f\n")
    assert "1088421888" in compile_ptx(src, path, 90)[0]  # 7.0f, not the cached 3.0f


def test_project_headers_through_an_include_path(tmp_path, monkeypatch):
    # MLX's layout: `#include <mlx/...>` with the repository root on the include path
    (tmp_path / "mlx" / "kernels").mkdir(parents=True)
    (tmp_path / "mlx" / "kernels" / "utils.h").write_text(
        '#pragma once\n#include "mlx/kernels/scale.h"\n'
        "METAL_FUNC float twice(float v) { return SCALE * v; }\n"
    )
    (tmp_path / "mlx" / "kernels" / "scale.h").write_text("#define SCALE 2.0f\n")
    src = (
        "#include <metal_stdlib>\n#include <mlx/kernels/utils.h>\nusing namespace metal;\n"
        "kernel void k(device float *x [[buffer(0)]]) { x[0] = twice(x[0]); }\n"
    )
    cuda = metal.translate(src, path="k.metal", include_dirs=[tmp_path])
    assert "SCALE" not in cuda and "float twice(float v) { return 2.0f * v; }" in cuda
    monkeypatch.setenv("CAMEL_INCLUDE_PATH", str(tmp_path))
    for arch in (80, 90):
        ptx, desc = compile_ptx(src, "k.metal", arch)
        assert [k[2] for k in kernel_lines(desc)] == ["k"]
    monkeypatch.delenv("CAMEL_INCLUDE_PATH")
    with pytest.raises(metal.CompileError, match=r"k.metal:2: '#include <mlx/kernels/utils.h>'"):
        compile_ptx(src, "k.metal", 90)


BOUNDS = {  # ulp; Metal with fast math off allows 4 for exp/log, 5 or more for the others
    "exp": 2.0,
    "exp2": 2.0,
    "log": 2.0,
    "log2": 2.0,
    "tanh": 4.0,
}


@pytest.mark.parametrize("arch", [80, 90])
def test_math_second_results_in_thread_memory_compile(arch):
    # MSL 6.5: sincos, modf and frexp of half and float, scalars and vectors, their second
    # result through a thread reference (the simulator runs the same forms against NumPy in
    # test_sim_strict.py; only float scalars compiled before)
    src = """#include <metal_stdlib>
using namespace metal;
kernel void k(device float4 *x [[buffer(0)]], device int3 *e [[buffer(1)]],
              device half2 *h [[buffer(2)]], uint i [[thread_position_in_grid]]) {
    float4 c;
    float4 s = sincos(x[i], c);
    thread float3 w;
    float3 f = fast::modf(x[i].xyz, w);
    int3 ex;
    float3 m = frexp(f + w, ex);
    half2 hc, hw;
    half2 hs = precise::sincos(h[i], hc);
    half2 hf = modf(hs, hw);
    int he;
    half hm = frexp(h[i].x, he);
    x[i] = s + c + float4(m, 0);
    e[i] = ex + he;
    h[i] = hf + hw + hc + hm;
}
"""
    ptx, desc = compile_ptx(src, "second_results.metal", arch)
    assert kernel_lines(desc) == [["kernel", "0", "k", "0", "0", "camel_k"]]
    assert ".entry camel_k(" in ptx
    assert set(re.findall(r"\.extern \.func[^;]*?(\w+)\s*\(", ptx)) <= {"vprintf"}


def test_math_against_libm_on_the_host(tmp_path):
    exe = tmp_path / "math_ulp"
    src = ROOT / "shim" / "cuda" / "tests" / "math_ulp.cpp"
    subprocess.run(
        [CLANG, "-std=c++17", "-O2", "-ffp-contract=on", "-o", str(exe), str(src), "-lm"],
        check=True,
    )
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    results = {}
    for line in out.splitlines():
        m = re.match(r"(\w+)\s+n=(\d+) max_ulp=([\d.]+) worst=\S+ specials_wrong=(\d+)", line)
        if m:
            results[m[1]] = (int(m[2]), float(m[3]), int(m[4]))
    assert len(results) == 22, out
    for name, (n, ulp, wrong) in results.items():
        assert wrong == 0, f"{name}: special values wrong\n{out}"
        assert ulp <= BOUNDS.get(name, 1.0), f"{name}: {ulp} ulp\n{out}"
        assert n > 100000 or name == "exact"


def test_gpu_smoke_kernels_compile():
    # shim/cuda/tests/gpu_smoke.py runs these on a GPU; here: they translate and compile
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gpu_smoke", ROOT / "shim" / "cuda" / "tests" / "gpu_smoke.py"
    )
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    for arch in (80, 90):
        ptx, desc = compile_ptx(smoke.SOURCE, "gpu_smoke.metal", arch)
        names = [k[2] for k in kernel_lines(desc)]
        assert names == ["simd_reduce", "shuffles", "barrier_sum", "matrix", "math", "dispatch"]
    # the dispatch pieces it launches: Metal's edge groups, each grid position once
    covered = 0
    for origin, groups, block in smoke.pieces((37, 29, 3), (8, 4, 2)):
        covered += np_prod(groups) * np_prod(block)
        for d in range(3):
            assert (
                origin[d] * (8, 4, 2)[d] + (groups[d] - 1) * (8, 4, 2)[d] + block[d]
                <= (37, 29, 3)[d]
            )
    assert covered == 37 * 29 * 3


def np_prod(t):
    return t[0] * t[1] * t[2]


COMPONENT_HEADERS = ["metal_atomic", "metal_common", "metal_compute", "metal_geometric",
                     "metal_integer", "metal_limits", "metal_math", "metal_relational",
                     "metal_simdgroup", "metal_simdgroup_matrix", "metal_types"]  # fmt: skip


@pytest.mark.parametrize("header", COMPONENT_HEADERS)
def test_apple_component_headers_and_metal_func_translate(header):
    """Real-world MSL includes Apple's component headers and marks helpers METAL_FUNC;
    the CUDA translation takes both, as the simulator does."""
    src = f"""#include <{header}>
using namespace metal;
METAL_FUNC float twice(float x) {{ return 2.0f * x; }}
kernel void k(device float *x [[buffer(0)]], uint i [[thread_position_in_grid]]) {{
    x[i] = twice(x[i]);
}}
"""
    ptx, desc = compile_ptx(src, f"{header}.metal", 80)
    assert kernel_lines(desc) == [["kernel", "0", "k", "0", "0", "camel_k"]]
    assert ".entry camel_k(" in ptx


FC_SRC = """
#include <metal_stdlib>
using namespace metal;
constant int k [[function_constant(0)]];
constant float scale [[function_constant(1)]];
constant bool has_k = is_function_constant_defined(k);
kernel void fc_axpb(device const float *x [[buffer(0)]], device float *y [[buffer(1)]],
                    uint i [[thread_position_in_grid]]) {
    y[i] = x[i] * scale + (has_k ? float(k) : 0.5f);
}
kernel void fc_other(device float *y [[buffer(0)]], uint i [[thread_position_in_grid]]) {
    y[i] = scale;
}
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_function_constants_specialise_to_ptx(arch):
    """camel_cuda_compile_specialised: one kernel's PTX with the values folded in
    (2.5 = 0f40200000, 7 = 0f40E00000, 0.5 = 0f3F000000), the constants listed in the
    description, and a used constant without a value an error naming it."""
    ptx, desc = compile_ptx(FC_SRC, "fc.metal", arch)
    assert "constant 0 int k\nconstant 1 float scale\n" in desc, desc
    assert re.findall(r"\.entry (\w+)\(", ptx) == ["camel_fc_axpb", "camel_fc_other"]

    def special(kernel, values):
        return metal._cuda_call(
            "camel_cuda_compile_specialised", FC_SRC, "fc.metal", arch, kernel, values
        )

    ptx, desc = special(b"fc_axpb", b"0 int(7)\n1 0x1.4p+1f\n")
    assert f".target sm_{arch}" in ptx
    assert re.findall(r"\.entry (\w+)\(", ptx) == ["camel_fc_axpb"], ptx
    assert re.search(r"fma\.rn\.f32\s+%f\d+, %f\d+, 0f40200000, 0f40E00000;", ptx), ptx
    ptx, _ = special(b"fc_axpb", b"1 0x1.4p+1f\n")  # k undefined: the default 0.5
    assert re.search(r"fma\.rn\.f32\s+%f\d+, %f\d+, 0f40200000, 0f3F000000;", ptx), ptx
    with pytest.raises(metal.CompileError, match=r"'fc_other' uses function constant 'scale'"):
        special(b"fc_other", b"0 int(7)\n")


VECTOR_CONSTANTS_SRC = """
#include <metal_stdlib>
using namespace metal;
constant float2 line_ab [[function_constant(0)]];
constant float2 table[2] = {float2(1.0f, 2.0f), float2(3.0f, 4.0f)};
kernel void vc(device float *y [[buffer(0)]], uint i [[thread_position_in_grid]]) {
    y[i] = line_ab.x * y[i] + line_ab.y + table[i & 1].y;
}
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_vector_constants_at_program_scope_compile(arch):
    """A float2 function constant and a program-scope table of float2(...) are constant
    initialisers on CUDA, not dynamic ones (which clang cannot place in device memory:
    'reference to __host__ variable'); the specialised value 3, 0.25 is folded in."""
    ptx, desc = compile_ptx(VECTOR_CONSTANTS_SRC, "vc.metal", arch)
    assert "constant 0 float2 line_ab\n" in desc, desc
    ptx, _ = metal._cuda_call(
        "camel_cuda_compile_specialised",
        VECTOR_CONSTANTS_SRC,
        "vc.metal",
        arch,
        b"vc",
        b"0 float2(0x1.8p+1f, 0x1p-2f)\n",
    )
    assert re.search(r"fma\.rn\.f32\s+%f\d+, %f\d+, 0f40400000, 0f3E800000;", ptx), ptx


OPTIONAL_SRC = """
#include <metal_stdlib>
using namespace metal;
constant bool has_b [[function_constant(0)]];
kernel void opt_add(device const float *x [[buffer(0)]],
                    device const float *b [[buffer(1), function_constant(has_b)]],
                    device float *y [[buffer(2)]], uint i [[thread_position_in_grid]]) {
    y[i] = has_b ? x[i] + b[i] : x[i];
}
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_optional_arguments_specialise_to_ptx(arch):
    """An optional argument ([[function_constant(has_b)]], MSL 5.8.1.2): with has_b true it
    is a buffer the runtime checks (kind 1), with has_b false it is absent (kind 4: nothing
    binds it) and the specialised PTX neither reads its binding nor adds."""

    def special(values):
        return metal._cuda_call(
            "camel_cuda_compile_specialised", OPTIONAL_SRC, "opt.metal", arch, b"opt_add", values
        )

    ptx, desc = special(b"0 true\n")
    assert f".target sm_{arch}" in ptx
    assert re.findall(r"\.entry (\w+)\(", ptx) == ["camel_opt_add"], ptx
    assert "param 0 1 b 1 1 1\n" in desc and "param 0 2 y 1 2 1\n" in desc, desc
    assert re.search(r"add(\.rn)?\.f32", ptx), ptx
    assert "[camel_opt_add_param_0+8]" in ptx  # args.buffers[1]
    ptx, desc = special(b"0 false\n")
    assert re.findall(r"\.entry (\w+)\(", ptx) == ["camel_opt_add"], ptx
    assert "param 0 1 b 4 1 1\n" in desc and "param 0 2 y 1 2 1\n" in desc, desc
    assert not re.search(r"add(\.rn)?\.f32", ptx), ptx
    assert "[camel_opt_add_param_0+8]" not in ptx  # nothing reads args.buffers[1]


def test_arguments_without_an_index_take_the_first_free_one():
    """MSL 4, 5.2.1: the first available index, in parameter order (the simulator's rule
    too; before, both gave the highest explicit index + 1)."""
    src = """
#include <metal_stdlib>
using namespace metal;
kernel void k(device float *y [[buffer(0)]], device const float *x, constant float &s,
              constant uint &n [[buffer(3)]], device const float *b,
              threadgroup float *t, threadgroup float *u [[threadgroup(1)]],
              uint i [[thread_position_in_grid]]) {
    t[0] = x[i]; u[0] = b[i]; y[i] = s * t[0] + u[0] + float(n);
}
"""
    _, desc = compile_ptx(src, "implicit.metal", 90)
    params = [line.split()[3:6] for line in desc.splitlines() if line.startswith("param ")]
    assert params == [
        ["y", "1", "0"], ["x", "1", "1"], ["s", "1", "2"], ["n", "1", "3"], ["b", "1", "4"],
        ["t", "2", "0"], ["u", "2", "1"], ["i", "3", "-1"],
    ]  # fmt: skip
