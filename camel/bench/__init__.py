"""Benchmarks: ``python -m camel.bench <name> [args]``; ``python -m camel.bench --help`` lists them.

Each benchmark is a module with a ``main(argv)`` function, listed in ``BENCHMARKS``
in ``camel/bench/__main__.py``. Every benchmark checks results before it times them.
"""
