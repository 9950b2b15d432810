"""GPT-mini's GEMMs on the GPU shim: each shape of one training step timed with candidate
rungs, and the GPU time of a whole step with each candidate as the CUDA shim's small tile
(gemm.CUDA_SMALL_TILE). GPU times (camel.profile, tuning.time_ms), not wall time: a step's
wall time on a shared machine moves with its host load.

    python3 tools/gpu/model_shapes.py [--config gpu] [version ...]
        (default versions: pf_64x64x16_4x4 wt_64x64x16_32x32)
"""

import argparse

import numpy as np

from camel import gemm, metal, tuning
from camel.bench import models, tuner


def kernels(step):
    """The kernels of one step by GPU time (each dispatch in its own command buffer)."""
    import camel

    with camel.profile() as prof:
        step()
    print(prof.table())  # its first line: dispatches, kernels, total ms


def _runs(version, shape):
    m, n, k, _, _, batches = shape
    return gemm.can_split(m, n, k, batches, gemm.parse_version(version)[1])


def main(config, candidates):
    print(metal.device_name())
    cfg = models._example("gpt_mini").CONFIGS[config]
    step = models.gpt_camel(cfg, 84, np.random.default_rng(0))
    step()  # compiles
    with gemm.recording() as shapes:
        step()
    for tile in [c for c in candidates if "/k" not in c]:  # a plain rung: no split-K
        gemm.CUDA_SMALL_TILE = tile
        gemm.forget()  # matmul() decided every shape under the old rule
        step()
        step()
        ms = sorted(models._camel_gpu_ms(step) for _ in range(3))[1]
        print(f"\nGPT-mini {config}, small tile {tile}: {ms:.2f} GPU ms a step (median of 3)")
        kernels(step)
    print("\neach shape class of a step (ms summed over its shapes):")
    versions = {gemm.choose_version(s[0], s[1], s[2], s[5]) for s in shapes} | set(candidates)
    classes = {}
    for shape in dict.fromkeys(tuple(s) for s in shapes):
        classes.setdefault(tuning.shape_class(*shape[:3]), []).append(shape)
    for cls, group in classes.items():  # the versions every shape of the class can run
        fits = [v for v in sorted(versions) if all(_runs(v, s) for s in group)]
        _, times = tuner.tune_shapes(group, reps=5, versions=fits, save=False,
                                     log=lambda line: None)[cls]  # fmt: skip
        row = ", ".join(f"{v} {ms:.3f}" for v, ms in sorted(times.items(), key=lambda kv: kv[1]))
        print(f"  {cls}: {row}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="gpu", help="examples/gpt_mini.py's config")
    ap.add_argument("versions", nargs="*", default=["pf_64x64x16_4x4", "wt_64x64x16_32x32"])
    args = ap.parse_args()
    main(args.config, args.versions)
