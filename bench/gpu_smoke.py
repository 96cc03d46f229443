"""GPU-check step "smoke": short correctness runs of ``rhythm.attention_metrics(backend="triton")`` with the
fixed configs against the fp64 reference (bench/reference_check.py, docs/definitions.md section 7): fp32 at
T = 2048 (the ``ieee`` dot held to the fp32 rule: the interpreter ignores ``input_precision``, so only a GPU
run can catch a TF32 dot), bf16 at T = 1024, and the MLA head dims (q/k 192, v 128) in bf16. Each case runs
with horizons (10, 100) (with v, whose output is checked too) and (10, None). One ``smoke`` record per case
in $OUT/results.jsonl (bench/records.py).

    python3 bench/gpu_smoke.py [--step smoke]       # CUDA
    python3 bench/gpu_smoke.py --dry-run            # CPU, Triton interpreter, tiny shapes
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from records import gpu_step                 # siblings: bench/ is sys.path[0] for this script


def smoke(dry_run: bool, cuda: bool, stream) -> int:
    import torch

    import rhythm
    from reference_check import BAND, FULL, WINDOW, compare, reference_metrics

    os.environ["RHYTHM_TRITON_AUTOTUNE"] = "0"      # the fixed configs (what the test suite runs)
    device = "cuda" if cuda else "cpu"
    # (dtype, T, Hq, Hkv, D, Dv, response_start): fp32 at T >= 2K holds the ieee dot to the fp32 rule on a
    # GPU; the MLA head dims (192 / 128, DeepSeek-V3: no GQA) in bf16
    cases = ([(torch.float32, 128, 4, 2, 64, 64, 40), (torch.bfloat16, 96, 4, 2, 64, 64, 0),
              (torch.bfloat16, 48, 2, 2, 192, 128, 8)] if dry_run else
             [(torch.float32, 2048, 32, 8, 128, 128, 512), (torch.bfloat16, 1024, 32, 8, 128, 128, 0),
              (torch.bfloat16, 1024, 16, 16, 192, 128, 256)])
    failed = 0
    for dtype, length, q_heads, kv_heads, dim, v_dim, resp in cases:
        gen = torch.Generator(device=device).manual_seed(length + dim)
        make = lambda heads, d: (torch.randn(1, heads, length, d, generator=gen, device=device) * 1.5).to(dtype)  # noqa: E731
        q, k, v = make(q_heads, dim), make(kv_heads, dim), make(kv_heads, v_dim)
        horizons = {"band": BAND, "full": FULL}
        # the fp64 reference, and the bound's second one: fp32 inputs, scores rounded to fp32 (section 7's
        # conditioning reference); fp16/bf16, everything in the input dtype
        second = dict(compute_dtype=torch.float64, scores_dtype=torch.float32) if dtype == torch.float32 else \
            dict(compute_dtype=dtype)
        refs = [reference_metrics(q, k, scale=dim ** -0.5, window=WINDOW, horizons=horizons, response_start=resp,
                                  v=v, **extra) for extra in (dict(compute_dtype=torch.float64), second)]
        for name, horizon in horizons.items():
            entry = {"dtype": str(dtype), "T": length, "Hq": q_heads, "Hkv": kv_heads, "D": dim, "Dv": v_dim,
                     "response_start": resp, "horizon": horizon, "with_v": name == "band"}
            started = time.perf_counter()
            try:
                metrics = rhythm.attention_metrics(q, k, v if name == "band" else None, backend="triton",
                                                   window=WINDOW, horizon=horizon, response_start=resp)
                ours = {"lse": metrics.lse[0], "distance": metrics.distance[0], "waad": metrics.waad[0],
                        f"fai:{name}": metrics.fai[0]}
                if metrics.out is not None:
                    ours["out"] = metrics.out[0].transpose(0, 1)                    # [Hq, T, Dv]
                entry["check"] = compare(ours, refs[0], refs[1], dtype)
                entry["ok"] = all(c["ok"] for c in entry["check"].values())
            except Exception as exc:  # noqa: BLE001
                entry.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            entry["seconds"] = round(time.perf_counter() - started, 2)
            failed += not entry["ok"]
            stream.emit("smoke", **entry)
    return 1 if failed else 0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU under TRITON_INTERPRET=1 with tiny shapes")
    parser.add_argument("--step", default="smoke", help="label of this run in the records")
    args = parser.parse_args(argv)
    cuda, stream = gpu_step(args.step, args.dry_run)
    sys.exit(smoke(args.dry_run, cuda, stream))


if __name__ == "__main__":
    main()
