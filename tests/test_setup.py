"""The set-up and the packaging, the fast parts (tools/check-install.sh does the slow rest):

- tools/mkvenv.sh picks a Python >= 3.10 from PATH, skipping old and broken ones, reuses a
  working venv, and says what to install when it finds none or venv is missing;
- setup.py's NATIVE table names files that exist, laid out as the simulator looks for them;
- camel laid out as installed (camel/ + camel/_native/, no checkout around it) runs an op.
"""

import os
import platform
import runpy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import setuptools

REPO = Path(__file__).resolve().parent.parent
MKVENV = REPO / "tools" / "mkvenv.sh"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the set-up is POSIX shell")


# ---- tools/mkvenv.sh -------------------------------------------------------------------

# A stand-in interpreter: the real one, reporting another version, and with `-m venv DIR`
# faked (a link to the real python, which has pip), so that no test waits for a real venv.
STUB = """#!/bin/sh
echo "$0" >> "{calls}"
if [ "$1" = -m ] && [ "$2" = venv ]; then
  {venv}
fi
exec "{real}" -c "import sys; sys.version_info = {version}; exec(sys.argv[1])" "$2"
"""
MAKE_VENV = 'mkdir -p "$3/bin" && ln -s "{real}" "$3/bin/python" && touch "$3/pyvenv.cfg"; exit 0'
NO_ENSUREPIP = (
    'echo "The virtual environment was not created: ensurepip is not available" >&2; exit 1'
)


def tools_bin(tmp_path: Path) -> Path:
    """A bin/ with the few tools mkvenv.sh uses, and no Python at all."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "uname", "mktemp", "sed", "tail", "cut", "rm", "mkdir", "ln", "touch"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    return bin_dir


def stub(bin_dir: Path, name: str, version=None, venv: str = MAKE_VENV) -> Path:
    """bin_dir/name: a Python of `version` ((3, 9, 6)); version None: one that does not run
    (like a pyenv shim for a version that is not selected)."""
    path = bin_dir / name
    if version is None:
        path.write_text(f'#!/bin/sh\necho "$0" >> "{bin_dir}/calls"\nexit 127\n')
    else:
        real = sys.executable
        path.write_text(
            STUB.format(
                calls=bin_dir / "calls",
                real=real,
                version=(*version, "final", 0),
                venv=venv.format(real=real),
            )
        )
    path.chmod(0o755)
    return path


def mkvenv(bin_dir: Path, venv: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [shutil.which("sh"), str(MKVENV), str(venv)],
        env={"PATH": str(bin_dir), "HOME": str(bin_dir.parent), **env},
        capture_output=True,
        text=True,
    )


def test_mkvenv_without_a_new_enough_python_says_what_to_install(tmp_path):
    bin_dir = tools_bin(tmp_path)
    stub(bin_dir, "python3.9", (3, 9, 6))
    stub(bin_dir, "python3", (3, 9, 6))
    stub(bin_dir, "python3.12", None)  # found on PATH, does not run
    r = mkvenv(bin_dir, tmp_path / ".venv")
    assert r.returncode != 0
    assert "camel needs Python 3.10 or newer, and found none" in r.stderr
    assert f"{bin_dir}/python3 (3.9.6)" in r.stderr
    assert f"{bin_dir}/python3.12 (does not run)" in r.stderr
    hint = "brew install python@3.12" if sys.platform == "darwin" else "apt-get install python3"
    assert hint in r.stderr
    assert not (tmp_path / ".venv").exists()


def test_mkvenv_picks_the_first_python_that_runs_and_is_new_enough(tmp_path):
    bin_dir = tools_bin(tmp_path)
    stub(bin_dir, "python3.13", None)
    stub(bin_dir, "python3.12", (3, 9, 6))  # a misnamed old one: skipped too
    chosen = stub(bin_dir, "python3.11", (3, 10, 0))
    stub(bin_dir, "python3", (3, 12, 0))
    venv = tmp_path / ".venv"
    r = mkvenv(bin_dir, venv)
    assert r.returncode == 0, r.stderr
    assert (venv / "bin" / "python").exists()
    venv_calls = [c for c in (bin_dir / "calls").read_text().split() if c == str(chosen)]
    assert venv_calls, "python3.11 should have made the venv"
    assert "(Python 3.10.0)" in r.stdout

    # a second run reuses the venv: no interpreter on PATH is asked again
    (bin_dir / "calls").unlink()
    r = mkvenv(bin_dir, venv)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and not (bin_dir / "calls").exists()


def test_mkvenv_remakes_a_broken_venv_and_refuses_a_directory_that_is_not_one(tmp_path):
    bin_dir = tools_bin(tmp_path)
    stub(bin_dir, "python3", (3, 11, 2))
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").touch()
    os.symlink(tmp_path / "gone" / "python3", venv / "bin" / "python")  # its Python removed
    r = mkvenv(bin_dir, venv)
    assert r.returncode == 0, r.stderr
    assert "does not work any more" in r.stdout and (venv / "bin" / "python").exists()

    plain = tmp_path / "plain"
    plain.mkdir()
    r = mkvenv(bin_dir, plain)
    assert r.returncode != 0 and "is not a virtual environment" in r.stderr


def test_mkvenv_without_venv_or_ensurepip_names_the_package(tmp_path):
    bin_dir = tools_bin(tmp_path)
    stub(bin_dir, "python3", (3, 11, 2), venv=NO_ENSUREPIP)
    venv = tmp_path / ".venv"
    r = mkvenv(bin_dir, venv)
    assert r.returncode != 0
    assert "ensurepip is not available" in r.stderr  # the interpreter's own words, shown
    if sys.platform != "darwin":
        assert "sudo apt-get install python3-venv" in r.stderr
        assert "python3.11-venv" in r.stderr
    assert not venv.exists()


def test_mkvenv_camel_python_names_the_interpreter(tmp_path):
    bin_dir = tools_bin(tmp_path)
    stub(bin_dir, "python3", (3, 12, 0))
    old = stub(bin_dir, "old-python", (3, 9, 6))
    r = mkvenv(bin_dir, tmp_path / ".venv", CAMEL_PYTHON=str(old))
    assert r.returncode != 0
    assert f"CAMEL_PYTHON={old} (3.9.6)" in r.stderr


# ---- setup.py: what an installed camel carries -------------------------------------------


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's globals, without running setup()."""
    real = setuptools.setup
    setuptools.setup = lambda **kw: None
    try:
        return runpy.run_path(str(REPO / "setup.py"))
    finally:
        setuptools.setup = real


def test_native_table_names_files_that_exist(setup_py):
    libraries = [library for library, _ in setup_py["NATIVE"]]
    assert setup_py["REQUIRED"] in libraries
    for library, needs in setup_py["NATIVE"]:
        assert library.startswith("shim/build/lib"), library
        # what the simulator needs must exist always; another shim's, once that shim is built
        if library == setup_py["SIM_LIB"] or (REPO / library).exists():
            for path in needs:
                assert (REPO / path).exists(), f"NATIVE: {library} needs {path}, which is missing"
    assert sorted((REPO / setup_py["SHADERS"]).glob("*.metal"))


def test_native_layout_is_where_the_simulator_and_camel_metal_look(setup_py, tmp_path):
    """The sim finds <metal_stdlib> in sim/include next to its library (translate.cpp),
    it includes ../../front/include/camel_sim_msl.h, which includes ../sim_abi.h, and its
    own camel_sim_simd.h; the CUDA shim's <metal_stdlib> the same camel_sim_msl.h and its
    own camel_cuda_simd.h; and camel.metal reads _native/shaders/."""
    if not (REPO / setup_py["SIM_LIB"]).exists():
        pytest.skip("the simulator is not built (make -C shim sim)")
    files = dict((dest, src) for src, dest in setup_py["native_files"]())
    assert files["libcamel_sim.so"] == REPO / "shim/build/libcamel_sim.so"
    setup_py["copy_native"](str(tmp_path))
    native = tmp_path / "camel" / "_native"
    assert (native / "sim" / "include" / "metal_stdlib").is_file()
    front = native / "sim" / "include" / ".." / ".." / "front"
    assert (front / "include" / "camel_sim_msl.h").is_file() and (front / "sim_abi.h").is_file()
    assert (native / "sim" / "include" / "camel_sim_simd.h").is_file()
    if (REPO / "shim/build/libcamel_cuda.so").exists():
        cuda = native / "cuda" / "include"
        assert (cuda / "metal_stdlib").is_file() and (cuda / ".." / "cuda_abi.h").is_file()
        assert (cuda / "camel_cuda_simd.h").is_file()
    assert sorted(p.name for p in (native / "shaders").glob("*.metal")) == sorted(
        p.name for p in (REPO / "shaders").glob("*.metal")
    )


def test_installed_layout_runs_an_op_outside_the_checkout(setup_py, tmp_path):
    """camel/ plus camel/_native/ in a directory of their own, as pip installs them."""
    from camel import metal

    try:
        metal.device_name()  # builds the shim if needed
    except metal.MetalError as e:  # pragma: no cover - only where the shim cannot be built
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the camel shim cannot be built or loaded: {e}")
    if not (REPO / setup_py["REQUIRED"]).exists():
        pytest.skip(f"{setup_py['REQUIRED']} is not built")
    site = tmp_path / "site"
    shutil.copytree(REPO / "camel", site / "camel", ignore=shutil.ignore_patterns("_native"))
    setup_py["copy_native"](str(site))
    script = textwrap.dedent(
        """
        import numpy as np, camel, camel.metal as metal
        assert metal._INSTALLED and metal.SHADERS_DIR.parent.parent.parent.name == "site"
        x = camel.tensor(np.arange(-3, 4, dtype=np.float32), device="mps")
        print(camel.metal.device_name(), x.relu().numpy().tolist())
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CAMEL_SHIM_LIBRARY")}
    env["PYTHONPATH"] = str(site)
    r = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-7:] == "[0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0]".split()


def test_wheel_tag_is_this_platform_and_any_python3(setup_py):
    """The wheel carries a native library: never tagged py3-none-any."""
    from setuptools.dist import Distribution

    if "PlatformWheel" not in setup_py:  # setup.py defines it only where bdist_wheel exists
        pytest.skip(
            "no bdist_wheel in this environment (setuptools < 70.1 and no wheel "
            "package); pip builds wheels in an environment of its own"
        )
    cmd = setup_py["PlatformWheel"](Distribution({"name": "camel", "version": "0"}))
    cmd.finalize_options()
    python, abi, plat = cmd.get_tag()
    assert (python, abi) == ("py3", "none")
    assert plat != "any" and platform.machine().lower().replace("-", "_") in plat.lower()


# ---- shim/Makefile on macOS, driven here with a stand-in xcrun ----------------------------

FAKE_XCRUN = """#!/bin/sh
# no command-line tools: xcrun's own words; else `--find clang` works and `-o OUT` writes OUT
[ "$FAKE_CLT" = 1 ] || { echo "xcrun: error: invalid active developer path" >&2; exit 1; }
[ "$1" = --find ] && { echo /usr/bin/clang; exit 0; }
while [ $# -gt 0 ]; do [ "$1" = -o ] && { touch "$2"; exit 0; }; shift; done
exit 1
"""


def make_shim_as_on_macos(tmp_path: Path, clt: bool) -> subprocess.CompletedProcess:
    """`make -C shim shim` as macOS would run it, the simulator's compiler failing."""
    if shutil.which("make") is None:
        pytest.skip("no make here")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "xcrun").write_text(FAKE_XCRUN)
    (bin_dir / "xcrun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_CLT": str(int(clt))}
    build = tmp_path / "build"
    args = ["make", "-C", str(REPO / "shim"), "UNAME=Darwin", f"BUILD={build}", "SIM_CXX=false"]
    return subprocess.run([*args, "shim"], env=env, capture_output=True, text=True)


def test_macos_shim_build_survives_a_failing_simulator(tmp_path):
    r = make_shim_as_on_macos(tmp_path, clt=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "build" / "libcamel_metal.dylib").exists()
    assert not (tmp_path / "build" / "libcamel_sim.so").exists()
    assert "the simulator did not build" in r.stdout and "xcode-select --install" in r.stdout


def test_macos_shim_build_without_command_line_tools_names_xcode_select(tmp_path):
    r = make_shim_as_on_macos(tmp_path, clt=False)
    assert r.returncode != 0
    assert "xcode-select --install" in r.stdout
    assert not (tmp_path / "build" / "libcamel_metal.dylib").exists()
