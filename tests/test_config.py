"""camel/config.py is the one place the Python side reads the environment.

Reading a variable elsewhere (os.environ.get, os.environ[...], os.getenv) fails here: add
a function to camel/config.py and its table instead. Writing one (a benchmark setting a
variable for the next op, a shim's include path) is not a read.
"""

import ast
import pathlib

import pytest

from camel import config

CAMEL = pathlib.Path(__file__).resolve().parents[1] / "camel"

# files that still read the environment themselves, each with the reason
ALLOWED = {
    "config.py": "the one place",
    # benchmarks save and restore the variables they set for a run (with_env), and print
    # the simulator's and BLAS's own settings
    "bench/bandwidth.py": "with_env",
    "bench/attention.py": "sets CAMEL_ATTENTION=naive for the reference row",
    "bench/sim.py": "CAMEL_SIM_WORKERS, CAMEL_SIM_ORDER, POCL_*: the simulator's own",
    "bench/cpu.py": "OPENBLAS_NUM_THREADS, OMP_NUM_THREADS: NumPy's BLAS",
}


def _environ(n):
    """True for the expression os.environ."""
    return (
        isinstance(n, ast.Attribute)
        and n.attr == "environ"
        and isinstance(n.value, ast.Name)
        and n.value.id == "os"
    )


def _reads(tree):
    """Line numbers of environment reads: os.getenv(...), os.environ.get(...),
    os.environ[...] in a load context, `in os.environ`."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if f.attr == "getenv" and isinstance(f.value, ast.Name) and f.value.id == "os":
                out.append(node.lineno)
            elif f.attr == "get" and _environ(f.value):
                out.append(node.lineno)
        elif isinstance(node, ast.Subscript) and _environ(node.value):
            if isinstance(node.ctx, ast.Load):
                out.append(node.lineno)
        elif isinstance(node, ast.Compare) and any(_environ(c) for c in node.comparators):
            out.append(node.lineno)
    return sorted(out)


def test_only_config_reads_the_environment():
    found = {}
    for path in sorted(CAMEL.rglob("*.py")):
        rel = path.relative_to(CAMEL).as_posix()
        lines = _reads(ast.parse(path.read_text()))
        if lines and rel not in ALLOWED:
            found[rel] = lines
    assert not found, (
        f"[config] environment read outside camel/config.py (file: lines): {found}; add a "
        "function to camel/config.py and call it"
    )


def test_the_reader_sees_each_form():
    src = (
        "import os\n"
        "a = os.environ.get('X')\n"
        "b = os.getenv('Y')\n"
        "c = os.environ['Z']\n"
        "d = 'W' in os.environ\n"
        "os.environ['V'] = '1'\n"  # a write: not a read
    )
    assert _reads(ast.parse(src)) == [2, 3, 4, 5]


@pytest.mark.parametrize(
    "name, value, fn, want",
    [
        ("CAMEL_MATMUL", " 9/k4 ", config.matmul, "9/k4"),
        ("CAMEL_ATTENTION", " Flash_V3\n", config.attention, "flash_v3"),
        ("CAMEL_MEMORY_KERNELS", "1", config.memory_kernels, "1"),
        ("CAMEL_LAYERNORM", "", config.layernorm, ""),  # set but empty: not None
        ("CAMEL_LAYERNORM_BACKWARD", "3", config.layernorm_backward, "3"),
        ("CAMEL_PROFILE", "0", config.profile, False),
        ("CAMEL_PROFILE", "yes", config.profile, True),
        ("CAMEL_PEAKS", " 1.5,200 ", config.peaks, "1.5,200"),
        ("CAMEL_SHIM", " SIM\n", config.shim, "sim"),
        ("CAMEL_SHIM_LIBRARY", "/x/libcamel_sim.so", config.shim_library, "/x/libcamel_sim.so"),
        ("CAMEL_SHIM_LIBRARY", "", config.shim_library, None),  # empty: the default search
        ("CAMEL_CAPTURE", "run.gputrace", config.capture, "run.gputrace"),
        ("CAMEL_INCLUDE_PATH", "/a:/b", config.include_path, "/a:/b"),
    ],
)
def test_each_variable_is_read_when_asked(monkeypatch, name, value, fn, want):
    monkeypatch.delenv(name, raising=False)
    unset = fn()
    monkeypatch.setenv(name, value)  # read at the call, not cached at import
    assert fn() == want
    assert unset in ("", None, False)


def test_cache_and_data_dirs(monkeypatch, tmp_path):
    monkeypatch.delenv("CAMEL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert config.cache_dir() == tmp_path / "xdg" / "camel"
    monkeypatch.setenv("CAMEL_CACHE_DIR", str(tmp_path / "c"))
    assert config.cache_dir() == tmp_path / "c"
    monkeypatch.setenv("CAMEL_DATA", "")
    assert config.data_dir() is None
    monkeypatch.setenv("CAMEL_DATA", "~/mnist")
    assert config.data_dir() == pathlib.Path("~/mnist").expanduser()
