"""``rhythm score --ray``: on a local Ray instance (2 CPUs, 2 workers, the tiny model of test_score_cli) the
rows equal ``rhythm score``'s bitwise (micro-batches of 3 rows there, blocks of 2 rows on the workers:
other batch make-ups, the same bits); a worker killed with SIGKILL mid-run is replaced and
the job ends with every id exactly once; a job stopped (SIGINT) and started again skips what it wrote. The
checks that need no Ray (bad rows, settings, lock, Ray missing) run without starting it."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("pyarrow")

from rhythm import models  # noqa: E402
from rhythm.app import cli  # noqa: E402
from tests.test_cli import tiny_model_dir  # noqa: E402,F401
from tests.test_score_cli import _error, _token_rows, tok  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = "coupled,local,global,random"


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (start-up takes seconds), shut down after it."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _rows(tok, n):  # noqa: F811
    return [dict(r, reward=float(i % 3)) for i, r in enumerate(_token_rows(tok, n))]


def _score_args(model, src, dst, *extra, quiet=True):
    return ["score", "--model", str(model), "--input", str(src), "--output", str(dst), *(["--quiet"] * quiet),
            "--micro-batch-size", "3", "--strategies", STRATEGIES, *extra]


def _reference(model, src, tmp_path):
    """``rhythm score`` (one process) on the same input and settings: {id: row}."""
    ref = tmp_path / "ref.jsonl"
    assert cli.main(_score_args(model, src, ref)) == 0
    return {r["id"]: r for r in map(json.loads, ref.read_text().splitlines())}


def _dataset_rows(folder):
    """The rows of an output folder as pyarrow.dataset reads it (every id must be there once)."""
    import pyarrow.dataset as pds

    rows = pds.dataset(str(folder), format="parquet").to_table().to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {r["id"]: r for r in rows}


# ---- without Ray: checks before anything starts -------------------------------------------------------------

def test_bad_row_in_a_folder_fails_in_one_line_before_scoring(tiny_model_dir, tok, tmp_path, capsys,  # noqa: F811
                                                              monkeypatch):
    pytest.importorskip("ray.data")
    import ray

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    folder = tmp_path / "in"
    folder.mkdir()
    _write_rows(folder / "a.jsonl", _rows(tok, 3))
    (folder / "b.jsonl").write_text('{"id": "r9", "prompt_ids": [1], "response_ids": [2]}\n'
                                    '{"id": "r1", "prompt_ids": [1], "response_ids": [2]}\n')
    out = tmp_path / "out"
    assert cli.main(_score_args(tiny_model_dir, folder, out, "--ray")) == 2
    assert _error(capsys) == (f"rhythm: error: {folder}/b.jsonl:2: duplicate id 'r1' (also on {folder}/a.jsonl:2); "
                              "ids must be unique")
    (folder / "b.jsonl").write_text('{"id": "r9", "prompt_ids": [1], "response_ids": [99999]}\n')
    assert cli.main(_score_args(tiny_model_dir, folder, out, "--ray")) == 2
    assert "b.jsonl:1: response_ids[0] = 99999 is outside the model's vocabulary" in _error(capsys)
    (folder / "b.jsonl").write_text('{"prompt_ids": [1], "response_ids": [2]}\n')
    assert cli.main(_score_args(tiny_model_dir, folder, out, "--ray")) == 2
    assert "some rows have an 'id'" in _error(capsys)
    for extra, words in ((["--workers", "2"], "--workers needs --ray"),
                         (["--ray", "--grouping", "fixed"], "--grouping fixed takes the head groups"),
                         (["--ray", "--device", "cpu"], "--device cannot be used with --ray"),
                         (["--max-retries", "2"], "--max-retries needs --ray"),
                         (["--ray", "--max-retries", "-1"], "--max-retries: must be an int >= 0, got '-1'")):
        assert cli.main(_score_args(tiny_model_dir, folder, out, *extra)) == 2
        assert words in _error(capsys)
    assert not list(out.glob("part-*"))


def test_max_retries_reaches_the_options_and_a_worker_error_is_named(tiny_model_dir, tmp_path):  # noqa: F811
    """--max-retries (default 3) becomes RayOptions.max_retries; the driver names the exception a worker raised
    from the traceback text Ray sends back (Ray 2.60's last line is a hint about DataContext, not the error)."""
    pytest.importorskip("ray.data")
    from rhythm.app.cli import _ray_options
    from rhythm.app.distributed import RayOptions, _raised_in_worker

    args = ["score", "--model", str(tiny_model_dir), "--input", str(tmp_path / "in.jsonl"), "--output",
            str(tmp_path / "out"), "--ray"]
    assert _ray_options(cli.build_parser().parse_args(args)).max_retries == 3
    assert _ray_options(cli.build_parser().parse_args(args + ["--max-retries", "0"])).max_retries == 0
    with pytest.raises(ValueError, match="max_retries must be an int >= 0"):
        RayOptions(max_retries=-1)
    text = ("\x1b[36mray::MapWorker(MapBatches(ScoreWorker)).submit()\x1b[39m (pid=1, ip=1.2.3.4)\n"
            '  File "/x/distributed.py", line 9, in __call__\n    raise ValueError("no")\n'
            "ValueError: row r3: the model's positions are exceeded (600 > 512)\n  second line of it\n\n"
            "The above exception was the direct cause of the following exception:\n\n"
            "\x1b[36mray::MapWorker(MapBatches(ScoreWorker)).submit()\x1b[39m (pid=1, ip=1.2.3.4)\n"
            "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
            "To change retry attempts, backoff, or which errors are retried, configure "
            "`ray.data.DataContext.get_current()` (`retried_io_errors` for I/O) if you believe this to be transient.")
    assert _raised_in_worker(RuntimeError(text)) == ("ValueError", "row r3: the model's positions are exceeded "
                                                                  "(600 > 512)")
    assert _raised_in_worker(RuntimeError(text.replace("ValueError:", "ValueError"))) is None


def test_ray_missing_says_what_to_install(tiny_model_dir, tok, tmp_path, capsys, monkeypatch):  # noqa: F811
    src = tmp_path / "in.jsonl"
    _write_rows(src, _rows(tok, 1))
    monkeypatch.setitem(sys.modules, "ray", None)           # import ray -> ImportError
    assert cli.main(_score_args(tiny_model_dir, src, tmp_path / "out", "--ray")) == 2
    assert "pip install 'attention-rhythm[ray]'" in _error(capsys)


def test_locked_output_and_other_settings_refused(tiny_model_dir, tok, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("ray.data")
    from rhythm.app.dataset_output import DatasetSink

    src, out = tmp_path / "in.jsonl", tmp_path / "out"
    _write_rows(src, _rows(tok, 2))
    with DatasetSink(out, {}).lock():
        assert cli.main(_score_args(tiny_model_dir, src, out, "--ray")) == 2
        assert "is being written by another" in _error(capsys)
    out.mkdir()
    (tmp_path / "out.settings.json").write_text(json.dumps({"format": 1, "settings": {"window": 3}}))
    (out / "part-00000-000000001-00000000.parquet").write_bytes(b"")    # a folder that holds rows
    assert cli.main(_score_args(tiny_model_dir, src, out, "--ray")) == 2
    assert "was scored with other settings (" in _error(capsys)


# ---- on a local Ray instance --------------------------------------------------------------------------------

def test_rows_equal_the_single_process_output(local_ray, tiny_model_dir, tok, tmp_path, capsys):  # noqa: F811
    src, out = tmp_path / "in.jsonl", tmp_path / "out"
    _write_rows(src, _rows(tok, 9))
    want = _reference(tiny_model_dir, src, tmp_path)
    assert cli.main(_score_args(tiny_model_dir, src, out, "--ray", "--workers", "2", "--block-rows", "2")) == 0
    got = _dataset_rows(out)
    assert got == want                                       # bitwise, gamma_random included
    assert len(list(out.glob("part-*.parquet"))) == 5        # ceil(9 / 2) blocks, one file each
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("parquet", data_dir=str(out), split="train")
    assert sorted(loaded["id"]) == sorted(want)
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert cli.main(_score_args(tiny_model_dir, src, out, "--ray", "--workers", "2", quiet=False)) == 0  # again
    assert "nothing to do: all 9 rows" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == files


def _worker_pids():
    """The ScoreWorker actors of this test's Ray instance (its processes descend from this one: ray.init
    started the raylet that starts the workers), never those of another Ray on the machine."""
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any("ScoreWorker" in part for part in proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:     # ended meanwhile
            continue
    return pids


def test_killed_worker_is_replaced_and_every_id_written_once(local_ray, tiny_model_dir, tok, tmp_path):  # noqa: F811
    pytest.importorskip("psutil")
    from rhythm.app.cli import score_settings
    from rhythm.app.distributed import RayOptions, score_dataset

    src, out = tmp_path / "in.jsonl", tmp_path / "out"
    rows = _rows(tok, 48)
    _write_rows(src, rows)
    want = _reference(tiny_model_dir, src, tmp_path)
    settings = score_settings(cli.build_parser().parse_args(_score_args(tiny_model_dir, src, out)))
    result = {}

    def job():
        result["report"] = score_dataset(settings, str(src), str(out), RayOptions(workers=2, block_rows=2))

    thread = threading.Thread(target=job)
    thread.start()
    killed = None
    deadline = time.time() + 180
    while time.time() < deadline and thread.is_alive():
        if list(out.glob("part-*.parquet")) and _worker_pids():
            killed = _worker_pids()[0]
            written = len(list(out.glob("part-*.parquet")))
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.005)
    thread.join(300)
    assert killed is not None, "the job ended before a worker could be killed"
    assert written < 24, "the kill came after the last block"
    report = result["report"]
    assert report.written == 48 and report.parts == 24
    assert _dataset_rows(out) == want
    assert len(list(out.glob("part-*.parquet"))) == 24 and not list(out.glob(".part-*"))


def test_a_row_killing_every_worker_stops_the_job_naming_it(local_ray, tiny_model_dir, tok, tmp_path,  # noqa: F811
                                                            monkeypatch):
    """A planted row SIGKILLs each worker that scores it: its block is retried --max-retries times (each time on a
    new actor), then the job fails with one line naming the block's ids (Ray retried it forever before); the
    blocks finished before stay, no start counts are left behind, and a resume with workers that no longer die
    on it completes."""
    from rhythm.app import distributed
    from rhythm.app.cli import score_settings
    from rhythm.app.distributed import RayOptions, WorkerFailed, score_dataset

    src, out = tmp_path / "in.jsonl", tmp_path / "out"
    rows = _rows(tok, 6)
    _write_rows(src, rows)
    deaths = tmp_path / "deaths"
    real = distributed._worker_class

    def dying_worker_class(*args):
        base = real(*args)

        class DiesOnR3(base):
            """The real worker, but scoring a block with id r3 kills its process (as running out of memory
            would), after the start was counted; each death is logged to ``deaths``."""

            def __init__(self):
                super().__init__()
                score_rows = self.job.score_rows

                def score(batch_rows, name):
                    if any(row.id == "r3" for row in batch_rows):
                        with open(deaths, "a") as f:
                            f.write(f"{os.getpid()}\n")
                        os.kill(os.getpid(), signal.SIGKILL)
                    return score_rows(batch_rows, name)
                self.job.score_rows = score
        return DiesOnR3

    monkeypatch.setattr(distributed, "_worker_class", dying_worker_class)
    settings = score_settings(cli.build_parser().parse_args(_score_args(tiny_model_dir, src, out)))
    with pytest.raises(WorkerFailed) as failed:
        score_dataset(settings, str(src), str(out), RayOptions(workers=1, block_rows=2, max_retries=1))
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"the block of {src} lines 3-4 (ids 'r2', 'r3') was running each time its worker "
                              "died, 2 times (--max-retries 1): drop or shorten those rows"), message
    written = re.search(r"; the (\d+) rows written are in (.+)$", message)
    assert written and written.group(2) == str(out.resolve()) and int(written.group(1)) == len(_dataset_rows(out))
    pids = deaths.read_text().split()
    assert len(pids) == 2 and len(set(pids)) == 2               # the first start and one retry, each on its own actor
    assert not list(out.glob(".part-*"))                         # the start counts are cleared
    assert "r2" not in _dataset_rows(out) and "r3" not in _dataset_rows(out)
    monkeypatch.setattr(distributed, "_worker_class", real)
    report = score_dataset(settings, str(src), str(out), RayOptions(workers=1, block_rows=2, max_retries=1))
    assert report.written == 6 - report.skipped and set(_dataset_rows(out)) == {r["id"] for r in rows}


def test_stopped_job_resumes_where_it_stopped(local_ray, tiny_model_dir, tok, tmp_path):  # noqa: F811
    from rhythm.app.cli import score_settings
    from rhythm.app.distributed import RayOptions, score_dataset

    src, out = tmp_path / "in.jsonl", tmp_path / "out"
    _write_rows(src, _rows(tok, 40))
    want = _reference(tiny_model_dir, src, tmp_path)
    address = local_ray.get_runtime_context().gcs_address
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + sys.path), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "rhythm.app.cli",
                             *_score_args(tiny_model_dir, src, out, "--ray", address, "--workers", "2",
                                          "--block-rows", "2", quiet=False)], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not list(out.glob("part-*.parquet")):
        time.sleep(0.01)
    assert proc.poll() is None, f"finished before it could be stopped: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 130, err[-2000:]
    assert "run the same command to resume" in err
    before = _dataset_rows(out)
    assert 1 <= len(before) < 40
    (out / ".part-00000-000000001-deadbeef.parquet.1.tmp").write_bytes(b"torn")   # a write cut by the stop
    settings = score_settings(cli.build_parser().parse_args(_score_args(tiny_model_dir, src, out)))
    report = score_dataset(settings, str(src), str(out), RayOptions(workers=2, block_rows=2))
    assert report.skipped == len(before) and report.written == 40 - len(before)
    assert _dataset_rows(out) == want and not list(out.glob(".part-*"))


def test_parquet_and_jsonl_inputs_give_the_same_blocks(tok, tmp_path):  # noqa: F811
    """The workers' read-back (read_block) returns the rows the check pass saw, for JSONL byte ranges (blank
    lines and a last line without newline included) and Parquet row ranges across row groups and files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rhythm.app.dataset_input import open_input, plan_blocks, read_block, scan

    rows = _rows(tok, 7)
    (tmp_path / "j").mkdir()
    text = "".join(json.dumps(r) + "\n" + ("\n" if i == 2 else "") for i, r in enumerate(rows))
    (tmp_path / "j" / "in.jsonl").write_text(text.rstrip("\n"))
    (tmp_path / "p").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:5]), tmp_path / "p" / "a.parquet", row_group_size=2)
    pq.write_table(pa.Table.from_pylist(rows[5:]), tmp_path / "p" / "b.parquet")
    (tmp_path / "p" / "_SUCCESS").write_text("")                 # skipped, as dataset readers do
    for folder, lines in (("j", [1, 2, 3, 5, 6, 7, 8]), ("p", [1, 2, 3, 4, 5, 1, 2])):
        files = open_input(str(tmp_path / folder))
        index = scan(files, lambda batch, name: None)
        assert list(index.id) == [r["id"] for r in rows] and list(index.line) == lines and index.id_kind == "str"
        blocks = plan_blocks(index, done={"r1"}, block_rows=3)
        got = [row for block in blocks for row in read_block(files, block)]
        assert [(r.id, r.prompt_ids, r.response_ids, r.extra) for r in got] == \
            [(r["id"], r["prompt_ids"], r["response_ids"], {"reward": r["reward"]}) for r in rows if r["id"] != "r1"]
        assert all(len(b.lines) <= 3 for b in blocks) and len({b.file for b in blocks}) == len(files.paths)


def test_output_folder_repairs_a_doubled_id_and_refuses_a_damaged_block(tmp_path):
    """finish(): an id found in two part files (files copied in by hand) is dropped from the later file, saying
    so; a missing id is an error; a part file that is not Parquet is refused by name on the next start."""
    from rhythm.app.dataset_output import DatasetSink, write_part
    from rhythm.app.output import OutputError

    settings = {"ids": "str", "strategies": ["coupled"]}

    def row(i):
        return {"id": f"r{i}", "prompt_length": 1, "response_ids": [i], "waad": [0.5], "fai": [0.25],
                "fai_valid": [True], "gamma_coupled": [1.5]}

    out = tmp_path / "out"
    sink = DatasetSink(out, settings)
    with sink.lock():
        sink.open()
        write_part(out, "part-a.parquet", [row(0), row(1)], settings)
        write_part(out, "part-b.parquet", [row(1), row(2)], settings)
        notes = sink.finish({"r0", "r1", "r2"})
    assert notes == ["part-b.parquet: 1 id(s) also in part-a.parquet dropped (e.g. 'r1')"]
    assert _dataset_rows(out) == {f"r{i}": row(i) for i in range(3)}
    with pytest.raises(OutputError, match="1 id\\(s\\) were not written \\(e.g. 'r3'\\)"):
        sink.finish({"r0", "r1", "r2", "r3"})
    (out / "part-c.parquet").write_bytes(b"not parquet")
    with pytest.raises(OutputError, match="part-c.parquet is not a readable Parquet block"):
        DatasetSink(out, settings).open()
