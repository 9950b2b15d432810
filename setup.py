"""setup.py — builds the native shim as part of installing camel.

Every install runs `make -C shim shim` first: the Metal shim on macOS (plus the
simulator, optional there), the Metal simulator elsewhere. The metadata lives in
pyproject.toml.

- `pip install -e .` (the Makefile's set-up): camel.metal loads the library from
  shim/build/ and the kernels from shaders/ of this checkout.
- `pip install .`, a wheel, an sdist: the built libraries, the shaders and the
  headers the simulator compiles kernels against are copied into the package as
  camel/_native/ (the NATIVE table below), and camel.metal looks there first.

If the shim does not build, the install fails and says why: never a camel whose
first "mps" op fails.
"""

import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1 keeps it in the wheel package
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:  # no wheel package: this run makes an sdist, not a wheel
        bdist_wheel = None

HERE = Path(__file__).resolve().parent
NATIVE_DIR = "camel/_native"  # where an installed camel keeps what this table names

# (built library, [what it needs beside it at run time]), paths relative to the checkout.
# Each goes to camel/_native/ under its path relative to shim/ (the libraries flat, so
# that libcamel_sim.so finds sim/include next to it, as it finds ../sim/include in the
# checkout). A library is shipped when it was built; REQUIRED says which must be.
METAL_LIB = "shim/build/libcamel_metal.dylib"
SIM_LIB = "shim/build/libcamel_sim.so"
NATIVE = [
    (METAL_LIB, []),
    # the simulator compiles each .metal file at run time against its <metal_stdlib>
    # (its <metal_stdlib> includes the MSL library both targets share, front/include)
    (SIM_LIB, ["shim/sim/include", "shim/front/include", "shim/front/sim_abi.h"]),
    # the CUDA shim (built only where CUDA is; the translator's headers are needed at run time)
    (
        "shim/build/libcamel_cuda.so",
        ["shim/cuda/include", "shim/cuda/cuda_abi.h", "shim/front/include"],
    ),
]
# the one library this platform cannot do without (on macOS the simulator is optional)
REQUIRED = METAL_LIB if sys.platform == "darwin" else SIM_LIB
SHADERS = "shaders"  # the kernels, compiled at run time: camel/_native/shaders/*.metal


def build_hint() -> str:
    if sys.platform == "darwin":
        return (
            "The Metal shim needs Apple's command-line tools (xcrun clang and the macOS SDK): "
            "xcode-select --install"
        )
    return (
        "On Linux the simulator needs make and clang >= 16: "
        "sudo apt-get install make clang-19 libclang-rt-19-dev (Debian, Ubuntu)"
    )


def build_shim() -> None:
    shim = HERE / "shim"
    print(f"camel: building the native shim (make -C {shim} shim)", flush=True)
    try:
        result = subprocess.run(["make", "-C", str(shim), "shim"])
    except FileNotFoundError:
        sys.exit(f"camel: cannot build the native shim: `make` is not installed. {build_hint()}")
    if result.returncode != 0:
        sys.exit(
            f"camel: `make -C {shim} shim` failed (exit {result.returncode}); see the output "
            f"above. {build_hint()}"
        )
    if not (HERE / REQUIRED).exists():
        sys.exit(f"camel: `make -C {shim} shim` succeeded but built no {REQUIRED}. {build_hint()}")


def native_files() -> list[tuple[Path, str]]:
    """(source, destination under camel/_native/) for everything an installed camel needs."""
    files = []
    for library, needs in NATIVE:
        if not (HERE / library).exists():
            continue
        files.append((HERE / library, Path(library).name))
        files += [(HERE / p, str(Path(p).relative_to("shim"))) for p in needs]
    files = list(dict.fromkeys(files))  # front/include: needed by both, copied once
    files.append((HERE / SHADERS, SHADERS))
    return files


def copy_native(build_lib: str) -> None:
    dest = Path(build_lib) / NATIVE_DIR
    shutil.rmtree(dest, ignore_errors=True)  # no library left over from an earlier build
    for src, rel in native_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target)
        else:
            shutil.copy2(src, target)
        print(f"camel: packaging {src.relative_to(HERE)} as {NATIVE_DIR}/{rel}", flush=True)


class BuildPyWithShim(build_py):
    """build_py also runs for editable installs (PEP 660), so one hook covers both."""

    def run(self):
        build_shim()
        super().run()
        # an editable camel uses shim/build/ and shaders/ in place
        if not getattr(self, "editable_mode", False):
            copy_native(self.build_lib)


class DevelopWithShim(develop):
    """Legacy `python setup.py develop`."""

    def run(self):
        build_shim()
        super().run()


commands = {"build_py": BuildPyWithShim, "develop": DevelopWithShim}

if bdist_wheel is not None:

    class PlatformWheel(bdist_wheel):
        """The wheel holds a native library that ctypes loads (no CPython extension): it
        works with any Python 3, on this platform only."""

        def finalize_options(self):
            super().finalize_options()
            self.root_is_pure = False

        def get_tag(self):
            return ("py3", "none", super().get_tag()[2])

    commands["bdist_wheel"] = PlatformWheel


setup(cmdclass=commands)
