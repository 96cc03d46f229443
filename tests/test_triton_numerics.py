"""The Triton backend at the edges of fp32: big logits, a scale that underflows, any window W, horizons of
2**31 - 1 ("to the end"). Every case against the fp64 oracle at docs/definitions.md section 7 (under the
interpreter without CUDA; tests/conftest.py sets TRITON_INTERPRET=1)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RHYTHM_TRITON_AUTOTUNE", "0")

from tests.oracle_check import assert_matches_oracle, oracle, random_qkv  # noqa: E402

import rhythm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(q, k, v=None, **kwargs):
    return rhythm.attention_metrics(q, k, v, backend="triton", **kwargs)


def test_big_logits_fai():
    """Scores of a few hundred (q, k scaled by sqrt(300)): A must not inherit the rounding of a large fp32 lse.
    (Recomputing A as 2^(S2 - log2(e) * lse) with lse ~ 1500 in fp32 put fai 1.7e-4 relative off.)"""
    q, k, _ = random_qkv(1, 2, 1, 128, 64, device=DEVICE, seed=0, spread=300 ** 0.5)
    metrics = run(q, k, horizon=(10, None))
    assert_matches_oracle(metrics, q, k, horizon=(10, None))


OUTPUTS = ("lse", "distance", "waad", "fai", "out")


def assert_triton_as_torch(spread=1.5, softcap=None, factor=4.0, floor=1e-7):
    """fp32 q, k, v [1, 2, 128, 64] with scores of about spread**2 (and the layer's softcap): Triton within
    section 7 (conditioning-aware) and, per output, max abs(triton - ref64) <= factor * max abs(torch - ref64)
    + floor. The widened bound measures the fp32 scores' rounding; this holds the backends to each other, so
    an error Triton adds on top (a normaliser rebuilt from scores that round differently, a softcap formula
    that cancels) cannot hide inside it. Also run in a subprocess on a second BLAS (below)."""
    q, k, v = random_qkv(1, 2, 1, 128, 64, device=DEVICE, seed=0, spread=spread, with_v=True)
    kwargs = dict(horizon=(10, None), layer=None if softcap is None else rhythm.LayerAttention(softcap=softcap))
    ours = run(q, k, v, **kwargs)
    torch_ = rhythm.attention_metrics(q.cpu(), k.cpu(), v.cpu(), backend="torch", **kwargs)
    assert_matches_oracle(ours, q, k, v, **kwargs)
    ref64 = oracle(q.double(), k.double(), v.double(), **kwargs)
    for name in OUTPUTS:
        err = (getattr(ours, name).double().cpu() - ref64[name]).abs().max().item()
        err_torch = (getattr(torch_, name).double() - ref64[name]).abs().max().item()
        assert err <= factor * err_torch + floor, (
            f"{name}: triton's error {err:.3g} is more than {factor}x the torch backend's {err_torch:.3g} on the "
            f"same inputs (spread {spread}, softcap {softcap})")


@pytest.mark.parametrize("spread", [17.3, 30.0, 40.0])
def test_large_logits_as_accurate_as_torch(spread):
    """|S| up to about 1,500, 4,500 and 8,000 (fp32): the influence pass rebuilds A = 2^(S2 - m - log2 l) from
    the stats pass's row max m, which is exact only if it recomputes bitwise the stats pass's S2."""
    assert_triton_as_torch(spread=spread)


@pytest.mark.parametrize("softcap", [30.0, 1e4, 1e6, 1e30, 3e38])
@pytest.mark.parametrize("spread", [1.5, 5.0])
def test_large_softcap_as_accurate_as_torch(softcap, spread):
    """A cap far above the logits makes S' = cap * tanh(S / cap) nearly S: the form (1 - e) / (1 + e) alone
    lost 1 - e's relative precision there (lse 1.6e-4 off at 1e4, 1.7e-2 at 1e6: the torch backend held)."""
    assert_triton_as_torch(spread=spread, softcap=softcap)


def _cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's BLAS: CPU only")
@pytest.mark.skipif(not {"avx2", "fma"} <= _cpu_flags(), reason="OpenBLAS's Haswell kernels need AVX2 and FMA")
def test_large_logits_on_a_second_blas():
    """The same checks with numpy's OpenBLAS on its Haswell kernels (OPENBLAS_CORETYPE, read when numpy loads:
    a subprocess), whose matmul rounds an element by its position in the tile: the interpreter's dot must not
    inherit that (tl.dot is the GPU's ordered FMA dot there, rhythm_kernels.triton_common), or fai is 10-100x
    over section 7 at logits above a thousand (a fresh clone on such a machine failed test_big_logits_fai)."""
    code = ("from tests.test_triton_numerics import assert_triton_as_torch, test_big_logits_fai\n"
            "test_big_logits_fai()\n"
            "for spread in (17.3, 30.0): assert_triton_as_torch(spread=spread)\n")
    env = dict(os.environ, OPENBLAS_CORETYPE="Haswell", TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smallest_scale_gives_uniform_attention(dtype):
    """The smallest scale taken, float32's smallest normal number: the logits round to 0 or to subnormals
    (uniform attention), never -inf * 0 = NaN."""
    scale = 1.2e-38
    q, k, _ = random_qkv(1, 2, 1, 70, 32, dtype=dtype, device=DEVICE, seed=3)
    metrics = run(q, k, scale=scale, response_start=5)
    assert_matches_oracle(metrics, q, k, scale=scale, response_start=5)
    t = torch.arange(70, dtype=torch.float64)
    assert torch.allclose(metrics.distance[0, 0].double().cpu(), t / 2, atol=1e-4)   # uniform: mean lag t / 2


@pytest.mark.parametrize("scale", [1e-46, 1e-300, 1e-320])
def test_scale_below_float32s_range_is_refused(scale):
    """A scale float32 cannot hold as a normal number is refused by name (issue 19 item 10), before any kernel."""
    q, k, _ = random_qkv(1, 2, 1, 70, 32, device=DEVICE, seed=3)
    with pytest.raises(ValueError, match=r"scale must be None or a finite float > 0 in float32's normal range"):
        run(q, k, scale=scale, response_start=5)


@pytest.mark.parametrize("window,sliding_window", [(300, None), (1000, None), (10 ** 9, None), (10 ** 9, 100)])
def test_large_windows(window, sliding_window):
    """WAAD for any W (T = 512) within the section 7 bound: no W - band / l cancellation (that form was off by
    3e-4 at W = 1000, 2e-2 at 1e5, 209 at 1e9). A W at least the segment length is plain distance, bitwise.
    (waad then takes distance's values, here up to ~250, where fp32 rounding of the scores and sums alone is
    ~7e-5: the absolute 1e-4 holds with little margin for values in the hundreds, as in the torch backend.)
    With a sliding window of 100 as well, waad is the windowed distance."""
    q, k, _ = random_qkv(1, 1, 1, 512, 32, device=DEVICE, seed=5, spread=1.0)
    kwargs = dict(window=window, horizon=(0, 0), layer=rhythm.LayerAttention(sliding_window=sliding_window))
    metrics = run(q, k, **kwargs)
    assert_matches_oracle(metrics, q, k, **kwargs)
    if window >= 512:
        assert torch.equal(metrics.waad, metrics.distance)


@pytest.mark.parametrize("horizon", [(10, 2 ** 31 - 1), (2 ** 31 - 1, 2 ** 31 - 1)])
def test_horizon_int32_max(horizon):
    """2**31 - 1 for "to the end": n0 + BLOCK_N + H_hi must not wrap around in int32."""
    cu = torch.tensor([0, 50, 130], device=DEVICE)
    q, k, _ = random_qkv(1, 2, 1, 130, 32, device=DEVICE, seed=4)
    metrics = run(q, k, cu_seqlens=cu, horizon=horizon)
    assert_matches_oracle(metrics, q, k, cu_seqlens=cu, horizon=horizon)
    assert bool(metrics.fai_valid.any()) == (horizon[0] < 130)
