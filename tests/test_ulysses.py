"""Ulysses sequence parallelism in verl (issue 21): sp = 2 and 4 CPU processes (gloo), a tiny GQA Llama (Hq 4,
Hkv 2: at sp = 4 verl repeats the KV heads), verl's packed varlen micro-batches, verl's real Ulysses helpers
and its real FSDP engine ``forward_step`` (pad + slice with ``ulysses_pad_and_slice_inputs``, the outputs
all-gathered with ``gather_outputs_and_unpad``) on a real ("dp", "sp") device mesh.

Each rank records (1) the capture alone on the whole packed batch sliced by verl's helpers: the per-head
metrics of the sampled layer, all heads, all T positions, and the all-gathered logits; (2) the actor's
``compute_log_prob`` with the rhythm request: log-probs, entropies and gamma. All must equal the unsharded
run: the records within docs/definitions.md section 7, gamma bitwise (same per-head maps within the tolerance
give the same ranks here: checked), log-probs within 1e-5 (fp32; other layers' attention runs per segment).
"""
import os

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)
pytest.importorskip("verl.utils.ulysses")

from rhythm.capture.recording import Capture, CaptureRequest  # noqa: E402
from rhythm.integrations.config import RhythmCreditConfig  # noqa: E402
from rhythm_kernels.segments import segments_from_cu_seqlens  # noqa: E402

from .verl_standins import (P_MAX, PROMPT_LENS, R_MAX, RESPONSE_LENS, SMALL, cpu_device, engine_worker,  # noqa: E402
                            no_padding, per_row_gamma, tiny_llama, verl_batch)
from .ports import free_port  # noqa: E402

CFG = RhythmCreditConfig(strategy="coupled", **SMALL)
LAYER = 1                       # the direct capture's sampled layer (layers 0 and 2 run the per-segment path)
SP_SIZES = (2, 4)
FIELDS = ("lse", "distance", "waad", "fai", "fai_valid")


def packed_batch():
    """The verl batch's sequences packed into [1, N] (N = 118), their cu_seqlens and response starts."""
    data = verl_batch()
    ids, starts, bounds = [], [], [0]
    for b, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        ids.append(data.batch["input_ids"][b, P_MAX - p:P_MAX + r])
        starts.append(bounds[-1] + p)
        bounds.append(bounds[-1] + p + r)
    ids = torch.cat(ids)[None]
    position_ids = torch.cat([torch.arange(p + r) for p, r in zip(PROMPT_LENS, RESPONSE_LENS)])[None]
    return ids, position_ids, torch.tensor(bounds), torch.tensor(starts)


def capture_packed(model, sp, exchange=None):
    """Fused capture of LAYER on the packed batch; sp > 1: each rank's slice (verl's pad + slice), the
    exchange and the logits all-gathered. Returns (records, logits [N, V])."""
    from verl.utils.ulysses import gather_outputs_and_unpad, ulysses_pad_and_slice_inputs

    ids, position_ids, bounds, starts = packed_batch()
    n = ids.shape[1]
    local_ids, local_pos, pad = ulysses_pad_and_slice_inputs(ids, position_ids, sp_size=sp)
    length = n + pad
    segments = segments_from_cu_seqlens(bounds, 1, n, starts, "cpu")
    if pad:
        from rhythm_kernels.segments import Segments

        segments = Segments.from_spans(segments.spans, (1, length))
    request = CaptureRequest(layers=(LAYER,), segments=segments, window=SMALL["window"], horizon=SMALL["horizon"],
                             backend="torch", stop_after_last=False, sequence_parallel=exchange)
    with torch.no_grad(), Capture(model) as capture:
        result = capture.run(request, forward=lambda: model(input_ids=local_ids, position_ids=local_pos,
                                                            use_cache=False))
    records = result.records
    logits = result.output.logits[0]
    if sp > 1:
        logits = gather_outputs_and_unpad(logits, gather_dim=0, unpad_dim=0, padding_size=pad)
    return {name: getattr(records[LAYER], name)[..., :n] for name in FIELDS}, logits


def _run(rank, sp, mesh, out_dir):
    """One layout: sp ranks per group (data parallel over the rest of the world), every rank the whole batch."""
    from verl.utils.ulysses import set_ulysses_sequence_parallel_group
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from rhythm.integrations.verl import capture, hooks
    from rhythm.integrations.verl.ulysses import VerlUlysses

    group = mesh["sp"].get_group()
    model = tiny_llama()
    set_ulysses_sequence_parallel_group(group)
    records, logits = capture_packed(model, sp, VerlUlysses())
    set_ulysses_sequence_parallel_group(None)
    worker = engine_worker(model, use_remove_padding=True)
    worker.actor.engine.__dict__.update(ulysses_sequence_parallel_size=sp, use_ulysses_sp=True,
                                        ulysses_device_mesh=mesh, ulysses_parallel_group=group)
    micro_gammas, nested = [], capture._gamma_nested   # what every rank computes, micro-batch by micro-batch
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(capture, "_gamma_nested", lambda *a: micro_gammas.append(nested(*a)) or micro_gammas[-1])
        hooks.install()
        try:
            output = ActorRolloutRefWorker.compute_log_prob(worker, no_padding(verl_batch(), CFG))
        finally:
            hooks.uninstall()
    result = {"records": records, "logits": logits, "micro_gammas": [g.values() for g in micro_gammas]}
    if output is not None:   # verl collects the outputs of sp rank 0 only
        result.update(log_probs=output["log_probs"].values(), entropy=output["entropy"].values(),
                      gamma=output["rhythm_gamma"])
    torch.save(result, os.path.join(out_dir, f"{sp}.{rank}.pt"))


def _worker(rank, world, port, out_dir):
    """World of 4: sp = 2 on a ("dp", "sp") = (2, 2) mesh, then sp = 4 on (1, 4) (one interpreter start)."""
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RHYTHM_CREDIT_CONFIG="")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            cpu_device(monkeypatch)
            for sp in SP_SIZES:
                _run(rank, sp, init_device_mesh("cpu", (world // sp, sp), mesh_dim_names=("dp", "sp")), out_dir)
                dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def unsharded():
    """The same model, SP = 1: the direct capture and the actor's plain log-probs (no capture)."""
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from .verl_standins import ensure_process_group

    ensure_process_group()
    model = tiny_llama()
    records, logits = capture_packed(model, 1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        cpu_device(monkeypatch)
        plain = ActorRolloutRefWorker.compute_log_prob(engine_worker(model, use_remove_padding=True),
                                                       no_padding(verl_batch()))
    return {"records": records, "logits": logits, "log_probs": plain["log_probs"].values(),
            "entropy": plain["entropy"].values(), "gamma": per_row_gamma(model, verl_batch(), CFG), "model": model}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ulysses")
    mp.spawn(_worker, args=(max(SP_SIZES), free_port(), str(out)), nprocs=max(SP_SIZES), join=True)
    return out


@pytest.mark.parametrize("sp", SP_SIZES)
def test_ulysses_capture_equals_unsharded(sp, unsharded, sharded):
    from rhythm.integrations.verl.credit import response_gamma

    tmp_path = sharded
    lengths = verl_batch().batch["attention_mask"][:, -R_MAX:].sum(-1)
    first = torch.load(tmp_path / f"{sp}.0.pt")   # sp rank 0 of the first data-parallel group
    for name in ("log_probs", "entropy"):
        torch.testing.assert_close(first[name], unsharded[name], rtol=0, atol=1e-5, msg=f"sp {sp} {name}")
    gamma = response_gamma(first["gamma"], lengths, R_MAX)
    torch.testing.assert_close(gamma, unsharded["gamma"], rtol=0, atol=0, msg=f"sp {sp} gamma")
    assert bool((gamma > 1).any())
    for rank in range(sp):
        got = torch.load(tmp_path / f"{sp}.{rank}.pt")
        assert len(got["micro_gammas"]) == 3
        for mine, rank0 in zip(got["micro_gammas"], first["micro_gammas"]):   # every rank: the same gamma
            torch.testing.assert_close(mine, rank0, rtol=0, atol=0)
        for name in FIELDS:
            want = unsharded["records"][name]
            tol = dict(rtol=0, atol=0) if name == "fai_valid" else dict(rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got["records"][name], want, **tol, msg=f"sp {sp} rank {rank} {name}")
        assert bool((unsharded["records"]["waad"] > 0).any())
        torch.testing.assert_close(got["logits"], unsharded["logits"], rtol=0, atol=1e-5)
