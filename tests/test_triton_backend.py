"""The Triton backend (``backend="triton"``) against the fp64 oracle, docs/definitions.md section 7.

Without CUDA the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), with
one small fixed config; sizes stay small (T <= 512, few heads) so the file runs in about 35 s. The
``cuda`` section at the bottom adds long-context checks (8K fp32, bf16 at 2K) and an autotuned run.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

# On GPU, compile one config per variant in the test suite; the benchmark autotunes. (Read at call time.)
os.environ.setdefault("RHYTHM_TRITON_AUTOTUNE", "0")

from tests.oracle_check import assert_matches_oracle, random_qkv  # noqa: E402

import rhythm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run(q, k, v=None, **kwargs):
    return rhythm.attention_metrics(q, k, v, backend="triton", **kwargs)


def check(q, k, v=None, **kwargs):
    """Run the triton backend, compare with the oracle, and check padding zeros and dtypes.

    The range invariants of section 7 are not asserted here: the kernels clip waad to [0, min(W, distance)]
    and fai to [0, 1] against rounding, so such asserts could not fail; the oracle comparison checks them."""
    metrics = run(q, k, v, **kwargs)
    assert_matches_oracle(metrics, q, k, v, **kwargs)
    assert bool((metrics.distance >= 0).all()), "distance < 0"
    for name in ("lse", "distance", "waad", "fai"):
        assert getattr(metrics, name).dtype == torch.float32
    if v is not None:
        assert metrics.out.dtype == q.dtype and tuple(metrics.out.shape) == (q.shape[0], q.shape[2], q.shape[1],
                                                                              q.shape[3])
    return metrics


def assert_zero_on_padding(metrics, real):
    """real: bool [B, T]. Every metric is exactly 0 on padding, out rows too."""
    pad = ~real.to(metrics.lse.device)
    for name in ("lse", "distance", "waad", "fai"):
        assert bool((getattr(metrics, name).transpose(0, 1)[:, pad] == 0).all()), f"{name} != 0 on padding"
    assert not bool(metrics.fai_valid.transpose(0, 1)[:, pad].any())
    if metrics.out is not None:
        assert bool((metrics.out[pad] == 0).all()), "out != 0 on padding rows"


# --------------------------------------------------------------------------------------------------------
# Shapes, lengths, GQA
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 2, 97, 255])
def test_odd_lengths(length):
    q, k, v = random_qkv(1, 2, 1, length, 64, device=DEVICE, seed=length, with_v=True)
    check(q, k, v)


@pytest.mark.parametrize("ratio", [1, 3, 9])
def test_gqa_ratios(ratio):
    q, k, _ = random_qkv(1, ratio, 1, 70, 64, device=DEVICE, seed=ratio)
    check(q, k, horizon=(0, 5))


def test_gqa_two_kv_heads_with_v():
    q, k, v = random_qkv(2, 6, 2, 50, 64, device=DEVICE, seed=7, with_v=True)
    check(q, k, v, response_start=torch.tensor([20, 3], device=DEVICE))


def test_long_sequence_full_horizon():
    """Many off-band key blocks and unmasked body row blocks (T = 512)."""
    q, k, _ = random_qkv(1, 2, 1, 512, 64, device=DEVICE, seed=3)
    check(q, k, horizon=(10, None), window=10, response_start=100)


def test_distance_has_no_cancellation():
    """Near-one-hot attention on the diagonal at large t: distance must stay ~0 (t minus a mean would not)."""
    length, dim = 300, 64
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, length, dim, generator=gen)
    q = (k * 4.0).clone()                                  # q_t . k_t dominates: A[t, t] ~ 1
    metrics = check(q.to(DEVICE), k.to(DEVICE), horizon=(10, None))
    assert metrics.distance[0, 0, -1].item() < 1e-3


# --------------------------------------------------------------------------------------------------------
# Padding, packing, responses
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_padding(side):
    batch, length = 3, 90
    lengths = [90, 61, 33]
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, length - n:] = True
        elif side == "right":
            mask[b, :n] = True
        else:                                              # full row, left-padded row, padded on both sides
            mask[b, [0, length - n, 20][b]:[0, length - n, 20][b] + n] = True
    first = mask.int().argmax(dim=1)
    response = (first + torch.tensor([40, 5, 32])).to(DEVICE)  # row 2: one response token
    q, k, v = random_qkv(batch, 2, 1, length, 64, device=DEVICE, seed=11, with_v=True)
    metrics = check(q, k, v, attention_mask=mask.to(DEVICE), response_start=response)
    assert_zero_on_padding(metrics, mask)


def test_varlen_cu_seqlens():
    bounds = [0, 37, 38, 120, 200]
    cu = torch.tensor(bounds, device=DEVICE)
    response = torch.tensor([10, 38, 120, 150], device=DEVICE)   # segment 2's response is empty (= its end)
    q, k, v = random_qkv(1, 4, 2, 200, 64, device=DEVICE, seed=5, with_v=True)
    metrics = check(q, k, v, cu_seqlens=cu, response_start=response, horizon=(10, None))
    assert not bool(metrics.fai_valid[0, :, 38:120].any())


def test_varlen_windowed_and_band():
    cu = torch.tensor([0, 130, 131, 260], device=DEVICE)
    q, k, _ = random_qkv(1, 3, 3, 260, 64, device=DEVICE, seed=6)
    check(q, k, cu_seqlens=cu, window=64, horizon=(0, 5))


@pytest.mark.parametrize("response_start", [0, 40, 79, 80])
def test_response_starts(response_start):
    """Including the empty response (response_start = end): every fai_valid False, fai = 0."""
    q, k, _ = random_qkv(1, 2, 1, 80, 64, device=DEVICE, seed=response_start)
    metrics = check(q, k, response_start=response_start)
    if response_start == 80:
        assert not bool(metrics.fai_valid.any()) and bool((metrics.fai == 0).all())


# --------------------------------------------------------------------------------------------------------
# Options: horizons, windows
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("horizon,window", [((10, 100), 1), ((0, 5), 10), ((10, None), 64), ((10, 100), 64),
                                            ((0, None), 1)])
def test_horizons_and_windows(horizon, window):
    q, k, _ = random_qkv(1, 2, 1, 160, 64, device=DEVICE, seed=window)
    check(q, k, horizon=horizon, window=window, response_start=30)


# --------------------------------------------------------------------------------------------------------
# Dtypes and head dims
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,dim", [(torch.float32, 128), (torch.float16, 64), (torch.float16, 128),
                                       (torch.bfloat16, 64), (torch.bfloat16, 128)])
def test_dtypes_and_head_dims(dtype, dim):
    q, k, v = random_qkv(1, 2, 1, 100, dim, dtype=dtype, device=DEVICE, seed=dim, with_v=True)
    check(q, k, v, horizon=(10, None))


@pytest.mark.parametrize("dtype,dim", [(torch.float32, 48), (torch.bfloat16, 80)])
def test_padded_head_dims(dtype, dim):
    q, k, v = random_qkv(1, 3, 1, 75, dim, dtype=dtype, device=DEVICE, seed=dim, with_v=True)
    check(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_padded_batch(dtype):
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1, :20] = False
    q, k, v = random_qkv(2, 2, 1, 64, 64, dtype=dtype, device=DEVICE, seed=2, with_v=True)
    metrics = check(q, k, v, attention_mask=mask.to(DEVICE), response_start=torch.tensor([10, 30], device=DEVICE))
    assert_zero_on_padding(metrics, mask)


def test_without_v_matches_with_v():
    """v=None skips the PV product; the metrics do not change."""
    q, k, v = random_qkv(1, 2, 1, 90, 64, device=DEVICE, seed=4, with_v=True)
    with_v, without = run(q, k, v), run(q, k)
    assert without.out is None and with_v.out is not None
    for name in ("lse", "distance", "waad", "fai"):
        assert torch.equal(getattr(with_v, name), getattr(without, name)), name


def test_non_contiguous_inputs():
    """q/k/v as views of transformers' [B, T, H, D] projections (strides passed, no copy)."""
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(2, 70, 4, 64, generator=gen).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, 70, 2, 64, generator=gen).to(DEVICE).transpose(1, 2)
    v = torch.randn(2, 70, 2, 64, generator=gen).to(DEVICE).transpose(1, 2)
    assert not q.is_contiguous()
    check(q * 1.5, k * 1.5, v)
    metrics = run(q, k, v)
    contiguous = run(q.contiguous(), k.contiguous(), v.contiguous())
    for name in ("lse", "distance", "waad", "fai", "out"):
        assert torch.equal(getattr(metrics, name), getattr(contiguous, name)), name


@cuda_only  # under the interpreter the kernels are numpy loops: two calls cannot differ
def test_deterministic():
    cu = torch.tensor([0, 90, 150], device=DEVICE)
    q, k, v = random_qkv(1, 4, 2, 150, 64, dtype=torch.bfloat16, device=DEVICE, seed=8, with_v=True)
    first, second = run(q, k, v, cu_seqlens=cu), run(q, k, v, cu_seqlens=cu)
    for name in ("lse", "distance", "waad", "fai", "out"):
        assert torch.equal(getattr(first, name), getattr(second, name)), f"{name} differs between two calls"


@pytest.mark.parametrize("horizon", [(10, 100), (10, None)])
def test_influence_split_heads_is_bitwise_equal(horizon):
    """One query head per program (SPLIT_HEADS) sums the same terms in the same order as the group loop.
    Both calls take one explicit config: the tiles the public API uses for this input without autotuning
    (fp32: never autotuned), so the API's result is bitwise the same too, on CUDA as under the interpreter."""
    from rhythm_kernels.segments import influence_counts, segments_from_cu_seqlens
    from rhythm_kernels.triton_influence import default_influence_config, influence_pass
    from rhythm_kernels.triton_stats import stats_pass

    cu = torch.tensor([0, 70, 160], device=DEVICE)
    q, k, _ = random_qkv(1, 6, 2, 160, 64, device=DEVICE, seed=12)
    segments = segments_from_cu_seqlens(cu, 1, 160, torch.tensor([30, 100], device=DEVICE), q.device)
    counts = influence_counts(segments, 1, 160, horizon)
    norm = stats_pass(q, k, None, segments, window=10, scale=64 ** -0.5).norm
    base = {key: value for key, value in default_influence_config(64, q.dtype).items() if key != "SPLIT_HEADS"}
    fai = [influence_pass(q, k, norm, segments, counts, horizon=horizon, scale=64 ** -0.5,
                          config={**base, "SPLIT_HEADS": split}) for split in (False, True)]
    assert torch.equal(fai[0], fai[1])
    assert torch.equal(fai[0], run(q, k, cu_seqlens=cu, horizon=horizon,
                                   response_start=torch.tensor([30, 100], device=DEVICE)).fai)


def test_two_size_block_table_offsets():
    """On GPU the block table holds two tile sizes (autotuning picks one): the larger size's rows start at an
    offset. Build a (16, 32) table and run the 32-wide config: bitwise what the one-size table gives."""
    from rhythm_kernels.segments import influence_counts, segments_from_mask
    from rhythm_kernels.triton_influence import influence_pass
    from rhythm_kernels.triton_stats import stats_pass

    mask = torch.ones(2, 100, dtype=torch.bool)
    mask[0, :37] = False
    q, k, v = random_qkv(2, 4, 2, 100, 64, device=DEVICE, seed=13, with_v=True)
    segments = segments_from_mask(mask.to(DEVICE), 2, 100, torch.tensor([50, 10], device=DEVICE), q.device)
    counts = influence_counts(segments, 2, 100, (10, None))
    stats_cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    infl_cfg = {"BLOCK_N": 32, "BLOCK_M": 32, "SPLIT_HEADS": True, "num_warps": 4, "num_stages": 1}
    one = stats_pass(q, k, v, segments, window=10, scale=0.125, config=stats_cfg)
    two = stats_pass(q, k, v, segments, window=10, scale=0.125, config=stats_cfg, table_sizes=(16, 32))
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    fai = [influence_pass(q, k, one.norm, segments, counts, horizon=(10, None), scale=0.125, config=infl_cfg,
                          table_sizes=sizes) for sizes in (None, (16, 32))]
    assert torch.equal(fai[0], fai[1])


def test_head_dim_too_large():
    q, k, _ = random_qkv(1, 1, 1, 8, 264, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        run(q, k)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests below run the compiled kernels")
def test_gpu_code_path_compiles_for_sm90(tmp_path):
    """Without a GPU the interpreter never sees the native fp16/bf16 dots: compile the GPU path for sm_90,
    specialised as the runtime does (16-byte divisible pointers and strides, the unit head-dim stride a
    constant), so its register and spill report is the code a GPU runs."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Triton's CUDA backend / ptxas unavailable: {exc}")
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)     # rhythm_kernels as imported here
    done = subprocess.run([sys.executable, "bench/gpu_compile_report.py", "--quick",
                           "--out", str(tmp_path / "compile.json")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "5/5 variants compiled" in done.stdout
    report = json.loads((tmp_path / "compile.json").read_text())["records"]          # bench/records.py's schema
    stats_bf16 = next(r for r in report if r["variant"].startswith("stats bf16 D=128"))
    assert {"Q", "K", "stride_qt"} <= set(stats_bf16["divisible_by_16"]), stats_bf16
    assert "stride_qd" in stats_bf16["specialised"] and stats_bf16["mma"] == "wgmma", stats_bf16
    mla = next(r for r in report if "D=192/Dv=128" in r["variant"])         # DeepSeek MLA: v keeps 128
    assert mla["ok"] and mla["mma"] == "wgmma", mla


# --------------------------------------------------------------------------------------------------------
# CUDA only: long context, autotuned configs
# --------------------------------------------------------------------------------------------------------
@cuda_only
@pytest.mark.cuda
def test_cuda_8k_fp32():
    q, k, _ = random_qkv(1, 2, 1, 8192, 64, device="cuda", seed=1)
    check(q, k, horizon=(10, None), response_start=1024)


@cuda_only
@pytest.mark.cuda
def test_cuda_bf16_2k_with_v():
    q, k, v = random_qkv(1, 4, 1, 2048, 128, dtype=torch.bfloat16, device="cuda", seed=2, with_v=True)
    check(q, k, v, horizon=(10, 100), response_start=512)


@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("horizon", [(10, 100), (10, None)])
def test_cuda_autotuned_varlen_bf16(monkeypatch, horizon):
    monkeypatch.setenv("RHYTHM_TRITON_AUTOTUNE", "1")
    cu = torch.tensor([0, 700, 701, 2000, 3000], device="cuda")
    q, k, v = random_qkv(1, 8, 2, 3000, 128, dtype=torch.bfloat16, device="cuda", seed=3, with_v=True)
    metrics = check(q, k, v, cu_seqlens=cu, horizon=horizon,
                    response_start=torch.tensor([100, 701, 1500, 2999], device="cuda"))
    again = run(q, k, v, cu_seqlens=cu, horizon=horizon,
                response_start=torch.tensor([100, 701, 1500, 2999], device="cuda"))
    for name in ("lse", "distance", "waad", "fai", "out"):
        assert torch.equal(getattr(metrics, name), getattr(again, name)), name


@cuda_only
@pytest.mark.cuda
def test_cuda_fp16_d256():
    q, k, v = random_qkv(1, 2, 2, 600, 256, dtype=torch.float16, device="cuda", seed=4, with_v=True)
    check(q, k, v)
