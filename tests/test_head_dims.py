"""Head dimensions of the models people train (issue 20 item 3), in every backend, against the tests' oracle
(tests/oracle_check.py, docs/definitions.md section 7): D in {64, 128, 192, 256} and q/k head dim 192 with
v head dim 128 (DeepSeek MLA, v not padded). The Triton backend runs under the interpreter without CUDA
(small T), compiled on a GPU; D = 192 pads its tiles to 256 and Dv = 128 keeps its own width."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RHYTHM_TRITON_AUTOTUNE", "0")     # one config per variant in the suite (read at call time)

from tests.oracle_check import assert_matches_oracle, random_qkv  # noqa: E402

import rhythm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "torch", "triton"]
# (D of q/k, Dv of v)
HEAD_DIMS = [(64, 64), (128, 128), (192, 192), (256, 256), (192, 128)]


def _check(backend, q, k, v, **kwargs):
    metrics = rhythm.attention_metrics(q, k, v, backend=backend, **kwargs)
    assert metrics.out.shape == (q.shape[0], q.shape[2], q.shape[1], v.shape[-1])
    assert metrics.out.dtype == q.dtype
    assert_matches_oracle(metrics, q, k, v, **kwargs)
    return metrics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim,v_dim", HEAD_DIMS)
def test_padded_batch(backend, dim, v_dim):
    """Left padding, GQA, a response start per row, with v."""
    mask = torch.ones(2, 48, dtype=torch.bool)
    mask[1, :11] = False
    q, k, v = random_qkv(2, 4, 2, 48, dim, device=DEVICE, seed=dim + v_dim, with_v=True, v_dim=v_dim)
    metrics = _check(backend, q, k, v, attention_mask=mask.to(DEVICE),
                     response_start=torch.tensor([9, 30], device=DEVICE), horizon=(2, 20), window=5)
    assert bool((metrics.out[1, :11] == 0).all()), "out must be 0 on padding rows"


@pytest.mark.parametrize("backend", BACKENDS)
def test_mla_packed(backend):
    """DeepSeek MLA shape (D = 192, Dv = 128) on a packed batch, H_hi = None."""
    cu = torch.tensor([0, 23, 70], device=DEVICE)
    q, k, v = random_qkv(1, 4, 4, 70, 192, device=DEVICE, seed=5, with_v=True, v_dim=128)
    _check(backend, q, k, v, cu_seqlens=cu, response_start=torch.tensor([5, 40], device=DEVICE), horizon=(1, None))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mla_low_precision(backend, dtype):
    q, k, v = random_qkv(1, 2, 1, 40, 192, dtype=dtype, device=DEVICE, seed=7, with_v=True, v_dim=128)
    _check(backend, q, k, v, horizon=(1, 30))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mla_layer_mechanisms(backend):
    """D = 192 / Dv = 128 with a sliding window and a softcap (each mechanism's own code path in the kernels)."""
    q, k, v = random_qkv(1, 2, 1, 60, 192, device=DEVICE, seed=8, with_v=True, v_dim=128)
    _check(backend, q, k, v, horizon=(1, None), layer=rhythm.LayerAttention(sliding_window=13, softcap=20.0))


def test_triton_refuses_wider_than_256():
    q, k, v = random_qkv(1, 1, 1, 8, 64, device=DEVICE, with_v=True, v_dim=264)
    with pytest.raises(ValueError, match="v: head dim 264"):
        rhythm.attention_metrics(q, k, v, backend="triton")
