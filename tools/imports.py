"""camel/'s module import graph, its circles, and the imports that go up the layer order.

    python tools/imports.py            # the figures, the circles, the upward imports
    python tools/imports.py --edges    # and every import, one line each

Static: every .py file under camel/ is parsed (ast), nothing is imported. An import is
"module-level" when it runs as the module is imported (top level, also inside if/try or a
class body) and "function-level" when it sits inside a def (it runs at the first call).
`importlib.import_module("camel.x")` with a literal name counts as an import too. The
implicit import of a parent package (importing camel.nn.module first runs camel/__init__.py)
is not an edge: the package facades re-export, they are not depended on.

The layers, lowest first (LAYERS below; docs/stage0.md has the same table). A module may
import from its own layer or a lower one; an import of a higher layer is "upward":

    leaves      config, hints, data    environment, messages, data files; import nothing
                                       from camel but each other
    metal       metal.abi              the C ABI through ctypes: structs, declarations, errors
                metal.loading          choosing, building, loading the shim; the device
                metal.buffers          the buffer cache, Buffer, DeviceArray, host mirrors
                metal.kernels          compile, Library, Function and its dispatch
                metal.vendor,          the vendors' kernels (MPS, cuBLAS, MPSGraph);
                metal.translation      MSL -> CUDA, to read
                metal                  camel/metal/__init__.py: the API, re-exported
    tuning      tuning, profiler       on top of metal only: tuning cache, timing, profiling
    kernels     gemm, flash,           host side of the kernels, over device arrays
                backend_cpu, backend_mps
    devices     devices                the device names and each one's backend module
    autograd    autograd               the tape: imports nothing from camel
    functional  functional             every op, forward and backward; it gets the Tensor
                                       class from autograd, never imports tensor
    tensor      tensor                 the Tensor: its methods call functional's ops
    nn          nn, nn.*               modules and layers
    optim       optim, gradcheck       optimisers; finite-difference checks
    package     camel                  camel/__init__.py: the public API, re-exported
    bench       bench, bench.*         benchmarks and the tuner: may use everything

A circle is a strongly connected component of more than one module, over all imports
(module- and function-level). tests/test_imports.py fails on any circle or upward import
that is not in its allow-list.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "camel"

LAYERS = [  # (layer, module names or "prefix.*"), lowest first
    ("leaves", ["camel.config", "camel.hints", "camel.data"]),
    # camel.metal.*, one concern a file, each importing only the ones listed before it
    ("metal.abi", ["camel.metal.abi"]),
    ("metal.loading", ["camel.metal.loading"]),
    ("metal.buffers", ["camel.metal.buffers"]),
    ("metal.kernels", ["camel.metal.kernels"]),
    ("metal.vendor", ["camel.metal.vendor", "camel.metal.translation"]),
    ("metal", ["camel.metal"]),  # the package: re-exports the public names of the above
    ("tuning", ["camel.tuning", "camel.profiler"]),
    ("kernels", ["camel.gemm", "camel.flash", "camel.backend_cpu", "camel.backend_mps"]),
    ("devices", ["camel.devices"]),
    ("autograd", ["camel.autograd"]),
    ("functional", ["camel.functional"]),  # below the Tensor: autograd hands it the class
    ("tensor", ["camel.tensor"]),
    ("nn", ["camel.nn", "camel.nn.*"]),
    ("optim", ["camel.optim", "camel.gradcheck"]),
    ("package", ["camel"]),
    ("bench", ["camel.bench", "camel.bench.*"]),
]


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    level: str  # "module" or "function"
    line: int


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def layer_of(module: str) -> int:
    """The index of a module's layer in LAYERS; a module in none is an error."""
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            if module == n or (n.endswith(".*") and module.startswith(n[:-1])):
                return i
    raise KeyError(
        f"[imports] module {module} is in no layer of tools/imports.py LAYERS: add it "
        "to the layer it belongs to (and to the table in docs/stage0.md)"
    )


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The camel module that `name` imports: itself, or its nearest known parent."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _imports_of(module: str, path: Path, known: dict[str, Path]) -> list[Edge]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    here = module if is_package else module.rpartition(".")[0]  # for relative imports
    edges = []

    def add(target, level, line):
        resolved = _resolve(target, known) if target.split(".")[0] == PACKAGE else None
        if resolved is not None and resolved != module:
            edges.append(Edge(module, resolved, level, line))

    def visit(node, level):
        for child in ast.iter_child_nodes(node):
            inner = level
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                inner = "function"
            if isinstance(child, ast.Import):
                for a in child.names:
                    add(a.name, level, child.lineno)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: from .module import x, from .. import y
                    base = here
                    for _ in range(child.level - 1):
                        base = base.rpartition(".")[0]
                    source = f"{base}.{child.module}" if child.module else base
                else:
                    source = child.module
                targets = set()  # from camel import metal: the module camel.metal
                for a in child.names:
                    sub = f"{source}.{a.name}"
                    targets.add(sub if sub in known else source)
                for t in sorted(targets):  # one edge per statement and module
                    add(t, level, child.lineno)
            elif (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr == "import_module"
                and child.args
                and isinstance(child.args[0], ast.Constant)
                and isinstance(child.args[0].value, str)
            ):
                add(child.args[0].value, level, child.lineno)
            visit(child, inner)

    visit(tree, "module")
    return edges


def graph(root: Path = ROOT) -> tuple[dict[str, Path], list[Edge]]:
    """(modules, import edges), one edge per import statement and imported module."""
    known = modules(root)
    edges = [e for m, p in known.items() for e in _imports_of(m, p, known)]
    return known, edges


def circles(known, edges) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    succ = {m: sorted({e.imported for e in edges if e.importer == m}) for m in known}
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in known:
        if v not in index:
            strong(v)
    return sorted(out)


def upward(edges) -> list[Edge]:
    """Imports of a module in a higher layer than the importer's."""
    return [e for e in edges if layer_of(e.imported) > layer_of(e.importer)]


def figures(known, edges) -> dict[str, int]:
    pairs = {(e.importer, e.imported) for e in edges}
    return {
        "files": len(known),
        "imports": len(edges),
        "module-level": sum(e.level == "module" for e in edges),
        "function-level": sum(e.level == "function" for e in edges),
        "module pairs": len(pairs),
        "circles": len(circles(known, edges)),
        "upward imports": len(upward(edges)),
        "upward pairs": len({(e.importer, e.imported) for e in upward(edges)}),
    }


def _short(m: str) -> str:
    return m.removeprefix("camel.") if m != PACKAGE else m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edges", action="store_true", help="print every import")
    args = ap.parse_args(argv)
    known, edges = graph()
    for k, v in figures(known, edges).items():
        print(f"{k:>15}: {v}")
    if args.edges:
        print("\nimports (importer -> imported, level, line):")
        for e in sorted(edges, key=lambda e: (e.importer, e.line)):
            print(f"  {_short(e.importer):>18} -> {_short(e.imported):<18} {e.level:8} :{e.line}")
    print("\ncircles:")
    for c in circles(known, edges):
        print("  " + " <-> ".join(_short(m) for m in c))
    print("\nupward imports (importer [layer] -> imported [layer], level, line):")
    for e in upward(edges):
        lo, hi = LAYERS[layer_of(e.importer)][0], LAYERS[layer_of(e.imported)][0]
        print(
            f"  {_short(e.importer)} [{lo}] -> {_short(e.imported)} [{hi}]  "
            f"{e.level}-level, {known[e.importer].relative_to(ROOT)}:{e.line}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
