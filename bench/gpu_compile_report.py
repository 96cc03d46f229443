"""Compile the kernel variants for sm_<arch> without a GPU, specialised as the runtime specialises them
(bench/kernel_variants.py), and report registers, spills, shared memory and the MMA instructions per
variant (``ptxas -v`` with Triton's flags). bench/results/compile_sm90.json is such a report.

    python3 bench/gpu_compile_report.py [--quick] [--jobs N] [--arch 90] [--out report.json]

--quick: five representative variants (the test suite runs it: tests/test_triton_backend.py). The report is a
result file of bench/records.py's schema, one ``compile`` record per variant; the same records also go to
results.jsonl beside it.
"""
from __future__ import annotations

import argparse
import os
import sys

from records import Stream, gpu_check_dir       # siblings: bench/ is sys.path[0] for this script


def compile_report(args, stream) -> int:
    from kernel_variants import Job, compile_jobs
    from rhythm_kernels import triton_influence, triton_stats

    if args.quick:
        jobs = [Job("stats", "bf16", 128, True, q_heads=4, kv_heads=2, autotune=False),
                Job("influence", "bf16", 128, False, q_heads=4, kv_heads=2, autotune=False),
                Job("stats", "fp32", 64, True, q_heads=4, kv_heads=2, autotune=False),
                Job("influence", "fp32", 48, True, q_heads=4, kv_heads=2, autotune=False),
                Job("stats", "bf16", 192, True, q_heads=4, kv_heads=2, autotune=False, v_dim=128)]
    else:
        jobs = []
        for dim in (128, 64):
            for kind, n in (("stats", len(triton_stats.STATS_CONFIGS)),
                            ("influence", len(triton_influence.INFLUENCE_CONFIGS))):
                for flag in (True, False):
                    jobs += [Job(kind, "bf16", dim, flag, config=i) for i in range(n)]
        for dtype, dim in (("fp32", 64), ("fp32", 128), ("fp32", 48), ("fp32", 256), ("fp16", 256), ("bf16", 256),
                           ("bf16", 80), ("fp16", 128), ("bf16", 128), ("bf16", 64)):
            for kind in ("stats", "influence"):
                jobs += [Job(kind, dtype, dim, flag, autotune=False) for flag in (True, False)]
        jobs += [Job("stats", "bf16", 192, flag, autotune=False, v_dim=128) for flag in (True, False)]
    path = args.out or os.path.join(stream.folder, "compile_check.json")
    reports = compile_jobs(jobs, "arch", args.arch, args.jobs or 1, stream, path)
    failed = sum(not r["ok"] for r in reports)
    print(f"{len(reports) - failed}/{len(reports)} variants compiled for sm_{args.arch}; wrote {path}")
    return 1 if failed else 0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="five representative variants")
    parser.add_argument("--jobs", type=int, default=None, help="parallel processes (default 1)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for")
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/compile_check.json)")
    args = parser.parse_args(argv)
    from rhythm_kernels.triton_common import interpreting

    if interpreting():
        sys.exit("gpu_compile_report.py needs the compiler: unset TRITON_INTERPRET")
    folder = os.path.dirname(os.path.abspath(args.out)) if args.out else gpu_check_dir(dry_run=True)
    os.makedirs(folder, exist_ok=True)
    sys.exit(compile_report(args, Stream(folder, "compile_report")))


if __name__ == "__main__":
    main()
