"""camel/'s import graph (tools/imports.py): no circles, no import of a higher layer.

The layer order is LAYERS in tools/imports.py (and the table in docs/stage0.md). The
allow-lists below are empty: a new circle or upward import fails here; move the code to
the layer it belongs to.
"""

import importlib.util
import pathlib
import sys

_PATH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "imports.py"
_spec = importlib.util.spec_from_file_location("camel_imports", _PATH)
imports = importlib.util.module_from_spec(_spec)
sys.modules["camel_imports"] = imports  # dataclasses look their module up there
_spec.loader.exec_module(imports)

# (importer, imported) upward imports still allowed: none since issue 16 (functional sits
# below tensor and gets the Tensor class from autograd)
ALLOWED_UPWARD: set = set()

# circles still allowed (each a set of modules that import each other, directly or not): none
ALLOWED_CIRCLES: set = set()


def test_every_module_has_a_layer():
    known, _ = imports.graph()
    assert "camel.metal" in known and "camel.nn.module" in known and "camel.bench.matmul" in known
    for m in known:
        imports.layer_of(m)  # raises naming the module


def test_no_new_upward_import():
    known, edges = imports.graph()
    found = {(e.importer, e.imported): e for e in imports.upward(edges)}
    new = [f"{e.importer} -> {e.imported} ({known[e.importer].name}:{e.line})"
           for pair, e in sorted(found.items()) if pair not in ALLOWED_UPWARD]  # fmt: skip
    assert not new, (
        "[imports] upward imports (a lower layer importing a higher one, tools/imports.py "
        f"LAYERS): {new}"
    )
    gone = ALLOWED_UPWARD - set(found)
    assert not gone, f"[imports] fixed, remove them from ALLOWED_UPWARD: {sorted(gone)}"


def test_no_new_circle():
    known, edges = imports.graph()
    found = {frozenset(c) for c in imports.circles(known, edges)}
    assert found <= ALLOWED_CIRCLES, (
        f"[imports] import circles: {[sorted(c) for c in found - ALLOWED_CIRCLES]}"
    )
    gone = ALLOWED_CIRCLES - found
    assert not gone, f"[imports] fixed, remove from ALLOWED_CIRCLES: {[sorted(c) for c in gone]}"


def test_the_graph_sees_every_kind_of_import(tmp_path):
    # a small package with each form of import the tool must see: absolute, from-package,
    # relative, function-level and importlib.import_module; and an upward one it must flag
    pkg = tmp_path / "camel"
    (pkg / "nn").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from camel import tensor\n")
    (pkg / "metal.py").write_text("def f():\n    from camel import tensor\n")
    (pkg / "tensor.py").write_text(
        "import camel.metal as M\n"
        "import importlib\n"
        "def g():\n    return importlib.import_module('camel.nn.module')\n"
    )
    (pkg / "nn" / "__init__.py").write_text("from .module import Module\n")
    (pkg / "nn" / "module.py").write_text("from .. import tensor\nclass Module: ...\n")
    known, edges = imports.graph(tmp_path)
    got = {(e.importer, e.imported, e.level) for e in edges}
    assert got == {
        ("camel", "camel.tensor", "module"),
        ("camel.metal", "camel.tensor", "function"),
        ("camel.tensor", "camel.metal", "module"),
        ("camel.tensor", "camel.nn.module", "function"),
        ("camel.nn", "camel.nn.module", "module"),
        ("camel.nn.module", "camel.tensor", "module"),
    }
    assert imports.circles(known, edges) == [["camel.metal", "camel.nn.module", "camel.tensor"]]
    assert {(e.importer, e.imported) for e in imports.upward(edges)} == {
        ("camel.metal", "camel.tensor"),
        ("camel.tensor", "camel.nn.module"),
    }


# ---- shim/: the include graph (tools/includes.py) -----------------------------------

_IPATH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "includes.py"
_ispec = importlib.util.spec_from_file_location("camel_includes", _IPATH)
includes = importlib.util.module_from_spec(_ispec)
sys.modules["camel_includes"] = includes
_ispec.loader.exec_module(includes)

# (includer, included) under shim/ still allowed: none since shim/ is laid out by role
ALLOWED_BAD_INCLUDES: set = set()
ALLOWED_LAYER_CIRCLES: set = set()


def test_every_shim_file_has_a_layer_and_every_include_a_file():
    known, edges, dangling = includes.graph()
    assert "camel_shim.h" in known and "sim/include/metal_stdlib" in known
    assert "front/include/camel_sim_msl.h" in known and "metal/metal_shim.m" in known
    for name in known:
        includes.layer_of(name)  # raises naming the file
    assert not dangling, (
        '[includes] #include "..." naming no file (resolved next to the includer): '
        + ", ".join(f"shim/{e.importer}:{e.line} -> {e.imported}" for e in dangling)
    )


def test_shim_has_no_new_bad_include_or_circle():
    known, edges, _ = includes.graph()
    found = {(e.importer, e.imported): e for e in includes.bad(edges)}
    new = [f"shim/{a}:{e.line} -> {b}" for (a, b), e in sorted(found.items())
           if (a, b) not in ALLOWED_BAD_INCLUDES]  # fmt: skip
    assert not new, (
        "[includes] includes of a higher layer, or of another runtime (tools/includes.py "
        f"LAYERS: the runtimes may include the front end and camel_shim.h only): {new}"
    )
    gone = ALLOWED_BAD_INCLUDES - set(found)
    assert not gone, f"[includes] fixed, remove from ALLOWED_BAD_INCLUDES: {sorted(gone)}"
    assert includes.circles(known, edges) == [], "[includes] files that include each other"
    layers = {frozenset(c) for c in includes.layer_circles(edges)}
    assert layers == ALLOWED_LAYER_CIRCLES, f"[includes] layer circles: {sorted(layers)}"


def test_each_target_adds_its_own_simd_section_after_the_shared_header():
    # issue 16: the MSL library both targets share (front/include/) includes no target's
    # file; each target's <metal_stdlib> includes it, then that target's barriers,
    # SIMD-group functions and simdgroup_matrix from the target's own include folder
    known, edges, _ = includes.graph()
    shared = "front/include/camel_sim_msl.h"
    for entry, section in (
        ("sim/include/metal_stdlib", "sim/include/camel_sim_simd.h"),
        ("cuda/include/camel_cuda_msl.h", "cuda/include/camel_cuda_simd.h"),
    ):
        line = {e.imported: e.line for e in edges if e.importer == entry}
        assert shared in line and section in line, f"[includes] shim/{entry}: {line}"
        assert line[shared] < line[section], f"[includes] shim/{entry}: {section} comes first"
    into_targets = [
        f"shim/{e.importer}:{e.line} -> {e.imported}"
        for e in edges
        if e.importer.startswith("front/") and not e.imported.startswith("front/")
    ]
    assert not into_targets, f"[includes] the shared front end includes: {into_targets}"


def test_the_include_graph_sees_each_kind_of_include(tmp_path):
    # a small shim/: a quoted include at a line's start (indented, `# include` too) is an
    # edge, resolved next to the includer; <...>, one in a comment and one mid-line are
    # not; an upward include, a runtime including another and a circle are flagged
    shim = tmp_path / "shim"
    for d in ("front/include", "sim/include", "cuda", "build"):
        (shim / d).mkdir(parents=True)
    (shim / "camel_shim.h").write_text("#include <stdint.h>\n")
    (shim / "front" / "a.h").write_text('#pragma once\n  #  include "b.h"\n// #include "c.h"\n')
    (shim / "front" / "b.h").write_text('#include "a.h"\n#include "../sim/runtime.h"\n')
    (shim / "front" / "include" / "lib.h").write_text('x = "#include \\"no.h\\"";\n')
    (shim / "front" / "include" / "shared.h").write_text(
        '#ifdef __CAMEL_CUDA__\n#include "../../cuda/include/simd.h"\n#endif\n'
    )  # the MSL library both targets share, reaching into one target's section
    (shim / "cuda" / "include").mkdir()
    (shim / "cuda" / "include" / "simd.h").write_text("#pragma once\n")
    (shim / "sim" / "runtime.h").write_text('#include "../camel_shim.h"\n#include "../front/a.h"\n')
    (shim / "sim" / "include" / "metal_stdlib").write_text('#include "../../front/include/lib.h"\n')
    (shim / "cuda" / "runtime.cpp").write_text(
        '#include "../sim/runtime.h"\n\n#include "gone.h"\n#include <metal_stdlib>\n'
    )
    (shim / "build" / "gen.h").write_text('#include "nowhere.h"\n')  # build/ is left out
    (shim / "notes.txt").write_text('#include "nowhere.h"\n')  # not a source
    known, edges, dangling = includes.graph(tmp_path)
    assert sorted(known) == [
        "camel_shim.h", "cuda/include/simd.h", "cuda/runtime.cpp", "front/a.h", "front/b.h",
        "front/include/lib.h", "front/include/shared.h", "sim/include/metal_stdlib",
        "sim/runtime.h",
    ]  # fmt: skip
    assert {(e.importer, e.imported, e.line) for e in edges} == {
        ("front/a.h", "front/b.h", 2),
        ("front/b.h", "front/a.h", 1),
        ("front/b.h", "sim/runtime.h", 2),
        ("sim/runtime.h", "camel_shim.h", 1),
        ("sim/runtime.h", "front/a.h", 2),
        ("sim/include/metal_stdlib", "front/include/lib.h", 1),
        ("cuda/runtime.cpp", "sim/runtime.h", 1),
        ("front/include/shared.h", "cuda/include/simd.h", 2),
    }
    assert [(e.importer, e.imported, e.line) for e in dangling] == [
        ("cuda/runtime.cpp", "cuda/gone.h", 3)
    ]
    assert {(e.importer, e.imported) for e in includes.bad(edges)} == {
        ("front/b.h", "sim/runtime.h"),  # upward
        ("cuda/runtime.cpp", "sim/runtime.h"),  # one runtime into another
        ("front/include/shared.h", "cuda/include/simd.h"),  # a shared header into a target's
    }
    assert includes.circles(known, edges) == [["front/a.h", "front/b.h", "sim/runtime.h"]]
    assert includes.layer_circles(edges) == [["cuda", "front", "sim"]]


def test_names_kept_where_the_layers_moved_them():
    # functional no longer imports tensor, and the devices left tensor.py (issue 16): the
    # names those modules held before still work where they were
    import camel
    import camel.functional as F
    from camel import devices
    from camel.tensor import DEVICES, canonical_device, device_of, get_backend

    assert F.Tensor is camel.Tensor
    assert DEVICES == devices.DEVICES == ("cpu", "mps")
    assert (canonical_device, device_of, get_backend) == (
        devices.canonical_device,
        devices.device_of,
        devices.get_backend,
    )
