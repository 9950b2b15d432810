"""Mutation testing for camel: do the tests catch real bugs?

    make mutants                                # every mutant in tools/mutants.txt
    python tools/mutants.py -k gemm             # the mutants whose name contains "gemm"
    python tools/mutants.py --list              # show them, run nothing
    python tools/mutants.py --tests-from HEAD~3 # the same mutants against older tests

Each mutant in tools/mutants.txt is a one-line bug a person could write (a dropped
barrier, `<` for `<=` in an edge check, a flag flipped in a backward). For each one this
script copies the repository to a temporary directory once, edits that one line in the
copy, runs the tests the mutant names (a fast subset, not the whole suite), and puts the
line back. A mutant is KILLED when those tests fail (or crash, or hang past --timeout)
and SURVIVED when they pass: a survivor is a bug the suite would let through.

The list marks two kinds of survivors that do not count against the score:
    equivalent: <why>   the mutant cannot change any result (say why)
    pending: <why>      a real bug the tests cannot see yet (say what is missing)

Before the mutants run, each distinct test selection runs once on the unmutated copy:
one that selects no test there (older tests, --tests-from) is widened to its whole test
files; one that fails there is reported, and its mutants count as survivors.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "tools" / "mutants.txt"


@dataclass
class Mutant:
    name: str
    file: str
    old: str  # text on one line of the file, exactly as written there
    new: str
    tests: str  # pytest arguments, e.g. tests/test_gemm.py -k "nan_slack"
    nth: int = 1  # which occurrence of `old`, when it appears more than once
    equivalent: str = ""
    pending: str = ""


def parse(path: Path) -> list[Mutant]:
    """Blocks of `key: value` lines, each starting with `## name`; `#` lines are comments."""
    mutants, fields = [], None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("## "):
            if fields:
                mutants.append(Mutant(**fields))
            fields = {"name": line[3:].strip()}
        elif line.strip() and not line.startswith("#"):
            key, sep, value = line.partition(":")
            key = key.strip()
            if not sep or fields is None or key not in Mutant.__dataclass_fields__:
                raise SystemExit(f"{path}:{number}: expected '## name' or 'key: value': {line}")
            fields[key] = int(value) if key == "nth" else value.strip()
    if fields:
        mutants.append(Mutant(**fields))
    return mutants


def locate(text: str, m: Mutant) -> int:
    """Index of the nth occurrence of m.old in text, with a clear error if there is none."""
    at = -1
    for _ in range(m.nth):
        at = text.find(m.old, at + 1)
        if at < 0:
            raise SystemExit(f"[mutants] {m.name}: {m.old!r} (occurrence {m.nth}) not in {m.file}")
    if "\n" in m.old or "\n" in m.new:
        raise SystemExit(f"[mutants] {m.name}: a mutant changes one line")
    return at


def run_tests(copy: Path, tests: str, timeout: float) -> tuple[str, float]:
    """'pass', 'fail', 'none' (no test selected), or 'timeout'; and the seconds taken."""
    env = dict(os.environ, PYTHONPATH=str(copy), CAMEL_SIM_ORDER="forward")
    env.pop("CAMEL_MATMUL", None)
    env.pop("CAMEL_ATTENTION", None)
    pytest = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    cmd = pytest + shlex.split(tests)
    start = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start
    took = time.perf_counter() - start
    return {0: "pass", 5: "none"}.get(r.returncode, "fail"), took


def make_copy(tests_from: str | None) -> Path:
    """The working tree in a temporary directory (tracked and untracked files, plus the
    built shim); with tests_from, tests/ as it was at that git revision."""
    copy = Path(tempfile.mkdtemp(prefix="camel-mutants-"))
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (copy / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, copy / f)
    shutil.copytree(ROOT / "shim" / "build", copy / "shim" / "build", dirs_exist_ok=True)
    if tests_from:
        shutil.rmtree(copy / "tests")
        archive = subprocess.run(["git", "archive", tests_from, "tests"], cwd=ROOT,
                                 capture_output=True, check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(copy)], input=archive, check=True)
    return copy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-k", default="", help="only mutants whose name contains this")
    ap.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per test run")
    ap.add_argument("--tests-from", help="run the tests of this git revision (a 'before' score)")
    args = ap.parse_args()
    mutants = [m for m in parse(LIST) if args.k in m.name]
    for m in mutants:  # every mutant applies, before anything runs
        locate((ROOT / m.file).read_text(), m)
    if args.list:
        for i, m in enumerate(mutants, 1):
            mark = " [equivalent]" if m.equivalent else " [pending]" if m.pending else ""
            text = (ROOT / m.file).read_text()
            line = text.count("\n", 0, locate(text, m)) + 1
            print(
                f"{i:3}. {m.name}{mark}\n     {m.file}:{line}: {m.old!r} -> {m.new!r}\n"
                f"     {m.tests}"
            )
        return 0
    if not (ROOT / "shim" / "build").is_dir():
        raise SystemExit("[mutants] build the shim first: make shim")

    copy = make_copy(args.tests_from)
    print(f"[mutants] {len(mutants)} mutants; a copy of the tree in {copy}")
    try:
        baseline, widened, ran = {}, {}, {}
        for tests in dict.fromkeys(m.tests for m in mutants):
            baseline[tests] = ran[tests] = run_tests(copy, tests, args.timeout)[0]
            if baseline[tests] == "none":  # e.g. older tests: run the whole files instead
                files = " ".join(shlex.quote(a) for a in shlex.split(tests) if a.endswith(".py"))
                widened[tests] = files
                if files not in ran:
                    ran[files] = run_tests(copy, files, args.timeout)[0]
                baseline[tests] = ran[files]
                print(f"[mutants] {tests!r} selects no test here: running {files} instead")
            if baseline[tests] != "pass":
                print(f"[mutants] unmutated: {tests} -> {baseline[tests]}")
        results = []
        for i, m in enumerate(mutants, 1):
            path = copy / m.file
            original = path.read_text()
            at = locate(original, m)
            line = original.count("\n", 0, at) + 1
            try:
                path.write_text(original[:at] + m.new + original[at + len(m.old) :])
                if baseline[m.tests] == "pass":
                    outcome, took = run_tests(copy, widened.get(m.tests, m.tests), args.timeout)
                else:
                    outcome, took = "pass", 0.0  # the selection cannot see any bug
            finally:
                path.write_text(original)
            killed = outcome in ("fail", "timeout")
            verdict = "KILLED" if killed else "survived"
            if not killed and (m.equivalent or m.pending):
                verdict = "equivalent" if m.equivalent else "pending"
            results.append((m, verdict, line))
            note = " (hung: timeout)" if outcome == "timeout" else ""
            print(f"[{i:3}/{len(mutants)}] {verdict:10} {m.name}  ({m.file}:{line}, "
                  f"{took:.0f} s){note}", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(copy, ignore_errors=True)

    counted = [r for r in results if r[1] in ("KILLED", "survived")]
    killed = sum(r[1] == "KILLED" for r in results)
    score = 100.0 * killed / max(1, len(counted))
    marked = "".join(f"; {sum(r[1] == v for r in results)} {v}" for v in ("equivalent", "pending"))
    print(f"\nscore: {killed}/{len(counted)} non-equivalent mutants killed ({score:.0f}%){marked}")
    for m, verdict, line in results:
        if verdict == "KILLED" and (m.equivalent or m.pending):
            print(f"  now killed, drop its mark: {m.name}")
        if verdict in ("survived", "pending"):
            why = f"  [{m.pending}]" if m.pending else ""
            print(f"  {verdict}: {m.name}  {m.file}:{line}: {m.old!r} -> {m.new!r}{why}")
    return 0 if all(r[1] != "survived" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
