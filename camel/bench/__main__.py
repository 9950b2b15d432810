"""Run a benchmark by name: ``python -m camel.bench <name> [args]``.

To add one, write ``camel/bench/<name>.py`` with ``main(argv)`` and add a line below.
Modules are imported only when chosen, so one broken benchmark does not break the others.
"""

import importlib
import sys

# name -> module with main(argv); one line per benchmark
BENCHMARKS = {
    "attention": "camel.bench.attention",  # the flash-attention ladder vs naive attention
    "cpu": "camel.bench.cpu",  # camel vs PyTorch on the CPU: MLP Adam step, small-op host cost
    "elementwise": "camel.bench.elementwise",  # Stage 1: add/mul/relu float vs float4, GB/s
    "layernorm": "camel.bench.layernorm",  # Stage 4: LayerNorm v1-v3, backward, GELU, GB/s
    "matmul": "camel.bench.matmul",  # the GEMM ladder vs NumPy (validation) and MPS (speed)
    "models": "camel.bench.models",  # GPT-mini and MLP training steps vs PyTorch eager
    "reduce": "camel.bench.reduce",  # Stage 2: sum/max (SIMD-group reductions), GB/s
    "roofline": "camel.bench.roofline",  # per-rung FLOPs, bytes, predicted bounds (no GPU)
    "sim": "camel.bench.sim",  # the Metal simulator: fiber switch, cached load, SGEMM, dispatch
    "softmax": "camel.bench.softmax",  # Stage 2: softmax, log_softmax, cross-entropy, GB/s
}


def usage() -> str:
    lines = ["usage: python -m camel.bench <name> [args]   (<name> --help for its options)", ""]
    lines += ["benchmarks:"]
    lines += [f"  {name:<14} {module}" for name, module in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        valid = ", ".join(BENCHMARKS)
        print(f"[bench] unknown benchmark {name!r}; valid: {valid}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[name])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
