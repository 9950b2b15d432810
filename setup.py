"""setup.py — builds the native shim as part of installing camel.

`pip install -e .` (and `pip install .`, `python setup.py develop`) runs
`make -C shim shim` first: the Metal shim on macOS (plus the simulator), the
Metal simulator elsewhere. camel.metal loads the library from shim/build/, so
use camel from this checkout (an editable install); the metadata lives in
pyproject.toml.
"""

import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

HERE = Path(__file__).resolve().parent


def build_shim() -> None:
    shim = HERE / "shim"
    print(f"camel: building the native shim (make -C {shim} shim)", flush=True)
    result = subprocess.run(["make", "-C", str(shim), "shim"])
    if result.returncode != 0:
        sys.exit(
            f"camel: `make -C {shim} shim` failed (exit {result.returncode}); see the output "
            "above. On Linux the simulator needs clang >= 16 (Debian: clang-19)."
        )


class BuildPyWithShim(build_py):
    """build_py also runs for editable installs (PEP 660), so one hook covers both."""

    def run(self):
        build_shim()
        super().run()


class DevelopWithShim(develop):
    """Legacy `python setup.py develop`."""

    def run(self):
        build_shim()
        super().run()


setup(cmdclass={"build_py": BuildPyWithShim, "develop": DevelopWithShim})
