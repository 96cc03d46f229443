"""Capture from real transformers models: the metrics recorded inside the forward match eager attention maps
(``output_attentions=True``) read through the naive formulas, on tiny seeded Llama / Qwen2 / Qwen3 models
with left padding, right padding and packed rows; nothing stays registered; unsupported models raise.
Windows, chunks, softcapping and sinks per architecture: tests/test_capture_models.py.

The helpers here (tiny models, eager maps, metrics from maps) are shared with tests/test_scorer.py."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from rhythm.capture.recording import (Capture, CaptureRequest, SequenceParallel, UnsupportedModelError, _Pass,  # noqa: E402
                                      is_registered)
from tests.oracle_check import assert_within_spec7, brute_force_count, brute_force_layout  # noqa: E402

WINDOW, HORIZON = 10, (10, 100)
VOCAB = 128


# ---- shared helpers -------------------------------------------------------------------------------------------

def tiny_model(kind: str = "llama", *, layers: int = 6, heads: int = 4, kv_heads: int = 2, seed: int = 0, **extra):
    """A seeded random causal LM from a config object (no hub). initializer_range 0.3 gives peaked attention."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                  initializer_range=0.3)
    if kind == "llama":
        config = transformers.LlamaConfig(**common, **extra)
        cls = transformers.LlamaForCausalLM
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**common, **extra)
        cls = transformers.Qwen2ForCausalLM
    elif kind == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=16, **extra)
        cls = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(kind)
    config._attn_implementation = "sdpa"
    return cls(config).eval()


def eager_attentions(model, input_ids, attention_mask=None, position_ids=None):
    """The paper's way: eager attention with output_attentions=True -> tuple of [B, H, T, T] maps."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        output_attentions=True, use_cache=False)
    finally:
        model.config._attn_implementation = previous
    return out.attentions


def maps_metrics(attn: torch.Tensor, segments, window: int = WINDOW, horizon=HORIZON) -> dict[str, torch.Tensor]:
    """The definitions applied to materialised maps attn [B, H, T, T] (float64 sums), with |T(s)| counted by
    brute force (tests/oracle_check.py), not by the package's ``influence_counts``.

    segments: [(row, start, end, response_start)] (or anything with that ``host`` attribute).
    Returns distance, waad, fai float64 [B, H, T] and fai_valid bool [B, H, T] (0/False on padding)."""
    batch, heads, length, _ = attn.shape
    h_lo, h_hi = horizon
    out = {name: torch.zeros(batch, heads, length, dtype=torch.float64) for name in ("distance", "waad", "fai")}
    out["fai_valid"] = torch.zeros(batch, heads, length, dtype=torch.bool)
    for b, start, end, resp in getattr(segments, "host", segments):
        a = attn[b, :, start:end, start:end].double()
        t = torch.arange(end - start)
        lag = t[:, None] - t[None, :]
        a = torch.where(lag >= 0, a, 0.0)
        out["distance"][b, :, start:end] = (a * lag.clamp_min(0)).sum(-1)
        out["waad"][b, :, start:end] = (a * lag.clamp(0, window)).sum(-1)
        band = (lag >= h_lo) & ((t[:, None] + start) >= resp)
        if h_hi is not None:
            band &= lag <= h_hi
        column_sums = (a * band).sum(-2)
        for s in range(end - start):
            count = brute_force_count(start + s, end, resp, horizon)
            if count:
                out["fai"][b, :, start + s] = column_sums[:, s] / count
                out["fai_valid"][b, :, start + s] = True
    return out


assert_within_spec = assert_within_spec7   # section 7, elementwise; returns the worst absolute error


def padded_batch(kind: str, batch: int = 3, length: int = 48, seed: int = 1):
    """input_ids [B, T] and an int attention_mask with the padding ``kind`` ('left', 'right' or 'none')."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if kind == "left":
        for b, pad in enumerate([0, 9, 17][:batch]):
            mask[b, :pad] = 0
    elif kind == "right":
        for b, pad in enumerate([5, 0, 13][:batch]):
            if pad:
                mask[b, length - pad:] = 0
    return ids, mask


# ---- capture vs eager maps ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,horizon", [("llama", HORIZON), ("qwen2", HORIZON), ("llama", (2, 12))])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_capture_matches_eager_maps_padded(kind, horizon, padding):
    """(2, 12): a horizon whose H_hi cuts inside 48-token rows, so a capture ignoring H_hi fails."""
    model = tiny_model(kind)
    ids, mask = padded_batch(padding)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    segs = brute_force_layout(*ids.shape, mask)
    response_start = torch.tensor([s + (e - s) // 2 for _, s, e, _ in segs])
    segs = brute_force_layout(*ids.shape, mask, response_start)
    request = CaptureRequest(layers=(2, 4), attention_mask=mask.bool(), response_start=response_start,
                             window=WINDOW, horizon=horizon)
    with torch.inference_mode(), Capture(model) as capture:
        records = capture.run(request, input_ids=ids, attention_mask=mask, position_ids=position_ids).records
    maps = eager_attentions(model, ids, mask, position_ids)
    for layer in (2, 4):
        want = maps_metrics(maps[layer], segs, horizon=horizon)
        for name in ("distance", "waad", "fai"):
            assert_within_spec(name, getattr(records[layer], name), want[name], f" layer {layer}")
        assert torch.equal(records[layer].fai_valid, want["fai_valid"])
        real = mask.bool()[:, None, :].expand_as(records[layer].waad)
        assert torch.all(records[layer].waad[~real] == 0)


@pytest.mark.parametrize("source", ["position_ids", "cu_seq_lens_q"])
def test_capture_packed_boundaries_from_kwargs(source):
    """B = 1, attention_mask None: boundaries come from position_ids resets or verl's cu_seq_lens_q kwarg."""
    model = tiny_model("qwen3", kv_heads=1)
    lengths = [20, 31, 14]
    cu = torch.tensor([0, 20, 51, 65])
    ids = torch.randint(0, VOCAB, (1, 65), generator=torch.Generator().manual_seed(3))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    response_start = torch.tensor([12, 40, 60])
    request = CaptureRequest(layers=(3,), response_start=response_start)
    extra = {}
    if source == "cu_seq_lens_q":
        extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=31, max_length_k=31)
    with torch.inference_mode(), Capture(model) as capture:
        records = capture.run(request, input_ids=ids, position_ids=position_ids, **extra).records
    maps = eager_attentions(model, ids, None, position_ids)
    want = maps_metrics(maps[3], brute_force_layout(1, 65, None, response_start, cu))
    for name in ("distance", "waad", "fai"):
        assert_within_spec(name, getattr(records[3], name), want[name])


def test_capture_stops_after_last_sampled_layer():
    model = tiny_model("llama")
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: seen.append(i)) for i, layer in enumerate(model.model.layers)]
    head_calls = []
    hooks.append(model.lm_head.register_forward_pre_hook(lambda m, a: head_calls.append(1)))
    ids, mask = padded_batch("none", batch=2, length=16)
    try:
        with torch.inference_mode(), Capture(model) as capture:
            capture.run(CaptureRequest(layers=(1, 3)), input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    assert seen == [0, 1, 2, 3] and head_calls == []


# ---- registration hygiene --------------------------------------------------------------------------------------

def test_nothing_left_registered_or_switched():
    model = tiny_model("llama")
    before = model.config._attn_implementation
    with Capture(model) as capture:
        name = capture.name
        assert model.config._attn_implementation == name and is_registered(name)
        assert model.model.config._attn_implementation == name
    assert model.config._attn_implementation == before and not is_registered(name)
    # also when the forward fails inside the block
    with pytest.raises(ValueError):
        with Capture(model) as capture:
            name = capture.name
            capture.run(CaptureRequest(layers=(1,), attention_mask=torch.zeros(1, 4, dtype=torch.bool)),
                        input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert model.config._attn_implementation == before and not is_registered(name)
    assert not any(key.startswith("rhythm_capture") for key in
                   transformers.modeling_utils.AttentionInterface._global_mapping)


# ---- models the metrics cannot describe ------------------------------------------------------------------------

def test_attention_sinks_raise():
    """Sinks (``s_aux``) on an architecture that has none: the call disagrees with the model's description."""
    model = tiny_model("llama", layers=3)
    module = model.model.layers[1].self_attn
    q = torch.randn(1, 4, 8, 16)
    kv = torch.randn(1, 2, 8, 16)
    with Capture(model) as capture:
        capture._pass = _Pass(CaptureRequest(layers=(1,)))
        with pytest.raises(UnsupportedModelError, match="sinks"):
            capture._attention_forward(module, q, kv, kv, None, scaling=0.25, s_aux=torch.zeros(4))


class _BypassModel(torch.nn.Module):
    """A model with a transformers config whose attention never calls the AttentionInterface."""

    def __init__(self):
        super().__init__()
        self.config = transformers.LlamaConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=2,
                                               num_key_value_heads=2, intermediate_size=32, vocab_size=VOCAB)
        self.embed = torch.nn.Embedding(VOCAB, 16)

    def forward(self, input_ids, **kwargs):
        x = self.embed(input_ids)
        return torch.softmax(x @ x.transpose(-1, -2), -1) @ x


def test_model_bypassing_the_interface_raises():
    model = _BypassModel()
    with Capture(model) as capture, pytest.raises(UnsupportedModelError, match="AttentionInterface"):
        capture.run(CaptureRequest(layers=(1,)), input_ids=torch.zeros(1, 5, dtype=torch.long))
    assert not is_registered(capture.name)


def test_mixed_dtypes_under_autocast_follow_sdpa():
    """accelerate's bf16=True on fp32 weights: RoPE leaves q/k in fp32 and v in bf16. The capture must
    compute in the autocast dtype instead of refusing the mixed inputs."""
    from rhythm.capture.recording import _common_dtype

    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {t.dtype for t in _common_dtype(q, k, v)} == {torch.bfloat16}
    assert {t.dtype for t in _common_dtype(q, k, v)} == {torch.float32}


def test_layout_is_read_once_per_pass(monkeypatch):
    """Reading the padding mask syncs with the host: the capture builds the layout at the first sampled
    layer and hands it to the others (docs/definitions.md section 8: capture passes validate=False to avoid host syncs)."""
    import rhythm.capture.recording as capture_module

    calls = []
    real = capture_module.segments_from_mask
    monkeypatch.setattr(capture_module, "segments_from_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_model("llama")
    ids, mask = padded_batch("left")
    request = CaptureRequest(layers=(1, 2, 4), attention_mask=mask.bool(), response_start=None)
    with torch.no_grad(), Capture(model) as capture:
        for _ in range(2):
            records = capture.run(request, input_ids=ids, attention_mask=mask,
                                  position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).records
            assert sorted(records) == [1, 2, 4]
    assert len(calls) == 2, "one layout per forward, shared by the three sampled layers"


# ---- the request / result API and the observe hook ----------------------------------------------------------------

def test_request_is_frozen_and_each_run_returns_its_own_result():
    """A CaptureRequest is checked once and never written to; two runs of it give two results (the first's
    records are not cleared by the second), and the forward's output comes back in the result."""
    import dataclasses

    model = tiny_model("llama")
    ids, mask = padded_batch("left")
    request = CaptureRequest(layers=(4, 2), attention_mask=mask.bool(), stop_after_last=False)
    assert request.layers == (2, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.window = 3
    with pytest.raises(ValueError, match="metrics_only"):
        CaptureRequest(layers=(1,), metrics_only=True)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    with torch.no_grad(), Capture(model) as capture:
        first = capture.run(request, **inputs)
        second = capture.run(request, **inputs)
        with pytest.raises(TypeError, match="CaptureRequest"):
            capture.run({"layers": (1,)}, **inputs)
    assert first.records is not second.records and sorted(first.records) == sorted(second.records) == [2, 4]
    for layer in (2, 4):
        assert torch.equal(first.records[layer].waad, second.records[layer].waad)
        assert first.records[layer].out is None
    with torch.no_grad():
        want = model(**inputs, use_cache=False).logits
    real = mask.bool()
    assert (first.output.logits[real] - want[real]).abs().max() < 1e-4


def test_observe_sees_the_sampled_layers_query_and_key():
    """The public observe hook gets each sampled layer once per pass, with the post-RoPE q and unrepeated k the
    metrics use: softmax(scale q k^T) under the causal mask built from them is the model's own eager map."""
    model = tiny_model("llama")
    ids, _ = padded_batch("none", batch=2, length=20)
    seen = []
    with torch.no_grad(), Capture(model, observe=seen.append) as capture:
        capture.run(CaptureRequest(layers=(1, 3)), input_ids=ids)
    assert [s.layer for s in seen] == [1, 3]
    maps = eager_attentions(model, ids)
    for s in seen:
        assert s.query.shape == (2, 4, 20, 16) and s.key.shape == s.value.shape == (2, 2, 20, 16)
        assert s.scale == 16 ** -0.5 and s.segments.shape == (2, 20) and s.attention.sliding_window is None
        k = s.key.repeat_interleave(2, dim=1).double()
        logits = s.scale * s.query.double() @ k.transpose(-1, -2)
        logits = logits.masked_fill(~torch.ones(20, 20, dtype=torch.bool).tril(), float("-inf"))
        assert (torch.softmax(logits, -1) - maps[s.layer].double()).abs().max() < 1e-5


class _OneRankExchange(SequenceParallel):
    """A sequence-parallel exchange of a group of one rank: every position and every head is already local."""

    def gather(self, query, key, value):
        return query, key, value

    def scatter(self, out):
        return out

    def gather_heads(self, x):
        return x

    def gather_positions(self, position_ids):
        return position_ids


def test_sequence_parallel_path_matches_eager_and_refuses_hybrids():
    """The sequence-parallel route (every layer's attention through the exchange; here a one-rank group) gives
    the eager maps' metrics on a packed row; a hybrid is refused there by name, since the exchange never reaches
    its DeltaNet layers (each would see only its rank's positions)."""
    from rhythm_kernels.segments import segments_from_cu_seqlens
    from tests.tiny_architectures import tiny_architecture

    exchange = _OneRankExchange()
    cu = torch.tensor([0, 20, 51])
    ids = torch.randint(0, VOCAB, (1, 51), generator=torch.Generator().manual_seed(4))
    position_ids = torch.cat([torch.arange(20), torch.arange(31)])[None]
    response_start = torch.tensor([12, 40])
    layout = segments_from_cu_seqlens(cu, 1, 51, response_start, "cpu")
    model = tiny_model("llama")
    request = CaptureRequest(layers=(3,), segments=layout, sequence_parallel=exchange)
    with torch.inference_mode(), Capture(model) as capture:
        records = capture.run(request, input_ids=ids, position_ids=position_ids).records
    want = maps_metrics(eager_attentions(model, ids, None, position_ids)[3],
                        brute_force_layout(1, 51, None, response_start, cu))
    for name in ("distance", "waad", "fai"):
        assert_within_spec(name, getattr(records[3], name), want[name])
    hybrid = tiny_architecture("qwen3_next", VOCAB)
    request = CaptureRequest(layers=(3,), segments=layout, sequence_parallel=exchange)
    with pytest.raises(UnsupportedModelError, match="'qwen3_next': sequence parallelism is refused: its "
                                                    r"\['linear_attention'\] layers"):
        with torch.inference_mode(), Capture(hybrid) as capture:
            capture.run(request, input_ids=ids, position_ids=position_ids)
