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

# bench: the GEMM ladder (validates against NumPy first) and its table in docs/stage3.md
bench: shim
	$(PYTHON) -m camel.bench matmul --markdown docs/stage3.md

clean:
	$(MAKE) -C shim clean
	rm -rf build *.egg-info .pytest_cache

.PHONY: shim test bench clean
