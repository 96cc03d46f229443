"""CPU benchmark (2 gloo processes): the communication the Ulysses capture adds per step, against the
all-to-alls Ulysses already does.

Per layer verl's Ulysses exchanges q, k, v (``gather_seq_scatter_heads``) and the output
(``gather_heads_scatter_seq``); the capture adds, per sampled layer, the all-gather of 5 per-head maps
(``VerlUlysses.gather_heads``: lse, distance, waad, fai in float32, fai_valid as bytes) and, per micro-batch,
one all-gather of the position ids. Each exchange is timed with verl's own helpers on a real 2-rank gloo group
(median of the repeats, rank 0's clock, after a barrier); bytes are those each rank sends, from the shapes.
Per step = n_layers x the Ulysses exchange vs n_sampled x the map gather + the position gather.

    python bench/bench_ulysses_comm.py [--length 4096] [--heads 16] [--kv-heads 8] [--dim 128] [--layers 28]
                                       [--sampled 5] [--repeats 5] [--out bench/results/ulysses_comm_cpu.json]
"""
from __future__ import annotations

import os
import socket
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.records import bench_parser, write_result  # noqa: E402

SP = 2
WHAT = "Ulysses capture: added all-gathers (per-head maps, position ids) vs verl's own all-to-alls, 2 gloo ranks"


def _timed(fn, repeats):
    import torch.distributed as dist

    times = []
    for _ in range(repeats + 1):        # the first call warms the group up
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _worker(rank, args, port, queue):
    import torch.distributed as dist
    from verl.utils.ulysses import gather_heads_scatter_seq, gather_seq_scatter_heads

    from rhythm.integrations.verl.ulysses import VerlUlysses

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=SP)
    try:
        group = dist.group.WORLD
        exchange = VerlUlysses(group)
        t_local, dtype = args.length // SP, torch.float32
        q = torch.randn(1, t_local, args.heads, args.dim, dtype=dtype)
        kv = torch.randn(1, t_local, args.kv_heads, args.dim, dtype=dtype)
        out = torch.randn(1, args.length, args.heads // SP, args.dim, dtype=dtype)
        maps = [torch.randn(1, args.heads // SP, args.length) for _ in range(4)]
        valid = torch.ones(1, args.heads // SP, args.length, dtype=torch.bool)
        positions = torch.arange(t_local)[None]

        def ulysses_layer():   # what verl's patched flash forward exchanges on every layer
            for x in (q, kv, kv):
                gather_seq_scatter_heads(x, seq_dim=1, head_dim=2, group=group)
            gather_heads_scatter_seq(out, seq_dim=1, head_dim=2, group=group)

        def sampled_layer():   # what the capture adds on a sampled layer
            for x in (*maps, valid):
                exchange.gather_heads(x)

        result = {"ulysses_layer_s": _timed(ulysses_layer, args.repeats),
                  "sampled_layer_s": _timed(sampled_layer, args.repeats),
                  "positions_s": _timed(lambda: exchange.gather_positions(positions), args.repeats)}
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = bench_parser(__doc__, "ulysses_comm_cpu.json", length=4096, heads=16, kv_heads=8, dim=128, layers=28,
                          sampled=5, repeats=5)
    args = parser.parse_args(argv)
    if args.length % SP or args.heads % SP or args.kv_heads % SP:
        parser.error(f"--length, --heads and --kv-heads must be multiples of sp = {SP}")
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(args, port, queue), nprocs=SP, join=True)
    t = queue.get()
    # Bytes each rank sends (it keeps 1/sp of what it splits): float32 = 4 bytes, fai_valid 1 byte.
    share = (SP - 1) / SP
    t_local = args.length // SP
    ulysses_bytes = share * 4 * (t_local * args.dim * (args.heads + 2 * args.kv_heads)
                                 + args.length * (args.heads // SP) * args.dim)
    sampled_bytes = share * SP * (args.heads // SP) * args.length * (4 * 4 + 1)   # all-gather: own part to each peer
    positions_bytes = share * SP * t_local * 8
    step_ulysses_s = args.layers * t["ulysses_layer_s"]
    step_added_s = args.sampled * t["sampled_layer_s"] + t["positions_s"]
    step_ulysses_b = args.layers * ulysses_bytes
    step_added_b = args.sampled * sampled_bytes + positions_bytes
    records = [
        {"kind": "ulysses_all_to_alls_per_layer", "seconds": t["ulysses_layer_s"], "bytes_sent_per_rank": ulysses_bytes},
        {"kind": "added_map_gather_per_sampled_layer", "seconds": t["sampled_layer_s"],
         "bytes_sent_per_rank": sampled_bytes},
        {"kind": "added_position_gather_per_micro_batch", "seconds": t["positions_s"],
         "bytes_sent_per_rank": positions_bytes},
    ]
    summary = {"step_ulysses_seconds": step_ulysses_s, "step_added_seconds": step_added_s,
               "added_time_fraction": step_added_s / step_ulysses_s,
               "step_ulysses_bytes": step_ulysses_b, "step_added_bytes": step_added_b,
               "added_bytes_fraction": step_added_b / step_ulysses_b}
    settings = {"sp": SP, "backend": "gloo (CPU)", "T": args.length, "Hq": args.heads, "Hkv": args.kv_heads,
                "D": args.dim, "dtype": "float32", "layers": args.layers, "sampled_layers": args.sampled,
                "repeats": args.repeats, "time": "median of repeats after one warm-up, rank 0, between barriers",
                "step": "one micro-batch forward: layers x Ulysses exchange vs sampled x map gather + positions"}
    write_result(args.out, "bench_ulysses_comm", WHAT, settings=settings, records=records, summary=summary)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
