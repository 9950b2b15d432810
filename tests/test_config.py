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
    # benchmarks print the simulator's and BLAS's own settings
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


CHOICES = [  # the per-op choices: read once, at import (read_environment())
    ("CAMEL_MATMUL", " 9/k4 ", config.matmul, "9/k4"),
    ("CAMEL_ATTENTION", " Flash_V3\n", config.attention, "flash_v3"),
    ("CAMEL_MEMORY_KERNELS", "1", config.memory_kernels, "1"),
    ("CAMEL_LAYERNORM", "", config.layernorm, ""),  # set but empty: not None
    ("CAMEL_LAYERNORM_BACKWARD", "3", config.layernorm_backward, "3"),
]


@pytest.mark.parametrize("name, value, fn, want", CHOICES)
def test_each_choice_is_read_once(monkeypatch, name, value, fn, want):
    """A per-op choice comes from the environment as camel was imported: a later change of
    the variable is not seen until read_environment() (ops never look at os.environ)."""
    monkeypatch.delenv(name, raising=False)
    config.read_environment()
    unset = fn()
    monkeypatch.setenv(name, value)
    assert fn() == unset in ("", None)  # not read at the call
    config.read_environment()
    assert fn() == want


def test_choices_for_a_block_and_for_the_run():
    """set_choices() changes a choice until changed again, choices() for a block (even one
    that raises); values are written as the variables would hold them, None is unset."""
    config.set_choices(matmul=None, memory_kernels=None)
    with config.choices(matmul=" 11 ", memory_kernels=2):
        assert (config.matmul(), config.memory_kernels()) == ("11", "2")
    assert (config.matmul(), config.memory_kernels()) == ("", None)
    with pytest.raises(RuntimeError), config.choices(attention="naive"):
        raise RuntimeError
    assert config.attention() == ""
    config.set_choices(layernorm="4")
    assert config.layernorm() == "4"
    with pytest.raises(TypeError, match=r"unknown choice matmull; the choices: matmul, "):
        config.set_choices(matmull="9")


@pytest.mark.parametrize(
    "name, value, fn, want",
    [
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
def test_each_other_variable_is_read_when_asked(monkeypatch, name, value, fn, want):
    monkeypatch.delenv(name, raising=False)
    unset = fn()
    monkeypatch.setenv(name, value)  # read at the call (each about once a run)
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
