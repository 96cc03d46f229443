"""Preflight of the GPU check: what every later step needs, each with a clear message when it is missing.

    C compiler      Triton 3.6 builds a small C launcher per kernel signature (cc / gcc / clang, or $CC)
    Python.h        the launcher includes it (the python3-dev headers of the running interpreter)
    imports         rhythm and rhythm_kernels resolve to this repository's files; no top-level ``kernels``
                    from it on the path (another package's name)
    Triton cache    TRITON_CACHE_DIR on a local, writable disk with room
    one launch      a tiny Triton kernel compiled, launched and its result checked

    python3 bench/gpu_preflight.py [--dry-run]     (exit 1 when a check that the GPU run needs fails)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

from records import Stream, describe_machine      # siblings: bench/ is sys.path[0] for this script

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def check_compiler() -> tuple[bool, str]:
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in names:
        path = shutil.which(name)
        if path:
            version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
            return True, f"{path} ({version[0] if version else 'version unknown'})"
    return False, (f"no C compiler found (tried {', '.join(names)}): Triton builds a C launcher for every kernel "
                   "signature; install gcc or point CC at a compiler")


def check_python_headers() -> tuple[bool, str]:
    include = sysconfig.get_paths()["include"]
    header = os.path.join(include, "Python.h")
    if os.path.exists(header):
        return True, header
    return False, (f"{header} is missing: Triton's launcher includes Python.h; install the python3-dev headers "
                   f"for {sys.executable}")


def check_imports() -> tuple[bool, str]:
    problems, found = [], {}
    for name, folder in (("rhythm", "rhythm"), ("rhythm_kernels", "kernels")):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            problems.append(f"{name} is not importable")
            continue
        real = os.path.realpath(spec.origin)
        found[name] = real
        if not real.startswith(os.path.join(ROOT, folder) + os.sep):
            problems.append(f"{name} resolves to {real}, not to this repository's {folder}/")
    stray = importlib.util.find_spec("kernels")
    if stray is not None and stray.origin and os.path.realpath(stray.origin).startswith(ROOT + os.sep):
        problems.append("this repository's kernels/ is importable as a top-level 'kernels' package "
                        "(the shim must expose only rhythm and rhythm_kernels)")
    if problems:
        return False, "; ".join(problems)
    return True, ", ".join(f"{k} -> {v}" for k, v in found.items())


def check_cache_dir() -> tuple[bool, str]:
    folder = os.environ.get("TRITON_CACHE_DIR")
    if not folder:
        return False, "TRITON_CACHE_DIR is not set (the check sets it to a folder on local disk)"
    os.makedirs(folder, exist_ok=True)
    probe = os.path.join(folder, f".probe_{os.getpid()}")
    try:
        with open(probe, "w") as handle:
            handle.write("ok")
        os.unlink(probe)
    except OSError as exc:
        return False, f"TRITON_CACHE_DIR={folder} is not writable: {exc}"
    fstype = "unknown"
    best = ""
    real = os.path.realpath(folder)
    with open("/proc/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            if len(parts) > 2 and real.startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    free_gib = shutil.disk_usage(folder).free / 2 ** 30
    remote = fstype in ("nfs", "nfs4", "cifs", "smbfs", "fuse.sshfs", "9p")
    message = f"{folder} ({fstype} at {best}, {free_gib:.1f} GiB free)"
    if remote or free_gib < 1:
        return False, message + ": put TRITON_CACHE_DIR on a local disk with at least 1 GiB free"
    return True, message


def check_launch(dry_run: bool) -> tuple[bool, str]:
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def axpy(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        tl.store(out_ptr + offs, alpha * tl.load(x_ptr + offs, mask=ok) + tl.load(y_ptr + offs, mask=ok), mask=ok)

    device = "cpu" if dry_run else "cuda"
    x = torch.randn(1000, device=device)
    y = torch.randn(1000, device=device)
    out = torch.full_like(x, float("nan"))
    started = time.perf_counter()
    axpy[(triton.cdiv(1000, 256),)](x, y, out, 1000, 2.0, BLOCK=256)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    err = (out - (2.0 * x + y)).abs().max().item()
    if not err <= 1e-6:
        return False, f"a tiny Triton kernel gave wrong results (max error {err})"
    return True, f"compiled and launched on {device} in {seconds:.1f} s, max error {err:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU: the launch runs under TRITON_INTERPRET=1")
    args = parser.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    results = {}
    for name, check in (("c_compiler", check_compiler), ("python_headers", check_python_headers),
                        ("imports", check_imports), ("triton_cache_dir", check_cache_dir)):
        results[name] = check()
    import torch

    machine = dict(describe_machine(), pytest=importlib.util.find_spec("pytest") is not None)
    if not torch.cuda.is_available() and not args.dry_run:
        results["cuda"] = (False, "torch sees no CUDA device (torch.cuda.is_available() is False)")
    if "cuda" not in results:
        try:
            results["tiny_launch"] = check_launch(args.dry_run)
        except Exception as exc:  # noqa: BLE001 - reported with its cause
            results["tiny_launch"] = (False, f"{type(exc).__name__}: {str(exc)[:400]}")
    for name, (ok, message) in results.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name:17s} {message}", flush=True)
    checks = {name: {"ok": ok, "message": message} for name, (ok, message) in results.items()}
    if os.environ.get("OUT"):
        Stream(os.environ["OUT"], "preflight").emit("preflight", machine=machine, checks=checks)
    else:
        print(json.dumps(machine))
    failed = [name for name, (ok, _) in results.items() if not ok]
    if failed:
        print(f"preflight failed: {', '.join(failed)}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
