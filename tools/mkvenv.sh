#!/bin/sh
# tools/mkvenv.sh — the project's virtual environment, made with a Python >= 3.10 of this machine.
#
#   tools/mkvenv.sh [DIR]                       make DIR (default .venv), or reuse it when it
#                                               already is a working venv of Python >= 3.10
#   CAMEL_PYTHON=/path/to/python3 tools/mkvenv.sh   make it with that interpreter
#
# Why a venv: Debian 12, Ubuntu 23.04+ and Homebrew mark their Python "externally managed"
# (PEP 668), so a plain `pip install` fails there, and macOS's /usr/bin/python3 (the Command
# Line Tools') is 3.9, older than camel's 3.10. `make setup` calls this script.
set -eu

DIR=${1:-.venv}
OS=$(uname -s)

# ok PY: PY runs and is Python 3.10 or newer
ok() {
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1
}

# version PY: "3.11.2", or "does not run"
version() {
  "$1" -c 'import sys; print(".".join(map(str, sys.version_info[:3])))' 2>/dev/null \
    || echo "does not run"
}

install_hint() {
  if [ "$OS" = Darwin ]; then
    echo "  macOS: brew install python@3.12   (or the installer from https://www.python.org/downloads/)"
  else
    echo "  Debian 12, Ubuntu 22.04 or newer: sudo apt-get install python3 python3-venv"
    echo "  elsewhere: your system's python3 package (3.10 or newer), pyenv, or python.org"
  fi
  echo "  or name one: CAMEL_PYTHON=/path/to/python3 make setup"
}

# PY := the Python to make the venv with; SEEN lists the ones found too old or broken
PY=
SEEN=
find_python() {
  if [ -n "${CAMEL_PYTHON:-}" ]; then
    if ok "$CAMEL_PYTHON"; then PY=$CAMEL_PYTHON; return 0; fi
    SEEN=" CAMEL_PYTHON=$CAMEL_PYTHON ($(version "$CAMEL_PYTHON"))"
    return 1
  fi
  for name in python3.14 python3.13 python3.12 python3.11 python3.10 python3 python; do
    path=$(command -v "$name" 2>/dev/null) || continue
    # Without the Command Line Tools, macOS's /usr/bin/python3 is a stub that opens an
    # installer dialog: run it only when the tools are there.
    if [ "$OS" = Darwin ] && [ "$path" = /usr/bin/python3 ] && ! xcode-select -p >/dev/null 2>&1
    then
      continue
    fi
    if ok "$path"; then PY=$path; return 0; fi
    SEEN="$SEEN $path ($(version "$path"))"
  done
  return 1
}

# A venv that works is reused: this is the fast path of every `make test`.
if [ -x "$DIR/bin/python" ] && ok "$DIR/bin/python" \
    && "$DIR/bin/python" -m pip --version >/dev/null 2>&1; then
  exit 0
fi
if [ -e "$DIR" ]; then
  if [ ! -f "$DIR/pyvenv.cfg" ]; then
    echo "camel: $DIR exists but is not a virtual environment; move it away and rerun" >&2
    exit 1
  fi
  # e.g. the Python it was made from was upgraded or removed (Homebrew does this)
  echo "camel: $DIR does not work any more ($DIR/bin/python: $(version "$DIR/bin/python")); remaking it"
  rm -rf "$DIR"
fi

if ! find_python; then
  echo "camel: camel needs Python 3.10 or newer, and found none on PATH${SEEN:+ (found:$SEEN)}." >&2
  echo "camel: install one, then rerun:" >&2
  install_hint >&2
  exit 1
fi

real=$("$PY" -c 'import sys; print(sys.executable)')
echo "camel: making $DIR with $real (Python $(version "$PY"))"
log=$(mktemp "${TMPDIR:-/tmp}/camel-venv.XXXXXX")
if ! "$PY" -m venv "$DIR" >"$log" 2>&1 || ! "$DIR/bin/python" -m pip --version >/dev/null 2>&1
then
  sed 's/^/  /' "$log" | tail -n 8 >&2
  rm -rf "$DIR" "$log"
  echo "camel: $PY could not make a virtual environment with pip: its venv module or" >&2
  echo "camel: ensurepip is missing. Install them, then rerun:" >&2
  if [ "$OS" = Darwin ]; then
    install_hint >&2
  else
    minor=$(version "$PY" | cut -d. -f1,2)
    echo "  Debian/Ubuntu: sudo apt-get install python3-venv   (python$minor-venv for python$minor)" >&2
    echo "  Fedora: sudo dnf install python3-pip" >&2
  fi
  exit 1
fi
rm -f "$log"
