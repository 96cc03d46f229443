"""Pinned autotune picks: the same kernel config in every process, read from a file.

Triton's autotuner picks a config by timing, so two processes (two ranks of one job) can pick different tiles
for one shape, and different tiles sum in a different order: results then differ in the last bits between
ranks. A file of picks, written by a GPU run (``bench/gpu_check.sh`` brings it back as ``tuned_configs.json``),
removes the timing from the choice: when it holds an entry for (GPU name, kernel, head dim, dtype, mode), the
Triton backend launches that config instead of autotuning.

File: ``RHYTHM_TRITON_CONFIGS`` if set, else ``tuned_configs.json`` beside this module (commit a run's file
there). Format::

    {"format": 1, "entries": [{"gpu": "NVIDIA H200", "kernel": "stats", "head_dim": 128, "dtype": "bfloat16",
      "mode": "HAS_V=False", "len_key": 8192, "config": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8,
      "num_stages": 3}}, ...]}

``len_key`` is the autotuner's length bucket (next power of two of the longest segment); a lookup takes the
entry of the nearest bucket (in log2, ties to the longer) among those of its (GPU, kernel, D, dtype, mode).
"""
from __future__ import annotations

import json
import math
import os

FORMAT = 1
_CACHE: dict = {}


def configs_path() -> str:
    return os.environ.get("RHYTHM_TRITON_CONFIGS") or os.path.join(os.path.dirname(__file__), "tuned_configs.json")


def load_entries(path: str | None = None) -> list[dict]:
    """The entries of the pinned-config file ([] when there is none); cached per (path, mtime)."""
    path = path or configs_path()
    try:
        stamp = os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return []
    if _CACHE.get(path, (None,))[0] != stamp:
        with open(path) as handle:
            data = json.load(handle)
        if data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
            raise ValueError(f"{path}: not a pinned-config file of format {FORMAT} (see rhythm_kernels.tuned_configs)")
        _CACHE[path] = (stamp, data["entries"])
    return _CACHE[path][1]


def pinned_config(kernel: str, gpu: str, head_dim: int, dtype: str, mode: str, len_key: int,
                  entries: list[dict] | None = None) -> dict | None:
    """The pinned {tile sizes, num_warps, num_stages} for this launch, or None (then the autotuner decides)."""
    entries = load_entries() if entries is None else entries
    same = [e for e in entries if (e["gpu"], e["kernel"], e["head_dim"], e["dtype"], e["mode"]) ==
            (gpu, kernel, head_dim, dtype, mode)]
    if not same:
        return None
    best = min(same, key=lambda e: (abs(math.log2(e["len_key"]) - math.log2(max(len_key, 1))), -e["len_key"]))
    return dict(best["config"])


def entries_from_autotuners(gpu: str) -> list[dict]:
    """What the autotuners of this process picked, as file entries (the benchmark writes them out)."""
    from . import triton_influence, triton_stats

    entries = []
    for kernel, tuner, mode in (("stats", triton_stats._stats_kernel_tuned, "HAS_V"),
                                ("influence", triton_influence._influence_kernel_tuned, "HAS_HI")):
        for key, config in getattr(tuner, "cache", {}).items():
            # the autotuner's key: (len_key, HEAD_DIM, flag) + the dtypes of the tensor arguments (Q first)
            len_key, head_dim, flag, q_dtype = key[0], key[1], key[2], key[3]
            entries.append({"gpu": gpu, "kernel": kernel, "head_dim": int(head_dim),
                            "dtype": str(q_dtype).replace("torch.", ""), "mode": f"{mode}={bool(flag)}",
                            "len_key": int(len_key), "config": config.all_kwargs()})
    return entries


def write_entries(path: str, entries: list[dict]) -> int:
    """Merge ``entries`` into the file at ``path`` (a later pick replaces an earlier one); returns the count."""
    merged = {}
    if os.path.exists(path):
        for entry in load_entries(path):
            merged[_identity(entry)] = entry
    for entry in entries:
        merged[_identity(entry)] = entry
    ordered = sorted(merged.values(), key=_identity)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump({"format": FORMAT, "entries": ordered}, handle, indent=1)
    os.replace(tmp, path)
    return len(ordered)


def _identity(entry: dict) -> tuple:
    return entry["gpu"], entry["kernel"], entry["head_dim"], entry["dtype"], entry["mode"], entry["len_key"]
