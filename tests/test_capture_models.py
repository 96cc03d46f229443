"""The capture on tiny random models of every architecture it describes, against each model's own eager attention.

For Llama, Qwen3 (windows above max_window_layers), Mistral (window on every layer), Gemma 2 (alternating
windows + logit softcapping), Gemma 3 (alternating windows), Qwen2-MoE (use_sliding_window with
max_window_layers: the window reaches attention only through the mask), GPT-OSS (alternating windows + sinks),
PhiMoE (window only through the mask) and Llama 4 (attention_chunk_size on the RoPE layers), and the issue-20
architectures (OLMo 2/3, Qwen3-MoE, the Qwen3-Next / Qwen3.5 hybrids, DeepSeek-V3 MLA, SmolLM3 NoPE layers, Phi-3
and GLM-4-MoE partial rotary, Granite's attention_multiplier, Cohere 2, EXAONE 4, Seed-OSS, Ministral 3's
per-position query scaling), with left padding, right padding and a packed row: the metrics the capture records must equal the ones read off the
model's eager maps (``output_attentions=True``) by the brute force below, within docs/definitions.md section 7,
with the torch backend, and with Triton (under the interpreter on CPU) for a subset.

Windows and chunks are 12 positions, rows 40-56 tokens and the FAI horizon (2, 12), so every mechanism and
H_hi cut. The oracle here shares no code with the project: the layout, |T(s)| and lse are computed from the
definitions (lse[t] = S'[t, s*] - log A[t, s*] at the row's largest probability, S' the model's logits).
"""
from __future__ import annotations

import functools
import itertools
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from rhythm.capture.recording import Capture, CaptureRequest, UnsupportedModelError, _Pass  # noqa: E402
from tests.oracle_check import assert_within_spec7  # noqa: E402
from tests.tiny_architectures import HYBRIDS, NEW_KINDS, SPAN, new_architecture_config  # noqa: E402

VOCAB = 128
# SPAN (tests/tiny_architectures.py): sliding window / attention chunk of every tiny model
WAAD_WINDOW, HORIZON = 6, (2, 12)
SAMPLED = (1, 2)          # one layer of each type in the alternating models; layer 0 (windowed) and 3 are not sampled
LENGTH = 56
# GPT-OSS builds its masks without position_ids (transformers 5.x): its own attention runs across the boundaries
# of a packed row, so a packed layout disagrees with the model and must be refused.
MODEL_ATTENDS_ACROSS_PACKED_SEQUENCES = {("gpt_oss", "packed")}
# Hybrids (HYBRIDS): transformers' torch path of their gated-DeltaNet layers ignores packed boundaries -> refused.
KINDS = ["llama", "qwen3", "mistral", "gemma2", "gemma3", "qwen2_moe", "gpt_oss", "phimoe", "llama4"]
HYBRID_SAMPLED = (1, 3)   # the hybrids' softmax-attention layers are 1, 3, 5 (full_attention_interval=2)


def sampled(kind: str) -> tuple[int, ...]:
    return HYBRID_SAMPLED if kind in HYBRIDS else SAMPLED


# ---- nine tiny architectures ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def tiny_model(kind: str):
    """A seeded random 4-layer causal LM (hidden 32, 4 query heads over 2 KV heads) in the model's default
    attention implementation (sdpa, or eager where the architecture has no sdpa support)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3)
    moe = dict(num_local_experts=4, num_experts_per_tok=2)
    if kind == "llama":
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif kind == "qwen2":   # layers >= max_window_layers slide: 2, 3
        config = transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=SPAN, max_window_layers=2)
        cls = transformers.Qwen2ForCausalLM
    elif kind == "qwen3":   # layers >= max_window_layers slide: 2, 3
        config = transformers.Qwen3Config(**common, head_dim=8, use_sliding_window=True, sliding_window=SPAN,
                                          max_window_layers=2)
        cls = transformers.Qwen3ForCausalLM
    elif kind == "mistral":
        config, cls = transformers.MistralConfig(**common, sliding_window=SPAN), transformers.MistralForCausalLM
    elif kind == "gemma2":  # sliding on even layers; softcap small enough to bite; scale 16**-0.5 != head_dim**-0.5
        config = transformers.Gemma2Config(**common, head_dim=8, sliding_window=SPAN, attn_logit_softcapping=2.0,
                                           query_pre_attn_scalar=16)
        cls = transformers.Gemma2ForCausalLM
    elif kind == "gemma3":
        config = transformers.Gemma3TextConfig(**common, head_dim=8, sliding_window=SPAN, sliding_window_pattern=2,
                                               query_pre_attn_scalar=16)
        cls = transformers.Gemma3ForCausalLM
    elif kind == "qwen2_moe":  # sliding on even layers below max_window_layers: 0, 2
        config = transformers.Qwen2MoeConfig(**common, use_sliding_window=True, sliding_window=SPAN,
                                             max_window_layers=3, num_experts=4, num_experts_per_tok=2,
                                             moe_intermediate_size=32, shared_expert_intermediate_size=32)
        cls = transformers.Qwen2MoeForCausalLM
    elif kind == "gpt_oss":
        config = transformers.GptOssConfig(**common, **moe, head_dim=8, sliding_window=SPAN,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        cls = transformers.GptOssForCausalLM
    elif kind == "phimoe":
        config, cls = transformers.PhimoeConfig(**common, **moe, sliding_window=SPAN), transformers.PhimoeForCausalLM
    elif kind == "llama4":  # no_rope_layers [1, 0, 1, 0]: the RoPE layers 0 and 2 are chunked
        config = transformers.Llama4TextConfig(**common, head_dim=8, attention_chunk_size=SPAN,
                                               no_rope_layer_interval=2, num_local_experts=2, num_experts_per_tok=1,
                                               intermediate_size_mlp=64, interleave_moe_layer_step=2)
        cls = transformers.Llama4ForCausalLM
    elif kind in NEW_KINDS:
        config, cls = new_architecture_config(kind, **common)
    else:
        raise ValueError(kind)
    config._attn_implementation = "sdpa" if getattr(cls, "_supports_sdpa", True) else "eager"
    model = cls(config).eval()
    if kind == "gpt_oss":
        with torch.no_grad():  # sinks of the size of the logits, so that they take a visible share of each row
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, config.num_attention_heads))
    return model


# ---- batch layouts, brute force -----------------------------------------------------------------------------------

def batch(layout: str, seed: int = 1):
    """(model inputs, CaptureRequest kwargs, segments) for 'left' / 'right' padding (B = 3) or 'packed' (B = 1).

    segments: list of (row, start, end, response_start), absolute on the T axis."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "packed":
        lengths = [20, 23, 13]
        ids = torch.randint(0, VOCAB, (1, LENGTH), generator=gen)
        position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
        bounds = [0] + list(itertools.accumulate(lengths))
        segments = [(0, s, e, s + (e - s) // 3) for s, e in zip(bounds[:-1], bounds[1:])]
        inputs = dict(input_ids=ids, position_ids=position_ids)
        context = dict(cu_seqlens=torch.tensor(bounds), response_start=torch.tensor([r for *_, r in segments]))
        return inputs, context, segments
    pads = {"left": [0, 9, 17], "right": [5, 0, 13]}[layout]
    ids = torch.randint(0, VOCAB, (3, LENGTH), generator=gen)
    mask = torch.ones(3, LENGTH, dtype=torch.long)
    segments = []
    for b, pad in enumerate(pads):
        start, end = (pad, LENGTH) if layout == "left" else (0, LENGTH - pad)
        mask[b, :start] = 0
        mask[b, end:] = 0
        segments.append((b, start, end, start + (end - start) // 3))
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    context = dict(attention_mask=mask.bool(), response_start=torch.tensor([r for *_, r in segments]))
    return inputs, context, segments


_eager_names = itertools.count()


def eager_run(model, inputs):
    """The model's own eager attention with output_attentions=True: {layer: (A [B, H, T, T], S' [B, H, T, T])}.

    A is the map the model returns; S' (the layer's logits after scaling and softcapping) is recomputed from the
    q/k the eager function received, so that lse can be read off the map."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    seen = {}

    def recording_eager(module, query, key, value, attention_mask, scaling=None, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        out, weights = eager(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1).double()
        logits = query.double() @ k.transpose(-1, -2) * scaling
        if kwargs.get("softcap") is not None:
            logits = kwargs["softcap"] * torch.tanh(logits / kwargs["softcap"])
        seen[module.layer_idx] = (weights, logits)
        return out, weights

    name = f"rhythm_test_eager_{next(_eager_names)}"
    AttentionInterface.register(name, recording_eager)
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping["eager"])
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")}
    saved = {key: c._attn_implementation for key, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        with torch.no_grad():
            out = model(**inputs, output_attentions=True, use_cache=False)
    finally:
        for key, c in configs.items():
            c._attn_implementation_internal = saved[key]
        AttentionInterface._global_mapping.pop(name)
        AttentionMaskInterface._global_mapping.pop(name)
    # output_attentions holds one map per softmax-attention layer, in layer order (a hybrid's other layers have none)
    assert len(out.attentions) == len(seen)
    for index, layer in enumerate(sorted(seen)):
        assert out.attentions[index] is seen[layer][0], "output_attentions returns the eager function's maps"
    return seen


def brute_force(attn: torch.Tensor, logits: torch.Tensor, segments, length: int) -> dict[str, torch.Tensor]:
    """docs/definitions.md section 2 read off a map attn [B, H, T, T] (probabilities, rows of real tokens), with
    every sum written out: distance, waad, lse, fai float64 [B, H, T] and fai_valid bool [B, H, T]."""
    heads = attn.shape[1]
    h_lo, h_hi = HORIZON
    out = {name: torch.zeros(attn.shape[0], heads, length, dtype=torch.float64) for name in ("distance", "waad", "lse", "fai")}
    out["fai_valid"] = torch.zeros(attn.shape[0], heads, length, dtype=torch.bool)
    for b, start, end, resp in segments:
        a = attn[b, :, start:end, start:end].double()
        s_logits = logits[b, :, start:end, start:end]
        n = end - start
        for t in range(n):
            lag = torch.tensor([t - s for s in range(t + 1)], dtype=torch.float64)
            row = a[:, t, : t + 1]
            out["distance"][b, :, start + t] = (row * lag).sum(-1)
            out["waad"][b, :, start + t] = (row * lag.clamp(max=WAAD_WINDOW)).sum(-1)
            best = row.argmax(-1)  # the row's largest probability: S'[t, s*] - log A[t, s*] = lse[t]
            heads_idx = torch.arange(heads)
            out["lse"][b, :, start + t] = s_logits[heads_idx, t, best] - torch.log(row[heads_idx, best])
        for s in range(n):
            rows = [t for t in range(n) if t + start >= resp and s + h_lo <= t <= s + h_hi]
            if rows:
                out["fai"][b, :, start + s] = a[:, rows, s].sum(-1) / len(rows)
                out["fai_valid"][b, :, start + s] = True
    return out


def real_positions(segments, batch_size: int) -> torch.Tensor:
    real = torch.zeros(batch_size, LENGTH, dtype=torch.bool)
    for b, start, end, _ in segments:
        real[b, start:end] = True
    return real


def capture(model, inputs, context_kwargs, backend="torch", stop_after_last=True, layers=SAMPLED):
    request = CaptureRequest(layers=layers, window=WAAD_WINDOW, horizon=HORIZON, backend=backend,
                             stop_after_last=stop_after_last, **context_kwargs)
    with torch.no_grad(), Capture(model) as cap:
        result = cap.run(request, **inputs)
    return result.records, result


def check_against_eager(kind, layout, backend):
    model = tiny_model(kind)
    inputs, context_kwargs, segments = batch(layout)
    if (kind, layout) in MODEL_ATTENDS_ACROSS_PACKED_SEQUENCES:
        with pytest.raises(UnsupportedModelError, match=r"mask .* differs"):
            capture(model, inputs, context_kwargs, backend=backend)
        attn, _ = eager_run(model, inputs)[SAMPLED[0]]
        _, start, end, _ = segments[1]
        assert attn[0, :, start:end, :start].sum().item() > 0.1, "the model's own attention crosses the packed boundary"
        return
    if kind in HYBRIDS and layout == "packed":
        with pytest.raises(UnsupportedModelError, match="packed rows are refused.*linear_attention"):
            capture(model, inputs, context_kwargs, backend=backend, layers=sampled(kind))
        return
    records, _ = capture(model, inputs, context_kwargs, backend=backend, layers=sampled(kind))
    maps = eager_run(model, inputs)
    real = real_positions(segments, inputs["input_ids"].shape[0])[:, None, :].expand(-1, 4, -1)
    for layer in sampled(kind):
        attn, logits = maps[layer]
        want = brute_force(attn, logits, segments, LENGTH)
        for name in ("distance", "waad", "lse", "fai"):
            got = getattr(records[layer], name)
            assert_within_spec7(name, got[real], want[name][real], f" ({kind}, {layout}, layer {layer})")
            assert bool((got[~real] == 0).all()), f"{name} is not 0 on padding"
        assert torch.equal(records[layer].fai_valid, want["fai_valid"])


# ---- capture vs eager maps ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, layout", list(itertools.product(KINDS + NEW_KINDS, ["left", "right", "packed"])) +
                         [("qwen2", "left")])
def test_capture_matches_eager_maps(kind, layout):
    check_against_eager(kind, layout, "torch")


@pytest.mark.parametrize("kind, layout", [("gemma2", "left"), ("gpt_oss", "left"), ("llama4", "right"),
                                          ("qwen2_moe", "packed"), ("olmo3", "packed"), ("qwen3_5", "left"),
                                          ("ministral3", "right"), ("deepseek_v3", "left")])
def test_capture_matches_eager_maps_triton(kind, layout):
    """The Triton kernels (under the interpreter on CPU) on softcap + window, sinks + window, chunks, and a
    mask-only window on a packed row."""
    check_against_eager(kind, layout, "triton")


def test_mechanisms_bite():
    """The sizes above make every mechanism matter: windows/chunks hide keys that plain causal attention would
    see, the softcap changes logits, the sinks take a share of every row."""
    _, _, segments = batch("left")
    for kind, layer in [("qwen3", 2), ("mistral", 1), ("gemma2", 2), ("gemma3", 2), ("qwen2_moe", 2),
                        ("gpt_oss", 2), ("phimoe", 1), ("llama4", 2), ("olmo3", 1), ("qwen3_moe", 2), ("smollm3", 1),
                        ("phi3", 2), ("cohere2", 2), ("exaone4", 2), ("ministral3", 1)]:
        inputs, _, segments = batch("left")
        attn, logits = eager_run(tiny_model(kind), inputs)[layer]
        b, start, end, _ = segments[0]
        hidden = attn[b, :, start + SPAN:end, start].abs().max().item()
        assert hidden == 0, f"{kind} layer {layer}: key 0 should be outside every later window/chunk"
    attn, logits = eager_run(tiny_model("gemma2"), batch("left")[0])[1]
    assert logits.abs().max().item() > 1.5, "gemma2: logits should reach the softcap (2.0)"
    attn, _ = eager_run(tiny_model("gpt_oss"), batch("left")[0])[1]
    assert (1 - attn[0].sum(-1)).max().item() > 0.1, "gpt_oss: the sinks should take a share of the rows"


def test_scaling_and_rotary_variants_bite():
    """The tiny configs exercise what happens before or inside the call (the eager-map comparison above is what
    proves the capture honours it): a scaling other than head_dim**-0.5, query scaling that grows along the
    row, rotary on part of each head only, NoPE layers among the sampled ones."""
    attn = lambda kind, layer: tiny_model(kind).model.layers[layer].self_attn  # noqa: E731
    assert attn("granite", 1).scaling == 0.6 and 8 ** -0.5 < 0.36
    assert attn("deepseek_v3", 1).scaling > 1.05 * 12 ** -0.5, "YaRN mscale should scale the logits"
    from transformers.models.ministral3.modeling_ministral3 import get_llama_4_attn_scale
    rope = tiny_model("ministral3").config.rope_parameters
    scale = get_llama_4_attn_scale(torch.arange(LENGTH)[None], rope["llama_4_scaling_beta"],
                                   rope["original_max_position_embeddings"])
    assert scale[0, 0, 0, 0] == 1 and scale[0, 0, -1, 0] > 1.9
    for kind, head_dim in [("phi3", 8), ("glm4_moe", 8), ("qwen3_next", 8), ("qwen3_5", 8)]:
        rotated = 2 * tiny_model(kind).model.rotary_emb.inv_freq.numel()
        assert rotated < head_dim, f"{kind}: rotary on {rotated} of {head_dim} dims"
    assert not attn("smollm3", 1).use_rope and attn("smollm3", 2).use_rope       # sampled: a NoPE and a RoPE layer
    assert attn("cohere2", 1).sliding_window is None and not attn("exaone4", 1).is_sliding   # NoPE, full


@pytest.mark.parametrize("kind", KINDS + NEW_KINDS)
def test_full_forward_matches_the_model(kind):
    """Non-sampled layers keep their own windowed/chunked masks (the capture registers sdpa's or eager's mask
    function under its name) and softcap/sinks (eager delegate): the full forward's logits equal the model's."""
    model = tiny_model(kind)
    inputs, context_kwargs, segments = batch("left")
    _, result = capture(model, inputs, context_kwargs, stop_after_last=False, layers=sampled(kind))
    with torch.no_grad():
        want = model(**inputs, use_cache=False).logits
    real = real_positions(segments, 3)
    got = result.output.logits
    err = (got[real] - want[real]).abs().max().item()
    assert err <= 1e-4 * (1 + want[real].abs().max().item()), f"{kind}: logits differ by {err:.3g}"


# ---- what the capture refuses ------------------------------------------------------------------------------------

def _small(cls_config, cls_model, **extra):
    torch.manual_seed(0)
    config = cls_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, **extra)
    return cls_model(config).eval()


def _run(model, layers=(1,), length=16, **inputs):
    inputs.setdefault("input_ids", torch.zeros(1, length, dtype=torch.long))
    with torch.no_grad(), Capture(model) as cap:
        return cap.run(CaptureRequest(layers=layers, backend="torch"), **inputs).records


def test_unknown_architecture_is_refused_before_any_forward():
    """BLOOM (ALiBi: a position bias added to the logits) is not taught."""
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=3,
                                                                    n_head=4)).eval()
    calls = []
    model.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(UnsupportedModelError, match="'bloom'.*not one the capture was taught"):
        _run(model)
    assert calls == []


def test_multimodal_wrapper_is_refused_and_plain_wrapper_is_not():
    """Every sub-configuration must be a taught architecture (a vision tower or a multimodal mask is not); a
    wrapper without a config of its own (DDP-like) is described by the model it wraps."""
    config = transformers.Llama4Config(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_local_experts=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
                           projector_output_dim=32))
    multimodal = transformers.Llama4ForConditionalGeneration(config).eval()
    with pytest.raises(UnsupportedModelError, match="'llama4'.*not one the capture was taught"):
        Capture(multimodal).__enter__()

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **inputs):
            return self.module(**inputs)

    model = tiny_model("mistral")
    inputs, context_kwargs, _ = batch("left")
    request = CaptureRequest(layers=SAMPLED, window=WAAD_WINDOW, horizon=HORIZON, backend="torch", **context_kwargs)
    with torch.no_grad(), Capture(Wrapper(model)) as cap:
        wrapped = cap.run(request, **inputs).records
    direct, _ = capture(model, inputs, context_kwargs)
    for layer in SAMPLED:
        assert torch.equal(wrapped[layer].waad, direct[layer].waad)


def test_bidirectional_attention_is_refused():
    model = _small(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, head_dim=8,
                   use_bidirectional_attention=True)
    with pytest.raises(UnsupportedModelError, match="non-causal"):
        _run(model)


def test_configured_softcap_the_model_does_not_apply_is_refused():
    """Gemma 3's attention call does not pass attn_logit_softcapping: config and code disagree -> refuse."""
    model = _small(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, head_dim=8,
                   attn_logit_softcapping=20.0)
    with pytest.raises(UnsupportedModelError, match="attn_logit_softcapping"):
        _run(model)


@pytest.mark.parametrize("pattern", ["window", "alibi", "leaky"])
def test_custom_mask_is_refused(pattern):
    """A 4-D mask the model takes as given: a window of 4 the config knows nothing about (bool), an ALiBi-like
    additive position bias (float: -0.5 * (t - s) on visible keys), or future keys only down-weighted (-5
    instead of -inf: they leak into the softmax)."""
    model = tiny_model("llama")
    length = 16
    t = torch.arange(length)
    causal = t[:, None] >= t[None, :]
    if pattern == "window":
        mask = (causal & (t[:, None] - t[None, :] < 4))[None, None]
    elif pattern == "alibi":
        mask = torch.where(causal, -0.5 * (t[:, None] - t[None, :]).float(), float("-inf"))[None, None]
    else:
        mask = torch.where(causal, 0.0, -5.0)[None, None]
    with pytest.raises(UnsupportedModelError, match="mask .* differs"):
        _run(model, layers=SAMPLED, length=length, attention_mask=mask)


def test_plain_additive_masks_are_accepted():
    """An additive 4-D mask that is exactly 0 / -1e9 (a common hand-built causal mask) is plain causal attention."""
    model = tiny_model("llama")
    t = torch.arange(16)
    mask = torch.where(t[:, None] >= t[None, :], 0.0, -1e9)[None, None]
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    records = _run(model, layers=SAMPLED, input_ids=ids, attention_mask=mask)
    plain = _run(model, layers=SAMPLED, input_ids=ids)
    for layer in SAMPLED:
        torch.testing.assert_close(records[layer].waad, plain[layer].waad, atol=1e-6, rtol=0)


def test_call_keywords_are_cross_checked():
    model = tiny_model("mistral")
    module = model.model.layers[1].self_attn
    q, kv = torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 8)
    with Capture(model) as cap:
        cap._pass = _Pass(CaptureRequest(layers=(1,)))
        with pytest.raises(UnsupportedModelError, match="sliding_window=5"):
            cap._attention_forward(module, q, kv, kv, None, scaling=module.scaling, sliding_window=5)
        with pytest.raises(UnsupportedModelError, match="position_bias"):
            cap._attention_forward(module, q, kv, kv, None, scaling=module.scaling, sliding_window=SPAN,
                                   position_bias=torch.zeros(1, 4, 8, 8))
        with pytest.raises(UnsupportedModelError, match="scaling"):
            cap._attention_forward(module, q, kv, kv, None, scaling=1.0, sliding_window=SPAN)
        with pytest.raises(UnsupportedModelError, match="sinks"):
            cap._attention_forward(module, q, kv, kv, None, scaling=module.scaling, sliding_window=SPAN,
                                   s_aux=torch.zeros(4))
