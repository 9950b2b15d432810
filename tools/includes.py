"""shim/'s include graph: its circles, and the includes that go up or across the layers.

    python tools/includes.py            # the figures, the circles, the bad includes
    python tools/includes.py --edges    # and every include, one line each

The C/C++/Objective-C sibling of tools/imports.py (whose circle finder it shares). Static:
every source and header under shim/ (build/ left out) is read, nothing is compiled. An
edge is a `#include "..."` at the start of a line, resolved against the including
file's directory, as clang does first for a quoted include (the shims use no -I of their
own for "..."); an `#include <...>` is a system or compat header and no edge. An include
inside `#ifdef` counts: the layering must hold for every target.

The layers (LAYERS below; shim/README.md has the same table). A file may include its own
layer or one of a lower rank; the runtimes share a rank, so one including another is as
wrong as an upward include:

    rank 0  abi      camel_shim.h      the C ABI, which every shim implements
    rank 1  front    front/            the MSL front end: the translator both targets use,
                                       the kernel-library ABI (sim_abi.h), the MSL library
                                       both targets compile kernels against (front/include)
    rank 2  sim      sim/              the simulator's runtime and its <metal_stdlib>, with
                                       the simulator's SIMD-group section (camel_sim_simd.h)
            cuda     cuda/             the CUDA runtime, the CUDA back end of the
                                       translator and its <metal_stdlib>, with the CUDA
                                       SIMD-group section (camel_cuda_simd.h)
            metal    metal/            the Metal shim (Objective-C)

What differs between the targets lives in the target's folder: a shared header
(front/include) that includes a target's header, even under #ifdef __CAMEL_CUDA__, is an
upward include and fails, as a runtime including another does.

A circle is a strongly connected component of more than one file. tests/test_imports.py
fails on any circle, bad include or include that names no file.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIM = "shim"
SOURCE_SUFFIXES = {".h", ".c", ".cc", ".cpp", ".m"}

LAYERS = [  # (layer, rank, files: a path under shim/ or a folder ending in "/")
    ("abi", 0, ["camel_shim.h"]),
    ("front", 1, ["front/"]),
    ("sim", 2, ["sim/"]),
    ("cuda", 2, ["cuda/"]),
    ("metal", 2, ["metal/"]),
]

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.MULTILINE)

# the import tool's Edge and circle finder (Tarjan), loaded as tests/test_imports.py does
_spec = importlib.util.spec_from_file_location("camel_imports", ROOT / "tools" / "imports.py")
imports = sys.modules.get("camel_imports") or importlib.util.module_from_spec(_spec)
if "camel_imports" not in sys.modules:
    sys.modules["camel_imports"] = imports  # dataclasses look their module up there
    _spec.loader.exec_module(imports)
Edge = imports.Edge
circles = imports.circles


def files(root: Path = ROOT) -> dict[str, Path]:
    """Every source and header of shim/ (build/ left out): path under shim/ -> file.
    Headers without a suffix count where they sit in an include/ folder (<metal_stdlib>)."""
    shim = root / SHIM
    out = {}
    for p in sorted(shim.rglob("*")):
        rel = p.relative_to(shim)
        if not p.is_file() or rel.parts[0] == "build":
            continue
        if p.suffix in SOURCE_SUFFIXES or (not p.suffix and "include" in rel.parts[:-1]):
            out[rel.as_posix()] = p
    return out


def layer_of(name: str) -> tuple[str, int]:
    """(layer, rank) of a file named by its path under shim/; a file in none is an error."""
    for layer, rank, patterns in LAYERS:
        for pat in patterns:
            if name == pat or (pat.endswith("/") and name.startswith(pat)):
                return layer, rank
    raise KeyError(
        f"[includes] shim/{name} is in no layer of tools/includes.py LAYERS: add it to the "
        "layer it belongs to (and to the table in shim/README.md)"
    )


def graph(root: Path = ROOT) -> tuple[dict[str, Path], list[Edge], list[Edge]]:
    """(files, include edges, includes that name no file). An edge's importer and imported
    are paths under shim/, its level "include"; a dangling include's imported is the
    path it names, resolved."""
    known = files(root)
    shim = (root / SHIM).resolve()
    edges, dangling = [], []
    for name, path in known.items():
        text = path.read_text(errors="replace")
        for m in _INCLUDE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            target = (path.parent / m.group(1)).resolve()
            try:
                rel = target.relative_to(shim).as_posix()
            except ValueError:  # outside shim/: no edge of this graph, but must exist
                rel = str(target)
            if rel in known:
                edges.append(Edge(name, rel, "include", line))
            elif not target.is_file():
                dangling.append(Edge(name, rel, "include", line))
    return known, edges, dangling


def bad(edges) -> list[Edge]:
    """Includes of a higher rank, or of another layer of the same rank (runtime to runtime)."""
    out = []
    for e in edges:
        (lo, lo_rank), (hi, hi_rank) = layer_of(e.importer), layer_of(e.imported)
        if hi_rank > lo_rank or (hi_rank == lo_rank and hi != lo):
            out.append(e)
    return out


def layer_circles(edges) -> list[list[str]]:
    """Circles among the layers themselves (sim includes cuda and cuda includes sim, even
    through different files): each a sorted list of layer names."""
    layers = {layer for layer, _, _ in LAYERS}
    pairs = {(layer_of(e.importer)[0], layer_of(e.imported)[0]) for e in edges}
    lifted = [Edge(a, b, "include", 0) for a, b in sorted(pairs) if a != b]
    return circles(dict.fromkeys(sorted(layers)), lifted)


def figures(known, edges, dangling) -> dict[str, int]:
    return {
        "files": len(known),
        "includes": len(edges),
        "circles": len(circles(known, edges)),
        "layer circles": len(layer_circles(edges)),
        "bad includes": len(bad(edges)),
        "dangling": len(dangling),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edges", action="store_true", help="print every include")
    args = ap.parse_args(argv)
    known, edges, dangling = graph()
    for k, v in figures(known, edges, dangling).items():
        print(f"{k:>13}: {v}")
    if args.edges:
        print("\nincludes (includer -> included, line):")
        for e in sorted(edges, key=lambda e: (e.importer, e.line)):
            print(f"  {e.importer:>36} -> {e.imported:<36} :{e.line}")
    print("\ncircles:")
    for c in circles(known, edges):
        print("  " + " <-> ".join(c))
    print("\nlayer circles:")
    for c in layer_circles(edges):
        print("  " + " <-> ".join(c))
    print("\nbad includes (includer [layer] -> included [layer], line):")
    for e in bad(edges):
        print(
            f"  {e.importer} [{layer_of(e.importer)[0]}] -> {e.imported} "
            f"[{layer_of(e.imported)[0]}]  shim/{e.importer}:{e.line}"
        )
    print("\nincludes that name no file:")
    for e in dangling:
        print(f"  shim/{e.importer}:{e.line} -> {e.imported}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
