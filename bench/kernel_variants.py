"""The compiled kernel variants a run launches, recorded from the launchers themselves, then compiled.

``record_launches`` calls ``stats_pass`` / ``influence_pass`` on CPU tensors of the real shape with the kernel
objects swapped for a recorder, so the positional and keyword arguments (pointers, strides, ints, constexprs,
tile config) are exactly those of a real launch. From them, two ways to compile the same thing:

- ``compile_for_arch`` (no GPU needed): Triton's own binder specialises the arguments as the runtime does
  (16-byte divisibility of pointers and integer arguments, an integer equal to 1 made a constant, the
  ``do_not_specialize`` list honoured), then ``triton.compile`` for ``sm_<arch>`` and ``ptxas -v`` with the
  flags Triton uses: the registers, spills and shared memory of the code the GPU will run.
- ``warm_on_device`` (GPU): ``JITFunction.run(..., warmup=True)``, the runtime's own path without a launch.
  It fills the Triton cache (and the launcher) so that the timed process only loads, and reports the
  registers and spills the driver sees.

The argument specialisation goes through ``triton.runtime.jit`` internals (``create_function_from_signature``,
``JITFunction._pack_args``) as of Triton 3.6; ``compile_for_arch`` says so in its error if they move.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
import time

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class Job:
    """One (kernel, dtype, head dim, mode, length, heads) launch family; ``config`` indexes the autotune list
    (None: the launcher's fixed config, i.e. RHYTHM_TRITON_AUTOTUNE=0 or fp32 / D = 256)."""

    kind: str            # "stats" | "influence"
    dtype: str           # "fp32" | "fp16" | "bf16"
    dim: int
    flag: bool           # stats: HAS_V (v given); influence: HAS_HI (finite H_hi)
    length: int = 256
    q_heads: int = 32
    kv_heads: int = 8
    autotune: bool = True
    config: int | None = None
    v_dim: int | None = None   # v's head dim when it differs from dim (MLA: 192 / 128); stats only

    @property
    def label(self) -> str:
        mode = ("HAS_V" if self.kind == "stats" else "HAS_HI") + f"={self.flag}"
        tune = f"autotune config {self.config}" if self.config is not None else "fixed config"
        dims = f"D={self.dim}" + (f"/Dv={self.v_dim}" if self.v_dim else "")
        return (f"{self.kind} {self.dtype} {dims} {mode} T={self.length} Hq={self.q_heads} "
                f"Hkv={self.kv_heads} {tune}")


class _Recorder:
    """Stands in for a kernel object: ``rec[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls = []

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.calls.append((args, kwargs))
        return record


def _inputs(job: Job):
    import torch

    dtype = getattr(torch, DTYPES[job.dtype])
    gen = torch.Generator().manual_seed(0)
    make = lambda heads, dim: torch.randn(1, heads, job.length, dim, generator=gen).to(dtype)  # noqa: E731
    return make(job.q_heads, job.dim), make(job.kv_heads, job.dim), make(job.kv_heads, job.v_dim or job.dim)


def record_launches(job: Job) -> list[tuple]:
    """[(JITFunction, args, kwargs, config label)]: one entry per config the launch would compile."""
    import torch

    from rhythm_kernels import triton_influence, triton_stats
    from rhythm_kernels.segments import influence_counts, segments_from_mask

    from rhythm_kernels.triton_common import interpreting

    if interpreting():
        raise RuntimeError("record_launches needs the compiler path: unset TRITON_INTERPRET")
    os.environ["RHYTHM_TRITON_AUTOTUNE"] = "1" if job.autotune else "0"
    q, k, v = _inputs(job)
    segments = segments_from_mask(None, 1, job.length, None, q.device)
    module, names = ((triton_stats, ("_stats_kernel", "_stats_kernel_tuned")) if job.kind == "stats"
                     else (triton_influence, ("_influence_kernel", "_influence_kernel_tuned")))
    saved = {name: getattr(module, name) for name in names}
    recorders = {name: _Recorder(kernel) for name, kernel in saved.items()}
    try:
        for name, recorder in recorders.items():
            setattr(module, name, recorder)
        if job.kind == "stats":
            triton_stats.stats_pass(q, k, v if job.flag else None, segments, window=10, scale=job.dim ** -0.5)
        else:
            horizon = (10, 100) if job.flag else (10, None)
            norm = torch.zeros(2, 1, job.q_heads, job.length, dtype=torch.float32)   # the stats pass's m, log2 l
            counts = influence_counts(segments, 1, job.length, horizon)
            triton_influence.influence_pass(q, k, norm, segments, counts, horizon=horizon, scale=job.dim ** -0.5)
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)
    launches = []
    for name, recorder in recorders.items():
        for args, kwargs in recorder.calls:
            kernel = recorder.kernel
            if hasattr(kernel, "configs"):                       # the autotuner: one compile per config
                fn = kernel.fn
                for index, config in enumerate(kernel.configs):
                    if job.config is None or job.config == index:
                        launches.append((fn, args, {**kwargs, **config.all_kwargs()}, f"autotune config {index}"))
            else:
                launches.append((kernel, args, dict(kwargs), "fixed config"))
    if not launches:
        raise RuntimeError(f"{job.label}: the launcher made no launch (empty block table?)")
    return launches


def _ptxas_report(ptx: str, arch: int) -> dict:
    """``ptxas -v`` with Triton's flags (-lineinfo, --gpu-name=sm_<arch>[a]): registers, stack, spills."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as handle:
            handle.write(ptx)
        done = subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
                               "-o", os.path.join(tmp, "kernel.o")], capture_output=True, text=True, timeout=300)
    log = done.stderr + done.stdout
    if done.returncode != 0:
        return {"ptxas_error": log[-400:]}

    def first(pattern):
        found = re.findall(pattern, log)
        return int(found[0]) if found else None

    return {"registers": first(r"Used (\d+) registers"), "stack_frame_bytes": first(r"(\d+) bytes stack frame"),
            "spill_store_bytes": first(r"(\d+) bytes spill stores"),
            "spill_load_bytes": first(r"(\d+) bytes spill loads")}


def _summary(kernel, label: str, started: float) -> dict:
    ptx = kernel.asm.get("ptx", "")
    meta = kernel.metadata
    return {"config": label, "num_warps": meta.num_warps, "num_stages": meta.num_stages,
            "shared_bytes": meta.shared,
            "mma": "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "fma"),
            "seconds": round(time.perf_counter() - started, 2)}


def _specialise(fn, args, kwargs, backend):
    """The runtime's own binder: (signature, constexprs, attrs, options) as JITFunction.run computes them."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs, debug=kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def compile_for_arch(job: Job, arch: int = 90) -> list[dict]:
    """Compile ``job``'s launches for sm_<arch> without a GPU, specialised as the runtime would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    reports = []
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    for fn, args, kwargs, label in record_launches(job):
        started = time.perf_counter()
        entry = {"variant": job.label, "config": label}
        try:
            signature, constexprs, attrs, options = _specialise(fn, args, kwargs, backend)
        except (AttributeError, TypeError) as exc:
            raise RuntimeError("Triton's binder internals changed (written for Triton 3.6): "
                               f"{type(exc).__name__}: {exc}") from exc
        try:
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the others
            reports.append({**entry, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
            continue
        entry.update(_summary(kernel, label, started), ok=True,
                     specialised=sorted(name for name, sig in signature.items()
                                        if sig == "constexpr" and not fn.params[list(signature).index(name)]
                                        .is_constexpr),
                     divisible_by_16=sorted(list(signature)[path[0]] for path, found in attrs.items()
                                            if any(attr[0] == "tt.divisibility" for attr in found)))
        try:
            entry.update(_ptxas_report(kernel.asm["ptx"], arch))
        except Exception as exc:  # noqa: BLE001 - the report is informative; the compile itself succeeded
            entry["ptxas_error"] = f"{type(exc).__name__}: {exc}"
        reports.append(entry)
    return reports


def warm_on_device(job: Job) -> list[dict]:
    """Compile ``job``'s launches on the current CUDA device through the runtime (no launch): fills the Triton
    cache and the launcher; reports what the driver says about registers and spills."""
    reports = []
    for fn, args, kwargs, label in record_launches(job):
        started = time.perf_counter()
        entry = {"variant": job.label, "config": label}
        try:
            kernel = fn.run(*args, grid=(1,), warmup=True, **kwargs)
            kernel._init_handles()                               # loads the module, builds the launcher
            entry.update(_summary(kernel, label, started), ok=True, registers=kernel.n_regs,
                         spills=kernel.n_spills)
        except Exception as exc:  # noqa: BLE001
            entry.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:400]}")
        reports.append(entry)
    return reports


def run_job(job: Job, mode: str, arch: int = 90) -> list[dict]:
    """Worker entry point (one process per job in a pool): mode "device" or "arch"."""
    try:
        return warm_on_device(job) if mode == "device" else compile_for_arch(job, arch)
    except Exception as exc:  # noqa: BLE001 - a worker reports, never kills the pool
        return [{"variant": job.label, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}]


def compile_jobs(jobs, mode: str, arch: int, n_workers: int, stream, report_path: str) -> list[dict]:
    """Run ``run_job`` over ``jobs`` in ``n_workers`` spawned processes; emit each report as a ``compile``
    record into ``stream`` as it completes and rewrite ``report_path`` (a result file, bench/records.py) after
    each. Returns the reports."""
    import concurrent.futures
    import multiprocessing

    import triton

    from records import write_result

    reports = []
    where = "on this GPU, the runtime's path" if mode == "device" else f"for sm_{arch} without a GPU"

    def save():
        write_result(report_path, "kernel_variants", f"the kernel variants compiled {where}",
                     settings={"mode": mode, "arch": arch, "triton": triton.__version__},
                     records=[{"kind": "compile", **report} for report in reports], quiet=True)

    pool = concurrent.futures.ProcessPoolExecutor(max_workers=n_workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(run_job, job, mode, arch): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            try:
                done = future.result()
            except Exception as exc:  # noqa: BLE001 - a crashed worker (BrokenProcessPool) is a failed variant
                done = [{"variant": futures[future].label, "ok": False, "error": f"{type(exc).__name__}: {exc}"}]
            for report in done:
                reports.append(report)
                stream.emit("compile", **report)
            save()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)         # an error here must not wait for the queue
    return reports
