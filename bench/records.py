"""The one record schema of bench/ and the one machine description stored with it.

Every benchmark writes a result file of this shape (``write_result``)::

    {"schema": "rhythm-bench/1",
     "benchmark": "cpu_metrics",          the tool: the stem of bench/<tool>.py ("gpu_check" for the GPU check)
     "what": "...",                       one line: what is measured against what
     "utc": "2026-...",                   when the file was written
     "machine": {...},                    describe_machine(): date, platform, versions, CPU, GPU, load at start
     "settings": {...},                   what every record shares (shapes, window, horizon, repeats, runner)
     "records": [{"kind": ..., ...}],     one measurement (or check) each, flat, in the order taken
     "summary": {...}}                    figures derived from the records (ratios, targets met); {} if none

The GPU check streams the same records as JSON lines (``Stream``, its ``results.jsonl``): each line is one
record with {"schema", "benchmark", "step", "kind", "utc"} beside its fields, appended and fsynced the moment
it is measured, so a step cut by its time box loses nothing; ``Stream.write_result`` turns the stream into a
result file. From a shell: ``python3 bench/records.py emit STEP KIND key=value ...`` (values parsed as JSON).

Result files written before this schema stay under bench/results/ as they are; bench/results/README.md says
which file has which shape.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys

SCHEMA = "rhythm-bench/1"
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def describe_machine() -> dict:
    """The machine and software a measurement ran on (torch must be importable; the rest may be missing)."""
    import torch

    info = {"date": utc_now(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "triton": _version("triton"), "transformers": _version("transformers"),
            "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                    sm_count=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1))
    return info


def bench_parser(doc: str, result_file: str, **ints: int):
    """The command line a benchmark script starts from: the first line of its docstring ``doc`` as the
    description, one int option per keyword (``micro_batch_size=4``: ``--micro-batch-size``, default 4, in the
    order given) and ``--out`` (default ``bench/results/<result_file>``, beside this file); the script adds its
    other options."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in ints.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, result_file),
                        help=f"the result file (default: bench/results/{result_file})")
    return parser


def result(benchmark: str, what: str, *, settings: dict, records: list[dict], summary: dict | None = None,
           machine: dict | None = None) -> dict:
    """A result file's content (see the module docstring); every record must carry its "kind"."""
    for record in records:
        if "kind" not in record:
            raise ValueError(f"{benchmark}: a record without a 'kind': {sorted(record)}")
    return {"schema": SCHEMA, "benchmark": benchmark, "what": what, "utc": utc_now(),
            "machine": describe_machine() if machine is None else machine, "settings": settings,
            "records": records, "summary": summary or {}}


def write_result(path: str, benchmark: str, what: str, *, settings: dict, records: list[dict],
                 summary: dict | None = None, machine: dict | None = None, quiet: bool = False) -> dict:
    """Write a result file (atomically, creating its folder) and say where; returns its content."""
    content = result(benchmark, what, settings=settings, records=records, summary=summary, machine=machine)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(content, handle, indent=1, default=str)
    os.replace(path + ".tmp", path)
    if not quiet:
        print(f"wrote {path}")
    return content


class Stream:
    """``emit(kind, **fields)``: one record a line in <folder>/results.jsonl (flushed, fsynced) and on stdout."""

    FILE = "results.jsonl"

    def __init__(self, folder: str, step: str, benchmark: str = "gpu_check"):
        self.folder, self.step, self.benchmark = folder, step, benchmark
        self.path = os.path.join(folder, self.FILE)

    def emit(self, kind: str, **fields) -> dict:
        record = {"schema": SCHEMA, "benchmark": self.benchmark, "step": self.step, "kind": kind, "utc": utc_now(),
                  **fields}
        line = json.dumps(record, default=str)
        print(line, flush=True)
        os.makedirs(self.folder, exist_ok=True)
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

    def write_result(self, name: str, what: str, *, settings: dict, kinds: tuple, summary: dict | None = None) -> str:
        """<folder>/<name>: a result file of the stream's records of ``kinds`` so far (all steps); the machine is
        that of the stream's last "machine" record (else described now)."""
        rows = self.read(kinds)
        machines = [r for r in self.read(("machine",))]
        machine = {k: v for k, v in machines[-1].items() if k not in ("schema", "benchmark", "step", "kind", "utc")} \
            if machines else None
        path = os.path.join(self.folder, name)
        write_result(path, self.benchmark, what, settings=settings, records=rows, summary=summary, machine=machine,
                     quiet=True)
        return path


def gpu_check_dir(dry_run: bool) -> str:
    """Where the GPU check's files go: $OUT when set; else bench/results/ on a GPU, a temporary folder for a
    dry run."""
    folder = os.environ.get("OUT") or (os.path.join(os.environ.get("TMPDIR", "/tmp"), "rhythm_gpu_check_dryrun")
                                       if dry_run else os.path.join(os.path.dirname(__file__), "results"))
    os.makedirs(folder, exist_ok=True)
    return folder


def gpu_step(step: str, dry_run: bool, *, interpret: bool = True) -> tuple[bool, Stream]:
    """Start one GPU-check step: (cuda, its stream in gpu_check_dir). A dry run runs on CPU, under the Triton
    interpreter unless ``interpret`` is False (set here, before triton is imported); without --dry-run a CUDA
    device is required."""
    if dry_run and interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    cuda = torch.cuda.is_available() and not dry_run
    if not cuda and not dry_run:
        sys.exit("no CUDA device: run with --dry-run (Triton interpreter, tiny shapes)")
    return cuda, Stream(gpu_check_dir(dry_run), step)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    """``records.py emit STEP KIND key=value ...``: one record into $OUT/results.jsonl (the shell's steps)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[0] != "emit" or not all("=" in item for item in argv[3:]):
        print("usage: records.py emit STEP KIND [key=value ...]   (writes into $OUT/results.jsonl)", file=sys.stderr)
        return 2
    if not os.environ.get("OUT"):
        print("records.py emit: OUT is not set", file=sys.stderr)
        return 2
    fields = dict(item.split("=", 1) for item in argv[3:])
    Stream(os.environ["OUT"], argv[1]).emit(argv[2], **{key: _parse_value(value) for key, value in fields.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
