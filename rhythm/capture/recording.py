"""Capture: record the per-head docs/definitions.md section 2 metrics from inside a transformers model's forward.

A :class:`Capture` registers one attention function under a name of ours in transformers'
``AttentionInterface`` (and sdpa's mask function under the same name in ``AttentionMaskInterface``, otherwise
the model builds no mask for an unknown implementation), and switches the model's attention implementation
to that name for the duration of a ``with`` block. Nothing stays registered or switched afterwards.

Inside the block, every attention call arrives at :meth:`Capture._attention_forward` with post-RoPE
``query [B, Hq, T, D]`` and unrepeated ``key``/``value [B, Hkv, T, D]``:

- on a sampled layer (``module.layer_idx`` in ``context.layers``) it runs ``attention_metrics(query, key,
  value, ...)`` in fused mode: one pass gives the attention output O (returned to the model, so the layer
  behaves as with any other attention) and the per-head lse/distance/waad/fai, which are recorded;
- every other layer goes to transformers' own sdpa function, with the 4-D mask sdpa's mask function built
  (or to the model's eager function and eager mask when the model was loaded eager or lacks sdpa support,
  as softcapping and sink models do). The model builds one mask per layer type, so a non-sampled sliding or
  chunked layer keeps its window or chunks.

The padding and response layout comes from the :class:`CaptureContext` the caller (the scorer) sets up, not
from the 4-D mask: ``attention_mask [B, T]`` and ``response_start``, or ``cu_seqlens`` for a packed batch. A
packed batch that arrives without a context layout (B = 1, no mask) is read from the ``cu_seq_lens_q`` kwarg
(verl's remove-padding path) or from the resets of ``position_ids``.

Sequence parallelism (Ulysses, ``CaptureContext.sequence_parallel``): each rank holds T/sp positions of the
packed row, so an attention function sees only its chunk. Every layer then does the framework's all-to-all
itself (q, k, v to all T positions of the rank's Hq/sp heads; KV heads repeated when sp > Hkv, as the
framework does), runs its attention there (fused metrics on a sampled layer, causal attention within each
packed segment elsewhere) and sends the output back. The metrics are per query head and every query head
lives on exactly one rank, so all-gathering the sampled layers' per-head maps ([B, Hq/sp, T] -> [B, Hq, T])
gives every rank the records of the unsharded pass; the head grouping and gamma then run unchanged, and every
rank gets the same gamma for all rows.

Stopping early: after the last sampled layer is recorded, the attention function raises a private
exception (:class:`StopForward`) that :meth:`Capture.run` catches. The upper layers and the LM head never
run. This was chosen over re-running the decoder layers by hand because it keeps every model's own forward
(rotary embedding, mask construction, per-layer kwargs, accelerate hooks, sliding/full layer types) exactly
as the model wrote it: the capture only needs the model to route attention through the interface. The
exception is raised from inside the no-grad forward; nothing stateful (no KV cache: ``use_cache=False``)
is left half-updated.

Each sampled layer's attention is described from the model itself (:mod:`rhythm.capture.architectures`): the
configuration gives its sliding window (``layer_types``, ``sliding_window``, ``use_sliding_window`` /
``max_window_layers``), its chunks (``attention_chunk_size``), its logit softcap and its sink logits, and the
metrics are computed on exactly that attention (``attention_metrics(..., layer=LayerAttention)``). The
description is cross-checked against the call's keywords (``sliding_window``, ``softcap``, ``s_aux``,
``scaling``) and against the 4-D mask the model built for the layer (compared on device, checked once at the
end of the pass). What it cannot describe raises :class:`UnsupportedModelError` instead of returning wrong
numbers: an architecture it was not taught (an allow-list), non-causal attention, a position bias or any
attention keyword it does not understand, a mask that disagrees with the description, a KV cache, attention
dropout in training mode, or a model that bypasses the attention interface (nothing recorded).
Training-forward recording (``CaptureContext.metrics_only``): to record inside a forward the trainer runs
anyway (its log-prob forward, with or without gradients), a sampled layer returns the output the other layers
get (sdpa/eager/flash on the live q, k, v: the layer's autograd graph and its values are exactly those without
the capture) and records the metrics from a metrics-only pass (no v, no output) on detached q, k, under
no_grad, for the batch rows in ``context.rows`` (the metrics describe the attention before any dropout). A
sampled layer is recorded once per pass: when activation checkpointing recomputes it (inside the backward, or
a second call within the pass), only the attention itself runs.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from rhythm_kernels.segments import Segments, segments_from_cu_seqlens, segments_from_mask

from rhythm.capture import flash

from rhythm.metrics import validation
from rhythm.metrics.attention import AttentionMetrics, attention_metrics
from rhythm.capture.architectures import (UnsupportedModelError, check_call, check_layout, check_model, describe_layer,
                                          mask_disagreement)

_NAME_PREFIX = "rhythm_capture"
_counter = itertools.count()


class StopForward(Exception):
    """Raised from the attention function after the last sampled layer; caught by :meth:`Capture.run`."""


@dataclass
class CaptureContext:
    """What one forward pass records, and the sequence layout of its batch.

    layers: sampled decoder layer indices (0-based, ``module.layer_idx``).
    attention_mask: bool [B, T] (True on real tokens, one contiguous span per row) or None.
    response_start: LongTensor [B] (or [n_segments] with cu_seqlens), absolute T index of each sequence's
        first response token; None = every position is a response position.
    cu_seqlens: LongTensor [n_segments + 1] for a packed batch (B = 1, attention_mask None), or None.
    segments: the layout already built (``rhythm_kernels.segments.Segments`` of the forward's [B, T], or of the
        n recorded rows with ``rows``), instead of attention_mask / response_start / cu_seqlens.
    window, horizon, backend, validate: passed to ``attention_metrics``.
    stop_after_last: raise StopForward after the last sampled layer (False to let the forward finish, e.g.
        when the LM head is needed for entropies).
    metrics_only: record inside a forward whose outputs are used (a trainer's training or log-prob forward):
        see "Training-forward recording" in the module docstring. Needs ``stop_after_last=False``.
    rows: LongTensor [n] of batch rows whose metrics are recorded (None = all); ``attention_mask`` and
        ``response_start`` then describe these n rows only. Only with ``metrics_only``.
    sequence_parallel: a :class:`SequenceParallel` exchange when each rank holds T/sp positions of every row
        (Ulysses): every layer's attention then runs over all T positions for the rank's heads (see
        "Sequence parallelism" in the module docstring). ``segments`` then describes the whole T axis. Fused
        mode only (not with ``metrics_only``).
    records: layer index -> AttentionMetrics (filled by the capture; ``out`` is dropped after use).
    metrics_seconds: host wall time of the recording work in the pass (checks, layout, metrics; on CUDA the
        launch time unless the caller synchronises).
    """

    layers: tuple[int, ...]
    attention_mask: torch.Tensor | None = None
    response_start: torch.Tensor | int | None = None
    cu_seqlens: torch.Tensor | None = None
    segments: Segments | None = None
    window: int = 10
    horizon: tuple[int, int | None] = (10, 100)
    backend: str = "auto"
    validate: bool = False
    stop_after_last: bool = True
    metrics_only: bool = False
    rows: torch.Tensor | None = None
    sequence_parallel: "SequenceParallel | None" = None
    records: dict[int, AttentionMetrics] = field(default_factory=dict)
    output: object = None
    layout: Segments | None = field(default=None, repr=False)   # built by the first sampled layer of a pass
    mask_checks: list = field(default_factory=list, repr=False)  # per sampled layer: device bool, True = mask disagrees
    packed_bounds: torch.Tensor | None = field(default=None, repr=False)  # sequence parallel: cu_seqlens of all T
    metrics_seconds: float = 0.0

    def __post_init__(self):
        if len(self.layers) == 0:
            raise ValueError("CaptureContext.layers must name at least one layer")
        if self.metrics_only and self.stop_after_last:
            raise ValueError("CaptureContext: metrics_only records inside a forward whose outputs are used; "
                             "pass stop_after_last=False")
        if self.sequence_parallel is not None and (self.metrics_only or self.segments is None):
            raise ValueError("CaptureContext.sequence_parallel records in fused mode over the whole T axis: pass "
                             "segments (the layout of all T positions) and metrics_only=False")
        if self.rows is not None and not self.metrics_only:
            raise ValueError("CaptureContext.rows (a subset of the batch) needs metrics_only=True")
        self.layers = tuple(sorted(int(x) for x in self.layers))
        if self.segments is not None and not (self.attention_mask is None and self.response_start is None
                                              and self.cu_seqlens is None):
            raise ValueError("CaptureContext: segments replaces attention_mask, response_start and cu_seqlens; "
                             "pass one or the other")

    @property
    def last_layer(self) -> int:
        return self.layers[-1]


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Packed segment boundaries from position ids [1, T] (or [T]): a new segment starts wherever the
    position does not continue the previous one (the rule transformers' packed-sequence masks use).
    Returns LongTensor [n_segments + 1] on the device of position_ids."""
    pos = position_ids.reshape(-1)
    if pos.numel() == 0:
        raise ValueError("position_ids is empty")
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    idx = torch.nonzero(starts).reshape(-1)
    end = torch.tensor([pos.numel()], device=pos.device, dtype=idx.dtype)
    return torch.cat([idx, end]).to(torch.int64)


class SequenceParallel:
    """The exchange a sequence-parallel (Ulysses) group does around attention (implemented by an integration,
    e.g. :class:`rhythm.integrations.verl.ulysses.VerlUlysses` with verl's own all-to-all helpers).

    gather(q, k, v): [B, H, T/sp, D] each (this rank's positions, every head) -> [B, H/sp, T, D] (every
        position, this rank's heads; KV heads repeated as the framework does when sp > Hkv).
    scatter(out): [B, T, Hq/sp, D] -> [B, T/sp, Hq, D].
    gather_heads(x): [B, Hq/sp, T] -> [B, Hq, T] on every rank (heads in global order).
    gather_positions(position_ids): [1, T/sp] -> [1, T].
    """

    def gather(self, query, key, value):
        raise NotImplementedError

    def scatter(self, out):
        raise NotImplementedError

    def gather_heads(self, x):
        raise NotImplementedError

    def gather_positions(self, position_ids):
        raise NotImplementedError


def segment_causal_attention(query, key, value, bounds, scaling) -> torch.Tensor:
    """Causal attention within each packed segment (flash-attn varlen semantics, no [T, T] mask).

    query [1, Hq, T, D], key/value [1, Hkv, T, D] (GQA), bounds: cu_seqlens as a list (0 .. T) -> out
    [1, T, Hq, D]."""
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        parts.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], is_causal=True, scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1]))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous()


def _module_config_list(model: torch.nn.Module) -> list:
    """Every distinct config object of the model and its sub-models (by identity, outermost first)."""
    configs, seen = [], set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation") and id(config) not in seen:
            seen.add(id(config))
            configs.append(config)
    return configs


def check_capturable(model: torch.nn.Module) -> list:
    """Refuse (UnsupportedModelError) a model the capture cannot record: no transformers config with an
    attention implementation, or a (sub-)config whose type the capture was not taught about. Returns the
    model's configs (outermost first). ``Capture`` runs it on entry; trainers run it at construction."""
    configs = _module_config_list(model)
    if not configs:
        raise UnsupportedModelError(
            f"model ({type(model).__name__}) has no transformers config with an attention implementation"
        )
    check_model(model, configs)
    return configs


def is_registered(name: str) -> bool:
    """Whether an attention function or mask function is registered under ``name`` (for tests)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    return name in AttentionInterface._global_mapping or name in AttentionMaskInterface._global_mapping


def _common_dtype(query, key, value):
    """One dtype for q, k, v, as sdpa would see them. Under autocast (TRL/accelerate ``bf16=True`` on fp32
    weights) RoPE promotes q and k to fp32 while v stays bf16: use the autocast dtype, as sdpa does;
    otherwise promote."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    return query.to(dtype), key.to(dtype), value.to(dtype)


class Capture:
    """Context manager that routes a model's attention through the metrics for one or more forwards.

    Usage::

        with Capture(model) as capture:
            records = capture.run(context, input_ids=..., attention_mask=..., position_ids=...)

    ``run`` calls ``model(**inputs, use_cache=False)`` (or ``forward=`` a callable of your choice) with the
    context active, stops after the last sampled layer (unless ``context.stop_after_last`` is False), checks
    that every sampled layer was recorded and returns ``context.records``.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.name = f"{_NAME_PREFIX}_{next(_counter)}"
        self._context: CaptureContext | None = None
        self._saved: list[tuple[object, object]] = []
        self._delegate_name = "sdpa"
        self._active = False

    # -- registration -------------------------------------------------------------------------------------
    def __enter__(self) -> "Capture":
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface

        configs = check_capturable(self.model)
        # Other layers keep what the model can run: sdpa, or the model's own eager function when it was loaded
        # eager or does not support sdpa (e.g. softcapping models). The mask function follows the delegate.
        original = configs[0]._attn_implementation
        supports_sdpa = getattr(self.model, "_supports_sdpa", True)
        self._delegate_name = "eager" if original == "eager" or not supports_sdpa else "sdpa"
        AttentionInterface.register(self.name, self._attention_forward)
        AttentionMaskInterface.register(self.name, AttentionMaskInterface._global_mapping[self._delegate_name])
        try:
            for config in configs:
                self._saved.append((config, config._attn_implementation))
            for config in configs:
                config._attn_implementation = self.name
        except BaseException:
            self._restore()
            raise
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface

        # Restore innermost first: the config setter propagates to sub-configs, so the outer value last
        # would overwrite a sub-config's own saved value; restoring every config afterwards fixes that.
        for config, value in reversed(self._saved):
            config._attn_implementation = value
        for config, value in self._saved:
            if config._attn_implementation != value:
                config._attn_implementation_internal = value
        self._saved = []
        AttentionInterface._global_mapping.pop(self.name, None)
        AttentionMaskInterface._global_mapping.pop(self.name, None)
        self._active = False
        self._context = None

    # -- one forward ----------------------------------------------------------------------------------------
    def run(self, context: CaptureContext, forward=None, **inputs) -> dict[int, AttentionMetrics]:
        """Run one forward with ``context`` active; returns {layer: AttentionMetrics} for every sampled layer.

        forward: callable receiving ``**inputs`` (default: the model itself with ``use_cache=False``). Its
        return value is stored in ``context.output`` when the forward is not stopped early.
        """
        if not self._active:
            raise RuntimeError("Capture.run must be called inside `with Capture(model) as capture:`")
        self._context = context
        context.records.clear()
        context.layout = None
        context.mask_checks = []
        context.packed_bounds = None
        context.output = None
        context.metrics_seconds = 0.0
        call = forward if forward is not None else (lambda **kw: self.model(**kw, use_cache=False))
        try:
            context.output = call(**inputs)
        except StopForward:
            pass
        finally:
            self._context = None
        missing = [layer for layer in context.layers if layer not in context.records]
        if missing:
            raise UnsupportedModelError(
                f"no attention call was recorded for sampled layer(s) {missing} of {type(self.model).__name__}: "
                "the model does not route its attention through transformers' AttentionInterface (or its "
                "attention modules carry no `layer_idx`), so its attention cannot be captured"
            )
        self._check_masks(context)
        return context.records

    # -- the attention function -----------------------------------------------------------------------------
    def _attention_forward(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           is_causal=None, **kwargs):
        """transformers attention-function signature: query [B, Hq, T, D], key/value [B, Hkv, S, D] ->
        (out [B, T, Hq, D], None)."""
        context = self._context
        layer = getattr(module, "layer_idx", None)
        if context is not None and context.sequence_parallel is not None:
            return self._sequence_parallel_forward(context, module, query, key, value, dropout, scaling, is_causal,
                                                   kwargs)
        if context is None or layer is None or int(layer) not in context.layers:
            if context is not None and not context.metrics_only:
                return self._per_sequence(context, module, query, key, value, attention_mask, dropout, scaling,
                                          is_causal, kwargs)
            return self._passthrough(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
        layer = int(layer)
        if context.metrics_only:
            out = self._passthrough(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
            if layer not in context.records:   # not again when activation checkpointing recomputes the layer
                start = time.perf_counter()
                with torch.no_grad():
                    self._record_beside(context, module, layer, query, key, value, attention_mask, scaling,
                                        is_causal, kwargs)
                context.metrics_seconds += time.perf_counter() - start
            return out
        description = describe_layer(module)
        check_call(module, description, query, key, dropout=dropout, scaling=scaling, is_causal=is_causal,
                   kwargs=kwargs)
        query, key, value = _common_dtype(query, key, value)
        if context.layout is None:
            # The batch layout is the same for every sampled layer: read it (one host sync) once per pass.
            context.layout = self._layout(context, query, kwargs)
            check_layout(module, context.layout)
        disagreement = mask_disagreement(attention_mask, description, context.layout, query.shape[2])
        if disagreement is not None:
            context.mask_checks.append((layer, disagreement))
        metrics = attention_metrics(
            query, key, value, window=context.window, horizon=context.horizon, scale=scaling,
            segments=context.layout, backend=context.backend, validate=context.validate, layer=description,
        )
        out = metrics.out
        metrics.out = None
        context.records[layer] = metrics
        if context.stop_after_last and layer == context.last_layer:
            raise StopForward()
        return out, None

    def _sequence_parallel_forward(self, context, module, query, key, value, dropout, scaling, is_causal, kwargs):
        """Ulysses: query [B, Hq, T/sp, D], key/value [B, Hkv, T/sp, D] (this rank's positions, every head) ->
        out [B, T/sp, Hq, D]. The exchange gives this rank all T positions of its Hq/sp query heads (and their
        KV heads); a sampled layer records their metrics in fused mode and all-gathers the per-head maps over
        the group (records hold every head, as without sequence parallelism); any other layer runs causal
        attention within each packed segment (the boundaries from the gathered position ids, as flash-attn's
        varlen path reads them). The output goes back to this rank's positions."""
        sp = context.sequence_parallel
        layer = getattr(module, "layer_idx", None)
        if dropout:
            raise UnsupportedModelError(f"sequence-parallel capture needs attention dropout 0, got {dropout}")
        query, key, value = _common_dtype(query, key, value)
        q, k, v = sp.gather(query, key, value)
        if layer is not None and int(layer) in context.layers:
            layer = int(layer)
            description = describe_layer(module)
            check_call(module, description, q, k, dropout=dropout, scaling=scaling, is_causal=is_causal,
                       kwargs=kwargs)
            if context.layout is None:
                context.layout = context.segments.to(q.device)
            if context.layout.shape != (q.shape[0], q.shape[2]):
                raise ValueError(f"CaptureContext.segments describe {context.layout.shape}, the gathered sequence "
                                 f"is {(q.shape[0], q.shape[2])} (B, T): pass the layout of all T positions")
            metrics = attention_metrics(q, k, v, window=context.window, horizon=context.horizon, scale=scaling,
                                        segments=context.layout, backend=context.backend, validate=context.validate,
                                        layer=description)
            out = metrics.out
            metrics.out = None
            context.records[layer] = AttentionMetrics(**{name: sp.gather_heads(getattr(metrics, name))
                                                         for name in ("lse", "distance", "waad", "fai", "fai_valid")})
        else:
            for name in ("sliding_window", "softcap", "s_aux", "sinks", "position_bias"):
                if kwargs.get(name) is not None:
                    raise UnsupportedModelError(f"sequence-parallel capture runs plain causal attention on the "
                                                f"layers it does not sample; this layer passes {name}")
            if context.packed_bounds is None:
                position_ids = kwargs.get("position_ids")
                if position_ids is None:
                    raise UnsupportedModelError("sequence-parallel capture needs the position_ids the model passes "
                                                "to its attention (where each packed sequence starts)")
                context.packed_bounds = cu_seqlens_from_position_ids(sp.gather_positions(position_ids)).tolist()
            out = segment_causal_attention(q, k, v, context.packed_bounds, scaling)
        return sp.scatter(out), None

    def _passthrough(self, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
        """The attention of a layer whose output we do not compute: flash-attn where usable, else the delegate."""
        if flash.usable(query, attention_mask, dropout, kwargs, value):   # FA2 where it imports (rhythm.capture.flash)
            return flash.attention(query, key, value, scaling=scaling, sliding_window=kwargs.get("sliding_window"),
                                   softcap=kwargs.get("softcap")), None
        return self._delegate(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)

    def _per_sequence(self, context, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
        """A scoring pass's layer that is not sampled: the delegate (sdpa / the model's eager function) run on
        each sequence alone, [1, H, n, D] with the sequence's own [1, 1, n, n] mask, so that no sequence's hidden
        states, and hence no sampled layer's metrics, depend on what else is in the micro-batch or on its
        padding (docs/definitions.md section 7, batch invariance). The mask is the model's own, cut to the
        sequence (its window / chunks kept); where the model built none (no padding), the causal one the
        model's mask would hold, in the same form, so that both cases take the same kernel. Padding rows of
        the output are 0 (no real row reads them)."""
        if context.layout is None:
            context.layout = self._layout(context, query, kwargs)
            check_layout(module, context.layout)
        delegate = self._delegate(module)
        eager = delegate.__name__ != "sdpa_attention_forward"
        out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])
        for b, start, end, _ in context.layout.spans:
            piece = lambda x: x[b:b + 1, :, start:end].contiguous()  # noqa: E731
            mask = self._sequence_mask(attention_mask, b, start, end, query, eager)
            result, _ = delegate(module, piece(query), piece(key), piece(value), mask, dropout=dropout,
                                 scaling=scaling, is_causal=is_causal, **kwargs)
            out[b, start:end] = result[0]
        return out, None

    @staticmethod
    def _sequence_mask(attention_mask, b, start, end, query, eager) -> torch.Tensor:
        """[1, 1, n, n] mask of the sequence at [start, end) of batch row b: the model's 4-D mask cut to it, or
        the causal mask (bool for sdpa; 0 / the dtype's min for an eager function) where the model built none."""
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
            row = b if attention_mask.shape[0] > 1 else 0
            return attention_mask[row:row + 1, :1, start:end, start:end].contiguous()
        n = end - start
        causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril_()[None, None]
        if not eager:
            return causal
        return torch.zeros(causal.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~causal, torch.finfo(query.dtype).min)

    def _record_beside(self, context, module, layer, query, key, value, attention_mask, scaling, is_causal, kwargs):
        """metrics_only: the per-head metrics of ``context.rows`` from detached q, k (no v: metrics-only pass).
        Dropout is the output's business: the metrics describe the attention before it."""
        description = describe_layer(module)
        check_call(module, description, query, key, dropout=0.0, scaling=scaling, is_causal=is_causal,
                   kwargs=kwargs)
        q, k, _ = _common_dtype(query.detach(), key.detach(), value.detach())
        if context.rows is not None:
            rows = context.rows.to(q.device)
            q, k = q.index_select(0, rows), k.index_select(0, rows)
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[0] > 1:
                attention_mask = attention_mask.index_select(0, rows)
        if context.layout is None:
            context.layout = self._layout(context, q, kwargs)
            check_layout(module, context.layout)
        disagreement = mask_disagreement(attention_mask, description, context.layout, q.shape[2])
        if disagreement is not None:
            context.mask_checks.append((layer, disagreement))
        context.records[layer] = attention_metrics(
            q, k, None, window=context.window, horizon=context.horizon, scale=scaling, segments=context.layout,
            backend=context.backend, validate=context.validate, layer=description)

    def _delegate(self, module):
        """The attention function of a layer we do not record: transformers' sdpa, or the eager function
        defined next to the module's class (each transformers model file has one)."""
        if self._delegate_name == "eager":
            import sys

            eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
            if eager is not None:
                return eager
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward

    def _layout(self, context: CaptureContext, query: torch.Tensor, kwargs) -> Segments:
        """Segments of this pass: the context's padding mask or packed boundaries, else (B = 1, no mask) the
        packed layout the model's own kwargs describe."""
        batch, _, length, _ = query.shape
        if context.segments is not None:
            return context.segments.to(query.device)
        mask, cu_seqlens = context.attention_mask, context.cu_seqlens
        if cu_seqlens is None and mask is None and batch == 1:
            cu_seqlens = self._packed_boundaries(kwargs)
        for name, x in (("attention_mask", mask), ("cu_seqlens", cu_seqlens),
                        ("response_start", context.response_start)):
            validation.check_mask_device(name, x, query.device)
        if cu_seqlens is not None:
            if mask is not None:
                raise ValueError("CaptureContext: attention_mask must be None with cu_seqlens")
            return segments_from_cu_seqlens(cu_seqlens, batch, length, context.response_start, query.device)
        return segments_from_mask(mask, batch, length, context.response_start, query.device)

    @staticmethod
    def _packed_boundaries(kwargs) -> torch.Tensor | None:
        """Packed layout of a B = 1 batch from the kwargs the model forwards: ``cu_seq_lens_q`` (flash/verl)
        or the resets of ``position_ids``. None when neither says the row is packed."""
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None:
            return cu.to(torch.int64)
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and position_ids.dim() <= 2 and position_ids.reshape(-1).shape[0] > 1:
            cu = cu_seqlens_from_position_ids(position_ids)
            if cu.numel() > 2:
                return cu
        return None

    def _check_masks(self, context: CaptureContext) -> None:
        """One host synchronisation per pass: refuse the records if the mask the model built for a sampled
        layer disagrees with the layer's description (an unknown mask: the metrics would describe other
        attention than the model's)."""
        if not context.mask_checks:
            return
        flags = torch.stack([flag for _, flag in context.mask_checks]).cpu()
        bad = [layer for (layer, _), flag in zip(context.mask_checks, flags.tolist()) if flag]
        if bad:
            context.records.clear()
            raise UnsupportedModelError(
                f"the attention mask {type(self.model).__name__} "
                f"({', '.join(sorted({str(getattr(c, 'model_type', None)) for c, _ in self._saved}))}) built for "
                f"sampled layer(s) {bad} differs from the window/chunks/layout read from its configuration: an "
                "attention pattern the capture does not understand (e.g. a custom 4-D mask, or a packed row that "
                "this model does not split at position_ids resets: score it as a padded batch)")
