#!/bin/sh
# tools/check-install.sh — camel works when installed, not only from its checkout.
#
#   1. an sdist, then a wheel built from it (so the sdist holds everything the build needs),
#      installed into a fresh venv;
#   2. `pip install .` (not editable) into another fresh venv;
# each then used from a directory outside the checkout (tools/check_install_smoke.py: a
# matmul on "mps" against NumPy and a kernel compiled at run time). Exits non-zero on any
# failure. PYTHON (default .venv/bin/python, else python3) makes the venvs.
set -eu
cd "$(dirname "$0")/.."
CHECKOUT=$(pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
case $PYTHON in */*) PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON") ;; esac

TMP=$(mktemp -d "${TMPDIR:-/tmp}/camel-check-install.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
PIP="-m pip install -q --disable-pip-version-check"
mkdir "$TMP/elsewhere"


smoke() {  # VENV WHAT
  echo "check-install: $2: using it from $TMP/elsewhere"
  (cd "$TMP/elsewhere" && "$1/bin/python" "$CHECKOUT/tools/check_install_smoke.py" "$CHECKOUT")
}

echo "check-install: building an sdist, then a wheel from it"
"$PYTHON" -m venv "$TMP/wheel-venv"
# the build-system of pyproject.toml, for its sdist hook (pip has no sdist command)
"$TMP/wheel-venv/bin/python" $PIP "setuptools>=64" wheel
"$TMP/wheel-venv/bin/python" -c \
  'import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))' \
  "$TMP/dist" >/dev/null
sdist=$(ls "$TMP"/dist/camel-*.tar.gz)
"$TMP/wheel-venv/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps \
  -w "$TMP/dist" "$sdist"
wheel=$(ls "$TMP"/dist/camel-*.whl)
echo "check-install: installing $(basename "$wheel")"
"$TMP/wheel-venv/bin/python" $PIP "$wheel"
smoke "$TMP/wheel-venv" "the wheel"

echo "check-install: pip install . (not editable)"
"$PYTHON" -m venv "$TMP/dot-venv"
"$TMP/dot-venv/bin/python" $PIP "$CHECKOUT"
smoke "$TMP/dot-venv" "pip install ."

echo "check-install: passed"
