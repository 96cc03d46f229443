"""Records of a GPU check run: every measurement printed and appended to a JSON-lines file the moment it is
taken (a step killed by its time box loses nothing already measured), plus a JSON summary rewritten from it."""
from __future__ import annotations

import datetime
import json
import os
import platform

JSONL = "results.jsonl"
SUMMARY = "bench_gpu_kernels.json"


def out_dir(dry_run: bool) -> str:
    """$OUT when set; else bench/results/ on a GPU, a temporary folder for a dry run."""
    folder = os.environ.get("OUT") or (os.path.join(os.environ.get("TMPDIR", "/tmp"), "rhythm_gpu_check_dryrun")
                                       if dry_run else os.path.join(os.path.dirname(__file__), "results"))
    os.makedirs(folder, exist_ok=True)
    return folder


def machine(cuda: bool) -> dict:
    import torch
    import triton

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), sm_count=props.multi_processor_count)
    else:
        info["device"] = "cpu (Triton interpreter)"
    return info


class Records:
    """``emit(kind, **fields)``: one JSON line in <dir>/results.jsonl (flushed, fsynced) and on stdout."""

    def __init__(self, folder: str, step: str):
        self.folder, self.step = folder, step
        self.path = os.path.join(folder, JSONL)

    def emit(self, kind: str, **fields) -> dict:
        record = {"step": self.step, "kind": kind,
                  "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **fields}
        line = json.dumps(record, default=str)
        print(line, flush=True)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return record

    def read(self, kinds: tuple | None = None) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        return [r for r in rows if kinds is None or r["kind"] in kinds]

    def rewrite_summary(self, header: dict) -> str:
        """<dir>/bench_gpu_kernels.json: the header and every benchmark and check record so far (all steps)."""
        path = os.path.join(self.folder, SUMMARY)
        tmp = path + ".tmp"
        with open(tmp, "w") as handle:
            json.dump({**header, "records": self.read(("machine", "bench", "reference", "ratios", "smoke",
                                                       "skipped"))}, handle, indent=1, default=str)
        os.replace(tmp, path)
        return path
