"""What a transformers decoder layer's attention really computes, read from the model and checked at the call.

The capture must compute the metrics on the attention probabilities the layer really uses. Each architecture
decides its layers' attention in its own modeling code (a window on every layer, on layers typed
``sliding_attention``, chunks on layers typed ``chunked_attention``, softcapped logits, sink logits), and some
of it reaches the attention function only through the 4-D mask. So the description is built from the
model's configuration by rules written per architecture (:data:`ARCHITECTURES`, an allow-list), and then
cross-checked three ways before any number is kept:

1. :func:`describe_layer` reads ``config.layer_types``, ``sliding_window`` (with ``use_sliding_window`` /
   ``max_window_layers`` already folded into ``layer_types`` by the config), ``attention_chunk_size``,
   ``attn_logit_softcapping`` and the module's ``sinks`` -> :class:`LayerAttention`.
2. :func:`check_call` compares it with what the module passes to the attention function (``sliding_window``,
   ``softcap``, ``s_aux``, ``scaling``) and refuses any keyword it does not understand.
3. :func:`mask_disagreement` compares the 4-D mask the model built for the layer with the visibility the
   description implies on the batch layout (window, chunk, padding, packed segments), on device; the capture
   checks the flags once at the end of the pass.

Hybrid architectures (Qwen3-Next, Qwen3.5) interleave softmax-attention layers with layers of another kind
(gated DeltaNet, typed ``linear_attention``) that never call the attention function: :func:`attention_layers`
names the softmax-attention layers, the only ones the scorer may sample (docs/definitions.md section 3).

Scaling and rotary variants need no rule here: a multiplier instead of 1/sqrt(D) (Granite), YaRN's mscale
(DeepSeek-V3) arrive as the call's ``scaling``; partial rotary, NoPE layers and per-position query scaling
(Ministral 3) are applied to q and k before the call, so the metrics see them already.

Anything else raises :class:`UnsupportedModelError` naming the mechanism and the model type.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rhythm_kernels.layer_attention import LayerAttention
from rhythm_kernels.segments import Segments, is_integer


class UnsupportedModelError(RuntimeError):
    """The model's attention on a sampled layer is something the metrics cannot describe exactly."""


FULL, SLIDING, CHUNKED = "full_attention", "sliding_attention", "chunked_attention"


@dataclass(frozen=True)
class Architecture:
    """How one architecture's modeling code (transformers 5.x) decides a layer's attention.

    windows: "none" (no window anywhere), "every_layer" (``config.sliding_window`` on every layer, None = off:
        Mistral, PhiMoE) or "layer_types" (``config.sliding_window`` on layers typed ``sliding_attention``).
    window_kwarg: the module passes ``sliding_window=`` to the attention function (cross-checked); False where
        the window reaches attention only through the mask (Qwen2-MoE, PhiMoE).
    chunks: layers typed ``chunked_attention`` see only keys of their own chunk of
        ``config.attention_chunk_size`` positions, counted from the sequence's first token (Llama 4).
    softcap: ``config.attn_logit_softcapping`` is applied, passed as ``softcap=`` (Gemma 2). Where False, a
        configured softcap is refused (Gemma 3's modeling code does not apply it: config and code disagree).
    sinks: the module holds ``sinks`` [Hq], passed as ``s_aux=`` (GPT-OSS).
    other_layers: layer types (``config.layer_types``) that are not softmax attention and never reach the
        attention function (hybrids: ``linear_attention``, Qwen3-Next's and Qwen3.5's gated DeltaNet). They are
        never sampled.
    packed_rows: packed rows (several sequences in one row) are exact. False where the other layers carry
        their state across the packed boundaries (transformers' torch path of gated DeltaNet ignores
        ``position_ids`` resets and ``cu_seq_lens``), so a sequence's attention depends on its neighbours.
    """

    windows: str = "none"
    window_kwarg: bool = False
    chunks: bool = False
    softcap: bool = False
    sinks: bool = False
    other_layers: frozenset = frozenset()
    packed_rows: bool = True


_HYBRID = dict(other_layers=frozenset({"linear_attention"}), packed_rows=False)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(),
    "qwen2": Architecture(windows="layer_types", window_kwarg=True),
    "qwen3": Architecture(windows="layer_types", window_kwarg=True),
    "qwen2_moe": Architecture(windows="layer_types"),
    "mistral": Architecture(windows="every_layer", window_kwarg=True),
    "phimoe": Architecture(windows="every_layer"),
    "gemma2": Architecture(windows="layer_types", window_kwarg=True, softcap=True),
    "gemma3_text": Architecture(windows="layer_types", window_kwarg=True),
    "gpt_oss": Architecture(windows="layer_types", window_kwarg=True, sinks=True),
    "llama4_text": Architecture(chunks=True),
    # issue 20: the architectures RL users train in 2026 (transformers 5.24 modeling code read for each)
    "olmo2": Architecture(),
    "olmo3": Architecture(windows="layer_types", window_kwarg=True),
    "qwen3_moe": Architecture(windows="every_layer", window_kwarg=True),
    "qwen3_next": Architecture(**_HYBRID),
    "qwen3_5_text": Architecture(**_HYBRID),
    "deepseek_v3": Architecture(),          # MLA: q/k head dim qk_nope + qk_rope, v head dim v_head_dim
    "smollm3": Architecture(windows="layer_types", window_kwarg=True),
    "phi3": Architecture(windows="every_layer", window_kwarg=True),
    "glm4_moe": Architecture(),
    "granite": Architecture(),
    "cohere2": Architecture(windows="layer_types", window_kwarg=True),
    "exaone4": Architecture(windows="layer_types", window_kwarg=True),
    "seed_oss": Architecture(),
    "ministral3": Architecture(windows="every_layer", window_kwarg=True),
}

# Keywords an attention call may carry, and why each is safe. Anything else is refused: an unknown keyword
# may change the attention (a bias, a different mask) in a way the description does not know.
_CROSS_CHECKED = {"sliding_window", "softcap", "s_aux"}
_LAYOUT = {"position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}  # read for packing
_NO_EFFECT = {"use_cache", "output_attentions", "output_hidden_states", "output_router_logits",
              "num_items_in_batch", "return_dict"}
UNDERSTOOD_KWARGS = frozenset(_CROSS_CHECKED | _LAYOUT | _NO_EFFECT)


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def attention_layers(config) -> list[int] | None:
    """The 0-based indices of a hybrid model's softmax-attention layers: every layer whose
    ``config.layer_types`` entry is not one of its architecture's ``other_layers``.

    config: the model's (text) config. Returns None where every layer is softmax attention (and for a model
    type the capture was not taught: the capture refuses that model before any number anyway)."""
    arch = ARCHITECTURES.get(getattr(config, "model_type", None))
    layer_types = getattr(config, "layer_types", None)
    if arch is None or not arch.other_layers or layer_types is None:
        return None
    num_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    if len(layer_types) < num_layers:
        raise UnsupportedModelError(f"model type {config.model_type!r}: config.layer_types names "
                                    f"{len(layer_types)} layers for num_hidden_layers = {num_layers}")
    return [i for i in range(num_layers) if layer_types[i] not in arch.other_layers]


def check_layout(module: torch.nn.Module, segments: Segments) -> None:
    """Refuse packed rows on an architecture whose non-attention layers do not see the packed boundaries.

    module: a sampled layer's attention module (its ``config`` names the architecture)."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    rows = [span.row for span in segments.spans]
    if not ARCHITECTURES[model_type].packed_rows and len(set(rows)) != len(rows):
        raise UnsupportedModelError(
            f"model type {model_type!r}: packed rows are refused: its {sorted(ARCHITECTURES[model_type].other_layers)} "
            "layers carry their recurrent state across the packed boundaries (transformers' torch path ignores "
            "position_ids resets and cu_seq_lens), so each sequence's attention would depend on its neighbours; "
            "score a padded batch (verl: use_remove_padding=False)")


def check_sequence_parallel(module: torch.nn.Module) -> None:
    """Refuse sequence parallelism on an architecture with layers other than softmax attention (the hybrids):
    the capture does the exchange for attention calls only, so their DeltaNet layers would see this rank's T/sp
    positions and carry no state across ranks; nothing proves such a pass exact.

    module: a layer's attention module (its ``config`` names the architecture)."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    other = ARCHITECTURES[model_type].other_layers if model_type in ARCHITECTURES else frozenset()
    if other:
        raise UnsupportedModelError(
            f"model type {model_type!r}: sequence parallelism is refused: its {sorted(other)} layers are not "
            "attention, so the capture's exchange does not reach them and each would see only this rank's "
            "positions; run it without sequence parallelism (verl: ulysses_sequence_parallel_size=1)")


def check_model(model: torch.nn.Module, configs: list) -> None:
    """Refuse, before any forward, a model with a (sub-)configuration whose type the capture was not taught
    about (e.g. a multimodal wrapper whose image tokens attend bidirectionally, or its vision tower).

    configs: the distinct transformers configs of the model's modules (a wrapper such as DDP has none of its
    own; the wrapped model's are used)."""
    check_config_types(configs, f"in {type(model).__name__}")


def check_config_types(configs: list, where: str) -> None:
    """Raise UnsupportedModelError naming the first config whose ``model_type`` is not in ARCHITECTURES.

    where: how the message names the model (e.g. "in LlamaForCausalLM", or a checkpoint path)."""
    for config in configs:
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"model type {model_type!r} ({where}) is not one the capture was taught about; "
                f"supported: {', '.join(supported_model_types())}. Its attention may use a mechanism the "
                "metrics would silently get wrong (docs/models.md: adding an architecture)")


def _positive_int(value, what: str, where: str) -> int:
    if not is_integer(value) or value < 1:
        raise UnsupportedModelError(f"{where}: {what} = {value!r} is not a positive integer")
    return int(value)


def describe_layer(module: torch.nn.Module) -> LayerAttention:
    """The attention of one decoder layer's attention module, from its config and parameters.

    module: a transformers attention module with ``config`` and ``layer_idx`` (what the attention function
    receives as its first argument). Returns LayerAttention (sinks: the module's ``sinks`` parameter [Hq]).
    """
    config = getattr(module, "config", None)
    layer = getattr(module, "layer_idx", None)
    model_type = getattr(config, "model_type", None)
    where = f"layer {layer} of model type {model_type!r} ({type(module).__name__})"
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise UnsupportedModelError(
            f"{where}: the capture was not taught this architecture; supported: {', '.join(supported_model_types())}")
    if not getattr(module, "is_causal", True) or getattr(config, "use_bidirectional_attention", False) \
            or not getattr(config, "is_causal", True):
        raise UnsupportedModelError(f"{where} uses non-causal (bidirectional) attention; the metrics are defined "
                                    "for causal attention only")
    layer_types = getattr(config, "layer_types", None)
    layer_type = layer_types[layer] if layer_types is not None else FULL
    if layer_type in arch.other_layers:
        raise UnsupportedModelError(f"{where} is a {layer_type!r} layer, not softmax attention: only the "
                                    "softmax-attention layers of a hybrid model can be sampled")
    if layer_type not in (FULL, SLIDING, CHUNKED):
        raise UnsupportedModelError(f"{where} has layer type {layer_type!r}, which is not softmax attention the "
                                    "capture can describe")

    window = None
    if arch.windows == "every_layer" and getattr(config, "sliding_window", None) is not None:
        window = _positive_int(config.sliding_window, "sliding_window", where)
    elif arch.windows == "layer_types" and layer_type == SLIDING:
        window = _positive_int(getattr(config, "sliding_window", None), "sliding_window", where)
    elif layer_type == SLIDING:
        raise UnsupportedModelError(f"{where} is typed {SLIDING!r}, but this architecture takes no window from "
                                    "its layer types")

    chunk = None
    if layer_type == CHUNKED:
        if not arch.chunks:
            raise UnsupportedModelError(f"{where} is typed {CHUNKED!r}; chunked attention is understood only for "
                                        "architectures that chunk by `attention_chunk_size` (Llama 4)")
        chunk = _positive_int(getattr(config, "attention_chunk_size", None), "attention_chunk_size", where)

    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None and not arch.softcap:
        raise UnsupportedModelError(
            f"{where}: config sets attn_logit_softcapping={softcap}, but this architecture's attention call does "
            "not pass it, so what the layer computes is ambiguous; unset it (as the released checkpoints do)")
    if softcap is not None:
        softcap = float(softcap)
        if not softcap > 0:
            raise UnsupportedModelError(f"{where}: attn_logit_softcapping = {softcap} is not positive")

    sinks = None
    own = {name for name, _ in module.named_parameters(recurse=False)}
    if arch.sinks:
        sinks = getattr(module, "sinks", None)
        if not isinstance(sinks, torch.Tensor) or sinks.dim() != 1:
            raise UnsupportedModelError(f"{where}: expected a `sinks` parameter [num_heads] on the module")
        own.discard("sinks")
    if own:
        raise UnsupportedModelError(f"{where} holds parameters the capture does not understand: {sorted(own)} "
                                    "(attention sinks or a learnt bias change the softmax)")
    # The sinks enter the metrics' forward only (no gradient through the recorded attention).
    return LayerAttention(sliding_window=window, chunk_size=chunk, softcap=softcap,
                          sinks=None if sinks is None else sinks.detach())


def check_call(module, description: LayerAttention, query: torch.Tensor, key: torch.Tensor, *, dropout,
               scaling, is_causal, kwargs: dict) -> None:
    """Refuse an attention call that does not match ``description`` or carries what the capture does not know.

    query [B, Hq, T, D], key [B, Hkv, S, D]; kwargs: every other keyword the module passed."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    where = f"layer {getattr(module, 'layer_idx', None)} of model type {model_type!r} ({type(module).__name__})"
    arch = ARCHITECTURES[model_type]
    unknown = sorted(set(kwargs) - UNDERSTOOD_KWARGS)
    if unknown:
        raise UnsupportedModelError(
            f"{where}: the attention call passes {unknown}, which the capture does not understand (a position "
            "bias or another mask would change the attention the metrics describe)")
    if is_causal is not None and not is_causal:
        raise UnsupportedModelError(f"{where} is called with is_causal=False (non-causal attention)")
    if query.shape[2] != key.shape[2]:
        raise UnsupportedModelError(
            f"{where}: query length {query.shape[2]} != key length {key.shape[2]} (a KV cache or cross "
            "attention); score full sequences without a cache")
    if dropout and module.training:
        raise UnsupportedModelError(f"{where} applies attention dropout ({dropout}); call model.eval()")

    if arch.window_kwarg and "sliding_window" not in kwargs:
        raise UnsupportedModelError(f"{where}: this architecture should pass sliding_window= to the attention "
                                    "function and did not (a transformers version the capture does not know)")
    if "sliding_window" in kwargs and kwargs["sliding_window"] != description.sliding_window:
        raise UnsupportedModelError(f"{where}: the call passes sliding_window={kwargs['sliding_window']!r}, the "
                                    f"configuration gives {description.sliding_window!r}")
    if kwargs.get("softcap") != description.softcap:
        raise UnsupportedModelError(f"{where}: the call passes softcap={kwargs.get('softcap')!r}, the "
                                    f"configuration gives {description.softcap!r}")
    sinks = kwargs.get("s_aux")
    if (sinks is None) != (description.sinks is None) or (sinks is not None and sinks is not module.sinks):
        raise UnsupportedModelError(f"{where}: the call's attention sinks (s_aux) are not the module's `sinks`")
    if description.sinks is not None and description.sinks.shape[0] != query.shape[1]:
        raise UnsupportedModelError(f"{where}: sinks hold {description.sinks.shape[0]} values for "
                                    f"{query.shape[1]} query heads")
    own_scaling = getattr(module, "scaling", None)
    if scaling is not None and own_scaling is not None and float(scaling) != float(own_scaling):
        raise UnsupportedModelError(f"{where}: the call passes scaling={scaling}, the module's is {own_scaling}")


def _cuts(description: LayerAttention, segments: Segments) -> bool:
    """Whether the window or the chunks hide any earlier key from some row of some segment."""
    longest = segments.max_len
    window, chunk = description.sliding_window, description.chunk_size
    return (window is not None and window < longest) or (chunk is not None and chunk < longest)


def mask_disagreement(mask, description: LayerAttention, segments: Segments, length: int,
                      block_rows: int = 1024) -> torch.Tensor | None:
    """Compare the model's 4-D mask for a layer with the visibility ``description`` implies on ``segments``.

    mask: bool [B, 1 or H, T, T] (True = attend, sdpa's convention), float [B, 1 or H, T, T] (0 = attend,
        <= -1e4 = masked, eager's convention) or None (the model asks for plain causal
        attention over whole rows). Only rows of real tokens are compared (padding rows are never recorded).
    Returns a bool device scalar, True where they disagree (no host synchronisation), or None when the
    comparison needs no device work. Raises UnsupportedModelError for what is decidable on the host.

    visible(t, s) = same segment, s <= t, t - s < window, (t - start) // chunk == (s - start) // chunk.
    """
    if mask is None:
        whole_rows = all(span.start == 0 and span.end == length for span in segments.spans)
        rows = {span.row for span in segments.spans}
        if not whole_rows or len(rows) != segments.count or _cuts(description, segments):
            raise UnsupportedModelError(
                "the model built no attention mask (plain causal attention over whole rows), but the batch "
                "layout or the layer's window/chunks say otherwise; pass the attention mask (or packed "
                "position_ids) to the model as well")
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-1] != length or mask.shape[-2] != length:
        raise UnsupportedModelError(f"the attention mask is not a 4-D [B, H, {length}, {length}] tensor "
                                    f"(got {type(mask).__name__} {tuple(getattr(mask, 'shape', ()))})")
    window, chunk = description.sliding_window, description.chunk_size
    bad = torch.zeros((), dtype=torch.bool, device=mask.device)
    keys = torch.arange(length, device=mask.device)
    for span in segments.spans:
        b, start, end = span.row, span.start, span.end
        for lo in range(start, end, block_rows):
            hi = min(end, lo + block_rows)
            t = torch.arange(lo, hi, device=mask.device)[:, None]
            s = keys[None, :]
            want = (s >= start) & (s <= t)
            if window is not None:
                want &= t - s < window
            if chunk is not None:
                want &= torch.div(t - start, chunk, rounding_mode="floor") == torch.div(s - start, chunk,
                                                                                      rounding_mode="floor")
            got = mask[b, :, lo:hi, :]
            if got.dtype == torch.bool:
                bad |= (got != want).any()
            else:
                # An additive mask: exactly 0 where visible; where hidden, at most -1e4 (exp underflows to 0
                # next to any real logit; eager's mask uses finfo.min). Anything else is a bias or a leak.
                masked = got <= -1e4
                bad |= ((got == 0) != want).any() | ~((got == 0) | masked).all()
    return bad
