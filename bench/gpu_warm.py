"""GPU-check step "warm": compile every kernel variant the later steps launch, in parallel processes, so that
the timed processes load them from the Triton cache. On a GPU through the runtime's own path without a
launch (``JITFunction.run(warmup=True)``, bench/kernel_variants.py), with the registers and spills the driver
reports per variant; under --dry-run (CPU) two small variants compiled for sm_<arch>. Records ``warm_plan``,
one ``compile`` per variant and ``warm_done`` in $OUT/results.jsonl, and $OUT/warm.json (bench/records.py).

    python3 bench/gpu_warm.py [--jobs 16] [--limit N]    # CUDA
    python3 bench/gpu_warm.py --dry-run                  # CPU
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from records import gpu_step                 # siblings: bench/ is sys.path[0] for this script


def warm_jobs(dims=(128, 64)) -> list:
    """What the check will launch, most needed first: the benchmark's autotune configs (bf16, Hq 32, Hkv 8),
    the smoke's fixed configs, then the CUDA tests' (tests/test_triton_backend.py, the ``cuda`` cases)."""
    from kernel_variants import Job
    from rhythm_kernels import triton_influence, triton_stats

    jobs = []
    for dim in dims:
        for kind, n_configs in (("stats", len(triton_stats.STATS_CONFIGS)),
                                ("influence", len(triton_influence.INFLUENCE_CONFIGS))):
            for flag in (True, False):
                jobs += [Job(kind, "bf16", dim, flag, config=i) for i in range(n_configs)]
    for dtype, length in (("fp32", 2048), ("bf16", 1024)):
        for kind in ("stats", "influence"):
            jobs += [Job(kind, dtype, 128, flag, length=length, autotune=False) for flag in (True, False)]
    jobs += [Job("stats", "fp32", 64, False, length=8192, q_heads=2, kv_heads=1, autotune=False),
             Job("influence", "fp32", 64, False, length=8192, q_heads=2, kv_heads=1, autotune=False),
             Job("stats", "bf16", 128, True, length=2048, q_heads=4, kv_heads=1, autotune=False),
             Job("influence", "bf16", 128, True, length=2048, q_heads=4, kv_heads=1, autotune=False),
             Job("stats", "fp16", 256, True, length=600, q_heads=2, kv_heads=2, autotune=False),
             Job("influence", "fp16", 256, True, length=600, q_heads=2, kv_heads=2, autotune=False)]
    # the MLA head dims (D = 192 padded to 256, v 128): fixed configs, never autotuned (smoke and benchmark)
    jobs += [Job("stats", "bf16", 192, flag, v_dim=128, autotune=False) for flag in (True, False)]
    jobs += [Job("influence", "bf16", 192, flag, autotune=False) for flag in (True, False)]
    for i in range(len(triton_stats.STATS_CONFIGS)):
        jobs.append(Job("stats", "bf16", 128, True, length=3000, q_heads=8, kv_heads=2, config=i))
    for flag in (True, False):
        for i in range(len(triton_influence.INFLUENCE_CONFIGS)):
            jobs.append(Job("influence", "bf16", 128, flag, length=3000, q_heads=8, kv_heads=2, config=i))
    return jobs


def warm(args, cuda: bool, stream) -> int:
    from kernel_variants import Job, compile_jobs

    jobs = warm_jobs()
    if args.dry_run:
        # CPU: the same pool and stream, compiling for sm_<arch> (no device): two small variants
        jobs = [Job("stats", "bf16", 64, False, autotune=False), Job("influence", "bf16", 64, True, autotune=False)]
    if args.limit:
        jobs = jobs[: args.limit]
    mode = "device" if cuda else "arch"
    os.environ.pop("TRITON_INTERPRET", None)                     # the workers compile (they inherit the env)
    n_workers = args.jobs or min(16, os.cpu_count() or 1)
    started = time.perf_counter()
    stream.emit("warm_plan", jobs=len(jobs), workers=n_workers, mode=mode,
                 triton_cache_dir=os.environ.get("TRITON_CACHE_DIR", "(Triton's default, ~/.triton/cache)"))
    reports = compile_jobs(jobs, mode, args.arch, n_workers, stream, os.path.join(stream.folder, "warm.json"))
    failed = sum(not r["ok"] for r in reports)
    stream.emit("warm_done", seconds=round(time.perf_counter() - started, 1), failed=failed)
    return 1 if failed else 0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU: compile two small variants for --arch")
    parser.add_argument("--step", default="warm", help="label of this run in the records")
    parser.add_argument("--jobs", type=int, default=None, help="parallel processes (default: CPUs, at most 16)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N variants")
    parser.add_argument("--arch", type=int, default=90, help="compute capability compiled for without a GPU")
    args = parser.parse_args(argv)
    cuda, stream = gpu_step(args.step, args.dry_run, interpret=False)     # the warm step compiles
    sys.exit(warm(args, cuda, stream))


if __name__ == "__main__":
    main()
