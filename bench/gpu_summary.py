"""Print the short table of a GPU check run from its results.jsonl (the end of the log, which the device
machine's reply carries): per step, each checked or timed method with ms, TFLOP/s, worst error / bound.

    python3 bench/gpu_summary.py $OUT
"""
from __future__ import annotations

import json
import os
import sys


def worst(check: dict | None) -> str:
    if not check:
        return "-"
    name, entry = max(check.items(), key=lambda item: item[1]["ratio"])
    return f"{entry['ratio']:.2g} ({name})"


def head_dims(record: dict) -> str:
    """"D", or "D/Dv" when v's head dim differs (MLA)."""
    dim, v_dim = record.get("D", ""), record.get("Dv")
    return f"{dim}/{v_dim}" if v_dim not in (None, dim) else str(dim)


def main() -> None:
    folder = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
    path = os.path.join(folder, "results.jsonl")
    if not os.path.exists(path):
        sys.exit(f"{path}: no records")
    with open(path) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    print(f"{'step':10s} {'dtype':8s} {'D':>7s} {'T':>6s} {'method / case':18s} {'ms':>10s} {'TFLOP/s':>8s} "
          f"{'ok':>5s}  worst error/bound")
    for r in rows:
        kind = r.get("kind")
        dtype = str(r.get("dtype", "")).replace("torch.", "")
        dims = head_dims(r)
        if kind == "bench":
            ms = "-" if r.get("ms") is None else f"{r['ms']:.3f}"
            tf = "-" if r.get("tflops") is None else f"{r['tflops']:.1f}"
            ok = r.get("result") or ("-" if "ok" not in r else str(r["ok"]))
            print(f"{r['step']:10s} {dtype:8s} {dims:>7} {r['T']:>6} {r['method']:18s} {ms:>10s} {tf:>8s} "
                  f"{ok:>5s}  {worst(r.get('check'))}")
        elif kind == "smoke":
            case = f"horizon {tuple(r['horizon'])}"
            print(f"{r['step']:10s} {dtype:8s} {dims:>7} {r['T']:>6} {case:18s} {'':>10s} {'':>8s} "
                  f"{str(r['ok']):>5s}  {worst(r.get('check')) if 'check' in r else r.get('error', '')}")
        elif kind == "ratios":
            parts = ", ".join(f"{k} {v['ratio']:.2f} (target {v['target']}, met {v['met']})"
                              for k, v in r["vs_sdpa_flash"].items())
            print(f"{r['step']:10s} {dtype:8s} {dims:>7} {r['T']:>6} vs sdpa_flash: {parts}")
        elif kind == "skipped":
            print(f"{r['step']:10s} {'':8s} {dims:>7} {r.get('T', ''):>6} "
                  f"{r.get('method', 'shape'):18s} skipped: {r['reason']}")
        elif kind == "warm_done":
            print(f"{r['step']:10s} compiled in {r['seconds']} s, {r['failed']} failed")
        elif kind == "compile" and not r.get("ok"):
            print(f"{r['step']:10s} compile failed: {r['variant']}: {r.get('error', '')[:150]}")
        elif kind == "step_done":
            print(f"{r['step']:10s} exit {r['rc']} after {r['seconds']} s of a {r['box_s']} s box"
                  + (" (time box hit)" if r["rc"] in (124, 137) else ""))
    for name in ("end_to_end_gpu.json", "end_to_end_gpu_dryrun.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as handle:
                e2e = json.load(handle)
            parts = [f"{r['method']} {r['time_s']:.3f} s" for r in e2e.get("records", []) if "time_s" in r]
            device = e2e.get("machine", {}).get("gpu", "cpu")
            print(f"end_to_end T={e2e.get('settings', {}).get('length')} on {device}: "
                  f"{', '.join(parts) or 'no timing'}")


if __name__ == "__main__":
    main()
