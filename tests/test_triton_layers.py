"""The Triton backend with a per-layer description (sliding window, chunks, softcap, sinks; issue 10) against
the brute-force oracle of tests/oracle_check.py and the reference backend, under the interpreter without
CUDA. Windows and chunks smaller and larger than the 32-wide interpreter blocks, GQA, left/right padding and
packed batches, fp32 at docs/definitions.md section 7 and bf16 with its low-precision rule."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RHYTHM_TRITON_AUTOTUNE", "0")

import rhythm  # noqa: E402
from rhythm import LayerAttention  # noqa: E402
from tests.oracle_check import assert_matches_oracle, assert_within_spec7, random_qkv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LENGTH = 110


def run(q, k, v=None, **kwargs):
    return rhythm.attention_metrics(q, k, v, backend="triton", **kwargs)


def layout(kind):
    """Batch size and layout kwargs over LENGTH positions."""
    if kind == "left":
        mask = torch.ones(2, LENGTH, dtype=torch.bool)
        mask[1, :37] = False
        return 2, dict(attention_mask=mask.to(DEVICE), response_start=torch.tensor([20, 60], device=DEVICE))
    if kind == "right":
        mask = torch.ones(2, LENGTH, dtype=torch.bool)
        mask[0, 71:] = False
        return 2, dict(attention_mask=mask.to(DEVICE), response_start=torch.tensor([10, 0], device=DEVICE))
    cu = torch.tensor([0, 45, 46, LENGTH], device=DEVICE)          # packed, with a one-token segment
    return 1, dict(cu_seqlens=cu, response_start=torch.tensor([5, 46, 70], device=DEVICE))


SINKS = [1.0, -2.0, 0.5, 4.0]
CASES = [   # (layer fields, layout, horizon): each window / chunk once smaller and once larger than a block
    (dict(sliding_window=5), "left", (0, None)),
    (dict(sliding_window=48), "packed", (10, 100)),
    (dict(chunk_size=24), "right", (2, None)),
    (dict(chunk_size=40, sliding_window=20), "packed", (0, 30)),
    (dict(softcap=4.0), "left", (10, None)),
    (dict(sinks=SINKS), "right", (10, 100)),
    (dict(sliding_window=12, chunk_size=33, softcap=3.0, sinks=SINKS), "left", (0, 8)),
]


def make_layer(fields):
    fields = dict(fields)
    if "sinks" in fields:
        fields["sinks"] = torch.tensor(fields["sinks"], device=DEVICE)
    return LayerAttention(**fields)


@pytest.mark.parametrize("fields,kind,horizon", CASES, ids=lambda x: str(x).replace(" ", ""))
def test_mechanisms_match_oracle(fields, kind, horizon):
    batch, kwargs = layout(kind)
    q, k, v = random_qkv(batch, 4, 2, LENGTH, 32, device=DEVICE, seed=len(str(fields)), with_v=True)
    kwargs.update(layer=make_layer(fields), horizon=horizon, window=10)
    metrics = run(q, k, v, **kwargs)
    assert_matches_oracle(metrics, q, k, v, **kwargs)


def test_bf16_all_mechanisms():
    batch, kwargs = layout("packed")
    q, k, v = random_qkv(batch, 4, 1, LENGTH, 64, dtype=torch.bfloat16, device=DEVICE, seed=7, with_v=True)
    kwargs.update(layer=make_layer(CASES[-1][0]), horizon=(0, 20))
    assert_matches_oracle(run(q, k, v, **kwargs), q, k, v, **kwargs)


def test_matches_reference_backend():
    batch, kwargs = layout("left")
    q, k, _ = random_qkv(batch, 4, 2, LENGTH, 16, device=DEVICE, seed=11)
    kwargs.update(layer=make_layer(dict(sliding_window=30, softcap=6.0, sinks=SINKS)), horizon=(10, None))
    ours, ref = run(q, k, **kwargs), rhythm.attention_metrics(q, k, backend="reference", **kwargs)   # fp64 inside
    for name in ("lse", "distance", "waad", "fai"):
        assert_within_spec7(name, getattr(ours, name), getattr(ref, name), " (triton vs reference)")


def test_plain_and_covering_descriptions_are_plain_causal():
    """LayerAttention() and a window / chunk covering the whole segment run the plain kernels: bitwise equal."""
    q, k, v = random_qkv(1, 2, 1, 70, 16, device=DEVICE, seed=2, with_v=True)
    plain = run(q, k, v)
    for layer in (LayerAttention(), LayerAttention(sliding_window=70, chunk_size=70)):
        same = run(q, k, v, layer=layer)
        for name in ("lse", "distance", "waad", "fai", "out"):
            assert torch.equal(getattr(plain, name), getattr(same, name)), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts the interpreter's dot products")
def test_window_skips_invisible_keys(monkeypatch):
    """With a window w the stats pass scores about T * (w + BLOCK) keys and the influence pass about
    T * (w + BLOCK) rows, not T^2 / 2: count the [32 x 32] q.k tiles the interpreter multiplies."""
    from triton.runtime import interpreter

    tiles = []
    original = interpreter.InterpreterBuilder.create_dot

    def counting(self, a, b, d, *args):
        tiles.append(1)
        return original(self, a, b, d, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting)
    length, window = 512, 32
    q, k, _ = random_qkv(1, 1, 1, length, 16, device=DEVICE, seed=1)
    layer = LayerAttention(sliding_window=window)
    windowed = run(q, k, layer=layer, horizon=(0, None))
    used = len(tiles)
    tiles.clear()
    run(q, k, horizon=(0, None))
    full = len(tiles)
    monkeypatch.undo()
    blocks = length // 32
    # stats: <= 3 key tiles per query block (w - 1 back plus the diagonal tile); influence: <= 3 row tiles
    assert used <= 2 * 3 * blocks < full / 2, (used, full)
    assert_matches_oracle(windowed, q, k, layer=layer, horizon=(0, None))
