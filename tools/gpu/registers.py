"""Registers, spills and shared memory of a shader's kernels as ptxas compiles the CUDA
shim's PTX for them: the `ptxas -v` figures the lessons quote, on any machine, no GPU.

    python tools/gpu/registers.py ops_attention.metal                 # every kernel
    python tools/gpu/registers.py ops_attention.metal -k flash_v10    # names containing it
    python tools/gpu/registers.py ops_matmul.metal --arch 80 -k v15

ptxas is not part of camel (the shim's driver compiles PTX itself, at run time). It comes
from $PTXAS, from PATH, or from PyPI: `pip install nvidia-cuda-nvcc` (the wheel holds
bin/ptxas). The driver's JIT on a GPU may allocate a little differently from the ptxas
version found here: the script prints which one it ran.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SHADERS = Path(__file__).resolve().parents[2] / "shaders"


def find_ptxas() -> str | None:
    """$PTXAS, ptxas on PATH, or the one in an installed nvidia-cuda-nvcc wheel."""
    if os.environ.get("PTXAS"):
        return os.environ["PTXAS"]
    if shutil.which("ptxas"):
        return shutil.which("ptxas")
    try:
        import nvidia  # the namespace package of NVIDIA's PyPI wheels
    except ImportError:
        return None
    for root in nvidia.__path__:
        for found in sorted(Path(root).glob("*/bin/ptxas")):
            return str(found)
    return None


def parse(log: str) -> list[dict]:
    """One dict per kernel of `ptxas -v` output: name, registers, stack, spill stores and
    loads (bytes), smem (bytes of static shared memory)."""
    rows, row = [], None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            row = dict(name=m.group(1), registers=0, stack=0, spill_stores=0, spill_loads=0,
                       smem=0)  # fmt: skip
            rows.append(row)
            continue
        if row is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)  # fmt: skip
        if m:
            row["stack"], row["spill_stores"], row["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            row["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            row["smem"] = int(smem.group(1)) if smem else 0
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| kernel | registers | spill stores / loads (bytes) | stack (bytes) | smem (bytes) |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        spills = f"{r['spill_stores']} / {r['spill_loads']}"
        lines.append(f"| {r['name'].removeprefix('camel_')} | {r['registers']} | {spills} | "
                     f"{r['stack']} | {r['smem']} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/gpu/registers.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("shader", help="a file of shaders/, e.g. ops_attention.metal")
    ap.add_argument("-k", dest="match", default="", help="only kernels whose name contains this")
    ap.add_argument("--arch", type=int, default=90, help="sm_XX (default 90)")
    args = ap.parse_args(argv)
    source = SHADERS / args.shader
    if not source.is_file():
        known = ", ".join(sorted(p.name for p in SHADERS.glob("*.metal")))
        print(f"[registers] no shader {args.shader!r} in {SHADERS}; known: {known}",
              file=sys.stderr)  # fmt: skip
        return 2
    ptxas = find_ptxas()
    if ptxas is None:
        print("[registers] no ptxas: set PTXAS, put it on PATH, or pip install nvidia-cuda-nvcc",
              file=sys.stderr)  # fmt: skip
        return 2
    from camel import metal

    ptx, _ = metal._cuda_call("camel_cuda_compile", source.read_text(),
                              f"shaders/{args.shader}", args.arch)  # fmt: skip
    entries = [e for e in re.findall(r"\.visible \.entry (\w+)\(", ptx) if args.match in e]
    if not entries:
        print(f"[registers] no kernel of {args.shader} contains {args.match!r}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernels.ptx"
        path.write_text(ptx)
        only = [arg for e in entries for arg in ("-e", e)]  # ptxas compiles just these
        done = subprocess.run([ptxas, f"-arch=sm_{args.arch}", "-v", *only, str(path),
                               "-o", str(Path(tmp) / "kernels.cubin")],
                              capture_output=True, text=True)  # fmt: skip
        version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    if done.returncode != 0:
        print(f"[registers] {ptxas} failed:\n{done.stderr}", file=sys.stderr)
        return 1
    rows = [r for r in parse(done.stdout + done.stderr) if args.match in r["name"]]
    release = re.search(r"release [\d.]+", version)
    print(f"{args.shader}, sm_{args.arch}, {ptxas} ({release.group(0) if release else '?'}):")
    print(table(sorted(rows, key=lambda r: r["name"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
