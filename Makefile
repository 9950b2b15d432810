# camel — targets a newcomer can guess.
#   make shim    build the native layer (Metal on a Mac, the simulator elsewhere)
#   make test    build, then run the test suite
#   make bench   run the benchmarks
#   make clean
PYTHON ?= python3

shim:
	$(MAKE) -C shim shim

test: shim
	$(PYTHON) -m pytest -q

clean:
	$(MAKE) -C shim clean
	rm -rf build *.egg-info .pytest_cache

.PHONY: shim test clean
